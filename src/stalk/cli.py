"""The ``stalk`` command line: keys, a listener, a client, the demo and the vector runner.

Every command uses only the public API. Errors are one readable line on stderr
(``stalk: error: ...``) and a non-zero exit status, never a traceback: an exception group
from an anyio task group is reduced to the errors inside it, and ``stalk listen`` writes
the ``stalk`` logger's warnings as single lines too.

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
import io
import logging
import os
import stat
import sys
from array import array
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import anyio

import stalk
from stalk import bench  # light: the benchmark itself is imported when it runs
from stalk.connection import Connection
from stalk.demo import run_demo
from stalk.identity import Identity, PublicIdentity
from stalk.known_peers import AuthorizedPeers, KnownPeers, stalk_home
from stalk.spack import Float32, Spack, SpackValue
from stalk.summary import SUMMARY_CHARS, VALUE_CHARS, plural, render
from stalk.vectors import main as vectors_main

__all__ = ["main"]

#: A summary states the spack's size in bytes unless it holds more values than this (all
#: containers included): counting those would take longer than the summary is worth.
SIZE_VALUES: Final = 100_000


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


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


def _error_text(exc: BaseException) -> str:
    """One exception as text: its message, or its type when the message is empty."""
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
    """Print ``exc`` as one ``stalk: error:`` line (escaped); return the exit status.

    An exception group (a task group failed) is reduced to the errors that explain it:
    cancellations are dropped, and so is "we closed the connection" when another error
    caused the close. Each distinct message appears once.
    """
    leaves = _leaf_errors(exc)
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return 130
    # Cancellations (asyncio.CancelledError, trio.Cancelled) are BaseExceptions only.
    leaves = [leaf for leaf in leaves if isinstance(leaf, Exception)] or leaves
    causes = [leaf for leaf in leaves if not isinstance(leaf, anyio.ClosedResourceError)]
    messages = dict.fromkeys(_error_text(leaf) for leaf in causes or leaves)
    print(f"stalk: error: {escape('; '.join(messages))}", file=sys.stderr, flush=True)
    return 1


class _LogLine(logging.Handler):
    """Writes the ``stalk`` logger's records as single escaped lines, tracebacks omitted.

    The listener logs errors of single connections (their text may quote a peer); the
    command line shows them as one line each instead of Python's default output.
    """

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {_error_text(record.exc_info[1])}"
        print(f"stalk: {record.levelname.lower()}: {escape(text)}", file=sys.stderr, flush=True)


def _config(args: argparse.Namespace) -> stalk.Config:
    if args.max_message_size is None:
        return stalk.Config()
    return stalk.Config(max_message_size=args.max_message_size)


def _say(text: str) -> None:
    print(text, flush=True)


def _identity_path(value: str | None) -> Path:
    return Path(value).expanduser() if value else stalk_home() / "identity"


def _load_identity(path: Path) -> Identity:
    try:
        return Identity.load(path)
    except stalk.IdentityFileError as exc:
        raise CommandError(str(exc)) from exc


def _parse_address(text: str, *, default_host: str | None = None) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_host is None:
            raise CommandError(f"expected HOST:PORT, got {text!r}")
        host, port = default_host, text
    host = host.strip("[]") or (default_host or "")
    if not host:
        raise CommandError(f"expected HOST:PORT, got {text!r}")
    try:
        number = int(port)
    except ValueError:
        raise CommandError(f"invalid port {port!r}") from None
    if not 0 <= number <= 65535:
        raise CommandError(f"port {number} out of range")
    return host, number


def _parse_value(text: str) -> SpackValue:
    """A Python literal (``42``, ``b'x'``, ``[1, 2]``) if it is one, else the text itself."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return value  # type: ignore[no-any-return]


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
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    """Print our public key and fingerprint."""
    identity = _load_identity(_identity_path(args.file))
    _say(str(identity.public))
    _say(identity.public.fingerprint)
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """Remove a host's key from known_peers."""
    host, port = _parse_address(args.address)
    if KnownPeers().forget(host, port):
        _say(f"forgot the key of {host}:{port}")
        return 0
    raise CommandError(f"no known key for {host}:{port}")


# -- serving ------------------------------------------------------------------------------


def cmd_listen(args: argparse.Namespace) -> int:
    """Serve: print peers and a summary of their spacks (or echo them)."""
    host, port = _parse_address(args.address, default_host="127.0.0.1")
    path = _identity_path(args.file)
    if not path.exists() and args.file is None:
        Identity.generate().save(path)
        _say(f"created a new identity in {path}")
    identity = _load_identity(path)
    authorize = AuthorizedPeers(args.authorized_peers) if args.authorized_peers else None
    config = _config(args)
    logging.getLogger("stalk").addHandler(_LogLine(logging.WARNING))

    async def handler(conn: Connection) -> None:
        who = conn.peer.fingerprint
        _say(f"peer {who} connected ({conn.pattern}) from {conn.host}:{conn.port}")
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
        async with await stalk.create_listener(
            host, port, identity=identity, authorize=authorize, config=config
        ) as listener:
            bound_host, bound_port = listener.address
            _say(f"listening on {bound_host}:{bound_port} as {identity.public}")
            _say(f"fingerprint {identity.public.fingerprint}")
            await listener.serve(handler)

    anyio.run(serve, backend=args.backend)
    return 0


# -- dialling ------------------------------------------------------------------------------


async def _dial(args: argparse.Namespace) -> Connection:
    """Connect with ssh-like trust: --peer, else known_peers (IK), else XX and remember."""
    host, port = _parse_address(args.address)
    path = _identity_path(args.file)
    identity = _load_identity(path) if path.exists() else None
    known = KnownPeers()
    if args.peer:
        try:
            peer: PublicIdentity | None = PublicIdentity.from_string(args.peer)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
    else:
        peer = known.lookup(host, port)
    try:
        conn = await stalk.connect(host, port, peer, identity=identity, config=_config(args))
    except stalk.PeerIdentityMismatch:
        if args.peer or peer is None:
            raise
        presented = await _presented_key(host, port)
        raise CommandError(
            f"THE KEY OF {host}:{port} HAS CHANGED. Expected {peer.fingerprint} (from "
            f"{known.path}), the peer now presents {presented}. Someone may be "
            f"intercepting the connection. If the change is legitimate, run "
            f"'stalk forget {host}:{port}' and connect again."
        ) from None
    if peer is None:
        known.remember(host, port, conn.peer)
        print(
            f"stalk: recorded key {conn.peer.fingerprint} for {host}:{port} in {known.path}",
            file=sys.stderr,
        )
    return conn


async def _presented_key(host: str, port: int) -> str:
    try:
        async with await stalk.connect(host, port) as probe:
            return probe.peer.fingerprint
    except stalk.StalkError:
        return "an unknown key"


def cmd_send(args: argparse.Namespace) -> int:
    """Send one spack; with --wait print one reply."""
    spack = Spack(*(_parse_value(v) for v in args.values))

    async def run() -> None:
        async with await _dial(args) as conn:
            await conn.send(spack)
            if args.wait:
                try:
                    with anyio.fail_after(args.wait):
                        reply = await conn.receive()
                except TimeoutError:
                    raise CommandError(f"no reply within {args.wait} s") from None
                except anyio.EndOfStream:
                    raise CommandError("the peer closed the connection without replying") from None
                _say(_show(reply, args))

    anyio.run(run, backend=args.backend)
    return 0


async def _stdin_lines() -> AsyncIterator[str]:
    """The lines of standard input, without their line endings.

    A terminal, pipe or socket is read from its file descriptor once it is readable, so
    that waiting for input is cancellable: when the server ends the session, ``stalk
    connect`` reports it at once instead of after the next line. Anything else (a regular
    file, ``/dev/null``) never blocks for long and is read in a worker thread.
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


def cmd_connect(args: argparse.Namespace) -> int:
    """Send each stdin line as a spack; print what comes back."""

    async def printer(conn: Connection) -> None:
        async for spack in conn:
            _say(_show(spack, args))

    async def run() -> None:
        async with await _dial(args) as conn:
            print(f"connected to {conn.peer.fingerprint} ({conn.pattern})", file=sys.stderr)
            async with anyio.create_task_group() as tg:
                tg.start_soon(printer, conn)
                async for line in _stdin_lines():
                    await conn.send(Spack(line))
                await conn.send_eof()

    anyio.run(run, backend=args.backend)
    return 0


# -- tools --------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the self-checking loopback demo."""
    return 0 if anyio.run(run_demo, backend=args.backend) else 1


def cmd_vectors(args: argparse.Namespace) -> int:
    """Run published Noise test vectors through stalk's Noise layer."""
    return vectors_main([*(["-v"] if args.verbose else []), *args.files])


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark stalk against TLS 1.3 and plain TCP (see src/stalk/bench/README.md)."""
    return bench.run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="stalk", description="End-to-end encrypted, message-based connections over TCP."
    )
    parser.add_argument("--version", action="version", version=f"stalk {stalk.__version__}")
    parser.add_argument(
        "--backend", choices=["asyncio", "trio"], default="asyncio", help="event loop to use"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def identity_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "-f", "--file", help="identity file (default: $STALK_HOME/identity, ~/.stalk/identity)"
        )

    def peer_data_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--full",
            action="store_true",
            help="print received spacks whole (default: a summary of about "
            f"{SUMMARY_CHARS} characters, each text or bytes value cut to about {VALUE_CHARS}); "
            "control and bidi characters are escaped either way",
        )
        sub.add_argument(
            "--max-message-size",
            type=int,
            metavar="BYTES",
            help="the largest encoded spack accepted from the peer, advertised to it "
            f"(stalk.Config.max_message_size, default {stalk.Config().max_message_size})",
        )

    def dial_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("address", metavar="HOST:PORT")
        sub.add_argument(
            "--peer", metavar="KEY", help="pin this server key (overrides known_peers)"
        )
        identity_option(sub)
        peer_data_options(sub)

    sub = commands.add_parser("keygen", help="create an identity (static key pair)")
    identity_option(sub)
    sub.add_argument("--force", action="store_true", help="replace an existing identity")
    sub.set_defaults(run=cmd_keygen)

    sub = commands.add_parser("id", help="print your public key and fingerprint")
    identity_option(sub)
    sub.set_defaults(run=cmd_id)

    sub = commands.add_parser("listen", help="accept connections and print (or echo) spacks")
    sub.add_argument("address", metavar="[HOST:]PORT")
    sub.add_argument("--echo", action="store_true", help="send every spack back")
    sub.add_argument("--authorized-peers", metavar="FILE", help="admit only the keys listed")
    identity_option(sub)
    peer_data_options(sub)
    sub.set_defaults(run=cmd_listen)

    sub = commands.add_parser("connect", help="send each stdin line as a spack, print replies")
    dial_options(sub)
    sub.set_defaults(run=cmd_connect)

    sub = commands.add_parser("send", help="send one spack and exit")
    dial_options(sub)
    sub.add_argument("values", nargs="+", metavar="VALUE", help="Python literals or text")
    sub.add_argument("--wait", type=float, metavar="SECONDS", help="print one reply")
    sub.set_defaults(run=cmd_send)

    sub = commands.add_parser("forget", help="remove a host's key from known_peers")
    sub.add_argument("address", metavar="HOST:PORT")
    sub.set_defaults(run=cmd_forget)

    sub = commands.add_parser("demo", help="self-checking demo on loopback (no setup needed)")
    sub.set_defaults(run=cmd_demo)

    sub = commands.add_parser("vectors", help="run published Noise test vectors")
    sub.add_argument("files", nargs="+", metavar="FILE")
    sub.add_argument("-v", "--verbose", action="store_true")
    sub.set_defaults(run=cmd_vectors)

    sub = commands.add_parser("bench", help="benchmark stalk against TLS 1.3 and plain TCP")
    bench.add_arguments(sub)
    sub.set_defaults(run=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stalk`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        # Printable text a terminal's encoding cannot represent is escaped, not an error.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        return int(args.run(args))
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 -- every failure is one line, never a traceback
        return _report(exc)


if __name__ == "__main__":
    raise SystemExit(main())
