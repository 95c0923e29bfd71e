"""Two sessions with channels, back to back: ordering, credit, fairness, close and reset."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import Pair, connected_pair, drain, take_all
from stalk.channels import ChannelTable
from stalk.errors import LocalProtocolError
from stalk.events import (
    ChannelCloseReceived,
    ChannelMessageReceived,
    ChannelOpened,
    ChannelResetReceived,
    CloseReceived,
    Event,
)
from stalk.handshake import ChannelParams
from stalk.mux import Mux
from stalk.session import Session, SessionConfig
from stalk.spack import Spack
from stalk.wire import RecordKind

SMALL = ChannelParams(max_channels=8, channel_window=4096, connection_window=65_516)
LARGE = ChannelParams(max_channels=8, channel_window=1 << 30, connection_window=1 << 30)


def _pair(client: ChannelParams = SMALL, server: ChannelParams = SMALL) -> Pair:
    pair = connected_pair(
        client_config=SessionConfig(channels=client, max_message_size=8 << 20),
        server_config=SessionConfig(channels=server, max_message_size=8 << 20),
    )
    assert pair.client.channels
    return pair


class _Driver:
    """Moves bytes both ways; each side's application takes (releases) every spack."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.events: dict[Session, list[Event]] = {pair.client: [], pair.server: []}

    def spacks(self, session: Session) -> dict[int, list[Spack]]:
        by_channel: dict[int, list[Spack]] = defaultdict(list)
        for event in self.events[session]:
            if isinstance(event, ChannelMessageReceived):
                by_channel[event.channel].append(event.spack)
        return by_channel

    def step(self, src: Session, dst: Session, limit: int | None = None) -> bool:
        """Move at most ``limit`` bytes (whole buffers) from ``src`` to ``dst``."""
        moved = 0
        while (limit is None or moved < limit) and (data := src.data_to_send()):
            dst.receive_data(data)
            moved += len(data)
            for event in drain(dst):
                self.events[dst].append(event)
                if isinstance(event, ChannelMessageReceived):
                    self.released(dst, dst.release(event.channel, event.size))
        return bool(moved)

    def released(self, session: Session, granted: bool) -> None:
        """``session``'s application released a spack (``granted``: credit went back)."""

    def run(self) -> None:
        client, server = self.pair.client, self.pair.server
        while self.step(client, server) | self.step(server, client):
            pass


def test_spacks_on_several_channels_arrive_in_order_per_channel() -> None:
    pair = _pair()
    client, server = pair.client, pair.server
    one, three = client.open_channel(), client.open_channel()
    assert (one, three) == (1, 3)
    for n in range(5):
        for channel in (0, one, three):
            client.queue(Spack(channel, n), channel)
    client.flush()
    driver = _Driver(pair)
    driver.run()
    opened = [e for e in driver.events[server] if isinstance(e, ChannelOpened)]
    assert opened == [ChannelOpened(1), ChannelOpened(3)]
    assert driver.spacks(server) == {c: [Spack(c, n) for n in range(5)] for c in (0, 1, 3)}
    server.queue(Spack("answer"), one)  # the acceptor sends on the channel it was opened on
    server.flush()
    driver.run()
    assert driver.spacks(client) == {1: [Spack("answer")]}


def test_a_spack_many_windows_long_arrives_whole() -> None:
    """Credit of 4 KiB per channel and 64 KiB per connection, a 300 KiB spack: it goes."""
    pair = _pair()
    client = pair.client
    big = Spack(bytes(range(256)) * 1200)
    channel = client.open_channel()
    client.queue(big, channel)
    client.queue(Spack("after"), channel)
    client.queue(Spack("meanwhile"), 0)
    client.flush()
    driver = _Driver(pair)
    driver.run()
    assert driver.spacks(pair.server) == {channel: [big, Spack("after")], 0: [Spack("meanwhile")]}
    assert client.queued_bytes == 0


def test_a_small_spack_overtakes_a_large_one_on_another_channel() -> None:
    """Fairness: behind a 6 MiB spack on one channel, a small one waits about one message.

    The first output buffer (about 2 MiB) was sealed while the bulk channel was alone.
    """
    pair = _pair(LARGE, LARGE)
    client, server = pair.client, pair.server
    bulk, chat = client.open_channel(), client.open_channel()
    client.queue(Spack(b"b" * (6 << 20)), bulk)
    client.flush()
    first = client.data_to_send()  # the bulk channel alone: a large buffer
    client.queue(Spack("hello"), chat)
    client.flush()
    server.receive_data(first)
    drain(server)
    before = 0  # bytes of the buffers before the one that carries the small spack
    events: list[Event] = []
    while True:
        data = client.data_to_send()
        assert data, "the small spack never came"
        server.receive_data(data)
        events += drain(server)
        if any(isinstance(e, ChannelMessageReceived) and e.channel == chat for e in events):
            break
        before += len(data)
    assert before <= 65_535 + 2  # one Noise message of bulk went first, at most
    assert not any(isinstance(e, ChannelMessageReceived) and e.channel == bulk for e in events[:-1])


def test_a_channel_closed_both_ways_ends_on_both_sides() -> None:
    pair = _pair()
    client, server = pair.client, pair.server
    driver = _Driver(pair)
    channel = client.open_channel()
    client.queue(Spack("last"), channel)
    client.close_channel(channel)
    with pytest.raises(LocalProtocolError, match="not open for sending"):
        client.queue(Spack("late"), channel)
    driver.run()
    assert driver.events[server][-1] == ChannelCloseReceived(channel)
    server.queue(Spack("reply"), channel)
    server.close_channel(channel)
    driver.run()
    assert driver.events[client][-1] == ChannelCloseReceived(channel)
    for session in (client, server):
        assert session._channels is not None
        assert session._channels.channels == {}


def test_a_reset_drops_what_was_not_sent_and_is_answered() -> None:
    pair = _pair()
    client, server = pair.client, pair.server
    driver = _Driver(pair)
    channel = client.open_channel()
    client.queue(Spack(b"x" * 100_000), channel)  # far beyond the 4 KiB window
    client.flush()
    driver.step(client, server)
    assert client.queued_bytes > 0  # waiting for credit the server has not granted yet
    client.reset_channel(channel, 0x1000, "never mind")
    assert client.queued_bytes == 0
    driver.run()
    assert ChannelResetReceived(channel, 0x1000, "never mind") in driver.events[server]
    assert not any(isinstance(e, ChannelMessageReceived) for e in driver.events[server])
    assert client._channels is not None
    assert channel in client._channels.channels  # waiting for the answer
    server.release_channel(channel)
    driver.run()
    assert client._channels.channels == {}
    assert server._channels is not None
    assert server._channels.channels == {}


def test_a_reset_from_the_peer_drops_what_the_channel_had_not_sent() -> None:
    """The peer's RESET ends our direction too: our spack waiting for credit is dropped,
    and the channel ends once we let go, with nothing left to pack for it."""
    pair = _pair()
    client, server = pair.client, pair.server
    driver = _Driver(pair)
    channel = client.open_channel()
    client.queue(Spack(b"x" * 100_000), channel)
    client.flush()
    driver.step(client, server)
    assert client.queued_bytes_on(channel) > 0
    server.reset_channel(channel, 0x1000, "no")
    driver.step(server, client)
    assert driver.events[client] == [ChannelResetReceived(channel, 0x1000, "no")]
    assert client.queued_bytes == client.queued_bytes_on(channel) == 0
    client.release_channel(channel)
    driver.run()
    assert client.channel_state(channel) is None
    assert server.channel_state(channel) is None
    assert client.can_open_channel


def test_close_waits_for_spacks_waiting_for_credit() -> None:
    pair = _pair()
    client, server = pair.client, pair.server
    driver = _Driver(pair)
    big = Spack(b"c" * 50_000)
    client.queue(big)
    client.close()
    driver.run()
    assert driver.spacks(server) == {0: [big]}
    assert isinstance(driver.events[server][-1], CloseReceived)


def test_once_close_was_called_nothing_more_is_owed() -> None:
    """A release() after close() grants nothing, as a message received then grants nothing.

    The CLOSE waits here for credit the client never gets to grant: the release would have
    sent a WINDOW ahead of it.
    """
    pair = _pair()
    client, server = pair.client, pair.server
    spack = Spack(b"s" * 1500)  # over a quarter of the server's 4,096-byte window
    client.send(spack)
    server.receive_data(take_all(client))
    assert drain(server) == [ChannelMessageReceived(spack, 0, len(spack.encode()))]
    server.queue(Spack(b"w" * 10_000))  # more than the client grants: the CLOSE waits
    server.close()
    assert take_all(server)
    assert server.unsent
    server.release(0, len(spack.encode()))
    assert take_all(server) == b""


def test_without_channels_on_both_sides_there_are_none() -> None:
    pair = connected_pair(client_config=SessionConfig(channels=SMALL))
    with pytest.raises(LocalProtocolError, match="no channels"):
        pair.client.open_channel()
    with pytest.raises(LocalProtocolError, match="no channels"):
        pair.client.queue(Spack(), 1)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 20_000), st.booleans()),
        min_size=1,
        max_size=40,
    ),
    st.integers(1, 200_000),
)
def test_any_mix_of_channels_and_sizes_arrives_in_order(
    sends: list[tuple[int, int, bool]], step: int
) -> None:
    """Whatever is sent on whichever channel, with whatever flushes, arrives in order."""
    pair = _pair()
    driver = _Driver(pair)
    expected = _send_all(driver, sends, step)
    assert driver.spacks(pair.server) == expected
    assert pair.client.queued_bytes == 0


def _send_all(
    driver: _Driver, sends: list[tuple[int, int, bool]], step: int
) -> dict[int, list[Spack]]:
    """The client sends ``sends`` (which of channel 0 and three it opens, size, flush),
    ``step`` bytes moved after each flush, then everything; what it sent, by channel."""
    client, server = driver.pair.client, driver.pair.server
    channels = [0] + [client.open_channel() for _ in range(3)]
    sent: dict[int, list[Spack]] = defaultdict(list)
    for index, (which, size, flush) in enumerate(sends):
        spack = Spack(index, b"v" * size)
        client.queue(spack, channels[which])
        sent[channels[which]].append(spack)
        if flush:
            client.flush()
            driver.step(client, server, step)
            driver.step(server, client)
    client.flush()
    driver.run()
    return sent


def _credit_state(session: Session) -> tuple[object, ...]:
    """Every credit of ``session``'s channels, both ways, and the assembly slot."""
    table, demux = session._channels, session._ops.demux
    assert table is not None
    assert demux is not None
    credits = [("connection", table.connection), (0, table.channel0)]
    credits += [(channel.id, channel.credit) for channel in table.channels.values()]
    return demux.slot, [
        (name, credit.send, credit.receive, credit.released, credit.held)
        for name, credit in credits
    ]


#: A connection window smaller than a channel's: its grants fall between theirs.
WIDE = ChannelParams(max_channels=8, channel_window=1 << 20, connection_window=65_516)


@settings(max_examples=120, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 9_000) | st.integers(0, 300), st.booleans()),
        min_size=1,
        max_size=80,
    ),
    st.integers(1, 200_000),
    st.sampled_from([SMALL, WIDE]),
)
@example([(1, 1019, True)], 1, SMALL)  # 1024 encoded bytes: the threshold, to the byte
@example([(0, 16_374, True)], 1, WIDE)  # the connection's threshold, to the byte
def test_a_release_that_grants_nothing_takes_the_general_ways_steps_in_short(
    sends: list[tuple[int, int, bool]], step: int, params: ChannelParams
) -> None:
    """``Demux.release`` in short, when neither credit reaches its threshold, against its
    general way alone (``Demux.short``): at every release on either side the same answer
    and the same credit, and every spack arrives, through windows of 4 KiB per channel
    (and the slot), or of 1 MiB per channel and 64 KiB for the connection."""

    def replay(short: bool) -> tuple[list[tuple[bool, object]], dict[int, list[Spack]]]:
        pair = _pair(params, params)
        trace: list[tuple[bool, object]] = []
        for session in (pair.client, pair.server):
            demux = session._ops.demux
            assert demux is not None
            demux.short = short

        class Tracing(_Driver):
            def released(self, session: Session, granted: bool) -> None:
                trace.append((granted, _credit_state(session)))

        driver = Tracing(pair)
        expected = _send_all(driver, sends, step)
        assert driver.spacks(pair.server) == expected
        return trace, expected

    short = replay(short=True)
    assert short == replay(short=False)
    per_channel: dict[int, int] = defaultdict(int)
    for which, size, _ in sends:
        per_channel[which] += size
    # Grants were made (a quarter of a window), unless too little was sent.
    quarter = params.channel_window // 4
    assert any(granted for granted, _ in short[0]) or max(per_channel.values()) < quarter


def test_can_open_channel_says_whether_the_peers_limit_leaves_room() -> None:
    pair = _pair(
        server=ChannelParams(max_channels=2, channel_window=4096, connection_window=65_516)
    )
    client, server = pair.client, pair.server
    driver = _Driver(pair)
    first = client.open_channel()
    client.open_channel()
    assert not client.can_open_channel
    with pytest.raises(LocalProtocolError, match="at most 2"):
        client.open_channel()
    client.close_channel(first)
    driver.run()
    assert not client.can_open_channel  # our direction ended; the peer's has not
    server.close_channel(first)
    driver.run()
    assert client.can_open_channel
    assert client.channel_state(first) is None


def test_a_channel_not_read_holds_its_window_and_one_spack_then_resumes_exactly() -> None:
    """The assembly slot covers the one spack that ran out of credit, not the channel's
    later spacks; once the application has everything, every credit is whole again."""
    pair = _pair()
    client, server = pair.client, pair.server
    channel = client.open_channel()
    for i in range(100):
        client.queue(Spack(i, b"s" * 1000), channel)
    client.flush()
    held: list[ChannelMessageReceived] = []

    def move() -> bool:
        moved = False
        while data := client.data_to_send():
            server.receive_data(data)
            held.extend(e for e in drain(server) if isinstance(e, ChannelMessageReceived))
            moved = True
        while data := server.data_to_send():
            client.receive_data(data)
            drain(client)
            moved = True
        return moved

    while move():
        pass
    assert sum(event.size for event in held) <= SMALL.channel_window + 1005
    delivered = 0
    while delivered < 100:
        assert held, "stalled with nothing held"
        event = held.pop(0)
        assert event.spack[0] == delivered
        delivered += 1
        server.release(event.channel, event.size)
        while move():
            pass
    assert client.queued_bytes == 0
    table = server._channels
    assert table is not None
    for credit, window in (
        (table.channels[channel].credit, SMALL.channel_window),
        (table.connection, SMALL.connection_window),
    ):
        assert credit.receive + credit.released == window


def test_a_channel_reset_before_anything_of_it_went_out_is_opened_then_reset() -> None:
    """A RESET alone would name a channel the peer never saw (its error): the channel's
    CLOSE goes first and opens it, and both sides end it as any reset channel."""
    pair = _pair()
    client, server = pair.client, pair.server
    driver = _Driver(pair)
    channel = client.open_channel()
    client.queue(Spack("never sent"), channel)
    client.reset_channel(channel, 0x1000, "changed my mind")
    assert client.queued_bytes == 0
    driver.run()
    assert driver.events[server] == [
        ChannelOpened(channel),
        ChannelCloseReceived(channel),
        ChannelResetReceived(channel, 0x1000, "changed my mind"),
    ]
    server.release_channel(channel)
    driver.run()
    assert client.channel_state(channel) is None
    assert server.channel_state(channel) is None
    # A channel opened on the wire by a later one of ours takes the plain RESET.
    second, third = client.open_channel(), client.open_channel()
    client.queue(Spack("opens both"), third)
    client.flush()
    driver.run()
    client.reset_channel(second, 0x1001, "")
    driver.run()
    assert driver.events[server][-1] == ChannelResetReceived(second, 0x1001, "")
    assert ChannelCloseReceived(second) not in driver.events[server]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 300), st.booleans()),
        min_size=1,
        max_size=80,
    ),
    st.integers(1, 700),
    st.integers(8, 2_000),
)
@example([(0, 128, False)] * 7 + [(0, 129, False)], 1, 2_000)  # the credit, to the byte
@example([(1, 30, False)] * 3, 1, 98)  # the plaintext's room, to the byte
def test_runs_of_small_spacks_pack_as_the_general_loop_packs_them(
    sends: list[tuple[int, int, bool]], grant: int, capacity: int
) -> None:
    """The mux packs a run of one-piece spacks in short (``Mux._run``): the same queue
    through the general loop alone gives the same plaintexts, credit and bookkeeping.
    Channel 129 has a two-byte id."""
    params = ChannelParams(max_channels=80, channel_window=1024, connection_window=65_516)

    def replay(runs: bool) -> tuple[list[bytes], int, int]:
        table = ChannelTable(initiator=True, ours=params, theirs=params)
        mux = Mux(table, capacity)
        mux.runs = runs
        opened = [table.open().id for _ in range(65)]
        channels = [0, opened[0], opened[1], opened[-1]]
        assert channels[-1] == 129
        plaintexts: list[bytes] = []
        for index, (which, size, flush) in enumerate(sends):
            mux.queue(channels[which], [bytes([index % 256]) * size])
            if flush:
                mux.flush()
                while (plaintext := mux.next_plaintext()) is not None:
                    plaintexts.append(bytes(plaintext))
                table.connection.granted(grant, "the connection")
                for channel in channels:
                    table.credit(channel).granted(grant, f"channel {channel}")
        mux.flush()
        while (plaintext := mux.next_plaintext()) is not None:
            plaintexts.append(bytes(plaintext))
        return plaintexts, mux.queued_bytes, table.connection.send

    assert replay(runs=True) == replay(runs=False)


def test_the_assembly_slot_grants_a_large_spack_back_in_quarter_windows() -> None:
    """A spack past the window goes through the assembly slot; its pieces are granted back
    a quarter window at a time (one grant per four 64 KiB pieces of a 1 MiB window), not
    one grant per piece."""
    window = ChannelParams(max_channels=8, channel_window=1 << 20, connection_window=16 << 20)
    pair = _pair(client=window, server=window)
    client, server = pair.client, pair.server
    channel = client.open_channel()
    spack = Spack(b"x" * (4 << 20))
    client.queue(spack, channel)
    client.flush()
    grants = 0
    received: list[Event] = []
    while data := client.data_to_send():
        for start in range(0, len(data), 16_384):  # the server takes each piece as it lands
            server.receive_data(data[start : start + 16_384])
            for event in drain(server):
                received.append(event)
                if isinstance(event, ChannelMessageReceived):
                    server.release(event.channel, event.size)
            while answer := server.data_to_send():
                grants += 1
                client.receive_data(answer)
                drain(client)
    assert [e.spack for e in received if isinstance(e, ChannelMessageReceived)] == [spack]
    # 3 MiB past the window, in 48 pieces: granted in about 12 steps of 256 KiB.
    assert 10 <= grants <= 16, grants


def test_the_slot_keeps_a_spack_moving_when_other_channels_hold_the_connection_credit() -> None:
    """A channel nobody reads holds most of the connection's credit; a large spack on
    another channel then takes the slot with a small first grant, and its steps stay no
    larger than what the peer can send: it arrives whole, and every credit comes back."""
    window = ChannelParams(max_channels=8, channel_window=60_000, connection_window=65_516)
    pair = _pair(client=window, server=window)
    client, server = pair.client, pair.server
    unread, large = client.open_channel(), client.open_channel()
    for i in range(6):
        client.queue(Spack(i, b"u" * 9_990), unread)
    big = Spack(b"L" * 100_000)
    client.queue(big, large)
    client.flush()
    held: list[ChannelMessageReceived] = []
    moving = True
    while moving:
        moving = False
        while data := client.data_to_send():
            moving = True
            server.receive_data(data)
            for event in drain(server):
                if isinstance(event, ChannelMessageReceived):
                    if event.channel == large:
                        server.release(event.channel, event.size)
                    held.append(event)
        while data := server.data_to_send():
            moving = True
            client.receive_data(data)
            drain(client)
    assert [e.spack for e in held if e.channel == large] == [big]
    assert len([e for e in held if e.channel == unread]) == 6
    for event in held:
        if event.channel == unread:
            server.release(event.channel, event.size)
    while data := server.data_to_send():
        client.receive_data(data)
        drain(client)
    table = server._channels
    assert table is not None
    assert table.connection.receive + table.connection.released == window.connection_window


@pytest.mark.parametrize("runs", [True, False])
def test_an_empty_encoding_that_does_not_fit_waits_for_the_next_plaintext(runs: bool) -> None:
    """An empty item has no piece to cut: where its MESSAGE does not fit, the plaintext
    ends and the next one carries it (the mux once packed empty FRAGMENTs without end)."""
    params = ChannelParams(max_channels=8, channel_window=1024, connection_window=65_516)
    for capacity in range(8, 40):
        mux = Mux(ChannelTable(initiator=True, ours=params, theirs=params), capacity)
        mux.runs = runs
        for size in (5, 0, 0, 3, 0):
            mux.queue(0, [b"x" * size])
        mux.flush()
        plaintexts = []
        while (plaintext := mux.next_plaintext()) is not None:
            assert len(plaintext) <= capacity
            plaintexts.append(bytes(plaintext))
            assert len(plaintexts) < 100
        assert not mux.unsent()
        assert b"".join(plaintexts).count(bytes((RecordKind.MESSAGE, 0, 0))) == 3


def test_the_backlog_is_what_the_next_plaintexts_can_carry_within_credit() -> None:
    """``Mux.backlog`` (which sizes the sealer's output): one channel's data within its
    credit and the connection's; several channels' within the connection's; and the
    plaintexts then built carry no more than it said."""
    params = ChannelParams(max_channels=8, channel_window=100_000, connection_window=150_000)
    table = ChannelTable(initiator=True, ours=params, theirs=params)
    mux = Mux(table)
    assert mux.backlog() == 0
    channel = table.open().id
    mux.queue(channel, [b"x" * 300_000])
    mux.flush()
    assert mux.backlog() == 100_000  # the channel's credit
    mux.queue(0, [b"y" * 80_000])
    mux.flush()
    assert mux.backlog() == 150_000  # two channels: the connection's credit
    carried = 0
    while (plaintext := mux.next_plaintext()) is not None:
        carried += len(plaintext)
    assert 150_000 <= carried < 150_000 + 100  # the data, and a few record headers
    assert mux.backlog() == 0  # out of credit
