"""Trust stores, as ssh users know them: known peers (client) and authorized peers (server).

``$STALK_HOME/known_peers`` (default ``~/.stalk/known_peers``) maps ``host:port`` to the
key seen the first time (trust on first use); later connections pin it (IK), so a changed
key is refused instead of silently accepted. An authorized-peers file lists the public keys
a listener admits, one per line; ``AuthorizedPeers`` is usable directly as ``authorize``.

Both files are text: one entry per line, ``#`` starts a comment, blank lines are ignored.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from stalk.errors import IdentityFileError
from stalk.identity import PublicIdentity

__all__ = ["AuthorizedPeers", "KnownPeers", "stalk_home"]


def stalk_home() -> Path:
    """``$STALK_HOME``, or ``~/.stalk``: where identities and trust stores live."""
    return Path(os.environ.get("STALK_HOME") or Path.home() / ".stalk").expanduser()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _entries(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityFileError(f"cannot read {path}: {exc}") from exc
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append((number, line))
    return lines


class KnownPeers:
    """The ``host:port -> key`` store a client pins keys from.

    :param path: the file (default ``$STALK_HOME/known_peers``); created on first write.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else stalk_home() / "known_peers"

    def _load(self) -> dict[str, PublicIdentity]:
        peers: dict[str, PublicIdentity] = {}
        for number, line in _entries(self.path):
            fields = line.split()
            if len(fields) != 2:
                raise IdentityFileError(f"{self.path}:{number}: expected 'HOST:PORT KEY'")
            try:
                peers[fields[0]] = PublicIdentity.from_string(fields[1])
            except ValueError as exc:
                raise IdentityFileError(f"{self.path}:{number}: {exc}") from exc
        return peers

    def lookup(self, host: str, port: int) -> PublicIdentity | None:
        """The key remembered for ``host:port``, if any.

        :raises ~stalk.IdentityFileError: the file is malformed.
        """
        return self._load().get(_address(host, port))

    def remember(self, host: str, port: int, key: PublicIdentity) -> None:
        """Record (or replace) the key for ``host:port``; the file is rewritten atomically."""
        peers = self._load()
        peers[_address(host, port)] = key
        self._write(peers)

    def forget(self, host: str, port: int) -> bool:
        """Remove the entry for ``host:port``; return whether there was one."""
        peers = self._load()
        if peers.pop(_address(host, port), None) is None:
            return False
        self._write(peers)
        return True

    def _write(self, peers: dict[str, PublicIdentity]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        body = "# stalk known peers: HOST:PORT KEY (written by stalk; edit with care)\n"
        body += "".join(f"{address} {key}\n" for address, key in sorted(peers.items()))
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".known_peers.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(body)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class AuthorizedPeers:
    """A set of public keys read from a file; call it as a listener's ``authorize`` hook.

    :param path: one printable public key per line (``stalk:...``); text after the key on
        the same line is a comment, as in ssh's ``authorized_keys``.
    :raises ~stalk.IdentityFileError: the file is missing or has a malformed line.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise IdentityFileError(f"authorized peers file {self.path} does not exist")
        self.keys: frozenset[PublicIdentity] = frozenset()
        self.reload()

    def reload(self) -> None:
        """Read the file again (e.g. after it was edited)."""
        keys = set()
        for number, line in _entries(self.path):
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
