"""Trust stores, as ssh users know them: known peers (client) and authorized peers (server).

``$STALK_HOME/known_peers`` (default ``~/.stalk/known_peers``) maps ``host:port`` (or
``unix:PATH`` for a unix domain socket) to the key seen the first time (trust on first
use); later connections pin it (IK), so a changed key is refused instead of silently
accepted. An authorized-peers file lists the public keys
a listener admits, one per line; ``AuthorizedPeers`` is usable directly as ``authorize``.

Both files are text: one entry per line, ``#`` starts a comment, blank lines are ignored.

On POSIX systems both are checked the way ssh's ``StrictModes`` checks its files before
every read: the file must be owned by us or root and not writable by group or others, and
so must every directory above it up to ``$HOME`` (or ``/``); a sticky directory such as
``/tmp`` may be writable by all. Anything else is refused with :class:`~stalk.IdentityFileError`
naming the path and the ``chmod`` that fixes it.

:class:`KnownPeers` updates are serialised between processes by an exclusive ``flock`` on
``known_peers.lock`` next to the file, and each update replaces the file atomically
(temporary file, fsync, rename, fsync of the directory), so concurrent writers lose no
entry and readers, which take no lock, always see a whole file.
"""

from __future__ import annotations

import os
import stat
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from stalk import _files
from stalk.errors import IdentityFileError
from stalk.identity import PublicIdentity

__all__ = ["AuthorizedPeers", "KnownPeers", "stalk_home"]

_KNOWN_KIND = "known peers file"
_AUTHORIZED_KIND = "authorized peers file"

#: Largest trust file read (about 200,000 known peers); a bound, not a format limit.
_MAX_TRUST_FILE_SIZE = 16 * 1024 * 1024

#: Mode of a new known_peers file; an existing file keeps its mode when it is rewritten.
_NEW_FILE_MODE = 0o600


def stalk_home() -> Path:
    """``$STALK_HOME``, or ``~/.stalk``: where identities and trust stores live."""
    return Path(os.environ.get("STALK_HOME") or Path.home() / ".stalk").expanduser()


def _address(host: str, port: int | None) -> str:
    """The entry's first field: ``host:port`` (``[::1]:7413``), or ``unix:PATH``.

    A path's whitespace, ``#`` and other bytes that would break the line are written as
    ``%XX`` (as in a URL); an abstract name (``"\\0name"``) is ``unix:@name``.

    :raises ValueError: ``port`` is ``None`` and ``host`` is not an absolute path or an
        abstract name.
    """
    if port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if host.startswith("\0"):
        name = "@" + host[1:]
    elif os.path.isabs(host):
        name = os.path.normpath(host)
    else:
        raise ValueError(
            f"a unix socket's entry needs an absolute path (or a port for a host): {host!r}"
        )
    return "unix:" + urllib.parse.quote(os.fsencode(name), safe="/@._-~+=,:")


def _read(path: Path, kind: str) -> tuple[list[tuple[int, str]], os.stat_result | None]:
    """The ``(line number, entry)`` pairs of a trust file, and its ``stat``.

    The ownership and permission checks come first; a missing file has no entries (and
    no ``stat``).
    """
    _files.check_directories(path, kind)
    found = _files.read_file(path, kind, limit=_MAX_TRUST_FILE_SIZE, missing_ok=True)
    if found is None:
        return [], None
    data, st = found
    _files.check_owner(path, st, kind)
    _files.check_not_writable_by_others(path, st, kind)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IdentityFileError(f"{kind} '{path}' is not UTF-8 text") from exc
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append((number, line))
    return lines, st


class KnownPeers:
    """The ``host:port -> key`` store a client pins keys from (``unix:PATH -> key`` too).

    Each method takes a host and a port, or a unix socket's absolute path alone
    (``known.lookup("/run/app.sock")``).

    Nothing is read until a method is called, and each call reads the file again, so
    other processes' updates are seen at once.

    :param path: the file (default ``$STALK_HOME/known_peers``); created on first write.
    :ivar path: the file, ``~`` expanded.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else stalk_home() / "known_peers"

    def _load(self, path: Path) -> tuple[dict[str, PublicIdentity], os.stat_result | None]:
        peers: dict[str, PublicIdentity] = {}
        entries, st = _read(path, _KNOWN_KIND)
        for number, line in entries:
            fields = line.split()
            if len(fields) != 2:
                raise IdentityFileError(f"{path}:{number}: expected 'HOST:PORT KEY'")
            try:
                peers[fields[0]] = PublicIdentity.from_string(fields[1])
            except ValueError as exc:
                raise IdentityFileError(f"{path}:{number}: {exc}") from exc
        return peers, st

    def lookup(self, host: str, port: int | None = None) -> PublicIdentity | None:
        """The key remembered for ``host:port``, if any. Takes no lock.

        :param host: the host as the user gave it (a name and its address are distinct
            entries); with no ``port``, a unix socket's absolute path (or a Linux abstract
            name, ``"\\0name"``).
        :param port: the TCP port; ``None`` for a unix socket.
        :returns: the remembered key, or ``None``.
        :raises ~stalk.IdentityFileError: the file is malformed, or it (or a directory
            above it) is owned by another user or writable by group or others.
        :raises ValueError: no ``port``, and ``host`` is not an absolute path.
        """
        return self._load(self.path)[0].get(_address(host, port))

    def remember(self, host: str, port: int | None, key: PublicIdentity) -> None:
        """Record (or replace) the key for ``host:port``.

        The update is made under the lock and the file is replaced atomically, so
        concurrent writers (other processes included) lose no entry.

        :param host: the host (or a unix socket's path), as for :meth:`lookup`.
        :param port: the TCP port; ``None`` for a unix socket.
        :param key: the key to pin from now on (typically ``conn.peer`` after an XX
            connection).
        :raises ~stalk.IdentityFileError: as :meth:`lookup`, or the file cannot be written.
        :raises ValueError: as :meth:`lookup`.
        """
        address = _address(host, port)

        def update(peers: dict[str, PublicIdentity]) -> bool:
            peers[address] = key
            return True

        self._update(update)

    def forget(self, host: str, port: int | None = None) -> bool:
        """Remove the entry for ``host:port``; return whether there was one.

        :param host: the host (or a unix socket's path), as for :meth:`lookup`.
        :param port: the TCP port; ``None`` for a unix socket.
        :raises ~stalk.IdentityFileError: as :meth:`remember`.
        :raises ValueError: as :meth:`lookup`.
        """
        address = _address(host, port)

        def update(peers: dict[str, PublicIdentity]) -> bool:
            return peers.pop(address, None) is not None

        return self._update(update)

    def _update(self, change: Callable[[dict[str, PublicIdentity]], bool]) -> bool:
        """Read, ``change`` and (if it returns true) rewrite the file, under the lock.

        Works on the file a symbolic link points to, so a linked known_peers stays linked.
        """
        path = Path(os.path.realpath(self.path))
        try:
            _files.make_private_dirs(path.parent)
        except OSError as exc:
            raise IdentityFileError(
                f"cannot create directory '{path.parent}': {exc.strerror or exc}"
            ) from exc
        # Check the directories before creating the lock file in one of them.
        _files.check_directories(self.path, _KNOWN_KIND)
        with _files.locked(path.with_name(path.name + ".lock")):
            peers, st = self._load(path)
            if not change(peers):
                return False
            body = (
                "# stalk known peers: HOST:PORT KEY or unix:PATH KEY "
                "(written by stalk; edit with care)\n"
            )
            body += "".join(f"{address} {key}\n" for address, key in sorted(peers.items()))
            mode = _NEW_FILE_MODE if st is None else stat.S_IMODE(st.st_mode) & 0o777
            _files.atomic_write(path, body.encode("utf-8"), mode, overwrite=True)
        return True


class AuthorizedPeers:
    """A set of public keys read from a file; call it as a listener's ``authorize`` hook.

    :param path: one printable public key per line (``stalk:...``); text after the key on
        the same line is a comment, as in ssh's ``authorized_keys``.
    :raises ~stalk.IdentityFileError: the file is missing or has a malformed line, or it
        (or a directory above it) is owned by another user or writable by group or others.
    :ivar path: the file, ``~`` expanded.
    :ivar keys: the keys read by the last successful :meth:`reload`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise IdentityFileError(f"authorized peers file {self.path} does not exist")
        self.keys: frozenset[PublicIdentity] = frozenset()
        self.reload()

    def reload(self) -> None:
        """Read the file again (e.g. after it was edited); a deleted file admits nobody.

        :raises ~stalk.IdentityFileError: as the constructor (the old keys are kept).
        """
        keys = set()
        entries, _ = _read(self.path, _AUTHORIZED_KIND)
        for number, line in entries:
            try:
                keys.add(PublicIdentity.from_string(line.split()[0]))
            except ValueError as exc:
                raise IdentityFileError(f"{self.path}:{number}: {exc}") from exc
        self.keys = frozenset(keys)

    def __contains__(self, peer: object) -> bool:
        """Whether ``peer`` is listed (compared in constant time per key)."""
        return isinstance(peer, PublicIdentity) and any(peer == key for key in self.keys)

    def __call__(self, peer: PublicIdentity) -> bool:
        """The ``authorize`` hook: admit listed peers only."""
        return peer in self

    def __len__(self) -> int:
        """How many keys are listed."""
        return len(self.keys)
