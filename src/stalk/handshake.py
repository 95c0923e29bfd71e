"""Handshake state machines: preamble, verdict and the Noise XX / IK messages (sans-IO).

Theory of operation
-------------------
SPEC "Handshake" in code. Both machines read from the session's
:class:`~stalk.framing.FrameReader` and append the bytes they want sent to ``out``; neither
does I/O or keeps time.

Initiator (:class:`InitiatorHandshake`)::

    XX:  -> preamble, [msg1 e]          <- verdict, [msg2 e ee s es]   -> [msg3 s se]   done
    IK:  -> preamble, [msg1 e es s ss]  <- verdict, [msg2 e ee se]                      done

Responder (:class:`ResponderHandshake`)::

    XX:  preamble, msg1 -> answer verdict + msg2; msg3 -> peer known -> authorize -> done
    IK:  preamble, msg1 -> peer known -> authorize -> answer verdict + msg2            done

The preamble's 8 bytes are the Noise prologue, so a preamble altered in flight (another
version, IK downgraded to XX) makes the two sides' handshake hashes differ and the first
authenticated message fails. The responder learns the initiator's static key at IK message 1
or XX message 3 and then stops in ``awaiting_authorization`` until :meth:`accept` or
:meth:`refuse`; with IK that is before it has spent a DH on an answer.

Every message's length is checked from its frame header (its keys and tags, plus at most
3,072 payload bytes, 1,024 for XX message 1), and every public key it carries must be
canonical and usable (SPEC
"Canonical keys"): the cleartext ``e`` is checked before the message is handed to Noise, the
encrypted ``s`` once Noise has read the message (also when that read failed: a low-order
``s`` makes the DH that follows it fail). A non-canonical key gives the same DH results as
its canonical twin, so without the check the handshake would succeed under a second
identity for one key.

A handshake error is always fatal (noiseprotocol's state is already advanced). Before
raising, the responder queues a refusal verdict when it has not answered yet, so a
well-behaved initiator learns why (the refusal is unauthenticated: it can only ever make a
handshake fail, never succeed). After XX message 3 was read the transport ciphers exist:
the responder then leaves the code and cipher for an authenticated CLOSE in
``failure_close`` for the session to send. SPEC "Verdict and refusals" lists every code.

Payloads are exactly one msgpack map with string keys, none repeated (SPEC "Handshake
payloads"): XX message 1 carries an empty map (it is cleartext); each party's parameters
travel in its last handshake message (initiator: XX msg3 or IK msg1; responder: msg2).
Unknown keys are ignored so that later versions can add fields.

Certificates (SPEC "Certificates in the handshake") ride in the same payload, as
``"certificate"``. A side given a :class:`~stalk.certificates.CertificatePolicy` checks
the peer's as soon as it has the payload and the static key the handshake authenticated:
the responder after IK message 1 (before any DH on an answer) or XX message 3, refusing
with CERTIFICATE_REFUSED as it refuses anything else there; the initiator after message 2,
before it sends anything more (in XX its own static key and certificate never go to a
responder whose certificate failed). A certified peer is a
:class:`~stalk.certificates.CertifiedIdentity`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import msgpack

from stalk._noise import (
    DHLEN,
    TAGLEN,
    HandshakeAuthenticationFailed,
    NoiseHandshake,
    TransportCipher,
)
from stalk.certificates import CertificatePolicy
from stalk.errors import (
    HandshakeFailed,
    InvalidPeerKey,
    PeerIdentityMismatch,
    PeerRefused,
    reason_for_peer,
)
from stalk.framing import (
    VERDICT_MAX,
    FrameReader,
    FramingError,
    Refusal,
    encode_frame,
    encode_preamble,
    encode_refusal,
)
from stalk.identity import Identity, PublicIdentity, check_public_key
from stalk.wire import (
    MAX_CHANNELS_LIMIT,
    MAX_CLEARTEXT_PAYLOAD,
    MAX_HANDSHAKE_PAYLOAD,
    MAX_MESSAGE_SIZE_LIMIT,
    MAX_WINDOW,
    MIN_CHANNEL_WINDOW,
    MIN_CONNECTION_WINDOW,
    MIN_MAX_MESSAGE_SIZE,
    PROTOCOL_NAMES,
    PROTOCOL_VERSION,
    CloseCode,
    Pattern,
)

__all__ = [
    "ChannelParams",
    "HandshakeResult",
    "InitiatorHandshake",
    "Params",
    "ResponderHandshake",
    "busy_refusal",
    "decode_params",
    "encode_params",
]

#: The payload of XX message 1: an empty msgpack map (that message is cleartext).
EMPTY_MAP: Final = b"\x80"
_VERDICT_ACCEPT: Final = b"\x00"


@dataclass(frozen=True, slots=True)
class ChannelParams:
    """What a party offers for channels (SPEC "Channels"); sent as three parameters.

    :param max_channels: how many channels the peer may have open towards us at once.
    :param channel_window: the credit we grant the peer on each channel, channel 0 included.
    :param connection_window: the credit we grant the peer for the whole connection.
    """

    max_channels: int
    channel_window: int
    connection_window: int

    def __post_init__(self) -> None:
        for name, low, high in _CHANNEL_FIELDS:
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"{name} must be an int in {low}..{high}")


#: The channel parameters with their ranges, in the order they are encoded.
_CHANNEL_FIELDS: Final = (
    ("max_channels", 0, MAX_CHANNELS_LIMIT),
    ("channel_window", MIN_CHANNEL_WINDOW, MAX_WINDOW),
    ("connection_window", MIN_CONNECTION_WINDOW, MAX_WINDOW),
)


@dataclass(frozen=True, slots=True)
class Params:
    """A party's handshake parameters (SPEC "Handshake payloads").

    ``channels`` is ``None`` when the party sent no channel parameters (version 1 only);
    ``certificate`` the bytes of the certificate it presented, unchecked, or ``None``.
    """

    version: int
    max_message_size: int
    channels: ChannelParams | None = None
    certificate: bytes | None = None


def encode_params(
    max_message_size: int,
    channels: ChannelParams | None = None,
    certificate: bytes | None = None,
) -> bytes:
    """The msgpack map a party sends in its last handshake message.

    Without a certificate its bytes are exactly what they were before certificates
    existed (``vectors/`` checks them).
    """
    fields: dict[str, int | bytes] = {
        "version": PROTOCOL_VERSION,
        "max_message_size": max_message_size,
    }
    if channels is not None:
        for name, _, _ in _CHANNEL_FIELDS:
            fields[name] = getattr(channels, name)
    if certificate is not None:
        fields["certificate"] = certificate
    return msgpack.packb(fields, use_bin_type=True)


class _Pairs:
    """A msgpack map as decoded: its (key, value) pairs in order, repeats kept."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[object, object]]) -> None:
        self.pairs = pairs


def _decode_map(payload: bytes, limit: int = MAX_HANDSHAKE_PAYLOAD) -> dict[str, object]:
    """Decode a handshake payload: exactly one map, string keys, none repeated (SPEC 8).

    Maps nested in the values of unknown keys are not looked into: they are ignored.

    :param limit: the payload's bound (XX message 1's is smaller).
    :raises ~stalk.HandshakeFailed: anything else (the responder refuses with PROTOCOL_ERROR).
    """
    if len(payload) > limit:
        raise HandshakeFailed(f"handshake payload longer than {limit} bytes")
    try:
        # Maps come back as _Pairs, so that repeated keys are seen (a dict would keep only
        # the last value) and no key needs to be hashable. Trailing bytes raise ExtraData.
        value = msgpack.unpackb(payload, raw=False, strict_map_key=False, object_pairs_hook=_Pairs)
    except Exception as exc:
        # msgpack raises ValueError subclasses, StackError, UnicodeDecodeError and others.
        raise HandshakeFailed("handshake payload is not exactly one valid msgpack value") from exc
    if type(value) is not _Pairs:
        raise HandshakeFailed("handshake payload is not a msgpack map")
    fields: dict[str, object] = {}
    for key, item in value.pairs:
        if type(key) is not str:
            raise HandshakeFailed("handshake payload has a map key that is not a string")
        if key in fields:
            raise HandshakeFailed("handshake payload repeats a map key")
        fields[key] = item
    return fields


def _describe(value: object) -> str:
    """A received field for an error message: an int as is, anything else by its type only."""
    if type(value) is int:
        return str(value)
    return "missing" if value is None else f"of type {type(value).__name__}"


def decode_params(payload: bytes) -> Params:
    """Parse and check a party's parameters.

    Every field must be of type ``int`` (``bool`` is refused), but ``certificate``, which
    must be ``bin``; unknown keys are ignored. The certificate is not looked into here.

    :raises ~stalk.HandshakeFailed: not a map as :func:`_decode_map` requires, wrong
        version, a missing, mistyped or out-of-range ``max_message_size``, channel
        parameters that are not all three, each an int within its range, or a
        ``certificate`` that is not ``bin``.
    """
    fields = _decode_map(payload)
    version = fields.get("version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise HandshakeFailed(
            f"handshake payload version is {_describe(version)}, not {PROTOCOL_VERSION}"
        )
    size = fields.get("max_message_size")
    if type(size) is not int or not MIN_MAX_MESSAGE_SIZE <= size <= MAX_MESSAGE_SIZE_LIMIT:
        raise HandshakeFailed(
            f"handshake payload max_message_size is {_describe(size)}, not "
            f"{MIN_MAX_MESSAGE_SIZE}..{MAX_MESSAGE_SIZE_LIMIT}"
        )
    certificate = fields.get("certificate")
    if certificate is not None and type(certificate) is not bytes:
        raise HandshakeFailed(
            f"handshake payload certificate is of type {type(certificate).__name__}, not bin"
        )
    return Params(
        version=version,
        max_message_size=size,
        channels=_decode_channels(fields),
        certificate=certificate,
    )


def _decode_channels(fields: dict[str, object]) -> ChannelParams | None:
    """The channel parameters: all three (checked), or none (a version-1 peer)."""
    present = [name for name, _, _ in _CHANNEL_FIELDS if name in fields]
    if not present:
        return None
    values: dict[str, int] = {}
    for name, low, high in _CHANNEL_FIELDS:
        value = fields.get(name)
        if type(value) is not int or not low <= value <= high:
            raise HandshakeFailed(
                f"handshake payload {name} is {_describe(value)}, not {low}..{high}"
            )
        values[name] = value
    return ChannelParams(**values)


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """What a finished handshake hands to the transport phase."""

    pattern: Pattern
    peer: PublicIdentity
    peer_params: Params
    handshake_hash: bytes
    send_cipher: TransportCipher
    recv_cipher: TransportCipher


def _result(
    noise: NoiseHandshake, pattern: Pattern, params: Params, peer: PublicIdentity
) -> HandshakeResult:
    send, recv = noise.split()
    return HandshakeResult(
        pattern=pattern,
        peer=peer,
        peer_params=params,
        handshake_hash=noise.handshake_hash,
        send_cipher=send,
        recv_cipher=recv,
    )


def _on_verdict(error: HandshakeFailed, received: bytes) -> HandshakeFailed:
    """``error``, which the responder's verdict caused, with the bytes it was read from."""
    error.verdict = received or None
    return error


def _eof_during_handshake() -> HandshakeFailed:
    return HandshakeFailed("the peer closed the connection during the handshake")


#: The fixed part of each handshake message (SPEC 7): its public keys and AEAD tags, all
#: but the payload's own bytes. A message is at least this long and at most this plus its
#: payload bound (_payload_limit), so its frame header alone can tell that it is malformed.
_FIXED_LEN: Final[dict[tuple[Pattern, int], int]] = {
    ("XX", 1): DHLEN,  # e, cleartext payload
    ("XX", 2): DHLEN + (DHLEN + TAGLEN) + TAGLEN,  # e, enc(s), enc(payload)
    ("XX", 3): (DHLEN + TAGLEN) + TAGLEN,  # enc(s), enc(payload)
    ("IK", 1): DHLEN + (DHLEN + TAGLEN) + TAGLEN,  # e, enc(s), enc(payload)
    ("IK", 2): DHLEN + TAGLEN,  # e, enc(payload)
}


def _payload_limit(pattern: Pattern, number: int) -> int:
    """The bound of a message's payload: XX message 1 never carries a certificate."""
    return MAX_CLEARTEXT_PAYLOAD if (pattern, number) == ("XX", 1) else MAX_HANDSHAKE_PAYLOAD


def _read_message(reader: FrameReader, pattern: Pattern, number: int) -> bytes | None:
    """The body of handshake message ``number``, ``None`` if incomplete.

    Its length is checked as soon as the frame header is there, before the body is
    buffered.

    :raises ~stalk.HandshakeFailed: a zero-length frame, a message too short to hold its
        keys and tags or too long for its payload bound, or EOF.
    """
    length = reader.frame_length()
    if length is not None:
        fixed = _FIXED_LEN[pattern, number]
        limit = _payload_limit(pattern, number)
        if 0 < length < fixed:
            raise HandshakeFailed(
                f"{pattern} message {number} of {length} bytes is too short (its keys and "
                f"tags take {fixed})"
            )
        if length > fixed + limit:
            raise HandshakeFailed(
                f"{pattern} message {number} of {length} bytes is too long (its payload "
                f"would exceed {limit} bytes)"
            )
    try:
        frame = reader.frame()
    except FramingError as exc:
        raise HandshakeFailed(str(exc)) from exc
    if frame is None:
        if reader.eof:
            raise _eof_during_handshake()
        return None
    buf, start, end = frame
    return bytes(memoryview(buf)[start:end])


def _check_ephemeral(body: bytes, message: str) -> None:
    """Refuse the cleartext ``e`` that starts ``body``, before Noise uses it in a DH.

    :raises ~stalk.InvalidPeerKey: not a canonical, usable X25519 key.
    """
    try:
        check_public_key(body[:DHLEN])
    except ValueError as exc:
        raise InvalidPeerKey(f"the ephemeral key in {message} is refused: {exc}") from exc


def _check_static(noise: NoiseHandshake, message: str) -> None:
    """Refuse the static key that ``message`` carried, once Noise decrypted it.

    :raises ~stalk.InvalidPeerKey: not a canonical, usable X25519 key.
    """
    remote = noise.remote_static
    if remote is None:
        return
    try:
        check_public_key(remote)
    except ValueError as exc:
        raise InvalidPeerKey(f"the static key in {message} is refused: {exc}") from exc


def _read_checked(
    noise: NoiseHandshake, body: bytes, message: str, *, carries_static: bool
) -> bytes:
    """``noise.read_message(body)``, with the static key the message carries checked.

    The check also runs when the read fails: a low-order static key makes the DH right
    after it fail inside Noise, and the key, not the DH, is what the peer got wrong.

    :raises ~stalk.InvalidPeerKey: the message carried a bad static key.
    :raises ~stalk.HandshakeFailed: the read failed for another reason.
    """
    try:
        payload = noise.read_message(body)
    except HandshakeFailed:
        if carries_static:
            _check_static(noise, message)
        raise
    if carries_static:
        _check_static(noise, message)
    return payload


def _peer(policy: CertificatePolicy | None, params: Params, remote: bytes | None) -> PublicIdentity:
    """The peer's static key, with its certificate checked when we require one.

    :raises ~stalk.CertificateError: the policy refuses the peer's certificate (or its
        lack of one).
    """
    if remote is None:  # pragma: no cover - XX and IK always transmit or pre-know it
        raise HandshakeFailed("no static key from the peer")
    key = PublicIdentity(remote)
    return key if policy is None else policy.check(params.certificate, key)


class InitiatorHandshake:
    """The initiator's side: XX without an expected peer key, IK with one.

    :param identity: our static key pair.
    :param peer: the responder's expected static key (selects IK), or ``None`` (XX).
    :param max_message_size: the limit we advertise.
    :param channels: what we offer for channels, or ``None`` (version 1 only).
    :param certificate: the encoding of our certificate, sent in our last message.
    :param policy: require a certificate of the responder, checked this way.
    :param ephemeral: a fixed ephemeral private key: only for test vectors.
    """

    def __init__(
        self,
        identity: Identity,
        peer: PublicIdentity | None,
        max_message_size: int,
        *,
        channels: ChannelParams | None = None,
        certificate: bytes | None = None,
        policy: CertificatePolicy | None = None,
        ephemeral: bytes | None = None,
    ) -> None:
        self.pattern: Pattern = "IK" if peer is not None else "XX"
        self._expected = peer
        self._policy = policy
        self._params = encode_params(max_message_size, channels, certificate)
        preamble = encode_preamble(PROTOCOL_VERSION, self.pattern)
        self._noise = NoiseHandshake(
            PROTOCOL_NAMES[self.pattern],
            initiator=True,
            prologue=preamble,
            static_private=identity.private_bytes(),
            remote_static_public=peer.raw if peer is not None else None,
            ephemeral_private=ephemeral,
        )
        msg1 = self._noise.write_message(self._params if peer is not None else EMPTY_MAP)
        #: Bytes to send, in order; the session drains it.
        self.out: list[bytes] = [preamble, encode_frame(msg1)]
        self._state: Literal["verdict", "msg2", "done"] = "verdict"
        self.result: HandshakeResult | None = None

    def step(self, reader: FrameReader) -> bool:
        """Consume what ``reader`` holds; return ``True`` once the handshake is complete.

        :raises ~stalk.InvalidPeerKey: message 2 carries a key that is not a canonical,
            usable X25519 key.
        :raises ~stalk.CertificateError: we require a certificate of the responder and
            refuse the one it sent (or its lack of one); nothing more has been sent.
        :raises ~stalk.HandshakeFailed: refused, mismatched key, malformed or cut short.
        """
        if self._state == "verdict":
            try:
                verdict = reader.verdict()
            except FramingError as exc:
                raise _on_verdict(HandshakeFailed(str(exc)), reader.peek(VERDICT_MAX)) from exc
            if verdict is None:
                if reader.eof:
                    raise _on_verdict(_eof_during_handshake(), reader.peek(VERDICT_MAX))
                return False
            if isinstance(verdict, Refusal):
                raise _on_verdict(self._refused(verdict), verdict.received)
            self._state = "msg2"
        if self._state == "msg2":
            body = _read_message(reader, self.pattern, 2)
            if body is None:
                return False
            message = f"{self.pattern} message 2"
            _check_ephemeral(body, message)
            payload = _read_checked(self._noise, body, message, carries_static=self.pattern == "XX")
            params = decode_params(payload)
            peer = _peer(self._policy, params, self._noise.remote_static)
            if self.pattern == "XX":
                self.out.append(encode_frame(self._noise.write_message(self._params)))
            self.result = _result(self._noise, self.pattern, params, peer)
            self._state = "done"
        return True

    def _refused(self, refusal: Refusal) -> HandshakeFailed:
        if refusal.code == CloseCode.DECRYPT_FAILED and self._expected is not None:
            return PeerIdentityMismatch(
                "the peer could not decrypt IK message 1: it does not hold the pinned key "
                f"{self._expected.fingerprint} (or the message was altered in transit)",
                expected=self._expected,
            )
        return PeerRefused(
            "the peer refused the handshake",
            code=refusal.code,
            reason=refusal.reason,
        )


class ResponderHandshake:
    """The responder's side: accepts XX and IK, as the preamble says.

    :param identity: our static key pair.
    :param max_message_size: the limit we advertise.
    :param channels: what we offer for channels, or ``None`` (version 1 only).
    :param certificate: the encoding of our certificate, sent in message 2.
    :param policy: require a certificate of the initiator, checked this way.
    :param ephemeral: a fixed ephemeral private key: only for test vectors.
    """

    def __init__(
        self,
        identity: Identity,
        max_message_size: int,
        *,
        channels: ChannelParams | None = None,
        certificate: bytes | None = None,
        policy: CertificatePolicy | None = None,
        ephemeral: bytes | None = None,
    ) -> None:
        self._identity = identity
        self._policy = policy
        self._params = encode_params(max_message_size, channels, certificate)
        self._ephemeral = ephemeral
        self._noise: NoiseHandshake | None = None
        self._state: Literal["preamble", "msg1", "msg3", "authorize", "done", "refused"] = (
            "preamble"
        )
        self._answered = False
        self._peer_params: Params | None = None
        #: Bytes to send, in order; the session drains it.
        self.out: list[bytes] = []
        #: Set when the handshake failed after XX message 3 was read: the verdict is given
        #: (nothing is left in ``out``), but the transport ciphers exist, so the session
        #: sends an authenticated CLOSE with this code instead of READY, with this cipher.
        self.failure_close: tuple[int, TransportCipher] | None = None
        self.pattern: Pattern | None = None
        #: The initiator's static key once known (IK msg1, XX msg3); unproven until done.
        self.peer: PublicIdentity | None = None
        self.result: HandshakeResult | None = None

    @property
    def awaiting_authorization(self) -> bool:
        """Whether the handshake waits for :meth:`accept` or :meth:`refuse`."""
        return self._state == "authorize"

    def step(self, reader: FrameReader) -> bool:
        """Consume what ``reader`` holds; return ``True`` once the handshake is complete.

        :raises ~stalk.InvalidPeerKey: a message carries a key that is not a canonical,
            usable X25519 key.
        :raises ~stalk.CertificateError: we require a certificate of the initiator and
            refuse the one it sent (or its lack of one).
        :raises ~stalk.HandshakeFailed: anything else wrong with the initiator's messages.
            Before raising, a refusal verdict is queued in ``out`` when we have not answered
            yet; after XX message 3 was read, :attr:`failure_close` is set instead.
        """
        try:
            return self._step(reader)
        except HandshakeFailed as exc:
            code = exc.close_code
            if not self._answered:
                self.out.append(encode_refusal(code, reason_for_peer(exc)))
                self._answered = True
            elif self._noise is not None and self._noise.complete:
                self.failure_close = (code, self._noise.split()[0])
            raise

    def _step(self, reader: FrameReader) -> bool:
        if self._state == "preamble":
            try:
                parsed = reader.preamble()
            except FramingError as exc:
                raise _Unsupported(str(exc)) from exc
            if parsed is None:
                if reader.eof:
                    raise _eof_during_handshake()
                return False
            preamble, raw = parsed
            if preamble.version != PROTOCOL_VERSION:
                raise _Unsupported(
                    f"stalk version {preamble.version} is not supported "
                    f"(this peer speaks version {PROTOCOL_VERSION})"
                )
            self.pattern = preamble.pattern
            self._noise = NoiseHandshake(
                PROTOCOL_NAMES[preamble.pattern],
                initiator=False,
                prologue=raw,
                static_private=self._identity.private_bytes(),
                ephemeral_private=self._ephemeral,
            )
            self._state = "msg1"
        noise = self._noise
        if noise is None or self.pattern is None:  # pragma: no cover - set just above
            return False
        if self._state == "msg1":
            body = _read_message(reader, self.pattern, 1)
            if body is None:
                return False
            message = f"{self.pattern} message 1"
            _check_ephemeral(body, message)
            try:
                payload = _read_checked(noise, body, message, carries_static=self.pattern == "IK")
            except HandshakeAuthenticationFailed as exc:
                if self.pattern == "IK":
                    raise _DecryptFailed(
                        "cannot decrypt IK message 1: it was not encrypted to our static key"
                    ) from exc
                raise
            if self.pattern == "IK":
                self._identified(noise, decode_params(payload))
                return False
            _decode_map(payload, MAX_CLEARTEXT_PAYLOAD)
            self._answer(noise)
            self._state = "msg3"
        if self._state == "msg3":
            body = _read_message(reader, "XX", 3)
            if body is None:
                return False
            payload = _read_checked(noise, body, "XX message 3", carries_static=True)
            self._identified(noise, decode_params(payload))
            return False
        return self._state == "done"

    def _identified(self, noise: NoiseHandshake, params: Params) -> None:
        """The initiator's key (and certificate) known: check it, then await authorization.

        :raises ~stalk.CertificateError: we require a certificate and refuse its one.
        """
        self._peer_params = params
        self.peer = _peer(self._policy, params, noise.remote_static)
        self._state = "authorize"
        if noise.complete:
            # XX: msg3 was the last message, so the transport ciphers exist already; a
            # refusal then travels as an encrypted CLOSE.
            self.result = _result(noise, self.pattern or "XX", params, self.peer)

    def _answer(self, noise: NoiseHandshake) -> None:
        msg2 = noise.write_message(self._params)
        self.out.append(_VERDICT_ACCEPT + encode_frame(msg2))
        self._answered = True

    def accept(self) -> None:
        """Admit the identified initiator (IK: answer with message 2 now)."""
        if (
            self._state != "authorize"
            or self._noise is None
            or self._peer_params is None
            or self.peer is None
        ):
            raise HandshakeFailed("accept() is only valid while awaiting authorization")
        if self.pattern == "IK":
            self._answer(self._noise)
            self.result = _result(self._noise, self.pattern, self._peer_params, self.peer)
        self._state = "done"

    def refuse(self) -> None:
        """Refuse the identified initiator.

        IK: the session sends a refusal verdict; XX: it sends an encrypted CLOSE (the
        verdict was already given).
        """
        if self._state != "authorize":
            raise HandshakeFailed("refuse() is only valid while awaiting authorization")
        self._state = "refused"


def busy_refusal(reason: str) -> bytes:
    """A responder's whole answer to an initiator it cannot take now (SPEC 5).

    A BUSY refusal, sent before reading anything: no handshake state exists for it.
    """
    return encode_refusal(CloseCode.BUSY, reason)


class _Unsupported(HandshakeFailed):
    """The preamble names something we do not speak (refused with UNSUPPORTED)."""

    close_code = CloseCode.UNSUPPORTED


class _DecryptFailed(HandshakeFailed):
    """IK message 1 was not encrypted to our static key (refused with DECRYPT_FAILED)."""

    close_code = CloseCode.DECRYPT_FAILED
