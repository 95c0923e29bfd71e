"""Reassembly: the pieces of a spack (FRAGMENT records, then a MESSAGE) back into one spack.

Theory of operation
-------------------
A spack in one record is decoded by the receive loop at once. A spack in pieces goes
through a :class:`Reassembler`, which holds what a peer can make us hold for it and counts
it as it really is (SPEC "Resource model"):

- while the pieces total at most :data:`JOIN_LIMIT` bytes they are joined (copied) and the
  spack is decoded at its end, exactly like a spack in one record: small spacks come in
  pieces whenever they straddle two Noise messages, and decoding them as they arrive
  costs several times decoding them whole. A first piece that fills its plaintext is held
  as it came, a view that pins little more than itself (:func:`~stalk.spack.pins_little`);
- a larger spack is weighed and decoded as it arrives by a
  :class:`~stalk.spack.SpackDecoder`, which keeps its pieces the same way, never a view
  that pins a larger plaintext.

Work is counted in the receive loop's units (:data:`WEIGHED_COST` per byte weighed), so
the loop can stop in the middle of a piece and resume it later.
"""

from __future__ import annotations

from typing import Final

from stalk.errors import MessageLimitExceeded
from stalk.records import Record
from stalk.spack import Spack, SpackDecoder, pins_little
from stalk.wire import RECORD_CAPACITY, RecordKind

__all__ = ["JOIN_LIMIT", "WEIGHED_COST", "Reassembler"]

#: A spack in pieces is joined while its pieces total at most what one record can carry.
JOIN_LIMIT: Final = RECORD_CAPACITY
#: Receive-loop work units per byte weighed and decoded piecewise (the dearest shapes,
#: measured): see ``stalk.receiver``.
WEIGHED_COST: Final = 6
_MESSAGE: Final = RecordKind.MESSAGE
_FRAGMENT: Final = RecordKind.FRAGMENT


class Reassembler:
    """The spack being rebuilt from pieces, if any.

    :param limit: the largest encoded spack we accept (``max_message_size``).
    """

    __slots__ = ("decoder", "finished_size", "joined", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: The spack being decoded piecewise (fragmented, or weighed first), if any.
        self.decoder: SpackDecoder | None = None
        #: The pieces so far of a spack being joined (see :data:`JOIN_LIMIT`).
        self.joined: bytearray | memoryview | None = None
        #: The encoded size (its data bytes) of the spack the last :meth:`feed` completed.
        self.finished_size = 0

    @property
    def idle(self) -> bool:
        """Whether no spack is in the middle of its pieces."""
        return self.decoder is None and self.joined is None

    def reset(self) -> None:
        """Drop any spack in progress (the session failed)."""
        self.decoder = None
        self.joined = None

    def join(self, kind: RecordKind, piece: memoryview, channel: int = 0) -> list[Record] | None:
        """Join one piece of a spack that may still fit :data:`JOIN_LIMIT` bytes in all.

        :returns: ``None`` while joining; else the records to decode now, in order: the
            piece alone (nothing was joined), or the spack that ended here, joined whole.
            A spack that outgrows joining and goes on is weighed from its first byte:
            the bytes joined so far, then the piece (a decoder is started for them;
            they are not copied together).
        :raises ~stalk.MessageLimitExceeded: the pieces total more than our limit.
        """
        joined = self.joined
        total = len(piece) if joined is None else len(joined) + len(piece)
        if total > self.limit:
            raise MessageLimitExceeded(self.limit)
        if kind is _FRAGMENT and total <= JOIN_LIMIT:
            if joined is None:
                # The usual first piece of a large spack fills its plaintext: held as is.
                self.joined = piece if pins_little(piece) else bytearray(piece)
            else:
                if isinstance(joined, memoryview):
                    joined = self.joined = bytearray(joined)
                joined += piece
            return None
        if joined is None:
            return [Record(kind, channel, piece)]
        self.joined = None
        if kind is _FRAGMENT:
            self.decoder = SpackDecoder(self.limit)
            return [
                Record(_FRAGMENT, channel, memoryview(joined)),
                Record(_FRAGMENT, channel, piece),
            ]
        return [Record(kind, channel, memoryview(b"".join((joined, piece))))]

    def feed(
        self, kind: RecordKind, body: memoryview, offset: int, room: int
    ) -> tuple[Spack | None, int, int]:
        """Decode ``body[offset:]`` piecewise, within ``room`` work units.

        A fragmented spack, or one whose containers the fast decoder leaves to the weigher,
        goes through a :class:`~stalk.spack.SpackDecoder`.

        :returns: the spack the body completes (if it does), how far into the body the
            decoder got (``len(body)`` once all of it is taken), and the work it cost.
        :raises ~stalk.MessageLimitExceeded: the pieces total more than our limit.
        """
        limit = self.limit
        decoder = self.decoder
        if decoder is None:
            if kind is _MESSAGE:  # a whole spack in this record: its size is known
                decoder = SpackDecoder(len(body), complete=True)
            else:
                decoder = SpackDecoder(limit)
            self.decoder = decoder
        if not offset and decoder.size + len(body) > limit:
            # The running total of the pieces, checked before any of this one is taken.
            raise MessageLimitExceeded(limit)
        work = 0
        while offset < len(body):
            if room - work <= 0:
                return None, offset, work
            done = decoder.work
            offset += decoder.feed(body[offset:] if offset else body, (room - work) // WEIGHED_COST)
            work += (decoder.work - done) * WEIGHED_COST + 1
        if kind is _FRAGMENT:
            return None, offset, work
        self.decoder = None
        self.finished_size = decoder.size
        return decoder.finish(), offset, work
