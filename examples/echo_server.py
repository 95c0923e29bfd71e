"""A stalk echo server: every spack a client sends comes straight back.

Run it (from the repository root, with stalk installed)::

    python examples/echo_server.py                       # 127.0.0.1:7000
    python examples/echo_server.py --address 0.0.0.0:7000 --identity ./echo.key
    python examples/echo_server.py --backend trio

The server's static key pair is read from ``--identity`` (default
``$STALK_HOME/echo_server.key``, i.e. ``~/.stalk/echo_server.key``); if the file does not
exist, a new key pair is generated and saved there (plus a ``.pub`` companion), so the key
stays the same across restarts and clients can pin it. Once the socket is bound, the server
prints three ``label: value`` lines to stdout, for people and scripts alike::

    address: 127.0.0.1:7000
    key: stalk:lU9Tg2USUArgxYX1xKbwPAfC2NaPMgkLW329vJBqJUw
    fingerprint: SHA256:Nh/B6edMF4rK3NVc+CkBGAYvvoeOaKkqTL5dt8KrefM

Give the key to clients (``python examples/echo_client.py --peer stalk:...``) so that
they connect with Noise IK and refuse anyone else; check the fingerprint out of band.
Stop the server with Ctrl-C (or SIGTERM). ``--verbose`` logs connections to stderr.

From Python (this is how the tests drive it)::

    address = await task_group.start(echo_server.serve, "127.0.0.1", 0, identity)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

import stalk

__all__ = [
    "echo",
    "format_address",
    "load_or_create_identity",
    "main",
    "parse_address",
    "serve",
]

DEFAULT_ADDRESS = "127.0.0.1:7000"


def default_identity_path() -> Path:
    """``$STALK_HOME/echo_server.key`` (``~/.stalk/echo_server.key`` by default)."""
    home = os.environ.get("STALK_HOME") or "~/.stalk"
    return Path(home).expanduser() / "echo_server.key"


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
    """Load the key pair at ``path``, or generate one and save it there if it is missing.

    :raises stalk.IdentityFileError: the file exists but is unusable (bad permissions,
        not a key...), or a new key cannot be written.
    """
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


async def echo(conn: stalk.Connection) -> None:
    """Send every spack received on ``conn`` back, until the client closes."""
    async for spack in conn:
        await conn.send(spack)


async def serve(
    host: str,
    port: int,
    identity: stalk.Identity,
    *,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the echo server on ``host:port`` until cancelled.

    Use it with ``await task_group.start(serve, host, port, identity)``, which returns the
    bound ``(host, port)`` (handy with port 0).

    :raises OSError: the address cannot be bound.
    """
    async with await stalk.create_listener(host, port, identity=identity) as listener:
        task_status.started(listener.address)
        await listener.serve(echo)


def _print_banner(listener: stalk.Listener) -> None:
    public = listener.identity.public
    print(f"address: {format_address(*listener.address)}", flush=True)
    print(f"key: {public}", flush=True)
    print(f"fingerprint: {public.fingerprint}", flush=True)


async def _cancel_on_signal(
    scope: anyio.CancelScope, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Cancel ``scope`` on SIGINT or SIGTERM: a clean stop, not a KeyboardInterrupt."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            scope.cancel()
            return


async def _run(args: argparse.Namespace) -> None:
    identity = load_or_create_identity(args.identity)
    host, port = args.address
    async with (
        await stalk.create_listener(host, port, identity=identity) as listener,
        anyio.create_task_group() as tg,
    ):
        await tg.start(_cancel_on_signal, tg.cancel_scope)
        _print_banner(listener)
        await listener.serve(echo)


def _address_arg(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` by default)."""
    parser = argparse.ArgumentParser(description="stalk echo server")
    parser.add_argument(
        "--address",
        type=_address_arg,
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"where to listen (default {DEFAULT_ADDRESS}; port 0 picks a free port)",
    )
    parser.add_argument(
        "--identity",
        type=Path,
        default=default_identity_path(),
        metavar="PATH",
        help="private key file, created if missing (default: %(default)s)",
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--verbose", "-v", action="store_true", help="log connections")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        anyio.run(_run, args, backend=args.backend)
    except stalk.IdentityFileError as exc:
        print(f"echo_server: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"echo_server: cannot listen on {format_address(*args.address)}: {exc}", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
