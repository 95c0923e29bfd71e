"""The record layer: varints, packing (batching, fragmentation) and parsing."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stalk._noise import MAX_PLAINTEXT
from stalk.errors import ProtocolError
from stalk.records import (
    RecordWriter,
    decode_close,
    encode_close,
    encode_uvarint,
    parse_records,
    read_channel_records,
    read_records,
    read_uvarint,
)
from stalk.wire import MAX_CLOSE_REASON, RECORD_CAPACITY, RecordKind


@given(st.integers(min_value=0, max_value=2**35 - 1))
def test_uvarint_round_trip_is_minimal(value: int) -> None:
    data = encode_uvarint(value)
    assert read_uvarint(memoryview(data), 0, 5) == (value, len(data))
    assert len(data) == max(1, (value.bit_length() + 6) // 7)


@pytest.mark.parametrize(
    ("value", "encoded"), [(0, "00"), (127, "7f"), (128, "8001"), (300, "ac02"), (65514, "eaff03")]
)
def test_uvarint_examples_from_spec(value: int, encoded: str) -> None:
    assert encode_uvarint(value).hex() == encoded


@pytest.mark.parametrize("data", [b"\x80\x00", b"\xff\x00", b"\x80\x80\x00"])
def test_non_minimal_uvarints_are_rejected(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="non-minimal"):
        read_uvarint(memoryview(data), 0, 5)


def _replay(plaintexts: list[bytearray]) -> list[tuple[RecordKind, bytes]]:
    """Parse plaintexts and join each message's pieces, as a receiver does."""
    pieces: list[bytes] = []
    out: list[tuple[RecordKind, bytes]] = []
    for plaintext in plaintexts:
        assert 0 < len(plaintext) <= RECORD_CAPACITY
        for record in parse_records(plaintext):
            if record.kind is RecordKind.FRAGMENT:
                pieces.append(bytes(record.body))
            elif record.kind is RecordKind.MESSAGE:
                out.append((record.kind, b"".join([*pieces, bytes(record.body)])))
                pieces.clear()
            else:
                out.append((record.kind, bytes(record.body)))
    assert not pieces
    return out


item = st.one_of(
    st.tuples(st.just(RecordKind.MESSAGE), st.integers(1, 3 * MAX_PLAINTEXT)),
    st.tuples(st.sampled_from([RecordKind.PING, RecordKind.PONG]), st.integers(0, 1024)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(item, max_size=25))
def test_packing_then_parsing_returns_every_record_in_order(
    items: list[tuple[RecordKind, int]],
) -> None:
    writer = RecordWriter()
    expected = []
    for n, (kind, size) in enumerate(items):
        body = bytes([n % 251]) * size
        if kind is RecordKind.MESSAGE:
            writer.add_message(body)
        else:
            writer.add(kind, body)
        expected.append((kind, body))
    plaintexts = list(writer.pack())
    assert _replay(plaintexts) == expected
    assert not writer.pending()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=2, max_size=300))
def test_small_messages_share_noise_messages(sizes: list[int]) -> None:
    writer = RecordWriter()
    for size in sizes:
        writer.add_message(b"m" * size)
    plaintexts = list(writer.pack())
    # Batching: records are packed greedily (small spacks are never split), so the number
    # of Noise messages is what first-fit in order gives.
    bins, used = 1, 0
    for size in sizes:
        record = size + 2 + len(encode_uvarint(size))
        if used + record > RECORD_CAPACITY:
            bins, used = bins + 1, 0
        used += record
    assert len(plaintexts) == bins
    assert _replay(plaintexts) == [(RecordKind.MESSAGE, b"m" * size) for size in sizes]


def test_large_message_fills_noise_messages_completely() -> None:
    writer = RecordWriter()
    writer.add_message(b"x" * 1_000_000)
    plaintexts = list(writer.pack())
    assert all(len(p) == RECORD_CAPACITY for p in plaintexts[:-1])
    assert [r.kind for r in parse_records(plaintexts[-1])] == [RecordKind.MESSAGE]
    assert _replay(plaintexts) == [(RecordKind.MESSAGE, b"x" * 1_000_000)]


def test_close_body_round_trip_and_limits() -> None:
    body = encode_close(0x1234, "ünïcode reason")
    assert decode_close(memoryview(body)) == (0x1234, "ünïcode reason")
    long = encode_close(5, "é" * MAX_CLOSE_REASON)  # truncated on a character boundary
    code, reason = decode_close(memoryview(long))
    assert code == 5
    assert len(reason.encode()) <= MAX_CLOSE_REASON
    with pytest.raises(ProtocolError, match="longer than 1024"):
        decode_close(memoryview(b"\x00\x00" + b"x" * (MAX_CLOSE_REASON + 1)))


def test_control_record_too_large_for_a_noise_message_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds a Noise message"):
        RecordWriter().add(RecordKind.PING, b"x" * MAX_PLAINTEXT)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_records_raises_only_protocol_errors(data: bytes) -> None:
    try:
        records = parse_records(data)
    except ProtocolError:
        return
    consumed = sum(2 + len(encode_uvarint(len(r.body))) + len(r.body) for r in records)
    assert consumed == len(data)


@settings(max_examples=60, deadline=None)
@given(
    before=st.integers(0, 2 * MAX_PLAINTEXT),
    cuts=st.lists(st.integers(0, 3 * MAX_PLAINTEXT), max_size=3),
    size=st.integers(0, 3 * MAX_PLAINTEXT),
)
def test_a_message_in_pieces_packs_exactly_as_joined(
    before: int, cuts: list[int], size: int
) -> None:
    """add_message_pieces writes the same plaintexts as add_message of the joined bytes."""
    body = bytes(range(256)) * (size // 256 + 1)
    body = body[:size]
    bounds = [0, *sorted({min(cut, size) for cut in cuts}), size]
    pieces = [body[a:b] for a, b in itertools.pairwise(bounds)]
    joined, split = RecordWriter(), RecordWriter()
    for writer in (joined, split):
        if before:
            writer.add_message(b"p" * before)  # so the message starts mid-plaintext
    joined.add_message(body)
    split.add_message_pieces(pieces)
    assert list(split.pack()) == list(joined.pack())


def test_a_large_message_is_packed_one_plaintext_at_a_time() -> None:
    """Fragments are built as they are taken: packing 16 MiB holds about one plaintext."""
    payload = bytes(16 * 1024 * 1024)
    writer = RecordWriter()
    tracemalloc.start()
    try:
        writer.add_message_pieces([b"\x91\xc6\x01\x00\x00\x00", payload])
        taken = 0
        for plaintext in writer.pack():
            taken += len(plaintext)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert taken > len(payload)
    assert peak < 1024 * 1024


def _general_read_records(data: bytes) -> list[tuple[RecordKind, bytes]] | None:
    """Every record, each header read with the general varint reader; ``None``: invalid."""
    view = memoryview(data)
    try:
        records = []
        pos = 0
        while pos < len(view):
            kind = RecordKind(view[pos])
            channel, pos = read_uvarint(view, pos + 1, 5)
            length, pos = read_uvarint(view, pos, 3)
            if channel != 0 or length > len(view) - pos:
                return None
            records.append((kind, bytes(view[pos : pos + length])))
            pos += length
        return records
    except (ValueError, ProtocolError):
        return None


@settings(max_examples=500)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([*RecordKind, 0x0B]),
            st.sampled_from([b"\x00", b"\x01", b"\x80\x00", b"\x00\x00"]),
            st.binary(max_size=300),
            st.booleans(),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_the_inline_channel_0_header_reads_as_the_general_reader(
    records: list[tuple[int, bytes, bytes, bool]],
) -> None:
    """Differential: ``read_records`` reads a channel-0 header inline; each record it
    accepts is what the general varint reader reads, and it never accepts bytes the general
    reader finds malformed (its other checks may refuse more)."""
    data = b"".join(
        bytes((kind,)) + channel + (encode_uvarint(len(body)) if exact else b"\x85\x00") + body
        for kind, channel, body, exact in records
    )
    general = _general_read_records(data)
    try:
        fast, _ = read_records(memoryview(data), 0, None)
    except ProtocolError:
        return
    assert general is not None
    assert [(record.kind, bytes(record.body)) for record in fast] == general


def _spec_pack(items: list[tuple[RecordKind, bytes]]) -> list[bytes]:
    """SPEC section 12, "How stalk packs records", followed to the letter (one flush)."""
    capacity = 65516
    plaintexts: list[bytes] = []
    current = bytearray()

    def finish() -> None:
        nonlocal current
        if current:
            plaintexts.append(bytes(current))
            current = bytearray()

    for kind, body in items:
        if kind is not RecordKind.MESSAGE:
            record = bytes((kind, 0)) + encode_uvarint(len(body)) + body
            if len(current) + len(record) > capacity:
                finish()
            current += record
            continue
        rest = body
        while True:
            avail = capacity - len(current) - 2
            if len(rest) + len(encode_uvarint(len(rest))) <= avail:
                current += bytes((RecordKind.MESSAGE, 0)) + encode_uvarint(len(rest)) + rest
                break
            n = max(m for m in range(avail + 1) if m + len(encode_uvarint(m)) <= avail)
            if n < 512:
                finish()
                continue
            current += bytes((RecordKind.FRAGMENT, 0)) + encode_uvarint(n) + rest[:n]
            rest = rest[n:]
            finish()
    finish()
    return plaintexts


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.just(RecordKind.MESSAGE),
                st.integers(0, 140_000).map(lambda size: bytes(range(256)) * (size // 256)),
            ),
            st.tuples(
                st.sampled_from([RecordKind.PING, RecordKind.PONG]),
                st.binary(max_size=1024),
            ),
            st.tuples(st.just(RecordKind.MESSAGE), st.binary(max_size=300)),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_the_writer_packs_as_spec_says(items: list[tuple[RecordKind, bytes]]) -> None:
    """Differential: RecordWriter against SPEC's packing rules written out plainly."""
    writer = RecordWriter()
    for kind, body in items:
        if kind is RecordKind.MESSAGE:
            writer.add_message(body)
        else:
            writer.add(kind, body)
    assert [bytes(plaintext) for plaintext in writer.pack()] == _spec_pack(items)


def _slow_channel_records(data: bytes) -> list[tuple[int, int, bytes]]:
    """The channel record parser's reading of headers, every varint through read_uvarint
    (the parser reads one-byte ids and lengths inline: this is what that must equal)."""
    view, pos, out = memoryview(data), 0, []
    while pos < len(view):
        kind = view[pos]
        channel, pos = read_uvarint(view, pos + 1, 5)
        length, pos = read_uvarint(view, pos, 3)
        if length > len(view) - pos:
            raise ProtocolError("claims more than remains")
        out.append((kind, channel, bytes(view[pos : pos + length])))
        pos += length
    return out


_CHANNEL_RECORD = st.tuples(
    st.just(RecordKind.MESSAGE),
    st.one_of(st.integers(0, 127), st.integers(128, 2**31 - 1)),
    st.one_of(st.binary(max_size=127), st.binary(min_size=128, max_size=400)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_CHANNEL_RECORD, min_size=1, max_size=20), st.binary(max_size=3))
def test_channel_headers_read_inline_as_read_uvarint_reads_them(
    records: list[tuple[RecordKind, int, bytes]], tail: bytes
) -> None:
    data = b"".join(
        bytes((kind,)) + encode_uvarint(channel) + encode_uvarint(len(body)) + body
        for kind, channel, body in records
    )
    assert [
        (int(r.kind), r.channel, bytes(r.body))
        for r in read_records(memoryview(data), 0, None, channels=True)[0]
    ] == _slow_channel_records(data)
    # Cut or followed by stray bytes: both readings refuse, or both agree.
    for cut in (data[:-1], data + tail):
        try:
            slow = _slow_channel_records(cut)
        except ProtocolError:
            slow = None
        try:
            fast = [
                (int(r.kind), r.channel, bytes(r.body))
                for r in read_records(memoryview(cut), 0, None, channels=True)[0]
            ]
        except ProtocolError:
            fast = None
        if fast is not None:
            assert fast == slow


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([RecordKind.MESSAGE, RecordKind.FRAGMENT, RecordKind.PING]),
            st.sampled_from([0, 0, 1, 200]),
            st.binary(min_size=1, max_size=200),
        ),
        min_size=1,
        max_size=20,
    ),
    st.integers(1, 8),
)
def test_the_channel_parser_counts_a_batch_of_channel_0_messages(
    records: list[tuple[RecordKind, int, bytes]], stop: int
) -> None:
    """Each batch it parses comes with its bodies' bytes when every record is a MESSAGE on
    channel 0 but the last, which may also be a FRAGMENT on channel 0 (a batch the demux
    counts at once), else -1."""
    records = [
        (kind, 0 if kind is RecordKind.PING else channel, body[:16])
        for kind, channel, body in records
    ]
    data = b"".join(
        bytes((kind,)) + encode_uvarint(channel) + encode_uvarint(len(body)) + body
        for kind, channel, body in records
    )
    view, pos, seen = memoryview(data), 0, 0
    while pos < len(view):
        batch, pos, counted = read_channel_records(view, pos, stop)
        expected = records[seen : seen + len(batch)]
        assert [(r.kind, r.channel, bytes(r.body)) for r in batch] == expected
        plain = all(
            not channel
            and (
                kind is RecordKind.MESSAGE or (kind is RecordKind.FRAGMENT and at == len(batch) - 1)
            )
            for at, (kind, channel, _) in enumerate(expected)
        )
        assert counted == (sum(len(body) for _, _, body in expected) if plain else -1)
        seen += len(batch)
    assert seen == len(records)
