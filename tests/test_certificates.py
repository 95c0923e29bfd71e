"""Tests for stalk.certificates: authorities, the certificate format, verification, revocation.

Every hostile certificate of SPEC "Certificates" has its own test here, built byte by byte
and (where it must get past the signature check) signed by a real authority, so that each
is refused for its own reason, with its own error class.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from stalk.certificates import (
    CERTIFICATE_CONTEXT,
    MAX_CERTIFICATE_SIZE,
    MAX_EXTENSION_VALUE,
    MAX_GROUP_LEN,
    MAX_GROUPS,
    MAX_NAME_LEN,
    REVOCATIONS_CONTEXT,
    SIGNED_CACHE,
    Authorities,
    Authority,
    Certificate,
    CertificatePolicy,
    CertifiedIdentity,
    Extension,
    PublicAuthority,
    RevocationList,
    _montgomery,
)
from stalk.errors import (
    AuthorityAsSubject,
    BadCertificateSignature,
    CertificateError,
    CertificateExpired,
    CertificateExtensionError,
    CertificateKeyMismatch,
    CertificateMissing,
    CertificateNameMismatch,
    CertificateNotYetValid,
    CertificateRevoked,
    CertificateTooLarge,
    HandshakeFailed,
    IdentityFileError,
    MalformedCertificate,
    NonCanonicalCertificate,
    RevocationListError,
    UnknownAuthority,
)
from stalk.identity import Identity, PublicIdentity
from stalk.wire import CloseCode

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")

NOW = 1_750_000_000
AUTHORITY = Authority.from_private_bytes(bytes(range(32)))
OTHER_AUTHORITY = Authority.from_private_bytes(bytes(range(1, 33)))
SUBJECT = Identity.from_private_bytes(bytes(range(100, 132)))
STRANGER = Identity.from_private_bytes(bytes(range(140, 172)))
TRUST = Authorities([AUTHORITY.public])


@pytest.fixture(autouse=True)
def _umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def issue(**kwargs: Any) -> Certificate:
    """A certificate for SUBJECT from AUTHORITY, valid around NOW, with overrides."""
    args: dict[str, Any] = {
        "subject": SUBJECT.public,
        "name": "db-1",
        "groups": ["db", "ops"],
        "not_before": NOW - 60,
        "not_after": NOW + 3600,
        "serial": 7,
    }
    args.update(kwargs)
    authority: Authority = args.pop("authority", AUTHORITY)
    return authority.sign(**args)


class Raw(bytes):
    """A field placed in a forged certificate as it is (already msgpack)."""


def pack(value: object) -> bytes:
    return bytes(value) if isinstance(value, Raw) else msgpack.packb(value, use_bin_type=True)


def forge(authority: Authority = AUTHORITY, /, **overrides: Any) -> bytes:
    """A certificate built field by field and signed: any field can be made hostile.

    The signature is genuine, so whatever is wrong with it is wrong on purpose and is
    found by its own check, not by the signature's.
    """
    fields: dict[str, Any] = {
        "version": 1,
        "serial": 7,
        "subject": SUBJECT.public.raw,
        "name": "db-1",
        "groups": ["db", "ops"],
        "not_before": NOW - 60,
        "not_after": NOW + 3600,
        "issuer": authority.public.digest,
        "extensions": [],
    }
    header: bytes = overrides.pop("header", b"\x9a")
    fields.update(overrides)
    body = header + b"".join(pack(value) for value in fields.values())
    return body + pack(authority.sign_bytes(CERTIFICATE_CONTEXT, body))


def verify(data: Certificate | bytes, **kwargs: Any) -> Certificate:
    args: dict[str, Any] = {"now": NOW, "key": SUBJECT.public}
    args.update(kwargs)
    trust: Authorities = args.pop("trust", TRUST)
    return trust.verify(data, **args)


# -- authorities ------------------------------------------------------------------------


def test_authority_public_form_round_trips() -> None:
    text = str(AUTHORITY.public)
    assert text.startswith("stalk-authority:")
    assert len(text) == len("stalk-authority:") + 43
    assert PublicAuthority.from_string(f"  {text}\n") == AUTHORITY.public
    assert AUTHORITY.public.fingerprint.startswith("SHA256:")
    assert len(AUTHORITY.public.fingerprint) == len("SHA256:") + 43
    assert AUTHORITY.public != OTHER_AUTHORITY.public
    assert hash(PublicAuthority(AUTHORITY.public.raw)) == hash(AUTHORITY.public)
    assert pickle.loads(pickle.dumps(AUTHORITY.public)) == AUTHORITY.public


@pytest.mark.parametrize(
    "text",
    [
        "stalk:" + "A" * 43,  # a stalk key is not an authority key
        "stalk-authority:" + "A" * 42,
        "stalk-authority:" + "A" * 43 + "=",
        "stalk-authority:" + "+" * 43,
        "stalk-authority:" + "A" * 42 + "B",  # unused bits set: not canonical
        "stalk-authority:" + "_" * 43,  # y >= 2^255 - 19
        "",
    ],
)
def test_authority_public_form_refuses_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match="authority key"):
        PublicAuthority.from_string(text)


def test_authority_never_shows_or_pickles_its_private_key() -> None:
    seed = bytes(range(32))
    assert seed.hex() not in repr(AUTHORITY)
    assert str(AUTHORITY.public) in repr(AUTHORITY)
    with pytest.raises(TypeError):
        pickle.dumps(AUTHORITY)


def test_authority_signs_only_certificates_and_revocation_lists() -> None:
    with pytest.raises(ValueError, match="certificates and revocation lists"):
        AUTHORITY.sign_bytes(b"anything else", b"message")


def test_authority_files_round_trip_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "ca" / "authority"
    authority = Authority.generate()
    authority.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (tmp_path / "ca" / "authority.pub").read_text() == f"{authority.public}\n"
    assert Authority.load(path).public == authority.public
    assert b"BEGIN PRIVATE KEY" in path.read_bytes()
    with pytest.raises(IdentityFileError, match="already exists"):
        authority.save(path)


@posix_only
def test_authority_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "authority"
    Authority.generate().save(path)
    path.chmod(0o640)
    with pytest.raises(IdentityFileError, match="chmod 600"):
        Authority.load(path)


def test_authority_file_refuses_a_public_key_and_other_key_types(tmp_path: Path) -> None:
    Authority.generate().save(tmp_path / "authority")
    with pytest.raises(IdentityFileError, match="public authority key"):
        Authority.load(tmp_path / "authority.pub")
    Identity.generate().save(tmp_path / "identity")  # X25519: a stalk identity
    with pytest.raises(IdentityFileError, match="not hold an Ed25519 key"):
        Authority.load(tmp_path / "identity")


def test_authorities_file_holds_several_keys_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "authorities"
    path.write_text(f"# our authorities\n\n{AUTHORITY.public} main\n  {OTHER_AUTHORITY.public}\n")
    trust = Authorities.load(path)
    assert list(trust) == [AUTHORITY.public, OTHER_AUTHORITY.public]
    assert AUTHORITY.public in trust
    assert len(trust) == 2


@pytest.mark.parametrize(
    ("text", "match"),
    [("# nothing\n", "holds no"), ("stalk:" + "A" * 43 + "\n", "line 1")],
)
def test_authorities_file_without_a_valid_key_is_refused(
    tmp_path: Path, text: str, match: str
) -> None:
    path = tmp_path / "authorities"
    path.write_text(text)
    with pytest.raises(IdentityFileError, match=match):
        Authorities.load(path)


@posix_only
def test_authorities_file_writable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "authorities"
    path.write_text(f"{AUTHORITY.public}\n")
    path.chmod(0o664)
    with pytest.raises(IdentityFileError, match="chmod go-w"):
        Authorities.load(path)


def test_authorities_needs_one_authority() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Authorities([])


# -- the format -----------------------------------------------------------------------


def test_certificate_round_trips_through_bytes_and_file_form(tmp_path: Path) -> None:
    cert = issue(groups=["ops", "db", "ops"])
    assert cert.groups == ("db", "ops")  # a set: sorted, once each
    assert Certificate.from_bytes(cert.to_bytes()) == cert
    assert Certificate.from_string(cert.to_string()) == cert
    cert.save(tmp_path / "db-1.cert")
    assert Certificate.load(tmp_path / "db-1.cert") == cert
    text = cert.to_string()
    assert "# name:       db-1\n" in text
    assert f"# subject:    {SUBJECT.public}\n" in text
    assert text.splitlines()[-1].startswith("stalk-certificate:")
    assert cert.issuer_fingerprint == AUTHORITY.public.fingerprint
    assert "db-1" in repr(cert)


def test_certificate_file_comments_are_not_trusted() -> None:
    """Only the certificate line counts: editing the comment block changes nothing."""
    cert = issue()
    edited = cert.to_string().replace("# name:       db-1", "# name:       root")
    assert Certificate.from_string(edited).name == "db-1"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("# nothing here\n", "found 0"),
        ("stalk-certificate:AAAA\nstalk-certificate:AAAA\n", "found 2"),
        ("some other line\n", "starts with neither"),
        ("stalk-certificate:not*base64\n", "base64url"),
    ],
)
def test_certificate_file_form_refuses_anything_else(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Certificate.from_string(text)


def test_certificate_spec_layout() -> None:
    """The bytes are SPEC's: a 10-element array, the signature covering all before it."""
    cert = issue(serial=1, groups=[])
    data = cert.to_bytes()
    assert data[0] == 0x9A
    assert data[1] == 0x01  # version 1
    assert data[2] == 0x01  # serial 1
    assert data[3:5] == b"\xc4\x20"
    assert data[5:37] == SUBJECT.public.raw
    assert data[37:42] == b"\xa4db-1"
    assert data[42] == 0x90  # no groups
    assert data[-66:-64] == b"\xc4\x40"
    message = CERTIFICATE_CONTEXT + data[:-66]
    AUTHORITY.public._key.verify(data[-64:], message)  # raises if not


def test_sign_checks_every_field() -> None:
    with pytest.raises(ValueError, match="visible ASCII"):
        issue(name="db 1")
    with pytest.raises(ValueError, match="visible ASCII"):
        issue(name="x" * (MAX_NAME_LEN + 1))
    with pytest.raises(ValueError, match="visible ASCII"):
        issue(groups=["g" * (MAX_GROUP_LEN + 1)])
    with pytest.raises(ValueError, match="at most"):
        issue(groups=[f"g{i}" for i in range(MAX_GROUPS + 1)])
    with pytest.raises(TypeError, match="not one str"):
        issue(groups="ops")
    with pytest.raises(ValueError, match="later than"):
        issue(not_before=NOW, not_after=NOW)
    with pytest.raises(ValueError, match="serial"):
        issue(serial=-1)
    with pytest.raises(ValueError, match="distinct"):
        issue(extensions=[Extension("x", False), Extension("x", True)])
    with pytest.raises(ValueError, match="at most 256"):
        Extension("x", False, b"v" * (MAX_EXTENSION_VALUE + 1))


def test_sign_refuses_the_authoritys_own_key_as_subject() -> None:
    own = PublicIdentity(_montgomery(AUTHORITY.public.raw) or b"")
    with pytest.raises(ValueError, match="own key"):
        issue(subject=own)


def test_the_largest_certificate_the_format_allows_fits_the_size_bound() -> None:
    cert = issue(
        serial=2**64 - 1,
        name="n" * MAX_NAME_LEN,
        groups=[f"{i:02d}" + "g" * (MAX_GROUP_LEN - 2) for i in range(MAX_GROUPS)],
        not_before=2**63 - 2,
        not_after=2**63 - 1,
        extensions=[Extension(f"{i}" + "e" * 31, False, b"v" * 256) for i in range(4)],
    )
    assert len(cert.to_bytes()) == 2_021 <= MAX_CERTIFICATE_SIZE


# Hypothesis: the canonical encoding ------------------------------------------------------

_visible = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)
_fields = st.fixed_dictionaries(
    {
        "serial": st.integers(0, 2**64 - 1),
        "name": _visible.filter(lambda s: len(s) <= MAX_NAME_LEN),
        "groups": st.lists(
            _visible.filter(lambda s: len(s) <= MAX_GROUP_LEN), max_size=MAX_GROUPS, unique=True
        ),
        "not_before": st.integers(0, 2**63 - 2),
        "span": st.integers(1, 2**40),
        "extensions": st.lists(
            st.builds(
                Extension,
                _visible.filter(lambda s: len(s) <= 32),
                st.booleans(),
                st.binary(max_size=MAX_EXTENSION_VALUE),
            ),
            max_size=4,
            unique_by=lambda e: e.id,
        ),
    }
)


@settings(max_examples=150, deadline=None)
@given(_fields)
def test_every_certificate_has_one_encoding(fields: dict[str, Any]) -> None:
    not_after = min(fields["not_before"] + fields.pop("span"), 2**63 - 1)
    cert = issue(**fields, not_after=not_after)
    data = cert.to_bytes()
    decoded = Certificate.from_bytes(data)
    assert decoded == cert
    assert decoded.to_bytes() == data
    value = msgpack.unpackb(data, raw=False)
    assert msgpack.packb(value, use_bin_type=True) == data  # decode, re-encode: same bytes
    critical = any(e.critical for e in cert.extensions)
    if not critical:
        assert verify(cert, now=cert.not_before, names=None) == cert


def _wider(value: int) -> list[bytes]:
    """Every msgpack encoding of a non-negative ``value`` longer than the shortest."""
    forms = [(0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)]
    shortest = len(msgpack.packb(value))
    return [
        bytes([tag]) + value.to_bytes(size, "big")
        for tag, size in forms
        if value < 1 << (8 * size) and 1 + size > shortest
    ]


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["version", "serial", "not_before", "not_after"]),
    st.integers(0, 2**32),
    st.data(),
)
def test_a_longer_encoding_of_any_integer_is_refused(
    name: str, base: int, data: st.DataObject
) -> None:
    values = {"version": 1, "serial": base, "not_before": base, "not_after": base + 3600}
    forms = _wider(values[name])
    if not forms:
        return
    form = data.draw(st.sampled_from(forms))
    cert = forge(**{k: v for k, v in values.items() if k != name}, **{name: Raw(form)})
    with pytest.raises(NonCanonicalCertificate):
        Certificate.from_bytes(cert)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_no_single_byte_change_is_ever_accepted(data: st.DataObject) -> None:
    cert = issue().to_bytes()
    index = data.draw(st.integers(0, len(cert) - 1))
    flip = data.draw(st.integers(1, 255))
    changed = cert[:index] + bytes([cert[index] ^ flip]) + cert[index + 1 :]
    with pytest.raises(CertificateError):
        verify(changed)


# -- verification: a good certificate, and the window -------------------------------------


def test_a_valid_certificate_verifies() -> None:
    cert = issue()
    assert verify(cert) == cert
    assert verify(cert.to_bytes()) == cert
    assert verify(cert, key=None) == cert  # no key to compare: checked all the same else


def test_validity_window_and_clock_skew_boundaries() -> None:
    cert = issue(not_before=NOW, not_after=NOW + 100)
    assert verify(cert, now=NOW - 10, clock_skew=10)
    with pytest.raises(CertificateNotYetValid):
        verify(cert, now=NOW - 10.5, clock_skew=10)
    assert verify(cert, now=NOW + 109.5, clock_skew=10)
    with pytest.raises(CertificateExpired):
        verify(cert, now=NOW + 110, clock_skew=10)
    with pytest.raises(CertificateExpired):
        verify(cert, now=NOW + 100, clock_skew=0)


def test_names_and_groups_each_admit() -> None:
    cert = issue(name="db-1", groups=["db", "ops"])
    assert verify(cert, names=["db-1"])
    assert verify(cert, groups=["ops"])
    assert verify(cert, names=["web"], groups=["db"])  # either admits
    assert verify(cert, names=["web", "db-1"])


# -- verification: every hostile certificate, each with its own error -------------------------


def test_expired() -> None:
    with pytest.raises(CertificateExpired, match="expired"):
        verify(issue(not_before=NOW - 7200, not_after=NOW - 3600))


def test_not_yet_valid() -> None:
    with pytest.raises(CertificateNotYetValid, match="not valid before"):
        verify(issue(not_before=NOW + 3600, not_after=NOW + 7200))


def test_unknown_authority() -> None:
    with pytest.raises(UnknownAuthority, match=OTHER_AUTHORITY.public.fingerprint):
        verify(issue(authority=OTHER_AUTHORITY))


def test_bad_signature() -> None:
    data = bytearray(issue().to_bytes())
    data[-1] ^= 1
    with pytest.raises(BadCertificateSignature):
        verify(bytes(data))


def test_signature_of_another_authority_under_our_issuer() -> None:
    """Claiming our authority as issuer does not help a signature made by another."""
    forged = forge(OTHER_AUTHORITY, issuer=AUTHORITY.public.digest)
    with pytest.raises(BadCertificateSignature):
        verify(forged)


@pytest.mark.parametrize(
    "field",
    ["name", "groups", "not_after", "serial", "subject"],
)
def test_tampered_field(field: str) -> None:
    """A field changed after signing (the rest, signature included, kept) is refused."""
    good = issue().to_bytes()
    changes: dict[str, Any] = {
        "name": "db-2",
        "groups": ["admin", "db", "ops"],
        "not_after": NOW + 10**6,
        "serial": 8,
        "subject": STRANGER.public.raw,
    }
    tampered = forge(**{field: changes[field]})[:-66] + good[-66:]
    with pytest.raises(BadCertificateSignature):
        verify(tampered, key=None)


def test_wrong_key() -> None:
    """A valid certificate replayed by someone who does not hold its key."""
    with pytest.raises(CertificateKeyMismatch, match=SUBJECT.public.fingerprint):
        verify(issue(), key=STRANGER.public)


def test_revoked_by_serial_and_by_key() -> None:
    cert = issue()
    by_serial = Authorities([AUTHORITY.public], [AUTHORITY.revoke([7], issued_at=NOW)])
    with pytest.raises(CertificateRevoked, match="serial 7"):
        verify(cert, trust=by_serial)
    by_key = Authorities(
        [AUTHORITY.public], [AUTHORITY.revoke(subjects=[SUBJECT.public], issued_at=NOW)]
    )
    with pytest.raises(CertificateRevoked):
        verify(cert, trust=by_key)
    other = Authorities([AUTHORITY.public], [AUTHORITY.revoke([8], issued_at=NOW)])
    assert verify(cert, trust=other)


def test_revocation_applies_to_its_own_authoritys_certificates_only() -> None:
    trust = Authorities(
        [AUTHORITY.public, OTHER_AUTHORITY.public], [OTHER_AUTHORITY.revoke([7], issued_at=NOW)]
    )
    assert verify(issue(), trust=trust)
    with pytest.raises(CertificateRevoked):
        verify(issue(authority=OTHER_AUTHORITY), trust=trust)


def test_wrong_name() -> None:
    with pytest.raises(CertificateNameMismatch, match=r"'db-1'.*not 'web-1'"):
        verify(issue(), names=["web-1"])


def test_wrong_group() -> None:
    with pytest.raises(CertificateNameMismatch, match="group 'admin'"):
        verify(issue(), groups=["admin"])


def test_duplicate_extension() -> None:
    ext = ["x-note", False, b"1"]
    with pytest.raises(CertificateExtensionError, match="more than once"):
        verify(forge(extensions=[ext, ext]))


def test_unknown_critical_extension() -> None:
    with pytest.raises(CertificateExtensionError, match="critical extension 'x-policy'"):
        verify(issue(extensions=[Extension("x-policy", True, b"deny")]))


def test_unknown_non_critical_extension_is_ignored() -> None:
    cert = issue(extensions=[Extension("x-note", False, b"hello")])
    assert verify(cert).extensions == (Extension("x-note", False, b"hello"),)


def test_oversize() -> None:
    oversize = forge(name="n" * 3000)
    assert len(oversize) > MAX_CERTIFICATE_SIZE
    with pytest.raises(CertificateTooLarge, match="larger than 2048"):
        verify(oversize)


def test_oversize_is_refused_before_decoding() -> None:
    with pytest.raises(CertificateTooLarge):
        verify(b"\xc1" * (MAX_CERTIFICATE_SIZE + 1))  # not even msgpack


@pytest.mark.parametrize(
    ("field", "form"),
    [
        ("version", b"\xcc\x01"),
        ("serial", b"\xcd\x00\x07"),
        ("name", b"\xd9\x04db-1"),  # str8 for a fixstr
        ("subject", b"\xc5\x00\x20" + SUBJECT.public.raw),  # bin16 for a bin8
        ("groups", b"\xdc\x00\x02\xa2db\xa3ops"),  # array16 for a fixarray
    ],
)
def test_non_canonical_encoding(field: str, form: bytes) -> None:
    with pytest.raises(NonCanonicalCertificate, match="canonical"):
        verify(forge(**{field: Raw(form)}))


def test_non_canonical_array_header() -> None:
    with pytest.raises(NonCanonicalCertificate):
        verify(forge(header=b"\xdc\x00\x0a"))


@pytest.mark.parametrize("groups", [["ops", "db"], ["db", "db"]])
def test_groups_out_of_order_or_repeated(groups: list[str]) -> None:
    with pytest.raises(NonCanonicalCertificate, match="sorted"):
        verify(forge(groups=groups))


def test_extensions_out_of_order() -> None:
    exts = [["b", False, b""], ["a", False, b""]]
    with pytest.raises(NonCanonicalCertificate, match="sorted"):
        verify(forge(extensions=exts))


def _authority_with_x25519_compatible_key() -> Authority:
    """An authority whose Ed25519 key bytes happen to be a canonical X25519 key too."""
    for seed in range(256):
        authority = Authority.from_private_bytes(bytes([seed]) * 32)
        try:
            PublicIdentity(authority.public.raw)
        except ValueError:
            continue
        return authority
    raise AssertionError("no such key in 256 tries")  # pragma: no cover


def test_authority_key_as_subject_in_its_own_bytes() -> None:
    authority = _authority_with_x25519_compatible_key()
    forged = forge(authority, subject=authority.public.raw)
    with pytest.raises(AuthorityAsSubject, match=authority.public.fingerprint):
        verify(forged, trust=Authorities([authority.public]), key=None)


def test_authority_key_as_subject_in_its_x25519_form() -> None:
    converted = _montgomery(AUTHORITY.public.raw)
    assert converted is not None
    with pytest.raises(AuthorityAsSubject):
        verify(forge(subject=converted), key=None)


def test_another_trusted_authoritys_key_as_subject() -> None:
    converted = _montgomery(OTHER_AUTHORITY.public.raw)
    assert converted is not None
    trust = Authorities([AUTHORITY.public, OTHER_AUTHORITY.public])
    with pytest.raises(AuthorityAsSubject, match=OTHER_AUTHORITY.public.fingerprint):
        verify(forge(subject=converted), trust=trust, key=None)


def test_montgomery_form_is_the_x25519_key_of_the_same_private_key() -> None:
    """The conversion the check relies on: one seed, one key in both forms (RFC 7748)."""
    seed = bytes(range(32))
    ed = Ed25519PrivateKey.from_private_bytes(seed)
    ed_public = ed.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    scalar = bytearray(hashlib.sha512(seed).digest()[:32])
    x25519 = Identity.from_private_bytes(bytes(scalar))
    assert _montgomery(ed_public) == x25519.public.raw


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (msgpack.packb({"version": 1}), "array of 10"),
        (msgpack.packb([1, 2, 3]), "array of 10"),
        (b"", "msgpack"),
        (b"\x9a", "msgpack"),
        (issue().to_bytes() + b"\x00", "msgpack"),
    ],
)
def test_malformed(data: bytes, match: str) -> None:
    with pytest.raises(MalformedCertificate, match=match):
        verify(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", 2),
        ("version", True),
        ("serial", -1),
        ("subject", b"\x00" * 31),
        ("subject", b"\x00" * 32),  # a low-order point
        ("name", ""),
        ("name", "a b"),
        ("name", b"db-1"),
        ("groups", ["\x1b[31m"]),
        ("not_before", NOW + 3600),  # not before < not after
        ("not_after", 2**63),
        ("issuer", b"\x00" * 20),
        ("extensions", [["x", 1, b""]]),
        ("extensions", [["x", False]]),
        ("extensions", [[f"e{i}", False, b""] for i in range(5)]),
        ("groups", 1.5),
    ],
)
def test_malformed_field(field: str, value: object) -> None:
    with pytest.raises(MalformedCertificate):
        verify(forge(**{field: value}))


def test_every_certificate_error_is_a_refused_handshake_with_its_code() -> None:
    for error in (CertificateExpired, BadCertificateSignature, CertificateMissing):
        assert issubclass(error, CertificateError)
        assert issubclass(error, HandshakeFailed)
        assert error.close_code == CloseCode.CERTIFICATE_REFUSED
    assert int(CloseCode.CERTIFICATE_REFUSED) == 13


# -- revocation lists -----------------------------------------------------------------------


def test_revocation_list_round_trips(tmp_path: Path) -> None:
    revocations = AUTHORITY.revoke([9, 3, 3], [SUBJECT.public], issued_at=NOW)
    assert revocations.serials == {3, 9}
    assert revocations.subjects == {SUBJECT.public}
    assert RevocationList.from_bytes(revocations.encoded) == revocations
    assert RevocationList.from_string(revocations.to_string()) == revocations
    revocations.save(tmp_path / "revoked")
    assert RevocationList.load(tmp_path / "revoked") == revocations
    assert "2 serials, 1 key" in revocations.to_string()
    assert revocations.signed_message.startswith(REVOCATIONS_CONTEXT)


def test_revocation_list_signed_by_a_stranger_is_refused() -> None:
    with pytest.raises(RevocationListError, match="not a trusted authority"):
        Authorities([AUTHORITY.public], [OTHER_AUTHORITY.revoke([1], issued_at=NOW)])


def test_revocation_list_with_a_bad_signature_is_refused() -> None:
    data = bytearray(AUTHORITY.revoke([1], issued_at=NOW).encoded)
    data[-1] ^= 1
    with pytest.raises(RevocationListError, match="signature"):
        Authorities([AUTHORITY.public], [RevocationList.from_bytes(bytes(data))])


def test_tampered_revocation_list_is_refused() -> None:
    """Dropping a serial from a signed list breaks its signature."""
    signed = AUTHORITY.revoke([1, 2], issued_at=NOW).encoded
    body = b"\x96" + b"".join(
        msgpack.packb(v, use_bin_type=True) for v in [1, AUTHORITY.public.digest, NOW, [1], []]
    )
    with pytest.raises(RevocationListError, match="signature"):
        Authorities([AUTHORITY.public], [RevocationList.from_bytes(body + signed[-66:])])


def test_an_older_revocation_list_does_not_replace_a_newer_one() -> None:
    trust = Authorities([AUTHORITY.public], [AUTHORITY.revoke([7], issued_at=NOW)])
    assert not trust.add_revocations(AUTHORITY.revoke([], issued_at=NOW - 1))
    assert not trust.add_revocations(AUTHORITY.revoke([], issued_at=NOW))
    with pytest.raises(CertificateRevoked):
        verify(issue(), trust=trust)
    assert trust.add_revocations(AUTHORITY.revoke([], issued_at=NOW + 1))
    assert verify(issue(), trust=trust)


@pytest.mark.parametrize(
    "value",
    [
        [1, b"\x00" * 32, NOW, [2, 1], []],  # serials out of order
        [1, b"\x00" * 32, NOW, [1, 1], []],  # repeated
        [2, b"\x00" * 32, NOW, [], []],  # version
        [1, b"\x00" * 32, NOW, [-1], []],
        [1, b"\x00" * 32, NOW, [], [b"\x01" * 31]],
    ],
)
def test_malformed_revocation_list(value: list[Any]) -> None:
    body = b"\x96" + b"".join(msgpack.packb(v, use_bin_type=True) for v in value)
    with pytest.raises(RevocationListError):
        RevocationList.from_bytes(body + msgpack.packb(b"\x00" * 64, use_bin_type=True))


def test_non_canonical_revocation_list() -> None:
    good = AUTHORITY.revoke([1], issued_at=NOW).encoded
    assert good[1] == 0x01
    with pytest.raises(RevocationListError, match="canonical"):
        RevocationList.from_bytes(good[:1] + b"\xcc\x01" + good[2:])


# -- the handshake's policy ------------------------------------------------------------------


def test_policy_returns_the_peer_key_with_its_certificate() -> None:
    cert = issue()
    policy = CertificatePolicy(TRUST, clock=lambda: NOW, names=frozenset({"db-1"}))
    peer = policy.check(cert.to_bytes(), SUBJECT.public)
    assert isinstance(peer, CertifiedIdentity)
    assert peer == SUBJECT.public
    assert hash(peer) == hash(SUBJECT.public)
    assert peer.certificate == cert
    assert (peer.name, peer.groups) == ("db-1", ("db", "ops"))
    assert pickle.loads(pickle.dumps(peer)).certificate == cert
    with pytest.raises(ValueError, match="another key"):
        CertifiedIdentity(STRANGER.public.raw, cert)


def test_policy_requires_a_certificate() -> None:
    policy = CertificatePolicy(TRUST, clock=lambda: NOW)
    with pytest.raises(CertificateMissing):
        policy.check(None, SUBJECT.public)


def test_policy_uses_its_clock_and_skew() -> None:
    cert = issue(not_before=NOW, not_after=NOW + 10)
    late = CertificatePolicy(TRUST, clock=lambda: NOW + 15, clock_skew=0)
    with pytest.raises(CertificateExpired):
        late.check(cert.to_bytes(), SUBJECT.public)
    tolerant = CertificatePolicy(TRUST, clock=lambda: NOW + 15, clock_skew=10)
    assert tolerant.check(cert.to_bytes(), SUBJECT.public).name == "db-1"


# -- SPEC.md ---------------------------------------------------------------------------------


def test_spec_worked_example() -> None:
    """SPEC "Certificates", "Worked example": every value, and the bytes, as printed there."""
    spec = (Path(__file__).parents[1] / "SPEC.md").read_text("utf-8")
    section = spec[spec.index("## 25. Certificates") :]
    example = section[section.index("### Worked example") :]
    authority = Authority.from_private_bytes(bytes(range(32)))
    subject = Identity.from_private_bytes(bytes(range(32))).public
    assert f"`{authority.public.raw.hex()}`" in example
    assert f"`{authority.public}`" in example
    assert f"`{authority.public.fingerprint}`" in example
    assert f"`{authority.public.digest.hex()}`" in example
    cert = authority.sign(
        subject, "db-1", ["db", "ops"], not_before=1_750_000_000, not_after=1_750_086_400, serial=1
    )
    blocks = example.split("```")
    annotated = blocks[1]
    hex_text = "".join(line[:42].replace(" ", "") for line in annotated.strip().splitlines())
    assert bytes.fromhex(hex_text) == cert.to_bytes()
    assert len(cert.to_bytes()) == 161
    assert blocks[3].strip() == cert.to_string().splitlines()[-1]
    revocations = authority.revoke([1], issued_at=1_750_003_600)
    assert bytes.fromhex("".join(blocks[5].split())) == revocations.encoded
    trust = Authorities([authority.public], [revocations])
    with pytest.raises(CertificateRevoked):
        trust.verify(cert, now=1_750_000_000, key=subject)


# -- the cache of verified signatures -------------------------------------------------------------


def test_a_certificate_seen_again_costs_no_signature_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trust = Authorities([AUTHORITY.public])
    checks: list[bytes] = []
    original = PublicAuthority.verify

    def counting(self: PublicAuthority, signature: bytes, message: bytes) -> bool:
        checks.append(signature)
        return original(self, signature, message)

    monkeypatch.setattr(PublicAuthority, "verify", counting)
    cert = issue()
    for _ in range(3):
        assert verify(cert, trust=trust) == cert
    assert len(checks) == 1


def test_what_the_cache_holds_is_still_checked_for_time_revocation_key_and_name() -> None:
    trust = Authorities([AUTHORITY.public])
    cert = issue()
    assert verify(cert, trust=trust)
    with pytest.raises(CertificateExpired):
        verify(cert, trust=trust, now=NOW + 10**6)
    with pytest.raises(CertificateKeyMismatch):
        verify(cert, trust=trust, key=STRANGER.public)
    with pytest.raises(CertificateNameMismatch):
        verify(cert, trust=trust, names=["other"])
    trust.add_revocations(AUTHORITY.revoke([cert.serial], issued_at=NOW))
    with pytest.raises(CertificateRevoked):
        verify(cert, trust=trust)


def test_the_cache_is_bounded_and_holds_only_signed_certificates() -> None:
    trust = Authorities([AUTHORITY.public])
    for serial in range(SIGNED_CACHE + 10):
        verify(issue(serial=serial), trust=trust)
    assert len(trust._signed) == SIGNED_CACHE
    for hostile in (_flip(issue().to_bytes()), issue(authority=OTHER_AUTHORITY).to_bytes()):
        with pytest.raises(CertificateError):
            verify(hostile, trust=trust)
        assert hostile not in trust._signed


def _flip(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def test_authorities_keys_are_immutable() -> None:
    """As identities are: nothing set or deleted after construction, and no ``__dict__``."""
    authority = Authority.generate()
    public = authority.public
    keys: list[tuple[Authority | PublicAuthority, str]] = [(authority, "_key"), (public, "_raw")]
    for key, slot in keys:
        with pytest.raises(AttributeError):
            setattr(key, slot, b"")
        with pytest.raises(AttributeError):
            delattr(key, slot)
        with pytest.raises(AttributeError):
            key.extra = 1
        assert not hasattr(key, "__dict__")
    assert authority.public == public
