"""A hostile server against :func:`stalk.connect`: the other direction.

The server is a plain anyio TCP listener that speaks stalk by hand (with real keys, so
after the handshake everything it sends authenticates) and then misbehaves. stalk's
application is a loop of ``conn.receive()``; it must end with a typed error, having
received exactly the spacks the server sent legitimately, and stalk must close the
connection by itself.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any

import anyio

from stalk.config import Config
from stalk.errors import (
    ClosedByPeer,
    ConnectionLost,
    DecryptionFailed,
    HandshakeFailed,
    HandshakeTimeout,
    InvalidPeerKey,
    MalformedSpack,
    MessageLimitExceeded,
    PeerIdentityMismatch,
    PeerRefused,
    ProtocolError,
)
from stalk.framing import encode_frame
from stalk.spack import Spack
from stalk.wire import MAX_HANDSHAKE_PAYLOAD, CloseCode, RecordKind

from .attacks import LEGIT, A, B, Build
from .harness import Case, Expect, ServerPlay, ServerSide
from .peers import (
    LOW_ORDER_POINTS,
    NON_CANONICAL_POINTS,
    READY,
    REKEY,
    Responder,
    Transport,
    Wire,
    chunks,
    close,
    msg,
    padded_params,
    params,
    raw_msg,
    rec,
    server_handshake,
    server_opening,
    split_headers,
)

Behave = Callable[[Wire, ServerSide], Awaitable[None]]
QUICK = Config(handshake_timeout=0.4, close_timeout=1)
SMALL = Config(handshake_timeout=3, close_timeout=1, max_message_size=1024)
DEADLINE = 0.4 + 0.6

#: The client never gets a connection.
NO_CONNECTION = Expect(HandshakeFailed, False)
#: The server's message 2 carries a bad key: the client refuses it, never connected.
BAD_KEY = Expect(InvalidPeerKey, False)
#: A clean end of the server's direction, everything delivered.
CLEAN = Expect(anyio.EndOfStream, True)


def broken(error: type[BaseException], code: int | None = CloseCode.PROTOCOL_ERROR) -> Expect:
    """The connection dies after the handshake; stalk's client sends CLOSE ``code``."""
    return Expect(error, True, code=code)


# -- behaviours ------------------------------------------------------------------------------


async def answer(wire: Wire, side: ServerSide, reply: bytes, *, stall: bool = False) -> None:
    """Read the opening, send ``reply`` instead of a proper answer, then EOF (or stall)."""
    await server_opening(wire)
    await wire.send(reply)
    if not stall:
        await wire.send_eof()
    await side.finish(wire)


async def opening_then(
    wire: Wire,
    side: ServerSide,
    *,
    resp: Responder,
    reply: Callable[[Responder], bytes],
    reset: bool = False,
) -> None:
    """Read the opening with a real Noise responder, send ``reply(resp)``, EOF (or RST)."""
    opening = await server_opening(wire)
    assert opening is not None
    resp = replace(resp, identity=side.identity)
    resp.start(opening[:8])
    assert resp.noise is not None
    resp.noise.read_message(opening[10:])
    await wire.send(reply(resp))
    if reset:
        await wire.reset()
        return
    await wire.send_eof()
    await side.finish(wire)


def _msg2(resp: Responder) -> bytes:
    return b"\x00" + encode_frame(resp.msg2())


async def handshake_then(
    wire: Wire,
    side: ServerSide,
    *,
    build: Build,
    legit: tuple[Spack, ...] = LEGIT,
    delivered_too: tuple[Spack, ...] = (),
    ready: bool = True,
    eof: bool = True,
    reset: bool = False,
    resp: Responder | None = None,
) -> None:
    """A real handshake (READY included unless ``ready`` is false), the legit spacks, then
    ``build``'s bytes."""
    responder = replace(resp or Responder(), identity=side.identity)
    transport = await server_handshake(wire, responder, ready=ready)
    side.transport = transport
    for spack in legit:
        await wire.send(transport.spacks(spack))
    side.legit.extend([*legit, *delivered_too])
    await wire.send(build(transport))
    if reset:
        await anyio.sleep(0.05)  # let the client take the legit spacks first
        await wire.reset()
        return
    if eof:
        await wire.send_eof()
    await side.finish(wire, transport)


def server(
    behave: Callable[..., Awaitable[None]],
    /,
    *,
    ik: bool = False,
    config: Config | None = None,
    **kwargs: object,
) -> ServerPlay:
    """A :class:`ServerPlay` for ``behave`` with keyword arguments bound."""
    bound = partial(behave, **kwargs)
    if config is None:
        return ServerPlay(bound, ik=ik)
    return ServerPlay(bound, ik=ik, config=config)


def row(
    case_id: str, category: str, sends: str, expect: Expect, run: ServerPlay, **options: Any
) -> Case:
    """A ``server`` row."""
    return Case(case_id, category, "server", sends, expect, run, **options)


# -- tables -------------------------------------------------------------------------------------

#: (id, what the server answers the opening with, bytes, expected client error).
REPLIES: list[tuple[str, str, bytes, type[HandshakeFailed]]] = [
    ("refusal_unsupported", "a refusal UNSUPPORTED with a reason", b"\x01\x05nope!", PeerRefused),
    ("refusal_busy", "a refusal BUSY", b"\x04\x00", PeerRefused),
    ("refusal_unknown_code_200", "a refusal with unknown code 200", b"\xc8\x03why", PeerRefused),
    (
        "refusal_reason_255_bytes",
        "a refusal with a 255-byte reason",
        b"\x05\xff" + b"r" * 255,
        PeerRefused,
    ),
    ("refusal_decrypt_failed_xx", "DECRYPT_FAILED to an XX client", b"\x02\x00", PeerRefused),
    (
        "refusal_reason_not_utf8",
        "a refusal whose reason is not UTF-8",
        b"\x05\x02\xff\xfe",
        HandshakeFailed,
    ),
    (
        "refusal_cut_then_eof",
        "a refusal announcing 32 reason bytes with 3, then EOF",
        b"\x05\x20abc",
        HandshakeFailed,
    ),
    ("eof_before_verdict", "nothing: EOF right after the client's opening", b"", HandshakeFailed),
    (
        "http_response",
        "an HTTP/1.1 400 response, then EOF",
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        HandshakeFailed,
    ),
    ("smtp_greeting", "an SMTP greeting, then EOF", b"220 mail.example ESMTP\r\n", HandshakeFailed),
    ("verdict_then_eof", "verdict 0, then EOF", b"\x00", HandshakeFailed),
    (
        "verdict_zero_length_frame",
        "verdict 0 and a zero-length frame",
        b"\x00\x00\x00",
        HandshakeFailed,
    ),
    (
        "msg2_random_96",
        "verdict 0 and 96 random bytes as message 2",
        b"\x00" + encode_frame(os.urandom(96)),
        HandshakeFailed,
    ),
    ("msg2_one_byte", "verdict 0 and a 1-byte message 2", b"\x00\x00\x01\x00", HandshakeFailed),
    (
        "msg2_max_frame_random",
        "verdict 0 and a 65535-byte random message 2",
        b"\x00" + encode_frame(os.urandom(65535)),
        HandshakeFailed,
    ),
    (
        "msg2_length_beyond_eof",
        "verdict 0, a frame claiming 200 bytes with 50, EOF",
        b"\x00\x00\xc8" + bytes(50),
        HandshakeFailed,
    ),
]

#: (id, what the parameters are, payload): bad responder parameters in message 2.
BAD_MSG2: list[tuple[str, str, bytes]] = [
    ("not_a_map", "a list", b"\x92\x01\x02"),
    ("invalid_msgpack", "`c1`", b"\xc1"),
    ("version_2", "version 2", params(version=2)),
    ("version_missing", "no version", params(version=None)),
    ("mms_1023", "max_message_size 1023", params(max_message_size=1023)),
    ("mms_missing", "no max_message_size", params(max_message_size=None)),
    ("mms_str", 'max_message_size `"x"`', params(max_message_size="x")),
    (
        "payload_3073_bytes",
        "3073 bytes of valid fields and padding (limit 3072)",
        padded_params(MAX_HANDSHAKE_PAYLOAD + 1),
    ),
]


def _cut_msg2(cut: int) -> Callable[[Responder], bytes]:
    return lambda resp: b"\x00" + encode_frame(resp.msg2()[:cut])


def _twice(resp: Responder) -> bytes:
    reply = _msg2(resp)
    return reply + reply[1:]


def _flip(offset_from_end: int) -> Build:
    def build(t: Transport) -> bytes:
        frame = bytearray(t.spacks(A))
        frame[len(frame) - offset_from_end] ^= 0x01
        return bytes(frame)

    return build


def _replay(t: Transport) -> bytes:
    a, b = t.spacks(A), t.spacks(B)
    return a + b + a


def _reorder(t: Transport) -> bytes:
    a, b = t.spacks(A), t.spacks(B)
    return b + a


def _drop(t: Transport) -> bytes:
    t.spacks(A)
    return t.spacks(B)


def _rekey(t: Transport) -> bytes:
    first = t.seal(msg(A) + REKEY)
    t.send.rekey()
    return first + t.spacks(B) + t.seal(close())


def _ready_first(t: Transport) -> bytes:
    return t.seal(READY + msg(A)) + t.seal(close())


#: (id, what the server sends after the handshake and two legit spacks, build, also, expect).
TRANSPORT: list[tuple[str, str, Build, tuple[Spack, ...], Expect]] = [
    (
        "flip_body_bit",
        "a spack whose ciphertext has a flipped bit",
        _flip(20),
        (),
        broken(DecryptionFailed),
    ),
    ("flip_tag_bit", "a spack whose tag has a flipped bit", _flip(1), (), broken(DecryptionFailed)),
    ("replayed_message", "messages A, B, then A again", _replay, (A, B), broken(DecryptionFailed)),
    ("reordered_messages", "B before A", _reorder, (), broken(DecryptionFailed)),
    ("dropped_message", "B, A never sent", _drop, (), broken(DecryptionFailed)),
    ("zero_length_frame", "a zero-length frame", lambda _t: b"\x00\x00", (), broken(ProtocolError)),
    (
        "frame_5_bytes",
        "a 5-byte frame",
        lambda _t: b"\x00\x05" + bytes(5),
        (),
        broken(DecryptionFailed),
    ),
    (
        "empty_plaintext",
        "a valid message with no record",
        lambda t: t.seal(b""),
        (),
        broken(ProtocolError),
    ),
    (
        "unknown_kind",
        "a spack and a record of kind 0x42 in one message",
        lambda t: t.seal(msg(A) + b"\x42\x00\x00"),
        (),
        broken(ProtocolError),
    ),
    (
        "channel_1",
        "a spack and a MESSAGE on channel 1",
        lambda t: t.seal(msg(A) + rec(1, b"\x90", channel=b"\x01")),
        (),
        broken(ProtocolError),
    ),
    (
        "length_non_minimal",
        "a MESSAGE whose length is `81 00`",
        lambda t: t.seal(msg(A) + rec(1, b"\x90", length=b"\x81\x00")),
        (),
        broken(ProtocolError),
    ),
    (
        "record_past_end",
        "a MESSAGE claiming more than remains",
        lambda t: t.seal(msg(A) + rec(1, b"\x90", length=b"\x7f")),
        (),
        broken(ProtocolError),
    ),
    (
        "rekey_with_body",
        "REKEY with a body",
        lambda t: t.seal(rec(RecordKind.REKEY, b"x")),
        (),
        broken(ProtocolError),
    ),
    (
        "ping_1025",
        "PING with 1025 bytes",
        lambda t: t.seal(rec(RecordKind.PING, b"p" * 1025)),
        (),
        broken(ProtocolError),
    ),
    ("ready_again", "a second READY", lambda t: t.seal(READY), (), broken(ProtocolError)),
    (
        "spack_c1",
        "a spack and a MESSAGE `c1`",
        lambda t: t.seal(msg(A) + raw_msg(b"\xc1")),
        (),
        broken(MalformedSpack),
    ),
    (
        "spack_trailing",
        "a MESSAGE `90 00`",
        lambda t: t.seal(raw_msg(b"\x90\x00")),
        (),
        broken(MalformedSpack),
    ),
    (
        "spack_depth_33",
        "a MESSAGE nesting 33 lists",
        lambda t: t.seal(raw_msg(b"\x91" * 33 + b"\x90")),
        (),
        broken(MalformedSpack),
    ),
    (
        "spack_claims_2_32",
        "a MESSAGE `dd ff ff ff ff`",
        lambda t: t.seal(raw_msg(b"\xdd\xff\xff\xff\xff")),
        (),
        broken(MalformedSpack),
    ),
    (
        "fragment_cut_by_close",
        "a FRAGMENT, then CLOSE",
        lambda t: t.seal(rec(2, b"\x92")) + t.seal(close()),
        (),
        broken(ProtocolError),
    ),
    (
        "fragment_cut_by_eof",
        "a FRAGMENT, then EOF",
        lambda t: t.seal(rec(2, b"\x92")),
        (),
        Expect(ConnectionLost, True),
    ),
    (
        "eof_mid_frame",
        "half a frame, then EOF",
        lambda t: t.spacks(A)[:9],
        (),
        Expect(ConnectionLost, True),
    ),
    (
        "eof_without_close",
        "nothing: EOF without CLOSE",
        lambda _t: b"",
        (),
        Expect(ConnectionLost, True),
    ),
    (
        "close_error_code",
        "CLOSE(PROTOCOL_ERROR)",
        lambda t: t.seal(close(CloseCode.PROTOCOL_ERROR, b"bye")),
        (),
        Expect(ClosedByPeer, True),
    ),
    ("close_normal", "CLOSE(NORMAL) (valid)", lambda t: t.seal(close()), (), CLEAN),
    (
        "spack_after_close",
        "CLOSE, then a spack (must not be delivered)",
        lambda t: t.seal(close()) + t.spacks(Spack("after close")),
        (),
        CLEAN,
    ),
    ("rekey_valid", "A with REKEY, B under the new key, CLOSE (valid)", _rekey, (A, B), CLEAN),
    (
        "ping_and_unsolicited_pong",
        "PING, an unsolicited PONG, CLOSE (valid)",
        lambda t: t.seal(rec(4, b"hi") + rec(5, b"??")) + t.seal(close()),
        (),
        CLEAN,
    ),
]


def _bad_keys(category: str, name: str, what: str, **knob: Any) -> list[Case]:
    """XX msg2 ``e`` and ``s``, IK msg2 ``e`` sent as ``knob`` says; stalk's client must
    fail with :class:`~stalk.InvalidPeerKey` before sending message 3 or READY."""
    e_knob = {key.replace("_s", "_e"): value for key, value in knob.items()}
    s_knob = {key.replace("_e", "_s"): value for key, value in knob.items()}
    return [
        row(
            f"xx_msg2_e_{name}",
            category,
            f"a server whose XX message 2 `e` is {what}",
            BAD_KEY,
            server(handshake_then, build=lambda _t: b"", resp=Responder(**e_knob)),
        ),
        row(
            f"xx_msg2_s_{name}",
            category,
            f"a server whose XX message 2 `s` (encrypted) is {what}",
            BAD_KEY,
            server(handshake_then, build=lambda _t: b"", resp=Responder(**s_knob)),
        ),
        row(
            f"ik_msg2_e_{name}",
            category,
            f"a server whose IK message 2 `e` is {what}",
            BAD_KEY,
            server(handshake_then, ik=True, build=lambda _t: b"", resp=Responder(**e_knob)),
        ),
    ]


def _low_order(name: str, point: bytes) -> list[Case]:
    return _bad_keys("low-order", name, f"low-order point `{name}`", low_e=point)


async def stall_after_msg2(wire: Wire, side: ServerSide) -> None:
    """XX: send message 2, read message 3, then never send READY."""
    resp = Responder(identity=side.identity)
    await server_handshake(wire, resp, ready=False)
    await side.finish(wire)


async def drip_msg2(wire: Wire, side: ServerSide) -> None:
    """Send the verdict and message 2 one byte every 0.1 s (longer than the deadline)."""
    opening = await server_opening(wire)
    assert opening is not None
    resp = Responder(identity=side.identity)
    resp.start(opening[:8])
    assert resp.noise is not None
    resp.noise.read_message(opening[10:])
    reply = _msg2(resp)
    async with anyio.create_task_group() as tg:
        tg.start_soon(wire.trickle, reply, 1, 0.1)
        await side.finish(wire)
        tg.cancel_scope.cancel()


def _shaped(splitter: Callable[[bytes], list[bytes]]) -> Callable[..., Awaitable[None]]:
    async def behave(wire: Wire, side: ServerSide, **kwargs: object) -> None:
        wire.splitter, wire.pause = splitter, 0.0
        await handshake_then(wire, side, **kwargs)  # type: ignore[arg-type]

    return behave


CASES: list[Case] = [
    *[
        row(
            case_id,
            "server-handshake",
            f"a server answering the opening with {sends}",
            Expect(error, False),
            server(answer, reply=reply),
        )
        for case_id, sends, reply, error in REPLIES
    ],
    row(
        "refusal_decrypt_failed_ik",
        "server-handshake",
        "a server answering an IK client with DECRYPT_FAILED",
        Expect(PeerIdentityMismatch, False),
        server(answer, ik=True, reply=b"\x02\x00"),
    ),
    row(
        "ssh_server_banner",
        "server-handshake",
        "an SSH server: its banner, then it waits for ours (short deadline)",
        Expect(HandshakeTimeout, False, deadline=DEADLINE),
        server(answer, config=QUICK, reply=b"SSH-2.0-OpenSSH_9.6\r\n", stall=True),
    ),
    row(
        "stall_before_verdict",
        "server-handshake",
        "a server that reads the opening and answers nothing (short deadline)",
        Expect(HandshakeTimeout, False, deadline=DEADLINE),
        server(answer, config=QUICK, reply=b"", stall=True),
    ),
    row(
        "stall_before_ready",
        "server-handshake",
        "an XX server that reads message 3 and never sends READY (short deadline)",
        Expect(HandshakeTimeout, False, deadline=DEADLINE),
        server(stall_after_msg2, config=QUICK),
    ),
    row(
        "drip_feeds_msg2",
        "server-handshake",
        "a server sending its answer one byte every 0.1 s (the deadline is absolute)",
        Expect(HandshakeTimeout, False, deadline=DEADLINE),
        server(drip_msg2, config=QUICK),
    ),
    *[
        row(
            f"msg2_{cut_id}",
            "server-handshake",
            f"a server whose message 2 is {words}",
            NO_CONNECTION,
            server(opening_then, resp=Responder(), reply=_cut_msg2(cut)),
        )
        for cut_id, words, cut in [
            ("e_only", "cut after its ephemeral key", 32),
            ("cut_in_static", "cut inside the encrypted static key", 52),
            ("no_payload", "missing its payload", 80),
            ("one_byte_short", "one byte short", 80 + len(params()) + 15),
        ]
    ],
    row(
        "rst_after_msg2_xx",
        "server-handshake",
        "an XX server resetting the connection right after message 2 (whether the client's "
        "message 3 write or its wait for READY sees the reset, it is a failed handshake)",
        Expect(HandshakeFailed, False),
        server(opening_then, resp=Responder(), reply=_msg2, reset=True),
    ),
    row(
        "rst_after_msg2_ik",
        "server-handshake",
        "an IK server resetting the connection right after message 2 (the client may or "
        "may not have opened by then)",
        Expect((HandshakeFailed, ConnectionLost), None),
        server(opening_then, ik=True, resp=Responder(), reply=_msg2, reset=True),
    ),
    row(
        "msg2_twice",
        "server-handshake",
        "an XX server sending message 2 twice",
        NO_CONNECTION,
        server(opening_then, resp=Responder(), reply=_twice),
    ),
    row(
        "msg2_prologue_mismatch",
        "server-handshake",
        "an XX server whose Noise prologue says `IK` (a rewritten preamble)",
        NO_CONNECTION,
        server(opening_then, resp=Responder(prologue=b"STALK\x01IK"), reply=_msg2),
    ),
    *[
        row(
            f"xx_msg2_params_{case_id}",
            "server-handshake",
            f"an XX server whose parameters are {sends}",
            NO_CONNECTION,
            server(opening_then, resp=Responder(msg2_payload=payload), reply=_msg2),
        )
        for case_id, sends, payload in BAD_MSG2
    ],
    *[
        row(
            f"ik_msg2_params_{case_id}",
            "server-handshake",
            f"an IK server whose parameters are {sends}",
            NO_CONNECTION,
            server(opening_then, ik=True, resp=Responder(msg2_payload=payload), reply=_msg2),
        )
        for case_id, sends, payload in BAD_MSG2[:5]
    ],
    row(
        "msg2_params_mms_1024_valid",
        "server-handshake",
        "a server advertising max_message_size 1024, then spacks and CLOSE (valid)",
        CLEAN,
        server(
            handshake_then,
            resp=Responder(msg2_payload=params(max_message_size=1024)),
            build=lambda t: t.seal(close()),
        ),
    ),
    row(
        "xx_spack_before_ready",
        "server-handshake",
        "an XX server whose first transport message is a spack, not READY",
        NO_CONNECTION,
        server(handshake_then, ready=False, legit=(), build=lambda t: t.spacks(A)),
    ),
    row(
        "xx_close_not_authorized",
        "server-handshake",
        "an XX server refusing with CLOSE(NOT_AUTHORIZED) instead of READY",
        Expect(PeerRefused, False),
        server(
            handshake_then, ready=False, legit=(), build=lambda t: t.seal(close(3, b"who are you"))
        ),
    ),
    row(
        "xx_ready_twice",
        "server-handshake",
        "an XX server sending READY twice in its first message",
        NO_CONNECTION,
        server(handshake_then, ready=False, legit=(), build=lambda t: t.seal(READY + READY)),
    ),
    row(
        "xx_half_ready_then_eof",
        "server-handshake",
        "an XX server sending the first 5 bytes of its READY frame, then EOF",
        NO_CONNECTION,
        server(handshake_then, ready=False, legit=(), build=lambda t: t.seal(READY)[:5]),
    ),
    row(
        "xx_ready_with_spack_valid",
        "server-handshake",
        "an XX server sending READY and a spack in one message, then CLOSE (valid)",
        CLEAN,
        server(handshake_then, ready=False, legit=(), build=_ready_first, delivered_too=(A,)),
    ),
    row(
        "ik_server_sends_ready",
        "server-transport",
        "an IK server (the initiator sends READY in IK) sending READY",
        broken(ProtocolError),
        server(handshake_then, ik=True, build=lambda t: t.seal(READY)),
    ),
    *[
        row(
            case_id,
            "server-transport",
            f"after a real XX handshake and two spacks, a server sending {sends}",
            expect,
            server(handshake_then, build=build, delivered_too=also),
        )
        for case_id, sends, build, also, expect in TRANSPORT
    ],
    row(
        "ik_flip_tag_bit",
        "server-transport",
        "after a real IK handshake, a spack with a flipped tag bit",
        broken(DecryptionFailed),
        server(handshake_then, ik=True, build=_flip(1)),
    ),
    row(
        "rst_after_spacks",
        "server-transport",
        "two spacks, then RST",
        Expect(ConnectionLost, True),
        server(handshake_then, build=lambda _t: b"", reset=True),
    ),
    row(
        "message_over_client_limit",
        "server-transport",
        "a 2000-byte MESSAGE to a client whose limit is 1024",
        broken(MessageLimitExceeded, CloseCode.MESSAGE_TOO_LARGE),
        server(
            handshake_then,
            config=SMALL,
            build=lambda t: t.seal(raw_msg(Spack(b"x" * 1990).encode())),
        ),
    ),
    row(
        "fragments_over_client_limit",
        "server-transport",
        "FRAGMENTs of 1000 and 100 bytes (no final MESSAGE) to a client whose limit is 1024",
        broken(MessageLimitExceeded, CloseCode.MESSAGE_TOO_LARGE),
        server(
            handshake_then,
            config=SMALL,
            eof=False,
            build=lambda t: t.seal(rec(2, b"\x91\xc5" + b"x" * 998)) + t.seal(rec(2, b"x" * 100)),
        ),
    ),
    row(
        "one_byte_at_a_time_valid",
        "server-transport",
        "a whole valid server session written one byte per write",
        CLEAN,
        server(_shaped(chunks(1)), build=lambda t: t.seal(close())),
    ),
    row(
        "length_prefix_split_valid",
        "server-transport",
        "a valid server session, every frame cut between its two length bytes",
        CLEAN,
        server(_shaped(split_headers), build=lambda t: t.seal(close())),
    ),
    *[case for name, point in LOW_ORDER_POINTS.items() for case in _low_order(name, point)],
    *_bad_keys(
        "non-canonical",
        "bit255_twin",
        "the bit-255 twin of the server's real key (the same DH key, non-canonical)",
        twin_e=True,
    ),
    *[
        case
        for name, point in NON_CANONICAL_POINTS.items()
        for case in _bad_keys(
            "non-canonical", name, f"non-canonical `{name}` ({point.hex()[-8:]})", low_e=point
        )
    ],
]
