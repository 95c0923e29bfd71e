"""Resource limits hold: handshake floods, message-size limits, backpressure, idle memory.

Memory is measured with :mod:`tracemalloc` (Python allocations, which is where stalk could
buffer without bound; kernel socket buffers are bounded by the kernel) and, where a limit is
about one object, by watching that object. All traffic is on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import subprocess
import sys
import time
import tracemalloc
import warnings
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial

import anyio
import pytest
from anyio.abc import SocketStream
from anyio.streams.stapled import StapledObjectStream

from faultproxy import guarded_listener
from helpers import drain, echo, take_all, wait_until
from stalk.admission import _address_key
from stalk.config import Config
from stalk.connection import Connection, connect
from stalk.errors import (
    ConnectionLost,
    HandshakeFailed,
    IdleTimeout,
    MessageLimitExceeded,
    MessageTooLarge,
    PeerRefused,
    ProtocolError,
    StalkError,
)
from stalk.events import NEED_DATA, CloseReceived, HandshakeComplete
from stalk.handshake import InitiatorHandshake
from stalk.identity import Identity, PublicIdentity
from stalk.link import Link
from stalk.listener import Listener, _check_file_limit, listen
from stalk.session import Role, Session, SessionConfig
from stalk.spack import Spack, SpackDecoder
from stalk.wire import CloseCode, RecordKind

KiB = 1024
MiB = 1024 * KiB


@contextmanager
def traced(frames: int = 1) -> Iterator[Callable[[], tuple[int, int]]]:
    """Trace Python allocations; yields ``() -> (current, peak)`` relative to the start."""
    gc.collect()
    tracemalloc.start(frames)
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()

    def measure() -> tuple[int, int]:
        current, peak = tracemalloc.get_traced_memory()
        return current - base, peak - base

    try:
        yield measure
    finally:
        tracemalloc.stop()


@asynccontextmanager
async def serving(
    handler: Callable[[Connection], Awaitable[None]],
    config: Config | None = None,
) -> AsyncIterator[tuple[Listener, Identity]]:
    """Not helpers.serving: it yields the Listener (its counters), over a guarded socket
    listener whose escaped exceptions fail the test."""
    identity = Identity.generate()
    listener, guard = await guarded_listener(identity, config=config)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        yield listener, identity
        tg.cancel_scope.cancel()
    assert not guard.escaped, f"exceptions escaped the listener: {guard.escaped}"


async def raw_session(
    address: tuple[str, int], server: PublicIdentity, config: SessionConfig | None = None
) -> tuple[SocketStream, Session]:
    """A sans-IO initiator over a plain socket: a peer whose every byte the test controls."""
    stream = await anyio.connect_tcp(*address)
    session = Session(Role.INITIATOR, Identity.generate(), peer=server, config=config)
    try:
        while True:
            event = session.next_event()
            if out := take_all(session):
                await stream.send(bytes(out))
            if isinstance(event, HandshakeComplete):
                return stream, session
            if event is NEED_DATA:
                session.receive_data(await stream.receive())
    except BaseException:  # refused, cut, cancelled: the socket is not the caller's to close
        await anyio.aclose_forcefully(stream)
        raise


# -- handshake floods ------------------------------------------------------------------------------

FLOOD = 300
TRICKLERS = 20
FLOOD_TIMEOUT = 1.5


@pytest.mark.parametrize("max_handshakes", [256, 32])
async def test_handshake_flood_is_bounded_and_reclaimed(
    anyio_backend: str, max_handshakes: int
) -> None:
    """300 sockets send half a preamble and stall, 20 more trickle valid bytes slowly.

    Beyond ``max_handshakes`` clients get BUSY at once; the deadline reclaims every stalled
    slot (trickling or not); a legitimate client is refused quickly during the flood and
    connects as soon as the slots are reclaimed.
    """
    # All from 127.0.0.1: the per-address cap is lifted to test the global one.
    config = Config(
        max_handshakes=max_handshakes,
        max_handshakes_per_address=max_handshakes,
        handshake_timeout=FLOOD_TIMEOUT,
    )

    async with serving(echo, config) as (listener, server_id):
        started = anyio.current_time()
        stalled: list[SocketStream] = []
        peak = 0
        for _ in range(FLOOD):
            sock = await anyio.connect_tcp(*listener.address)
            await sock.send(b"STAL")  # half a preamble, then nothing
            stalled.append(sock)
            peak = max(peak, listener.handshakes_in_progress)
        tricklers = [await anyio.connect_tcp(*listener.address) for _ in range(TRICKLERS)]
        await wait_until(lambda: listener.handshakes_in_progress >= max_handshakes)
        in_progress = listener.handshakes_in_progress
        assert in_progress == max_handshakes, in_progress

        # During the flood: BUSY at once, not a hang.
        refused_at = anyio.current_time()
        with anyio.fail_after(1), pytest.raises(PeerRefused) as info:
            await connect(*listener.address, server_id.public)
        assert info.value.code == CloseCode.BUSY
        busy_latency = anyio.current_time() - refused_at

        outcome: Counter[str] = Counter()

        async def watch(sock: SocketStream, trickle: bool) -> None:
            """Read until the server answers or closes; trickle a valid preamble meanwhile."""
            async with anyio.create_task_group() as tg:
                if trickle:
                    tg.start_soon(_trickle, sock)
                try:
                    data = await sock.receive()
                    outcome["busy" if data[:1] == bytes([CloseCode.BUSY]) else "other"] += 1
                except anyio.EndOfStream:
                    outcome["closed"] += 1
                except (anyio.BrokenResourceError, OSError):
                    outcome["reset"] += 1
                tg.cancel_scope.cancel()

        with anyio.fail_after(FLOOD_TIMEOUT + 3):
            async with anyio.create_task_group() as tg:
                for sock in stalled:
                    tg.start_soon(watch, sock, False)
                for sock in tricklers:
                    tg.start_soon(watch, sock, True)
        reclaimed = anyio.current_time() - started

        # Right after: the slots are free again, a legitimate client connects.
        with anyio.fail_after(5):
            async with await connect(*listener.address, server_id.public) as conn:
                await conn.send(Spack("after the flood"))
                assert await conn.receive() == Spack("after the flood")
        assert listener.handshakes_in_progress == 0
        for sock in stalled + tricklers:
            await sock.aclose()
    print(
        f"\nflood/{anyio_backend}/max_handshakes={max_handshakes}: peak {peak} in progress, "
        f"{dict(outcome)}; BUSY answered in {busy_latency * 1000:.0f} ms; "
        f"all reclaimed {reclaimed:.2f} s after the flood began"
    )
    assert peak <= max_handshakes
    assert busy_latency < 0.5
    # Every socket ended: BUSY beyond the limit, closed or reset at the deadline.
    assert outcome["other"] == 0
    assert outcome["busy"] == FLOOD + TRICKLERS - max_handshakes
    assert outcome["busy"] + outcome["closed"] + outcome["reset"] == FLOOD + TRICKLERS


async def _trickle(sock: SocketStream, pause: float = 0.3) -> None:
    """Valid preamble bytes, one per ``pause``: a slowloris the absolute deadline must stop."""
    try:
        for byte in b"STALK\x01IK":
            await sock.send(bytes([byte]))
            await anyio.sleep(pause)  # the point: a slowloris
        await anyio.sleep_forever()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return


# -- message-size limits ---------------------------------------------------------------------------


def _responder_handshake(advertised: int) -> tuple[Session, HandshakeFailed | None, int]:
    """Feed a responder an IK message 1 advertising ``advertised``; return its peak memory."""
    server_id = Identity.generate()
    hs = InitiatorHandshake(Identity.generate(), server_id.public, advertised)
    hello = b"".join(hs.out)
    error = None
    with traced() as measure:
        server = Session(Role.RESPONDER, server_id, config=SessionConfig(max_message_size=64 * KiB))
        server.receive_data(hello)
        try:
            assert server.next_event() is not NEED_DATA
            server.accept()
        except HandshakeFailed as exc:
            error = exc
        _, peak = measure()
    return server, error, peak


@pytest.mark.parametrize("advertised", [2**53, 2**53 + 1, 2**64 - 1])
def test_a_huge_advertised_limit_costs_the_receiver_nothing(advertised: int) -> None:
    """A peer advertising any ``max_message_size`` makes the responder allocate nothing for it.

    2**53 is the protocol's maximum (accepted: it only allows *us* to send big spacks);
    beyond it the handshake fails with a typed error and a PROTOCOL_ERROR refusal. The
    memory is compared with a handshake advertising the default 16 MiB.
    """
    _, _, ordinary = _responder_handshake(16 * MiB)
    server, error, peak = _responder_handshake(advertised)
    assert peak <= ordinary + 16 * KiB, (peak, ordinary)
    if advertised <= 2**53:
        assert error is None
        assert server.peer_max_message_size == advertised
    else:
        assert error is not None
        assert take_all(server)[:1] == bytes([CloseCode.PROTOCOL_ERROR])


async def test_a_peer_advertising_a_huge_limit_still_gets_ours(anyio_backend: str) -> None:
    got: list[int] = []

    async def big_talker(conn: Connection) -> None:
        assert conn.peer_max_message_size == 2**53
        await conn.send(Spack(bytes(4 * MiB)))  # allowed: the client accepts anything
        async for spack in conn:
            got.append(len(spack[0]))

    async with serving(big_talker, Config(max_message_size=64 * KiB)) as (listener, server_id):
        client_config = Config(max_message_size=2**53)
        async with await connect(*listener.address, server_id.public, config=client_config) as conn:
            assert conn.peer_max_message_size == 64 * KiB
            assert len((await conn.receive())[0]) == 4 * MiB
            with pytest.raises(MessageTooLarge):
                await conn.send(Spack(bytes(64 * KiB)))  # over the server's limit
            await conn.send(Spack(bytes(60 * KiB)))  # the connection is still fine
            await conn.flush()
        await wait_until(lambda: got)
    assert got == [60 * KiB]


LIMIT = 2 * MiB
FRAGMENT = 60_000
FLOOD_FRAGMENTS = 512  # 30 MiB of one never-ending spack


@dataclass
class _Watch:
    errors: list[BaseException] = field(default_factory=list)
    high_water: int = 0


async def test_an_oversized_spack_is_cut_off_at_the_limit(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer streams FRAGMENTs of one valid-looking spack far beyond our limit.

    The receiver fails with MessageLimitExceeded once the running total passes the limit,
    having taken at most the limit (watched in the decoder and with tracemalloc), and the
    flood stops.
    """
    watch = _Watch()
    original = SpackDecoder.feed

    def watched(self: SpackDecoder, data: bytes | memoryview, limit: int | None = None) -> int:
        taken = original(self, data, limit)
        watch.high_water = max(watch.high_water, self.size)
        return taken

    monkeypatch.setattr(SpackDecoder, "feed", watched)

    async def sink(conn: Connection) -> None:
        try:
            async for _ in conn:
                pass
        except Exception as exc:
            watch.errors.append(exc)

    # An array of a million 58-byte bins: every piece is valid so far, and nothing it
    # claims goes past the limit; only the running total does.
    item = b"\xc4\x3a" + bytes(58)
    flood = b"\xdd\x00\x10\x00\x00" + item * (FLOOD_FRAGMENTS * FRAGMENT // len(item))
    sent = 0
    close_code: int | None = None
    async with serving(sink, Config(max_message_size=LIMIT)) as (listener, server_id):
        with traced() as measure:
            stream, session = await raw_session(listener.address, server_id.public)
            with anyio.fail_after(20):
                try:
                    for start in range(0, FLOOD_FRAGMENTS * FRAGMENT, FRAGMENT):
                        chunk = flood[start : start + FRAGMENT]
                        session._sender.writer.add(RecordKind.FRAGMENT, chunk)  # bypasses the limit
                        session.flush()
                        await stream.send(take_all(session))
                        sent += FRAGMENT
                except (anyio.BrokenResourceError, OSError):
                    pass
                with (
                    anyio.move_on_after(2),  # the error CLOSE is best effort
                    contextlib.suppress(anyio.BrokenResourceError, anyio.EndOfStream, OSError),
                ):
                    while close_code is None:
                        session.receive_data(await stream.receive())
                        for event in drain(session):
                            if isinstance(event, CloseReceived):
                                close_code = event.code
            _, peak = measure()
            await stream.aclose()
            await wait_until(lambda: watch.errors)
    print(
        f"\noversize/{anyio_backend}: peer wrote {sent / MiB:.1f} MiB before being cut off; "
        f"receiver buffered at most {watch.high_water / MiB:.2f} MiB (limit {LIMIT / MiB:.0f} "
        f"MiB), Python peak {peak / MiB:.2f} MiB; CLOSE code seen by the peer: {close_code}"
    )
    assert isinstance(watch.errors[0], MessageLimitExceeded)
    assert watch.high_water <= LIMIT
    assert peak < LIMIT + 2 * MiB
    assert sent < FLOOD_FRAGMENTS * FRAGMENT  # the flood was stopped
    assert close_code in (None, CloseCode.MESSAGE_TOO_LARGE)


async def test_a_peer_still_sending_after_our_error_close_reads_it(anyio_backend: str) -> None:
    """A peer breaks the protocol, then goes on sending megabytes; it reads too, from a
    moment after the CLOSE arrives.

    Closing with its bytes unread would make TCP reset the connection, and a reset can
    destroy the CLOSE before the peer reads it (asyncio drops unread data on a failed
    write: without lingering this fails there). The receiver lingers instead: it stops
    writing and discards what still comes (at most 1 MiB), so the peer reads why:
    PROTOCOL_ERROR. Then, the peer not closing, it closes after a second.
    """
    errors: list[float] = []

    async def sink(conn: Connection) -> None:
        try:
            async for _ in conn:
                pass
        except ProtocolError:
            errors.append(time.monotonic())

    codes: list[int] = []
    read_at: list[float] = []
    async with serving(sink) as (listener, server_id):
        stream, session = await raw_session(listener.address, server_id.public)

        async def read_close() -> None:
            await anyio.sleep(0.3)  # busy elsewhere when the CLOSE arrives
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                while not codes:
                    session.receive_data(await stream.receive())
                    for event in drain(session):
                        if isinstance(event, CloseReceived):
                            codes.append(event.code)
                            read_at.append(time.monotonic())

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_close)
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    session._sender.writer.add(RecordKind.MESSAGE, b"\xc1")  # never valid msgpack
                    for _ in range(64):  # then 3.8 MiB more, as if a large send went on
                        session.flush()
                        await stream.send(take_all(session))
                        session._sender.writer.add(RecordKind.FRAGMENT, bytes(60_000))
            await wait_until(lambda: errors, timeout=10)
        await stream.aclose()
    assert codes == [CloseCode.PROTOCOL_ERROR]
    lingered = errors[0] - read_at[0]
    print(f"\nlinger/{anyio_backend}: the peer read CLOSE, the receiver closed {lingered:.2f} s on")
    assert 0.3 < lingered < 3


# -- backpressure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", [False, True], ids=["direct", "writer-task"])
async def test_a_reader_that_stops_stops_the_sender(anyio_backend: str, writer: bool) -> None:
    """The peer never reads: sends block, write_timeout breaks the connection, memory is flat."""
    stop = anyio.Event()

    async def never_reads(conn: Connection) -> None:
        await stop.wait()

    config = Config(write_timeout=0.5)
    spack = Spack(bytes(64 * KiB))
    async with serving(never_reads) as (listener, server_id):
        sent = 0
        started = time.perf_counter()
        with traced() as measure:
            conn = await connect(*listener.address, server_id.public, config=config)
            if writer:
                await conn.__aenter__()
            failure: ConnectionLost | None = None
            with anyio.fail_after(30):
                try:
                    while True:
                        await conn.send(spack)
                        sent += 1
                except ConnectionLost as exc:
                    failure = exc
            _, peak = measure()
        elapsed = time.perf_counter() - started
        with pytest.raises(ConnectionLost):
            await conn.send(Spack(1))
        if writer:
            await conn.__aexit__(None, None, None)
        await conn.aclose()
        stop.set()
    print(
        f"\nbackpressure/{anyio_backend}/{'writer' if writer else 'direct'}: "
        f"{sent} x 64 KiB accepted before the sender stopped, failed after {elapsed:.1f} s, "
        f"Python peak {peak / MiB:.2f} MiB"
    )
    assert failure is not None
    assert "did not complete" in str(failure) or "broken" in str(failure), failure
    assert sent * 64 * KiB < 64 * MiB  # bounded by socket buffers (+ send_buffer), not memory
    assert peak < 8 * MiB


# -- idle connections -----------------------------------------------------------------------------

IDLE = 200


@pytest.mark.parametrize("burst", [False, True], ids=["idle", "after-a-burst"])
async def test_memory_per_idle_connection_is_bounded(anyio_backend: str, burst: bool) -> None:
    """Hold established connections open and idle; measure what each costs.

    The figure is per connection *pair* (both ends live in this process), so it bounds what
    the listener keeps per connection. ``after-a-burst``: each connection first carried a
    300 KiB spack each way (more than one read), so buffers sized for that traffic must not
    stay allocated once the connection is idle.
    """
    count = IDLE // 2 if burst else IDLE
    release = anyio.Event()
    ready = 0

    async def server_side(conn: Connection) -> None:
        nonlocal ready
        if burst:
            await conn.send(Spack(bytes(300 * KiB)))
            await conn.receive()
        ready += 1
        await release.wait()

    async with serving(server_side) as (listener, server_id):
        conns: list[Connection] = []
        with traced() as measure:
            for _ in range(count):
                conn = await connect(*listener.address, server_id.public)
                if burst:
                    await conn.receive()
                    await conn.send(Spack(bytes(300 * KiB)))
                conns.append(conn)
            await wait_until(lambda: ready >= count, timeout=10)
            await anyio.sleep(0.05)  # the clients' reads settle too (no event to wait on)
            gc.collect()
            current, peak = measure()
        release.set()
        for conn in conns:
            await conn.aclose()
    per_pair = current / count
    print(
        f"\nidle/{anyio_backend}/{'burst' if burst else 'idle'}: {count} idle connections "
        f"hold {per_pair / KiB:.1f} KiB per connection pair (client + server); "
        f"Python peak while connecting {peak / MiB:.1f} MiB"
    )
    assert per_pair < 64 * KiB


# -- running out of file descriptors ------------------------------------------------------------

#: A listener limited to 64 open files; argv: backend, Config fields as JSON.
_LOW_FD_SERVER = """
import json, logging, resource, sys
import anyio, stalk
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
identity = stalk.Identity.generate()
config = stalk.Config(**json.loads(sys.argv[2]))

async def echo(conn):
    async for spack in conn:
        await conn.send(spack)

async def main():
    async with await stalk.create_listener(
        "127.0.0.1", 0, identity=identity, config=config
    ) as listener:
        print(listener.address[1], str(identity.public), flush=True)
        await listener.serve(echo)

anyio.run(main, backend=sys.argv[1])
"""


async def _low_fd_server(
    anyio_backend: str, **config: object
) -> tuple[anyio.abc.Process, int, PublicIdentity]:
    """Start ``_LOW_FD_SERVER``; its process, port and key."""
    process = await anyio.open_process(
        [sys.executable, "-c", _LOW_FD_SERVER, anyio_backend, json.dumps(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    with anyio.fail_after(20):
        line = b""
        while not line.endswith(b"\n"):
            line += await process.stdout.receive()
    port_text, key = line.decode().split()
    return process, int(port_text), PublicIdentity.from_string(key)


async def test_the_listener_survives_running_out_of_file_descriptors(anyio_backend: str) -> None:
    """A listener limited to 64 fds is sent 100 connections, which are then closed.

    Beyond the limit the kernel still completes TCP handshakes (the backlog) but accept()
    fails with EMFILE. Once the clients leave, the listener must serve again. (The caps that
    would refuse these clients before the limit is reached are lifted: that is the next
    test.)
    """
    process, port, key = await _low_fd_server(anyio_backend, max_handshakes_per_address=256)
    try:
        flood: list[SocketStream] = []
        with contextlib.suppress(OSError):  # refused: the listener is already gone
            for _ in range(100):
                flood.append(await anyio.connect_tcp("127.0.0.1", port))
        await anyio.sleep(0.5)  # the listener (another process) meets EMFILE meanwhile
        for sock in flood:
            await sock.aclose()
        with anyio.move_on_after(0.5):
            await process.wait()
        if process.returncode is not None:
            assert process.stderr is not None
            error = (await process.stderr.receive()).decode(errors="replace")
            pytest.fail(f"the listener died after {len(flood)} connections: ...{error[-300:]}")
        with anyio.fail_after(5):
            async with await connect("127.0.0.1", port, key) as conn:
                await conn.send(Spack("still serving"))
                assert await conn.receive() == Spack("still serving")
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.aclose()


async def test_caps_refuse_cleanly_at_the_file_limit_and_idle_peers_are_dropped(
    anyio_backend: str,
) -> None:
    """Issue 9's nofile finding: 55 idle authenticated peers under a 64-file limit.

    Without caps they used every descriptor, and later clients waited on a failing
    accept(). With ``max_connections`` below the limit the surplus and the legitimate
    clients get BUSY at once; the idle peers never read (so never answer the keepalive
    PING) and are dropped by ``idle_timeout``, after which a client is served again.
    """
    cap, idle, attempts = 48, 2.0, 55
    process, port, key = await _low_fd_server(anyio_backend, max_connections=cap, idle_timeout=idle)
    idlers: list[SocketStream] = []
    try:
        refused: Counter[int] = Counter()
        opened = anyio.current_time()
        with anyio.fail_after(idle):  # all of it well within one idle period
            for _ in range(attempts):
                try:
                    stream, _session = await raw_session(("127.0.0.1", port), key)
                except PeerRefused as exc:
                    refused[exc.code] += 1
                else:
                    idlers.append(stream)
            busy_latencies = []
            for _ in range(3):
                started = anyio.current_time()
                with pytest.raises(PeerRefused) as info:
                    await connect("127.0.0.1", port, key)
                busy_latencies.append(anyio.current_time() - started)
                assert info.value.code == CloseCode.BUSY
                assert info.value.reason == "too many connections"
        assert len(idlers) == cap
        assert refused == {CloseCode.BUSY: attempts - cap}
        refused.clear()
        # Served again once the idle peers are dropped: 2 x idle after each one connected.
        served_at = None
        with anyio.fail_after(2 * idle + 5):
            while served_at is None:
                try:
                    async with await connect("127.0.0.1", port, key) as conn:
                        await conn.send(Spack("served again"))
                        assert await conn.receive() == Spack("served again")
                    served_at = anyio.current_time() - opened
                except PeerRefused as exc:
                    refused[exc.code] += 1
                    await anyio.sleep(0.1)  # the point: a client retrying now and then
        assert set(refused) == {CloseCode.BUSY}
    finally:
        for stream in idlers:
            await stream.aclose()
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        assert process.stderr is not None
        log = b""
        with anyio.move_on_after(5), contextlib.suppress(anyio.EndOfStream):
            while True:
                log += await process.stderr.receive()
        with anyio.CancelScope(shield=True):
            await process.aclose()
    text = log.decode(errors="replace")
    print(
        f"\nnofile/{anyio_backend}: {len(idlers)} idle peers held, {attempts - cap} refused; "
        f"legitimate clients refused with BUSY in at most {max(busy_latencies) * 1000:.0f} ms; "
        f"served again {served_at:.2f} s after the idle peers connected (idle_timeout {idle} s)"
    )
    assert max(busy_latencies) < 1.0
    assert 2 * idle - 0.1 < served_at < 2 * idle + 3
    assert "RLIMIT_NOFILE is 64" in text, text[-500:]  # the warning at creation
    assert "accept failed" not in text, text[-500:]  # never out of descriptors


# -- listener caps and the idle timeout ------------------------------------------------------------


def test_the_address_key_groups_what_one_attacker_holds() -> None:
    assert _address_key(("192.0.2.7", 4000)) == "192.0.2.7"
    assert _address_key(("::ffff:192.0.2.7", 4000, 0, 0)) == "192.0.2.7"
    one_64 = {
        _address_key(("2001:db8:1:2::1", 1, 0, 0)),
        _address_key(("2001:db8:1:2:ffff:ffff:ffff:ffff", 1, 0, 0)),
    }
    assert one_64 == {"2001:db8:1:2::/64"}
    assert _address_key(("2001:db8:1:3::1", 1, 0, 0)) == "2001:db8:1:3::/64"
    assert _address_key(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"
    assert _address_key("/run/stalk.sock") is None
    assert _address_key(None) is None
    assert _address_key(("not an address", 1)) is None


@pytest.mark.parametrize(
    "fields",
    [
        {"max_connections": 0},
        {"max_handshakes_per_address": 0},
        {"idle_timeout": 0},
        {"idle_timeout": -1.0},
        {"idle_timeout": math.nan},
    ],
)
def test_config_rejects_unusable_listener_limits(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        Config(**fields)  # type: ignore[arg-type]


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is Unix only")
def test_the_listener_warns_when_the_file_limit_is_too_low(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    resource = pytest.importorskip("resource")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, hard))
    with caplog.at_level(logging.WARNING, logger="stalk"):
        _check_file_limit(Config())  # the default fits the usual 1024
        assert caplog.records == []
        _check_file_limit(Config(max_connections=961))
    (record,) = caplog.records
    message = record.getMessage()
    assert "max_connections=961" in message
    assert "need 1025 open files" in message
    assert "RLIMIT_NOFILE is 1024" in message
    assert "lower max_connections to 960" in message


ATTACKERS = 300


async def test_one_address_cannot_take_the_handshake_slots(anyio_backend: str) -> None:
    """300 sockets from 127.0.0.2 trickle a valid preamble, a byte every 0.5 s.

    Before the per-address cap they held every handshake slot and legitimate clients got
    BUSY. Now 127.0.0.2 holds at most ``max_handshakes_per_address`` slots, its other
    sockets get BUSY at once, and clients from 127.0.0.1 connect quickly all along.
    """
    config = Config(handshake_timeout=3.0)
    cap = config.max_handshakes_per_address
    outcome: Counter[str] = Counter()
    busy_after: list[float] = []
    latencies: list[float] = []
    peak = 0

    async def attacker(sock: SocketStream, connected: float) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_trickle, sock, 0.5)
            try:
                data = await sock.receive()
            except anyio.EndOfStream:
                outcome["closed"] += 1
            except (anyio.BrokenResourceError, OSError):
                outcome["reset"] += 1
            else:
                if data[:1] == bytes([CloseCode.BUSY]):
                    outcome["busy"] += 1
                    busy_after.append(anyio.current_time() - connected)
                else:
                    outcome["other"] += 1
            tg.cancel_scope.cancel()
        await sock.aclose()

    async def legitimate(address: tuple[str, int], server: PublicIdentity) -> None:
        for i in range(10):
            started = anyio.current_time()
            with anyio.fail_after(5):
                async with await connect(*address, server) as conn:
                    latencies.append(anyio.current_time() - started)
                    await conn.send(Spack("legitimate", i))
                    assert await conn.receive() == Spack("legitimate", i)
            await anyio.sleep(0.2)  # the point: a legitimate client now and then

    async with serving(echo, config) as (listener, server_id):
        with anyio.fail_after(config.handshake_timeout + 10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(legitimate, listener.address, server_id.public)
                for _ in range(ATTACKERS):
                    sock = await anyio.connect_tcp(*listener.address, local_host="127.0.0.2")
                    tg.start_soon(attacker, sock, anyio.current_time())
                    peak = max(peak, listener.handshakes_by_address.get("127.0.0.2", 0))
                await anyio.sleep(0.2)  # the attack goes on: its peak is what is measured
                peak = max(peak, listener.handshakes_by_address.get("127.0.0.2", 0))
        assert listener.handshakes_in_progress == 0
        assert listener.handshakes_by_address == {}  # nothing kept per address afterwards
    median = sorted(latencies)[len(latencies) // 2]
    print(
        f"\nper-address/{anyio_backend}: 127.0.0.2 held at most {peak} handshakes, "
        f"{dict(outcome)}, BUSY within {max(busy_after) * 1000:.0f} ms; {len(latencies)} "
        f"legitimate clients connected during the flood in at most "
        f"{max(latencies) * 1000:.0f} ms (median {median * 1000:.0f})"
    )
    assert peak == cap
    assert outcome["busy"] == ATTACKERS - cap
    assert outcome["busy"] + outcome["closed"] + outcome["reset"] == ATTACKERS
    assert max(busy_after) < 1.0
    assert len(latencies) == 10
    assert max(latencies) < 1.0


async def test_established_connections_are_capped(anyio_backend: str) -> None:
    """Beyond ``max_connections`` a client gets BUSY at once; a freed slot is usable again."""
    cap = 20
    async with serving(echo, Config(max_connections=cap)) as (listener, server_id):
        conns = [await connect(*listener.address, server_id.public) for _ in range(cap)]
        try:
            await wait_until(lambda: listener.connections == cap)
            started = anyio.current_time()
            with anyio.fail_after(1), pytest.raises(PeerRefused) as info:
                await connect(*listener.address, server_id.public)
            busy_latency = anyio.current_time() - started
            assert info.value.code == CloseCode.BUSY
            assert info.value.reason == "too many connections"
            assert listener.connections == cap
            await conns.pop().aclose()
            await wait_until(lambda: listener.connections == cap - 1)
            async with await connect(*listener.address, server_id.public) as conn:
                await conn.send(Spack("in again"))
                assert await conn.receive() == Spack("in again")
                assert listener.connections == cap
        finally:
            for conn in conns:
                await conn.aclose()
    print(f"\nmax_connections/{anyio_backend}: client {cap + 1} refused in {busy_latency:.3f} s")
    assert busy_latency < 0.5


IDLE_TIMEOUT = 0.5


def test_a_link_and_its_idle_timer_are_freed_without_the_garbage_collector() -> None:
    """No reference cycle between a link and its idle timer: a server's connections are
    freed as each one ends, not at the collector's next pass over everything held."""
    send, receive = anyio.create_memory_object_stream[bytes](1)
    session = Session(Role.INITIATOR, Identity.generate())
    link = Link(StapledObjectStream(send, receive), session, Config(idle_timeout=5))  # type: ignore[arg-type]
    assert link._idle is not None
    freed = weakref.ref(link)
    gc.disable()
    try:
        del link
        assert freed() is None
    finally:
        gc.enable()
        send.close()
        receive.close()


async def test_idle_timeout_drops_a_silent_peer_and_keeps_a_live_one(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raw peer that completes the handshake and goes silent is closed with TIMEOUT.

    It receives the keepalive PING after ``idle_timeout`` and the CLOSE at twice that. A
    stalk client that keeps receiving answers every PING and stays connected.
    """
    pings: list[float] = []
    original_ping = Session.ping

    def counting_ping(self: Session, payload: bytes = b"") -> None:
        pings.append(anyio.current_time())
        original_ping(self, payload)

    monkeypatch.setattr(Session, "ping", counting_ping)
    errors: list[Exception] = []

    async def echo_and_record(conn: Connection) -> None:
        try:
            await echo(conn)
        except StalkError as exc:
            errors.append(exc)
            raise

    config = Config(idle_timeout=IDLE_TIMEOUT)
    async with serving(echo_and_record, config) as (listener, server_id):
        live = await connect(*listener.address, server_id.public)
        received: list[Spack] = []

        async def keep_receiving() -> None:
            async for spack in live:
                received.append(spack)

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_receiving)
            stream, session = await raw_session(listener.address, server_id.public)
            silent_since = anyio.current_time()
            first_bytes = None
            events = []
            with anyio.fail_after(4 * IDLE_TIMEOUT + 2):
                try:
                    while True:  # reading, never answering
                        data = await stream.receive()
                        first_bytes = first_bytes or anyio.current_time() - silent_since
                        session.receive_data(data)
                        events += drain(session)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    closed_after = anyio.current_time() - silent_since
            await stream.aclose()
            # The live client goes on through several idle periods.
            await anyio.sleep(4 * IDLE_TIMEOUT)
            await live.send(Spack("still here"))
            await wait_until(lambda: received, timeout=2)
            assert listener.connections == 1
            tg.cancel_scope.cancel()
        await live.aclose()
    print(
        f"\nidle/{anyio_backend}: silent peer pinged after {first_bytes:.2f} s, closed after "
        f"{closed_after:.2f} s (idle_timeout {IDLE_TIMEOUT} s); live peer answered "
        f"{len(pings) - 1} PINGs and stayed"
    )
    assert first_bytes is not None
    assert IDLE_TIMEOUT - 0.05 < first_bytes < IDLE_TIMEOUT + 0.4
    assert 2 * IDLE_TIMEOUT - 0.05 < closed_after < 2 * IDLE_TIMEOUT + 0.5
    assert [e.code for e in events if isinstance(e, CloseReceived)] == [CloseCode.TIMEOUT]
    assert any(isinstance(exc, IdleTimeout) for exc in errors), errors
    assert received == [Spack("still here")]
    assert len(pings) >= 1 + 5  # the silent peer's, then one per idle period of the live one


async def test_the_idle_timer_counts_only_time_spent_receiving(anyio_backend: str) -> None:
    """Receiving in short, cancelled polls adds up; the time between polls does not count.

    The server never reads, so it never answers the PING: with idle_timeout 0.3 s the
    client gives up after 0.6 s of waiting in all, during its third 0.25 s poll, although
    well over 0.6 s passed since the last byte.
    """
    idle = 0.3
    stop = anyio.Event()

    async def never_reads(conn: Connection) -> None:
        await stop.wait()

    async with serving(never_reads) as (listener, server_id):
        conn = await connect(*listener.address, server_id.public, config=Config(idle_timeout=idle))
        polls = 0

        async def poll() -> None:
            nonlocal polls
            while True:
                polls += 1
                with anyio.move_on_after(0.25):
                    await conn.receive()
                await anyio.sleep(0.4)  # the point: a client that polls now and then

        started = anyio.current_time()
        with anyio.fail_after(10), pytest.raises(IdleTimeout):
            await poll()
        elapsed = anyio.current_time() - started
        with pytest.raises(ConnectionLost):
            await conn.send(Spack(1))
        await conn.aclose()
        stop.set()
    assert polls == 3
    assert elapsed > 1.0


@pytest.mark.parametrize("writer", [False, True], ids=["direct", "writer-task"])
async def test_the_idle_timeout_never_waits_for_a_blocked_writer(
    anyio_backend: str, writer: bool
) -> None:
    """A send is stuck (the peer reads nothing) while receive() times out.

    The PING cannot be written (a sender holds the lock), and the timeout must not wait
    for it: receive() raises IdleTimeout at twice idle_timeout, closing the transport,
    which ends the stuck send long before write_timeout.
    """
    idle = 0.5
    stop = anyio.Event()

    async def never_reads(conn: Connection) -> None:
        await stop.wait()

    config = Config(idle_timeout=idle, write_timeout=30)
    async with serving(never_reads) as (listener, server_id):
        conn = await connect(*listener.address, server_id.public, config=config)
        if writer:
            await conn.__aenter__()
        send_error: list[BaseException] = []
        send_ended = math.inf

        async def stuck_send() -> None:
            nonlocal send_ended
            try:
                await conn.send(Spack(bytes(15 * MiB)))  # far beyond the socket buffers
                await conn.flush()
            except ConnectionLost as exc:
                send_error.append(exc)
            send_ended = anyio.current_time() - started

        started = anyio.current_time()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stuck_send)
                with pytest.raises(IdleTimeout):
                    await conn.receive()
                timed_out = anyio.current_time() - started
        if writer:
            await conn.__aexit__(None, None, None)
        await conn.aclose()
        stop.set()
    print(
        f"\nidle-vs-blocked-writer/{anyio_backend}/{'writer' if writer else 'direct'}: "
        f"IdleTimeout after {timed_out:.2f} s, the stuck send ended after {send_ended:.2f} s"
    )
    assert 2 * idle - 0.05 < timed_out < 2 * idle + 0.5
    # The send stayed stuck until the timeout closed the transport, and not much longer.
    assert timed_out - 0.05 < send_ended < timed_out + 1.0
    assert len(send_error) == 1
    assert len(send_error) == 1


# -- shutting a listener down --------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # the leak this test is about
async def test_stopping_the_listener_tells_its_clients(anyio_backend: str) -> None:
    server_id = Identity.generate()

    serving_client = anyio.Event()

    async def wait_forever(conn: Connection) -> None:
        serving_client.set()
        await anyio.sleep_forever()

    conn: Connection | None = None
    try:
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(
                partial(listen, "127.0.0.1", 0, wait_forever, identity=server_id)
            )
            conn = client = await connect(host, port, server_id.public)
            with anyio.fail_after(5):
                await serving_client.wait()
            tg.cancel_scope.cancel()  # the server shuts down
        outcome = "still waiting"
        with anyio.move_on_after(2):
            try:
                await client.receive()
                outcome = "a message"
            except anyio.EndOfStream:
                outcome = "EndOfStream"
            except StalkError as exc:
                outcome = type(exc).__name__
        assert outcome != "still waiting", "2 s after the listener stopped, the client waits on"
    finally:
        if conn is not None:
            await conn.aclose()
        # Collect the server's leaked sockets here, quietly, not in some later test.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
