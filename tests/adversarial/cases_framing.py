"""Framing: what arrives before and around the frames (SPEC "Preamble", "Frames").

Hostile clients against the listener: openings that are not stalk at all, preambles cut
short, invalid frame lengths during the handshake and after it, EOF and RST at every
kind of boundary, and valid sessions delivered in unusual shapes (byte by byte, length
prefixes split across reads, many frames per write), which must work.
"""

from __future__ import annotations

import os
import random

from stalk.errors import (
    ConnectionLost,
    DecryptionFailed,
    HandshakeFailed,
    HandshakeTimeout,
    ProtocolError,
)
from stalk.spack import Spack

from .attacks import (
    CLEAN,
    CUT,
    MALFORMED,
    UNDECRYPTABLE,
    UNSUPPORTED,
    after_handshake,
    broken,
    honest_session,
    play,
    row,
    send_raw,
)
from .harness import SLOW_HANDSHAKE, Case, Expect
from .peers import (
    Transport,
    chunks,
    client_hello,
    close,
    msg,
    random_chunks,
    split_headers,
)

CATEGORY = "framing"
XX = b"STALK\x01XX"
IK = b"STALK\x01IK"
#: A stalled handshake must end at the listener's absolute deadline (plus slack), counted
#: from the connection's start.
DEADLINE = SLOW_HANDSHAKE + 0.6


def _random(seed: int, size: int = 64) -> bytes:
    data = random.Random(seed).randbytes(size)
    assert data[:1] != b"S", "a random opening must not start like the magic"
    return data


def _flip_magic(index: int) -> bytes:
    opening = bytearray(XX)
    opening[index] ^= 0x20
    return bytes(opening)


#: (id, what is sent): openings that are not stalk; each is refused with UNSUPPORTED.
FOREIGN: list[tuple[str, str, bytes]] = [
    ("random_bytes_seed1", "64 random bytes (seed 1) instead of a preamble", _random(1)),
    ("random_bytes_seed2", "64 random bytes (seed 2) instead of a preamble", _random(2)),
    ("random_bytes_seed3", "4096 random bytes (seed 3) instead of a preamble", _random(3, 4096)),
    ("http_get", "an HTTP/1.1 GET request", b"GET / HTTP/1.1\r\nHost: stalk\r\n\r\n"),
    (
        "http_post",
        "an HTTP/1.1 POST with a body",
        b"POST /x HTTP/1.1\r\nHost: s\r\nContent-Length: 5\r\n\r\nhello",
    ),
    ("http2_preface", "the HTTP/2 client preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("tls13_client_hello", "a real TLS 1.3 ClientHello (OpenSSL)", client_hello(tls12=False)),
    ("tls12_client_hello", "a real TLS 1.2 ClientHello (OpenSSL)", client_hello(tls12=True)),
    ("ssh_banner", "an SSH client banner", b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n"),
    ("socks5_greeting", "a SOCKS5 greeting", b"\x05\x01\x00"),
    ("redis_ping", "a Redis PING", b"*1\r\n$4\r\nPING\r\n"),
    ("null_bytes", "eight zero bytes", bytes(8)),
    ("magic_lowercase", "`stalk` in lower case, then a valid version and pattern", b"stalk\x01XX"),
    *[
        (f"magic_byte{i}_wrong", f"the preamble with magic byte {i} changed", _flip_magic(i))
        for i in range(5)
    ],
]

#: (id, what is sent): a true prefix of an opening, then EOF; refused as malformed.
CUT_SHORT: list[tuple[str, str, bytes]] = [
    ("empty_connection", "connect, then close without sending a byte", b""),
    ("preamble_1_byte_eof", "`S`, then EOF", b"S"),
    ("preamble_4_bytes_eof", "`STAL`, then EOF", b"STAL"),
    ("preamble_7_bytes_eof", "7 of the 8 preamble bytes, then EOF", XX[:7]),
    ("preamble_only_eof", "the whole preamble and no message 1, then EOF", XX),
    ("msg1_half_length_eof", "the preamble and 1 byte of a frame length, then EOF", XX + b"\x00"),
    (
        "msg1_length_beyond_data_eof",
        "a message-1 frame claiming 200 bytes with 40 present, then EOF",
        XX + b"\x00\xc8" + bytes(40),
    ),
    (
        "msg1_length_65535_then_eof",
        "a message-1 frame claiming 65535 bytes with 100 present, then EOF",
        XX + b"\xff\xff" + bytes(100),
    ),
    ("msg1_zero_length_frame_xx", "XX preamble, then a zero-length frame", XX + b"\x00\x00"),
    ("msg1_zero_length_frame_ik", "IK preamble, then a zero-length frame", IK + b"\x00\x00"),
    ("msg1_one_byte_xx", "XX preamble, then a 1-byte message 1", XX + b"\x00\x01\x04"),
    (
        "msg1_e_31_bytes_xx",
        "XX message 1 one byte short of its ephemeral key",
        XX + b"\x00\x1f" + bytes(range(31)),
    ),
    (
        "msg1_max_frame_65535_xx",
        "XX message 1 of 65535 random bytes (payload far over 1024)",
        XX + b"\xff\xff" + os.urandom(65535),
    ),
]

#: (id, what is sent after a real handshake and two legit spacks, expectation).
TRANSPORT: list[tuple[str, str, bytes, Expect]] = [
    ("zero_length_frame", "a zero-length frame", b"\x00\x00", broken(ProtocolError)),
    (
        "frame_1_byte",
        "a 1-byte frame (shorter than the AEAD tag)",
        b"\x00\x01\xaa",
        broken(DecryptionFailed),
    ),
    ("frame_15_bytes", "a 15-byte frame", b"\x00\x0f" + bytes(15), broken(DecryptionFailed)),
    (
        "frame_16_random",
        "a 16-byte frame: a random tag, no ciphertext",
        b"\x00\x10" + os.urandom(16),
        broken(DecryptionFailed),
    ),
    (
        "frame_65535_random",
        "a maximal frame of 65535 random bytes",
        b"\xff\xff" + os.urandom(65535),
        broken(DecryptionFailed),
    ),
    (
        "length_beyond_data_eof",
        "a frame claiming 200 bytes with 50 present, then EOF",
        b"\x00\xc8" + bytes(50),
        CUT,
    ),
    (
        "length_65535_then_eof",
        "a frame claiming 65535 bytes with 1000 present, then EOF",
        b"\xff\xff" + bytes(1000),
        CUT,
    ),
    ("eof_mid_length", "1 byte of a frame length, then EOF", b"\x00", CUT),
    ("eof_at_frame_boundary", "nothing more: EOF without CLOSE", b"", CUT),
]


def _foreign(case_id: str, sends: str, data: bytes) -> Case:
    return row(CATEGORY, "client", case_id, sends, UNSUPPORTED, play(send_raw, data=data))


def _cut(case_id: str, sends: str, data: bytes) -> Case:
    expect = UNDECRYPTABLE if case_id.endswith("_ik") and len(data) > 12 else MALFORMED
    return row(CATEGORY, "client", case_id, sends, expect, play(send_raw, data=data))


def _transport(case_id: str, sends: str, payload: bytes, expect: Expect) -> Case:
    return row(
        CATEGORY,
        "client",
        case_id,
        f"after a real XX handshake and two spacks: {sends}",
        expect,
        play(after_handshake, build=lambda _t: payload),
    )


def _eof_mid_body(t: Transport) -> bytes:
    return t.spacks(Spack("cut", b"z" * 300))[:-1]


_BIG = Spack(b"x" * 65510)  # encodes to 65514 bytes: the largest MESSAGE record that fits
assert len(_BIG.encode()) == 65514


def _max_frame(t: Transport) -> bytes:
    frame = t.seal(msg(_BIG))
    assert frame[:2] == b"\xff\xff", "the frame must be exactly 65535 bytes"
    return frame + t.seal(close())


CASES: list[Case] = [
    *[_foreign(*entry) for entry in FOREIGN],
    *[_cut(*entry) for entry in CUT_SHORT],
    row(
        CATEGORY,
        "client",
        "msg1_max_frame_65535_ik",
        "IK message 1 of 65535 random bytes (refused from its frame header: too long for a "
        "3072-byte payload)",
        MALFORMED,
        play(send_raw, data=IK + b"\xff\xff" + os.urandom(65535)),
    ),
    row(
        CATEGORY,
        "client",
        "empty_connection_rst",
        "connect, then reset (RST) without sending a byte",
        Expect(HandshakeFailed, False),
        play(send_raw, data=b"", reset=True),
    ),
    row(
        CATEGORY,
        "client",
        "rst_after_preamble",
        "the preamble, then RST",
        Expect(HandshakeFailed, False),
        play(send_raw, data=XX, reset=True),
    ),
    row(
        CATEGORY,
        "client",
        "half_preamble_stall",
        "`STA`, then nothing (short handshake deadline)",
        Expect(HandshakeTimeout, False, deadline=DEADLINE),
        play(send_raw, data=b"STA", eof=False),
        slow=True,
    ),
    row(
        CATEGORY,
        "client",
        "msg1_half_frame_stall",
        "the preamble and half of message 1, then nothing",
        Expect(HandshakeTimeout, False, deadline=DEADLINE),
        play(send_raw, data=XX + b"\x00\x21" + bytes(10), eof=False),
        slow=True,
    ),
    row(
        CATEGORY,
        "client",
        "preamble_drip_feed",
        "16 bytes of a valid opening, one every 0.15 s (the deadline is absolute)",
        Expect(HandshakeTimeout, False, deadline=DEADLINE),
        play(send_raw, data=XX + b"\x00\x21" + bytes(6), chunk=1, pause=0.15, eof=False),
        slow=True,
    ),
    *[_transport(*entry) for entry in TRANSPORT],
    row(
        CATEGORY,
        "client",
        "empty_plaintext_valid_tag",
        "after a real handshake: a transport message with an empty plaintext (valid tag)",
        broken(ProtocolError),
        play(after_handshake, build=lambda t: t.seal(b"")),
    ),
    row(
        CATEGORY,
        "client",
        "eof_mid_body",
        "after a real handshake: a valid frame minus its last byte, then EOF",
        CUT,
        play(after_handshake, build=_eof_mid_body),
    ),
    row(
        CATEGORY,
        "client",
        "rst_after_spacks",
        "after a real handshake and two spacks: RST",
        Expect(ConnectionLost, True),
        play(after_handshake, build=lambda _t: b"", reset=True),
    ),
    row(
        CATEGORY,
        "client",
        "max_frame_65535_valid",
        "a 65535-byte frame (65519-byte plaintext, the maximum), then CLOSE",
        CLEAN,
        play(after_handshake, build=_max_frame, delivered_too=(_BIG,)),
    ),
    row(
        CATEGORY,
        "client",
        "close_then_eof",
        "two spacks, CLOSE(NORMAL), EOF",
        CLEAN,
        play(after_handshake, build=lambda t: t.seal(close())),
    ),
    row(
        CATEGORY,
        "client",
        "one_byte_at_a_time_xx",
        "a whole valid XX session, one byte per write",
        CLEAN,
        play(honest_session, splitter=chunks(1)),
    ),
    row(
        CATEGORY,
        "client",
        "one_byte_at_a_time_ik",
        "a whole valid IK session, one byte per write",
        CLEAN,
        play(honest_session, ik=True, splitter=chunks(1)),
    ),
    row(
        CATEGORY,
        "client",
        "length_prefix_split_xx",
        "a valid XX session, every frame cut between its two length bytes (5 ms apart)",
        CLEAN,
        play(honest_session, splitter=split_headers, pause=0.005),
    ),
    row(
        CATEGORY,
        "client",
        "length_prefix_split_ik",
        "a valid IK session, every frame cut between its two length bytes (5 ms apart)",
        CLEAN,
        play(honest_session, ik=True, splitter=split_headers, pause=0.005),
    ),
    *[
        row(
            CATEGORY,
            "client",
            f"random_chunks_seed{seed}",
            f"a valid XX session cut into random 1..7-byte writes (seed {seed})",
            CLEAN,
            play(honest_session, splitter=random_chunks(seed, 7)),
        )
        for seed in (1, 2)
    ],
    row(
        CATEGORY,
        "client",
        "many_frames_one_write",
        "100 spacks in 100 Noise messages and the CLOSE, all in one write",
        CLEAN,
        play(honest_session, spacks=tuple(Spack("many", i) for i in range(100)), one_write=True),
    ),
    row(
        CATEGORY,
        "client",
        "many_records_one_message",
        "300 spacks batched into one Noise message",
        CLEAN,
        play(honest_session, spacks=tuple(Spack("batch", i) for i in range(300)), batch=True),
    ),
]
