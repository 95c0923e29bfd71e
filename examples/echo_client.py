"""A stalk echo client: sends spacks to an echo server and prints the replies.

Start a server first (``python examples/echo_server.py``), then::

    python examples/echo_client.py hello world                  # one spack: ('hello', 'world')
    python examples/echo_client.py --peer stalk:KEY hello       # pin the server's key (IK)
    printf 'one\\ntwo "and three"\\n' | python examples/echo_client.py --peer stalk:KEY
    python examples/echo_client.py --address 10.0.0.2:7000 --backend trio hi

The command-line values are sent as one spack of strings; with no values, each line of
stdin is split like a shell command line (``shlex``) and sent as one spack, and blank lines
are skipped. Every reply is printed to stdout as the ``repr`` of the spack received::

    $ python examples/echo_client.py hello world \\
        --peer stalk:lU9Tg2USUArgxYX1xKbwPAfC2NaPMgkLW329vJBqJUw
    Spack('hello', 'world')

With ``--peer`` the handshake is Noise IK: only the server holding that key can answer.
Without it the handshake is Noise XX, which accepts whatever key the server presents; the
client then prints that key (and its fingerprint) to stderr so you can check it and pin it
next time::

    server key: stalk:lU9Tg2USUArgxYX1xKbwPAfC2NaPMgkLW329vJBqJUw
      (SHA256:Nh/B6edMF4rK3NVc+CkBGAYvvoeOaKkqTL5dt8KrefM; not verified: pin it with --peer)

The client uses a fresh key pair each run unless ``--identity PATH`` names a key file
(created if missing). Exit status: 0 on success, 1 if the connection or handshake failed.

From Python (this is how the tests drive it)::

    replies = await echo_client.run_client("127.0.0.1", port, [["hello", "world"]], peer=key)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import TextIO, TypeAlias

import anyio

import stalk

__all__ = ["main", "parse_args", "run_client", "stdin_messages"]

DEFAULT_ADDRESS = "127.0.0.1:7000"

Messages: TypeAlias = Iterable[Sequence[str]] | AsyncIterable[Sequence[str]]


def parse_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``[IPv6]:PORT``) into its parts.

    :raises ValueError: no port, or a port that is not a number in 0..65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port_text)


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


async def stdin_messages(
    stream: TextIO | None = None, err: TextIO | None = None
) -> AsyncIterator[list[str]]:
    """Yield each non-blank line of ``stream`` (stdin) split like a shell command line.

    A line ``shlex`` cannot split (an unclosed quote) is reported on ``err`` (stderr) and
    skipped.
    """
    async for line in anyio.wrap_file(stream or sys.stdin):
        try:
            words = shlex.split(line)
        except ValueError as exc:
            print(f"echo_client: skipping line: {exc}", file=err or sys.stderr)
            continue
        if words:
            yield words


async def _each(messages: Messages) -> AsyncIterator[Sequence[str]]:
    if isinstance(messages, AsyncIterable):
        async for message in messages:
            yield message
    else:
        for message in messages:
            yield message


async def run_client(
    host: str,
    port: int,
    messages: Messages,
    *,
    peer: stalk.PublicIdentity | str | None = None,
    identity: stalk.Identity | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> list[stalk.Spack]:
    """Connect, send each message as a spack of strings, print and return the replies.

    Requests go one at a time: each reply is read before the next message is sent, so
    stdin can be typed interactively.

    :param peer: the server's key (IK); ``None`` uses XX and reports the key on ``err``.
    :param out: where replies are printed (default: stdout).
    :param err: where the learned server key is printed (default: stderr).
    :raises stalk.ConnectFailed: the server cannot be reached.
    :raises stalk.HandshakeFailed: the handshake failed (e.g. the server does not hold the
        pinned key: :class:`stalk.PeerIdentityMismatch`).
    :raises anyio.EndOfStream: the server closed the connection before replying.
    :raises stalk.ConnectionLost: the connection broke.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    replies: list[stalk.Spack] = []
    async with await stalk.connect(host, port, peer, identity=identity) as conn:
        if peer is None:
            print(f"server key: {conn.peer}", file=err)
            print(
                f"  ({conn.peer.fingerprint}; not verified: pin it with --peer)",
                file=err,
                flush=True,
            )
        async for message in _each(messages):
            await conn.send(stalk.Spack(*message))
            reply = await conn.receive()
            print(repr(reply), file=out, flush=True)
            replies.append(reply)
    return replies


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
    parser = argparse.ArgumentParser(description="stalk echo client")
    parser.add_argument("values", nargs="*", metavar="VALUE", help="values of one spack")
    parser.add_argument(
        "--address",
        type=_address_arg,
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"the server (default {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--peer",
        type=_peer_arg,
        metavar="KEY",
        help="the server's public key (stalk:...); without it, learn the key (XX)",
    )
    parser.add_argument(
        "--identity", type=Path, metavar="PATH", help="our key file (created if missing)"
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    identity = load_or_create_identity(args.identity) if args.identity else None
    messages: Messages = [args.values] if args.values else stdin_messages()
    host, port = args.address
    await run_client(host, port, messages, peer=args.peer, identity=identity)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        anyio.run(_run, args, backend=args.backend)
    except stalk.StalkError as exc:
        print(f"echo_client: {exc}", file=sys.stderr)
        return 1
    except anyio.EndOfStream:
        print("echo_client: the server closed the connection", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
