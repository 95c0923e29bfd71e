"""The anyio layer on real loopback TCP, on asyncio and trio."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket

import anyio
import pytest
from anyio.abc import SocketAttribute, TaskGroup
from anyio.streams.stapled import StapledByteStream

from helpers import byte_stream_pair, serving, wait_until
from stalk.config import Config
from stalk.connection import Connection, StalkAttribute, connect
from stalk.errors import (
    ClosedByPeer,
    ConnectFailed,
    ConnectionClosed,
    ConnectionLost,
    HandshakeFailed,
    HandshakeTimeout,
    InvalidSpackValue,
    MessageTooLarge,
    PeerIdentityMismatch,
    PeerRefused,
)
from stalk.identity import Identity, PublicIdentity
from stalk.listener import ConnectionHandler, create_listener
from stalk.spack import Spack
from stalk.wire import CloseCode

pytestmark = pytest.mark.anyio


async def echo(conn: Connection) -> None:
    """Not :func:`helpers.echo`: each answer is tagged, so it cannot be the request."""
    async for spack in conn:
        await conn.send(Spack("echo", *spack))


@pytest.mark.parametrize("pin", [False, True], ids=["XX", "IK"])
async def test_echo_round_trip(pin: bool) -> None:
    async with serving(echo) as (host, port, server_id):
        client_id = Identity.generate()
        peer = server_id.public if pin else None
        async with await connect(host, port, peer, identity=client_id) as conn:
            assert conn.peer == server_id.public
            assert conn.identity == client_id
            assert conn.pattern == ("IK" if pin else "XX")
            assert len(conn.handshake_hash) == 32
            assert conn.extra(StalkAttribute.peer) == server_id.public
            assert (conn.host, conn.port) == (host, port)
            await conn.send(Spack(1, 2.5, "text", b"bytes"))
            assert await conn.receive() == Spack("echo", 1, 2.5, "text", b"bytes")


async def test_both_sides_see_the_same_handshake_hash_and_keys() -> None:
    seen: list[tuple[PublicIdentity, bytes]] = []

    async def record(conn: Connection) -> None:
        seen.append((conn.peer, conn.handshake_hash))
        await conn.send(Spack("hi"))
        async for _ in conn:
            pass

    async with serving(record) as (host, port, server_id):
        client_id = Identity.generate()
        async with await connect(host, port, server_id.public, identity=client_id) as conn:
            await conn.receive()
            assert seen == [(client_id.public, conn.handshake_hash)]


async def test_peer_key_as_printable_string() -> None:
    async with serving(echo) as (host, port, server_id):
        async with await connect(host, port, str(server_id.public)) as conn:
            assert conn.pattern == "IK"


async def test_wrong_pinned_key_is_refused_and_server_keeps_serving() -> None:
    async with serving(echo) as (host, port, server_id):
        with pytest.raises(PeerIdentityMismatch) as info:
            await connect(host, port, Identity.generate().public)
        assert info.value.peer_address == (host, port)
        async with await connect(host, port, server_id.public) as conn:
            await conn.send(Spack("still here"))
            assert await conn.receive() == Spack("echo", "still here")


@pytest.mark.parametrize("pin", [False, True], ids=["XX", "IK"])
async def test_authorize_refuses_unknown_peers(pin: bool) -> None:
    friend = Identity.generate()
    asked: list[PublicIdentity] = []

    async def authorize(peer: PublicIdentity) -> bool:
        asked.append(peer)
        await anyio.sleep(0)  # a checkpoint, not a wait: this authorize really awaits
        return peer == friend.public

    async with serving(echo, authorize=authorize) as (host, port, server_id):
        peer = server_id.public if pin else None
        with pytest.raises(PeerRefused) as info:
            await connect(host, port, peer)
        assert info.value.code == CloseCode.NOT_AUTHORIZED
        async with await connect(host, port, peer, identity=friend) as conn:
            await conn.send(Spack(1))
            assert await conn.receive() == Spack("echo", 1)
        assert asked[-1] == friend.public
        assert len(asked) == 2


async def test_many_clients_concurrently() -> None:
    async with serving(echo) as (host, port, server_id):
        results: dict[int, bytes] = {}

        async def client(n: int) -> None:
            async with await connect(host, port, server_id.public) as conn:
                payload = hashlib.sha256(str(n).encode()).digest() * (n + 1)
                for i in range(5):
                    await conn.send(Spack(n, i, payload))
                    reply = await conn.receive()
                    assert reply == Spack("echo", n, i, payload)
                results[n] = payload

        async with anyio.create_task_group() as tg:
            for n in range(40):
                tg.start_soon(client, n)
        assert sorted(results) == list(range(40))


async def test_clean_close_ends_iteration_on_the_other_side() -> None:
    got: list[object] = []
    done = anyio.Event()

    async def collect(conn: Connection) -> None:
        async for spack in conn:
            got.append(spack)
        got.append("end")
        done.set()

    async with serving(collect) as (host, port, server_id):
        conn = await connect(host, port, server_id.public)
        await conn.send(Spack(1))
        await conn.aclose()
        await conn.aclose()  # idempotent
        with anyio.fail_after(5):
            await done.wait()
        assert got == [Spack(1), "end"]
        with pytest.raises(anyio.ClosedResourceError):
            await conn.send(Spack(2))
        with pytest.raises(ConnectionClosed):
            await conn.receive()


@pytest.mark.parametrize(("code", "reason"), [(0x10000, ""), (-1, ""), (0x1000, "r" * 1025)])
async def test_close_with_bad_arguments_closes_nothing(code: int, reason: str) -> None:
    """A bad code or reason raises ValueError before anything is closed or sent."""
    async with serving() as (host, port, server_id):
        async with await connect(host, port, server_id.public) as conn:
            with pytest.raises(ValueError, match="close"):
                await conn.close(code, reason)
            await conn.send(Spack("still open"))
            with anyio.fail_after(5):
                assert await conn.receive() == Spack("still open")


async def test_cut_connection_is_not_a_clean_close() -> None:
    outcome: list[BaseException] = []
    done = anyio.Event()

    async def collect(conn: Connection) -> None:
        try:
            async for _ in conn:
                pass
        except ConnectionLost as exc:
            outcome.append(exc)
        done.set()

    async with serving(collect) as (host, port, server_id):
        conn = await connect(host, port, server_id.public)
        await conn.send(Spack(1))
        await anyio.aclose_forcefully(conn._transport)  # TCP FIN without CLOSE
        with anyio.fail_after(5):
            await done.wait()
        assert len(outcome) == 1
        assert isinstance(outcome[0], anyio.BrokenResourceError)


async def test_failing_handler_closes_only_its_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fragile(conn: Connection) -> None:
        spack = await conn.receive()
        if spack[0] == "boom":
            raise RuntimeError("handler bug")
        await echo(conn)

    caplog.set_level(logging.ERROR, logger="stalk")
    async with serving(fragile) as (host, port, server_id):
        async with await connect(host, port, server_id.public) as bad:
            await bad.send(Spack("boom"))
            with pytest.raises(ClosedByPeer) as info:
                await bad.receive()
            assert info.value.code == CloseCode.INTERNAL_ERROR
        async with await connect(host, port, server_id.public) as good:
            await good.send(Spack("fine"))
            await good.send(Spack("again"))
            assert await good.receive() == Spack("echo", "again")
    assert "handler bug" in caplog.text


async def test_handshake_timeout_drops_silent_clients() -> None:
    config = Config(handshake_timeout=0.3)
    async with serving(echo, config=config) as (host, port, server_id):
        silent = await anyio.connect_tcp(host, port)
        with anyio.fail_after(5):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await silent.receive()
        await silent.aclose()
        async with await connect(host, port, server_id.public) as conn:
            await conn.send(Spack("ok"))
            assert await conn.receive() == Spack("echo", "ok")


async def test_client_handshake_timeout() -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as mute:
        port = mute.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(mute.serve, _hold_open)
            with pytest.raises(HandshakeTimeout):
                await connect("127.0.0.1", port, config=Config(handshake_timeout=0.3))
            tg.cancel_scope.cancel()


async def _hold_open(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        await anyio.sleep_forever()


async def test_garbage_and_stalled_clients_do_not_block_others() -> None:
    async with serving(echo, config=Config(handshake_timeout=2)) as (host, port, server_id):
        stalled = await anyio.connect_tcp(host, port)
        await stalled.send(b"STALK\x01XX\x00\x21")  # half a frame, then nothing
        garbage = await anyio.connect_tcp(host, port)
        await garbage.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with anyio.fail_after(5):
            reply = await garbage.receive()
        assert reply[0] == CloseCode.UNSUPPORTED
        with anyio.fail_after(1.5):  # well within the stalled client's handshake timeout
            async with await connect(host, port, server_id.public) as conn:
                await conn.send(Spack("ok"))
                assert await conn.receive() == Spack("echo", "ok")
        await stalled.aclose()
        await garbage.aclose()


async def test_busy_listener_refuses_beyond_max_handshakes() -> None:
    config = Config(max_handshakes=1, handshake_timeout=3)
    server_id = Identity.generate()
    listener = await create_listener("127.0.0.1", 0, identity=server_id, config=config)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        host, port = listener.address
        stalled = await anyio.connect_tcp(host, port)
        await wait_until(lambda: listener.handshakes_in_progress == 1)
        with pytest.raises(PeerRefused) as info:
            await connect(host, port, server_id.public)
        assert info.value.code == CloseCode.BUSY
        await stalled.aclose()
        tg.cancel_scope.cancel()


async def test_connect_to_closed_port() -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as probe:
        port = probe.extra(anyio.abc.SocketAttribute.local_port)
    with pytest.raises(ConnectFailed) as info:
        await connect("127.0.0.1", port)
    assert isinstance(info.value, OSError)
    assert str(info.value).startswith(f"cannot connect to 127.0.0.1:{port}: ")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
async def test_an_ipv6_address_is_bracketed_in_messages() -> None:
    async with await anyio.create_tcp_listener(local_host="::1") as probe:
        port = probe.extra(anyio.abc.SocketAttribute.local_port)
    with pytest.raises(ConnectFailed) as info:
        await connect("::1", port)
    assert str(info.value).startswith(f"cannot connect to [::1]:{port}: ")


@pytest.mark.parametrize(
    ("bind", "dial"),
    [
        ("127.0.0.1", "127.0.0.1"),  # an address: dialled directly
        ("127.0.0.1", "localhost"),  # a name: anyio's connect_tcp
        pytest.param(
            "::1",
            "::1",
            marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback"),
        ),
    ],
)
async def test_connect_by_address_or_name(bind: str, dial: str) -> None:
    server_id = Identity.generate()
    async with await create_listener(bind, 0, identity=server_id) as listener:
        port = listener.address[1]
        where = {"127.0.0.1": f"127.0.0.1:{port}", "::1": f"[::1]:{port}"}[bind]
        assert repr(listener).startswith(f"<stalk.Listener {where} ")
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            async with await connect(dial, port, server_id.public) as conn:
                await conn.send(Spack("hi"))
                assert await conn.receive() == Spack("echo", "hi")
                assert conn.host == bind
                assert repr(conn) == (
                    f"<stalk.Connection IK {server_id.public.fingerprint} {where} open>"
                )
            tg.cancel_scope.cancel()


async def test_connect_to_closed_port_by_name() -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as probe:
        port = probe.extra(anyio.abc.SocketAttribute.local_port)
    with pytest.raises(ConnectFailed):
        await connect("localhost", port)


async def test_queue_and_flush_batch_many_spacks() -> None:
    async with serving(echo) as (host, port, server_id):
        async with await connect(host, port, server_id.public) as conn:
            for i in range(500):
                conn.queue(Spack(i))
            await conn.flush()
            for i in range(500):
                assert await conn.receive() == Spack("echo", i)


async def test_invalid_and_oversized_spacks_fail_before_writing() -> None:
    config = Config(max_message_size=4096)
    async with serving(echo, config=config) as (host, port, server_id):
        async with await connect(host, port, server_id.public) as conn:
            with pytest.raises(InvalidSpackValue):
                await conn.send(Spack(object()))  # type: ignore[arg-type]
            with pytest.raises(MessageTooLarge):
                await conn.send(Spack(b"x" * 5000))
            await conn.send(Spack("fine"))
            assert await conn.receive() == Spack("echo", "fine")


@pytest.mark.parametrize("writer", [True, False], ids=["writer-task", "direct"])
async def test_concurrent_senders_never_interleave_frames(writer: bool) -> None:
    """Eight tasks send at once, small spacks among large ones: every spack arrives whole.

    ``direct`` (no writer task): small spacks take the lock-free path (the kernel takes
    them at once) while large ones wait for the socket under the lock.
    """
    async with serving(echo) as (host, port, server_id):
        conn = await connect(host, port, server_id.public)
        async with contextlib.AsyncExitStack() as stack:
            if writer:
                await stack.enter_async_context(conn)
            else:
                stack.push_async_callback(conn.aclose)
            blobs = [bytes(range(256)) * 600, b"s" * 40]  # several Noise messages; one

            async def sender(n: int) -> None:
                for i in range(10):
                    await conn.send(Spack(n, i, blobs[(n + i) % 2]))

            seen = set()

            async def receiver() -> None:
                for _ in range(80):
                    reply = await conn.receive()
                    n, i = int(reply[1]), int(reply[2])
                    assert reply[3] == blobs[(n + i) % 2]
                    seen.add((n, i))

            async with anyio.create_task_group() as tg:
                tg.start_soon(receiver)  # the echo server blocks if we stop reading
                for n in range(8):
                    tg.start_soon(sender, n)
            assert len(seen) == 80


async def test_a_direct_send_behind_a_blocked_write_keeps_the_frame_order() -> None:
    """No writer task: a small send, then a large one, while another send waits on the socket.

    The first task holds the write lock, blocked on a full socket with its spack all sealed.
    The small spack's frame must not be sealed and held while its task waits for the lock:
    the lock holder writes what the session seals meanwhile (the large spack), and a held
    frame would then reach the peer after frames with later nonces, which it cannot
    decrypt.
    """
    release = anyio.Event()
    received: list[Spack] = []
    chunk = bytes(range(256)) * 4096  # 1 MiB: sealed in one step
    fills = 24  # more than the socket buffers hold

    async def slow_reader(conn: Connection) -> None:
        await release.wait()
        for _ in range(fills + 2):
            received.append(await conn.receive())
        await conn.send(Spack("done"))

    async def fill(conn: Connection) -> None:
        for index in range(fills):
            await conn.send(Spack("fill", index, chunk))

    async with serving(slow_reader) as (host, port, server_id):
        conn = await connect(host, port, server_id.public)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(fill, conn)
                await anyio.wait_all_tasks_blocked()  # blocked on the full socket, locked
                assert conn._link.send_lock.locked()
                tg.start_soon(conn.send, Spack("small"))
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(conn.send, Spack("large", chunk[: 256 * 1024]))
                await anyio.wait_all_tasks_blocked()
                release.set()
            assert await conn.receive() == Spack("done")
        finally:
            await conn.aclose()
    names = [spack[0] for spack in received]
    assert names.index("small") < names.index("large")
    assert [spack[1] for spack in received if spack[0] == "fill"] == list(range(fills))
    assert all(spack[2] == chunk for spack in received if spack[0] == "fill")
    assert received[names.index("large")][1] == chunk[: 256 * 1024]


async def test_concurrent_receives_are_refused() -> None:
    async with serving(echo) as (host, port, server_id):
        async with await connect(host, port, server_id.public) as conn:
            async with anyio.create_task_group() as tg:
                tg.start_soon(conn.receive)
                await anyio.wait_all_tasks_blocked()  # the first receive is waiting
                with pytest.raises(anyio.BusyResourceError):
                    await conn.receive()
                tg.cancel_scope.cancel()


async def test_cancelled_receive_loses_nothing() -> None:
    async with serving(echo) as (host, port, server_id):
        async with await connect(host, port, server_id.public) as conn:
            with anyio.move_on_after(0.05):
                await conn.receive()
            await conn.send(Spack("after"))
            assert await conn.receive() == Spack("echo", "after")


async def test_cancelled_send_never_corrupts_the_stream() -> None:
    received: list[Spack] = []

    async def slow(conn: Connection) -> None:
        async for spack in conn:
            received.append(spack)
            await anyio.sleep(0.001)  # the point: a slow consumer

    blob = b"z" * (4 << 20)
    async with serving(slow) as (host, port, server_id):
        async with await connect(host, port, server_id.public) as conn:
            outcomes = []
            for delay in (0.0, 0.001, 0.005, 0.02):
                with anyio.move_on_after(delay) as scope:
                    await conn.send(Spack(delay, blob))
                outcomes.append(scope.cancelled_caught)
            await conn.send(Spack("tail"))
        await wait_until(lambda: received and received[-1] == Spack("tail"), timeout=10)
    # Every spack that arrived is whole; cancelled sends either arrived whole or not at all.
    for spack in received[:-1]:
        assert spack[1] == blob
    assert len(received) >= 1 + outcomes.count(False)


async def test_backpressure_stops_a_sender_and_write_timeout_breaks() -> None:
    stop = anyio.Event()

    async def never_reads(conn: Connection) -> None:
        await stop.wait()

    config = Config(write_timeout=0.5)
    async with serving(never_reads) as (host, port, server_id):
        conn = await connect(host, port, server_id.public, config=config)
        sent = 0

        async def flood() -> None:
            nonlocal sent
            with anyio.fail_after(20):
                while True:
                    await conn.send(Spack(b"x" * 65536))
                    sent += 1

        with pytest.raises(ConnectionLost, match="did not complete"):
            await flood()
        assert sent < 2000  # bounded by socket buffers, not by memory
        with pytest.raises(ConnectionLost):
            await conn.send(Spack(1))
        await conn.aclose()
        stop.set()


async def test_send_eof_half_closes() -> None:
    async def reply_after_eof(conn: Connection) -> None:
        count = 0
        async for _ in conn:
            count += 1
        await conn.send(Spack("count", count))

    async with serving(reply_after_eof) as (host, port, server_id):
        async with await connect(host, port, server_id.public) as conn:
            await conn.send(Spack(1))
            await conn.send(Spack(2))
            await conn.send_eof()
            with pytest.raises(ConnectionClosed):
                await conn.send(Spack(3))
            assert await conn.receive() == Spack("count", 2)
            with pytest.raises(anyio.EndOfStream):
                await conn.receive()


async def test_connect_with_message_handler() -> None:
    got: list[Spack] = []
    finished = anyio.Event()

    async def on_message(spack: Spack) -> None:
        got.append(spack)
        if len(got) == 3:
            finished.set()

    async with serving(echo) as (host, port, server_id):
        conn = await connect(host, port, server_id.public, handler=on_message)
        async with conn:
            for i in range(3):
                await conn.send(Spack(i))
            with anyio.fail_after(5):
                await finished.wait()
    assert got == [Spack("echo", i) for i in range(3)]


async def test_plain_function_handler() -> None:
    got: list[Spack] = []

    async with serving(echo) as (host, port, server_id):
        conn = await connect(host, port, server_id.public, handler=got.append)
        async with conn:
            await conn.send(Spack("x"))
            await wait_until(lambda: got)
    assert got == [Spack("echo", "x")]


async def test_listener_object_reports_port() -> None:
    identity = Identity.generate()
    async with await create_listener("127.0.0.1", 0, identity=identity) as listener:
        host, port = listener.address
        assert port != 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            async with await connect(host, port, identity.public) as conn:
                await conn.send(Spack(7))
                assert await conn.receive() == Spack("echo", 7)
            tg.cancel_scope.cancel()


async def serve_through_anyio(
    listener: anyio.abc.Listener[Connection], handler: ConnectionHandler, tg: TaskGroup
) -> object:
    """Code written for any anyio listener: here it serves stalk connections."""
    return await tg.start(listener.serve, handler, tg)


async def test_listener_is_an_anyio_listener_of_connections() -> None:
    identity = Identity.generate()
    fingerprint = identity.public.fingerprint
    listener = await create_listener("127.0.0.1", 0, identity=identity)
    assert isinstance(listener, anyio.abc.Listener)
    async with listener:
        host, port = listener.address
        assert listener.extra(SocketAttribute.local_address) == (host, port)
        idle = f"<stalk.Listener 127.0.0.1:{port} {fingerprint} 0 connected, 0 handshaking>"
        assert repr(listener) == idle
        async with anyio.create_task_group() as tg:
            # task_status: the bound address once the listener is accepting.
            assert await serve_through_anyio(listener, echo, tg) == (host, port)
            async with await connect(host, port, identity.public) as conn:
                await conn.send(Spack(7))
                assert await conn.receive() == Spack("echo", 7)
                assert repr(listener) == idle.replace("0 connected", "1 connected")
            tg.cancel_scope.cancel()
    assert repr(listener) == f"<stalk.Listener 127.0.0.1:{port} {fingerprint} closed>"


async def test_wrap_over_memory_streams() -> None:
    a, b = byte_stream_pair()
    assert isinstance(a, StapledByteStream)
    server_id = Identity.generate()
    async with anyio.create_task_group() as tg:
        result: list[Connection] = []

        async def serve() -> None:
            result.append(await Connection.wrap(b, identity=server_id, server_side=True))

        tg.start_soon(serve)
        client = await Connection.wrap(a, identity=Identity.generate(), peer=server_id.public)
    server = result[0]
    await client.send(Spack("mem"))
    assert await server.receive() == Spack("mem")
    assert client.host is None
    await client.aclose()
    with pytest.raises(anyio.EndOfStream):
        await server.receive()
    await server.aclose()


async def test_handshake_failure_is_typed_and_carries_address() -> None:
    async with serving(echo) as (host, port, _server_id):
        raw = await anyio.connect_tcp(host, port)
        await raw.send(b"STALK\x07XX")  # unknown version
        reply = await raw.receive()
        assert reply[0] == CloseCode.UNSUPPORTED
        await raw.aclose()
        with pytest.raises(HandshakeFailed) as info:
            await connect(host, port, Identity.generate().public)
        assert info.value.peer_address == (host, port)


class CountingStream(StapledByteStream):
    """A byte stream that counts the writes made to it."""

    writes = 0

    async def send(self, item: bytes) -> None:
        self.writes += 1
        await super().send(item)


async def test_writer_task_coalesces_a_burst_of_sends() -> None:
    a, b = byte_stream_pair()
    counting = CountingStream(a.send_stream, a.receive_stream)
    server_id = Identity.generate()
    async with anyio.create_task_group() as tg:
        result: list[Connection] = []

        async def serve() -> None:
            result.append(await Connection.wrap(b, identity=server_id, server_side=True))

        tg.start_soon(serve)
        client = await Connection.wrap(
            counting, identity=Identity.generate(), peer=server_id.public
        )
    server = result[0]
    before = counting.writes
    async with client:
        for i in range(1000):
            await client.send(Spack(i))  # returns without writing: the writer batches
        await client.flush()
        assert counting.writes - before < 20
        for i in range(1000):
            assert await server.receive() == Spack(i)
    with pytest.raises(anyio.EndOfStream):
        await server.receive()
    await server.aclose()


async def test_writer_backpressure_and_write_timeout() -> None:
    stop = anyio.Event()

    async def never_reads(conn: Connection) -> None:
        await stop.wait()

    config = Config(write_timeout=0.5, send_buffer=64 * 1024)
    async with serving(never_reads) as (host, port, server_id):
        sent = 0

        async def flood() -> None:
            nonlocal sent
            async with await connect(host, port, server_id.public, config=config) as conn:
                with anyio.fail_after(20):
                    while True:
                        await conn.send(Spack(b"x" * 4096))
                        sent += 1

        with pytest.raises(ConnectionLost, match="did not complete"):
            await flood()
        assert sent < 5000  # bounded by socket buffers plus send_buffer, not by memory
        stop.set()
