"""The client worker's figures that open many connections: handshakes, memory, fan-out.

Each job dials its own connections (through :class:`~stalk.bench.dialer._Dialer`), apart
from the data connections the other figures keep; the fan-out's streams of one kind stay
open from its first job until a job of another kind.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
from anyio.abc import AsyncResource, SocketStream, TaskStatus
from anyio.streams.tls import TLSStream

import stalk
from stalk.bench.common import (
    BenchError,
    _close_quietly,
    _fd_limit,
    _Framed,
    _median,
    _p99,
    _Stream,
    rss_bytes,
)
from stalk.bench.dialer import _Dialer

#: Connections opened at once while the fan-out figure sets up its connections.
_OPENERS: Final = 16


class _Crowd:
    """Handshakes, memory per idle connection and the fan-out, for the client worker."""

    def __init__(
        self,
        dialer: _Dialer,
        remote: Callable[[str, list[Any]], Awaitable[list[Any]]],
        settle: Callable[[int], Awaitable[int]],
    ) -> None:
        #: The dialer's ``dial``, bound once: the handshake figure calls it in its timed loop.
        self.dial = dialer.dial
        #: Sends a command on the client's data connection of a kind, returns the answer.
        self.remote = remote
        #: How many streams the server serves, once at most the number given remain.
        self.settle = settle
        #: The fan-out figure's streams of the kind it ran last (one kind open at a time).
        self.pools: dict[str, list[_Stream]] = {}
        #: Where the stalk connections opened by jobs live (each in a task of its own,
        #: inside ``async with``) until ``stop`` is set.
        self.holders: anyio.abc.TaskGroup | None = None
        self.stop = anyio.Event()
        self._holding = 0  # holder tasks running
        self._released = anyio.Event()  # set when the last one ends

    async def handshakes(self, kind: str, concurrency: int, n: int) -> dict[str, Any]:
        """Open and close ``n`` connections, ``concurrency`` at a time; time each opening."""
        latencies: list[float] = []
        remaining = n
        clock = time.perf_counter

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t0 = clock()
                conn = await self.dial(kind)
                latencies.append(clock() - t0)
                await conn.aclose()

        start = clock()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        seconds = clock() - start
        return {"seconds": seconds, "median": _median(latencies), "p99": _p99(latencies)}

    async def _server_rss(self, kind: str, expected: int) -> int:
        """The server's RSS once it holds ``expected`` connections of ``kind``."""
        answer = await self.remote(kind, ["rss", expected])
        if int(answer[2]) != expected:
            raise BenchError(f"server has {answer[2]} {kind} connections, expected {expected}")
        return int(answer[1])

    async def memory(self, kind: str, n: int, concurrency: int) -> dict[str, Any]:
        """RSS growth of both processes over ``n`` idle established connections."""
        dial_kind = "stalk_ik" if kind == "stalk" else kind
        for conn in [await self.dial(dial_kind) for _ in range(16)]:  # warm-up
            await conn.aclose()
        server_before = await self._server_rss(kind, 1)
        gc.collect()
        client_before = rss_bytes()
        held = await self._open(dial_kind, n, concurrency)
        server_after = await self._server_rss(kind, 1 + n)
        gc.collect()
        client_after = rss_bytes()
        for conn in held:
            await conn.aclose()
        return {
            "server_before": server_before,
            "server_after": server_after,
            "client_before": client_before,
            "client_after": client_after,
        }

    async def fanout(
        self, kind: str, streams: int, n: int, spack: stalk.Spack, message: list[bytes]
    ) -> float:
        """``streams`` streams of ``kind`` at once, each ``n`` 64 B round trips in a row.

        Each stream sends a spack (stalk: ``spack``; TLS, TCP: ``message``, the same
        payload), waits for its echo, and again. The seconds run from the
        first request to the last echo; the streams are opened by the first such job and
        kept (their opening is not timed), each told to echo ``n`` spacks before the clock
        starts.
        """
        pool = await self._pool(kind, streams)

        async def exchange(stream: _Stream) -> None:
            if isinstance(stream, _Framed):
                send_framed, receive_framed = stream.send, stream.receive
                for _ in range(n):
                    await send_framed(message)
                    await receive_framed()
            else:
                send, receive = stream.send, stream.receive
                for _ in range(n):
                    await send(spack)
                    await receive()

        for stream in pool:
            if isinstance(stream, _Framed):
                await stream.send(["echo", n])
            else:
                await stream.send(stalk.Spack("echo", n))
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for stream in pool:
                tg.start_soon(exchange, stream)
        return time.perf_counter() - start

    async def _pool(self, kind: str, streams: int) -> list[_Stream]:
        """The fan-out's streams of ``kind``: channels, or connections.

        The channels are those of one connection; the connections (stalk IK, TLS, TCP) are
        opened ``_OPENERS`` at a time. They stay open for the runs of ``kind`` that follow,
        and close before another kind's open: a kind is measured beside no thousand streams
        of another, whose objects every garbage collection in both processes would go
        through (with all four kinds open, collections took 18% of the channels' runs).
        """
        pool = self.pools.get(kind)
        if pool is not None:
            return pool
        await self._close_pools()
        needed = streams + 256  # (and this process's own files)
        limit = _fd_limit()
        if limit is not None and limit < needed:
            raise BenchError(
                f"the fan-out figure needs about {needed} open files per process; "
                f"the limit here is {limit} (raise ulimit -n)"
            )
        holders = self.holders
        assert holders is not None, "jobs run inside _client_main"
        if kind == "channels":
            conn = await self.dial("stalk_chfan")
            assert isinstance(conn, stalk.Connection)
            await holders.start(self.hold, conn, self.stop)
            # Opening sends nothing: the first command on each opens it at the server.
            pool = [await conn.open_channel() for _ in range(streams)]
        else:
            dial_kind = "stalk_ik" if kind == "stalk" else kind
            opened = await self._open(dial_kind, streams, _OPENERS)
            pool = []
            for conn in opened:
                if isinstance(conn, stalk.Connection):
                    await holders.start(self.hold, conn, self.stop)
                    pool.append(conn)
                elif isinstance(conn, (TLSStream, SocketStream)):
                    pool.append(_Framed(conn))
        self.pools[kind] = pool
        return pool

    async def _open(self, kind: str, n: int, concurrency: int) -> list[AsyncResource]:
        """``n`` connections of ``kind``, opened by ``concurrency`` tasks at once."""
        opened: list[AsyncResource] = []
        remaining = n

        async def opener() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                opened.append(await self.dial(kind))

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(opener)
        return opened

    async def hold(
        self,
        conn: stalk.Connection,
        stop: anyio.Event,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep ``conn`` open inside ``async with`` (its writer and reader run) until ``stop``."""
        self._holding += 1
        try:
            async with conn:
                task_status.started()
                await stop.wait()
        finally:
            self._holding -= 1
            if not self._holding:
                self._released.set()

    async def _close_pools(self) -> None:
        """Close the fan-out's open streams, and wait until the server's ends closed too."""
        if not self.pools:
            return
        serving = await self.settle(sys.maxsize)  # (at once)
        closing = sum(map(len, self.pools.values()))
        await self._close_streams()
        self.pools.clear()
        self.stop = anyio.Event()
        gc.collect()
        await self.settle(serving - closing)

    async def _close_streams(self) -> None:
        """Close the fan-out's TLS/TCP streams, and end the holders (their connections)."""
        for pool in self.pools.values():
            for stream in pool:
                if isinstance(stream, _Framed):
                    await _close_quietly(stream)
        self._released = anyio.Event()
        self.stop.set()
        if self._holding:
            await self._released.wait()

    async def close(self) -> None:
        """Close what jobs opened: the fan-out's streams and their holders."""
        await self._close_streams()
