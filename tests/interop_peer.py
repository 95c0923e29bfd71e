"""An independent stalk peer built on dissononce, written from SPEC.md alone.

It shares nothing with stalk's framing, record, handshake, session or Noise modules: the
preamble, verdict, frames, handshake payloads and records below are written from SPEC.md
sections 3-18, and Noise is dissononce's (``Noise_{XX,IK}_25519_AESGCM_SHA256``). Only the
spack bytes come from :mod:`stalk.spack` (section 19 is stalk's codec). Rekeying is left
out on purpose: dissononce 0.34.3's ``Rekey()`` is wrong (fixed upstream, never released),
so a REKEY record from the other side is reported as an error here.

Anything the other side does that SPEC.md does not allow raises :class:`InteropError`.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

import anyio
import msgpack
from anyio.abc import ByteStream
from dissononce.cipher.aesgcm import AESGCMCipher
from dissononce.dh.x25519.private import PrivateKey
from dissononce.dh.x25519.x25519 import X25519DH
from dissononce.exceptions.decrypt import DecryptFailedException
from dissononce.hash.sha256 import SHA256Hash
from dissononce.processing.handshakepatterns.interactive.IK import IKHandshakePattern
from dissononce.processing.handshakepatterns.interactive.XX import XXHandshakePattern
from dissononce.processing.impl.cipherstate import CipherState
from dissononce.processing.impl.handshakestate import HandshakeState
from dissononce.processing.impl.symmetricstate import SymmetricState

from stalk.spack import Spack

# Section 4.
MAGIC: Final = b"STALK"
VERSION: Final = 1
PATTERNS: Final = ("XX", "IK")
PROTOCOL_NAMES: Final = {
    "XX": "Noise_XX_25519_AESGCM_SHA256",
    "IK": "Noise_IK_25519_AESGCM_SHA256",
}
# Sections 6, 10 and 17.
MAX_FRAME: Final = 65535
TAG_LEN: Final = 16
MAX_PLAINTEXT: Final = MAX_FRAME - TAG_LEN
# Section 8.
MAX_PAYLOAD: Final = 1024
MIN_MAX_MESSAGE_SIZE: Final = 1024
MAX_MAX_MESSAGE_SIZE: Final = 2**53
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
XX_MSG1_PAYLOAD: Final = b"\x80"
# Section 11.
MESSAGE: Final = 0x01
FRAGMENT: Final = 0x02
CLOSE: Final = 0x03
PING: Final = 0x04
PONG: Final = 0x05
REKEY: Final = 0x06
READY: Final = 0x07
KINDS: Final = frozenset(range(0x01, 0x08))
MAX_CONTROL_BODY: Final = 1024
# Section 16.
NORMAL: Final = 0
UNSUPPORTED: Final = 1
DECRYPT_FAILED: Final = 2
NOT_AUTHORIZED: Final = 3
PROTOCOL_ERROR: Final = 5
MESSAGE_TOO_LARGE: Final = 6


class InteropError(Exception):
    """The other side did something SPEC.md does not allow."""


class AuthenticationFailed(InteropError):
    """A handshake message did not decrypt (for IK message 1: not for our key)."""


class Truncated(InteropError):
    """EOF where SPEC.md requires more bytes (or a CLOSE first): section 13's truncation."""


class Refused(Exception):
    """A refusal verdict (section 5)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"refused with code {code}: {reason}")
        self.code = code
        self.reason = reason


class PeerClosed(Exception):
    """A CLOSE record (section 13); raised instead of READY for section 9's XX refusal."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"CLOSE with code {code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class StaticKey:
    """A static X25519 key pair, made by dissononce."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> StaticKey:
        """A fresh random key pair."""
        pair = X25519DH().generate_keypair()
        return cls(bytes(pair.private.data), bytes(pair.public.data))

    def keypair(self) -> Any:
        """dissononce's KeyPair for this key."""
        return X25519DH().generate_keypair(PrivateKey(self.private))


@dataclass(frozen=True)
class Record:
    """One parsed record (section 11)."""

    kind: int
    body: bytes


def uvarint(value: int) -> bytes:
    """Unsigned LEB128 (section 2)."""
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def read_uvarint(data: bytes, pos: int, max_len: int) -> tuple[int, int]:
    """Read a minimal uvarint of at most ``max_len`` bytes; return ``(value, new_pos)``."""
    value = 0
    for i in range(max_len):
        if pos + i >= len(data):
            raise InteropError("truncated varint")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and not byte:
                raise InteropError("non-minimal varint")
            return value, pos + i + 1
    raise InteropError(f"varint longer than {max_len} bytes")


def record(kind: int, body: bytes = b"") -> bytes:
    """``kind || channel 0 || length || body``."""
    return bytes([kind]) + uvarint(0) + uvarint(len(body)) + body


def close_record(code: int, reason: str = "") -> bytes:
    """A CLOSE record: ``code (u16) || reason``."""
    return record(CLOSE, struct.pack(">H", code) + reason.encode("utf-8"))


def decode_close(body: bytes) -> tuple[int, str]:
    """Split a CLOSE body into code and reason."""
    if len(body) < 2 or len(body) - 2 > MAX_CONTROL_BODY:
        raise InteropError(f"CLOSE body of {len(body)} bytes")
    try:
        return struct.unpack(">H", body[:2])[0], body[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InteropError("CLOSE reason is not UTF-8") from exc


def parse_records(plaintext: bytes) -> list[Record]:
    """Parse and check every record of one transport plaintext before any is used."""
    if not plaintext:
        raise InteropError("transport message with no records")
    records: list[Record] = []
    pos = 0
    while pos < len(plaintext):
        if records and records[-1].kind in (CLOSE, REKEY):
            raise InteropError(f"record after kind {records[-1].kind} in one message")
        kind = plaintext[pos]
        if kind not in KINDS:
            raise InteropError(f"unknown record kind {kind:#04x}")
        channel, pos = read_uvarint(plaintext, pos + 1, 5)
        if channel:
            raise InteropError(f"record on channel {channel}")
        length, pos = read_uvarint(plaintext, pos, 3)
        if length > len(plaintext) - pos:
            raise InteropError(f"record length {length} beyond the plaintext")
        body = plaintext[pos : pos + length]
        pos += length
        if kind in (READY, REKEY) and body:
            raise InteropError(f"non-empty body for record kind {kind}")
        if kind == FRAGMENT and not body:
            raise InteropError("empty FRAGMENT")
        if kind in (PING, PONG) and len(body) > MAX_CONTROL_BODY:
            raise InteropError("oversized PING/PONG")
        if kind == CLOSE:
            decode_close(body)
        records.append(Record(kind, body))
    return records


def encode_params(max_message_size: int, extra: dict[str, Any] | None = None) -> bytes:
    """A parameters map (section 8)."""
    fields: dict[str, Any] = {"version": VERSION, "max_message_size": max_message_size}
    fields.update(extra or {})
    return bytes(msgpack.packb(fields))


def decode_map(payload: bytes) -> dict[str, Any]:
    """A handshake payload: one msgpack map with string keys, at most 1024 bytes."""
    if len(payload) > MAX_PAYLOAD:
        raise InteropError(f"handshake payload of {len(payload)} bytes")
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:
        raise InteropError(f"handshake payload is not msgpack: {payload.hex()}") from exc
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InteropError(f"handshake payload is not a map with str keys: {payload.hex()}")
    return value


def decode_params(payload: bytes) -> dict[str, Any]:
    """A parameters map, with its two required keys checked."""
    fields = decode_map(payload)
    if type(fields.get("version")) is not int or fields["version"] != VERSION:
        raise InteropError(f"bad version in {fields}")
    size = fields.get("max_message_size")
    if type(size) is not int or not MIN_MAX_MESSAGE_SIZE <= size <= MAX_MAX_MESSAGE_SIZE:
        raise InteropError(f"bad max_message_size in {fields}")
    return fields


def refusal(code: int, reason: str) -> bytes:
    """A refusal verdict: ``code || length || reason`` (section 5)."""
    data = reason.encode("utf-8")[:255]
    return bytes([code, len(data)]) + data


def frame(body: bytes) -> bytes:
    """``length (u16) || body`` (section 6)."""
    if not 1 <= len(body) <= MAX_FRAME:
        raise ValueError(f"frame body of {len(body)} bytes")
    return struct.pack(">H", len(body)) + body


def _handshake_state(pattern: str, *, initiator: bool, prologue: bytes, **keys: Any) -> Any:
    hs = HandshakeState(SymmetricState(CipherState(AESGCMCipher()), SHA256Hash()), X25519DH())
    shape = IKHandshakePattern() if pattern == "IK" else XXHandshakePattern()
    hs.initialize(shape, initiator, prologue, **keys)
    if hs.protocol_name != PROTOCOL_NAMES[pattern]:
        raise AssertionError(f"dissononce runs {hs.protocol_name}")
    return hs


def _noise_call(fn: Callable[[bytes, bytearray], Any], message: bytes) -> tuple[bytes, Any]:
    """Run a dissononce read or write; failures become :class:`InteropError`."""
    out = bytearray()
    try:
        result = fn(message, out)
    except DecryptFailedException as exc:
        raise AuthenticationFailed("handshake message failed authentication") from exc
    except (ValueError, AssertionError, IndexError) as exc:
        raise InteropError(f"invalid handshake message: {exc!r}") from exc
    return bytes(out), result


class _Reader:
    """Exact reads from a byte stream, remembering EOF."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._eof = False

    async def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            data = await self._stream.receive(256 * 1024)
        except anyio.EndOfStream:
            self._eof = True
            return False
        self._buf += data
        return True

    async def exact(self, n: int, what: str) -> bytes:
        while len(self._buf) < n:
            if not await self._fill():
                raise Truncated(f"EOF after {len(self._buf)} of {n} bytes of {what}")
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def expect_eof(self, after: str) -> None:
        if self._buf or await self._fill():
            raise InteropError(f"{len(self._buf)} bytes after {after}: {self._buf[:16].hex()}")

    async def frame(self, what: str) -> bytes:
        (length,) = struct.unpack(">H", await self.exact(2, f"the length of {what}"))
        if length == 0:
            raise InteropError(f"zero-length frame for {what}")
        return await self.exact(length, what)


@dataclass
class Handshake:
    """What one side saw of the handshake."""

    pattern: str
    remote_static: bytes
    handshake_hash: bytes
    peer_params: dict[str, Any]
    #: every handshake payload received, in order, as sent
    payloads: list[bytes] = field(default_factory=list)


class PeerSession:
    """The transport phase (sections 10-14) over dissononce CipherStates."""

    def __init__(
        self,
        stream: ByteStream,
        reader: _Reader,
        handshake: Handshake,
        send: Any,
        recv: Any,
        max_message_size: int,
    ) -> None:
        self.stream = stream
        self.handshake = handshake
        self._reader = reader
        self._send = send
        self._recv = recv
        self._max = max_message_size
        self._pending: deque[Record] = deque()
        self._parts: list[bytes] = []
        self._close_sent = False
        self.close_received: tuple[int, str] | None = None
        #: ``(kind, body length)`` of every record received, one list per transport message
        self.received: list[list[tuple[int, int]]] = []
        #: plaintext length of every transport message received
        self.plaintext_sizes: list[int] = []
        #: bodies of the PONGs received
        self.pongs: list[bytes] = []

    # -- sending ----------------------------------------------------------------------------

    async def send_records(self, records: Sequence[bytes]) -> None:
        """Send ``records`` in one transport message."""
        if self._close_sent:
            raise AssertionError("nothing may follow our CLOSE")
        plaintext = b"".join(records)
        if not 1 <= len(plaintext) <= MAX_PLAINTEXT:
            raise ValueError(f"plaintext of {len(plaintext)} bytes")
        await self.send_plaintext(plaintext)

    async def send_plaintext(self, plaintext: bytes) -> None:
        """Encrypt and send ``plaintext`` as it is, valid or not (for negative tests)."""
        await self.stream.send(frame(bytes(self._send.encrypt_with_ad(b"", plaintext))))

    async def send(self, *spacks: Spack) -> None:
        """Send whole spacks, all in one transport message (batching)."""
        await self.send_records([record(MESSAGE, s.encode()) for s in spacks])

    async def send_fragmented(
        self,
        encoded: bytes,
        *,
        piece: int = 1000,
        per_message: int = 16,
        ping: bytes | None = None,
    ) -> None:
        """Send one spack encoding as fixed-size FRAGMENTs and a final MESSAGE.

        :param piece: bytes per record (the last one takes the rest).
        :param per_message: records per transport message.
        :param ping: a PING body to slip in after the first transport message's fragments
            (in that message if it fits, else in a message of its own).
        """
        pieces = [encoded[i : i + piece] for i in range(0, len(encoded), piece)] or [b""]
        records = [record(FRAGMENT, p) for p in pieces[:-1]] + [record(MESSAGE, pieces[-1])]
        batches = [records[i : i + per_message] for i in range(0, len(records), per_message)]
        if ping is not None:
            ping_record = record(PING, ping)
            if sum(map(len, batches[0])) + len(ping_record) <= MAX_PLAINTEXT:
                batches[0].append(ping_record)
            else:
                batches.insert(1, [ping_record])
        for batch in batches:
            await self.send_records(batch)

    async def close(self, code: int = NORMAL, reason: str = "") -> None:
        """Send CLOSE: our direction is finished."""
        await self.send_records([close_record(code, reason)])
        self._close_sent = True

    # -- receiving --------------------------------------------------------------------------

    def _take(self, plaintext: bytes, *, first: bool = False) -> list[Record]:
        records = parse_records(plaintext)
        if any(r.kind == READY for r in records[1 if first else 0 :]):
            raise InteropError("READY where section 9 does not allow it")
        self.plaintext_sizes.append(len(plaintext))
        self.received.append([(r.kind, len(r.body)) for r in records])
        return records

    async def _read_message(self) -> bytes:
        try:
            body = await self._reader.frame("a transport message")
        except Truncated as exc:
            where = "inside a fragmented spack" if self._parts else "without CLOSE"
            raise Truncated(f"EOF {where} ({exc})") from exc
        if len(body) < TAG_LEN:
            raise InteropError(f"transport message of {len(body)} bytes")
        try:
            return bytes(self._recv.decrypt_with_ad(b"", body))
        except DecryptFailedException as exc:
            raise InteropError("transport message failed authentication") from exc

    async def first_message(self) -> list[Record]:
        """Read the first transport message (section 9), parsed."""
        return self._take(await self._read_message(), first=True)

    def push_back(self, records: Sequence[Record]) -> None:
        """Keep records read with the first message for :meth:`receive_encoded`."""
        self._pending.extend(records)

    async def _next_record(self) -> Record:
        while not self._pending:
            self._pending.extend(self._take(await self._read_message()))
        return self._pending.popleft()

    async def receive_encoded(self) -> bytes:
        """The next whole spack encoding; answers PINGs on the way.

        :raises PeerClosed: the peer sent CLOSE.
        :raises Truncated: EOF without CLOSE.
        """
        if self.close_received is not None:
            raise PeerClosed(*self.close_received)
        while True:
            rec = await self._next_record()
            if rec.kind in (FRAGMENT, MESSAGE):
                if sum(map(len, self._parts)) + len(rec.body) > self._max:
                    raise InteropError(f"spack over our {self._max}-byte limit")
                self._parts.append(rec.body)
                if rec.kind == MESSAGE:
                    whole, self._parts = b"".join(self._parts), []
                    return whole
            elif rec.kind == PING:
                if not self._close_sent:
                    await self.send_records([record(PONG, rec.body)])
            elif rec.kind == PONG:
                self.pongs.append(rec.body)
            elif rec.kind == CLOSE:
                if self._parts:
                    raise InteropError("CLOSE inside a fragmented spack")
                self.close_received = decode_close(rec.body)
                raise PeerClosed(*self.close_received)
            elif rec.kind == REKEY:
                raise InteropError("REKEY received (this peer does not rekey)")

    async def receive(self) -> Spack:
        """The next spack, decoded with stalk's spack codec."""
        return Spack.decode(await self.receive_encoded())

    async def expect_close(self) -> tuple[int, str]:
        """Read up to the peer's CLOSE (no spack may come first) and check EOF follows it."""
        try:
            encoded = await self.receive_encoded()
        except PeerClosed as closed:
            await self._reader.expect_eof("CLOSE")
            return closed.code, closed.reason
        raise InteropError(f"expected CLOSE, got a spack of {len(encoded)} bytes")

    async def expect_eof(self) -> None:
        """Check the peer sent nothing after its CLOSE and closed TCP."""
        await self._reader.expect_eof("CLOSE")


def _split(result: Any, *, initiator: bool) -> tuple[Any, Any]:
    if not isinstance(result, tuple) or len(result) != 2:
        raise AssertionError("the handshake did not end with Split()")
    first, second = result
    return (first, second) if initiator else (second, first)


async def initiate(
    stream: ByteStream,
    key: StaticKey,
    responder: bytes | None = None,
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    extra_params: dict[str, Any] | None = None,
    with_ready: Sequence[bytes] = (),
) -> PeerSession:
    """Run the initiator's side: XX, or IK when ``responder`` (its static key) is given.

    :param with_ready: IK: records to send after READY in the same transport message.
    :raises Refused: a refusal verdict.
    :raises PeerClosed: XX: CLOSE instead of READY (section 9).
    """
    pattern = "XX" if responder is None else "IK"
    preamble = MAGIC + bytes([VERSION]) + pattern.encode("ascii")
    keys: dict[str, Any] = {"s": key.keypair()}
    if responder is not None:
        keys["rs"] = X25519DH().create_public(responder)
    hs = _handshake_state(pattern, initiator=True, prologue=preamble, **keys)
    params = encode_params(max_message_size, extra_params)
    msg1, _ = _noise_call(hs.write_message, XX_MSG1_PAYLOAD if pattern == "XX" else params)
    await stream.send(preamble + frame(msg1))

    reader = _Reader(stream)
    verdict = (await reader.exact(1, "the verdict"))[0]
    if verdict != 0:
        length = (await reader.exact(1, "the refusal length"))[0]
        reason = (await reader.exact(length, "the refusal reason")).decode("utf-8")
        await reader.expect_eof("a refusal")
        raise Refused(verdict, reason)
    payload, result = _noise_call(hs.read_message, await reader.frame("message 2"))
    peer_params = decode_params(payload)
    if pattern == "XX":
        msg3, result = _noise_call(hs.write_message, params)
        await stream.send(frame(msg3))
    send, recv = _split(result, initiator=True)
    handshake = Handshake(
        pattern,
        bytes(hs.rs.data),
        bytes(hs.symmetricstate.get_handshake_hash()),
        peer_params,
        [payload],
    )
    session = PeerSession(stream, reader, handshake, send, recv, max_message_size)
    if pattern == "IK":
        await session.send_records([record(READY), *with_ready])
        return session
    first = await session.first_message()
    if first[0].kind == CLOSE:
        code, reason = decode_close(first[0].body)
        await reader.expect_eof("a refusal CLOSE")
        raise PeerClosed(code, reason)
    if first[0].kind != READY:
        raise InteropError(f"first record has kind {first[0].kind}, not READY")
    session.push_back(first[1:])
    return session


async def respond(
    stream: ByteStream,
    key: StaticKey,
    *,
    authorize: Callable[[bytes], bool] | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> PeerSession:
    """Run the responder's side for whichever pattern the preamble names.

    :raises Refused: we refused the initiator (a refusal verdict, or for XX an encrypted
        CLOSE(NOT_AUTHORIZED) instead of READY, has been sent).
    :raises InteropError: the initiator broke SPEC.md.
    """
    reader = _Reader(stream)
    preamble = b""
    for expected in MAGIC:
        preamble += await reader.exact(1, "the preamble")
        if preamble[-1] != expected:
            await _refuse(stream, UNSUPPORTED, "not a stalk preamble")
    preamble += await reader.exact(3, "the preamble")
    pattern = preamble[6:].decode("ascii", "replace")
    if preamble[5] != VERSION or pattern not in PATTERNS:
        await _refuse(stream, UNSUPPORTED, f"unsupported preamble {preamble.hex()}")
    hs = _handshake_state(pattern, initiator=False, prologue=preamble, s=key.keypair())
    params = encode_params(max_message_size)
    msg1 = await reader.frame("message 1")
    peer_params: dict[str, Any] = {}
    try:
        payload1, _ = _noise_call(hs.read_message, msg1)
        if pattern == "IK":
            peer_params = decode_params(payload1)
        else:
            decode_map(payload1)
    except AuthenticationFailed:
        await _refuse(stream, DECRYPT_FAILED, "IK message 1 is not for this key")
    except InteropError as exc:
        await _refuse(stream, PROTOCOL_ERROR, str(exc))
    payloads = [payload1]
    if pattern == "IK" and authorize is not None and not authorize(bytes(hs.rs.data)):
        await _refuse(stream, NOT_AUTHORIZED, "not authorized")
    msg2, result = _noise_call(hs.write_message, params)
    await stream.send(b"\x00" + frame(msg2))
    if pattern == "XX":
        payload3, result = _noise_call(hs.read_message, await reader.frame("message 3"))
        payloads.append(payload3)
        peer_params = decode_params(payload3)
    send, recv = _split(result, initiator=False)
    handshake = Handshake(
        pattern,
        bytes(hs.rs.data),
        bytes(hs.symmetricstate.get_handshake_hash()),
        peer_params,
        payloads,
    )
    session = PeerSession(stream, reader, handshake, send, recv, max_message_size)
    if pattern == "XX":
        if authorize is not None and not authorize(handshake.remote_static):
            await session.send_records([close_record(NOT_AUTHORIZED, "not authorized")])
            raise Refused(NOT_AUTHORIZED, "not authorized")
        await session.send_records([record(READY)])
        return session
    first = await session.first_message()
    if first[0].kind != READY:
        raise InteropError(f"first record has kind {first[0].kind}, not READY")
    session.push_back(first[1:])
    return session


async def _refuse(stream: ByteStream, code: int, reason: str) -> NoReturn:
    await stream.send(refusal(code, reason))
    raise Refused(code, reason)
