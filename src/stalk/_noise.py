"""The only module that touches ``noiseprotocol``: Noise handshake and cipher states.

Theory of operation
-------------------
stalk does not re-implement Noise. ``noiseprotocol`` (pinned to 0.3.1, its last release)
runs the HandshakeState, SymmetricState and CipherState objects of the Noise spec; this
module gives them a small typed surface and designs around the traits of that release,
each pinned by a test in ``tests/test_noise.py``:

- It has no public accessor for the remote static key, and ``handshake_done()`` deletes the
  handshake state when the last message is processed. We keep our own reference to the
  ``HandshakeState`` object, whose ``rs`` attribute outlives that deletion.
- It checks its 65535-byte limit against the *plaintext*, so it can emit a ciphertext that it
  would itself refuse. stalk never calls those checked wrappers: it caps plaintext at
  :data:`MAX_PLAINTEXT` (65535 - 16) itself and drives the ``CipherState`` objects directly.
- Authentication failures surface as cryptography's ``InvalidTag``, low-order DH values as a
  bare ``ValueError``, missing keys as a bare ``Exception``. Everything that escapes a
  noiseprotocol call is translated here into :class:`~stalk.HandshakeFailed` or
  :class:`~stalk.DecryptionFailed`, chained with ``from``.
- Fixing an ephemeral key (for test vectors) makes it emit a ``UserWarning``; the one helper
  that does so is named :meth:`NoiseHandshake.fixed_ephemeral_for_testing_only` and
  silences exactly that warning.
- It has no locking; the sans-IO core is single-owner, so none is needed.
- A failed handshake ``read_message`` leaves its state advanced (the message pattern is
  popped before decryption), and noiseprotocol would still let the caller write the next
  message and even finish the handshake. A failed handshake is therefore always fatal, as
  Noise requires: once a read or write has failed, :class:`NoiseHandshake` refuses every
  further read and write.
- In one-way patterns (``N``, ``K``, ``X``) it sets the cipher of the unused direction to
  ``None`` (Noise §7.4 discards it); the matching :class:`TransportCipher` raises
  :class:`~stalk.LocalProtocolError` instead of an ``AttributeError``.

Transport ``CipherState`` objects follow Noise §5.1: a failed decryption does not advance
the nonce, and the nonce can never wrap: encrypting or decrypting at nonce ``2**64 - 1``
raises :class:`~stalk.NonceExhausted` (that value is reserved for ``REKEY``, Noise §5.1).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
import warnings
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from noise.backends.default.ciphers import ChaCha20Cipher
from noise.backends.default.diffie_hellmans import ED25519
from noise.backends.default.hashes import SHA256Hash
from noise.backends.default.keypairs import KeyPair25519
from noise.connection import Keypair, NoiseConnection
from noise.functions.hash import hkdf

from stalk.errors import DecryptionFailed, HandshakeFailed, LocalProtocolError, NonceExhausted
from stalk.wire import MAX_NOISE_MESSAGE, MAX_PLAINTEXT, TAGLEN

__all__ = [
    "DHLEN",
    "MAX_NOISE_MESSAGE",
    "MAX_NONCE",
    "MAX_PLAINTEXT",
    "TAGLEN",
    "HandshakeAuthenticationFailed",
    "NoiseHandshake",
    "TransportCipher",
]

#: Curve25519 public key length (Noise §12.1).
DHLEN: Final = 32
#: Noise §5.1: nonce 2**64-1 is reserved; using it for a message is an error.
MAX_NONCE: Final = 2**64 - 1
#: Noise §12.3 / §12.4: 32 zero bits, then the counter (AESGCM big-endian, ChaChaPoly little).
_NONCE_BE: Final = struct.Struct(">4xQ")
_NONCE_LE: Final = struct.Struct("<4xQ")


@functools.lru_cache(maxsize=32)
def _static_keypair_25519(private: bytes) -> Any:
    """Noiseprotocol's key pair object for a static key, built once per key.

    ``set_keypair_from_private_bytes`` would re-derive the public key (one X25519 scalar
    multiplication) on every handshake.
    """
    return KeyPair25519.from_private_bytes(private)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def _accelerate(protocol: Any) -> None:
    """Swap noiseprotocol's SHA-256, HMAC and HKDF for the standard library's C versions.

    noiseprotocol builds a cryptography ``Hash`` or ``HMAC`` object per call: about half of
    a handshake's CPU. The functions are the same (Noise §4.3); the published vectors check
    the result. Other hashes keep noiseprotocol's implementation.
    """
    if isinstance(protocol.hash_fn, SHA256Hash):
        protocol.hash_fn.hash = _sha256
        protocol.hmac = _hmac_sha256
        protocol.hkdf = functools.partial(hkdf, hmac_hash_fn=_hmac_sha256)


class HandshakeAuthenticationFailed(HandshakeFailed):
    """A handshake message's AEAD tag did not verify (wrong key, or altered in transit)."""


class TransportCipher:
    """One direction of a finished Noise session: a CipherState used for transport messages.

    The transport phase is stalk's hot path, so this class calls the AEAD object that
    noiseprotocol's CipherState holds (cryptography's ``AESGCM`` or ``ChaCha20Poly1305``,
    keyed by noiseprotocol) directly, formatting the nonce as noiseprotocol does (Noise §12:
    32 zero bits, then the 64-bit counter, big-endian for AESGCM and little-endian for
    ChaChaPoly). That skips three Python layers per message and lifts noiseprotocol's
    ``bytes``-only restriction, which allows :meth:`encrypt_into`. ``Rekey()`` is still
    noiseprotocol's. The published test vectors check this path byte for byte.
    """

    __slots__ = ("_aead", "_n", "_nonce", "_state")

    def __init__(self, state: Any) -> None:
        self._state = state
        self._n = 0
        self._aead: Any = None
        self._nonce = _NONCE_BE
        if state is not None:
            self._n = int(state.n)
            self._aead = state.cipher.cipher
            self._nonce = _NONCE_LE if isinstance(state.cipher, ChaCha20Cipher) else _NONCE_BE

    def _next_nonce(self) -> bytes:
        if self._aead is None:
            raise LocalProtocolError(
                "a one-way pattern carries no transport messages in this direction"
            )
        if self._n >= MAX_NONCE:
            raise NonceExhausted("the cipher's nonce space is exhausted; close the connection")
        return self._nonce.pack(self._n)

    @property
    def nonce(self) -> int:
        """The nonce of the next message (Noise ``n``)."""
        return self._n

    def set_nonce_for_testing_only(self, nonce: int) -> None:
        """Jump the nonce (Noise ``SetNonce``); only tests use it, to reach exhaustion."""
        self._n = nonce

    def encrypt(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt one transport message with empty associated data.

        :raises ~stalk.NonceExhausted: no nonce is left.
        """
        if len(plaintext) > MAX_PLAINTEXT:
            raise ValueError(f"plaintext of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT}")
        ciphertext: bytes = self._aead_call("encrypt", plaintext)
        return ciphertext

    def encrypt_into(self, plaintext: bytes | bytearray | memoryview, out: memoryview) -> None:
        """Encrypt into ``out``, which must be exactly ``len(plaintext) + 16`` bytes.

        :raises ~stalk.NonceExhausted: no nonce is left.
        """
        if len(plaintext) > MAX_PLAINTEXT:
            raise ValueError(f"plaintext of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT}")
        nonce = self._next_nonce()
        self._aead.encrypt_into(nonce, plaintext, None, out)
        self._n += 1

    def _aead_call(self, method: str, data: bytes | bytearray | memoryview) -> bytes:
        nonce = self._next_nonce()
        result: bytes = getattr(self._aead, method)(nonce, data, None)
        self._n += 1
        return result

    def decrypt(self, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """Decrypt and authenticate one transport message; the nonce advances only on success.

        :raises ~stalk.DecryptionFailed: the tag did not verify (or the message is too short).
        :raises ~stalk.NonceExhausted: no nonce is left.
        """
        if len(ciphertext) < TAGLEN:
            self._next_nonce()  # a one-way or exhausted cipher reports that first
            raise DecryptionFailed(
                f"transport message of {len(ciphertext)} bytes is shorter than the AEAD tag"
            )
        nonce = self._next_nonce()  # raises first for a one-way or exhausted cipher
        try:
            plaintext: bytes = self._aead.decrypt(nonce, ciphertext, None)
        except InvalidTag as exc:
            raise DecryptionFailed("transport message failed authentication") from exc
        self._n += 1
        return plaintext

    def rekey(self) -> None:
        """Noise ``Rekey()`` (§4.2): a new key from the old one; the nonce is not reset."""
        if self._aead is None:
            raise LocalProtocolError(
                "a one-way pattern carries no transport messages in this direction"
            )
        self._state.rekey()
        self._aead = self._state.cipher.cipher


class NoiseHandshake:
    """A Noise HandshakeState for one named protocol, with errors translated.

    :param protocol_name: a full Noise protocol name, e.g. ``Noise_XX_25519_AESGCM_SHA256``.
    :param initiator: our role.
    :param prologue: bytes both sides must agree on (Noise §6).
    :param static_private: our static private key, where the pattern needs one.
    :param remote_static_public: the responder's static public key for pre-message patterns
        such as IK.
    :param psks: pre-shared keys, in token order, for ``psk`` patterns (test vectors only).
    :raises ~stalk.HandshakeFailed: the name is not supported or a required key is missing.
    """

    __slots__ = ("_complete", "_conn", "_failed", "_hs", "_remote_static", "_split")

    def __init__(
        self,
        protocol_name: str,
        *,
        initiator: bool,
        prologue: bytes = b"",
        static_private: bytes | None = None,
        remote_static_public: bytes | None = None,
        psks: list[bytes] | None = None,
        ephemeral_private: bytes | None = None,
    ) -> None:
        try:
            conn = NoiseConnection.from_name(protocol_name.encode("ascii"))
            if initiator:
                conn.set_as_initiator()
            else:
                conn.set_as_responder()
            conn.set_prologue(prologue)
            if psks:
                conn.set_psks(psks=list(psks))
            _accelerate(conn.noise_protocol)
            if static_private is not None:
                if isinstance(conn.noise_protocol.dh_fn, ED25519):
                    conn.noise_protocol.keypairs["s"] = _static_keypair_25519(static_private)
                else:
                    conn.set_keypair_from_private_bytes(Keypair.STATIC, static_private)
            if remote_static_public is not None:
                conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote_static_public)
            if ephemeral_private is not None:
                conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral_private)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "One of ephemeral keypairs", UserWarning)
                    conn.start_handshake()
            else:
                conn.start_handshake()
        except Exception as exc:
            # noiseprotocol raises bare Exception, ValueError, NotImplementedError and its own
            # unrelated classes here; all mean "this handshake cannot be set up".
            raise HandshakeFailed(f"cannot set up {protocol_name}: {exc}") from exc
        self._conn: Any = conn
        # Our own reference: noiseprotocol deletes its handshake_state when the handshake ends.
        self._hs: Any = conn.noise_protocol.handshake_state
        self._complete = False
        self._failed = False
        self._remote_static: bytes | None = None
        self._split: tuple[TransportCipher, TransportCipher] | None = None

    @classmethod
    def fixed_ephemeral_for_testing_only(
        cls, protocol_name: str, *, ephemeral_private: bytes, **kwargs: Any
    ) -> NoiseHandshake:
        """Like the constructor, with a fixed ephemeral key: only for test vectors.

        Reusing an ephemeral key destroys Noise's security; never use this in production.
        """
        return cls(protocol_name, ephemeral_private=ephemeral_private, **kwargs)

    @property
    def complete(self) -> bool:
        """Whether the last handshake message has been written or read."""
        return self._complete

    @property
    def remote_static(self) -> bytes | None:
        """The remote party's static public key, once a message has carried it (or pre-known)."""
        if self._remote_static is not None:
            return self._remote_static
        rs = getattr(self._hs, "rs", None)
        public_bytes = getattr(rs, "public_bytes", None)
        return bytes(public_bytes) if public_bytes is not None else None

    @property
    def handshake_hash(self) -> bytes:
        """Noise ``h`` after the handshake (§11.2): the channel-binding value.

        :raises ~stalk.HandshakeFailed: the handshake has not finished.
        """
        if not self._complete:
            raise HandshakeFailed("the handshake hash exists only after the handshake")
        return bytes(self._conn.get_handshake_hash())

    def write_message(self, payload: bytes) -> bytes:
        """Write the next handshake message (Noise ``WriteMessage``) carrying ``payload``.

        :raises ~stalk.HandshakeFailed: it is not our turn, the message would be too long, or
            the handshake already failed.
        """
        self._check_usable()
        try:
            message = bytes(self._conn.write_message(payload))
        except Exception as exc:
            self._failed = True
            raise HandshakeFailed(f"cannot write handshake message: {exc}") from exc
        if len(message) > MAX_NOISE_MESSAGE:
            self._failed = True
            raise HandshakeFailed(f"handshake message of {len(message)} bytes is too long")
        self._after_message()
        return message

    def read_message(self, message: bytes | bytearray | memoryview) -> bytes:
        """Read the next handshake message (Noise ``ReadMessage``) and return its payload.

        :raises ~stalk.HandshakeFailed: the message is malformed, fails authentication,
            carries an invalid (low-order) public key, or arrives out of turn; or the handshake
            already failed.
        """
        self._check_usable()
        if len(message) > MAX_NOISE_MESSAGE:
            self._failed = True
            raise HandshakeFailed(f"handshake message of {len(message)} bytes is too long")
        try:
            payload = bytes(self._conn.read_message(bytes(message)))
        except InvalidTag as exc:
            self._failed = True
            raise HandshakeAuthenticationFailed("handshake message failed authentication") from exc
        except Exception as exc:
            self._failed = True
            # Short messages and low-order points come back as ValueError from cryptography;
            # out-of-turn calls as NoiseHandshakeError. All are fatal handshake failures.
            raise HandshakeFailed(f"invalid handshake message: {type(exc).__name__}") from exc
        self._after_message()
        return payload

    def _check_usable(self) -> None:
        if self._failed:
            raise HandshakeFailed("the handshake already failed; it cannot continue")
        if self._complete:
            raise HandshakeFailed("the handshake is already complete")

    def _after_message(self) -> None:
        if self._conn.handshake_finished:
            self._complete = True
            rs = getattr(self._hs, "rs", None)
            public_bytes = getattr(rs, "public_bytes", None)
            self._remote_static = bytes(public_bytes) if public_bytes is not None else None
            proto = self._conn.noise_protocol
            self._split = (
                TransportCipher(proto.cipher_state_encrypt),
                TransportCipher(proto.cipher_state_decrypt),
            )

    def split(self) -> tuple[TransportCipher, TransportCipher]:
        """The transport ciphers ``(send, receive)`` for our role (Noise ``Split()``).

        :raises ~stalk.HandshakeFailed: the handshake has not finished.
        """
        if self._split is None:
            raise HandshakeFailed("the handshake has not finished")
        return self._split
