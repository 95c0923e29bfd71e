"""What authorities, certificates and revocation lists share: bounds and encodings.

SPEC "Certificates" in constants and small functions: the prefixes of the printable
forms, the format versions and signing contexts, every bound of the format (SPEC
"Limits"), unpadded canonical base64url, SHA-256 fingerprints, msgpack packed and unpacked
strictly, the checks of names, groups and extension ids, times as people read them, the
X25519 form of an Ed25519 key, and the text file forms (``#`` comments, one prefixed line)
with the checks of a trust file.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import msgpack

from stalk import _files
from stalk.errors import IdentityFileError
from stalk.identity import KEY_SIZE

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


def _expand(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.expanduser(os.fspath(path)))


def _array_header(count: int) -> bytes:
    """The msgpack header of an array of ``count`` (< 16) elements."""
    return bytes([0x90 | count])


def _describe(value: object) -> str:
    return str(value) if type(value) is int else f"of type {type(value).__name__}"


def _strictly_increasing(items: list[Any]) -> bool:
    return all(a < b for a, b in itertools.pairwise(items))


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


def _check_trust_file(path: Path, st: os.stat_result, kind: str) -> None:
    """The checks of SPEC "Trust files": owner, not writable by others, safe directories."""
    _files.check_owner(path, st, kind)
    _files.check_not_writable_by_others(path, st, kind)
    _files.check_directories(path, kind)
