"""The transport phase's receive loop: frames in, records checked and decoded, events out.

Theory of operation
-------------------
A :class:`Receiver` takes frames from the session's :class:`~stalk.framing.FrameReader`,
decrypts each into a plaintext and acts on its records (SPEC "Records"):

- nothing of a Noise message is delivered until every one of its records is parsed,
  checked and decoded (by the :class:`~stalk.record_loop.RecordLoop`): its events wait in
  an :class:`~stalk.record_loop.Incoming` until then, so a bad record anywhere means
  nothing from that message is delivered;
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

from collections import deque
from typing import Final

from stalk._noise import TransportCipher
from stalk.channels import ChannelTable
from stalk.demux import Demux
from stalk.errors import ProtocolError
from stalk.events import (
    ChannelMessageReceived,
    CloseReceived,
    Event,
    HandshakeComplete,
    MessageReceived,
)
from stalk.framing import FrameReader, FramingError
from stalk.reassembly import Reassembler
from stalk.record_loop import RECORD_COST, STEP, Incoming, RecordLoop
from stalk.records import (
    Record,
    RecordWriter,
    lone_channel_piece,
    lone_piece,
)
from stalk.spack import decode_fast
from stalk.states import Directions, Input
from stalk.wire import RECORD_CAPACITY, RecordKind

__all__ = ["OWED_LIMIT", "RECORD_COST", "STEP", "Receiver"]

#: Answers owed to the peer (PONGs not yet taken by the driver) beyond which the receiver
#: reads no more input until the driver takes its output: one Noise message.
OWED_LIMIT: Final = RECORD_CAPACITY

# Enum members as the record loop keeps them (see stalk.record_loop), for the fast paths.
_MESSAGE: Final = RecordKind.MESSAGE
_FRAGMENT: Final = RecordKind.FRAGMENT
#: Builds a ChannelMessageReceived without NamedTuple's Python-level ``__new__`` (one per
#: spack received).
_new_event: Final = tuple.__new__


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
        "_loop",
        "_reader",
        "_reset_here",
        "_states",
        "_work",
        "close_received",
        "confirmed",
        "demux",
        "paused",
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
        self.demux = (
            None
            if channels is None
            else Demux(channels, limit, self.reassembler, control=control, states=states)
        )
        # With channels, the answers a one-record message owes (kept empty between uses).
        self._answers = RecordWriter() if channels is not None else None
        self._incoming: Incoming | None = None
        self._loop = RecordLoop(limit, self.reassembler, self.demux)
        # Channels we reset while a message was in progress: their pieces go at its end.
        self._reset_here: list[int] = []
        self._work = 0  # work done in the current progress() call
        #: The last call stopped before reading all it could (call again).
        self.paused = False
        #: How many REKEYs from the peer took effect (on the receiving cipher).
        self.rekeys = 0
        #: The peer's CLOSE, once received.
        self.close_received: CloseReceived | None = None

    @property
    def busy(self) -> bool:
        """Whether a transport message is in the middle of being processed."""
        return self._incoming is not None

    @property
    def pings_sent(self) -> int:
        """How many PINGs we sent: as many PONGs become events (SPEC "Ping")."""
        return self._loop.pings_sent

    @pings_sent.setter
    def pings_sent(self, count: int) -> None:
        self._loop.pings_sent = count

    def channel_reset(self, channel_id: int) -> None:
        """We reset ``channel_id``: its pieces go once no record routed before needs them.

        Routing runs ahead of decoding by a batch: in the middle of a transport message,
        records of the channel routed before the reset may still need the pieces its
        reassembler holds. They go when the message is done.
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
            if (incoming := self._incoming) is not None:
                if not self._continue(incoming):
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
        parsed = self._loop.ready(plaintext) if confirming else 0
        incoming = self._incoming = Incoming(plaintext, parsed, confirming=confirming)
        self._continue(incoming)

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
                incoming = self._incoming = Incoming(plaintext, end, confirming=False)
                incoming.records = bodies
                self._continue(incoming)
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
        incoming = self._incoming = Incoming(plaintext, end, confirming=False)
        incoming.records = [lone]
        incoming.offset = offset
        return True

    def _lone_on_channel(self, plaintext: memoryview, record: Record, demux: Demux) -> None:
        """A plaintext of one MESSAGE or FRAGMENT, with channels: the record loop, in short.

        Routed as the record loop routes a batch; a whole spack that decodes at once, or a
        piece of one being decoded piecewise, is done here (a step out of budget leaves the
        rest to the record loop, as it would); anything else (a piece to join, a spack to
        weigh, one too large) goes to the record loop as the routed batch, so the channels'
        bookkeeping is done once either way (``tests/test_channels_receive.py`` checks it).
        """
        kind, channel, body = record
        if kind is _MESSAGE and not channel and demux.count_lone(len(body)):
            # A whole spack on channel 0, the most common plaintext: counted, then decoded
            # here if it can be at once (as below), else by the record loop.
            self._work += RECORD_COST
            reassembler = demux.channel0
            if (
                reassembler.decoder is None
                and reassembler.joined is None
                and len(body) <= self._limit
                and (spack := decode_fast(body)) is not None
            ):
                self._work += len(body)
                self._events.append(_new_event(ChannelMessageReceived, (spack, 0, len(body))))
                return
            incoming = self._incoming = Incoming(plaintext, len(plaintext), confirming=False)
            incoming.records = [record]
            self._continue(incoming)
            return
        answers = self._answers
        if answers is None:  # pragma: no cover - created with the demux
            raise AssertionError("no answers writer without channels")
        kept = demux.route([record], self._events, answers)
        self._work += RECORD_COST
        if kept:
            reassembler = demux.reassembler(channel)
            if reassembler.decoder is not None:
                spack, offset, work = reassembler.feed(kind, body, 0, STEP - self._work)
                self._work += work
                if offset < len(body):  # out of budget inside the piece: resumed there
                    incoming = self._incoming = Incoming(
                        plaintext, len(plaintext), confirming=False
                    )
                    incoming.records = kept
                    incoming.offset = offset
                    if answers.pending():
                        incoming.grants, self._answers = answers, RecordWriter()
                    return
                if spack is not None:
                    size = reassembler.finished_size
                    self._events.append(_new_event(ChannelMessageReceived, (spack, channel, size)))
            elif (
                kind is not _MESSAGE
                or reassembler.joined is not None
                or len(body) > self._limit
                or (spack := decode_fast(body)) is None
            ):
                incoming = self._incoming = Incoming(plaintext, len(plaintext), confirming=False)
                incoming.records = kept
                if answers.pending():
                    incoming.grants, self._answers = answers, RecordWriter()
                self._continue(incoming)
                return
            else:
                self._work += len(body)
                self._events.append(_new_event(ChannelMessageReceived, (spack, channel, len(body))))
        if answers.pending():  # sent once the message passed, as _finish() sends them
            if self._states.can_send_data:
                self._control.extend(answers)
            else:
                self._answers = RecordWriter()

    def _continue(self, incoming: Incoming) -> bool:
        """Run the record loop on the message in progress, within this call's work budget.

        :returns: whether the message is done (else the budget ran out: call again).
        """
        loop = self._loop
        loop.work = self._work  # lent for the run: the loop counts on from there
        done = loop.run(incoming)
        self._work = loop.work
        if done:
            self._finish(incoming)
        return done

    def _finish(self, incoming: Incoming) -> None:
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
        if incoming.close is not None:
            self.close_received = incoming.close
            self._states.process(Input.CLOSE_RECEIVED)
        self._events.extend(incoming.events)
