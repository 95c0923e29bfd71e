"""Channels through the anyio API: Config, Connection.open_channel/accept_channel, Channel."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from typing import cast

import anyio
import anyio.abc
import pytest
import sniffio

import stalk.link
from helpers import echo, serving
from stalk import (
    Channel,
    ChannelClosed,
    ChannelHandler,
    ChannelLimitReached,
    ChannelReset,
    CloseCode,
    ClosedByPeer,
    Config,
    Connection,
    ConnectionClosed,
    ConnectionLost,
    Identity,
    LocalProtocolError,
    Spack,
    StalkAttribute,
    connect,
    create_listener,
)
from stalk.events import ChannelMessageReceived
from stalk.handshake import ChannelParams
from stalk.inbox import Inbox
from stalk.shared_io import Waiter, waiter_factory
from stalk.wire import DEFAULT_CHANNEL_WINDOW, DEFAULT_CONNECTION_WINDOW
from stalk.writing import Writer, writer_for

pytestmark = pytest.mark.anyio

# -- Config ---------------------------------------------------------------------------------


def test_config_offers_channels_only_when_asked() -> None:
    assert Config().session_config().channels is None
    offered = Config(max_channels=7, channel_window=4096).session_config().channels
    assert offered == ChannelParams(
        max_channels=7, channel_window=4096, connection_window=DEFAULT_CONNECTION_WINDOW
    )
    assert Config(max_channels=0).session_config().channels == ChannelParams(
        0, DEFAULT_CHANNEL_WINDOW, DEFAULT_CONNECTION_WINDOW
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"max_channels": -1},
        {"max_channels": 65_536},
        {"max_channels": 4, "channel_window": 1023},
        {"connection_window": 65_515},  # checked even when no channels are offered
        {"channel_window": 2**31},
    ],
)
def test_config_rejects_channel_settings_outside_the_protocol(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be an int"):
        Config(**fields)


# -- connections with channels --------------------------------------------------------------

SMALL = Config(max_channels=8, channel_window=4096, connection_window=65_516)


async def echo_channel(channel: Channel) -> None:
    """A channel handler that sends every spack back as it came."""
    async for spack in channel:
        await channel.send(spack)


async def drain(conn: Connection) -> None:
    """A connection handler that keeps the connection until the client closes it."""
    async for _ in conn:
        pass


@asynccontextmanager
async def client_and_server(
    channel_handler: ChannelHandler | None = echo_channel,
    *,
    handler: Callable[[Connection], Awaitable[None]] = echo,
    server: Config = SMALL,
    client: Config = SMALL,
    client_channel_handler: ChannelHandler | None = None,
) -> AsyncIterator[Connection]:
    """A listener with channels and a client connected to it (inside its ``async with``)."""
    async with (
        serving(handler, config=server, channel_handler=channel_handler) as (host, port, _),
        await connect(host, port, config=client, channel_handler=client_channel_handler) as conn,
    ):
        yield conn


async def test_many_channels_carry_spacks_at_once_each_in_order() -> None:
    async with client_and_server() as conn:
        assert conn.channels

        async def exchange(n: int) -> None:
            async with await conn.open_channel() as channel:
                spacks = [Spack(n, i, b"v" * (i * 700)) for i in range(12)]
                for spack in spacks:  # pipelined: all sent before any answer is read
                    await channel.send(spack)
                assert [await channel.receive() for _ in spacks] == spacks
                for spack in spacks:  # and one at a time
                    await channel.send(spack)
                    assert await channel.receive() == spack

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for n in range(8):
                    tg.start_soon(exchange, n)
                await conn.send(Spack("channel 0 too"))
                assert await conn.receive() == Spack("channel 0 too")


async def test_a_spack_far_larger_than_the_windows_goes_through_whole() -> None:
    big = Spack(bytes(range(256)) * 4096, "tail")  # 1 MiB, 256 windows of 4 KiB
    async with client_and_server() as conn:
        channel = await conn.open_channel()
        with anyio.fail_after(20):
            await channel.send(big)
            assert await channel.receive() == big


async def test_a_channel_nobody_reads_stalls_only_itself() -> None:
    """The server streams 100 spacks on two channels; the client reads one to its end
    while the other holds at most its window, then reads that one whole too."""

    async def stream(channel: Channel) -> None:
        await channel.receive()
        for i in range(100):
            await channel.send(Spack(i, b"s" * 1000))

    server = replace(SMALL, send_buffer=0)  # the stalled channel's sender waits for credit
    async with client_and_server(stream, server=server) as conn:
        stalled, flowing = await conn.open_channel(), await conn.open_channel()
        await stalled.send(Spack("go"))
        await flowing.send(Spack("go"))
        with anyio.fail_after(20):
            got = [(await flowing.receive())[0] for _ in range(100)]
            assert got == list(range(100))
            with pytest.raises(anyio.EndOfStream):
                await flowing.receive()
            held = stalled._inbox.held_bytes
            # Its window, plus the spack that ran out of credit (the assembly slot).
            assert 0 < held <= SMALL.channel_window + len(Spack(99, b"s" * 1000).encode())
            got = [(await stalled.receive())[0] for _ in range(100)]
            assert got == list(range(100))


async def test_a_sender_out_of_credit_reads_the_connection_itself() -> None:
    """No task receives on the client: its sends still get the credit they wait for."""
    received: list[int] = []

    async def consume(channel: Channel) -> None:
        async for spack in channel:
            received.append(spack[0])
        await channel.send(Spack(len(received)))

    client = replace(SMALL, send_buffer=0)  # each send waits until its spack is written
    async with client_and_server(consume, client=client) as conn:
        channel = await conn.open_channel()
        with anyio.fail_after(20):
            for i in range(50):
                await channel.send(Spack(i, b"c" * 3000))
            await channel.send_eof()
            assert await channel.receive() == Spack(50)
        assert received == list(range(50))


async def test_half_close_each_direction_on_its_own() -> None:
    async def count_then_answer(channel: Channel) -> None:
        count = 0
        async for _ in channel:
            count += 1
        await channel.send(Spack(count))
        await channel.send(Spack("bye"))
        # returning closes the server's direction

    async with client_and_server(count_then_answer) as conn:
        channel = await conn.open_channel()
        for i in range(3):
            await channel.send(Spack(i))
        await channel.send_eof()
        with pytest.raises(ChannelClosed, match="send_eof"):
            await channel.send(Spack("late"))
        with anyio.fail_after(10):
            assert await channel.receive() == Spack(3)
            assert await channel.receive() == Spack("bye")
            with pytest.raises(anyio.EndOfStream):
                await channel.receive()
        assert conn._session.channel_state(channel.id) is None  # ended both ways
        await channel.aclose()
        with pytest.raises(ChannelClosed) as closed:
            await channel.receive()
        assert isinstance(closed.value, anyio.ClosedResourceError)


async def test_a_reset_reaches_a_pending_receive_on_either_side() -> None:
    seen: list[BaseException] = []
    first = anyio.Event()
    done = anyio.Event()

    async def wait_for_reset(channel: Channel) -> None:
        request = await channel.receive()
        if request == Spack("reset me"):
            await channel.reset(0x1002, "as you wish")
            return
        if request != Spack("hello"):
            await channel.send(request)
            return
        first.set()
        try:
            await channel.receive()
        except ChannelReset as exc:
            seen.append(exc)
            done.set()
            raise

    server = replace(SMALL, max_channels=1)  # a reset must free the one slot
    async with client_and_server(wait_for_reset, server=server) as conn:
        with anyio.fail_after(10):
            ours = await conn.open_channel()
            await ours.send(Spack("hello"))
            await first.wait()
            await ours.reset(0x1001, "changed my mind")
            await done.wait()
            with pytest.raises(ChannelClosed, match="reset"):
                await ours.send(Spack("after"))
            (exc,) = seen
            assert isinstance(exc, ChannelReset)
            assert (exc.code, exc.reason) == (0x1001, "changed my mind")

            theirs = await conn.open_channel()  # the slot is free again
            await theirs.send(Spack("reset me"))
            with pytest.raises(ChannelReset) as reset:
                await theirs.receive()
            assert (reset.value.code, reset.value.reason) == (0x1002, "as you wish")
            assert isinstance(reset.value, anyio.BrokenResourceError)
            with pytest.raises(ChannelReset):
                await theirs.send(Spack("still there?"))
            third = await conn.open_channel(wait=False)  # the peer's reset freed it too
            await third.send(Spack("fine"))
            assert await third.receive() == Spack("fine")


async def test_a_send_waiting_for_credit_raises_when_the_peer_resets() -> None:
    async def refuse_the_rest(channel: Channel) -> None:
        await channel.receive()
        await channel.reset(0x1003, "enough")

    async def flood(channel: Channel) -> None:
        # A few go (the window, and the spack that takes the assembly slot), then one
        # waits for credit the peer never grants: its reset ends the wait.
        for _ in range(100):
            await channel.send(Spack(b"x" * 3000))

    client = replace(SMALL, send_buffer=0)
    async with client_and_server(refuse_the_rest, client=client) as conn:
        channel = await conn.open_channel()
        await channel.send(Spack("first"))
        with anyio.fail_after(10), pytest.raises(ChannelReset, match="enough"):
            await flood(channel)
        assert conn._session.queued_bytes_on(channel.id) == 0  # dropped with the reset


async def test_open_channel_waits_for_a_slot_or_raises() -> None:
    async def until_eof(channel: Channel) -> None:
        async for _ in channel:
            pass

    server = replace(SMALL, max_channels=2)
    async with client_and_server(until_eof, server=server) as conn:
        first, _second = await conn.open_channel(), await conn.open_channel()
        with pytest.raises(ChannelLimitReached, match="at most 2"):
            await conn.open_channel(wait=False)
        opened: list[Channel] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def open_one() -> None:
                    opened.append(await conn.open_channel())

                tg.start_soon(open_one)
                await anyio.wait_all_tasks_blocked()
                assert opened == []  # waiting for a slot
                await first.send_eof()  # the server's handler ends: the channel ends
        (third,) = opened
        assert third.id == 5


async def test_no_slot_at_all_when_the_peer_accepts_no_channel() -> None:
    async with client_and_server(None, server=replace(SMALL, max_channels=0)) as conn:
        assert conn.channels
        with pytest.raises(ChannelLimitReached, match="at most 0"):
            await conn.open_channel()


async def test_cancelled_receives_lose_and_repeat_nothing() -> None:
    """Requests and answers on two channels at once; one side's receives are cancelled at
    random points (waiting, or reading for both): every answer arrives once, in order."""
    cancelled = 0

    async def ask(channel: Channel, *, cancel: bool) -> None:
        nonlocal cancelled
        answers = []
        for i in range(150):
            await channel.send(Spack(i))
            while True:
                with anyio.move_on_after(random.random() * 0.0004 if cancel else 10) as scope:
                    answers.append((await channel.receive())[0])
                    break
                cancelled += scope.cancelled_caught
        assert answers == list(range(150))

    async with client_and_server() as conn:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(ask, await conn.open_channel(), cancel=True))
                tg.start_soon(partial(ask, await conn.open_channel(), cancel=False))
                tg.start_soon(partial(ask, await conn.open_channel(), cancel=True))
    assert cancelled > 0


async def test_a_second_receive_on_a_channel_is_refused_and_the_first_goes_on() -> None:
    async with client_and_server() as conn:
        channel = await conn.open_channel()
        first_waits = anyio.Event()

        async def first() -> None:
            first_waits.set()
            assert await channel.receive() == Spack("answer")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await first_waits.wait()
                await anyio.wait_all_tasks_blocked()
                with pytest.raises(anyio.BusyResourceError):
                    await channel.receive()
                await channel.send(Spack("answer"))
            await channel.send(Spack("again"))  # the refused call left no receive behind
            assert await channel.receive() == Spack("again")


async def test_cancelled_sends_leave_their_spack_queued_once() -> None:
    go = anyio.Event()
    received: list[int] = []
    done = anyio.Event()

    async def late_reader(channel: Channel) -> None:
        await go.wait()
        async for spack in channel:
            received.append(spack[0])
        done.set()

    client = replace(SMALL, send_buffer=0)
    async with client_and_server(late_reader, client=client) as conn:
        channel = await conn.open_channel()
        with anyio.fail_after(10):
            for i in range(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(channel.send, Spack(i, b"p" * 3000))
                    await anyio.wait_all_tasks_blocked()  # waiting for credit
                    tg.cancel_scope.cancel()
            assert conn._session.queued_bytes_on(channel.id) > 0
            go.set()
            await channel.send_eof()
            await done.wait()
    assert received == list(range(5))


async def test_a_failing_channel_handler_resets_only_its_channel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fragile(channel: Channel) -> None:
        async for spack in channel:
            if spack == Spack("boom"):
                raise RuntimeError("a secret of the server's")
            await channel.send(spack)

    with caplog.at_level(logging.ERROR, logger="stalk"):
        async with client_and_server(fragile) as conn:
            doomed, fine = await conn.open_channel(), await conn.open_channel()
            await doomed.send(Spack("boom"))
            await fine.send(Spack("ok"))
            with anyio.fail_after(10):
                with pytest.raises(ChannelReset) as reset:
                    await doomed.receive()
                assert reset.value.code == CloseCode.INTERNAL_ERROR
                assert reset.value.reason == "internal error"
                assert await fine.receive() == Spack("ok")
                await conn.send(Spack("zero"))
                assert await conn.receive() == Spack("zero")
    (record,) = [r for r in caplog.records if r.name == "stalk.connection"]
    assert record.levelno == logging.ERROR
    assert "channel handler for channel 1" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


async def test_an_async_with_channel_left_by_an_exception_resets_it() -> None:
    reset: list[ChannelReset] = []
    done = anyio.Event()

    async def watch(channel: Channel) -> None:
        assert await channel.receive() == Spack("opening")
        await channel.send(Spack("ack"))
        try:
            await channel.receive()
        except ChannelReset as exc:
            reset.append(exc)
        done.set()

    async with client_and_server(watch) as conn:
        channel = await conn.open_channel()
        await channel.send(Spack("opening"))
        assert await channel.receive() == Spack("ack")

        async def fail_inside() -> None:
            async with channel:
                raise KeyError("local detail")

        with pytest.raises(KeyError):
            await fail_inside()
        with anyio.fail_after(10):
            await done.wait()
    ((code, reason),) = [(exc.code, exc.reason) for exc in reset]
    assert (code, reason) == (CloseCode.INTERNAL_ERROR, "internal error")


async def test_accept_channel_gives_the_peers_channels_in_id_order() -> None:
    async def open_three(conn: Connection) -> None:
        a, b, c = [await conn.open_channel() for _ in range(3)]
        await c.send(Spack("c"))  # opens b and a too, on the wire
        await a.send(Spack("a"))
        await b.send_eof()
        async for _ in conn:
            pass

    async with client_and_server(None, handler=open_three) as conn:
        with anyio.fail_after(10):
            channels = [await conn.accept_channel() for _ in range(3)]
            assert [channel.id for channel in channels] == [2, 4, 6]
            assert await channels[2].receive() == Spack("c")
            assert await channels[0].receive() == Spack("a")
            with pytest.raises(anyio.EndOfStream):
                await channels[1].receive()


async def test_accept_channel_ends_with_the_connection() -> None:
    async def close_soon(conn: Connection) -> None:
        await conn.receive()

    async with client_and_server(None, handler=close_soon) as conn:
        await conn.send(Spack("bye"))
        with anyio.fail_after(10), pytest.raises(anyio.EndOfStream):
            await conn.accept_channel()


async def test_channel_handlers_of_a_client_end_with_its_connection() -> None:
    started, finished = anyio.Event(), anyio.Event()

    async def forever(channel: Channel) -> None:
        try:
            assert await channel.receive() == Spack("hello")
            started.set()
            await channel.receive()  # nothing more comes
        finally:
            finished.set()

    async def greet(conn: Connection) -> None:
        channel = await conn.open_channel()
        await channel.send(Spack("hello"))
        async for _ in conn:
            pass

    async with client_and_server(None, handler=greet, client_channel_handler=forever) as conn:
        with anyio.fail_after(10):
            await started.wait()
        with pytest.raises(LocalProtocolError, match="channel handler"):
            await conn.accept_channel()
    assert finished.is_set()


async def test_every_channel_ends_with_the_connection() -> None:
    async def close_with_error(conn: Connection) -> None:
        await conn.receive()
        await conn.close(0x1234, "over")

    async with client_and_server(None, handler=close_with_error) as conn:
        channel = await conn.open_channel()
        await channel.send(Spack("opens it"))
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def expect_closed_by_peer() -> None:
                    with pytest.raises(ClosedByPeer) as closed:
                        await channel.receive()
                    assert closed.value.code == 0x1234

                tg.start_soon(expect_closed_by_peer)
                await anyio.wait_all_tasks_blocked()
                await conn.send(Spack("close it"))

    async with client_and_server() as conn:
        channel = await conn.open_channel()
        await channel.send(Spack("opens it"))
        assert await channel.receive() == Spack("opens it")
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def expect_closed() -> None:
                    with pytest.raises(ConnectionClosed):
                        await channel.receive()

                tg.start_soon(expect_closed)
                await anyio.wait_all_tasks_blocked()
                await conn.aclose()
        with pytest.raises(ConnectionClosed):
            await channel.send(Spack("late"))


async def test_the_reader_task_reads_on_only_once_the_application_stops_taking() -> None:
    """While the application takes spacks already read, the reader task does not read
    more (they would only wait, decoded); once it stops taking, the reader task reads
    everything that came, as it does for a channel nobody reads."""
    count = 30_000  # about 2 MB: within channel 0's window, many reads of 256 KiB

    async def server(conn: Connection) -> None:
        for i in range(count):
            conn.queue(Spack(i, b"x" * 60))
        await conn.flush()
        await conn.receive()  # until the client closes

    config = Config(max_channels=4)
    async with (
        serving(server, config=config) as (host, port, _),
        await connect(host, port, config=config) as conn,
    ):
        io = conn._channels.io if conn._channels is not None else None
        assert io is not None
        session = conn._session
        # What a spack takes on the wire at most (record header, its encoding): read
        # bytes not handed out yet count as at least this many spacks.
        wire = len(Spack(count, b"x" * 60).encode()) + 3

        def held() -> int:
            """Spacks read and not yet taken: in the inboxes, or in the session (decoded,
            or still bytes), where channel 0 takes them from itself."""
            return io.held + len(session._events) + session._reader.unconsumed // wire

        most = 0
        with anyio.fail_after(20):
            for i in range(count // 2):
                assert (await conn.receive())[0] == i
                most = max(most, held())
                await anyio.lowlevel.checkpoint()  # the reader task has its turns
            # About one read (256 KiB, ~3,500 spacks) at a time, not all that came; a
            # stall of the application past the reader task's pause (_LOOK_AGAIN) lets it read
            # one more, so the bound leaves room for a few.
            assert most < count // 2
            while io.held < count - count // 2:  # stopped taking: the rest is read
                await anyio.sleep(0.001)
            assert [(await conn.receive())[0] for _ in range(count // 2, count)] == list(
                range(count // 2, count)
            )


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "through-inbox"])
async def test_channel_0_reads_its_spacks_itself_or_through_its_inbox_alike(
    direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Channel 0's receive(), as the reader, takes its spack itself (``SharedIO.direct``:
    ``read_direct``, ``next_direct``), not through its inbox: the same spacks in the same
    order either way, in round trips, in bursts, and while other channels are busy."""
    through_inbox: list[object] = []
    received = Inbox.received

    def counting(inbox: Inbox, event: ChannelMessageReceived) -> None:
        through_inbox.append(inbox)
        received(inbox, event)

    monkeypatch.setattr(Inbox, "received", counting)
    async with client_and_server() as conn:
        assert conn._channels is not None
        conn._channels.io.direct = direct
        channel0 = conn._channels.channel0
        rounds = [Spack(i, b"r" * i) for i in range(40)]
        with anyio.fail_after(20):
            for spack in rounds:
                await conn.send(spack)
                assert await conn.receive() == spack
            via_inbox = through_inbox.count(channel0)
            # Mostly taken directly (the reader task may read some first); all through
            # the inbox otherwise.
            assert via_inbox < len(rounds) // 2 if direct else via_inbox == len(rounds)

            async def other(n: int) -> None:
                async with await conn.open_channel() as channel:
                    for i in range(20):
                        await channel.send(Spack(n, i, b"o" * 300))
                        assert await channel.receive() == Spack(n, i, b"o" * 300)

            burst = [Spack(i, b"b" * (i * 37)) for i in range(100)]
            async with anyio.create_task_group() as tg:
                for n in range(3):
                    tg.start_soon(other, n)
                for spack in burst:
                    conn.queue(spack)
                await conn.flush()
                assert [await conn.receive() for _ in burst] == burst
                for spack in rounds:
                    await conn.send(spack)
                    assert await conn.receive() == spack


async def test_round_trips_on_channel_0_do_not_wake_the_reader_task_each_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Channel 0's receive reads its answer itself, as the reader, and gives the role up
    with it. The reader task (the reader while no other task is) is not woken for that
    each time: on asyncio only if the role is still free once the tasks that can run
    have run, on trio not while it dozes (it looks again a moment later). Woken each
    time, it would cost two turns of the event loop per round trip."""
    async with client_and_server() as conn:
        assert conn._channels is not None
        io = conn._channels.io
        with anyio.fail_after(20):
            while io._idle_reader is None:  # the reader task has started
                await anyio.lowlevel.checkpoint()
        reader = io._idle_reader
        wakes: list[Waiter] = []
        wake = type(reader).wake

        def counting(waiter: Waiter) -> None:
            if waiter is reader:
                wakes.append(waiter)
            wake(waiter)

        monkeypatch.setattr(type(reader), "wake", counting)
        rounds = 300
        with anyio.fail_after(20):
            for i in range(rounds):
                await conn.send(Spack(i))
                assert await conn.receive() == Spack(i)
        assert len(wakes) < rounds // 10


async def test_the_reader_task_reads_what_comes_once_round_trips_stop() -> None:
    """After round trips on channel 0 (the reader task not woken each time the role
    changes hands), the application stops receiving: what comes next is still read, by
    the reader task once it looks again (at once on asyncio, within ``_LOOK_AGAIN``, 5 ms,
    on trio), here a channel the server opens for the client's channel handler."""
    greeted = anyio.Event()

    async def greeted_by(channel: Channel) -> None:
        assert await channel.receive() == Spack("after the round trips")
        greeted.set()

    async def server(conn: Connection) -> None:
        for _ in range(100):
            await conn.send(await conn.receive())
        channel = await conn.open_channel()
        await channel.send(Spack("after the round trips"))
        async for _ in conn:
            pass

    async with client_and_server(None, handler=server, client_channel_handler=greeted_by) as conn:
        with anyio.fail_after(10):
            for i in range(100):
                await conn.send(Spack(i))
                assert await conn.receive() == Spack(i)
            await greeted.wait()


async def test_a_receive_reading_channel_0_ends_with_the_connection_alone() -> None:
    """Channel 0's receive reads without a cancel scope for other tasks to cancel: only
    input or the connection's end can end its wait. As the reader it hands another
    channel's spacks on, and closing the connection from another task ends it at once."""
    async with client_and_server(handler=drain) as conn, anyio.create_task_group() as tg:
        with anyio.fail_after(10):

            async def receive_until_closed() -> None:
                with pytest.raises(ConnectionClosed):
                    await conn.receive()

            tg.start_soon(receive_until_closed)
            await anyio.wait_all_tasks_blocked()
            channel = await conn.open_channel()
            await channel.send(Spack("a channel's echo, read by channel 0's receive"))
            assert await channel.receive() == Spack("a channel's echo, read by channel 0's receive")
            await conn.aclose()


async def test_without_both_offers_a_connection_has_no_channels() -> None:
    async with client_and_server(None, server=Config()) as conn:
        assert not conn.channels
        with pytest.raises(LocalProtocolError, match="no channels"):
            await conn.open_channel()
        await conn.send(Spack("as ever"))
        assert await conn.receive() == Spack("as ever")


async def test_a_channel_handler_needs_channels_offered() -> None:
    with pytest.raises(ValueError, match="max_channels"):
        await connect("127.0.0.1", 1, channel_handler=echo_channel)
    with pytest.raises(ValueError, match="max_channels"):
        await create_listener(
            "127.0.0.1", 0, identity=Identity.generate(), channel_handler=echo_channel
        )


async def test_channel_zero_of_a_connection_with_channels_works_as_ever() -> None:
    """Large spacks, queue and flush, half-close: channel 0 under flow control."""
    big = Spack(b"z" * (3 << 20))
    async with client_and_server() as conn:
        assert conn.channels
        with anyio.fail_after(20):
            await conn.send(big)
            assert await conn.receive() == big
            for i in range(3):
                conn.queue(Spack(i))
            await conn.flush()
            assert [await conn.receive() for _ in range(3)] == [Spack(i) for i in range(3)]
            # Five windows of small spacks each way: every spack received gives its
            # credit back, whichever way receive() took it.
            burst = [Spack(i, b"b" * 100) for i in range(200)]
            for spack in burst:
                conn.queue(spack)
            await conn.flush()
            assert [await conn.receive() for _ in burst] == burst
            await conn.send_eof()  # the server's echo ends, and its handler closes
            with pytest.raises(anyio.EndOfStream):
                await conn.receive()
            with pytest.raises(ConnectionClosed):
                await conn.send(Spack("after eof"))


async def test_channel_0_grants_credit_as_it_hands_spacks_over_without_reading_more() -> None:
    """A receiver with no reader task (no ``async with``) takes what it read at once,
    then stops reading: the credit those spacks free must reach the sender then, not at
    its next read, or a sender waiting for it waits forever."""
    window = SMALL.channel_window
    first = [Spack(i, b"a" * 90) for i in range(window // 100)]  # about one window
    flushed, done = anyio.Event(), anyio.Event()

    async def server(conn: Connection) -> None:
        for spack in first:
            conn.queue(spack)
        await conn.flush()  # one Noise message, in the client's socket once this returns
        flushed.set()
        await conn.send(Spack("needs the credit back", b"c" * 1000))
        done.set()
        await conn.receive()  # until the client closes

    # send_buffer=0: the server's send() returns once its spack is out, credit and all.
    async with serving(server, config=replace(SMALL, send_buffer=0)) as (host, port, _):
        conn = await connect(host, port, config=SMALL)
        try:
            with anyio.fail_after(10):
                await flushed.wait()
                assert [await conn.receive() for _ in first] == first  # one read
                await done.wait()
                assert await conn.receive() == Spack("needs the credit back", b"c" * 1000)
        finally:
            await conn.aclose()


async def test_without_async_with_calls_that_wait_read_the_connection() -> None:
    """No reader or writer task: send() returns once written (reading for credit)."""
    big = Spack(b"w" * 200_000)  # 50 windows of 4 KiB
    async with serving(echo, config=SMALL, channel_handler=echo_channel) as (host, port, _):
        conn = await connect(host, port, config=SMALL)
        try:
            channel = await conn.open_channel()
            with anyio.fail_after(20):
                for spack in (big, Spack("small"), big):
                    await channel.send(spack)
                    assert conn._session.queued_bytes_on(channel.id) == 0
                    assert await channel.receive() == spack
                channel.queue(Spack("queued"))
                await channel.flush()
                assert await channel.receive() == Spack("queued")
                await conn.send(big)
                assert await conn.receive() == big
        finally:
            await conn.aclose()


async def test_a_channel_shows_its_connection() -> None:
    async with client_and_server() as conn:
        channel = await conn.open_channel()
        assert channel.connection is conn
        assert channel.id == 1
        assert channel.extra(StalkAttribute.peer) == conn.peer
        assert repr(channel).startswith("<stalk.Channel 1 of <stalk.Connection")
        assert repr(channel).endswith(" open>")
        await channel.reset()
        assert repr(channel).endswith(" reset>")
        with pytest.raises(ChannelClosed, match="reset"):
            channel.queue(Spack())
        await channel.reset()  # idempotent
        await channel.aclose()


async def test_write_timeout_still_bounds_a_write_that_cannot_progress() -> None:
    """Windows far larger than the socket buffers, and a peer whose socket nobody reads:
    a channel's write blocks, and write_timeout breaks the connection."""
    wide = Config(
        max_channels=8, channel_window=1 << 30, connection_window=1 << 30, write_timeout=0.5
    )
    server_identity = Identity.generate()
    stop = anyio.Event()

    async def never_read(stream: anyio.abc.SocketStream) -> None:
        conn = await Connection.wrap(
            stream, identity=server_identity, server_side=True, config=wide
        )
        await stop.wait()  # no async with, no receive: nothing reads the socket
        await conn.aclose()

    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, never_read)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        sent = 0

        async def flood() -> None:
            nonlocal sent
            async with await connect("127.0.0.1", port, config=wide) as conn:
                channel = await conn.open_channel()
                with anyio.fail_after(20):
                    while True:
                        await channel.send(Spack(b"x" * 65_536))
                        sent += 1

        with pytest.raises(ConnectionLost, match="did not complete"):
            await flood()
        assert sent < 1000  # bounded by socket buffers plus send_buffer
        stop.set()
        tg.cancel_scope.cancel()


async def test_a_peer_breaking_the_channel_limit_ends_every_channel() -> None:
    """The client is made to ignore the server's limit of 1: the server closes the
    connection with CHANNEL_LIMIT, and every channel of the client's ends with it."""
    async with client_and_server(server=replace(SMALL, max_channels=1)) as conn:
        table = conn._session._channels
        assert table is not None
        table._theirs = ChannelParams(8, 4096, 65_516)  # a client that does not count
        first, second = await conn.open_channel(), await conn.open_channel()
        await first.send(Spack("one"))
        await second.send(Spack("two"))

        async def receive_all(stream: Channel | Connection) -> None:
            async for _ in stream:  # the first channel may get its echo first
                pass

        with anyio.fail_after(10):
            for stream in (first, second, conn):
                with pytest.raises(ClosedByPeer) as closed:
                    await receive_all(stream)
                assert closed.value.code == CloseCode.CHANNEL_LIMIT


class _CountingWriter:
    """Counts the writes of the server's side of a connection (see the test below)."""

    def __init__(self, inner: Writer, counts: list[int]) -> None:
        self._inner, self._counts = inner, counts
        self.checkpoint = inner.checkpoint

    def write_nowait(self, data: bytes | bytearray | memoryview) -> int:
        taken = self._inner.write_nowait(data)
        self._counts.append(taken)
        return taken

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self._counts.append(len(data))
        await self._inner.write(data)


async def test_replies_to_a_burst_of_requests_go_out_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Handlers that one input woke answer in a few writes, not in one write each.

    The second round's requests reach handlers already waiting in ``receive()``, so each
    reply answers a wait: alone, it would be written at once.
    """
    server_writes: list[int] = []
    listening: list[int] = []

    def counting_writer_for(transport: anyio.abc.ByteStream, timeout: float) -> Writer:
        writer = writer_for(transport, timeout)
        if transport.extra(anyio.abc.SocketAttribute.local_port, None) in listening:
            return cast("Writer", _CountingWriter(writer, server_writes))
        return writer

    monkeypatch.setattr(stalk.link, "writer_for", counting_writer_for)
    config = Config(max_channels=64)
    async with serving(drain, config=config, channel_handler=echo_channel) as (host, port, _):
        listening.append(port)
        async with await connect(host, port, config=config) as client:
            channels = [await client.open_channel() for _ in range(64)]
            writes = []
            for round_ in range(2):
                for channel in channels:
                    channel.queue(Spack(round_, channel.id))
                del server_writes[:]
                await client.flush()  # every request in one write: one input for the server
                for channel in channels:
                    assert await channel.receive() == Spack(round_, channel.id)
                writes.append(len([taken for taken in server_writes if taken]))
            assert writes[1] <= 4, writes  # not 64


# -- the waiting primitive ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chosen", "anyio"])
async def test_a_waiter_sleeps_until_woken_and_a_wake_before_is_spent(kind: str) -> None:
    """Whichever waiter the event loop gets (a bare future on asyncio), it behaves as the
    anyio Event one: a sleep ends on a wake from then on, not on one before it; a
    cancelled sleep leaves nothing behind."""
    new_waiter = waiter_factory() if kind == "chosen" else Waiter
    waiter = new_waiter()
    waiter.wake()  # nobody sleeps: spent
    with anyio.move_on_after(0.05) as scope:
        await waiter.sleep()
    assert scope.cancelled_caught  # the earlier wake did not end it; cancelling did
    waiter.wake()  # after a cancelled sleep: nothing to end, nothing kept
    woken: list[bool] = []
    async with anyio.create_task_group() as tg:

        async def sleeper() -> None:
            await waiter.sleep()
            woken.append(True)

        tg.start_soon(sleeper)
        await anyio.wait_all_tasks_blocked()
        assert not woken
        waiter.wake()
        waiter.wake()  # twice: harmless
    assert woken == [True]


@pytest.mark.parametrize("kind", ["chosen", "anyio"])
async def test_a_waiter_dozes_until_woken_or_for_its_time(kind: str) -> None:
    """A doze is a sleep that also ends once its time runs out; a cancelled one leaves
    nothing behind (no timer that ends a later doze early)."""
    new_waiter = waiter_factory() if kind == "chosen" else Waiter
    waiter = new_waiter()
    start = anyio.current_time()
    with anyio.fail_after(5):
        await waiter.doze(0.05)
    assert anyio.current_time() - start >= 0.04
    with anyio.fail_after(5):  # woken: at once, not after its ten seconds
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter.doze, 10)
            await anyio.wait_all_tasks_blocked()
            waiter.wake()
    with anyio.move_on_after(0.01) as scope:
        await waiter.doze(0.02)
    assert scope.cancelled_caught
    start = anyio.current_time()
    with anyio.fail_after(5):
        await waiter.doze(0.05)
    assert anyio.current_time() - start >= 0.04


@pytest.mark.parametrize("kind", ["chosen", "anyio"])
async def test_a_waiter_woken_after_the_turn_is_woken_only_if_still_wanted(kind: str) -> None:
    """``wake_after_turn`` asks whether to wake when the look is due and again once the
    tasks that can run now have run (``defers``: on asyncio), else at once: a task made
    runnable before the call has run by then, or not. One look at a time, ended by the
    first ``False``."""
    new_waiter = waiter_factory() if kind == "chosen" else Waiter
    waiter = new_waiter()
    woken: list[bool] = []
    ran: list[bool] = []
    go = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def sleeper() -> None:
            await waiter.sleep()
            woken.append(True)

        async def runnable() -> None:
            await go.wait()
            ran.append(True)

        tg.start_soon(sleeper)
        tg.start_soon(runnable)
        await anyio.wait_all_tasks_blocked()
        waiter.wake_after_turn(lambda: False)  # not wanted: not woken
        await anyio.sleep(0.01)
        assert not woken
        go.set()  # it can run now
        waiter.wake_after_turn(lambda: not ran)
        await anyio.sleep(0.01)
        assert ran
        assert woken == ([] if waiter.defers else [True])
        if waiter.defers:
            asked: list[bool] = []

            def wanted() -> bool:
                asked.append(True)
                return True

            waiter.wake_after_turn(wanted)
            waiter.wake_after_turn(wanted)  # one look at a time: this one adds nothing
            with anyio.fail_after(5):
                while not woken:
                    await anyio.lowlevel.checkpoint()
            assert len(asked) == 2  # asked when due and after the turn
            asked.clear()

            def unwanted() -> bool:
                asked.append(True)
                return False

            waiter.wake_after_turn(unwanted)  # not wanted when the look is due
            await anyio.sleep(0.01)
            assert len(asked) == 1  # the look ended there
    assert type(waiter).defers is (kind == "chosen" and _on_asyncio())


def _on_asyncio() -> bool:
    """Whether the test runs on asyncio (the only event loop whose waiter defers)."""
    return sniffio.current_async_library() == "asyncio"


async def test_each_event_loop_gets_a_waiter_of_its_own() -> None:
    """Not anyio's Event on asyncio or trio: a future, a parked task."""
    waiter = waiter_factory()()
    assert type(waiter) is not Waiter


async def test_a_sleep_cancelled_then_woken_leaves_the_task_alone() -> None:
    """A wake that comes after the sleep was cancelled (in the same turn) reschedules
    nothing: the task goes on with what the cancellation left it."""
    waiter = waiter_factory()()
    async with anyio.create_task_group() as tg:
        scopes: list[anyio.CancelScope] = []

        async def sleeper() -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                await waiter.sleep()
            await anyio.sleep(0.01)  # a stray reschedule would wake this sleep early, or fail

        tg.start_soon(sleeper)
        await anyio.wait_all_tasks_blocked()
        scopes[0].cancel()
        waiter.wake()
    assert scopes[0].cancelled_caught
