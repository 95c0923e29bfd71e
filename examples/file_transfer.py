"""Sending files over stalk: each file on a channel of its own, messages beside them.

The receiver listens and stores the files it is sent in a directory; the sender connects
and sends one or more files, each on a channel of its own, while text messages go on the
connection's own stream. Messages keep flowing while files of any size stream: stalk's
writer interleaves the channels (SPEC.md section 24), so a message waits behind about
one Noise message of a file, not the whole file, and a file nobody reads stalls only its
own channel. Each file's SHA-256 is checked at the end, by both sides.

Protocol
--------
Both sides offer channels: the receiver ``Config(max_channels=16)`` (a sender may send
16 files at once; further ones wait for a slot), the sender ``Config(max_channels=0)``.
Each file goes on a channel the sender opens::

    sender    Spack("FILE", name: str, size: int)    a plain file name, no directory
              Spack(data: bytes) ...                 the contents in order, in pieces
              Spack("END", sha256: bytes)            the SHA-256 of the contents
              then the channel's CLOSE
    receiver  Spack("OK", sha256: bytes)             stored whole under that name
              then the channel's CLOSE

A receiver that does not store the file resets the channel instead, with a code and a
reason (the sender's calls raise :class:`stalk.ChannelReset`):

- ``REFUSED`` (0x1001): a name that is not a plain file name (a directory in it, a
  leading dot, the ``.part`` suffix, a character that is not printable), a file of that
  name exists or is being received, or a size over the receiver's limit;
- ``CORRUPT`` (0x1002): the contents were not ``size`` bytes, or their SHA-256 differs;
- ``BAD_REQUEST`` (0x1003): spacks that are not this protocol.

Nothing is left behind then: the receiver writes ``NAME.part`` and renames it to ``NAME``
only once the SHA-256 matches.

On the connection's own stream (channel 0), while files stream::

    sender -> receiver  Spack("MSG", text: str)                                  printed
    receiver -> sender  Spack("PROGRESS", channel: int, received: int, size: int)

The receiver reports each file's progress every MiB and at its end; the sender reads
them (it must: they take the receiver's credit on channel 0).

Running it
----------
Start the receiver (``--address`` defaults to 127.0.0.1:7002; port 0 picks a free port;
``--dir`` defaults to the current directory)::

    $ python examples/file_transfer.py receive --dir ./inbox
    address: 127.0.0.1:7002
    key: stalk:lU9Tg2USUArgxYX1xKbwPAfC2NaPMgkLW329vJBqJUw
    fingerprint: SHA256:Nh/B6edMF4rK3NVc+CkBGAYvvoeOaKkqTL5dt8KrefM

then send files, pinning its key with ``--peer`` (Noise IK; without it, XX and the key
it learned printed to stderr)::

    $ python examples/file_transfer.py send video.mkv notes.txt --message "two files" \\
        --peer stalk:lU9Tg2USUArgxYX1xKbwPAfC2NaPMgkLW329vJBqJUw
    notes.txt: 100% of 0.0 MiB
    video.mkv: 0% of 700.0 MiB
    video.mkv: 10% of 700.0 MiB
    ...
    notes.txt: stored, 1234 bytes, SHA-256 0f3c...
    video.mkv: stored, 734003200 bytes, SHA-256 9b2e...

Progress goes to stderr, one line per file stored (its SHA-256 confirmed by the
receiver) to stdout. The receiver prints each message and each file::

    message from SHA256:uoZfZX...: 'two files'
    stored notes.txt: 1234 bytes, SHA-256 0f3c...
    stored video.mkv: 734003200 bytes, SHA-256 9b2e...

Exit status of ``send``: 0 when every file was stored, 1 when the receiver refused one
or it arrived corrupt (the others still go), 2 on any other error. ``receive`` runs
until Ctrl-C; it takes ``--max-size BYTES`` (default 1 GiB), ``--authorized-peers FILE``
to admit only the senders listed (one ``stalk:...`` key per line), ``--identity`` (default
``$STALK_HOME/file_transfer.key``) and ``--verbose``. All commands take ``--backend trio``.

From Python::

    async with await stalk.connect(host, port, peer, config=SENDER_CONFIG) as conn:
        results = await Sender(conn).send([Path("video.mkv")], messages=["hello"])
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import anyio
from anyio.abc import TaskStatus

import stalk

__all__ = [
    "RECEIVER_CONFIG",
    "SENDER_CONFIG",
    "Receiver",
    "ResetCode",
    "Sender",
    "Sent",
    "Transfer",
    "TransferError",
    "main",
    "serve",
]

logger = logging.getLogger("file_transfer")

DEFAULT_ADDRESS = "127.0.0.1:7002"

#: What each side offers: a sender may have 16 files on their way at once; the receiver
#: opens no channel towards the sender.
RECEIVER_CONFIG = stalk.Config(max_channels=16)
SENDER_CONFIG = stalk.Config(max_channels=0)

#: The size of the pieces a file is sent in: a quarter of the default channel window, so
#: that a channel always has credit for its next piece while the receiver writes one.
CHUNK_SIZE = 64 * 1024

#: The receiver reports a file's progress every this many bytes (and at its end).
REPORT_EVERY = 1 << 20

#: The largest file a receiver takes by default.
DEFAULT_MAX_SIZE = 1 << 30


class ResetCode:
    """The application's codes for resetting a file's channel (from 0x1000, SPEC)."""

    REFUSED = 0x1001
    CORRUPT = 0x1002
    BAD_REQUEST = 0x1003

    @classmethod
    def name(cls, code: int) -> str:
        """The code's name for a message (``REFUSED``), or its number."""
        names = {cls.REFUSED: "refused", cls.CORRUPT: "corrupt", cls.BAD_REQUEST: "bad request"}
        return names.get(code, f"reset with code {code}")


class TransferError(Exception):
    """The transfer cannot happen at all: the receiver does not offer channels."""


# --------------------------------------------------------------------------- receiver


class _Refusal(Exception):
    """The file is not stored: the channel is reset with ``code`` and the message."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass
class Transfer:
    """A file on its way in: its name, the size announced, and the bytes received so far."""

    name: str
    size: int
    received: int = 0


def _check_name(name: object) -> str:
    """``name`` if it is a plain file name a sender may use, else a refusal."""
    if type(name) is not str:
        raise _Refusal(ResetCode.BAD_REQUEST, "the file name must be a str")
    plain = (
        name
        and not name.startswith(".")
        and not name.endswith(".part")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()
        and len(name.encode()) <= 200
    )
    if not plain:
        raise _Refusal(ResetCode.REFUSED, f"{name[:100]!r} is not a plain file name")
    return name


def _check_header(header: stalk.Spack, max_size: int) -> tuple[str, int]:
    """The name and size a file's first spack announces, else a refusal."""
    if len(header) != 3 or header[0] != "FILE" or type(header[2]) is not int:
        raise _Refusal(ResetCode.BAD_REQUEST, "expected ('FILE', name, size)")
    name, size = _check_name(header[1]), header[2]
    if not 0 <= size <= max_size:
        raise _Refusal(ResetCode.REFUSED, f"{size} bytes: the limit is {max_size}")
    return name, size


class Receiver:
    """Stores the files senders send into ``directory``; prints messages and files.

    Use :meth:`handle` as the listener's handler and :meth:`handle_channel` as its
    channel handler (:func:`serve` does). Override :meth:`message`, :meth:`stored` and
    :meth:`refused` to do something else than print.

    :param directory: where files are stored (it must exist).
    :param max_size: the largest file taken, in bytes.
    :param out: where :meth:`message`, :meth:`stored` and :meth:`refused` print (default
        ``sys.stdout``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        out: TextIO | None = None,
    ) -> None:
        """Store into ``directory``."""
        self.directory = Path(directory)
        self.max_size = max_size
        self.out = out
        #: The files on their way in, across every connection.
        self.transfers: list[Transfer] = []

    def message(self, conn: stalk.Connection, text: str) -> None:
        """A sender sent a message: print it (escaped, as it is untrusted text)."""
        print(f"message from {conn.peer.fingerprint}: {text!r}", file=self.out, flush=True)

    def stored(self, path: Path, size: int, sha256: str) -> None:
        """A file was stored whole: print it."""
        print(f"stored {path.name}: {size} bytes, SHA-256 {sha256}", file=self.out, flush=True)

    def refused(self, name: str | None, code: int, reason: str) -> None:
        """A file was not stored: print why (the reason also goes to the sender)."""
        what = "a file" if name is None else repr(name)
        print(f"not stored: {what}: {ResetCode.name(code)}: {reason}", file=self.out, flush=True)

    async def handle(self, conn: stalk.Connection) -> None:
        """Print the messages on the connection's own stream until the sender closes."""
        async for spack in conn:
            if len(spack) == 2 and spack[0] == "MSG" and type(spack[1]) is str:
                self.message(conn, spack[1])
            else:
                logger.info("ignored a spack of %d values on channel 0", len(spack))

    async def handle_channel(self, channel: stalk.Channel) -> None:
        """Receive the file sent on ``channel``: store it, or reset the channel."""
        name: str | None = None
        try:
            name, size = _check_header(await channel.receive(), self.max_size)
            path, sha256 = await self._receive(channel, name, size)
        except _Refusal as refusal:
            self.refused(name, refusal.code, str(refusal))
            await channel.reset(refusal.code, str(refusal))
            return
        except anyio.EndOfStream:
            self.refused(name, ResetCode.BAD_REQUEST, "the channel ended before the file")
            await channel.reset(ResetCode.BAD_REQUEST, "the channel ended before the file")
            return
        await channel.send(stalk.Spack("OK", bytes.fromhex(sha256)))
        self.stored(path, size, sha256)

    async def _receive(self, channel: stalk.Channel, name: str, size: int) -> tuple[Path, str]:
        """Write the file to ``NAME.part``, check it, rename it: its path and SHA-256."""
        path = anyio.Path(self.directory / name)
        part = anyio.Path(self.directory / f"{name}.part")
        if await path.exists():
            raise _Refusal(ResetCode.REFUSED, f"a file named {name!r} exists")
        try:
            file = await anyio.open_file(part, "xb")  # x: never two transfers of one name
        except FileExistsError:
            raise _Refusal(ResetCode.REFUSED, f"{name!r} is being received") from None
        transfer = Transfer(name, size)
        self.transfers.append(transfer)
        stored = False
        try:
            try:
                sha256 = await self._write(channel, file, transfer)
            finally:
                with anyio.CancelScope(shield=True):  # also when the connection ends
                    await file.aclose()
            if await path.exists():
                raise _Refusal(ResetCode.REFUSED, f"a file named {name!r} exists")
            await part.rename(path)
            stored = True
        finally:
            if not stored:
                with anyio.CancelScope(shield=True):
                    await part.unlink(missing_ok=True)
            self.transfers.remove(transfer)
        return Path(path), sha256

    async def _write(
        self, channel: stalk.Channel, file: anyio.AsyncFile[bytes], transfer: Transfer
    ) -> str:
        """Take the pieces and the END, writing and hashing: the SHA-256, checked."""
        digest = hashlib.sha256()
        size, report_at = transfer.size, REPORT_EVERY
        while True:
            spack = await channel.receive()
            if len(spack) == 1 and type(spack[0]) is bytes:
                piece = spack[0]
                transfer.received += len(piece)
                if transfer.received > size:
                    raise _Refusal(ResetCode.CORRUPT, f"more than the {size} bytes announced")
                digest.update(piece)
                await file.write(piece)
                if transfer.received >= report_at:  # the first byte of the next MiB
                    report_at = (transfer.received // REPORT_EVERY + 1) * REPORT_EVERY
                    await self._report(channel, transfer)
            elif len(spack) == 2 and spack[0] == "END" and type(spack[1]) is bytes:
                claimed = spack[1]
                break
            else:
                raise _Refusal(ResetCode.BAD_REQUEST, "expected (data,) or ('END', sha256)")
        if transfer.received != size:
            raise _Refusal(ResetCode.CORRUPT, f"{transfer.received} of the {size} bytes announced")
        if claimed != digest.digest():
            raise _Refusal(ResetCode.CORRUPT, "the SHA-256 differs")
        await self._report(channel, transfer)
        return digest.hexdigest()

    async def _report(self, channel: stalk.Channel, transfer: Transfer) -> None:
        report = stalk.Spack("PROGRESS", channel.id, transfer.received, transfer.size)
        await channel.connection.send(report)


async def serve(
    host: str,
    port: int,
    *,
    identity: stalk.Identity,
    receiver: Receiver,
    authorized_peers: str | os.PathLike[str] | None = None,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Receive files on ``host:port`` until cancelled.

    With ``await task_group.start(partial(serve, host, 0, ...))`` the bound ``(host,
    port)`` is returned once it accepts connections.

    :param authorized_peers: a file of sender keys (see :class:`stalk.AuthorizedPeers`);
        ``None`` admits everyone.
    :raises stalk.IdentityFileError: ``authorized_peers`` is missing or malformed.
    :raises OSError: the address cannot be bound.
    """
    async with await _create_listener(host, port, identity, receiver, authorized_peers) as listener:
        task_status.started(listener.address)
        await listener.serve(receiver.handle)


async def _create_listener(
    host: str,
    port: int,
    identity: stalk.Identity,
    receiver: Receiver,
    authorized_peers: str | os.PathLike[str] | None,
) -> stalk.Listener:
    authorize = None if authorized_peers is None else stalk.AuthorizedPeers(authorized_peers)
    return await stalk.create_listener(
        host,
        port,
        identity=identity,
        authorize=authorize,
        config=RECEIVER_CONFIG,
        channel_handler=receiver.handle_channel,
    )


# --------------------------------------------------------------------------- sender


@dataclass(frozen=True)
class Sent:
    """What became of one file: stored (``error`` is ``None``) or why not."""

    path: Path
    size: int
    sha256: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the receiver stored the file and confirmed its SHA-256."""
        return self.error is None


class Sender:
    """Sends files on ``conn``, each on a channel of its own, and messages on channel 0.

    ``conn`` must offer channels (:data:`SENDER_CONFIG`) and should be used as ``async
    with``. Override :meth:`progress` to do something else than print to stderr.

    :param err: where :meth:`progress` prints (default ``sys.stderr``).
    """

    def __init__(self, conn: stalk.Connection, *, err: TextIO | None = None) -> None:
        """Send on ``conn``."""
        self.conn = conn
        self.err = err
        self._paths: dict[int, Path] = {}  # by channel id, for the progress reports
        self._shown: dict[Path, int] = {}  # the tenth of each file last shown

    def progress(self, path: Path, received: int, size: int) -> None:
        """The receiver reported a file's progress: print it once per tenth of the file."""
        percent = received * 100 // size if size else 100
        if self._shown.get(path, -1) < percent // 10:
            self._shown[path] = percent // 10
            print(
                f"{path.name}: {percent}% of {size / (1 << 20):.1f} MiB",
                file=self.err or sys.stderr,
            )

    async def send(
        self,
        paths: Sequence[Path],
        *,
        messages: Iterable[str] | AsyncIterable[str] = (),
    ) -> list[Sent]:
        """Send the files at once, and the messages while they go; returns when all went.

        :returns: a :class:`Sent` per file, in the order of ``paths``.
        :raises TransferError: the receiver does not offer channels.
        :raises OSError: a file cannot be read (nothing more is sent).
        :raises stalk.StalkError: the connection failed.
        """
        if not self.conn.channels:
            raise TransferError("the receiver does not offer channels")
        results: list[Sent | None] = [None] * len(paths)
        failure: BaseException | None = None

        async def send_one(index: int, path: Path) -> None:
            nonlocal failure
            try:
                results[index] = await self._send_file(path)
            except (OSError, stalk.StalkError, anyio.BrokenResourceError) as exc:
                failure = failure or exc
                work.cancel_scope.cancel()

        async def send_messages() -> None:
            nonlocal failure
            try:
                await self._send_messages(messages)
            except (stalk.StalkError, anyio.BrokenResourceError) as exc:
                failure = failure or exc
                work.cancel_scope.cancel()

        async with anyio.create_task_group() as reading:
            reading.start_soon(self._read_reports)
            async with anyio.create_task_group() as work:
                for index, path in enumerate(paths):
                    work.start_soon(send_one, index, path)
                work.start_soon(send_messages)
            reading.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return [result for result in results if result is not None]

    async def _send_messages(self, messages: Iterable[str] | AsyncIterable[str]) -> None:
        if isinstance(messages, AsyncIterable):
            async for text in messages:
                await self.conn.send(stalk.Spack("MSG", text))
        else:
            for text in messages:
                await self.conn.send(stalk.Spack("MSG", text))

    async def _send_file(self, path: Path) -> Sent:
        """Send one file on a new channel; its :class:`Sent` (a refusal included)."""
        size = (await anyio.Path(path).stat()).st_size
        digest = hashlib.sha256()
        channel = await self.conn.open_channel()
        self._paths[channel.id] = path
        try:
            # Left through an exception of ours (the file cannot be read, cancelled), the
            # channel is reset: the receiver drops what it got.
            async with channel:
                try:
                    await channel.send(stalk.Spack("FILE", path.name, size))
                    async with await anyio.open_file(path, "rb") as file:
                        while piece := await file.read(CHUNK_SIZE):
                            digest.update(piece)
                            await channel.send(stalk.Spack(piece))
                    await channel.send(stalk.Spack("END", digest.digest()))
                    await channel.send_eof()
                    answer = await channel.receive()
                except stalk.ChannelReset as exc:
                    error = f"{ResetCode.name(exc.code)}: {exc.reason}"
                    return Sent(path, size, digest.hexdigest(), error)
                except anyio.EndOfStream:
                    error = "the receiver closed the channel without an answer"
                    return Sent(path, size, digest.hexdigest(), error)
        finally:
            del self._paths[channel.id]
        if answer != stalk.Spack("OK", digest.digest()):
            return Sent(path, size, digest.hexdigest(), "the receiver's SHA-256 differs")
        return Sent(path, size, digest.hexdigest())

    async def _read_reports(self) -> None:
        """Show the receiver's progress reports until the connection ends (or cancelled)."""
        try:
            async for spack in self.conn:
                if len(spack) == 4 and spack[0] == "PROGRESS":
                    path = self._paths.get(spack[1])
                    if path is not None:
                        self.progress(path, spack[2], spack[3])
        except (stalk.StalkError, anyio.BrokenResourceError):
            return  # the file and message tasks report what failed


# --------------------------------------------------------------------------- command line


def parse_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``[IPv6]:PORT``) into its parts.

    :raises ValueError: no port, or a port that is not a number in 0..65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port_text)


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, with brackets around an IPv6 host (the form :func:`parse_address` reads)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_or_create_identity(path: str | os.PathLike[str]) -> stalk.Identity:
    """Load the key pair at ``path``, or generate one and save it there if it is missing."""
    path = Path(path).expanduser()
    if path.exists():
        return stalk.Identity.load(path)
    identity = stalk.Identity.generate()
    try:
        identity.save(path)
    except stalk.IdentityFileError:
        if not path.exists():
            raise
        return stalk.Identity.load(path)  # another process created it first: use theirs
    return identity


def default_identity() -> Path:
    """``$STALK_HOME/file_transfer.key`` (``~/.stalk/file_transfer.key`` by default)."""
    home = os.environ.get("STALK_HOME") or "~/.stalk"
    return Path(home).expanduser() / "file_transfer.key"


async def _cancel_on_signal(
    scope: anyio.CancelScope, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Cancel ``scope`` on SIGINT or SIGTERM: a clean stop, not a KeyboardInterrupt."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            scope.cancel()
            return


async def _receive_command(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        print(f"file_transfer: {args.dir} is not a directory", file=sys.stderr)
        return 2
    identity = load_or_create_identity(args.identity)
    host, port = args.address
    receiver = Receiver(args.dir, max_size=args.max_size)
    async with (
        await _create_listener(host, port, identity, receiver, args.authorized_peers) as listener,
        anyio.create_task_group() as tg,
    ):
        await tg.start(_cancel_on_signal, tg.cancel_scope)
        public = listener.identity.public
        print(f"address: {format_address(*listener.address)}", flush=True)
        print(f"key: {public}", flush=True)
        print(f"fingerprint: {public.fingerprint}", flush=True)
        print(f"file_transfer: storing files in {args.dir}", file=sys.stderr)
        await listener.serve(receiver.handle)
    return 0


async def _send_command(args: argparse.Namespace) -> int:
    missing = [path for path in args.files if not path.is_file()]
    if missing:
        print(f"file_transfer: not a file: {missing[0]}", file=sys.stderr)
        return 2
    identity = load_or_create_identity(args.identity) if args.identity else None
    host, port = args.address
    async with await stalk.connect(
        host, port, args.peer, identity=identity, config=SENDER_CONFIG
    ) as conn:
        if args.peer is None:
            print(f"receiver key: {conn.peer}", file=sys.stderr)
            print(f"  ({conn.peer.fingerprint}; not verified: pin it with --peer)", file=sys.stderr)
        results = await Sender(conn).send(args.files, messages=args.message)
    for result in results:
        if result.ok:
            print(f"{result.path.name}: stored, {result.size} bytes, SHA-256 {result.sha256}")
        else:
            print(f"file_transfer: {result.path.name}: not stored: {result.error}", file=sys.stderr)
    return 0 if all(result.ok for result in results) else 1


async def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "receive":
            return await _receive_command(args)
        return await _send_command(args)
    except OSError as exc:  # ConnectFailed is one too
        print(f"file_transfer: {exc}", file=sys.stderr)
    except (stalk.StalkError, TransferError) as exc:
        print(f"file_transfer: {exc}", file=sys.stderr)
    return 2


def _address_arg(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _peer_arg(text: str) -> stalk.PublicIdentity:
    try:
        return stalk.PublicIdentity.from_string(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` by default)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    common.add_argument(
        "--address",
        type=_address_arg,
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"the receiver's address (default {DEFAULT_ADDRESS})",
    )
    parser = argparse.ArgumentParser(description="send files over stalk, messages beside them")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    receive = commands.add_parser("receive", parents=[common], help="store the files sent")
    receive.add_argument(
        "--dir", type=Path, default=Path(), metavar="DIR", help="where to store them (default .)"
    )
    receive.add_argument(
        "--max-size",
        type=int,
        default=DEFAULT_MAX_SIZE,
        metavar="BYTES",
        help="refuse larger files (default %(default)s)",
    )
    receive.add_argument(
        "--identity",
        type=Path,
        default=default_identity(),
        metavar="PATH",
        help="the receiver's key file, created if missing (default: %(default)s)",
    )
    receive.add_argument(
        "--authorized-peers",
        type=Path,
        metavar="FILE",
        help="admit only the sender keys listed in FILE (one stalk:... key per line)",
    )
    receive.add_argument("--verbose", "-v", action="store_true", help="log to stderr")
    send = commands.add_parser("send", parents=[common], help="send files")
    send.add_argument("files", nargs="+", type=Path, metavar="FILE")
    send.add_argument(
        "--message",
        action="append",
        default=[],
        metavar="TEXT",
        help="a message to send while the files go (repeatable)",
    )
    send.add_argument(
        "--peer", type=_peer_arg, metavar="KEY", help="the receiver's key (stalk:...); pins it"
    )
    send.add_argument(
        "--identity", type=Path, metavar="PATH", help="our key file (created if missing)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return anyio.run(_run, args, backend=args.backend)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
