"""The write path (``stalk.writing``): whole buffers, in order, within the deadline.

The fast writer (a write offered to the kernel first) is checked against the general one
(shielded, with a deadline) on the same workload: the same bytes arrive, in order, however
the writes are cancelled. The traits of anyio's socket streams that the fast writer relies
on are pinned here, so an anyio release that changes them fails this file first.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import ByteStream, SocketAttribute, SocketListener, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.stapled import StapledByteStream

from stalk.writing import OFFER_MAX, Writer, _SocketWriter, writer_for

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def _tcp_pair() -> AsyncIterator[tuple[SocketStream, SocketStream]]:
    """A connected loopback pair of anyio socket streams: (ours, the peer's)."""
    listener = (await anyio.create_tcp_listener(local_host="127.0.0.1")).listeners[0]
    assert isinstance(listener, SocketListener)
    async with listener:
        port = listener.extra(SocketAttribute.local_port)
        ours = await anyio.connect_tcp("127.0.0.1", port)
        peer = await listener.accept()
        async with ours, peer:
            yield ours, peer


@asynccontextmanager
async def _unread_pair() -> AsyncIterator[SocketStream]:
    """Our end of a loopback connection whose peer never reads.

    The peer is a plain socket: an anyio stream on asyncio would read into memory unasked.
    """
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = await anyio.connect_tcp("127.0.0.1", server.getsockname()[1])
        peer, _ = server.accept()
        with peer:
            async with ours:
                yield ours


def _general(stream: ByteStream, timeout: float) -> Writer:
    return Writer(stream, timeout)


WRITERS: dict[str, Callable[[ByteStream, float], Writer]] = {
    "fast": writer_for,
    "general": _general,
}


async def test_anyio_socket_streams_get_the_fast_writer(anyio_backend: str) -> None:
    async with _tcp_pair() as (ours, _):
        assert type(writer_for(ours, 1.0)) is _SocketWriter
        if anyio_backend == "trio":
            # Trait: trio's socket is a real non-blocking socket with no buffer of its own.
            sock = ours.extra(SocketAttribute.raw_socket)
            assert isinstance(sock, socket.socket)
            assert sock.gettimeout() == 0.0


async def test_a_large_buffer_is_offered_first_on_trio_only(anyio_backend: str) -> None:
    """On asyncio, over OFFER_MAX the fast writer takes the general way whole."""
    async with _tcp_pair() as (ours, theirs):
        writer = writer_for(ours, 5.0)
        big = bytes(range(256)) * ((OFFER_MAX + 1) // 256 + 1)
        if anyio_backend == "trio":
            taken = writer.write_nowait(big)  # offered whatever its size
            assert taken > 0
            received = bytearray()
            while len(received) < taken:
                received.extend(await theirs.receive())
            assert bytes(received) == big[:taken]
            return
        assert writer.write_nowait(big) == 0
        sent = writer.write_nowait(big[:OFFER_MAX])  # at most OFFER_MAX: offered
        assert sent > 0
        received = bytearray()

        async def read() -> None:
            while len(received) < sent + len(big):
                received.extend(await theirs.receive())

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await writer.write(big)
        assert bytes(received) == big[:sent] + big


async def test_the_writers_checkpoint_is_a_checkpoint(anyio_backend: str) -> None:
    """``Writer.checkpoint`` (the loop's own, looked up once) lets other tasks run and is
    where a pending cancellation takes effect, as ``anyio.lowlevel.checkpoint`` is."""
    async with _tcp_pair() as (ours, _):
        writer = writer_for(ours, 1.0)
        assert writer.checkpoint is not anyio.lowlevel.checkpoint  # the lookup is skipped
        ran: list[str] = []

        async def other() -> None:
            ran.append("other")

        async with anyio.create_task_group() as tg:
            tg.start_soon(other)
            # A scheduling point: trio may run the two tasks of one batch in either order,
            # so the other task has run after two checkpoints (a no-op never lets it).
            await writer.checkpoint()
            await writer.checkpoint()
            assert ran == ["other"]
        with anyio.CancelScope() as scope:
            scope.cancel()
            await writer.checkpoint()
            ran.append("not cancelled")
        assert scope.cancelled_caught  # a cancellation point
        assert ran == ["other"]


async def test_other_streams_get_the_general_writer() -> None:
    send, receive = anyio.create_memory_object_stream[bytes](1)
    stream = StapledByteStream(send, BufferedByteReceiveStream(receive))  # type: ignore[arg-type]
    assert type(writer_for(stream, 1.0)) is Writer
    send.close()
    receive.close()


async def test_asyncio_send_returns_only_with_the_transport_buffer_empty(
    anyio_backend: str,
) -> None:
    """The asyncio trait the fast writer relies on: ``send`` leaves nothing in the transport.

    Writing to the descriptor directly is in order only because anyio's asyncio ``send``
    returns once the transport's own buffer has drained (anyio sets its write buffer
    limits to zero). A slow reader makes the transport buffer fill up on the way.
    """
    if anyio_backend != "asyncio":
        pytest.skip("an asyncio trait")
    async with _tcp_pair() as (ours, peer), anyio.create_task_group() as tg:

        async def slow_reader() -> None:
            while True:
                await peer.receive(1 << 16)
                await anyio.sleep(0.0005)

        tg.start_soon(slow_reader)
        transport = ours._transport  # type: ignore[attr-defined]
        for _ in range(64):
            await ours.send(b"x" * (1 << 20))
            assert transport.get_write_buffer_size() == 0
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("kind", list(WRITERS))
async def test_cancelled_writes_arrive_whole_and_in_order(anyio_backend: str, kind: str) -> None:
    """Writes cancelled at random moments, to a slow reader: every byte arrives, in order.

    A write that returns (or is cancelled) has handed its bytes out for good: dropping or
    reordering any of them would make the peer fail every later Noise message.
    """
    rng = random.Random(7)
    written = bytearray()
    received = bytearray()
    cancelled = 0
    async with _tcp_pair() as (ours, peer), anyio.create_task_group() as tg:
        done = anyio.Event()

        async def slow_reader() -> None:
            try:
                while True:
                    received.extend(await peer.receive(1 << 16))
                    await anyio.sleep(0.0002)
            except anyio.EndOfStream:
                done.set()

        tg.start_soon(slow_reader)
        writer = WRITERS[kind](ours, 30.0)
        for i in range(120):
            data = bytes([i % 251]) * rng.choice([17, 1000, 70_000, 600_000])
            with anyio.move_on_after(rng.choice([0.0, 0.0001, 0.001])) as scope:
                await writer.write(data)
            written.extend(data)
            cancelled += scope.cancel_called
        await ours.send_eof()
        with anyio.fail_after(30):
            await done.wait()
    assert cancelled > 10  # cancellations struck during writes
    assert len(received) == len(written)
    assert received == written


@pytest.mark.parametrize("kind", list(WRITERS))
async def test_a_write_the_peer_never_reads_times_out(anyio_backend: str, kind: str) -> None:
    async with _unread_pair() as ours:
        writer = WRITERS[kind](ours, 0.3)

        async def flood() -> None:
            with anyio.fail_after(20):
                while True:
                    await writer.write(b"y" * (1 << 20))

        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await flood()
        # Socket buffers fill within a few writes; then one write waits its own 0.3 s.
        assert 0.3 <= time.monotonic() - started < 10


async def test_the_fast_writer_never_writes_to_a_closed_stream(anyio_backend: str) -> None:
    """After ``aclose`` the descriptor may be reused by another socket: writing must fail."""
    async with _tcp_pair() as (ours, _):
        writer = writer_for(ours, 1.0)
        await ours.aclose()
        await anyio.lowlevel.checkpoint()
        async with _tcp_pair() as (other, other_peer):  # may reuse the descriptor
            with pytest.raises((OSError, anyio.ClosedResourceError, anyio.BrokenResourceError)):
                await writer.write(b"stray")
            await other.send(b"ok")
            assert await other_peer.receive() == b"ok"
