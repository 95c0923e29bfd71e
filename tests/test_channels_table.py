"""The channel table (stalk.channels): every state transition, ids, limits and credit."""

from __future__ import annotations

import itertools

import pytest

from stalk.channels import (
    CHANNEL_TABLE,
    ChannelInput,
    ChannelState,
    ChannelTable,
    Credit,
)
from stalk.errors import ChannelLimitExceeded, FlowControlError, LocalProtocolError, ProtocolError
from stalk.handshake import ChannelParams
from stalk.wire import MAX_WINDOW

OURS = ChannelParams(max_channels=2, channel_window=4096, connection_window=65_516)
THEIRS = ChannelParams(max_channels=3, channel_window=8192, connection_window=1 << 20)
PEER_INPUTS = {ChannelInput.DATA_RECEIVED, ChannelInput.CLOSE_RECEIVED, ChannelInput.RESET_RECEIVED}


def _table(*, initiator: bool = True) -> ChannelTable:
    return ChannelTable(initiator=initiator, ours=OURS, theirs=THEIRS)


def _reach(table: ChannelTable, state: ChannelState) -> int:
    """Open a channel of ours and walk it to ``state``; its id."""
    channel = table.open()
    path = {
        ChannelState.OPEN: [],
        ChannelState.SEND_CLOSED: [ChannelInput.CLOSE_SENT],
        ChannelState.RECEIVE_CLOSED: [ChannelInput.CLOSE_RECEIVED],
        ChannelState.RESET_SENT: [ChannelInput.RESET_SENT],
        ChannelState.CLOSED_RESET_SENT: [ChannelInput.CLOSE_SENT, ChannelInput.RESET_SENT],
        ChannelState.RESET_RECEIVED: [ChannelInput.RESET_RECEIVED],
    }[state]
    for what in path:
        table.process(channel, what)
    assert channel.state is state
    return channel.id


@pytest.mark.parametrize(
    ("state", "what"),
    [
        (state, what)
        for state, what in itertools.product(ChannelState, ChannelInput)
        if state is not ChannelState.ENDED
    ],
)
def test_every_state_and_input(state: ChannelState, what: ChannelInput) -> None:
    """Each pair does what the table says; a missing pair raises the right error."""
    table = _table()
    channel = table.channels[_reach(table, state)]
    expected = CHANNEL_TABLE.get((state, what))
    if expected is None:
        error = ProtocolError if what in PEER_INPUTS else LocalProtocolError
        with pytest.raises(error, match=str(state)):
            table.process(channel, what)
        assert channel.state is state
        return
    assert table.process(channel, what) is expected
    if expected is ChannelState.ENDED:
        assert channel.id not in table.channels
        assert table.opened_by_us == 0
    else:
        assert table.channels[channel.id] is channel


def test_a_channel_ends_by_a_close_each_way_or_a_reset_each_way() -> None:
    endings = [
        [ChannelInput.CLOSE_SENT, ChannelInput.CLOSE_RECEIVED],
        [ChannelInput.CLOSE_RECEIVED, ChannelInput.CLOSE_SENT],
        [ChannelInput.RESET_SENT, ChannelInput.RESET_RECEIVED],
        [ChannelInput.RESET_RECEIVED, ChannelInput.RELEASED],
        [ChannelInput.CLOSE_SENT, ChannelInput.RESET_SENT, ChannelInput.RESET_RECEIVED],
        # Our CLOSE, then our RESET: the peer's CLOSE ends it (it ignores our RESET).
        [ChannelInput.CLOSE_SENT, ChannelInput.RESET_SENT, ChannelInput.CLOSE_RECEIVED],
    ]
    for inputs in endings:
        table = _table()
        channel = table.open()
        for what in inputs:
            table.process(channel, what)
        assert channel.state is ChannelState.ENDED, inputs


@pytest.mark.parametrize("initiator", [True, False])
def test_ids_by_parity_and_in_order(initiator: bool) -> None:
    table = _table(initiator=initiator)
    first = 1 if initiator else 2
    assert [table.open().id, table.open().id, table.open().id] == [first, first + 2, first + 4]
    with pytest.raises(LocalProtocolError, match="at most 3"):
        table.open()  # the peer's limit
    peer_first = 2 if initiator else 1
    channel, opened = table.for_peer_record(peer_first + 2)
    assert opened == [peer_first, peer_first + 2]  # the lower id opens with it
    assert table.for_peer_record(peer_first + 2) == (channel, [])
    assert table.for_peer_record(peer_first)[1] == []
    with pytest.raises(ProtocolError, match="never opened"):
        table.for_peer_record(first + 6)  # ours, not opened yet
    with pytest.raises(ChannelLimitExceeded):
        table.for_peer_record(peer_first + 4)  # a third: over our limit of 2


def test_the_peer_is_held_to_our_limit_until_a_channel_ends() -> None:
    table = _table(initiator=True)
    one, _ = table.for_peer_record(2)
    table.for_peer_record(4)
    with pytest.raises(ChannelLimitExceeded, match="limit of 2"):
        table.for_peer_record(6)
    table.process(one, ChannelInput.RESET_RECEIVED)
    with pytest.raises(ChannelLimitExceeded):
        table.for_peer_record(6)  # a reset channel keeps its slot until released
    table.process(one, ChannelInput.RELEASED)
    assert table.for_peer_record(6)[1] == [6]
    with pytest.raises(ProtocolError, match="ended"):
        table.for_peer_record(2)


def test_credit_both_ways() -> None:
    credit = Credit(send=100, receive=1000)
    credit.spend(60)
    with pytest.raises(LocalProtocolError):
        credit.spend(41)
    credit.granted(10, "channel 1")
    assert credit.send == 50
    with pytest.raises(FlowControlError, match="past"):
        credit.granted(MAX_WINDOW, "channel 1")
    credit.received(1000, "channel 1")
    with pytest.raises(FlowControlError, match="exceed"):
        credit.received(1, "channel 1")
    assert credit.release(200) == 0  # less than a quarter of the window
    assert credit.release(50) == 250
    assert credit.receive == 250
    credit.received(250, "channel 1")


def test_windows_come_from_the_offers() -> None:
    table = _table()
    channel = table.open()
    assert (channel.credit.send, channel.credit.receive) == (8192, 4096)
    assert (table.channel0.send, table.channel0.receive) == (8192, 4096)
    assert (table.connection.send, table.connection.receive) == (1 << 20, 65_516)
    assert table.credit(0) is table.channel0
    assert table.credit(channel.id) is channel.credit
