"""The send side of channels: spacks of many channels into plaintexts, fairly, within credit.

Theory of operation
-------------------
On a connection with channels (SPEC "Channels") the application's spacks, channel 0's
included, go through a :class:`Mux` instead of a :class:`~stalk.records.RecordWriter`:

- :meth:`Mux.queue` keeps a spack's encoding, by channel, in the order queued;
  :meth:`Mux.flush` makes everything queued so far sendable (as ``flush()`` does without
  channels);
- :meth:`Mux.next_plaintext` builds plaintexts only as the sealer asks, so what goes
  into the next Noise message is decided as late as possible: **fairness** comes from
  taking the channels in turn, each turn at most what fills the plaintext, so a small
  spack on one channel waits behind about one Noise message of a large spack on another;
- **credit**: a data record's body never exceeds what the peer granted, on the channel and
  on the connection. A spack larger than that goes out in FRAGMENTs as credit arrives (the
  receiver's assembly slot lets a spack larger than the window through). A channel out of
  credit is skipped until a WINDOW arrives; the session then asks for plaintexts again;
- a channel's CLOSE follows its last spack; a RESET drops what the channel had not sent.

Records are packed as :class:`~stalk.records.RecordWriter` packs them (SPEC "How stalk
packs records"): a spack that fits goes whole; otherwise the largest FRAGMENT that fits
both the plaintext and the credit, unless the plaintext has less than 512 bytes of room,
when a new plaintext starts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final

from stalk.channels import ChannelInput, ChannelTable
from stalk.records import encode_uvarint, largest_fitting, take_views, uvarint_len
from stalk.wire import RECORD_CAPACITY, RecordKind

__all__ = ["Mux"]

#: Room under which a plaintext is finished rather than carrying a tiny FRAGMENT.
_MIN_FRAGMENT: Final = 512
_SPARE_QUEUES: Final = 64
_CHANNEL_CLOSE: Final = b"\x00\x00"
_MESSAGE: Final = RecordKind.MESSAGE
_FRAGMENT: Final = RecordKind.FRAGMENT
_MESSAGE_BYTE: Final = int(RecordKind.MESSAGE)


class _Outgoing:
    """One spack's encoding on its way out: what is left of it, as views."""

    __slots__ = ("left", "views")

    def __init__(self, pieces: Sequence[bytes | memoryview]) -> None:
        if len(pieces) == 1:  # a small spack's encoding is one piece
            self.views = deque((memoryview(pieces[0]),))
            self.left = len(pieces[0])
        else:
            self.views = deque(memoryview(piece) for piece in pieces if len(piece))
            self.left = sum(map(len, self.views))

    def take(self, size: int) -> list[memoryview]:
        """The next ``size`` bytes, as views."""
        self.left -= size
        return take_views(self.views, size)


class _OpeningReset:
    """The RESET of a channel no record of which went out yet.

    Alone it would be a RESET on a channel the peer never saw opened (an error), so its
    CLOSE goes first, in the same plaintext: that opens it, and the RESET ends it.
    """

    __slots__ = ("record",)

    def __init__(self, channel: int, body: bytes) -> None:
        self.record = (
            _header(RecordKind.CLOSE, channel, 2)
            + _CHANNEL_CLOSE
            + _header(RecordKind.RESET, channel, len(body))
            + body
        )


#: A channel's queue holds spacks, and at most one CLOSE (or opening RESET), last. A spack
#: encoded in one piece waits as those bytes (most spacks: no object around them); it
#: becomes an :class:`_Outgoing` only if it has to go in parts.
_Item = bytes | _Outgoing | _OpeningReset | None  # None: the channel's CLOSE
_DATA: Final = (bytes, _Outgoing)


def _header(kind: RecordKind, channel: int, length: int) -> bytes:
    if channel < 0x80 and length < 0x80:  # both varints one byte (small spacks, low ids)
        return bytes((kind, channel, length))
    return bytes((kind,)) + encode_uvarint(channel) + encode_uvarint(length)


class Mux:
    """The queued spacks of every channel, packed into plaintexts in turn within credit.

    :param table: the connection's channels and credit.
    :param capacity: plaintext bytes per Noise message available for records.
    """

    __slots__ = (
        "_by_channel",
        "_capacity",
        "_queues",
        "_spare",
        "_table",
        "_unflushed",
        "closing",
        "queued_bytes",
        "runs",
    )

    def __init__(self, table: ChannelTable, capacity: int = RECORD_CAPACITY) -> None:
        self._table = table
        self._capacity = capacity
        # Sendable items by channel, in turn order (a dict keeps insertion order; a
        # channel that had its turn moves to the end).
        self._queues: dict[int, deque[_Item]] = {}
        # Queues emptied by packing, kept for the next channel that needs one (at most
        # _SPARE_QUEUES): with many channels, most flushes find a channel with none.
        self._spare: list[deque[_Item]] = []
        self._unflushed: list[tuple[int, _Item]] = []
        #: Data bytes queued and not yet packed (flushed or not).
        self.queued_bytes = 0
        self._by_channel: dict[int, int] = {}  # the same, per channel (none: 0)
        #: Channels whose CLOSE is queued and not yet packed: nothing more may be queued.
        self.closing: set[int] = set()
        #: Pack runs of small spacks in short (:meth:`_run`); ``False`` only to compare.
        self.runs = True

    def queue(self, channel: int, pieces: Sequence[bytes | memoryview]) -> None:
        """Queue one spack's encoding (the concatenation of ``pieces``) on ``channel``."""
        item: bytes | _Outgoing
        if len(pieces) == 1 and type(pieces[0]) is bytes:
            item = pieces[0]
            size = len(item)
        else:
            item = _Outgoing(pieces)
            size = item.left
        self.queued_bytes += size
        by_channel = self._by_channel
        by_channel[channel] = by_channel.get(channel, 0) + size
        self._unflushed.append((channel, item))

    def queued_on(self, channel: int) -> int:
        """Data bytes queued on ``channel`` and not yet packed (flushed or not)."""
        return self._by_channel.get(channel, 0)

    def _packed(self, channel: int, size: int) -> None:
        """``size`` data bytes of ``channel`` went into a plaintext."""
        self.queued_bytes -= size
        left = self._by_channel.get(channel, 0) - size
        if left:
            self._by_channel[channel] = left
        else:
            self._by_channel.pop(channel, None)

    def queue_close(self, channel: int) -> None:
        """Queue the CLOSE of ``channel`` (not 0) after its spacks.

        The channel's state moves (CLOSE sent) when the record is packed: until then it
        is still open for the credit its spacks wait for.
        """
        self._unflushed.append((channel, None))
        self.closing.add(channel)

    def flush(self) -> None:
        """Make everything queued so far sendable."""
        queues, spare = self._queues, self._spare
        for channel, item in self._unflushed:
            queue = queues.get(channel)
            if queue is None:
                queue = queues[channel] = spare.pop() if spare else deque()
            queue.append(item)
        self._unflushed.clear()

    def queue_opening_reset(self, channel: int, body: bytes) -> None:
        """Queue the RESET (``body``) of ``channel``, none of whose records went out yet.

        Sendable at once: its CLOSE opens the channel on the wire, its RESET follows.
        """
        self._queues.setdefault(channel, deque()).append(_OpeningReset(channel, body))

    def drop(self, channel: int) -> None:
        """Forget what ``channel`` has not sent (it is being reset)."""
        queue = self._queues.pop(channel, None) or ()
        unflushed = [entry for entry in self._unflushed if entry[0] == channel]
        for item in [*queue, *(item for _, item in unflushed)]:
            if isinstance(item, _Outgoing):
                self.queued_bytes -= item.left
            elif isinstance(item, bytes):
                self.queued_bytes -= len(item)
        self._by_channel.pop(channel, None)
        self._unflushed = [entry for entry in self._unflushed if entry[0] != channel]
        self.closing.discard(channel)

    def unsent(self) -> bool:
        """Whether anything queued (flushed or not) is still to be packed."""
        return bool(self._queues or self._unflushed)

    def sendable(self) -> bool:
        """Whether a flushed item could go out now (within credit, or a CLOSE)."""
        if not self._queues:
            return False
        table = self._table
        connection = table.connection.send
        for channel, queue in self._queues.items():
            if not isinstance(queue[0], _DATA) or (connection and table.credit(channel).send):
                return True
        return False

    def next_plaintext(self) -> bytearray | None:
        """The next plaintext of what is sendable, built now; ``None`` when nothing can go.

        Ask again after more is flushed or credit arrives.
        """
        return (self._fill() or None) if self._queues else None

    def contended(self) -> bool:
        """Whether several channels have something queued (they take turns)."""
        return len(self._queues) > 1

    def backlog(self) -> int:
        """About what the next plaintexts carry: data queued, within credit.

        One channel's queue within its own credit and the connection's; several channels'
        within the connection's.
        """
        table = self._table
        queues = self._queues
        if len(queues) == 1:
            channel = next(iter(queues))
            if size := self._by_channel.get(channel, 0):  # (data queued: the channel is open)
                size = min(size, table.credit(channel).send)
        else:
            size = self.queued_bytes
        return min(size, table.connection.send)

    def _fill(self) -> bytearray:
        """One plaintext: the channels in turn, each until the plaintext or its data ends."""
        plaintext = bytearray()
        queues = self._queues
        waiting: dict[int, deque[_Item]] = {}  # out of credit: skipped, keeping their turn
        while queues:
            channel = next(iter(queues))
            queue = queues.pop(channel)
            before = len(plaintext)
            full = self._turn(channel, queue, plaintext)
            if channel and len(plaintext) > before:
                self._table.sent_on(channel)
            if queue:
                if full or not isinstance(queue[0], _DATA) or self._can_send(channel):
                    queues[channel] = queue  # the back of the line
                else:
                    waiting[channel] = queue
            elif len(self._spare) < _SPARE_QUEUES:
                self._spare.append(queue)
            if full:
                break
        queues.update(waiting)
        return plaintext

    def _can_send(self, channel: int) -> bool:
        table = self._table
        return bool(table.connection.send and table.credit(channel).send)

    def _turn(self, channel: int, queue: deque[_Item], plaintext: bytearray) -> bool:
        """Pack ``channel``'s items into ``plaintext``; whether the plaintext is full."""
        table = self._table
        capacity = self._capacity
        while queue:
            item = queue[0]
            if item is None:  # the channel's CLOSE
                record = _header(RecordKind.CLOSE, channel, 2) + _CHANNEL_CLOSE
                if len(plaintext) + len(record) > capacity:
                    return True
                plaintext += record
                queue.popleft()
                self.closing.discard(channel)
                table.process(table.channels[channel], ChannelInput.CLOSE_SENT)
                continue
            if isinstance(item, _OpeningReset):
                if len(plaintext) + len(item.record) > capacity:
                    return True
                plaintext += item.record
                queue.popleft()
                continue
            credit = table.connection.send
            if (on_channel := table.credit(channel).send) < credit:
                credit = on_channel
            if not credit:
                return False
            if type(item) is bytes and self.runs and self._run(channel, queue, plaintext, credit):
                continue
            avail = capacity - len(plaintext) - 1 - uvarint_len(channel)
            if isinstance(item, bytes):
                left = len(item)
                if left <= credit and left + uvarint_len(left) <= avail:  # whole: as below
                    plaintext += _header(_MESSAGE, channel, left)
                    plaintext += item
                    self._spend(channel, left)
                    self._packed(channel, left)
                    queue.popleft()
                    continue
                item = queue[0] = _Outgoing((item,))  # in parts, as any spack
            left = item.left
            if left <= credit and left + uvarint_len(left) <= avail:
                plaintext += _header(_MESSAGE, channel, left)
                for view in item.take(left):
                    plaintext += view
                self._spend(channel, left)
                self._packed(channel, left)
                queue.popleft()
                continue
            room = largest_fitting(avail)
            if not left or (room < _MIN_FRAGMENT and room < min(credit, left)):
                # Too little room for a piece worth its header (or for an empty spack's
                # MESSAGE, which has no piece to cut): the next plaintext.
                return True
            size = min(room, credit, left)
            plaintext += _header(_FRAGMENT, channel, size)
            for view in item.take(size):
                plaintext += view
            self._spend(channel, size)
            self._packed(channel, size)
        return False

    def _run(self, channel: int, queue: deque[_Item], plaintext: bytearray, credit: int) -> int:
        """Pack the run of whole one-piece spacks at the head of ``queue`` that fits.

        The general loop's work for such spacks, with credit spent once for the run: each
        spack that fits whole in the plaintext and the credit left becomes one MESSAGE.
        ``tests/test_channels_session.py`` compares it with the general loop.

        :returns: how many spacks it packed (0: the first did not fit; the general loop
            takes it).
        """
        # A MESSAGE's header: this prefix (kind and channel id), then the body's length.
        prefix = bytes((_MESSAGE_BYTE,)) + encode_uvarint(channel)
        base = self._capacity - len(prefix)
        spent = packed = 0
        item = queue[0]
        while type(item) is bytes:
            left = len(item)
            short = left < 0x80  # a one-byte length: most small spacks
            room = base - len(plaintext)
            if spent + left > credit or left + (1 if short else uvarint_len(left)) > room:
                break
            plaintext += prefix
            if short:
                plaintext.append(left)
            else:
                plaintext += encode_uvarint(left)
            plaintext += item
            spent += left
            packed += 1
            queue.popleft()
            if not queue:
                break
            item = queue[0]
        if packed:
            self._spend(channel, spent)
            self._packed(channel, spent)
        return packed

    def _spend(self, channel: int, size: int) -> None:
        table = self._table
        table.connection.spend(size)
        table.credit(channel).spend(size)
