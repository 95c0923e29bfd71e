"""Transport, records and spacks: a hostile client that holds its real keys.

Every row runs a real handshake with the listener, sends two legitimate spacks (each in
its own Noise message), then the attack. Where the attack is one Noise message, a valid
spack (:data:`~adversarial.peers.POISON`) rides in front of the bad record: nothing of a
rejected message may be delivered, so the handler must end with exactly the two
legitimate spacks.
"""

from __future__ import annotations

import struct

from stalk.errors import (
    ClosedByPeer,
    DecryptionFailed,
    MalformedSpack,
    MessageLimitExceeded,
    ProtocolError,
)
from stalk.framing import encode_frame
from stalk.spack import Spack
from stalk.wire import CloseCode, RecordKind

from .attacks import (
    CLEAN,
    CUT,
    A,
    B,
    Build,
    after_handshake,
    before_ready,
    broken,
    play,
    row,
)
from .harness import MAX_MESSAGE, Attack, Case, Expect, Target
from .peers import POISON, READY, REKEY, Transport, close, msg, raw_msg, rec

M, F, C, PING, PONG = (
    RecordKind.MESSAGE,
    RecordKind.FRAGMENT,
    RecordKind.CLOSE,
    RecordKind.PING,
    RecordKind.PONG,
)


def poisoned(bad: bytes) -> Build:
    """One Noise message: a valid spack, then ``bad``."""
    return lambda t: t.seal(msg(POISON) + bad)


def _flip(position: str, bit: int) -> Build:
    def build(t: Transport) -> bytes:
        frame = bytearray(t.spacks(A))
        index = {
            "len_high": 0,
            "len_low": 1,
            "body_first": 2,
            "body_middle": 2 + (len(frame) - 18) // 2,
            "body_last": len(frame) - 17,
            "tag_first": len(frame) - 16,
            "tag_last": len(frame) - 1,
        }[position]
        frame[index] ^= 1 << bit
        return bytes(frame)

    return build


def _resize(delta: int) -> Build:
    """A valid frame whose length prefix is off by ``delta`` (the body unchanged)."""

    def build(t: Transport) -> bytes:
        frame = t.spacks(A)
        return struct.pack(">H", len(frame) - 2 + delta) + frame[2:]

    return build


def _replay(t: Transport) -> bytes:
    a, b = t.spacks(A), t.spacks(B)
    return a + b + a


def _duplicate(t: Transport) -> bytes:
    a = t.spacks(A)
    return a + a


def _reorder(t: Transport) -> bytes:
    a, b = t.spacks(A), t.spacks(B)
    return b + a


def _drop(t: Transport) -> bytes:
    t.spacks(A)  # encrypted (nonce used) and never sent
    return t.spacks(B)


def _skip_nonce(t: Transport) -> bytes:
    t.send.set_nonce_for_testing_only(t.send.nonce + 1)
    return t.spacks(A)


def _cut_body(t: Transport) -> bytes:
    body = t.spacks(A)[2:-1]
    return encode_frame(body)


def _extra_byte(t: Transport) -> bytes:
    return encode_frame(t.spacks(A)[2:] + b"\x00")


def _replay_ready(t: Transport) -> bytes:
    ready = t.seal(READY)
    return ready + t.spacks(A) + ready


FRAME_OPS: list[tuple[str, str, Build, tuple[Spack, ...], Expect]] = [
    (
        "flip_len_high_bit",
        "a spack's frame with bit 7 of its length prefix flipped, then EOF",
        _flip("len_high", 7),
        (),
        CUT,
    ),
    (
        "length_one_more",
        "a spack's frame whose length claims one byte more, then EOF",
        _resize(1),
        (),
        CUT,
    ),
    (
        "length_one_less",
        "a spack's frame whose length claims one byte less",
        _resize(-1),
        (),
        broken(DecryptionFailed),
    ),
    (
        "flip_body_first_bit0",
        "a spack's frame with bit 0 of its first ciphertext byte flipped",
        _flip("body_first", 0),
        (),
        broken(DecryptionFailed),
    ),
    (
        "flip_body_first_bit7",
        "bit 7 of the first ciphertext byte flipped",
        _flip("body_first", 7),
        (),
        broken(DecryptionFailed),
    ),
    (
        "flip_body_middle",
        "bit 3 of a middle ciphertext byte flipped",
        _flip("body_middle", 3),
        (),
        broken(DecryptionFailed),
    ),
    (
        "flip_body_last",
        "bit 5 of the last ciphertext byte (before the tag) flipped",
        _flip("body_last", 5),
        (),
        broken(DecryptionFailed),
    ),
    (
        "flip_tag_first",
        "bit 0 of the tag's first byte flipped",
        _flip("tag_first", 0),
        (),
        broken(DecryptionFailed),
    ),
    (
        "flip_tag_last",
        "bit 7 of the tag's last byte flipped",
        _flip("tag_last", 7),
        (),
        broken(DecryptionFailed),
    ),
    ("replayed_message", "messages A, B, then A again", _replay, (A, B), broken(DecryptionFailed)),
    ("duplicated_message", "message A twice in a row", _duplicate, (A,), broken(DecryptionFailed)),
    ("reordered_messages", "message B before message A", _reorder, (), broken(DecryptionFailed)),
    ("dropped_message", "message B, message A never sent", _drop, (), broken(DecryptionFailed)),
    (
        "nonce_skipped",
        "a message encrypted with the nonce after the expected one",
        _skip_nonce,
        (),
        broken(DecryptionFailed),
    ),
    (
        "ciphertext_cut_by_one",
        "a frame whose body lost its last byte (length adjusted)",
        _cut_body,
        (),
        broken(DecryptionFailed),
    ),
    (
        "ciphertext_extra_byte",
        "a frame with one byte appended (length adjusted)",
        _extra_byte,
        (),
        broken(DecryptionFailed),
    ),
]

#: (id, what the bad record is, the bytes after the poison record, error).
RECORDS: list[tuple[str, str, bytes, type[ProtocolError]]] = [
    *[
        (
            f"unknown_kind_{kind:02x}",
            f"a record of unknown kind 0x{kind:02x}",
            bytes([kind, 0, 0]),
            ProtocolError,
        )
        for kind in (0x00, 0x08, 0x09, 0x7F, 0x80, 0xFF)
    ],
    ("channel_1", "a MESSAGE on channel 1", rec(M, b"\x90", channel=b"\x01"), ProtocolError),
    ("channel_127", "a MESSAGE on channel 127", rec(M, b"\x90", channel=b"\x7f"), ProtocolError),
    (
        "channel_128",
        "a MESSAGE on channel 128 (2-byte varint)",
        rec(M, b"\x90", channel=b"\x80\x01"),
        ProtocolError,
    ),
    (
        "channel_max_5_bytes",
        "a MESSAGE on channel 2^35-1 (5-byte varint)",
        rec(M, b"\x90", channel=b"\xff\xff\xff\xff\x7f"),
        ProtocolError,
    ),
    ("ping_channel_1", "a PING on channel 1", rec(PING, b"x", channel=b"\x01"), ProtocolError),
    (
        "channel_non_minimal",
        "channel 0 encoded as `80 00`",
        rec(M, b"\x90", channel=b"\x80\x00"),
        ProtocolError,
    ),
    (
        "channel_6_byte_varint",
        "a 6-byte channel varint",
        rec(M, b"\x90", channel=b"\x80\x80\x80\x80\x80\x00"),
        ProtocolError,
    ),
    (
        "length_non_minimal",
        "length 1 encoded as `81 00`",
        rec(M, b"\x90", length=b"\x81\x00"),
        ProtocolError,
    ),
    (
        "length_4_byte_varint",
        "a 4-byte length varint",
        rec(M, b"\x90", length=b"\x81\x80\x80\x00"),
        ProtocolError,
    ),
    (
        "length_varint_cut",
        "a record ending inside its length varint",
        bytes([M, 0, 0x80]),
        ProtocolError,
    ),
    ("kind_only", "a lone kind byte", bytes([M]), ProtocolError),
    (
        "length_one_past_end",
        "a MESSAGE claiming one byte more than remains",
        rec(M, b"\x90", length=b"\x02"),
        ProtocolError,
    ),
    (
        "length_65535_past_end",
        "a MESSAGE claiming 65535 bytes",
        rec(M, b"\x90", length=b"\xff\xff\x03"),
        ProtocolError,
    ),
    (
        "length_2_21_past_end",
        "a MESSAGE claiming 2^21-1 bytes",
        rec(M, b"\x90", length=b"\xff\xff\x7f"),
        ProtocolError,
    ),
    (
        "record_after_close",
        "CLOSE, then a MESSAGE in the same Noise message",
        close() + msg(A),
        ProtocolError,
    ),
    (
        "record_after_rekey",
        "REKEY, then a MESSAGE in the same Noise message",
        REKEY + msg(A),
        ProtocolError,
    ),
    ("rekey_twice", "REKEY twice in one Noise message", REKEY + REKEY, ProtocolError),
    (
        "rekey_with_body",
        "a REKEY record with a 1-byte body",
        rec(RecordKind.REKEY, b"\x00"),
        ProtocolError,
    ),
    ("empty_fragment", "an empty FRAGMENT", rec(F), ProtocolError),
    ("close_reason_1025", "CLOSE with a 1025-byte reason", close(0, b"r" * 1025), ProtocolError),
    (
        "close_reason_bad_utf8",
        "CLOSE with a reason that is not UTF-8",
        close(0, b"\xff\xfe"),
        ProtocolError,
    ),
    ("close_1_byte", "CLOSE with a 1-byte body", rec(C, b"\x00"), ProtocolError),
    ("close_empty", "CLOSE with an empty body", rec(C), ProtocolError),
    ("ping_1025", "PING with a 1025-byte body", rec(PING, b"p" * 1025), ProtocolError),
    ("pong_1025", "PONG with a 1025-byte body", rec(PONG, b"p" * 1025), ProtocolError),
    (
        "fragment_then_close",
        "a FRAGMENT, then CLOSE in the same Noise message",
        rec(F, b"\x92") + close(),
        ProtocolError,
    ),
    ("fragment_then_ready", "a FRAGMENT, then READY", rec(F, b"\x92") + READY, ProtocolError),
    (
        "fragments_malformed_whole",
        "FRAGMENT `92`, MESSAGE `01` (a truncated spack)",
        rec(F, b"\x92") + rec(M, b"\x01"),
        MalformedSpack,
    ),
]


def _spack(hex_or_bytes: str | bytes) -> bytes:
    return bytes.fromhex(hex_or_bytes) if isinstance(hex_or_bytes, str) else hex_or_bytes


#: (id, what the MESSAGE body is): spack encodings a receiver must reject (SPEC 19).
SPACKS: list[tuple[str, str, str | bytes]] = [
    ("reserved_byte_c1", "`c1`", "c1"),
    ("empty", "an empty body", b""),
    ("truncated_array", "`92 01`: two elements claimed, one present", "9201"),
    ("trailing_byte", "`90 00`: a trailing byte", "9000"),
    ("top_level_int", "`01`: not an array", "01"),
    ("top_level_map", "`80`: a map at the top", "80"),
    ("top_level_str", "`a1 61`: a string at the top", "a161"),
    ("invalid_utf8", "`91 a2 ff fe`", "91a2fffe"),
    ("utf8_surrogate", "an encoded surrogate `ed a0 80`", "91a3eda080"),
    ("utf8_overlong", "an overlong `c0 80`", "91a2c080"),
    ("duplicate_key", 'a map repeating key `"a"`', "9182a16101a16102"),
    ("int_key", "a map with an integer key", "91810102"),
    ("nil_key", "a map with a nil key", "9181c001"),
    ("ext_timestamp", "ext -1 (msgpack timestamp)", "91d6ff00000000"),
    ("ext_unknown_5", "ext 5", "91d40500"),
    ("ext_reserved_0", "ext 0", "91d40000"),
    ("ext_float32_2_bytes", "ext 1 with a 2-byte payload", "91d5010000"),
    ("ext_tuple_trailing", "ext 2 with a trailing byte after its array", "91d5029000"),
    ("ext_tuple_scalar", "ext 2 whose payload is a scalar", "91d40201"),
    ("ext_tuple_empty", "ext 2 with an empty payload", "91c70002"),
    ("int32_array_2_bytes", "an int32 array of 2 bytes", "91d5140000"),
    ("depth_33", "a list at depth 33", "91" * 33 + "90"),
    ("depth_60000", "60000 nested arrays (recursion bomb)", b"\x91" * 60000 + b"\x90"),
    ("claim_array32", "`dd ff ff ff ff`: 2^32-1 elements in 5 bytes", "ddffffffff"),
    ("claim_map32", "`91 df ff ff ff ff`: a map of 2^32-1 entries", "91dfffffffff"),
    ("claim_bin32", "`91 c6 ff ff ff ff`: 4 GiB of bin claimed", "91c6ffffffff"),
    ("claim_str32", "`91 db ff ff ff ff`: 4 GiB of text claimed", "91dbffffffff"),
    ("claim_ext32", "`91 c9 ff ff ff ff 02`: a 4 GiB tuple claimed", "91c9ffffffff02"),
    ("claim_nested", "arrays of 2^32-1 elements nested 30 deep", "ddffffffff" * 30),
    ("claim_array16_empty", "`91 dc ff ff`: 65535 elements, none present", "91dcffff"),
]


def _tuples(depth: int) -> bytes:
    """``depth`` nested tuples (ext 2) around an empty one."""
    inner = b"\xd4\x02\x90"
    for _ in range(depth - 1):
        payload = b"\x91" + inner
        inner = b"\xc7" + bytes([len(payload)]) + b"\x02" + payload
    return b"\x91" + inner


def _fragments(encoding: bytes, sizes: list[int], final: bool = True) -> Build:
    """``encoding`` cut into FRAGMENTs of ``sizes`` (one Noise message each), then MESSAGE."""

    def build(t: Transport) -> bytes:
        out, pos = [], 0
        for size in sizes:
            out.append(t.seal(rec(F, encoding[pos : pos + size])))
            pos += size
        if final:
            out.append(t.seal(rec(M, encoding[pos:])))
            out.append(t.seal(close()))
        return b"".join(out)

    return build


_AT_LIMIT = Spack(b"x" * (MAX_MESSAGE - 6))
assert len(_AT_LIMIT.encode()) == MAX_MESSAGE
_OVER = Spack(b"x" * (MAX_MESSAGE - 5)).encode()
_TINY = Spack("in", "tiny", "pieces")
#: A list of chained one-entry maps, the heaviest shape per encoded byte (SPEC 19).
_HEAVY = b"\xdd" + ((MAX_MESSAGE - 5) // 63).to_bytes(4, "big")
_HEAVY += (b"\x81\xa0" * 31 + b"\x80") * ((MAX_MESSAGE - 5) // 63)


def _tiny_fragments(t: Transport) -> bytes:
    data = _TINY.encode()
    body = b"".join(rec(F, data[i : i + 1]) for i in range(len(data) - 1))
    return t.seal(body + rec(M, data[-1:])) + t.seal(close())


def _fragment_ping_message(t: Transport) -> bytes:
    data = A.encode()
    return (
        t.seal(rec(F, data[:3]))
        + t.seal(rec(PING, b"mid") + rec(PONG, b"unsolicited"))
        + t.seal(rec(M, data[3:]))
        + t.seal(close())
    )


def _fragment_rekey_message(t: Transport) -> bytes:
    data = A.encode()
    first = t.seal(rec(F, data[:3]) + REKEY)
    t.send.rekey()
    return first + t.seal(rec(M, data[3:])) + t.seal(close())


def _rekey(t: Transport, *, announce: bool, apply: bool) -> bytes:
    first = t.seal(msg(A) + REKEY) if announce else t.spacks(A)
    if apply:
        t.send.rekey()
    return first + t.spacks(B) + t.seal(close())


def _ping_flood(t: Transport) -> bytes:
    ping = rec(PING, b"")
    return t.seal(ping * 20_000) + t.seal(close())


async def ping_in_rejected_message(target: Target) -> Attack:
    """PING and a malformed spack in one Noise message: the PING must go unanswered."""
    attack = await after_handshake(target, poisoned(rec(PING, b"answer me?") + rec(M, b"\xc1")))
    assert RecordKind.PONG not in attack.kinds, (
        "stalk answered a PING from a Noise message it rejected"
    )
    return attack


def _record_case(case_id: str, sends: str, bad: bytes, error: type[ProtocolError]) -> Case:
    return row(
        "records",
        "client",
        case_id,
        f"a valid spack and {sends}, in one Noise message",
        broken(error),
        play(after_handshake, build=poisoned(bad)),
    )


def _spack_case(case_id: str, sends: str, data: str | bytes) -> Case:
    return row(
        "spack",
        "client",
        f"spack_{case_id}",
        f"a valid spack and a MESSAGE whose body is {sends}",
        broken(MalformedSpack),
        play(after_handshake, build=poisoned(raw_msg(_spack(data)))),
    )


CASES: list[Case] = [
    *[
        row(
            "transport",
            "client",
            case_id,
            f"after a real XX handshake and two spacks: {sends}",
            expect,
            play(after_handshake, build=build, delivered_too=also),
        )
        for case_id, sends, build, also, expect in FRAME_OPS
    ],
    row(
        "transport",
        "client",
        "ik_flip_tag",
        "after a real IK handshake and two spacks: a message with a flipped tag bit",
        broken(DecryptionFailed),
        play(after_handshake, ik=True, build=_flip("tag_last", 0)),
    ),
    row(
        "transport",
        "client",
        "ik_replayed_message",
        "after a real IK handshake: messages A, B, A again",
        broken(DecryptionFailed),
        play(after_handshake, ik=True, build=_replay, delivered_too=(A, B)),
    ),
    row(
        "transport",
        "client",
        "ik_replayed_ready",
        "IK: READY, message A, then the READY message again",
        broken(DecryptionFailed),
        play(before_ready, build=_replay_ready, delivered=(A,)),
    ),
    *[_record_case(*entry) for entry in RECORDS],
    row(
        "records",
        "client",
        "ping_then_bad_spack",
        "a PING and a spack that does not decode, in one Noise message",
        broken(MalformedSpack),
        play(ping_in_rejected_message),
    ),
    *[_spack_case(*entry) for entry in SPACKS],
    row(
        "spack",
        "client",
        "spack_tuple_depth_33",
        "a valid spack and a MESSAGE holding tuples (ext 2) nested 33 deep",
        broken(MalformedSpack),
        play(after_handshake, build=poisoned(raw_msg(_tuples(33)))),
    ),
    row(
        "spack",
        "client",
        "spack_depth_32_valid",
        "a spack nesting lists exactly 32 deep (the maximum), then CLOSE",
        CLEAN,
        play(
            after_handshake,
            build=lambda t: t.seal(raw_msg(bytes.fromhex("91" * 32 + "90"))) + t.seal(close()),
            delivered_too=(Spack.decode(bytes.fromhex("91" * 32 + "90")),),
        ),
    ),
    row(
        "spack",
        "client",
        "spack_60000_empty_lists",
        "a 60004-byte spack holding 60000 empty lists (amplification), then CLOSE",
        CLEAN,
        play(
            after_handshake,
            build=lambda t: (
                t.seal(raw_msg(b"\x91\xdc\xea\x60" + b"\x90" * 60000)) + t.seal(close())
            ),
            delivered_too=(Spack([[] for _ in range(60000)]),),
        ),
    ),
    row(
        "fragments",
        "client",
        "over_limit_fragments_only",
        f"FRAGMENTs of 60000 and {MAX_MESSAGE - 59999} bytes (limit {MAX_MESSAGE}), no final "
        "MESSAGE, no EOF: the limit must trip on the running total",
        broken(MessageLimitExceeded, CloseCode.MESSAGE_TOO_LARGE),
        play(
            after_handshake,
            build=_fragments(_OVER, [60000, MAX_MESSAGE - 59999], final=False),
            eof=False,
        ),
    ),
    row(
        "fragments",
        "client",
        "claim_beyond_limit_in_first_fragment",
        f"FRAGMENTs of 60,000 and 10,000 bytes whose bin header claims more than the "
        f"{MAX_MESSAGE}-byte limit: refused at the piece that takes the spack past what "
        "one record holds (until then it is joined), before anything more arrives",
        broken(MessageLimitExceeded, CloseCode.MESSAGE_TOO_LARGE),
        play(
            after_handshake,
            build=_fragments(
                b"\x91\xc6" + (MAX_MESSAGE).to_bytes(4, "big") + bytes(70_000),
                [60_000, 10_000],
                final=False,
            ),
            eof=False,
        ),
    ),
    row(
        "fragments",
        "client",
        "over_weight_budget",
        f"FRAGMENTs of a {len(_HEAVY)}-byte spack of chained one-entry maps (107 bytes of "
        "objects per byte): refused once its weight passes 8 x size + 8 MiB",
        broken(MessageLimitExceeded, CloseCode.MESSAGE_TOO_LARGE),
        play(after_handshake, build=_fragments(_HEAVY, [60000]), eof=False),
    ),
    row(
        "fragments",
        "client",
        "never_valid_first_fragment",
        "FRAGMENTs of 60,000 and 10,000 bytes that can never begin a spack (a top-level "
        "map): refused at the piece that takes the spack past what one record holds, not "
        "at the final MESSAGE",
        broken(MalformedSpack),
        play(
            after_handshake,
            build=_fragments(
                b"\x81\xa1k\xc6\x00\x01\x11\x70" + bytes(70_000), [60_000, 10_000], final=False
            ),
            eof=False,
        ),
    ),
    row(
        "fragments",
        "client",
        "never_valid_small_fragments",
        "a spack of 3 bytes in two pieces that can never be a spack (a top-level map): "
        "joined, and refused at its final MESSAGE (pieces totalling at most what one record "
        "holds are checked as a whole)",
        broken(MalformedSpack),
        play(
            after_handshake,
            build=lambda t: t.seal(rec(F, b"\x81\xa1")) + t.seal(rec(M, b"k")),
            eof=False,
        ),
    ),
    row(
        "fragments",
        "client",
        "empty_final_message",
        "the whole encoding in FRAGMENTs, then an empty final MESSAGE (valid, SPEC 12)",
        CLEAN,
        play(
            after_handshake,
            build=lambda t: (
                t.seal(rec(F, A.encode()[:3]) + rec(F, A.encode()[3:]))
                + t.seal(rec(M, b""))
                + t.seal(close())
            ),
            delivered_too=(A,),
        ),
    ),
    row(
        "fragments",
        "client",
        "over_limit_by_final_message",
        f"a FRAGMENT of 60000 bytes and a final MESSAGE bringing the total to {MAX_MESSAGE + 1}",
        broken(MessageLimitExceeded, CloseCode.MESSAGE_TOO_LARGE),
        play(after_handshake, build=_fragments(_OVER, [60000])),
    ),
    row(
        "fragments",
        "client",
        "at_limit_valid",
        f"a spack of exactly {MAX_MESSAGE} encoded bytes in two pieces, then CLOSE",
        CLEAN,
        play(
            after_handshake,
            build=_fragments(_AT_LIMIT.encode(), [60000]),
            delivered_too=(_AT_LIMIT,),
        ),
    ),
    row(
        "fragments",
        "client",
        "fragment_cut_by_close",
        "a FRAGMENT, then CLOSE in the next Noise message",
        broken(ProtocolError),
        play(after_handshake, build=lambda t: t.seal(rec(F, b"\x92\x01")) + t.seal(close())),
    ),
    row(
        "fragments",
        "client",
        "fragment_cut_by_eof",
        "a FRAGMENT, then EOF",
        CUT,
        play(after_handshake, build=lambda t: t.seal(rec(F, b"\x92\x01"))),
    ),
    row(
        "fragments",
        "client",
        "tiny_fragments_valid",
        "a spack cut into 1-byte FRAGMENTs in one Noise message, then CLOSE",
        CLEAN,
        play(after_handshake, build=_tiny_fragments, delivered_too=(_TINY,)),
    ),
    row(
        "fragments",
        "client",
        "ping_pong_between_fragments",
        "FRAGMENT, then PING and an unsolicited PONG, then the final MESSAGE (valid)",
        CLEAN,
        play(after_handshake, build=_fragment_ping_message, delivered_too=(A,)),
    ),
    row(
        "fragments",
        "client",
        "rekey_between_fragments",
        "FRAGMENT and REKEY, then the final MESSAGE under the new key (valid)",
        CLEAN,
        play(after_handshake, build=_fragment_rekey_message, delivered_too=(A,)),
    ),
    row(
        "control",
        "client",
        "rekey_valid",
        "a spack with REKEY, then a spack under the new key, then CLOSE",
        CLEAN,
        play(
            after_handshake,
            build=lambda t: _rekey(t, announce=True, apply=True),
            delivered_too=(A, B),
        ),
    ),
    row(
        "control",
        "client",
        "rekey_announced_not_applied",
        "a spack with REKEY, then a spack still under the old key",
        broken(DecryptionFailed),
        play(
            after_handshake,
            build=lambda t: _rekey(t, announce=True, apply=False),
            delivered_too=(A,),
        ),
    ),
    row(
        "control",
        "client",
        "rekey_applied_not_announced",
        "a spack without REKEY, then a spack under a rekeyed key",
        broken(DecryptionFailed),
        play(
            after_handshake,
            build=lambda t: _rekey(t, announce=False, apply=True),
            delivered_too=(A,),
        ),
    ),
    row(
        "control",
        "client",
        "ping_1024_valid",
        "a PING with a 1024-byte body (the maximum), then CLOSE",
        CLEAN,
        play(after_handshake, build=lambda t: t.seal(rec(PING, b"p" * 1024)) + t.seal(close())),
    ),
    row(
        "control",
        "client",
        "ping_flood",
        "20000 PINGs in one Noise message, then CLOSE (each gets a PONG)",
        CLEAN,
        play(after_handshake, build=_ping_flood),
    ),
    row(
        "control",
        "client",
        "close_error_code",
        "CLOSE with code PROTOCOL_ERROR and a reason",
        Expect(ClosedByPeer, True),
        play(after_handshake, build=lambda t: t.seal(close(CloseCode.PROTOCOL_ERROR, b"bad"))),
    ),
    row(
        "control",
        "client",
        "close_application_code",
        "CLOSE with application code 0x1234",
        Expect(ClosedByPeer, True),
        play(after_handshake, build=lambda t: t.seal(close(0x1234, b"app"))),
    ),
    row(
        "control",
        "client",
        "close_reason_1024_valid",
        "CLOSE(NORMAL) with a 1024-byte reason (the maximum)",
        CLEAN,
        play(after_handshake, build=lambda t: t.seal(close(0, "é".encode() * 512))),
    ),
    row(
        "control",
        "client",
        "spack_after_close",
        "CLOSE, then a Noise message carrying a spack: it must not be delivered",
        CLEAN,
        play(after_handshake, build=lambda t: t.seal(close()) + t.spacks(POISON)),
    ),
    row(
        "control",
        "client",
        "garbage_after_close",
        "CLOSE, then 100 random bytes",
        CLEAN,
        play(after_handshake, build=lambda t: t.seal(close()) + bytes(range(100))),
    ),
    row(
        "control",
        "client",
        "spack_and_close_one_message",
        "a spack and CLOSE in one Noise message (valid)",
        CLEAN,
        play(after_handshake, build=lambda t: t.seal(msg(A) + close()), delivered_too=(A,)),
    ),
    row(
        "control",
        "client",
        "legit_then_rst_mid_frame",
        "two spacks and half of a third frame, then RST",
        CUT,
        play(after_handshake, build=lambda t: t.spacks(A)[:10], reset=True),
    ),
]
