"""Handshake state machines: preamble, verdict and the Noise XX / IK messages (sans-IO).

Theory of operation
-------------------
SPEC "Handshake" in code. Both machines read from the session's input buffer and append the
bytes they want sent to ``out``; neither does I/O or keeps time.

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

A handshake error is always fatal (noiseprotocol's state is already advanced). Before
raising, the responder queues a refusal verdict when it has not answered yet, so a
well-behaved initiator learns why (the refusal is unauthenticated: it can only ever make a
handshake fail, never succeed).

Payloads are msgpack maps with string keys (SPEC "Handshake payloads"): XX message 1 carries
an empty map (it is cleartext); each party's parameters travel in its last handshake message
(initiator: XX msg3 or IK msg1; responder: msg2). Unknown keys are ignored so that later
versions can add fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import msgpack

from stalk._noise import HandshakeAuthenticationFailed, NoiseHandshake, TransportCipher
from stalk.errors import HandshakeFailed, PeerIdentityMismatch, PeerRefused
from stalk.framing import (
    FramingError,
    Refusal,
    encode_frame,
    encode_preamble,
    encode_refusal,
    read_frame,
    read_preamble,
    read_verdict,
)
from stalk.identity import Identity, PublicIdentity
from stalk.wire import (
    MAX_HANDSHAKE_PAYLOAD,
    MAX_MESSAGE_SIZE_LIMIT,
    MIN_MAX_MESSAGE_SIZE,
    PROTOCOL_NAMES,
    PROTOCOL_VERSION,
    CloseCode,
    Pattern,
    close_code_name,
)

__all__ = [
    "HandshakeResult",
    "InitiatorHandshake",
    "Params",
    "ResponderHandshake",
    "decode_params",
    "encode_params",
]

#: The payload of XX message 1: an empty msgpack map (that message is cleartext).
EMPTY_MAP: Final = b"\x80"
_VERDICT_ACCEPT: Final = b"\x00"


@dataclass(frozen=True, slots=True)
class Params:
    """A party's handshake parameters (SPEC "Handshake payloads")."""

    version: int
    max_message_size: int


def encode_params(max_message_size: int) -> bytes:
    """The msgpack map a party sends in its last handshake message."""
    return msgpack.packb({"version": PROTOCOL_VERSION, "max_message_size": max_message_size})


def _decode_map(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_HANDSHAKE_PAYLOAD:
        raise HandshakeFailed(f"handshake payload longer than {MAX_HANDSHAKE_PAYLOAD} bytes")
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:
        # msgpack raises ValueError subclasses, StackError, UnicodeDecodeError and others.
        raise HandshakeFailed("handshake payload is not a msgpack map with string keys") from exc
    if not isinstance(value, dict):
        raise HandshakeFailed("handshake payload is not a msgpack map")
    return value


def decode_params(payload: bytes) -> Params:
    """Parse and check a party's parameters.

    :raises ~stalk.HandshakeFailed: not a map, wrong version, or a missing or out-of-range
        ``max_message_size``.
    """
    fields = _decode_map(payload)
    version = fields.get("version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise HandshakeFailed(f"handshake payload version {version!r} is not {PROTOCOL_VERSION}")
    size = fields.get("max_message_size")
    if type(size) is not int or not MIN_MAX_MESSAGE_SIZE <= size <= MAX_MESSAGE_SIZE_LIMIT:
        raise HandshakeFailed(f"handshake payload max_message_size {size!r} is out of range")
    return Params(version=version, max_message_size=size)


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """What a finished handshake hands to the transport phase."""

    pattern: Pattern
    peer: PublicIdentity
    peer_params: Params
    handshake_hash: bytes
    send_cipher: TransportCipher
    recv_cipher: TransportCipher


def _result(noise: NoiseHandshake, pattern: Pattern, params: Params) -> HandshakeResult:
    remote = noise.remote_static
    if remote is None:  # pragma: no cover - XX and IK always transmit or pre-know it
        raise HandshakeFailed("handshake finished without a remote static key")
    send, recv = noise.split()
    return HandshakeResult(
        pattern=pattern,
        peer=PublicIdentity(remote),
        peer_params=params,
        handshake_hash=noise.handshake_hash,
        send_cipher=send,
        recv_cipher=recv,
    )


def _eof_during_handshake() -> HandshakeFailed:
    return HandshakeFailed("the peer closed the connection during the handshake")


def _read_frame(buf: bytearray, eof: bool) -> bytes | None:
    """The next handshake frame's body, ``None`` if incomplete; errors as HandshakeFailed."""
    try:
        body = read_frame(buf)
    except FramingError as exc:
        raise HandshakeFailed(str(exc)) from exc
    if body is None and eof:
        raise _eof_during_handshake()
    return body


class InitiatorHandshake:
    """The initiator's side: XX without an expected peer key, IK with one.

    :param identity: our static key pair.
    :param peer: the responder's expected static key (selects IK), or ``None`` (XX).
    :param max_message_size: the limit we advertise.
    :param ephemeral: a fixed ephemeral private key: only for test vectors.
    """

    def __init__(
        self,
        identity: Identity,
        peer: PublicIdentity | None,
        max_message_size: int,
        *,
        ephemeral: bytes | None = None,
    ) -> None:
        self.pattern: Pattern = "IK" if peer is not None else "XX"
        self._expected = peer
        self._params = encode_params(max_message_size)
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

    def step(self, buf: bytearray, eof: bool) -> bool:
        """Consume what ``buf`` holds; return ``True`` once the handshake is complete.

        :raises ~stalk.HandshakeFailed: refused, mismatched key, malformed or cut short.
        """
        if self._state == "verdict":
            try:
                verdict = read_verdict(buf)
            except FramingError as exc:
                raise HandshakeFailed(str(exc)) from exc
            if verdict is None:
                if eof:
                    raise _eof_during_handshake()
                return False
            if isinstance(verdict, Refusal):
                raise self._refused(verdict)
            self._state = "msg2"
        if self._state == "msg2":
            body = _read_frame(buf, eof)
            if body is None:
                return False
            payload = self._noise.read_message(body)
            params = decode_params(payload)
            if self.pattern == "XX":
                self.out.append(encode_frame(self._noise.write_message(self._params)))
            self.result = _result(self._noise, self.pattern, params)
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
            f"the peer refused the handshake ({close_code_name(refusal.code)}): {refusal.reason}",
            code=refusal.code,
            reason=refusal.reason,
        )


class ResponderHandshake:
    """The responder's side: accepts XX and IK, as the preamble says.

    :param identity: our static key pair.
    :param max_message_size: the limit we advertise.
    :param ephemeral: a fixed ephemeral private key: only for test vectors.
    """

    def __init__(
        self, identity: Identity, max_message_size: int, *, ephemeral: bytes | None = None
    ) -> None:
        self._identity = identity
        self._params = encode_params(max_message_size)
        self._ephemeral = ephemeral
        self._noise: NoiseHandshake | None = None
        self._state: Literal["preamble", "msg1", "msg3", "authorize", "done", "refused"] = (
            "preamble"
        )
        self._answered = False
        self._peer_params: Params | None = None
        #: Bytes to send, in order; the session drains it.
        self.out: list[bytes] = []
        self.pattern: Pattern | None = None
        #: The initiator's static key once known (IK msg1, XX msg3); unproven until done.
        self.peer: PublicIdentity | None = None
        self.result: HandshakeResult | None = None

    @property
    def awaiting_authorization(self) -> bool:
        """Whether the handshake waits for :meth:`accept` or :meth:`refuse`."""
        return self._state == "authorize"

    def step(self, buf: bytearray, eof: bool) -> bool:
        """Consume what ``buf`` holds; return ``True`` once the handshake is complete.

        :raises ~stalk.HandshakeFailed: anything wrong with the initiator's messages; a
            refusal verdict is queued in ``out`` first when one is still possible.
        """
        try:
            return self._step(buf, eof)
        except HandshakeFailed as exc:
            if not self._answered:
                code = getattr(exc, "refusal_code", CloseCode.PROTOCOL_ERROR)
                self.out.append(encode_refusal(code, str(exc)))
                self._answered = True
            raise

    def _step(self, buf: bytearray, eof: bool) -> bool:
        if self._state == "preamble":
            try:
                parsed = read_preamble(buf)
            except FramingError as exc:
                raise _Unsupported(str(exc)) from exc
            if parsed is None:
                if eof:
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
            body = _read_frame(buf, eof)
            if body is None:
                return False
            try:
                payload = noise.read_message(body)
            except HandshakeAuthenticationFailed as exc:
                if self.pattern == "IK":
                    raise _DecryptFailed(
                        "cannot decrypt IK message 1: it was not encrypted to our static key"
                    ) from exc
                raise
            if self.pattern == "IK":
                self._peer_params = decode_params(payload)
                self._identified(noise)
                return False
            _decode_map(payload)
            self._answer(noise)
            self._state = "msg3"
        if self._state == "msg3":
            body = _read_frame(buf, eof)
            if body is None:
                return False
            self._peer_params = decode_params(noise.read_message(body))
            self._identified(noise)
            return False
        return self._state == "done"

    def _identified(self, noise: NoiseHandshake) -> None:
        remote = noise.remote_static
        if remote is None:  # pragma: no cover - both patterns carry it by now
            raise HandshakeFailed("no initiator static key after its message")
        self.peer = PublicIdentity(remote)
        self._state = "authorize"
        if noise.complete and self._peer_params is not None:
            # XX: msg3 was the last message, so the transport ciphers exist already; a
            # refusal then travels as an encrypted CLOSE.
            self.result = _result(noise, self.pattern or "XX", self._peer_params)

    def _answer(self, noise: NoiseHandshake) -> None:
        msg2 = noise.write_message(self._params)
        self.out.append(_VERDICT_ACCEPT + encode_frame(msg2))
        self._answered = True

    def accept(self) -> None:
        """Admit the identified initiator (IK: answer with message 2 now)."""
        if self._state != "authorize" or self._noise is None or self._peer_params is None:
            raise HandshakeFailed("accept() is only valid while awaiting authorization")
        if self.pattern == "IK":
            self._answer(self._noise)
            self.result = _result(self._noise, self.pattern, self._peer_params)
        self._state = "done"

    def refuse(self) -> None:
        """Refuse the identified initiator.

        IK: the session sends a refusal verdict; XX: it sends an encrypted CLOSE (the
        verdict was already given).
        """
        if self._state != "authorize":
            raise HandshakeFailed("refuse() is only valid while awaiting authorization")
        self._state = "refused"


class _Unsupported(HandshakeFailed):
    refusal_code = CloseCode.UNSUPPORTED


class _DecryptFailed(HandshakeFailed):
    refusal_code = CloseCode.DECRYPT_FAILED
