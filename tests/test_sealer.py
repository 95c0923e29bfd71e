"""The sealer: encryption in order, the rekey policy, and the lone-plaintext shortcut.

:meth:`Sealer.push_one` holds a lone plaintext when nothing waits, and
:meth:`Sealer.seal_one` encrypts one there and then; these tests run both against the
general path (:meth:`Sealer.push` of a one-plaintext iterator)
on the same operations and require the same bytes out, in the same order. (Where the
bytes are cut into buffers may differ: a frame sealed at once is handed out on its own.)

Plaintexts are encrypted as they are built, into buffers sized from a flush's size or a
source's backlog: the last tests run those against sealing each plaintext alone (the
same bytes, whatever the size said) and measure what is held while sealing.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stalk._noise import MAX_NONCE, TAGLEN, TransportCipher
from stalk.errors import LocalProtocolError, NonceExhausted
from stalk.records import RecordWriter
from stalk.sealer import OUTPUT_FRAMES, REKEY_RECORD, Sealer
from stalk.wire import FRAME_HEADER_LEN, RECORD_CAPACITY, RecordKind

_KEY = bytes(range(32))

# One operation: ("one", size) push_one, ("many", sizes) push of several, ("rekey",)
# request_rekey, ("take",) take one buffer, ("final", size) a last plaintext.
_op = st.one_of(
    st.tuples(st.just("one"), st.integers(1, 300)),
    st.tuples(st.just("many"), st.lists(st.integers(1, 2000), min_size=1, max_size=40)),
    st.tuples(st.just("rekey")),
    st.tuples(st.just("take")),
)


def _sealers(messages: int, size: int) -> tuple[Sealer, Sealer]:
    pair = []
    for _ in range(2):
        sealer = Sealer(rekey_after_messages=messages, rekey_after_bytes=size)
        sealer.start(TransportCipher(_KEY))
        pair.append(sealer)
    return pair[0], pair[1]


def _plaintext(seed: int, size: int) -> bytearray:
    return bytearray((seed + i) % 251 for i in range(size))


def _both(op: tuple[object, ...], index: int, fast: Sealer, general: Sealer) -> None:
    """Apply an operation other than ("one", size) to both sealers alike."""
    if op[0] == "many":
        sizes = op[1]
        assert isinstance(sizes, list)
        for sealer in (fast, general):
            sealer.push(iter([_plaintext(index + k, n) for k, n in enumerate(sizes)]))
    elif op[0] == "rekey":
        fast.request_rekey()
        general.request_rekey()
    else:
        assert fast.take() == general.take()


def _drain(sealer: Sealer) -> list[bytes]:
    out = []
    while data := sealer.take():
        out.append(bytes(data))
    return out


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(_op, max_size=60),
    messages=st.integers(1, 8),
    size=st.integers(100, 20_000),
    final=st.booleans(),
)
def test_push_one_gives_the_bytes_of_the_general_path(
    ops: list[tuple[object, ...]], messages: int, size: int, final: bool
) -> None:
    """Same buffers, whatever was queued, requested or taken before."""
    fast, general = _sealers(messages, size)
    for index, op in enumerate(ops):
        if op[0] == "one":
            length = op[1]
            assert isinstance(length, int)
            fast.push_one(_plaintext(index, length))
            general.push(iter([_plaintext(index, length)]))
        else:
            _both(op, index, fast, general)
        assert fast.pending is general.pending
    if final:
        for sealer in (fast, general):
            sealer.push(iter([_plaintext(7, 50)]), final=True)
    assert _drain(fast) == _drain(general)
    assert not fast.pending


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(_op, max_size=60), messages=st.integers(1, 8), size=st.integers(100, 20_000))
@example(ops=[("one", 10), ("one", 20), ("rekey",), ("one", 30)], messages=2, size=1000)
@example(ops=[("many", [10, 20]), ("one", 10), ("take",), ("one", 10)], messages=8, size=1000)
# A take that leaves a sealed buffer behind (a small one goes alone, a large one waits):
# not idle, though nothing is flushed.
@example(
    ops=[("many", [10]), ("many", [3000] * 32), ("take",), ("one", 10)], messages=8, size=10**6
)
def test_seal_one_gives_the_frame_of_the_general_path(
    ops: list[tuple[object, ...]], messages: int, size: int
) -> None:
    """When idle, ``seal_one`` returns the buffer a push and a take would give."""
    fast, general = _sealers(messages, size)
    for index, op in enumerate(ops):
        if op[0] == "one":
            length = op[1]
            assert isinstance(length, int)
            assert fast.idle is general.idle
            if fast.idle:
                frame = fast.seal_one(_plaintext(index, length))
                general.push(iter([_plaintext(index, length)]))
                assert bytes(frame) == bytes(general.take())
            else:
                with pytest.raises(LocalProtocolError):
                    fast.seal_one(_plaintext(index, length))  # it would overtake
                fast.push(iter([_plaintext(index, length)]))
                general.push(iter([_plaintext(index, length)]))
        else:
            _both(op, index, fast, general)
    assert _drain(fast) == _drain(general)
    assert fast.idle
    assert general.idle


def test_seal_one_is_refused_before_the_cipher_and_after_close() -> None:
    """No cipher yet, or a CLOSE pushed: not idle, and nothing is sealed."""
    sealer = Sealer(rekey_after_messages=10, rekey_after_bytes=1000)
    assert not sealer.idle
    with pytest.raises(LocalProtocolError):
        sealer.seal_one(_plaintext(0, 10))
    sealer.start(TransportCipher(_KEY))
    assert sealer.idle
    sealer.push(iter([_plaintext(1, 10)]), final=True)
    _drain(sealer)
    assert not sealer.idle


def test_push_one_holds_a_plaintext_only_when_nothing_waits() -> None:
    """Idle: held alone. Behind queued plaintexts, or followed by some: queued in order."""
    sealer, _ = _sealers(1000, 1 << 30)
    sealer.push_one(_plaintext(0, 10))
    assert sealer._lone is not None
    assert sealer._flushed is None
    sealer.push(iter([_plaintext(1, 10), _plaintext(2, 10)]))
    assert sealer._lone is None
    sealer.push_one(_plaintext(3, 10))
    assert sealer._flushed is not None
    assert len(sealer._flushed) == 3
    frame = FRAME_HEADER_LEN + 10 + TAGLEN
    assert [len(data) for data in _drain(sealer)] == [4 * frame]


def test_push_one_applies_the_rekey_policy() -> None:
    """A REKEY record ends the plaintext that reaches the count, and the key changes."""
    sealer, _ = _sealers(2, 1 << 30)
    cipher = TransportCipher(_KEY)
    frames = []
    for seed in range(4):
        sealer.push_one(_plaintext(seed, 20))
        frames.append(bytes(sealer.take()))
    for seed, frame in enumerate(frames):
        plaintext = cipher.decrypt(frame[FRAME_HEADER_LEN:])
        if seed % 2:
            assert plaintext == _plaintext(seed, 20) + REKEY_RECORD
            cipher.rekey()
        else:
            assert plaintext == _plaintext(seed, 20)


def test_push_one_reports_an_exhausted_nonce_from_take() -> None:
    """Out of nonces: take() raises, as for a queued plaintext, and nothing more is sent."""
    sealer, _ = _sealers(1000, 1 << 30)
    cipher = sealer.cipher
    assert cipher is not None
    cipher.set_nonce_for_testing_only(MAX_NONCE)
    sealer.push_one(_plaintext(0, 10))
    with pytest.raises(NonceExhausted):
        sealer.take()
    assert not sealer.pending
    with pytest.raises(NonceExhausted):
        sealer.push_one(_plaintext(1, 10))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=30))
def test_take_only_is_pack_when_the_queue_is_one_plaintext(sizes: list[int]) -> None:
    """``take_only`` gives exactly ``pack()``'s single plaintext, or declines and keeps all."""
    taken, packed = RecordWriter(), RecordWriter()
    for size in sizes:
        body = os.urandom(size)
        taken.add_message(body)
        packed.add_message(body)
    expected = list(packed.pack())
    only = taken.take_only()
    if len(expected) == 1:
        assert only == expected[0]
        assert not taken.pending()
    else:
        assert only is None
        assert list(taken.pack()) == expected


def test_take_only_declines_an_empty_queue() -> None:
    writer = RecordWriter()
    assert writer.take_only() is None
    writer.add(RecordKind.PING, b"x")
    assert writer.take_only() == bytearray((RecordKind.PING, 0, 1)) + b"x"
    assert writer.take_only() is None
    assert RECORD_CAPACITY > 300 * 30  # the sizes above fit one plaintext or spill over


class _Source:
    """A :class:`~stalk.sealer.PlaintextSource` over a fixed list, building each when asked.

    :param contended: for each plaintext, whether the source is contended once it is taken.
    :param backlog: what :meth:`backlog` answers, as a factor of the true remaining bytes
        (a hint may be too low or too high; the bytes out must not depend on it).
    """

    def __init__(self, sizes: list[int], contended: list[bool], backlog: float) -> None:
        self.sizes = sizes
        self.contended_after = contended
        self.factor = backlog
        self.taken = 0

    def next_plaintext(self) -> bytearray | None:
        if self.taken == len(self.sizes):
            return None
        self.taken += 1
        return _plaintext(self.taken, self.sizes[self.taken - 1])

    def sendable(self) -> bool:
        return self.taken < len(self.sizes)

    def contended(self) -> bool:
        return bool(self.taken) and self.contended_after[self.taken - 1]

    def backlog(self) -> int:
        return int(sum(self.sizes[self.taken :]) * self.factor)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(
        st.one_of(st.integers(1, 3000), st.just(RECORD_CAPACITY)), min_size=1, max_size=80
    ),
    data=st.data(),
    backlog=st.sampled_from([0.0, 0.3, 1.0, 5.0]),
    messages=st.integers(1, 8),
)
def test_a_source_is_sealed_as_the_general_path_seals_its_plaintexts(
    sizes: list[int], data: st.DataObject, backlog: float, messages: int
) -> None:
    """Plaintexts sealed as the source builds them: the bytes of pushing them, in order.

    Whatever the source's backlog hint says, and however its contention changes, each
    buffer holds at most :data:`OUTPUT_FRAMES` frames, one while contended.
    """
    contended = data.draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    fast, general = _sealers(messages, 10**6)
    source = _Source(sizes, contended, backlog)
    fast.attach(source)
    buffers = []
    while data_out := fast.take():
        buffers.append(bytes(data_out))
    general.push(iter([_plaintext(k + 1, n) for k, n in enumerate(sizes)]))
    assert b"".join(buffers) == b"".join(_drain(general))
    frames = 0
    for buffer in buffers:
        offset = count = 0
        while offset < len(buffer):
            offset += FRAME_HEADER_LEN + int.from_bytes(buffer[offset : offset + 2], "big")
            count += 1
        assert offset == len(buffer)
        assert count <= OUTPUT_FRAMES
        if contended[frames]:
            assert count == 1
        frames += count
    assert frames == len(sizes)


def _sealer_without_rekeys() -> Sealer:
    sealer = Sealer(rekey_after_messages=10**6, rekey_after_bytes=10**9)
    sealer.start(TransportCipher(_KEY))
    return sealer


def _take_traced(sealer: Sealer) -> tuple[bytes | bytearray, int]:
    """The first buffer taken, and the most memory Python held while taking it."""
    tracemalloc.start()
    try:
        first = sealer.take()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return first, peak


def test_a_source_is_sealed_holding_one_plaintext_at_a_time() -> None:
    """Sealing a source's buffer holds that buffer and about one plaintext, measured.

    Building a buffer's worth of plaintexts before sealing them would hold twice as much,
    where the C allocator starts giving memory back to the kernel and faulting it in again.
    """
    sealer = _sealer_without_rekeys()
    sealer.attach(_Source([RECORD_CAPACITY] * 100, [False] * 100, 1.0))
    first, peak = _take_traced(sealer)
    buffer = OUTPUT_FRAMES * (FRAME_HEADER_LEN + RECORD_CAPACITY + len(REKEY_RECORD) + TAGLEN)
    assert len(first) == OUTPUT_FRAMES * (FRAME_HEADER_LEN + RECORD_CAPACITY + TAGLEN)
    assert peak < buffer + 3 * RECORD_CAPACITY


def _quick(seed: int, size: int) -> bytearray:
    """A plaintext of ``size`` bytes told apart by ``seed``, made fast enough for many."""
    plaintext = bytearray(size)
    plaintext[:4] = seed.to_bytes(4, "big")[:size]
    return plaintext


def _lazy(sizes: list[int], first_seed: int = 1) -> Iterator[bytearray]:
    """Plaintexts built only as they are asked for (as a flush's large spack is)."""
    for k, size in enumerate(sizes):
        yield _quick(first_seed + k, size)


@settings(max_examples=200, deadline=None)
@given(
    flushes=st.lists(
        st.tuples(
            st.lists(
                st.one_of(st.integers(1, 3000), st.just(RECORD_CAPACITY)), min_size=1, max_size=70
            ),
            st.sampled_from([0.0, 0.5, 1.0, 3.0]),
            st.booleans(),
        ),
        min_size=1,
        max_size=4,
    ),
    messages=st.integers(1, 8),
)
def test_a_flush_of_known_size_is_sealed_as_one_frame_at_a_time_would_be(
    flushes: list[tuple[list[int], float, bool]], messages: int
) -> None:
    """Plaintexts pushed with their size (or a wrong one): the bytes of sealing each alone.

    The reference pushes every plaintext on its own, without a size. Each buffer holds at
    most :data:`OUTPUT_FRAMES` frames; with the true size of full plaintexts, a flush's
    buffers are all full but its last.
    """
    sized, alone = _sealers(messages, 10**6)
    seed = 1
    for index, (sizes, factor, final) in enumerate(flushes):
        last = final and index == len(flushes) - 1
        sized.push(_lazy(sizes, seed), final=last, size=int(sum(sizes) * factor))
        for k, size in enumerate(sizes):
            alone.push(iter([_quick(seed + k, size)]), final=last and k == len(sizes) - 1)
        seed += len(sizes)
    buffers = _drain(sized)
    assert b"".join(buffers) == b"".join(_drain(alone))
    for buffer in buffers:
        offset = count = 0
        while offset < len(buffer):
            offset += FRAME_HEADER_LEN + int.from_bytes(buffer[offset : offset + 2], "big")
            count += 1
        assert count <= OUTPUT_FRAMES
    sizes, factor, _ = flushes[0]
    if len(flushes) == 1 and factor == 1.0 and set(sizes[:-1]) <= {RECORD_CAPACITY}:
        # Full plaintexts (as a large spack's are), the true size: only the last buffer
        # is not full.
        assert len(buffers) == -(-len(sizes) // OUTPUT_FRAMES)


def test_a_large_flush_is_sealed_holding_one_plaintext_at_a_time() -> None:
    """A flush of a large spack's plaintexts, with its size: held at once are the buffer,
    the plaintext being sealed, the next (looked ahead) and the one after being built."""
    sealer = _sealer_without_rekeys()
    sizes = [RECORD_CAPACITY] * 100
    sealer.push(_lazy(sizes), size=sum(sizes))
    first, peak = _take_traced(sealer)
    assert len(first) == OUTPUT_FRAMES * (FRAME_HEADER_LEN + RECORD_CAPACITY + TAGLEN)
    assert peak < len(first) + 4 * RECORD_CAPACITY
