"""Tests for stalk.identity: key pairs, printable forms, fingerprints and key files."""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import pickle
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from stalk.errors import IdentityFileError, StalkError
from stalk.identity import Identity, PublicIdentity, same_key

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")

# Worked example from SPEC.md ("Identities and key formats").
SPEC_PRIVATE_HEX = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
SPEC_PUBLIC_TEXT = "stalk:j0DFrbaPJWJK5bIU6nZ6bslNgp09e14a0bpvPiE4KF8"
SPEC_FINGERPRINT = "SHA256:7t2IPaCpRRWT3Ao45YP7dw+ifbvtIJwgQE4HXmjE8Mk"


@pytest.fixture(autouse=True)
def _umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def secret_renderings(identity: Identity) -> list[str]:
    """Every way the private key might leak into text."""
    priv = identity.private_bytes()
    return [
        priv.hex(),
        priv.hex().upper(),
        base64.b64encode(priv).decode().rstrip("="),
        base64.urlsafe_b64encode(priv).decode().rstrip("="),
        repr(priv),
    ]


def canonical(raw: bytes) -> bytes:
    """32 random-looking bytes made a canonical X25519 key (bit 255 cleared)."""
    return raw[:31] + bytes([raw[31] & 0x7F])


def assert_no_secret(text: str, identity: Identity) -> None:
    for rendering in secret_renderings(identity):
        assert rendering not in text


def exception_text(exc: BaseException) -> str:
    """The messages of an exception and everything chained to it."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        parts.extend([str(seen), repr(seen)])
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


# --- key generation and derivation ---------------------------------------------------


def test_generate_public_matches_cryptography() -> None:
    identity = Identity.generate()
    key = X25519PrivateKey.from_private_bytes(identity.private_bytes())
    assert identity.public.raw == raw_public(key)
    assert len(identity.private_bytes()) == 32
    assert isinstance(identity.private_bytes(), bytes)


def test_generate_is_random() -> None:
    assert Identity.generate() != Identity.generate()


def test_from_private_bytes_round_trip() -> None:
    key = X25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    identity = Identity.from_private_bytes(priv)
    assert identity.private_bytes() == priv
    assert identity.public == PublicIdentity(raw_public(key))
    assert Identity.from_private_bytes(bytearray(priv)) == identity
    assert Identity.from_private_bytes(memoryview(priv)) == identity


@pytest.mark.parametrize(
    ("byte", "mask"),
    [
        pytest.param(0, 0x07, id="low-3-bits"),  # cleared by clamping
        pytest.param(31, 0x80, id="bit-255"),  # cleared by clamping
        pytest.param(31, 0x40, id="bit-254"),  # set by clamping
    ],
)
def test_identities_with_one_clamped_scalar_are_equal(byte: int, mask: int) -> None:
    # X25519 clamps the private scalar: raw private keys that differ only in the clamped
    # bits are one key (one public key, one DH), so they are one Identity.
    a = Identity.generate()
    raw = bytearray(a.private_bytes())
    raw[byte] ^= mask
    b = Identity.from_private_bytes(bytes(raw))
    assert b.private_bytes() != a.private_bytes()
    assert b.public == a.public
    assert b == a
    assert hash(b) == hash(a)
    assert len({a, b}) == 1
    assert a != Identity.generate()
    assert a.__eq__(a.public) is NotImplemented


def test_identity_wraps_cryptography_key() -> None:
    key = X25519PrivateKey.generate()
    assert Identity(key).public.raw == raw_public(key)
    with pytest.raises(TypeError):
        Identity(Ed25519PrivateKey.generate())  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_from_private_bytes_wrong_length(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Identity.from_private_bytes(b"\x01" * size)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_public_identity_wrong_length(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        PublicIdentity(b"\x01" * size)


def test_public_identity_rejects_non_bytes() -> None:
    with pytest.raises(TypeError):
        PublicIdentity(32)  # type: ignore[arg-type]  # bytes(32) would be 32 zero bytes
    with pytest.raises(TypeError):
        PublicIdentity("a" * 32)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Identity.from_private_bytes(32)  # type: ignore[arg-type]


def test_public_identity_accepts_bytes_like_and_stores_bytes() -> None:
    raw = bytes(range(32))
    for value in (bytearray(raw), memoryview(raw)):
        pub = PublicIdentity(value)
        assert type(pub.raw) is bytes
        assert pub.raw == raw
    buf = bytearray(raw)
    pub = PublicIdentity(buf)
    buf[0] ^= 0xFF
    assert pub.raw == raw  # a copy, not a view of the caller's buffer


def test_spec_worked_example() -> None:
    identity = Identity.from_private_bytes(bytes.fromhex(SPEC_PRIVATE_HEX))
    assert str(identity.public) == SPEC_PUBLIC_TEXT
    assert identity.public.fingerprint == SPEC_FINGERPRINT


# --- printable form ------------------------------------------------------------------


def test_str_format() -> None:
    raw = bytes(range(32))
    text = str(PublicIdentity(raw))
    assert text.startswith("stalk:")
    body = text[len("stalk:") :]
    assert len(body) == 43
    assert "=" not in body
    assert base64.urlsafe_b64decode(body + "=") == raw


def test_str_uses_urlsafe_alphabet() -> None:
    # 0xfb 0xff ... encodes to '+' and '/' in the standard alphabet (bit 255 stays clear).
    raw = b"\xfb\xff\xbf" * 10 + b"\xff\x7f"
    text = str(PublicIdentity(raw))
    assert "+" not in text
    assert "/" not in text
    assert "-" in text
    assert "_" in text
    assert PublicIdentity.from_string(text).raw == raw


@pytest.mark.parametrize("_round", range(20))
def test_from_string_round_trip(_round: int) -> None:
    pub = Identity.generate().public
    assert PublicIdentity.from_string(str(pub)) == pub
    assert PublicIdentity.from_string(str(pub)).raw == pub.raw


def test_from_string_strips_whitespace() -> None:
    pub = Identity.generate().public
    assert PublicIdentity.from_string(f"  \t{pub}\r\n") == pub


def test_repr_public() -> None:
    pub = PublicIdentity(bytes(range(32)))
    assert repr(pub) == f"PublicIdentity('{pub}')"


_VALID = str(PublicIdentity(bytes(range(32))))
_BODY = _VALID[len("stalk:") :]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("stalk:", id="prefix-only"),
        pytest.param(_BODY, id="no-prefix"),
        pytest.param("STALK:" + _BODY, id="uppercase-prefix"),
        pytest.param("stalk-" + _BODY, id="wrong-separator"),
        pytest.param("ssh:" + _BODY, id="wrong-prefix"),
        pytest.param("stalk: " + _BODY, id="space-after-prefix"),
        pytest.param(_VALID + "=", id="padding"),
        pytest.param("stalk:" + base64.urlsafe_b64encode(bytes(range(32))).decode(), id="padded"),
        pytest.param(_VALID[:-1], id="too-short"),
        pytest.param(_VALID + "A", id="too-long"),
        pytest.param("stalk:" + _BODY + _BODY, id="double"),
        pytest.param("stalk:" + "A" * 44, id="44-chars"),
        pytest.param(
            "stalk:" + base64.urlsafe_b64encode(bytes(31)).decode().rstrip("="), id="31-bytes"
        ),
        pytest.param(
            "stalk:" + base64.urlsafe_b64encode(bytes(33)).decode().rstrip("="), id="33-bytes"
        ),
        pytest.param("stalk:" + "A" * 42 + "B", id="non-canonical-last-char"),
        pytest.param("stalk:" + "A" * 42 + "D", id="non-canonical-last-char-D"),
        pytest.param("stalk:" + "+" + _BODY[1:], id="standard-alphabet-plus"),
        pytest.param("stalk:" + "/" + _BODY[1:], id="standard-alphabet-slash"),
        pytest.param("stalk:" + "!" + _BODY[1:], id="punctuation"),
        pytest.param("stalk:" + _BODY[:20] + " " + _BODY[21:], id="inner-space"),
        pytest.param("stalk:" + _BODY[:20] + "\n" + _BODY[21:], id="inner-newline"),
        pytest.param("stalk:" + "\u00e9" + _BODY[1:], id="non-ascii-letter"),
        pytest.param("stalk:" + "\uff21" + _BODY[1:], id="fullwidth-A"),
        pytest.param("stalk:" + "\u0661" + _BODY[1:], id="arabic-digit"),
    ],
)
def test_from_string_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="expected 'stalk:' followed by 43 base64url") as info:
        PublicIdentity.from_string(text)
    assert not isinstance(info.value, StalkError)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (_VALID + "=", "padding found"),
        ("ssh:" + _BODY, "wrong prefix"),
        (_VALID[:-1], "42 key characters"),
        ("stalk:" + "A" * 42 + "B", "non-canonical"),
        ("stalk:" + "+" + _BODY[1:], "invalid base64url character"),
    ],
)
def test_from_string_says_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        PublicIdentity.from_string(text)


def test_non_canonical_encodings_decode_to_a_valid_key() -> None:
    # The last character carries 2 unused bits: 'B' decodes like 'A' under a lenient
    # decoder, so accepting it would give one key two printable forms.
    lenient = base64.urlsafe_b64decode("Q" + "A" * 41 + "B=")
    assert lenient == b"\x40" + bytes(31)
    assert str(PublicIdentity(lenient)) == "stalk:Q" + "A" * 42


P25519 = 2**255 - 19

#: The canonical low-order u-coordinates (RFC 7748 §6.1; libsodium's list).
LOW_ORDER_HEX = [
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",  # p - 1
]


def printable(raw: bytes) -> str:
    """The printable form of any 32 bytes, built by hand (no checks)."""
    return "stalk:" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def twin(raw: bytes) -> bytes:
    """The same X25519 key with the ignored bit 255 set."""
    return raw[:31] + bytes([raw[31] | 0x80])


@pytest.mark.parametrize("point", LOW_ORDER_HEX)
def test_low_order_public_keys_are_refused(point: str) -> None:
    raw = bytes.fromhex(point)
    with pytest.raises(ValueError, match="low-order"):
        PublicIdentity(raw)
    with pytest.raises(ValueError, match="low-order"):
        PublicIdentity.from_string(printable(raw))


@pytest.mark.parametrize(
    ("u", "reason"),
    [
        pytest.param(P25519, "u >= 2", id="p"),  # zero, reduced: low order as well
        pytest.param(P25519 + 1, "u >= 2", id="p+1"),  # one, reduced
        pytest.param(P25519 + 9, "u >= 2", id="p+9"),  # the base point, reduced
        pytest.param(2**255 - 1, "u >= 2", id="2^255-1"),
        pytest.param(2**255, "bit 255", id="2^255"),  # zero with bit 255
        pytest.param(2**255 + 9, "bit 255", id="2^255+9"),
        pytest.param(2**256 - 1, "bit 255", id="2^256-1"),
    ],
)
def test_non_canonical_public_keys_are_refused(u: int, reason: str) -> None:
    raw = u.to_bytes(32, "little")
    with pytest.raises(ValueError, match=f"not a canonical X25519 public key: {reason}"):
        PublicIdentity(raw)
    with pytest.raises(ValueError, match="not a canonical"):
        PublicIdentity.from_string(printable(raw))


@pytest.mark.parametrize("u", [2, 9, P25519 - 2, 2**254])
def test_canonical_keys_up_to_p_minus_2_are_accepted(u: int) -> None:
    raw = u.to_bytes(32, "little")
    assert PublicIdentity(raw).raw == raw
    assert PublicIdentity.from_string(printable(raw)).raw == raw


def test_bit_255_twin_of_a_real_key_is_refused_everywhere(tmp_path: Path) -> None:
    # The twin is the same DH key (X25519 ignores bit 255): accepted, it would be a second
    # identity for one private key, with its own string, fingerprint, == and hash.
    identity = Identity.generate()
    bad = twin(identity.public.raw)
    peer = X25519PrivateKey.generate()
    assert peer.exchange(X25519PublicKey.from_public_bytes(bad)) == peer.exchange(
        X25519PublicKey.from_public_bytes(identity.public.raw)
    )
    with pytest.raises(ValueError, match="bit 255 is set"):
        PublicIdentity(bad)
    with pytest.raises(ValueError, match="bit 255 is set") as info:
        PublicIdentity.from_string(printable(bad))
    assert printable(bad) not in exception_text(info.value)
    pub_file = tmp_path / "twin.pub"
    pub_file.write_text(f"# a public key file\n{printable(bad)} laptop\n")
    with pytest.raises(IdentityFileError, match="bit 255 is set"):
        PublicIdentity.load(pub_file)


def test_u_at_least_p_twin_is_the_same_dh_key_and_is_refused() -> None:
    # u = p + 9 reduces to 9 (the base point): the same DH key under another encoding.
    reduced = (P25519 + 9).to_bytes(32, "little")
    base = (9).to_bytes(32, "little")
    peer = X25519PrivateKey.generate()
    assert peer.exchange(X25519PublicKey.from_public_bytes(reduced)) == peer.exchange(
        X25519PublicKey.from_public_bytes(base)
    )
    with pytest.raises(ValueError, match="u >= 2"):
        PublicIdentity(reduced)
    assert PublicIdentity(base).raw == base


def test_every_generated_key_is_canonical() -> None:
    for _ in range(64):
        raw = Identity.generate().public.raw
        assert int.from_bytes(raw, "little") < P25519


def test_from_string_rejects_non_str() -> None:
    with pytest.raises(TypeError):
        PublicIdentity.from_string(_VALID.encode())  # type: ignore[arg-type]


def test_from_string_error_does_not_echo_input() -> None:
    identity = Identity.generate()
    pem = identity_pem(identity).decode()
    for text in (pem, "stalk:" + identity.private_bytes().hex()):
        with pytest.raises(ValueError, match="base64url") as info:
            PublicIdentity.from_string(text)
        assert_no_secret(exception_text(info.value), identity)


# --- fingerprint ---------------------------------------------------------------------


def test_fingerprint_matches_independent_sha256() -> None:
    pub = Identity.generate().public
    digest = hashlib.sha256(pub.raw).digest()
    expected = "SHA256:" + base64.standard_b64encode(digest).decode("ascii").rstrip("=")
    assert pub.fingerprint == expected


def test_fingerprint_format() -> None:
    # Chosen so the digest's base64 contains '+' or '/': the standard alphabet is kept.
    for i in range(256):
        raw = canonical(hashlib.sha256(bytes([i])).digest())
        fp = PublicIdentity(raw).fingerprint
        assert fp.startswith("SHA256:")
        body = fp[len("SHA256:") :]
        assert len(body) == 43
        assert "=" not in body
        assert "-" not in body
        assert "_" not in body
        assert base64.standard_b64decode(body + "=") == hashlib.sha256(raw).digest()
    bodies = "".join(
        PublicIdentity(canonical(hashlib.sha256(bytes([i])).digest())).fingerprint
        for i in range(256)
    )
    assert "+" in bodies
    assert "/" in bodies


def test_fingerprint_differs_between_keys() -> None:
    assert Identity.generate().public.fingerprint != Identity.generate().public.fingerprint


# --- equality, hashing, immutability -------------------------------------------------


def test_public_equality_and_hash() -> None:
    raw = bytes(range(32))
    a = PublicIdentity(raw)
    b = PublicIdentity(bytearray(raw))
    c = PublicIdentity(bytes([9]) * 32)
    assert a == b
    assert hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2
    assert a != raw  # not equal to its raw bytes
    assert a != str(a)  # nor to its printable form
    assert a.__eq__(raw) is NotImplemented
    assert same_key(a, b)
    assert not same_key(a, c)


def test_same_key_rejects_other_types() -> None:
    pub = PublicIdentity(bytes([9]) * 32)
    with pytest.raises(TypeError):
        same_key(pub, bytes(32))  # type: ignore[arg-type]


def test_identity_equality_and_hash() -> None:
    identity = Identity.generate()
    twin = Identity.from_private_bytes(identity.private_bytes())
    other = Identity.generate()
    assert identity == twin
    assert hash(identity) == hash(twin)
    assert hash(identity) == hash(identity.public)
    assert identity != other
    assert identity != identity.public
    assert identity.__eq__(identity.private_bytes()) is NotImplemented
    assert len({identity, twin, other}) == 2


def test_public_identity_is_immutable() -> None:
    pub = PublicIdentity(bytes([9]) * 32)
    with pytest.raises(AttributeError):
        pub._raw = bytes(range(32))
    with pytest.raises(AttributeError):
        pub.raw = bytes(range(32))  # type: ignore[misc]
    with pytest.raises(AttributeError):
        pub.extra = 1
    with pytest.raises(AttributeError):
        del pub._raw
    assert not hasattr(pub, "__dict__")
    assert pub.raw == bytes([9]) * 32


def test_identity_is_immutable() -> None:
    identity = Identity.generate()
    before = identity.private_bytes()
    with pytest.raises(AttributeError):
        identity._key = X25519PrivateKey.generate()
    with pytest.raises(AttributeError):
        identity.public = Identity.generate().public  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del identity._public
    assert not hasattr(identity, "__dict__")
    assert identity.private_bytes() == before


def test_public_identity_copy_and_pickle() -> None:
    pub = Identity.generate().public
    assert copy.copy(pub) == pub
    assert copy.deepcopy(pub) == pub
    assert pickle.loads(pickle.dumps(pub)) == pub


def test_identity_refuses_pickle_but_copies() -> None:
    identity = Identity.generate()
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(identity)
    assert copy.deepcopy(identity) == identity


# --- repr never shows the private key ------------------------------------------------


def test_identity_repr() -> None:
    identity = Identity.from_private_bytes(bytes.fromhex(SPEC_PRIVATE_HEX))
    assert repr(identity) == f"<Identity {SPEC_PUBLIC_TEXT} {SPEC_FINGERPRINT}>"
    assert str(identity) == repr(identity)


@pytest.mark.parametrize("_round", range(10))
def test_repr_and_str_never_contain_private_key(_round: int) -> None:
    identity = Identity.generate()
    for text in (repr(identity), str(identity), f"{identity}", f"{identity!r}", repr([identity])):
        assert_no_secret(text, identity)
    for text in (repr(identity.public), str(identity.public), identity.public.fingerprint):
        assert_no_secret(text, identity)


def test_secret_check_can_fail() -> None:
    # Guard against assert_no_secret being vacuous.
    identity = Identity.generate()
    with pytest.raises(AssertionError):
        assert_no_secret(f"oops {identity.private_bytes().hex()}", identity)
    with pytest.raises(AssertionError):
        assert_no_secret(base64.b64encode(identity.private_bytes()).decode(), identity)


# --- save ----------------------------------------------------------------------------


def identity_pem(identity: Identity) -> bytes:
    key = X25519PrivateKey.from_private_bytes(identity.private_bytes())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@posix_only
def test_save_writes_pkcs8_pem_with_mode_0600(tmp_path: Path) -> None:
    identity = Identity.generate()
    key_path = tmp_path / "id_stalk"
    identity.save(key_path)
    assert mode_of(key_path) == 0o600
    data = key_path.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert data == identity_pem(identity)
    key = serialization.load_pem_private_key(data, password=None)
    assert isinstance(key, X25519PrivateKey)
    assert Identity(key) == identity


@posix_only
def test_save_writes_pub_file(tmp_path: Path) -> None:
    identity = Identity.generate()
    key_path = tmp_path / "id_stalk"
    identity.save(key_path)
    pub_path = tmp_path / "id_stalk.pub"
    assert pub_path.read_text(encoding="ascii") == str(identity.public) + "\n"
    assert mode_of(pub_path) == 0o644
    assert PublicIdentity.load(pub_path) == identity.public


def test_save_leaves_no_temp_file(tmp_path: Path) -> None:
    Identity.generate().save(tmp_path / "key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "key.pub"]


def test_save_refuses_existing_file(tmp_path: Path) -> None:
    key_path = tmp_path / "key"
    first = Identity.generate()
    first.save(key_path)
    before = key_path.read_bytes()
    pub_before = (tmp_path / "key.pub").read_bytes()
    second = Identity.generate()
    with pytest.raises(IdentityFileError, match="already exists") as info:
        second.save(key_path)
    assert "overwrite=True" in str(info.value)
    assert key_path.read_bytes() == before
    assert (tmp_path / "key.pub").read_bytes() == pub_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "key.pub"]
    assert_no_secret(exception_text(info.value), first)
    assert_no_secret(exception_text(info.value), second)


def test_save_refuses_before_writing_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_path = tmp_path / "key"
    key_path.write_bytes(b"precious")
    created: list[str] = []
    real_open = os.open

    def tracking_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if flags & os.O_CREAT:
            created.append(os.fspath(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", tracking_open)
    with pytest.raises(IdentityFileError, match="already exists"):
        Identity.generate().save(key_path)
    monkeypatch.undo()
    assert created == []


def test_save_refuses_existing_unrelated_file(tmp_path: Path) -> None:
    key_path = tmp_path / "key"
    key_path.write_bytes(b"precious")
    with pytest.raises(IdentityFileError):
        Identity.generate().save(key_path)
    assert key_path.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


@posix_only
def test_save_refuses_dangling_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "key").symlink_to(target)
    with pytest.raises(IdentityFileError, match="already exists"):
        Identity.generate().save(tmp_path / "key")
    assert not target.exists()


@posix_only
def test_save_overwrite(tmp_path: Path) -> None:
    key_path = tmp_path / "key"
    key_path.write_bytes(b"old")
    key_path.chmod(0o644)
    (tmp_path / "key.pub").write_text("stale\n")
    identity = Identity.generate()
    identity.save(key_path, overwrite=True)
    assert Identity.load(key_path) == identity
    assert mode_of(key_path) == 0o600  # a fresh file, not the old inode
    assert PublicIdentity.load(tmp_path / "key.pub") == identity.public
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "key.pub"]


def test_save_overwrites_stale_pub_file(tmp_path: Path) -> None:
    (tmp_path / "key.pub").write_text("stale\n")
    identity = Identity.generate()
    identity.save(tmp_path / "key")
    assert PublicIdentity.load(tmp_path / "key.pub") == identity.public


@posix_only
def test_save_creates_parent_directories_0700(tmp_path: Path) -> None:
    key_path = tmp_path / "a" / "b" / "key"
    identity = Identity.generate()
    identity.save(key_path)
    assert mode_of(tmp_path / "a") == 0o700
    assert mode_of(tmp_path / "a" / "b") == 0o700
    assert Identity.load(key_path) == identity


@posix_only
def test_save_keeps_existing_directory_mode(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o755)
    Identity.generate().save(directory / "key")
    assert mode_of(directory) == 0o755


def test_save_and_load_expand_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    identity = Identity.generate()
    identity.save("~/.stalk/id")
    assert (tmp_path / ".stalk" / "id").is_file()
    assert not Path("~").exists()
    assert Identity.load("~/.stalk/id") == identity
    assert PublicIdentity.load("~/.stalk/id.pub") == identity.public


def test_save_accepts_str_path(tmp_path: Path) -> None:
    identity = Identity.generate()
    identity.save(str(tmp_path / "key"))
    assert Identity.load(str(tmp_path / "key")) == identity


def test_save_into_a_file_as_directory_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    identity = Identity.generate()
    with pytest.raises(IdentityFileError) as info:
        identity.save(tmp_path / "file" / "key")
    assert_no_secret(exception_text(info.value), identity)


@posix_only
def test_save_into_read_only_directory_fails_cleanly(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    directory = tmp_path / "ro"
    directory.mkdir(mode=0o500)
    identity = Identity.generate()
    try:
        with pytest.raises(IdentityFileError, match="cannot write") as info:
            identity.save(directory / "key")
    finally:
        directory.chmod(0o700)
    assert list(directory.iterdir()) == []
    assert_no_secret(exception_text(info.value), identity)


@posix_only
def test_save_is_readable_by_openssl(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    identity = Identity.from_private_bytes(bytes.fromhex(SPEC_PRIVATE_HEX))
    key_path = tmp_path / "key"
    identity.save(key_path)
    result = subprocess.run(
        [openssl, "pkey", "-in", str(key_path), "-pubout", "-outform", "DER"],
        capture_output=True,
        check=True,
    )
    # SubjectPublicKeyInfo for X25519 is a fixed 12-byte header + the raw key.
    assert result.stdout == bytes.fromhex("302a300506032b656e032100") + identity.public.raw


# --- load ----------------------------------------------------------------------------


def test_load_round_trip(tmp_path: Path) -> None:
    identity = Identity.generate()
    identity.save(tmp_path / "key")
    loaded = Identity.load(tmp_path / "key")
    assert loaded == identity
    assert loaded.private_bytes() == identity.private_bytes()
    assert loaded.public == identity.public


def test_load_external_pkcs8_pem(tmp_path: Path) -> None:
    identity = Identity.generate()
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(identity_pem(identity))
    key_path.chmod(0o600)
    assert Identity.load(key_path) == identity


@posix_only
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o666, 0o660, 0o644, 0o620, 0o602, 0o610, 0o601])
def test_load_refuses_open_permissions(tmp_path: Path, mode: int) -> None:
    identity = Identity.generate()
    key_path = tmp_path / "key"
    identity.save(key_path)
    key_path.chmod(mode)
    with pytest.raises(IdentityFileError) as info:
        Identity.load(key_path)
    message = str(info.value)
    assert f"chmod 600 {key_path}" in message
    assert str(key_path) in message
    assert f"{mode:04o}" in message
    assert "too open" in message
    assert_no_secret(exception_text(info.value), identity)


@posix_only
def test_load_permission_message_quotes_path(tmp_path: Path) -> None:
    key_path = tmp_path / "my key"
    Identity.generate().save(key_path)
    key_path.chmod(0o644)
    with pytest.raises(IdentityFileError, match="chmod 600 '") as info:
        Identity.load(key_path)
    assert f"chmod 600 '{key_path}'" in str(info.value)


@posix_only
@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_private_permissions(tmp_path: Path, mode: int) -> None:
    identity = Identity.generate()
    key_path = tmp_path / "key"
    identity.save(key_path)
    key_path.chmod(mode)
    assert Identity.load(key_path) == identity


def test_load_skips_permission_check_off_posix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = Identity.generate()
    key_path = tmp_path / "key"
    identity.save(key_path)
    key_path.chmod(0o644)
    monkeypatch.setattr("stalk._files.CHECK_PERMISSIONS", False)
    assert Identity.load(key_path) == identity


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(IdentityFileError, match="does not exist") as info:
        Identity.load(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(IdentityFileError):
        Identity.load(tmp_path)


@posix_only
def test_load_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(IdentityFileError, match="not a regular file"):
        Identity.load(fifo)


@posix_only
def test_load_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can read anything")
    key_path = tmp_path / "key"
    Identity.generate().save(key_path)
    key_path.chmod(0o000)
    try:
        with pytest.raises(IdentityFileError, match="cannot open") as info:
            Identity.load(key_path)
    finally:
        key_path.chmod(0o600)
    assert isinstance(info.value.__cause__, PermissionError)


def write_private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage\n", id="text"),
        pytest.param(os.urandom(32), id="raw-32-bytes"),
        pytest.param(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", id="bad-der"
        ),
        pytest.param(b"-----BEGIN PRIVATE KEY-----\nMC4CAQAw\n", id="truncated"),
        pytest.param(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", id="cert"),
    ],
)
def test_load_garbage(tmp_path: Path, data: bytes) -> None:
    key_path = write_private(tmp_path / "key", data)
    with pytest.raises(IdentityFileError, match="key") as info:
        Identity.load(key_path)
    assert str(key_path) in str(info.value)
    assert info.value.__cause__ is None or isinstance(info.value.__cause__, Exception)


def test_load_too_large(tmp_path: Path) -> None:
    key_path = write_private(tmp_path / "key", b"-----BEGIN" + b"A" * 100_000)
    with pytest.raises(IdentityFileError, match="too large"):
        Identity.load(key_path)


def test_load_ed25519_key(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_path = write_private(tmp_path / "key", pem)
    with pytest.raises(IdentityFileError, match="Ed25519 key, not an X25519 key") as info:
        Identity.load(key_path)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    text = exception_text(info.value)
    assert raw.hex() not in text
    assert base64.b64encode(raw).decode().rstrip("=") not in text


def test_load_encrypted_key(tmp_path: Path) -> None:
    identity = Identity.generate()
    key = X25519PrivateKey.from_private_bytes(identity.private_bytes())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"hunter2"),
    )
    key_path = write_private(tmp_path / "key", pem)
    with pytest.raises(IdentityFileError, match="encrypted") as info:
        Identity.load(key_path)
    assert_no_secret(exception_text(info.value), identity)


def test_load_public_file_as_private_key(tmp_path: Path) -> None:
    identity = Identity.generate()
    identity.save(tmp_path / "key")
    with pytest.raises(IdentityFileError, match="public identity, not a private key"):
        Identity.load(tmp_path / "key.pub")


def test_load_errors_are_stalk_errors(tmp_path: Path) -> None:
    with pytest.raises(StalkError):
        Identity.load(tmp_path / "missing")


@posix_only
def test_private_bytes_never_in_load_errors(tmp_path: Path) -> None:
    """Every load failure on a file holding a real key: no message shows the key."""
    identity = Identity.generate()
    pem = identity_pem(identity)
    cases: list[tuple[bytes, int]] = [
        (pem, 0o644),  # too open
        (pem[:-40], 0o600),  # truncated PEM
        (pem.replace(b"PRIVATE KEY", b"PUBLIC KEY"), 0o600),  # wrong label
        (pem.replace(b"-----BEGIN", b"xx-----BEGIN")[:-10], 0o600),
        (identity.private_bytes(), 0o600),  # raw bytes, not PEM
        (identity.private_bytes().hex().encode(), 0o600),  # hex text, not PEM
    ]
    for i, (data, mode) in enumerate(cases):
        key_path = tmp_path / f"key{i}"
        key_path.write_bytes(data)
        key_path.chmod(mode)
        with pytest.raises(IdentityFileError) as info:
            Identity.load(key_path)
        assert_no_secret(exception_text(info.value), identity)


# --- PublicIdentity.load -------------------------------------------------------------


def test_public_load_with_comments_and_trailing_text(tmp_path: Path) -> None:
    pub = Identity.generate().public
    path = tmp_path / "peer.pub"
    path.write_text(f"# alice's laptop\n\n   {pub} alice@laptop\n# trailing\n", encoding="utf-8")
    assert PublicIdentity.load(path) == pub


def test_public_load_needs_no_private_permissions(tmp_path: Path) -> None:
    pub = Identity.generate().public
    path = tmp_path / "peer.pub"
    path.write_text(f"{pub}\n")
    path.chmod(0o666)
    assert PublicIdentity.load(path) == pub


@pytest.mark.parametrize(
    ("content", "match"),
    [
        pytest.param(b"", "contains no public identity", id="empty"),
        pytest.param(b"# only a comment\n\n", "contains no public identity", id="comments"),
        pytest.param(b"stalk:AAAA\n", "base64url", id="short"),
        pytest.param(b"\xff\xfe\x00", "not UTF-8", id="binary"),
    ],
)
def test_public_load_rejects(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "peer.pub"
    path.write_bytes(content)
    with pytest.raises(IdentityFileError, match=match):
        PublicIdentity.load(path)


def test_public_load_missing(tmp_path: Path) -> None:
    with pytest.raises(IdentityFileError, match="does not exist"):
        PublicIdentity.load(tmp_path / "missing.pub")


def test_public_load_of_private_key_file_does_not_leak(tmp_path: Path) -> None:
    identity = Identity.generate()
    identity.save(tmp_path / "key")
    with pytest.raises(IdentityFileError) as info:
        PublicIdentity.load(tmp_path / "key")
    assert_no_secret(exception_text(info.value), identity)


# --- failure paths that file permissions cannot provoke when running as root ---------


def test_save_write_failure_is_identity_file_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def failing_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if Path(path).parent == tmp_path and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", failing_open)
    identity = Identity.generate()
    with pytest.raises(IdentityFileError, match="cannot write") as info:
        identity.save(tmp_path / "key")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    assert isinstance(info.value.__cause__, PermissionError)
    assert_no_secret(exception_text(info.value), identity)


def test_save_fsync_failure_removes_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(IdentityFileError, match="Input/output error"):
        Identity.generate().save(tmp_path / "key")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_load_unreadable_file_any_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_path = tmp_path / "key"
    Identity.generate().save(key_path)
    real_open = os.open

    def failing_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if Path(path) == key_path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(IdentityFileError, match="cannot open identity file") as info:
        Identity.load(key_path)
    assert "Permission denied" in str(info.value)
    assert isinstance(info.value.__cause__, PermissionError)


def test_save_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Filesystems without hard links fall back to check + replace."""

    def no_link(src: object, dst: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    identity = Identity.generate()
    identity.save(tmp_path / "key")
    assert Identity.load(tmp_path / "key") == identity
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "key.pub"]
    with pytest.raises(IdentityFileError, match="already exists"):
        Identity.generate().save(tmp_path / "key")
    assert Identity.load(tmp_path / "key") == identity


def test_save_race_does_not_clobber(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key created by someone else between our check and our rename is kept."""
    key_path = tmp_path / "key"
    real_link = os.link

    def racing_link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == key_path:
            key_path.write_bytes(b"the other process's key")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    with pytest.raises(IdentityFileError, match="already exists"):
        Identity.generate().save(key_path)
    monkeypatch.undo()
    assert key_path.read_bytes() == b"the other process's key"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]
