"""Authorities: the Ed25519 key pair that issues certificates and revocation lists.

:class:`PublicAuthority` is what a peer trusts (printed ``stalk-authority:``...);
:class:`Authority` holds the private key, signs certificates and revocation lists (and
nothing else), and lives in a key file with the checks of an identity file (SPEC
"Authorities").
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shlex
import stat
from collections.abc import Iterable
from typing import NoReturn

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from stalk import _files
from stalk.certificates.certificate import Certificate, Extension, _certificate_body
from stalk.certificates.encoding import (
    _ED25519_KEY_SIZE,
    _MAX_KEY_FILE,
    _P,
    _PUB_SUFFIX,
    _REVOCATION_FIELDS,
    AUTHORITY_PREFIX,
    CERTIFICATE_CONTEXT,
    MAX_GROUP_LEN,
    MAX_REVOKED,
    MAX_SERIAL,
    MAX_TIME,
    REVOCATIONS_CONTEXT,
    REVOCATIONS_VERSION,
    _array_header,
    _b64url,
    _check_text,
    _expand,
    _from_b64url,
    _is_uint,
    _montgomery,
    _pack,
    _sha256_fingerprint,
)
from stalk.certificates.revocation import RevocationList
from stalk.errors import IdentityFileError
from stalk.identity import Immutable, PublicIdentity


class PublicAuthority(Immutable):
    """An authority's Ed25519 public key: whom a certificate's signature must come from.

    ``str()`` gives the printable form ``stalk-authority:`` + 43 base64url characters;
    :attr:`fingerprint` names it for people (and, as raw bytes, in the certificates it
    issues). Immutable and hashable; equality is constant-time.

    :param raw: the 32 bytes of the Ed25519 public key.
    :raises ValueError: not 32 bytes, not a canonical encoding (y >= 2^255 - 19), or not a
        key ``cryptography`` accepts.
    """

    __slots__ = ("_key", "_raw", "_x25519")

    _raw: bytes
    _key: Ed25519PublicKey
    _x25519: bytes | None

    def __init__(self, raw: bytes | bytearray | memoryview) -> None:
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise TypeError(f"an authority key must be bytes, not {type(raw).__name__}")
        data = bytes(raw)
        if len(data) != _ED25519_KEY_SIZE:
            raise ValueError(f"an authority key must be {_ED25519_KEY_SIZE} bytes, got {len(data)}")
        if int.from_bytes(data, "little") & ((1 << 255) - 1) >= _P:
            raise ValueError("not a canonical Ed25519 public key: y >= 2^255-19")
        try:
            key = Ed25519PublicKey.from_public_bytes(data)
        except ValueError as exc:
            raise ValueError("not a usable Ed25519 public key") from exc
        object.__setattr__(self, "_raw", data)
        object.__setattr__(self, "_key", key)
        # Computed once: the check that no certificate names an authority's key needs it
        # for every certificate, and it costs a modular inverse.
        object.__setattr__(self, "_x25519", _montgomery(data))

    def __reduce__(self) -> tuple[type[PublicAuthority], tuple[bytes]]:
        return (type(self), (self._raw,))

    @property
    def raw(self) -> bytes:
        """The 32 bytes of the Ed25519 public key."""
        return self._raw

    @property
    def digest(self) -> bytes:
        """SHA-256 of :attr:`raw`: the issuer field of the certificates it signs."""
        return hashlib.sha256(self._raw).digest()

    @property
    def fingerprint(self) -> str:
        """``SHA256:`` + unpadded standard base64 of :attr:`digest`."""
        return _sha256_fingerprint(self.digest)

    @classmethod
    def from_string(cls, text: str) -> PublicAuthority:
        """Parse the printable form ``stalk-authority:<43 base64url characters>``.

        Whitespace around it is ignored; only the canonical encoding is accepted.

        :raises ValueError: not a valid printable authority key.
        """
        if not isinstance(text, str):
            raise TypeError(f"expected str, not {type(text).__name__}")
        text = text.strip()
        if not text.startswith(AUTHORITY_PREFIX):
            raise ValueError(f"not a stalk authority key: expected {AUTHORITY_PREFIX!r}...")
        raw = _from_b64url(text[len(AUTHORITY_PREFIX) :], "stalk authority key")
        return cls(raw)

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``message``."""
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __str__(self) -> str:
        return AUTHORITY_PREFIX + _b64url(self._raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicAuthority):
            return NotImplemented
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._raw)


class Authority(Immutable):
    """An authority's Ed25519 key pair: it issues certificates and revocation lists.

    Stored as an unencrypted PKCS#8 PEM file with mode 0600 (``openssl pkey`` reads it),
    next to a ``.pub`` file holding the printable public form, as :class:`~stalk.Identity`
    is. The private key never appears in ``repr``, and an authority cannot be pickled.

    :param private_key: a ``cryptography`` Ed25519 private key.
    """

    __slots__ = ("_key", "_public")

    _key: Ed25519PrivateKey
    _public: PublicAuthority

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(f"expected an Ed25519PrivateKey, not {type(private_key).__name__}")
        public = PublicAuthority(
            private_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )
        object.__setattr__(self, "_key", private_key)
        object.__setattr__(self, "_public", public)

    def __reduce__(self) -> NoReturn:
        raise TypeError("an Authority cannot be pickled; use Authority.save()")

    @classmethod
    def generate(cls) -> Authority:
        """A new random authority."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Authority:
        """An authority from the 32-byte Ed25519 seed (for tests and test vectors)."""
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(raw)))

    @property
    def public(self) -> PublicAuthority:
        """The public key: what peers trust, in their authorities file."""
        return self._public

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._public} {self._public.fingerprint}>"

    def sign_bytes(self, context: bytes, message: bytes) -> bytes:
        """The Ed25519 signature of ``context + message`` (what a certificate carries).

        Only ``CERTIFICATE_CONTEXT`` and ``REVOCATIONS_CONTEXT`` are accepted: an
        authority key signs nothing else.

        :raises ValueError: another context.
        """
        if context not in (CERTIFICATE_CONTEXT, REVOCATIONS_CONTEXT):
            raise ValueError("an authority signs certificates and revocation lists only")
        return self._key.sign(context + message)

    def sign(
        self,
        subject: PublicIdentity,
        name: str,
        groups: Iterable[str] = (),
        *,
        not_before: int,
        not_after: int,
        serial: int | None = None,
        extensions: Iterable[Extension] = (),
    ) -> Certificate:
        """Issue a certificate: ``subject`` is ``name``, in ``groups``, for that time.

        Groups are sorted and duplicates dropped (a certificate holds them as a set).

        :param subject: the stalk public key the certificate is for.
        :param name: 1 to 128 visible ASCII characters.
        :param groups: at most 16, each 1 to 32 visible ASCII characters.
        :param not_before: first second of validity (seconds since 1970, UTC).
        :param not_after: end of validity (exclusive), after ``not_before``.
        :param serial: a number the authority can revoke it by; default: 64 random bits.
        :param extensions: at most 4, with distinct ids.
        :raises ValueError: a field out of its bounds, or ``subject`` is this authority's
            own key (in either form).
        """
        if not isinstance(subject, PublicIdentity):
            raise TypeError("the subject must be a PublicIdentity (a stalk: key)")
        if _is_authority_key(subject.raw, self._public):
            raise ValueError("an authority does not certify its own key as a subject")
        if isinstance(groups, str):
            raise TypeError("groups must be an iterable of str, not one str")
        group_list = list(groups)
        for group in group_list:
            _check_text(group, MAX_GROUP_LEN, "a group")
        if serial is None:
            serial = secrets.randbits(64)
        # Visible ASCII sorts the same as str and as bytes.
        exts = tuple(sorted(extensions, key=lambda e: e.id))
        body = _certificate_body(
            serial=serial,
            subject=subject.raw,
            name=name,
            groups=sorted(set(group_list)),
            not_before=not_before,
            not_after=not_after,
            issuer=self._public.digest,
            extensions=[[e.id, e.critical, e.value] for e in exts],
        )
        signature = self.sign_bytes(CERTIFICATE_CONTEXT, body)
        return Certificate.from_bytes(body + _pack(signature))

    def revoke(
        self,
        serials: Iterable[int] = (),
        subjects: Iterable[PublicIdentity] = (),
        *,
        issued_at: int,
    ) -> RevocationList:
        """A signed revocation list of ``serials`` and ``subjects`` (keys).

        :param issued_at: when (seconds since 1970, UTC): a listener keeps the newest list
            it has seen and refuses an older one.
        :raises ValueError: more than ``MAX_REVOKED`` (100,000) entries, or a value out of range.
        """
        serial_list = sorted(set(serials))
        key_list = sorted({key.raw for key in subjects})
        if any(not _is_uint(s, MAX_SERIAL) for s in serial_list):
            raise ValueError(f"serials must be integers in 0..{MAX_SERIAL}")
        if len(serial_list) + len(key_list) > MAX_REVOKED:
            raise ValueError(f"a revocation list names at most {MAX_REVOKED} serials and keys")
        if not _is_uint(issued_at, MAX_TIME):
            raise ValueError(f"issued_at must be an integer in 0..{MAX_TIME}")
        fields = [REVOCATIONS_VERSION, self._public.digest, issued_at, serial_list, key_list]
        # The array's header counts the signature that follows the signed fields.
        body = _array_header(_REVOCATION_FIELDS) + b"".join(_pack(f) for f in fields)
        signature = self.sign_bytes(REVOCATIONS_CONTEXT, body)
        return RevocationList.from_bytes(body + _pack(signature))

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the private key (PKCS#8 PEM, mode 0600) and ``path.pub`` (mode 0644).

        Each file is written atomically (a temporary file, fsynced, renamed); missing
        parent directories are created with mode 0700. ``~`` is expanded.

        :raises IdentityFileError: the file exists and ``overwrite`` is false, or writing
            failed.
        """
        path = _expand(path)
        if not path.name:
            raise IdentityFileError(f"authority file path '{path}' names no file")
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            _files.make_private_dirs(path.parent)
        except OSError as exc:
            raise IdentityFileError(
                f"cannot create directory '{path.parent}': {exc.strerror or exc}"
            ) from exc
        _files.atomic_write(path, pem, 0o600, overwrite=overwrite)
        line = f"{self._public}\n".encode("ascii")
        _files.atomic_write(path.with_name(path.name + _PUB_SUFFIX), line, 0o644, overwrite=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Authority:
        """Read an authority's private key file, with the checks of an identity file.

        The file must be owned by us or root, readable by nobody else (0600), in
        directories only we (or root) can change, and hold an unencrypted PEM Ed25519 key.

        :raises IdentityFileError: any of that is not so.
        """
        path = _expand(path)
        data, st = _files.read_file(path, "authority file", limit=_MAX_KEY_FILE)
        if data.lstrip().startswith(AUTHORITY_PREFIX.encode("ascii")):
            raise IdentityFileError(
                f"authority file '{path}' holds a public authority key, not a private key "
                f"(pass the private key file, not the {_PUB_SUFFIX} file)"
            )
        _files.check_owner(path, st, "authority file")
        perms = stat.S_IMODE(st.st_mode)
        if _files.CHECK_PERMISSIONS and perms & 0o077:
            raise IdentityFileError(
                f"permissions {perms:04o} for '{path}' are too open: an authority's private "
                f"key must not be accessible by others. Fix it with: chmod 600 "
                f"{shlex.quote(str(path))}"
            )
        _files.check_directories(path, "authority file")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError as exc:
            raise IdentityFileError(f"authority file '{path}' is encrypted") from exc
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise IdentityFileError(
                f"authority file '{path}' does not hold a readable PEM private key"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityFileError(f"authority file '{path}' does not hold an Ed25519 key")
        return cls(key)


def _is_authority_key(subject: bytes, authority: PublicAuthority) -> bool:
    """Whether a stalk key is ``authority``'s own key: its bytes, or its X25519 form."""
    converted = authority._x25519
    return hmac.compare_digest(subject, authority.raw) or (
        converted is not None and hmac.compare_digest(subject, converted)
    )
