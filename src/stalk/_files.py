"""File helpers shared by key files and trust stores (identity.py, known_peers.py).

- Reading: :func:`read_file` reads a bounded regular file and returns its ``stat`` taken on
  the open descriptor, so checks apply to the very file that was read.
- Trust checks, modelled on ssh's ``StrictModes`` (``safe_path`` in OpenSSH's
  ``misc.c``): :func:`check_owner`, :func:`check_not_writable_by_others` for a file and
  :func:`check_directories` for every directory above it up to ``$HOME`` (or ``/``). They
  apply on POSIX systems only (:data:`CHECK_PERMISSIONS`).
- Writing: :func:`atomic_write` (temporary file created ``O_EXCL`` in the same directory,
  fsync, rename, fsync of the directory) and :func:`make_private_dirs` (mode 0700).
- Serialising read-modify-write updates between processes: :func:`locked` (``flock``).

This module does file I/O on purpose; it is not part of the sans-IO core.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, overload

from stalk.errors import IdentityFileError

try:
    import fcntl
except ImportError:  # Windows has no flock: updates there are not serialised.
    HAVE_FLOCK = False
else:
    HAVE_FLOCK = True

#: Whether ownership and permission bits are checked. POSIX permission bits mean nothing
#: useful on other platforms, so there is no check there.
CHECK_PERMISSIONS = os.name == "posix"

#: Group- and other-writable bits: whoever holds them can change what we trust.
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def quoted(path: Path) -> str:
    """``path`` quoted for a shell command in an error message."""
    return shlex.quote(str(path))


@overload
def read_file(
    path: Path, kind: str, *, limit: int, missing_ok: Literal[False] = False
) -> tuple[bytes, os.stat_result]: ...


@overload
def read_file(
    path: Path, kind: str, *, limit: int, missing_ok: Literal[True]
) -> tuple[bytes, os.stat_result] | None: ...


def read_file(
    path: Path, kind: str, *, limit: int, missing_ok: bool = False
) -> tuple[bytes, os.stat_result] | None:
    """Read a regular file of at most ``limit`` bytes; return its contents and ``stat``.

    The type check and the returned ``stat`` come from the open descriptor, so they
    describe the file actually read (no race with a rename in between). ``O_NONBLOCK``
    keeps a FIFO from hanging us; it is ignored for regular files.

    :param kind: what the file is, for error messages (``"identity file"``).
    :param missing_ok: return ``None`` for a missing file instead of raising.
    :raises IdentityFileError: the file is missing, not a regular file, too large or
        unreadable.
    """
    flags = (
        os.O_RDONLY
        | getattr(os, "O_BINARY", 0)
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_NONBLOCK", 0)
    )
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        if missing_ok:
            return None
        raise IdentityFileError(f"{kind} '{path}' does not exist") from exc
    except OSError as exc:
        raise IdentityFileError(f"cannot open {kind} '{path}': {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IdentityFileError(f"{kind} '{path}' is not a regular file")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, limit + 1 - total):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise IdentityFileError(f"{kind} '{path}' is too large (over {limit} bytes)")
        return b"".join(chunks), st
    except OSError as exc:
        raise IdentityFileError(f"cannot read {kind} '{path}': {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _trusted_owner(uid: int) -> bool:
    """Whether a file owned by ``uid`` may be trusted: ours or root's."""
    return uid in (0, os.geteuid())


def check_owner(path: Path, st: os.stat_result, kind: str) -> None:
    """Refuse a file owned by someone other than us or root (POSIX only).

    :raises IdentityFileError: naming the file, its owner and the ``chown`` that fixes it.
    """
    if CHECK_PERMISSIONS and not _trusted_owner(st.st_uid):
        raise IdentityFileError(
            f"{kind} '{path}' is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}) "
            f"or root: refusing to trust it. Fix it with: chown {os.geteuid()} {quoted(path)}"
        )


def check_not_writable_by_others(path: Path, st: os.stat_result, kind: str) -> None:
    """Refuse a file that group or others can write (POSIX only).

    :raises IdentityFileError: naming the file, its mode and the ``chmod`` that fixes it.
    """
    mode = stat.S_IMODE(st.st_mode)
    if CHECK_PERMISSIONS and mode & _WRITABLE_BY_OTHERS:
        raise IdentityFileError(
            f"permissions {mode:04o} for {kind} '{path}' are too open: it must not be "
            f"writable by group or others. Fix it with: chmod go-w {quoted(path)}"
        )


def _directory_chain(start: Path, home: Path | None) -> Iterator[Path]:
    """``start`` and its ancestors, up to and including ``home`` if met, else up to ``/``."""
    directory = start
    while True:
        yield directory
        if directory in (home, directory.parent):
            return
        directory = directory.parent


def check_directories(path: Path, kind: str) -> None:
    """Refuse ``path`` if a directory above it could be changed by someone else (POSIX only).

    Every directory from the one holding ``path`` up to ``$HOME`` (included) or, for a
    path outside ``$HOME``, up to ``/`` must be owned by us or root and must not be
    writable by group or others, as ssh's ``StrictModes`` requires. One exception: a
    directory with the sticky bit (``/tmp``, mode 1777) may be writable by all, because
    in it only a file's owner can rename or delete that file.

    Both the path as given and the path with symbolic links resolved are checked: the
    first guards the links themselves, the second the directories they lead to.
    Directories that do not exist yet are skipped (nothing in them can be trusted).

    :raises IdentityFileError: naming the directory, its mode and the ``chmod`` (or
        ``chown``) that fixes it.
    """
    if not CHECK_PERMISSIONS:
        return
    lexical_home: Path | None = None
    real_home: Path | None = None
    home = os.path.expanduser("~")
    # expanduser leaves "~" alone when there is no $HOME and no password entry: then
    # every walk goes up to "/".
    if home != "~":
        lexical_home, real_home = Path(os.path.abspath(home)), Path(os.path.realpath(home))
    lexical = Path(os.path.abspath(path)).parent
    resolved = Path(os.path.realpath(path)).parent
    chains = [_directory_chain(resolved, real_home)]
    if lexical != resolved:
        chains.append(_directory_chain(lexical, lexical_home))
    for chain in chains:
        for directory in chain:
            try:
                st = os.stat(directory)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise IdentityFileError(
                    f"cannot check directory '{directory}' holding {kind} '{path}': "
                    f"{exc.strerror or exc}"
                ) from exc
            _check_directory(directory, st, kind, path)


def _check_directory(directory: Path, st: os.stat_result, kind: str, path: Path) -> None:
    if not _trusted_owner(st.st_uid):
        raise IdentityFileError(
            f"directory '{directory}' holding {kind} '{path}' is owned by uid {st.st_uid}, "
            f"not by you (uid {os.geteuid()}) or root: refusing to trust it. Fix it with: "
            f"chown {os.geteuid()} {quoted(directory)}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & _WRITABLE_BY_OTHERS and not mode & stat.S_ISVTX:
        raise IdentityFileError(
            f"permissions {mode:04o} for directory '{directory}' holding {kind} '{path}' "
            f"are too open: it must not be writable by group or others. Fix it with: "
            f"chmod go-w {quoted(directory)}"
        )


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing ancestors, each with mode 0700.

    (``os.makedirs`` applies ``mode`` only to the last component.)

    :raises OSError: a directory cannot be created.
    """
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort; POSIX only)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file in the same directory.

    The temporary file is created ``O_EXCL`` with ``mode`` (less what the umask removes),
    so it is never readable beyond ``mode``, even for a moment. With ``overwrite`` true
    it is renamed over ``path``; with ``overwrite`` false the final step is a hard link,
    which fails atomically if ``path`` exists (two processes saving at once cannot clobber
    each other); filesystems without hard links fall back to an exists-check plus
    ``os.replace``. The directory is fsynced afterwards so the rename survives a crash.

    :raises IdentityFileError: ``path`` exists and ``overwrite`` is false, or writing fails.
    """
    if not overwrite and os.path.lexists(path):
        raise exists_error(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = (
        os.O_CREAT
        | os.O_EXCL
        | os.O_WRONLY
        | getattr(os, "O_BINARY", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    try:
        fd = os.open(tmp, flags, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise exists_error(path) from None
                except OSError:
                    # No hard links here (some network or FAT filesystems).
                    if os.path.lexists(path):
                        raise exists_error(path) from None
                    os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    except OSError as exc:
        raise IdentityFileError(f"cannot write '{path}': {exc.strerror or exc}") from exc
    fsync_dir(path.parent)


def exists_error(path: Path) -> IdentityFileError:
    """The error for refusing to replace an existing file."""
    return IdentityFileError(f"'{path}' already exists; pass overwrite=True to replace it")


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created 0600 if missing) while inside.

    The lock file is never deleted: deleting it would let two processes lock two
    different files of the same name. The lock is released when the descriptor is closed,
    also when the process dies. Without ``flock`` (Windows) this does nothing, so
    concurrent updates there can lose each other's changes.

    :raises IdentityFileError: the lock file cannot be opened or locked.
    """
    if not HAVE_FLOCK:
        yield
        return
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(lock_path, flags, 0o600)
    except OSError as exc:
        raise IdentityFileError(
            f"cannot open lock file '{lock_path}': {exc.strerror or exc}"
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise IdentityFileError(f"cannot lock '{lock_path}': {exc.strerror or exc}") from exc
        yield
    finally:
        os.close(fd)
