"""Handshake: preambles, payloads, keys, order, replay, tampering and stalls.

Hostile clients (and a man in the middle between a real client and the listener). None of
these may ever reach the handler, except where the handshake is genuinely valid (the
positive boundary rows) or where the attack comes right after a valid handshake.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio

from stalk.config import Config
from stalk.connection import connect
from stalk.errors import (
    ConnectionLost,
    DecryptionFailed,
    HandshakeFailed,
    HandshakeTimeout,
    InvalidPeerKey,
    PeerIdentityMismatch,
    PeerRefused,
    ProtocolError,
    StalkError,
)
from stalk.framing import encode_frame
from stalk.identity import Identity, PublicIdentity
from stalk.spack import Spack
from stalk.wire import MAX_HANDSHAKE_PAYLOAD, MAX_MESSAGE_SIZE_LIMIT, CloseCode, RecordKind

from .attacks import (
    CLEAN,
    HS_FAILED,
    LEGIT,
    MALFORMED,
    UNDECRYPTABLE,
    UNSUPPORTED,
    A,
    after_handshake,
    before_ready,
    broken,
    handshake_with,
    play,
    row,
    send_raw,
)
from .harness import SLOW_HANDSHAKE, TEARDOWN, Attack, Case, Expect, Target, finish
from .peers import (
    LOW_ORDER_POINTS,
    NON_CANONICAL_POINTS,
    READY,
    REKEY,
    Initiator,
    Patch,
    Transport,
    client_handshake,
    close,
    msg,
    padded_params,
    params,
    proxy,
    read_verdict,
    rec,
)

CATEGORY = "handshake"
DEADLINE = SLOW_HANDSHAKE + 0.6


# -- plays --------------------------------------------------------------------------------


async def doctored_session(target: Target, init: Initiator) -> Attack:
    """A handshake with unusual but valid choices, then two spacks and CLOSE."""
    wire = await target.wire()
    transport = await client_handshake(wire, init)
    for spack in LEGIT:
        await wire.send(transport.spacks(spack))
    await wire.send(transport.seal(close()))
    return await finish(wire, transport, legit=list(LEGIT))


async def doctored(target: Target, *, pattern: str, payload: bytes) -> Attack:
    """A session whose IK message 1 or XX message 3 carries ``payload`` as parameters."""
    if pattern == "ik":
        init = Initiator(server=target.server, msg1_payload=payload)
    else:
        init = Initiator(msg3_payload=payload)
    return await doctored_session(target, init)


def _own_key_initiator() -> Initiator:
    me = Identity.generate()
    return Initiator(server=me.public, identity=me)


async def opening_twice(target: Target, *, ik: bool) -> Attack:
    """Message 1 sent twice in a row: the second copy lands where msg3/READY is due."""
    init = Initiator(server=target.server if ik else None)
    opening = init.opening()
    wire = await target.wire()
    await wire.send(opening + opening[8:])
    return await finish(wire)


async def xx_msg3_twice(target: Target) -> Attack:
    """A valid XX handshake, two spacks, then message 3 again."""
    wire = await target.wire()
    init = Initiator()
    transport = await client_handshake(wire, init)
    for spack in LEGIT:
        await wire.send(transport.spacks(spack))
    await wire.send(init.msg3_frame)
    return await finish(wire, transport, legit=list(LEGIT))


async def xx_pipelined_msg3(target: Target, body: bytes) -> Attack:
    """Message 1 and a made-up message 3 in one write, without waiting for message 2."""
    wire = await target.wire()
    await wire.send(Initiator().opening() + encode_frame(body))
    return await finish(wire)


async def xx_spacks_before_ready(target: Target) -> Attack:
    """Message 3, the spacks and CLOSE in one write, before READY arrived."""
    wire = await target.wire()
    init = Initiator()
    await wire.send(init.opening())
    assert await read_verdict(wire) == 0
    body = await wire.read_frame()
    assert body is not None
    init.read_msg2(body)
    msg3 = encode_frame(init.msg3())
    transport = init.transport()
    frames = [transport.spacks(s) for s in LEGIT] + [transport.seal(close())]
    await wire.send(msg3 + b"".join(frames))
    first = await wire.read_frame()
    assert first is not None
    assert [r.kind for r in transport.open(first)][:1] == [RecordKind.READY]
    return await finish(wire, transport, legit=list(LEGIT))


async def through_proxy(
    target: Target,
    *,
    ik: bool,
    c2s: dict[int, int] | None = None,
    s2c: dict[int, int] | None = None,
    pin: Identity | None = None,
) -> Attack:
    """A real ``connect()`` to the listener through a man in the middle flipping bits."""
    async with proxy(target.address, c2s=Patch(c2s), s2c=Patch(s2c)) as relay:
        client_error: BaseException | None = None
        peer = pin.public if pin else target.server if ik else None
        try:
            conn = await connect("127.0.0.1", relay.port, peer, config=Config(handshake_timeout=3))
        except StalkError as exc:
            client_error = exc
        else:
            try:
                await conn.send(Spack("through the middle"))
                await conn.receive()  # the listener echoes nothing: this waits for its end
            except (StalkError, anyio.EndOfStream) as exc:
                client_error = exc
            finally:
                await conn.aclose()
        with anyio.move_on_after(TEARDOWN):
            await relay.done.wait()
    return Attack(
        list(relay.upstream_ports), client_error=client_error, torn_down=relay.done.is_set()
    )


async def recorded(target: Target, *, ik: bool) -> bytes:
    """Everything a real client sends in a short session (recorded by a proxy)."""
    async with proxy(target.address) as relay:
        peer = target.server if ik else None
        async with await connect("127.0.0.1", relay.port, peer) as conn:
            await conn.send(Spack("secret", 1))
            await conn.send(Spack("secret", 2))
        with anyio.fail_after(TEARDOWN):
            await relay.done.wait()
    return bytes(relay.c2s_log)


def _opening(stream: bytes) -> bytes:
    return stream[: 8 + 2 + int.from_bytes(stream[8:10], "big")]


async def replay(
    target: Target,
    *,
    ik: bool,
    full: bool,
    eof: bool = True,
    connections: int = 1,
    suffix: bytes = b"",
) -> Attack:
    """Replay a real client's recorded message 1 (or whole stream) on new connections.

    :param suffix: bytes sent after the replayed ones (e.g. the start of a frame).
    """
    stream = await recorded(target, ik=ik)
    data = (stream if full else _opening(stream)) + suffix
    opened = anyio.current_time()
    wires = [await target.wire() for _ in range(connections)]
    for wire in wires:
        await wire.send(data)
    attacks = []
    for wire in wires:
        attacks.append(await finish(wire, eof=eof, since=None if eof else opened))
    first = attacks[0]
    first.ports = [a.ports[0] for a in attacks]
    first.torn_down = all(a.torn_down for a in attacks)
    return first


async def stall(target: Target, *, stage: str) -> Attack:
    """Stop at ``stage`` of an otherwise valid handshake and wait for the deadline."""
    opened = anyio.current_time()
    wire = await target.wire()
    ik = stage.startswith("ik")
    init = Initiator(server=target.server if ik else None)
    opening = init.opening()
    if stage == "after_preamble":
        await wire.send(opening[:8])
    elif stage in ("xx_after_msg1", "ik_after_msg1", "xx_half_msg3"):
        await wire.send(opening)
        assert await read_verdict(wire) == 0
        body = await wire.read_frame()
        assert body is not None
        init.read_msg2(body)
        if stage == "xx_half_msg3":
            await wire.send(encode_frame(init.msg3())[:40])
    return await finish(wire, eof=False, since=opened)


async def wrong_key_client(target: Target) -> Attack:
    """A real client pinning a key the listener does not hold (through a plain relay)."""
    return await through_proxy(target, ik=True, pin=Identity.generate())


# -- tables -------------------------------------------------------------------------------


def _preamble(version: int, pattern: bytes) -> bytes:
    return b"STALK" + bytes([version]) + pattern + b"\x00\x21" + os.urandom(33)


#: (id, what is sent, bytes): preambles naming something the listener does not speak.
PREAMBLES: list[tuple[str, str, bytes]] = [
    ("version_0", "preamble version 0, then an XX message 1", _preamble(0, b"XX")),
    ("version_2", "preamble version 2, then an XX message 1", _preamble(2, b"XX")),
    ("version_255", "preamble version 255", _preamble(255, b"XX")),
    ("pattern_NN", "pattern `NN`", _preamble(1, b"NN")),
    ("pattern_xx_lowercase", "pattern `xx`", _preamble(1, b"xx")),
    ("pattern_KK", "pattern `KK`", _preamble(1, b"KK")),
    ("pattern_XK", "pattern `XK`", _preamble(1, b"XK")),
    ("pattern_IX", "pattern `IX`", _preamble(1, b"IX")),
    ("pattern_zero_bytes", "pattern `00 00`", _preamble(1, b"\x00\x00")),
]

#: (id, what is sent, cleartext payload of XX message 1): not a msgpack map (or too big).
XX_MSG1_PAYLOADS: list[tuple[str, str, bytes]] = [
    ("xx_msg1_payload_reserved_byte", "`c1` (reserved msgpack byte)", b"\xc1"),
    ("xx_msg1_payload_empty", "an empty payload", b""),
    ("xx_msg1_payload_list", "an empty list `90`", b"\x90"),
    ("xx_msg1_payload_int", "the integer 1", b"\x01"),
    ("xx_msg1_payload_nil", "nil", b"\xc0"),
    ("xx_msg1_payload_trailing_byte", "an empty map and a trailing byte", b"\x80\x00"),
    ("xx_msg1_payload_int_key", "a map with an integer key", b"\x81\x01\x02"),
    ("xx_msg1_payload_truncated_map", "a map claiming 2 entries with none", b"\x82"),
    ("xx_msg1_payload_1025_bytes", "a 1025-byte map (limit 1024)", padded_params(1025)),
    ("xx_msg1_payload_60000_bytes", "a 60000-byte map", padded_params(60000)),
]

#: (id, what the parameters map holds): IK message 1 (encrypted) and XX message 3.
BAD_PARAMS: list[tuple[str, str, bytes]] = [
    ("not_a_map", "a list instead of a map", b"\x92\x01\x02"),
    ("invalid_msgpack", "`c1`", b"\xc1"),
    ("version_2", "version 2", params(version=2)),
    ("version_0", "version 0", params(version=0)),
    ("version_str", 'version `"1"`', params(version="1")),
    ("version_bool", "version `true`", params(version=True)),
    ("version_missing", "no version", params(version=None)),
    ("mms_1023", "max_message_size 1023 (minimum 1024)", params(max_message_size=1023)),
    ("mms_0", "max_message_size 0", params(max_message_size=0)),
    ("mms_negative", "max_message_size -1", params(max_message_size=-1)),
    (
        "mms_above_2_53",
        "max_message_size 2^53 + 1",
        params(max_message_size=MAX_MESSAGE_SIZE_LIMIT + 1),
    ),
    ("mms_2_64", "max_message_size 2^64 - 1", params(max_message_size=2**64 - 1)),
    ("mms_missing", "no max_message_size", params(max_message_size=None)),
    ("mms_str", 'max_message_size `"big"`', params(max_message_size="big")),
    ("mms_float", "max_message_size 4096.0", params(max_message_size=4096.0)),
    ("mms_bool", "max_message_size `true`", params(max_message_size=True)),
    (
        "bin_keys",
        "the right fields under bin keys",
        b"\x82\xc4\x07version\x01\xc4\x10max_message_size\xcd\x10\x00",
    ),
    (
        "payload_3073_bytes",
        "valid fields padded to 3073 bytes (limit 3072)",
        padded_params(MAX_HANDSHAKE_PAYLOAD + 1),
    ),
]

#: The subset of :data:`BAD_PARAMS` also tried in XX message 3.
XX_MSG3_PARAMS = {
    "not_a_map",
    "invalid_msgpack",
    "version_2",
    "version_missing",
    "mms_1023",
    "mms_above_2_53",
    "mms_missing",
    "mms_str",
    "payload_3073_bytes",
}

#: (id, what the parameters hold, payload): unusual but valid parameters.
GOOD_PARAMS: list[tuple[str, str, bytes]] = [
    ("mms_1024", "max_message_size 1024 (the minimum)", params(max_message_size=1024)),
    (
        "mms_2_53",
        "max_message_size 2^53 (the maximum)",
        params(max_message_size=MAX_MESSAGE_SIZE_LIMIT),
    ),
    (
        "unknown_keys_1024_bytes",
        "valid fields and an unknown key, 1024 bytes in all",
        padded_params(1024),
    ),
]

IK_MSG1_LEN = 32 + 48 + len(params()) + 16

#: (id, what is sent, cut): IK message 1 cut short (the rest never comes: EOF).
IK_TRUNCATIONS: list[tuple[str, str, int]] = [
    ("ik_msg1_e_only", "IK message 1 cut after its ephemeral key (32 bytes)", 32),
    ("ik_msg1_cut_in_static", "IK message 1 cut inside the encrypted static key", 52),
    ("ik_msg1_static_no_payload", "IK message 1 without its payload tag (80 bytes)", 80),
    ("ik_msg1_one_byte_short", "IK message 1 one byte short", IK_MSG1_LEN - 1),
]

#: (id, what is sent, cut): XX message 3 cut short.
XX_MSG3_TRUNCATIONS: list[tuple[str, str, int]] = [
    ("xx_msg3_cut_in_static", "XX message 3 cut inside the encrypted static key", 20),
    ("xx_msg3_static_one_short", "XX message 3 one byte short of its static key", 47),
    ("xx_msg3_static_no_payload", "XX message 3 without its payload tag (48 bytes)", 48),
    ("xx_msg3_one_byte_short", "XX message 3 one byte short", 48 + len(params()) + 15),
]


async def ik_cut(target: Target, cut: int) -> Attack:
    """Send a truncated IK message 1, then EOF."""
    msg1 = Initiator(server=target.server).msg1()
    assert len(msg1) == IK_MSG1_LEN
    wire = await target.wire()
    await wire.send(b"STALK\x01IK" + encode_frame(msg1[:cut]))
    return await finish(wire)


async def xx_msg3_cut(target: Target, cut: int) -> Attack:
    """A valid XX message 1, then message 3 cut to ``cut`` bytes, then EOF."""
    wire = await target.wire()
    init = Initiator()
    await wire.send(init.opening())
    assert await read_verdict(wire) == 0
    body = await wire.read_frame()
    assert body is not None
    init.read_msg2(body)
    await wire.send(encode_frame(init.msg3()[:cut]))
    return await finish(wire)


#: The listener refuses a bad key in message 1 before answering.
BAD_KEY = Expect(InvalidPeerKey, False, code=CloseCode.INVALID_KEY)
#: A bad key in XX message 3 whose DH fails: no transport keys, so nothing is sent.
BAD_KEY_NO_CLOSE = Expect(InvalidPeerKey, False)


async def xx_msg3_answer(target: Target, make: Callable[[Target], Initiator]) -> Attack:
    """XX up to message 3, then read the listener's answer (READY or CLOSE) to the end."""
    wire = await target.wire()
    init = make(target)
    await wire.send(init.opening())
    assert await read_verdict(wire) == 0
    body = await wire.read_frame()
    assert body is not None
    init.read_msg2(body)
    await wire.send(encode_frame(init.msg3()))
    return await finish(wire, init.transport())


def _bad_keys(
    category: str,
    name: str,
    what: str,
    e: Callable[[], dict[str, Any]],
    s: Callable[[], dict[str, Any]],
    *,
    msg3: Expect,
) -> list[Case]:
    """A bad ``e`` or ``s`` at every position a client sends one (``e()``/``s()`` give the
    :class:`Initiator` knobs); ``msg3`` is the outcome for XX message 3's ``s``."""
    positions: list[tuple[str, str, Expect, Callable[..., Any]]] = [
        (
            "xx_msg1_e",
            "XX message 1 `e`",
            BAD_KEY,
            play(handshake_with, make=lambda _t: Initiator(**e())),
        ),
        (
            "xx_msg3_s",
            "XX message 3 `s` (encrypted)",
            msg3,
            play(xx_msg3_answer, make=lambda _t: Initiator(**s())),
        ),
        (
            "ik_msg1_e",
            "IK message 1 `e`",
            BAD_KEY,
            play(handshake_with, make=lambda t: Initiator(server=t.server, **e())),
        ),
        (
            "ik_msg1_s",
            "IK message 1 `s` (encrypted)",
            BAD_KEY,
            play(handshake_with, make=lambda t: Initiator(server=t.server, **s())),
        ),
    ]
    return [
        row(category, "client", f"{position}_{name}", f"{what} as {where}", expect, run)
        for position, where, expect, run in positions
    ]


def _low_order(name: str, point: bytes) -> list[Case]:
    return _bad_keys(
        "low-order",
        name,
        f"low-order point `{name}` ({point.hex()[:8]}...)",
        lambda: {"low_e": point},
        lambda: {"low_s": point},
        msg3=BAD_KEY_NO_CLOSE,  # the DH after a low-order s fails: no transport keys
    )


def _non_canonical(name: str, point: bytes) -> list[Case]:
    return _bad_keys(
        "non-canonical",
        name,
        f"non-canonical `{name}` (...{point.hex()[-8:]})",
        lambda: {"low_e": point},
        lambda: {"low_s": point},
        msg3=BAD_KEY_NO_CLOSE,  # no key anyone holds: the DHs disagree, msg3 fails to read
    )


#: The bit-255 twins of the client's own real keys: the same DH keys, so the handshake
#: itself succeeds; only the key check refuses them. In XX message 3 the transport keys
#: then exist, and the listener says why in an authenticated CLOSE instead of READY.
TWIN_CASES = _bad_keys(
    "non-canonical",
    "bit255_twin",
    "the bit-255 twin of the client's real key (the same DH key, non-canonical)",
    lambda: {"twin_e": True},
    lambda: {"twin_s": True},
    msg3=BAD_KEY,
)

#: The key the isolated deny-list listener refuses; its twin must be refused too.
DENIED = Identity.generate()


def _deny(peer: PublicIdentity) -> bool:
    return peer != DENIED.public


def _deny_list_case(pattern: str, twin: bool) -> Case:
    ik = pattern == "IK"
    sends = (
        f"{pattern}: the bit-255 twin of a key the listener's `authorize` deny-lists (issue 9)"
        if twin
        else f"{pattern}: a key the listener's `authorize` deny-lists"
    )
    expect = BAD_KEY if twin else Expect(HandshakeFailed, False, code=CloseCode.NOT_AUTHORIZED)

    def make(t: Target) -> Initiator:
        return Initiator(server=t.server if ik else None, identity=DENIED, twin_s=twin)

    run = play(handshake_with, make=make) if ik else play(xx_msg3_answer, make=make)
    case_id = f"{pattern.lower()}_deny_listed_key" + ("_twin" if twin else "")
    return row(
        "non-canonical", "client", case_id, sends, expect, run, isolated=True, authorize=_deny
    )


def _ready_case(
    case_id: str,
    sends: str,
    build: Callable[[Transport], bytes],
    expect: Expect,
    delivered: tuple[Spack, ...] = (),
    **options: Any,
) -> Case:
    return row(
        CATEGORY,
        "client",
        case_id,
        f"IK, first transport message (due to carry READY): {sends}",
        expect,
        play(before_ready, build=build, delivered=delivered),
        **options,
    )


def _prologue_ik(t: Target) -> Initiator:
    return Initiator(server=t.server, prologue=b"STALK\x02IK")


def _prologue_xx(t: Target) -> Initiator:
    return Initiator(prologue=b"STALK\x02XX")


def _rekey_then(t: Transport) -> bytes:
    first = t.seal(READY + rec(RecordKind.PING, b"p") + REKEY)
    t.send.rekey()
    return first + t.seal(msg(A)) + t.seal(close())


CASES: list[Case] = [
    *[
        row(CATEGORY, "client", case_id, sends, UNSUPPORTED, play(send_raw, data=data))
        for case_id, sends, data in PREAMBLES
    ],
    *[
        row(
            CATEGORY,
            "client",
            case_id,
            f"XX message 1 whose cleartext payload is {sends}",
            MALFORMED,
            play(handshake_with, make=lambda _t, p=payload: Initiator(msg1_payload=p)),
        )
        for case_id, sends, payload in XX_MSG1_PAYLOADS
    ],
    *[
        row(
            CATEGORY,
            "client",
            f"ik_msg1_params_{case_id}",
            f"IK message 1 (validly encrypted) whose parameters are {sends}",
            MALFORMED,
            play(
                handshake_with, make=lambda t, p=payload: Initiator(server=t.server, msg1_payload=p)
            ),
        )
        for case_id, sends, payload in BAD_PARAMS
    ],
    *[
        row(
            CATEGORY,
            "client",
            f"xx_msg3_params_{case_id}",
            f"XX message 3 (validly encrypted) whose parameters are {sends}",
            HS_FAILED,
            play(handshake_with, make=lambda _t, p=payload: Initiator(msg3_payload=p)),
        )
        for case_id, sends, payload in BAD_PARAMS
        if case_id in XX_MSG3_PARAMS
    ],
    *[
        row(
            CATEGORY,
            "client",
            f"{pattern}_params_{case_id}",
            f"{pattern.upper()} handshake with {sends}, then two spacks and CLOSE",
            CLEAN,
            play(doctored, pattern=pattern, payload=payload),
        )
        for pattern in ("ik", "xx")
        for case_id, sends, payload in GOOD_PARAMS
    ],
    *[
        row(CATEGORY, "client", case_id, sends, HS_FAILED, play(ik_cut, cut=cut))
        for case_id, sends, cut in IK_TRUNCATIONS
    ],
    *[
        row(CATEGORY, "client", case_id, sends, HS_FAILED, play(xx_msg3_cut, cut=cut))
        for case_id, sends, cut in XX_MSG3_TRUNCATIONS
    ],
    row(
        CATEGORY,
        "client",
        "xx_msg1_twice",
        "XX message 1 twice in a row (the copy lands where message 3 is due)",
        HS_FAILED,
        play(opening_twice, ik=False),
    ),
    row(
        CATEGORY,
        "client",
        "ik_msg1_twice",
        "IK message 1 twice in a row (the copy lands where READY is due)",
        HS_FAILED,
        play(opening_twice, ik=True),
    ),
    row(
        CATEGORY,
        "client",
        "xx_msg3_twice",
        "a valid XX handshake, two spacks, then message 3 again",
        broken(DecryptionFailed),
        play(xx_msg3_twice),
    ),
    row(
        CATEGORY,
        "client",
        "xx_random_msg3_pipelined",
        "XX message 1 and 96 random bytes as message 3, before message 2 arrived",
        HS_FAILED,
        play(xx_pipelined_msg3, body=os.urandom(96)),
    ),
    row(
        CATEGORY,
        "client",
        "xx_transport_frame_as_msg3",
        "XX message 1, then a 19-byte frame shaped like a transport message",
        HS_FAILED,
        play(xx_pipelined_msg3, body=os.urandom(19)),
    ),
    row(
        CATEGORY,
        "client",
        "xx_spacks_before_ready",
        "XX message 3, two spacks and CLOSE in one write, not waiting for READY (valid)",
        CLEAN,
        play(xx_spacks_before_ready),
    ),
    _ready_case(
        "ik_random_frame_as_ready",
        "19 random bytes",
        lambda _t: encode_frame(os.urandom(19)),
        HS_FAILED,
    ),
    _ready_case(
        "ik_close_instead_of_ready",
        "CLOSE(NORMAL) instead of READY",
        lambda t: t.seal(close()),
        Expect(PeerRefused, False),
    ),
    _ready_case(
        "ik_message_before_ready",
        "a MESSAGE record first",
        lambda t: t.seal(msg(A) + READY),
        HS_FAILED,
    ),
    _ready_case("ik_ready_twice", "READY, READY", lambda t: t.seal(READY + READY), HS_FAILED),
    _ready_case(
        "ik_ready_with_body",
        "a READY record with a 1-byte body",
        lambda t: t.seal(rec(RecordKind.READY, b"x")),
        HS_FAILED,
    ),
    _ready_case(
        "ik_ready_on_channel_1",
        "READY on channel 1",
        lambda t: t.seal(rec(RecordKind.READY, channel=b"\x01")),
        HS_FAILED,
    ),
    _ready_case(
        "ik_ready_then_bad_spack",
        "READY and a MESSAGE that is not a spack",
        lambda t: t.seal(READY + rec(RecordKind.MESSAGE, b"\xc1")),
        HS_FAILED,
    ),
    _ready_case(
        "ik_half_ready_then_eof",
        "the first 5 bytes of the READY frame, then EOF",
        lambda t: t.seal(READY)[:5],
        HS_FAILED,
        isolated=True,
    ),
    _ready_case(
        "ik_ready_then_message",
        "READY and a spack in one Noise message, then CLOSE (valid)",
        lambda t: t.seal(READY + msg(A)) + t.seal(close()),
        CLEAN,
        delivered=(A,),
    ),
    _ready_case(
        "ik_ready_ping_rekey",
        "READY, PING and REKEY in one message, then a spack under the new key (valid)",
        _rekey_then,
        CLEAN,
        delivered=(A,),
    ),
    row(
        CATEGORY,
        "client",
        "xx_ready_from_initiator",
        "a valid XX handshake, two spacks, then a READY from the initiator",
        broken(ProtocolError),
        play(after_handshake, build=lambda t: t.seal(READY)),
    ),
    row(
        CATEGORY,
        "client",
        "ik_ready_again_later",
        "a valid IK session, two spacks, then a second READY",
        broken(ProtocolError),
        play(after_handshake, ik=True, build=lambda t: t.seal(READY)),
    ),
    row(
        CATEGORY,
        "mitm",
        "mitm_ik_downgraded_to_xx",
        "a real IK client; a man in the middle rewrites the preamble's `IK` to `XX`",
        Expect(HandshakeFailed, False, client_error=PeerRefused),
        play(through_proxy, ik=True, c2s={6: ord("I") ^ ord("X"), 7: ord("K") ^ ord("X")}),
    ),
    row(
        CATEGORY,
        "mitm",
        "mitm_xx_upgraded_to_ik",
        "a real XX client; a man in the middle rewrites `XX` to `IK`",
        Expect(HandshakeFailed, False, client_error=PeerRefused),
        play(through_proxy, ik=False, c2s={6: ord("I") ^ ord("X"), 7: ord("K") ^ ord("X")}),
    ),
    row(
        CATEGORY,
        "mitm",
        "mitm_version_1_to_2",
        "a real IK client; a man in the middle rewrites version 1 to 2",
        Expect(HandshakeFailed, False, client_error=PeerRefused),
        play(through_proxy, ik=True, c2s={5: 0x03}),
    ),
    row(
        CATEGORY,
        "mitm",
        "mitm_version_1_to_0",
        "a real XX client; a man in the middle rewrites version 1 to 0",
        Expect(HandshakeFailed, False, client_error=PeerRefused),
        play(through_proxy, ik=False, c2s={5: 0x01}),
    ),
    row(
        CATEGORY,
        "mitm",
        "mitm_flip_xx_msg1_e",
        "a real XX client; one bit of message 1's ephemeral key flipped in flight",
        Expect(HandshakeFailed, False, client_error=HandshakeFailed),
        play(through_proxy, ik=False, c2s={12: 0x04}),
    ),
    row(
        CATEGORY,
        "mitm",
        "mitm_flip_ik_msg1_static",
        "a real IK client; one bit of message 1's encrypted static key flipped",
        Expect(HandshakeFailed, False, code=None, client_error=PeerIdentityMismatch),
        play(through_proxy, ik=True, c2s={10 + 40: 0x01}),
    ),
    row(
        CATEGORY,
        "mitm",
        "mitm_flip_xx_msg2_static",
        "a real XX client; one bit of message 2's encrypted static key flipped",
        Expect(HandshakeFailed, False, client_error=HandshakeFailed),
        play(through_proxy, ik=False, s2c={3 + 40: 0x80}),
    ),
    row(
        CATEGORY,
        "mitm",
        "mitm_flip_ik_msg2_payload_tag",
        "a real IK client; the last bit of message 2 (its payload tag) flipped",
        Expect(HandshakeFailed, False, client_error=HandshakeFailed),
        play(through_proxy, ik=True, s2c={3 + 32 + len(params()) + 15: 0x01}),
    ),
    row(
        CATEGORY,
        "mitm",
        "mitm_flip_xx_msg3",
        "a real XX client; one bit of message 3 flipped",
        Expect(HandshakeFailed, False, client_error=HandshakeFailed),
        play(through_proxy, ik=False, c2s={8 + 2 + 33 + 2 + 60: 0x10}),
    ),
    row(
        CATEGORY,
        "mitm",
        "mitm_flip_ik_ready",
        "a real IK client; one bit of its READY message flipped",
        Expect(HandshakeFailed, False, client_error=ConnectionLost),
        play(through_proxy, ik=True, c2s={8 + 2 + IK_MSG1_LEN + 2 + 1: 0x01}),
    ),
    row(
        CATEGORY,
        "client",
        "ik_prologue_mismatch",
        "IK message 1 made with prologue `STALK 02 IK` behind a version-1 preamble",
        UNDECRYPTABLE,
        play(handshake_with, make=_prologue_ik),
    ),
    row(
        CATEGORY,
        "client",
        "xx_prologue_mismatch",
        "an XX initiator whose prologue says version 2 behind a version-1 preamble",
        HS_FAILED,
        play(handshake_with, make=_prologue_xx),
    ),
    row(
        CATEGORY,
        "client",
        "ik_wrong_key_raw",
        "IK message 1 encrypted to a key the listener does not hold",
        UNDECRYPTABLE,
        play(handshake_with, make=lambda _t: Initiator(server=Identity.generate().public)),
    ),
    row(
        CATEGORY,
        "mitm",
        "ik_wrong_key_real_client",
        "a real client pinning a key the listener does not hold",
        Expect(HandshakeFailed, False, client_error=PeerIdentityMismatch),
        play(wrong_key_client),
    ),
    row(
        CATEGORY,
        "client",
        "ik_pinned_own_key",
        "IK message 1 encrypted to the client's own key",
        UNDECRYPTABLE,
        play(
            handshake_with,
            make=lambda _t: _own_key_initiator(),
        ),
    ),
    row(
        "replay",
        "client",
        "replay_ik_msg1_then_eof",
        "a real client's recorded IK message 1 on a new connection, then EOF",
        HS_FAILED,
        play(replay, ik=True, full=False),
    ),
    row(
        "replay",
        "client",
        "replay_ik_msg1_then_stall",
        "a real client's recorded IK message 1, then nothing (short deadline)",
        Expect(HandshakeTimeout, False, deadline=DEADLINE),
        play(replay, ik=True, full=False, eof=False),
        slow=True,
    ),
    row(
        "replay",
        "client",
        "replay_ik_full_stream",
        "a real IK client's whole recorded stream (msg1, READY, spacks, CLOSE) replayed",
        HS_FAILED,
        play(replay, ik=True, full=True),
    ),
    row(
        "replay",
        "client",
        "replay_ik_msg1_two_connections",
        "a recorded IK message 1 replayed on two connections at once",
        HS_FAILED,
        play(replay, ik=True, full=False, connections=2),
    ),
    row(
        "replay",
        "client",
        "replay_ik_msg1_then_half_frame",
        "a real client's recorded IK message 1, then 1 byte of a frame and EOF",
        HS_FAILED,
        play(replay, ik=True, full=False, suffix=b"\x00"),
        isolated=True,
    ),
    row(
        "replay",
        "client",
        "replay_xx_msg1_then_eof",
        "a real client's recorded XX message 1 on a new connection, then EOF",
        HS_FAILED,
        play(replay, ik=False, full=False),
    ),
    row(
        "replay",
        "client",
        "replay_xx_full_stream",
        "a real XX client's whole recorded stream (msg1, msg3, spacks, CLOSE) replayed",
        HS_FAILED,
        play(replay, ik=False, full=True),
    ),
    *[
        row(
            "stall",
            "client",
            f"stall_{stage}",
            f"a valid handshake that stops {words} (short deadline)",
            Expect(HandshakeTimeout, False, deadline=DEADLINE),
            play(stall, stage=stage),
            slow=True,
        )
        for stage, words in [
            ("after_connect", "right after connecting"),
            ("after_preamble", "after the preamble"),
            ("xx_after_msg1", "after XX message 1 (message 2 received)"),
            ("xx_half_msg3", "in the middle of XX message 3"),
            ("ik_after_msg1", "after IK message 1, never sending READY"),
        ]
    ],
    *[case for name, point in LOW_ORDER_POINTS.items() for case in _low_order(name, point)],
    *TWIN_CASES,
    *[case for name, point in NON_CANONICAL_POINTS.items() for case in _non_canonical(name, point)],
    *[_deny_list_case(pattern, twin) for pattern in ("XX", "IK") for twin in (False, True)],
]
