"""Noise handshake and cipher states: stalk's own for its two protocols, noiseprotocol else.

Theory of operation
-------------------
:class:`NoiseHandshake` gives a Noise HandshakeState a small typed surface, translates every
error into :class:`~stalk.HandshakeFailed`, and makes any failure fatal. Behind it, one of
two engines runs the Noise spec's HandshakeState, SymmetricState and CipherState:

- :class:`_LeanEngine` for the two protocols stalk speaks, ``Noise_XX_25519_AESGCM_SHA256``
  and ``Noise_IK_25519_AESGCM_SHA256`` (without PSKs): Noise §5 written out over
  cryptography's X25519 and AESGCM and the standard library's SHA-256 and HMAC, about a
  hundred lines. noiseprotocol's generic objects (a keypair object per key, a cipher and a
  hash object per call, a token dispatch per step) cost more CPU than a handshake's X25519
  operations; this engine costs a small fraction of them.
- :class:`_NoiseprotocolEngine` (``noiseprotocol``, pinned to 0.3.1, its last release) for
  every other protocol name (the published test vectors use many), and on request
  (``reference=True``) for the two above: it is the reference the lean engine is checked
  against, message for message and key for key (``tests/test_noise.py``), besides the
  published vectors, which both engines must pass.

The wrapper designs around the traits of noiseprotocol's release, each pinned by a test in
``tests/test_noise.py``, and the lean engine behaves the same way:

- It has no public accessor for the remote static key, and ``handshake_done()`` deletes the
  handshake state when the last message is processed. We keep our own reference to the
  ``HandshakeState`` object, whose ``rs`` attribute outlives that deletion.
- It checks its 65535-byte limit against the *plaintext*, so it can emit a ciphertext that it
  would itself refuse. stalk never calls those checked wrappers: it caps plaintext at
  :data:`MAX_PLAINTEXT` (65535 - 16) itself and drives the AEAD objects directly.
- Authentication failures surface as cryptography's ``InvalidTag``, low-order DH values as a
  bare ``ValueError``, missing keys as a bare ``Exception``. Everything that escapes an
  engine is translated here into :class:`~stalk.HandshakeFailed` or
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

Transport ciphers (:class:`TransportCipher`) are stalk's own whichever engine ran the
handshake: they take the key ``Split()`` produced. They follow Noise §5.1: a failed
decryption does not advance the nonce, and the nonce can never wrap: encrypting or
decrypting at nonce ``2**64 - 1`` raises :class:`~stalk.NonceExhausted` (that value is
reserved for ``REKEY``, Noise §5.1).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
import warnings
from collections import deque
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
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
    "prepare_ephemeral",
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

    The transport phase is stalk's hot path, so this class holds cryptography's AEAD object
    (``AESGCM`` or ``ChaCha20Poly1305``) for the key ``Split()`` produced and calls it
    directly, formatting the nonce as Noise §12 says (32 zero bits, then the 64-bit counter,
    big-endian for AESGCM and little-endian for ChaChaPoly). That takes ``bytes``-like
    input, which allows :meth:`encrypt_into`. The published test vectors check this path
    byte for byte.

    :param key: the 32-byte cipher key, or ``None`` for the direction a one-way pattern
        discards.
    :param chacha: ChaChaPoly instead of AESGCM.
    """

    __slots__ = ("_aead", "_chacha", "_key", "_n", "_nonce")

    def __init__(self, key: bytes | None, *, chacha: bool = False) -> None:
        self._key = key
        self._chacha = chacha
        self._n = 0
        self._nonce = _NONCE_LE if chacha else _NONCE_BE
        self._aead: Any = None if key is None else _aead(key, chacha=chacha)

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
        nonce = self._next_nonce()
        ciphertext: bytes = self._aead.encrypt(nonce, plaintext, None)
        self._n += 1
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
        """Noise ``Rekey()`` (§4.2): a new key from the old one; the nonce is not reset.

        The new key is the first 32 bytes of encrypting 32 zero bytes under the reserved
        nonce ``2**64 - 1`` with empty associated data (§4.2's default ``REKEY``).
        """
        if self._aead is None:
            raise LocalProtocolError(
                "a one-way pattern carries no transport messages in this direction"
            )
        key: bytes = self._aead.encrypt(self._nonce.pack(MAX_NONCE), _ZEROS, b"")[:32]
        self._key = key
        self._aead = _aead(key, chacha=self._chacha)


def _aead(key: bytes, *, chacha: bool) -> Any:
    return ChaCha20Poly1305(key) if chacha else AESGCM(key)


_ZEROS: Final = bytes(32)


# -- ephemeral keys ------------------------------------------------------------------------

#: At most one ephemeral key made ahead of need by :func:`prepare_ephemeral`, for the next
#: handshake of this process. ``popleft`` hands it to exactly one taker, across threads too.
_SPARE: Final[deque[X25519PrivateKey]] = deque(maxlen=1)
if hasattr(os, "register_at_fork"):  # a forked child must never use its parent's key
    os.register_at_fork(after_in_child=_SPARE.clear)


def prepare_ephemeral() -> None:
    """Make the next handshake's ephemeral key now, unless one is waiting.

    For a driver with time on its hands, waiting for the peer's handshake message: a key
    pair costs about as much as a DH (20 us here), and the next handshake, which would make
    it while its peer waits, takes it ready made. Each key is still used once and fresh
    from the system's random generator; it is only made earlier.
    """
    if not _SPARE:
        _SPARE.append(X25519PrivateKey.generate())


def _new_ephemeral() -> X25519PrivateKey:
    """The key :func:`prepare_ephemeral` made, taken (never to be used again), or a new one."""
    try:
        return _SPARE.popleft()
    except IndexError:
        return X25519PrivateKey.generate()


# -- the lean engine -----------------------------------------------------------------------

#: The protocols :class:`_LeanEngine` runs: their message patterns (Noise §7.5), after the
#: pre-message (IK: ``<- s``, the responder's static key, known to the initiator).
_LEAN_PATTERNS: Final[dict[str, tuple[tuple[str, ...], ...]]] = {
    "Noise_XX_25519_AESGCM_SHA256": (("e",), ("e", "ee", "s", "es"), ("s", "se")),
    "Noise_IK_25519_AESGCM_SHA256": (("e", "es", "s", "ss"), ("e", "ee", "se")),
}
_HASHLEN: Final = 32


@functools.lru_cache(maxsize=32)
def _static_key(private: bytes) -> tuple[X25519PrivateKey, bytes]:
    """A static private key object and its public bytes, built once per key."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key, key.public_key().public_bytes_raw()


def _hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """Noise ``HKDF(chaining_key, input_key_material, 2)`` over HMAC-SHA256 (§4.3)."""
    temp_key = _hmac_sha256(chaining_key, ikm)
    output1 = _hmac_sha256(temp_key, b"\x01")
    return output1, _hmac_sha256(temp_key, output1 + b"\x02")


class _OutOfTurn(Exception):
    """A handshake read or write out of its turn, or after the handshake (lean engine)."""


class _LeanEngine:
    """Noise §5's HandshakeState for XX and IK over 25519, AESGCM and SHA256, no PSKs.

    The SymmetricState is three fields: ``h``, ``ck``, and the handshake CipherState as an
    ``AESGCM`` object and its nonce (``None`` before the first ``MixKey``). Message
    patterns run step by step (Noise's tokens) as §5.3 writes them; a DH with a low-order
    key raises cryptography's ``ValueError`` (an all-zero result), a bad tag its
    ``InvalidTag``.
    """

    __slots__ = (
        "_aead",
        "_ck",
        "_e",
        "_h",
        "_initiator",
        "_n",
        "_next",
        "_patterns",
        "_re",
        "_rs",
        "_s",
        "_s_public",
        "remote_static",
    )

    def __init__(
        self,
        protocol_name: str,
        *,
        initiator: bool,
        prologue: bytes,
        static_private: bytes,
        remote_static_public: bytes | None,
        ephemeral_private: bytes | None,
    ) -> None:
        self._patterns = _LEAN_PATTERNS[protocol_name]
        self._initiator = initiator
        self._next = 0  # index of the next message pattern
        # InitializeSymmetric: a name of at most HASHLEN bytes is padded, not hashed.
        name = protocol_name.encode("ascii")
        self._ck = name.ljust(_HASHLEN, b"\x00")
        self._h = self._ck
        self._aead: AESGCM | None = None
        self._n = 0
        self._s, self._s_public = _static_key(static_private)
        self._e = (
            X25519PrivateKey.from_private_bytes(ephemeral_private)
            if ephemeral_private is not None
            else None
        )
        self._re: X25519PublicKey | None = None
        self._rs: X25519PublicKey | None = None
        #: The remote static public key, once known (pre-message or received).
        self.remote_static: bytes | None = None
        self._mix_hash(prologue)
        if len(self._patterns) == 2:  # IK: the pre-message "<- s"
            if initiator:
                if remote_static_public is None:
                    raise ValueError("IK needs the responder's static public key")
                self._rs = X25519PublicKey.from_public_bytes(remote_static_public)
                self.remote_static = bytes(remote_static_public)
                self._mix_hash(self.remote_static)
            else:
                self._mix_hash(self._s_public)

    @property
    def finished(self) -> bool:
        """Whether every message pattern has been written or read."""
        return self._next == len(self._patterns)

    @property
    def handshake_hash(self) -> bytes:
        """Noise ``h``."""
        return self._h

    def _mix_hash(self, data: bytes) -> None:
        self._h = _sha256(self._h + data)

    def _mix_key(self, ikm: bytes) -> None:
        self._ck, key = _hkdf2(self._ck, ikm)
        self._aead = AESGCM(key)
        self._n = 0

    def _encrypt_and_hash(self, plaintext: bytes) -> bytes:
        aead = self._aead
        if aead is None:
            ciphertext = plaintext
        else:
            ciphertext = aead.encrypt(_NONCE_BE.pack(self._n), plaintext, self._h)
            self._n += 1
        self._mix_hash(ciphertext)
        return ciphertext

    def _decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        aead = self._aead
        if aead is None:
            plaintext = ciphertext
        else:
            plaintext = aead.decrypt(_NONCE_BE.pack(self._n), ciphertext, self._h)
            self._n += 1
        self._mix_hash(ciphertext)
        return plaintext

    def _dh(self, step: str) -> bytes:
        """The DH a pattern step (Noise token) names (§5.3), seen from our role."""
        initiator = self._initiator
        if step == "ee":
            local, remote = self._e, self._re
        elif step == "es":
            local, remote = (self._e, self._rs) if initiator else (self._s, self._re)
        elif step == "se":
            local, remote = (self._s, self._re) if initiator else (self._e, self._rs)
        else:  # "ss"
            local, remote = self._s, self._rs
        if local is None or remote is None:  # pragma: no cover - the patterns order the keys
            raise ValueError(f"no key yet for {step}")
        return local.exchange(remote)

    def _steps(self, *, writing: bool) -> tuple[str, ...]:
        """The next message pattern's steps (Noise tokens), if it is our turn to write or read."""
        index = self._next
        if index >= len(self._patterns):
            raise _OutOfTurn("the handshake is finished")
        if (index % 2 == 0) != (self._initiator == writing):
            raise _OutOfTurn("it is the other party's turn")
        self._next = index + 1
        return self._patterns[index]

    def write_message(self, payload: bytes) -> bytes:
        """Noise ``WriteMessage``: the message carrying ``payload``."""
        parts = []
        for step in self._steps(writing=True):
            if step == "e":
                if self._e is None:
                    self._e = _new_ephemeral()
                public = self._e.public_key().public_bytes_raw()
                parts.append(public)
                self._mix_hash(public)
            elif step == "s":
                parts.append(self._encrypt_and_hash(self._s_public))
            else:
                self._mix_key(self._dh(step))
        parts.append(self._encrypt_and_hash(bytes(payload)))
        return b"".join(parts)

    def read_message(self, message: bytes) -> bytes:
        """Noise ``ReadMessage``: the payload ``message`` carries."""
        offset = 0
        for step in self._steps(writing=False):
            if step == "e":
                public = message[offset : offset + DHLEN]
                offset += DHLEN
                self._re = X25519PublicKey.from_public_bytes(public)
                self._mix_hash(public)
            elif step == "s":
                size = DHLEN + TAGLEN if self._aead is not None else DHLEN
                public = self._decrypt_and_hash(message[offset : offset + size])
                offset += size
                self._rs = X25519PublicKey.from_public_bytes(public)
                self.remote_static = public
            else:
                self._mix_key(self._dh(step))
        return self._decrypt_and_hash(message[offset:])

    def split(self) -> tuple[TransportCipher, TransportCipher]:
        """Noise ``Split()``: the transport ciphers ``(send, receive)`` for our role."""
        first, second = _hkdf2(self._ck, b"")
        if self._initiator:
            return TransportCipher(first), TransportCipher(second)
        return TransportCipher(second), TransportCipher(first)


# -- the reference engine ------------------------------------------------------------------


class _NoiseprotocolEngine:
    """Any protocol noiseprotocol supports, run by noiseprotocol (see the module docs)."""

    __slots__ = ("_conn", "_hs")

    def __init__(
        self,
        protocol_name: str,
        *,
        initiator: bool,
        prologue: bytes,
        static_private: bytes | None,
        remote_static_public: bytes | None,
        psks: list[bytes] | None,
        ephemeral_private: bytes | None,
    ) -> None:
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
        self._conn: Any = conn
        # Our own reference: noiseprotocol deletes its handshake_state when the handshake ends.
        self._hs: Any = conn.noise_protocol.handshake_state

    @property
    def finished(self) -> bool:
        return bool(self._conn.handshake_finished)

    @property
    def remote_static(self) -> bytes | None:
        rs = getattr(self._hs, "rs", None)
        public_bytes = getattr(rs, "public_bytes", None)
        return bytes(public_bytes) if public_bytes is not None else None

    @property
    def handshake_hash(self) -> bytes:
        return bytes(self._conn.get_handshake_hash())

    def write_message(self, payload: bytes) -> bytes:
        return bytes(self._conn.write_message(payload))

    def read_message(self, message: bytes) -> bytes:
        return bytes(self._conn.read_message(message))

    def split(self) -> tuple[TransportCipher, TransportCipher]:
        proto = self._conn.noise_protocol
        return _transport(proto.cipher_state_encrypt), _transport(proto.cipher_state_decrypt)


def _transport(state: Any) -> TransportCipher:
    """Our TransportCipher for a noiseprotocol CipherState (``None``: a discarded one)."""
    if state is None:
        return TransportCipher(None)
    return TransportCipher(bytes(state.k), chacha=isinstance(state.cipher, ChaCha20Cipher))


# -- the handshake -------------------------------------------------------------------------


class NoiseHandshake:
    """A Noise HandshakeState for one named protocol, with errors translated.

    :param protocol_name: a full Noise protocol name, e.g. ``Noise_XX_25519_AESGCM_SHA256``.
    :param initiator: our role.
    :param prologue: bytes both sides must agree on (Noise §6).
    :param static_private: our static private key, where the pattern needs one.
    :param remote_static_public: the responder's static public key for pre-message patterns
        such as IK.
    :param psks: pre-shared keys, in token order, for ``psk`` patterns (test vectors only).
    :param reference: run noiseprotocol even where the lean engine would (differential
        tests, and test peers that alter noiseprotocol's state to misbehave).
    :raises ~stalk.HandshakeFailed: the name is not supported or a required key is missing.
    """

    __slots__ = ("_complete", "_engine", "_failed", "_remote_static", "_split")

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
        reference: bool = False,
    ) -> None:
        engine: _LeanEngine | _NoiseprotocolEngine
        try:
            if (
                protocol_name in _LEAN_PATTERNS
                and not reference
                and not psks
                and static_private is not None
                and (initiator or remote_static_public is None)
            ):
                engine = _LeanEngine(
                    protocol_name,
                    initiator=initiator,
                    prologue=bytes(prologue),
                    static_private=static_private,
                    remote_static_public=remote_static_public,
                    ephemeral_private=ephemeral_private,
                )
            else:
                engine = _NoiseprotocolEngine(
                    protocol_name,
                    initiator=initiator,
                    prologue=prologue,
                    static_private=static_private,
                    remote_static_public=remote_static_public,
                    psks=psks,
                    ephemeral_private=ephemeral_private,
                )
        except Exception as exc:
            # noiseprotocol raises bare Exception, ValueError, NotImplementedError and its own
            # unrelated classes here; all mean "this handshake cannot be set up".
            raise HandshakeFailed(f"cannot set up {protocol_name}: {exc}") from exc
        self._engine = engine
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
    def lean(self) -> bool:
        """Whether stalk's own engine runs this handshake (not noiseprotocol)."""
        return type(self._engine) is _LeanEngine

    @property
    def complete(self) -> bool:
        """Whether the last handshake message has been written or read."""
        return self._complete

    @property
    def remote_static(self) -> bytes | None:
        """The remote party's static public key, once a message has carried it (or pre-known)."""
        if self._remote_static is not None:
            return self._remote_static
        return self._engine.remote_static

    @property
    def handshake_hash(self) -> bytes:
        """Noise ``h`` after the handshake (§11.2): the channel-binding value.

        :raises ~stalk.HandshakeFailed: the handshake has not finished.
        """
        if not self._complete:
            raise HandshakeFailed("the handshake hash exists only after the handshake")
        return self._engine.handshake_hash

    def write_message(self, payload: bytes) -> bytes:
        """Write the next handshake message (Noise ``WriteMessage``) carrying ``payload``.

        :raises ~stalk.HandshakeFailed: it is not our turn, the message would be too long, or
            the handshake already failed.
        """
        self._check_usable()
        try:
            message = self._engine.write_message(payload)
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
            payload = self._engine.read_message(bytes(message))
        except InvalidTag as exc:
            self._failed = True
            raise HandshakeAuthenticationFailed("handshake message failed authentication") from exc
        except Exception as exc:
            self._failed = True
            # Short messages and low-order points come back as ValueError from cryptography;
            # out-of-turn calls as NoiseHandshakeError (or _OutOfTurn). All are fatal
            # handshake failures.
            raise HandshakeFailed(f"invalid handshake message: {type(exc).__name__}") from exc
        self._after_message()
        return payload

    def _check_usable(self) -> None:
        if self._failed:
            raise HandshakeFailed("the handshake already failed; it cannot continue")
        if self._complete:
            raise HandshakeFailed("the handshake is already complete")

    def _after_message(self) -> None:
        engine = self._engine
        if engine.finished:
            self._complete = True
            self._remote_static = engine.remote_static
            self._split = engine.split()

    def split(self) -> tuple[TransportCipher, TransportCipher]:
        """The transport ciphers ``(send, receive)`` for our role (Noise ``Split()``).

        :raises ~stalk.HandshakeFailed: the handshake has not finished.
        """
        if self._split is None:
            raise HandshakeFailed("the handshake has not finished")
        return self._split
