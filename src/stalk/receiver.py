"""The transport phase's receive loop: frames in, records checked and decoded, events out.

Theory of operation
-------------------
A :class:`Receiver` takes frames from the session's :class:`~stalk.framing.FrameReader`,
decrypts each into a plaintext and acts on its records (SPEC "Records"):

- nothing of a Noise message is delivered until every one of its records is parsed,
  checked and decoded: its events wait in an :class:`_Incoming` until then, so a bad
  record anywhere means nothing from that message is delivered;
- the common plaintexts, one spack or one piece of a large one alone (with channels:
  one small spack alone on a channel), skip the record loop's parsing; whatever else they
  hold is processed the same way;
- spacks in pieces go through the :class:`~stalk.reassembly.Reassembler`;
- answers owed to the peer (PONGs) go to the session's control writer once their message
  is done; the receiver never encrypts anything.

Work is bounded (SPEC "Resource model"): one :meth:`Receiver.progress` call does at most
:data:`STEP` units, in units of about a quarter of a microsecond of this project's 2-core
machine: parsing a record costs :data:`RECORD_COST`, a spack byte decoded in one piece one
unit, a byte weighed and decoded piecewise ``WEIGHED_COST`` (the dearest shapes,
measured). A step is then about 30 ms at most, whatever the peer sends; a Noise message of
ordinary small spacks, or one fragment of a bulk payload, fits in one step. Past its step,
or while the answers owed fill a Noise message the driver has not taken
(:data:`OWED_LIMIT`), the receiver stops (``paused``) and reads nothing more until called
again: what the peer makes us hold is bounded by reading less, never by growing a queue.
"""

from __future__ import annotations

import operator
from collections import deque
from typing import Final

from stalk._noise import TransportCipher
from stalk.channels import ChannelTable
from stalk.demux import Demux
from stalk.errors import HandshakeFailed, MessageLimitExceeded, PeerRefused, ProtocolError
from stalk.events import (
    ChannelCloseReceived,
    ChannelMessageReceived,
    ChannelResetReceived,
    CloseReceived,
    Event,
    HandshakeComplete,
    MessageReceived,
    PongReceived,
)
from stalk.framing import FrameReader, FramingError
from stalk.reassembly import Reassembler
from stalk.records import (
    Record,
    RecordWriter,
    decode_close,
    lone_channel_piece,
    lone_piece,
    read_records,
)
from stalk.spack import Spack, decode_fast
from stalk.states import Directions, Input
from stalk.wire import RECORD_CAPACITY, CloseCode, RecordKind

__all__ = ["OWED_LIMIT", "RECORD_COST", "STEP", "Receiver"]

#: The most receive work one progress() call does (see the module's theory of operation).
STEP: Final = 120_000
RECORD_COST: Final = 32
#: Answers owed to the peer (PONGs not yet taken by the driver) beyond which the receiver
#: reads no more input until the driver takes its output: one Noise message.
OWED_LIMIT: Final = RECORD_CAPACITY

# Looking an enum member up on its class costs about 0.2 us (Python 3.11): the loop, which
# does it per record, uses these.
_MESSAGE: Final = RecordKind.MESSAGE
_FRAGMENT: Final = RecordKind.FRAGMENT
_KIND: Final = operator.itemgetter(0)


def _coalesce(records: list[Record]) -> list[Record]:
    """Join each run of FRAGMENT records (with the MESSAGE that ends it) into one record.

    A peer may cut a spack into many tiny pieces in one Noise message; decoding each
    alone would cost a decoder step per piece. Joined (in C), a run costs one step, and
    the copy holds only the pieces, never the plaintext they came in. A run is the
    consecutive pieces of one channel: another channel's record ends it.
    """
    kinds = list(map(_KIND, records))
    if _FRAGMENT not in kinds[:-1]:
        return records  # no FRAGMENT followed by anything (the common case: one at the end)
    joined: list[Record] = []
    run: list[memoryview] = []
    run_channel = 0
    for record in records:
        kind, channel, body = record
        if run and channel != run_channel:
            joined.append(_joined(_FRAGMENT, run_channel, run))
            run = []
        if kind is _FRAGMENT:
            run.append(body)
            run_channel = channel
            continue
        if run:
            if kind is _MESSAGE:
                run.append(body)
                joined.append(_joined(_MESSAGE, channel, run))
                run = []
                continue
            joined.append(_joined(_FRAGMENT, run_channel, run))
            run = []
        joined.append(record)
    if run:
        joined.append(_joined(_FRAGMENT, run_channel, run))
    return joined


def _joined(kind: RecordKind, channel: int, run: list[memoryview]) -> Record:
    """One record of ``kind`` whose body is the run's bodies, joined (copied) if several."""
    return Record(kind, channel, memoryview(b"".join(run)) if len(run) > 1 else run[0])


class _Incoming:
    """A transport message being processed, possibly over several progress() calls."""

    __slots__ = (
        "confirming",
        "events",
        "grants",
        "index",
        "offset",
        "parsed",
        "pings",
        "plaintext",
        "records",
        "rekey",
    )

    def __init__(self, plaintext: memoryview, parsed: int, *, confirming: bool) -> None:
        self.plaintext = plaintext
        self.parsed = parsed  # where the next batch of records starts
        self.records: list[Record] = []  # the current batch
        self.index = 0  # the record of the batch being processed
        self.offset = 0  # how much of its body a piecewise decoder has taken
        self.confirming = confirming  # READY came first: the handshake is confirmed
        self.events: list[Event] = []
        # Answers owed, sent once it is done: with channels, the WINDOW, CONNECTION_WINDOW
        # and RESET records its records call for, in their order; then a PONG for each of
        # its PINGs (their bodies, views into the plaintext), in theirs (SPEC "Channels").
        self.grants: RecordWriter | None = None
        self.pings: list[memoryview] | None = None
        self.rekey = False

    def answers(self) -> RecordWriter:
        """The writer of this message's grants (created when the first one is owed)."""
        if self.grants is None:
            self.grants = RecordWriter()
        return self.grants


class Receiver:
    """The receive loop of one session's transport phase.

    :param reader: the session's frame reader.
    :param cipher: the receiving cipher.
    :param states: the session's directions (READY and CLOSE move them).
    :param events: the session's event queue, where finished messages' events go.
    :param control: the session's control writer, where answers owed (PONGs) go.
    :param limit: the largest encoded spack we accept.
    :param confirmed: the event READY completes the handshake with.
    :param channels: the connection's channels, if it negotiated them.
    """

    __slots__ = (
        "_answers",
        "_cipher",
        "_control",
        "_events",
        "_incoming",
        "_limit",
        "_reader",
        "_reset_here",
        "_states",
        "_work",
        "close_received",
        "confirmed",
        "demux",
        "paused",
        "pings_sent",
        "pongs_received",
        "reassembler",
        "rekeys",
    )

    def __init__(
        self,
        reader: FrameReader,
        cipher: TransportCipher,
        *,
        states: Directions,
        events: deque[Event],
        control: RecordWriter,
        limit: int,
        confirmed: HandshakeComplete,
        channels: ChannelTable | None = None,
    ) -> None:
        self._reader = reader
        self._cipher = cipher
        self._states = states
        self._events = events
        self._control = control
        self._limit = limit
        #: The event READY completes the handshake with; dropped once it is sent.
        self.confirmed: HandshakeComplete | None = confirmed
        self.reassembler = Reassembler(limit)
        #: With channels, routes each record to its channel (SPEC "Channels").
        self.demux = None if channels is None else Demux(channels, limit, self.reassembler)
        # With channels, the answers a one-record message owes (kept empty between uses).
        self._answers = RecordWriter() if channels is not None else None
        self._incoming: _Incoming | None = None
        # Channels we reset while a message was in progress: their pieces go at its end.
        self._reset_here: list[int] = []
        self._work = 0  # work done in the current progress() call
        #: The last call stopped before reading all it could (call again).
        self.paused = False
        self.pings_sent = 0
        self.pongs_received = 0
        #: How many REKEYs from the peer took effect (on the receiving cipher).
        self.rekeys = 0
        #: The peer's CLOSE, once received.
        self.close_received: CloseReceived | None = None

    @property
    def busy(self) -> bool:
        """Whether a transport message is in the middle of being processed."""
        return self._incoming is not None

    def channel_reset(self, channel_id: int) -> None:
        """We reset ``channel_id``: its pieces go once no record routed before needs them.

        Routing runs ahead of decoding by a batch: in the middle of a transport message,
        records of the channel routed before the reset are still to be decoded, from the
        pieces its reassembler holds. They go when the message is done.
        """
        demux = self.demux
        if demux is None:  # pragma: no cover - channels are reset only with channels
            return
        if self._incoming is None:
            demux.ended(channel_id)
        else:
            self._reset_here.append(channel_id)

    def reset(self) -> None:
        """Drop the message and the spack in progress (the session failed)."""
        self._incoming = None
        self.reassembler.reset()

    def progress(self) -> None:
        """Process input until an event is ready, the input runs out, or the step is done.

        :raises ~stalk.ProtocolError: the peer broke the protocol.
        """
        self._work = 0
        self.paused = False
        events = self._events
        reader = self._reader
        while not events:
            if self._incoming is not None:
                if not self._continue():
                    self.paused = True
                    return
                continue
            if self.close_received is not None:
                reader.discard()  # bytes after CLOSE are never read
                return
            if self._control.queued_bytes > OWED_LIMIT or (
                self._work >= STEP and reader.unconsumed
            ):
                # We owe the peer too many answers, or this call did enough: hand control
                # back before reading more (the peer's bytes wait in TCP's buffers).
                self.paused = True
                return
            try:
                frame = reader.frame()
            except FramingError as exc:
                raise ProtocolError(str(exc)) from None
            if frame is None:
                return
            buf, start, end = frame
            with memoryview(buf) as view, view[start:end] as body:
                self._message(body)

    def _message(self, body: memoryview) -> None:
        plaintext = memoryview(self._cipher.decrypt(body))
        demux = self.demux
        if self._states.can_receive_data:
            if demux is not None:
                if (record := lone_channel_piece(plaintext)) is not None:
                    self._lone_on_channel(plaintext, record, demux)
                    return
            elif (record := lone_piece(plaintext)) is not None and self._lone(plaintext, record):
                return
        if not plaintext:
            raise ProtocolError("transport message with no records")
        confirming = not self._states.can_receive_data
        parsed = 0
        if confirming:
            (first,), parsed = read_records(plaintext, 0, 1, channels=demux is not None)
            if first.kind is RecordKind.CLOSE:
                code, reason = decode_close(first.body)
                raise PeerRefused(
                    "the peer closed the connection during the handshake",
                    code=code,
                    reason=reason,
                )
            if first.kind is not RecordKind.READY:
                raise HandshakeFailed(f"expected READY, got {first.kind.name}")
        self._incoming = _Incoming(plaintext, parsed, confirming=confirming)
        self._continue()

    def _lone(self, plaintext: memoryview, lone: Record) -> bool:
        """A plaintext of one MESSAGE or FRAGMENT on channel 0, without channels.

        :returns: whether it is done with (else the record loop reads the plaintext).
        """
        reassembler = self.reassembler
        end = len(plaintext)
        kind, _, piece = lone
        if reassembler.decoder is None and (kind is _FRAGMENT or reassembler.joined is not None):
            bodies = reassembler.join(kind, piece)
            if bodies is None:
                self._work += RECORD_COST
                return True
            if len(bodies) > 1:  # outgrew joining: the record loop weighs both
                self._incoming = _Incoming(plaintext, end, confirming=False)
                self._incoming.records = bodies
                self._continue()
                return True
            lone = bodies[0]
            piece = lone.body
        whole = kind is _MESSAGE and reassembler.decoder is None
        if whole and len(piece) > self._limit:
            return False  # the record loop refuses it
        if whole and (spack := decode_fast(piece)) is not None:
            self._work += len(piece) + RECORD_COST
            self._events.append(MessageReceived(spack))
            return True
        # A piece, or a whole spack for the weigher.
        self._work += RECORD_COST
        spack, offset, work = reassembler.feed(kind, piece, 0, STEP - self._work)
        self._work += work
        if offset == len(piece):
            if spack is not None:
                self._events.append(MessageReceived(spack))
            return True
        # Out of budget inside the piece: the record loop resumes it.
        incoming = self._incoming = _Incoming(plaintext, end, confirming=False)
        incoming.records = [lone]
        incoming.offset = offset
        return True

    def _lone_on_channel(self, plaintext: memoryview, record: Record, demux: Demux) -> None:
        """A plaintext of one MESSAGE or FRAGMENT, with channels: the record loop, in short.

        Routed as :meth:`_next_batch` routes a batch; a whole spack that decodes at once
        becomes its event here, and a piece of a spack already being decoded piecewise is
        fed to its decoder here (a step out of budget leaves the rest to the record loop,
        as it would); anything else (a piece to join, a spack to weigh, one too large)
        goes to the record loop as the routed batch, so the channels' bookkeeping is done
        once either way. ``tests/test_channels_receive.py`` compares it with the record
        loop.
        """
        answers = self._answers
        if answers is None:  # pragma: no cover - created with the demux
            raise AssertionError("no answers writer without channels")
        kept = demux.route([record], self._events, answers)
        self._work += RECORD_COST
        if kept:
            kind, channel, body = record
            reassembler = demux.reassembler(channel)
            if reassembler.decoder is not None:
                spack, offset, work = reassembler.feed(kind, body, 0, STEP - self._work)
                self._work += work
                if offset < len(body):  # out of budget inside the piece: resumed there
                    incoming = self._incoming = _Incoming(
                        plaintext, len(plaintext), confirming=False
                    )
                    incoming.records = kept
                    incoming.offset = offset
                    if answers.pending():
                        incoming.grants, self._answers = answers, RecordWriter()
                    return
                if spack is not None:
                    self._events.append(
                        ChannelMessageReceived(spack, channel, reassembler.finished_size)
                    )
            elif (
                kind is not _MESSAGE
                or reassembler.joined is not None
                or len(body) > self._limit
                or (spack := decode_fast(body)) is None
            ):
                incoming = self._incoming = _Incoming(plaintext, len(plaintext), confirming=False)
                incoming.records = kept
                if answers.pending():
                    incoming.grants, self._answers = answers, RecordWriter()
                self._continue()
                return
            else:
                self._work += len(body)
                self._events.append(ChannelMessageReceived(spack, channel, len(body)))
        if answers.pending():  # sent once the message passed, as _finish() sends them
            if self._states.can_send_data:
                self._control.extend(answers)
            else:
                self._answers = RecordWriter()

    def _continue(self) -> bool:
        """Process the current transport message's records, within this call's work budget.

        :returns: whether the message is done (else the budget ran out: call again).
        """
        incoming = self._incoming
        if incoming is None:  # pragma: no cover - called only with a message in progress
            return True
        events = incoming.events
        limit = self._limit
        demux = self.demux
        reassembler = self.reassembler
        while True:
            records = incoming.records
            index = incoming.index
            while index < len(records):
                if self._work >= STEP:
                    incoming.index = index
                    return False
                kind, channel, body = records[index]
                if demux is not None:
                    reassembler = demux.reassembler(channel) if channel else demux.channel0
                if reassembler.decoder is None and (
                    kind is _FRAGMENT or (kind is _MESSAGE and reassembler.joined is not None)
                ):
                    bodies = reassembler.join(kind, body, channel)
                    if bodies is None:
                        index += 1
                        continue
                    records[index : index + 1] = bodies  # where a resumed step finds them
                    kind, _, body = records[index]
                if kind is _MESSAGE and reassembler.decoder is None and len(body) <= limit:
                    # A whole spack in one record: decoded at once unless it must be weighed.
                    spack = decode_fast(body)
                    if spack is None:
                        spack, incoming.offset, work = reassembler.feed(
                            kind, body, incoming.offset, STEP - self._work
                        )
                        self._work += work
                        if incoming.offset < len(body):
                            incoming.index = index
                            return False
                        incoming.offset = 0
                    else:
                        self._work += len(body)
                    if spack is not None:
                        events.append(
                            MessageReceived(spack)
                            if demux is None
                            else ChannelMessageReceived(spack, channel, len(body))
                        )
                elif self._record(incoming, kind, channel, body, reassembler):
                    incoming.offset = 0
                else:
                    incoming.index = index
                    return False  # a piecewise decoder ran out of budget inside this body
                index += 1
            if incoming.parsed == len(incoming.plaintext):
                break
            if self._work >= STEP:
                incoming.index = index
                return False
            self._next_batch(incoming)
        self._finish(incoming)
        return True

    def _next_batch(self, incoming: _Incoming) -> None:
        """Parse the next records of the message, as many as this call's budget allows."""
        demux = self.demux
        batch = max((STEP - self._work) // RECORD_COST, 1)
        records, incoming.parsed = read_records(
            incoming.plaintext, incoming.parsed, batch, channels=demux is not None
        )
        self._work += len(records) * RECORD_COST
        if demux is not None:
            records = demux.route(records, incoming.events, incoming.answers())
        incoming.records = _coalesce(records)
        incoming.index = 0

    def _finish(self, incoming: _Incoming) -> None:
        """Act on a transport message whose every record is processed (and only then)."""
        self._incoming = None
        if self._reset_here and self.demux is not None:
            for channel_id in self._reset_here:
                self.demux.ended(channel_id)
            self._reset_here.clear()
        if incoming.rekey:
            self._cipher.rekey()
            self.rekeys += 1
        if incoming.confirming:
            self._states.process(Input.READY_RECEIVED)
            if self.confirmed is not None:
                self._events.append(self.confirmed)
                self.confirmed = None
        if incoming.pings is not None:
            answers = incoming.answers()
            for body in incoming.pings:
                answers.add(RecordKind.PONG, body)
        if incoming.grants is not None and self._states.can_send_data:
            self._control.extend(incoming.grants)
        if self.close_received is not None:
            self._states.process(Input.CLOSE_RECEIVED)
        self._events.extend(incoming.events)

    def _received(
        self, spack: Spack, channel: int, size: int
    ) -> MessageReceived | ChannelMessageReceived:
        """The event for a spack decoded: with channels, with its channel and size."""
        if self.demux is None:
            return MessageReceived(spack)
        return ChannelMessageReceived(spack, channel, size)

    def _record(
        self,
        incoming: _Incoming,
        kind: RecordKind,
        channel: int,
        body: memoryview,
        reassembler: Reassembler,
    ) -> bool:
        """Act on one record other than a whole spack decoded at once.

        :returns: whether it is done (else the budget ran out inside a spack's piece).
        """
        if kind is _MESSAGE or kind is _FRAGMENT:
            if kind is _MESSAGE and reassembler.decoder is None:
                # A whole spack: the caller decodes it unless it is over the limit.
                raise MessageLimitExceeded(self._limit)
            spack, incoming.offset, work = reassembler.feed(
                kind, body, incoming.offset, STEP - self._work
            )
            self._work += work
            if spack is not None:
                incoming.events.append(self._received(spack, channel, reassembler.finished_size))
            return incoming.offset == len(body)
        if channel:
            self._channel_end(incoming, kind, channel, body, reassembler)
            if self.demux is not None:
                self.demux.ended(channel)
        elif kind is RecordKind.PING:
            if incoming.pings is None:
                incoming.pings = []
            incoming.pings.append(body)
            self._work += RECORD_COST
        elif kind is RecordKind.PONG:
            # One event per PING we sent; an unsolicited PONG is discarded (SPEC "Ping").
            if self.pongs_received < self.pings_sent:
                self.pongs_received += 1
                incoming.events.append(PongReceived(bytes(body)))
        elif kind is RecordKind.REKEY:
            incoming.rekey = True
        elif kind is RecordKind.CLOSE:
            code, reason = decode_close(body)
            if not self.reassembler.idle or (self.demux is not None and self.demux.busy):
                # A clean end would pass a cut spack off as whole; an error CLOSE says the
                # peer failed, and what it left incomplete is dropped (SPEC "Messages").
                if code == CloseCode.NORMAL:
                    raise ProtocolError("CLOSE NORMAL in the middle of a fragmented message")
                self.reassembler.reset()
            self.close_received = CloseReceived(code, reason)
            incoming.events.append(self.close_received)
        else:  # READY after confirmation
            raise ProtocolError(f"unexpected {kind.name} record")
        return True

    @staticmethod
    def _channel_end(
        incoming: _Incoming,
        kind: RecordKind,
        channel: int,
        body: memoryview,
        reassembler: Reassembler,
    ) -> None:
        """A CLOSE or RESET on a channel other than 0 (the demux kept only these)."""
        if kind is RecordKind.CLOSE:
            if not reassembler.idle:
                raise ProtocolError(f"CLOSE on channel {channel} in the middle of a spack")
            incoming.events.append(ChannelCloseReceived(channel))
        else:
            reassembler.reset()
            code, reason = decode_close(body, "RESET")
            incoming.events.append(ChannelResetReceived(channel, code, reason))
