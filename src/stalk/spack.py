"""Spacks: ordered sequences of typed values, pushed together and delivered together.

Theory of operation
-------------------
A spack is encoded as exactly one msgpack array (SPEC "Spack encoding"). Every supported
Python type maps to one msgpack type, and decoding maps it back, so what the sender pushes
is what the receiver pops, types included:

- ``None``, ``bool``, ``int`` (-2**63 .. 2**64-1), ``float`` (always float 64), ``str``,
  ``bytes``, ``list`` and ``dict`` use the native msgpack types;
- :class:`Float32`, ``tuple`` and ``array.array`` have no msgpack type of their own, so they
  travel as ext types (codes below) instead of being silently turned into a float 64, a
  list or a list of numbers;
- ``bytearray`` and ``memoryview`` are sent as bin and arrive as ``bytes``: the one
  intentional type change (a receiver cannot know whether the sender's buffer was mutable).

Encoding is strict (``strict_types``): a subclass of a supported type (``IntEnum``,
``OrderedDict``, ``numpy.float64``...) is refused instead of being sent as its base type,
because the receiver would get a different type back. Dict keys must be ``str`` or
``bytes``: their hashes are randomized per process, so a hostile peer cannot pick keys that
collide (int keys would allow hash flooding).

Decoding is strict too, because the bytes come from a peer: anything that is not a valid
encoding raises :class:`~stalk.errors.MalformedSpack`, never another exception type.
msgpack bounds every claimed length by the input length, so a few bytes claiming a
4-billion-element array fail before anything is allocated.

Depth: the spack's own top-level array has depth 0; a container (list, tuple or dict)
directly inside it has depth 1; a container inside that has depth 2, and so on. Depth at
most :data:`MAX_DEPTH` is allowed; the encoder refuses to produce deeper values (the peer
would reject them) and the decoder rejects them.

A tuple is an ext whose payload is itself a msgpack array. Decoding it from inside
msgpack's ``ext_hook`` would nest one msgpack call per level, each holding its own copy of
the payload, so a 1 MiB blob inside 32 nested tuples would cost 33 MiB. Instead the hook
only wraps the payload in a stub. After msgpack returns, one pass over the containers
(recursion bounded by the depth limit) checks depths, rejects timestamps, and decodes each
stub once its depth is known to be allowed, dropping the stub before going further down.
The payload copies alive at any moment are then disjoint pieces of the input, and peak
memory stays around twice the input size plus the decoded objects.

Typed numeric arrays (``array.array``) travel as their raw elements, little-endian: that is
the native order of every mainstream CPU, so a large array is one ``memcpy`` on each side
(big-endian hosts byteswap). An array's typecode is mapped by its element kind and size, so
it arrives with the canonical typecode for that element type (``'l'`` arrives as ``'q'`` on
64-bit Linux, where a C ``long`` is 8 bytes).

This module is part of the sans-IO core: it does no I/O.
"""

from __future__ import annotations

import functools
import struct
import sys
import threading
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from types import GenericAlias
from typing import Any, Final, TypeAlias, TypeVar, overload

import msgpack

from stalk.errors import InvalidSpackValue, MalformedSpack
from stalk.summary import plural, render
from stalk.weigh import BIG, BIG_PART, BIG_START, KIND_BIN, KIND_STR, PASS, Weigher
from stalk.wire import (
    EXT_ARRAY_FLOAT32,
    EXT_ARRAY_FLOAT64,
    EXT_ARRAY_INT8,
    EXT_ARRAY_INT16,
    EXT_ARRAY_INT32,
    EXT_ARRAY_INT64,
    EXT_ARRAY_UINT8,
    EXT_ARRAY_UINT16,
    EXT_ARRAY_UINT32,
    EXT_ARRAY_UINT64,
    EXT_FLOAT32,
    EXT_TUPLE,
    MAX_DEPTH,
)

__all__ = [
    "EXT_ARRAY_FLOAT32",
    "EXT_ARRAY_FLOAT64",
    "EXT_ARRAY_INT8",
    "EXT_ARRAY_INT16",
    "EXT_ARRAY_INT32",
    "EXT_ARRAY_INT64",
    "EXT_ARRAY_UINT8",
    "EXT_ARRAY_UINT16",
    "EXT_ARRAY_UINT32",
    "EXT_ARRAY_UINT64",
    "EXT_FLOAT32",
    "EXT_TUPLE",
    "MAX_DEPTH",
    "Float32",
    "Received",
    "Spack",
    "SpackDecoder",
    "SpackValue",
    "decode_fast",
    "decode_spack",
    "decode_spack_pieces",
    "encode_spack",
    "encode_spack_pieces",
]


# The msgpack int range: anything outside cannot be encoded at all.
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1

# Scalars are big-endian like msgpack's own numbers; array payloads are little-endian.
_F32_BE: Final = struct.Struct(">f")
_F32_LE: Final = struct.Struct("<f")
# Arrays are stored in native order; only big-endian hosts need a byteswap.
_BYTESWAP: Final = sys.byteorder == "big"

SpackValue: TypeAlias = (
    "bool | int | float | str | bytes | bytearray | memoryview"
    " | list[SpackValue] | tuple[SpackValue, ...] | dict[str | bytes, SpackValue]"
    " | array[int] | array[float] | None"
)
"""A value a spack can carry (recursively, for the containers)."""

Received: TypeAlias = (
    "bool | int | float | str | bytes"
    " | list[Received] | tuple[Received, ...] | dict[str | bytes, Received]"
    " | array[int] | array[float] | None"
)
"""A value receiving produces: a :data:`SpackValue` but never a ``bytearray`` or
``memoryview`` (they arrive as ``bytes``); a :class:`Float32` is a ``float``."""


def _build_array_tables() -> tuple[dict[str, int], dict[int, str]]:
    """Map array typecodes to ext codes by element kind and size, and back.

    C type sizes vary by platform, so the tables are computed, not written down. The
    reverse table takes the first typecode in the canonical order ``b B h H i I q Q f d``
    (then ``l L``) that has the right size.
    """
    by_kind = {
        ("int", 1): EXT_ARRAY_INT8,
        ("uint", 1): EXT_ARRAY_UINT8,
        ("int", 2): EXT_ARRAY_INT16,
        ("uint", 2): EXT_ARRAY_UINT16,
        ("int", 4): EXT_ARRAY_INT32,
        ("uint", 4): EXT_ARRAY_UINT32,
        ("int", 8): EXT_ARRAY_INT64,
        ("uint", 8): EXT_ARRAY_UINT64,
        ("float", 4): EXT_ARRAY_FLOAT32,
        ("float", 8): EXT_ARRAY_FLOAT64,
    }
    to_ext: dict[str, int] = {}
    to_typecode: dict[int, str] = {}
    for typecode in "bBhHiIqQfdlL":
        kind = "float" if typecode in "fd" else "int" if typecode.islower() else "uint"
        ext = by_kind.get((kind, array(typecode).itemsize))
        if ext is not None:
            to_ext[typecode] = ext
            to_typecode.setdefault(ext, typecode)
    return to_ext, to_typecode


_ARRAY_TABLES: Final = _build_array_tables()
_TYPECODE_TO_EXT: Final = _ARRAY_TABLES[0]
_EXT_TO_TYPECODE: Final = _ARRAY_TABLES[1]


class Float32(float):
    """A float carried as IEEE-754 binary32 (4 bytes on the wire instead of 8).

    ``Float32(x)`` rounds ``x`` to the nearest binary32 value, so the value you hold is
    exactly the value the peer gets. Arithmetic returns plain floats.
    """

    __slots__ = ()

    def __new__(cls, value: float = 0.0) -> Float32:
        """Round ``value`` to the nearest binary32.

        :param value: any real number; infinities and NaN are kept.
        :raises InvalidSpackValue: a finite value too large for binary32 (it would become
            an infinity, silently corrupting the data).
        """
        try:
            rounded: float = _F32_LE.unpack(_F32_LE.pack(float(value)))[0]
        except OverflowError as exc:
            raise InvalidSpackValue(
                "value is out of binary32 range (magnitude above 3.4028235e38)"
            ) from exc
        return float.__new__(cls, rounded)

    def __repr__(self) -> str:
        """Return ``Float32(<value>)``, which evaluates back to the same value."""
        return f"Float32({float.__repr__(self)})"

    def __str__(self) -> str:
        """Return the bare number, like a float."""
        return float.__repr__(self)


class _TupleStub:
    """A tuple ext seen by msgpack's ``ext_hook``, decoded later without recursion."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


# Exact types that may appear in a spack. Subclasses are refused (see module docstring).
_CONTAINER_TYPES: Final[frozenset[type]] = frozenset({list, tuple, dict})
_ENCODABLE_TYPES: Final[frozenset[type]] = frozenset(
    {type(None), bool, int, float, Float32, str, bytes, bytearray, memoryview, array}
    | _CONTAINER_TYPES
)
_KEY_TYPES: Final[frozenset[type]] = frozenset({str, bytes})
_ENCODABLE_LEAF_TYPES: Final = _ENCODABLE_TYPES - _CONTAINER_TYPES
# Containers longer than this are first scanned in C for "only leaves": cheaper for big
# containers of scalars, more expensive for small ones.
_SCAN_THRESHOLD: Final = 16
# What msgpack plus our hooks produce that needs no further look on decode.
_DECODED_LEAF_TYPES: Final[frozenset[type]] = frozenset(
    {type(None), bool, int, float, Float32, str, bytes, array}
)


# --------------------------------------------------------------------------- encoding


def _default(obj: object) -> msgpack.ExtType:
    """Encode the types msgpack has no native form for (msgpack's ``default`` hook).

    With ``strict_types``, msgpack calls this for every object whose exact type it does
    not know. :func:`_structure_ok` has already refused inexact types, so only Float32,
    tuple, array and out-of-range ints get here.
    """
    if isinstance(obj, Float32):
        return msgpack.ExtType(EXT_FLOAT32, _F32_BE.pack(obj))
    if isinstance(obj, tuple):
        return msgpack.ExtType(EXT_TUPLE, _packb(list(obj)))
    if isinstance(obj, array):
        return _array_ext(obj)
    raise InvalidSpackValue(f"cannot encode {type(obj).__qualname__}")


def _array_ext(values: array[Any]) -> msgpack.ExtType:
    """Encode a typed numeric array as its raw little-endian elements."""
    ext = _TYPECODE_TO_EXT.get(values.typecode)
    if ext is None:
        raise InvalidSpackValue(f"cannot encode array.array with typecode {values.typecode!r}")
    if _BYTESWAP:
        values = array(values.typecode, values)
        values.byteswap()
    return msgpack.ExtType(ext, values.tobytes())


def _new_packer() -> msgpack.Packer:
    return msgpack.Packer(
        default=_default,
        use_single_float=False,
        use_bin_type=True,
        strict_types=True,
        datetime=False,
        unicode_errors="strict",
    )


#: One reusable Packer per thread: building one per spack costs more than packing a small
#: spack. A Packer is taken out while in use, so the re-entrant packing of tuples (through
#: ``_default``) and other threads each get their own; one that raised is dropped, never
#: reused with a half-written buffer.
_PACKERS = threading.local()


def _packb(values: list[Any]) -> bytes:
    """Pack a list as one msgpack array with the spack settings."""
    packer = _PACKERS.__dict__.pop("packer", None) or _new_packer()
    data: bytes = packer.pack(values)
    _PACKERS.packer = packer
    return data


def _structure_ok(node: list[Any] | tuple[Any, ...] | dict[Any, Any], depth: int = 0) -> bool:
    """Check exact types, dict key types and depth of a container at ``depth``.

    Recursion is bounded: it never goes below depth :data:`MAX_DEPTH` (a recursive walk is
    about twice as fast as an explicit stack here). A large container of scalars costs one
    C-level ``set(map(type, ...))``. Int range, string validity and the like are left to
    msgpack; :func:`_diagnose` explains any failure.
    """
    children: Collection[Any]
    if type(node) is dict:
        if not _KEY_TYPES.issuperset(map(type, node)):
            return False
        children = node.values()
    else:
        children = node
    if len(children) > _SCAN_THRESHOLD and _ENCODABLE_LEAF_TYPES.issuperset(map(type, children)):
        return True
    depth += 1
    for child in children:
        kind = type(child)
        if kind in _ENCODABLE_LEAF_TYPES:
            continue
        if kind not in _CONTAINER_TYPES or depth > MAX_DEPTH or not _structure_ok(child, depth):
            return False
    return True


def _short_repr(obj: object) -> str:
    """``repr`` cut to a length fit for an error message."""
    text = repr(obj)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_problem(obj: object) -> str:
    """Say why an object of an unsupported type cannot be encoded."""
    kind = type(obj)
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    for base in (bool, int, float, str, bytes, bytearray, list, tuple, dict):
        if isinstance(obj, base):
            return (
                f"cannot encode {name} (a subclass of {base.__qualname__}; only exact"
                f" {base.__qualname__} is encoded, convert it first)"
            )
    return f"cannot encode {name}"


def _scalar_problem(obj: object) -> str | None:
    """Say why a non-container value cannot be encoded, or ``None`` if it can."""
    if type(obj) not in _ENCODABLE_TYPES:
        return _type_problem(obj)
    # From here the type is exact, so isinstance() tests are exact type tests.
    if isinstance(obj, int) and not _INT_MIN <= obj <= _INT_MAX:
        return "int out of range (must be in -2**63 .. 2**64-1)"
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"str has a lone surrogate at index {exc.start}"
    if isinstance(obj, memoryview) and not obj.c_contiguous:
        return "memoryview is not C-contiguous"
    if isinstance(obj, array) and obj.typecode not in _TYPECODE_TO_EXT:
        return f"cannot encode array.array with typecode {obj.typecode!r}"
    return None


def _at(path: list[str], problem: str | None) -> str | None:
    """Prefix a problem with the path of the value it is about (long paths abridged)."""
    if problem is None:
        return None
    if len(path) > 8:
        path = [*path[:4], f"... {len(path) - 7} levels ...", *path[-3:]]
    return f"{', '.join(path)}: {problem}"


def _find_problem(obj: object, depth: int, path: list[str]) -> str | None:
    """Find the first value under ``obj`` that cannot be encoded; describe it with its path.

    Only runs after a failure. Recursion is bounded: it stops below depth :data:`MAX_DEPTH`.

    :param depth: the depth ``obj`` has if it is a container.
    :param path: how ``obj`` was reached, e.g. ``["spack element 2", "key 'x'"]``.
    """
    if type(obj) not in _CONTAINER_TYPES:
        return _at(path, _scalar_problem(obj))
    if depth > MAX_DEPTH:
        return _at(path, f"nesting deeper than MAX_DEPTH ({MAX_DEPTH})")
    if isinstance(obj, dict):
        return _find_problem_in_dict(obj, depth, path)
    if isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            problem = _find_problem(value, depth + 1, [*path, f"item {index}"])
            if problem is not None:
                return problem
    return None


def _find_problem_in_dict(obj: dict[Any, Any], depth: int, path: list[str]) -> str | None:
    """:func:`_find_problem` for a dict: keys first, then each value."""
    for key, value in obj.items():
        where = [*path, f"key {_short_repr(key)}"]
        if type(key) not in _KEY_TYPES:
            return _at(where, f"dict keys must be str or bytes, not {type(key).__qualname__}")
        problem = _at(where, _scalar_problem(key)) or _find_problem(value, depth + 1, where)
        if problem is not None:
            return problem
    return None


def _diagnose(values: list[Any]) -> str | None:
    """Describe the first value of a spack that cannot be encoded, or ``None``."""
    for index, value in enumerate(values):
        problem = _find_problem(value, 1, [f"spack element {index}"])
        if problem is not None:
            return problem
    return None


def encode_spack(values: Iterable[SpackValue]) -> bytes:
    """Encode values as one spack: a single msgpack array.

    :param values: the spack's elements, in order.
    :returns: the encoding (``b"\\x90"`` for no values).
    :raises InvalidSpackValue: a value cannot be carried (unsupported type or subclass,
        int out of range, dict key that is not str/bytes, lone surrogate, nesting deeper
        than :data:`MAX_DEPTH`...); the message names the value's position.
    """
    # Spack is an ABC (a Sequence), so isinstance() against it is slow: test exact types first.
    if type(values) is list:
        items = values
    else:
        items = values._values if isinstance(values, Spack) else list(values)
    if not _structure_ok(items):
        raise InvalidSpackValue(_diagnose(items) or "spack cannot be encoded")
    try:
        return _packb(items)
    except (TypeError, ValueError, OverflowError, BufferError) as exc:
        # InvalidSpackValue (from _default) is a TypeError; UnicodeEncodeError a ValueError.
        raise InvalidSpackValue(_diagnose(items) or f"spack cannot be encoded: {exc}") from exc


#: A last ``bytes`` value at least this long is kept out of the msgpack buffer: the size at
#: which the receiving decoder cuts a payload out of its encoding too (one rule, both ways).
_PIECE_THRESHOLD: Final = BIG


def encode_spack_pieces(values: Iterable[SpackValue]) -> list[bytes]:
    """Encode values as one spack, returned as pieces whose concatenation is the encoding.

    Same bytes and errors as :func:`encode_spack`. When the last value is a large
    ``bytes``, it is its own piece, the very object given: msgpack would copy it into
    its buffer and out again, twice the payload in copies for nothing, since the
    record layer copies it into plaintexts anyway.
    """
    items = values if type(values) is list else list(values)
    if (
        not items
        or type(items[-1]) is not bytes
        or not _PIECE_THRESHOLD <= len(items[-1]) < 1 << 32
    ):
        return [encode_spack(items)]
    payload: bytes = items[-1]
    # The encoding with an empty bin last ends in its 2-byte header (c4 00): swap in the
    # header msgpack writes for this length (bin 16 or bin 32).
    prefix = encode_spack([*items[:-1], b""])[:-2]
    size = len(payload)
    header = (
        b"\xc5" + size.to_bytes(2, "big") if size <= 0xFFFF else b"\xc6" + size.to_bytes(4, "big")
    )
    return [prefix + header, payload]


# --------------------------------------------------------------------------- decoding


def _ext_hook(code: int, payload: bytes) -> object:
    """Decode one ext value (msgpack's ``ext_hook``); tuples are left as stubs."""
    if code == EXT_TUPLE:
        return _TupleStub(payload)
    if code == EXT_FLOAT32:
        if len(payload) != 4:
            raise MalformedSpack(f"float32 ext has {len(payload)} bytes, not 4")
        return float.__new__(Float32, _F32_BE.unpack(payload)[0])
    typecode = _EXT_TO_TYPECODE.get(code)
    if typecode is None:
        raise MalformedSpack(f"unknown ext code {code}")
    values = array(typecode)
    if len(payload) % values.itemsize:
        raise MalformedSpack(
            f"array ext {code} has {len(payload)} bytes, not a multiple of {values.itemsize}"
        )
    values.frombytes(payload)
    if _BYTESWAP:
        values.byteswap()
    return values


def _pairs_hook(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """Build a dict, refusing repeated keys (msgpack's ``object_pairs_hook``).

    A map with a repeated key would otherwise keep only the last value, silently.
    """
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MalformedSpack("map has a duplicate key")
    return result


#: The fast path lets msgpack preallocate slots for at most this many items per container
#: (it allocates a container's claimed length before its items arrive, and may nest 1,024
#: deep): about 2 MiB at worst for a malformed input. A longer container sends the whole
#: spack to the weighing decoder, which checks every claim first.
_FAST_CONTAINER: Final = 256


def _unpackb(
    data: bytes | bytearray | memoryview,
    *,
    fast: bool = False,
    ext_hook: Callable[[int, bytes], object] | None = None,
) -> Any:
    """Unpack exactly one msgpack object with the spack settings.

    :param fast: bound container lengths to :data:`_FAST_CONTAINER` (see above).
    :param ext_hook: decode exts with this instead of :func:`_ext_hook`.
    """
    limit = _FAST_CONTAINER if fast else -1
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        use_list=True,
        ext_hook=ext_hook or _ext_hook,
        object_pairs_hook=_pairs_hook,
        max_array_len=limit,
        max_map_len=limit,
    )


def _too_deep(max_depth: int) -> MalformedSpack:
    """The error for nesting deeper than ``max_depth``."""
    return MalformedSpack(f"spack nesting is deeper than the limit ({max_depth})")


def _finish(node: list[Any] | dict[Any, Any], depth: int, max_depth: int) -> None:
    """Check depths under a decoded container at ``depth`` and decode its tuple stubs.

    Works in place. Recursion is bounded: it never goes below ``max_depth``, and a stub is
    decoded only once its depth is known to be allowed. The stub (and with it the copy of
    its payload) is dropped before descending, so the copies alive at any time are disjoint
    pieces of the input.
    """
    children: Collection[Any] = node.values() if type(node) is dict else node
    if len(children) > _SCAN_THRESHOLD and _DECODED_LEAF_TYPES.issuperset(map(type, children)):
        return
    depth += 1
    # Slots are looked up, not iterated as (slot, value) pairs: enumerate() and dict.items()
    # keep their last pair alive, which would keep every stub payload on the path alive.
    slots: Iterable[Any] = node if type(node) is dict else range(len(node))
    for slot in slots:
        kind = type(node[slot])
        if kind in _DECODED_LEAF_TYPES:
            continue
        if kind is not list and kind is not dict and kind is not _TupleStub:
            # msgpack decodes ext -1 (its timestamp) itself, without calling ext_hook.
            raise MalformedSpack("unknown ext code -1")
        if depth > max_depth:
            raise _too_deep(max_depth)
        if kind is _TupleStub:
            try:
                inner = _unpackb(node[slot].payload)
            except msgpack.ExtraData as exc:
                raise MalformedSpack("tuple ext payload has bytes after its array") from exc
            node[slot] = inner  # drops the stub and its payload
            if type(inner) is not list:
                raise MalformedSpack("tuple ext payload is not an array")
            _finish(inner, depth, max_depth)
            node[slot] = tuple(inner)
        else:
            _finish(node[slot], depth, max_depth)


def _finish_top(top: Any, max_depth: int) -> None:
    """Check a decoded top level that is not a flat array of leaves."""
    if type(top) is not list:
        raise MalformedSpack("spack top level is not an array")
    _finish(top, 0, max_depth)


def decode_spack(data: bytes | bytearray | memoryview, *, max_depth: int = MAX_DEPTH) -> Spack:
    """Decode one spack from exactly ``data``.

    Nothing is allocated on the strength of a claimed length: a spack with a container
    longer than :data:`_FAST_CONTAINER` items is weighed first (:mod:`stalk.weigh`), which
    checks every claim against the bytes present. The decoded Python objects themselves
    can be larger than their encoding (an empty list is one byte on the wire, 56 bytes in
    memory): bound ``len(data)`` before calling, or use :class:`SpackDecoder`, which
    enforces the decoded-weight budget.

    :param data: the encoding, as any bytes-like object.
    :param max_depth: the deepest container allowed (see the module docstring for how depth
        is counted); may only tighten :data:`MAX_DEPTH`.
    :returns: the decoded spack; ``bytearray``/``memoryview`` values come back as ``bytes``.
    :raises MalformedSpack: ``data`` is not exactly one valid spack encoding: invalid
        msgpack, truncated input or trailing bytes, a top level that is not an array,
        invalid UTF-8, a map key that is not str/bytes, a repeated map key, an unknown or
        malformed ext, or nesting deeper than ``max_depth``.
    :raises ValueError: ``max_depth`` is outside ``0 .. MAX_DEPTH``.
    :raises TypeError: ``data`` is not bytes-like.
    """
    if max_depth != MAX_DEPTH and not 0 <= max_depth <= MAX_DEPTH:
        raise ValueError(f"max_depth must be in 0 .. {MAX_DEPTH}, not {max_depth}")
    if type(data) is memoryview:
        if data.itemsize != 1 or data.ndim != 1:
            data = data.tobytes()
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"spack data must be bytes-like, not {type(data).__qualname__}")
    spack = decode_fast(data, max_depth=max_depth)
    if spack is not None:
        return spack
    # A container longer than the fast path allows: weigh, then decode.
    decoder = SpackDecoder(len(data), budget=False, complete=True, max_depth=max_depth)
    decoder.feed(data)
    return decoder.finish()


def decode_fast(
    data: bytes | bytearray | memoryview, *, max_depth: int = MAX_DEPTH
) -> Spack | None:
    """Decode a spack in one msgpack call, or return ``None`` if it must be weighed first.

    ``None`` means a container is longer than :data:`_FAST_CONTAINER` items: msgpack would
    allocate for its claimed length before its items arrive, so the caller decodes it with
    a :class:`SpackDecoder` instead. Errors are :func:`decode_spack`'s.
    """
    try:
        top = _unpackb(data, fast=True)
        # The common spack holds only scalars, strings and bytes: nothing left to check.
        if type(top) is not list or not _DECODED_LEAF_TYPES.issuperset(map(type, top)):
            _finish_top(top, max_depth)
    except MalformedSpack:
        raise
    except ValueError as exc:
        if "exceeds max_" in str(exc):
            return None
        raise _malformed(exc) from exc
    except Exception as exc:
        raise _malformed(exc) from exc
    return Spack._from_list(top)


def _malformed(exc: Exception) -> MalformedSpack:
    """Translate what msgpack (or a hook) raised for bad input into MalformedSpack."""
    if isinstance(exc, MalformedSpack):
        return exc
    if isinstance(exc, msgpack.ExtraData):
        return MalformedSpack("trailing bytes after the spack")
    if isinstance(exc, msgpack.StackError):
        return _too_deep(MAX_DEPTH)
    if isinstance(exc, msgpack.FormatError):
        return MalformedSpack("invalid msgpack: reserved type byte 0xc1")
    if isinstance(exc, UnicodeDecodeError):
        # Our own message: the codec's names the offending byte, which is plaintext.
        return MalformedSpack("string is not valid UTF-8")
    if isinstance(
        exc, (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException)
    ):
        return MalformedSpack(f"invalid msgpack: {exc}")
    raise exc


def _tuple_now(payload: bytes) -> tuple[Any, ...]:
    """Decode a tuple ext's payload at once (its structure and depth are already weighed)."""
    try:
        inner = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_ext_hook_now,
            object_pairs_hook=_pairs_hook,
        )
    except msgpack.ExtraData as exc:
        raise MalformedSpack("tuple ext payload has bytes after its array") from exc
    if type(inner) is not list:
        raise MalformedSpack("tuple ext payload is not an array")
    return tuple(inner)


def _ext_hook_now(code: int, payload: bytes) -> object:
    """:func:`_ext_hook`, decoding tuples at once instead of leaving stubs."""
    return _tuple_now(payload) if code == EXT_TUPLE else _ext_hook(code, payload)


#: The ext code of the placeholder the streaming decoder hands msgpack in place of a value
#: it assembled itself. Peers cannot send it: the weigher refuses every unknown code.
_PLACEHOLDER: Final = 127
#: A piece of a cut-out payload is kept as a view of the buffer it arrived in only if it
#: fills at least this share of that buffer (and is not tiny); smaller pieces are copied,
#: so a small view never pins a large plaintext.
_VIEW_SHARE: Final = 7 / 8
#: Initial size of the streaming unpacker's buffer.
_UNPACKER_START: Final = 4096
#: Bytes for msgpack (all but cut-out payloads) collected before a streaming unpacker is
#: started. A spack with no more, the usual shape of a large one (a few values and a large
#: payload), is decoded in one call when it ends: cheaper than streaming, and as bounded.
_LAZY: Final = 16 * 1024
_VIEW_MIN: Final = 4096


def pins_little(piece: memoryview) -> bool:
    """Whether ``piece`` may be held as a view: it fills most of the buffer it views.

    Else whoever holds it copies it, so a small view never pins a large plaintext
    (see :data:`_VIEW_SHARE`).
    """
    size = len(piece)
    return size >= _VIEW_MIN and size >= _VIEW_SHARE * len(piece.obj)  # type: ignore[arg-type]


class SpackDecoder:
    """Decodes one spack whose encoding arrives in pieces, within its budget.

    Each piece is weighed first (:class:`~stalk.weigh.Weigher`: structure, claims against
    ``max_size``, decoded-weight budget), then handed to a streaming msgpack unpacker, so
    the work per piece is bounded by the piece and nothing is built for a spack the budget
    refuses. Large str, bin and typed-array payloads are cut out and joined straight from
    the pieces into their value (one copy); a piece is kept as a view only while it fills
    most of the buffer it came in, else copied (see :data:`_VIEW_SHARE`).

    :param max_size: the most bytes the encoding may have.
    :param budget: refuse a spack whose decoded weight exceeds its budget.
    :param complete: the caller feeds the whole encoding (a claim beyond ``max_size`` is
        a truncation, not an oversized message).
    :param max_depth: the deepest container allowed (at most :data:`MAX_DEPTH`).
    """

    __slots__ = (
        "_assembled",
        "_big",
        "_buffer_size",
        "_hook",
        "_parts",
        "_pending",
        "_top",
        "_unpacker",
        "_weigher",
    )

    def __init__(
        self,
        max_size: int,
        *,
        budget: bool = True,
        complete: bool = False,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        self._weigher = Weigher(
            max_size, complete=complete, budget=budget, cut=True, max_depth=max_depth
        )
        #: Values assembled from cut-out payloads, by placeholder index (dropped once used).
        self._assembled: list[object] = []
        # The hook holds the list, not the decoder: a decoder -> unpacker -> bound method
        # -> decoder cycle would keep every decoded value alive until the cyclic garbage
        # collector happened to run.
        self._hook = functools.partial(_take_assembled, self._assembled)
        # Placeholders are 6 bytes: room for them however small a cut-out payload.
        self._buffer_size = max_size + 1024
        #: Bytes for msgpack not handed over yet (see :data:`_LAZY`).
        self._pending = bytearray()
        self._unpacker: msgpack.Unpacker | None = None
        #: The cut-out payload being collected: (kind, ext code), and its pieces.
        self._big: tuple[int, int] | None = None
        self._parts: list[bytes | bytearray | memoryview] = []
        self._top: list[SpackValue] | None = None

    @property
    def size(self) -> int:
        """Bytes taken so far."""
        return self._weigher.size

    @property
    def work(self) -> int:
        """Bytes weighed and decoded so far (cut-out payload bytes are only copied)."""
        weigher = self._weigher
        return weigher.size - weigher.cut_bytes

    def feed(self, data: bytes | bytearray | memoryview, limit: int | None = None) -> int:
        """Weigh and decode the next piece of the encoding.

        :returns: the bytes of ``data`` taken.
        :param limit: weigh and decode about this many bytes of values at most (cut-out
            payload bytes do not count), stopping at a value boundary; the caller feeds
            the rest of the piece later. Bounds the work of one call.
        :raises MalformedSpack: the bytes can never be a valid spack.
        :raises ~stalk.MessageLimitExceeded: the spack is certain to exceed ``max_size``
            or its decoded-weight budget.
        """
        weigher = self._weigher
        if type(data) is memoryview and weigher.skip_cut(len(data)):
            self._keep(data)  # the middle of a cut-out payload: no op to replay
            return len(data)
        taken = weigher.feed(data, limit)
        pending = self._pending
        for op in weigher.ops:
            kind = op[0]
            if kind == PASS:
                pending += op[1]  # type: ignore[arg-type]
            elif kind == BIG_PART:
                self._keep(op[1])  # type: ignore[arg-type]
            elif kind == BIG_START:
                self._big = (op[1], op[3])  # type: ignore[assignment]
            else:
                pending += self._assemble()
        weigher.ops.clear()
        if pending and (self._unpacker is not None or len(pending) > _LAZY):
            self._stream()
        return taken

    def finish(self) -> Spack:
        """The encoding ended: return the spack.

        :raises MalformedSpack: the encoding is truncated or otherwise invalid.
        """
        self._weigher.finish()
        if self._unpacker is None:
            try:
                self._top = _unpackb(self._pending, ext_hook=self._hook)
            except Exception as exc:
                raise _malformed(exc) from exc
            self._pending = bytearray()
        if self._top is None:  # pragma: no cover - the weigher saw a complete array
            raise MalformedSpack("spack encoding is truncated")
        return Spack._from_list(self._top)

    def _stream(self) -> None:
        """Hand the pending bytes to the streaming unpacker (started on first use)."""
        unpacker = self._unpacker
        if unpacker is None:
            unpacker = self._unpacker = msgpack.Unpacker(
                raw=False,
                strict_map_key=True,
                use_list=True,
                ext_hook=self._hook,
                object_pairs_hook=_pairs_hook,
                max_buffer_size=self._buffer_size,
                # The buffer starts this small and grows as msgpack needs (default: 1 MiB).
                read_size=min(_UNPACKER_START, self._buffer_size),
            )
        unpacker.feed(self._pending)
        self._pending.clear()
        try:
            top = unpacker.unpack()
        except msgpack.OutOfData:
            return
        except Exception as exc:
            raise _malformed(exc) from exc
        self._top = top

    def _keep(self, piece: memoryview) -> None:
        """Hold one piece of a cut-out payload, copying it if a view would pin more."""
        parts = self._parts
        if pins_little(piece):
            parts.append(piece)
        elif parts and type(parts[-1]) is bytearray:
            parts[-1] += piece
        else:
            parts.append(bytearray(piece))

    def _assemble(self) -> bytes:
        """Build the value of the payload just completed; return its placeholder."""
        big, self._big = self._big, None
        parts, self._parts = self._parts, []
        if big is None:  # pragma: no cover - BIG_END always follows BIG_START
            raise MalformedSpack("payload ended before it started")
        kind, code = big
        joined = parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)
        del parts
        value: object
        if kind == KIND_BIN:
            value = joined
        elif kind == KIND_STR:
            try:
                value = str(joined, "utf-8")
            except UnicodeDecodeError as exc:
                raise MalformedSpack("string is not valid UTF-8") from exc
        else:
            value = _ext_hook(code, joined)
        self._assembled.append(value)
        index = len(self._assembled) - 1
        return bytes((0xD6, _PLACEHOLDER)) + index.to_bytes(4, "big")


def _take_assembled(assembled: list[object], code: int, payload: bytes) -> object:
    """The ext hook of :class:`SpackDecoder`.

    A placeholder gives its assembled value (dropped from ``assembled`` once taken);
    any other ext is decoded as usual.
    """
    if code == _PLACEHOLDER:
        index = int.from_bytes(payload, "big")
        value, assembled[index] = assembled[index], None
        return value
    return _ext_hook_now(code, payload)


def decode_spack_pieces(pieces: Sequence[bytes | bytearray | memoryview]) -> Spack:
    """Decode one spack whose encoding is the concatenation of ``pieces``.

    Same result and errors as ``decode_spack(b"".join(pieces))``, without joining the
    pieces first: a large payload goes from the pieces straight into its value.
    """
    if len(pieces) == 1:
        return decode_spack(pieces[0])
    decoder = SpackDecoder(sum(map(len, pieces)), budget=False, complete=True)
    for piece in pieces:
        decoder.feed(piece)
    return decoder.finish()


# --------------------------------------------------------------------------- Spack


_T1 = TypeVar("_T1")
_T2 = TypeVar("_T2")
_T3 = TypeVar("_T3")
_T4 = TypeVar("_T4")
_T5 = TypeVar("_T5")
_T6 = TypeVar("_T6")
_T7 = TypeVar("_T7")
_T8 = TypeVar("_T8")


def _matches(value: object, kind: type) -> bool:
    """Whether ``value`` is acceptable where :meth:`Spack.unpack` was told ``kind``.

    ``isinstance``, except that a ``bool`` is not an ``int`` (nor a ``float``), and an
    ``int`` is a ``float``, as for a type checker (a sender's ``float`` variable may hold
    an int, which msgpack carries as an int).
    """
    if type(value) is bool:
        return kind is bool or kind is object
    if kind is float:
        return isinstance(value, (float, int))
    return isinstance(value, kind)


class Spack(Sequence[Any]):
    """An ordered sequence of typed values, pushed together and delivered together.

    A spack behaves like a read-only sequence (``len``, indexing, slicing, iteration,
    ``a, b = spack``) that can also grow with :meth:`push`. It is mutable, hence
    unhashable.

    Typing: elements read by indexing, iteration or ``a, b = spack`` are typed ``Any``,
    as ``json.loads`` results are: what a spack from a peer holds is known by the
    application's protocol, not by the type checker, and a union of every possible type
    would need a check before every use. :meth:`unpack` checks the types at run time and
    gives the type checker a typed tuple; :data:`Received` is the union of what a received
    spack can hold, for code that narrows values with ``isinstance`` or ``match``.
    """

    __slots__ = ("_values",)

    _values: list[SpackValue]

    def __init__(self, *values: SpackValue) -> None:
        """Create a spack holding ``values`` in order (nothing is checked until encoding).

        :param values: the elements.
        """
        self._values = list(values)

    @classmethod
    def _from_list(cls, values: list[SpackValue]) -> Spack:
        """Wrap a list without copying it (the spack takes ownership)."""
        spack = cls.__new__(cls)
        spack._values = values
        return spack

    def push(self, *values: SpackValue) -> Spack:
        """Append values; return this spack so calls can be chained.

        :param values: the elements to append, in order.
        """
        self._values.extend(values)
        return self

    @property
    def values(self) -> tuple[Any, ...]:
        """The elements, as a tuple (a snapshot: later pushes do not change it)."""
        return tuple(self._values)

    @overload
    def unpack(self, t1: type[_T1], /) -> tuple[_T1]: ...

    @overload
    def unpack(self, t1: type[_T1], t2: type[_T2], /) -> tuple[_T1, _T2]: ...

    @overload
    def unpack(self, t1: type[_T1], t2: type[_T2], t3: type[_T3], /) -> tuple[_T1, _T2, _T3]: ...

    @overload
    def unpack(
        self, t1: type[_T1], t2: type[_T2], t3: type[_T3], t4: type[_T4], /
    ) -> tuple[_T1, _T2, _T3, _T4]: ...

    @overload
    def unpack(
        self, t1: type[_T1], t2: type[_T2], t3: type[_T3], t4: type[_T4], t5: type[_T5], /
    ) -> tuple[_T1, _T2, _T3, _T4, _T5]: ...

    @overload
    def unpack(
        self,
        t1: type[_T1],
        t2: type[_T2],
        t3: type[_T3],
        t4: type[_T4],
        t5: type[_T5],
        t6: type[_T6],
        /,
    ) -> tuple[_T1, _T2, _T3, _T4, _T5, _T6]: ...

    @overload
    def unpack(
        self,
        t1: type[_T1],
        t2: type[_T2],
        t3: type[_T3],
        t4: type[_T4],
        t5: type[_T5],
        t6: type[_T6],
        t7: type[_T7],
        /,
    ) -> tuple[_T1, _T2, _T3, _T4, _T5, _T6, _T7]: ...

    @overload
    def unpack(
        self,
        t1: type[_T1],
        t2: type[_T2],
        t3: type[_T3],
        t4: type[_T4],
        t5: type[_T5],
        t6: type[_T6],
        t7: type[_T7],
        t8: type[_T8],
        /,
    ) -> tuple[_T1, _T2, _T3, _T4, _T5, _T6, _T7, _T8]: ...

    @overload
    def unpack(self, *types: type[Any]) -> tuple[Any, ...]: ...

    def unpack(self, *types: type[Any]) -> tuple[Any, ...]:
        """The elements as a tuple, checked against ``types``: ``n, s = spack.unpack(int, str)``.

        Each element must be an instance of the class in its position, except that a
        ``bool`` is not an ``int``, and an ``int`` is accepted for ``float`` (as a type
        checker accepts it). Pass plain classes (``list``, ``dict``, ``object`` for any
        value): the contents of containers are not checked. A type checker infers the
        tuple's types for up to 8 elements (``tuple[Any, ...]`` beyond).

        :raises TypeError: the spack does not have one element per type, or an element has
            another type (the message names its position, the expected and the actual
            type), or a type is not a plain class (``list[int]``, ``int | None``).
        """
        values = self._values
        for kind in types:
            if not isinstance(kind, type) or isinstance(kind, GenericAlias):
                raise TypeError(
                    f"Spack.unpack takes plain classes (int, str, list...), not {kind!r}"
                )
        if len(values) != len(types):
            expected = ", ".join(kind.__qualname__ for kind in types)
            raise TypeError(
                f"the spack has {len(values)} {plural(len(values), 'value')},"
                f" expected {len(types)} ({expected})"
            )
        for index, (value, kind) in enumerate(zip(values, types, strict=True)):
            if not _matches(value, kind):
                raise TypeError(
                    f"spack[{index}]: expected {kind.__qualname__}, got {type(value).__qualname__}"
                )
        return tuple(values)

    def encode(self) -> bytes:
        """Encode this spack: one msgpack array (SPEC "Spack encoding").

        Sending encodes by itself; this is for storing a spack or sending it another way.

        :returns: the encoding (``b"\\x90"`` for an empty spack).
        :raises InvalidSpackValue: a value cannot be carried (unsupported type or subclass,
            int out of range, dict key that is not str/bytes, lone surrogate, nesting
            deeper than 32 levels...); the message names the value's position.
        """
        return encode_spack(self._values)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview, *, max_depth: int = MAX_DEPTH) -> Spack:
        """Decode a spack from exactly ``data``, as strictly as a received one.

        The decoded objects can be larger than their encoding: bound ``len(data)`` first
        when it comes from someone else.

        :param data: the encoding, as any bytes-like object.
        :param max_depth: the deepest container allowed, at most 32 (the protocol's limit).
        :returns: the spack; ``bytearray``/``memoryview`` values come back as ``bytes``.
        :raises MalformedSpack: ``data`` is not exactly one valid spack encoding.
        :raises ValueError: ``max_depth`` is outside ``0 .. 32``.
        :raises TypeError: ``data`` is not bytes-like.
        """
        return decode_spack(data, max_depth=max_depth)

    def __iter__(self) -> Iterator[Any]:
        """Iterate over the elements."""
        return iter(self._values)

    def __len__(self) -> int:
        """Return the number of elements."""
        return len(self._values)

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> Spack: ...

    def __getitem__(self, index: int | slice) -> Any:
        """Return one element, or a new spack for a slice."""
        if isinstance(index, slice):
            return Spack._from_list(self._values[index])
        return self._values[index]

    def __eq__(self, other: object) -> bool:
        """Spacks are equal when their element lists are equal (Python equality)."""
        if not isinstance(other, Spack):
            return NotImplemented
        return self._values == other._values

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        """Return ``Spack(1, 'a', b'x')``, bounded: about 2,600 characters at most.

        A large value shows a prefix and ``... (N more bytes)``, a long spack or container
        its first values and ``... (N more values)`` (see :func:`stalk.summary.render`), so
        printing a 16 MiB spack costs a few thousand characters, not a 64 MiB string.
        ``repr(spack.values)`` shows every value in full.
        """
        return render(self._values)[0]
