"""stalk against an independent peer (tests/interop_peer.py: dissononce, written from SPEC.md).

Both directions: stalk's listener against the dissononce initiator, and ``stalk.connect``
against the dissononce responder, for XX and IK.
"""

from __future__ import annotations

from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream

import interop_peer as ip
from helpers import serving
from stalk import (
    ClosedByPeer,
    Config,
    Connection,
    ConnectionLost,
    Float32,
    Identity,
    MessageLimitExceeded,
    PeerIdentityMismatch,
    PeerRefused,
    ProtocolError,
    PublicIdentity,
    Spack,
    connect,
)

pytestmark = pytest.mark.anyio

#: Every test is bounded by this many seconds.
LIMIT = 5
#: SPEC section 8's example: stalk's parameters map with the default 16 MiB limit.
SPEC_PARAMS = bytes.fromhex("82a776657273696f6e01b06d61785f6d6573736167655f73697a65ce01000000")

SAMPLES = [
    Spack(),
    Spack(None, True, False),
    Spack(0, -1, 127, -33, 2**64 - 1, -(2**63)),
    Spack(1.5, Float32(0.25), float("-inf")),
    Spack("", "héllo ✓", b"", b"\x00\xff" * 100),
    Spack([1, [2, [3]]], {"k": "v", b"raw": [None]}, (1, "two", (3.0,))),
    Spack(array("d", [1.0, -2.5]), array("b", [-1, 2]), array("Q", [2**64 - 1])),
]
BATCH = [Spack(i, f"small {i}") for i in range(20)]
LARGE = Spack("large", bytes(range(256)) * 1200)  # about 300 KB


def same(a: Spack, b: Spack) -> bool:
    """Equal values and identical encodings (Python equality ignores 1 vs 1.0 vs True)."""
    return a == b and a.encode() == b.encode()


# -- stalk's listener against the dissononce initiator --------------------------------------


@dataclass
class Served:
    """What stalk's listener handler saw of its one connection."""

    done: anyio.Event = field(default_factory=anyio.Event)
    handshake_hash: bytes = b""
    peer: PublicIdentity | None = None
    pattern: str = ""
    received: list[Spack] = field(default_factory=list)
    ended_normally: bool = False
    error: Exception | None = None


@asynccontextmanager
async def stalk_server(
    *, authorize: Callable[[PublicIdentity], bool] | None = None, config: Config | None = None
) -> AsyncIterator[tuple[int, Identity, Served]]:
    """A stalk listener whose handler echoes every spack and records what it saw."""
    served = Served()

    async def handler(conn: Connection) -> None:
        served.handshake_hash = conn.handshake_hash
        served.peer = conn.peer
        served.pattern = conn.pattern
        try:
            async for spack in conn:
                served.received.append(spack)
                await conn.send(spack)
        except Exception as exc:
            served.error = exc
        else:
            served.ended_normally = True
        finally:
            served.done.set()

    async with serving(handler, authorize=authorize, config=config) as (_, port, identity):
        yield port, identity, served


@asynccontextmanager
async def dial(port: int) -> AsyncIterator[SocketStream]:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        yield stream


async def initiate(
    stream: SocketStream, key: ip.StaticKey, server: Identity, pattern: str, **kwargs: Any
) -> ip.PeerSession:
    return await ip.initiate(stream, key, server.public.raw if pattern == "IK" else None, **kwargs)


async def close_cleanly(session: ip.PeerSession, served: Served) -> None:
    """Our CLOSE ends stalk's handler loop normally; stalk answers CLOSE 0, then EOF."""
    await session.close()
    assert await session.expect_close() == (ip.NORMAL, "")
    await served.done.wait()
    assert served.error is None
    assert served.ended_normally


@pytest.mark.parametrize("pattern", ["XX", "IK"])
async def test_initiator_handshake_and_echo(pattern: str) -> None:
    key = ip.StaticKey.generate()
    with anyio.fail_after(LIMIT):
        async with stalk_server() as (port, server, served), dial(port) as stream:
            session = await initiate(stream, key, server, pattern)
            hs = session.handshake
            assert hs.remote_static == server.public.raw
            assert hs.peer_params == {"version": 1, "max_message_size": 16 * 1024 * 1024}
            assert hs.payloads == [SPEC_PARAMS]  # stalk's msg2 payload, as SPEC section 8
            for spack in SAMPLES:
                await session.send(spack)
                assert same(await session.receive(), spack)
            assert served.handshake_hash == hs.handshake_hash
            assert len(hs.handshake_hash) == 32
            assert served.peer == PublicIdentity(key.public)
            assert served.pattern == pattern

            await session.send(*BATCH)  # one transport message, 20 MESSAGE records
            for spack in BATCH:
                assert same(await session.receive(), spack)
            assert served.received == [*SAMPLES, *BATCH]
            await close_cleanly(session, served)


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize(
    ("piece", "per_message"),
    [(1000, 16), (ip.MAX_PLAINTEXT - 5, 1)],
    ids=["1000-byte-pieces", "full-65519-byte-plaintexts"],
)
async def test_initiator_large_fragmented_spack(pattern: str, piece: int, per_message: int) -> None:
    key = ip.StaticKey.generate()
    encoded = LARGE.encode()
    with anyio.fail_after(LIMIT):
        async with stalk_server() as (port, server, served), dial(port) as stream:
            session = await initiate(stream, key, server, pattern)
            await session.send_fragmented(
                encoded, piece=piece, per_message=per_message, ping=b"between fragments"
            )
            assert await session.receive_encoded() == encoded
            assert session.pongs == [b"between fragments"]
            assert served.received == [LARGE]
            await close_cleanly(session, served)


@pytest.mark.parametrize("pattern", ["XX", "IK"])
async def test_stalk_fragmentation_matches_spec_example(pattern: str) -> None:
    """SPEC section 12: 100000 encoded bytes -> FRAGMENT(65511), then MESSAGE(34489)."""
    spack = Spack(b"\x5a" * 99_994)
    assert len(spack.encode()) == 100_000
    key = ip.StaticKey.generate()
    with anyio.fail_after(LIMIT):
        async with stalk_server() as (port, server, served), dial(port) as stream:
            session = await initiate(stream, key, server, pattern)
            await session.send_fragmented(spack.encode(), piece=4096, per_message=8)
            before = len(session.received)
            assert same(await session.receive(), spack)
            assert session.received[before:] == [[(ip.FRAGMENT, 65_511)], [(ip.MESSAGE, 34_489)]]
            assert session.plaintext_sizes[before:] == [65_516, 34_494]
            await close_cleanly(session, served)


async def test_initiator_ik_ready_carries_spacks_and_unknown_keys_are_ignored() -> None:
    """SPEC sections 8 and 9: extra payload keys are ignored; READY may share its message."""
    key = ip.StaticKey.generate()
    with anyio.fail_after(LIMIT):
        async with stalk_server() as (port, server, served), dial(port) as stream:
            session = await initiate(
                stream,
                key,
                server,
                "IK",
                extra_params={"x-interop": "dissononce", "x-list": [1, 2]},
                with_ready=[ip.record(ip.MESSAGE, s.encode()) for s in BATCH[:3]],
            )
            for spack in BATCH[:3]:
                assert same(await session.receive(), spack)
            assert served.handshake_hash == session.handshake.handshake_hash
            await close_cleanly(session, served)


@pytest.mark.parametrize("pattern", ["XX", "IK"])
async def test_initiator_close_with_application_code(pattern: str) -> None:
    key = ip.StaticKey.generate()
    with anyio.fail_after(LIMIT):
        async with stalk_server() as (port, server, served), dial(port) as stream:
            session = await initiate(stream, key, server, pattern)
            await session.close(0x1234, "bye ✓")
            await served.done.wait()
            assert isinstance(served.error, ClosedByPeer)
            assert (served.error.code, served.error.reason) == (0x1234, "bye ✓")
            code, _ = await session.expect_close()
            assert code == ip.NORMAL  # the listener closes normally after its handler


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("inside_spack", [False, True], ids=["between-spacks", "inside-spack"])
async def test_initiator_eof_without_close_is_truncation(pattern: str, inside_spack: bool) -> None:
    """SPEC section 13: EOF without CLOSE (also inside a fragmented spack) is ConnectionLost."""
    key = ip.StaticKey.generate()
    with anyio.fail_after(LIMIT):
        async with stalk_server() as (port, server, served):
            async with dial(port) as stream:
                session = await initiate(stream, key, server, pattern)
                await session.send(SAMPLES[1])
                assert same(await session.receive(), SAMPLES[1])
                if inside_spack:
                    await session.send_records([ip.record(ip.FRAGMENT, LARGE.encode()[:1000])])
                await stream.send_eof()
                await served.done.wait()
            assert isinstance(served.error, ConnectionLost)
            assert not isinstance(served.error, ClosedByPeer)
            assert not served.ended_normally


async def test_initiator_ik_refused_by_authorization() -> None:
    """SPEC section 5: IK refusal verdict NOT_AUTHORIZED (3), then the connection ends."""
    key = ip.StaticKey.generate()
    with anyio.fail_after(LIMIT):
        async with stalk_server(authorize=lambda _: False) as (port, server, served):
            async with dial(port) as stream:
                with pytest.raises(ip.Refused) as info:
                    await initiate(stream, key, server, "IK")
            assert info.value.code == ip.NOT_AUTHORIZED
            assert not served.done.is_set()


async def test_initiator_xx_refused_by_authorization() -> None:
    """SPEC section 9: XX responder sends an encrypted CLOSE(3) instead of READY."""
    key = ip.StaticKey.generate()
    with anyio.fail_after(LIMIT):
        async with stalk_server(authorize=lambda _: False) as (port, server, served):
            async with dial(port) as stream:
                with pytest.raises(ip.PeerClosed) as info:
                    await initiate(stream, key, server, "XX")
            assert info.value.code == ip.NOT_AUTHORIZED
            assert info.value.reason
            assert not served.done.is_set()


async def read_until_eof(stream: SocketStream) -> bytes:
    data = b""
    while True:
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            return data


@pytest.mark.parametrize(
    ("opening", "code"),
    [
        (b"G", ip.UNSUPPORTED),  # rejected at the first byte that differs from the magic
        (b"STALK\x02XX", ip.UNSUPPORTED),
        (b"STALK\x01NN", ip.UNSUPPORTED),
        (b"STALK\x01XX" + ip.frame(ip.StaticKey.generate().public + b"\x90"), ip.PROTOCOL_ERROR),
        (b"STALK\x01XX\x00\x00", ip.PROTOCOL_ERROR),
    ],
    ids=["bad-magic", "version-2", "pattern-NN", "msg1-payload-not-a-map", "empty-frame"],
)
async def test_listener_refusal_verdicts(opening: bytes, code: int) -> None:
    """SPEC sections 4 and 5: a refusal is ``code || length || reason``, then EOF."""
    with anyio.fail_after(LIMIT):
        async with stalk_server() as (port, _, served), dial(port) as stream:
            await stream.send(opening)
            data = await read_until_eof(stream)
            assert data[0] == code
            assert data[1] == len(data) - 2
            assert data[2:].decode("utf-8")
            assert not served.done.is_set()


async def test_listener_refuses_ik_for_another_key() -> None:
    """SPEC section 5: IK msg1 not encrypted to the listener's key -> DECRYPT_FAILED."""
    with anyio.fail_after(LIMIT):
        async with stalk_server() as (port, _, served), dial(port) as stream:
            with pytest.raises(ip.Refused) as info:
                await ip.initiate(stream, ip.StaticKey.generate(), ip.StaticKey.generate().public)
            assert info.value.code == ip.DECRYPT_FAILED
            assert not served.done.is_set()


GOOD = ip.record(ip.MESSAGE, Spack(1).encode())


@pytest.mark.parametrize(
    "plaintext",
    [
        b"",
        GOOD + bytes([0x08, 0, 0]),
        GOOD + bytes([ip.MESSAGE, 1, 1, 0x90]),
        GOOD + bytes([ip.MESSAGE, 0, 0x81, 0x00]) + b"\x90",
        GOOD + bytes([ip.MESSAGE, 0, 9, 0x90]),
        ip.close_record(ip.NORMAL) + GOOD,
        GOOD + ip.record(ip.READY),
        GOOD + ip.record(ip.FRAGMENT) + GOOD,
        GOOD + ip.record(ip.PING, bytes(1025)),
        GOOD + ip.record(ip.CLOSE, b"\x00\x00\xff"),
        GOOD + ip.record(ip.FRAGMENT, b"\x92") + ip.close_record(ip.NORMAL),
    ],
    ids=[
        "no-records",
        "unknown-kind",
        "channel-1",
        "non-minimal-varint",
        "length-beyond-plaintext",
        "record-after-close",
        "ready-after-confirmation",
        "empty-fragment",
        "ping-1025-bytes",
        "close-reason-not-utf8",
        "close-inside-fragmented-spack",
    ],
)
async def test_listener_rejects_invalid_transport_message(plaintext: bytes) -> None:
    """SPEC sections 11 and 18: CLOSE(PROTOCOL_ERROR), and nothing of the message delivered."""
    key = ip.StaticKey.generate()
    with anyio.fail_after(LIMIT):
        async with stalk_server() as (port, server, served), dial(port) as stream:
            session = await initiate(stream, key, server, "XX")
            await session.send_plaintext(plaintext)
            code, _ = await session.expect_close()
            assert code == ip.PROTOCOL_ERROR
            await served.done.wait()
            assert served.received == []
            assert isinstance(served.error, ProtocolError)


async def test_listener_enforces_its_message_limit() -> None:
    """SPEC section 12: a spack of exactly the limit passes; one byte more is MESSAGE_TOO_LARGE."""
    key = ip.StaticKey.generate()
    at_limit = Spack(bytes(2044))
    assert len(at_limit.encode()) == 2048
    config = Config(max_message_size=2048)
    with anyio.fail_after(LIMIT):
        async with stalk_server(config=config) as (port, server, served), dial(port) as stream:
            session = await initiate(stream, key, server, "XX")
            assert session.handshake.peer_params["max_message_size"] == 2048
            await session.send_fragmented(at_limit.encode(), piece=700)
            assert same(await session.receive(), at_limit)
            await session.send_fragmented(Spack(bytes(2045)).encode(), piece=700)
            code, _ = await session.expect_close()
            assert code == ip.MESSAGE_TOO_LARGE
            await served.done.wait()
            assert isinstance(served.error, MessageLimitExceeded)


# -- stalk.connect against the dissononce responder -----------------------------------------


@dataclass
class Responded:
    """What the dissononce responder saw of its one connection."""

    handshaken: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    session: ip.PeerSession | None = None
    close: tuple[int, str] | None = None
    error: Exception | None = None


Behavior = Callable[[ip.PeerSession, Responded], Awaitable[None]]


async def echo_until_close(session: ip.PeerSession, run: Responded) -> None:
    """Echo every spack (large ones in our own 1000-byte pieces) until CLOSE, then EOF."""
    while True:
        try:
            encoded = await session.receive_encoded()
        except ip.PeerClosed as closed:
            await session.expect_eof()
            run.close = (closed.code, closed.reason)
            return
        if len(encoded) > 4000:
            await session.send_fragmented(encoded)
        else:
            await session.send_records([ip.record(ip.MESSAGE, encoded)])


@asynccontextmanager
async def dissononce_server(
    behavior: Behavior = echo_until_close, *, authorize: Callable[[bytes], bool] | None = None
) -> AsyncIterator[tuple[int, ip.StaticKey, Responded]]:
    """A TCP server whose one connection is answered by the dissononce responder."""
    key = ip.StaticKey.generate()
    run = Responded()

    async def handle(stream: SocketStream) -> None:
        async with stream:
            try:
                run.session = await ip.respond(stream, key, authorize=authorize)
                run.handshaken.set()
                await behavior(run.session, run)
            except Exception as exc:
                run.error = exc
            finally:
                run.done.set()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield listener.extra(SocketAttribute.local_port), key, run
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("pattern", ["XX", "IK"])
async def test_responder_handshake_and_echo(pattern: str) -> None:
    client = Identity.generate()
    with anyio.fail_after(LIMIT):
        async with dissononce_server() as (port, key, run):
            pin = PublicIdentity(key.public) if pattern == "IK" else None
            async with await connect("127.0.0.1", port, pin, identity=client) as conn:
                await run.handshaken.wait()  # IK: stalk is done first; we still wait for READY
                assert run.session is not None
                hs = run.session.handshake
                assert conn.pattern == pattern
                assert conn.peer == PublicIdentity(key.public)
                assert conn.handshake_hash == hs.handshake_hash
                assert hs.remote_static == client.public.raw
                # stalk's payloads: XX msg1 the empty map then msg3, or IK msg1 (SPEC section 8)
                assert hs.payloads == ([b"\x80", SPEC_PARAMS] if pattern == "XX" else [SPEC_PARAMS])
                assert conn.peer_max_message_size == ip.DEFAULT_MAX_MESSAGE_SIZE
                for spack in [*SAMPLES, LARGE]:
                    await conn.send(spack)
                    assert same(await conn.receive(), spack)
                for spack in BATCH:
                    conn.queue(spack)
                await conn.flush()
                for spack in BATCH:
                    assert same(await conn.receive(), spack)
                assert len(run.session.received[-1]) == len(BATCH)  # one transport message
                await conn.aclose()
                await run.done.wait()
                assert run.error is None
            assert run.close == (ip.NORMAL, "")


async def half_close_reply(session: ip.PeerSession, run: Responded) -> None:
    """Wait for the peer's CLOSE, then keep sending on our direction, then CLOSE it."""
    with pytest.raises(ip.PeerClosed) as info:
        await session.receive_encoded()
    run.close = (info.value.code, info.value.reason)
    await session.send(*BATCH[:2])
    await session.send_fragmented(LARGE.encode())
    await session.close()
    await session.expect_eof()


@pytest.mark.parametrize("pattern", ["XX", "IK"])
async def test_responder_after_stalk_send_eof(pattern: str) -> None:
    """SPEC section 13: CLOSE ends one direction; the other stays open until its CLOSE."""
    with anyio.fail_after(LIMIT):
        async with dissononce_server(half_close_reply) as (port, key, run):
            pin = PublicIdentity(key.public) if pattern == "IK" else None
            async with await connect("127.0.0.1", port, pin) as conn:
                await conn.send_eof()
                for spack in [*BATCH[:2], LARGE]:
                    assert same(await conn.receive(), spack)
                with pytest.raises(anyio.EndOfStream):
                    await conn.receive()
            await run.done.wait()
            assert run.error is None
            assert run.close == (ip.NORMAL, "")


async def test_responder_wrong_pinned_key() -> None:
    """SPEC section 5: IK msg1 for another key -> DECRYPT_FAILED -> PeerIdentityMismatch."""
    wrong = PublicIdentity(ip.StaticKey.generate().public)
    with anyio.fail_after(LIMIT):
        async with dissononce_server() as (port, _, run):
            with pytest.raises(PeerIdentityMismatch):
                await connect("127.0.0.1", port, wrong)
            await run.done.wait()
            assert isinstance(run.error, ip.Refused)
            assert run.error.code == ip.DECRYPT_FAILED


@pytest.mark.parametrize("pattern", ["XX", "IK"])
async def test_responder_refuses_stalk(pattern: str) -> None:
    """Refusal verdict (IK) or CLOSE instead of READY (XX) -> PeerRefused with code 3."""
    with anyio.fail_after(LIMIT):
        async with dissononce_server(authorize=lambda _: False) as (port, key, run):
            pin = PublicIdentity(key.public) if pattern == "IK" else None
            with pytest.raises(PeerRefused) as info:
                await connect("127.0.0.1", port, pin)
            assert info.value.code == ip.NOT_AUTHORIZED
            await run.done.wait()
            assert isinstance(run.error, ip.Refused)
