"""Trust files (known_peers, authorized peers, identity, $STALK_HOME): ssh-style ownership
and permission checks, and lossless concurrent updates of known_peers.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stalk import _files
from stalk.cli import main
from stalk.errors import IdentityFileError
from stalk.identity import Identity, PublicIdentity
from stalk.known_peers import AuthorizedPeers, KnownPeers

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX ownership and permission bits")
needs_root = pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0, reason="giving a file to another uid needs root"
)

#: A uid that owns nothing on a test machine.
OTHER_UID = 54321

#: Modes that let group or others write, for files and directories.
WRITABLE_FILE_MODES = [0o664, 0o646, 0o666, 0o620, 0o602]
WRITABLE_DIR_MODES = [0o770, 0o707, 0o777, 0o730, 0o703]


@pytest.fixture(autouse=True)
def _umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def key(label: str) -> PublicIdentity:
    """A deterministic public key (the writer processes derive the same ones)."""
    return Identity.from_private_bytes(hashlib.sha256(label.encode()).digest()).public


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def known_peers_file(directory: Path) -> Path:
    """A valid known_peers file with one entry (``example.org:7000``) in ``directory``."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    KnownPeers(directory / "known_peers").remember("example.org", 7000, key("a"))
    return directory / "known_peers"


def authorized_peers_file(directory: Path) -> Path:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "authorized_peers"
    path.write_text(f"{key('a')} alice\n")
    path.chmod(0o600)
    return path


def assert_refused(
    action: Callable[[], object], culprit: Path, mode: int, *, fix: str = "chmod go-w"
) -> str:
    """``action`` fails with one line naming ``culprit``, its mode and the command fixing it."""
    with pytest.raises(IdentityFileError) as info:
        action()
    message = str(info.value)
    assert "\n" not in message
    assert f"'{culprit}'" in message
    assert f"{mode:04o}" in message
    assert f"{fix} {culprit}" in message
    return message


# --- ownership and permissions --------------------------------------------------------


@posix_only
@pytest.mark.parametrize("mode", WRITABLE_FILE_MODES, ids=oct)
def test_writable_known_peers_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = known_peers_file(tmp_path / "home")
    path.chmod(mode)
    before = path.read_bytes()
    known = KnownPeers(path)
    assert_refused(lambda: known.lookup("example.org", 7000), path, mode)
    assert_refused(lambda: known.remember("example.net", 7000, key("b")), path, mode)
    assert_refused(lambda: known.forget("example.org", 7000), path, mode)
    assert path.read_bytes() == before
    assert mode_of(path) == mode


@posix_only
@pytest.mark.parametrize("mode", WRITABLE_FILE_MODES, ids=oct)
def test_writable_authorized_peers_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = authorized_peers_file(tmp_path / "home")
    path.chmod(mode)
    message = assert_refused(lambda: AuthorizedPeers(path), path, mode)
    assert "authorized peers file" in message


@posix_only
def test_reload_of_a_file_made_writable_keeps_the_old_keys(tmp_path: Path) -> None:
    path = authorized_peers_file(tmp_path / "home")
    authorized = AuthorizedPeers(path)
    path.write_text(f"{key('a')}\n{key('intruder')}\n")
    path.chmod(0o666)
    assert_refused(authorized.reload, path, 0o666)
    assert key("a") in authorized
    assert key("intruder") not in authorized


@posix_only
@pytest.mark.parametrize("mode", WRITABLE_DIR_MODES, ids=oct)
def test_writable_stalk_home_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    home = tmp_path / "stalk-home"
    known_peers_file(home)
    authorized = authorized_peers_file(home)
    Identity.generate().save(home / "identity")
    home.chmod(mode)
    monkeypatch.setenv("STALK_HOME", str(home))
    assert_refused(lambda: KnownPeers().lookup("example.org", 7000), home, mode)
    assert_refused(lambda: KnownPeers().remember("example.net", 7000, key("b")), home, mode)
    assert_refused(lambda: AuthorizedPeers(authorized), home, mode)
    assert_refused(lambda: Identity.load(home / "identity"), home, mode)


@posix_only
def test_writable_stalk_home_is_refused_before_known_peers_exists(tmp_path: Path) -> None:
    """A missing file in a writable directory is no reason to start trusting on first use."""
    home = tmp_path / "stalk-home"
    home.mkdir(mode=0o777)
    home.chmod(0o777)
    known = KnownPeers(home / "known_peers")
    assert_refused(lambda: known.lookup("example.org", 7000), home, 0o777)
    assert_refused(lambda: known.remember("example.org", 7000, key("a")), home, 0o777)
    assert sorted(home.iterdir()) == []


@posix_only
def test_writable_directory_further_up_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    path = known_peers_file(shared / "me" / ".stalk")
    shared.chmod(0o775)
    assert_refused(lambda: KnownPeers(path).lookup("example.org", 7000), shared, 0o775)


@posix_only
def test_sticky_world_writable_directory_is_accepted(tmp_path: Path) -> None:
    """As /tmp: in a sticky directory only a file's owner can rename or delete it."""
    shared = tmp_path / "tmp"
    path = known_peers_file(shared / "me")
    shared.chmod(0o1777)
    assert KnownPeers(path).lookup("example.org", 7000) == key("a")
    shared.chmod(0o777)
    assert_refused(lambda: KnownPeers(path).lookup("example.org", 7000), shared, 0o777)


@posix_only
def test_walk_stops_at_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Directories above $HOME are the administrator's business, as for ssh."""
    parent = tmp_path / "parent"
    path = known_peers_file(parent / "user" / ".stalk")
    parent.chmod(0o777)
    monkeypatch.setenv("HOME", str(parent / "user"))
    assert KnownPeers(path).lookup("example.org", 7000) == key("a")
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    assert_refused(lambda: KnownPeers(path).lookup("example.org", 7000), parent, 0o777)


@posix_only
def test_home_itself_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "user"
    path = known_peers_file(user / ".stalk")
    user.chmod(0o775)
    monkeypatch.setenv("HOME", str(user))
    assert_refused(lambda: KnownPeers(path).lookup("example.org", 7000), user, 0o775)


@posix_only
def test_identity_in_writable_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    identity = Identity.generate()
    identity.save(directory / "key")
    directory.chmod(0o770)
    assert_refused(lambda: Identity.load(directory / "key"), directory, 0o770)
    directory.chmod(0o750)
    assert Identity.load(directory / "key") == identity


@posix_only
def test_readable_known_peers_is_accepted_and_keeps_its_mode(tmp_path: Path) -> None:
    path = known_peers_file(tmp_path / "home")
    assert mode_of(path) == 0o600
    path.chmod(0o644)
    known = KnownPeers(path)
    known.remember("example.net", 7000, key("b"))
    assert mode_of(path) == 0o644
    assert known.lookup("example.org", 7000) == key("a")
    assert known.lookup("example.net", 7000) == key("b")


@posix_only
def test_new_known_peers_and_its_directories_are_private(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "known_peers"
    KnownPeers(path).remember("example.org", 7000, key("a"))
    assert mode_of(path) == 0o600
    assert mode_of(tmp_path / "a") == 0o700
    assert mode_of(tmp_path / "a" / "b") == 0o700


def test_no_checks_off_posix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    path = known_peers_file(home)
    authorized = authorized_peers_file(home)
    path.chmod(0o666)
    authorized.chmod(0o666)
    home.chmod(0o777)
    monkeypatch.setattr(_files, "CHECK_PERMISSIONS", False)
    assert KnownPeers(path).lookup("example.org", 7000) == key("a")
    assert key("a") in AuthorizedPeers(authorized)


@needs_root
def test_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    known = known_peers_file(home)
    authorized = authorized_peers_file(home)
    Identity.generate().save(home / "identity")
    for path in (known, authorized, home / "identity"):
        os.chown(path, OTHER_UID, -1)
    owner = f"owned by uid {OTHER_UID}"
    fix = "chown 0 {}"
    with pytest.raises(IdentityFileError, match=owner) as info:
        KnownPeers(known).lookup("example.org", 7000)
    assert fix.format(known) in str(info.value)
    with pytest.raises(IdentityFileError, match=owner) as info:
        AuthorizedPeers(authorized)
    assert fix.format(authorized) in str(info.value)
    with pytest.raises(IdentityFileError, match=owner) as info:
        Identity.load(home / "identity")
    assert fix.format(home / "identity") in str(info.value)


@needs_root
def test_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = known_peers_file(home)
    os.chown(home, OTHER_UID, -1)
    pattern = f"{re.escape(repr(str(home)))} .* owned by uid {OTHER_UID}"
    with pytest.raises(IdentityFileError, match=pattern) as info:
        KnownPeers(path).lookup("example.org", 7000)
    assert f"chown 0 {home}" in str(info.value)


@posix_only
def test_symlinked_known_peers_is_updated_in_place(tmp_path: Path) -> None:
    """A known_peers linked from elsewhere (dotfiles) stays a link; its target is updated."""
    target = known_peers_file(tmp_path / "dotfiles")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "known_peers").symlink_to(target)
    KnownPeers(home / "known_peers").remember("example.net", 7000, key("b"))
    assert (home / "known_peers").is_symlink()
    assert KnownPeers(target).lookup("example.net", 7000) == key("b")
    assert KnownPeers(target).lookup("example.org", 7000) == key("a")


@posix_only
def test_symlink_in_writable_directory_is_refused(tmp_path: Path) -> None:
    """Whoever can replace the link decides what is trusted, even if its target is safe."""
    target = known_peers_file(tmp_path / "safe")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "known_peers").symlink_to(target)
    known = KnownPeers(shared / "known_peers")
    assert_refused(lambda: known.lookup("example.org", 7000), shared, 0o777)


# --- the CLI: one line, exit status 1 --------------------------------------------------


@posix_only
def test_cli_reports_a_writable_stalk_home_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "stalk-home"
    before = known_peers_file(home).read_bytes()
    Identity.generate().save(home / "identity")
    home.chmod(0o775)
    monkeypatch.setenv("STALK_HOME", str(home))
    for argv in (["forget", "example.org:7000"], ["id"]):
        assert main(argv) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.count("\n") == 1
        assert err.startswith("stalk: error: permissions 0775 for directory")
        assert f"chmod go-w {home}" in err
    assert (home / "known_peers").read_bytes() == before


# --- concurrent updates -----------------------------------------------------------------

WRITER = """
import hashlib, sys
from stalk.identity import Identity
from stalk.known_peers import KnownPeers
path, proc, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
keys = [
    Identity.from_private_bytes(hashlib.sha256(f"{proc}-{i}".encode()).digest()).public
    for i in range(count)
]
known = KnownPeers(path)
print("ready", flush=True)
sys.stdin.readline()
for i, key in enumerate(keys):
    known.remember(f"host{proc}-{i}", 7000, key)
"""


@pytest.mark.skipif(not _files.HAVE_FLOCK, reason="no flock on this platform")
def test_concurrent_writers_lose_no_entry(tmp_path: Path) -> None:
    """3 processes x 60 remember() at once on one file: all 180 entries survive.

    Without the lock this lost about two thirds of the entries, and a lost entry means
    the next connection silently trusts on first use again.
    """
    processes, count = 3, 60
    path = tmp_path / "home" / "known_peers"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(p), str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in range(processes)
    ]
    try:
        for writer in writers:
            assert writer.stdout is not None
            assert writer.stdout.readline() == "ready\n"
        for writer in writers:
            assert writer.stdin is not None
            writer.stdin.write("go\n")
            writer.stdin.flush()
        for writer in writers:
            writer.communicate(timeout=60)
            assert writer.returncode == 0
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    known = KnownPeers(path)
    lost = [
        (p, i)
        for p in range(processes)
        for i in range(count)
        if known.lookup(f"host{p}-{i}", 7000) != key(f"{p}-{i}")
    ]
    assert lost == []
    assert len(path.read_text().splitlines()) == 1 + processes * count
    assert sorted(p.name for p in path.parent.iterdir()) == ["known_peers", "known_peers.lock"]


@pytest.mark.skipif(not _files.HAVE_FLOCK, reason="no flock on this platform")
def test_remember_waits_for_the_lock_and_lookup_does_not(tmp_path: Path) -> None:
    path = known_peers_file(tmp_path / "home")
    known = KnownPeers(path)
    done = threading.Event()

    def remember() -> None:
        known.remember("example.net", 7000, key("b"))
        done.set()

    with _files.locked(path.with_name("known_peers.lock")):
        worker = threading.Thread(target=remember)
        worker.start()
        started = time.monotonic()
        assert known.lookup("example.org", 7000) == key("a")
        assert time.monotonic() - started < 0.2
        assert not done.wait(0.3)
        assert known.lookup("example.net", 7000) is None
    worker.join(timeout=10)
    assert done.is_set()
    assert known.lookup("example.net", 7000) == key("b")


def test_without_flock_updates_still_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no flock (Windows) updates are unlocked but still atomic."""
    monkeypatch.setattr(_files, "HAVE_FLOCK", False)
    path = tmp_path / "home" / "known_peers"
    known = KnownPeers(path)
    known.remember("example.org", 7000, key("a"))
    assert known.forget("example.org", 7000)
    assert not known.forget("example.org", 7000)
    known.remember("example.net", 7000, key("b"))
    assert known.lookup("example.net", 7000) == key("b")
    assert sorted(p.name for p in path.parent.iterdir()) == ["known_peers"]


def test_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = known_peers_file(tmp_path / "home")
    before = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(IdentityFileError, match="No space left on device"):
        KnownPeers(path).remember("example.net", 7000, key("b"))
    monkeypatch.undo()
    assert path.read_bytes() == before
    left = sorted(p.name for p in path.parent.iterdir())
    assert left == ["known_peers", "known_peers.lock"][: 2 if _files.HAVE_FLOCK else 1]


@posix_only
def test_without_a_home_the_walk_goes_up_to_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No $HOME and no password entry (expanduser leaves "~" alone): check up to "/"."""
    parent = tmp_path / "parent"
    path = known_peers_file(parent / "user" / ".stalk")
    monkeypatch.setattr(os.path, "expanduser", lambda p: p)
    assert KnownPeers(path).lookup("example.org", 7000) == key("a")
    parent.chmod(0o777)
    assert_refused(lambda: KnownPeers(path).lookup("example.org", 7000), parent, 0o777)
