"""Trust: which certificates to believe, and what a handshake requires of one.

:class:`Authorities` is whom we trust and the revocation lists in force, and its
:meth:`~stalk.Authorities.verify` the one place a certificate is believed (SPEC
"Verifying a certificate", in order); :class:`CertifiedIdentity` is a peer's key that a
verified certificate vouches for; :class:`CertificatePolicy` is what one side of a
handshake requires of its peer's certificate.
"""

from __future__ import annotations

import hmac
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from stalk import _files
from stalk.certificates.authority import PublicAuthority, _is_authority_key
from stalk.certificates.certificate import Certificate
from stalk.certificates.encoding import (
    _MAX_AUTHORITIES_FILE,
    DEFAULT_CLOCK_SKEW,
    SIGNED_CACHE,
    _check_trust_file,
    _decode_text,
    _expand,
    utc_text,
)
from stalk.certificates.revocation import RevocationList
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
    IdentityFileError,
    RevocationListError,
    UnknownAuthority,
)
from stalk.identity import PublicIdentity


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
