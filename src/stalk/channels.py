"""The channels of one connection: ids, each channel's state, the channel limit and credit.

Theory of operation
-------------------
A connection that negotiated channels (SPEC "Channels") carries, beside channel 0 (the
connection's own stream), channels that either party opens by sending a first record on
a new id of its parity: odd for the initiator, even for the responder. A
:class:`ChannelTable` is the sans-IO bookkeeping for them, owned by the session:

- **States.** Each channel other than 0 is in one :class:`ChannelState` and changes only
  through :data:`CHANNEL_TABLE`, ``(state, input) -> state``, as the connection's
  directions do in :mod:`stalk.states`. A channel ends (is removed) when both directions
  saw a CLOSE, or a RESET went each way (or, after our CLOSE then our RESET, the peer's
  CLOSE came). A RESET received is answered, but only once the
  application let go of the channel (``Session.release_channel``): until then the channel
  keeps its slot, so a peer that opens and resets channels in a loop has at most the
  advertised number in hand at once, whatever the application does with them.
- **Ids and the limit.** A record on an id of the peer's parity above the highest it
  opened opens that channel and every lower one of the peer's not open yet (as QUIC
  streams open), within the number we advertised (else
  :class:`~stalk.errors.ChannelLimitExceeded`, code CHANNEL_LIMIT).
  :meth:`ChannelTable.open` opens ours, within the number the peer advertised.
- **Credit** counts data bytes (MESSAGE and FRAGMENT bodies), per channel and for the
  connection. Sending spends what the peer granted; receiving checks what we granted
  (beyond it: :class:`~stalk.errors.FlowControlError`) and grants it back as the
  application releases what it received, a quarter of a window at a time.

The table raises; the session turns a peer's error into a CLOSE and the application's
into an exception, as for the connection's own states.
"""

from __future__ import annotations

import enum
from typing import Final

from stalk.errors import (
    ChannelLimitExceeded,
    FlowControlError,
    LocalProtocolError,
    ProtocolError,
)
from stalk.handshake import ChannelParams
from stalk.wire import MAX_CHANNEL_ID, MAX_WINDOW

__all__ = [
    "CHANNEL_TABLE",
    "Channel",
    "ChannelInput",
    "ChannelState",
    "ChannelTable",
    "Credit",
]


class ChannelState(enum.IntEnum):
    """Where a channel (other than 0) is in its life."""

    OPEN = 1  # both directions open
    SEND_CLOSED = 2  # we sent CLOSE; the peer may still send
    RECEIVE_CLOSED = 3  # the peer sent CLOSE; we may still send
    RESET_SENT = 4  # we sent RESET; the peer's records until its answering RESET are dropped
    CLOSED_RESET_SENT = 5  # we sent CLOSE, then RESET: the peer's CLOSE ends it too
    RESET_RECEIVED = 6  # the peer sent RESET; our answer goes once the application lets go
    ENDED = 7  # nothing more either way: the channel is removed

    def __str__(self) -> str:
        return self.name.lower().replace("_", " ")

    @property
    def reset_by_us(self) -> bool:
        """We sent the channel's RESET: what the peer sends on it now is dropped."""
        return self in _RESET_BY_US


class ChannelInput(enum.IntEnum):
    """What moves a channel: our sending, the peer's records, the application letting go."""

    DATA_SENT = 1
    CLOSE_SENT = 2
    RESET_SENT = 3
    DATA_RECEIVED = 4  # MESSAGE, FRAGMENT
    CLOSE_RECEIVED = 5
    RESET_RECEIVED = 6
    RELEASED = 7  # the application let go of a reset channel: our answering RESET goes

    def __str__(self) -> str:
        return (
            self.name.lower().replace("_", " ").replace("reset", "RESET").replace("close", "CLOSE")
        )


_O, _SC, _RC = ChannelState.OPEN, ChannelState.SEND_CLOSED, ChannelState.RECEIVE_CLOSED
_RS, _CRS = ChannelState.RESET_SENT, ChannelState.CLOSED_RESET_SENT
_RR, _END = ChannelState.RESET_RECEIVED, ChannelState.ENDED
_RESET_BY_US: Final = frozenset({_RS, _CRS})
_I = ChannelInput

#: Every allowed ``(state, input) -> state``; a pair missing is not allowed. WINDOW records
#: are not inputs: credit may arrive for a channel in any state it still exists in.
CHANNEL_TABLE: Final[dict[tuple[ChannelState, ChannelInput], ChannelState]] = {
    (_O, _I.DATA_SENT): _O,
    (_O, _I.DATA_RECEIVED): _O,
    (_O, _I.CLOSE_SENT): _SC,
    (_O, _I.CLOSE_RECEIVED): _RC,
    (_O, _I.RESET_SENT): _RS,
    (_O, _I.RESET_RECEIVED): _RR,
    (_SC, _I.DATA_RECEIVED): _SC,
    (_SC, _I.CLOSE_RECEIVED): _END,
    (_SC, _I.RESET_SENT): _CRS,
    (_SC, _I.RESET_RECEIVED): _RR,
    (_RC, _I.DATA_SENT): _RC,
    (_RC, _I.CLOSE_SENT): _END,
    (_RC, _I.RESET_SENT): _RS,
    (_RC, _I.RESET_RECEIVED): _RR,
    # After our RESET the peer's records were sent before it saw it: dropped.
    (_RS, _I.DATA_RECEIVED): _RS,
    (_RS, _I.CLOSE_RECEIVED): _RS,
    (_RS, _I.RESET_RECEIVED): _END,
    # Our CLOSE went before our RESET: the peer's CLOSE means the channel ended there when
    # ours arrived (it ignores our RESET, on an ended channel), so it ends here too.
    (_CRS, _I.DATA_RECEIVED): _CRS,
    (_CRS, _I.CLOSE_RECEIVED): _END,
    (_CRS, _I.RESET_RECEIVED): _END,
    (_RR, _I.RELEASED): _END,
}

#: The peer's inputs: a missing pair is the peer's protocol error, not our misuse.
_PEER_INPUTS: Final = frozenset({_I.DATA_RECEIVED, _I.CLOSE_RECEIVED, _I.RESET_RECEIVED})


def _name(what: str | int) -> str:
    """A credit's name in an error: a channel's is made only then (not per record)."""
    return f"channel {what}" if isinstance(what, int) else what


class Credit:
    """One flow-control window, seen from both ends (SPEC "Channels", flow control).

    :param send: what the peer granted us to send.
    :param receive: what we granted the peer.
    """

    __slots__ = ("held", "receive", "released", "send", "threshold", "window")

    def __init__(self, send: int, receive: int) -> None:
        #: Data bytes we may still send.
        self.send = send
        #: Data bytes the peer may still send us.
        self.receive = receive
        #: Our full window: what we grant back up to.
        self.window = receive
        #: Bytes the application let go of and not yet granted back.
        self.released = 0
        #: Whole spacks received on it that the application has not let go of yet.
        self.held = 0
        #: Released bytes are granted back once they reach this: a quarter window.
        self.threshold = max(1, receive // 4)

    def spend(self, size: int) -> None:
        """We send ``size`` data bytes (the caller checked that they fit)."""
        if size > self.send:
            raise LocalProtocolError(f"{size} data bytes exceed the {self.send} granted")
        self.send -= size

    def granted(self, increment: int, what: str | int) -> None:
        """The peer granted ``increment`` more (``what``: the credit's name, or its channel).

        :raises ~stalk.errors.FlowControlError: the credit would pass ``MAX_WINDOW``.
        """
        if self.send + increment > MAX_WINDOW:
            raise FlowControlError(f"{_name(what)} credit granted past {MAX_WINDOW}")
        self.send += increment

    def received(self, size: int, what: str | int) -> None:
        """The peer sent ``size`` data bytes (``what``: the credit's name, or its channel).

        :raises ~stalk.errors.FlowControlError: more than we granted.
        """
        if size > self.receive:
            raise FlowControlError(
                f"{size} data bytes on {_name(what)} exceed the {self.receive} granted"
            )
        self.receive -= size

    def release(self, size: int) -> int:
        """The application let go of ``size`` bytes; the increment to grant now (0: none).

        Grants go a quarter of the window at a time, so a stream of small spacks costs one
        WINDOW record per quarter window, not one per spack.
        """
        released = self.released + size
        if released < self.threshold:
            self.released = released
            return 0
        increment, self.released = released, 0
        self.receive += increment
        return increment


class Channel:
    """One open channel: its state and its credit."""

    __slots__ = ("credit", "id", "state")

    def __init__(self, channel_id: int, credit: Credit) -> None:
        self.id = channel_id
        self.state = ChannelState.OPEN
        self.credit = credit


class ChannelTable:
    """The channels of one connection, and its connection-level credit.

    :param initiator: we are the initiator (we open odd ids).
    :param ours: what we offered: the limit and windows we grant the peer.
    :param theirs: what the peer offered: the limit and windows it grants us.
    """

    __slots__ = (
        "_highest_ours",
        "_highest_theirs",
        "_ours",
        "_sent_ours",
        "_theirs",
        "channel0",
        "channels",
        "connection",
        "opened_by_peer",
        "opened_by_us",
        "peer_resets",
    )

    def __init__(self, *, initiator: bool, ours: ChannelParams, theirs: ChannelParams) -> None:
        self._ours = ours
        self._theirs = theirs
        # The highest id each party opened so far (a party's first id is 1 or 2).
        self._highest_ours = -1 if initiator else 0
        self._highest_theirs = 0 if initiator else -1
        # The highest id of ours a record went out on: the peer sees it and every lower
        # one of ours open.
        self._sent_ours = self._highest_ours
        #: Open channels other than 0, by id.
        self.channels: dict[int, Channel] = {}
        #: Channel 0's credit (it is always open while the connection is).
        self.channel0 = Credit(theirs.channel_window, ours.channel_window)
        #: The connection's credit.
        self.connection = Credit(theirs.connection_window, ours.connection_window)
        #: How many open channels each party opened (the limits count these).
        self.opened_by_us = 0
        self.opened_by_peer = 0
        #: Channels the peer reset since the session last looked: what they had not sent
        #: is dropped (a RESET ends our direction too).
        self.peer_resets: list[int] = []

    # -- ids ---------------------------------------------------------------------------

    def _ours_parity(self, channel_id: int) -> bool:
        return (channel_id - self._highest_ours) % 2 == 0

    def can_open(self) -> bool:
        """Whether :meth:`open` would open a channel now: the peer's limit, ids left."""
        return (
            self.opened_by_us < self._theirs.max_channels
            and self._highest_ours + 2 <= MAX_CHANNEL_ID
        )

    def open(self) -> Channel:
        """Open a channel of ours; its first record opens it on the wire.

        :raises ~stalk.errors.LocalProtocolError: the peer's limit is reached (or its
            offer was 0), or the ids ran out.
        """
        if self.opened_by_us >= self._theirs.max_channels:
            raise LocalProtocolError(
                f"the peer accepts at most {self._theirs.max_channels} open channels"
            )
        channel_id = self._highest_ours + 2
        if channel_id > MAX_CHANNEL_ID:
            raise LocalProtocolError("no channel id left on this connection")
        self._highest_ours = channel_id
        return self._add(channel_id, by_peer=False)

    def _add(self, channel_id: int, *, by_peer: bool) -> Channel:
        window = self._ours.channel_window
        channel = Channel(channel_id, Credit(self._theirs.channel_window, window))
        self.channels[channel_id] = channel
        if by_peer:
            self.opened_by_peer += 1
        else:
            self.opened_by_us += 1
        return channel

    def sent_on(self, channel_id: int) -> None:
        """A record on ``channel_id`` was packed to go out (in wire order)."""
        if channel_id > self._sent_ours and self._ours_parity(channel_id):
            self._sent_ours = channel_id

    def on_wire(self, channel_id: int) -> bool:
        """Whether the peer knows the channel: its own, or one of ours it saw opened."""
        return not self._ours_parity(channel_id) or channel_id <= self._sent_ours

    def opened_before(self, channel_id: int) -> bool:
        """Whether ``channel_id`` (not open now) was opened once, or skipped by its opener."""
        highest = self._highest_ours if self._ours_parity(channel_id) else self._highest_theirs
        return channel_id <= highest

    def for_peer_record(self, channel_id: int) -> tuple[Channel, list[int]]:
        """The channel a peer's record on ``channel_id`` (not 0) is for.

        A record on an id of the peer's above the highest it opened opens that channel and,
        as in QUIC, every lower id of the peer's not opened yet (a party may use the ids
        it took in any order; the wire sees them open in order).

        :returns: the channel, and the ids this record opened, in order (often none).
        :raises ~stalk.errors.ProtocolError: an id of ours we never opened, or one of the
            peer's that already ended.
        :raises ~stalk.errors.ChannelLimitExceeded: opening them passes our limit.
        """
        channel = self.channels.get(channel_id)
        if channel is not None:
            return channel, []
        if self._ours_parity(channel_id):
            if channel_id > self._highest_ours:
                raise ProtocolError(f"record on channel {channel_id}, which we never opened")
            raise ProtocolError(f"record on channel {channel_id}, which ended")
        if channel_id <= self._highest_theirs:
            raise ProtocolError(f"record on channel {channel_id}, which ended")
        opened = list(range(self._highest_theirs + 2, channel_id + 1, 2))
        if self.opened_by_peer + len(opened) > self._ours.max_channels:
            raise ChannelLimitExceeded(
                f"the peer opened channel {channel_id} beyond the limit of "
                f"{self._ours.max_channels} open channels"
            )
        self._highest_theirs = channel_id
        added = [self._add(each, by_peer=True) for each in opened]
        return added[-1], opened

    # -- states ------------------------------------------------------------------------

    def process(self, channel: Channel, what: ChannelInput) -> ChannelState:
        """Move ``channel`` by ``what``; an ended channel leaves the table.

        :raises ~stalk.errors.ProtocolError: the peer's input is not allowed in this state.
        :raises ~stalk.errors.LocalProtocolError: ours is not.
        """
        new = CHANNEL_TABLE.get((channel.state, what))
        if new is None:
            message = f"{what} on channel {channel.id} while it is {channel.state}"
            if what in _PEER_INPUTS:
                raise ProtocolError(message)
            raise LocalProtocolError(message)
        channel.state = new
        if new is _RR:
            self.peer_resets.append(channel.id)
        if new is _END:
            del self.channels[channel.id]
            if self._ours_parity(channel.id):
                self.opened_by_us -= 1
            else:
                self.opened_by_peer -= 1
        return new

    def credit(self, channel_id: int) -> Credit:
        """The credit of channel ``channel_id`` (0 included).

        :raises KeyError: not an open channel.
        """
        return self.channel0 if channel_id == 0 else self.channels[channel_id].credit
