"""The whole stalk exception tree.

Every error stalk raises is a :class:`StalkError`; errors from the libraries underneath
(noiseprotocol, cryptography, msgpack) are translated at the one module that calls each
of them and chained with ``from``. Each error is classified here once: its class says what
happened, and its :attr:`StalkError.close_code` how the peer is told.

This module belongs to the sans-IO core and imports no anyio. The anyio layer raises two
of these errors as anyio's stream errors too, so code written against anyio's vocabulary
works unchanged (see ``stalk.link.stream_error``):

- a :class:`ConnectionLost` from a :class:`~stalk.Connection` is also an
  :class:`anyio.BrokenResourceError` (the stream was cut: EOF or reset without an
  authenticated CLOSE);
- a :class:`ConnectionClosed` from a :class:`~stalk.Connection` is also an
  :class:`anyio.ClosedResourceError` (we closed it);
- a clean CLOSE from the peer is not an error at all: receivers see :class:`anyio.EndOfStream`.

Messages never contain key material or received plaintext.
"""

from __future__ import annotations

from typing import ClassVar

from stalk.wire import CloseCode, close_code_name

__all__ = [
    "AuthorityAsSubject",
    "BadCertificateSignature",
    "CertificateError",
    "CertificateExpired",
    "CertificateExtensionError",
    "CertificateKeyMismatch",
    "CertificateMissing",
    "CertificateNameMismatch",
    "CertificateNotYetValid",
    "CertificateRevoked",
    "CertificateTooLarge",
    "ChannelClosed",
    "ChannelLimitExceeded",
    "ChannelLimitReached",
    "ChannelReset",
    "ClosedByPeer",
    "ConnectFailed",
    "ConnectionClosed",
    "ConnectionLost",
    "DecryptionFailed",
    "FlowControlError",
    "HandshakeFailed",
    "HandshakeTimeout",
    "IdentityFileError",
    "IdleTimeout",
    "InvalidPeerKey",
    "InvalidSpackValue",
    "LocalProtocolError",
    "MalformedCertificate",
    "MalformedSpack",
    "MessageLimitExceeded",
    "MessageTooLarge",
    "NonCanonicalCertificate",
    "NonceExhausted",
    "PeerIdentityMismatch",
    "PeerRefused",
    "ProtocolError",
    "RenewalFailed",
    "RevocationListError",
    "StalkError",
    "UnknownAuthority",
]


class StalkError(Exception):
    """Root of every error stalk raises.

    :ivar peer_address: where the peer was when the error happened on a socket: ``(host,
        port)`` over TCP, the socket's path over a unix socket; else ``None``. Set by the
        connection layer.
    :cvar close_code: the code a refusal or error CLOSE reports this error to the peer with
        (SPEC "Close codes"), when it is the peer's error; the one place errors are mapped
        to codes.
    """

    peer_address: tuple[str, int] | str | None = None
    close_code: ClassVar[int] = CloseCode.PROTOCOL_ERROR


class LocalProtocolError(StalkError):
    """The caller used the API in a way the protocol does not allow.

    For example: sending before the handshake finished, or answering an authorization
    request twice. The connection state is unchanged unless the docs say otherwise.
    """


class InvalidSpackValue(StalkError, TypeError):
    """A value cannot be carried in a spack (an unsupported type, an int out of range...).

    Raised before anything is encoded or written, so the connection stays usable.
    """


class MessageTooLarge(StalkError, ValueError):
    """A spack is larger than the limit the peer advertised (or our own configured limit).

    Raised on the sending side before anything is written; the connection stays usable.
    """


class NonceExhausted(StalkError):
    """A cipher reached the last nonce Noise allows; the connection must be closed."""


class IdentityFileError(StalkError):
    """An identity (key) file is missing, malformed, or has unsafe permissions."""


class ConnectFailed(StalkError, OSError):
    """The connection to the peer (TCP, unix socket) failed to open (also an :class:`OSError`)."""


class ProtocolError(StalkError):
    """The peer broke the stalk wire protocol after the handshake; the connection is dead.

    Raised for framing errors, unknown record kinds, over-limit sizes, bytes after CLOSE.
    No partial or corrupted message is ever delivered when this is raised.
    """


class MessageLimitExceeded(ProtocolError):
    """The peer sent a spack larger than we accept.

    Either its encoding exceeds the limit we advertised in the handshake, or it would
    decode to more objects than its decoded-weight budget (SPEC "Decoded weight").

    :ivar limit: the limit that was exceeded, in bytes.
    """

    close_code = CloseCode.MESSAGE_TOO_LARGE

    def __init__(self, limit: int, message: str | None = None) -> None:
        super().__init__(message or f"peer sent a message larger than our {limit}-byte limit")
        self.limit = limit


class ChannelLimitExceeded(ProtocolError):
    """The peer opened more channels than we let it have open at once (SPEC "Channels")."""

    close_code = CloseCode.CHANNEL_LIMIT


class FlowControlError(ProtocolError):
    """The peer sent data beyond the credit we granted, or granted credit past the maximum."""

    close_code = CloseCode.FLOW_CONTROL_ERROR


class DecryptionFailed(ProtocolError):
    """A transport message failed AEAD authentication (tampering, corruption or a bug)."""


class MalformedSpack(ProtocolError, ValueError):
    """Bytes are not a valid spack encoding.

    Invalid msgpack, invalid UTF-8, unknown ext codes, trailing bytes, nesting deeper than
    the limit, or a size over the limit.
    """


class HandshakeFailed(StalkError):
    """The Noise handshake did not complete; no application data was exchanged.

    :ivar verdict: on the initiator, when the handshake failed on the responder's verdict
        (SPEC "Verdict and refusals": a refusal, a reason that is not UTF-8, or the stream
        ending inside the verdict), the first bytes the responder sent, at most 257 of
        them; else ``None``. Unauthenticated and untrusted: it lets a caller show what a
        service that is not a stalk listener answered (an HTTP server's
        ``HTTP/1.1 400 Bad Request`` reads as refusal code 72).
    """

    verdict: bytes | None = None


class HandshakeTimeout(HandshakeFailed):
    """The handshake did not complete within the configured time."""


class PeerIdentityMismatch(HandshakeFailed):
    """The peer does not hold the static key we expected (IK with a pinned key).

    :ivar expected: the :class:`~stalk.PublicIdentity` we pinned, when known.
    """

    def __init__(self, message: str, *, expected: object | None = None) -> None:
        super().__init__(message)
        self.expected = expected


class InvalidPeerKey(HandshakeFailed):
    """A public key in the peer's handshake message is not a canonical, usable X25519 key.

    Raised on the side that read the key (its ephemeral ``e`` or static ``s``): a low-order
    point, bit 255 set, or u >= 2^255 - 19 (SPEC "Canonical keys"). The other side sees
    :class:`PeerRefused` with code ``INVALID_KEY``, or nothing when the reader is the
    initiator (it has no way to refuse). The message never contains the key.
    """

    close_code = CloseCode.INVALID_KEY


class CertificateError(HandshakeFailed):
    """A certificate was refused: its form, its signature, its dates, or whom it names.

    Raised in the handshake by the side that checks its peer's certificate (SPEC
    "Certificates"), before the connection is established; the peer is told with code
    ``CERTIFICATE_REFUSED`` when the checking side is the responder (an initiator closes
    without a word, as it does for every failure of message 2). Raised as well when a
    certificate or revocation list is read or checked outside a handshake. Each subclass
    is one reason; no message contains key material beyond fingerprints.

    :cvar peer_reason: what the peer is told: the reason only, never the certificate's
        name, serial or key (an IK refusal travels in cleartext).
    """

    close_code = CloseCode.CERTIFICATE_REFUSED
    peer_reason: ClassVar[str] = "certificate refused"


class CertificateMissing(CertificateError):
    """The peer presented no certificate, and this side requires one."""

    peer_reason = "certificate required"


class CertificateTooLarge(CertificateError):
    """A certificate is larger than the format allows (checked before it is decoded)."""

    peer_reason = "certificate too large"


class MalformedCertificate(CertificateError):
    """A certificate is not the array the format defines, or a field is out of bounds."""

    peer_reason = "malformed certificate"


class NonCanonicalCertificate(CertificateError):
    """A certificate is not in its one canonical encoding (re-encoding it differs)."""

    peer_reason = "certificate not in canonical form"


class UnknownAuthority(CertificateError):
    """A certificate was issued by an authority we do not trust."""

    peer_reason = "certificate from an unknown authority"


class BadCertificateSignature(CertificateError):
    """A certificate's signature is not its issuer's: it was forged or altered."""

    peer_reason = "bad certificate signature"


class AuthorityAsSubject(CertificateError):
    """A certificate's subject is an authority's own key (as Ed25519 or as X25519)."""

    peer_reason = "certificate for an authority's key"


class CertificateExtensionError(CertificateError):
    """A certificate repeats an extension, or has a critical one this verifier does not know."""

    peer_reason = "certificate extension refused"


class CertificateNotYetValid(CertificateError):
    """A certificate's validity starts later than now (beyond the clock skew allowed)."""

    peer_reason = "certificate not yet valid"


class CertificateExpired(CertificateError):
    """A certificate's validity ended (beyond the clock skew allowed)."""

    peer_reason = "certificate expired"


class CertificateRevoked(CertificateError):
    """A certificate's serial or subject key is on its authority's revocation list."""

    peer_reason = "certificate revoked"


class CertificateKeyMismatch(CertificateError):
    """A certificate's subject is not the static key the handshake authenticated.

    A valid certificate replayed by someone who does not hold its key fails this way.
    """

    peer_reason = "certificate for another key"


class CertificateNameMismatch(CertificateError):
    """A certificate's name and groups are not the ones this side accepts."""

    peer_reason = "certificate name or groups not accepted"


class RevocationListError(CertificateError):
    """A revocation list is malformed, not canonical, or not signed by a trusted authority."""

    peer_reason = "revocation list refused"


class RenewalFailed(StalkError):
    """An authority service did not renew our certificate (see :mod:`stalk.renewal`).

    :ivar reason: the service's reason (untrusted text), or ``""``.
    """

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


def reason_for_peer(error: StalkError) -> str:
    """The reason a refusal or CLOSE gives the peer for ``error``.

    Its message, except for a :class:`CertificateError`, whose reason is generic (see its
    ``peer_reason``).
    """
    return error.peer_reason if isinstance(error, CertificateError) else str(error)


def _coded(what: str, code: int, reason: str) -> str:
    """The one wording of a peer's refusal or CLOSE: ``what (NAME): reason``."""
    return f"{what} ({close_code_name(code)}): {reason}"


class PeerRefused(HandshakeFailed):
    """The peer refused the connection (not authorized, unsupported version, busy...).

    :param what: what happened; the message adds the code's name and the reason.
    :ivar code: the numeric refusal or CLOSE code from SPEC.md.
    :ivar reason: the peer's human-readable reason (untrusted text).
    """

    def __init__(self, what: str, *, code: int, reason: str) -> None:
        super().__init__(_coded(what, code, reason))
        self.code = code
        self.reason = reason


class ConnectionLost(StalkError):
    """The connection ended without an authenticated CLOSE: truncation, EOF or reset.

    Raised by a :class:`~stalk.Connection`, also an :class:`anyio.BrokenResourceError`. The
    application can tell this apart from a clean close, which surfaces as
    :class:`anyio.EndOfStream`.
    """


class ClosedByPeer(ConnectionLost):
    """The peer sent an authenticated CLOSE with an error code.

    :param what: what happened; the message adds the code's name and the reason.
    :ivar code: the CLOSE code (SPEC.md, "Close codes").
    :ivar reason: the peer's reason text (untrusted).
    """

    def __init__(self, what: str, *, code: int, reason: str) -> None:
        super().__init__(_coded(what, code, reason))
        self.code = code
        self.reason = reason


class IdleTimeout(ConnectionLost):
    """The peer sent nothing while we waited and did not answer a keepalive PING.

    Raised by ``receive()`` with ``idle_timeout`` set in :class:`~stalk.Config`; the
    connection has been closed with CLOSE code TIMEOUT.
    """

    close_code = CloseCode.TIMEOUT


class ConnectionClosed(StalkError):
    """We already closed the connection (or it failed); it cannot be used again.

    Raised by a :class:`~stalk.Connection`, also an :class:`anyio.ClosedResourceError`.
    """


class ChannelClosed(ConnectionClosed):
    """We closed or reset this channel (or sent its EOF, for sending) and then used it.

    Raised by a :class:`~stalk.Channel`, also an :class:`anyio.ClosedResourceError`; the
    connection and its other channels are unaffected.
    """


class ChannelReset(StalkError):
    """The peer reset this channel: both of its directions ended, with a code and reason.

    What the channel held that the application had not received yet is dropped (nothing
    partial is ever delivered). Raised by a :class:`~stalk.Channel`, also an
    :class:`anyio.BrokenResourceError`; the connection and its other channels are
    unaffected.

    :param what: what happened; the message adds the code's name and the reason.
    :ivar code: the RESET's code (SPEC "Close codes", or an application code).
    :ivar reason: the peer's reason text (untrusted).
    """

    def __init__(self, what: str, *, code: int, reason: str) -> None:
        super().__init__(_coded(what, code, reason))
        self.code = code
        self.reason = reason


class ChannelLimitReached(StalkError):
    """Opening a channel would exceed how many the peer lets us have open at once.

    Raised by ``open_channel(wait=False)`` (which otherwise waits for one of our channels
    to end), and at once when the peer accepts no channels at all.
    """
