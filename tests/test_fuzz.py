"""Every fuzz target of ``fuzz/targets.py``, run under Hypothesis for a bounded budget.

Each target is fed three kinds of input:

- raw ``st.binary()``;
- mutations of its seeds (valid transcripts and plaintexts, recorded with the harness's
  fixed keys): bit flips, byte writes, truncations, insertions, deletions, duplicated
  ranges and splices of two seeds;
- structured inputs built to reach deep: transport plaintexts made of records of every
  kind (with canonical and non-canonical headers, spack encodings, fragments spread over
  several Noise messages, REKEYs); spack encodings of random values and raw msgpack of
  anything msgpack can pack.

The targets check their own invariants (fuzz/targets.py says which) and raise on a bug.
``REGRESSIONS`` keeps the minimal input of every bug they found.

The default budget is derandomized and small (CI); ``pytest -m slow`` runs random searches
of ``STALK_FUZZ_EXAMPLES`` (default 20000) examples per target and strategy. For hours,
use ``fuzz/run_atheris.py`` (fuzz/README.md).
"""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
from array import array
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stalk.receiver
from stalk.records import encode_uvarint
from stalk.spack import Float32, Spack, decode_spack

ROOT = Path(__file__).resolve().parent.parent


def _load_targets() -> ModuleType:
    name = "stalk_fuzz_targets"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "fuzz" / "targets.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


T: Any = _load_targets()
NAMES: list[str] = sorted(T.TARGETS)

CI = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(
    max_examples=int(os.environ.get("STALK_FUZZ_EXAMPLES", "20000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- strategies ------------------------------------------------------------------------------

MUTATIONS = ("flip", "set", "truncate", "insert", "delete", "duplicate", "splice")


@st.composite
def mutated(draw: st.DrawFn, pool: list[bytes]) -> bytes:
    """A seed with one to four random mutations."""
    data = bytearray(draw(st.sampled_from(pool)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(MUTATIONS))
        size = len(data)
        at = draw(st.integers(0, size))
        if op == "flip" and at < size:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and at < size:
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "duplicate":
            piece = data[at : at + draw(st.integers(1, 128))]
            where = draw(st.integers(0, size))
            data[where:where] = piece
        elif op == "splice":
            other = draw(st.sampled_from(pool))
            data = data[:at] + other[draw(st.integers(0, len(other))) :]
    return bytes(data)


KEYS = st.one_of(st.text(max_size=4), st.binary(max_size=4))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.floats(width=32).map(Float32),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.lists(st.integers(-128, 127), max_size=6).map(lambda v: array("b", v)),
    st.lists(st.floats(width=32, allow_nan=False), max_size=4).map(lambda v: array("f", v)),
    st.lists(st.integers(0, 2**64 - 1), max_size=4).map(lambda v: array("Q", v)),
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(KEYS, inner, max_size=4),
    )


VALUES = st.recursive(SCALARS, _containers, max_leaves=12)
SPACK_BYTES = st.lists(VALUES, max_size=5).map(lambda values: Spack(*values).encode())


def _plain_msgpack(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.integers(-1, 300), st.text(max_size=3), st.binary(max_size=3)),
            children,
            max_size=3,
        ),
    )


RAW_MSGPACK = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=9)),
        st.builds(msgpack.Timestamp, st.integers(0, 2**40), st.integers(0, 999_999_999)),
        st.builds(msgpack.ExtType, st.just(2), SPACK_BYTES),
    ),
    _plain_msgpack,
    max_leaves=10,
).map(lambda value: msgpack.packb(value, use_bin_type=True))

MESSAGE, FRAGMENT, CLOSE, PING, PONG, REKEY, READY = range(1, 8)


@st.composite
def record(
    draw: st.DrawFn, kind: int | None = None, body: bytes | None = None, *, wild: bool = True
) -> bytes:
    """One record; ``wild`` ones may have any kind and a broken header or body."""
    if kind is None:
        kinds = [MESSAGE] * 4 + [PING, PONG]
        if wild:
            kinds += [FRAGMENT, CLOSE, REKEY, READY, 0, 8, 255]
        kind = draw(st.sampled_from(kinds))
    if body is None:
        if kind == MESSAGE:
            raw = st.binary(max_size=40)
            body = draw(st.one_of(SPACK_BYTES, SPACK_BYTES, raw) if wild else SPACK_BYTES)
        elif kind == CLOSE:
            code = struct.pack(">H", draw(st.sampled_from([0, 1, 5, 0x1000, 0xFFFF])))
            reason = st.text(max_size=20).map(str.encode)
            body = code + draw(st.one_of(reason, st.binary(max_size=8)) if wild else reason)
        elif kind in (PING, PONG, FRAGMENT):
            large = st.binary(min_size=1000, max_size=1100 if wild else 1024)
            body = draw(st.one_of(st.binary(min_size=kind == FRAGMENT, max_size=40), large))
        else:
            body = draw(st.sampled_from([b"", b"", b"\x00"]))
    channel = b"\x00"
    length = encode_uvarint(len(body))
    if wild:
        channel = draw(
            st.sampled_from([b"\x00"] * 12 + [b"\x01", b"\x80\x00", b"\x80\x80\x80\x80\x00"])
        )
        variant = draw(st.integers(0, 15))
        if variant == 0:
            length = encode_uvarint(len(body) + draw(st.integers(1, 3)))  # claims too much
        elif variant == 1 and len(length) < 3:
            length = bytes([length[0] | 0x80]) + length[1:] + b"\x00"  # non-minimal
    return bytes([kind]) + channel + length + body


@st.composite
def fragmented(draw: st.DrawFn, *, wild: bool) -> list[bytes]:
    """One spack split into FRAGMENT records and a final MESSAGE record.

    Some are larger than the receiver's 1024-byte limit (MESSAGE_TOO_LARGE).
    """
    encoded = draw(
        st.one_of(
            SPACK_BYTES, st.binary(min_size=400, max_size=1100).map(lambda b: Spack(b).encode())
        )
    )
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(encoded) - 1)), max_size=3, unique=True)))
    pieces = [encoded[a:b] for a, b in zip([0, *cuts], [*cuts, len(encoded)], strict=True)]
    records = [draw(record(FRAGMENT, piece, wild=wild)) for piece in pieces[:-1]]
    return [*records, draw(record(MESSAGE, pieces[-1], wild=wild))]


@st.composite
def plaintexts(draw: st.DrawFn, max_messages: int) -> list[bytes]:
    """Records (fragments spread anywhere), grouped into 1..max_messages plaintexts.

    Half the time everything is well formed (REKEYs end plaintexts, a CLOSE may end the
    last one), so that long valid exchanges are common; else anything goes.
    """
    wild = draw(st.booleans())
    items = st.one_of(record(wild=wild).map(lambda r: [r]), fragmented(wild=wild))
    records = [r for item in draw(st.lists(items, min_size=1, max_size=6)) for r in item]
    cuts = sorted(
        draw(st.lists(st.integers(1, len(records)), max_size=max_messages - 1, unique=True))
    )
    groups = [records[a:b] for a, b in zip([0, *cuts], [*cuts, len(records)], strict=True)]
    out = []
    for group in groups:
        plaintext = b"".join(group)
        if draw(st.integers(0, 4)) == 0:
            plaintext += bytes([REKEY, 0, 0])
        out.append(plaintext)
    if not wild and draw(st.booleans()) and not out[-1].endswith(bytes([REKEY, 0, 0])):
        out[-1] += draw(record(CLOSE, wild=False))
    return [p for p in out if p] or [b""]


def structured(name: str) -> st.SearchStrategy[bytes]:
    if name == "transport_records":
        return st.one_of(plaintexts(1).map(lambda p: p[0]), mutated(T.seeds(name)))
    if name == "transport_messages":
        return st.one_of(plaintexts(5).map(T.join_messages), mutated(T.seeds(name)))
    if name == "spack":
        return st.one_of(
            SPACK_BYTES, RAW_MSGPACK, mutated(T.seeds(name)), mutated([b"\x91" * 30 + b"\x90"])
        )
    return mutated(T.seeds(name))


# -- the runs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_seeds(name: str) -> None:
    for seed in T.seeds(name):
        T.TARGETS[name](seed)


@pytest.mark.parametrize("name", NAMES)
def test_raw_bytes(name: str) -> None:
    @CI
    @given(data=st.binary(max_size=512))
    def check(data: bytes) -> None:
        T.TARGETS[name](data)

    check()


@pytest.mark.parametrize("name", NAMES)
def test_structured_inputs(name: str) -> None:
    @settings(CI, max_examples=300)
    @given(data=structured(name))
    def check(data: bytes) -> None:
        T.TARGETS[name](data)

    check()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_long_fuzz(name: str) -> None:
    @SLOW
    @given(data=st.one_of(st.binary(max_size=2048), structured(name)))
    def check(data: bytes) -> None:
        T.TARGETS[name](data)

    check()


# -- the harness itself --------------------------------------------------------------------------


def test_harness_cipher_matches_the_sessions() -> None:
    keys = T.transport_keys()  # checks itself against both sessions' ciphers
    assert len(keys.c2s) == len(keys.s2c) == 32
    assert keys.c2s != keys.s2c


def test_transport_oracle_catches_a_corrupted_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle is not vacuous: a session that delivers the wrong spack is caught."""

    def corrupting(data: Any) -> Spack:
        return Spack(*decode_spack(data), "extra")

    monkeypatch.setattr(stalk.receiver, "decode_fast", corrupting)
    with pytest.raises(T.Bug, match="events"):
        T.fuzz_transport_records(b"\x01\x00\x01\x90")
    with pytest.raises(T.Bug, match="never sent"):
        T.fuzz_handshake_responder(T.seeds("handshake_responder")[0])


def test_spack_oracle_catches_an_accepted_invalid_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "spec_valid", lambda data: False)
    with pytest.raises(T.Bug, match="invalid spack was accepted"):
        T.fuzz_spack(b"\x90")


# -- regressions: minimal inputs of bugs the targets found (each fixed in 75d3c7a) ----------

#: (target, input, what it was). Add every crasher here: ``xfail(strict=True)`` until fixed.
REGRESSIONS = [
    (
        "transport_records",
        b"\x04\x00\x01a\x01\x00\x01\xc1",  # PING "a", then a MESSAGE that does not decode
        "a PING in a transport message that is then rejected was answered with a PONG",
    ),
    (
        "handshake_initiator",
        # The XX responder's stream cut 5 bytes into the READY frame that confirms the handshake
        T.transcript("XX").s2c[: 3 + int.from_bytes(T.transcript("XX").s2c[1:3], "big") + 5],
        "EOF inside the confirming READY frame raised ConnectionLost, not HandshakeFailed",
    ),
]


@pytest.mark.parametrize(("name", "data", "what"), REGRESSIONS, ids=[r[0] for r in REGRESSIONS])
def test_regression(name: str, data: bytes, what: str) -> None:
    T.TARGETS[name](data)
