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


def test_known_peers_keep_unix_socket_paths_apart_from_hosts(tmp_path: Path) -> None:
    """A unix socket's entry is ``unix:PATH``; a path that would break the line is quoted."""
    path = tmp_path / "known_peers"
    store = KnownPeers(path)
    keys = [Identity.generate().public for _ in range(4)]
    odd = "/run/my app/#1%.sock"
    store.remember("/run/app.sock", None, keys[0])
    store.remember(odd, None, keys[1])
    store.remember("\0abstract", None, keys[2])
    store.remember("/run/app.sock", 7000, keys[3])  # a host that looks like a path
    assert store.lookup("/run/app.sock") == keys[0]
    assert store.lookup("/run//app.sock") == keys[0]  # the same file
    assert store.lookup(odd) == keys[1]
    assert store.lookup("\0abstract") == keys[2]
    assert store.lookup("/run/app.sock", 7000) == keys[3]
    lines = path.read_text().splitlines()[1:]
    assert sorted(line.split()[0] for line in lines) == [
        "/run/app.sock:7000",
        "unix:/run/app.sock",
        "unix:/run/my%20app/%231%25.sock",
        "unix:@abstract",
    ]
    assert store.forget(odd)
    assert store.lookup(odd) is None
    assert not store.forget(odd)


def test_a_relative_unix_path_is_refused(tmp_path: Path) -> None:
    """Relative to what? And a host given without its port would pass for one."""
    store = KnownPeers(tmp_path / "known_peers")
    with pytest.raises(ValueError, match="absolute path"):
        store.lookup("example.org")
    with pytest.raises(ValueError, match="absolute path"):
        store.remember("app.sock", None, Identity.generate().public)
