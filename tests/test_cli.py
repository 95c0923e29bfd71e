"""The ``stalk`` command line, run as a user would: in subprocesses, with a private STALK_HOME."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import stalk
from stalk.cli import main
from stalk.known_peers import KnownPeers

TIMEOUT = 60


def run(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STALK_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "stalk", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "stalk-home"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A ``stalk listen 0 --echo`` process; yields its ``host:port`` and public key."""
    server_home = tmp_path / "server-home"
    env = {**os.environ, "STALK_HOME": str(server_home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stalk", "listen", "127.0.0.1:0", "--echo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        address = key = ""
        for line in proc.stdout:
            if match := re.match(r"listening on (\S+) as (\S+)", line):
                address, key = match.groups()
                break
        assert address, "the listener did not start"
        yield address, key
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


def test_version_and_help(home: Path) -> None:
    result = run(home, "--version")
    assert result.stdout.strip() == f"stalk {stalk.__version__}"
    for command in ("keygen", "id", "listen", "connect", "send", "forget", "demo", "vectors"):
        assert run(home, command, "--help").returncode == 0


def test_keygen_and_id(home: Path) -> None:
    made = run(home, "keygen")
    assert made.returncode == 0, made.stderr
    key_file = home / "identity"
    assert key_file.stat().st_mode & 0o777 == 0o600
    shown = run(home, "id")
    public, fingerprint = shown.stdout.split()
    assert public == stalk.Identity.load(key_file).public.__str__()
    assert fingerprint.startswith("SHA256:")
    assert public in made.stdout
    again = run(home, "keygen")
    assert again.returncode == 1
    assert again.stderr.startswith("stalk: error:")
    assert "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert run(home, "keygen", "--force").returncode == 0
    assert run(home, "id").stdout.split()[0] != public


def test_id_without_identity_is_one_readable_line(home: Path) -> None:
    result = run(home, "id")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1


def test_send_records_the_key_then_pins_it(home: Path, server: tuple[str, str]) -> None:
    address, key = server
    first = run(home, "send", address, "42", "hello", "b'raw'", "--wait", "10")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "Spack(42, 'hello', b'raw')"
    assert "recorded key" in first.stderr
    host, port = address.rsplit(":", 1)
    assert str(KnownPeers(home / "known_peers").lookup(host, int(port))) == key
    second = run(home, "send", address, "[1, 2]", "--wait", "10")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "Spack([1, 2])"
    assert "recorded key" not in second.stderr


def test_changed_key_is_refused_loudly(home: Path, server: tuple[str, str]) -> None:
    address, key = server
    host, port = address.rsplit(":", 1)
    old = stalk.Identity.generate().public
    KnownPeers(home / "known_peers").remember(host, int(port), old)
    result = run(home, "send", address, "x")
    assert result.returncode == 1
    assert "HAS CHANGED" in result.stderr
    assert old.fingerprint in result.stderr
    assert stalk.PublicIdentity.from_string(key).fingerprint in result.stderr
    assert f"stalk forget {host}:{port}" in result.stderr
    assert run(home, "forget", address).returncode == 0
    assert run(home, "send", address, "x").returncode == 0


def test_explicit_wrong_peer_is_refused(home: Path, server: tuple[str, str]) -> None:
    address, _key = server
    wrong = str(stalk.Identity.generate().public)
    result = run(home, "send", address, "x", "--peer", wrong)
    assert result.returncode == 1
    assert "does not hold the pinned key" in result.stderr


def test_connect_sends_stdin_lines(home: Path, server: tuple[str, str]) -> None:
    address, key = server
    result = run(home, "connect", address, "--peer", key, stdin="one\ntwo\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Spack('one')", "Spack('two')"]


def test_listen_with_authorized_peers(home: Path, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    friend_home = tmp_path / "friend"
    assert run(friend_home, "keygen").returncode == 0
    friend = run(friend_home, "id").stdout.split()[0]
    allowed.write_text(f"# only my friend\n{friend} friend's laptop\n")
    env = {**os.environ, "STALK_HOME": str(home)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stalk",
            "listen",
            "0",
            "--echo",
            "--authorized-peers",
            str(allowed),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        address = next(
            m.group(1) for line in proc.stdout if (m := re.match(r"listening on (\S+)", line))
        )
        stranger = run(tmp_path / "stranger", "send", address, "hi", "--wait", "10")
        assert stranger.returncode == 1
        assert "NOT_AUTHORIZED" in stranger.stderr
        ok = run(friend_home, "send", address, "hi", "--wait", "10")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "Spack('hi')"
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


def test_unreachable_address_is_one_readable_line(home: Path) -> None:
    result = run(home, "send", "127.0.0.1:1", "x")
    assert result.returncode == 1
    assert result.stderr.startswith("stalk: error: cannot connect to 127.0.0.1:1")
    assert "Traceback" not in result.stderr


def test_bad_address_is_a_usage_error(home: Path) -> None:
    assert main(["send", "nohost", "x"]) == 1
    assert main(["send", "host:notaport", "x"]) == 1


def test_demo_passes_and_reports(home: Path) -> None:
    result = run(home, "demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"(\d+) of \1 checks passed", result.stdout)
    assert "XX" in result.stdout
    assert "IK" in result.stdout
    assert "FAILED" not in result.stdout
    assert not home.exists()  # the demo touches nothing outside its temporary directory


def test_demo_on_trio(home: Path) -> None:
    result = run(home, "--backend", "trio", "demo")
    assert result.returncode == 0, result.stdout + result.stderr


def test_vectors_command(home: Path) -> None:
    shared = Path(
        os.environ.get("STALK_NOISE_VECTORS", Path(__file__).parents[2] / "shared/vectors")
    )
    if not (shared / "snow.txt").exists():
        pytest.skip("published Noise vectors not found: set STALK_NOISE_VECTORS")
    result = run(home, "vectors", str(shared / "snow.txt"))
    assert result.returncode == 0
    assert re.search(r"^\d+ passed, 0 failed, \d+ skipped$", result.stdout, re.MULTILINE)
