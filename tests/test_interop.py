"""stalk against an independent peer (tests/interop_peer.py: dissononce, written from SPEC.md).

Both directions: stalk's listener against the dissononce initiator, and ``stalk.connect``
against the dissononce responder, for XX and IK; then channels (SPEC section 24), with
stalk's side a sans-IO Session driven here, in both roles; then certificates (SPEC section
25), valid and hostile, each side presenting and checking; then the transcripts of
``vectors/``, written byte for byte by the interop peer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from array import array
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import ByteStream, SocketAttribute, SocketStream, TaskGroup

import interop_peer as ip
from helpers import byte_stream_pair, serving
from stalk import (
    ClosedByPeer,
    Config,
    Connection,
    ConnectionLost,
    Float32,
    Identity,
    LocalProtocolError,
    MessageLimitExceeded,
    PeerIdentityMismatch,
    PeerRefused,
    ProtocolError,
    PublicIdentity,
    Spack,
    StalkError,
    connect,
)
from stalk.certificates import Authorities, Authority, Certificate, PublicAuthority
from stalk.errors import (
    BadCertificateSignature,
    CertificateError,
    CertificateExpired,
    CertificateKeyMismatch,
    ChannelLimitExceeded,
    FlowControlError,
    HandshakeFailed,
    UnknownAuthority,
)
from stalk.events import (
    NEED_DATA,
    PAUSED,
    ChannelCloseReceived,
    ChannelMessageReceived,
    ChannelOpened,
    ChannelResetReceived,
    CloseReceived,
    HandshakeComplete,
    MessageReceived,
    PeerIdentified,
)
from stalk.handshake import ChannelParams
from stalk.session import Role, Session, SessionConfig

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


# -- channels (SPEC section 24): the interop peer against stalk's sans-IO Session -----------
#
# stalk's side is its sans-IO Session, driven by StalkSide below over an in-memory byte
# pipe, so that each test controls exactly what stalk sends and when (Connection's
# channels, stalk.channel, are tested in test_channels_api.py); the interop peer's side is
# ip.ChannelPeer, written from SPEC.md alone.

ROLES = ["stalk-initiator", "stalk-responder"]
#: Small windows, so that credit runs out and comes back many times in every test.
WINDOWS = ChannelParams(max_channels=16, channel_window=4096, connection_window=65516)
OFFER = ip.ChannelOffer(max_channels=16, channel_window=4096, connection_window=65516)
#: Channel windows larger than the connection's, so that the connection's credit runs out.
BIG_WINDOWS = ChannelParams(max_channels=16, channel_window=2**20, connection_window=65516)
BIG_OFFER = ip.ChannelOffer(max_channels=16, channel_window=2**20, connection_window=65516)
#: Which credit runs out first: ``(stalk's parameters, the interop peer's)``.
BOUNDS = {"channel-bound": (WINDOWS, OFFER), "connection-bound": (BIG_WINDOWS, BIG_OFFER)}
#: About 300 KB: 75 channel windows, 5 connection windows.
LONG = LARGE


class StalkSide:
    """Drives a sans-IO stalk Session over a byte stream: what a Connection with channels
    would do, in a few lines (the application's calls below, the peer's bytes in run())."""

    def __init__(self, session: Session, stream: ByteStream, *, release_resets: bool) -> None:
        self.session = session
        self.stream = stream
        self.release_resets = release_resets
        self.handshake: HandshakeComplete | None = None
        self.inbox: dict[int, deque[tuple[Spack, int]]] = defaultdict(deque)
        self.opened: list[int] = []
        self.closed_by_peer: list[int] = []
        self.resets: dict[int, tuple[int, str]] = {}
        self.close_received: CloseReceived | None = None
        self.error: Exception | None = None
        self.done = False
        self._lock = anyio.Lock()
        self._changed = anyio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def until(self, ready: Callable[[], object]) -> None:
        while True:
            changed = self._changed
            if ready():
                return
            await changed.wait()

    async def flush(self) -> None:
        """Write out everything the session has to send, in order."""
        async with self._lock:
            while data := self.session.data_to_send():
                await self.stream.send(bytes(data))

    async def run(self) -> None:
        """Feed the peer's bytes to the session and handle its events until CLOSE or EOF."""
        try:
            await self.flush()
            while self.close_received is None:
                try:
                    data = await self.stream.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    data = b""
                self.session.receive_data(data)
                await self._events()
                if not data:
                    break
        except StalkError as exc:
            self.error = exc
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self.flush()  # the refusal or error CLOSE, then the transport ends
                await self.stream.send_eof()
        finally:
            self.done = True
            self._wake()

    async def _events(self) -> None:
        while self.close_received is None:
            event = self.session.next_event()
            if event is NEED_DATA:
                break
            if event is PAUSED:
                await self.flush()
                await anyio.lowlevel.checkpoint()
                continue
            self._dispatch(event)
        await self.flush()
        self._wake()

    def _dispatch(self, event: object) -> None:
        if isinstance(event, PeerIdentified):
            self.session.accept()
        elif isinstance(event, HandshakeComplete):
            self.handshake = event
        elif isinstance(event, ChannelOpened):
            self.opened.append(event.channel)
        elif isinstance(event, ChannelMessageReceived):
            self.inbox[event.channel].append((event.spack, event.size))
        elif isinstance(event, MessageReceived):
            self.inbox[0].append((event.spack, 0))
        elif isinstance(event, ChannelCloseReceived):
            self.closed_by_peer.append(event.channel)
        elif isinstance(event, ChannelResetReceived):
            self.resets[event.channel] = (event.code, event.reason)
            while self.inbox[event.channel]:  # dropped: never handed to the application
                self.session.release(event.channel, self.inbox[event.channel].popleft()[1])
            if self.release_resets:
                self.session.release_channel(event.channel)
        elif isinstance(event, CloseReceived):
            self.close_received = event

    # -- the application's calls ----------------------------------------------------------

    async def send(self, channel: int, *spacks: Spack) -> None:
        for spack in spacks:
            self.session.queue(spack, channel)
        self.session.flush()
        await self.flush()

    async def receive(self, channel: int) -> Spack:
        """The next spack on ``channel``; its credit goes back to the peer."""
        inbox = self.inbox[channel]
        await self.until(
            lambda: (
                inbox
                or self.done
                or channel in self.closed_by_peer
                or channel in self.resets
                or self.close_received is not None
            )
        )
        if not inbox:
            raise AssertionError(f"channel {channel} ended: {self.error or self.close_received}")
        spack, size = inbox.popleft()
        self.session.release(channel, size)
        await self.flush()
        return spack

    async def closed_by_peer_on(self, channel: int) -> None:
        """Wait for the peer's CLOSE of ``channel``."""
        await self.until(lambda: channel in self.closed_by_peer)

    async def close_channel(self, channel: int) -> None:
        self.session.close_channel(channel)
        await self.flush()

    async def reset_channel(self, channel: int, code: int, reason: str) -> None:
        self.session.reset_channel(channel, code, reason)
        await self.flush()

    async def close(self) -> None:
        """Send CLOSE; once the peer's came too, end the transport (as a Connection does)."""
        self.session.close()
        await self.flush()
        if self.close_received is not None:
            await self.stream.send_eof()


@dataclass
class Link:
    """The two ends of one connection: stalk's driven Session and the interop peer."""

    stalk: StalkSide
    session: ip.PeerSession
    peer: ip.ChannelPeer | None
    tg: TaskGroup

    @property
    def chan(self) -> ip.ChannelPeer:
        """The interop peer's channels (the connection has them)."""
        assert self.peer is not None
        return self.peer


@asynccontextmanager
async def link(
    role: str,
    pattern: str,
    *,
    stalk_channels: ChannelParams | None = WINDOWS,
    offer: ip.ChannelOffer | None = OFFER,
    liveness: str = "whole",
    answer_resets: bool = True,
    release_resets: bool = True,
    raw: bool = False,
) -> AsyncIterator[Link]:
    """A connection between stalk (``role``) and the interop peer, handshake done; when both
    offered channels the interop peer's ChannelPeer runs too, unless ``raw`` (the test
    then writes and reads records itself)."""
    a, b = byte_stream_pair(math.inf)
    key = ip.StaticKey.generate()
    identity = Identity.generate()
    config = SessionConfig(channels=stalk_channels)
    if role == "stalk-initiator":
        pin = PublicIdentity(key.public) if pattern == "IK" else None
        session = Session(Role.INITIATOR, identity, peer=pin, config=config)
    else:
        session = Session(Role.RESPONDER, identity, config=config)
    stalk = StalkSide(session, a, release_resets=release_resets)
    async with a, b, anyio.create_task_group() as tg:
        tg.start_soon(stalk.run)
        if role == "stalk-initiator":
            peer_session = await ip.respond(b, key, channels=offer)
        else:
            responder = identity.public.raw if pattern == "IK" else None
            peer_session = await ip.initiate(b, key, responder, channels=offer)
        await stalk.until(lambda: stalk.handshake or stalk.done)
        assert stalk.handshake is not None, stalk.error
        assert peer_session.handshake.pattern == pattern
        peer = None
        if peer_session.channels is not None and not raw:
            peer = ip.ChannelPeer(peer_session, liveness=liveness, answer_resets=answer_resets)
            tg.start_soon(peer.run)
        yield Link(stalk, peer_session, peer, tg)
        tg.cancel_scope.cancel()


def assert_clean(ln: Link) -> None:
    """Neither side saw the other break SPEC.md."""
    assert ln.stalk.error is None
    if ln.peer is not None:
        assert ln.peer.failure is None
        assert ln.peer.transport_error is None


def sizes(seed: int) -> list[Spack]:
    """Four spacks for one channel: small ones and one of several windows."""
    return [
        Spack(seed, "hello"),
        Spack(seed, bytes(range(256)) * (8 + seed % 5)),  # 2-3 KB
        Spack(seed, "x" * (9000 + 37 * seed)),  # two channel windows and more
        Spack(seed, [None, True, 1.5]),
    ]


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_channels_negotiated(role: str, pattern: str) -> None:
    """SPEC sections 8 and 24: both offered the three parameters; each sees the other's."""
    offer = ip.ChannelOffer(max_channels=7, channel_window=5000, connection_window=70000)
    with anyio.fail_after(LIMIT):
        async with link(role, pattern, offer=offer) as ln:
            assert ln.stalk.session.channels
            assert ln.stalk.session.peer_channels == ChannelParams(7, 5000, 70000)
            params = ln.session.handshake.peer_params
            assert {k: params[k] for k in ip.CHANNEL_KEYS} == {
                "max_channels": WINDOWS.max_channels,
                "channel_window": WINDOWS.channel_window,
                "connection_window": WINDOWS.connection_window,
            }
            assert ln.session.channels == (offer, ip.ChannelOffer(16, 4096, 65516))
            assert ln.peer is not None
            assert_clean(ln)


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize(
    "params",
    [
        {"max_channels": 4},
        {"channel_window": 4096, "connection_window": 65516},
        {**OFFER.params(), "max_channels": 65536},
        {**OFFER.params(), "channel_window": 1023},
        {**OFFER.params(), "connection_window": 65515},
        {**OFFER.params(), "channel_window": 2**31},
        {**OFFER.params(), "max_channels": True},
        {**OFFER.params(), "connection_window": 65516.0},
    ],
    ids=[
        "one-of-three",
        "two-of-three",
        "max_channels-65536",
        "channel_window-1023",
        "connection_window-65515",
        "channel_window-2^31",
        "max_channels-true",
        "connection_window-float",
    ],
)
async def test_stalk_refuses_malformed_channel_parameters(
    pattern: str, params: dict[str, Any]
) -> None:
    """SPEC section 8: the three channel keys go together, each an int in its range; else
    the payload is malformed: IK refusal verdict, XX CLOSE instead of READY, both code 5."""
    a, b = byte_stream_pair(math.inf)
    identity = Identity.generate()
    config = SessionConfig(channels=WINDOWS)
    stalk = StalkSide(Session(Role.RESPONDER, identity, config=config), a, release_resets=True)
    responder = identity.public.raw if pattern == "IK" else None
    with anyio.fail_after(LIMIT):
        async with a, b, anyio.create_task_group() as tg:
            tg.start_soon(stalk.run)
            with pytest.raises((ip.Refused, ip.PeerClosed)) as info:
                await ip.initiate(b, ip.StaticKey.generate(), responder, extra_params=params)
            assert isinstance(info.value, ip.Refused if pattern == "IK" else ip.PeerClosed)
            assert info.value.code == ip.PROTOCOL_ERROR
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_many_channels_interleaved_both_ways(role: str, pattern: str) -> None:
    """Each side opens 6 channels and sends on them all at once; the other echoes each
    channel and closes it when the opener has; every spack comes back in order."""
    with anyio.fail_after(LIMIT):
        async with link(role, pattern) as ln:
            stalk, peer = ln.stalk, ln.chan

            async def peer_echo(channel: int) -> None:
                while True:
                    try:
                        spack = await peer.receive(channel)
                    except ip.ChannelEnded:
                        await peer.close_channel(channel)
                        return
                    await peer.send(channel, spack)

            async def peer_opener(channel: int) -> None:
                async with anyio.create_task_group() as tg:
                    for spack in sizes(channel):
                        tg.start_soon(peer.send, channel, spack)
                        await anyio.lowlevel.checkpoint()
                for spack in sizes(channel):
                    assert same(await peer.receive(channel), spack)
                await peer.close_channel(channel)
                with pytest.raises(ip.ChannelEnded):
                    await peer.receive(channel)

            async def stalk_echo(channel: int) -> None:
                while channel not in stalk.closed_by_peer or stalk.inbox[channel]:
                    await stalk.until(
                        lambda: stalk.inbox[channel] or channel in stalk.closed_by_peer
                    )
                    if stalk.inbox[channel]:
                        await stalk.send(channel, await stalk.receive(channel))
                await stalk.close_channel(channel)

            async def stalk_opener(channel: int) -> None:
                await stalk.send(channel, *sizes(channel))
                for spack in sizes(channel):
                    assert same(await stalk.receive(channel), spack)
                await stalk.close_channel(channel)
                await stalk.closed_by_peer_on(channel)

            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(stalk_opener, stalk.session.open_channel())
                    tg.start_soon(peer_opener, peer.open_channel())
                for _ in range(6):
                    tg.start_soon(peer_echo, await peer.accept_channel())
                    await stalk.until(lambda: len(stalk.opened) > 0)
                    tg.start_soon(stalk_echo, stalk.opened.pop(0))
            assert peer.open_channels() == (0, 0)
            assert_clean(ln)
            # stalk interleaved its channels: some channel's data records are not contiguous
            data = [ch for msg in peer.log for kind, ch, _ in msg if kind in (1, 2) and ch]
            runs = [ch for i, ch in enumerate(data) if i == 0 or data[i - 1] != ch]
            assert len(runs) > len(set(runs))


def data_records(peer: ip.ChannelPeer, channel: int) -> list[tuple[int, int]]:
    """``(kind, body length)`` of the data records the interop peer received on ``channel``."""
    return [
        (kind, n)
        for msg in peer.log
        for kind, ch, n in msg
        if ch == channel and kind in (ip.MESSAGE, ip.FRAGMENT)
    ]


@pytest.mark.parametrize("bound", list(BOUNDS))
@pytest.mark.parametrize("liveness", ip.LIVENESS)
@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_stalk_sends_a_spack_several_windows_long(
    role: str, pattern: str, liveness: str, bound: str
) -> None:
    """SPEC section 24: 300 KB through a 4 KB channel window or a 64 KB connection window,
    with nothing taken until it is whole: the interop receiver's liveness grants (either
    reading of SPEC) carry it, on a channel and on channel 0. A small spack queued after it
    on another channel arrives before it ends (fairness)."""
    windows, offer = BOUNDS[bound]
    with anyio.fail_after(LIMIT):
        async with link(role, pattern, stalk_channels=windows, offer=offer) as ln:
            stalk, peer = ln.stalk, ln.chan
            big, small = stalk.session.open_channel(), stalk.session.open_channel()
            stalk.session.queue(LONG, big)
            stalk.session.queue(Spack("small"), small)
            stalk.session.flush()
            await stalk.flush()
            assert await peer.accept_channel() == big
            assert await peer.accept_channel() == small
            await peer.until(lambda: peer.pending(big))
            # liveness grants went on the big channel before the application took anything
            assert any(ch == big for ch, _ in peer.grants)
            assert same(await peer.receive(small), Spack("small"))
            assert same(await peer.receive(big), LONG)
            records = data_records(peer, big)
            assert sum(n for _, n in records) == len(LONG.encode())
            assert records[0][1] <= min(offer.channel_window, offer.connection_window)
            assert [kind for kind, _ in records[:-1]] == [ip.FRAGMENT] * (len(records) - 1)
            assert records[-1][0] == ip.MESSAGE
            # the small spack's MESSAGE came between two pieces of the big one
            flat = [(kind, ch) for msg in peer.log for kind, ch, _ in msg if ch in (big, small)]
            assert flat.index((ip.MESSAGE, small)) < flat.index((ip.MESSAGE, big))
            await stalk.send(0, LONG)
            assert same(await peer.receive(0), LONG)
            # the round trip goes on afterwards, both ways, within the credit left
            await peer.send(big, Spack("thanks"))
            assert same(await stalk.receive(big), Spack("thanks"))
            assert_clean(ln)


@pytest.mark.parametrize("bound", list(BOUNDS))
@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_interop_sends_a_spack_several_windows_long(
    role: str, pattern: str, bound: str
) -> None:
    """SPEC section 24: the interop peer splits 300 KB to fit stalk's credit (one window
    at a time) and stalk's liveness grants let it through; then once more as 1000-byte
    FRAGMENTs and an empty final MESSAGE, on channel 0."""
    windows, offer = BOUNDS[bound]
    with anyio.fail_after(LIMIT):
        async with link(role, pattern, stalk_channels=windows, offer=offer) as ln:
            stalk, peer = ln.stalk, ln.chan
            channel = peer.open_channel()
            await peer.send(channel, LONG)
            assert same(await stalk.receive(channel), LONG)
            assert stalk.opened == [channel]
            sent = [n for _, ch, n in peer.sent if ch == channel]
            assert sent[0] == min(
                windows.channel_window, windows.connection_window, ip.MAX_DATA_BODY
            )
            await peer.send(0, LONG, piece=1000, empty_final=True)
            assert same(await stalk.receive(0), LONG)
            assert peer.sent[-1] == (ip.MESSAGE, 0, 0)
            # credit came back: a spack of a full window goes at once
            await peer.send(channel, spack_of(4096))
            assert peer.sent[-1] == (ip.MESSAGE, channel, 4096)
            assert same(await stalk.receive(channel), Spack.decode(spack_of(4096)))
            assert_clean(ln)


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_two_spacks_waiting_for_credit_at_once(role: str, pattern: str) -> None:
    """SPEC section 24: two channels each inside a spack larger than the window, both
    ways at once; the receivers take the slot in turn (each side reads both channels)."""
    with anyio.fail_after(LIMIT):
        async with link(role, pattern) as ln:
            stalk, peer = ln.stalk, ln.chan
            mine = [peer.open_channel(), peer.open_channel()]
            theirs = [stalk.session.open_channel(), stalk.session.open_channel()]
            for channel in theirs:
                stalk.session.queue(LONG, channel)
            stalk.session.flush()
            await stalk.flush()
            for channel in mine:
                ln.tg.start_soon(peer.send, channel, LONG)
            got: list[int] = []

            async def take(receive: Callable[[int], Awaitable[Spack]], channel: int) -> None:
                assert same(await receive(channel), LONG)
                got.append(channel)

            async with anyio.create_task_group() as tg:
                for channel in mine:
                    tg.start_soon(take, stalk.receive, channel)
                assert [await peer.accept_channel() for _ in theirs] == theirs
                for channel in reversed(theirs):  # the second may come first
                    tg.start_soon(take, peer.receive, channel)
            assert sorted(got) == sorted(mine + theirs)
            assert_clean(ln)


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_stalk_resets_a_channel(role: str, pattern: str) -> None:
    """stalk resets its channels: the peer's receive (and a send waiting for credit) raise
    ChannelReset with stalk's code and reason, it answers, and the channel ends on both
    sides (the peer allows one channel at a time: stalk may open the next one only then).
    What stalk dropped of an incomplete spack comes back as connection credit."""
    offer = ip.ChannelOffer(max_channels=1, channel_window=65516, connection_window=65516)
    windows = ChannelParams(max_channels=1, channel_window=65516, connection_window=65516)
    with anyio.fail_after(LIMIT):
        async with link(role, pattern, offer=offer, stalk_channels=windows) as ln:
            stalk, peer = ln.stalk, ln.chan

            async def reset_and_reopen(channel: int, code: int, reason: str) -> int:
                await stalk.reset_channel(channel, code, reason)
                with pytest.raises(ip.ChannelReset) as info:
                    await peer.receive(channel)
                assert (info.value.code, info.value.reason) == (code, reason)
                assert info.value.by_peer
                with pytest.raises(ip.ChannelReset):
                    await peer.send(channel, Spack("too late"))
                assert peer.state(channel) == ip.ENDED
                assert peer.open_channels() == (0, 0)
                await peer.round_trip()  # stalk has our answering RESET now
                nxt = stalk.session.open_channel()
                await stalk.send(nxt, Spack("next"))
                assert await peer.accept_channel() == nxt
                assert same(await peer.receive(nxt), Spack("next"))
                return nxt

            first = stalk.session.open_channel()
            with pytest.raises(LocalProtocolError):
                stalk.session.open_channel()  # the peer's max_channels is 1
            await stalk.send(first, Spack("go"))
            assert await peer.accept_channel() == first
            assert same(await peer.receive(first), Spack("go"))
            # An incomplete spack of 40000 bytes (within credit: stalk holds it, no more)
            await peer.send(first, LONG, stop_after=40000)
            await peer.round_trip()
            second = await reset_and_reopen(first, 0x1234, "stop ✓")
            await peer.round_trip()  # stalk's grants for what it dropped came before
            # stalk grants a quarter window at a time: up to a quarter may still be held
            assert peer.send_credit() > offer.connection_window * 3 // 4 - 100

            # A spack waiting for credit is stopped by the RESET
            outcome: list[BaseException] = []
            done = anyio.Event()

            async def stream_back() -> None:
                try:
                    await peer.send(second, LONG)
                except ip.ChannelReset as exc:
                    outcome.append(exc)
                done.set()

            ln.tg.start_soon(stream_back)
            await peer.until(lambda: peer.send_credit(second) < offer.channel_window)
            third = await reset_and_reopen(second, ip.NORMAL, "")
            await done.wait()
            assert len(outcome) == 1
            assert isinstance(outcome[0], ip.ChannelReset)
            await peer.send(third, Spack("ack"))
            assert same(await stalk.receive(third), Spack("ack"))
            assert_clean(ln)


ONE_CHANNEL = ChannelParams(max_channels=1, channel_window=4096, connection_window=65516)


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_interop_resets_a_channel(role: str, pattern: str) -> None:
    """The interop peer resets its channel while stalk streams on it: stalk reports the
    code and reason, drops what it had not sent, and answers only when its application
    lets go of the channel, which keeps its place in stalk's max_channels until then."""
    with anyio.fail_after(LIMIT):
        async with link(role, pattern, stalk_channels=ONE_CHANNEL, release_resets=False) as ln:
            stalk, peer = ln.stalk, ln.chan
            first = peer.open_channel()
            await peer.send(first, Spack("go"))
            assert same(await stalk.receive(first), Spack("go"))
            assert stalk.opened == [first]
            await stalk.send(first, LONG)
            await peer.until(lambda: data_records(peer, first))
            await peer.reset_channel(first, 0x4321, "enough")
            await stalk.until(lambda: first in stalk.resets)
            assert stalk.resets[first] == (0x4321, "enough")
            assert stalk.session.queued_bytes == 0  # what it had not sent is dropped
            with pytest.raises(ip.ChannelReset) as info:
                await peer.receive(first)
            assert not info.value.by_peer
            assert peer.state(first) == ip.RESET_SENT  # no answer yet
            with pytest.raises(ip.LocalError):
                peer.open_channel()  # stalk's max_channels is 1, and the reset one counts
            stalk.session.release_channel(first)
            await stalk.flush()
            await peer.until(lambda: peer.state(first) == ip.ENDED)
            second = peer.open_channel()
            await peer.send(second, Spack("next"))
            assert same(await stalk.receive(second), Spack("next"))
            await stalk.send(second, LONG)
            assert same(await peer.receive(second), LONG)
            assert_clean(ln)


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("resetter", ["stalk", "peer"])
async def test_close_then_reset_crossing_a_close_ends_without_an_answer(
    role: str, pattern: str, resetter: str
) -> None:
    """SPEC section 24: a party that sent a channel's CLOSE and then its RESET, and gets
    the peer's CLOSE, ends the channel: the peer ended it when the first CLOSE arrived and
    ignores the RESET. Nobody answers anything, and the channel's place is free on both
    sides (each side's max_channels is 1)."""
    with anyio.fail_after(LIMIT):
        async with link(role, pattern, stalk_channels=ONE_CHANNEL) as ln:
            stalk, peer = ln.stalk, ln.chan
            channel = peer.open_channel()
            await peer.send(channel, Spack("go"))
            assert same(await stalk.receive(channel), Spack("go"))
            if resetter == "stalk":
                stalk.session.close_channel(channel)
                stalk.session.reset_channel(channel, 7, "changed my mind")  # not written yet
                await peer.close_channel(channel)
                await stalk.flush()
            else:
                stalk.session.close_channel(channel)  # not written out yet
                await peer.close_channel(channel)
                await peer.reset_channel(channel, 7, "changed my mind")
                assert peer.state(channel) == ip.CLOSED_RESET_SENT
                await stalk.flush()
            await peer.until(lambda: peer.state(channel) == ip.ENDED)
            await peer.round_trip()
            await stalk.until(lambda: stalk.session.channel_state(channel) is None)
            resets = [ch for msg in peer.log for kind, ch, _ in msg if kind == ip.RESET]
            assert resets == ([channel] if resetter == "stalk" else [])
            second = peer.open_channel()  # the first is gone on both sides
            await peer.send(second, Spack("next"))
            assert same(await stalk.receive(second), Spack("next"))
            assert_clean(ln)


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_crossing_resets_answer_each_other(role: str, pattern: str) -> None:
    """SPEC section 24: both sides reset the same channel at once; each RESET answers the
    other, nobody sends a third, and the channel is gone on both sides."""
    with anyio.fail_after(LIMIT):
        async with link(role, pattern, stalk_channels=ONE_CHANNEL) as ln:
            stalk, peer = ln.stalk, ln.chan
            channel = peer.open_channel()
            await peer.send(channel, Spack("go"))
            assert same(await stalk.receive(channel), Spack("go"))
            stalk.session.reset_channel(channel, 7, "crossing")  # not written out yet
            await peer.reset_channel(channel, 8, "crossing too")
            await stalk.flush()
            await peer.until(lambda: peer.state(channel) == ip.ENDED)
            await peer.round_trip()
            resets = [ch for msg in peer.log for kind, ch, _ in msg if kind == ip.RESET]
            assert resets == [channel]
            second = peer.open_channel()  # stalk's max_channels is 1: the first is gone
            await peer.send(second, Spack("next"))
            assert same(await stalk.receive(second), Spack("next"))
            assert_clean(ln)


@pytest.mark.parametrize("first_closer", ["stalk", "interop"])
@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_channel_half_close(role: str, pattern: str, first_closer: str) -> None:
    """SPEC section 24: the opener sends two spacks and closes its direction; the other
    side still sends three (one several windows long) and then closes; the channel is
    gone on both sides, and each side's one allowed channel can be opened again."""
    offer = ip.ChannelOffer(max_channels=1, channel_window=4096, connection_window=65516)
    replies = [Spack("one"), LONG, Spack("three")]
    with anyio.fail_after(LIMIT):
        async with link(role, pattern, stalk_channels=ONE_CHANNEL, offer=offer) as ln:
            stalk, peer = ln.stalk, ln.chan
            for _ in range(2):  # twice: the channel's place is free again after the first
                if first_closer == "stalk":
                    channel = stalk.session.open_channel()
                    await stalk.send(channel, *BATCH[:2])
                    await stalk.close_channel(channel)
                    assert await peer.accept_channel() == channel
                    for spack in BATCH[:2]:
                        assert same(await peer.receive(channel), spack)
                    with pytest.raises(ip.ChannelEnded):
                        await peer.receive(channel)
                    assert peer.state(channel) == ip.RECEIVE_CLOSED
                    for spack in replies:
                        await peer.send(channel, spack)
                    await peer.close_channel(channel)
                    assert peer.state(channel) == ip.ENDED
                    for spack in replies:
                        assert same(await stalk.receive(channel), spack)
                    await stalk.closed_by_peer_on(channel)
                    await peer.round_trip()
                else:
                    channel = peer.open_channel()
                    for spack in BATCH[:2]:
                        await peer.send(channel, spack)
                    await peer.close_channel(channel)
                    assert peer.state(channel) == ip.SEND_CLOSED
                    for spack in BATCH[:2]:
                        assert same(await stalk.receive(channel), spack)
                    await stalk.closed_by_peer_on(channel)
                    await stalk.send(channel, *replies)
                    await stalk.close_channel(channel)
                    for spack in replies:
                        assert same(await peer.receive(channel), spack)
                    with pytest.raises(ip.ChannelEnded):
                        await peer.receive(channel)
                    assert peer.state(channel) == ip.ENDED
            assert peer.open_channels() == (0, 0)
            assert_clean(ln)


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_connection_close_ends_the_senders_direction_of_every_channel(
    role: str, pattern: str
) -> None:
    """SPEC sections 13 and 24: the interop peer's CLOSE ends its direction of every
    channel; stalk still sends on them (within the credit it holds) and then closes."""
    with anyio.fail_after(LIMIT):
        async with link(role, pattern) as ln:
            stalk, peer = ln.stalk, ln.chan
            ours, theirs = peer.open_channel(), stalk.session.open_channel()
            await peer.send(ours, Spack("mine"))
            await stalk.send(theirs, Spack("yours"))
            assert await peer.accept_channel() == theirs
            assert same(await peer.receive(theirs), Spack("yours"))
            await peer.close()
            assert same(await stalk.receive(ours), Spack("mine"))
            await stalk.until(lambda: stalk.close_received is not None)
            assert stalk.close_received == CloseReceived(0, "")
            await stalk.send(ours, Spack("still"))
            await stalk.send(theirs, Spack("here"))
            await stalk.close()
            assert same(await peer.receive(ours), Spack("still"))
            assert same(await peer.receive(theirs), Spack("here"))
            assert await peer.wait_closed() == (ip.NORMAL, "")
            assert_clean(ln)


@pytest.mark.parametrize("offers", ["stalk-only", "interop-only"])
@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_one_side_without_channels_talks_on_channel_0(
    role: str, pattern: str, offers: str
) -> None:
    """SPEC sections 23 and 24: when only one side offers channels (the other speaks
    version 1 and ignores the unknown keys), the connection has none: spacks go on
    channel 0 as in version 1, and stalk cannot open a channel."""
    stalk_channels = WINDOWS if offers == "stalk-only" else None
    offer = OFFER if offers == "interop-only" else None
    with anyio.fail_after(LIMIT):
        async with link(role, pattern, stalk_channels=stalk_channels, offer=offer) as ln:
            stalk, session = ln.stalk, ln.session
            assert ln.peer is None
            assert session.channels is None
            assert not stalk.session.channels
            assert ("max_channels" in session.handshake.peer_params) == (offers == "stalk-only")
            with pytest.raises(LocalProtocolError):
                stalk.session.open_channel()
            for spack in [*SAMPLES, LONG]:
                if len(spack.encode()) > 4000:
                    await session.send_fragmented(spack.encode())
                else:
                    await session.send(spack)
                assert same(await stalk.receive(0), spack)
                await stalk.send(0, spack)
                assert same(await session.receive(), spack)
            await session.close()
            await stalk.until(lambda: stalk.close_received is not None)
            await stalk.close()
            assert await session.expect_close() == (ip.NORMAL, "")
            assert stalk.error is None


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_opening_in_any_order(role: str, pattern: str) -> None:
    """SPEC section 24: the interop peer takes three ids and sends first on the highest,
    which opens the lower two as well (stalk reports them in order); and a channel opened
    by its CLOSE alone."""
    with anyio.fail_after(LIMIT):
        async with link(role, pattern) as ln:
            stalk, peer = ln.stalk, ln.chan
            low = peer.open_channel()
            high = peer.open_channel(low + 4)
            await peer.send(high, Spack("high"))
            await peer.send(low, Spack("low"))
            await peer.send(low + 2, Spack("middle"))
            for channel, value in [(low, "low"), (low + 2, "middle"), (high, "high")]:
                assert same(await stalk.receive(channel), Spack(value))
            assert stalk.opened == [low, low + 2, high]
            assert peer.open_channels() == (3, 0)

            closed = peer.open_channel()
            await peer.close_channel(closed)  # its first and only record
            await stalk.closed_by_peer_on(closed)
            assert stalk.opened[-1] == closed
            await stalk.send(closed, Spack("reply"))
            await stalk.close_channel(closed)
            assert same(await peer.receive(closed), Spack("reply"))
            await peer.until(lambda: peer.state(closed) == ip.ENDED)
            assert peer.open_channels() == (3, 0)
            assert_clean(ln)


async def read_until(session: ip.PeerSession, last: Callable[[ip.Record], bool]) -> list[ip.Record]:
    """Records read until one that ``last`` accepts (included)."""
    records: list[ip.Record] = []
    while not records or not last(records[-1]):
        for record in session.take_pending() or await session.read_records():
            records.append(record)
            if last(record):
                break
    return records


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_records_on_an_ended_channel(role: str, pattern: str) -> None:
    """SPEC section 24: on a channel that ended, a WINDOW and a RESET are ignored (they
    crossed the channel's end): nothing answers them, so two peers never answer each
    other's RESETs forever. (Raw records: this RESET is one no compliant peer sends.)"""
    with anyio.fail_after(LIMIT):
        async with link(role, pattern, raw=True) as ln:
            stalk, session = ln.stalk, ln.session
            channel = 1 if session.initiator else 2
            await session.send_records(
                [rec(ip.MESSAGE, channel, GOOD_BODY), rec(ip.CLOSE, channel, b"\x00\x00")]
            )
            assert same(await stalk.receive(channel), Spack(1))
            await stalk.closed_by_peer_on(channel)
            await stalk.close_channel(channel)
            await read_until(session, lambda r: r.kind == ip.CLOSE and r.channel == channel)
            await session.send_records(
                [
                    ip.window_record(channel, 1000),
                    ip.reset_record(channel, 9, "late"),
                    ip.record(ip.PING, b"sync"),
                ]
            )
            records = await read_until(session, lambda r: r.kind == ip.PONG)
            assert not [r for r in records if r.kind in (ip.RESET, ip.CLOSE)]
            assert stalk.error is None


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_stalk_closes_after_its_spacks_under_way(role: str, pattern: str) -> None:
    """SPEC section 24: the connection's CLOSE may not go inside a spack: stalk's CLOSE,
    asked for while two large spacks still wait for credit, comes after both; the interop
    peer then finds that no more credit can come for a spack of its own."""
    with anyio.fail_after(LIMIT):
        async with link(role, pattern) as ln:
            stalk, peer = ln.stalk, ln.chan
            channel = stalk.session.open_channel()
            await stalk.send(channel, LONG)
            await stalk.send(0, LONG)
            await stalk.close()
            assert await peer.accept_channel() == channel
            assert same(await peer.receive(channel), LONG)
            assert same(await peer.receive(0), LONG)
            assert await peer.wait_closed() == (ip.NORMAL, "")
            with pytest.raises(ip.LocalError, match="no credit can arrive"):
                await peer.send(channel, LONG)
            assert_clean(ln)


@pytest.mark.parametrize("role", ROLES)
async def test_stalk_resets_a_channel_before_its_first_record(role: str) -> None:
    """stalk's application opens a channel and resets it at once: the connection must
    survive it, and the channel be gone on both sides (stalk opens it with its CLOSE, then
    resets it: SPEC section 24, "Reset")."""
    with anyio.fail_after(LIMIT):
        async with link(role, "XX") as ln:
            stalk, peer = ln.stalk, ln.chan
            channel = stalk.session.open_channel()
            await stalk.reset_channel(channel, ip.NORMAL, "")
            other = stalk.session.open_channel()
            await stalk.send(other, Spack("after"))
            await peer.round_trip()
            assert_clean(ln)
            assert peer.open_channels() == (0, 1)


# -- hostile records from the interop side ---------------------------------------------------

#: A whole spack on channel 0 that leads each hostile message: nothing of a message that
#: breaks the protocol may be delivered (SPEC sections 11 and 18).
GOOD_BODY = Spack(1).encode()


@dataclass(frozen=True)
class Hostile:
    """Transport messages (lists of records) that break section 24, given the sender's
    parity: ``mine(k)`` is the sender's k-th channel id, ``theirs(k)`` the receiver's."""

    build: Callable[[Callable[[int], int], Callable[[int], int]], list[list[bytes]]]
    code: int
    windows: ChannelParams = WINDOWS


def rec(kind: int, channel: int, body: bytes = b"") -> bytes:
    return ip.record(kind, body, channel)


def spack_of(size: int) -> bytes:
    """A spack encoding of exactly ``size`` bytes (a ``bin`` in an array)."""
    for header in (3, 4, 6):
        encoded = Spack(bytes(size - header)).encode()
        if len(encoded) == size:
            return encoded
    raise AssertionError(f"no spack of {size} bytes")


TWO_CHANNELS = ChannelParams(max_channels=2, channel_window=4096, connection_window=65516)
HOSTILE = {
    "data-beyond-channel-credit": Hostile(
        lambda mine, _: [[rec(ip.MESSAGE, mine(1), spack_of(4097))]], ip.FLOW_CONTROL_ERROR
    ),
    "data-beyond-connection-credit": Hostile(
        lambda mine, _: [
            [rec(ip.FRAGMENT, mine(1), bytes(60000))],
            [rec(ip.FRAGMENT, mine(1), bytes(65516 - 60000 - len(GOOD_BODY) + 1))],
        ],
        ip.FLOW_CONTROL_ERROR,
        BIG_WINDOWS,
    ),
    "channel-credit-past-2^31-1": Hostile(
        lambda *_: [[rec(ip.WINDOW, 0, ip.uvarint(2**31 - 4096))]], ip.FLOW_CONTROL_ERROR
    ),
    "connection-credit-past-2^31-1": Hostile(
        lambda *_: [[rec(ip.CONNECTION_WINDOW, 0, ip.uvarint(2**31 - 65516))]],
        ip.FLOW_CONTROL_ERROR,
    ),
    "too-many-channels": Hostile(
        lambda mine, _: [[rec(ip.MESSAGE, mine(k), GOOD_BODY)] for k in (1, 2, 3)],
        ip.CHANNEL_LIMIT,
        TWO_CHANNELS,
    ),
    "implicit-opening-past-the-limit": Hostile(
        lambda mine, _: [[rec(ip.MESSAGE, mine(3), GOOD_BODY)]], ip.CHANNEL_LIMIT, TWO_CHANNELS
    ),
    "window-on-a-never-opened-channel": Hostile(
        lambda mine, _: [[rec(ip.WINDOW, mine(1), b"\x01")]], ip.PROTOCOL_ERROR
    ),
    "reset-on-a-never-opened-channel": Hostile(
        lambda mine, _: [[ip.reset_record(mine(1))]], ip.PROTOCOL_ERROR
    ),
    "data-on-the-receivers-never-opened-channel": Hostile(
        lambda _, theirs: [[rec(ip.MESSAGE, theirs(1), GOOD_BODY)]], ip.PROTOCOL_ERROR
    ),
    "channel-id-past-2^31-1": Hostile(
        lambda mine, _: [[rec(ip.MESSAGE, mine(2**30 + 1), GOOD_BODY)]], ip.PROTOCOL_ERROR
    ),
    "reset-on-channel-0": Hostile(lambda *_: [[ip.reset_record(0)]], ip.PROTOCOL_ERROR),
    "connection-window-on-a-channel": Hostile(
        lambda mine, _: [[rec(ip.MESSAGE, mine(1), GOOD_BODY), rec(0x0A, mine(1), b"\x01")]],
        ip.PROTOCOL_ERROR,
    ),
    "ping-on-a-channel": Hostile(
        lambda mine, _: [[rec(ip.MESSAGE, mine(1), GOOD_BODY), rec(ip.PING, mine(1))]],
        ip.PROTOCOL_ERROR,
    ),
    "window-increment-0": Hostile(lambda *_: [[rec(ip.WINDOW, 0, b"\x00")]], ip.PROTOCOL_ERROR),
    "channel-close-with-a-code": Hostile(
        lambda mine, _: [[rec(ip.CLOSE, mine(1), b"\x00\x05")]], ip.PROTOCOL_ERROR
    ),
    "data-after-the-channels-close": Hostile(
        lambda mine, _: [
            [rec(ip.CLOSE, mine(1), b"\x00\x00")],
            [rec(ip.MESSAGE, mine(1), GOOD_BODY)],
        ],
        ip.PROTOCOL_ERROR,
    ),
    "data-after-its-reset": Hostile(
        lambda mine, _: [
            [rec(ip.MESSAGE, mine(1), GOOD_BODY), ip.reset_record(mine(1))],
            [rec(ip.MESSAGE, mine(1), GOOD_BODY)],
        ],
        ip.PROTOCOL_ERROR,
    ),
    "channel-close-inside-a-spack": Hostile(
        lambda mine, _: [[rec(ip.FRAGMENT, mine(1), b"\x92"), rec(ip.CLOSE, mine(1), b"\x00\x00")]],
        ip.PROTOCOL_ERROR,
    ),
    "connection-close-inside-a-spack-on-a-channel": Hostile(
        lambda mine, _: [[rec(ip.FRAGMENT, mine(1), b"\x92"), ip.close_record(ip.NORMAL)]],
        ip.PROTOCOL_ERROR,
    ),
}
STALK_CODES = {
    ip.PROTOCOL_ERROR: ProtocolError,
    ip.CHANNEL_LIMIT: ChannelLimitExceeded,
    ip.FLOW_CONTROL_ERROR: FlowControlError,
}


def hostile_messages(case: Hostile, initiator: bool) -> list[bytes]:
    """The case's plaintexts from a sender in that role; GOOD leads the last one."""

    def mine(k: int) -> int:
        return 2 * k - 1 if initiator else 2 * k

    def theirs(k: int) -> int:
        return 2 * k if initiator else 2 * k - 1

    messages = case.build(mine, theirs)
    messages[-1] = [rec(ip.MESSAGE, 0, GOOD_BODY), *messages[-1]]
    return [b"".join(records) for records in messages]


@pytest.mark.parametrize(
    ("role", "pattern"), [("stalk-responder", "XX"), ("stalk-initiator", "IK")]
)
@pytest.mark.parametrize("name", list(HOSTILE))
async def test_stalk_refuses_hostile_channel_records(role: str, pattern: str, name: str) -> None:
    """SPEC sections 16, 18 and 24: stalk ends the connection with the code SPEC names
    (CHANNEL_LIMIT, FLOW_CONTROL_ERROR or PROTOCOL_ERROR), delivering nothing of the
    message, and the interop peer reads that CLOSE."""
    case = HOSTILE[name]
    with anyio.fail_after(LIMIT):
        async with link(role, pattern, stalk_channels=case.windows, raw=True) as ln:
            stalk = ln.stalk
            for plaintext in hostile_messages(case, ln.session.initiator):
                await ln.session.send_plaintext(plaintext)
            assert await read_close(ln.session) == case.code
            await stalk.until(lambda: stalk.done)
            assert type(stalk.error) is STALK_CODES[case.code]
            assert isinstance(stalk.error, ProtocolError)
            assert stalk.error.close_code == case.code
            assert not stalk.inbox[0]


async def read_close(session: ip.PeerSession) -> int:
    """Read records up to the connection's CLOSE (a RESET answer may come first); its code."""
    records = await read_until(session, lambda r: r.kind == ip.CLOSE and not r.channel)
    return ip.decode_close(records[-1].body)[0]


@asynccontextmanager
async def interop_pair(
    target: ip.ChannelOffer,
) -> AsyncIterator[tuple[ip.PeerSession, ip.ChannelPeer]]:
    """Two interop peers (the second offers ``target``): an initiator's raw session, and
    the responder's ChannelPeer, running."""
    a, b = byte_stream_pair(math.inf)
    key = ip.StaticKey.generate()
    sessions: list[ip.PeerSession] = []

    async def respond() -> None:
        sessions.append(await ip.respond(b, key, channels=target))

    async with a, b, anyio.create_task_group() as tg:
        async with anyio.create_task_group() as handshake:
            handshake.start_soon(respond)
            initiator = await ip.initiate(a, ip.StaticKey.generate(), channels=OFFER)
        responder = ip.ChannelPeer(sessions[0])
        tg.start_soon(responder.run)
        yield initiator, responder
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_interop_peer_refuses_hostile_channel_records(name: str) -> None:
    """The interop peer detects the same errors with the same codes (so its checks of
    stalk above mean something): a second interop peer sends them."""
    case = HOSTILE[name]
    target = ip.ChannelOffer(*(getattr(case.windows, k) for k in ip.CHANNEL_KEYS))
    with anyio.fail_after(LIMIT):
        async with interop_pair(target) as (sender, receiver):
            for plaintext in hostile_messages(case, initiator=True):
                await sender.send_plaintext(plaintext)
            await receiver.until(lambda: receiver.finished)
            assert receiver.failure is not None
            assert receiver.failure.code == case.code
            assert not receiver.pending(0)
            assert await read_close(sender) == case.code


# -- certificates (SPEC section 25): stalk against the interop peer's own ----------------------
#
# The interop peer issues every certificate here with its own encoder and cryptography's
# Ed25519, and checks stalk's with section 25's checks, written from SPEC.md alone; stalk
# runs over in-memory streams (Connection.wrap) with the real clock, both backends.

#: The authority of these tests, by its Ed25519 seed, and another one nobody trusts.
CA_SEED = bytes(range(32))
OTHER_CA_SEED = bytes(range(100, 132))
CA_PUBLIC = ip.authority_public(CA_SEED)


def issue(subject: bytes, name: str, **overrides: Any) -> bytes:
    """A certificate from the interop peer: valid for an hour around now (or overridden)."""
    now = int(time.time())
    args: dict[str, Any] = {
        "seed": CA_SEED,
        "serial": 7,
        "subject": subject,
        "name": name,
        "groups": ["ops"],
        "not_before": now - 60,
        "not_after": now + 3600,
    }
    args.update(overrides)
    seed = args.pop("seed")
    return ip.issue_certificate(seed, **args)


def tampered(subject: bytes, name: str) -> bytes:
    """A valid certificate whose name was changed after signing (same length)."""
    good = issue(subject, name)
    forged = issue(subject, name[:-1] + ("x" if name[-1] != "x" else "y"))
    return forged[:-66] + good[-66:]


#: Hostile certificates a presenter sends: (what it sends, stalk's error, its check name).
HOSTILE_INTEROP: dict[str, tuple[Callable[[bytes, bytes], bytes], type[CertificateError]]] = {
    "expired": (
        lambda me, _: issue(me, "peer", not_before=1_000_000_000, not_after=1_000_086_400),
        CertificateExpired,
    ),
    "unknown_authority": (lambda me, _: issue(me, "peer", seed=OTHER_CA_SEED), UnknownAuthority),
    "for_another_key": (lambda _, other: issue(other, "peer"), CertificateKeyMismatch),
    "tampered": (lambda me, _: tampered(me, "peer"), BadCertificateSignature),
}


def interop_check() -> ip.CertificateCheck:
    return ip.CertificateCheck(authorities=(CA_PUBLIC,), now=time.time())


def stalk_trust() -> dict[str, Any]:
    return {"authorities": Authorities([PublicAuthority(CA_PUBLIC)])}


def presented(identity: Identity, data: bytes) -> Certificate:
    """What stalk presents: ``data`` as is (even one for another key, or tampered)."""
    own = Certificate.from_bytes(issue(identity.public.raw, "x"))
    return dataclasses.replace(own, encoded=data)


async def _wrap(stream: ByteStream, kwargs: dict[str, Any]) -> Connection | Exception:
    try:
        return await Connection.wrap(stream, config=Config(handshake_timeout=LIMIT), **kwargs)
    except Exception as exc:
        return exc


async def _interop(run: Callable[[], Awaitable[ip.PeerSession]]) -> ip.PeerSession | Exception:
    try:
        return await run()
    except Exception as exc:
        return exc


@asynccontextmanager
async def certified_pair(
    *,
    stalk_initiates: bool,
    pattern: str,
    stalk_kwargs: dict[str, Any],
    interop_certificate: bytes | None,
    interop_check: ip.CertificateCheck | None,
    stalk_identity: Identity,
    interop_key: ip.StaticKey,
) -> AsyncIterator[tuple[Connection | Exception, ip.PeerSession | Exception]]:
    """One handshake between stalk and the interop peer: what each ended with.

    Both streams are closed on exit (stalk's connection, if any, with them).
    """
    a, b = byte_stream_pair()
    results: dict[str, Any] = {}

    async def stalk_side() -> None:
        kwargs = {"identity": stalk_identity, **stalk_kwargs}
        if stalk_initiates:
            kwargs["peer"] = PublicIdentity(interop_key.public) if pattern == "IK" else None
        else:
            kwargs["server_side"] = True
        results["stalk"] = await _wrap(a, kwargs)

    async def interop_side() -> None:
        if stalk_initiates:
            results["interop"] = await _interop(
                lambda: ip.respond(
                    b, interop_key, certificate=interop_certificate, check=interop_check
                )
            )
        else:
            responder = stalk_identity.public.raw if pattern == "IK" else None
            results["interop"] = await _interop(
                lambda: ip.initiate(
                    b,
                    interop_key,
                    responder,
                    certificate=interop_certificate,
                    check=interop_check,
                )
            )
        if isinstance(results["interop"], Exception):
            await b.aclose()  # what a real peer does on failure: the other side sees EOF

    async with a, b:
        with anyio.fail_after(LIMIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stalk_side)
                tg.start_soon(interop_side)
        try:
            yield results["stalk"], results["interop"]
        finally:
            if isinstance(results["stalk"], Connection):
                await results["stalk"].aclose()


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("role", ROLES)
async def test_certificates_both_ways(role: str, pattern: str) -> None:
    """Both present certificates the other checks: each sees the other's name and groups."""
    me, key = Identity.generate(), ip.StaticKey.generate()
    async with certified_pair(
        stalk_initiates=role == "stalk-initiator",
        pattern=pattern,
        stalk_kwargs={
            "certificate": Certificate.from_bytes(issue(me.public.raw, "stalk-1", groups=["db"])),
            **stalk_trust(),
            "allow_names": ["interop-1"],
        },
        interop_certificate=issue(key.public, "interop-1"),
        interop_check=dataclasses.replace(interop_check(), groups=frozenset({"db"})),
        stalk_identity=me,
        interop_key=key,
    ) as (conn, session):
        assert isinstance(conn, Connection), conn
        assert isinstance(session, ip.PeerSession), session
        with anyio.fail_after(LIMIT):
            assert conn.pattern == pattern
            assert conn.peer_certificate is not None
            assert (conn.peer_certificate.name, conn.peer_certificate.groups) == (
                "interop-1",
                ("ops",),
            )
            cert = session.handshake.peer_certificate
            assert cert is not None
            assert (cert.name, cert.groups, cert.subject) == ("stalk-1", ("db",), me.public.raw)
            await conn.send(Spack("certified", 1))
            assert same(await session.receive(), Spack("certified", 1))
            await session.send(Spack("both ways"))
            assert same(await conn.receive(), Spack("both ways"))


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("case", HOSTILE_INTEROP)
async def test_stalk_listener_refuses_a_hostile_interop_certificate(
    case: str, pattern: str
) -> None:
    """The interop initiator presents it; stalk refuses with CERTIFICATE_REFUSED (13)."""
    me, key = Identity.generate(), ip.StaticKey.generate()
    make, error = HOSTILE_INTEROP[case]
    async with certified_pair(
        stalk_initiates=False,
        pattern=pattern,
        stalk_kwargs=stalk_trust(),
        interop_certificate=make(key.public, me.public.raw),
        interop_check=None,
        stalk_identity=me,
        interop_key=key,
    ) as (conn, session):
        assert type(conn) is error, conn
        # IK: a refusal verdict; XX: an authenticated CLOSE instead of READY (SPEC section 25).
        assert isinstance(session, ip.PeerClosed if pattern == "XX" else ip.Refused), session
        assert session.code == ip.CERTIFICATE_REFUSED


@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("case", HOSTILE_INTEROP)
async def test_stalk_initiator_refuses_a_hostile_interop_certificate(
    case: str, pattern: str
) -> None:
    """The interop responder presents it; stalk sends nothing more and leaves."""
    me, key = Identity.generate(), ip.StaticKey.generate()
    make, error = HOSTILE_INTEROP[case]
    async with certified_pair(
        stalk_initiates=True,
        pattern=pattern,
        stalk_kwargs=stalk_trust(),
        interop_certificate=make(key.public, me.public.raw),
        interop_check=None,
        stalk_identity=me,
        interop_key=key,
    ) as (conn, session):
        assert type(conn) is error, conn
        # No XX message 3, no IK READY: the interop responder reads EOF.
        assert isinstance(session, ip.Truncated), session


@pytest.mark.parametrize("stalk_initiates", [True, False], ids=["responder", "initiator"])
@pytest.mark.parametrize("pattern", ["XX", "IK"])
@pytest.mark.parametrize("case", HOSTILE_INTEROP)
async def test_interop_peer_refuses_a_hostile_stalk_certificate(
    case: str, pattern: str, stalk_initiates: bool
) -> None:
    """stalk presents it (as initiator or as a listener); the interop peer refuses it. As
    responder it answers 13 (stalk's PeerRefused); as initiator it just leaves."""
    me, key = Identity.generate(), ip.StaticKey.generate()
    make, error = HOSTILE_INTEROP[case]
    async with certified_pair(
        stalk_initiates=stalk_initiates,
        pattern=pattern,
        stalk_kwargs={"certificate": presented(me, make(me.public.raw, key.public))},
        interop_certificate=None,
        interop_check=interop_check(),
        stalk_identity=me,
        interop_key=key,
    ) as (conn, session):
        assert isinstance(session, ip.CertificateRefused), session
        assert session.check == error.__name__
        if stalk_initiates:
            assert isinstance(conn, PeerRefused), conn
            assert conn.code == ip.CERTIFICATE_REFUSED
        else:
            assert isinstance(conn, HandshakeFailed), conn
            assert not isinstance(conn, PeerRefused)


def test_interop_checks_follow_spec_order() -> None:
    """The interop peer's own checks, on certificates stalk's Authority signed."""
    authority = Authority.from_private_bytes(CA_SEED)
    assert authority.public.raw == CA_PUBLIC
    subject = Identity.generate().public
    now = int(time.time())
    cert = authority.sign(subject, "db-1", ["ops", "db"], not_before=now, not_after=now + 60)
    check = interop_check()
    decoded = check.verify(cert.encoded, subject.raw)
    assert (decoded.name, decoded.groups, decoded.serial) == ("db-1", ("db", "ops"), cert.serial)
    # The interop encoder writes stalk's bytes (signatures are deterministic).
    again = ip.issue_certificate(
        CA_SEED,
        serial=cert.serial,
        subject=subject.raw,
        name="db-1",
        groups=["db", "ops"],
        not_before=now,
        not_after=now + 60,
    )
    assert again == cert.encoded
    refusals = {
        "CertificateNameMismatch": (cert.encoded, dataclasses.replace(check, names=frozenset())),
        "CertificateRevoked": (
            cert.encoded,
            dataclasses.replace(check, revoked_serials=frozenset({cert.serial})),
        ),
        "NonCanonicalCertificate": (
            b"\x9a\xcc\x01" + cert.encoded[2:],  # version 1 as uint 8
            check,
        ),
        "AuthorityAsSubject": (
            ip.issue_certificate(
                CA_SEED,
                serial=1,
                subject=ip.x25519_form(CA_PUBLIC),
                name="ca",
                not_before=now,
                not_after=now + 60,
            ),
            check,
        ),
        "CertificateTooLarge": (cert.encoded + bytes(2048), check),
        "MalformedCertificate": (b"\x92\x01\x02", check),
    }
    for name, (data, which) in refusals.items():
        with pytest.raises(ip.CertificateRefused) as info:
            which.verify(data, subject.raw)
        assert info.value.check == name
        assert info.value.code == ip.CERTIFICATE_REFUSED


# -- vectors/: the interop peer writes stalk's transcripts byte for byte ---------------------
#
# No I/O: ip.ScriptedPeer is sans-IO, so these tests are synchronous (anyio runs only
# coroutines). It knows only SPEC.md: sections 8, 12, 15 and 24's "How stalk sends and
# grants" say what a transcript's recorded calls make each side write.

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
TRANSCRIPTS = [
    "stalk-xx.json",
    "stalk-ik.json",
    "stalk-channels.json",
    "stalk-certificates-xx.json",
    "stalk-certificates-ik.json",
]
SIDES = ("initiator", "responder")


def load_transcript(name: str) -> dict[str, Any]:
    transcript: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="ascii"))
    return transcript


def transcript_certificate(
    transcript: dict[str, Any], side: str
) -> tuple[bytes | None, ip.CertificateCheck | None]:
    """``side``'s certificate, issued here by the interop peer from the recorded authority
    key and fields (it must be the recorded bytes), and its check of the other's."""
    trust = transcript.get("certificates")
    if trust is None:
        return None, None
    seed = bytes.fromhex(trust["authority_seed_hex"])
    authority = ip.authority_public(seed)
    assert authority.hex() == trust["authority_public_hex"]
    assert ip.issuer_id(authority).hex() == trust["issuer_hex"]
    recorded = transcript[side]["certificate"]
    certificate = ip.issue_certificate(
        seed,
        serial=recorded["serial"],
        subject=bytes.fromhex(transcript[side]["static_public_hex"]),
        name=recorded["name"],
        groups=recorded["groups"],
        not_before=recorded["not_before"],
        not_after=recorded["not_after"],
    )
    assert certificate.hex() == recorded["encoded_hex"]
    names, groups = recorded["requires_names"], recorded["requires_groups"]
    check = ip.CertificateCheck(
        authorities=(authority,),
        now=trust["verification_time"],
        skew=trust["clock_skew"],
        names=None if names is None else frozenset(names),
        groups=None if groups is None else frozenset(groups),
    )
    return certificate, check


def scripted_peers(transcript: dict[str, Any]) -> dict[str, ip.ScriptedPeer]:
    """Both sides, from the keys and configurations the transcript records."""
    pinned = bytes.fromhex(transcript["responder"]["static_public_hex"])
    peers: dict[str, ip.ScriptedPeer] = {}
    for side in SIDES:
        party = transcript[side]
        config = party["config"]
        channels = config.get("channels")
        static = ip.StaticKey(
            bytes.fromhex(party["static_private_hex"]), bytes.fromhex(party["static_public_hex"])
        )
        assert bytes(static.keypair().public.data) == static.public
        certificate, check = transcript_certificate(transcript, side)
        peers[side] = ip.ScriptedPeer(
            initiator=side == "initiator",
            static=static,
            ephemeral=bytes.fromhex(party["ephemeral_private_hex"]),
            responder_static=pinned if party["pins_responder_key"] else None,
            max_message_size=config["max_message_size"],
            rekey_after_messages=config["rekey_after_messages"],
            rekey_after_bytes=config["rekey_after_bytes"],
            channels=None if channels is None else ip.ChannelOffer(**channels),
            certificate=certificate,
            check=check,
        )
    return peers


def make_call(
    transcript: dict[str, Any], peer: ip.ScriptedPeer, cause: dict[str, Any]
) -> list[dict[str, Any]]:
    """The recorded call (nothing for a reaction); the events the caller itself reports."""
    call = cause.get("call")
    spacks = [transcript["spacks"][index] for index in cause.get("spacks", ())]
    for spack in spacks:
        peer.queue(bytes.fromhex(spack["encoded_hex"]), spack.get("channel", 0))
    if call in ("send", "queue+flush"):
        peer.flush()
    elif call == "accept":
        return peer.accept()
    elif call == "ping":
        peer.ping(bytes.fromhex(cause["payload_hex"]))
    elif call == "close":
        peer.close(cause["code"], cause["reason"])
    elif call == "open_channel":
        assert peer.open_channel() == cause["channel"]
    elif call == "close_channel":
        peer.close_channel(cause["channel"])
    elif call == "reset_channel":
        peer.reset_channel(cause["channel"], cause["code"], cause["reason"])
    elif call == "release":
        spack = transcript["spacks"][cause["spack"]]
        peer.release(cause["channel"], spack["encoded_length"])
    elif call == "release_channel":
        peer.release_channel(cause["channel"])
    else:
        assert call in (None, "create", "queue"), f"unknown call {call!r}"
    return []


def expected_events(transcript: dict[str, Any], step: dict[str, Any]) -> list[Any]:
    """A step's events as the interop peer reports them (a spack by its encoding)."""
    events = []
    for recorded in step["events"]:
        event = dict(recorded)
        side = event.pop("side")
        if event["event"] == "message":
            event["encoded"] = bytes.fromhex(
                transcript["spacks"][event.pop("spack")]["encoded_hex"]
            )
        events.append((side, event))
    return events


def replay_with_interop_peer(transcript: dict[str, Any]) -> dict[str, ip.ScriptedPeer]:
    """Every recorded call made on the interop peer: every write and event must match."""
    peers = scripted_peers(transcript)
    steps = transcript["steps"]
    for index, step in enumerate(steps):
        where = f"step {index} ({step['note'][:60]})"
        side = step["from"]
        other = SIDES[side == "initiator"]
        events = [(side, e) for e in make_call(transcript, peers[side], step["cause"])]
        data = peers[side].data_to_send()
        assert data.hex() == step["bytes"], f"{where}: the {side} wrote different bytes"
        if data:
            events += [(other, e) for e in peers[other].receive_data(data)]
        assert events == expected_events(transcript, step), f"{where}: events"
        following = steps[index + 1] if index + 1 < len(steps) else None
        if following is None or following["cause"] != {"received": index}:
            assert peers[other].data_to_send() == b"", f"{where}: an unrecorded write"
    return peers


@pytest.mark.parametrize("name", TRANSCRIPTS)
def test_interop_peer_writes_every_transcript_byte_for_byte(name: str) -> None:
    transcript = load_transcript(name)
    peers = replay_with_interop_peer(transcript)
    for peer in peers.values():
        assert peer.data_to_send() == b""
        assert peer.close_sent
        assert peer.close_received is not None
        assert peer.handshake_hash.hex() == transcript["handshake_hash_hex"]
        assert peer.channels == transcript.get("channels", False)
    for side in SIDES:  # with certificates, each checked the other's
        other = transcript[SIDES[side == "initiator"]]
        checked = peers[side].peer_certificate
        if "certificates" not in transcript:
            assert checked is None
        else:
            assert checked is not None
            assert checked.encoded().hex() == other["certificate"]["encoded_hex"]


@pytest.mark.parametrize("name", ["stalk-certificates-xx.json", "stalk-certificates-ik.json"])
def test_interop_replay_refuses_the_transcript_certificate_when_expired(name: str) -> None:
    """The check can fail: verified a day later, the first certificate checked is refused."""
    transcript = load_transcript(name)
    transcript["certificates"]["verification_time"] += 86_400
    with pytest.raises(ip.CertificateRefused) as info:
        replay_with_interop_peer(transcript)
    assert info.value.check == "CertificateExpired"


def test_interop_replay_notices_a_different_grant() -> None:
    """The check can fail: a release of a smaller spack earns no WINDOW, and the interop
    peer then writes nothing where the transcript has one."""
    transcript = load_transcript("stalk-channels.json")
    (step,) = (s for s in transcript["steps"] if s["cause"].get("call") == "release" and s["bytes"])
    step["cause"]["spack"] = next(
        s["index"]
        for s in transcript["spacks"]
        if s["channel"] == step["cause"]["channel"] and s["index"] < step["cause"]["spack"]
    )
    with pytest.raises(AssertionError, match="wrote different bytes"):
        replay_with_interop_peer(transcript)
