"""Hostile peers: stalk's wire format spoken by hand, so that a case can send any byte.

An attacker here holds the real keys of its own side: it runs the Noise handshake with
stalk's own :class:`~stalk._noise.NoiseHandshake` (which wraps noiseprotocol) but chooses
every preamble byte, payload and public key itself, and after the handshake it encrypts
whatever plaintext it likes with its real sending cipher. Everything it sends therefore
authenticates, unless the case is about something that must not.

- :class:`Wire`: a socket with a read buffer (frames, exact reads, read-to-EOF, RST).
- :class:`Initiator` / :class:`Responder`: Noise-level handshake peers with knobs, among
  them any public key as ``e`` or ``s`` (low-order, non-canonical) and the bit-255 twin of
  their real keys (non-canonical, yet the same DH key: only a key check can refuse it).
- :class:`Transport`: the attacker's two transport ciphers; :meth:`Transport.seal` makes a
  frame out of any plaintext.
- record helpers (:func:`rec`, :func:`msg`, ...), channel records (:func:`on`,
  :func:`window`, :func:`reset`, ...: SPEC 24), the channel parameters each side offers
  (:class:`Offer`) and :class:`ChannelPeer`, a peer with channels that counts its credit
  as any sender must; the published low-order X25519 points, real TLS ClientHello bytes,
  and :class:`Proxy`, a man in the middle with byte patches.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import msgpack
from anyio.abc import SocketAttribute, SocketStream, TaskGroup
from noise.backends.default.keypairs import KeyPair25519

from stalk._noise import NoiseHandshake, TransportCipher
from stalk.framing import encode_frame, encode_preamble
from stalk.identity import Identity, PublicIdentity
from stalk.records import Record, decode_window, encode_uvarint, parse_records, read_records
from stalk.spack import Spack
from stalk.wire import PROTOCOL_NAMES, CloseCode, Pattern, RecordKind

# -- constants ---------------------------------------------------------------------------

_P: Final = 2**255 - 19


def _le(n: int) -> bytes:
    return n.to_bytes(32, "little")


_CANONICAL_LOW_ORDER: Final = {
    "zero": _le(0),
    "one": _le(1),
    "order8_a": bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    "order8_b": bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    "p_minus_1": _le(_P - 1),
    "p": _le(_P),
    "p_plus_1": _le(_P + 1),
}
#: Every published X25519 encoding whose DH output is all zeros (libsodium's blacklist and
#: the same seven values with the ignored bit 255 set: non-canonical encodings).
LOW_ORDER_POINTS: Final[dict[str, bytes]] = {
    **_CANONICAL_LOW_ORDER,
    **{
        f"{name}_bit255": _le(int.from_bytes(raw, "little") | 1 << 255)
        for name, raw in _CANONICAL_LOW_ORDER.items()
    },
}


def bit_255_twin(raw: bytes) -> bytes:
    """``raw`` with bit 255 set: a non-canonical encoding of the same X25519 key.

    X25519 ignores that bit, so a DH with the twin gives exactly the result of a DH with
    the key itself: a handshake that sends the twin of a real key succeeds unless the
    receiver refuses non-canonical keys.
    """
    return raw[:31] + bytes([raw[31] | 0x80])


#: Non-canonical encodings that are no twin of a key anyone holds (u >= p, or bit 255
#: set on such a u): refused before any DH, so no private key is needed to send them.
NON_CANONICAL_POINTS: Final[dict[str, bytes]] = {
    "p_plus_9": _le(_P + 9),  # the base point 9, unreduced
    "2_255_minus_1": _le(2**255 - 1),
    "9_bit255": _le(9 | 1 << 255),
}

#: Our handshake payload parameters, as stalk sends them.
GOOD_PARAMS: Final = {"version": 1, "max_message_size": 1 << 24}


def params(**changes: Any) -> bytes:
    """A msgpack parameters map: stalk's own, with keys changed (``None`` removes a key)."""
    fields = dict(GOOD_PARAMS)
    for key, value in changes.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    return bytes(msgpack.packb(fields))


def padded_params(size: int) -> bytes:
    """Valid parameters padded with an unknown key to exactly ``size`` bytes."""
    base = len(params(pad=b""))
    for extra in range(size):
        data = params(pad=b"\x00" * extra)
        if len(data) == size:
            return data
        if len(data) > size:
            break
    raise ValueError(f"cannot pad parameters to {size} bytes (minimum {base})")


def client_hello(*, tls12: bool) -> bytes:
    """A real TLS ClientHello, as OpenSSL writes it (via :class:`ssl.MemoryBIO`)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="stalk.example")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# -- records ----------------------------------------------------------------------------


def rec(
    kind: int,
    body: bytes = b"",
    *,
    channel: bytes = b"\x00",
    length: bytes | None = None,
) -> bytes:
    """One record, with optional raw channel and length fields (for malformed ones)."""
    size = encode_uvarint(len(body)) if length is None else length
    return bytes([kind]) + channel + size + body


def msg(spack: Spack) -> bytes:
    """A MESSAGE record carrying a whole spack."""
    return rec(RecordKind.MESSAGE, spack.encode())


def raw_msg(encoding: bytes) -> bytes:
    """A MESSAGE record carrying arbitrary bytes as a spack encoding."""
    return rec(RecordKind.MESSAGE, encoding)


def close(code: int = CloseCode.NORMAL, reason: bytes = b"") -> bytes:
    """A CLOSE record."""
    return rec(RecordKind.CLOSE, struct.pack(">H", code) + reason)


READY: Final = rec(RecordKind.READY)
REKEY: Final = rec(RecordKind.REKEY)


# -- channels (SPEC 24) ------------------------------------------------------------------------


def on(kind: int, channel: int, body: bytes = b"") -> bytes:
    """One record of ``kind`` on ``channel``."""
    return rec(kind, body, channel=encode_uvarint(channel))


def msg_on(channel: int, spack: Spack) -> bytes:
    """A MESSAGE record carrying a whole spack on ``channel`` (its first record opens it)."""
    return on(RecordKind.MESSAGE, channel, spack.encode())


def window(channel: int, increment: int) -> bytes:
    """A WINDOW record: ``increment`` more credit on ``channel`` (0 included)."""
    return on(RecordKind.WINDOW, channel, encode_uvarint(increment))


def connection_window(increment: int) -> bytes:
    """A CONNECTION_WINDOW record (channel 0): ``increment`` more for the connection."""
    return on(RecordKind.CONNECTION_WINDOW, 0, encode_uvarint(increment))


def reset(channel: int, code: int = CloseCode.NORMAL, reason: bytes = b"") -> bytes:
    """A RESET record: ``channel``'s both directions end with ``code`` and ``reason``."""
    return on(RecordKind.RESET, channel, struct.pack(">H", code) + reason)


def channel_close(channel: int, body: bytes = b"\x00\x00") -> bytes:
    """A CLOSE record on ``channel``: its sender's direction ends (body exactly ``00 00``)."""
    return on(RecordKind.CLOSE, channel, body)


@dataclass(frozen=True)
class Offer:
    """The three channel parameters of a handshake payload (SPEC 8 and 24)."""

    max_channels: int
    channel_window: int
    connection_window: int

    def params(self) -> bytes:
        """Our parameters map offering these."""
        return params(
            max_channels=self.max_channels,
            channel_window=self.channel_window,
            connection_window=self.connection_window,
        )

    @classmethod
    def of(cls, payload: bytes) -> Offer:
        """What the peer's parameters map offers (a payload without channels: error)."""
        fields = msgpack.unpackb(payload)
        return cls(fields["max_channels"], fields["channel_window"], fields["connection_window"])


#: A well-formed spack placed in the same Noise message as a bad record: it must never
#: reach the application, because nothing of a rejected message is delivered.
POISON: Final = Spack("poison: from a rejected Noise message")


# -- the wire ---------------------------------------------------------------------------


class Wire:
    """A socket stream with a read buffer: the hostile side of one connection."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        #: Our port: the listener logs and registers the connection under it.
        self.local_port = int(stream.extra(SocketAttribute.local_port))
        self.buf = bytearray()
        self.eof = False
        self.received = bytearray()  # everything ever read, for the refusal/CLOSE check
        #: When set, :meth:`send` cuts its data into these pieces, one write each, with
        #: ``pause`` seconds between them (to make the peer's reads split there).
        self.splitter: Callable[[bytes], list[bytes]] | None = None
        self.pause = 0.0

    @classmethod
    async def connect(cls, host: str, port: int) -> Wire:
        """Open a TCP connection."""
        return cls(await anyio.connect_tcp(host, port))

    async def send(self, data: bytes) -> None:
        """Write bytes (errors from a peer that already hung up are ignored)."""
        pieces = self.splitter(data) if self.splitter else [data]
        for i, piece in enumerate(pieces):
            if i:
                await anyio.sleep(self.pause)  # the point: pieces apart in time
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self.stream.send(piece)

    async def trickle(self, data: bytes, chunk: int = 1, pause: float = 0.0) -> None:
        """Write ``data`` in ``chunk``-byte writes (TCP_NODELAY is on: separate segments)."""
        for i in range(0, len(data), chunk):
            await self.send(data[i : i + chunk])
            await anyio.sleep(pause)  # the point: a trickle

    async def send_eof(self) -> None:
        """Half-close: the peer reads EOF, we can still read its answer."""
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await self.stream.send_eof()

    async def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.eof = True
            return False
        self.buf += data
        self.received += data
        return True

    async def read_exact(self, n: int) -> bytes | None:
        """``n`` bytes, or ``None`` if the stream ends first."""
        while len(self.buf) < n:
            if not await self._fill():
                return None
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_frame(self) -> bytes | None:
        """One frame body, or ``None`` at EOF; cancelled, it consumes nothing."""
        while len(self.buf) < 2 or len(self.buf) < 2 + int.from_bytes(self.buf[:2], "big"):
            if not await self._fill():
                return None
        end = 2 + int.from_bytes(self.buf[:2], "big")
        body = bytes(self.buf[2:end])
        del self.buf[:end]
        return body

    async def read_to_eof(self) -> bytes:
        """Everything until the peer closes; returns what was not consumed before."""
        while await self._fill():
            pass
        data = bytes(self.buf)
        self.buf.clear()
        return data

    async def aclose(self) -> None:
        """Close our socket."""
        await self.stream.aclose()

    async def reset(self) -> None:
        """Close with a TCP RST instead of a FIN (SO_LINGER 0)."""
        raw = self.stream.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()


# -- the handshake ------------------------------------------------------------------------


def _patch_ephemeral(noise: NoiseHandshake, public: bytes) -> None:
    """Make the next ``e`` token send ``public`` (we keep a real private key for our DH)."""
    pair = KeyPair25519.from_private_bytes(os.urandom(32))
    pair.public_bytes = public
    noise._engine._hs.e = pair  # type: ignore[union-attr]


def _patch_ephemeral_twin(noise: NoiseHandshake) -> None:
    """Make the next ``e`` token send the bit-255 twin of a real ephemeral key."""
    pair = KeyPair25519.from_private_bytes(os.urandom(32))
    pair.public_bytes = bit_255_twin(pair.public_bytes)
    noise._engine._hs.e = pair  # type: ignore[union-attr]


def _patch_static(noise: NoiseHandshake, public: bytes) -> None:
    """Make the ``s`` token send ``public`` (encrypted, so the victim decrypts it fine).

    The key pair is replaced, not edited: stalk caches one key pair object per static
    private key, and editing it would make every later handshake with that key send
    ``public`` too. Our own DH keeps using the real private key.
    """
    real = noise._engine._hs.s  # type: ignore[union-attr]
    noise._engine._hs.s = KeyPair25519(  # type: ignore[union-attr]
        private=real.private, public=real.public, public_bytes=public
    )


def _patch_keys(
    noise: NoiseHandshake, e: bytes | None, s: bytes | None, *, twin_e: bool, twin_s: bool
) -> None:
    """Apply an :class:`Initiator`'s or :class:`Responder`'s key knobs."""
    if e is not None:
        _patch_ephemeral(noise, e)
    if twin_e:
        _patch_ephemeral_twin(noise)
    if s is not None:
        _patch_static(noise, s)
    if twin_s:
        _patch_static(noise, bit_255_twin(noise._engine._hs.s.public_bytes))  # type: ignore[union-attr]


@dataclass
class Transport:
    """The attacker's transport phase: real ciphers, arbitrary plaintexts."""

    send: TransportCipher
    recv: TransportCipher
    #: The connection has channels: the victim's records are parsed as SPEC 24 allows.
    channels: bool = False

    def seal(self, plaintext: bytes) -> bytes:
        """One frame: ``plaintext`` encrypted with the next sending nonce."""
        return encode_frame(self.send.encrypt(plaintext))

    def spacks(self, *spacks: Spack) -> bytes:
        """One Noise message carrying ``spacks`` as MESSAGE records."""
        return self.seal(b"".join(msg(s) for s in spacks))

    def open(self, body: bytes) -> list[Record]:
        """Decrypt and parse one frame body from the victim."""
        plaintext = self.recv.decrypt(body)
        if self.channels:
            return read_records(memoryview(plaintext), 0, None, channels=True)[0]
        return parse_records(plaintext)


def frames(data: bytes) -> list[bytes]:
    """Split a byte string made of whole frames into those frames (headers included)."""
    out = []
    while data:
        end = 2 + int.from_bytes(data[:2], "big")
        out.append(data[:end])
        data = data[end:]
    return out


def peer_records(transport: Transport | None, data: bytes) -> list[Record]:
    """The records in a stream of transport frames (best effort: stops at garbage)."""
    records: list[Record] = []
    if transport is None:
        return records
    try:
        for frame in frames(data):
            records.extend(transport.open(frame[2:]))
    except Exception:
        return records
    return records


def close_codes(records: list[Record]) -> list[int]:
    """The codes of the connection's CLOSE records among ``records`` (not a channel's)."""
    return [
        int.from_bytes(record.body[:2], "big")
        for record in records
        if record.kind is RecordKind.CLOSE and record.channel == 0
    ]


@dataclass
class Initiator:
    """A hand-driven stalk initiator (the client side of the handshake) with knobs.

    :param server: the responder's key: IK when given (unless ``pattern`` says otherwise).
    :param preamble: the 8 bytes sent first (default: the true preamble of ``pattern``).
    :param prologue: the Noise prologue (default: the preamble; differ to forge a MITM).
    :param msg1_payload: IK: our parameters; XX: the cleartext map (default ``80``).
    :param msg3_payload: XX: our parameters.
    :param low_e: send this (low-order or non-canonical) public key as ``e``.
    :param low_s: send this (low-order or non-canonical) public key as ``s``.
    :param twin_e: send the bit-255 twin of our real ephemeral key as ``e`` (our DH works).
    :param twin_s: send the bit-255 twin of our real static key as ``s`` (our DH works).
    """

    server: PublicIdentity | None = None
    identity: Identity = field(default_factory=Identity.generate)
    pattern: Pattern | None = None
    preamble: bytes | None = None
    prologue: bytes | None = None
    msg1_payload: bytes | None = None
    msg3_payload: bytes | None = None
    low_e: bytes | None = None
    low_s: bytes | None = None
    twin_e: bool = False
    twin_s: bool = False
    #: XX: message 3 as sent (framed), once :func:`client_handshake` sent it.
    msg3_frame: bytes = b""
    #: The responder's parameters (message 2's payload), once :func:`client_handshake`
    #: read them.
    msg2_payload: bytes = b""

    def __post_init__(self) -> None:
        pattern: Pattern = self.pattern or ("IK" if self.server is not None else "XX")
        self.pattern = pattern
        true_preamble = encode_preamble(1, pattern)
        self.preamble = true_preamble if self.preamble is None else self.preamble
        self.noise = NoiseHandshake(
            PROTOCOL_NAMES[pattern],
            initiator=True,
            prologue=self.prologue if self.prologue is not None else true_preamble,
            static_private=self.identity.private_bytes(),
            remote_static_public=self.server.raw if pattern == "IK" and self.server else None,
            reference=True,  # noiseprotocol: _patch_keys alters its state
        )
        _patch_keys(self.noise, self.low_e, self.low_s, twin_e=self.twin_e, twin_s=self.twin_s)
        if self.msg1_payload is None:
            self.msg1_payload = params() if pattern == "IK" else b"\x80"
        if self.msg3_payload is None:
            self.msg3_payload = params()

    def msg1(self) -> bytes:
        """Handshake message 1 (not framed)."""
        assert self.msg1_payload is not None
        return self.noise.write_message(self.msg1_payload)

    def opening(self) -> bytes:
        """Preamble and framed message 1: what an initiator writes first."""
        assert self.preamble is not None
        return self.preamble + encode_frame(self.msg1())

    def read_msg2(self, body: bytes) -> bytes:
        """Read message 2; return its payload."""
        return self.noise.read_message(body)

    def msg3(self) -> bytes:
        """XX message 3 (not framed)."""
        assert self.msg3_payload is not None
        return self.noise.write_message(self.msg3_payload)

    def transport(self) -> Transport:
        """The transport ciphers, once the handshake is complete."""
        send, recv = self.noise.split()
        return Transport(send, recv)


class Refused(Exception):
    """The victim refused: a refusal verdict, or (XX) a first transport message not READY.

    :ivar code: the refusal code, or the code of the CLOSE sent instead of READY
        (``None`` when that message held no CLOSE).
    """

    def __init__(self, code: int | None) -> None:
        super().__init__(f"refused with code {code}")
        self.code = code


async def read_verdict(wire: Wire) -> int | None:
    """The verdict byte (0 = accepted), or ``None`` at EOF."""
    verdict = await wire.read_exact(1)
    return None if verdict is None else verdict[0]


async def client_handshake(
    wire: Wire, init: Initiator, *, ready: bool = True, opening: bytes | None = None
) -> Transport:
    """Run the handshake against a stalk responder with real keys.

    :param ready: IK: send READY as the first transport message (else the case does).
    :param opening: bytes to send instead of ``init.opening()``.
    :raises Refused: the responder refused (the case decides whether that is expected).
    :raises EOFError: the responder closed the connection.
    """
    await wire.send(init.opening() if opening is None else opening)
    verdict = await read_verdict(wire)
    if verdict is None:
        raise EOFError("no verdict")
    if verdict:
        raise Refused(verdict)
    body = await wire.read_frame()
    if body is None:
        raise EOFError("no message 2")
    init.msg2_payload = init.read_msg2(body)
    if init.pattern == "XX":
        init.msg3_frame = encode_frame(init.msg3())
        await wire.send(init.msg3_frame)
        transport = init.transport()
        first = await wire.read_frame()
        if first is None:
            raise EOFError("no READY")
        records = transport.open(first)
        if [r.kind for r in records[:1]] != [RecordKind.READY]:
            codes = close_codes(records)
            raise Refused(codes[0] if codes else None)
        return transport
    transport = init.transport()
    if ready:
        await wire.send(transport.seal(READY))
    return transport


@dataclass
class Responder:
    """A hand-driven stalk responder (a malicious server) with knobs.

    :param identity: our static key (an IK client must pin its public half).
    :param prologue: the Noise prologue (default: the preamble as received).
    :param msg2_payload: our parameters (default: stalk's).
    :param low_e: send this (low-order or non-canonical) public key as ``e``.
    :param low_s: XX: send this (low-order or non-canonical) public key as ``s``.
    :param twin_e: send the bit-255 twin of our real ephemeral key as ``e`` (our DH works).
    :param twin_s: XX: send the bit-255 twin of our real static key as ``s``.
    """

    identity: Identity = field(default_factory=Identity.generate)
    prologue: bytes | None = None
    msg2_payload: bytes | None = None
    low_e: bytes | None = None
    low_s: bytes | None = None
    twin_e: bool = False
    twin_s: bool = False
    pattern: Pattern | None = None
    noise: NoiseHandshake | None = None

    def start(self, preamble: bytes) -> None:
        """Set up Noise for the pattern the preamble names."""
        pattern: Pattern = "IK" if preamble[6:8] == b"IK" else "XX"
        self.pattern = pattern
        self.noise = NoiseHandshake(
            PROTOCOL_NAMES[pattern],
            initiator=False,
            prologue=self.prologue if self.prologue is not None else preamble,
            static_private=self.identity.private_bytes(),
            reference=True,  # noiseprotocol: _patch_keys alters its state
        )
        _patch_keys(self.noise, self.low_e, self.low_s, twin_e=self.twin_e, twin_s=self.twin_s)

    def msg2(self) -> bytes:
        """Message 2 (not framed)."""
        assert self.noise is not None
        return self.noise.write_message(
            params() if self.msg2_payload is None else self.msg2_payload
        )

    def transport(self) -> Transport:
        """The transport ciphers, once the handshake is complete."""
        assert self.noise is not None
        send, recv = self.noise.split()
        return Transport(send, recv)


async def server_handshake(wire: Wire, resp: Responder, *, ready: bool = True) -> Transport:
    """Run the responder's half of a real handshake with a stalk initiator.

    :param ready: XX: send READY after message 3 (else the case sends what it likes).
    :raises EOFError: the initiator left.
    """
    preamble = await wire.read_exact(8)
    if preamble is None:
        raise EOFError("no preamble")
    resp.start(preamble)
    assert resp.noise is not None
    body = await wire.read_frame()
    if body is None:
        raise EOFError("no message 1")
    resp.noise.read_message(body)
    await wire.send(b"\x00" + encode_frame(resp.msg2()))
    if resp.pattern == "IK":
        transport = resp.transport()
        first = await wire.read_frame()  # the initiator's READY
        if first is None:
            raise EOFError("no READY")
        transport.open(first)
        return transport
    body = await wire.read_frame()
    if body is None:
        raise EOFError("no message 3")
    resp.noise.read_message(body)
    transport = resp.transport()
    if ready:
        await wire.send(transport.seal(READY))
    return transport


async def server_opening(wire: Wire) -> bytes | None:
    """Read an initiator's preamble and message 1 frame without answering."""
    preamble = await wire.read_exact(8)
    body = await wire.read_frame()
    if preamble is None or body is None:
        return None
    return preamble + encode_frame(body)


# -- a peer with channels -------------------------------------------------------------------


@dataclass
class ChannelPeer:
    """A hostile peer once channels are on (SPEC 24): its socket, ciphers and credit.

    :ivar theirs: what the victim offered (its limit and the windows it grants us).
    :ivar sent: data bytes we sent on each channel (0 included), and in all.
    :ivar granted: credit the victim granted since, on each channel, and in all.
    """

    wire: Wire
    transport: Transport
    theirs: Offer
    sent: dict[int, int] = field(default_factory=dict)
    granted: dict[int, int] = field(default_factory=dict)
    sent_total: int = 0
    granted_total: int = 0

    def credit(self, channel: int) -> int:
        """What we may still send on ``channel`` (a fresh one included)."""
        spent = self.sent.get(channel, 0) - self.granted.get(channel, 0)
        return self.theirs.channel_window - spent

    @property
    def connection_credit(self) -> int:
        """What we may still send on the connection."""
        return self.theirs.connection_window + self.granted_total - self.sent_total

    def data(self, kind: RecordKind, channel: int, body: bytes) -> bytes:
        """A MESSAGE or FRAGMENT record, its body counted as spent."""
        self.sent[channel] = self.sent.get(channel, 0) + len(body)
        self.sent_total += len(body)
        return on(kind, channel, body)

    def spack(self, channel: int, spack: Spack) -> bytes:
        """A MESSAGE record carrying ``spack`` on ``channel``, counted as spent."""
        return self.data(RecordKind.MESSAGE, channel, spack.encode())

    def seal(self, *records: bytes) -> bytes:
        """One Noise message holding ``records``."""
        return self.transport.seal(b"".join(records))

    async def records(self) -> list[Record]:
        """The victim's next Noise message, its credit grants counted.

        :raises EOFError: the victim closed the connection.
        """
        body = await self.wire.read_frame()
        if body is None:
            raise EOFError("the victim closed the connection")
        records = self.transport.open(body)
        for record in records:
            if record.kind is RecordKind.CONNECTION_WINDOW:
                self.granted_total += decode_window(record.body)
            elif record.kind is RecordKind.WINDOW:
                channel = record.channel
                self.granted[channel] = self.granted.get(channel, 0) + decode_window(record.body)
        return records

    async def until(self, predicate: Callable[[Record], bool]) -> None:
        """Read the victim's messages until one of its records satisfies ``predicate``."""
        while not any(predicate(record) for record in await self.records()):
            pass


async def channel_handshake(
    wire: Wire, ours: Offer, server: PublicIdentity | None = None
) -> ChannelPeer:
    """Run the handshake as an initiator offering ``ours``; the peer once channels are on.

    :param server: the victim's key (IK), or ``None`` (XX).
    """
    offer = ours.params()
    init = Initiator(server=server, msg1_payload=offer if server else None, msg3_payload=offer)
    transport = await client_handshake(wire, init)
    transport.channels = True
    return ChannelPeer(wire, transport, Offer.of(init.msg2_payload))


# -- a man in the middle ----------------------------------------------------------------------


class Patch:
    """XOR masks at absolute offsets of one direction of a byte stream."""

    def __init__(self, masks: dict[int, int] | None = None) -> None:
        self.masks = masks or {}
        self.offset = 0

    def __call__(self, data: bytes) -> bytes:
        out = bytearray(data)
        for offset, mask in self.masks.items():
            if self.offset <= offset < self.offset + len(data):
                out[offset - self.offset] ^= mask
        self.offset += len(data)
        return bytes(out)


@dataclass
class Proxy:
    """Relays connections to ``upstream``, patching and recording both directions."""

    upstream: tuple[str, int]
    c2s: Callable[[bytes], bytes] = field(default_factory=Patch)
    s2c: Callable[[bytes], bytes] = field(default_factory=Patch)
    c2s_log: bytearray = field(default_factory=bytearray)
    s2c_log: bytearray = field(default_factory=bytearray)
    upstream_ports: list[int] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)
    port: int = 0

    async def _pump(
        self,
        src: SocketStream,
        dst: SocketStream,
        transform: Callable[[bytes], bytes],
        log: bytearray,
    ) -> None:
        """Relay one direction, patched and logged (a socket relay, not helpers.pump)."""
        with contextlib.suppress(
            anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
        ):
            while True:
                data = transform(await src.receive())
                log += data
                await dst.send(data)
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await dst.send_eof()

    async def _relay(self, client: SocketStream) -> None:
        async with client, await anyio.connect_tcp(*self.upstream) as server:
            self.upstream_ports.append(int(server.extra(SocketAttribute.local_port)))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, server, self.c2s, self.c2s_log)
                tg.start_soon(self._pump, server, client, self.s2c, self.s2c_log)
        self.done.set()


@contextlib.asynccontextmanager
async def proxy(
    upstream: tuple[str, int],
    *,
    c2s: Callable[[bytes], bytes] | None = None,
    s2c: Callable[[bytes], bytes] | None = None,
) -> AsyncIterator[Proxy]:
    """Run a :class:`Proxy` on a fresh loopback port while the block runs."""
    relay = Proxy(upstream, c2s=c2s or Patch(), s2c=s2c or Patch())
    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):
        relay.port = int(listener.extra(SocketAttribute.local_port))
        tg.start_soon(listener.serve, relay._relay, tg)
        yield relay
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def raw_server(
    behave: Callable[[Wire], Any],
) -> AsyncIterator[tuple[int, TaskGroup]]:
    """A plain TCP listener running ``behave(wire)`` for the (first) connection."""
    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):

        async def one(stream: SocketStream) -> None:
            wire = Wire(stream)
            try:
                await behave(wire)
            finally:
                await wire.aclose()

        tg.start_soon(listener.serve, one, tg)
        yield int(listener.extra(SocketAttribute.local_port)), tg
        tg.cancel_scope.cancel()


def chunks(size: int) -> Callable[[bytes], list[bytes]]:
    """A :attr:`Wire.splitter`: pieces of ``size`` bytes."""
    return lambda data: [data[i : i + size] for i in range(0, len(data), size)]


def random_chunks(seed: int, largest: int) -> Callable[[bytes], list[bytes]]:
    """A :attr:`Wire.splitter`: pieces of 1..``largest`` bytes from a seeded generator."""
    rng = random.Random(seed)

    def split(data: bytes) -> list[bytes]:
        pieces = []
        while data:
            size = rng.randint(1, largest)
            pieces.append(data[:size])
            data = data[size:]
        return pieces

    return split


def split_headers(data: bytes) -> list[bytes]:
    """A :attr:`Wire.splitter`: cut every frame between the two bytes of its length."""
    pieces = []
    pos = 8 if data.startswith(b"STALK") else 0
    start = 0
    while pos + 2 <= len(data):
        pieces.append(data[start : pos + 1])
        start = pos + 1
        pos += 2 + int.from_bytes(data[pos : pos + 2], "big")
    pieces.append(data[start:])
    return [piece for piece in pieces if piece]
