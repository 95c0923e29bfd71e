"""Tests for stalk.spack: the wire mapping, strict decoding, limits and the Spack API."""

from __future__ import annotations

import ast
import collections
import contextlib
import datetime
import enum
import gc
import itertools
import math
import pickle
import struct
import sys
import threading
import tracemalloc
from array import array
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stalk import spack as spack_module
from stalk import weigh as weigh_module
from stalk.errors import InvalidSpackValue, MalformedSpack
from stalk.spack import (
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
    Float32,
    Spack,
    SpackDecoder,
    decode_spack,
    decode_spack_pieces,
    encode_spack,
    encode_spack_pieces,
)

# ----------------------------------------------------------------------------- helpers

NUMERIC_TYPECODES = "bBhHiIlLqQfd"
CANONICAL_ORDER = "bBhHiIqQfd"


def element_kind(typecode: str) -> tuple[str, int]:
    """(kind, itemsize) of an array typecode, computed independently of the module."""
    kind = "float" if typecode in "fd" else ("int" if typecode.islower() else "uint")
    return kind, array(typecode).itemsize


def canonical_typecode(typecode: str) -> str:
    """The typecode an array of this element type arrives with (documented rule)."""
    wanted = element_kind(typecode)
    return next(code for code in CANONICAL_ORDER if element_kind(code) == wanted)


def float_bits(value: float) -> bytes:
    return struct.pack(">d", value)


def assert_same(sent: Any, received: Any, path: str = "value") -> None:
    """Compare type and value recursively: what is sent is what comes out.

    The documented changes are the only ones allowed: bytearray/memoryview arrive as
    bytes, and arrays arrive with the canonical typecode of their element type. Floats are
    compared bit for bit (so -0.0 differs from 0.0), NaN equal to NaN.
    """
    if type(sent) in (bytearray, memoryview):
        assert type(received) is bytes, f"{path}: {type(received)} is not bytes"
        assert received == bytes(sent), path
        return
    if type(sent) is array:
        assert type(received) is array, f"{path}: {type(received)} is not array"
        assert received.typecode == canonical_typecode(sent.typecode), path
        assert received.tobytes() == sent.tobytes(), path
        return
    assert type(received) is type(sent), f"{path}: {type(received)} is not {type(sent)}"
    if isinstance(sent, float):
        if math.isnan(sent):
            assert math.isnan(received), path
        else:
            assert float_bits(received) == float_bits(sent), f"{path}: {received!r} != {sent!r}"
    elif isinstance(sent, (list, tuple)):
        assert len(received) == len(sent), path
        for index, (a, b) in enumerate(zip(sent, received, strict=True)):
            assert_same(a, b, f"{path}[{index}]")
    elif isinstance(sent, dict):
        assert [(type(k), k) for k in received] == [(type(k), k) for k in sent], path
        for key, value in sent.items():
            assert_same(value, received[key], f"{path}[{key!r}]")
    else:
        assert received == sent, path


def depth_of(value: object) -> int:
    """Depth of the deepest container in ``value`` when it is a spack element."""
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, (list, tuple)):
        return 1 + max(map(depth_of, value), default=0)
    return 0


def ext(code: int, payload: bytes) -> bytes:
    """An ext value, encoded by hand per the msgpack spec (any code, -128..127)."""
    fixext = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    size = len(payload)
    if size in fixext:
        header = bytes([fixext[size]])
    elif size < 1 << 8:
        header = bytes([0xC7, size])
    elif size < 1 << 16:
        header = b"\xc8" + size.to_bytes(2, "big")
    else:
        header = b"\xc9" + size.to_bytes(4, "big")
    return header + code.to_bytes(1, "big", signed=True) + payload


def wrap(kind: str, value: Any) -> Any:
    """Put ``value`` inside one container of the given kind."""
    if kind == "list":
        return [value]
    if kind == "tuple":
        return (value,)
    return {"k": value}


def nested_value(kind: str, depth: int) -> Any:
    """A chain of ``depth`` containers of one kind, innermost empty."""
    value: Any = {"list": [], "tuple": (), "dict": {}}[kind]
    for _ in range(depth - 1):
        value = wrap(kind, value)
    return value


def nested_bytes(kind: str, depth: int) -> bytes:
    """Hand-built encoding of ``Spack(nested_value(kind, depth))``."""
    if kind == "list":
        inner = b"\x90"
        for _ in range(depth - 1):
            inner = b"\x91" + inner
    elif kind == "dict":
        inner = b"\x80"
        for _ in range(depth - 1):
            inner = b"\x81\xa1k" + inner
    else:
        inner = ext(EXT_TUPLE, b"\x90")
        for _ in range(depth - 1):
            inner = ext(EXT_TUPLE, b"\x91" + inner)
    return b"\x91" + inner


def peak_memory(action: Callable[[], object]) -> int:
    """Peak traced allocation while running ``action`` (exceptions are swallowed)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with contextlib.suppress(MalformedSpack, InvalidSpackValue):
            action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --------------------------------------------------------------------------- strategies


def as_memoryview(data: bytes) -> memoryview:
    return memoryview(data)


def array_elements(typecode: str) -> st.SearchStrategy[Any]:
    kind, size = element_kind(typecode)
    if kind == "float":
        return st.floats(width=32) if size == 4 else st.floats()
    if kind == "int":
        return st.integers(-(2 ** (8 * size - 1)), 2 ** (8 * size - 1) - 1)
    return st.integers(0, 2 ** (8 * size) - 1)


def typed_arrays() -> st.SearchStrategy[array[Any]]:
    return st.sampled_from(NUMERIC_TYPECODES).flatmap(
        lambda code: st.lists(array_elements(code), max_size=6).map(
            lambda items: array(code, items)
        )
    )


scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.floats(width=32).map(Float32),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.binary(max_size=12).map(bytearray),
    st.binary(max_size=12).map(as_memoryview),
    typed_arrays(),
)
keys: st.SearchStrategy[str | bytes] = st.text(max_size=6) | st.binary(max_size=6)


def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=4)
    )


spack_values: st.SearchStrategy[Any] = st.recursive(scalars, extend, max_leaves=16)
spack_lists: st.SearchStrategy[list[Any]] = st.lists(spack_values, max_size=5)

# Arbitrary msgpack (anything msgpack itself can encode), to feed the strict decoder.
_raw_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=10)),
)
raw_msgpack: st.SearchStrategy[Any] = st.recursive(
    _raw_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.one_of(st.text(max_size=4), st.binary(max_size=4), st.integers(-5, 5), st.none()),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


# ------------------------------------------------------------------------ wire format


PINNED = [
    ([], "90"),
    ([1, "a"], "9201a161"),
    ([None, True, False], "93c0c3c2"),
    ([-1, 128, 2**64 - 1, -(2**63)], "94ffcc80cfffffffffffffffffd38000000000000000"),
    ([1.5], "91cb3ff8000000000000"),
    ([Float32(1.5)], "91d6013fc00000"),
    (["\u00e9"], "91a2c3a9"),
    ([b"x", bytearray(b"y"), memoryview(b"z")], "93c40178c40179c4017a"),
    ([[1, 2]], "91920102"),
    ([(1, 2)], "91c70302920102"),
    ([()], "91d40290"),
    ([{"a": 1}], "9181a16101"),
    ([{b"k": None}], "9181c4016bc0"),
    ([array("b", [-1])], "91d410ff"),
    ([array("H", [0x0102])], "91d5130201"),
    ([array("i", [1, 2])], "91d7140100000002000000"),
    ([array("H", [])], "91c70013"),
    ([array("f", [1.5])], "91d6180000c03f"),
    ([array("d", [1.0])], "91d719000000000000f03f"),
]


@pytest.mark.parametrize(("values", "hex_encoding"), PINNED)
def test_encoding_is_pinned(values: list[Any], hex_encoding: str) -> None:
    assert encode_spack(values) == bytes.fromhex(hex_encoding)


@pytest.mark.parametrize(("values", "hex_encoding"), PINNED)
def test_pinned_encodings_decode_to_the_same_types(values: list[Any], hex_encoding: str) -> None:
    assert_same(values, list(decode_spack(bytes.fromhex(hex_encoding))))


def test_ext_codes_are_the_documented_ones() -> None:
    assert (EXT_FLOAT32, EXT_TUPLE) == (1, 2)
    assert list(range(16, 26)) == [
        EXT_ARRAY_INT8,
        EXT_ARRAY_UINT8,
        EXT_ARRAY_INT16,
        EXT_ARRAY_UINT16,
        EXT_ARRAY_INT32,
        EXT_ARRAY_UINT32,
        EXT_ARRAY_INT64,
        EXT_ARRAY_UINT64,
        EXT_ARRAY_FLOAT32,
        EXT_ARRAY_FLOAT64,
    ]
    assert MAX_DEPTH == 32


def test_floats_are_always_float64_on_the_wire() -> None:
    encoded = encode_spack([0.1])
    assert encoded[1] == 0xCB
    assert struct.unpack(">d", encoded[2:])[0] == 0.1


@pytest.mark.parametrize("value", [0, 1, 127, 128, 255, 256, -32, -33, 2**32, 2**64 - 1, -(2**63)])
def test_ints_round_trip_as_ints(value: int) -> None:
    assert_same([value], list(decode_spack(encode_spack([value]))))


def test_bool_stays_bool_and_int_stays_int() -> None:
    decoded = decode_spack(encode_spack([True, 1, False, 0]))
    assert [type(v) for v in decoded] == [bool, int, bool, int]


def test_non_shortest_int_and_float32_forms_are_accepted() -> None:
    # Receivers accept any valid msgpack width; msgpack's own float 32 arrives as a float.
    decoded = decode_spack(b"\x92\xd3" + (1).to_bytes(8, "big") + b"\xca\x3f\xc0\x00\x00")
    assert_same([1, 1.5], list(decoded))


def test_str_and_bytes_keys_that_look_alike_are_distinct() -> None:
    value: dict[str | bytes, Any] = {"a": 1, b"a": 2}
    decoded = decode_spack(encode_spack([value]))
    assert_same([value], list(decoded))


def test_dict_order_is_preserved() -> None:
    value: dict[str | bytes, Any] = {"z": 1, "a": 2, b"m": 3}
    (decoded,) = decode_spack(encode_spack([value]))
    assert isinstance(decoded, dict)
    assert list(decoded) == ["z", "a", b"m"]


# ----------------------------------------------------------------------------- Float32


def test_float32_rounds_to_binary32() -> None:
    expected = struct.unpack("<f", struct.pack("<f", 0.1))[0]
    value = Float32(0.1)
    assert value == expected
    assert value != 0.1
    assert isinstance(value, float)
    assert type(value + 1) is float


def test_float32_repr_and_str() -> None:
    assert repr(Float32(1.5)) == "Float32(1.5)"
    assert str(Float32(1.5)) == "1.5"
    value = Float32(0.1)
    assert eval(repr(value), {"Float32": Float32}) == value


@pytest.mark.parametrize("value", [1e300, -1e39, 2**200, 10**400])
def test_float32_out_of_range_is_refused(value: float) -> None:
    with pytest.raises(InvalidSpackValue, match="binary32 range"):
        Float32(value)


def test_float32_special_values() -> None:
    assert Float32(3.4028234663852886e38) == 3.4028234663852886e38  # FLT_MAX
    assert Float32(math.inf) == math.inf
    assert Float32(-math.inf) == -math.inf
    assert math.isnan(Float32(math.nan))
    assert math.copysign(1.0, Float32(-0.0)) == -1.0
    values = [Float32(-0.0), Float32(math.inf), Float32(math.nan), Float32(1e-45)]
    assert_same(values, list(decode_spack(encode_spack(values))))


def test_float32_pickles() -> None:
    value = pickle.loads(pickle.dumps(Float32(2.5)))
    assert type(value) is Float32
    assert value == 2.5


def test_decoded_float32_ext_is_float32() -> None:
    (value,) = decode_spack(b"\x91" + ext(EXT_FLOAT32, struct.pack(">f", 0.1)))
    assert type(value) is Float32
    assert value == Float32(0.1)


# ------------------------------------------------------------------------------ arrays


@pytest.mark.parametrize("typecode", NUMERIC_TYPECODES)
def test_array_extremes_round_trip(typecode: str) -> None:
    kind, size = element_kind(typecode)
    if kind == "float":
        items: list[Any] = [0.0, -0.0, math.inf, -math.inf, 1.5]
    elif kind == "int":
        items = [-(2 ** (8 * size - 1)), -1, 0, 2 ** (8 * size - 1) - 1]
    else:
        items = [0, 1, 2 ** (8 * size) - 1]
    sent = array(typecode, items)
    (received,) = decode_spack(encode_spack([sent]))
    assert_same(sent, received)


@pytest.mark.parametrize("typecode", NUMERIC_TYPECODES)
def test_array_payload_is_raw_little_endian_elements(typecode: str) -> None:
    kind, size = element_kind(typecode)
    items: list[Any] = [1.5, -2.0] if kind == "float" else [1, 2]
    encoded = encode_spack([array(typecode, items)])
    header = msgpack.unpackb(encoded, ext_hook=lambda code, data: (code, data))[0]
    fmt, expected_ext = {
        ("int", 1): ("b", 16),
        ("uint", 1): ("B", 17),
        ("int", 2): ("h", 18),
        ("uint", 2): ("H", 19),
        ("int", 4): ("i", 20),
        ("uint", 4): ("I", 21),
        ("int", 8): ("q", 22),
        ("uint", 8): ("Q", 23),
        ("float", 4): ("f", 24),
        ("float", 8): ("d", 25),
    }[(kind, size)]
    assert header == (expected_ext, struct.pack(f"<{len(items)}{fmt}", *items))


@pytest.mark.skipif(array("l").itemsize != 8, reason="C long is not 64 bits here")
def test_long_arrays_arrive_as_long_long() -> None:
    (signed, unsigned) = decode_spack(encode_spack([array("l", [-5]), array("L", [5])]))
    assert isinstance(signed, array)
    assert isinstance(unsigned, array)
    assert (signed.typecode, unsigned.typecode) == ("q", "Q")
    assert (signed.tolist(), unsigned.tolist()) == ([-5], [5])


def test_big_endian_hosts_byteswap(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: on this (little-endian) host the swap turns native order into big-endian,
    # which shows both directions swap and still agree with each other.
    monkeypatch.setattr(spack_module, "_BYTESWAP", True)
    sent = array("H", [0x0102, 0x0304])
    encoded = encode_spack([sent])
    if sys.byteorder == "little":
        assert encoded.endswith(b"\x01\x02\x03\x04")
    assert_same([sent], list(decode_spack(encoded)))


def test_unicode_arrays_are_refused() -> None:
    with pytest.raises(InvalidSpackValue, match="typecode 'u'"):
        encode_spack([array("u", "x")])  # type: ignore[list-item]


# ------------------------------------------------------------------------ round trips


@given(spack_lists)
def test_round_trip_is_exact(values: list[Any]) -> None:
    assume(max(map(depth_of, values), default=0) <= MAX_DEPTH)
    encoded = encode_spack(values)
    decoded = decode_spack(encoded)
    assert_same(values, list(decoded))
    # Canonical: re-encoding what was decoded gives the same bytes.
    assert encode_spack(decoded) == encoded
    assert Spack(*values).encode() == encoded
    assert_same(decoded.values, Spack.decode(bytearray(encoded)).values)


@given(st.lists(st.sampled_from(["list", "tuple", "dict"]), min_size=1, max_size=MAX_DEPTH))
def test_mixed_nesting_up_to_the_limit_round_trips(kinds: list[str]) -> None:
    value: Any = 7
    for kind in reversed(kinds):
        value = wrap(kind, value)
    assert depth_of(value) == len(kinds)
    assert_same([value], list(decode_spack(encode_spack([value]))))
    if len(kinds) == MAX_DEPTH:
        with pytest.raises(InvalidSpackValue, match="nesting deeper"):
            encode_spack([[value]])


# -------------------------------------------------------------------------------- depth


@pytest.mark.parametrize("kind", ["list", "tuple", "dict"])
def test_depth_limit_is_exact(kind: str) -> None:
    at_limit = nested_value(kind, MAX_DEPTH)
    assert depth_of(at_limit) == MAX_DEPTH
    encoded = nested_bytes(kind, MAX_DEPTH)
    assert encode_spack([at_limit]) == encoded
    assert_same([at_limit], list(decode_spack(encoded)))

    too_deep = nested_value(kind, MAX_DEPTH + 1)
    with pytest.raises(InvalidSpackValue, match="nesting deeper"):
        encode_spack([too_deep])
    with pytest.raises(MalformedSpack, match="deeper"):
        decode_spack(nested_bytes(kind, MAX_DEPTH + 1))


@pytest.mark.parametrize("kind", ["list", "tuple", "dict"])
def test_very_deep_input_is_malformed_not_recursion_error(kind: str) -> None:
    with pytest.raises(MalformedSpack):
        decode_spack(nested_bytes(kind, 10_000))


def test_very_deep_value_is_refused_not_recursion_error() -> None:
    value: Any = []
    for _ in range(10_000):
        value = [value, (value,)]
    with pytest.raises(InvalidSpackValue, match="nesting deeper"):
        encode_spack([value])


def test_cyclic_value_is_refused() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(InvalidSpackValue, match="nesting deeper"):
        encode_spack([cycle])


def test_max_depth_can_only_tighten() -> None:
    assert list(decode_spack(b"\x91\x90", max_depth=1)) == [[]]
    assert list(decode_spack(b"\x91\x01", max_depth=0)) == [1]
    with pytest.raises(MalformedSpack):
        decode_spack(b"\x91\x90", max_depth=0)
    with pytest.raises(MalformedSpack):
        decode_spack(b"\x91" + ext(EXT_TUPLE, b"\x91\x90"), max_depth=1)
    with pytest.raises(MalformedSpack):
        Spack.decode(b"\x91\x81\xa1k\x80", max_depth=1)
    for bad in (-1, MAX_DEPTH + 1):
        with pytest.raises(ValueError, match="max_depth"):
            decode_spack(b"\x90", max_depth=bad)


# ------------------------------------------------------------------- malformed inputs

MALFORMED = {
    "empty": b"",
    "truncated array": b"\x92\x01",
    "truncated str": b"\x91\xa3ab",
    "trailing byte": b"\x90\x00",
    "two spacks": b"\x90\x90",
    "top level int": b"\x01",
    "top level nil": b"\xc0",
    "top level map": b"\x80",
    "top level str": b"\xa1a",
    "top level float32 ext": ext(EXT_FLOAT32, b"\x3f\xc0\x00\x00"),
    "top level tuple ext": ext(EXT_TUPLE, b"\x90"),
    "reserved 0xc1": b"\x91\xc1",
    "invalid utf-8": b"\x91\xa2\xff\xfe",
    "utf-8 surrogate": b"\x91\xa3\xed\xa0\x80",
    "overlong utf-8": b"\x91\xa2\xc0\x80",
    "invalid utf-8 key": b"\x91\x81\xa1\xff\x01",
    "int key": b"\x91\x81\x01\x02",
    "nil key": b"\x91\x81\xc0\x01",
    "float key": b"\x91\x81\xcb" + struct.pack(">d", 1.5) + b"\x01",
    "array key": b"\x91\x81\x90\x01",
    "duplicate str key": b"\x91\x82\xa1a\x01\xa1a\x02",
    "duplicate bin key": b"\x91\x82\xc4\x01a\x01\xc4\x01a\x02",
    "duplicate key in tuple": b"\x91" + ext(EXT_TUPLE, b"\x91\x82\xa1a\x01\xa1a\x01"),
    "ext 0": b"\x91" + ext(0, b"\x00"),
    "ext 3": b"\x91" + ext(3, b"\x00"),
    "ext 15": b"\x91" + ext(15, b"\x00"),
    "ext 26": b"\x91" + ext(26, b"\x00"),
    "ext 127": b"\x91" + ext(127, b""),
    "ext -2": b"\x91" + ext(-2, b"\x00"),
    "ext -128": b"\x91" + ext(-128, b"\x00"),
    "timestamp": b"\x91" + ext(-1, b"\x00\x00\x00\x00"),
    "timestamp 64": b"\x91" + ext(-1, bytes(8)),
    "ext -1 bad length": b"\x91" + ext(-1, b"\x00"),
    "timestamp in list": b"\x91\x92\x01" + ext(-1, bytes(4)),
    "timestamp in map": b"\x91\x81\xa1t" + ext(-1, bytes(4)),
    "timestamp in tuple": b"\x91" + ext(EXT_TUPLE, b"\x91" + ext(-1, bytes(4))),
    "float32 ext empty": b"\x91" + ext(EXT_FLOAT32, b""),
    "float32 ext short": b"\x91" + ext(EXT_FLOAT32, b"\x00\x00"),
    "float32 ext long": b"\x91" + ext(EXT_FLOAT32, bytes(8)),
    "tuple ext empty": b"\x91" + ext(EXT_TUPLE, b""),
    "tuple ext int": b"\x91" + ext(EXT_TUPLE, b"\x01"),
    "tuple ext map": b"\x91" + ext(EXT_TUPLE, b"\x80"),
    "tuple ext trailing": b"\x91" + ext(EXT_TUPLE, b"\x90\x00"),
    "tuple ext truncated": b"\x91" + ext(EXT_TUPLE, b"\x92\x01"),
    "tuple ext invalid": b"\x91" + ext(EXT_TUPLE, b"\x91\xc1"),
    "int16 array odd": b"\x91" + ext(EXT_ARRAY_INT16, b"\x00"),
    "uint32 array 6 bytes": b"\x91" + ext(EXT_ARRAY_UINT32, bytes(6)),
    "int64 array 4 bytes": b"\x91" + ext(EXT_ARRAY_INT64, bytes(4)),
    "float32 array 3 bytes": b"\x91" + ext(EXT_ARRAY_FLOAT32, bytes(3)),
    "float64 array 12 bytes": b"\x91" + ext(EXT_ARRAY_FLOAT64, bytes(12)),
    "msgpack stack overflow": b"\x91" * 5000,
    "huge array claim": b"\xdd\xff\xff\xff\xff",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_raises_malformed_spack(data: bytes) -> None:
    with pytest.raises(MalformedSpack):
        decode_spack(data)


def test_array_ext_length_must_be_a_multiple_of_the_item_size() -> None:
    with pytest.raises(MalformedSpack, match="not a multiple of 4"):
        decode_spack(MALFORMED["uint32 array 6 bytes"])


def test_large_containers_are_checked_to_the_end() -> None:
    # Long containers take a fast path; what hides after many plain values still counts.
    values: list[Any] = [[*range(40), (1, [2])], {str(i): i for i in range(40)} | {"t": (3,)}]
    assert_same(values, list(decode_spack(encode_spack(values))))
    with pytest.raises(InvalidSpackValue, match="spack element 0, item 40: cannot encode set"):
        encode_spack([[*range(40), set()]])  # type: ignore[list-item]
    with pytest.raises(InvalidSpackValue, match=r"key 'z'.*nesting deeper"):
        encode_spack([{**{str(i): i for i in range(40)}, "z": nested_value("list", MAX_DEPTH)}])
    timestamp_late = b"\x91\xdc\x00\x29" + bytes(40) + ext(-1, bytes(4))
    with pytest.raises(MalformedSpack, match="ext code -1"):
        decode_spack(timestamp_late)


@pytest.mark.parametrize("name", [name for name in MALFORMED if name.startswith("timestamp")])
def test_timestamps_are_an_unknown_ext(name: str) -> None:
    with pytest.raises(MalformedSpack, match="ext code -1"):
        decode_spack(MALFORMED[name])


@pytest.mark.parametrize(
    "name",
    [
        "truncated array",
        "trailing byte",
        "reserved 0xc1",
        "invalid utf-8",
        "int key",
        "tuple ext trailing",
        "msgpack stack overflow",
    ],
)
def test_msgpack_errors_are_chained(name: str) -> None:
    with pytest.raises(MalformedSpack) as caught:
        decode_spack(MALFORMED[name])
    assert caught.value.__cause__ is not None


def test_malformed_messages_do_not_quote_the_input() -> None:
    with pytest.raises(MalformedSpack) as caught:
        decode_spack(b"\x91\xa6secr\xffe")
    assert "secr" not in str(caught.value)
    assert "0xff" not in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\x91\xdd\xff\xff\xff\xff",
        b"\x91\xdf\xff\xff\xff\xff",
        b"\x91\xdb\xff\xff\xff\xff",
        b"\x91\xc6\xff\xff\xff\xff",
        b"\x91\xc9\xff\xff\xff\xff\x02",
        b"\x91\xc9\xff\xff\xff\xff\x19",
        b"\x91" + ext(EXT_TUPLE, b"\xdd\xff\xff\xff\xff"),
    ],
)
def test_huge_length_claims_fail_without_allocating(data: bytes) -> None:
    with pytest.raises(MalformedSpack):
        decode_spack(data)
    assert peak_memory(lambda: decode_spack(data)) < 64 * 1024


def test_nested_tuples_do_not_multiply_memory() -> None:
    value: Any = bytes(1 << 20)
    for _ in range(MAX_DEPTH):
        value = (value,)
    encoded = encode_spack([value])
    # A payload copy per nesting level would need about 33 times the input.
    assert peak_memory(lambda: decode_spack(encoded)) < 3 * len(encoded)


@settings(max_examples=500)
@given(st.binary(max_size=48))
def test_random_bytes_only_raise_malformed_spack(data: bytes) -> None:
    try:
        decoded = decode_spack(data)
    except MalformedSpack:
        return
    assert encode_spack(decoded) is not None


@settings(max_examples=300)
@given(raw_msgpack)
def test_arbitrary_msgpack_only_raises_malformed_spack(value: Any) -> None:
    data = msgpack.packb([value], use_bin_type=True)
    try:
        decoded = decode_spack(data)
    except MalformedSpack:
        return
    assert_same(list(decoded), list(decode_spack(encode_spack(decoded))))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(spack_lists, st.data())
def test_mutated_encodings_only_raise_malformed_spack(
    values: list[Any], data: st.DataObject
) -> None:
    assume(max(map(depth_of, values), default=0) <= MAX_DEPTH)
    mutated = bytearray(encode_spack(values))
    for _ in range(data.draw(st.integers(1, 3))):
        operation = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        position = data.draw(st.integers(0, max(len(mutated) - 1, 0)))
        if operation == "flip" and mutated:
            mutated[position] ^= 1 << data.draw(st.integers(0, 7))
        elif operation == "set" and mutated:
            mutated[position] = data.draw(st.integers(0, 255))
        elif operation == "insert":
            mutated[position:position] = data.draw(st.binary(min_size=1, max_size=4))
        elif operation == "delete":
            del mutated[position : position + data.draw(st.integers(1, 4))]
        else:
            del mutated[position:]
    try:
        decoded = decode_spack(bytes(mutated))
    except MalformedSpack:
        return
    # Whatever decodes is a valid spack: it re-encodes, and decodes to the same thing.
    assert_same(list(decoded), list(decode_spack(encode_spack(decoded))))


# -------------------------------------------------------------------------- encode errors


class Color(enum.IntEnum):
    RED = 1


class MyStr(str):
    __slots__ = ()


class MyFloat(float):
    __slots__ = ()


class MyBytes(bytes):
    __slots__ = ()


ENCODE_ERRORS: list[tuple[list[Any], list[str]]] = [
    ([1, 2, {"x": set()}], ["spack element 2, key 'x': cannot encode set"]),
    ([complex(1, 2)], ["spack element 0", "complex"]),
    ([0, datetime.datetime(2024, 1, 1)], ["spack element 1", "datetime"]),
    ([object()], ["spack element 0", "object"]),
    ([frozenset()], ["frozenset"]),
    ([range(3)], ["range"]),
    ([Color.RED], ["spack element 0", "Color", "subclass of int"]),
    ([collections.OrderedDict()], ["OrderedDict", "subclass of dict"]),
    ([MyStr("a")], ["MyStr", "subclass of str"]),
    ([MyFloat(1.0)], ["MyFloat", "subclass of float"]),
    ([MyBytes(b"a")], ["MyBytes", "subclass of bytes"]),
    ([msgpack.ExtType(5, b"x")], ["ExtType"]),
    ([msgpack.Timestamp(0)], ["Timestamp"]),
    ([True, 2**64], ["spack element 1", "out of range"]),
    ([-(2**63) - 1], ["spack element 0", "out of range"]),
    ([[1, 2, [3, 2**70]]], ["spack element 0, item 2, item 1", "out of range"]),
    ([{1: "a"}], ["spack element 0, key 1", "str or bytes, not int"]),
    ([{(1, 2): "a"}], ["key (1, 2)", "not tuple"]),
    ([{None: 1}], ["key None", "not NoneType"]),
    ([{"ok": {2.5: 1}}], ["spack element 0, key 'ok', key 2.5", "not float"]),
    (["ok", "a\ud800"], ["spack element 1", "surrogate at index 1"]),
    ([{"\udfff": 1}], ["spack element 0, key", "surrogate"]),
    ([(1, {"a": {1, 2}})], ["spack element 0, item 1, key 'a': cannot encode set"]),
    ([array("u", "x")], ["spack element 0", "typecode 'u'"]),
    ([memoryview(b"abcd")[::2]], ["spack element 0", "C-contiguous"]),
    ([nested_value("dict", MAX_DEPTH + 1)], ["spack element 0, key 'k'", "nesting deeper"]),
]


@pytest.mark.parametrize(("values", "fragments"), ENCODE_ERRORS)
def test_unencodable_values_are_refused_with_their_position(
    values: list[Any], fragments: list[str]
) -> None:
    with pytest.raises(InvalidSpackValue) as caught:
        encode_spack(values)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_spack_encode_refuses_too() -> None:
    with pytest.raises(InvalidSpackValue, match="spack element 1"):
        Spack(1).push({1, 2}).encode()  # type: ignore[arg-type]


def test_msgpack_encode_errors_are_chained() -> None:
    with pytest.raises(InvalidSpackValue) as caught:
        encode_spack(["\ud800"])
    assert isinstance(caught.value.__cause__, UnicodeEncodeError)


# ---------------------------------------------------------------------------- Spack API


def test_push_appends_and_chains() -> None:
    spack = Spack(1)
    assert spack.push(2).push(3, "x") is spack
    assert spack.values == (1, 2, 3, "x")


def test_values_is_a_snapshot() -> None:
    spack = Spack(1)
    values = spack.values
    spack.push(2)
    assert values == (1,)


def test_destructuring() -> None:
    a, b, c = Spack(1, "a", b"x")
    assert (a, b, c) == (1, "a", b"x")
    d, e = Spack.decode(Spack(None, [1]).encode())
    assert (d, e) == (None, [1])


def test_sequence_behaviour() -> None:
    spack = Spack(1, "a", b"x", "a")
    assert isinstance(spack, Sequence)
    assert len(spack) == 4
    assert spack[0] == 1
    assert spack[-1] == "a"
    assert list(spack) == [1, "a", b"x", "a"]
    assert list(reversed(spack)) == ["a", b"x", "a", 1]
    assert "a" in spack
    assert spack.index(b"x") == 2
    assert spack.count("a") == 2
    with pytest.raises(IndexError):
        spack[4]


def test_slicing_returns_an_independent_spack() -> None:
    spack = Spack(1, 2, 3)
    tail = spack[1:]
    assert type(tail) is Spack
    assert tail == Spack(2, 3)
    tail.push(4)
    assert spack == Spack(1, 2, 3)
    assert spack[::-1] == Spack(3, 2, 1)


def test_equality() -> None:
    assert Spack(1, "a") == Spack(1, "a")
    assert Spack(1, "a") != Spack("a", 1)
    assert Spack() != Spack(None)
    assert Spack(1) != [1]
    assert Spack(1).__eq__([1]) is NotImplemented


def test_unhashable_and_slotted() -> None:
    with pytest.raises(TypeError):
        hash(Spack())
    with pytest.raises(AttributeError):
        Spack().extra = 1  # type: ignore[attr-defined]


def test_repr() -> None:
    assert repr(Spack(1, "a", b"x")) == "Spack(1, 'a', b'x')"
    assert repr(Spack()) == "Spack()"
    assert repr(Spack(Float32(0.5), (1,))) == "Spack(Float32(0.5), (1,))"


def full_repr(values: Sequence[Any]) -> str:
    return "Spack(" + ", ".join(map(repr, values)) + ")"


@given(spack_lists)
def test_a_received_spack_reads_as_its_values_repr_when_short(values: list[Any]) -> None:
    received = Spack.decode(Spack(*values).encode())
    text = repr(received)
    expected = full_repr(received)
    if len(expected) <= 200:
        assert text == expected
    else:
        assert len(text) < 2600


def test_repr_is_bounded_and_built_from_slices() -> None:
    big = Spack("op", b"\x1b" * (16 << 20))
    tracemalloc.start()
    try:
        text = repr(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # a slice of the value, never its 64 MiB repr
    assert text.startswith("Spack('op', b'\\x1b\\x1b")
    assert text.endswith(" more bytes))")
    assert len(text) < 300
    many = repr(Spack(*range(1_000_000), "last"))
    assert many.startswith("Spack(0, 1, 2, ")
    assert many.endswith(" ... (999780 more values))")
    assert len(many) < 1200
    wide = repr(Spack([["x" * 1000] * 1000] * 1000, {"k" * 10**6: "v" * 10**6}))
    assert len(wide) < 2600
    assert wide.endswith(
        "'... (800 more characters), ... (995 more values)], ... (999 more values)],"
        " ... (1 more value))"
    )


def test_repr_of_a_locally_built_spack_never_fails_and_stays_bounded() -> None:
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    unsupported: Any = {1, 2}  # no spack can carry a set, but one can be built and printed
    text = repr(Spack(cyclic, deep, 10**5000, unsupported, bytearray(b"ab"), memoryview(b"cd")))
    assert text.count("[...]") == 2  # deeper than MAX_DEPTH: not followed
    assert "[1, [1, [1, " in text
    assert "<int of 16610 bits>" in text
    assert "{1, 2}, bytearray(b'ab'), memoryview(b'cd'))" in text
    assert len(text) < 2600
    huge: Any = set(range(10**6))
    assert len(repr(Spack(huge))) < 200  # reprlib's bound for the rest


def test_unpack_checks_and_returns_the_values() -> None:
    received = Spack.decode(
        Spack("op", 3, 2.5, b"x", [1], (2,), {"k": 1}, array("d", [1.0])).encode()
    )
    values = received.unpack(str, int, float, bytes, list, tuple, dict, array)
    assert values == received.values
    assert Spack(None, True, Float32(0.5)).unpack(type(None), bool, float)[2] == Float32(0.5)
    assert Spack(1, "x", [1], None).unpack(object, object, object, object)[0] == 1
    assert Spack().unpack() == ()
    nine = Spack(*range(9))
    assert nine.unpack(*[int] * 9) == tuple(range(9))


def test_unpack_follows_the_type_checker_for_bool_and_numbers() -> None:
    assert Spack(1).unpack(float) == (1,)  # an int is a float to a type checker
    with pytest.raises(TypeError, match=r"^spack\[0\]: expected int, got bool$"):
        Spack(True).unpack(int)
    with pytest.raises(TypeError, match=r"^spack\[0\]: expected float, got bool$"):
        Spack(False).unpack(float)
    with pytest.raises(TypeError, match=r"^spack\[0\]: expected int, got float$"):
        Spack(1.0).unpack(int)
    with pytest.raises(TypeError, match=r"^spack\[0\]: expected Float32, got float$"):
        Spack(0.5).unpack(Float32)


def test_unpack_names_the_position_and_both_types() -> None:
    spack = Spack("set", "count", 3)
    with pytest.raises(TypeError, match=r"^spack\[1\]: expected int, got str$"):
        spack.unpack(str, int, int)
    with pytest.raises(TypeError, match=r"^spack\[2\]: expected list, got int$"):
        spack.unpack(str, str, list)
    with pytest.raises(TypeError, match=r"^spack\[0\]: expected bytes, got NoneType$"):
        Spack(None).unpack(bytes)
    with pytest.raises(TypeError, match=r"^the spack has 3 values, expected 2 \(str, str\)$"):
        spack.unpack(str, str)
    with pytest.raises(TypeError, match=r"^the spack has 1 value, expected 0 \(\)$"):
        Spack(1).unpack()


@pytest.mark.parametrize("kind", [list[int], dict[str, int], int | None, "int", 3])
def test_unpack_takes_plain_classes_only(kind: Any) -> None:
    with pytest.raises(TypeError, match="takes plain classes"):
        Spack([1]).unpack(kind)


RECEIVED_TYPES = {type(None), bool, int, float, Float32, str, bytes, list, tuple, dict, array}


def received_types(value: object) -> set[type]:
    found = {type(value)}
    if isinstance(value, (list, tuple)):
        found |= set().union(*map(received_types, value))
    elif isinstance(value, dict):
        found |= set().union(*map(received_types, [*value, *value.values()]))
    return found


@given(spack_lists)
def test_received_values_are_of_the_received_types(values: list[Any]) -> None:
    """What ``Received`` promises: no bytearray or memoryview, whatever was sent."""
    received = Spack.decode(Spack(*values).encode())
    assert received_types(list(received)) - {list} <= RECEIVED_TYPES


def test_encode_and_decode_methods_delegate() -> None:
    spack = Spack(1, (2.5, Float32(3.0)), {"k": [b"v"]})
    encoded = spack.encode()
    assert encoded == encode_spack([1, (2.5, Float32(3.0)), {"k": [b"v"]}])
    for data in (encoded, bytearray(encoded), memoryview(encoded)):
        assert_same(spack.values, Spack.decode(data).values)


def test_encode_spack_accepts_any_iterable() -> None:
    def generate() -> Iterator[int]:
        yield from (1, 2)

    assert encode_spack(generate()) == b"\x92\x01\x02"
    assert encode_spack(Spack(1, 2)) == b"\x92\x01\x02"
    assert encode_spack(()) == b"\x90"


def test_decode_accepts_multibyte_memoryviews() -> None:
    data = encode_spack(["ab", 1, 2])
    assert len(data) % 2 == 0
    assert decode_spack(memoryview(data).cast("H")) == Spack("ab", 1, 2)


def test_decode_refuses_non_bytes() -> None:
    with pytest.raises(TypeError, match="bytes-like"):
        decode_spack("\x90")  # type: ignore[arg-type]


def test_module_is_sans_io() -> None:
    source = Path(spack_module.__file__).read_text(encoding="utf-8")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported.isdisjoint({"anyio", "asyncio", "socket", "time", "trio", "selectors"})


def test_encoding_from_many_threads_never_mixes_buffers() -> None:
    """Packers are reused per thread; concurrent and nested (tuple) packing stay separate."""
    spacks = [Spack(i, ("nested", (i, b"x" * i)), [i] * (i % 7)) for i in range(64)]
    expected = [spack.encode() for spack in spacks]
    failures: list[int] = []

    def work() -> None:
        for _ in range(50):
            for index, spack in enumerate(spacks):
                if spack.encode() != expected[index]:
                    failures.append(index)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert all(Spack.decode(data) == spack for data, spack in zip(expected, spacks, strict=True))


# -- decoding from pieces (a fragmented message) ---------------------------------------------


def _outcome(decode: Callable[[], Spack]) -> tuple[str, Any]:
    """What a decode did: its values, or the type of error it raised."""
    try:
        return "ok", list(decode())
    except MalformedSpack:
        return "malformed", None


@contextlib.contextmanager
def payloads_cut_at_any_size() -> Iterator[None]:
    """Cut every str, bin and typed-array payload out of msgpack's way (normally >= 64 KiB)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weigh_module, "BIG", 2)
        yield


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(
    head=st.lists(spack_values, max_size=4),
    payload=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 700), min_size=1, max_size=4),
)
def test_pieces_with_a_cut_out_bin_decode_as_the_whole(
    head: list[Any], payload: bytes, cuts: list[int]
) -> None:
    """A payload assembled from the pieces gives exactly what the joined encoding gives."""
    data = encode_spack([*head, payload])
    pieces = [memoryview(piece) for piece in _split(data, cuts)]
    with payloads_cut_at_any_size():
        decoded = decode_spack_pieces(pieces)
    assert_same(list(decode_spack(data)), list(decoded))
    assert type(decoded[-1]) is bytes


@given(
    data=st.binary(max_size=80),
    cuts=st.lists(st.integers(0, 90), min_size=1, max_size=3),
)
def test_pieces_of_any_bytes_fail_or_succeed_as_the_whole(data: bytes, cuts: list[int]) -> None:
    """Whatever the bytes and the cuts, pieces decode exactly as their concatenation."""
    pieces = _split(data, cuts)
    whole = _outcome(partial(decode_spack, data))
    assert _outcome(partial(decode_spack_pieces, pieces)) == whole
    with payloads_cut_at_any_size():
        assert _outcome(partial(decode_spack_pieces, pieces)) == whole


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x92\xa2\xff\xfe\xc4\x03abc", "invalid UTF-8 before the bin"),
        (b"\x92\x82\xa1k\x01\xa1k\x02\xc4\x03abc", "repeated map key before the bin"),
        (b"\x92\xc1\xc4\x03abc", "reserved byte before the bin"),
        (b"\x92\x01\xc4\x04abc", "bin shorter than its header says"),
        (b"\x92\x01\xc4\x02abc", "trailing byte after the bin"),
        (b"\x93\x01\xc4\x03abc", "array claims one element more"),
        (b"\x81\xa1k\xc4\x03abc", "top level is a map"),
        (b"\x92" + b"\x91" * 40 + b"\x90\xc4\x03abc", "too deep before the bin"),
    ],
)
def test_malformed_pieces_are_refused_like_the_whole(data: bytes, why: str) -> None:
    """Hostile shapes near the fast path are refused exactly as the joined bytes are."""
    with payloads_cut_at_any_size():
        for cut in range(1, len(data)):
            pieces = [data[:cut], data[cut:]]
            assert _outcome(partial(decode_spack_pieces, pieces)) == ("malformed", None), why


def test_a_large_fragmented_bin_is_joined_straight_into_its_value() -> None:
    """A large bin never passes through msgpack: its pieces are joined into its value.

    Each piece is its own buffer, as a received fragment is, so pieces are kept as views
    and the only copy is the join: peak memory is the pieces plus the value.
    """
    payload = bytes(range(256)) * 8192  # 2 MiB
    data = encode_spack(["name", 7, payload])
    pieces = [data[i : i + 65_000] for i in range(0, len(data), 65_000)]
    del data
    gc.collect()
    tracemalloc.start()
    decoder = SpackDecoder(sum(map(len, pieces)))
    for piece in pieces:
        decoder.feed(memoryview(piece))
    decoded = decoder.finish()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert list(decoded) == ["name", 7, payload]
    assert type(decoded[2]) is bytes
    assert peak < len(payload) * 1.1, peak  # the value itself; the pieces were allocated before


@pytest.mark.parametrize("size", [0, 100, 65535, 65536, 65537, 200_000])
@pytest.mark.parametrize("head", [[], [1, "a"], [{"k": [1.5, None]}, (2, b"x")]])
def test_pieces_encode_to_the_same_bytes(head: list[Any], size: int) -> None:
    """A large trailing bytes value is its own piece; the bytes are encode_spack's."""
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    pieces = encode_spack_pieces([*head, payload])
    assert b"".join(pieces) == encode_spack([*head, payload])
    assert (pieces[-1] is payload) == (size >= 65536)


@given(values=st.lists(spack_values, max_size=5))
def test_pieces_encode_like_encode_spack(values: list[Any]) -> None:
    """Any values: the pieces join to encode_spack's bytes."""
    assert b"".join(encode_spack_pieces(values)) == encode_spack(values)


def test_pieces_refuse_what_encode_spack_refuses() -> None:
    """A bad value before a large payload is reported as encode_spack reports it."""
    values = [object(), b"x" * 70_000]
    with pytest.raises(InvalidSpackValue) as whole:
        encode_spack(values)  # type: ignore[arg-type]
    with pytest.raises(InvalidSpackValue) as pieces:
        encode_spack_pieces(values)  # type: ignore[arg-type]
    assert str(pieces.value) == str(whole.value)
