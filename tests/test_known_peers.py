"""Trust stores refuse keys that are not canonical X25519 keys, naming the file and line."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest

from stalk.errors import IdentityFileError
from stalk.identity import Identity
from stalk.known_peers import AuthorizedPeers, KnownPeers

P25519 = 2**255 - 19


def printable(raw: bytes) -> str:
    """The printable form of any 32 bytes, built by hand (no checks)."""
    return "stalk:" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def bit_255_twin(raw: bytes) -> bytes:
    """The same X25519 key with the ignored bit 255 set."""
    return raw[:31] + bytes([raw[31] | 0x80])


#: kind -> (the bad key made from a good one, what the error says)
BAD_KEYS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "bit_255_twin": (bit_255_twin, "bit 255 is set"),
    "u_at_least_p": (lambda _raw: (P25519 + 9).to_bytes(32, "little"), "u >= 2"),
    "low_order": (lambda _raw: bytes(32), "low-order"),
}


@pytest.mark.parametrize("kind", BAD_KEYS)
def test_authorized_peers_refuses_a_bad_key_line(tmp_path: Path, kind: str) -> None:
    good = Identity.generate().public
    make, reason = BAD_KEYS[kind]
    path = tmp_path / "authorized_peers"
    path.write_text(f"# admitted\n{good} alice\n{printable(make(good.raw))} mallory\n")
    with pytest.raises(IdentityFileError, match=f"authorized_peers:3: .*{reason}"):
        AuthorizedPeers(path)


@pytest.mark.parametrize("kind", BAD_KEYS)
def test_known_peers_refuses_a_bad_key_line(tmp_path: Path, kind: str) -> None:
    good = Identity.generate().public
    make, reason = BAD_KEYS[kind]
    path = tmp_path / "known_peers"
    path.write_text(f"example.org:7000 {good}\nexample.net:7000 {printable(make(good.raw))}\n")
    store = KnownPeers(path)
    with pytest.raises(IdentityFileError, match=f"known_peers:2: .*{reason}"):
        store.lookup("example.org", 7000)


def test_known_peers_round_trip_keeps_canonical_keys(tmp_path: Path) -> None:
    store = KnownPeers(tmp_path / "known_peers")
    key = Identity.generate().public
    store.remember("example.org", 7000, key)
    assert store.lookup("example.org", 7000) == key
