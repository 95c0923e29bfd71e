"""Static identities: X25519 key pairs, their printable form and their key files.

A peer is identified by its static X25519 public key (:class:`PublicIdentity`), in its
canonical encoding only, so that one private key is one identity. Its printable form is
``stalk:`` followed by the 32 raw key bytes in unpadded base64url (43 characters); its
fingerprint is ``SHA256:`` followed by the unpadded standard base64 of the SHA-256 of the
raw key, the convention ssh uses.

Our own key pair is an :class:`Identity`. It is stored as an unencrypted PKCS#8 PEM file
with mode 0600 (readable by ``openssl pkey``), next to a ``.pub`` file holding the
printable public form, like ssh-keygen does.

Nothing in this module ever puts private key material in a ``repr``, ``str`` or exception
message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import shlex
import stat
from pathlib import Path
from typing import NoReturn

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from stalk import _files
from stalk.errors import IdentityFileError

__all__ = ["Identity", "PublicIdentity", "check_public_key", "same_key"]

#: Length in bytes of an X25519 key (public or private).
KEY_SIZE = 32

#: Prefix of the printable form of a public identity.
PREFIX = "stalk:"

#: Length of the unpadded base64url encoding of a 32-byte key.
_B64_LEN = 43
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
_EXPECTED_FORM = f"expected {PREFIX!r} followed by {_B64_LEN} base64url characters, no padding"

#: Key files are tiny (a PKCS#8 X25519 PEM is 119 bytes); refuse to slurp anything big.
_MAX_FILE_SIZE = 64 * 1024

_PUB_SUFFIX = ".pub"


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _as_bytes(raw: bytes | bytearray | memoryview, what: str) -> bytes:
    # bytes(int) would silently build a zero-filled buffer, so check the type first.
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(raw).__name__}")
    data = bytes(raw)
    if len(data) != KEY_SIZE:
        raise ValueError(f"{what} must be exactly {KEY_SIZE} bytes, got {len(data)}")
    return data


def _expand(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.expanduser(os.fspath(path)))


#: The field prime of Curve25519: a canonical u-coordinate is below it.
_P25519 = 2**255 - 19
#: The canonical X25519 u-coordinates of small order: a DH with any of them yields the
#: all-zero secret (RFC 7748 §6.1), so no peer can hold the matching private key. Their
#: other encodings (p, p + 1, and any with bit 255 set) are refused as non-canonical.
_LOW_ORDER = frozenset(
    u.to_bytes(KEY_SIZE, "little")
    for u in (
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _P25519 - 1,
    )
)


def check_public_key(raw: bytes) -> None:
    """Refuse 32 bytes that are not a canonical, usable X25519 public key.

    X25519 ignores bit 255 and reduces u modulo p = 2^255 - 19 (RFC 7748 §5), so an
    encoding with bit 255 set, or with u >= p, is the same DH key as a canonical one:
    accepting it would give one private key several identities. A low-order point gives
    an all-zero shared secret. The message never contains the key.

    :param raw: exactly 32 bytes (the caller checks the length).
    :raises ValueError: the key is non-canonical or of low order.
    """
    u = int.from_bytes(raw, "little")
    if u >> 255:
        raise ValueError(
            "not a canonical X25519 public key: bit 255 is set (X25519 ignores that bit, so "
            "this is a second encoding of the key without it)"
        )
    if u >= _P25519:
        raise ValueError(
            "not a canonical X25519 public key: u >= 2^255-19 (X25519 reduces u modulo "
            "2^255-19, so this is a second encoding of u - (2^255-19))"
        )
    if raw in _LOW_ORDER:
        raise ValueError(
            "not a usable X25519 public key: it is a low-order point, which gives an "
            "all-zero shared secret"
        )


class Immutable:
    """A key object nothing can change once built: its bytes are what it is.

    Subclasses set their slots in ``__init__`` with ``object.__setattr__``.
    """

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable")


class PublicIdentity(Immutable):
    """A peer's static X25519 public key (32 raw bytes). Immutable and hashable.

    Only canonical keys exist (u < 2^255 - 19, bit 255 clear) and low-order points are
    refused, so one private key has exactly one public identity (SPEC "Canonical keys").
    Equality (``==``) is constant-time; ``str()`` gives the printable form.

    :param raw: the 32 raw bytes of the public key (any bytes-like object).
    :raises ValueError: if ``raw`` is not exactly 32 bytes long, not canonical, or a
        low-order point.
    :raises TypeError: if ``raw`` is not bytes-like.
    """

    __slots__ = ("_raw",)

    _raw: bytes

    def __init__(self, raw: bytes | bytearray | memoryview) -> None:
        key = _as_bytes(raw, "a public key")
        check_public_key(key)
        object.__setattr__(self, "_raw", key)

    def __reduce__(self) -> tuple[type[PublicIdentity], tuple[bytes]]:
        return (type(self), (self._raw,))

    def __copy__(self) -> PublicIdentity:
        return self

    def __deepcopy__(self, memo: object) -> PublicIdentity:
        return self

    @property
    def raw(self) -> bytes:
        """The 32 raw bytes of the public key."""
        return self._raw

    @property
    def fingerprint(self) -> str:
        """``SHA256:`` + unpadded standard base64 of SHA-256(raw), as ssh prints it."""
        digest = hashlib.sha256(self._raw).digest()
        return "SHA256:" + base64.b64encode(digest).rstrip(b"=").decode("ascii")

    @classmethod
    def from_string(cls, text: str) -> PublicIdentity:
        """Parse the printable form ``stalk:<43 base64url characters>``.

        Surrounding whitespace is ignored. Only the canonical encoding is accepted: no
        padding, no other alphabet, and re-encoding the key must give the same text.

        :param text: the printable form, as produced by ``str(public_identity)``.
        :raises ValueError: if ``text`` is not a valid printable public identity, or the
            key it encodes is not canonical or is a low-order point.
        :raises TypeError: if ``text`` is not a ``str``.
        """
        if not isinstance(text, str):
            raise TypeError(f"expected str, not {type(text).__name__}")
        text = text.strip()
        # The input is deliberately never echoed: a user may paste a private key by mistake.
        if not text.startswith(PREFIX):
            raise ValueError(f"not a stalk public identity: wrong prefix ({_EXPECTED_FORM})")
        body = text[len(PREFIX) :]
        if "=" in body:
            raise ValueError(f"not a stalk public identity: padding found ({_EXPECTED_FORM})")
        if _B64URL_RE.fullmatch(body) is None:
            raise ValueError(
                f"not a stalk public identity: invalid base64url character ({_EXPECTED_FORM})"
            )
        if len(body) != _B64_LEN:
            raise ValueError(
                f"not a stalk public identity: {len(body)} key characters ({_EXPECTED_FORM})"
            )
        raw = base64.urlsafe_b64decode(body + "=")
        if _b64url(raw) != body:
            raise ValueError(
                f"not a stalk public identity: non-canonical base64url ({_EXPECTED_FORM})"
            )
        return cls(raw)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PublicIdentity:
        """Read a public identity from a file such as the ``.pub`` written by :meth:`Identity.save`.

        The first line that is neither blank nor a ``#`` comment must start with the
        printable form; anything after it on that line (separated by whitespace) is an
        ignored comment, as in ssh public key files. ``~`` is expanded.

        :param path: the file to read.
        :raises IdentityFileError: if the file cannot be read or holds no valid identity.
        """
        path = _expand(path)
        data, _ = _files.read_file(path, "public identity file", limit=_MAX_FILE_SIZE)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IdentityFileError(f"public identity file '{path}' is not UTF-8 text") from exc
        for raw_line in text.splitlines():
            line = raw_line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                return cls.from_string(line.split(maxsplit=1)[0])
            except ValueError as exc:
                raise IdentityFileError(f"public identity file '{path}': {exc}") from exc
        raise IdentityFileError(f"public identity file '{path}' contains no public identity")

    def __str__(self) -> str:
        return PREFIX + _b64url(self._raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicIdentity):
            return NotImplemented
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._raw)


def same_key(a: PublicIdentity, b: PublicIdentity) -> bool:
    """Compare two public identities in constant time.

    :param a: a public identity.
    :param b: another public identity.
    :raises TypeError: if either argument is not a :class:`PublicIdentity`.
    """
    if not isinstance(a, PublicIdentity) or not isinstance(b, PublicIdentity):
        raise TypeError("same_key() compares two PublicIdentity objects")
    return hmac.compare_digest(a.raw, b.raw)


class Identity(Immutable):
    """Our own static X25519 key pair.

    Build one with :meth:`generate`, :meth:`from_private_bytes` or :meth:`load`. The
    private key never appears in ``repr``/``str``, and an identity cannot be pickled
    (use :meth:`save`).

    :param private_key: a ``cryptography`` X25519 private key.
    :raises TypeError: if ``private_key`` is not an ``X25519PrivateKey``.
    """

    __slots__ = ("_key", "_public")

    _key: X25519PrivateKey
    _public: PublicIdentity

    def __init__(self, private_key: X25519PrivateKey) -> None:
        if not isinstance(private_key, X25519PrivateKey):
            raise TypeError(f"expected an X25519PrivateKey, not {type(private_key).__name__}")
        public = PublicIdentity(
            private_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )
        object.__setattr__(self, "_key", private_key)
        object.__setattr__(self, "_public", public)

    def __reduce__(self) -> NoReturn:
        raise TypeError("an Identity cannot be pickled; use Identity.save()")

    def __copy__(self) -> Identity:
        return self

    def __deepcopy__(self, memo: object) -> Identity:
        return self

    @classmethod
    def generate(cls) -> Identity:
        """Generate a new random key pair."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes | bytearray | memoryview) -> Identity:
        """Build an identity from the 32 raw bytes of an X25519 private key.

        :param raw: the raw private key (any bytes-like object).
        :raises ValueError: if ``raw`` is not exactly 32 bytes long.
        :raises TypeError: if ``raw`` is not bytes-like.
        """
        return cls(X25519PrivateKey.from_private_bytes(_as_bytes(raw, "a private key")))

    @property
    def public(self) -> PublicIdentity:
        """Our public identity, the one peers see and pin."""
        return self._public

    def private_bytes(self) -> bytes:
        """Return the raw 32-byte private key.

        This is SECRET: whoever holds it can impersonate us. It exists for the Noise layer;
        never log it, print it or send it anywhere.
        """
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._public} {self._public.fingerprint}>"

    def __eq__(self, other: object) -> bool:
        """Same public key, compared in constant time.

        X25519 clamps the private scalar, so raw private keys that differ only in the
        clamped bits are one key: they have one public key and are equal here.
        """
        if not isinstance(other, Identity):
            return NotImplemented
        return hmac.compare_digest(self._public.raw, other._public.raw)

    def __hash__(self) -> int:
        return hash(self._public)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the private key file and its ``.pub`` companion.

        The private key goes to ``path`` as unencrypted PKCS#8 PEM with mode 0600; the
        printable public form plus a newline goes to ``path + ".pub"`` (mode 0644, less if
        the umask says so). Each file is written to a temporary file in the same directory,
        fsynced and renamed into place, so a crash never leaves a half-written key. Missing
        parent directories are created with mode 0700. ``~`` is expanded.

        :param path: where to write the private key.
        :param overwrite: replace an existing private key file instead of refusing.
        :raises IdentityFileError: if the private key file exists and ``overwrite`` is
            false, or if writing fails.
        """
        path = _expand(path)
        if not path.name:
            raise IdentityFileError(f"identity file path '{path}' names no file")
        pub_path = path.with_name(path.name + _PUB_SUFFIX)
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
        public_line = (str(self._public) + "\n").encode("ascii")
        _files.atomic_write(pub_path, public_line, 0o644, overwrite=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a private key file written by :meth:`save` (or any X25519 PKCS#8 PEM).

        On POSIX systems the file must be owned by us (or root) and not be readable or
        writable by group or others, as ssh requires of its keys; and no directory above
        it, up to ``$HOME`` (or ``/``), may be writable by group or others or owned by
        another user (sticky directories such as ``/tmp`` excepted), as ssh's
        ``StrictModes`` requires of its trust files. ``~`` is expanded.

        :param path: the private key file.
        :raises IdentityFileError: if the file is missing, unreadable, has unsafe
            ownership or permissions (or sits in an unsafe directory), is not an
            unencrypted PEM private key, or is not an X25519 key.
        """
        path = _expand(path)
        data, st = _files.read_file(path, "identity file", limit=_MAX_FILE_SIZE)
        # Checked before the permissions, whose "chmod 600" advice would be wrong here.
        if data.lstrip().startswith(PREFIX.encode("ascii")):
            raise IdentityFileError(
                f"identity file '{path}' holds a public identity, not a private key "
                f"(pass the private key file, not the {_PUB_SUFFIX} file)"
            )
        _files.check_owner(path, st, "identity file")
        perms = stat.S_IMODE(st.st_mode)
        if _files.CHECK_PERMISSIONS and perms & 0o077:
            raise IdentityFileError(
                f"permissions {perms:04o} for '{path}' are too open: a private key file must "
                f"not be accessible by others. Fix it with: chmod 600 {shlex.quote(str(path))}"
            )
        _files.check_directories(path, "identity file")
        if b"-----BEGIN" not in data:
            raise IdentityFileError(f"identity file '{path}' is not a PEM file")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError as exc:
            raise IdentityFileError(
                f"identity file '{path}' is encrypted; stalk needs an unencrypted PKCS#8 "
                f"key (decrypt it with: openssl pkey -in {shlex.quote(str(path))} -out NEWFILE)"
            ) from exc
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise IdentityFileError(
                f"identity file '{path}' does not hold a readable PEM private key"
            ) from exc
        if not isinstance(key, X25519PrivateKey):
            raise IdentityFileError(
                f"identity file '{path}' holds a {type(key).__name__.removesuffix('PrivateKey')}"
                " key, not an X25519 key"
            )
        return cls(key)
