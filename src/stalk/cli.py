"""The ``stalk`` command line: keys, a listener, a client, the demo and the vector runner.

Every command uses only the public API. Errors are one readable line on stderr and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

import stalk
from stalk import bench
from stalk.connection import Connection
from stalk.demo import run_demo
from stalk.identity import Identity, PublicIdentity
from stalk.known_peers import AuthorizedPeers, KnownPeers, stalk_home
from stalk.spack import Spack, SpackValue
from stalk.vectors import main as vectors_main

__all__ = ["main"]


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


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
    """Serve: print peers and their spacks (or echo them)."""
    host, port = _parse_address(args.address, default_host="127.0.0.1")
    path = _identity_path(args.file)
    if not path.exists() and args.file is None:
        Identity.generate().save(path)
        _say(f"created a new identity in {path}")
    identity = _load_identity(path)
    authorize = AuthorizedPeers(args.authorized_peers) if args.authorized_peers else None

    async def handler(conn: Connection) -> None:
        who = conn.peer.fingerprint
        _say(f"peer {who} connected ({conn.pattern}) from {conn.host}:{conn.port}")
        try:
            async for spack in conn:
                _say(f"{who}: {spack!r}")
                if args.echo:
                    await conn.send(spack)
        finally:
            _say(f"peer {who} disconnected")

    async def serve() -> None:
        async with await stalk.create_listener(
            host, port, identity=identity, authorize=authorize
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
        conn = await stalk.connect(host, port, peer, identity=identity)
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
                with anyio.fail_after(args.wait):
                    _say(repr(await conn.receive()))

    anyio.run(run, backend=args.backend)
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    """Send each stdin line as a spack; print what comes back."""

    async def printer(conn: Connection) -> None:
        async for spack in conn:
            _say(repr(spack))

    async def run() -> None:
        async with await _dial(args) as conn:
            print(f"connected to {conn.peer.fingerprint} ({conn.pattern})", file=sys.stderr)
            async with anyio.create_task_group() as tg:
                tg.start_soon(printer, conn)
                stdin = anyio.wrap_file(sys.stdin)
                async for line in stdin:
                    await conn.send(Spack(line.rstrip("\n")))
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
    """Benchmark stalk against TLS 1.3 and plain TCP (see benchmarks/README.md)."""
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

    def dial_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("address", metavar="HOST:PORT")
        sub.add_argument(
            "--peer", metavar="KEY", help="pin this server key (overrides known_peers)"
        )
        identity_option(sub)

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
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except (CommandError, stalk.StalkError, OSError, ValueError) as exc:
        print(f"stalk: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
