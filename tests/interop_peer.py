"""An independent stalk peer built on dissononce, written from SPEC.md alone.

It shares nothing with stalk's framing, record, handshake, session or Noise modules: the
preamble, verdict, frames, handshake payloads and records below are written from SPEC.md
sections 3-18, and Noise is dissononce's (``Noise_{XX,IK}_25519_AESGCM_SHA256``). Only the
spack bytes come from :mod:`stalk.spack` (section 19 is stalk's codec). dissononce 0.34.3's
``Rekey()`` is wrong (fixed upstream, never released): :class:`PeerSession` and
:class:`ChannelPeer` never rekey and report a REKEY record from the other side as an error;
:class:`ScriptedPeer` rekeys with its own :func:`rekey`, written from section 15.

Channels (section 24) are written from SPEC.md alone too, without reading stalk's
implementation of them: :class:`ChannelOffer` offers them in the handshake, and when both
sides did, :class:`ChannelPeer` runs the connection (ids by parity and implicit opening,
credit and splitting, per-channel reassembly, the receiver's liveness duty, channel CLOSE,
RESET and its answer). Where SPEC.md leaves a choice open, the comments say which one this
peer makes.

:class:`ScriptedPeer` replays the transcripts of ``vectors/`` (section 22) without I/O: it
makes the choices SPEC.md says stalk makes (sections 8, 12, 15 and 24's "How stalk sends
and grants"), so the calls a transcript records must make it write the recorded bytes.

Certificates (section 25) are written from SPEC.md alone as well, with ``cryptography``'s
Ed25519 as any implementer would use: :func:`issue_certificate` encodes and signs one,
:class:`CertificateCheck` runs section 25's checks in its order, and :func:`initiate`,
:func:`respond` and :class:`ScriptedPeer` present a certificate and check the peer's.

Anything the other side does that SPEC.md does not allow raises :class:`InteropError`, with
the close code SPEC.md gives for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

import anyio
import msgpack
from anyio.abc import ByteStream
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from dissononce.cipher.aesgcm import AESGCMCipher
from dissononce.dh.x25519.private import PrivateKey
from dissononce.dh.x25519.x25519 import X25519DH
from dissononce.exceptions.decrypt import DecryptFailedException
from dissononce.extras.dh.dangerous.dh_nogen import NoGenDH
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
MAX_PAYLOAD: Final = 3072
MAX_XX_MSG1_PAYLOAD: Final = 1024
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
RESET: Final = 0x08
WINDOW: Final = 0x09
CONNECTION_WINDOW: Final = 0x0A
KINDS: Final = frozenset(range(0x01, 0x08))
CHANNEL_KINDS: Final = frozenset(range(0x01, 0x0B))
MAX_CONTROL_BODY: Final = 1024
# Sections 8, 17 and 24.
MAX_CHANNEL_ID: Final = 2**31 - 1
MAX_CREDIT: Final = 2**31 - 1
MAX_MAX_CHANNELS: Final = 65535
MIN_CHANNEL_WINDOW: Final = 1024
MIN_CONNECTION_WINDOW: Final = 65516
CHANNEL_KEYS: Final = ("max_channels", "channel_window", "connection_window")
#: the largest data body that fits a plaintext with the largest record header (1 + 5 + 3)
MAX_DATA_BODY: Final = MAX_PLAINTEXT - 9
# Section 16.
NORMAL: Final = 0
UNSUPPORTED: Final = 1
DECRYPT_FAILED: Final = 2
NOT_AUTHORIZED: Final = 3
PROTOCOL_ERROR: Final = 5
MESSAGE_TOO_LARGE: Final = 6
CHANNEL_LIMIT: Final = 11
FLOW_CONTROL_ERROR: Final = 12
CERTIFICATE_REFUSED: Final = 13


class InteropError(Exception):
    """The other side did something SPEC.md does not allow.

    :ivar code: the close code SPEC.md gives for it (section 16).
    """

    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class LocalError(Exception):
    """This peer was asked to do something SPEC.md does not allow (a test's mistake)."""


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
class ChannelOffer:
    """The three channel parameters one side sends (sections 8 and 24)."""

    max_channels: int
    channel_window: int
    connection_window: int

    def params(self) -> dict[str, int]:
        """The parameters map entries."""
        return {
            "max_channels": self.max_channels,
            "channel_window": self.channel_window,
            "connection_window": self.connection_window,
        }


@dataclass(frozen=True)
class Record:
    """One parsed record (section 11)."""

    kind: int
    body: bytes
    channel: int = 0


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


def record(kind: int, body: bytes = b"", channel: int = 0) -> bytes:
    """``kind || channel || length || body``."""
    return bytes([kind]) + uvarint(channel) + uvarint(len(body)) + body


def close_record(code: int, reason: str = "") -> bytes:
    """A CLOSE record: ``code (u16) || reason``."""
    return record(CLOSE, struct.pack(">H", code) + reason.encode("utf-8"))


def reset_record(channel: int, code: int = NORMAL, reason: str = "") -> bytes:
    """A RESET record on ``channel``: ``code (u16) || reason`` (sections 11 and 24)."""
    return record(RESET, struct.pack(">H", code) + reason.encode("utf-8"), channel)


def window_record(channel: int, increment: int) -> bytes:
    """WINDOW: ``increment`` more credit on ``channel`` (channel 0 included)."""
    return record(WINDOW, uvarint(increment), channel)


def connection_window_record(increment: int) -> bytes:
    """CONNECTION_WINDOW (always on channel 0)."""
    return record(CONNECTION_WINDOW, uvarint(increment))


def decode_close(body: bytes, what: str = "CLOSE") -> tuple[int, str]:
    """Split a CLOSE (or RESET) body into code and reason."""
    if len(body) < 2 or len(body) - 2 > MAX_CONTROL_BODY:
        raise InteropError(f"{what} body of {len(body)} bytes")
    try:
        return struct.unpack(">H", body[:2])[0], body[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InteropError(f"{what} reason is not UTF-8") from exc


def decode_increment(body: bytes) -> int:
    """A WINDOW or CONNECTION_WINDOW body: one uvarint of 1..2^31-1, nothing after."""
    value, end = read_uvarint(body, 0, 5)
    if end != len(body):
        raise InteropError(f"{len(body) - end} bytes after a window increment")
    # Section 24: an increment outside 1..2^31-1 is a malformed record (PROTOCOL_ERROR),
    # whatever the credit; FLOW_CONTROL_ERROR is for credit taken past 2^31-1.
    if not 1 <= value <= MAX_CREDIT:
        raise InteropError(f"window increment {value}")
    return value


def parse_records(plaintext: bytes, *, channels: bool = False) -> list[Record]:
    """Parse and check every record of one transport plaintext before any is used.

    :param channels: the connection has channels (section 24): kinds ``08``-``0a`` and
        channels other than 0 are allowed where section 24's table allows them.
    """
    if not plaintext:
        raise InteropError("transport message with no records")
    kinds = CHANNEL_KINDS if channels else KINDS
    records: list[Record] = []
    pos = 0
    while pos < len(plaintext):
        if records:
            last = records[-1]
            # With channels a channel's CLOSE need not be the last record (section 24).
            if last.kind == REKEY or (last.kind == CLOSE and last.channel == 0):
                raise InteropError(f"record after kind {last.kind} in one message")
        kind = plaintext[pos]
        if kind not in kinds:
            raise InteropError(f"unknown record kind {kind:#04x}")
        channel, pos = read_uvarint(plaintext, pos + 1, 5)
        if channel and not channels:
            raise InteropError(f"record on channel {channel}")
        if channel > MAX_CHANNEL_ID:
            raise InteropError(f"channel id {channel} beyond 2^31-1")
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
        if channel and kind in (PING, PONG, REKEY, READY, CONNECTION_WINDOW):
            raise InteropError(f"record kind {kind} on channel {channel}")
        if kind == RESET and not channel:
            raise InteropError("RESET on channel 0")
        if kind == CLOSE:
            if channel and body != b"\x00\x00":
                raise InteropError(f"channel CLOSE with body {body.hex()}, not 00 00")
            decode_close(body)
        elif kind == RESET:
            decode_close(body, "RESET")
        elif kind in (WINDOW, CONNECTION_WINDOW):
            decode_increment(body)
        records.append(Record(kind, body, channel))
    return records


def encode_params(
    max_message_size: int,
    extra: dict[str, Any] | None = None,
    channels: ChannelOffer | None = None,
) -> bytes:
    """A parameters map (section 8), with the channel parameters when ``channels``."""
    fields: dict[str, Any] = {"version": VERSION, "max_message_size": max_message_size}
    fields.update(channels.params() if channels else {})
    fields.update(extra or {})
    return bytes(msgpack.packb(fields))


def decode_map(payload: bytes, limit: int = MAX_PAYLOAD) -> dict[str, Any]:
    """A handshake payload: one msgpack map with string keys, at most ``limit`` bytes."""
    if len(payload) > limit:
        raise InteropError(f"handshake payload of {len(payload)} bytes")
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:
        raise InteropError(f"handshake payload is not msgpack: {payload.hex()}") from exc
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InteropError(f"handshake payload is not a map with str keys: {payload.hex()}")
    return value


def _int_field(fields: dict[str, Any], key: str, low: int, high: int) -> int:
    value = fields.get(key)
    if type(value) is not int or not low <= value <= high:
        raise InteropError(f"bad {key} in {fields}")
    return value


def decode_params(payload: bytes) -> dict[str, Any]:
    """A parameters map, with its two required keys and the channel keys checked."""
    fields = decode_map(payload)
    _int_field(fields, "version", VERSION, VERSION)
    _int_field(fields, "max_message_size", MIN_MAX_MESSAGE_SIZE, MAX_MAX_MESSAGE_SIZE)
    present = [key for key in CHANNEL_KEYS if key in fields]
    if present and len(present) != len(CHANNEL_KEYS):
        raise InteropError(f"channel parameters {present} without the others")
    if present:
        _int_field(fields, "max_channels", 0, MAX_MAX_CHANNELS)
        _int_field(fields, "channel_window", MIN_CHANNEL_WINDOW, MAX_CREDIT)
        _int_field(fields, "connection_window", MIN_CONNECTION_WINDOW, MAX_CREDIT)
    if "certificate" in fields and type(fields["certificate"]) is not bytes:
        raise InteropError(f"the certificate is not a bin in {fields}")
    return fields


def channel_offer(fields: dict[str, Any]) -> ChannelOffer | None:
    """The channel parameters of a checked parameters map, if it has them."""
    if "max_channels" not in fields:
        return None
    return ChannelOffer(*(fields[key] for key in CHANNEL_KEYS))


# -- certificates (section 25) ----------------------------------------------------------------

CERTIFICATE_VERSION: Final = 1
CERTIFICATE_CONTEXT: Final = b"stalk certificate 1\x00"
MAX_CERTIFICATE: Final = 2048
MAX_CERT_NAME: Final = 128
MAX_GROUPS: Final = 16
MAX_GROUP: Final = 32
MAX_EXTENSIONS: Final = 4
MAX_EXTENSION_ID: Final = 32
MAX_EXTENSION_VALUE: Final = 256
MAX_TIME: Final = 2**63 - 1
MAX_SERIAL: Final = 2**64 - 1
SIGNATURE_TAIL: Final = 66  # c4 40 and the 64-byte signature
FIELD_P: Final = 2**255 - 19
#: What this peer says when it refuses a certificate: no field of it (section 21).
REFUSED_REASON: Final = "certificate refused"


class CertificateRefused(InteropError):
    """A certificate failed one of section 25's checks.

    :ivar check: which one, by the name of stalk's error in section 25's table (the first
        that failed, in the table's order).
    """

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}", CERTIFICATE_REFUSED)
        self.check = check


def _mp_uint(value: int) -> bytes:
    """A positive int in its shortest msgpack form."""
    if value < 0x80:
        return bytes([value])
    for head, size in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if value < 1 << (8 * size):
            return bytes([head]) + value.to_bytes(size, "big")
    raise ValueError(f"{value} is too large")


def _mp_str(text: str) -> bytes:
    data = text.encode("utf-8")
    head = bytes([0xA0 | len(data)]) if len(data) < 32 else bytes([0xD9, len(data)])
    return head + data


def _mp_bin(data: bytes) -> bytes:
    if len(data) < 256:
        return bytes([0xC4, len(data)]) + data
    return b"\xc5" + struct.pack(">H", len(data)) + data


def _mp_array(count: int) -> bytes:
    return bytes([0x90 | count]) if count < 16 else b"\xdc" + struct.pack(">H", count)


@dataclass(frozen=True)
class PeerCertificate:
    """A certificate's ten fields (section 25, "Certificate format")."""

    serial: int
    subject: bytes
    name: str
    groups: tuple[str, ...]
    not_before: int
    not_after: int
    issuer: bytes
    extensions: tuple[tuple[str, bool, bytes], ...]
    signature: bytes

    def body(self) -> bytes:
        """Its canonical bytes before the signature: what the signature covers."""
        parts = [
            b"\x9a",
            _mp_uint(CERTIFICATE_VERSION),
            _mp_uint(self.serial),
            _mp_bin(self.subject),
            _mp_str(self.name),
            _mp_array(len(self.groups)),
            *map(_mp_str, self.groups),
            _mp_uint(self.not_before),
            _mp_uint(self.not_after),
            _mp_bin(self.issuer),
            _mp_array(len(self.extensions)),
        ]
        for ext_id, critical, value in self.extensions:
            parts += [b"\x93", _mp_str(ext_id), b"\xc3" if critical else b"\xc2", _mp_bin(value)]
        return b"".join(parts)

    def encoded(self) -> bytes:
        """Its one canonical encoding."""
        return self.body() + _mp_bin(self.signature)


def authority_public(seed: bytes) -> bytes:
    """The 32-byte Ed25519 public key of an authority's private key (RFC 8032 seed)."""
    return (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def issuer_id(authority: bytes) -> bytes:
    """An authority's issuer id: SHA-256 of its 32-byte public key."""
    return hashlib.sha256(authority).digest()


def issue_certificate(
    seed: bytes,
    *,
    serial: int,
    subject: bytes,
    name: str,
    groups: Sequence[str] = (),
    not_before: int,
    not_after: int,
    extensions: Sequence[tuple[str, bool, bytes]] = (),
    issuer: bytes | None = None,
) -> bytes:
    """A certificate signed with the authority key ``seed``, encoded canonically.

    Groups and extensions are written in the order given (sort them for a canonical one).

    :param issuer: the issuer id to write (default: the signing authority's own).
    """
    unsigned = PeerCertificate(
        serial,
        subject,
        name,
        tuple(groups),
        not_before,
        not_after,
        issuer_id(authority_public(seed)) if issuer is None else issuer,
        tuple(extensions),
        b"",
    )
    body = unsigned.body()
    signature = Ed25519PrivateKey.from_private_bytes(seed).sign(CERTIFICATE_CONTEXT + body)
    return body + _mp_bin(signature)


def _visible(value: object, high: int, what: str) -> str:
    if type(value) is not str or not 1 <= len(value.encode("utf-8")) <= high:
        raise CertificateRefused("MalformedCertificate", f"{what} {value!r}")
    if not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise CertificateRefused("MalformedCertificate", f"{what} {value!r} is not visible ASCII")
    return value


def _uint_in(value: object, high: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= high:
        raise CertificateRefused("MalformedCertificate", f"{what} {value!r}")
    return value


def _bin_of(value: object, size: int, what: str) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise CertificateRefused("MalformedCertificate", f"{what} {value!r}")
    return value


def decode_certificate(data: bytes) -> PeerCertificate:
    """Section 25's checks 1 to 3: the size, the form, the one canonical encoding.

    :raises CertificateRefused: one of them failed.
    """
    if len(data) > MAX_CERTIFICATE:
        raise CertificateRefused("CertificateTooLarge", f"{len(data)} bytes")
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:
        raise CertificateRefused("MalformedCertificate", f"not one msgpack value: {exc}") from exc
    if type(fields) is not list or len(fields) != 10:
        raise CertificateRefused("MalformedCertificate", "not an array of 10")
    version, serial, subject, name, groups, not_before, not_after, issuer, exts, sig = fields
    if type(version) is not int or version != CERTIFICATE_VERSION:
        raise CertificateRefused("MalformedCertificate", f"version {version!r}")
    _uint_in(serial, MAX_SERIAL, "serial")
    _bin_of(subject, 32, "subject")
    _visible(name, MAX_CERT_NAME, "name")
    if type(groups) is not list or len(groups) > MAX_GROUPS:
        raise CertificateRefused("MalformedCertificate", f"groups {groups!r}")
    for group in groups:
        _visible(group, MAX_GROUP, "group")
    _uint_in(not_before, MAX_TIME, "not_before")
    _uint_in(not_after, MAX_TIME, "not_after")
    if not_after <= not_before:
        raise CertificateRefused("MalformedCertificate", "not_after is not after not_before")
    _bin_of(issuer, 32, "issuer")
    if type(exts) is not list or len(exts) > MAX_EXTENSIONS:
        raise CertificateRefused("MalformedCertificate", f"extensions {exts!r}")
    extensions: list[tuple[str, bool, bytes]] = []
    for ext in exts:
        if type(ext) is not list or len(ext) != 3:
            raise CertificateRefused("MalformedCertificate", f"extension {ext!r}")
        ext_id, critical, value = ext
        _visible(ext_id, MAX_EXTENSION_ID, "extension id")
        if type(critical) is not bool:
            raise CertificateRefused("MalformedCertificate", f"critical flag {critical!r}")
        if type(value) is not bytes or len(value) > MAX_EXTENSION_VALUE:
            raise CertificateRefused("MalformedCertificate", f"extension value {value!r}")
        extensions.append((ext_id, critical, value))
    ids = [ext_id for ext_id, _, _ in extensions]
    if len(set(ids)) != len(ids):
        raise CertificateRefused("CertificateExtensionError", "an extension id twice")
    _bin_of(sig, 64, "signature")
    cert = PeerCertificate(
        serial, subject, name, tuple(groups), not_before, not_after, issuer, tuple(extensions), sig
    )
    in_order = all(a < b for a, b in itertools.pairwise(groups)) and all(
        a < b for a, b in itertools.pairwise(ids)
    )
    if not in_order or cert.encoded() != data:
        raise CertificateRefused("NonCanonicalCertificate", "not its canonical encoding")
    return cert


def x25519_form(edwards: bytes) -> bytes:
    """An Ed25519 public key's X25519 form: ``u = (1 + y) / (1 - y) mod p`` (RFC 7748 4.1)."""
    y = int.from_bytes(edwards, "little") & ((1 << 255) - 1)
    u = (1 + y) * pow((1 - y) % FIELD_P, FIELD_P - 2, FIELD_P) % FIELD_P
    return u.to_bytes(32, "little")


@dataclass(frozen=True)
class CertificateCheck:
    """What a party requires of its peer's certificate (section 25, "Verifying").

    :ivar authorities: the trusted authorities' 32-byte Ed25519 public keys.
    :ivar now: the current time, in seconds since 1970 UTC.
    :ivar skew: the clock skew tolerated at each end of the validity window.
    :ivar names: accept only these names (with ``groups``: either admits), or any.
    :ivar revoked_serials: the serials the revocation list in force names.
    :ivar revoked_keys: the subject keys it names.
    """

    authorities: tuple[bytes, ...]
    now: float
    skew: float = 300.0
    names: frozenset[str] | None = None
    groups: frozenset[str] | None = None
    revoked_serials: frozenset[int] = frozenset()
    revoked_keys: frozenset[bytes] = frozenset()

    def verify(self, data: bytes | None, key: bytes) -> PeerCertificate:
        """Section 25's checks, in its order, for the static key the handshake proved.

        :raises CertificateRefused: the first check that failed (none sent: a refusal too).
        """
        if data is None:
            raise CertificateRefused("CertificateMissing", "no certificate")
        cert = decode_certificate(data)
        by_issuer = {issuer_id(a): a for a in self.authorities}
        authority = by_issuer.get(cert.issuer)
        if authority is None:
            raise CertificateRefused("UnknownAuthority", cert.issuer.hex())
        try:
            Ed25519PublicKey.from_public_bytes(authority).verify(
                cert.signature, CERTIFICATE_CONTEXT + data[:-SIGNATURE_TAIL]
            )
        except InvalidSignature as exc:
            raise CertificateRefused("BadCertificateSignature", "does not verify") from exc
        if any(cert.subject in (a, x25519_form(a)) for a in self.authorities):
            raise CertificateRefused("AuthorityAsSubject", "an authority's key")
        # This peer knows no extension: every critical one is unknown.
        if any(critical for _, critical, _ in cert.extensions):
            raise CertificateRefused("CertificateExtensionError", "an unknown critical one")
        if self.now < cert.not_before - self.skew:
            raise CertificateRefused("CertificateNotYetValid", str(cert.not_before))
        if self.now >= cert.not_after + self.skew:
            raise CertificateRefused("CertificateExpired", str(cert.not_after))
        if cert.serial in self.revoked_serials or cert.subject in self.revoked_keys:
            raise CertificateRefused("CertificateRevoked", str(cert.serial))
        if cert.subject != key:
            raise CertificateRefused("CertificateKeyMismatch", "for another key")
        if self.names is not None or self.groups is not None:
            named = self.names is not None and cert.name in self.names
            grouped = self.groups is not None and bool(self.groups.intersection(cert.groups))
            if not (named or grouped):
                raise CertificateRefused("CertificateNameMismatch", cert.name)
        return cert


def refusal(code: int, reason: str) -> bytes:
    """A refusal verdict: ``code || length || reason`` (section 5)."""
    data = reason.encode("utf-8")[:255]
    return bytes([code, len(data)]) + data


def frame(body: bytes) -> bytes:
    """``length (u16) || body`` (section 6)."""
    if not 1 <= len(body) <= MAX_FRAME:
        raise ValueError(f"frame body of {len(body)} bytes")
    return struct.pack(">H", len(body)) + body


def _handshake_state(
    pattern: str,
    *,
    initiator: bool,
    prologue: bytes,
    ephemeral: bytes | None = None,
    **keys: Any,
) -> Any:
    """A dissononce HandshakeState; ``ephemeral`` fixes its ephemeral key (vectors only)."""
    dh: Any = X25519DH()
    if ephemeral is not None:
        dh = NoGenDH(dh, PrivateKey(ephemeral))
    hs = HandshakeState(SymmetricState(CipherState(AESGCMCipher()), SHA256Hash()), dh)
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
    #: the peer's certificate, when we required one (and it passed every check)
    peer_certificate: PeerCertificate | None = None


class PeerSession:
    """The transport phase (sections 10-14) over dissononce CipherStates.

    Without channels its methods run the connection; with channels (both sides offered
    them), :class:`ChannelPeer` does, on top of :meth:`send_records` and
    :meth:`read_records`.
    """

    def __init__(
        self,
        stream: ByteStream,
        reader: _Reader,
        handshake: Handshake,
        send: Any,
        recv: Any,
        max_message_size: int,
        *,
        initiator: bool,
        channels: tuple[ChannelOffer, ChannelOffer] | None = None,
    ) -> None:
        self.stream = stream
        self.handshake = handshake
        self.initiator = initiator
        #: ``(ours, theirs)`` when the connection has channels (section 24)
        self.channels = channels
        self.max_message_size = max_message_size
        self._reader = reader
        self._send = send
        self._recv = recv
        self._max = max_message_size
        #: held while a transport message is encrypted and written, so nonce order is
        #: write order whichever task sends
        self.send_lock = anyio.Lock()
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

    @property
    def close_sent(self) -> bool:
        """Whether we sent the connection's CLOSE."""
        return self._close_sent

    async def send_records(self, records: Sequence[bytes]) -> None:
        """Send ``records`` in one transport message."""
        async with self.send_lock:
            await self.send_records_locked(records)

    async def send_records_locked(self, records: Sequence[bytes]) -> None:
        """:meth:`send_records` for a caller that holds :attr:`send_lock`."""
        if self._close_sent:
            raise AssertionError("nothing may follow our CLOSE")
        plaintext = b"".join(records)
        if not 1 <= len(plaintext) <= MAX_PLAINTEXT:
            raise ValueError(f"plaintext of {len(plaintext)} bytes")
        await self._send_plaintext(plaintext)

    async def send_plaintext(self, plaintext: bytes) -> None:
        """Encrypt and send ``plaintext`` as it is, valid or not (for negative tests)."""
        async with self.send_lock:
            await self._send_plaintext(plaintext)

    async def _send_plaintext(self, plaintext: bytes) -> None:
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
        async with self.send_lock:
            await self.close_locked(code, reason)

    async def close_locked(self, code: int = NORMAL, reason: str = "") -> None:
        """:meth:`close` for a caller that holds :attr:`send_lock`."""
        await self.send_records_locked([close_record(code, reason)])
        self._close_sent = True

    # -- receiving --------------------------------------------------------------------------

    def _take(self, plaintext: bytes, *, first: bool = False) -> list[Record]:
        records = parse_records(plaintext, channels=self.channels is not None)
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

    def take_pending(self) -> list[Record]:
        """The records that came after READY in the first transport message."""
        records = list(self._pending)
        self._pending.clear()
        return records

    async def read_records(self) -> list[Record]:
        """The next transport message, parsed and checked as section 11 says.

        :raises Truncated: EOF (there is no CLOSE to read past in this call).
        """
        return self._take(await self._read_message())

    async def _next_record(self) -> Record:
        while not self._pending:
            self._pending.extend(self._take(await self._read_message()))
        return self._pending.popleft()

    async def receive_encoded(self) -> bytes:
        """The next whole spack encoding; answers PINGs on the way.

        :raises PeerClosed: the peer sent CLOSE.
        :raises Truncated: EOF without CLOSE.
        """
        if self.channels is not None:
            raise LocalError("this connection has channels: ChannelPeer runs it")
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
                self.close_received = decode_close(rec.body)
                if self._parts and self.close_received[0] == NORMAL:  # section 12
                    raise InteropError("CLOSE NORMAL inside a fragmented spack")
                self._parts = []
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
    channels: ChannelOffer | None = None,
    certificate: bytes | None = None,
    check: CertificateCheck | None = None,
) -> PeerSession:
    """Run the initiator's side: XX, or IK when ``responder`` (its static key) is given.

    :param with_ready: IK: records to send after READY in the same transport message.
    :param channels: offer channels (section 24) with these parameters.
    :param certificate: present this certificate (section 25), in our last message.
    :param check: require a certificate of the responder, checked this way.
    :raises Refused: a refusal verdict.
    :raises PeerClosed: XX: CLOSE instead of READY (section 9).
    :raises CertificateRefused: we refused the responder's certificate: we sent nothing
        more and closed the stream (section 25, "Certificates in the handshake").
    """
    pattern = "XX" if responder is None else "IK"
    preamble = MAGIC + bytes([VERSION]) + pattern.encode("ascii")
    keys: dict[str, Any] = {"s": key.keypair()}
    if responder is not None:
        keys["rs"] = X25519DH().create_public(responder)
    hs = _handshake_state(pattern, initiator=True, prologue=preamble, **keys)
    extra = dict(extra_params or {})
    if certificate is not None:
        extra["certificate"] = certificate
    params = encode_params(max_message_size, extra, channels)
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
    peer_certificate = None
    if check is not None:
        try:
            peer_certificate = check.verify(peer_params.get("certificate"), bytes(hs.rs.data))
        except CertificateRefused:
            await stream.aclose()  # an initiator has no refusal of its own (section 5)
            raise
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
        peer_certificate,
    )
    session = PeerSession(
        stream,
        reader,
        handshake,
        send,
        recv,
        max_message_size,
        initiator=True,
        channels=_negotiated(channels, peer_params),
    )
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
    channels: ChannelOffer | None = None,
    certificate: bytes | None = None,
    check: CertificateCheck | None = None,
) -> PeerSession:
    """Run the responder's side for whichever pattern the preamble names.

    :param channels: offer channels (section 24) with these parameters.
    :param certificate: present this certificate (section 25), in message 2.
    :param check: require a certificate of the initiator, checked this way, before
        ``authorize``: a refusal is CERTIFICATE_REFUSED (a verdict in IK, a CLOSE in XX),
        and raises :class:`CertificateRefused`.

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
    params = encode_params(
        max_message_size, None if certificate is None else {"certificate": certificate}, channels
    )
    msg1 = await reader.frame("message 1")
    peer_params: dict[str, Any] = {}
    try:
        payload1, _ = _noise_call(hs.read_message, msg1)
        if pattern == "IK":
            peer_params = decode_params(payload1)
        else:
            decode_map(payload1, MAX_XX_MSG1_PAYLOAD)
    except AuthenticationFailed:
        await _refuse(stream, DECRYPT_FAILED, "IK message 1 is not for this key")
    except InteropError as exc:
        await _refuse(stream, PROTOCOL_ERROR, str(exc))
    payloads = [payload1]
    peer_certificate = None
    if pattern == "IK" and check is not None:
        try:
            peer_certificate = check.verify(peer_params.get("certificate"), bytes(hs.rs.data))
        except CertificateRefused:
            await stream.send(refusal(CERTIFICATE_REFUSED, REFUSED_REASON))
            raise
    if pattern == "IK" and authorize is not None and not authorize(bytes(hs.rs.data)):
        await _refuse(stream, NOT_AUTHORIZED, "not authorized")
    msg2, result = _noise_call(hs.write_message, params)
    await stream.send(b"\x00" + frame(msg2))
    bad_payload: InteropError | None = None
    if pattern == "XX":
        payload3, result = _noise_call(hs.read_message, await reader.frame("message 3"))
        payloads.append(payload3)
        try:
            peer_params = decode_params(payload3)
        except InteropError as exc:
            bad_payload = exc
    send, recv = _split(result, initiator=False)
    handshake = Handshake(
        pattern,
        bytes(hs.rs.data),
        bytes(hs.symmetricstate.get_handshake_hash()),
        peer_params,
        payloads,
        peer_certificate,
    )
    session = PeerSession(
        stream,
        reader,
        handshake,
        send,
        recv,
        max_message_size,
        initiator=False,
        channels=_negotiated(channels, peer_params),
    )
    if bad_payload is not None:  # section 9: an authenticated CLOSE instead of READY
        await session.send_records([close_record(PROTOCOL_ERROR, str(bad_payload)[:200])])
        raise bad_payload
    if pattern == "XX" and check is not None:
        try:
            handshake.peer_certificate = check.verify(
                peer_params.get("certificate"), handshake.remote_static
            )
        except CertificateRefused:  # section 25: CLOSE 13 instead of READY
            await session.send_records([close_record(CERTIFICATE_REFUSED, REFUSED_REASON)])
            raise
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


def _negotiated(
    ours: ChannelOffer | None, peer_params: dict[str, Any]
) -> tuple[ChannelOffer, ChannelOffer] | None:
    """Both offers when both sides sent the channel parameters (section 24), else ``None``."""
    theirs = channel_offer(peer_params)
    return (ours, theirs) if ours is not None and theirs is not None else None


async def _refuse(stream: ByteStream, code: int, reason: str) -> NoReturn:
    await stream.send(refusal(code, reason))
    raise Refused(code, reason)


# -- channels (section 24) ------------------------------------------------------------------

# The states of a channel other than 0 (section 24, "States of a channel"). ENDED is where
# the table's "ended" leads: the channel is gone and no longer counts against max_channels.
OPEN: Final = "open"
SEND_CLOSED: Final = "send-closed"
RECEIVE_CLOSED: Final = "receive-closed"
RESET_SENT: Final = "reset-sent"
CLOSED_RESET_SENT: Final = "closed-reset-sent"
#: The states in which we sent the channel's RESET and drop what the peer sends on it.
RESETTING: Final = (RESET_SENT, CLOSED_RESET_SENT)
RESET_RECEIVED: Final = "reset-received"
ENDED: Final = "ended"
#: The liveness policies :class:`ChannelPeer` can follow (see its docstring).
LIVENESS: Final = ("whole", "pieces")


class ChannelEnded(Exception):
    """The peer sends nothing more on this channel (its CLOSE, or the connection's)."""


class ChannelReset(Exception):
    """The channel was reset: by the peer (with its code and reason) or by us."""

    def __init__(self, channel: int, code: int, reason: str, *, by_peer: bool) -> None:
        who = "the peer" if by_peer else "us"
        super().__init__(f"channel {channel} reset by {who} with code {code}: {reason}")
        self.channel = channel
        self.code = code
        self.reason = reason
        self.by_peer = by_peer


@dataclass(eq=False)
class _Channel:
    """One channel as this peer holds it."""

    id: int
    ours: bool
    #: what we may still send on it (section 24, "Flow control")
    send_credit: int
    #: the credit the peer still holds on it from our grants (what it may still send)
    recv_left: int
    state: str = OPEN
    #: pieces of the peer's incomplete spack, and their total length
    parts: list[bytes] = field(default_factory=list)
    assembled: int = 0
    #: whole spack encodings not yet taken by the application, with their data bytes
    inbox: deque[tuple[bytes, int]] = field(default_factory=deque)
    #: credit granted ahead of the application (liveness), taken off the next grants
    debt: int = 0
    #: what the liveness grants already gave back of the incomplete spack ("pieces")
    slot_granted: int = 0
    #: the peer's RESET (code, reason), once received
    reset: tuple[int, str] | None = None
    reset_by_us: bool = False
    #: a spack of ours is under way on it (the connection's CLOSE must wait)
    sending: bool = False
    lock: anyio.Lock = field(default_factory=anyio.Lock)


@dataclass
class _Actions:
    """What one checked transport message makes this peer do (section 11: nothing is acted
    on before every record of the message passed)."""

    deliveries: list[tuple[_Channel, bytes, int]] = field(default_factory=list)
    opened: list[int] = field(default_factory=list)
    answers: list[bytes] = field(default_factory=list)
    answered: list[_Channel] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    dropped: int = 0
    close: tuple[int, str] | None = None


class ChannelPeer:
    """A connection with channels (section 24), on a :class:`PeerSession` that has them.

    :meth:`run` reads the peer's transport messages until its CLOSE (start it in a task
    group); the application's side is :meth:`open_channel`, :meth:`accept_channel`,
    :meth:`send`, :meth:`receive`, :meth:`close_channel`, :meth:`reset_channel`,
    :meth:`release_channel` and :meth:`close`. What the peer does against SPEC.md ends the
    connection with a CLOSE of the code section 24 names, and is kept in :attr:`failure`.

    Credit is granted back as the application takes each spack (its bytes, at once, on its
    channel and on the connection). The receiver's liveness duty (a spack waiting inside
    for credit that only its own completion would free) is honoured one channel at a time,
    in one of two ways SPEC.md allows:

    - ``"whole"`` (SPEC's words taken literally): grant the channel and the connection
      enough for the largest spack we accept to complete, ``max_message_size`` less what
      has arrived of it, at once;
    - ``"pieces"``: grant back what has arrived of it, then each later piece as it arrives
      (as stalk does, which groups the later pieces in steps of up to a quarter window).

    Credit granted that way ahead of the application is taken off its next grants. The
    next channel waiting inside a spack is served as soon as the first one's spack is
    complete (SPEC's "then"; stalk waits until its application has taken that spack).

    :param answer_resets: answer a RESET at once; else when :meth:`release_channel` says
        the application let go of the channel (section 24 allows both).
    """

    def __init__(
        self, session: PeerSession, *, answer_resets: bool = True, liveness: str = "whole"
    ) -> None:
        if session.channels is None:
            raise LocalError("the connection has no channels")
        if liveness not in LIVENESS:
            raise ValueError(f"liveness policy {liveness!r}")
        self.session = session
        self.ours, self.theirs = session.channels
        self.peer_max_message_size: int = session.handshake.peer_params["max_message_size"]
        self.answer_resets = answer_resets
        self.liveness = liveness
        # Initiator odd ids, responder even ids from 2 (section 24, "Ids and opening").
        self._parity = 1 if session.initiator else 0
        self._next_id = 1 if session.initiator else 2
        #: the highest of our ids the peer knows to be open (a record of ours went on it)
        self._wire_highest = self._next_id - 2
        #: the highest of the peer's ids it opened
        self._peer_highest = 0 if session.initiator else -1
        self._our_open = 0
        self._peer_open = 0
        zero = _Channel(0, False, self.theirs.channel_window, self.ours.channel_window)
        #: channels that have not ended (channel 0 included)
        self._live: dict[int, _Channel] = {0: zero}
        #: every channel there has been, so an ended one's spacks can still be received
        self._all: dict[int, _Channel] = {0: zero}
        self._conn_send = self.theirs.connection_window
        self._conn_left = self.ours.connection_window
        self._conn_debt = 0
        self._slot: _Channel | None = None
        self._accepted: deque[int] = deque()
        self._changed = anyio.Event()
        #: the peer's connection CLOSE, once received
        self.close_received: tuple[int, str] | None = None
        #: what the peer did against SPEC.md, if anything (the connection ended on it)
        self.failure: InteropError | None = None
        #: the transport failed under us (not a protocol matter)
        self.transport_error: Exception | None = None
        #: :meth:`run` has returned
        self.finished = False
        #: ``(kind, channel, body length)`` of every record received, one list per message
        self.log: list[list[tuple[int, int, int]]] = []
        #: bodies of the PONGs received
        self.pongs: list[bytes] = []
        #: every window record we sent: ``(channel or None for the connection, increment)``
        self.grants: list[tuple[int | None, int]] = []
        #: ``(kind, channel, body length)`` of every data record we sent
        self.sent: list[tuple[int, int, int]] = []

    # -- introspection ----------------------------------------------------------------------

    def state(self, channel: int) -> str:
        """A channel's state (``ENDED`` once gone)."""
        return self._all[channel].state

    def open_channels(self) -> tuple[int, int]:
        """How many channels are open that we opened, and that the peer opened."""
        return self._our_open, self._peer_open

    def pending(self, channel: int) -> int:
        """How many whole spacks of ``channel`` wait for the application."""
        return len(self._all[channel].inbox)

    def send_credit(self, channel: int | None = None) -> int:
        """What we may still send on ``channel``, or on the connection when ``None``."""
        return self._conn_send if channel is None else self._all[channel].send_credit

    # -- waiting ----------------------------------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def until(self, ready: Callable[[], object]) -> None:
        """Wait until ``ready()``; it is re-evaluated whenever this peer's state changed."""
        while True:
            changed = self._changed
            if ready():
                return
            await changed.wait()

    # -- receiving --------------------------------------------------------------------------

    async def run(self) -> None:
        """Read and act on the peer's transport messages until its CLOSE, EOF or an error."""
        try:
            pending = self.session.take_pending()
            if pending:
                await self._handle(pending)
            while self.close_received is None:
                await self._handle(await self.session.read_records())
        except InteropError as exc:
            self.failure = exc
            # Section 18: a CLOSE with the code, best effort; nothing answers a truncation.
            if not isinstance(exc, Truncated) and not self.session.close_sent:
                with contextlib.suppress(Exception):
                    async with self.session.send_lock:
                        await self.session.close_locked(exc.code, str(exc)[:200])
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self.transport_error = exc
        finally:
            self.finished = True
            self._wake()

    async def _handle(self, records: list[Record]) -> None:
        self.log.append([(r.kind, r.channel, len(r.body)) for r in records])
        actions = _Actions()
        for rec in records:
            self._check(rec, actions)
        await self._commit(actions)

    def _check(self, rec: Record, actions: _Actions) -> None:
        """One record, against the state the message's earlier records left."""
        if rec.channel == 0:
            zero = self._live[0]
            if rec.kind in (MESSAGE, FRAGMENT):
                self._data(zero, rec, actions)
            elif rec.kind == CLOSE:
                actions.close = decode_close(rec.body)
                for other in self._live.values():  # section 12: an error CLOSE may cut one
                    if other.parts and actions.close[0] == NORMAL:
                        raise InteropError(f"connection CLOSE inside a spack on {other.id}")
            elif rec.kind == WINDOW:
                zero.send_credit = _add_credit(zero.send_credit, rec.body)
            elif rec.kind == CONNECTION_WINDOW:
                self._conn_send = _add_credit(self._conn_send, rec.body)
            elif rec.kind == PING:
                actions.answers.append(record(PONG, rec.body))
            elif rec.kind == PONG:
                actions.pongs.append(rec.body)
            else:  # REKEY (parse_records refuses READY here, RESET on channel 0)
                raise InteropError(f"record kind {rec.kind} (this peer does not rekey)")
            return
        chan = self._live.get(rec.channel)
        if chan is not None and chan.ours and chan.id > self._wire_highest:
            chan = None  # opened here, but the peer cannot know it yet
        if chan is None:
            chan = self._resolve(rec, actions)
            if chan is None:
                return
        if rec.kind in (MESSAGE, FRAGMENT):
            self._data(chan, rec, actions)
        elif rec.kind == CLOSE:
            self._channel_close(chan)
        elif rec.kind == RESET:
            self._reset_received(chan, rec, actions)
        else:  # WINDOW: credit may arrive in any state the channel exists in
            chan.send_credit = _add_credit(chan.send_credit, rec.body)

    def _resolve(self, rec: Record, actions: _Actions) -> _Channel | None:
        """A record on a channel that is not open: it opens one, or is ignored, or is an
        error, in section 24's order."""
        ch = rec.channel
        peers = ch % 2 != self._parity
        if peers and ch > self._peer_highest:
            if rec.kind not in (MESSAGE, FRAGMENT, CLOSE):
                raise InteropError(f"record kind {rec.kind} on channel {ch}, never opened")
            count = (ch - self._peer_highest) // 2
            if self._peer_open + count > self.ours.max_channels:
                raise InteropError(
                    f"channel {ch} opens {count} channels beyond the {self._peer_open} open; "
                    f"max_channels is {self.ours.max_channels}",
                    CHANNEL_LIMIT,
                )
            for opened in range(self._peer_highest + 2, ch + 1, 2):
                chan = _Channel(opened, False, self.theirs.channel_window, self.ours.channel_window)
                self._live[opened] = self._all[opened] = chan
                actions.opened.append(opened)
            self._peer_open += count
            self._peer_highest = ch
            return self._live[ch]
        if ch <= (self._peer_highest if peers else self._wire_highest):
            if rec.kind in (WINDOW, RESET):
                return None  # it crossed the channel's end
            raise InteropError(f"record kind {rec.kind} on channel {ch}, which ended")
        raise InteropError(f"record kind {rec.kind} on channel {ch}, ours and never opened")

    def _data(self, chan: _Channel, rec: Record, actions: _Actions) -> None:
        n = len(rec.body)
        # Section 24's order (the id was resolved already): connection credit, state,
        # channel credit.
        if n > self._conn_left:
            raise InteropError(
                f"{n} data bytes on channel {chan.id} beyond the connection's credit "
                f"({self._conn_left})",
                FLOW_CONTROL_ERROR,
            )
        if chan.state in (RECEIVE_CLOSED, RESET_RECEIVED):
            raise InteropError(f"data on channel {chan.id} in state {chan.state}")
        if n > chan.recv_left:
            raise InteropError(
                f"{n} data bytes on channel {chan.id} beyond its credit ({chan.recv_left})",
                FLOW_CONTROL_ERROR,
            )
        chan.recv_left -= n
        self._conn_left -= n
        if chan.state in RESETTING:
            actions.dropped += n  # sent before the peer saw our RESET; still counted
            return
        if chan.assembled + n > self.session.max_message_size:
            raise InteropError(f"spack over our limit on {chan.id}", MESSAGE_TOO_LARGE)
        if rec.kind == FRAGMENT:
            chan.parts.append(rec.body)
            chan.assembled += n
            return
        if not chan.parts and not n:
            raise InteropError(f"empty MESSAGE on channel {chan.id}")
        encoded = b"".join([*chan.parts, rec.body])
        chan.parts, chan.assembled, chan.slot_granted = [], 0, 0
        try:
            Spack.decode(encoded)
        except Exception as exc:
            raise InteropError(f"spack on channel {chan.id} does not decode: {exc}") from exc
        actions.deliveries.append((chan, encoded, len(encoded)))

    def _channel_close(self, chan: _Channel) -> None:
        if chan.state == RESET_SENT:
            return  # sent before the peer saw our RESET
        if chan.state == CLOSED_RESET_SENT:
            self._end(chan)  # our CLOSE ended it there: the peer ignores our RESET
            return
        if chan.state not in (OPEN, SEND_CLOSED):
            raise InteropError(f"CLOSE on channel {chan.id} in state {chan.state}")
        if chan.parts:
            raise InteropError(f"CLOSE inside a spack on channel {chan.id}")
        if chan.state == OPEN:
            chan.state = RECEIVE_CLOSED
        else:
            self._end(chan)

    def _reset_received(self, chan: _Channel, rec: Record, actions: _Actions) -> None:
        code, reason = decode_close(rec.body, "RESET")
        if chan.state in RESETTING:
            self._end(chan)  # the two RESETs answer each other
            return
        if chan.state not in (OPEN, SEND_CLOSED, RECEIVE_CLOSED):
            raise InteropError(f"RESET on channel {chan.id} in state {chan.state}")
        chan.state = RESET_RECEIVED
        chan.reset = (code, reason)
        actions.dropped += self._drop(chan)
        if self.answer_resets:
            actions.answers.append(reset_record(chan.id))
            actions.answered.append(chan)

    def _drop(self, chan: _Channel) -> int:
        """Drop what the application has not received of ``chan``; its data bytes."""
        dropped = chan.assembled + sum(size for _, size in chan.inbox)
        chan.parts, chan.assembled, chan.slot_granted = [], 0, 0
        chan.inbox.clear()
        return dropped

    def _end(self, chan: _Channel) -> None:
        chan.state = ENDED
        del self._live[chan.id]
        if chan.ours:
            self._our_open -= 1
        else:
            self._peer_open -= 1

    async def _commit(self, actions: _Actions) -> None:
        dropped = actions.dropped
        for chan, encoded, size in actions.deliveries:
            if chan.reset is not None:  # a RESET later in the same message
                dropped += size
            else:
                chan.inbox.append((encoded, size))
        self._accepted.extend(actions.opened)
        self.pongs.extend(actions.pongs)
        if actions.answers and not self.session.close_sent:
            await self._send_control(actions.answers)
            for chan in actions.answered:
                self._end(chan)
        if dropped:
            await self._grant(None, dropped)
        if actions.close is not None:
            self.close_received = actions.close
            # The connection's CLOSE ends the peer's direction of every channel.
            self._live[0].state = RECEIVE_CLOSED
            for chan in list(self._live.values()):
                if not chan.id:
                    continue
                if chan.state == OPEN:
                    chan.state = RECEIVE_CLOSED
                elif chan.state == SEND_CLOSED:
                    self._end(chan)
        await self._liveness()
        self._wake()

    # -- granting credit ---------------------------------------------------------------------

    async def _send_control(self, records: list[bytes]) -> None:
        """Send control records, as many per transport message as fit."""
        async with self.session.send_lock:
            if self.session.close_sent:
                return
            batch: list[bytes] = []
            for rec in records:
                if batch and sum(map(len, batch)) + len(rec) > MAX_PLAINTEXT:
                    await self.session.send_records_locked(batch)
                    batch = []
                batch.append(rec)
            await self.session.send_records_locked(batch)

    async def _grant(self, chan: _Channel | None, size: int) -> None:
        """Give back ``size`` data bytes the application took (or that were dropped): on
        ``chan`` (if it still takes data) and on the connection, less what was granted
        ahead."""
        if self.session.close_sent:
            return  # nothing may follow our CLOSE, credit neither
        records: list[bytes] = []
        if chan is not None and chan.state in (OPEN, SEND_CLOSED):
            pay = size - chan.debt
            chan.debt = max(0, -pay)
            if pay > 0:
                chan.recv_left += pay
                records.append(window_record(chan.id, pay))
                self.grants.append((chan.id, pay))
        pay = size - self._conn_debt
        self._conn_debt = max(0, -pay)
        if pay > 0:
            self._conn_left += pay
            records.append(connection_window_record(pay))
            self.grants.append((None, pay))
        if records:
            await self._send_control(records)

    async def _liveness(self) -> None:
        """Section 24: a spack waiting for credit that only its completion would free gets
        it, one channel (the slot) at a time."""
        if self.session.close_sent:
            return  # section 24: nothing is granted after our CLOSE
        slot: _Channel | None = self._slot
        if slot is not None and (not slot.parts or slot.state not in (OPEN, SEND_CLOSED)):
            slot = self._slot = None
        if slot is None:
            for chan in self._live.values():
                if chan.parts and (chan.recv_left == 0 or self._conn_left == 0):
                    slot = self._slot = chan
                    break
        if slot is None:
            return
        if self.liveness == "whole":
            need = min(self.session.max_message_size - slot.assembled, MAX_CREDIT)
            on_channel = need - slot.recv_left
            on_connection = need - self._conn_left
        else:
            on_channel = on_connection = slot.assembled - slot.slot_granted
            slot.slot_granted = slot.assembled
        records: list[bytes] = []
        if on_channel > 0:
            slot.recv_left += on_channel
            slot.debt += on_channel
            records.append(window_record(slot.id, on_channel))
            self.grants.append((slot.id, on_channel))
        if on_connection > 0:
            self._conn_left += on_connection
            self._conn_debt += on_connection
            records.append(connection_window_record(on_connection))
            self.grants.append((None, on_connection))
        if records:
            await self._send_control(records)

    # -- the application's side ---------------------------------------------------------------

    def open_channel(self, channel: int | None = None) -> int:
        """Open a channel of ours: the next id, or ``channel`` and every lower id of ours
        not opened yet (section 24). Its first record, or one on a higher id, opens it on
        the wire.

        :raises LocalError: our CLOSE went, the id is not ours or not above those we took,
            or the peer's ``max_channels`` would be passed.
        """
        if self.session.close_sent or self.failure is not None:
            raise LocalError("the connection is closed")
        target = self._next_id if channel is None else channel
        if target % 2 != self._parity or not self._next_id <= target <= MAX_CHANNEL_ID:
            raise LocalError(f"channel {target} is not ours to open (next is {self._next_id})")
        count = (target - self._next_id) // 2 + 1
        if self._our_open + count > self.theirs.max_channels:
            raise LocalError(f"the peer's max_channels ({self.theirs.max_channels}) is reached")
        for ch in range(self._next_id, target + 1, 2):
            chan = _Channel(ch, True, self.theirs.channel_window, self.ours.channel_window)
            self._live[ch] = self._all[ch] = chan
        self._our_open += count
        self._next_id = target + 2
        return target

    async def accept_channel(self) -> int:
        """The next channel the peer opened (implicitly opened ones included, in order).

        :raises ChannelEnded: the peer's CLOSE came first, or the connection ended.
        """
        await self.until(lambda: bool(self._accepted) or self._over())
        if not self._accepted:
            self._raise_failure()
            raise ChannelEnded("the peer opens no more channels")
        return self._accepted.popleft()

    def _over(self) -> bool:
        return self.finished or self.close_received is not None

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.transport_error is not None:
            raise LocalError(f"the transport failed: {self.transport_error!r}")

    def _sendable(self, chan: _Channel) -> None:
        """Raise unless we may send data or CLOSE on ``chan`` now."""
        self._raise_failure()
        if self.session.close_sent:
            raise LocalError("our CLOSE went")
        if chan.reset is not None:
            raise ChannelReset(chan.id, *chan.reset, by_peer=True)
        if chan.reset_by_us:
            raise ChannelReset(chan.id, NORMAL, "", by_peer=False)
        if chan.state not in (OPEN, RECEIVE_CLOSED):
            raise LocalError(f"channel {chan.id} is {chan.state}: we may not send on it")

    def _channel(self, channel: int) -> _Channel:
        chan = self._all.get(channel)
        if chan is None:
            raise LocalError(f"channel {channel} was never opened")
        return chan

    def _announce(self, chan: _Channel) -> None:
        """A record of ours on ``chan`` goes now: the peer knows it and the lower ids open."""
        if chan.ours and chan.id > self._wire_highest:
            self._wire_highest = chan.id

    async def send(
        self,
        channel: int,
        spack: Spack | bytes,
        *,
        piece: int | None = None,
        empty_final: bool = False,
        stop_after: int | None = None,
    ) -> None:
        """Send one spack (or its encoding) on ``channel``, in pieces that fit the credit.

        Each record is its own transport message, so concurrent sends on several channels
        interleave record by record.

        :param piece: at most this many data bytes per record.
        :param empty_final: send every byte as FRAGMENTs, then an empty MESSAGE.
        :param stop_after: send only this many bytes, as FRAGMENTs, and leave the spack
            incomplete for good (the channel can then only be reset, or the connection
            end without CLOSE).
        :raises ChannelReset: the channel was reset before the spack was all sent.
        :raises LocalError: we may not send on it, or no more credit can come.
        """
        encoded = spack if isinstance(spack, bytes) else spack.encode()
        if not 1 <= len(encoded) <= self.peer_max_message_size:
            raise LocalError(f"a spack of {len(encoded)} bytes")
        chan = self._channel(channel)
        if stop_after is not None:
            encoded, empty_final = encoded[:stop_after], False
        async with chan.lock:
            self._sendable(chan)
            chan.sending = True
            try:
                await self._send_pieces(
                    chan, encoded, piece or len(encoded), empty_final, stop_after is not None
                )
            finally:
                chan.sending = stop_after is not None and chan.state not in RESETTING

    async def _send_pieces(
        self, chan: _Channel, encoded: bytes, piece: int, empty_final: bool, partial: bool
    ) -> None:
        pos = 0
        while pos < len(encoded):
            await self.until(
                lambda: (chan.send_credit > 0 and self._conn_send > 0) or self._stuck(chan)
            )
            async with self.session.send_lock:
                self._sendable(chan)
                budget = min(chan.send_credit, self._conn_send)
                if not budget:
                    if self._over():
                        raise LocalError(f"no credit can arrive for channel {chan.id}")
                    continue
                left = len(encoded) - pos
                n = min(left, budget, piece, MAX_DATA_BODY)
                final = n == left and not empty_final and not partial
                chan.send_credit -= n
                self._conn_send -= n
                self._announce(chan)
                body = encoded[pos : pos + n]
                kind = MESSAGE if final else FRAGMENT
                await self.session.send_records_locked([record(kind, body, chan.id)])
                self.sent.append((kind, chan.id, n))
                pos += n
            self._wake()
        if empty_final:
            async with self.session.send_lock:
                self._sendable(chan)
                await self.session.send_records_locked([record(MESSAGE, b"", chan.id)])
                self.sent.append((MESSAGE, chan.id, 0))

    def _stuck(self, chan: _Channel) -> bool:
        """Whether waiting for credit on ``chan`` is over for another reason."""
        return (
            self._over()
            or self.session.close_sent
            or chan.reset is not None
            or chan.reset_by_us
            or chan.state not in (OPEN, RECEIVE_CLOSED)
        )

    async def receive_encoded(self, channel: int) -> bytes:
        """The next whole spack encoding on ``channel``; its bytes go back as credit.

        :raises ChannelEnded: the peer sends nothing more on it.
        :raises ChannelReset: it was reset (by either side).
        """
        chan = self._channel(channel)
        await self.until(lambda: bool(chan.inbox) or self._receive_over(chan))
        if not chan.inbox:
            self._raise_failure()
            if chan.reset is not None:
                raise ChannelReset(chan.id, *chan.reset, by_peer=True)
            if chan.reset_by_us:
                raise ChannelReset(chan.id, NORMAL, "", by_peer=False)
            raise ChannelEnded(f"channel {chan.id} ended")
        encoded, size = chan.inbox.popleft()
        await self._grant(chan, size)
        await self._liveness()
        return encoded

    def _receive_over(self, chan: _Channel) -> bool:
        return (
            self.finished
            or chan.reset is not None
            or chan.reset_by_us
            or chan.state in (RECEIVE_CLOSED, ENDED)
        )

    async def receive(self, channel: int) -> Spack:
        """The next spack on ``channel``, decoded with stalk's spack codec."""
        return Spack.decode(await self.receive_encoded(channel))

    async def close_channel(self, channel: int) -> None:
        """Send the CLOSE of our direction of ``channel`` (after a spack under way on it)."""
        chan = self._channel(channel)
        if not chan.id:
            raise LocalError("channel 0 ends with the connection's CLOSE (close())")
        async with chan.lock, self.session.send_lock:
            self._sendable(chan)
            self._announce(chan)
            await self.session.send_records_locked([record(CLOSE, b"\x00\x00", chan.id)])
            if chan.state == OPEN:
                chan.state = SEND_CLOSED
            else:
                self._end(chan)
        self._wake()

    async def reset_channel(self, channel: int, code: int = NORMAL, reason: str = "") -> None:
        """Reset ``channel``: both directions end; what we hold of it is dropped.

        A spack of ours under way on it stops (its :meth:`send` raises).

        :raises LocalError: the channel is not open, or is ours and the peer cannot know it
            yet (a RESET does not open a channel, section 24; SPEC says nothing of how to
            give up an id we took but never used, so this peer refuses to).
        """
        chan = self._channel(channel)
        async with self.session.send_lock:
            if not chan.id or chan.state not in (OPEN, SEND_CLOSED, RECEIVE_CLOSED):
                raise LocalError(f"channel {channel} is {chan.state}: it cannot be reset")
            if chan.ours and chan.id > self._wire_highest:
                raise LocalError(f"channel {channel} is not open on the wire yet")
            self._raise_failure()
            await self.session.send_records_locked([reset_record(chan.id, code, reason)])
            chan.state = CLOSED_RESET_SENT if chan.state == SEND_CLOSED else RESET_SENT
            chan.reset_by_us = True
            chan.sending = False
        self._wake()
        dropped = self._drop(chan)
        if dropped:
            await self._grant(None, dropped)

    async def release_channel(self, channel: int) -> None:
        """The application let go of a channel the peer reset: our answering RESET goes."""
        chan = self._channel(channel)
        if chan.state != RESET_RECEIVED:
            raise LocalError(f"channel {channel} is {chan.state}, not reset by the peer")
        await self._send_control([reset_record(chan.id)])
        self._end(chan)
        self._wake()

    async def ping(self, payload: bytes = b"") -> None:
        """Send a PING; its PONG lands in :attr:`pongs`."""
        await self._send_control([record(PING, payload)])

    async def round_trip(self) -> None:
        """PING and wait for its PONG: the peer has processed everything we sent before."""
        payload = f"round trip {len(self.pongs)}".encode()
        await self.ping(payload)
        await self.until(lambda: payload in self.pongs or self._over())
        self._raise_failure()

    async def close(self, code: int = NORMAL, reason: str = "") -> None:
        """Send the connection's CLOSE: our direction of every channel ends.

        :raises LocalError: a spack of ours is incomplete (section 24 forbids the CLOSE).
        """
        async with self.session.send_lock:
            busy = [chan.id for chan in self._live.values() if chan.sending]
            if busy:
                raise LocalError(f"spacks under way on channels {busy}")
            await self.session.close_locked(code, reason)
        self._wake()

    async def wait_closed(self) -> tuple[int, str]:
        """Wait for the peer's connection CLOSE and return its code and reason."""
        await self.until(self._over)
        self._raise_failure()
        if self.close_received is None:
            raise LocalError("the connection ended without the peer's CLOSE")
        return self.close_received


def _add_credit(credit: int, body: bytes) -> int:
    """Credit after a WINDOW or CONNECTION_WINDOW (past 2^31-1: FLOW_CONTROL_ERROR)."""
    total = credit + decode_increment(body)
    if total > MAX_CREDIT:
        raise InteropError(f"credit {total} past 2^31-1", FLOW_CONTROL_ERROR)
    return total


# -- replaying vectors/ (sections 12, 15 and 24: stalk's choices) ----------------------------
#
# vectors/ holds whole sessions byte for byte (section 22). Besides the keys, the bytes
# follow from section 8 (the parameters map), section 12 ("How stalk packs records"),
# section 15 (the rekey policy) and, with channels, section 24 ("How stalk sends and
# grants"), given the calls a transcript records. ScriptedPeer makes exactly those choices,
# without I/O, so that a transcript's calls replayed on it must give the recorded bytes.

#: Section 12: a plaintext holds at most this many bytes of records (3 stay free for REKEY).
RECORD_CAPACITY: Final = MAX_PLAINTEXT - 3
#: Section 12: a FRAGMENT smaller than this is not worth its header.
MIN_FRAGMENT: Final = 512
#: Section 15: REKEY on channel 0, empty.
REKEY_RECORD: Final = bytes((REKEY, 0, 0))
#: Section 15: Rekey()'s nonce, 2^64 - 1.
REKEY_NONCE: Final = 2**64 - 1


def rekey(state: Any) -> None:
    """Section 15's ``Rekey()`` on a dissononce CipherState: a new key, ``n`` unchanged.

    The new key is the first 32 bytes of encrypting 32 zero bytes under the old key with
    nonce 2^64 - 1 and no associated data. dissononce 0.34.3's own ``rekey()`` keeps the
    tag in the key and sets ``n`` to 0, and a CipherState has no accessor for its key:
    this replaces its key attribute and leaves ``n`` alone.
    """
    state._key = state.cipher.encrypt(state._key, REKEY_NONCE, b"", bytes(32))[:32]


def largest_body(avail: int) -> int:
    """Section 12: the largest body length ``n`` with ``n + len(uvarint(n)) <= avail``."""
    n = avail
    while n > 0 and n + len(uvarint(n)) > avail:
        n -= 1
    return max(n, 0)


class Packer:
    """Records packed into plaintexts as section 12 says, in the order they are added."""

    def __init__(self) -> None:
        self._done: list[bytearray] = []
        self._current = bytearray()

    def add(self, rec: bytes) -> None:
        """A record other than a spack: here if it fits, else in the next plaintext."""
        if len(self._current) + len(rec) > RECORD_CAPACITY:
            self.finish()
        self._current += rec

    def add_spack(self, encoded: bytes) -> None:
        """A spack on channel 0: one MESSAGE, or FRAGMENTs that fill plaintexts, then one."""
        rest = encoded
        while True:
            avail = RECORD_CAPACITY - len(self._current) - 2
            if len(rest) + len(uvarint(len(rest))) <= avail:
                self._current += record(MESSAGE, rest)
                return
            n = largest_body(avail)
            if n < MIN_FRAGMENT:
                self.finish()
                continue
            self._current += record(FRAGMENT, rest[:n])
            rest = rest[n:]
            self.finish()

    def add_group(self, records: Sequence[bytes]) -> None:
        """Records that start a plaintext of their own, which nothing added later joins."""
        if records:
            self.finish()
            for rec in records:
                self.add(rec)
            self.finish()

    def finish(self) -> None:
        """End the current plaintext."""
        if self._current:
            self._done.append(self._current)
            self._current = bytearray()

    def take(self) -> list[bytearray]:
        """Every plaintext packed, in order (the current one ends)."""
        self.finish()
        done, self._done = self._done, []
        return done


#: Section 24, "States of a channel": ``(state, input) -> state``; inputs are ``data sent``,
#: ``CLOSE sent``, ``RESET sent``, ``data received``, ``CLOSE received``, ``RESET received``
#: and ``released`` (our answering RESET sent).
CHANNEL_STATES: Final[dict[tuple[str, str], str]] = {
    (OPEN, "data sent"): OPEN,
    (OPEN, "data received"): OPEN,
    (OPEN, "CLOSE sent"): SEND_CLOSED,
    (OPEN, "CLOSE received"): RECEIVE_CLOSED,
    (SEND_CLOSED, "data received"): SEND_CLOSED,
    (SEND_CLOSED, "CLOSE received"): ENDED,
    (RECEIVE_CLOSED, "data sent"): RECEIVE_CLOSED,
    (RECEIVE_CLOSED, "CLOSE sent"): ENDED,
    (RESET_SENT, "data received"): RESET_SENT,
    (RESET_SENT, "CLOSE received"): RESET_SENT,
    (RESET_SENT, "RESET received"): ENDED,
    (OPEN, "RESET sent"): RESET_SENT,
    (RECEIVE_CLOSED, "RESET sent"): RESET_SENT,
    (SEND_CLOSED, "RESET sent"): CLOSED_RESET_SENT,
    (CLOSED_RESET_SENT, "data received"): CLOSED_RESET_SENT,
    (CLOSED_RESET_SENT, "CLOSE received"): ENDED,
    (CLOSED_RESET_SENT, "RESET received"): ENDED,
    (RESET_RECEIVED, "released"): ENDED,
    **{(state, "RESET received"): RESET_RECEIVED for state in (OPEN, SEND_CLOSED, RECEIVE_CLOSED)},
}


@dataclass(eq=False)
class _Credit:
    """One credit, both ways: what we may send, what we granted, what we released."""

    send: int
    receive: int
    window: int
    released: int = 0

    def grant_back(self, size: int) -> int:
        """Release ``size`` bytes; the increment owed now (a quarter window at a time)."""
        self.released += size
        if self.released < self.window // 4:
            return 0
        increment, self.released = self.released, 0
        self.receive += increment
        return increment


@dataclass(eq=False)
class _Scripted:
    """One channel as :class:`ScriptedPeer` holds it."""

    id: int
    credit: _Credit
    state: str = OPEN
    #: pieces of the peer's spack in progress on it
    parts: list[bytes] = field(default_factory=list)
    #: for each whole spack not yet released, what the slot granted of it on arrival
    pre_granted: deque[int] = field(default_factory=deque)


#: A channel's queued CLOSE. Its other queued items: a spack's rest (a bytearray), and the
#: CLOSE and RESET of a channel reset before any record of it went out (bytes).
_CLOSE_ITEM: Final = "close"


class ScriptedPeer:
    """One side of a stalk connection, without I/O, making stalk's choices (see above).

    Calls: :meth:`accept`, :meth:`queue`, :meth:`flush`, :meth:`send`, :meth:`ping`,
    :meth:`close` and, with channels, :meth:`open_channel`, :meth:`close_channel`,
    :meth:`reset_channel`, :meth:`release` and :meth:`release_channel`; spacks are given
    as their encodings. :meth:`receive_data` takes the peer's bytes and returns the events
    in the form of vectors/README.md (a spack as ``"encoded"``); :meth:`data_to_send` is
    what it writes, all of it (section 24's "Output").

    :param ephemeral: the fixed ephemeral private key (testing only).
    :param responder_static: an initiator's pinned responder key: IK (else XX).
    :param channels: what it offers for channels (section 8), if anything.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        static: StaticKey,
        ephemeral: bytes,
        responder_static: bytes | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        rekey_after_messages: int = 65536,
        rekey_after_bytes: int = 2**30,
        channels: ChannelOffer | None = None,
        certificate: bytes | None = None,
        check: CertificateCheck | None = None,
    ) -> None:
        self.initiator = initiator
        self._static = static
        self._ephemeral = ephemeral
        self._max = max_message_size
        self._rekey_after = (rekey_after_messages, rekey_after_bytes)
        self._offer = channels
        extra = None if certificate is None else {"certificate": certificate}
        self._params = encode_params(max_message_size, extra, channels)
        self._check = check
        #: the peer's certificate, once it passed ``check``
        self.peer_certificate: PeerCertificate | None = None
        self._in = bytearray()
        self._out = bytearray()
        self._events: list[dict[str, Any]] = []
        self._send_cs: Any = None
        self._recv_cs: Any = None
        self._split: tuple[Any, Any] | None = None
        self._counts = [0, 0]  # messages and plaintext bytes since the last rekey
        self._owed = Packer()
        self._app = Packer()
        self._app_out: list[tuple[bytearray, bool]] = []
        self._closing: tuple[int, str] | None = None
        #: close() was called: nothing more becomes owed (section 24, "Records owed")
        self._close_called = False
        self.close_sent = False
        self.close_received: tuple[int, str] | None = None
        self._pings_sent = 0
        self._pongs = 0
        self._parts: list[bytes] = []  # without channels: the spack in progress
        self.pattern = "XX" if responder_static is None or not initiator else "IK"
        self.peer_params: dict[str, Any] = {}
        self.peer_static = b""
        self.handshake_hash = b""
        # The channel table (section 24), empty until both sides offered channels.
        self.channels = False
        self._ours_offer = self._theirs = channels or ChannelOffer(0, 0, 0)
        self._live: dict[int, _Scripted] = {}
        self._all: dict[int, _Scripted] = {}
        self._zero = _Scripted(0, _Credit(0, 0, 0))
        self._conn = _Credit(0, 0, 0)
        self._next_id = 1 if self.initiator else 2
        self._wire_highest = self._next_id - 2
        self._peer_highest = 0 if self.initiator else -1
        self._our_open = self._peer_open = 0
        self._turns: dict[int, deque[Any]] = {}
        self._unflushed: list[tuple[int, Any]] = []
        self._closing_channels: set[int] = set()
        #: the peer's spacks in progress: channel -> data bytes so far, in the order they began
        self._progress: dict[int, int] = {}
        self._slot: int | None = None
        self._slot_granted = 0
        self._slot_complete = False
        if initiator:
            self._phase = "verdict"
            self._prologue = MAGIC + bytes([VERSION]) + self.pattern.encode("ascii")
            keys: dict[str, Any] = {"s": static.keypair()}
            if responder_static is not None:
                keys["rs"] = X25519DH().create_public(responder_static)
            self._hs = self._start_noise(keys)
            payload = XX_MSG1_PAYLOAD if self.pattern == "XX" else self._params
            msg1, _ = _noise_call(self._hs.write_message, payload)
            self._out += self._prologue + frame(msg1)
        else:
            self._phase = "preamble"
            self._prologue = b""

    def _start_noise(self, keys: dict[str, Any]) -> Any:
        return _handshake_state(
            self.pattern,
            initiator=self.initiator,
            prologue=self._prologue,
            ephemeral=self._ephemeral,
            **keys,
        )

    # -- output (section 24, "Output"; section 12 without channels) -------------------------

    def data_to_send(self) -> bytes:
        """Everything there is to write now, in order."""
        if not self.close_sent and self._send_cs is not None:
            for plaintext in self._owed.take():
                self._seal(plaintext)
        for plaintext, final in self._app_out:
            self._seal(plaintext, final=final)
        self._app_out.clear()
        if self.channels and not self.close_sent:
            while plaintext := self._fill():
                self._seal(plaintext)
            if self._closing is not None and not self._waiting():
                self._seal(bytearray(close_record(*self._closing)), final=True)
                self._closing = None
        out, self._out = bytes(self._out), bytearray()
        return out

    def _seal(self, plaintext: bytearray, *, final: bool = False) -> None:
        """Encrypt one plaintext as a frame, with section 15's REKEY when it is due."""
        if self.close_sent:
            raise AssertionError("nothing may follow our CLOSE")
        counts = self._counts
        counts[0] += 1
        counts[1] += len(plaintext)
        due = counts[0] >= self._rekey_after[0] or counts[1] >= self._rekey_after[1]
        rekeying = due and not final
        if rekeying:
            plaintext += REKEY_RECORD
        self._out += frame(bytes(self._send_cs.encrypt_with_ad(b"", bytes(plaintext))))
        if rekeying:
            rekey(self._send_cs)
            self._counts = [0, 0]
        self.close_sent = final

    # -- the application's calls ------------------------------------------------------------

    def accept(self) -> list[dict[str, Any]]:
        """Responder: admit the initiator of the ``peer_identified`` event; its events."""
        if self._phase != "authorize":
            raise LocalError("accept() before the initiator is identified")
        if self.pattern == "IK":
            msg2, result = _noise_call(self._hs.write_message, self._params)
            self._out += b"\x00" + frame(msg2)
            self._start_transport(result)
            self._phase = "confirming"
            return []
        if self._split is None:
            raise AssertionError("XX message 3 gave no keys")
        self._start_transport(self._split)
        self._send_ready()
        events, self._events = self._events, []
        return events

    def queue(self, encoded: bytes, channel: int = 0) -> None:
        """Queue one spack encoding (on ``channel``); :meth:`flush` sends it."""
        if not self.channels:
            if channel:
                raise LocalError("no channels on this connection")
            self._app.add_spack(encoded)
            return
        chan = self._zero if not channel else self._live.get(channel)
        sendable = (OPEN, RECEIVE_CLOSED)
        if chan is None or channel in self._closing_channels or chan.state not in sendable:
            raise LocalError(f"channel {channel} is not open for sending")
        if channel:
            self._move(chan, "data sent")
        self._unflushed.append((channel, bytearray(encoded)))

    def flush(self) -> None:
        """Make everything queued sendable (section 24) or packed (section 12)."""
        if not self.channels:
            self._app_out.extend((plaintext, False) for plaintext in self._app.take())
            return
        for channel, item in self._unflushed:
            self._turns.setdefault(channel, deque()).append(item)
        self._unflushed.clear()

    def send(self, encoded: bytes, channel: int = 0) -> None:
        """:meth:`queue` then :meth:`flush`."""
        self.queue(encoded, channel)
        self.flush()

    def ping(self, payload: bytes) -> None:
        """A PING, after whatever was queued (without channels, in the same plaintext)."""
        self._pings_sent += 1
        self._app.add(record(PING, payload))
        self._app_out.extend((plaintext, False) for plaintext in self._app.take())

    def close(self, code: int = NORMAL, reason: str = "") -> None:
        """The connection's CLOSE: after what was queued; with channels, after every spack
        waiting, credit included."""
        self._close_called = True
        if self.channels and self._waiting():
            self.flush()
            self._closing = (code, reason)
            return
        self._app.add(close_record(code, reason))
        plaintexts = self._app.take()
        self._app_out.extend((plaintext, plaintext is plaintexts[-1]) for plaintext in plaintexts)

    # -- channels: the application's calls ---------------------------------------------------

    def open_channel(self) -> int:
        """Take the next id of ours (its first record opens it on the wire)."""
        if self._our_open >= self._theirs.max_channels:
            raise LocalError("the peer's max_channels is reached")
        channel = self._next_id
        self._next_id += 2
        self._our_open += 1
        self._live[channel] = self._new_channel(channel)
        return channel

    def close_channel(self, channel: int) -> None:
        """Queue the channel's CLOSE after its spacks, and flush."""
        chan = self._live.get(channel) if channel else None
        if chan is None or chan.state not in (OPEN, RECEIVE_CLOSED):
            raise LocalError(f"channel {channel} is not open for sending")
        self._unflushed.append((channel, _CLOSE_ITEM))
        self._closing_channels.add(channel)
        self.flush()

    def reset_channel(self, channel: int, code: int, reason: str) -> None:
        """Reset a channel: drop what it had not sent, release what it held, owe the RESET."""
        chan = self._live.get(channel) if channel else None
        if chan is None:
            raise LocalError(f"channel {channel} is not open")
        on_wire = not self._ours(channel) or channel <= self._wire_highest
        if not on_wire:  # its CLOSE opens it, then the RESET: closed-reset-sent
            self._move(chan, "CLOSE sent")
        self._move(chan, "RESET sent")
        self._drop_sending(channel)
        self._forget(chan, self._owed.add)
        body = struct.pack(">H", code) + reason.encode("utf-8")
        if on_wire:
            self._owed.add(record(RESET, body, channel))
        else:
            item = record(CLOSE, b"\x00\x00", channel) + record(RESET, body, channel)
            self._turns.setdefault(channel, deque()).append(item)

    def release(self, channel: int, size: int) -> None:
        """The application received a spack of ``size`` data bytes from ``channel``."""
        chan = self._zero if not channel else self._all[channel]
        owe = self._owe
        pre = chan.pre_granted.popleft() if chan.pre_granted else 0
        handover = pre > 0
        if handover:  # the slot's spack: its bytes went back as they arrived
            size -= pre
            self._free_slot()
        if not channel or channel in self._live:
            increment = chan.credit.grant_back(size)
            if increment:
                owe(window_record(channel, increment))
        self._release_connection(size, owe)
        if handover:
            self._offer_slot(owe)

    def _owe(self, rec: bytes) -> None:
        """Owe a record of the protocol's own, unless close() was called."""
        if not self._close_called:
            self._owed.add(rec)

    def release_channel(self, channel: int) -> None:
        """The application let go of a channel the peer reset: our answering RESET is owed."""
        chan = self._live.get(channel)
        if chan is None or chan.state != RESET_RECEIVED:
            raise LocalError(f"channel {channel} was not reset by the peer")
        self._move(chan, "released")
        self._owe(reset_record(channel))

    # -- channels: sending (section 24, "Queues and turns") ----------------------------------

    def _waiting(self) -> bool:
        return bool(self._turns or self._unflushed)

    def _fill(self) -> bytearray:
        """One plaintext: the channels in turn order, each at most one turn."""
        plaintext = bytearray()
        out_of_credit: list[tuple[int, deque[Any]]] = []
        turns = self._turns
        while turns:
            channel = next(iter(turns))
            items = turns.pop(channel)
            ended = self._turn(channel, items, plaintext)
            if ended == "full":
                turns[channel] = items
                break
            if ended == "credit":
                out_of_credit.append((channel, items))
        for channel, items in out_of_credit:
            turns[channel] = items
        return plaintext

    def _turn(self, channel: int, items: deque[Any], plaintext: bytearray) -> str:
        """Pack ``channel``'s items: ``"empty"``, ``"full"`` or ``"credit"`` (out of it)."""
        chan = self._zero if not channel else self._live[channel]
        while items:
            item = items[0]
            if not isinstance(item, bytearray):  # its CLOSE, or CLOSE and RESET
                rec = record(CLOSE, b"\x00\x00", channel) if item == _CLOSE_ITEM else item
                if len(plaintext) + len(rec) > RECORD_CAPACITY:
                    return "full"
                plaintext += rec
                items.popleft()
                self._on_wire(channel)
                if item == _CLOSE_ITEM:
                    self._closing_channels.discard(channel)
                    self._move(chan, "CLOSE sent")
                continue
            credit = min(chan.credit.send, self._conn.send)
            if not credit:
                return "credit"
            avail = RECORD_CAPACITY - len(plaintext) - 1 - len(uvarint(channel))
            left = len(item)
            if left <= credit and left + len(uvarint(left)) <= avail:
                plaintext += record(MESSAGE, bytes(item), channel)
                self._spend(chan, left)
                items.popleft()
                continue
            room = largest_body(avail)
            if room < MIN_FRAGMENT and room < min(credit, left):
                return "full"
            size = min(room, credit, left)
            plaintext += record(FRAGMENT, bytes(item[:size]), channel)
            del item[:size]
            self._spend(chan, size)
        return "empty"

    def _spend(self, chan: _Scripted, size: int) -> None:
        chan.credit.send -= size
        self._conn.send -= size
        self._on_wire(chan.id)

    def _on_wire(self, channel: int) -> None:
        if self._ours(channel) and channel > self._wire_highest:
            self._wire_highest = channel

    def _drop_sending(self, channel: int) -> None:
        self._turns.pop(channel, None)
        self._unflushed = [entry for entry in self._unflushed if entry[0] != channel]
        self._closing_channels.discard(channel)

    # -- channels: the table -----------------------------------------------------------------

    def _start_channels(self, theirs: ChannelOffer) -> None:
        """Both sides offered channels (section 24): the credits start."""
        ours = self._offer
        if ours is None:  # pragma: no cover - only called when both offered
            raise AssertionError("no channels offered")
        self.channels = True
        self._ours_offer, self._theirs = ours, theirs
        self._zero = self._new_channel(0)
        self._conn = _Credit(
            theirs.connection_window, ours.connection_window, ours.connection_window
        )

    def _new_channel(self, channel: int) -> _Scripted:
        window = self._ours_offer.channel_window
        chan = _Scripted(channel, _Credit(self._theirs.channel_window, window, window))
        if channel:
            self._all[channel] = chan
        return chan

    def _ours(self, channel: int) -> bool:
        return channel > 0 and channel % 2 == (1 if self.initiator else 0)

    def _move(self, chan: _Scripted, what: str) -> None:
        new = CHANNEL_STATES.get((chan.state, what))
        if new is None:
            raise InteropError(f"{what} on channel {chan.id} while it is {chan.state}")
        chan.state = new
        if new == ENDED:
            del self._live[chan.id]
            if self._ours(chan.id):
                self._our_open -= 1
            else:
                self._peer_open -= 1

    def _for_record(self, channel: int, opened: list[int]) -> _Scripted:
        """The channel of a data record or CLOSE from the peer, opening it (and lower ids)."""
        chan = self._live.get(channel)
        if chan is not None:
            return chan
        if self._ours(channel) or channel <= self._peer_highest:
            raise InteropError(f"record on channel {channel}, never opened or ended")
        ids = list(range(self._peer_highest + 2, channel + 1, 2))
        if self._peer_open + len(ids) > self._ours_offer.max_channels:
            raise InteropError(f"channel {channel} past our max_channels", CHANNEL_LIMIT)
        for each in ids:
            self._live[each] = self._new_channel(each)
            opened.append(each)
        self._peer_open += len(ids)
        self._peer_highest = channel
        return self._live[channel]

    def _existing(self, channel: int) -> _Scripted | None:
        """An open channel; ``None`` for one that ended (a WINDOW or RESET may cross it)."""
        chan = self._live.get(channel)
        highest = self._next_id - 2 if self._ours(channel) else self._peer_highest
        if chan is None and channel > highest:
            raise InteropError(f"record on channel {channel}, which was never opened")
        return chan

    # -- channels: grants (section 24, "Grants") ---------------------------------------------

    def _grant(self, chan: _Scripted, size: int, owe: Callable[[bytes], None]) -> None:
        if size:
            chan.credit.receive += size
            owe(window_record(chan.id, size))
            self._conn.receive += size
            owe(connection_window_record(size))

    def _release_connection(self, size: int, owe: Callable[[bytes], None]) -> None:
        increment = self._conn.grant_back(size)
        if increment:
            owe(connection_window_record(increment))

    def _free_slot(self) -> None:
        self._slot = None
        self._slot_granted = 0
        self._slot_complete = False

    def _offer_slot(self, owe: Callable[[bytes], None]) -> None:
        for channel, so_far in self._progress.items():
            chan = self._zero if not channel else self._live[channel]
            if not chan.credit.receive or not self._conn.receive:
                self._slot = channel
                self._grant(chan, so_far, owe)
                self._slot_granted = so_far
                return

    def _forget(self, chan: _Scripted, owe: Callable[[bytes], None]) -> None:
        """A reset channel's spack in progress is dropped, and its slot if it held it."""
        dropped = self._progress.pop(chan.id, 0)
        chan.parts.clear()
        handover = self._slot == chan.id and not self._slot_complete
        if handover:
            dropped -= self._slot_granted
            self._free_slot()
        self._release_connection(dropped, owe)
        if handover:
            self._offer_slot(owe)

    # -- receiving ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[dict[str, Any]]:
        """Take the peer's bytes; the events they make, in order."""
        if self.close_received is None:
            self._in += data
            self._progress_input()
        events, self._events = self._events, []
        return events

    def _take(self, n: int) -> bytes | None:
        if len(self._in) < n:
            return None
        data = bytes(self._in[:n])
        del self._in[:n]
        return data

    def _frame(self) -> bytes | None:
        if len(self._in) < 2:
            return None
        (length,) = struct.unpack_from(">H", self._in)
        if not length:
            raise InteropError("zero-length frame")
        if len(self._in) < 2 + length:
            return None
        body = bytes(self._in[2 : 2 + length])
        del self._in[: 2 + length]
        return body

    def _progress_input(self) -> None:
        while self.close_received is None:
            if self._phase == "preamble":
                preamble = self._take(8)
                if preamble is None:
                    return
                self._responder_preamble(preamble)
                continue
            if self._phase == "verdict":
                verdict = self._take(1)
                if verdict is None:
                    return
                if verdict != b"\x00":
                    raise InteropError(f"refused with code {verdict[0]}")
                self._phase = "msg2"
                continue
            if self._phase == "authorize":
                return  # accept() first
            body = self._frame()
            if body is None:
                return
            if self._phase == "msg1":
                self._responder_msg1(body)
            elif self._phase == "msg2":
                self._initiator_msg2(body)
            elif self._phase == "msg3":
                self._responder_msg3(body)
            else:
                self._transport(body)

    def _responder_preamble(self, preamble: bytes) -> None:
        pattern = preamble[6:].decode("ascii", "replace")
        if preamble[:5] != MAGIC or preamble[5] != VERSION or pattern not in PATTERNS:
            raise InteropError(f"preamble {preamble.hex()}", UNSUPPORTED)
        self.pattern = pattern
        self._prologue = preamble
        self._hs = self._start_noise({"s": self._static.keypair()})
        self._phase = "msg1"

    def _responder_msg1(self, body: bytes) -> None:
        payload, _ = _noise_call(self._hs.read_message, body)
        if self.pattern == "XX":
            decode_map(payload, MAX_XX_MSG1_PAYLOAD)
            msg2, _ = _noise_call(self._hs.write_message, self._params)
            self._out += b"\x00" + frame(msg2)
            self._phase = "msg3"
            return
        self.peer_params = decode_params(payload)
        self._identified()

    def _responder_msg3(self, body: bytes) -> None:
        payload, result = _noise_call(self._hs.read_message, body)
        self.peer_params = decode_params(payload)
        self._split = result
        self._identified()

    def _check_certificate(self) -> None:
        """Section 25: the peer's certificate, as soon as its payload and key are known."""
        if self._check is not None:
            certificate = self.peer_params.get("certificate")
            self.peer_certificate = self._check.verify(certificate, self.peer_static)

    def _identified(self) -> None:
        self.peer_static = bytes(self._hs.rs.data)
        self._check_certificate()
        self._phase = "authorize"
        self._events.append(
            {
                "event": "peer_identified",
                "pattern": self.pattern,
                "peer_static_public_hex": self.peer_static.hex(),
            }
        )

    def _initiator_msg2(self, body: bytes) -> None:
        payload, result = _noise_call(self._hs.read_message, body)
        self.peer_params = decode_params(payload)
        self.peer_static = bytes(self._hs.rs.data)
        self._check_certificate()
        if self.pattern == "XX":
            msg3, result = _noise_call(self._hs.write_message, self._params)
            self._out += frame(msg3)
            self._start_transport(result)
            self._phase = "confirming"
            return
        self._start_transport(result)
        self._send_ready()

    def _start_transport(self, result: Any) -> None:
        self._send_cs, self._recv_cs = _split(result, initiator=self.initiator)
        self.handshake_hash = bytes(self._hs.symmetricstate.get_handshake_hash())
        theirs = channel_offer(self.peer_params)
        if self._offer is not None and theirs is not None:
            self._start_channels(theirs)

    def _complete(self) -> dict[str, Any]:
        return {
            "event": "handshake_complete",
            "pattern": self.pattern,
            "peer_static_public_hex": self.peer_static.hex(),
            "handshake_hash_hex": self.handshake_hash.hex(),
            "peer_max_message_size": self.peer_params["max_message_size"],
        }

    def _send_ready(self) -> None:
        """Section 9: READY, alone and at once, by the party that read the last message."""
        self._seal(bytearray(record(READY)))
        self._phase = "open"
        self._events.append(self._complete())

    def _transport(self, body: bytes) -> None:
        if len(body) < TAG_LEN:
            raise InteropError("transport message shorter than its tag")
        try:
            plaintext = bytes(self._recv_cs.decrypt_with_ad(b"", body))
        except DecryptFailedException as exc:
            raise InteropError("transport message failed authentication") from exc
        records = parse_records(plaintext, channels=self.channels)
        if self._phase == "confirming":
            if records[0].kind != READY:
                raise InteropError(f"first record has kind {records[0].kind}, not READY")
            records = records[1:]
            self._phase = "open"
            self._events.append(self._complete())
        if any(rec.kind == READY for rec in records):
            raise InteropError("READY where section 9 does not allow it")
        opened: list[int] = []
        events: list[dict[str, Any]] = []
        grants: list[bytes] = []
        pings: list[bytes] = []
        for rec in records:
            if rec.channel:
                self._channel_record(rec, opened, events, grants.append)
            elif rec.kind in (MESSAGE, FRAGMENT):
                self._data(rec, opened, events, grants.append)
            elif rec.kind == PING:
                pings.append(rec.body)
            elif rec.kind == PONG:
                if self._pongs < self._pings_sent:  # section 14: else discarded
                    self._pongs += 1
                    events.append({"event": "pong", "payload_hex": rec.body.hex()})
            elif rec.kind == CLOSE:
                busy = self._parts or (self.channels and self._progress)
                self.close_received = decode_close(rec.body)
                if busy and self.close_received[0] == NORMAL:  # section 12
                    raise InteropError("CLOSE NORMAL while a spack is incomplete")
                code, reason = self.close_received
                events.append({"event": "close", "code": code, "reason": reason})
            elif rec.kind == WINDOW:
                self._zero.credit.send = _add_credit(self._zero.credit.send, rec.body)
            elif rec.kind == CONNECTION_WINDOW:
                self._conn.send = _add_credit(self._conn.send, rec.body)
        # Section 11: acted on once all of it is checked. Section 24: the channels it opened
        # are reported first; what it makes us owe is its grants, then its PONGs.
        self._events += [{"event": "channel_opened", "channel": c} for c in opened] + events
        if records and records[-1].kind == REKEY:
            rekey(self._recv_cs)
        if not self._close_called:
            self._owed.add_group(grants + [record(PONG, body) for body in pings])

    def _data(
        self,
        rec: Record,
        opened: list[int],
        events: list[dict[str, Any]],
        owe: Callable[[bytes], None],
    ) -> None:
        """A MESSAGE or FRAGMENT: credit, the slot, and the spack it completes."""
        size = len(rec.body)
        more = rec.kind == FRAGMENT
        if not self.channels:
            self._parts.append(rec.body)
            if sum(map(len, self._parts)) > self._max:
                raise InteropError("spack over our limit", MESSAGE_TOO_LARGE)
            if not more:
                whole, self._parts = b"".join(self._parts), []
                events.append({"event": "message", "encoded": whole})
            return
        # Section 24's order: the channel id, the connection's credit, the state, its credit.
        chan = self._zero if not rec.channel else self._for_record(rec.channel, opened)
        if size > self._conn.receive:
            raise InteropError("data beyond the connection's credit", FLOW_CONTROL_ERROR)
        self._conn.receive -= size
        if rec.channel:
            self._move(chan, "data received")
        if size > chan.credit.receive:
            raise InteropError(f"data beyond channel {chan.id}'s credit", FLOW_CONTROL_ERROR)
        chan.credit.receive -= size
        if chan.state in RESETTING:  # sent before the peer saw our RESET: dropped
            self._release_connection(size, owe)
            return
        so_far = self._progress.get(chan.id, 0) + size
        in_slot = self._slot == chan.id and not self._slot_complete
        if in_slot:
            self._grant(chan, size, owe)
            self._slot_granted += size
        elif more and self._slot is None and (not chan.credit.receive or not self._conn.receive):
            self._slot = chan.id
            self._grant(chan, so_far, owe)
            self._slot_granted = so_far
            in_slot = True
        chan.parts.append(rec.body)
        if sum(map(len, chan.parts)) > self._max:
            raise InteropError("spack over our limit", MESSAGE_TOO_LARGE)
        if more:
            self._progress[chan.id] = so_far
            return
        self._progress.pop(chan.id, None)
        chan.pre_granted.append(self._slot_granted if in_slot else 0)
        if in_slot:
            self._slot_complete = True
        whole, chan.parts = b"".join(chan.parts), []
        events.append({"event": "message", "channel": chan.id, "encoded": whole})

    def _channel_record(
        self,
        rec: Record,
        opened: list[int],
        events: list[dict[str, Any]],
        owe: Callable[[bytes], None],
    ) -> None:
        """A record on a channel other than 0 (section 24)."""
        if rec.kind in (MESSAGE, FRAGMENT):
            self._data(rec, opened, events, owe)
        elif rec.kind == WINDOW:
            chan = self._existing(rec.channel)
            if chan is not None:  # else it crossed the channel's end: ignored
                chan.credit.send = _add_credit(chan.credit.send, rec.body)
        elif rec.kind == CLOSE:
            chan = self._for_record(rec.channel, opened)
            if chan.parts:
                raise InteropError(f"CLOSE on channel {chan.id} inside a spack")
            dropped = chan.state in RESETTING
            self._move(chan, "CLOSE received")
            if not dropped:
                events.append({"event": "channel_close", "channel": chan.id})
        else:  # RESET
            code, reason = decode_close(rec.body, "RESET")
            found = self._existing(rec.channel)
            if found is None:
                pass  # on a channel that ended: it crossed the channel's end, ignored
            elif found.state in RESETTING:  # the answer to ours
                self._move(found, "RESET received")
            else:
                self._move(found, "RESET received")
                self._drop_sending(found.id)
                self._forget(found, owe)
                events.append(
                    {"event": "channel_reset", "channel": found.id, "code": code, "reason": reason}
                )
