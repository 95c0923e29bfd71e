"""Authorities and certificates: a signed statement that a stalk key belongs to a name.

Theory of operation
-------------------
An **authority** is an Ed25519 key pair (:class:`Authority`; its public half is a
:class:`PublicAuthority`, printed ``stalk-authority:`` + 43 base64url characters). It
signs **certificates** (:class:`Certificate`): "the stalk key S is NAME, member of GROUPS,
from NOT_BEFORE until NOT_AFTER", with a serial number, the issuer's fingerprint and room
for extensions. A peer that trusts the authority (:class:`Authorities`) then needs no
pinned key and no trust on first use: the other side presents its certificate in its
encrypted handshake payload, and the certificate's subject must be the very static key
the Noise handshake authenticated (SPEC "Certificates").

Everything here is SPEC "Certificates" in code:

- one canonical encoding: a msgpack array in a fixed order, each value in msgpack's
  shortest form. Decoding re-encodes what it read and refuses anything that differs, so a
  certificate has exactly one byte string, and its signature one meaning;
- the signature is Ed25519 over a domain-separated message (``stalk certificate 1`` and a
  zero byte, then every byte of the certificate before the signature), so it can never be
  mistaken for a signature of anything else;
- verification (:meth:`Authorities.verify`) runs its checks in one stated order and
  raises one :class:`~stalk.CertificateError` subclass per failure, so a caller (and a
  test) can tell an expired certificate from a forged one;
- a **revocation list** (:class:`RevocationList`), signed the same way under its own
  domain, names serials and subject keys that an authority no longer vouches for.

This module is part of the sans-IO core: it never looks at a clock (the caller passes
``now``, or a ``clock`` to :class:`CertificatePolicy`), and its only I/O is reading and
writing the files a person handles (:mod:`stalk._files`, as :mod:`stalk.identity` does).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import itertools
import os
import re
import secrets
import shlex
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn

import msgpack
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from stalk import _files
from stalk.errors import (
    AuthorityAsSubject,
    BadCertificateSignature,
    CertificateExpired,
    CertificateExtensionError,
    CertificateKeyMismatch,
    CertificateMissing,
    CertificateNameMismatch,
    CertificateNotYetValid,
    CertificateRevoked,
    CertificateTooLarge,
    IdentityFileError,
    MalformedCertificate,
    NonCanonicalCertificate,
    RevocationListError,
    UnknownAuthority,
)
from stalk.identity import KEY_SIZE, PublicIdentity
from stalk.summary import plural

__all__ = [
    "AUTHORITY_PREFIX",
    "CERTIFICATE_PREFIX",
    "DEFAULT_CLOCK_SKEW",
    "MAX_CERTIFICATE_SIZE",
    "REVOCATIONS_PREFIX",
    "Authorities",
    "Authority",
    "Certificate",
    "CertificatePolicy",
    "CertifiedIdentity",
    "Extension",
    "PublicAuthority",
    "RevocationFile",
    "RevocationList",
    "check_names",
    "utc_text",
]

#: Prefix of an authority's printable public form.
AUTHORITY_PREFIX: Final = "stalk-authority:"
#: Prefix of a certificate's line in its file form.
CERTIFICATE_PREFIX: Final = "stalk-certificate:"
#: Prefix of a revocation list's line in its file form.
REVOCATIONS_PREFIX: Final = "stalk-revocations:"

#: The certificate format this code writes and reads (element 0 of a certificate).
CERTIFICATE_VERSION: Final = 1
#: The revocation list format this code writes and reads (element 0 of a list).
REVOCATIONS_VERSION: Final = 1
#: What an authority signs: one of these, then the bytes it vouches for (SPEC
#: "Certificates"). No other message stalk signs or verifies starts this way.
CERTIFICATE_CONTEXT: Final = b"stalk certificate 1\x00"
REVOCATIONS_CONTEXT: Final = b"stalk revocation list 1\x00"

# Bounds (SPEC "Limits"). Every field is bounded, so the largest certificate the format
# allows is 2,021 bytes; MAX_CERTIFICATE_SIZE is checked before anything is decoded.
#: The largest encoded certificate accepted.
MAX_CERTIFICATE_SIZE: Final = 2_048
#: A name: 1 to 128 visible ASCII characters (0x21 to 0x7E).
MAX_NAME_LEN: Final = 128
#: At most 16 groups, each 1 to 32 visible ASCII characters.
MAX_GROUPS: Final = 16
MAX_GROUP_LEN: Final = 32
#: At most 4 extensions: an id of 1 to 32 visible ASCII characters, a value of <= 256 bytes.
MAX_EXTENSIONS: Final = 4
MAX_EXTENSION_ID_LEN: Final = 32
MAX_EXTENSION_VALUE: Final = 256
#: Times are whole seconds since 1970-01-01 UTC, below 2^63 (a signed 64-bit integer).
MAX_TIME: Final = 2**63 - 1
#: Serials are unsigned 64-bit integers.
MAX_SERIAL: Final = 2**64 - 1
#: A revocation list names at most this many serials and keys together.
MAX_REVOKED: Final = 100_000
#: How many certificates whose signature verified an :class:`Authorities` remembers (at
#: most 2,048 bytes each), so that peers reconnecting cost no Ed25519 verification.
SIGNED_CACHE: Final = 256
#: The clock difference tolerated between the authority, the peer and us, in seconds (as
#: Kerberos): a certificate is valid from ``not_before - skew`` until ``not_after + skew``.
DEFAULT_CLOCK_SKEW: Final = 300.0

#: Ed25519 signature and public key sizes (RFC 8032).
_SIGNATURE_SIZE: Final = 64
_ED25519_KEY_SIZE: Final = 32
#: The signature element at the end of a certificate or list: ``c4 40`` + 64 bytes.
_SIGNATURE_TAIL: Final = 2 + _SIGNATURE_SIZE
#: Element counts of the two arrays.
_CERTIFICATE_FIELDS: Final = 10
_REVOCATION_FIELDS: Final = 6

#: Key and list files are small; a revocation list of MAX_REVOKED keys in base64 is ~4.6 MB.
_MAX_KEY_FILE: Final = 64 * 1024
_MAX_CERTIFICATE_FILE: Final = 64 * 1024
_MAX_AUTHORITIES_FILE: Final = 1024 * 1024
_MAX_REVOCATIONS_FILE: Final = 8 * 1024 * 1024

_PUB_SUFFIX: Final = ".pub"
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
#: The field prime of Curve25519 and Ed25519.
_P = 2**255 - 19


# -- encodings --------------------------------------------------------------------------


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _from_b64url(body: str, what: str) -> bytes:
    """Decode unpadded base64url, refusing every text but the canonical one.

    :raises ValueError: padding, another alphabet, a bad length, or unused bits set.
    """
    if "=" in body:
        raise ValueError(f"not a {what}: padding found (expected unpadded base64url)")
    if _B64URL.fullmatch(body) is None:
        raise ValueError(f"not a {what}: invalid base64url character")
    if len(body) % 4 == 1:
        raise ValueError(f"not a {what}: {len(body)} base64url characters is not a length")
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    if _b64url(raw) != body:
        raise ValueError(f"not a {what}: non-canonical base64url")
    return raw


def _sha256_fingerprint(digest: bytes) -> str:
    """``SHA256:`` and the unpadded standard base64 of a digest, as ssh prints it."""
    return "SHA256:" + base64.b64encode(digest).rstrip(b"=").decode("ascii")


def _pack(value: object) -> bytes:
    """The canonical msgpack of a value built from ints, bools, str, bytes and lists."""
    return msgpack.packb(value, use_bin_type=True)


def _unpack(data: bytes, error: type[Exception], what: str) -> Any:
    """Exactly one msgpack value, strings as ``str`` and bins as ``bytes``; no maps.

    :raises error: not exactly one valid value (maps, floats and exts are refused by the
        callers' type checks).
    """
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises ValueError subclasses, StackError and others
        raise error(f"{what} is not exactly one valid msgpack value") from exc


def _is_uint(value: object, high: int) -> bool:
    return type(value) is int and 0 <= value <= high


def _check_text(value: object, high: int, what: str) -> str:
    """A name, group or extension id: 1 to ``high`` visible ASCII characters.

    :raises ValueError: anything else.
    """
    if type(value) is not str:
        raise ValueError(f"{what} must be a string")
    if not 1 <= len(value) <= high or _VISIBLE_ASCII.fullmatch(value) is None:
        raise ValueError(
            f"{what} must be 1 to {high} visible ASCII characters (no spaces or controls)"
        )
    return value


def check_names(name: str, groups: Iterable[str]) -> None:
    """Refuse a name or groups that a certificate cannot carry (SPEC "Certificates").

    :raises ValueError: a name or group that is not 1 to 128 (a group: 32) visible ASCII
        characters, or more than 16 groups.
    """
    _check_text(name, MAX_NAME_LEN, "a name")
    group_list = list(groups)
    if len(group_list) > MAX_GROUPS:
        raise ValueError(f"a certificate has at most {MAX_GROUPS} groups")
    for group in group_list:
        _check_text(group, MAX_GROUP_LEN, "a group")


def utc_text(seconds: int) -> str:
    """A certificate time as people read it: ``2025-06-01T12:00:00Z``."""
    try:
        moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"{seconds} (seconds since 1970)"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _montgomery(edwards: bytes) -> bytes | None:
    """The X25519 key of an Ed25519 public key (RFC 7748 §4.1: u = (1 + y) / (1 - y)).

    One private key used for both: the same key, in stalk's form. ``None`` for y = 1.
    """
    y = int.from_bytes(edwards, "little") & ((1 << 255) - 1)
    if y == 1 or y >= _P:
        return None
    u = (1 + y) * pow(1 - y, _P - 2, _P) % _P
    return u.to_bytes(KEY_SIZE, "little")


# -- authorities ------------------------------------------------------------------------


class PublicAuthority:
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

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable")

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


class Authority:
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

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable")

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


def _expand(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.expanduser(os.fspath(path)))


def _array_header(count: int) -> bytes:
    """The msgpack header of an array of ``count`` (< 16) elements."""
    return bytes([0x90 | count])


def _is_authority_key(subject: bytes, authority: PublicAuthority) -> bool:
    """Whether a stalk key is ``authority``'s own key: its bytes, or its X25519 form."""
    converted = authority._x25519
    return hmac.compare_digest(subject, authority.raw) or (
        converted is not None and hmac.compare_digest(subject, converted)
    )


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Extension:
    """A certificate extension: an id, whether it is critical, and its bytes.

    A verifier that does not know a **critical** extension refuses the certificate; an
    unknown non-critical one is ignored. Version 1 of the format defines no extension, so
    every critical one is refused (SPEC "Certificates").

    :param id: 1 to 32 visible ASCII characters, unique within a certificate.
    :param critical: whether a verifier that does not know it must refuse.
    :param value: at most 256 bytes.
    """

    id: str
    critical: bool
    value: bytes = b""

    def __post_init__(self) -> None:
        _check_text(self.id, MAX_EXTENSION_ID_LEN, "an extension id")
        if type(self.critical) is not bool:
            raise ValueError("an extension's critical flag must be a bool")
        if type(self.value) is not bytes or len(self.value) > MAX_EXTENSION_VALUE:
            raise ValueError(f"an extension's value must be bytes, at most {MAX_EXTENSION_VALUE}")


def _certificate_body(
    *,
    serial: int,
    subject: bytes,
    name: str,
    groups: list[str],
    not_before: int,
    not_after: int,
    issuer: bytes,
    extensions: list[list[Any]],
) -> bytes:
    """The bytes an authority signs: a certificate without its signature.

    :raises ValueError: a field out of its bounds.
    """
    if not _is_uint(serial, MAX_SERIAL):
        raise ValueError(f"a serial must be an integer in 0..{MAX_SERIAL}")
    _check_text(name, MAX_NAME_LEN, "a name")
    if len(groups) > MAX_GROUPS:
        raise ValueError(f"a certificate has at most {MAX_GROUPS} groups")
    for group in groups:
        _check_text(group, MAX_GROUP_LEN, "a group")
    if not (_is_uint(not_before, MAX_TIME) and _is_uint(not_after, MAX_TIME)):
        raise ValueError(f"validity times must be integers in 0..{MAX_TIME}")
    if not_after <= not_before:
        raise ValueError("not_after must be later than not_before")
    if len(extensions) > MAX_EXTENSIONS:
        raise ValueError(f"a certificate has at most {MAX_EXTENSIONS} extensions")
    ids = [ext[0] for ext in extensions]
    if len(set(ids)) != len(ids):
        raise ValueError("extension ids must be distinct")
    fields = [
        CERTIFICATE_VERSION,
        serial,
        subject,
        name,
        groups,
        not_before,
        not_after,
        issuer,
        extensions,
    ]
    return _array_header(_CERTIFICATE_FIELDS) + b"".join(_pack(f) for f in fields)


@dataclass(frozen=True, slots=True, repr=False)
class Certificate:
    """A certificate, decoded and checked for form, **not** for trust.

    Build one with :meth:`from_bytes`, :meth:`from_string`, :meth:`load` or
    :meth:`~stalk.Authority.sign`; only :meth:`~stalk.Authorities.verify` says whether to
    believe it. The fields are those of SPEC "Certificates".

    :ivar version: the format version (1).
    :ivar serial: the number its authority can revoke it by.
    :ivar subject: the stalk key it is for.
    :ivar name: who the authority says the subject is.
    :ivar groups: the groups it puts the subject in, sorted.
    :ivar not_before: the first second of validity (seconds since 1970, UTC).
    :ivar not_after: the first second it is no longer valid.
    :ivar issuer: the issuing authority's issuer id (SHA-256 of its public key).
    :ivar extensions: its extensions, sorted by id.
    :ivar signature: the issuer's Ed25519 signature.
    :ivar encoded: its one canonical encoding, which the signature covers.
    """

    version: int
    serial: int
    subject: PublicIdentity
    name: str
    groups: tuple[str, ...]
    not_before: int
    not_after: int
    issuer: bytes
    extensions: tuple[Extension, ...]
    signature: bytes = field(repr=False)
    encoded: bytes = field(repr=False)

    def __repr__(self) -> str:
        return (
            f"<Certificate {self.name!r} groups={list(self.groups)} for {self.subject} "
            f"serial={self.serial} valid {utc_text(self.not_before)}..{utc_text(self.not_after)} "
            f"issuer {self.issuer_fingerprint}>"
        )

    @property
    def issuer_fingerprint(self) -> str:
        """The issuing authority's fingerprint, ``SHA256:...``."""
        return _sha256_fingerprint(self.issuer)

    @property
    def signed_message(self) -> bytes:
        """What the issuer signed: the context string, then every byte before the signature."""
        return CERTIFICATE_CONTEXT + self.encoded[:-_SIGNATURE_TAIL]

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Certificate:
        """Decode a certificate and check its form (size, types, bounds, canonical bytes).

        Nothing about trust is checked: not the signature, the times or the authority.

        :raises ~stalk.CertificateTooLarge: more than ``MAX_CERTIFICATE_SIZE`` (2,048) bytes
            (checked first, before any decoding).
        :raises ~stalk.MalformedCertificate: not the array of SPEC "Certificates", a value
            of the wrong type or out of its bounds, an unknown version.
        :raises ~stalk.NonCanonicalCertificate: a value not in its shortest msgpack form,
            groups or extensions not in strictly increasing order.
        :raises ~stalk.CertificateExtensionError: two extensions with the same id.
        """
        data = bytes(data)
        if len(data) > MAX_CERTIFICATE_SIZE:
            raise CertificateTooLarge(
                f"certificate of {len(data)} bytes is larger than {MAX_CERTIFICATE_SIZE} bytes"
            )
        value = _unpack(data, MalformedCertificate, "the certificate")
        if type(value) is not list or len(value) != _CERTIFICATE_FIELDS:
            raise MalformedCertificate(
                f"a certificate is a msgpack array of {_CERTIFICATE_FIELDS} elements"
            )
        version, serial, subject, name, groups, nb, na, issuer, exts, signature = value
        if type(version) is not int or version != CERTIFICATE_VERSION:
            raise MalformedCertificate(
                f"certificate format version {_describe(version)} is not {CERTIFICATE_VERSION}"
            )
        if not _is_uint(serial, MAX_SERIAL):
            raise MalformedCertificate(f"certificate serial is not an integer in 0..{MAX_SERIAL}")
        if type(subject) is not bytes or len(subject) != KEY_SIZE:
            raise MalformedCertificate("certificate subject is not a 32-byte key")
        try:
            subject_key = PublicIdentity(subject)
        except ValueError as exc:
            raise MalformedCertificate(f"certificate subject is refused: {exc}") from exc
        _decode_names(name, groups)
        if not (_is_uint(nb, MAX_TIME) and _is_uint(na, MAX_TIME)) or na <= nb:
            raise MalformedCertificate(
                "certificate validity is not two integer times, not_before < not_after"
            )
        if type(issuer) is not bytes or len(issuer) != hashlib.sha256().digest_size:
            raise MalformedCertificate("certificate issuer is not a 32-byte fingerprint")
        extensions = _decode_extensions(exts)
        if type(signature) is not bytes or len(signature) != _SIGNATURE_SIZE:
            raise MalformedCertificate(f"certificate signature is not {_SIGNATURE_SIZE} bytes")
        if _pack(value) != data:
            raise NonCanonicalCertificate(
                "certificate is not in its canonical encoding (every value in its shortest "
                "msgpack form)"
            )
        if not _strictly_increasing([g.encode("ascii") for g in groups]):
            raise NonCanonicalCertificate("certificate groups are not sorted, or one is repeated")
        if not _strictly_increasing([e.id.encode("ascii") for e in extensions]):
            raise NonCanonicalCertificate("certificate extensions are not sorted by id")
        return cls(
            version=version,
            serial=serial,
            subject=subject_key,
            name=name,
            groups=tuple(groups),
            not_before=nb,
            not_after=na,
            issuer=issuer,
            extensions=extensions,
            signature=signature,
            encoded=data,
        )

    def to_bytes(self) -> bytes:
        """The canonical encoding (what travels in a handshake)."""
        return self.encoded

    def to_string(self) -> str:
        """The file form: a ``#`` comment block for people, then the certificate line.

        The comments describe the certificate and are ignored when it is read back: only
        the ``stalk-certificate:`` line counts.
        """
        return "".join(f"# {line}\n" for line in self.describe()) + (
            f"{CERTIFICATE_PREFIX}{_b64url(self.encoded)}\n"
        )

    def describe(self) -> list[str]:
        """Its fields as lines of text, as ``stalk cert show`` prints them.

        Every field is visible ASCII by construction, so the lines hold no control
        characters.
        """
        lines = [
            "stalk certificate",
            f"name:       {self.name}",
            f"groups:     {', '.join(self.groups) if self.groups else '(none)'}",
            f"subject:    {self.subject}",
            f"            {self.subject.fingerprint}",
            f"valid from: {utc_text(self.not_before)}",
            f"valid to:   {utc_text(self.not_after)}",
            f"serial:     {self.serial}",
            f"issuer:     {self.issuer_fingerprint}",
        ]
        for ext in self.extensions:
            critical = "critical" if ext.critical else "not critical"
            lines.append(f"extension:  {ext.id} ({critical}, {len(ext.value)} bytes)")
        return lines

    @classmethod
    def from_string(cls, text: str) -> Certificate:
        """Read the file form: blank and ``#`` lines are skipped; one certificate line.

        :raises ValueError: no ``stalk-certificate:`` line, more than one, another line,
            or bad base64url.
        :raises ~stalk.CertificateError: the certificate's form (as :meth:`from_bytes`).
        """
        found = _prefixed_lines(text, CERTIFICATE_PREFIX, "certificate")
        if len(found) != 1:
            raise ValueError(f"expected one {CERTIFICATE_PREFIX} line, found {len(found)}")
        raw = _from_b64url(found[0], "stalk certificate")
        return cls.from_bytes(raw)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the file form to ``path`` (mode 0644, atomically).

        :raises IdentityFileError: the file exists and ``overwrite`` is false, or writing
            failed.
        """
        path = _expand(path)
        _files.atomic_write(path, self.to_string().encode("ascii"), 0o644, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Certificate:
        """Read a certificate file (see :meth:`from_string`).

        :raises IdentityFileError: the file cannot be read, or holds no single valid
            certificate line.
        :raises ~stalk.CertificateError: the certificate's form (as :meth:`from_bytes`),
            its message naming the file.
        """
        path = _expand(path)
        data, _ = _files.read_file(path, "certificate file", limit=_MAX_CERTIFICATE_FILE)
        text = _decode_text(data, path, "certificate file")
        try:
            return cls.from_string(text)
        except ValueError as exc:
            raise IdentityFileError(f"certificate file '{path}': {exc}") from exc
        except (MalformedCertificate, CertificateTooLarge, CertificateExtensionError) as exc:
            raise type(exc)(f"certificate file '{path}': {exc}") from exc


def _describe(value: object) -> str:
    return str(value) if type(value) is int else f"of type {type(value).__name__}"


def _strictly_increasing(items: list[Any]) -> bool:
    return all(a < b for a, b in itertools.pairwise(items))


def _decode_names(name: object, groups: object) -> None:
    """Check a decoded certificate's name and groups (their order is checked later).

    :raises ~stalk.MalformedCertificate: not visible ASCII within the bounds.
    """
    if type(groups) is not list or len(groups) > MAX_GROUPS:
        raise MalformedCertificate(f"certificate groups are not a list of at most {MAX_GROUPS}")
    try:
        _check_text(name, MAX_NAME_LEN, "certificate name")
        for group in groups:
            _check_text(group, MAX_GROUP_LEN, "a certificate group")
    except ValueError as exc:
        raise MalformedCertificate(str(exc)) from exc


def _decode_extensions(value: object) -> tuple[Extension, ...]:
    """The extensions element: at most 4 ``[id, critical, value]`` arrays, ids distinct.

    :raises ~stalk.MalformedCertificate: not that shape.
    :raises ~stalk.CertificateExtensionError: an id repeated.
    """
    if type(value) is not list or len(value) > MAX_EXTENSIONS:
        raise MalformedCertificate(
            f"certificate extensions are not a list of at most {MAX_EXTENSIONS}"
        )
    extensions = []
    for item in value:
        if type(item) is not list or len(item) != 3:
            raise MalformedCertificate("a certificate extension is not [id, critical, value]")
        try:
            extensions.append(Extension(*item))
        except (ValueError, TypeError) as exc:
            raise MalformedCertificate(f"certificate extension refused: {exc}") from exc
    ids = [ext.id for ext in extensions]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise CertificateExtensionError(f"certificate has extension {repeated[0]!r} more than once")
    return tuple(extensions)


def _decode_text(data: bytes, path: Path, kind: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IdentityFileError(f"{kind} '{path}' is not UTF-8 text") from exc


def _prefixed_lines(text: str, prefix: str, what: str) -> list[str]:
    """The bodies of the ``prefix`` lines of a file form; blank and ``#`` lines skipped.

    :raises ValueError: a line that is none of these.
    """
    found = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith(prefix):
            raise ValueError(f"a line of a {what} file starts with neither # nor {prefix}")
        found.append(line[len(prefix) :])
    return found


# -- revocation lists ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RevocationList:
    """An authority's signed list of the serials and keys it no longer vouches for.

    Decoded and checked for form by :meth:`from_bytes`; its signature is checked when it
    is added to :class:`~stalk.Authorities`. ``issued_at`` orders the lists of one authority:
    a newer one replaces an older one, never the other way round.

    :ivar issuer: the issuing authority's issuer id.
    :ivar issued_at: when it was issued (seconds since 1970, UTC).
    :ivar serials: the serials it revokes.
    :ivar subjects: the keys it revokes (every certificate of its issuer for them).
    """

    version: int
    issuer: bytes
    issued_at: int
    serials: frozenset[int]
    subjects: frozenset[PublicIdentity]
    signature: bytes = field(repr=False)
    encoded: bytes = field(repr=False)

    @property
    def issuer_fingerprint(self) -> str:
        """The issuing authority's fingerprint, ``SHA256:...``."""
        return _sha256_fingerprint(self.issuer)

    @property
    def signed_message(self) -> bytes:
        """What the issuer signed: the context string, then every byte before the signature."""
        return REVOCATIONS_CONTEXT + self.encoded[:-_SIGNATURE_TAIL]

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> RevocationList:
        """Decode a revocation list and check its form (not its signature).

        :raises ~stalk.RevocationListError: not the array of SPEC "Certificates", a value
            out of bounds, not canonical, entries not strictly increasing.
        """
        data = bytes(data)
        value = _unpack(data, RevocationListError, "the revocation list")
        if type(value) is not list or len(value) != _REVOCATION_FIELDS:
            raise RevocationListError(
                f"a revocation list is a msgpack array of {_REVOCATION_FIELDS} elements"
            )
        version, issuer, issued_at, serials, subjects, signature = value
        if type(version) is not int or version != REVOCATIONS_VERSION:
            raise RevocationListError(
                f"revocation list version {_describe(version)} is not {REVOCATIONS_VERSION}"
            )
        if type(issuer) is not bytes or len(issuer) != hashlib.sha256().digest_size:
            raise RevocationListError("revocation list issuer is not a 32-byte fingerprint")
        if not _is_uint(issued_at, MAX_TIME):
            raise RevocationListError("revocation list time is not an integer time")
        if type(serials) is not list or any(not _is_uint(s, MAX_SERIAL) for s in serials):
            raise RevocationListError("revocation list serials are not unsigned 64-bit integers")
        if type(subjects) is not list or any(
            type(k) is not bytes or len(k) != KEY_SIZE for k in subjects
        ):
            raise RevocationListError("revocation list keys are not 32-byte keys")
        if len(serials) + len(subjects) > MAX_REVOKED:
            raise RevocationListError(
                f"a revocation list names at most {MAX_REVOKED} serials and keys"
            )
        if type(signature) is not bytes or len(signature) != _SIGNATURE_SIZE:
            raise RevocationListError(f"revocation list signature is not {_SIGNATURE_SIZE} bytes")
        if _pack(value) != data:
            raise RevocationListError("revocation list is not in its canonical encoding")
        if not _strictly_increasing(serials) or not _strictly_increasing(subjects):
            raise RevocationListError("revocation list entries are not strictly increasing")
        try:
            keys = frozenset(PublicIdentity(k) for k in subjects)
        except ValueError as exc:
            raise RevocationListError(f"revocation list key refused: {exc}") from exc
        return cls(
            version=version,
            issuer=issuer,
            issued_at=issued_at,
            serials=frozenset(serials),
            subjects=keys,
            signature=signature,
            encoded=data,
        )

    def revokes(self, certificate: Certificate) -> bool:
        """Whether this list names ``certificate`` (same issuer, its serial or its key)."""
        return hmac.compare_digest(certificate.issuer, self.issuer) and (
            certificate.serial in self.serials or certificate.subject in self.subjects
        )

    def to_string(self) -> str:
        """The file form: a ``#`` comment block, then the ``stalk-revocations:`` line."""
        return (
            "# stalk revocation list\n"
            f"# issuer:  {self.issuer_fingerprint}\n"
            f"# issued:  {utc_text(self.issued_at)}\n"
            f"# revokes: {len(self.serials)} {plural(len(self.serials), 'serial')}, "
            f"{len(self.subjects)} {plural(len(self.subjects), 'key')}\n"
            f"{REVOCATIONS_PREFIX}{_b64url(self.encoded)}\n"
        )

    @classmethod
    def from_string(cls, text: str) -> RevocationList:
        """Read the file form (see :meth:`to_string`).

        :raises ValueError: not exactly one ``stalk-revocations:`` line, or bad base64url.
        :raises ~stalk.RevocationListError: the list's form.
        """
        found = _prefixed_lines(text, REVOCATIONS_PREFIX, "revocation list")
        if len(found) != 1:
            raise ValueError(f"expected one {REVOCATIONS_PREFIX} line, found {len(found)}")
        return cls.from_bytes(_from_b64url(found[0], "stalk revocation list"))

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the file form to ``path`` (mode 0644, atomically: readers see old or new).

        :raises IdentityFileError: the file exists and ``overwrite`` is false, or writing
            failed.
        """
        path = _expand(path)
        _files.atomic_write(path, self.to_string().encode("ascii"), 0o644, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RevocationList:
        """Read a revocation list file, checked as a trust file (it decides whom we trust).

        :raises IdentityFileError: unreadable, unsafe ownership or permissions, or no
            single list line.
        :raises ~stalk.RevocationListError: the list's form.
        """
        path = _expand(path)
        data, st = _files.read_file(path, "revocation list", limit=_MAX_REVOCATIONS_FILE)
        _check_trust_file(path, st, "revocation list")
        text = _decode_text(data, path, "revocation list")
        try:
            return cls.from_string(text)
        except ValueError as exc:
            raise IdentityFileError(f"revocation list '{path}': {exc}") from exc
        except RevocationListError as exc:
            raise RevocationListError(f"revocation list '{path}': {exc}") from exc


class RevocationFile:
    """A revocation list file whose newest valid version is kept in force in ``authorities``.

    :meth:`changed` is a ``stat`` of the file, cheap enough to run before every
    handshake; :meth:`read` reads and checks it (in a worker thread, for a large list), and
    :meth:`apply` puts what it read in force. A version that cannot be read, is not signed
    by a trusted authority or is older than the list in force changes nothing: a revocation
    is never undone by a damaged, deleted or replayed file.

    :param path: the revocation list file (``~`` expanded).
    :param authorities: where the list is put in force.
    :raises IdentityFileError: the file cannot be read now, or is unsafe.
    :raises ~stalk.RevocationListError: it is malformed or not signed by a trusted
        authority.
    """

    __slots__ = ("_seen", "authorities", "path")

    def __init__(self, path: str | os.PathLike[str], authorities: Authorities) -> None:
        self.path = _expand(path)
        self.authorities = authorities
        self._seen: tuple[int, ...] | None = None
        self.apply(self.read())

    def _stamp(self) -> tuple[int, ...] | None:
        """What identifies this version of the file: a rename or an edit changes it."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def changed(self) -> bool:
        """Whether the file is not the version last read (also: it has gone, or come back)."""
        return self._stamp() != self._seen

    def read(self) -> RevocationList:
        """Read the file as it is now; this version counts as seen even if it fails.

        :raises IdentityFileError: it cannot be read, or is unsafe (see
            :meth:`~stalk.RevocationList.load`).
        :raises ~stalk.RevocationListError: its contents are refused.
        """
        self._seen = self._stamp()
        return RevocationList.load(self.path)

    def apply(self, revocations: RevocationList) -> bool:
        """Put ``revocations`` in force (see :meth:`~stalk.Authorities.add_revocations`).

        :returns: whether it replaced the list in force (``False``: not newer).
        :raises ~stalk.RevocationListError: not signed by a trusted authority.
        """
        return self.authorities.add_revocations(revocations)


def _check_trust_file(path: Path, st: os.stat_result, kind: str) -> None:
    """The checks of SPEC "Trust files": owner, not writable by others, safe directories."""
    _files.check_owner(path, st, kind)
    _files.check_not_writable_by_others(path, st, kind)
    _files.check_directories(path, kind)


# -- trust --------------------------------------------------------------------------------


class CertifiedIdentity(PublicIdentity):
    """A peer's public key that a verified certificate vouches for.

    It is a :class:`~stalk.PublicIdentity` (equal to, and hashing as, the bare key), so
    code that takes keys takes it too; :attr:`certificate` says who the authority says
    the peer is. ``authorize`` hooks receive one when the peer's certificate was verified.
    """

    __slots__ = ("_certificate",)

    _certificate: Certificate

    def __init__(self, raw: bytes | bytearray | memoryview, certificate: Certificate) -> None:
        super().__init__(raw)
        if not hmac.compare_digest(certificate.subject.raw, self.raw):
            raise ValueError("the certificate is for another key")
        object.__setattr__(self, "_certificate", certificate)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.raw, self._certificate))

    @property
    def certificate(self) -> Certificate:
        """The verified certificate: its ``name``, ``groups``..."""
        return self._certificate

    @property
    def name(self) -> str:
        """The certificate's name."""
        return self._certificate.name

    @property
    def groups(self) -> tuple[str, ...]:
        """The certificate's groups."""
        return self._certificate.groups


class Authorities:
    """The authorities we trust, and the revocation lists they issued.

    :meth:`verify` is the one place a certificate is believed. The set of authorities is
    fixed; revocation lists can be added or replaced while it is in use (a listener reloads
    its list when the file changes).

    :param authorities: the trusted authority keys (at least one).
    :param revocations: revocation lists, each signed by one of them.
    :raises ValueError: no authority.
    :raises ~stalk.RevocationListError: a list that is not signed by one of them.
    """

    __slots__ = ("_by_digest", "_revocations", "_signed")

    def __init__(
        self,
        authorities: Iterable[PublicAuthority],
        revocations: Iterable[RevocationList] = (),
    ) -> None:
        self._by_digest: dict[bytes, PublicAuthority] = {}
        for authority in authorities:
            if not isinstance(authority, PublicAuthority):
                raise TypeError(f"expected PublicAuthority, not {type(authority).__name__}")
            self._by_digest[authority.digest] = authority
        if not self._by_digest:
            raise ValueError("Authorities needs at least one authority")
        self._revocations: dict[bytes, RevocationList] = {}
        for revocation in revocations:
            self.add_revocations(revocation)
        #: Certificates whose form, issuer, signature and subject passed, by their exact
        #: bytes, most recent last: a peer that reconnects costs no Ed25519 verification.
        #: Only what one of our authorities signed gets in, and at most SIGNED_CACHE of it.
        self._signed: OrderedDict[bytes, Certificate] = OrderedDict()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Authorities:
        """Read a file of one or more ``stalk-authority:`` lines (``#`` comments allowed).

        Anything after the key on a line, separated by whitespace, is a comment. The file
        is checked as a trust file (SPEC "Trust files").

        :raises IdentityFileError: unreadable, unsafe, or no valid authority key in it.
        """
        path = _expand(path)
        data, st = _files.read_file(path, "authorities file", limit=_MAX_AUTHORITIES_FILE)
        _check_trust_file(path, st, "authorities file")
        text = _decode_text(data, path, "authorities file")
        keys = []
        for number, raw_line in enumerate(text.splitlines(), 1):
            line = raw_line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                keys.append(PublicAuthority.from_string(line.split(maxsplit=1)[0]))
            except ValueError as exc:
                raise IdentityFileError(f"authorities file '{path}', line {number}: {exc}") from exc
        if not keys:
            raise IdentityFileError(f"authorities file '{path}' holds no stalk-authority: key")
        return cls(keys)

    def __iter__(self) -> Iterator[PublicAuthority]:
        return iter(self._by_digest.values())

    def __len__(self) -> int:
        return len(self._by_digest)

    def __contains__(self, authority: object) -> bool:
        return isinstance(authority, PublicAuthority) and authority.digest in self._by_digest

    def __repr__(self) -> str:
        names = ", ".join(a.fingerprint for a in self)
        return f"<{type(self).__name__} {names}>"

    @property
    def revocations(self) -> tuple[RevocationList, ...]:
        """The revocation lists in force, one per authority at most."""
        return tuple(self._revocations.values())

    def _signed_certificate(self, data: bytes) -> Certificate:
        """Checks 1 to 6 of SPEC "Verifying a certificate": what depends on its bytes alone.

        Their result is remembered (a bounded cache keyed by the bytes, which the signature
        covers), so a certificate seen again skips the Ed25519 verification.
        """
        cert = self._signed.get(data)
        if cert is not None:
            self._signed.move_to_end(data)
            return cert
        cert = Certificate.from_bytes(data)
        authority = self._by_digest.get(cert.issuer)
        if authority is None:
            raise UnknownAuthority(
                f"certificate issued by {cert.issuer_fingerprint}, which is not a trusted authority"
            )
        if not authority.verify(cert.signature, cert.signed_message):
            raise BadCertificateSignature(
                f"certificate signature is not {authority.fingerprint}'s: forged or altered"
            )
        for trusted in self:
            if _is_authority_key(cert.subject.raw, trusted):
                raise AuthorityAsSubject(
                    f"certificate subject is the key of authority {trusted.fingerprint}"
                )
        self._signed[data] = cert
        if len(self._signed) > SIGNED_CACHE:
            self._signed.popitem(last=False)
        return cert

    def add_revocations(self, revocations: RevocationList) -> bool:
        """Put ``revocations`` in force, in place of its authority's previous list.

        A list no newer than the one in force (by its ``issued_at``) is
        left out: an old list, replayed, cannot un-revoke anything.

        :returns: whether it replaced the list in force (``False``: it was not newer).
        :raises ~stalk.RevocationListError: its issuer is not one of ours, or its signature
            is not the issuer's.
        """
        authority = self._by_digest.get(revocations.issuer)
        if authority is None:
            raise RevocationListError(
                f"revocation list issued by {revocations.issuer_fingerprint}, which is not a "
                "trusted authority"
            )
        if not authority.verify(revocations.signature, revocations.signed_message):
            raise RevocationListError(f"revocation list signature is not {authority.fingerprint}'s")
        current = self._revocations.get(revocations.issuer)
        if current is not None and revocations.issued_at <= current.issued_at:
            return False
        self._revocations[revocations.issuer] = revocations
        return True

    def verify(
        self,
        certificate: Certificate | bytes,
        *,
        now: float,
        key: PublicIdentity | None = None,
        clock_skew: float = DEFAULT_CLOCK_SKEW,
        names: Iterable[str] | None = None,
        groups: Iterable[str] | None = None,
    ) -> Certificate:
        """Check a certificate; return it if every check passes, else raise why not.

        The checks, in this order (SPEC "Verifying a certificate"): its form (as
        :meth:`~stalk.Certificate.from_bytes`), its issuer, its signature, that its subject is no
        authority's key, its critical extensions, its validity window, revocation, the
        subject key, and the name or groups asked for.

        :param now: the current time, seconds since 1970 UTC.
        :param key: the static key the handshake authenticated: the subject must be it.
        :param clock_skew: seconds of clock difference tolerated at each end of the window.
        :param names: accept only these names (``None``: any).
        :param groups: accept only members of one of these groups (``None``: any). Given
            both, either a name or a group admits.
        :raises ~stalk.CertificateError: the subclass that names the first check failed.
        """
        if isinstance(certificate, Certificate):
            certificate = certificate.encoded
        cert = self._signed_certificate(bytes(certificate))
        for ext in cert.extensions:
            if ext.critical:
                raise CertificateExtensionError(
                    f"certificate has a critical extension {ext.id!r} this verifier does not know"
                )
        # Differences, not sums: exact for integer times, however large.
        if cert.not_before - now > clock_skew:
            raise CertificateNotYetValid(
                f"certificate for {cert.name!r} is not valid before {utc_text(cert.not_before)}"
            )
        if now - cert.not_after >= clock_skew:
            raise CertificateExpired(
                f"certificate for {cert.name!r} expired at {utc_text(cert.not_after)}"
            )
        revocations = self._revocations.get(cert.issuer)
        if revocations is not None and revocations.revokes(cert):
            raise CertificateRevoked(
                f"certificate for {cert.name!r} (serial {cert.serial}) is revoked"
            )
        if key is not None and key != cert.subject:
            raise CertificateKeyMismatch(
                f"certificate for {cert.name!r} is for key {cert.subject.fingerprint}, not "
                f"{key.fingerprint}"
            )
        _check_name(cert, names, groups)
        return cert


def _check_name(
    cert: Certificate, names: Iterable[str] | None, groups: Iterable[str] | None
) -> None:
    """Refuse a certificate whose name and groups match none of those asked for.

    :raises ~stalk.CertificateNameMismatch: neither a name nor a group admits it.
    """
    if names is None and groups is None:
        return
    name_set = frozenset(names or ())
    group_set = frozenset(groups or ())
    if cert.name in name_set or group_set.intersection(cert.groups):
        return
    wanted = [*(repr(n) for n in sorted(name_set)), *(f"group {g!r}" for g in sorted(group_set))]
    raise CertificateNameMismatch(
        f"certificate is for {cert.name!r}"
        + (f" (groups {', '.join(cert.groups)})" if cert.groups else "")
        + f", not {' or '.join(wanted)}"
    )


@dataclass(frozen=True, slots=True)
class CertificatePolicy:
    """What one side of a handshake requires of its peer's certificate (sans-IO).

    :param authorities: whom we trust to sign certificates.
    :param clock: the current time in seconds since 1970 UTC (the anyio layer passes
        ``time.time``; a sans-IO test passes a fixed one).
    :param clock_skew: seconds tolerated at each end of a certificate's validity.
    :param names: accept only these names (``None``: any).
    :param groups: accept only members of one of these groups (``None``: any).
    """

    authorities: Authorities
    clock: Callable[[], float]
    clock_skew: float = DEFAULT_CLOCK_SKEW
    names: frozenset[str] | None = None
    groups: frozenset[str] | None = None

    def check(self, certificate: bytes | None, key: PublicIdentity) -> CertifiedIdentity:
        """The peer's key with its verified certificate.

        :param certificate: what the peer sent in its handshake payload (``None``: none).
        :param key: the static key the handshake authenticated.
        :raises ~stalk.CertificateMissing: no certificate.
        :raises ~stalk.CertificateError: the certificate is refused (see
            :meth:`~stalk.Authorities.verify`).
        """
        if certificate is None:
            raise CertificateMissing("the peer presented no certificate, and one is required")
        cert = self.authorities.verify(
            certificate,
            now=self.clock(),
            key=key,
            clock_skew=self.clock_skew,
            names=self.names,
            groups=self.groups,
        )
        return CertifiedIdentity(key.raw, cert)
