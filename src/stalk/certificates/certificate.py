"""The certificate format (SPEC "Certificate format"), checked for form, not for trust.

:class:`Certificate` decodes a certificate with every check of form (size first, then
types and bounds, then the one canonical encoding), and reads and writes its file form;
:class:`Extension` is one of its extensions. Whether to believe one is
:class:`~stalk.Authorities`' business.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from stalk import _files
from stalk.certificates.encoding import (
    _CERTIFICATE_FIELDS,
    _MAX_CERTIFICATE_FILE,
    _SIGNATURE_SIZE,
    _SIGNATURE_TAIL,
    CERTIFICATE_CONTEXT,
    CERTIFICATE_PREFIX,
    CERTIFICATE_VERSION,
    MAX_CERTIFICATE_SIZE,
    MAX_EXTENSION_ID_LEN,
    MAX_EXTENSION_VALUE,
    MAX_EXTENSIONS,
    MAX_GROUP_LEN,
    MAX_GROUPS,
    MAX_NAME_LEN,
    MAX_SERIAL,
    MAX_TIME,
    _array_header,
    _b64url,
    _check_text,
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
from stalk.errors import (
    CertificateExtensionError,
    CertificateTooLarge,
    IdentityFileError,
    MalformedCertificate,
    NonCanonicalCertificate,
)
from stalk.identity import KEY_SIZE, PublicIdentity


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
