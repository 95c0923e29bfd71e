"""Revocation lists (SPEC "Revocation lists"): what an authority no longer vouches for.

:class:`RevocationList` is the signed list, checked for form (its signature is checked
when it is put in force, by :class:`~stalk.Authorities`); :class:`RevocationFile` keeps the
newest valid version of a list file in force as the file changes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stalk import _files
from stalk.certificates.certificate import Certificate
from stalk.certificates.encoding import (
    _MAX_REVOCATIONS_FILE,
    _REVOCATION_FIELDS,
    _SIGNATURE_SIZE,
    _SIGNATURE_TAIL,
    MAX_REVOKED,
    MAX_SERIAL,
    MAX_TIME,
    REVOCATIONS_CONTEXT,
    REVOCATIONS_PREFIX,
    REVOCATIONS_VERSION,
    _b64url,
    _check_trust_file,
    _decode_text,
    _describe,
    _expand,
    _from_b64url,
    _is_uint,
    _pack,
    _prefixed_lines,
    _sha256_fingerprint,
    _strictly_increasing,
    _unpack,
    utc_text,
)
from stalk.errors import IdentityFileError, RevocationListError
from stalk.identity import KEY_SIZE, PublicIdentity
from stalk.summary import plural

if TYPE_CHECKING:  # trust.py imports this module: only the type goes the other way
    from stalk.certificates.trust import Authorities


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
