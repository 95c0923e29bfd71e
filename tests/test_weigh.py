"""The weigher and the piecewise decoder: same results as one-shot decoding, and bounds.

- Differential: for any bytes (valid spacks, raw msgpack, mutations, noise), cut into any
  pieces and fed with any work limits, :class:`~stalk.spack.SpackDecoder` accepts exactly
  what the one-shot decoder accepts and builds equal values; so does every fast path of
  the weigher (runs of like values, small flat containers, the head of a large spack)
  against the general one.
- The weight is an upper bound on what decoding really allocates, measured with
  tracemalloc, and no shape weighs more than ``MAX_WEIGHT_PER_BYTE``: every spack that fits
  in one record is within its budget.
- Claims are checked before msgpack sees them: the nested-preallocation bomb and a huge
  array header cost no memory; an over-budget spack is refused before it is decoded.
"""

from __future__ import annotations

import gc
import itertools
import math
import tracemalloc
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stalk import spack as spack_module
from stalk import weigh as weigh_module
from stalk.errors import MalformedSpack, MessageLimitExceeded
from stalk.spack import (
    Float32,
    Spack,
    SpackDecoder,
    decode_spack,
    encode_spack,
    encode_spack_pieces,
)
from stalk.weigh import (
    ALWAYS_WITHIN_BUDGET,
    MAX_WEIGHT_PER_BYTE,
    Weigher,
    weigh,
    within_budget,
)
from stalk.wire import WEIGHT_FACTOR, WEIGHT_FLOOR
from test_spack import raw_msgpack, spack_values

KiB = 1024
MiB = 1024 * KiB
#: What a piecewise decoder holds besides the weight of what it builds (see SPEC 21).
DECODER_STATE = 256 * KiB
_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def reference(data: bytes) -> tuple[str, Any]:
    """One-shot decoding without any length bound: msgpack, then the depth/tuple walk."""
    try:
        top = spack_module._unpackb(data)
        spack_module._finish_top(top, spack_module.MAX_DEPTH)
    except MalformedSpack:
        return "malformed", None
    except Exception as exc:
        try:
            raise spack_module._malformed(exc) from exc
        except MalformedSpack:
            return "malformed", None
    return "ok", top


def piecewise(data: bytes, cuts: list[int], limits: list[int]) -> tuple[str, Any]:
    """Decode ``data`` cut at ``cuts``, each piece fed under work limits (cycled)."""
    decoder = SpackDecoder(len(data), budget=False, complete=True)
    points = sorted({min(cut, len(data)) for cut in cuts})
    limit = itertools.cycle(limits or [0])
    try:
        for start, end in itertools.pairwise([0, *points, len(data)]):
            piece = memoryview(data)[start:end]
            while True:
                taken = decoder.feed(piece, next(limit) or None)
                if taken == len(piece):
                    break
                piece = piece[taken:]
        return "ok", list(decoder.finish())
    except MalformedSpack:
        return "malformed", None


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types, NaN equal to NaN, arrays by typecode and bytes."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, array):
        return a.typecode == b.typecode and bool(a.tobytes() == b.tobytes())
    return bool(a == b)


@contextmanager
def cut_at(size: int, lazy: int = spack_module._LAZY) -> Iterator[None]:
    """Cut payloads out for the decoder from ``size`` bytes on (normally 64 KiB), and start
    its streaming unpacker beyond ``lazy`` bytes (0: always stream; normally 16 KiB)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weigh_module, "BIG", size)
        patch.setattr(spack_module, "_LAZY", lazy)
        yield


def check(data: bytes, cuts: list[int], limits: list[int]) -> None:
    expected = reference(data)
    got = piecewise(data, cuts, limits)
    try:
        whole: tuple[str, Any] = "ok", list(decode_spack(data))
    except MalformedSpack:
        whole = "malformed", None
    assert expected[0] == got[0] == whole[0], (data.hex(), cuts, limits, expected, got, whole)
    if expected[0] == "ok":
        assert same(expected[1], got[1]), (data.hex(), expected, got)
        assert same(expected[1], whole[1]), (data.hex(), expected, whole)


cuts = st.lists(st.integers(0, 300), max_size=4)
limits = st.lists(st.integers(0, 40), max_size=3)
big = st.sampled_from([1, 2, 5, 64 * KiB])
lazy = st.sampled_from([0, 16 * KiB])


@_SETTINGS
@given(values=st.lists(spack_values, max_size=5), cuts=cuts, limits=limits, big=big, lazy=lazy)
def test_valid_spacks_decode_piecewise_as_at_once(
    values: list[Any], cuts: list[int], limits: list[int], big: int, lazy: int
) -> None:
    with cut_at(big, lazy):
        check(encode_spack(values), cuts, limits)


@_SETTINGS
@given(value=raw_msgpack, cuts=cuts, limits=limits, big=big, lazy=lazy)
def test_raw_msgpack_decodes_piecewise_as_at_once(
    value: Any, cuts: list[int], limits: list[int], big: int, lazy: int
) -> None:
    with cut_at(big, lazy):
        check(msgpack.packb(value, use_bin_type=True), cuts, limits)


@_SETTINGS
@given(data=st.binary(max_size=80), cuts=cuts, limits=limits, big=big, lazy=lazy)
def test_any_bytes_decode_piecewise_as_at_once(
    data: bytes, cuts: list[int], limits: list[int], big: int, lazy: int
) -> None:
    with cut_at(big, lazy):
        check(data, cuts, limits)


@_SETTINGS
@given(
    values=st.lists(spack_values, min_size=1, max_size=4),
    where=st.integers(0, 10**6),
    byte=st.integers(0, 255),
    cuts=cuts,
    limits=limits,
    big=big,
    lazy=lazy,
)
def test_mutated_spacks_decode_piecewise_as_at_once(
    values: list[Any],
    where: int,
    byte: int,
    cuts: list[int],
    limits: list[int],
    big: int,
    lazy: int,
) -> None:
    data = bytearray(encode_spack(values))
    data[where % len(data)] = byte
    with cut_at(big, lazy):
        check(bytes(data), cuts, limits)


@contextmanager
def general_path_only() -> Iterator[None]:
    """No runs of like values, no frameless small containers, no weighing the head of a
    large spack or the middle of its payload at once: one item at a time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weigh_module, "_RUN_MIN", 1 << 60)
        patch.setattr(weigh_module, "_flat", lambda *_: None)
        patch.setattr(Weigher, "_head", lambda *_: False)
        patch.setattr(Weigher, "skip_cut", lambda *_: False)
        yield


homogeneous: st.SearchStrategy[Any] = st.one_of(
    st.lists(st.integers(-40, 300), min_size=8, max_size=40),
    st.lists(st.floats(), min_size=8, max_size=40),
    st.lists(st.sampled_from(["", "a", "ab", "abc"]), min_size=8, max_size=40),
    st.lists(st.sampled_from([None, True, [], {}, 0, -1, -6, -32]), min_size=8, max_size=40),
    st.lists(
        st.lists(st.one_of(st.integers(-40, 40), st.text(max_size=3), st.binary(max_size=3)))
        | st.dictionaries(st.text(max_size=2), st.integers(-40, 40) | st.just([])),
        max_size=20,
    ),
)


@_SETTINGS
@given(value=homogeneous, cuts=cuts)
def test_fast_paths_weigh_as_the_general_path(value: Any, cuts: list[int]) -> None:
    """Runs and frameless containers give the weight and verdict of one item at a time."""
    data = encode_spack([value, [value]])
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces = [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]

    def outcome() -> int:
        weigher = Weigher(len(data), budget=False)
        for piece in pieces:
            weigher.feed(piece)
        weigher.finish()
        return weigher.weight

    fast = outcome()
    with general_path_only():
        assert outcome() == fast


def _weigh_with_ops(data: bytes, cuts: list[int]) -> list[Any]:
    """Everything a cutting weigher says about ``data`` cut at ``cuts``, piece by piece."""
    points = sorted({min(cut, len(data)) for cut in cuts})
    weigher = Weigher(len(data), budget=False, cut=True)
    said: list[Any] = []
    try:
        for start, end in itertools.pairwise([0, *points, len(data)]):
            said.append(weigher.feed(memoryview(data)[start:end]))
            said.append(
                [
                    tuple(bytes(x) if isinstance(x, memoryview) else x for x in op)
                    for op in weigher.ops
                ]
            )
            said.append((weigher.weight, weigher.size, weigher.cut_bytes))
            weigher.ops.clear()
        weigher.finish()
    except MalformedSpack as exc:
        said.append(str(exc))
    return said


@_SETTINGS
@given(
    values=st.lists(
        st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8) | st.just([])
    ),
    payload=st.binary(min_size=1, max_size=60) | st.text(min_size=1, max_size=60),
    cuts=st.lists(st.integers(1, 80), max_size=3),
    big=st.sampled_from([1, 5, 20]),
)
def test_the_head_of_a_large_spack_weighs_as_the_general_path(
    values: list[Any], payload: bytes | str, cuts: list[int], big: int
) -> None:
    """A first piece that is a small array ending in the start of a large payload is
    weighed at once: same weight, size and ops as one item at a time."""
    data = encode_spack([*values, payload])
    with cut_at(big):
        fast = _weigh_with_ops(data, cuts)
        with general_path_only():
            assert _weigh_with_ops(data, cuts) == fast


# -- the weight bounds what decoding allocates -------------------------------------------------

SHAPES: dict[str, Callable[[int], Any]] = {
    "empty lists": lambda n: [[] for _ in range(n)],
    "empty dicts": lambda n: [{} for _ in range(n)],
    "{'': []}": lambda n: [{"": []} for _ in range(n)],
    "chained one-entry maps": lambda n: [_chain(30) for _ in range(n // 30)],
    "[[]]": lambda n: [[[]] for _ in range(n)],
    "None": lambda n: [None] * n,
    "small ints": lambda n: list(range(100)) * (n // 100),
    "ints 300..": lambda n: list(range(300, 300 + n)),
    "ints -128..-6": lambda n: [-100] * n,
    "64-bit ints": lambda n: [2**40 + i for i in range(n)],
    "floats": lambda n: [float(i) for i in range(n)],
    "Float32": lambda n: [Float32(i) for i in range(n)],
    "2-char str": lambda n: [f"{i % 100:02d}" for i in range(n)],
    "3-byte char str": lambda n: ["\u20ac"] * n,
    "emoji str": lambda n: ["\U0001f600"] * n,
    "2-byte bytes": lambda n: [b"ab"] * n,
    "records": lambda n: [{"id": i, "name": "bob", "ok": True} for i in range(n // 4)],
    "empty tuples": lambda n: [()] * n,
    "([],)": lambda n: [([],) for _ in range(n)],
    "empty arrays": lambda n: [array("b") for _ in range(n)],
    "dicts of 100": lambda n: [{f"k{j}": j for j in range(100)} for _ in range(n // 100)],
}


def _chain(levels: int) -> Any:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"": value}
    return value


@pytest.mark.parametrize("shape", SHAPES)
def test_the_weight_bounds_what_decoding_allocates(shape: str) -> None:
    """Decoded objects (tracemalloc, peak during decoding) never outweigh the weight.

    Measured on the decoder the receive path uses for large spacks, fed 64 KiB pieces, with
    the pieces allocated before measuring (they are the wire bytes, counted apart).
    """
    data = encode_spack(SHAPES[shape](20_000))
    pieces = [data[i : i + 64 * KiB] for i in range(0, len(data), 64 * KiB)]
    weight = weigh(data)
    gc.collect()
    tracemalloc.start()
    decoder = SpackDecoder(len(data), budget=False)
    for piece in pieces:
        decoder.feed(piece)
    spack = decoder.finish()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(spack) > 0
    # The decoder's own state, apart from the weight: msgpack's buffer (unparsed input, up
    # to about two pieces) and its parsing context.
    assert peak <= weight + DECODER_STATE, (shape, peak, weight, len(data))
    per_byte = f"weight {weight / len(data):.1f}/B, peak {peak / len(data):.1f}/B"
    print(f"\n{shape}: {len(data)} B, {per_byte}")


@_SETTINGS
@given(values=st.lists(spack_values, max_size=6))
def test_no_spack_weighs_more_than_the_maximum_per_byte(values: list[Any]) -> None:
    data = encode_spack(values)
    assert weigh(data) <= MAX_WEIGHT_PER_BYTE * len(data)


def test_the_heaviest_shape_reaches_the_maximum_and_one_record_is_always_within_budget() -> None:
    data = encode_spack([_chain(31) for _ in range(100)])
    assert weigh(data) > 0.95 * MAX_WEIGHT_PER_BYTE * len(data)
    assert within_budget(65_535)
    assert MAX_WEIGHT_PER_BYTE * 65_535 <= WEIGHT_FACTOR * 65_535 + WEIGHT_FLOOR
    assert not within_budget(100_000)


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_the_size_always_within_budget_is_where_the_heaviest_shape_reaches_the_budget(
    offset: int,
) -> None:
    size = ALWAYS_WITHIN_BUDGET + offset
    by_formula = MAX_WEIGHT_PER_BYTE * size <= WEIGHT_FACTOR * size + WEIGHT_FLOOR
    assert within_budget(size) is by_formula is (offset <= 0)


def test_a_trailing_payload_adds_less_weight_than_budget_so_only_the_rest_is_weighed() -> None:
    """Why a sender weighs only a spack's first piece against ``within_budget``: the
    heaviest first piece that passes, followed by a large trailing ``bytes`` (its own
    piece), still fits the budget of the whole spack."""
    heaviest = _chain(31)
    each = len(encode_spack([heaviest, heaviest])) - len(encode_spack([heaviest]))
    passing = max(size for size in range(64 * KiB, 128 * KiB) if within_budget(size))
    header = len(encode_spack_pieces([*[heaviest] * 1000, bytes(64 * KiB)])[0]) - 1000 * each
    values = [heaviest] * ((passing - header) // each)  # as many as pass
    assert not within_budget(passing + 1)
    assert not within_budget(len(encode_spack_pieces([*values, heaviest, bytes(64 * KiB)])[0]))
    for payload in (64 * KiB, MiB):
        pieces = encode_spack_pieces([*values, bytes(payload)])
        assert len(pieces) == 2
        assert within_budget(len(pieces[0]))
        size = sum(map(len, pieces))
        weight = weigh(b"".join(pieces))
        assert weight <= WEIGHT_FACTOR * size + WEIGHT_FLOOR
        if payload == 64 * KiB:  # the smallest payload given its own piece: a tight case
            assert weight > 0.9 * (WEIGHT_FACTOR * size + WEIGHT_FLOOR)


@pytest.mark.parametrize("lazy", [0, 16 * KiB])
def test_a_decoded_spack_is_freed_when_dropped_without_the_cycle_collector(lazy: int) -> None:
    """Nothing the decoder builds is kept alive by a reference cycle.

    A decoder that its unpacker's ext hook referred back to kept every spack it decoded
    (8 MiB for an 8 MiB spack) until the cyclic collector happened to run.
    """
    data = encode_spack([b"x" * (1 * MiB), "after", [b"y" * (100 * KiB)]])
    pieces = [data[at : at + 65_000] for at in range(0, len(data), 65_000)]
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        with cut_at(64 * KiB, lazy):
            decoder = SpackDecoder(len(data))
            for piece in pieces:
                decoder.feed(piece)
            spack = decoder.finish()
        assert spack[0] == b"x" * MiB
        assert spack[2] == [b"y" * (100 * KiB)]
        held = tracemalloc.get_traced_memory()[0]
        del decoder, spack
        released = held - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        gc.enable()
    assert released > MiB + 100 * KiB, released


# -- claims and budget: refused before anything is built -------------------------------------


def test_nested_preallocation_bomb_costs_no_memory() -> None:
    """1,000 nested arrays each claiming 10,000 items in 65 KB made msgpack allocate 76 MiB.

    The fast decoder now lets msgpack preallocate at most 256 slots per container, and a
    longer claim goes to the weigher, which checks it against the bytes present.
    """
    data = b"\x91" + b"\xdd\x00\x00\x27\x10" * 1000
    data += b"\x00" * (65_000 - len(data))
    gc.collect()
    tracemalloc.start()
    with pytest.raises(MalformedSpack):
        decode_spack(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 3 * MiB, peak


def test_a_huge_claim_is_refused_before_anything_is_allocated() -> None:
    gc.collect()
    tracemalloc.start()
    with pytest.raises(MessageLimitExceeded):
        SpackDecoder(16 * MiB).feed(b"\x91\xdd\xff\xff\xff\xff")
    with pytest.raises(MalformedSpack):
        decode_spack(b"\xdd\xff\xff\xff\xff")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < DECODER_STATE, peak


@pytest.mark.parametrize("shape", ["empty lists", "{'': []}", "[[]]", "records"])
def test_an_over_budget_spack_is_refused_before_it_is_decoded(shape: str) -> None:
    """A dense spack streamed in 64 KiB pieces is refused as soon as its weight is certain
    to pass ``8 x size + 8 MiB``; what was decoded by then stays within that budget."""
    data = encode_spack(SHAPES[shape](2_000_000))
    assert weigh(data) > WEIGHT_FACTOR * len(data) + WEIGHT_FLOOR
    pieces = [data[i : i + 64 * KiB] for i in range(0, len(data), 64 * KiB)]
    gc.collect()
    tracemalloc.start()
    decoder = SpackDecoder(len(data))
    fed = 0
    refused: MessageLimitExceeded | None = None
    for piece in pieces:
        try:
            decoder.feed(piece)
        except MessageLimitExceeded as exc:
            refused = exc
            break
        fed += len(piece)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert refused is not None
    assert "decodes to at least" in str(refused)
    assert fed < len(data)
    assert peak <= WEIGHT_FACTOR * fed + WEIGHT_FLOOR + DECODER_STATE, (peak, fed)


def test_a_spack_at_its_budget_is_accepted() -> None:
    """Floats weigh 3.6 per byte: a large list of them is always within budget."""
    values = [float(i) for i in range(300_000)]
    data = encode_spack(values)
    decoder = SpackDecoder(len(data))
    for i in range(0, len(data), 64 * KiB):
        decoder.feed(memoryview(data)[i : i + 64 * KiB])
    assert decoder.finish() == Spack(*values)
