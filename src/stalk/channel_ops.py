"""A session's channel operations (SPEC "Channels"): open, close, reset, release.

Each operation is checked against the channel's state machine
(:class:`~stalk.channels.ChannelTable`) before it acts, and queues its records where the
order on the wire needs them: a channel's CLOSE behind what the channel queued
(:class:`~stalk.mux.Mux`), a RESET and credit (WINDOW) as control records, ahead of data,
and the RESET of a channel that never went out behind the CLOSE that opens it on the
wire. The receive side of a channel (:class:`~stalk.demux.Demux`) forgets a reset channel
here too, so nothing more of it is delivered.
"""

from __future__ import annotations

from stalk.channels import ChannelInput, ChannelState, ChannelTable
from stalk.demux import Demux
from stalk.errors import LocalProtocolError
from stalk.mux import Mux
from stalk.receiver import Receiver
from stalk.records import encode_close
from stalk.sender import NO_CHANNELS, Sender
from stalk.wire import CloseCode, RecordKind

__all__ = ["ChannelOps"]


class ChannelOps:
    """The channel operations of one session; without channels, each says there are none."""

    __slots__ = ("_mux", "_receiver", "_sender", "demux", "table")

    def __init__(self, sender: Sender) -> None:
        self._sender = sender
        self.table: ChannelTable | None = None
        self._mux: Mux | None = None
        self._receiver: Receiver | None = None
        #: The receive side of the channels (:class:`~stalk.demux.Demux`), once started.
        self.demux: Demux | None = None

    def start(self, table: ChannelTable, mux: Mux, receiver: Receiver) -> None:
        """Both parties offered channels: the transport phase has them."""
        self.table, self._mux, self._receiver = table, mux, receiver
        self.demux = receiver.demux

    def state(self, channel: int) -> ChannelState | None:
        """The state of ``channel`` (not 0); ``None`` when it is not open (ended, or never)."""
        table = self.table
        found = table.channels.get(channel) if table is not None else None
        return found.state if found is not None else None

    @property
    def can_open(self) -> bool:
        """Whether :meth:`open` would open one now (within the peer's limit)."""
        table = self.table
        return table is not None and table.can_open()

    def queued_on(self, channel: int) -> int:
        """Data bytes queued on ``channel`` and not yet sent (0 without channels)."""
        return self._mux.queued_on(channel) if self._mux is not None else 0

    def open(self) -> int:
        """Open a channel of ours; its id. Its first record (spack or CLOSE) opens it."""
        table = self.table
        if table is None:
            raise LocalProtocolError(NO_CHANNELS)
        self._sender.check_sendable()
        return table.open().id

    def close(self, channel: int) -> None:
        """Queue the CLOSE of our direction of ``channel``, after what it has queued."""
        mux, table = self._mux, self.table
        found = table.channels.get(channel) if table is not None and channel else None
        if mux is None or found is None or channel in mux.closing:
            raise LocalProtocolError(f"channel {channel} is not open for sending")
        if found.state not in (ChannelState.OPEN, ChannelState.RECEIVE_CLOSED):
            raise LocalProtocolError(f"channel {channel} is {found.state}")
        self._sender.check_sendable()
        mux.queue_close(channel)
        mux.flush()

    def reset(self, channel: int, code: int, reason: str) -> None:
        """Reset ``channel``: both directions end; what it had not sent is dropped."""
        body = encode_close(code, reason)
        mux, table, receiver = self._mux, self.table, self._receiver
        demux = receiver.demux if receiver is not None else None
        found = table.channels.get(channel) if table is not None and channel else None
        if table is None or mux is None or receiver is None or demux is None or found is None:
            raise LocalProtocolError(f"channel {channel} is not open")
        self._sender.check_sendable()
        on_wire = table.on_wire(channel)
        if not on_wire and found.state is ChannelState.OPEN:
            # Nothing of it went out: its CLOSE opens it on the wire, before the RESET.
            table.process(found, ChannelInput.CLOSE_SENT)
        table.process(found, ChannelInput.RESET_SENT)
        mux.drop(channel)
        control = self._sender.control
        demux.forget(channel, control)
        receiver.channel_reset(channel)
        if on_wire:
            control.add(RecordKind.RESET, body, channel)
        else:
            mux.queue_opening_reset(channel, body)

    def drop_peer_resets(self) -> None:
        """Our direction of each channel the peer reset ended: drop what it had not sent."""
        table, mux = self.table, self._mux
        if table is not None and mux is not None:
            for channel in table.peer_resets:
                mux.drop(channel)
            table.peer_resets.clear()

    def release_channel(self, channel: int, sending: bool) -> None:
        """The application let go of a channel the peer reset: our answering RESET goes."""
        table = self.table
        found = table.channels.get(channel) if table is not None else None
        if table is None or found is None:
            raise LocalProtocolError(f"channel {channel} is not open")
        table.process(found, ChannelInput.RELEASED)
        if sending:
            self._sender.control.add(RecordKind.RESET, encode_close(CloseCode.NORMAL, ""), channel)
