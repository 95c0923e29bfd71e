"""The record layer: what goes inside each Noise transport message.

Theory of operation
-------------------
After the handshake every frame body is one Noise transport message, and its plaintext is a
sequence of one or more records (SPEC "Records")::

    kind (u8) || channel (uvarint) || length (uvarint) || body (length bytes)

Sending (:class:`RecordWriter`): records are queued, then :meth:`RecordWriter.pack` packs
them greedily into plaintexts of at most :data:`~stalk.wire.RECORD_CAPACITY` bytes, so many
small spacks share one Noise message (batching) and a spack too large for the space left is
split into FRAGMENT records ending with one MESSAGE (fragmentation). Each packed plaintext is
handed out as soon as it is full, so memory stays near one Noise message beyond the queued
spacks themselves. A spack given as pieces (:meth:`RecordWriter.add_message_pieces`, for a
large trailing payload kept out of msgpack's buffer) is fragmented the same way, each byte
copied once, into its plaintext.

Receiving (:func:`parse_records`): a plaintext is parsed *whole* before anything in it is
acted on, so a malformed record anywhere in a Noise message means nothing from that
message is delivered. The session hands MESSAGE and FRAGMENT bodies to the spack decoders
(:mod:`stalk.spack`), which rebuild a fragmented spack piece by piece within its limits.

Invariants checked here (each a :class:`~stalk.ProtocolError`): known kinds only; channel 0
only (version 1); minimal varints; a length that fits in what is left; CLOSE and REKEY last
in their Noise message; empty bodies for READY and REKEY; bounded PING/PONG and CLOSE bodies;
no empty FRAGMENT.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Final, NamedTuple

from stalk.errors import ProtocolError
from stalk.wire import (
    MAX_CHANNEL_ID,
    MAX_CLOSE_REASON,
    MAX_PING_PAYLOAD,
    MAX_WINDOW,
    RECORD_CAPACITY,
    RecordKind,
)

__all__ = [
    "Record",
    "RecordWriter",
    "check_close",
    "decode_close",
    "decode_window",
    "encode_close",
    "encode_uvarint",
    "largest_fitting",
    "lone_channel_piece",
    "lone_piece",
    "parse_records",
    "read_channel_records",
    "read_records",
    "read_uvarint",
    "take_views",
    "uvarint_len",
]

_U16: Final = struct.Struct(">H")
#: The kinds a channel-less (version 1) connection knows; channels add the rest.
_CHANNEL_KINDS: Final = frozenset(
    {RecordKind.RESET, RecordKind.WINDOW, RecordKind.CONNECTION_WINDOW}
)
_KIND_BY_BYTE: Final = {int(k): k for k in RecordKind if k not in _CHANNEL_KINDS}
_ALL_KINDS_BY_BYTE: Final = {int(k): k for k in RecordKind}
_WINDOW_KINDS: Final = frozenset({RecordKind.WINDOW, RecordKind.CONNECTION_WINDOW})
#: The kinds a channel other than 0 may carry.
_ON_CHANNELS: Final = frozenset(
    {
        RecordKind.MESSAGE,
        RecordKind.FRAGMENT,
        RecordKind.CLOSE,
        RecordKind.RESET,
        RecordKind.WINDOW,
    }
)
#: A channel's CLOSE body: code NORMAL (0), no reason.
_CHANNEL_CLOSE_BODY: Final = b"\x00\x00"
_PIECE_BYTES: Final = frozenset({int(RecordKind.MESSAGE), int(RecordKind.FRAGMENT)})
_MESSAGE_BYTE: Final = int(RecordKind.MESSAGE)
_LAST_IN_MESSAGE: Final = frozenset({RecordKind.CLOSE, RecordKind.REKEY})
_EMPTY_KINDS: Final = frozenset({RecordKind.READY, RecordKind.REKEY})
_PING_KINDS: Final = frozenset({RecordKind.PING, RecordKind.PONG})
# Looking an enum member up on its class costs about 0.2 us (Python 3.11); the parser does
# it per record, so it uses these.
_MESSAGE: Final = RecordKind.MESSAGE
_FRAGMENT: Final = RecordKind.FRAGMENT
_CLOSE: Final = RecordKind.CLOSE
#: A fragment smaller than this is not worth a record header: start a new Noise message.
_MIN_FRAGMENT: Final = 512
#: Largest value a 3-byte uvarint holds; record lengths never exceed it.
_MAX_LENGTH_VARINT: Final = 3
_MAX_CHANNEL_VARINT: Final = 5


class Record(NamedTuple):
    """One parsed record; ``body`` is a view into the decrypted plaintext."""

    kind: RecordKind
    channel: int
    body: memoryview


def encode_uvarint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, least significant group first."""
    if value < 0:
        raise ValueError("uvarint must be non-negative")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def uvarint_len(value: int) -> int:
    """How many bytes ``encode_uvarint(value)`` takes (values below 2**28)."""
    return 1 if value < 1 << 7 else 2 if value < 1 << 14 else 3 if value < 1 << 21 else 4


def read_uvarint(data: memoryview, pos: int, max_bytes: int) -> tuple[int, int]:
    """Read a minimal uvarint of at most ``max_bytes`` bytes at ``pos``.

    :returns: ``(value, new_pos)``.
    :raises ~stalk.ProtocolError: truncated, longer than ``max_bytes``, or not minimal (a
        trailing zero group), which would give one value two encodings.
    """
    value = 0
    shift = 0
    at = pos
    last = pos + max_bytes
    end = len(data)
    while at < last:
        if at >= end:
            raise ProtocolError("truncated varint in record header")
        byte = data[at]
        at += 1
        if byte < 0x80:
            if not byte and shift:
                raise ProtocolError("non-minimal varint in record header")
            return value | byte << shift, at
        value |= (byte & 0x7F) << shift
        shift += 7
    raise ProtocolError(f"varint longer than {max_bytes} bytes in record header")


def check_close(code: int, reason: str) -> None:
    """Check a CLOSE's code and reason before anything is closed.

    :raises ValueError: the code is not a u16 or the reason is longer than 1024 bytes.
    """
    if not 0 <= code <= 0xFFFF:
        raise ValueError("close code must fit in 16 bits")
    if len(reason.encode("utf-8")) > MAX_CLOSE_REASON:
        raise ValueError(f"close reason longer than {MAX_CLOSE_REASON} bytes")


def encode_close(code: int, reason: str) -> bytes:
    """A CLOSE body: ``code (u16 BE) || reason (UTF-8, at most 1024 bytes)``."""
    data = reason.encode("utf-8")[:MAX_CLOSE_REASON]
    return _U16.pack(code) + data.decode("utf-8", "ignore").encode("utf-8")


def decode_close(body: memoryview, kind: str = "CLOSE") -> tuple[int, str]:
    """Parse a CLOSE body, or a RESET's (the same form; ``kind`` names it in errors).

    :raises ~stalk.ProtocolError: shorter than the code, reason too long or not UTF-8.
    """
    if len(body) < 2:
        raise ProtocolError(f"{kind} record shorter than its code")
    if len(body) - 2 > MAX_CLOSE_REASON:
        raise ProtocolError(f"{kind} reason longer than {MAX_CLOSE_REASON} bytes")
    (code,) = _U16.unpack_from(body)
    try:
        reason = bytes(body[2:]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{kind} reason is not valid UTF-8") from exc
    return code, reason


#: Builds a Record without NamedTuple's Python-level ``__new__`` (one per spack received).
_new_record = tuple.__new__


def parse_records(plaintext: bytes | bytearray) -> list[Record]:
    """Parse and validate every record of one Noise message's plaintext.

    :raises ~stalk.ProtocolError: any record is malformed; nothing is returned then.
    """
    view = memoryview(plaintext)
    end = len(view)
    if 3 <= end < 0x83 and view[0] == RecordKind.MESSAGE and view[1] == 0 and view[2] == end - 3:
        # The most common plaintext of all: one small spack (a request or a reply).
        return [_new_record(Record, (RecordKind.MESSAGE, 0, view[3:]))]
    return read_records(view, 0, None)[0]


def lone_piece(view: memoryview) -> Record | None:
    """The plaintext's only record, if it is one MESSAGE or FRAGMENT on channel 0.

    That is the plaintext of almost every Noise message a spack stream carries (a spack
    alone, or one piece of a large one), so a receiver can skip the record loop for it.
    Anything else, including a malformed header or an empty FRAGMENT, gives ``None``:
    :func:`read_records` parses it (and raises the error).
    """
    end = len(view)
    if end < 3 or view[1] != 0:
        return None
    kind = view[0]
    if kind not in _PIECE_BYTES:
        return None
    length, pos = view[2], 3
    if length >= 0x80:
        try:
            length, pos = read_uvarint(view, 2, _MAX_LENGTH_VARINT)
        except ProtocolError:
            return None
    if pos + length != end or (not length and kind == RecordKind.FRAGMENT):
        return None
    return _new_record(Record, (_KIND_BY_BYTE[kind], 0, view[pos:]))


def lone_channel_piece(view: memoryview) -> Record | None:
    """The plaintext's only record, if it is one MESSAGE or FRAGMENT on a channel 0..127.

    :func:`lone_piece` for a connection with channels: the plaintext of a small spack
    sent alone on a channel, or of one piece of a large one. The record is exactly what
    :func:`read_records` would parse (a MESSAGE body has no rule of its own, a FRAGMENT's
    only that it is not empty, and such ids are all valid); anything else gives ``None``,
    for :func:`read_records` to parse or refuse.
    """
    end = len(view)
    if end < 3 or view[1] >= 0x80:
        return None
    kind = view[0]
    if kind not in _PIECE_BYTES:
        return None
    length, pos = view[2], 3
    if length >= 0x80:
        try:
            length, pos = read_uvarint(view, 2, _MAX_LENGTH_VARINT)
        except ProtocolError:
            return None
    if pos + length != end or (not length and kind != _MESSAGE_BYTE):
        return None
    return _new_record(
        Record, (_MESSAGE if kind == _MESSAGE_BYTE else _FRAGMENT, view[1], view[pos:])
    )


def read_records(
    view: memoryview, pos: int, count: int | None, *, channels: bool = False
) -> tuple[list[Record], int]:
    """Parse and validate up to ``count`` records of a plaintext from ``pos``.

    Lets a receiver parse a plaintext of many tiny records in bounded steps; the rules
    between records hold across steps (nothing may follow CLOSE or REKEY).

    :param channels: the connection negotiated channels (SPEC "Channels"): other channels
        than 0, and the kinds RESET, WINDOW and CONNECTION_WINDOW, are allowed.
    :returns: the records, and where the next one starts (``len(view)`` once all read).
    :raises ~stalk.ProtocolError: a record is malformed.
    """
    end = len(view)
    if end == 0:
        raise ProtocolError("transport message with no records")
    if channels:
        return read_channel_records(view, pos, end if count is None else count)[:2]
    records: list[Record] = []
    stop = end if count is None else count
    kinds = _KIND_BY_BYTE
    while pos < end and len(records) != stop:
        kind = kinds.get(view[pos])
        if kind is None:
            raise ProtocolError(f"unknown record kind 0x{view[pos]:02x}")
        if pos + 2 < end and view[pos + 1] == 0:
            # The common case, channel 0: its one-byte varint read inline.
            length = view[pos + 2]
            if length < 0x80:
                pos += 3
            else:
                length, pos = read_uvarint(view, pos + 2, _MAX_LENGTH_VARINT)
        else:
            channel, pos = read_uvarint(view, pos + 1, _MAX_CHANNEL_VARINT)
            if channel != 0:
                raise ProtocolError(f"record on channel {channel}; version 1 uses channel 0 only")
            length, pos = read_uvarint(view, pos, _MAX_LENGTH_VARINT)
        if length > end - pos:
            raise ProtocolError(f"{kind.name} record claims {length} bytes but {end - pos} remain")
        body = view[pos : pos + length]
        pos += length
        if kind is not _MESSAGE:
            _check_body(kind, body)
            if kind in _LAST_IN_MESSAGE and pos < end:
                raise ProtocolError(f"record after {kind.name} in one Noise message")
        records.append(_new_record(Record, (kind, 0, body)))
    return records, pos


def read_channel_records(view: memoryview, pos: int, stop: int) -> tuple[list[Record], int, int]:
    """:func:`read_records` for a connection with channels: every kind, every channel.

    Parses up to ``stop`` records from ``pos``, of a plaintext :func:`read_records` found
    not empty.

    :returns: the records, where the next one starts, and the bytes of their bodies when
        every one is a MESSAGE on channel 0 but the last, which may also be a FRAGMENT on
        channel 0; else -1. Such a batch (whole spacks, perhaps the end of one and the
        start of another) the :class:`~stalk.demux.Demux` counts against credit at once.
    """
    end = len(view)
    records: list[Record] = []
    data = 0  # the bodies' bytes while every record is a MESSAGE on channel 0
    # With a FRAGMENT on channel 0 after such records: the bytes with it, and its index.
    cut = cut_at = -1
    kinds = _ALL_KINDS_BY_BYTE
    while pos < end and len(records) != stop:
        kind = kinds.get(view[pos])
        if kind is None:
            raise ProtocolError(f"unknown record kind 0x{view[pos]:02x}")
        if pos + 2 < end and (channel := view[pos + 1]) < 0x80:
            # The common case, ids below 128: the id read inline, and the length too when
            # it is below 128.
            if (length := view[pos + 2]) < 0x80:
                pos += 3
            else:
                length, pos = read_uvarint(view, pos + 2, _MAX_LENGTH_VARINT)
        else:
            channel, pos = read_uvarint(view, pos + 1, _MAX_CHANNEL_VARINT)
            if channel > MAX_CHANNEL_ID:
                raise ProtocolError(f"channel id {channel} exceeds {MAX_CHANNEL_ID}")
            length, pos = read_uvarint(view, pos, _MAX_LENGTH_VARINT)
        if length > end - pos:
            raise ProtocolError(f"{kind.name} record claims {length} bytes but {end - pos} remain")
        body = view[pos : pos + length]
        pos += length
        if channel:
            _check_channel_body(kind, channel, body)
            data = -1
        elif kind is not _MESSAGE:
            if kind is RecordKind.RESET:
                raise ProtocolError("RESET record on channel 0")
            _check_body(kind, body)
            if kind in _LAST_IN_MESSAGE and pos < end:
                raise ProtocolError(f"record after {kind.name} in one Noise message")
            if kind is _FRAGMENT and data >= 0:
                cut, cut_at = data + length, len(records)
            data = -1
        elif data >= 0:
            data += length
        records.append(_new_record(Record, (kind, channel, body)))
    if data < 0 and cut_at == len(records) - 1:
        data = cut  # the FRAGMENT came last
    return records, pos, data


def _check_channel_body(kind: RecordKind, channel: int, body: memoryview) -> None:
    """The rules for a record on a channel other than 0 (SPEC "Channels")."""
    if kind is _MESSAGE:
        return
    if kind not in _ON_CHANNELS:
        raise ProtocolError(f"{kind.name} record on channel {channel}; only channel 0 has it")
    if kind is _CLOSE:
        if bytes(body) != _CHANNEL_CLOSE_BODY:
            raise ProtocolError(f"CLOSE on channel {channel} must be NORMAL with no reason")
    elif kind is RecordKind.RESET:
        decode_close(body, "RESET")
    else:
        _check_body(kind, body)


def decode_window(body: memoryview) -> int:
    """A WINDOW or CONNECTION_WINDOW body: one minimal uvarint, 1..MAX_WINDOW, nothing else.

    :raises ~stalk.ProtocolError: anything else.
    """
    increment, pos = read_uvarint(body, 0, _MAX_CHANNEL_VARINT)
    if pos != len(body):
        raise ProtocolError("bytes after the increment of a window record")
    if not 1 <= increment <= MAX_WINDOW:
        raise ProtocolError(f"window increment {increment} is not 1..{MAX_WINDOW}")
    return increment


def _check_body(kind: RecordKind, body: memoryview) -> None:
    if kind is _FRAGMENT:
        if not len(body):
            raise ProtocolError("empty FRAGMENT record")
    elif kind in _EMPTY_KINDS:
        if len(body):
            raise ProtocolError(f"{kind.name} record must have an empty body")
    elif kind in _PING_KINDS:
        if len(body) > MAX_PING_PAYLOAD:
            raise ProtocolError(f"{kind.name} payload longer than {MAX_PING_PAYLOAD} bytes")
    elif kind is _CLOSE:
        decode_close(body)
    elif kind in _WINDOW_KINDS:
        decode_window(body)


def _header(kind: RecordKind, length: int) -> bytes:
    # Channel 0 encodes as the single byte 0x00.
    return bytes((kind, 0)) + encode_uvarint(length)


def _channel_header(kind: RecordKind, channel: int, body: bytes | memoryview) -> bytes:
    return bytes((kind,)) + encode_uvarint(channel) + encode_uvarint(len(body))


def largest_fitting(avail: int) -> int:
    """The largest body length ``n`` with ``n + len(uvarint(n)) <= avail``."""
    n = avail - uvarint_len(avail)
    while (n + 1) + uvarint_len(n + 1) <= avail:
        n += 1
    return max(n, 0)


class RecordWriter:
    """Packs queued records into Noise-message plaintexts (batching and fragmentation).

    :param capacity: plaintext bytes per Noise message available for records.
    """

    __slots__ = ("_capacity", "_current", "_done", "_done_bytes")

    def __init__(self, capacity: int = RECORD_CAPACITY) -> None:
        self._capacity = capacity
        self._current = bytearray()
        self._done: list[bytearray | _Fragments] = []
        self._done_bytes = 0

    def add(self, kind: RecordKind, body: bytes | memoryview = b"", channel: int = 0) -> None:
        """Queue a control record (CLOSE, PING, PONG, READY, RESET, WINDOW...); never split."""
        header = _header(kind, len(body)) if not channel else _channel_header(kind, channel, body)
        size = len(header) + len(body)
        if size > self._capacity:
            raise ValueError(f"{kind.name} record of {size} bytes exceeds a Noise message")
        if len(self._current) + size > self._capacity:
            self._finish_current()
        self._current += header
        self._current += body

    def add_message(self, encoded: bytes | memoryview) -> None:
        """Queue one encoded spack, fragmenting it across Noise messages as needed."""
        size = len(encoded)
        if size < 0x80 and len(self._current) + size + 3 <= self._capacity:
            # The common small spack: one MESSAGE record with a one-byte length.
            self._current += bytes((RecordKind.MESSAGE, 0, size))
            self._current += encoded
            return
        if size + uvarint_len(size) <= self._capacity - len(self._current) - 2:
            # Fits whole in the current plaintext: one MESSAGE record, nothing to split.
            self._current += _header(RecordKind.MESSAGE, size)
            self._current += encoded
            return
        self.add_message_pieces([encoded])

    def add_message_pieces(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Queue one spack encoded as the concatenation of ``pieces``, fragmenting it.

        Each byte is copied once, into its plaintext: a large payload passed as its own
        piece is never joined to the rest of the encoding first.
        """
        views = deque(memoryview(piece) for piece in pieces if len(piece))
        remaining = sum(map(len, views))
        current = self._current
        while True:
            avail = self._capacity - len(current) - 2
            if remaining + uvarint_len(remaining) <= avail:
                current += _header(RecordKind.MESSAGE, remaining)
                for view in views:
                    current += view
                return
            piece = largest_fitting(avail)
            if piece < _MIN_FRAGMENT:
                self._finish_current()
                current = self._current
                continue
            if not current:
                # Whole Noise messages of fragments until the rest fits in one: they are
                # built only when packed, one at a time, not all copied out now.
                count = -(-remaining // piece) - 1
                self._done.append(_Fragments(take_views(views, count * piece), count, piece))
                self._done_bytes += count * (len(_header(RecordKind.FRAGMENT, piece)) + piece)
                remaining -= count * piece
                continue
            current += _header(RecordKind.FRAGMENT, piece)
            remaining -= piece
            for view in take_views(views, piece):
                current += view
            self._finish_current()
            current = self._current

    def _finish_current(self) -> None:
        if self._current:
            self._done.append(self._current)
            self._done_bytes += len(self._current)
            self._current = bytearray()

    def extend(self, other: RecordWriter) -> None:
        """Queue everything ``other`` holds after what this writer holds (``other`` empties)."""
        self._finish_current()
        other._finish_current()
        self._done += other._done
        self._done_bytes += other._done_bytes
        other._done = []
        other._done_bytes = 0

    def pending(self) -> bool:
        """Whether any record is queued and not yet taken by :meth:`pack`."""
        return bool(self._current or self._done)

    @property
    def queued_bytes(self) -> int:
        """Plaintext bytes queued and not yet taken by :meth:`pack`."""
        return self._done_bytes + len(self._current)

    def take_only(self) -> bytearray | None:
        """Take the queue if it is exactly one plaintext; else ``None`` and nothing changes.

        The same plaintext :meth:`pack` would give, without the iterator.
        """
        if self._done or not self._current:
            return None
        current, self._current = self._current, bytearray()
        return current

    def pack(self) -> Iterator[bytearray]:
        """Empty the queue now; return an iterator of its plaintexts, in order.

        Fragments of a large spack are built as they are iterated: consume each plaintext
        before asking for the next, and memory stays near one Noise message. What is
        queued after this call goes to the next ``pack()``.
        """
        self._finish_current()
        done, self._done = self._done, []
        self._done_bytes = 0
        return _plaintexts(done)


def _plaintexts(items: list[bytearray | _Fragments]) -> Iterator[bytearray]:
    for item in items:
        if isinstance(item, bytearray):
            yield item
        else:
            yield from item.plaintexts()


class _Fragments:
    """``count`` whole Noise messages of FRAGMENT records of ``size`` bytes, from ``views``.

    The views cover exactly ``count * size`` bytes of a queued spack's encoding, which
    nothing changes while it is queued (encoded bytes, or the caller's ``bytes`` payload).
    """

    __slots__ = ("count", "size", "views")

    def __init__(self, views: list[memoryview], count: int, size: int) -> None:
        self.views = views
        self.count = count
        self.size = size

    def plaintexts(self) -> Iterator[bytearray]:
        """Each plaintext in turn, built from the views when asked for."""
        header = _header(RecordKind.FRAGMENT, self.size)
        views = deque(self.views)
        for _ in range(self.count):
            plaintext = bytearray(header)
            for view in take_views(views, self.size):
                plaintext += view
            yield plaintext


def take_views(views: deque[memoryview], size: int) -> list[memoryview]:
    """Remove the first ``size`` bytes from ``views`` and return them as views."""
    taken: list[memoryview] = []
    while size:
        view = views[0]
        if len(view) <= size:
            taken.append(views.popleft())
            size -= len(view)
        else:
            taken.append(view[:size])
            views[0] = view[size:]
            size = 0
    return taken
