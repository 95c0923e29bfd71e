"""The worker processes: ``python -m stalk.bench --worker server|client``.

The server serves stalk, TLS 1.3 and plain TCP listeners; the client runs the timed jobs
the orchestrator sends it on stdin and answers on stdout. Only workers do network I/O.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import math
import os
import ssl
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import anyio
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.tls import TLSStream

import stalk
from stalk.bench import (
    BIG_LIMIT,
    CERTIFIED_NAME,
    CHANNEL_LIMIT,
    FANOUT_SIZE,
    HOST,
    LINEARITY_BIG,
    LINEARITY_SMALL,
    RTT_SIZE,
    STREAM_SIZE,
)
from stalk.bench.common import (
    _ENDED,
    BenchError,
    _close_quietly,
    _emit,
    _Framed,
    _median,
    _p99,
    _payload,
    _raise_fd_limit,
    _read_stdin_line,
    _run_loop,
    _server_ssl_context,
    _Stream,
    bench_authority,
    bench_certificate,
    rss_bytes,
)
from stalk.bench.crowd import _Crowd
from stalk.bench.dialer import _Dialer

#: Listener settings of every stalk listener here: every client is on HOST, and the memory
#: and fan-out figures hold a thousand connections open, so the caps are raised to what
#: _raise_fd_limit() makes room for.
_MANY: Final[dict[str, Any]] = {"max_connections": 4096, "max_handshakes_per_address": 256}

# -- the server worker -------------------------------------------------------------------


@dataclass
class _Endpoint:
    """One connection as the command loop sees it, whatever the transport."""

    receive: Callable[[], Awaitable[Any]]
    #: sends back an object exactly as ``receive`` returned it
    echo: Callable[[Any], Awaitable[None]]
    #: sends a command or answer given as a list
    reply: Callable[[list[Any]], Awaitable[None]]


def _stalk_endpoint(conn: stalk.Connection | stalk.Channel) -> _Endpoint:
    async def reply(message: list[Any]) -> None:
        await conn.send(stalk.Spack(*message))

    return _Endpoint(conn.receive, conn.send, reply)


def _framed_endpoint(framed: _Framed) -> _Endpoint:
    return _Endpoint(framed.receive, framed.send, framed.send)


class _Server:
    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self.ssl_context = ssl_context
        self.open: dict[str, int] = defaultdict(int)
        self.profiler: cProfile.Profile | None = None

    async def serve_commands(self, kind: str, endpoint: _Endpoint) -> None:
        self.open[kind] += 1
        try:
            with contextlib.suppress(*_ENDED):
                while await self._command(kind, endpoint, list(await endpoint.receive())):
                    pass
        finally:
            self.open[kind] -= 1

    async def _command(self, kind: str, endpoint: _Endpoint, command: list[Any]) -> bool:
        op = command[0]
        receive = endpoint.receive
        if op == "sink":
            for _ in range(int(command[1])):
                await receive()
            await endpoint.reply(["ok"])
        elif op == "echo":
            echo = endpoint.echo
            for _ in range(int(command[1])):
                await echo(await receive())
        elif op == "echo_until":
            # Round trips until the client's ["done"]: the client decides how many.
            echo = endpoint.echo
            while not isinstance((message := await receive())[0], str):
                await echo(message)
            await endpoint.reply(["ok"])
        elif op == "stream":
            # A stream of unknown length: everything up to the client's ["done"] is dropped.
            while not isinstance((await receive())[0], str):
                pass
            await endpoint.reply(["ok"])
        elif op == "rss":
            with anyio.move_on_after(60):
                while self.open[kind] != int(command[1]):
                    await anyio.sleep(0.01)
            await anyio.sleep(0.05)
            gc.collect()
            await endpoint.reply(["rss", rss_bytes(), self.open[kind]])
        elif op == "settle":
            # The client closed streams: wait until this side's ends have closed too (at
            # most ``limit`` left), and their objects are gone.
            with anyio.move_on_after(60):
                while sum(self.open.values()) > int(command[1]):
                    await anyio.sleep(0.01)
            gc.collect()
            await endpoint.reply(["settled", sum(self.open.values())])
        elif op == "profile":
            self._profile(command)
            await endpoint.reply(["ok"])
        else:
            return False
        return True

    def _profile(self, command: list[Any]) -> None:
        if command[1] == "start":
            self.profiler = cProfile.Profile()
            self.profiler.enable()
        elif self.profiler is not None:
            self.profiler.disable()
            self.profiler.dump_stats(str(command[2]))
            self.profiler = None

    async def stalk_handler(self, kind: str, conn: stalk.Connection) -> None:
        await self.serve_commands(kind, _stalk_endpoint(conn))

    async def channel_handler(self, kind: str, channel: stalk.Channel) -> None:
        """A channel the client opened obeys commands as a connection does."""
        await self.serve_commands(f"{kind} channel", _stalk_endpoint(channel))

    async def tcp_handler(self, stream: SocketStream) -> None:
        framed = _Framed(stream)
        try:
            await self.serve_commands("tcp", _framed_endpoint(framed))
        finally:
            await anyio.aclose_forcefully(stream)

    async def tls_handler(self, stream: SocketStream) -> None:
        try:
            tls = await TLSStream.wrap(
                stream, server_side=True, ssl_context=self.ssl_context, standard_compatible=False
            )
        except _ENDED:
            await anyio.aclose_forcefully(stream)
            return
        try:
            await self.serve_commands("tls", _framed_endpoint(_Framed(tls)))
        finally:
            await anyio.aclose_forcefully(tls)


async def _server_main(options: argparse.Namespace) -> None:
    server = _Server(_server_ssl_context(options.cert, options.key))
    identity = stalk.Identity.generate()
    configs = {
        "stalk": stalk.Config(**_MANY),
        "stalk_big": stalk.Config(**_MANY, max_message_size=BIG_LIMIT),
        # With channels, for as many as the fan-out opens; otherwise as "stalk" (channel 0
        # of these connections is measured against "stalk").
        "stalk_ch": stalk.Config(**_MANY, max_channels=CHANNEL_LIMIT),
        "stalk_chbig": stalk.Config(
            **_MANY, max_channels=CHANNEL_LIMIT, max_message_size=BIG_LIMIT
        ),
        # The certified handshakes: it presents a certificate and requires one.
        "stalk_cert": stalk.Config(**_MANY),
    }
    certified: dict[str, Any] = {
        "certificate": bench_certificate(identity, CERTIFIED_NAME, 1, int(time.time())),
        "authorities": stalk.Authorities([bench_authority().public]),
    }
    async with anyio.create_task_group() as tg:
        listeners = {
            kind: await stalk.create_listener(
                HOST,
                0,
                identity=identity,
                config=config,
                channel_handler=partial(server.channel_handler, kind)
                if config.max_channels
                else None,
                **(certified if kind == "stalk_cert" else {}),
            )
            for kind, config in configs.items()
        }
        tls = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
        tcp = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
        for kind, listener in listeners.items():
            tg.start_soon(listener.serve, partial(server.stalk_handler, kind))
        tg.start_soon(tls.serve, server.tls_handler)
        tg.start_soon(tcp.serve, server.tcp_handler)
        ports = {kind: listener.address[1] for kind, listener in listeners.items()}
        ports["tls"] = tls.extra(SocketAttribute.local_port)
        ports["tcp"] = tcp.extra(SocketAttribute.local_port)
        _emit({"ready": True, "ports": ports, "key": str(identity.public), "pid": os.getpid()})
        await _read_stdin_line()  # the orchestrator closes our stdin to stop us
        tg.cancel_scope.cancel()


# -- the client worker -------------------------------------------------------------------


class _Client:
    """The client worker: runs the orchestrator's jobs, one at a time, and answers each.

    It keeps one data connection per transport (the ``--connect`` kinds, opened at start)
    for the figures measured on a connection (throughput, round trip, linearity, the quiet
    spack beside a stream); the figures that open many connections are its ``crowd``'s.
    """

    def __init__(self, options: argparse.Namespace) -> None:
        self.dialer = _Dialer(json.loads(options.ports), options.server_key, options.cafile)
        self.crowd = _Crowd(self.dialer, self._remote, self._settle)
        self.conns: dict[str, _Stream] = {}
        self._spacks: dict[int, stalk.Spack] = {}
        self._messages: dict[int, list[bytes]] = {}

    # connections

    async def connect_data(self, kind: str) -> None:
        conn = await self.dialer.dial(kind)
        if isinstance(conn, stalk.Connection):
            self.conns[kind] = conn
        elif isinstance(conn, (TLSStream, SocketStream)):
            self.conns[kind] = _Framed(conn)

    def endpoint(self, kind: str) -> _Endpoint:
        conn = self.conns[kind]
        return _framed_endpoint(conn) if isinstance(conn, _Framed) else _stalk_endpoint(conn)

    async def channel(self, kind: str) -> stalk.Channel:
        """Channel ``kind`` (``"A"``, ``"B"``) of the "stalk_chbig" connection, opened once."""
        name = f"stalk_chbig channel {kind}"
        channel = self.conns.get(name)
        if not isinstance(channel, stalk.Channel):
            conn = self.conns["stalk_chbig"]
            assert isinstance(conn, stalk.Connection)
            channel = self.conns[name] = await conn.open_channel()
        return channel

    def spack(self, size: int) -> stalk.Spack:
        if size not in self._spacks:
            self._spacks[size] = stalk.Spack(_payload(size))
        return self._spacks[size]

    def message(self, size: int) -> list[bytes]:
        if size not in self._messages:
            self._messages[size] = [_payload(size)]
        return self._messages[size]

    # jobs

    async def run_job(self, job: dict[str, Any]) -> dict[str, Any]:
        profile: dict[str, str] | None = job.get("profile")
        profiler: cProfile.Profile | None = None
        if profile is not None:
            await self._remote(profile["via"], ["profile", "start"])
            profiler = cProfile.Profile()
            profiler.enable()
        try:
            return await self._dispatch(job)
        finally:
            if profile is not None and profiler is not None:
                profiler.disable()
                profiler.dump_stats(profile["client"])
                await self._remote(profile["via"], ["profile", "stop", profile["server"]])

    async def _remote(self, kind: str, command: list[Any]) -> list[Any]:
        endpoint = self.endpoint(kind)
        await endpoint.reply(command)
        return list(await endpoint.receive())

    async def _settle(self, limit: int) -> int:
        """The streams the server serves, once at most ``limit`` remain (see ``settle``)."""
        answer = await self._remote(next(iter(self.conns)), ["settle", limit])
        return int(answer[1])

    async def _dispatch(self, job: dict[str, Any]) -> dict[str, Any]:
        op = job["op"]
        if op == "sink":
            seconds = await self.sink(job["conn"], job["size"], job["n"], job["batch"])
            return {"seconds": seconds}
        if op == "rtt":
            return await self.rtt(job["conn"], job["size"], job["n"])
        if op == "handshake":
            return await self.crowd.handshakes(job["kind"], job["concurrency"], job["n"])
        if op == "linearity":
            small = await self.sink(job["conn"], LINEARITY_SMALL, job["small_n"], 1)
            big = await self.sink(job["conn"], LINEARITY_BIG, job["big_n"], 1)
            return {"small_seconds": small, "big_seconds": big}
        if op == "memory":
            return await self.crowd.memory(job["conn"], job["n"], job["concurrency"])
        if op == "fanout":
            spack, message = self.spack(FANOUT_SIZE), self.message(FANOUT_SIZE)
            seconds = await self.crowd.fanout(job["kind"], job["streams"], job["n"], spack, message)
            # The streams the server serves, the data connections' included: one kind's.
            return {"seconds": seconds, "server_streams": await self._settle(sys.maxsize)}
        if op == "quiet":
            return await self.quiet(job["kind"], job["n"], job["limit"])
        raise BenchError(f"unknown job {op!r}")

    async def sink(self, kind: str, size: int, n: int, batch: int) -> float:
        """Send ``n`` spacks of ``size`` bytes one way; seconds until the server has them all."""
        conn = self.conns[kind]
        if not isinstance(conn, _Framed):
            return await self._sink_stalk(conn, self.spack(size), n, batch)
        message = self.message(size)
        await conn.send(["sink", n])
        start = time.perf_counter()
        if batch <= 1:
            send = conn.send
            for _ in range(n):
                await send(message)
        else:
            send_many = conn.send_many
            full, rest = divmod(n, batch)
            for _ in range(full):
                await send_many(message, batch)
            if rest:
                await send_many(message, rest)
        await conn.receive()
        return time.perf_counter() - start

    @staticmethod
    async def _sink_stalk(
        conn: stalk.Connection | stalk.Channel, spack: stalk.Spack, n: int, batch: int
    ) -> float:
        await conn.send(stalk.Spack("sink", n))
        start = time.perf_counter()
        if batch <= 1:
            send = conn.send
            for _ in range(n):
                await send(spack)
        else:
            queue, flush = conn.queue, conn.flush
            full, rest = divmod(n, batch)
            for _ in range(full):
                for _ in range(batch):
                    queue(spack)
                await flush()
            if rest:
                for _ in range(rest):
                    queue(spack)
                await flush()
        await conn.receive()
        return time.perf_counter() - start

    async def rtt(self, kind: str, size: int, n: int) -> dict[str, Any]:
        """``n`` request/response round trips of ``size`` bytes, timed one by one."""
        return await self._rtt(self.conns[kind], size, n)

    async def _rtt(
        self, conn: _Stream, size: int, n: int, limit: float | None = None
    ) -> dict[str, Any]:
        """As :meth:`rtt`; with ``limit``, the round trips also stop after that many seconds.

        With a limit the server echoes until told ``done`` (``echo_until``), so that a run
        whose round trips turn out much slower than calibrated stays bounded.
        """
        samples: list[float] = []
        clock = time.perf_counter
        command: list[Any] = ["echo", n] if limit is None else ["echo_until"]
        if not isinstance(conn, _Framed):
            spack = self.spack(size)
            await conn.send(stalk.Spack(*command))
            start = clock()
            deadline = math.inf if limit is None else start + limit
            for _ in range(n):
                t0 = clock()
                await conn.send(spack)
                await conn.receive()
                samples.append(clock() - t0)
                if t0 > deadline:
                    break
            seconds = clock() - start
            if limit is not None:
                await conn.send(stalk.Spack("done"))
                await conn.receive()
        else:
            message = self.message(size)
            await conn.send(command)
            start = clock()
            deadline = math.inf if limit is None else start + limit
            for _ in range(n):
                t0 = clock()
                await conn.send(message)
                await conn.receive()
                samples.append(clock() - t0)
                if t0 > deadline:
                    break
            seconds = clock() - start
            if limit is not None:
                await conn.send(["done"])
                await conn.receive()
        return {"seconds": seconds, "median": _median(samples), "p99": _p99(samples)}

    async def quiet(self, kind: str, n: int, limit: float) -> dict[str, Any]:
        """``n`` 64 B round trips timed one by one, alone or while another stream streams.

        ``*_idle``: alone; ``*_busy``: while another stream sends spacks of STREAM_SIZE
        bytes to the server, one after another. stalk: the round trips on channel A of the
        "stalk_chbig" connection, the stream on its channel B. TLS: the round trips on the
        "tls" connection, the stream on "tls2". The round trips start once the stream's
        first spack is sent (it is flowing), and stop after ``n`` or ``limit`` seconds; the
        stream ends after them, once the server has had all of it. The stream's MB/s
        counts from its first spack to the server's acknowledgement of the last.
        """
        on_stalk = kind.startswith("stalk")
        probe = await self.channel("A") if on_stalk else self.conns["tls"]
        if kind.endswith("_idle"):
            return await self._rtt(probe, RTT_SIZE, n, limit)
        bulk = await self.channel("B") if on_stalk else self.conns["tls2"]
        flowing = anyio.Event()
        stopping = False
        streamed = 0
        stream_seconds = 0.0
        clock = time.perf_counter

        async def stream() -> None:
            nonlocal streamed, stream_seconds
            if isinstance(bulk, _Framed):
                message = self.message(STREAM_SIZE)
                send_framed = bulk.send
                await send_framed(["stream"])
                start = clock()
                while not stopping:
                    await send_framed(message)
                    streamed += 1
                    flowing.set()
                await send_framed(["done"])
            else:
                spack = self.spack(STREAM_SIZE)
                send = bulk.send
                await send(stalk.Spack("stream"))
                start = clock()
                while not stopping:
                    await send(spack)
                    streamed += 1
                    flowing.set()
                await send(stalk.Spack("done"))
            await bulk.receive()  # the server has had everything
            stream_seconds = clock() - start

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            await flowing.wait()
            answer = await self._rtt(probe, RTT_SIZE, n, limit)
            stopping = True
        answer["stream_mb_per_s"] = streamed * STREAM_SIZE / stream_seconds / 1e6
        return answer


async def _client_main(options: argparse.Namespace) -> None:
    client = _Client(options)
    async with anyio.create_task_group() as holders, contextlib.AsyncExitStack() as stack:
        client.crowd.holders = holders
        stack.push_async_callback(client.crowd.close)
        for kind in filter(None, options.connect.split(",")):
            await client.connect_data(kind)
            conn = client.conns[kind]
            if isinstance(conn, stalk.Connection) and not kind.endswith("_plain"):
                # As the README shows it: ``async with`` gives the connection its writer
                # task, which batches what the application sends (and with channels its
                # reader task).
                await stack.enter_async_context(conn)
            else:
                stack.push_async_callback(_close_quietly, conn)
        _emit({"ready": True, "pid": os.getpid()})
        while line := await _read_stdin_line():
            try:
                result = await client.run_job(json.loads(line))
            except Exception as exc:  # noqa: BLE001 - reported to the orchestrator, which stops
                result = {"error": f"{type(exc).__name__}: {exc}"}
            _emit(result)


def worker_main(argv: Sequence[str]) -> int:
    """Run one worker process until its orchestrator closes its stdin."""
    parser = argparse.ArgumentParser(prog="stalk.bench --worker")
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--backend", default="asyncio")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--cafile")
    parser.add_argument("--ports")
    parser.add_argument("--server-key")
    parser.add_argument("--connect", default="")
    options = parser.parse_args(argv)
    _raise_fd_limit()
    main_fn = _server_main if options.role == "server" else _client_main
    _run_loop(partial(main_fn, options), options.backend)
    return 0
