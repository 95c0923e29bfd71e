"""The ``stalk`` command line: keys, a listener, a client, the demo and the vector runner.

Every command uses only the public API and runs on asyncio or trio (``--backend``; the
global options ``--backend`` and ``-v`` are accepted before or after the command). An
expected failure is one readable line on stderr (``stalk: error: ...``) and exit status
1, never a traceback: an exception group from an anyio task group is reduced to the
errors inside it, and log records (the ``stalk`` logger's warnings, or with ``-v``/``-vv``
its INFO/DEBUG records too) are single lines as well. Ctrl-C ends any command with status
130 and standard output closed early (``stalk id | true``) with 141, both silently; a
usage error is argparse's status 2. :data:`EXIT_STATUSES` lists them for ``--help``.

An address is ``HOST:PORT`` (``[::1]:7417`` for IPv6), or ``unix:PATH`` for a unix domain
socket (``unix:@NAME`` for a Linux abstract name), in arguments and in everything the
commands print; known_peers keeps a unix socket's key under its absolute path.

Everything a peer chooses is untrusted text: a refusal reason (not even authenticated),
a CLOSE reason, the error messages that quote them, and the contents of spacks. The
command line writes such text only through :func:`escape`, which shows every character
that Python's ``repr()`` would escape as an escape sequence (``\\x1b``, ``\\u202e``), so
a peer cannot move the cursor, ring the bell, retitle the terminal, forge extra lines or
reorder a line with bidirectional controls.

Received spacks are printed as :func:`summarize` makes them (``stalk listen``, ``connect``
and ``send --wait`` alike): their bounded ``repr()`` (each ``str``/``bytes`` value
shortened to about :data:`~stalk.summary.VALUE_CHARS` characters and the line to about
:data:`~stalk.summary.SUMMARY_CHARS`) with the spack's size, built without ever making
the text of a whole large value. ``--full`` prints every value's whole ``repr()``
(:func:`full_text`), escaped the same way. ``--max-message-size`` sets
:attr:`stalk.Config.max_message_size`, the largest spack the peer may send us.
"""

from __future__ import annotations

import argparse
import ast
import codecs
import contextlib
import importlib
import io
import logging
import math
import os
import shlex
import stat
import sys
import textwrap
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeAlias, TypeVar

import anyio

import stalk
from stalk import bench  # light: the benchmark itself is imported when it runs
from stalk.certificates import Authorities, Authority, Certificate, RevocationList, utc_text
from stalk.connection import Connection, address_text
from stalk.demo import run_demo
from stalk.identity import Identity, PublicIdentity
from stalk.known_peers import AuthorizedPeers, KnownPeers, stalk_home
from stalk.renewal import (
    DEFAULT_SERVICE_NAME,
    DEFAULT_VALIDITY,
    AuthorityService,
    Enrollments,
    request_certificate,
)
from stalk.spack import Float32, Spack, SpackValue
from stalk.summary import SUMMARY_CHARS, VALUE_CHARS, plural, render
from stalk.vectors import main as vectors_main
from stalk.wire import CloseCode

__all__ = ["main"]

#: A summary states the spack's size in bytes unless it holds more values than this (all
#: containers included): counting those would take longer than the summary is worth.
SIZE_VALUES: Final = 100_000

#: The most characters of a non-stalk service's answer an error message quotes.
ANSWER_CHARS: Final = 100
#: The codes a stalk listener refuses with (SPEC "Close codes"): any other first byte of
#: its answer means the service is something else.
_REFUSAL_CODES: Final = frozenset(code for code in CloseCode if code != CloseCode.NORMAL)

#: The event loops ``--backend`` offers.
BACKENDS: Final = ("asyncio", "trio")
#: Where ``stalk listen PORT`` listens: this machine only.
DEFAULT_LISTEN_HOST: Final = "127.0.0.1"
#: How an argument names a unix domain socket: ``unix:/run/app.sock`` (``unix:@name`` for a
#: Linux abstract name).
UNIX_PREFIX: Final = "unix:"

#: Success.
EXIT_OK: Final = 0
#: An error, reported as one ``stalk: error: ...`` line.
EXIT_ERROR: Final = 1
#: A usage error (argparse's status): a bad option or argument.
EXIT_USAGE: Final = 2
#: Ctrl-C: 128 + SIGINT, the status a shell reports for a command a Ctrl-C ended.
EXIT_INTERRUPTED: Final = 130
#: Standard output closed early (``stalk id | true``): 128 + SIGPIPE, as for ``yes | true``.
EXIT_OUTPUT_CLOSED: Final = 141

#: The exit statuses, as ``--help`` lists them.
EXIT_STATUSES: Final = f"""exit status:
  {EXIT_OK}    success (connect: also when the peer closes the connection cleanly)
  {EXIT_ERROR}    an error, reported as one line: stalk: error: ...
  {EXIT_USAGE}    a usage error: a bad option or argument
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C), silently
  {EXIT_OUTPUT_CLOSED}  standard output closed early (as by | head), silently"""

#: How ``connect`` and ``send`` read a value (one function: :func:`parse_value`).
VALUES: Final = (
    "VALUE: a Python literal when it reads as one (42, -1.5, True, None, b'raw', 'text', "
    "[1, 2], (1, 2) for a tuple, {'k': 1}), else the text itself (hello world). Quote a "
    "number to send it as text: \"'42'\"."
)
#: How ``connect`` and ``send`` decide whom to trust, and which identity they use.
TRUST: Final = (
    "Trust works as in ssh: --peer KEY pins the server's key; without it the key "
    "remembered for the ADDRESS in $STALK_HOME/known_peers is pinned, and the first "
    "connection to an address records the key the server presents. With --authority FILE "
    "--name NAME the server is trusted by its certificate instead: it must present one "
    "for NAME from an authority in FILE. Your identity is FILE, or $STALK_HOME/identity "
    "if it exists, else a new key for this connection."
)

_T = TypeVar("_T")
#: Where a command connects or listens: ``(host, port)``, or a unix socket's path.
_Address: TypeAlias = "tuple[str, int] | str"
#: What ``add_subparsers`` returns.
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


class _Output:
    """Standard output, which its reader may close before we are done (``stalk id | head``).

    Once a write finds the pipe closed, the rest of the output goes to ``/dev/null`` (so
    that the flush at exit fails no more), :attr:`stop` is cancelled, and the command ends
    with status :data:`EXIT_OUTPUT_CLOSED`, without a word.
    """

    def __init__(self) -> None:
        self.closed = False
        #: What to cancel when the output closes: the scope a long-running command serves in.
        self.stop: anyio.CancelScope | None = None

    def reset(self) -> None:
        """Forget a previous command (:func:`main` may run several times in a process)."""
        self.closed = False
        self.stop = None

    def stop_with(self, scope: anyio.CancelScope) -> None:
        """Cancel ``scope`` when the output closes (at once if it already has)."""
        self.stop = scope
        if self.closed:
            scope.cancel()

    def say(self, text: str) -> None:
        """Print ``text`` as a line; a closed pipe ends the command, as :meth:`close` says."""
        if self.closed:
            return
        try:
            print(text, flush=True)
        except BrokenPipeError:
            self.close()

    def close(self) -> None:
        """The reader has gone: send the rest to ``/dev/null`` and stop the command."""
        self.closed = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, sys.stdout.fileno())
            finally:
                os.close(devnull)
        if self.stop is not None:
            self.stop.cancel()


_OUTPUT: Final = _Output()


def _say(text: str) -> None:
    """A line on standard output."""
    _OUTPUT.say(text)


def _note(text: str) -> None:
    """A line on standard error (errors, status such as ``recorded key``), if it is open."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)


# -- printing what a peer sent --------------------------------------------------------------


def escape(text: str) -> str:
    """Return ``text`` with every character ``repr()`` escapes written as its escape.

    That is every character :meth:`str.isprintable` refuses: the C0 controls (ESC, BEL,
    CR, LF, TAB...), DEL, the C1 controls U+0080..U+009F (CSI is U+009B), the format
    characters (category Cf: the bidirectional marks, embeddings, overrides and isolates
    U+200E/F, U+202A..U+202E, U+2066..U+2069, U+061C, zero-width characters, U+FEFF, the
    soft hyphen, tag characters), the line and paragraph separators U+2028/U+2029, every
    space but U+0020, surrogates, private-use and unassigned code points. Escapes are the
    ones ``repr()`` writes (``\\x1b``, ``\\n``, ``\\u202e``, ``\\U000e0041``), so escaped
    text reads like the ``repr()`` of a spack. Backslashes are left alone: what a peer
    sends can look like an escape, but can never act as one.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _utf8_length(text: str) -> int:
    """The length of ``text`` in UTF-8, without encoding a large string all at once."""
    if text.isascii():
        return len(text)
    step = 1 << 16
    return sum(len(text[i : i + step].encode("utf-8")) for i in range(0, len(text), step))


def _length_header(length: int, fix_limit: int, widths: tuple[int, ...]) -> int:
    """Bytes of a msgpack length header: one for the fix form, else a tag and 1/2/4 bytes."""
    if length < fix_limit:
        return 1
    return next((1 + w for w in widths if length < 1 << (8 * w)), 1 + widths[-1])


def _ext_size(payload: int) -> int:
    """Bytes of a msgpack ext value (fixext for 1/2/4/8/16 bytes, else ext 8/16/32)."""
    return payload + (
        2 if payload in (1, 2, 4, 8, 16) else _length_header(payload, 0, (1, 2, 4)) + 1
    )


def _int_size(value: int) -> int:
    """Bytes of a msgpack int: a fixint, else a tag and the narrowest of 1/2/4/8 bytes."""
    if -32 <= value < 128:
        return 1
    if value >= 0:
        return next(1 + w for w in (1, 2, 4, 8) if value < 1 << (8 * w) or w == 8)
    return next(1 + w for w in (1, 2, 4, 8) if value >= -(1 << (8 * w - 1)) or w == 8)


class _TooManyValues(Exception):
    """Raised inside :func:`encoded_size` when its budget of values runs out."""


def _size(value: Any, budget: list[int]) -> int:
    """The encoded size of ``value``; ``budget[0]`` counts down the container elements."""
    kind = type(value)
    if value is None or kind is bool:
        return 1
    if kind is int:
        return _int_size(value)
    if kind is Float32:
        return 6
    if kind is float:
        return 9
    if kind is str:
        length = _utf8_length(value)
        return length + _length_header(length, 32, (1, 2, 4))
    if kind is bytes or kind is bytearray or kind is memoryview:
        length = memoryview(value).nbytes
        return length + _length_header(length, 0, (1, 2, 4))
    if kind is array:
        return _ext_size(len(value) * value.itemsize)
    budget[0] -= len(value)
    if budget[0] < 0:
        raise _TooManyValues
    if kind is list:
        return _length_header(len(value), 16, (2, 4)) + sum(_size(v, budget) for v in value)
    if kind is tuple:
        payload = _length_header(len(value), 16, (2, 4)) + sum(_size(v, budget) for v in value)
        return _ext_size(payload)
    if kind is dict:
        items = sum(_size(k, budget) + _size(v, budget) for k, v in value.items())
        return _length_header(len(value), 16, (2, 4)) + items
    raise TypeError(f"not a spack value: {kind.__qualname__}")


def encoded_size(values: Sequence[Any], *, max_values: int = SIZE_VALUES) -> int | None:
    """The length of the spack encoding of ``values`` (SPEC.md section 19), or ``None``.

    Computed from lengths, without encoding anything or copying a ``bytes`` value or an
    ASCII string: ``encoded_size(spack)`` equals ``len(spack.encode())``. Every
    value inside a container is one Python step, so a spack holding more than
    ``max_values`` values (counting those in nested containers) is not counted: the answer
    is ``None`` after at most that many steps.
    """
    try:
        return _size(list(values), [max_values])
    except _TooManyValues:
        return None


def summarize(
    spack: Spack, *, value_chars: int = VALUE_CHARS, total_chars: int = SUMMARY_CHARS
) -> str:
    """A one-line, escaped, bounded rendering of ``spack``.

    A spack that fits reads exactly as its ``repr()``. A longer one shows each ``str`` and
    ``bytes`` value up to about ``value_chars`` characters followed by
    ``... (N more bytes)`` (``characters`` for a string), stops listing the values of a
    container once the line reaches ``total_chars`` with ``... (N more values)`` (as
    ``repr()`` does, see :func:`stalk.summary.render`), and ends with ``(spack of N
    bytes, M values; --full prints it all)`` (the size is left out for a spack of more than
    :data:`SIZE_VALUES` values in all). Only the parts shown are ever turned into text, so
    a 16 MiB value costs a 200-byte slice, not a 64 MiB repr.
    """
    text, shortened = render(spack, value_chars=value_chars, total_chars=total_chars)
    if shortened:
        size, count = encoded_size(spack), len(spack)
        values = f"{count} {plural(count, 'value')}"
        if size is None:
            text += f" (spack of {values}, over {SIZE_VALUES} in all; --full prints it all)"
        else:
            text += f" (spack of {size} bytes, {values}; --full prints it all)"
    return escape(text)


def full_text(spack: Spack) -> str:
    """Every value of ``spack`` in full, as ``Spack(...)`` with each value's ``repr()``."""
    return f"Spack({', '.join(map(repr, spack))})"


def _show(spack: Spack, args: argparse.Namespace) -> str:
    """What the command prints for a received spack: its summary, or with --full all of it."""
    return escape(full_text(spack)) if args.full else summarize(spack)


def _foreign_answer(exc: BaseException) -> str | None:
    """What a service that is not a stalk listener answered, when ``exc`` shows one.

    A stalk listener's verdict is ``00`` or a refusal with a registered code and a UTF-8
    reason; anything else in :attr:`stalk.HandshakeFailed.verdict` came from another
    service (an HTTP server's ``HTTP/1.1 400`` reads as refusal code 72). Its first line is
    shown, decoded with ``\\xNN`` for bytes that are not UTF-8, cut to
    :data:`ANSWER_CHARS` characters and escaped: it is untrusted text.
    """
    if not isinstance(exc, stalk.HandshakeFailed) or not exc.verdict:
        return None
    verdict = exc.verdict
    if verdict[0] in _REFUSAL_CODES and isinstance(
        exc, (stalk.PeerRefused, stalk.PeerIdentityMismatch)
    ):
        return None
    first = verdict.split(b"\n", 1)[0].removesuffix(b"\r") or verdict
    text = first.decode("utf-8", "backslashreplace")
    if len(text) > ANSWER_CHARS:
        text = text[:ANSWER_CHARS] + "..."
    return f"this does not look like a stalk listener: it answered '{escape(text)}'"


def _error_text(exc: BaseException) -> str:
    """One exception as text: its message, or its type when the message is empty."""
    foreign = _foreign_answer(exc)
    if foreign is not None:
        return foreign
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    known = (CommandError, stalk.StalkError, OSError, ValueError)
    text = str(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}"
    return text or type(exc).__name__


def _leaf_errors(exc: BaseException) -> list[BaseException]:
    """``exc`` itself, or the errors inside it if it is an exception group.

    Groups are recognised by their ``exceptions`` tuple: the built-in BaseExceptionGroup
    from Python 3.11 and the ``exceptiongroup`` backport that anyio uses on 3.10 both have
    one, and no import is needed on either.
    """
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple) and inner and all(isinstance(e, BaseException) for e in inner):
        return [leaf for sub in inner for leaf in _leaf_errors(sub)]
    return [exc]


def _report(exc: BaseException) -> int:
    """Report what ended a command; return its exit status.

    Ctrl-C anywhere in it (trio wraps KeyboardInterrupt in an exception group) is status
    130 and a closed standard output (``BrokenPipeError``: stalk reports its sockets'
    errors as its own) is 141, both silently. Anything else is one escaped
    ``stalk: error:`` line and status 1: an exception group (a task group failed) is
    reduced to the errors that explain it, dropping cancellations and "we closed the
    connection" when another error caused the close, each distinct message once.
    """
    leaves = _leaf_errors(exc)
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return EXIT_INTERRUPTED
    if any(isinstance(leaf, BrokenPipeError) for leaf in leaves):
        _OUTPUT.close()
        return EXIT_OUTPUT_CLOSED
    # Cancellations (asyncio.CancelledError, trio.Cancelled) are BaseExceptions only.
    leaves = [leaf for leaf in leaves if isinstance(leaf, Exception)] or leaves
    causes = [leaf for leaf in leaves if not isinstance(leaf, anyio.ClosedResourceError)]
    messages = dict.fromkeys(_error_text(leaf) for leaf in causes or leaves)
    _note(f"stalk: error: {escape('; '.join(messages))}")
    return EXIT_ERROR


class _LogLine(logging.Handler):
    """Writes log records as single escaped lines on stderr, tracebacks omitted.

    The listener logs errors of single connections (their text may quote a peer); the
    command line shows them, and anything another library logs, as one line each
    (``stalk: warning: ...``) instead of Python's default output.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += f": {_error_text(record.exc_info[1])}"
            if record.name != "stalk" and not record.name.startswith("stalk."):
                text = f"{record.name}: {text}"
            _note(f"stalk: {record.levelname.lower()}: {escape(text)}")
        except Exception:  # noqa: BLE001 -- as logging.StreamHandler does
            self.handleError(record)


@contextlib.contextmanager
def _logging(verbose: int) -> Iterator[None]:
    """While a command runs: log records as :class:`_LogLine` s, the library's at ``verbose``.

    Warnings and errors only by default; ``-v`` adds the ``stalk`` loggers' INFO records
    (connections established and ended; failed and refused clients of ``stalk listen``),
    ``-vv`` their DEBUG records. Other
    libraries' warnings are shown as well (never a traceback). The previous set-up is
    restored afterwards, so calling :func:`main` in a process changes nothing else.
    """
    root, library = logging.getLogger(), logging.getLogger("stalk")
    levels = root.level, library.level
    handler = _LogLine()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    library.setLevel(
        logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    )
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        library.setLevel(levels[1])


def _run(args: argparse.Namespace, func: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``func`` on the event loop ``--backend`` names; say how to get trio if missing."""
    if args.backend == "trio":
        try:
            importlib.import_module("trio")
        except ImportError:
            raise CommandError(
                "the trio backend is not installed: pip install 'stalk[trio]'"
            ) from None
    return anyio.run(func, backend=args.backend)


def _config(args: argparse.Namespace) -> stalk.Config:
    if args.max_message_size is None:
        return stalk.Config()
    return stalk.Config(max_message_size=args.max_message_size)


# -- reading the command line ---------------------------------------------------------------


def _address(text: str, *, default_host: str | None = None) -> _Address:
    """Where to connect or listen, as an argument names it.

    ``HOST:PORT`` (``[::1]:7417`` for IPv6), ``PORT`` alone given a default host, or
    ``unix:PATH`` (a unix domain socket: the path made absolute; ``unix:@NAME``: a Linux
    abstract name, ``"\\0NAME"``).
    """
    if text.startswith(UNIX_PREFIX):
        path = text[len(UNIX_PREFIX) :]
        if not path or path == "@":
            raise argparse.ArgumentTypeError(f"expected unix:PATH, got {escape(repr(text))}")
        return "\0" + path[1:] if path.startswith("@") else os.path.abspath(path)
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_host is None:
            raise argparse.ArgumentTypeError(
                f"expected HOST:PORT or unix:PATH, got {escape(repr(text))}"
            )
        host, port = default_host, text
    host = host.strip("[]") or (default_host or "")
    if not host:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT or unix:PATH, got {escape(repr(text))}"
        )
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {escape(repr(port))}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} out of range (0-65535)")
    return host, number


def _listen_address(text: str) -> _Address:
    """``[HOST:]PORT`` or ``unix:PATH`` for ``stalk listen``: the host defaults to 127.0.0.1."""
    return _address(text, default_host=DEFAULT_LISTEN_HOST)


def _peer_key(text: str) -> PublicIdentity:
    """The server key given to ``--peer``; a fingerprint is refused with how to get the key."""
    if text.startswith("SHA256:"):
        raise argparse.ArgumentTypeError(
            f"{escape(text)} is a fingerprint, not a key: --peer takes the server's public "
            "key, stalk:..., which 'stalk id' prints on the server (as does the first line "
            "of 'stalk listen')"
        )
    try:
        return PublicIdentity.from_string(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _message_size(text: str) -> int:
    """A ``--max-message-size`` that :class:`stalk.Config` accepts."""
    try:
        size = int(text)
        stalk.Config(max_message_size=size)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return size


def _socket_mode(text: str) -> int:
    """A unix socket file's mode, in octal (``600``, ``0o660``)."""
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {escape(repr(text))}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text} out of range (0-777)")
    return mode


def _seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {escape(repr(text))}") from None
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text}")
    return seconds


def parse_value(text: str) -> SpackValue:
    """One spack value as ``send`` reads each VALUE and ``connect`` each line (:data:`VALUES`).

    A Python literal (``42``, ``-1.5``, ``b'raw'``, ``[1, 2]``, ``'42'``) is that value;
    any other text is the text itself.
    """
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text
    return value  # type: ignore[no-any-return]


def _send_value(text: str) -> SpackValue:
    """A ``send`` VALUE: :func:`parse_value`, refused at once if a spack cannot carry it."""
    value = parse_value(text)
    try:
        Spack(value).encode()
    except stalk.InvalidSpackValue as exc:
        reason = str(exc).removeprefix("spack element 0: ")
        raise argparse.ArgumentTypeError(f"{escape(text)}: {reason}") from None
    return value


def _identity_path(value: str | None) -> Path:
    return Path(value).expanduser() if value else stalk_home() / "identity"


def _load_identity(path: Path, given: str | None) -> Identity:
    """Our identity from ``path``; a missing one says how to create it."""
    try:
        return Identity.load(path)
    except stalk.IdentityFileError as exc:
        hint = ""
        if not path.exists() and not path.is_symlink():
            command = "stalk keygen" + (f" -f {shlex.quote(given)}" if given else "")
            hint = f"; create one with '{command}'"
        raise CommandError(f"{exc}{hint}") from exc


# -- keys ---------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write a new identity."""
    path = _identity_path(args.file)
    if path.exists() and not args.force:
        raise CommandError(f"{path} already exists (use --force to replace it)")
    identity = Identity.generate()
    identity.save(path, overwrite=args.force)
    _say(f"wrote {path} (private, mode 0600) and {path}.pub")
    _say(f"{identity.public}  {identity.public.fingerprint}")
    return EXIT_OK


def cmd_id(args: argparse.Namespace) -> int:
    """Print our public key and fingerprint."""
    identity = _load_identity(_identity_path(args.file), args.file)
    _say(str(identity.public))
    _say(identity.public.fingerprint)
    return EXIT_OK


def cmd_forget(args: argparse.Namespace) -> int:
    """Remove a host's key from known_peers."""
    address: _Address = args.address
    host, port = (address, None) if isinstance(address, str) else address
    if KnownPeers().forget(host, port):
        _say(f"forgot the key of {address_text(address)}")
        return EXIT_OK
    raise CommandError(f"no known key for {address_text(address)}")


# -- authorities and certificates ------------------------------------------------------------

#: Units a ``--valid`` duration may end with, in seconds.
_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: What ``--valid`` accepts, for its help and its errors.
DURATION_FORMAT: Final = "a number and a unit, s, m, h, d or w: 90m, 24h, 30d; seconds if no unit"


def _duration(text: str) -> int:
    """A ``--valid`` DURATION in whole seconds: ``24h``, ``90m``, ``30d``, ``3600``."""
    number, unit = text.strip(), "s"
    if number[-1:].lower() in _DURATION_UNITS:
        number, unit = number[:-1], number[-1:].lower()
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {escape(repr(text))} ({DURATION_FORMAT})"
        ) from None
    seconds = value * _DURATION_UNITS[unit]
    if not 1 <= seconds <= 100 * 365 * 86400:
        raise argparse.ArgumentTypeError(
            f"a duration must be between 1 second and 100 years, not {escape(text)}"
        )
    return round(seconds)


def _serial(text: str) -> int:
    try:
        serial = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a serial number: {escape(repr(text))}") from None
    if not 0 <= serial < 2**64:
        raise argparse.ArgumentTypeError(f"a serial is between 0 and 2^64-1, not {serial}")
    return serial


def _key_argument(text: str) -> PublicIdentity:
    """A stalk key named on the command line; a fingerprint is refused with how to get the key."""
    if text.startswith("SHA256:"):
        raise argparse.ArgumentTypeError(
            f"{escape(text)} is a fingerprint, not a key: give the public key, stalk:..., "
            "which 'stalk id' prints"
        )
    try:
        return PublicIdentity.from_string(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _authority_path(value: str | None) -> Path:
    return Path(value).expanduser() if value else stalk_home() / "authority"


def _load_authority(path: Path, given: str | None) -> Authority:
    """The authority's key pair from ``path``; a missing one says how to create it."""
    try:
        return Authority.load(path)
    except stalk.IdentityFileError as exc:
        hint = ""
        if not path.exists() and not path.is_symlink():
            command = "stalk authority init" + (f" -f {shlex.quote(given)}" if given else "")
            hint = f"; create one with '{command}'"
        raise CommandError(f"{exc}{hint}") from exc


def cmd_authority_init(args: argparse.Namespace) -> int:
    """Write a new authority key pair; print its public form."""
    path = _authority_path(args.file)
    if path.exists() and not args.force:
        raise CommandError(f"{path} already exists (use --force to replace it)")
    authority = Authority.generate()
    authority.save(path, overwrite=args.force)
    _say(f"wrote {path} (private, mode 0600) and {path}.pub")
    _say(f"{authority.public}  {authority.public.fingerprint}")
    return EXIT_OK


def cmd_authority_sign(args: argparse.Namespace) -> int:
    """Issue a certificate for KEY."""
    authority = _load_authority(_authority_path(args.file), args.file)
    now = int(time.time())
    try:
        cert = authority.sign(
            args.key,
            args.name,
            args.group or (),
            not_before=now,
            not_after=now + args.valid,
            serial=args.serial,
        )
    except ValueError as exc:
        raise CommandError(f"cannot sign: {exc}") from exc
    if args.output is None:
        _say(cert.to_string().rstrip("\n"))
        return EXIT_OK
    path = Path(args.output).expanduser()
    if path.exists() and not args.force:
        raise CommandError(f"{path} already exists (use --force to replace it)")
    cert.save(path, overwrite=args.force)
    _say(f"wrote {path}")
    for line in cert.describe()[1:]:
        _say(f"  {line}")
    return EXIT_OK


def cmd_authority_revoke(args: argparse.Namespace) -> int:
    """Add serials and keys to the authority's revocation list file (made if missing)."""
    authority = _load_authority(_authority_path(args.file), args.file)
    path = Path(args.output).expanduser()
    serials = set(args.serial or ())
    keys = set(args.key or ())
    for cert_path in args.cert or ():
        cert = Certificate.load(cert_path)
        if cert.issuer != authority.public.digest:
            raise CommandError(
                f"{cert_path} was issued by {cert.issuer_fingerprint}, not by this authority "
                f"({authority.public.fingerprint})"
            )
        serials.add(cert.serial)
    issued_at = int(time.time())
    if path.exists():
        current = RevocationList.load(path)
        try:
            Authorities([authority.public], [current])
        except stalk.RevocationListError as exc:
            raise CommandError(f"{path} is not this authority's revocation list: {exc}") from exc
        serials |= current.serials
        keys |= current.subjects
        issued_at = max(issued_at, current.issued_at + 1)  # newer, even with a clock behind
    try:
        revocations = authority.revoke(serials, keys, issued_at=issued_at)
    except ValueError as exc:
        raise CommandError(f"cannot revoke: {exc}") from exc
    revocations.save(path, overwrite=True)
    serial_count, key_count = len(revocations.serials), len(revocations.subjects)
    _say(
        f"wrote {path}: {serial_count} {plural(serial_count, 'serial')} and {key_count} "
        f"{plural(key_count, 'key')} revoked"
    )
    return EXIT_OK


def cmd_authority_serve(args: argparse.Namespace) -> int:
    """Serve certificate renewals for enrolled keys until Ctrl-C."""
    host, port = _tcp_only(args.address, "authority serve")
    authority = _load_authority(_authority_path(args.file), args.file)
    enrollments = Enrollments(args.enrolled)
    identity = (
        _load_identity(Path(args.identity).expanduser(), args.identity) if args.identity else None
    )

    async def serve() -> None:
        try:
            service = await AuthorityService.create(
                host,
                port,
                authority=authority,
                enrollments=enrollments,
                identity=identity,
                valid=args.valid,
                name=args.name,
                config=_config(args),
            )
        except OSError as exc:
            raise CommandError(
                f"cannot listen on {address_text((host, port))}: {exc.strerror or exc}"
            ) from exc
        async with service:
            bound = address_text(service.address)
            _say(f"serving certificates on {bound} as {args.name!r}")
            _say(f"signed by {authority.public}  {authority.public.fingerprint}")
            count = len(enrollments)
            _say(
                f"{count} {plural(count, 'key')} enrolled in {enrollments.path}; each "
                f"certificate valid {args.valid} s"
            )
            with anyio.CancelScope() as serving:
                _OUTPUT.stop_with(serving)
                await service.serve()

    _run(args, serve)
    return EXIT_OK


def _tcp_only(address: _Address, command: str) -> tuple[str, int]:
    """``HOST:PORT``: the online authority serves and is reached over TCP only."""
    if isinstance(address, str):
        raise CommandError(f"{command} works over TCP: give HOST:PORT, not unix:PATH")
    return address


def cmd_cert_renew(args: argparse.Namespace) -> int:
    """Ask an authority service for a new certificate for our identity; write it."""
    host, port = _tcp_only(args.address, "cert renew")
    path = _identity_path(args.file)
    identity = _load_identity(path, args.file)
    authorities = _authorities(args)
    if authorities is None:
        raise CommandError("cert renew needs --authority: the authority that runs the service")

    async def renew() -> Certificate:
        return await request_certificate(
            host,
            port,
            identity=identity,
            authorities=authorities,
            service_name=args.service_name,
            config=_config(args),
        )

    cert = _run(args, renew)
    output = Path(args.output).expanduser()
    cert.save(output, overwrite=True)
    _say(f"wrote {output}")
    for line in cert.describe()[1:]:
        _say(f"  {line}")
    return EXIT_OK


def cmd_cert_show(args: argparse.Namespace) -> int:
    """Print a certificate; with --authority, check it against those authorities now."""
    cert = Certificate.load(args.certificate)
    for line in cert.describe():
        _say(line)
    if args.authority is None:
        if args.revocations is not None:
            raise CommandError("--revocations needs --authority")
        return EXIT_OK
    trusted = Authorities.load(args.authority)
    if args.revocations is not None:
        trusted.add_revocations(RevocationList.load(args.revocations))
    trusted.verify(cert, now=time.time())
    _say(f"valid now, signed by {cert.issuer_fingerprint} (trusted), not revoked")
    return EXIT_OK


def _authorities(args: argparse.Namespace, *, load_revocations: bool = True) -> Authorities | None:
    """The authorities of ``--authority FILE`` (with ``--revocations``' list), or ``None``."""
    if not args.authority:
        if args.revocations:
            raise CommandError("--revocations needs --authority")
        return None
    authorities = Authorities.load(args.authority)
    if load_revocations and args.revocations:
        authorities.add_revocations(RevocationList.load(args.revocations))
    return authorities


def _own_certificate(
    args: argparse.Namespace, identity: Identity | None, path: Path
) -> Certificate | None:
    """The certificate of ``--certificate CERT``, checked to be for our identity."""
    if args.certificate is None:
        return None
    cert = Certificate.load(args.certificate)
    if identity is None:
        raise CommandError(
            f"--certificate needs the identity it was issued for, and {path} does not exist "
            "(give it with -f FILE)"
        )
    if cert.subject != identity.public:
        raise CommandError(
            f"{args.certificate} is a certificate for {cert.subject.fingerprint}, not for "
            f"your identity {identity.public.fingerprint} ({path})"
        )
    return cert


def _describe_certificate(cert: Certificate) -> str:
    """One line for a certificate: its name, groups and validity (all visible ASCII)."""
    groups = f" (groups {', '.join(cert.groups)})" if cert.groups else ""
    return f"certificate {cert.name!r}{groups}, valid until {utc_text(cert.not_after)}"


def _certified(conn: Connection) -> str:
    """What a connection line adds for a peer with a verified certificate."""
    cert = conn.peer_certificate
    if cert is None:
        return ""
    groups = f", groups {', '.join(cert.groups)}" if cert.groups else ""
    return f", certified as {cert.name!r}{groups}"


def _listener_trust(args: argparse.Namespace, identity: Identity, path: Path) -> dict[str, Any]:
    """``listen``'s certificate options, checked: the listener's keyword arguments."""
    authorities = _authorities(args, load_revocations=False)
    if authorities is None and (args.allow_name or args.allow_group):
        raise CommandError("--allow-name and --allow-group need --authority")
    return {
        "certificate": _own_certificate(args, identity, path),
        "authorities": authorities,
        "allow_names": args.allow_name,
        "allow_groups": args.allow_group,
        "revocations": args.revocations,
    }


def _say_trust(listener: stalk.StreamListener, args: argparse.Namespace) -> None:
    """``listen``'s banner lines for its certificate, authorities and revocations."""
    if listener.certificate is not None:
        _say(f"presenting {_describe_certificate(listener.certificate)}")
    if listener.authorities is not None:
        _say(f"admitting {_admitted(args)} certified by {_fingerprints(listener.authorities)}")
    if listener.revocations is not None:
        _say(f"revocations from {listener.revocations.path}, reloaded when it changes")


def _fingerprints(authorities: Authorities) -> str:
    return ", ".join(authority.fingerprint for authority in authorities)


def _admitted(args: argparse.Namespace) -> str:
    """Whom ``listen --authority`` admits, as its banner says it."""
    names = [repr(name) for name in args.allow_name or ()]
    groups = [f"group {group!r}" for group in args.allow_group or ()]
    return " or ".join(names + groups) if names or groups else "any client"


# -- serving ------------------------------------------------------------------------------


def cmd_listen(args: argparse.Namespace) -> int:
    """Serve: print peers and a summary of their spacks (or echo them)."""
    address: _Address = args.address
    if args.socket_mode is not None and not isinstance(address, str):
        raise CommandError("--socket-mode is for a unix socket (unix:PATH)")
    path = _identity_path(args.file)
    if args.file is None and not path.exists():
        Identity.generate().save(path)
        _say(f"created a new identity in {path}")
    identity = _load_identity(path, args.file)
    authorize = AuthorizedPeers(args.authorized_peers) if args.authorized_peers else None
    config = _config(args)
    trust = _listener_trust(args, identity, path)

    async def handler(conn: Connection) -> None:
        who = conn.peer.fingerprint
        where = "?"
        if conn.host is not None and conn.port is not None:
            where = address_text((conn.host, conn.port))
        elif conn.path is not None:
            where = address_text(conn.path)
        _say(f"peer {who} connected ({conn.pattern}) from {where}{_certified(conn)}")
        ending = ""
        try:
            async for spack in conn:
                _say(f"{who}: {_show(spack, args)}")
                if args.echo:
                    await conn.send(spack)
        except stalk.StalkError as exc:
            ending = f": {escape(_error_text(exc))}"
        finally:
            _say(f"peer {who} disconnected{ending}")

    async def serve() -> None:
        listener: stalk.StreamListener
        try:
            if isinstance(address, str):
                listener = await stalk.create_unix_listener(
                    address,
                    identity=identity,
                    authorize=authorize,
                    config=config,
                    mode=args.socket_mode,
                    **trust,
                )
            else:
                listener = await stalk.create_listener(
                    *address, identity=identity, authorize=authorize, config=config, **trust
                )
        except OSError as exc:
            raise CommandError(
                f"cannot listen on {address_text(address)}: {exc.strerror or exc}"
            ) from exc
        async with listener:
            _say(f"listening on {address_text(listener.address)} as {identity.public}")
            _say(f"fingerprint {identity.public.fingerprint}")
            _say_trust(listener, args)
            with anyio.CancelScope() as serving:
                _OUTPUT.stop_with(serving)
                await listener.serve(handler)

    _run(args, serve)
    return EXIT_OK


# -- dialling ------------------------------------------------------------------------------


async def _dial(args: argparse.Namespace) -> Connection:
    """Connect with ssh-like trust: --peer, else known_peers (IK), else XX and remember.

    With --authority, the server's certificate is the trust instead: known_peers is
    neither read nor written.
    """
    where: _Address = args.address
    host, port = (where, None) if isinstance(where, str) else where
    address = address_text(where)
    path = _identity_path(args.file)
    identity = _load_identity(path, args.file) if args.file or path.exists() else None
    authorities = _authorities(args)
    if authorities is not None and args.name is None:
        raise CommandError("--authority needs --name: the name the server's certificate must bear")
    if authorities is None and args.name is not None:
        raise CommandError("--name needs --authority: the authorities that certify names")
    certificate = _own_certificate(args, identity, path)
    if authorities is not None:
        return await _connect(
            where,
            args.peer,
            identity=identity,
            config=_config(args),
            certificate=certificate,
            authorities=authorities,
            expect_name=args.name,
        )
    known = KnownPeers()
    peer: PublicIdentity | None = args.peer or known.lookup(host, port)
    try:
        conn = await _connect(
            where, peer, identity=identity, config=_config(args), certificate=certificate
        )
    except stalk.PeerIdentityMismatch:
        if args.peer or peer is None:
            raise
        presented = await _presented_key(where)
        raise CommandError(
            f"THE KEY OF {address} HAS CHANGED. Expected {peer.fingerprint} (from "
            f"{known.path}), the peer now presents {presented}. Someone may be "
            f"intercepting the connection. If the change is legitimate, run "
            f"'stalk forget {shlex.quote(address)}' and connect again."
        ) from None
    if peer is None:
        known.remember(host, port, conn.peer)
        _note(f"stalk: recorded key {conn.peer.fingerprint} for {address} in {known.path}")
    return conn


async def _connect(
    where: _Address,
    peer: PublicIdentity | None = None,
    *,
    identity: Identity | None = None,
    config: stalk.Config | None = None,
    certificate: Certificate | None = None,
    authorities: Authorities | None = None,
    expect_name: str | None = None,
) -> Connection:
    """``stalk.connect``, or ``stalk.connect_unix`` for a path."""
    trust: dict[str, Any] = {
        "certificate": certificate,
        "authorities": authorities,
        "expect_name": expect_name,
    }
    if isinstance(where, str):
        return await stalk.connect_unix(where, peer, identity=identity, config=config, **trust)
    return await stalk.connect(*where, peer, identity=identity, config=config, **trust)


async def _presented_key(where: _Address) -> str:
    try:
        async with await _connect(where) as probe:
            return probe.peer.fingerprint
    except stalk.StalkError:
        return "an unknown key"


def cmd_send(args: argparse.Namespace) -> int:
    """Send one spack; with --wait print one reply."""
    spack = Spack(*args.values)

    async def run() -> None:
        async with await _dial(args) as conn:
            await conn.send(spack)
            if args.wait is not None:
                try:
                    with anyio.fail_after(args.wait):
                        reply = await conn.receive()
                except TimeoutError:
                    raise CommandError(f"no reply within {args.wait:g} s") from None
                except anyio.EndOfStream:
                    raise CommandError("the peer closed the connection without replying") from None
                _say(_show(reply, args))

    _run(args, run)
    return EXIT_OK


async def _stdin_lines() -> AsyncIterator[str]:
    """The lines of standard input, without their line endings.

    A terminal, pipe or socket is read from its file descriptor once it is readable, so
    that waiting for input is cancellable: when the server ends the session, or on
    Ctrl-C, ``stalk connect`` ends at once instead of after the next line. Anything else
    (a regular file, ``/dev/null``) never blocks for long and is read in a worker thread.
    """
    fd = -1
    if sys.platform != "win32" and sys.stdin is not None:
        try:
            fd = sys.stdin.fileno()
            mode = os.fstat(fd).st_mode
        except (OSError, ValueError):
            fd = -1
        else:
            if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)):
                fd = -1
    if fd < 0:
        async for line in anyio.wrap_file(sys.stdin):
            yield line.rstrip("\n")
        return
    decoder = codecs.getincrementaldecoder(sys.stdin.encoding or "utf-8")(errors="replace")
    pending: list[str] = []
    while True:
        await anyio.wait_readable(fd)
        data = os.read(fd, 1 << 16)
        text = decoder.decode(data, final=not data)
        if "\n" in text:
            *lines, rest = "".join([*pending, text]).split("\n")
            pending = [rest]
            for line in lines:
                yield line.removesuffix("\r")
        else:
            pending.append(text)
        if not data:
            break
    if last := "".join(pending):
        yield last


async def _send_lines(conn: Connection, ended: anyio.Event) -> None:
    """Send each line of standard input as a spack of one value, then EOF (CLOSE normal).

    A line whose value a spack cannot carry (``{1, 2}`` is a set) is reported and skipped.
    """
    async for line in _stdin_lines():
        try:
            await conn.send(Spack(parse_value(line)))
        except (stalk.InvalidSpackValue, stalk.MessageTooLarge) as exc:
            _note(f"stalk: not sent: {escape(str(exc))}")
    ended.set()
    await conn.send_eof()


def cmd_connect(args: argparse.Namespace) -> int:
    """Send each stdin line as a spack; print what comes back until the peer closes."""

    async def run() -> None:
        async with await _dial(args) as conn:
            typing = sys.stdin is not None and sys.stdin.isatty()
            hint = "; each line is sent as a spack, Ctrl-D ends" if typing else ""
            _note(f"connected to {conn.peer.fingerprint} ({conn.pattern}){_certified(conn)}{hint}")
            input_ended = anyio.Event()
            async with anyio.create_task_group() as tg:
                _OUTPUT.stop_with(tg.cancel_scope)
                tg.start_soon(_send_lines, conn, input_ended)
                async for spack in conn:
                    _say(_show(spack, args))
                # The peer closed cleanly: stop waiting for input.
                tg.cancel_scope.cancel()
            if not input_ended.is_set() and not _OUTPUT.closed:
                _note("stalk: the peer closed the connection")

    _run(args, run)
    return EXIT_OK


# -- tools --------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the self-checking loopback demo."""
    return EXIT_OK if _run(args, run_demo) else EXIT_ERROR


def cmd_vectors(args: argparse.Namespace) -> int:
    """Run published Noise test vectors through stalk's Noise layer."""
    return vectors_main([*(["-v"] if args.verbose else []), *args.files], prog="stalk")


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark stalk against TLS 1.3 and plain TCP (see src/stalk/bench/README.md)."""
    if args.backends is None and args.backend_given:
        args.backends = args.backend
    return bench.run_from_args(args)


# -- the parser -----------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Fills each paragraph of a description or epilog on its own; indented lines stay."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in text.split("\n\n"):
            if any(line.startswith(" ") for line in block.splitlines()):
                blocks.append("\n".join(indent + line for line in block.splitlines()))
            else:
                blocks.append(
                    textwrap.fill(
                        " ".join(block.split()),
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent,
                    )
                )
        return "\n\n".join(blocks)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _global_options(parser: argparse.ArgumentParser, prefix: str) -> None:
    """``--backend`` and ``-v``, on the main parser and on each command's alike.

    Each parser stores them under its own names (``prefix``), so that an option given
    before the command and one given after it both count (see :func:`_resolve_globals`).
    """
    group = parser.add_argument_group("global options (before or after the command)")
    group.add_argument(
        "--backend",
        dest=f"{prefix}backend",
        choices=BACKENDS,
        help="the event loop (default: asyncio; trio needs pip install 'stalk[trio]')",
    )
    group.add_argument(
        "-v",
        "--verbose",
        dest=f"{prefix}verbose",
        action="count",
        default=0,
        help="show the library's log: -v adds info (connections established and ended, "
        "failed and refused clients of listen), -vv debug (default: warnings only)",
    )


def _resolve_globals(args: argparse.Namespace) -> None:
    """One ``backend`` and ``verbose`` from the options before and after the command."""
    backend = args.backend or args.global_backend
    args.backend_given = backend is not None
    args.backend = backend or "asyncio"
    args.verbose += args.global_verbose


def _command(
    commands: _Commands, name: str, summary: str, description: str, *examples: str
) -> argparse.ArgumentParser:
    """A command's parser: its help line, description, examples and the global options."""
    sub = commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=f"{_examples(*examples)}\n\n{EXIT_STATUSES}",
        formatter_class=_HelpFormatter,
    )
    _global_options(sub, "")
    return sub


def _identity_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "-f",
        "--file",
        metavar="FILE",
        help="your identity file (default: $STALK_HOME/identity; $STALK_HOME defaults to ~/.stalk)",
    )


def _peer_data_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--full",
        action="store_true",
        help="print received spacks whole (default: a summary of about "
        f"{SUMMARY_CHARS} characters, each text or bytes value cut to about {VALUE_CHARS}); "
        "control and bidi characters are escaped either way",
    )
    sub.add_argument(
        "--max-message-size",
        type=_message_size,
        metavar="BYTES",
        help="the largest encoded spack accepted from the peer, advertised to it "
        f"(stalk.Config.max_message_size, default {stalk.Config().max_message_size})",
    )


#: What an ADDRESS argument may be, as the help of connect, send and forget says it.
ADDRESS_HELP: Final = (
    "HOST:PORT ([::1]:7417 for IPv6), or unix:PATH for a unix domain socket "
    "(unix:@NAME: a Linux abstract name)"
)


def _dial_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "address", type=_address, metavar="ADDRESS", help=f"the listener: {ADDRESS_HELP}"
    )
    sub.add_argument(
        "--peer",
        type=_peer_key,
        metavar="KEY",
        help="pin the server's public key, stalk:... (what 'stalk id' prints on the server, "
        "not its SHA256: fingerprint); default: the key remembered in "
        "$STALK_HOME/known_peers, or trust on first use",
    )
    sub.add_argument(
        "--authority",
        metavar="FILE",
        help="trust the server by its certificate instead: FILE lists the authorities "
        "(stalk-authority:... lines) one of which must have issued it, for --name; "
        "known_peers is then not used",
    )
    sub.add_argument("--name", help="with --authority: the name the server's certificate must bear")
    _revocations_option(sub, "")
    _certificate_option(sub, "the server")
    _identity_option(sub)
    _peer_data_options(sub)


def _revocations_option(sub: argparse.ArgumentParser, reloaded: str) -> None:
    sub.add_argument(
        "--revocations",
        metavar="LIST",
        help="with --authority: refuse the certificates the revocation list LIST revokes"
        + reloaded,
    )


def _certificate_option(sub: argparse.ArgumentParser, whom: str) -> None:
    sub.add_argument(
        "--certificate",
        metavar="CERT",
        help=f"present this certificate (issued for your identity) to {whom}, which may "
        "require one",
    )


def _key_commands(commands: _Commands) -> None:
    """``keygen``, ``id`` and ``forget``."""
    sub = _command(
        commands,
        "keygen",
        "create your identity (a static key pair)",
        "Create an identity: the static X25519 key pair that names you to your peers. The "
        "private key is written to FILE with mode 0600, the public key to FILE.pub. An "
        "existing identity is kept unless --force is given.",
        "stalk keygen",
        "stalk keygen -f ./server.key",
    )
    _identity_option(sub)
    sub.add_argument("--force", action="store_true", help="replace an existing identity")
    sub.set_defaults(run=cmd_keygen)

    sub = _command(
        commands,
        "id",
        "print your public key and fingerprint",
        "Print your public key (stalk:..., what peers pin with --peer or list in an "
        "authorized-peers file) and, on a second line, its fingerprint (SHA256:..., to "
        "compare by eye). Create the identity first with 'stalk keygen'.",
        "stalk id",
        "stalk id -f ./server.key | head -1",
    )
    _identity_option(sub)
    sub.set_defaults(run=cmd_id)

    sub = _command(
        commands,
        "forget",
        "remove a remembered key from known_peers",
        "Remove the key remembered for ADDRESS from $STALK_HOME/known_peers, after a "
        "legitimate key change (the server has a new identity); the next connection "
        "records the key the server presents then.",
        "stalk forget 127.0.0.1:7417",
        "stalk forget '[::1]:7417'",
        "stalk forget unix:/run/app.sock",
    )
    sub.add_argument("address", type=_address, metavar="ADDRESS", help=ADDRESS_HELP)
    sub.set_defaults(run=cmd_forget)


def _authority_commands(commands: _Commands) -> None:
    """``authority init``, ``authority sign``, ``authority revoke`` and ``cert show``."""
    group = commands.add_parser(
        "authority",
        help="an authority: create it, sign certificates, revoke them",
        description="An authority is an Ed25519 key pair that signs certificates: 'this "
        "stalk key is NAME, in these groups, until then'. Peers that trust the authority "
        "accept the keys it certified without pinning them (SPEC.md section 25).",
        formatter_class=_HelpFormatter,
    )
    authority = group.add_subparsers(
        dest="authority_command", required=True, metavar="COMMAND", title="commands"
    )
    sub = _command(
        authority,
        "init",
        "create an authority key pair",
        "Create an authority: an Ed25519 key pair. The private key is written to FILE with "
        "mode 0600 (default: $STALK_HOME/authority), the public key to FILE.pub; the public "
        "form, stalk-authority:..., printed on the last line, is what peers put in their "
        "authorities file. An existing authority is kept unless --force is given.",
        "stalk authority init",
        "stalk authority init -f ./ca.key | tail -1 > authorities",
    )
    _authority_option(sub)
    sub.add_argument("--force", action="store_true", help="replace an existing authority")
    sub.set_defaults(run=cmd_authority_init)

    sub = _command(
        authority,
        "sign",
        "issue a certificate for a stalk key",
        "Issue a certificate: KEY (a stalk:... public key, what 'stalk id' prints) is NAME, "
        "in each GROUP, from now for DURATION. It is written to CERT_FILE (or printed) as a "
        "'#' description and a stalk-certificate: line. A name or group is 1 to 128 (a "
        "group 1 to 32) visible ASCII characters, no spaces; at most 16 groups.",
        "stalk authority sign --name db-1 --group db --valid 24h stalk:... -o db-1.cert",
        "stalk authority sign -f ./ca.key --name alice --valid 30d stalk:...",
    )
    _authority_option(sub)
    sub.add_argument("key", type=_key_argument, metavar="KEY", help="the stalk:... key to certify")
    sub.add_argument("--name", required=True, help="the name the certificate gives KEY")
    sub.add_argument(
        "--group",
        action="append",
        metavar="GROUP",
        help="a group the certificate puts KEY in (repeat for several)",
    )
    sub.add_argument(
        "--valid",
        type=_duration,
        required=True,
        metavar="DURATION",
        help=f"how long the certificate is valid from now: {DURATION_FORMAT}",
    )
    sub.add_argument(
        "--serial",
        type=_serial,
        metavar="N",
        help="the serial number to revoke it by (default: 64 random bits)",
    )
    sub.add_argument(
        "-o", "--output", metavar="CERT_FILE", help="where to write it (default: print it)"
    )
    sub.add_argument("--force", action="store_true", help="replace an existing CERT_FILE")
    sub.set_defaults(run=cmd_authority_sign)

    sub = _command(
        authority,
        "revoke",
        "add certificates or keys to a revocation list",
        "Revoke certificates by serial (--serial, or --cert naming a certificate file), or "
        "every certificate of a key (--key): the signed revocation list LIST_FILE gets them "
        "added to what it already revokes (it is created if missing, even empty) and is "
        "replaced atomically. A listener given the file reloads it when it changes.",
        "stalk authority revoke --cert db-1.cert -o revoked",
        "stalk authority revoke --serial 42 --key stalk:... -o revoked",
    )
    _authority_option(sub)
    sub.add_argument("--serial", type=_serial, action="append", metavar="N", help="a serial")
    sub.add_argument(
        "--key", type=_key_argument, action="append", metavar="KEY", help="a stalk:... key"
    )
    sub.add_argument(
        "--cert", action="append", metavar="CERT_FILE", help="a certificate file to revoke"
    )
    sub.add_argument(
        "-o", "--output", required=True, metavar="LIST_FILE", help="the revocation list file"
    )
    sub.set_defaults(run=cmd_authority_revoke)

    sub = _command(
        authority,
        "serve",
        "renew certificates online for enrolled keys",
        "Run the authority as a stalk service on [HOST:]PORT: keys enrolled in --enrolled "
        "FILE (lines 'stalk:KEY NAME [GROUP,GROUP...]', read again when it changes) "
        "connect and get a new certificate for their NAME and GROUPs, valid for --valid "
        "from then ('stalk cert renew', or stalk.CertificateKeeper in a program); any other "
        "key is refused. The service presents its own certificate from the authority, for "
        "--name, so clients need only the authority's public key. Its stalk identity is a "
        "new key each time unless --identity is given (never the authority's own key). "
        "HOST defaults to 127.0.0.1. Ctrl-C stops.",
        "stalk authority serve 7418 --enrolled enrolled --valid 24h",
        "stalk authority serve 0.0.0.0:7418 -f ca.key --enrolled enrolled --valid 1h -v",
    )
    sub.add_argument("address", type=_listen_address, metavar="[HOST:]PORT")
    _authority_option(sub)
    sub.add_argument(
        "--enrolled",
        required=True,
        metavar="FILE",
        help="who may renew, and as what: lines stalk:KEY NAME [GROUP,GROUP...]",
    )
    sub.add_argument(
        "--valid",
        type=_duration,
        default=DEFAULT_VALIDITY,
        metavar="DURATION",
        help=f"validity of each certificate issued: {DURATION_FORMAT} (default: 24h)",
    )
    sub.add_argument(
        "--name",
        default=DEFAULT_SERVICE_NAME,
        help=f"the name of the service's own certificate (default: {DEFAULT_SERVICE_NAME})",
    )
    sub.add_argument(
        "--identity",
        metavar="FILE",
        help="the service's stalk identity file (default: a new key each time)",
    )
    sub.set_defaults(max_message_size=None)
    sub.set_defaults(run=cmd_authority_serve)

    group = commands.add_parser(
        "cert",
        help="show a certificate (and check it)",
        description="Certificates signed by an authority (see 'stalk authority').",
        formatter_class=_HelpFormatter,
    )
    cert = group.add_subparsers(
        dest="cert_command", required=True, metavar="COMMAND", title="commands"
    )
    sub = _command(
        cert,
        "show",
        "print a certificate's fields; --authority checks it",
        "Print what CERT_FILE says: name, groups, the key it is for, its validity, serial "
        "and issuer. With --authority FILE (a file of stalk-authority: lines), also check "
        "it now, as a peer would: exit status 1 and the reason if it is not valid "
        "(unknown authority, forged, expired, revoked with --revocations...).",
        "stalk cert show db-1.cert",
        "stalk cert show db-1.cert --authority authorities --revocations revoked",
    )
    sub.add_argument("certificate", metavar="CERT_FILE", help="a certificate file")
    sub.add_argument("--authority", metavar="FILE", help="check it against the authorities in FILE")
    sub.add_argument(
        "--revocations", metavar="LIST_FILE", help="with --authority: a revocation list"
    )
    sub.set_defaults(run=cmd_cert_show)

    sub = _command(
        cert,
        "renew",
        "get a new certificate from an authority service",
        "Ask the authority service at HOST:PORT ('stalk authority serve') for a new "
        "certificate for your identity (FILE, or $STALK_HOME/identity), which the service "
        "must have enrolled, and write it to CERT_FILE (replacing it). The service is "
        "trusted by its own certificate: from an authority in --authority FILE, for the "
        "name --service-name. The new certificate is checked before it is written.",
        "stalk cert renew ca.example:7418 --authority authorities -o me.cert",
    )
    sub.add_argument("address", type=_address, metavar="HOST:PORT", help="the service")
    sub.add_argument(
        "--authority",
        required=True,
        metavar="FILE",
        help="the authorities (stalk-authority:... lines) one of which runs the service",
    )
    sub.add_argument(
        "--service-name",
        default=DEFAULT_SERVICE_NAME,
        metavar="NAME",
        help=f"the name of the service's certificate (default: {DEFAULT_SERVICE_NAME})",
    )
    sub.add_argument("-o", "--output", required=True, metavar="CERT_FILE", help="where to write it")
    sub.set_defaults(revocations=None, max_message_size=None)
    _identity_option(sub)
    sub.set_defaults(run=cmd_cert_renew)


def _authority_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "-f",
        "--file",
        metavar="AUTHORITY_FILE",
        help="the authority's private key file (default: $STALK_HOME/authority)",
    )


def _network_commands(commands: _Commands) -> None:
    """``listen``, ``connect`` and ``send``."""
    sub = _command(
        commands,
        "listen",
        "accept connections; print (or echo) what peers send",
        "Accept stalk connections on [HOST:]PORT, or on a unix domain socket (unix:PATH); "
        "print each peer that connects, a summary of each spack it sends, and how it left. "
        "With --echo, send every spack back. "
        f"HOST defaults to {DEFAULT_LISTEN_HOST} (this machine only); 0.0.0.0 or '[::]' "
        "accepts other machines. PORT 0 picks a free port (the first line shows it). A "
        "unix socket's file is removed when listen stops; one left by a listener that was "
        "killed is replaced. The identity is FILE, or $STALK_HOME/identity, created on "
        "first use. With --authority, only clients presenting a valid certificate from one "
        "of its authorities are admitted (and, with --allow-name or --allow-group, only "
        "those names or groups); --certificate presents ours, so that clients connect by "
        "name. Refused and failed clients are shown with -v. Ctrl-C stops.",
        "stalk listen 7417 --echo",
        "stalk listen 0.0.0.0:7417 --authorized-peers ~/.stalk/authorized_peers -v",
        "stalk listen 7417 --authority authorities --certificate db-1.cert --allow-group ops",
        "stalk listen '[::1]:0'",
        "stalk listen unix:/tmp/app.sock --socket-mode 660",
    )
    sub.add_argument(
        "address",
        type=_listen_address,
        metavar="ADDRESS",
        help="[HOST:]PORT, or unix:PATH for a unix domain socket (unix:@NAME: a Linux "
        "abstract name)",
    )
    sub.add_argument("--echo", action="store_true", help="send every spack back to its peer")
    sub.add_argument(
        "--authorized-peers",
        metavar="FILE",
        help="admit only the keys in FILE (one stalk:... key per line, # comments); "
        "default: admit any key",
    )
    sub.add_argument(
        "--socket-mode",
        type=_socket_mode,
        metavar="MODE",
        help="a unix socket file's permissions, in octal: 600 lets only you connect, 660 "
        "your group too (default: what the umask gives; connecting needs write permission)",
    )
    sub.add_argument(
        "--authority",
        metavar="FILE",
        help="admit only clients with a valid certificate from an authority in FILE "
        "(stalk-authority:... lines, # comments); default: no certificate needed",
    )
    sub.add_argument(
        "--allow-name",
        action="append",
        metavar="NAME",
        help="with --authority: admit certificates for NAME (repeat for several)",
    )
    sub.add_argument(
        "--allow-group",
        action="append",
        metavar="GROUP",
        help="with --authority: admit certificates in GROUP (repeat; a name or a group "
        "admits; default: any certified client)",
    )
    _revocations_option(sub, " (read again when it changes, at the next client)")
    _certificate_option(sub, "clients")
    _identity_option(sub)
    _peer_data_options(sub)
    sub.set_defaults(run=cmd_listen)

    sub = _command(
        commands,
        "connect",
        "send each line of input as a spack; print the replies",
        "Connect to ADDRESS, send each line of standard input as a spack of one value "
        "(read as a VALUE, below), and print every spack that comes back. Ctrl-D (the end "
        "of input) closes the connection cleanly once the peer has finished; Ctrl-C leaves "
        "at once. When the peer closes first, connect says so and exits at once, with "
        f"status 0 for a clean close and 1 for an error.\n\n{TRUST}\n\n{VALUES}",
        "stalk connect 127.0.0.1:7417",
        "printf '42\\nhello\\n' | stalk connect 127.0.0.1:7417 --peer stalk:...",
        "stalk connect unix:/tmp/app.sock",
        "stalk connect db.example:7417 --authority authorities --name db-1 --certificate me.cert",
    )
    _dial_options(sub)
    sub.set_defaults(run=cmd_connect)

    sub = _command(
        commands,
        "send",
        "send one spack and exit; --wait prints the reply",
        "Send one spack made of the VALUEs to ADDRESS and exit. With --wait, print the "
        f"first spack that comes back.\n\n{TRUST}\n\n{VALUES}",
        "stalk send 127.0.0.1:7417 42 hello \"b'raw'\" --wait 5",
        "stalk send 127.0.0.1:7417 \"'42'\"    # the text 42, not the number",
    )
    _dial_options(sub)
    sub.add_argument(
        "values",
        nargs="+",
        type=_send_value,
        metavar="VALUE",
        help="a Python literal, or text (see VALUE above)",
    )
    sub.add_argument(
        "--wait",
        type=_seconds,
        metavar="SECONDS",
        help="print the first reply, waiting at most SECONDS for it (default: do not wait)",
    )
    sub.set_defaults(run=cmd_send)


def _tool_commands(commands: _Commands) -> None:
    """``demo``, ``vectors`` and ``bench``."""
    sub = _command(
        commands,
        "demo",
        "self-checking demo on loopback (no setup needed)",
        "Run a self-checking demo on loopback: a listener, a first connection (XX) and a "
        "pinned one (IK), a spack of every value type and a 20 MiB spack checked byte for "
        "byte, and a wrong pinned key refused. Nothing outside a temporary directory is "
        "touched; the status is 0 only if every check passed.",
        "stalk demo",
        "stalk demo --backend trio",
    )
    sub.set_defaults(run=cmd_demo)

    sub = _command(
        commands,
        "vectors",
        "run published Noise test vectors",
        "Run published Noise test vector files (the cacophony and snow formats) through "
        "stalk's Noise layer and print how many passed, failed and were skipped (patterns "
        "and primitives stalk does not use); -v lists every vector.",
        "stalk vectors snow.txt cacophony.txt",
    )
    sub.add_argument("files", nargs="+", metavar="FILE", help="a vector file")
    sub.set_defaults(run=cmd_vectors)

    sub = _command(
        commands,
        "bench",
        "benchmark stalk against TLS 1.3 and plain TCP",
        "Benchmark stalk against TLS 1.3 and plain TCP, each side in its own process "
        "(src/stalk/bench/README.md explains every figure). --backend X is short for "
        "--backends X.",
        "stalk bench --quick",
        "stalk bench --smoke --backends asyncio",
    )
    bench.add_arguments(sub)
    sub.set_defaults(run=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    examples = _examples("stalk keygen", "stalk listen 7417 --echo", "stalk demo --backend trio")
    parser = argparse.ArgumentParser(
        prog="stalk",
        description="End-to-end encrypted, message-based connections over TCP or unix "
        "sockets: keys, a listener, a client, the demo and tools. 'stalk COMMAND --help' "
        "describes each command.",
        epilog=f"{examples}\n\n{EXIT_STATUSES}",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stalk {stalk.__version__}")
    _global_options(parser, "global_")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", title="commands"
    )
    _key_commands(commands)
    _authority_commands(commands)
    _network_commands(commands)
    _tool_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stalk`` console script; returns the exit status.

    Usage errors exit through ``SystemExit`` (status 2) as argparse does; every other
    ending is a status from :data:`EXIT_STATUSES`.
    """
    _OUTPUT.reset()
    for stream in (sys.stdout, sys.stderr):
        # Printable text a terminal's encoding cannot represent is escaped, not an error.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
        _resolve_globals(args)
        with _logging(args.verbose):
            status = int(args.run(args))
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 -- every failure is one line, never a traceback
        return _report(exc)
    return EXIT_OUTPUT_CLOSED if _OUTPUT.closed else status


if __name__ == "__main__":
    raise SystemExit(main())
