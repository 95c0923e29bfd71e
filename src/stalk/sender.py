"""A session's send side: records queued in call order, packed, and handed to the sealer.

Two record writers feed the :class:`~stalk.sealer.Sealer`, the only place anything is
encrypted:

- the application's (spacks, and CLOSE and PING, which must follow what was queued before
  them), flushed when the application says so;
- the session's own control records (READY, PONG, WINDOW, an error CLOSE), which go out
  ahead of the next flush or output without flushing spacks the application queued but
  has not flushed.

With channels, the application's spacks go to the :class:`~stalk.mux.Mux` instead, which
the sealer pulls from, one Noise message at a time, channel after channel. A CLOSE of the
connection then waits until everything queued before it has gone (:meth:`Sender.close`).
"""

from __future__ import annotations

from stalk.channels import ChannelInput, ChannelTable
from stalk.errors import (
    ConnectionLost,
    HandshakeFailed,
    InvalidSpackValue,
    LocalProtocolError,
    MessageTooLarge,
    StalkError,
)
from stalk.mux import Mux
from stalk.records import RecordWriter, encode_close
from stalk.sealer import Sealer
from stalk.spack import Spack, encode_spack_pieces
from stalk.states import Direction, Directions, Input, refusal
from stalk.weigh import ALWAYS_WITHIN_BUDGET, check_weight
from stalk.wire import RecordKind

__all__ = ["NO_CHANNELS", "Sender"]

#: What a channel operation on a connection without channels raises.
NO_CHANNELS = "this connection has no channels (the peer offered none)"

_DATA_SENT = ChannelInput.DATA_SENT
_MESSAGE_BYTE = int(RecordKind.MESSAGE)


class Sender:
    """What a session sends, in the order it is asked: records, once there are keys.

    The handshake's messages go through the same sealer, in cleartext (:meth:`take`
    hands them out too).

    :param sealer: the session's sealer (it also carries the handshake's messages).
    :param control: the session's control writer, shared with the receive side, which
        queues the answers it owes there.
    :param states: the session's state machine; sending data needs our direction open.
    """

    __slots__ = (
        "_closing",
        "_mux",
        "_peer_limit",
        "_states",
        "_table",
        "bytes_sent",
        "control",
        "sealer",
        "writer",
    )

    def __init__(self, sealer: Sealer, control: RecordWriter, states: Directions) -> None:
        self.sealer = sealer
        self.control = control
        self.writer = RecordWriter()
        self._states = states
        #: Bytes handed out for the transport (:meth:`take`, :meth:`send_now`).
        self.bytes_sent = 0
        self._peer_limit = 0  # the peer's max_message_size, once the handshake told it
        self._mux: Mux | None = None  # with channels: the application's spacks go here
        self._table: ChannelTable | None = None
        self._closing: tuple[int, str] | None = None  # a CLOSE waiting for queued spacks

    def start(self, peer_limit: int, channels: tuple[ChannelTable, Mux] | None) -> None:
        """The transport phase begins: the peer accepts spacks up to ``peer_limit``.

        :param channels: the connection's channels and their multiplexer, when both
            parties offered channels.
        """
        self._peer_limit = peer_limit
        if channels is not None:
            self._table, self._mux = channels
            self.sealer.attach(self._mux)

    @property
    def queued_bytes(self) -> int:
        """Bytes queued and not flushed (with channels: data bytes queued and not sent)."""
        if self._mux is not None:
            return self._mux.queued_bytes
        return self.writer.queued_bytes

    @property
    def unsent(self) -> bool:
        """With channels: whether spacks queued (flushed or not) are still to be sent."""
        return self._mux is not None and self._mux.unsent()

    @property
    def has_output(self) -> bool:
        """Whether :meth:`take` has anything (answers owed to the peer included)."""
        return self.sealer.pending or self.control.pending()

    def check_sendable(self) -> None:
        """Raise the state machine's refusal when our direction cannot send data."""
        states = self._states
        if not states.can_send_data:
            raise refusal(Direction.SEND, states.send, Input.DATA_SENT)

    def queue(self, spack: Spack, channel: int = 0) -> None:
        """Encode ``spack`` and queue it (with channels, on ``channel``)."""
        if not self._states.can_send_data:
            self.check_sendable()
        if channel or self._mux is not None:
            self._queue_on_channel(spack, channel)
            return
        pieces, _ = self._encode(spack)
        if len(pieces) == 1:
            self.writer.add_message(pieces[0])
        else:
            self.writer.add_message_pieces(pieces)

    def _encode(self, spack: Spack) -> tuple[list[bytes], int]:
        """A spack's encoding as pieces, and its size, checked against the peer's limits."""
        if type(spack) is not Spack and not isinstance(spack, Spack):
            raise InvalidSpackValue(
                f"send() and queue() take a Spack, not {type(spack).__name__}: "
                "wrap the values as Spack(value, ...)"
            )
        pieces = encode_spack_pieces(spack._values)
        size = len(pieces[0]) if len(pieces) == 1 else sum(map(len, pieces))
        limit = self._peer_limit
        if size > limit:
            raise MessageTooLarge(
                f"spack of {size} bytes exceeds the peer's limit of {limit} bytes"
            )
        if size > ALWAYS_WITHIN_BUDGET:  # (else check_weight() has nothing to check)
            check_weight(pieces, size)
        return pieces, size

    def _queue_on_channel(self, spack: Spack, channel: int) -> None:
        mux, table = self._mux, self._table
        if mux is None or table is None:
            raise LocalProtocolError(NO_CHANNELS)
        found = table.channels.get(channel) if channel else None
        if channel and (found is None or channel in mux.closing):
            raise LocalProtocolError(f"channel {channel} is not open for sending")
        pieces, _ = self._encode(spack)
        if found is not None:
            table.process(found, _DATA_SENT)
        mux.queue(channel, pieces)

    def flush(self) -> None:
        """Pack everything queued into plaintexts for the sealer, behind answers owed."""
        if self._mux is not None:
            self.check_sendable()
            self._mux.flush()
            return
        writer = self.writer
        if writer.pending():
            self.check_sendable()
            if not self.control.pending() and (plaintext := writer.take_only()) is not None:
                self.sealer.push_one(plaintext)  # the common small send
            else:
                self.push(writer)

    def send_now(self, spack: Spack) -> bytearray | None:
        """Queue then :meth:`flush_now`; a small spack alone is sealed in one step.

        With channels too, on channel 0, when nothing else is queued and its credit and
        the connection's cover it: the plaintext is the MESSAGE record the multiplexer
        would pack (``tests/test_session_send_now.py`` compares them).
        """
        sealer = self.sealer
        if (
            self._closing is None
            and not self.control.pending()
            and sealer.idle
            and self._states.can_send_data
        ):
            mux = self._mux
            if mux is None:
                if not self.writer.pending():
                    pieces, size = self._encode(spack)
                    if size < 0x80:
                        return self._seal_small(pieces[0], size)
                    if len(pieces) == 1:
                        self.writer.add_message(pieces[0])
                    else:
                        self.writer.add_message_pieces(pieces)
                    return self.flush_now()
            elif not mux.unsent():
                pieces, size = self._encode(spack)
                table = self._table
                if (
                    size < 0x80
                    and table is not None
                    and table.connection.send >= size
                    and table.channel0.send >= size
                ):
                    table.connection.send -= size  # (Credit.spend, its check made here)
                    table.channel0.send -= size
                    return self._seal_small(pieces[0], size)
                mux.queue(0, pieces)
                return self.flush_now()
        self.queue(spack)
        return self.flush_now()

    def _seal_small(self, piece: bytes, size: int) -> bytearray:
        """The frame of a lone spack under 128 bytes on channel 0, sealed at once.

        The plaintext :meth:`queue` then :meth:`flush_now` would make: one MESSAGE record
        on channel 0 with a one-byte length.
        """
        plaintext = bytearray((_MESSAGE_BYTE, 0, size))
        plaintext += piece
        frame = self.sealer.seal_idle(plaintext)
        self.bytes_sent += len(frame)
        return frame

    def flush_now(self) -> bytearray | None:
        """:meth:`flush`; when that makes the one Noise message to send, its frame."""
        writer, sealer, mux = self.writer, self.sealer, self._mux
        if self._closing is not None or self.control.pending() or not sealer.idle:
            self.flush()
            return None
        if mux is not None:
            self.check_sendable()
            mux.flush()
            plaintext = mux.next_plaintext()
            if plaintext is None:
                return None  # nothing could go: it waits for credit
            if mux.unsent():  # more to pack: the general way, behind this one
                sealer.push_one(plaintext)
                return None
        else:
            plaintext = writer.take_only()
            if plaintext is None:  # several plaintexts (or none): the general way
                self.flush()
                return None
            if not self._states.can_send_data:
                self.check_sendable()
        frame = sealer.seal_one(plaintext)
        self.bytes_sent += len(frame)
        return frame

    def ping(self, payload: bytes) -> None:
        """Queue a PING behind what the application queued, and flush."""
        self.check_sendable()
        self.writer.add(RecordKind.PING, payload)
        self.push(self.writer)

    def close(self, code: int, reason: str) -> None:
        """Queue our CLOSE behind everything queued (with channels, once it has all gone)."""
        if self._mux is not None and self._mux.unsent():
            self._mux.flush()
            self._closing = (code, reason)  # take() sends it once they have gone
            return
        self.writer.add(RecordKind.CLOSE, encode_close(code, reason))
        self.push(self.writer, final=True)

    def final_close(self, code: int, reason: str) -> None:
        """Queue a CLOSE from the control writer as our last transport message."""
        self.control.add(RecordKind.CLOSE, encode_close(code, reason))
        self.sealer.push(self.control.pack(), final=True)

    def fail(self, exc: StalkError) -> None:
        """The session failed: drop what was queued and tell the peer why, if we still can."""
        sealer = self.sealer
        if (
            sealer.cipher is None
            or sealer.closed
            or isinstance(exc, (ConnectionLost, HandshakeFailed))
        ):
            return
        self.writer = RecordWriter()  # anything queued will never be wanted
        self.final_close(exc.close_code, str(exc))

    def take(self) -> bytes | bytearray:
        """The next buffer for the transport, ``b""`` when there is nothing to send."""
        sealer = self.sealer
        if self.control.pending() and sealer.cipher is not None and not sealer.closed:
            sealer.push(self.control.pack())  # answers owed (PONGs; WINDOW with channels)
        if self._closing is not None and not (self._mux is not None and self._mux.unsent()):
            code, reason = self._closing  # everything queued before close() has gone
            self._closing = None
            self.writer.add(RecordKind.CLOSE, encode_close(code, reason))
            self.push(self.writer, final=True)
        data = sealer.take()
        self.bytes_sent += len(data)
        return data

    def push(self, writer: RecordWriter, *, final: bool = False) -> None:
        """Hand everything ``writer`` holds to the sealer, after any answers owed."""
        if writer is not self.control and self.control.pending():
            self.sealer.push(self.control.pack())
        size = writer.queued_bytes
        self.sealer.push(writer.pack(), final=final, size=size)
