"""What the command line writes, and how a command ends.

Peer-chosen text escaped (:func:`escape`), received spacks summarized (:func:`summarize`,
:func:`full_text`), lines on stdout and stderr (a closed stdout ends the command quietly),
an error or exception group reduced to one ``stalk: error: ...`` line (:func:`_report`),
log records as single lines (:func:`_logging`), the exit statuses, and :func:`_run`, which
runs a command on the event loop ``--backend`` names.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from array import array
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final, TypeVar

import anyio

import stalk
from stalk.spack import Float32, Spack
from stalk.summary import SUMMARY_CHARS, VALUE_CHARS, plural, render
from stalk.wire import CloseCode

#: A summary states the spack's size in bytes unless it holds more values than this (all
#: containers included): counting those would take longer than the summary is worth.
SIZE_VALUES: Final = 100_000

#: The most characters of a non-stalk service's answer an error message quotes.
ANSWER_CHARS: Final = 100
#: The codes a stalk listener refuses with (SPEC "Close codes"): any other first byte of
#: its answer means the service is something else.
_REFUSAL_CODES: Final = frozenset(code for code in CloseCode if code != CloseCode.NORMAL)

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

_T = TypeVar("_T")


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
