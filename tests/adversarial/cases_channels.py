"""Channels (SPEC 24): a hostile client that negotiated channels with the listener.

Every row runs a real handshake offering channels (:data:`OURS`) with the listener that
offers them (``CHANNELS_CONFIG``: 32 channels, windows of 4096 bytes per channel and
65,516 for the connection), sends two legitimate spacks on channel 0 and one that opens
channel 1 (:data:`OPENER`), waits until the listener's application has all three, then
attacks. The attack is built from SPEC knowledge and from what the listener offered in
its handshake payload (:class:`~adversarial.peers.Offer`): the hostile client counts
the credit it was granted as any sender must. Where the attack is one Noise message, a
valid spack (:data:`~adversarial.peers.POISON`) rides in front of the bad record: nothing
of a rejected message may be delivered on any channel.

A protocol error ends the connection with its SPEC close code, which the hostile client
reads. With channels the error itself is raised by the task that read it, the others get
``ConnectionLost`` saying the connection broke (``Connection.receive``): which task of
the listener's was reading is a race, so the rows accept either class and the close
code pins the error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from stalk.errors import (
    ChannelLimitExceeded,
    ConnectionLost,
    FlowControlError,
    ProtocolError,
    StalkError,
)
from stalk.records import encode_uvarint
from stalk.spack import Spack
from stalk.wire import MAX_WINDOW, CloseCode, RecordKind

from .attacks import CLEAN, LEGIT, PIECE, Flood, opened_and_reset, rapid_reset, row
from .harness import Attack, Case, Expect, Target, eventually, finish
from .peers import (
    POISON,
    ChannelPeer,
    Offer,
    channel_close,
    channel_handshake,
    close,
    connection_window,
    msg_on,
    on,
    reset,
    window,
)

M, F, C, PING = RecordKind.MESSAGE, RecordKind.FRAGMENT, RecordKind.CLOSE, RecordKind.PING

#: What the hostile client offers: the listener may open 8 channels towards it, and it
#: grants 64 KiB per channel and 1 MiB for the connection (credit the listener never uses
#: here: its application only records what it receives).
OURS = Offer(max_channels=8, channel_window=65_536, connection_window=1 << 20)
#: The legitimate spack that opens channel 1 before every attack.
OPENER = Spack("legit", "opens channel 1")
#: A legitimate spack on channel 1 after the attack (rows the listener survives).
AFTER = Spack("legit", "after the attack")


def big_prefix(size: int) -> bytes:
    """``size`` bytes of the start of a valid spack larger than them (a FRAGMENT's body)."""
    return Spack(bytes(size + 64)).encode()[:size]


Play = Callable[[ChannelPeer], Awaitable[bytes]]


async def on_channels(target: Target, play: Play, *, after: tuple[int, ...] = ()) -> Attack:
    """Handshake offering channels, the legitimate spacks, then ``play``'s bytes.

    :param after: the attack is one the listener survives: on these channels (0, and 1
        if it is still open) a legitimate :data:`AFTER` follows it, and once the
        listener's application has them the connection is closed (CLOSE, NORMAL).
    """
    wire = await target.wire()
    peer = await channel_handshake(wire, OURS)
    for spack in LEGIT:
        await wire.send(peer.seal(peer.spack(0, spack)))
    await wire.send(peer.seal(peer.spack(1, OPENER)))
    legit, legit_on = list(LEGIT), {1: [OPENER]}
    port = wire.local_port
    served = target.env.registry.served

    def delivered() -> bool:
        record = served.get(port)
        return (
            record is not None
            and record.received == legit
            and record.channels.get(1) == legit_on[1]
        )

    await eventually(delivered, "the legitimate spacks delivered")
    if data := await play(peer):
        await wire.send(data)
    if after:
        for channel in after:
            await wire.send(peer.seal(peer.spack(channel, AFTER)))
            (legit_on[channel] if channel else legit).append(AFTER)
        await eventually(delivered, "the spacks after the attack delivered")
        await wire.send(peer.seal(close()))
    return await finish(wire, peer.transport, legit=legit, legit_on=legit_on)


def one_message(*bad: bytes | Callable[[ChannelPeer], bytes]) -> Play:
    """A play of one Noise message: :data:`POISON` on channel 0, then ``bad`` records."""

    async def play(peer: ChannelPeer) -> bytes:
        records = [peer.spack(0, POISON)]
        records += [part(peer) if callable(part) else part for part in bad]
        return peer.seal(*records)

    return play


def broken_channels(error: type[StalkError], code: int = CloseCode.PROTOCOL_ERROR) -> Expect:
    """The connection ends with ``code``; the listener's tasks raise ``error`` (the one
    that read it) or ``ConnectionLost``."""
    return Expect((error, ConnectionLost), True, code=code)


# -- credit -------------------------------------------------------------------------------


def _window_past_max(channel: int) -> Callable[[ChannelPeer], bytes]:
    """A WINDOW taking the listener's credit on ``channel`` to 2^31 (it sent nothing)."""
    return lambda peer: window(channel, MAX_WINDOW - OURS.channel_window + 1)


async def _windows_summing_past_max(peer: ChannelPeer) -> bytes:
    to_max = MAX_WINDOW - OURS.channel_window
    return peer.seal(peer.spack(0, POISON), window(1, to_max), window(1, 1))


def _beyond_channel_credit(channel: int) -> Callable[[ChannelPeer], bytes]:
    """A FRAGMENT one byte beyond what ``channel`` may still send us (a fresh one too)."""
    return lambda peer: peer.data(F, channel, big_prefix(peer.credit(channel) + 1))


async def _beyond_connection_credit(peer: ChannelPeer) -> bytes:
    """Fragments on fresh channels, each within its window, until the connection's
    credit is one byte short: one message of them, then one that passes it."""
    size = peer.theirs.channel_window - 1  # below the window: no channel takes the slot
    first: list[bytes] = []
    channel = 3
    while peer.connection_credit > size:
        first.append(peer.data(F, channel, big_prefix(size)))
        channel += 2
    poison = peer.spack(0, POISON)
    last = peer.data(F, channel, big_prefix(peer.connection_credit + 1))
    return peer.seal(*first) + peer.seal(poison, last)


# -- channels the peer could not be on ----------------------------------------------------------


async def _ended(peer: ChannelPeer) -> None:
    """Close channel 1 and wait for the listener's CLOSE of it: the channel ends."""
    await peer.wire.send(peer.seal(channel_close(1)))
    await peer.until(lambda record: record.kind is C and record.channel == 1)


async def _data_on_ended_channel(peer: ChannelPeer) -> bytes:
    await _ended(peer)
    return await one_message(msg_on(1, Spack("late")))(peer)


async def _window_and_reset_on_ended_channel(peer: ChannelPeer) -> bytes:
    """SPEC 24: a WINDOW or RESET on a channel that ended is ignored (it crossed the end)."""
    await _ended(peer)
    return peer.seal(window(1, 1000), reset(1, 0x1000, b"crossed"))


# -- opening too many, and the rapid open/reset flood ------------------------------------------


def _open_past_limit(peer: ChannelPeer) -> bytes:
    """A MESSAGE on the id that opens the listener's limit of channels, plus channel 1."""
    return msg_on(2 * peer.theirs.max_channels + 1, Spack("too many"))


def _one_by_one_past_limit(peer: ChannelPeer) -> bytes:
    limit = peer.theirs.max_channels
    return b"".join(msg_on(2 * n + 1, Spack("one of many", n)) for n in range(1, limit + 1))


def _reset_flood_past_limit(peer: ChannelPeer) -> bytes:
    """Channels opened and reset in one flight, past the limit: a reset channel keeps its
    place until the listener's application let go of it."""
    limit = peer.theirs.max_channels
    return b"".join(opened_and_reset(peer, 2 * n + 1) for n in range(1, limit + 1))


#: Channels the flood opens and resets, about 20 times the listener's limit.
FLOOD = 600


async def _rapid_reset_within_limit(peer: ChannelPeer) -> bytes:
    flood = Flood(FLOOD)
    await rapid_reset(peer, flood)
    assert flood.most == peer.theirs.max_channels - 1, flood  # the limit, and no more
    return b""


def _ch(
    case_id: str, sends: str, expect: Expect, play: Play, *, after: tuple[int, ...] = ()
) -> Case:
    """A row against the listener with channels (see :func:`on_channels`)."""
    return row(
        "channels",
        "client",
        case_id,
        sends,
        expect,
        partial(on_channels, play=play, after=after),
        channels=True,
    )


FLOW = broken_channels(FlowControlError, CloseCode.FLOW_CONTROL_ERROR)
PROTOCOL = broken_channels(ProtocolError)
LIMIT = broken_channels(ChannelLimitExceeded, CloseCode.CHANNEL_LIMIT)

CASES: list[Case] = [
    # Credit overflow: a grant that takes a credit past 2^31 - 1 (SPEC 24, Flow control).
    _ch(
        "window_past_max",
        "a WINDOW on channel 1 taking the listener's credit there to 2^31",
        FLOW,
        one_message(_window_past_max(1)),
    ),
    _ch(
        "windows_summing_past_max",
        "two WINDOWs on channel 1: the first takes its credit to exactly 2^31 - 1 "
        "(allowed), the second one further",
        FLOW,
        _windows_summing_past_max,
    ),
    _ch(
        "channel0_window_past_max",
        "a WINDOW on channel 0 taking the listener's credit there to 2^31",
        FLOW,
        one_message(_window_past_max(0)),
    ),
    _ch(
        "connection_window_past_max",
        "a CONNECTION_WINDOW taking the listener's connection credit to 2^31",
        FLOW,
        one_message(connection_window(MAX_WINDOW - OURS.connection_window + 1)),
    ),
    _ch(
        "window_increment_zero",
        "a WINDOW of 0 on channel 1 (increments are 1..2^31 - 1: malformed)",
        PROTOCOL,
        one_message(on(RecordKind.WINDOW, 1, b"\x00")),
    ),
    _ch(
        "window_increment_2_31",
        "a WINDOW of 2^31 on channel 1 (malformed)",
        PROTOCOL,
        one_message(on(RecordKind.WINDOW, 1, encode_uvarint(MAX_WINDOW + 1))),
    ),
    # Data beyond credit.
    _ch(
        "data_beyond_channel_window",
        "a FRAGMENT opening channel 3 one byte longer than the window the listener grants",
        FLOW,
        one_message(_beyond_channel_credit(3)),
    ),
    _ch(
        "data_beyond_channel_credit",
        "a FRAGMENT on channel 1 one byte beyond the credit it has left",
        FLOW,
        one_message(_beyond_channel_credit(1)),
    ),
    _ch(
        "data_beyond_channel0_credit",
        "a FRAGMENT on channel 0 one byte beyond its credit (channel 0 is under flow control too)",
        FLOW,
        one_message(_beyond_channel_credit(0)),
    ),
    _ch(
        "data_beyond_connection_credit",
        "FRAGMENTs on fresh channels, each within its window, up to the connection's "
        "credit (one message), then one byte beyond it",
        FLOW,
        _beyond_connection_credit,
    ),
    _ch(
        "beyond_credit_on_closed_channel",
        "CLOSE of channel 1, then data on it beyond its credit but within the "
        "connection's: the state is checked before the channel's credit (SPEC's order)",
        PROTOCOL,
        one_message(channel_close(1), _beyond_channel_credit(1)),
    ),
    # Records on a channel that is closed, ended or was never opened.
    _ch(
        "data_after_own_close",
        "CLOSE of channel 1, then a spack on it",
        PROTOCOL,
        one_message(channel_close(1), msg_on(1, Spack("late"))),
    ),
    _ch(
        "data_on_ended_channel",
        "CLOSE of channel 1, the listener's CLOSE of it read (it ended), then a spack on it",
        PROTOCOL,
        _data_on_ended_channel,
    ),
    _ch(
        "data_after_own_reset",
        "RESET of channel 1, then a spack on it",
        PROTOCOL,
        one_message(reset(1), msg_on(1, Spack("late"))),
    ),
    _ch(
        "close_after_own_reset",
        "RESET of channel 1, then its CLOSE",
        PROTOCOL,
        one_message(reset(1), channel_close(1)),
    ),
    _ch(
        "reset_twice",
        "RESET of channel 1 twice",
        PROTOCOL,
        one_message(reset(1), reset(1)),
    ),
    _ch(
        "data_on_listeners_channel_never_opened",
        "a spack on channel 2: the listener's parity, never opened by it",
        PROTOCOL,
        one_message(msg_on(2, Spack("not yours"))),
    ),
    _ch(
        "close_on_listeners_channel_never_opened",
        "CLOSE of channel 2 (the listener's parity, never opened)",
        PROTOCOL,
        one_message(channel_close(2)),
    ),
    _ch(
        "reset_on_listeners_channel_never_opened",
        "RESET of channel 2 (the listener's parity, never opened)",
        PROTOCOL,
        one_message(reset(2)),
    ),
    _ch(
        "window_on_listeners_channel_never_opened",
        "a WINDOW on channel 2 (the listener's parity, never opened)",
        PROTOCOL,
        one_message(window(2, 1000)),
    ),
    _ch(
        "reset_opening_a_channel",
        "RESET of channel 3: ours, never opened (a RESET cannot open a channel)",
        PROTOCOL,
        one_message(reset(3)),
    ),
    _ch(
        "window_opening_a_channel",
        "a WINDOW on channel 3: ours, never opened (a WINDOW cannot open a channel)",
        PROTOCOL,
        one_message(window(3, 1000)),
    ),
    _ch(
        "reset_on_channel_0",
        "RESET of channel 0 (the connection's own stream is never reset)",
        PROTOCOL,
        one_message(on(RecordKind.RESET, 0, b"\x00\x00")),
    ),
    _ch(
        "connection_window_on_channel_1",
        "a CONNECTION_WINDOW on channel 1 (it is channel 0's)",
        PROTOCOL,
        one_message(on(RecordKind.CONNECTION_WINDOW, 1, encode_uvarint(1000))),
    ),
    _ch(
        "ping_on_channel_1",
        "a PING on channel 1 (channel 0's only)",
        PROTOCOL,
        one_message(on(PING, 1)),
    ),
    _ch(
        "channel_close_with_code",
        "CLOSE of channel 1 with code 5 (a channel's CLOSE is exactly 00 00)",
        PROTOCOL,
        one_message(channel_close(1, b"\x00\x05")),
    ),
    _ch(
        "channel_close_inside_spack",
        "a FRAGMENT on channel 1, then its CLOSE",
        PROTOCOL,
        one_message(on(F, 1, PIECE), channel_close(1)),
    ),
    _ch(
        "reset_reason_too_long",
        "RESET of channel 1 with a reason of 1025 bytes",
        PROTOCOL,
        one_message(reset(1, 0x1000, b"r" * 1025)),
    ),
    _ch(
        "window_and_reset_on_ended_channel",
        "CLOSE of channel 1, the listener's CLOSE of it read, then a WINDOW and a RESET on "
        "it (ignored: they crossed its end), a spack on channel 0, CLOSE",
        CLEAN,
        _window_and_reset_on_ended_channel,
        after=(0,),
    ),
    # Too many channels, and the rapid open/reset flood (CVE-2023-44487).
    _ch(
        "channels_past_limit_at_once",
        "a spack on the id that opens, with the lower ids, one more channel than the "
        "listener's limit",
        LIMIT,
        one_message(_open_past_limit),
    ),
    _ch(
        "channels_past_limit_one_by_one",
        "a spack on each new channel up to one past the listener's limit, in one message",
        LIMIT,
        one_message(_one_by_one_past_limit),
    ),
    _ch(
        "rapid_reset_past_limit",
        "channels opened (a first piece of a spack) and reset at once, one past the "
        "listener's limit in one flight: a reset channel keeps its place until the "
        "listener's application let go of it",
        LIMIT,
        one_message(_reset_flood_past_limit),
    ),
    _ch(
        "rapid_reset_flood",
        f"{FLOOD} channels opened and reset as fast as the listener answers their RESETs "
        "(never more in flight than its limit), then a spack on channel 0 and on channel "
        "1, CLOSE: the listener served them all",
        CLEAN,
        _rapid_reset_within_limit,
        after=(0, 1),
    ),
]
