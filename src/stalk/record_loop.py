"""The record loop: one transport message's records, checked and decoded within the budget.

A :class:`RecordLoop` takes a decrypted plaintext from the :class:`~stalk.receiver.Receiver`
(as an :class:`Incoming`) and acts on its records in order (SPEC "Records"): it parses them
a batch at a time (with channels, routed by the :class:`~stalk.demux.Demux`), decodes each
whole spack at once, feeds spacks in pieces to their
:class:`~stalk.reassembly.Reassembler`, and notes what the other records ask for (PINGs to
answer, a REKEY, a CLOSE, a channel's end) in the message, whose events and answers the
receiver delivers once every record passed. It counts its work in the units of
``stalk.receiver``'s theory of operation and stops, resumable, when the step is done.
"""

from __future__ import annotations

import operator
from typing import Final

from stalk.demux import Demux
from stalk.errors import HandshakeFailed, MessageLimitExceeded, PeerRefused, ProtocolError
from stalk.events import (
    ChannelCloseReceived,
    ChannelMessageReceived,
    ChannelResetReceived,
    CloseReceived,
    Event,
    MessageReceived,
    PongReceived,
)
from stalk.reassembly import Reassembler
from stalk.records import (
    Record,
    RecordWriter,
    decode_close,
    read_channel_records,
    read_records,
)
from stalk.spack import Spack, decode_fast
from stalk.wire import CloseCode, RecordKind

__all__ = ["RECORD_COST", "STEP", "Incoming", "RecordLoop"]

#: The most receive work one progress() call does (see ``stalk.receiver``).
STEP: Final = 120_000
RECORD_COST: Final = 32

# Looking an enum member up on its class costs about 0.2 us (Python 3.11): the loop, which
# does it per record, uses these.
_MESSAGE: Final = RecordKind.MESSAGE
_FRAGMENT: Final = RecordKind.FRAGMENT
_KIND: Final = operator.itemgetter(0)
#: Builds a ChannelMessageReceived without NamedTuple's Python-level ``__new__`` (one per
#: spack received).
_new_event: Final = tuple.__new__


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


class Incoming:
    """A transport message being processed, possibly over several progress() calls."""

    __slots__ = (
        "close",
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
        self.close: CloseReceived | None = None  # its CLOSE, the last of its records

    def answers(self) -> RecordWriter:
        """The writer of this message's grants (created when the first one is owed)."""
        if self.grants is None:
            self.grants = RecordWriter()
        return self.grants


class RecordLoop:
    """The record loop of one session's receiver: a transport message's records, in order.

    :param limit: the largest encoded spack we accept.
    :param reassembler: the spacks in pieces without channels (channel 0's with them).
    :param demux: with channels, routes each record to its channel (SPEC "Channels").
    """

    __slots__ = (
        "_limit",
        "demux",
        "pings_sent",
        "pongs_received",
        "reassembler",
        "work",
    )

    def __init__(
        self,
        limit: int,
        reassembler: Reassembler,
        demux: Demux | None,
    ) -> None:
        self._limit = limit
        self.reassembler = reassembler
        self.demux = demux
        #: Work done in the receiver's current progress() call (it lends its count to a run).
        self.work = 0
        #: PINGs we sent, and the PONGs that became events: any other PONG is discarded.
        self.pings_sent = 0
        self.pongs_received = 0

    def ready(self, plaintext: memoryview) -> int:
        """Where a message confirming the handshake goes on past the READY it starts with.

        SPEC "Confirmation": READY is the first record of the peer's first transport message.

        :raises ~stalk.PeerRefused: it starts with the peer's CLOSE.
        :raises ~stalk.HandshakeFailed: it starts with anything else.
        """
        (first,), parsed = read_records(plaintext, 0, 1, channels=self.demux is not None)
        if first.kind is RecordKind.CLOSE:
            code, reason = decode_close(first.body)
            raise PeerRefused(
                "the peer closed the connection during the handshake", code=code, reason=reason
            )
        if first.kind is not RecordKind.READY:
            raise HandshakeFailed(f"expected READY, got {first.kind.name}")
        return parsed

    def run(self, incoming: Incoming) -> bool:
        """Process the records of a transport message, within the step's work budget.

        :returns: whether its every record passed (else the budget ran out: call again).
        """
        events = incoming.events
        limit = self._limit
        demux = self.demux
        reassembler = self.reassembler
        while True:
            records = incoming.records
            index = incoming.index
            while index < len(records):
                if self.work >= STEP:
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
                            kind, body, incoming.offset, STEP - self.work
                        )
                        self.work += work
                        if incoming.offset < len(body):
                            incoming.index = index
                            return False
                        incoming.offset = 0
                    else:
                        self.work += len(body)
                    if spack is not None:
                        events.append(
                            MessageReceived(spack)
                            if demux is None
                            else _new_event(ChannelMessageReceived, (spack, channel, len(body)))
                        )
                elif self._record(incoming, kind, channel, body, reassembler):
                    incoming.offset = 0
                else:
                    incoming.index = index
                    return False  # a piecewise decoder ran out of budget inside this body
                index += 1
            if incoming.parsed == len(incoming.plaintext):
                break
            if self.work >= STEP:
                incoming.index = index
                return False
            self._next_batch(incoming)
        return True

    def _next_batch(self, incoming: Incoming) -> None:
        """Parse the next records of the message, as many as this call's budget allows."""
        demux = self.demux
        batch = max((STEP - self.work) // RECORD_COST, 1)
        if demux is None:
            records, incoming.parsed = read_records(incoming.plaintext, incoming.parsed, batch)
            self.work += len(records) * RECORD_COST
        else:
            records, incoming.parsed, data = read_channel_records(
                incoming.plaintext, incoming.parsed, batch
            )
            self.work += len(records) * RECORD_COST
            records = demux.route(records, incoming.events, incoming.answers(), data)
        incoming.records = _coalesce(records)
        incoming.index = 0

    def _received(
        self, spack: Spack, channel: int, size: int
    ) -> MessageReceived | ChannelMessageReceived:
        """The event for a spack decoded: with channels, with its channel and size."""
        if self.demux is None:
            return MessageReceived(spack)
        return _new_event(ChannelMessageReceived, (spack, channel, size))

    def _record(
        self,
        incoming: Incoming,
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
                kind, body, incoming.offset, STEP - self.work
            )
            self.work += work
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
            self.work += RECORD_COST
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
            incoming.close = CloseReceived(code, reason)
            incoming.events.append(incoming.close)
        else:  # READY after confirmation
            raise ProtocolError(f"unexpected {kind.name} record")
        return True

    @staticmethod
    def _channel_end(
        incoming: Incoming,
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
