"""The sans-IO stalk session: handshake, records and spacks; bytes in, events and bytes out.

Theory of operation
-------------------
A :class:`Session` is one side of one connection. Its driver (the anyio layer, a test, or
anything else) does three things in a loop, h11-style::

    session.receive_data(chunk)            # b"" means the transport reached EOF
    while (event := session.next_event()) not in (NEED_DATA, PAUSED):
        handle(event)
    transport.write(session.data_to_send())
    # after PAUSED: write the output, let other tasks run, then call next_event() again

plus the API calls: :meth:`Session.accept`/:meth:`Session.refuse` (responder, after
:class:`~stalk.events.PeerIdentified`), :meth:`Session.queue`/:meth:`Session.flush`/
:meth:`Session.send`, :meth:`Session.ping`, :meth:`Session.close`. After *every* call, the
driver writes out :meth:`Session.data_to_send` (a responder answers as a side effect of
receiving, and PINGs are answered automatically).

Phases (:class:`SessionState`)::

    HANDSHAKING --(responder: peer key known)--> AUTHORIZING --accept()--+
        |                                             \\--refuse()--> CLOSED
        +--(initiator IK: msg2 read; responder XX: accept)--> OPEN
        +--(initiator XX: msg3 sent; responder IK: accept)--> CONFIRMING --READY--> OPEN
    any error --> FAILED (terminal; the same error is raised again)

CONFIRMING is SPEC "Confirmation": the party that read the last handshake message sends
READY as its first record; its peer reports nothing (and sends no spack) until READY
arrives. For the IK responder this is the replay defence: a recorded message 1 replayed by
an attacker never produces a valid READY, so no connection is ever reported for it. For the
XX initiator it carries the responder's authorization verdict.

Invariants:

- Nothing is delivered from a Noise message until all of its records have been parsed,
  checked and decoded; a spack is delivered whole or not at all.
- Any receive-side error is terminal. When the transport is up, an error CLOSE is queued
  for the peer (best effort) before the error is raised.
- The send side encrypts in call order, so nonce order is wire order; the driver must write
  :meth:`data_to_send` in the order it was returned.
- EOF without a CLOSE is a truncation (:class:`~stalk.ConnectionLost`), never a clean end.
- One :meth:`next_event` call does a bounded amount of work (SPEC "Resource model"): past
  its step, or while the answers it owes the peer (PONGs) fill a Noise message that the
  driver has not taken, it returns ``PAUSED`` and reads nothing more until called again.
  What the peer makes us hold is bounded by reading less, never by growing a queue.
"""

from __future__ import annotations

import enum
import operator
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from stalk._noise import TAGLEN, TransportCipher
from stalk.errors import (
    ConnectionClosed,
    ConnectionLost,
    HandshakeFailed,
    InvalidSpackValue,
    LocalProtocolError,
    MessageLimitExceeded,
    MessageTooLarge,
    PeerRefused,
    ProtocolError,
    StalkError,
)
from stalk.events import (
    NEED_DATA,
    PAUSED,
    CloseReceived,
    Event,
    HandshakeComplete,
    MessageReceived,
    NeedData,
    Paused,
    PeerIdentified,
    PongReceived,
)
from stalk.framing import encode_refusal
from stalk.handshake import HandshakeResult, InitiatorHandshake, ResponderHandshake
from stalk.identity import Identity, PublicIdentity
from stalk.records import (
    Record,
    RecordWriter,
    decode_close,
    encode_close,
    lone_piece,
    read_records,
)
from stalk.spack import Spack, SpackDecoder, decode_fast, encode_spack_pieces, pins_little
from stalk.weigh import Weigher, within_budget
from stalk.wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_REKEY_AFTER_BYTES,
    DEFAULT_REKEY_AFTER_MESSAGES,
    FRAME_HEADER_LEN,
    MAX_CLOSE_REASON,
    MAX_MESSAGE_SIZE_LIMIT,
    MAX_PING_PAYLOAD,
    MIN_MAX_MESSAGE_SIZE,
    RECORD_CAPACITY,
    CloseCode,
    Pattern,
    RecordKind,
    close_code_name,
)

__all__ = ["Role", "Session", "SessionConfig", "SessionState"]

#: A REKEY record on channel 0 with an empty body: kind, channel, length.
_REKEY_RECORD = bytes((RecordKind.REKEY, 0, 0))
_FRAME_HEADER = struct.Struct(">H")
#: Frames per output buffer (about 1 MiB of full Noise messages)...
_OUTPUT_CHUNK = 16
#: ...and the size up to which take_output() joins smaller buffers into one write.
_OUTPUT_BYTES = _OUTPUT_CHUNK * 65_537
#: The most receive work one next_event() call does before it hands control back with
#: PAUSED (SPEC "Resource model"), in units of about a quarter of a microsecond of this
#: project's 2-core machine: parsing a record costs _RECORD_COST, a spack byte decoded in
#: one piece one unit, a byte weighed and decoded piecewise _WEIGHED_COST (the dearest
#: shapes, measured). A step is then about 30 ms at most, whatever the peer sends, so no
#: message holds an event loop for long; a Noise message of ordinary small spacks, or one
#: fragment of a bulk payload, fits in one step.
_STEP: Final = 120_000
_RECORD_COST: Final = 32
_WEIGHED_COST: Final = 6
#: A spack in pieces is joined (copied) while its pieces total at most what one record can
#: carry, and decoded at its end exactly as a spack in one record is; only a larger one is
#: weighed as it arrives. Small spacks come in pieces whenever they straddle two Noise
#: messages, and weighing as they arrive costs several times decoding them whole.
_JOIN: Final = RECORD_CAPACITY
#: Answers owed to the peer (PONGs not yet taken by the driver) beyond which the session
#: reads no more input (PAUSED) until the driver takes its output: one Noise message.
_OWED_LIMIT: Final = RECORD_CAPACITY


class Role(enum.Enum):
    """Which end of the handshake this session plays."""

    INITIATOR = "initiator"
    RESPONDER = "responder"


class SessionState(enum.Enum):
    """Where a session is in its life (see the module's theory of operation)."""

    HANDSHAKING = "handshaking"
    AUTHORIZING = "authorizing"
    CONFIRMING = "confirming"
    OPEN = "open"
    CLOSED = "closed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Protocol limits and policy for one session.

    :param max_message_size: the largest encoded spack we accept (advertised to the peer).
    :param rekey_after_messages: send REKEY after this many Noise transport messages...
    :param rekey_after_bytes: ...or this many plaintext bytes, whichever comes first.
    """

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    rekey_after_messages: int = DEFAULT_REKEY_AFTER_MESSAGES
    rekey_after_bytes: int = DEFAULT_REKEY_AFTER_BYTES

    def __post_init__(self) -> None:
        if not MIN_MAX_MESSAGE_SIZE <= self.max_message_size <= MAX_MESSAGE_SIZE_LIMIT:
            raise ValueError(
                f"max_message_size must be {MIN_MAX_MESSAGE_SIZE}..{MAX_MESSAGE_SIZE_LIMIT}"
            )
        if self.rekey_after_messages < 1 or self.rekey_after_bytes < 1:
            raise ValueError("rekey intervals must be positive")


# Looking an enum member up on its class costs about 0.2 us (Python 3.11): the receive
# path, which does it per record, uses these.
_OPEN: Final = SessionState.OPEN
_CONFIRMING: Final = SessionState.CONFIRMING
_MESSAGE: Final = RecordKind.MESSAGE
_FRAGMENT: Final = RecordKind.FRAGMENT


class _Sealing:
    """Plaintexts flushed together, not encrypted yet, with the next one looked ahead.

    :param final: the last plaintext ends with CLOSE (no REKEY may follow it).
    """

    __slots__ = ("final", "next", "plaintexts")

    def __init__(self, plaintexts: Iterator[bytearray], final: bool) -> None:
        self.plaintexts = plaintexts
        self.final = final
        self.next = next(plaintexts, None)


def _check_weight(pieces: list[bytes], size: int) -> None:
    """Refuse a spack that would decode to more than its budget (SPEC "Decoded weight").

    Weighs only a spack that could exceed it. One whose first piece is within budget
    whatever its shape is not weighed: that piece is the whole spack, or all of it but a
    large trailing ``bytes`` (see :func:`~stalk.spack.encode_spack_pieces`), whose bytes
    weigh one each and earn ``WEIGHT_FACTOR`` each of budget.

    :raises ~stalk.MessageTooLarge: the receiver would refuse it.
    """
    if within_budget(len(pieces[0])):
        return
    weigher = Weigher(size)
    try:
        for piece in pieces:
            weigher.feed(piece)
    except MessageLimitExceeded as exc:
        raise MessageTooLarge(
            f"spack of {size} bytes would decode to more objects than the receiver accepts "
            f"({exc}); send bulk numbers as array.array, or split the spack"
        ) from None


def _coalesce(records: list[Record]) -> list[Record]:
    """Join each run of FRAGMENT records (with the MESSAGE that ends it) into one record.

    A peer may cut a spack into many tiny pieces in one Noise message; decoding each
    alone would cost a decoder step per piece. Joined (in C), a run costs one step, and
    the copy holds only the pieces, never the plaintext they came in.
    """
    kinds = list(map(_KIND, records))
    if _FRAGMENT not in kinds[:-1]:
        return records  # no FRAGMENT followed by anything (the common case: one at the end)
    joined: list[Record] = []
    run: list[memoryview] = []
    for record in records:
        if record.kind is _FRAGMENT:
            run.append(record.body)
            continue
        if run:
            if record.kind is _MESSAGE:
                run.append(record.body)
            body = memoryview(b"".join(run)) if len(run) > 1 else run[0]
            kind = record.kind if record.kind is _MESSAGE else _FRAGMENT
            joined.append(Record(kind, 0, body))
            run = []
            if record.kind is _MESSAGE:
                continue
        joined.append(record)
    if run:
        body = memoryview(b"".join(run)) if len(run) > 1 else run[0]
        joined.append(Record(_FRAGMENT, 0, body))
    return joined


_KIND: Final = operator.itemgetter(0)


class _Incoming:
    """A transport message being processed, possibly over several next_event() calls.

    Its records are parsed a batch at a time, and its events wait here until every record
    is processed: if any record fails, none of the message is delivered (SPEC "Records").
    """

    __slots__ = (
        "confirming",
        "events",
        "index",
        "offset",
        "parsed",
        "plaintext",
        "pongs",
        "records",
        "rekey",
    )

    def __init__(self, plaintext: memoryview, parsed: int, *, confirming: bool) -> None:
        self.plaintext = plaintext
        self.parsed = parsed  # where the next batch of records starts
        self.records: list[Record] = []  # the current batch
        self.index = 0  # the record of the batch being processed
        self.offset = 0  # how much of its body a piecewise decoder has taken
        self.confirming = confirming
        self.events: list[Event] = []
        self.pongs: RecordWriter | None = None  # answers to its PINGs, sent once it is done
        self.rekey = False


class Session:
    """One side of a stalk connection, without I/O.

    :param role: initiator (dials) or responder (accepts).
    :param identity: our static key pair.
    :param peer: initiator only: the responder's expected static key. Given, the session
        runs IK and fails with :class:`~stalk.PeerIdentityMismatch` for any other key;
        omitted, it runs XX and learns the key.
    :param config: limits and rekey policy.
    :param ephemeral_for_testing_only: a fixed ephemeral private key, for reproducible
        transcripts (``vectors/``). Never use it on a real connection.
    """

    # Slots: a session is held per connection, and an instance dict of this many
    # attributes costs more than a kilobyte.
    __slots__ = (
        "_bytes_since_rekey",
        "_close_received",
        "_close_sent",
        "_control",
        "_decoder",
        "_eof",
        "_error",
        "_events",
        "_hs",
        "_in",
        "_in_pos",
        "_incoming",
        "_joined",
        "_more",
        "_out",
        "_pattern",
        "_paused",
        "_pings_sent",
        "_pongs_received",
        "_recv",
        "_rekey_requested",
        "_result",
        "_send",
        "_sent_since_rekey",
        "_state",
        "_unsealed",
        "_work",
        "_writer",
        "config",
        "identity",
        "role",
    )

    def __init__(
        self,
        role: Role,
        identity: Identity,
        *,
        peer: PublicIdentity | None = None,
        config: SessionConfig | None = None,
        ephemeral_for_testing_only: bytes | None = None,
    ) -> None:
        if role is Role.RESPONDER and peer is not None:
            raise ValueError("only an initiator can expect a peer key")
        self.role = role
        self.identity = identity
        self.config = config or SessionConfig()
        # Received bytes not yet consumed: ``_in[_in_pos:]``, then the chunks in ``_more``.
        # During the handshake everything is appended to one bytearray. After it, chunks are
        # kept as the ``bytes`` they came in and frames are decrypted straight out of them;
        # only a frame split across chunks is copied, alone, to join its pieces.
        self._in: bytearray | bytes | memoryview = bytearray()
        self._in_pos = 0
        self._more: deque[bytes | memoryview] = deque()
        self._eof = False
        self._out: list[bytes | bytearray] = []
        # Flushed plaintexts not encrypted yet (first in, first out; see _flush_records).
        self._unsealed: deque[_Sealing] = deque()
        self._events: deque[Event] = deque()
        self._state = SessionState.HANDSHAKING
        self._error: StalkError | None = None
        self._hs: InitiatorHandshake | ResponderHandshake | None
        if role is Role.INITIATOR:
            self._hs = InitiatorHandshake(
                identity, peer, self.config.max_message_size, ephemeral=ephemeral_for_testing_only
            )
        else:
            self._hs = ResponderHandshake(
                identity, self.config.max_message_size, ephemeral=ephemeral_for_testing_only
            )
        self._pattern: Pattern | None = self._hs.pattern
        self._result: HandshakeResult | None = None
        self._send: TransportCipher | None = None
        self._recv: TransportCipher | None = None
        # Application records (spacks, and CLOSE/PING, which must follow what was queued
        # before them) and control records the session emits by itself (READY, PONG, error
        # CLOSE). Keeping them apart lets the receive path answer a PING without encrypting
        # spacks the application queued but has not flushed.
        self._writer = RecordWriter()
        self._control = RecordWriter()
        # The spack being decoded piecewise (fragmented, or weighed first), if any.
        self._decoder: SpackDecoder | None = None
        #: The pieces so far of a spack being joined (see :data:`_JOIN`).
        self._joined: bytearray | memoryview | None = None
        self._incoming: _Incoming | None = None
        self._work = 0  # receive work done in the current next_event() call
        self._paused = False
        self._pings_sent = 0
        self._pongs_received = 0
        self._close_sent = False
        self._close_received: CloseReceived | None = None
        self._sent_since_rekey = 0
        self._bytes_since_rekey = 0
        self._rekey_requested = False
        self._take_handshake_output()

    # -- introspection -------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """The current phase."""
        return self._state

    @property
    def pattern(self) -> Pattern | None:
        """``"XX"`` or ``"IK"`` (a responder knows it once the preamble arrived)."""
        return self._pattern

    @property
    def peer(self) -> PublicIdentity | None:
        """The peer's static key, once the peer is authenticated (state OPEN or later)."""
        if self._result is None or self._state in (
            SessionState.HANDSHAKING,
            SessionState.AUTHORIZING,
            SessionState.CONFIRMING,
        ):
            return None
        return self._result.peer

    @property
    def handshake_hash(self) -> bytes | None:
        """Noise ``h`` (channel binding), once the session is OPEN."""
        return self._result.handshake_hash if self.peer is not None and self._result else None

    @property
    def peer_max_message_size(self) -> int | None:
        """The largest encoded spack the peer accepts, once the handshake finished."""
        return self._result.peer_params.max_message_size if self._result else None

    @property
    def close_sent(self) -> bool:
        """Whether we sent CLOSE (our direction is finished)."""
        return self._close_sent

    @property
    def close_received(self) -> CloseReceived | None:
        """The peer's CLOSE, once received."""
        return self._close_received

    @property
    def queued_bytes(self) -> int:
        """Bytes of records queued by :meth:`queue` and not yet encrypted by :meth:`flush`."""
        return self._writer.queued_bytes

    @property
    def has_output(self) -> bool:
        """Whether :meth:`data_to_send` has anything (answers owed to the peer included)."""
        return bool(self._out or self._unsealed or self._control.pending())

    # -- bytes in, events out ---------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the transport; ``b""`` means EOF.

        :raises ~stalk.LocalProtocolError: data after EOF.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if self._close_received is not None:
            return  # the peer's direction is finished: nothing after its CLOSE is read
        if self._hs is None:
            # The caller may reuse a bytearray or memoryview: keep only bytes we own.
            chunk = data if type(data) is bytes else bytes(data)
            if self._in_pos == len(self._in) and not self._more:
                self._in, self._in_pos = chunk, 0
            else:
                self._more.append(chunk)
        elif type(self._in) is bytearray:
            self._in += data
        else:
            self._in = bytearray(self._in) + data

    @property
    def _unconsumed(self) -> int:
        """Received bytes not yet consumed."""
        return len(self._in) - self._in_pos + sum(map(len, self._more))

    def next_event(self) -> Event | NeedData | Paused:
        """The next event, :data:`~stalk.events.NEED_DATA` or :data:`~stalk.events.PAUSED`.

        ``NEED_DATA``: feed more bytes with :meth:`receive_data`. ``PAUSED``: the session
        stopped reading on its own, either because one call did enough work (let other
        tasks run, then call again) or because the peer made us owe it more answers than
        we hold (write out :meth:`take_output` first); do not feed more bytes before
        calling again. After a :class:`~stalk.events.CloseReceived`, returns the same event
        again.

        :raises ~stalk.HandshakeFailed: the handshake failed (refused, wrong key, malformed,
            or the peer left during it).
        :raises ~stalk.ProtocolError: the peer broke the protocol after the handshake.
        :raises ~stalk.ConnectionLost: EOF without CLOSE.
        """
        if self._error is not None:
            raise self._error
        if not self._events:
            self._paused = False
            try:
                self._progress()
            except StalkError as exc:
                self._fail(exc)
                raise
        if self._events:
            return self._events.popleft()
        if self._close_received is not None:
            return self._close_received
        return PAUSED if self._paused else NEED_DATA

    def data_to_send(self) -> bytes | bytearray:
        """Everything queued for the transport, in order; empties the queue."""
        self._flush_owed()
        if self._unsealed:
            self._seal(None)
        if not self._out:
            return b""
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        return data

    # -- the handshake --------------------------------------------------------------------

    def _take_handshake_output(self) -> None:
        if self._hs is not None and self._hs.out:
            self._out.extend(self._hs.out)
            self._hs.out.clear()

    def _progress(self) -> None:
        state = self._state
        if state is SessionState.HANDSHAKING:
            self._progress_handshake()
            state = self._state
        if state is _OPEN:
            self._progress_transport()
        elif state is _CONFIRMING:
            try:
                self._progress_transport()
            except ProtocolError as exc:
                # Before READY the peer is not authenticated: report a failed handshake.
                raise HandshakeFailed(f"handshake confirmation failed: {exc}") from exc

    def _progress_handshake(self) -> None:
        hs = self._hs
        if hs is None:  # pragma: no cover - present while HANDSHAKING
            return
        buffer = self._in
        if type(buffer) is not bytearray:  # pragma: no cover - bytes are kept only after it
            buffer = self._in = bytearray(buffer)
        try:
            done = hs.step(buffer, self._eof)
        except HandshakeFailed as exc:
            if isinstance(hs, ResponderHandshake) and hs.failure_close is not None:
                # XX message 3 was read: the verdict is given, but an authenticated CLOSE
                # can still say why instead of READY (SPEC "Verdict and refusals").
                code, self._send = hs.failure_close
                self._queue_final_close(code, str(exc))
            raise
        finally:
            self._take_handshake_output()
        self._pattern = hs.pattern
        if isinstance(hs, ResponderHandshake):
            if hs.awaiting_authorization and hs.peer is not None and hs.pattern is not None:
                self._state = SessionState.AUTHORIZING
                self._events.append(PeerIdentified(hs.peer, hs.pattern))
            return
        if done and hs.result is not None:
            self._start_transport(hs.result)
            if hs.pattern == "IK":
                self._control.add(RecordKind.READY)
                self._flush_records(self._control)
                self._open()
            else:
                self._state = SessionState.CONFIRMING

    def _start_transport(self, result: HandshakeResult) -> None:
        self._result = result
        self._send = result.send_cipher
        self._recv = result.recv_cipher

    def _open(self) -> None:
        result = self._result
        if result is None:  # pragma: no cover - set by _start_transport
            return
        self._state = SessionState.OPEN
        self._hs = None
        self._events.append(
            HandshakeComplete(
                peer=result.peer,
                pattern=result.pattern,
                handshake_hash=result.handshake_hash,
                peer_max_message_size=result.peer_params.max_message_size,
            )
        )

    def accept(self) -> None:
        """Responder: admit the peer named by :class:`~stalk.events.PeerIdentified`.

        :raises ~stalk.LocalProtocolError: not awaiting authorization.
        """
        hs = self._authorizing()
        hs.accept()
        self._take_handshake_output()
        if hs.result is None:  # pragma: no cover - accept() always sets it
            raise LocalProtocolError("handshake produced no result")
        self._start_transport(hs.result)
        if hs.pattern == "XX":
            self._control.add(RecordKind.READY)
            self._flush_records(self._control)
            self._open()
        else:
            self._state = SessionState.CONFIRMING

    def refuse(self, reason: str = "not authorized") -> None:
        """Responder: refuse the peer named by :class:`~stalk.events.PeerIdentified`.

        IK: an (unauthenticated) refusal verdict is queued instead of message 2, so no DH
        is spent on an answer. XX: an authenticated CLOSE(NOT_AUTHORIZED) is queued. Either
        way the session is CLOSED: write out :meth:`data_to_send`, then close the transport.

        :raises ~stalk.LocalProtocolError: not awaiting authorization.
        """
        hs = self._authorizing()
        hs.refuse()
        if hs.result is not None:
            self._start_transport(hs.result)
            self._queue_final_close(CloseCode.NOT_AUTHORIZED, reason)
        else:
            self._out.append(encode_refusal(CloseCode.NOT_AUTHORIZED, reason))
            self._close_sent = True
        self._state = SessionState.CLOSED
        self._hs = None

    def _queue_final_close(self, code: int, reason: str) -> None:
        """Queue a CLOSE from the control writer as our last transport message."""
        self._control.add(RecordKind.CLOSE, encode_close(code, reason))
        self._flush_records(self._control, final=True)
        self._close_sent = True

    def _authorizing(self) -> ResponderHandshake:
        if self._state is not SessionState.AUTHORIZING or not isinstance(
            self._hs, ResponderHandshake
        ):
            raise LocalProtocolError("accept()/refuse() are only valid after PeerIdentified")
        return self._hs

    # -- transport: receiving ---------------------------------------------------------------

    def _progress_transport(self) -> None:
        self._work = 0
        while not self._events:
            if self._incoming is not None:
                if not self._continue_incoming():
                    self._paused = True
                    return
                continue
            if self._close_received is not None:
                self._in, self._in_pos = b"", 0  # bytes after CLOSE are never read
                self._more.clear()
                break
            if self._control.queued_bytes > _OWED_LIMIT or (
                self._work >= _STEP and self._unconsumed
            ):
                # We owe the peer too many answers, or this call did enough: hand control
                # back before reading more (the peer's bytes wait in TCP's buffers).
                self._paused = True
                return
            frame = self._next_frame()
            if frame is None:
                break
            buf, start, end = frame
            with memoryview(buf) as view, view[start:end] as body:
                self._handle_message(body)
        if self._eof and not self._events and self._incoming is None:
            self._end_of_input()

    def _next_frame(self) -> tuple[bytes | bytearray | memoryview, int, int] | None:
        """Where the next complete frame's body is (and consume it), or ``None``.

        :raises ~stalk.ProtocolError: a zero-length frame.
        """
        while True:
            buf, pos = self._in, self._in_pos
            available = len(buf) - pos
            if available >= FRAME_HEADER_LEN:
                (length,) = _FRAME_HEADER.unpack_from(buf, pos)
                if length == 0:
                    raise ProtocolError("zero-length frame")
                end = pos + FRAME_HEADER_LEN + length
                if end <= len(buf):
                    if end == len(buf) and not self._more:
                        self._in, self._in_pos = b"", 0  # the caller holds buf until done
                    else:
                        self._in_pos = end
                    return buf, pos + FRAME_HEADER_LEN, end
            if not self._more:
                if pos:
                    # Keep only the start of the next frame, not the chunk it came in.
                    self._in, self._in_pos = bytes(memoryview(buf)[pos:]), 0
                return None
            if available:
                self._join_split_frame()
            else:
                self._in, self._in_pos = self._more.popleft(), 0

    def _join_split_frame(self) -> None:
        """Copy the frame that starts at ``_in_pos`` and goes on in ``_more`` into one buffer.

        Takes exactly the bytes that frame needs (or all there are): the copy is at most
        one frame, whatever the chunk sizes.
        """
        if type(self._in) is bytearray and not self._in_pos:
            joined = self._in  # a frame being joined already: grow it in place (a trickle)
        else:
            joined = bytearray(memoryview(self._in)[self._in_pos :])
        more = self._more
        while more:
            if len(joined) < FRAME_HEADER_LEN:
                need = FRAME_HEADER_LEN - len(joined)
            else:
                need = FRAME_HEADER_LEN + _FRAME_HEADER.unpack_from(joined)[0] - len(joined)
            if need <= 0:
                break
            chunk = more[0]
            if len(chunk) <= need:
                joined += chunk
                more.popleft()
            else:
                with memoryview(chunk) as view:
                    joined += view[:need]
                more[0] = memoryview(chunk)[need:]
        self._in, self._in_pos = joined, 0

    def _end_of_input(self) -> None:
        if self._state is SessionState.CONFIRMING:
            # Before READY the peer is not authenticated: whatever was cut, the handshake failed.
            raise HandshakeFailed("the peer closed the connection before confirming the handshake")
        left = self._unconsumed
        if self._close_received is not None and not left:
            return
        if left:
            raise ConnectionLost(f"connection cut in the middle of a frame ({left} bytes)")
        raise ConnectionLost("the peer closed the connection without a CLOSE")

    def _handle_message(self, body: memoryview) -> None:
        recv = self._recv
        if recv is None:  # pragma: no cover - set before CONFIRMING/OPEN
            raise ProtocolError("no receive cipher")
        plaintext = memoryview(recv.decrypt(body))
        end = len(plaintext)
        # The common plaintexts, one spack or one piece of a large one alone, skip the
        # record loop's parsing; whatever else they hold is processed the same way.
        lone = lone_piece(plaintext) if self._state is _OPEN else None
        if lone is not None:
            kind, _, piece = lone
            if self._decoder is None and (kind is _FRAGMENT or self._joined is not None):
                bodies = self._join(kind, piece)
                if bodies is None:
                    self._work += _RECORD_COST
                    return
                if len(bodies) > 1:  # outgrew joining: the record loop weighs both
                    self._incoming = _Incoming(plaintext, end, confirming=False)
                    self._incoming.records = bodies
                    self._continue_incoming()
                    return
                lone = bodies[0]
                piece = lone.body
            whole = kind is _MESSAGE and self._decoder is None
            if whole and len(piece) > self.config.max_message_size:
                lone = None  # the record loop refuses it
            elif whole and (spack := decode_fast(piece)) is not None:
                self._work += len(piece) + _RECORD_COST
                self._events.append(MessageReceived(spack))
                return
            else:  # a piece, or a whole spack for the weigher
                self._work += _RECORD_COST
                spack, offset = self._piecewise(kind, piece, 0)
                if offset == len(piece):
                    if spack is not None:
                        self._events.append(MessageReceived(spack))
                    return
                # Out of budget inside the piece: the record loop resumes it.
                incoming = self._incoming = _Incoming(plaintext, end, confirming=False)
                incoming.records = [lone]
                incoming.offset = offset
                return
        if not end:
            raise ProtocolError("transport message with no records")
        confirming = self._state is _CONFIRMING
        parsed = 0
        if confirming:
            (first,), parsed = read_records(plaintext, 0, 1)
            if first.kind is RecordKind.CLOSE:
                code, reason = decode_close(first.body)
                raise PeerRefused(
                    f"the peer closed the connection during the handshake "
                    f"({close_code_name(code)}): {reason}",
                    code=code,
                    reason=reason,
                )
            if first.kind is not RecordKind.READY:
                raise HandshakeFailed(f"expected READY, got {first.kind.name}")
        self._incoming = _Incoming(plaintext, parsed, confirming=confirming)
        self._continue_incoming()

    def _continue_incoming(self) -> bool:
        """Process the current transport message's records, within this call's work budget.

        :returns: whether the message is done (else the budget ran out: call again).
        """
        incoming = self._incoming
        if incoming is None:  # pragma: no cover - called only with a message in progress
            return True
        events = incoming.events
        limit = self.config.max_message_size
        while True:
            records = incoming.records
            index = incoming.index
            while index < len(records):
                if self._work >= _STEP:
                    incoming.index = index
                    return False
                kind, _, body = records[index]
                if self._decoder is None and (
                    kind is _FRAGMENT or (kind is _MESSAGE and self._joined is not None)
                ):
                    bodies = self._join(kind, body)
                    if bodies is None:
                        index += 1
                        continue
                    records[index : index + 1] = bodies  # where a resumed step finds them
                    kind, _, body = records[index]
                if kind is _MESSAGE and self._decoder is None and len(body) <= limit:
                    # A whole spack in one record: decoded at once unless it must be weighed.
                    spack = decode_fast(body)
                    if spack is None:
                        spack, incoming.offset = self._piecewise(kind, body, incoming.offset)
                        if incoming.offset < len(body):
                            incoming.index = index
                            return False
                        incoming.offset = 0
                    else:
                        self._work += len(body)
                    if spack is not None:
                        events.append(MessageReceived(spack))
                elif self._record(incoming, kind, body):
                    incoming.offset = 0
                else:
                    incoming.index = index
                    return False  # a piecewise decoder ran out of budget inside this body
                index += 1
            if incoming.parsed == len(incoming.plaintext):
                break
            if self._work >= _STEP:
                incoming.index = index
                return False
            batch = max((_STEP - self._work) // _RECORD_COST, 1)
            records, incoming.parsed = read_records(incoming.plaintext, incoming.parsed, batch)
            self._work += len(records) * _RECORD_COST
            incoming.records = _coalesce(records)
            incoming.index = 0
        self._finish_incoming(incoming)
        return True

    def _finish_incoming(self, incoming: _Incoming) -> None:
        """Act on a transport message whose every record is processed (and only then)."""
        self._incoming = None
        if incoming.rekey and self._recv is not None:
            self._recv.rekey()
        if incoming.pongs is not None and not self._close_sent:
            self._control.extend(incoming.pongs)
        if incoming.confirming:
            self._open()
        self._events.extend(incoming.events)

    def _record(self, incoming: _Incoming, kind: RecordKind, body: memoryview) -> bool:
        """Act on one record other than a whole spack decoded at once.

        :returns: whether it is done (else the budget ran out inside a spack's piece).
        """
        if kind is _MESSAGE or kind is _FRAGMENT:
            if kind is _MESSAGE and self._decoder is None:
                # A whole spack: the caller decodes it unless it is over the limit.
                raise MessageLimitExceeded(self.config.max_message_size)
            spack, incoming.offset = self._piecewise(kind, body, incoming.offset)
            if spack is not None:
                incoming.events.append(MessageReceived(spack))
            return incoming.offset == len(body)
        if kind is RecordKind.PING:
            if incoming.pongs is None:
                incoming.pongs = RecordWriter()
            incoming.pongs.add(RecordKind.PONG, body)
            self._work += _RECORD_COST
        elif kind is RecordKind.PONG:
            # One event per PING we sent; an unsolicited PONG is discarded (SPEC "Ping").
            if self._pongs_received < self._pings_sent:
                self._pongs_received += 1
                incoming.events.append(PongReceived(bytes(body)))
        elif kind is RecordKind.REKEY:
            incoming.rekey = True
        elif kind is RecordKind.CLOSE:
            if self._decoder is not None or self._joined is not None:
                raise ProtocolError("CLOSE in the middle of a fragmented message")
            code, reason = decode_close(body)
            self._close_received = CloseReceived(code, reason)
            incoming.events.append(self._close_received)
        else:  # READY after confirmation
            raise ProtocolError(f"unexpected {kind.name} record")
        return True

    def _join(self, kind: RecordKind, piece: memoryview) -> list[Record] | None:
        """Join one piece of a spack that may still fit :data:`_JOIN` bytes in all.

        :returns: ``None`` while joining; else the records to decode now, in order: the
            piece alone (nothing was joined), or the spack that ended here, joined whole.
            A spack that outgrows joining and goes on is weighed from its first byte:
            the bytes joined so far, then the piece (a decoder is started for them;
            they are not copied together).
        :raises ~stalk.MessageLimitExceeded: the pieces total more than our limit.
        """
        joined = self._joined
        total = len(piece) if joined is None else len(joined) + len(piece)
        if total > self.config.max_message_size:
            raise MessageLimitExceeded(self.config.max_message_size)
        if kind is _FRAGMENT and total <= _JOIN:
            if joined is None:
                # The usual first piece of a large spack fills its plaintext: held as is.
                self._joined = piece if pins_little(piece) else bytearray(piece)
            else:
                if isinstance(joined, memoryview):
                    joined = self._joined = bytearray(joined)
                joined += piece
            return None
        if joined is None:
            return [Record(kind, 0, piece)]
        self._joined = None
        if kind is _FRAGMENT:
            self._decoder = SpackDecoder(self.config.max_message_size)
            return [Record(_FRAGMENT, 0, memoryview(joined)), Record(_FRAGMENT, 0, piece)]
        return [Record(kind, 0, memoryview(b"".join((joined, piece))))]

    def _piecewise(
        self, kind: RecordKind, body: memoryview, offset: int
    ) -> tuple[Spack | None, int]:
        """Feed ``body[offset:]`` to the piecewise decoder, as much as this call's budget allows.

        A fragmented spack, or one whose containers the fast decoder leaves to the weigher,
        goes through a :class:`~stalk.spack.SpackDecoder`.

        :returns: the spack the body completes (if it does), and how far into it the
            decoder got (``len(body)`` once all of it is taken).
        """
        limit = self.config.max_message_size
        decoder = self._decoder
        if decoder is None:
            if kind is _MESSAGE:  # a whole spack in this record: its size is known
                decoder = SpackDecoder(len(body), complete=True)
            else:
                decoder = SpackDecoder(limit)
            self._decoder = decoder
        if not offset and decoder.size + len(body) > limit:
            # The running total of the pieces, checked before any of this one is taken.
            raise MessageLimitExceeded(limit)
        while offset < len(body):
            room = _STEP - self._work
            if room <= 0:
                return None, offset
            done = decoder.work
            offset += decoder.feed(body[offset:] if offset else body, room // _WEIGHED_COST)
            self._work += (decoder.work - done) * _WEIGHED_COST + 1
        if kind is _FRAGMENT:
            return None, offset
        self._decoder = None
        return decoder.finish(), offset

    def _fail(self, exc: StalkError) -> None:
        self._state = SessionState.FAILED
        self._error = exc
        self._events.clear()
        self._incoming = None
        self._decoder = None
        self._joined = None
        if (
            self._send is None
            or self._close_sent
            or isinstance(exc, (ConnectionLost, HandshakeFailed))
        ):
            return
        code = (
            CloseCode.MESSAGE_TOO_LARGE
            if isinstance(exc, MessageLimitExceeded)
            else CloseCode.PROTOCOL_ERROR
        )
        try:
            self._writer = RecordWriter()  # drop anything queued: it will never be wanted
            self._control.add(RecordKind.CLOSE, encode_close(code, str(exc)))
            self._flush_records(self._control, final=True)
        except StalkError:
            return
        self._close_sent = True

    # -- transport: sending ----------------------------------------------------------------

    def _check_sendable(self) -> None:
        if self._close_sent or self._state in (SessionState.CLOSED, SessionState.FAILED):
            raise ConnectionClosed("the session is closed for sending")
        if self._state is not SessionState.OPEN:
            raise LocalProtocolError(f"cannot send while {self._state.value}")

    def queue(self, spack: Spack) -> None:
        """Encode ``spack`` and queue it; :meth:`flush` encrypts everything queued.

        :raises ~stalk.InvalidSpackValue: a value cannot be encoded (nothing is queued).
        :raises ~stalk.MessageTooLarge: larger than the peer accepts (nothing is queued).
        :raises ~stalk.ConnectionClosed: we already sent CLOSE or the session failed.
        :raises ~stalk.LocalProtocolError: the session is not open yet.
        """
        self._check_sendable()
        if type(spack) is not Spack and not isinstance(spack, Spack):
            raise InvalidSpackValue(
                f"send() and queue() take a Spack, not {type(spack).__name__}: "
                "wrap the values as Spack(value, ...)"
            )
        pieces = encode_spack_pieces(spack._values)
        size = len(pieces[0]) if len(pieces) == 1 else sum(map(len, pieces))
        limit = self.peer_max_message_size or 0
        if size > limit:
            raise MessageTooLarge(
                f"spack of {size} bytes exceeds the peer's limit of {limit} bytes"
            )
        _check_weight(pieces, size)
        if len(pieces) == 1:
            self._writer.add_message(pieces[0])
        else:
            self._writer.add_message_pieces(pieces)

    def flush(self) -> None:
        """Send everything queued, in as few Noise messages as possible.

        The first ~1 MiB is encrypted now; the rest of a large flush is encrypted, in
        order, as :meth:`take_output` or :meth:`data_to_send` hand it out.

        :raises ~stalk.ConnectionClosed: we already sent CLOSE or the session failed.
        """
        if self._writer.pending():
            self._check_sendable()
            self._flush_records(self._writer)

    def send(self, spack: Spack) -> None:
        """:meth:`queue` then :meth:`flush`."""
        self.queue(spack)
        self.flush()

    def ping(self, payload: bytes = b"") -> None:
        """Send a PING; the peer's PONG arrives as :class:`~stalk.events.PongReceived`.

        :raises ValueError: the payload is longer than 1024 bytes.
        """
        if len(payload) > MAX_PING_PAYLOAD:
            raise ValueError(f"ping payload longer than {MAX_PING_PAYLOAD} bytes")
        self._check_sendable()
        self._writer.add(RecordKind.PING, payload)
        self._pings_sent += 1
        self._flush_records(self._writer)

    def request_rekey(self) -> None:
        """Rekey our sending cipher with the next Noise message (policy does it anyway)."""
        self._rekey_requested = True

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send CLOSE after everything queued; our direction is then finished.

        Receiving goes on until the peer's CLOSE or EOF. Idempotent. Before the handshake
        finished there is nothing to authenticate a CLOSE with: the session just becomes
        CLOSED and the driver closes the transport.

        :raises ValueError: the code is not a u16 or the reason is longer than 1024 bytes.
        """
        if not 0 <= code <= 0xFFFF:
            raise ValueError("close code must fit in 16 bits")
        if len(reason.encode("utf-8")) > MAX_CLOSE_REASON:
            raise ValueError(f"close reason longer than {MAX_CLOSE_REASON} bytes")
        if self._close_sent or self._state is SessionState.FAILED:
            return
        self._close_sent = True
        if self._send is None:
            self._state = SessionState.CLOSED
            return
        self._writer.add(RecordKind.CLOSE, encode_close(code, reason))
        self._flush_records(self._writer, final=True)

    def _flush_records(self, writer: RecordWriter, *, final: bool = False) -> None:
        """Queue everything ``writer`` holds for encryption, and encrypt up to ~1 MiB now.

        Encryption is first in, first out: the bytes and nonces on the wire are exactly
        those of encrypting everything at once; only the time at which it is done moves.
        What is left (the rest of a large spack) is encrypted by :meth:`take_output` or
        :meth:`data_to_send` when the transport wants it, so a large spack is never held
        as ciphertext all at once, and its first bytes can leave while the rest is sealed.

        :param final: the last plaintext ends with CLOSE, which must stay the last record
            (and nothing is sent after it, so rekeying then would be pointless).
        """
        if self._send is None:  # pragma: no cover - callers check the state first
            raise LocalProtocolError("no transport cipher yet")
        if writer is not self._control and self._control.pending():
            self._unsealed.append(_Sealing(self._control.pack(), False))
        self._unsealed.append(_Sealing(writer.pack(), final))
        self._seal(_OUTPUT_BYTES)

    def _flush_owed(self) -> None:
        """Queue the answers owed to the peer (PONGs) for encryption."""
        if self._control.pending() and self._send is not None:
            self._flush_records(self._control)

    def _seal(self, budget: int | None) -> None:
        """Encrypt queued plaintexts into ``_out``: about ``budget`` bytes, or all (None)."""
        produced = 0
        unsealed = self._unsealed
        while unsealed and (budget is None or produced < budget):
            entry = unsealed[0]
            produced += self._seal_group(entry)
            if entry.next is None:
                unsealed.popleft()

    def _seal_group(self, entry: _Sealing) -> int:
        """Encrypt up to _OUTPUT_CHUNK plaintexts of ``entry`` into one output buffer.

        Each frame's header is packed in place and its ciphertext encrypted straight into
        the buffer (one copy); a large spack becomes several ~1 MiB writes instead of one
        huge buffer, which would cost fresh pages (mmap, zero-filling) on every message.
        Applies the rekey policy. Returns the bytes produced.
        """
        send = self._send
        if send is None:  # pragma: no cover - set before anything is queued
            raise LocalProtocolError("no transport cipher yet")
        config = self.config
        group: list[bytearray] = []
        while entry.next is not None and len(group) < _OUTPUT_CHUNK:
            group.append(entry.next)
            entry.next = next(entry.plaintexts, None)
        if not group:  # pragma: no cover - nothing empty is ever queued
            return 0
        if len(group) == 1:
            # The common case, one frame with no rekey due, without the general loop.
            plaintext = group[0]
            sent = self._sent_since_rekey + 1
            sent_bytes = self._bytes_since_rekey + len(plaintext)
            if not (
                self._rekey_requested
                or sent >= config.rekey_after_messages
                or sent_bytes >= config.rekey_after_bytes
            ):
                size = len(plaintext) + TAGLEN
                out = bytearray(FRAME_HEADER_LEN + size)
                _FRAME_HEADER.pack_into(out, 0, size)
                with memoryview(out) as view:
                    send.encrypt_into(plaintext, view[FRAME_HEADER_LEN:])
                self._sent_since_rekey = sent
                self._bytes_since_rekey = sent_bytes
                self._out.append(out)
                return len(out)
        out = bytearray(sum(len(p) + FRAME_HEADER_LEN + TAGLEN + 3 for p in group))
        offset = 0
        with memoryview(out) as view:
            for index, plaintext in enumerate(group, 1 - len(group)):
                self._sent_since_rekey += 1
                self._bytes_since_rekey += len(plaintext)
                last = index == 0 and entry.next is None
                rekey = not (entry.final and last) and (
                    self._rekey_requested
                    or self._sent_since_rekey >= config.rekey_after_messages
                    or self._bytes_since_rekey >= config.rekey_after_bytes
                )
                if rekey:
                    plaintext.extend(_REKEY_RECORD)  # RECORD_CAPACITY keeps room for it
                size = len(plaintext) + TAGLEN
                _FRAME_HEADER.pack_into(out, offset, size)
                send.encrypt_into(plaintext, view[offset + 2 : offset + 2 + size])
                offset += 2 + size
                if rekey:
                    send.rekey()
                    self._rekey_requested = False
                    self._sent_since_rekey = 0
                    self._bytes_since_rekey = 0
        del out[offset:]
        self._out.append(out)
        return offset

    def take_output(self) -> list[bytes | bytearray]:
        """Like :meth:`data_to_send`, as buffers to write in order; call it until it is empty.

        Small pieces are joined (one write each for a preamble and its first message, or
        for many small frames); buffers of about 1 MiB or more are handed out as they are.
        It returns what is already encrypted, or, when nothing is, encrypts about 1 MiB
        more of what was flushed: the rest of a large spack comes in later calls.
        """
        self._flush_owed()
        if not self._out and self._unsealed:
            self._seal(_OUTPUT_BYTES)
        out, self._out = self._out, []
        if len(out) <= 1:
            return out
        chunks: list[bytes | bytearray] = []
        pending: list[bytes | bytearray] = []
        size = 0
        for piece in out:
            if pending and size + len(piece) > _OUTPUT_BYTES:
                chunks.append(pending[0] if len(pending) == 1 else b"".join(pending))
                pending, size = [], 0
            pending.append(piece)
            size += len(piece)
        chunks.append(pending[0] if len(pending) == 1 else b"".join(pending))
        return chunks
