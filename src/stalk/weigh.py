"""Weighing a spack encoding before it is decoded (sans-IO).

Theory of operation
-------------------
Decoding builds Python objects that can outweigh their encoding about 100 to 1 (an empty
list is one byte on the wire and 64 bytes of heap), and msgpack's C decoder allocates up to
10,000 slots for a container as soon as its header claims them, before any element has
arrived. A peer controls both. So before a spack that arrives in pieces is decoded, a
:class:`Weigher` walks its encoding, piece by piece as the pieces arrive, and builds
nothing. It

- checks the structure (SPEC "Strict decoding"): the top level is one array and nothing
  follows it, no reserved byte ``c1``, map keys are str or bin, ext codes are known and
  their payloads well sized, a tuple's payload is exactly one array, depth is at most
  :data:`~stalk.wire.MAX_DEPTH`. UTF-8 and repeated keys are left to the decoder;
- checks every claimed length against what can still arrive: the bytes a header promises
  (its payload, one byte at least per claimed element) must fit in the size limit, so no
  allocation is ever made on a claim the limit already rules out;
- adds up the **decoded weight** (SPEC "Decoded weight"): the heap the decoded objects take,
  from the table below, and refuses a spack whose weight exceeds its budget,
  ``WEIGHT_FACTOR * size + WEIGHT_FLOOR``, as soon as the bytes promised so far make that
  certain.

Weights (bytes; CPython's own sizes on 64-bit platforms, rounded up):

======================  =====================================================
value                   weight
======================  =====================================================
array of n              56 + 8n (list object and its slots), + n beyond 10,000 items
map of n entries        64 (empty), 216 + 40 (n - 1) otherwise (dict and table)
str of l bytes          0 if l <= 1 (CPython caches them), else 80 + l
bin of l bytes          0 if l <= 1, else 40 + l
int                     0 for -5 .. 255 (cached), 32 otherwise, 36 for 64-bit forms
float (32 or 64)        24
nil, true, false        0
ext 1 (float32)         40
ext 2 (tuple), payload  80 + 8n + 3p (tuple, its slots, payload copies while decoding)
  of p bytes, n items   (its array is weighed as an array as well)
ext 16..25, payload p   80 + 2p (array object, payload copy)
======================  =====================================================

Every spack of up to 64 KiB is within its budget whatever its shape (the heaviest shape,
chained one-entry maps, weighs 108 per byte), so a single-record spack needs no weighing.

Cutting out large payloads. For the streaming decoder (:class:`~stalk.spack.SpackDecoder`)
the weigher also says what to hand to msgpack: with ``cut=True``, :meth:`Weigher.feed`
appends to :attr:`Weigher.ops` the spans of the piece that go to msgpack as they are, and
cuts out every str, bin or typed-array payload of :data:`BIG` bytes or more outside a
tuple: the decoder assembles those itself, straight from the pieces, so msgpack never
buffers them.

The code: :class:`Weigher` takes the pieces (a whole piece at once where a shortcut fits);
its base ``_Scanner`` walks the items of a piece and weighs the values that hold no others;
``_Structure`` keeps the open containers, checks and weighs container, tuple and ext
headers, and checks what the bytes so far promise against the size limit and the budget.

This module is part of the sans-IO core: it does no I/O.
"""

from __future__ import annotations

import re
import struct
from typing import Final

from stalk.errors import MalformedSpack, MessageLimitExceeded, MessageTooLarge, StalkError
from stalk.wire import (
    EXT_ARRAY_ITEMSIZE,
    EXT_FLOAT32,
    EXT_TUPLE,
    MAX_DEPTH,
    WEIGHT_FACTOR,
    WEIGHT_FLOOR,
)

__all__ = [
    "ALWAYS_WITHIN_BUDGET",
    "BIG",
    "MAX_WEIGHT_PER_BYTE",
    "Weigher",
    "check_weight",
    "header_size",
    "weigh",
    "within_budget",
]

#: A str, bin or typed-array payload this long (outside a tuple) is cut out for the decoder.
BIG: Final = 64 * 1024
#: The most a spack can weigh per encoded byte (chained one-entry maps, ``81 a0 81 a0 ...``).
MAX_WEIGHT_PER_BYTE: Final = 108

#: Ops appended to :attr:`Weigher.ops` (see :meth:`Weigher.feed`).
PASS: Final = 0
BIG_START: Final = 1
BIG_PART: Final = 2
BIG_END: Final = 3

#: What a big payload becomes, for the decoder.
KIND_STR: Final = 0
KIND_BIN: Final = 1
KIND_ARRAY: Final = 2

_SLOT: Final = 8
_LIST: Final = 56
_DICT_EMPTY: Final = 64
_DICT_ONE: Final = 216
_DICT_ENTRY: Final = 40
_STR: Final = 80
_BYTES: Final = 40
_INT: Final = 32
_INT64: Final = 36
_FLOAT: Final = 24
_FLOAT32: Final = 40
_TUPLE: Final = 80
_ARRAY: Final = 80
#: msgpack preallocates a container's slots up to this many items, then appends.
_PREALLOC: Final = 10_000

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")

# Frame kinds of open containers.
_ARRAY_FRAME: Final = 0
_MAP_FRAME: Final = 1
_TUPLE_FRAME: Final = 2
_ROOT_FRAME: Final = 3

#: Header length of each type byte that has a length or count field; fixed-width scalars
#: map to their whole size. Bytes absent here have a 1-byte header.
_HEADER: Final = {
    0xC4: 2, 0xC5: 3, 0xC6: 5,  # bin 8/16/32
    0xC7: 3, 0xC8: 4, 0xC9: 6,  # ext 8/16/32 (length, then the code)
    0xCA: 5, 0xCB: 9,  # float 32/64
    0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9,  # uint 8/16/32/64
    0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9,  # int 8/16/32/64
    0xD4: 2, 0xD5: 2, 0xD6: 2, 0xD7: 2, 0xD8: 2,  # fixext 1..16 (the code)
    0xD9: 2, 0xDA: 3, 0xDB: 5,  # str 8/16/32
    0xDC: 3, 0xDD: 5,  # array 16/32
    0xDE: 3, 0xDF: 5,  # map 16/32
}  # fmt: skip
_FIXEXT_SIZE: Final = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}

# Classes of type bytes, for the scanning loop.
_ONE: Final = 0  # a whole value in one byte: fixint, nil, bool, empty array or map
_FIXARRAY: Final = 1
_FIXMAP: Final = 2
_FIXSTR: Final = 3
_NUMBER: Final = 4  # float 32/64, int 8..64: fixed size, no payload
_BIN: Final = 5
_STRING: Final = 6
_EXT: Final = 7
_ARRAY16: Final = 8
_MAP16: Final = 9
_RESERVED: Final = 10
_KEY_CLASSES: Final = frozenset({_FIXSTR, _BIN, _STRING})


def _classes() -> tuple[bytes, tuple[int, ...]]:
    """Each type byte's class, and the weight of the values that are a class by themselves."""
    table = bytearray(256)
    weight = [0] * 256
    for first in range(256):
        if first <= 0x7F or first in (0xC0, 0xC2, 0xC3) or first >= 0xE0:
            table[first] = _ONE
            weight[first] = _INT if 0xE0 <= first < 0xFB else 0  # -5..-1 are cached
        elif first in (0x80, 0x90):
            table[first] = _ONE
            weight[first] = _DICT_EMPTY if first == 0x80 else _LIST
        elif first <= 0x8F:
            table[first] = _FIXMAP
        elif first <= 0x9F:
            table[first] = _FIXARRAY
        elif first <= 0xBF:
            table[first] = _FIXSTR
            length = first & 0x1F
            weight[first] = _STR + length if length > 1 else 0
        elif first == 0xC1:
            table[first] = _RESERVED
        elif first <= 0xC6:
            table[first] = _BIN
        elif first <= 0xC9 or 0xD4 <= first <= 0xD8:
            table[first] = _EXT
        elif first <= 0xD3:
            table[first] = _NUMBER
            weight[first] = {0xCA: _FLOAT, 0xCB: _FLOAT, 0xCC: 0, 0xCF: _INT64, 0xD3: _INT64}.get(
                first, _INT
            )
        elif first <= 0xDB:
            table[first] = _STRING
        elif first <= 0xDD:
            table[first] = _ARRAY16
        else:
            table[first] = _MAP16
    return bytes(table), tuple(weight)


_CLASS, _WEIGHT = _classes()
#: Bytes before the payload, for every type byte (indexing a tuple beats a dict lookup).
_SIZE: Final = tuple(_HEADER.get(first, 1) for first in range(256))
#: Runs of one-byte values are weighed in C: the pattern, and the bytes that weigh.
_ONE_RUN: Final = re.compile(rb"[\x00-\x80\x90\xc0\xc2\xc3\xe0-\xff]+")
_UNCACHED_INTS: Final = bytes(range(0xE0, 0xFB))
#: A container whose items are this many or more tries runs of like values.
_RUN_MIN: Final = 8


def _one_run(view: memoryview, pos: int, limit: int) -> int:
    """How many one-byte values start at ``pos`` (at least the one there)."""
    match = _ONE_RUN.match(view, pos, limit)
    return match.end() - pos if match else 1


def _run_weight(run: bytes, deep: bool) -> int:
    """The weight of a run of one-byte values (``deep``: a container there is too deep)."""
    lists = run.count(b"\x90")
    dicts = run.count(b"\x80")
    if (lists or dicts) and deep:
        raise MalformedSpack("spack nesting is deeper than the limit")
    return (
        _LIST * lists
        + _DICT_EMPTY * dicts
        + _INT * (len(run) - len(run.translate(None, _UNCACHED_INTS)))
    )


def _flat(
    view: memoryview, pos: int, end: int, first: int, inner_ok: bool
) -> tuple[int, int] | None:
    """Weigh a fixarray or fixmap at ``pos`` whose items are all simple values.

    Simple: scalars, strings and bins short enough to be in ``view``, and empty containers
    if ``inner_ok`` (one level down is not too deep); map keys are strings or bins.
    Returns the position after it and its weight, or ``None`` (weigh it item by item): a
    list of small records costs one call per record, not a frame.
    """
    is_map = first < 0x90
    count = (first & 0x0F) * (2 if is_map else 1)
    weight = _DICT_ENTRY * (count // 2 - 1) + _DICT_ONE if is_map else _LIST + _SLOT * count
    classes = _CLASS
    weights = _WEIGHT
    pos += 1
    for index in range(count):
        if pos >= end:
            return None
        item = view[pos]
        cls = classes[item]
        if is_map and not index & 1 and cls not in _KEY_CLASSES:
            return None
        if cls == _ONE:
            if item in (0x80, 0x90) and not inner_ok:
                return None
            weight += weights[item]
            pos += 1
            continue
        size = _SIZE[item]
        if pos + size > end:
            return None
        if cls == _NUMBER:
            weight += _INT if item == 0xD0 and 0x80 <= view[pos + 1] < 0xFB else weights[item]
        elif cls == _FIXSTR:
            weight += weights[item]
            size += item & 0x1F
        elif cls in (_BIN, _STRING):
            length = _length(view, pos, size)
            if length >= BIG:
                return None
            if length > 1:
                weight += (_BYTES if cls == _BIN else _STR) + length
            size += length
        else:
            return None
        if pos + size > end:
            return None
        pos += size
    return pos, weight


def _same_run(view: memoryview, pos: int, limit: int, item: int) -> int:
    """How many values of ``item`` bytes with the type byte at ``pos`` follow each other.

    The type bytes of such a run are every ``item``-th byte: one strided copy and a strip,
    in C, count them (counting at least the value at ``pos``).
    """
    heads = bytes(view[pos:limit:item])
    if (limit - pos) % item:
        heads = heads[:-1]  # the last type byte has no room for its value
    return max(len(heads) - len(heads.lstrip(heads[:1])), 1)


def header_size(first: int) -> int:
    """How many bytes the item starting with ``first`` needs before its payload."""
    return _HEADER.get(first, 1)


class _Structure:
    """The open containers of a spack being weighed, and the rules and limits they keep.

    :class:`Weigher` reads the bytes and reports each container, tuple and ext header; this
    class checks them (nesting depth, map keys, tuple bounds, ext codes and sizes), says what
    they weigh, and checks what the headers read so far promise against the size limit and
    the weight budget. The weigher's scanning loop reads the frames itself, counts down the
    innermost one's items, and outside any tuple checks map keys and that the top level is
    an array: a call per value would cost more than the value.
    """

    __slots__ = ("_budget", "_complete", "_max_size", "done", "frames", "max_depth", "tuple_ends")

    def __init__(self, max_size: int, complete: bool, budget: bool, max_depth: int) -> None:
        self._max_size = max_size
        self._complete = complete
        self._budget = budget
        #: The deepest container allowed.
        self.max_depth = max_depth
        #: Open containers, innermost last: [kind, items left, depth]. The root frame holds
        #: the one top-level array.
        self.frames: list[list[int]] = [[_ROOT_FRAME, 1, -1]]
        #: Absolute end of each open tuple's payload, innermost last.
        self.tuple_ends: list[int] = []
        #: The top-level array is complete.
        self.done = False

    def check_item(self, first: int, cls: int, frame: list[int], left: int, at: int) -> None:
        """Rules for an item that starts at absolute ``at`` inside a tuple."""
        kind = frame[0]
        if at + _HEADER.get(first, 1) > self.tuple_ends[-1]:
            raise MalformedSpack("a value runs past the end of its tuple")
        if kind == _TUPLE_FRAME and cls not in (_FIXARRAY, _ARRAY16) and first != 0x90:
            raise MalformedSpack("tuple ext payload is not an array")
        if kind == _MAP_FRAME and not left & 1 and cls not in _KEY_CLASSES:
            raise MalformedSpack("map key is not str or bin")

    def open_container(self, is_map: bool, count: int, parent: list[int]) -> int:
        """A header claiming ``count`` items (entries for a map) was read; its weight."""
        in_tuple = parent[0] == _TUPLE_FRAME  # this array *is* that tuple: same level
        depth = parent[2] if in_tuple else parent[2] + 1
        if depth > self.max_depth:
            raise _too_deep(self.max_depth)
        if is_map:
            weight = _DICT_ENTRY * (count - 1) + _DICT_ONE if count else _DICT_EMPTY
        else:
            weight = _LIST + (2 * _SLOT if in_tuple else _SLOT) * count
            if count > _PREALLOC:
                weight += count  # msgpack appends past its prealloc: lists overallocate
        self.frames.append(
            [_MAP_FRAME if is_map else _ARRAY_FRAME, 2 * count if is_map else count, depth]
        )
        return weight

    def open_tuple(self, payload: int, after: int, parent: list[int]) -> int:
        """An ext 2 header, whose payload ends ``payload`` bytes after ``after``; its weight.

        The payload must be one array, weighed as the tuple's items.
        """
        if parent[2] + 1 > self.max_depth:
            raise _too_deep(self.max_depth)
        if self.tuple_ends and after + payload > self.tuple_ends[-1]:
            raise MalformedSpack("a tuple claims more bytes than the tuple around it holds")
        self.tuple_ends.append(after + payload)
        self.frames.append([_TUPLE_FRAME, 1, parent[2] + 1])
        return _TUPLE + 3 * payload

    def ext(self, code: int, payload: int) -> int:
        """Check an ext other than a tuple; its weight."""
        if code == EXT_FLOAT32:
            if payload != 4:
                raise MalformedSpack(f"float32 ext has {payload} bytes, not 4")
            return _FLOAT32
        itemsize = EXT_ARRAY_ITEMSIZE.get(code)
        if itemsize is None:
            raise MalformedSpack(f"unknown ext code {code}")
        if payload % itemsize:
            raise MalformedSpack(
                f"array ext {code} has {payload} bytes, not a multiple of {itemsize}"
            )
        return _ARRAY + 2 * payload

    def promise(self, after: int, payload: int) -> None:
        """An item's header promised ``payload`` more bytes right after ``after``."""
        if self.tuple_ends and after + payload > self.tuple_ends[-1]:
            raise MalformedSpack("a value claims more bytes than its tuple holds")

    def check(self, reach: int, weight: int) -> None:
        """What the headers read so far promise must fit the size limit and weight budget.

        ``reach`` is the absolute position the bytes read so far reach, with the rest of
        the current item's payload; each item still owed by an open container needs at
        least one more byte, and an open tuple reaches at least to the end of its payload.
        ``weight`` is the decoded weight so far.
        """
        owed = 0
        for kind, left, _ in self.frames:
            if kind == _TUPLE_FRAME:
                reach = max(reach, self.tuple_ends[0])
                break
            owed += left
        promised = reach + owed
        if promised > self._max_size:
            if self._complete:
                raise MalformedSpack("spack encoding is truncated: a length claims more bytes")
            raise MessageLimitExceeded(self._max_size)
        if self._budget and weight > WEIGHT_FACTOR * promised + WEIGHT_FLOOR:
            raise _over_budget(weight, promised)

    def close_frames(self, at: int) -> None:
        """Pop every container whose last item has just ended at absolute offset ``at``."""
        frames = self.frames
        while frames and frames[-1][1] == 0:
            kind = frames.pop()[0]
            if kind == _TUPLE_FRAME and at != self.tuple_ends.pop():
                raise MalformedSpack("tuple ext payload has bytes after its array")
        if not frames:
            self.done = True


class _Scanner:
    """The general path of :class:`Weigher`: walks the items of each piece.

    It weighs the values that hold no others itself (runs of like values in C), hands each
    container, tuple and ext header to its :class:`_Structure`, keeps an item header split
    across pieces until the rest arrives, follows a payload across pieces, and with ``cut``
    records :attr:`ops`. The parameters are :class:`Weigher`'s.
    """

    __slots__ = (
        "_carry",
        "_cut",
        "_offset",
        "_skip",
        "_skip_big",
        "_span",
        "_structure",
        "cut_bytes",
        "ops",
        "weight",
    )

    def __init__(
        self,
        max_size: int,
        *,
        complete: bool = False,
        budget: bool = True,
        cut: bool = False,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        self._structure = _Structure(max_size, complete, budget, max_depth)
        self._cut = cut
        #: Decoded weight of everything seen so far.
        self.weight = 0
        #: Payload bytes cut out so far (handed over without being weighed or decoded).
        self.cut_bytes = 0
        #: With ``cut``: ``(PASS, view)``, ``(BIG_START, kind, length, ext_code)``,
        #: ``(BIG_PART, view)``, ``(BIG_END,)``, in stream order; the caller empties it.
        self.ops: list[tuple[object, ...]] = []
        self._offset = 0  # absolute position of the next piece's first byte
        self._skip = 0  # payload bytes of the current item still to come
        self._skip_big = False  # ...and whether they are cut out
        self._carry = b""  # the start of an item header split across pieces
        self._span = 0  # start of the bytes of the current piece not yet handed on as PASS

    def _take_payload(
        self, view: memoryview, pos: int, end: int, base: int, *, in_span: bool = False
    ) -> int:
        """Consume as much of the current item's payload as ``view`` holds.

        :param in_span: :meth:`_scan` hands these bytes on itself (unless cut out).
        """
        take = min(self._skip, end - pos)
        if self._skip_big:
            self.cut_bytes += take
        if self._cut and take and (self._skip_big or not in_span):
            self.ops.append((BIG_PART if self._skip_big else PASS, view[pos : pos + take]))
        self._skip -= take
        pos += take
        if not self._skip:
            if self._skip_big:
                self.ops.append((BIG_END,))
                self._skip_big = False
            self._structure.close_frames(base + pos)
        return pos

    def _finish_carry(self, view: memoryview, pos: int, end: int, base: int) -> int:
        """Complete an item header split across pieces and weigh that one item."""
        carry = self._carry
        need = header_size(carry[0]) - len(carry)
        if end - pos < need:
            self._carry = carry + bytes(view[pos:end])
            return end
        head = carry + bytes(view[pos : pos + need])
        self._carry = b""
        self._scan(memoryview(head), 0, len(head), base + pos - len(carry), len(head))
        pos += need
        if self._skip:
            pos = self._take_payload(view, pos, end, base)
        return pos

    def _scan(  # noqa: PLR0915
        self, view: memoryview, pos: int, end: int, base: int, stop: int
    ) -> int:
        """Weigh whole items from ``pos`` up to ``end`` (saving a split header); new pos.

        Stops at the first value boundary at or after ``stop``.

        The loop handles one-byte values, numbers and short strings inline (with runs of
        like values in C); containers, long strings, bins and exts go to :meth:`_item`. It
        is one function on purpose: a call per value would cost more than the value.
        """
        structure = self._structure
        if structure.done:
            raise MalformedSpack("trailing bytes after the spack")
        frames = structure.frames
        tuple_ends = structure.tuple_ends
        max_depth = structure.max_depth
        classes = _CLASS
        weights = _WEIGHT
        sizes = _SIZE
        self._span = pos
        weight = self.weight
        frame = frames[-1]
        left = frame[1]
        kind = frame[0]
        plain = kind == _ARRAY_FRAME and not tuple_ends  # an array outside any tuple
        deep = frame[2] + 1 > max_depth  # a container here would be too deep
        while pos < end:
            if pos >= stop and not self._skip:
                break
            if not left:
                # The innermost container is complete: close it (and any it completes).
                frame[1] = 0
                self.weight = weight
                structure.close_frames(base + pos)
                if not frames:
                    break
                frame = frames[-1]
                left = frame[1]
                kind = frame[0]
                plain = kind == _ARRAY_FRAME and not tuple_ends
                deep = frame[2] + 1 > max_depth
                continue
            first = view[pos]
            cls = classes[first]
            if plain:
                pass
            elif kind == _MAP_FRAME and not tuple_ends:
                if not left & 1 and cls not in _KEY_CLASSES:
                    raise MalformedSpack("map key is not str or bin")
            elif kind == _ROOT_FRAME:
                if cls not in (_FIXARRAY, _ARRAY16) and first != 0x90:
                    raise MalformedSpack("spack top level is not an array")
            else:
                structure.check_item(first, cls, frame, left, base + pos)
            if cls == _ONE:
                if plain and left >= _RUN_MIN:
                    run = _one_run(view, pos, min(end, pos + left))
                    weight += _run_weight(bytes(view[pos : pos + run]), deep)
                    pos += run
                    left -= run
                    continue
                if deep and first in (0x90, 0x80):
                    raise _too_deep(max_depth)
                weight += weights[first]
                pos += 1
                left -= 1
                continue
            size = sizes[first]
            if pos + size > end:
                self._carry = bytes(view[pos:end])
                break
            if cls == _NUMBER or (
                cls == _FIXSTR and not tuple_ends and pos + 1 + (first & 0x1F) <= end
            ):
                item = size + (first & 0x1F if cls == _FIXSTR else 0)
                if plain and left >= _RUN_MIN and first != 0xD0:
                    run = _same_run(view, pos, min(end, pos + left * item), item)
                    weight += run * weights[first]
                    pos += run * item
                    left -= run
                    continue
                weight += _INT if first == 0xD0 and 0x80 <= view[pos + 1] < 0xFB else weights[first]
                pos += item
                left -= 1
                continue
            if cls in (_FIXARRAY, _FIXMAP) and not tuple_ends and not deep:
                # A small container of simple values, weighed without a frame.
                flat = _flat(view, pos, end, first, frame[2] + 2 <= max_depth)
                if flat:
                    pos, added = flat
                    weight += added
                    left -= 1
                    continue
            if cls in (_BIN, _STRING) and not tuple_ends:
                length = _length(view, pos, size)
                if length < BIG and pos + size + length <= end:
                    if length > 1:
                        weight += (_BYTES if cls == _BIN else _STR) + length
                    pos += size + length
                    left -= 1
                    continue
            left -= 1
            frame[1] = left
            self.weight = weight
            pos = self._item(view, pos, end, base, frame)
            weight = self.weight
            if not frames:
                break
            frame = frames[-1]
            left = frame[1]
            kind = frame[0]
            plain = kind == _ARRAY_FRAME and not tuple_ends
            deep = frame[2] + 1 > max_depth
        frame[1] = left
        self.weight = weight
        if frames and not left and not self._skip and not self._carry:
            structure.close_frames(base + pos)
        if structure.done and pos < end:
            raise MalformedSpack("trailing bytes after the spack")
        if self._cut and self._span < pos:
            self.ops.append((PASS, view[self._span : pos]))
        return pos

    def _item(self, view: memoryview, pos: int, end: int, base: int, frame: list[int]) -> int:
        """Weigh one container header, string, bin or ext whose header starts at ``pos``."""
        structure = self._structure
        first = view[pos]
        cls = _CLASS[first]
        size = _HEADER.get(first, 1)
        in_tuple = bool(structure.tuple_ends)
        big = -1
        code = 0
        payload = 0
        if cls in (_FIXARRAY, _FIXMAP):
            self.weight += structure.open_container(cls == _FIXMAP, first & 0x0F, frame)
        elif cls in (_ARRAY16, _MAP16):
            count = _length(view, pos, size)
            self.weight += structure.open_container(cls == _MAP16, count, frame)
        elif cls in (_BIN, _STRING, _FIXSTR):
            payload = first & 0x1F if cls == _FIXSTR else _length(view, pos, size)
            if payload > 1:
                self.weight += (_BYTES if cls == _BIN else _STR) + payload
            if payload >= BIG and self._cut and not in_tuple:
                big = KIND_BIN if cls == _BIN else KIND_STR
        elif cls == _EXT:
            code = view[pos + size - 1]
            if code >= 0x80:
                code -= 0x100
            payload = _FIXEXT_SIZE[first] if first >= 0xD4 else _length(view, pos, size - 1)
            if code == EXT_TUPLE:
                self.weight += structure.open_tuple(payload, base + pos + size, frame)
                payload = 0  # the payload is weighed as the tuple's items
            else:
                self.weight += structure.ext(code, payload)
                if payload >= BIG and self._cut and not in_tuple and code != EXT_FLOAT32:
                    big = KIND_ARRAY
        elif cls == _NUMBER:
            self.weight += (
                _INT if first == 0xD0 and 0x80 <= view[pos + 1] < 0xFB else _WEIGHT[first]
            )
        else:
            raise MalformedSpack("invalid msgpack: reserved type byte 0xc1")
        pos += size
        if not payload:
            return pos
        structure.promise(base + pos, payload)
        if big >= 0:
            if self._span < pos - size:
                self.ops.append((PASS, view[self._span : pos - size]))
            self.ops.append((BIG_START, big, payload, code))
            self._skip_big = True
        self._skip = payload
        pos = self._take_payload(view, pos, end, base, in_span=True)
        if big >= 0:
            self._span = pos
        return pos


class Weigher(_Scanner):
    """Walks one spack encoding fed in pieces; see the module docstring.

    A piece is taken whole by a shortcut when one fits (the middle of a cut-out payload,
    the usual first piece of a large spack), else item by item (:class:`_Scanner`); then
    what the bytes so far promise is checked against the limits.

    :param max_size: the most bytes the encoding may have (the receiver's limit). A claim
        that cannot fit is an error as soon as it is read.
    :param complete: the encoding is all there: a claim beyond ``max_size`` is a truncation
        (:class:`~stalk.MalformedSpack`) rather than an oversized message
        (:class:`~stalk.MessageLimitExceeded`).
    :param budget: refuse spacks whose decoded weight exceeds their budget.
    :param cut: record :attr:`ops` for :class:`~stalk.spack.SpackDecoder`.
    :param max_depth: the deepest container allowed (at most :data:`~stalk.wire.MAX_DEPTH`).
    """

    __slots__ = ()

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._offset

    def feed(self, data: bytes | bytearray | memoryview, limit: int | None = None) -> int:
        """Weigh the next piece of the encoding; return how many of its bytes were taken.

        :param limit: stop weighing values once about this many bytes of them were
            weighed (payload bytes that are cut out do not count), at a value boundary:
            the caller feeds the rest later. ``None``: take the whole piece.
        :raises ~stalk.MalformedSpack: the bytes can never be a valid spack.
        :raises ~stalk.MessageLimitExceeded: the spack is certain to exceed the size limit
            or its weight budget (checked before the caller decodes anything of the piece).
        """
        view = data if type(data) is memoryview else memoryview(data)
        end = len(view)
        structure = self._structure
        if structure.done and end:
            raise MalformedSpack("trailing bytes after the spack")
        base = self._offset
        if self._skip_big and self.skip_cut(end):
            self.ops.append((BIG_PART, view))
            return end
        if not base and end and self._cut and self._head(view, end):
            self._offset = end
            structure.check(end + self._skip, self.weight)
            return end
        pos = 0
        if self._skip:
            pos = self._take_payload(view, 0, end, base)
        if self._carry and pos < end:
            pos = self._finish_carry(view, pos, end, base)
        if pos < end:
            stop = end if limit is None else min(end, pos + max(limit, 1))
            pos = self._scan(view, pos, end, base, stop)
            if self._carry:
                pos = end  # the split header is kept, so the whole piece was taken
        self._offset = base + pos
        structure.check(base + pos + self._skip, self.weight)
        return pos

    def skip_cut(self, length: int) -> bool:
        """Take the next ``length`` bytes at once if they lie inside the payload being cut out.

        That is the middle of a large str or bin, most pieces of a large spack: nothing to
        weigh, and what the bytes so far promise does not change. The caller hands the bytes
        on as a ``BIG_PART`` (:meth:`feed` records the op; a decoder may keep them itself).

        :returns: whether they were taken (else feed them).
        """
        if not self._skip_big or self._skip <= length:
            return False
        self._skip -= length
        self.cut_bytes += length
        self._offset += length
        return True

    def _head(self, view: memoryview, end: int) -> bool:
        """Weigh the usual first piece of a large spack at once, if that is what it is.

        That is: a top-level array of at most 15 items, simple values (as :func:`_flat`
        takes them) but the last, a str or bin of :data:`BIG` bytes or more that goes on
        past the piece. The state left is the general path's, which weighs anything else.

        :returns: whether the piece was weighed (all of it).
        """
        first = view[0]
        if not 0x91 <= first <= 0x9F:
            return False
        # The items before the last, weighed as a fixarray of one item fewer.
        flat = _flat(view, 0, end, first - 1, self._structure.max_depth >= 1)
        if flat is None:
            return False
        pos, weight = flat
        cls = _CLASS[view[pos]] if pos < end else _ONE
        if cls not in (_BIN, _STRING) or pos + _SIZE[view[pos]] >= end:
            return False
        start = pos + _SIZE[view[pos]]
        length = _length(view, pos, start - pos)
        if length < BIG or start + length <= end:
            return False
        is_bin = cls == _BIN
        self.weight = weight + _SLOT + (_BYTES if is_bin else _STR) + length
        # The top-level array is open, and every one of its items has begun.
        self._structure.frames = [[_ROOT_FRAME, 0, -1], [_ARRAY_FRAME, 0, 0]]
        self.ops += [
            (PASS, view[:pos]),
            (BIG_START, KIND_BIN if is_bin else KIND_STR, length, 0),
            (BIG_PART, view[start:end]),
        ]
        self._skip = length - (end - start)
        self._skip_big = True
        self.cut_bytes = end - start
        self._span = end
        return True

    def finish(self) -> None:
        """The encoding ended here: it must be exactly one complete spack.

        :raises ~stalk.MalformedSpack: it is truncated (or empty).
        """
        if not self._structure.done or self._skip or self._carry:
            raise MalformedSpack("spack encoding is truncated")


def _too_deep(limit: int) -> MalformedSpack:
    return MalformedSpack(f"spack nesting is deeper than the limit ({limit})")


def _over_budget(weight: int, size: int) -> StalkError:
    return MessageLimitExceeded(
        WEIGHT_FACTOR * size + WEIGHT_FLOOR,
        f"peer sent a spack that decodes to at least {weight} bytes of objects, more than "
        f"its budget of {WEIGHT_FACTOR} x {size} + {WEIGHT_FLOOR} bytes",
    )


def _length(view: memoryview, pos: int, size: int) -> int:
    """The length or count field that ends a header of ``size`` bytes at ``pos``."""
    width = size - 1
    if width == 1:
        return view[pos + 1]
    if width == 2:
        return _U16.unpack_from(view, pos + 1)[0]  # type: ignore[no-any-return]
    return _U32.unpack_from(view, pos + 1)[0]  # type: ignore[no-any-return]


#: Every spack of at most this many encoded bytes is within its budget, whatever its
#: shape: ``MAX_WEIGHT_PER_BYTE * size <= WEIGHT_FACTOR * size + WEIGHT_FLOOR`` (about
#: 82 KiB, which covers every spack that fits in one record).
ALWAYS_WITHIN_BUDGET: Final = WEIGHT_FLOOR // (MAX_WEIGHT_PER_BYTE - WEIGHT_FACTOR)


def within_budget(size: int) -> bool:
    """Whether every spack of ``size`` encoded bytes is within its budget, whatever its shape."""
    return size <= ALWAYS_WITHIN_BUDGET


def weigh(encoding: bytes | bytearray | memoryview, max_size: int | None = None) -> int:
    """The decoded weight of a complete spack encoding, checking its structure on the way.

    :raises ~stalk.MalformedSpack: not exactly one valid spack structure.
    """
    weigher = Weigher(len(encoding) if max_size is None else max_size, budget=False)
    weigher.feed(encoding)
    weigher.finish()
    return weigher.weight


def check_weight(pieces: list[bytes], size: int) -> None:
    """Refuse to send a spack the receiver would refuse (SPEC "Decoded weight").

    Weighs only a spack that could exceed its budget. One whose first piece is within
    budget whatever its shape is not weighed: that piece is the whole spack, or all of it
    but a large trailing ``bytes`` (see :func:`~stalk.spack.encode_spack_pieces`), whose
    bytes weigh one each and earn ``WEIGHT_FACTOR`` each of budget.

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
