"""An end-to-end encrypted key-value store over stalk: server, client class and CLI.

The server keeps a ``dict[str, bytes]`` in memory and answers requests sent as spacks;
every connection is a Noise channel, so nobody on the path can read or alter them.

Protocol
--------
A request is ``Spack(request_id, OPERATION, *arguments)`` with an int ``request_id``
chosen by the client::

    Spack(id, "GET", key: str)                 -> Spack(id, "OK", value: bytes | None)
    Spack(id, "PUT", key: str, value: bytes)   -> Spack(id, "OK", None)
    Spack(id, "DELETE", key: str)              -> Spack(id, "OK", old_value: bytes | None)
    Spack(id, "LIST")                          -> Spack(id, "OK", [key, ...])   (sorted)
    Spack(id, "LIST", prefix: str)             -> Spack(id, "OK", [key, ...])   (sorted)

``None`` means "no such key". A request the server cannot carry out gets
``Spack(id, "ERROR", message: str)``; if it does not even carry an int id, the answer is
``Spack(None, "ERROR", message)``. Bad requests never close the connection or disturb
other clients. Requests may be pipelined: a client can send many before reading any
response and match the responses by id (:class:`KVClient` does).

Running it
----------
Start the server (``--address`` defaults to 127.0.0.1:7001; port 0 picks a free port)::

    $ python examples/kvstore.py serve --identity ./kv-server.key
    address: 127.0.0.1:7001
    key: stalk:E61b4t4ryytElYdUWbk_scUpTHgyaDEkMNEoVbQlSRg
    fingerprint: SHA256:uoZfZXTJj04srVguD5ueZQ2A9DWL1vJF1/Fs3xvc1pA

Those three ``label: value`` lines are printed to stdout once the socket is bound, so a
script can read the address and key from them (log lines, with ``--verbose``, go to
stderr). The identity file is created if missing, so the key survives restarts; the
default is ``$STALK_HOME/kvstore_server.key`` (``~/.stalk/kvstore_server.key``).

Then use the client commands, pinning the server key with ``--peer`` (Noise IK)::

    $ python examples/kvstore.py put greeting "hello world" --peer stalk:E61b...
    $ python examples/kvstore.py get greeting --peer stalk:E61b...
    hello world
    $ python examples/kvstore.py list --peer stalk:E61b...
    greeting
    $ python examples/kvstore.py delete greeting --peer stalk:E61b...
    $ python examples/kvstore.py get greeting --peer stalk:E61b...
    kvstore: 'greeting': no such key

``put KEY -`` reads the value from stdin; ``get`` prints the value as UTF-8 (bytes that
are not UTF-8 as ``\\xNN`` escapes). Without ``--peer`` the client uses XX and prints the
key it learned to stderr. Exit status: 0 on success, 1 if the key does not exist (``get``,
``delete``), 2 on any other error.

Only admitting known clients: give each client a key file and list the public keys in an
authorized-peers file (one ``stalk:...`` key per line, ``#`` comments allowed)::

    $ python examples/kvstore.py pubkey --identity ./alice.key >> authorized_peers
    $ python examples/kvstore.py serve --authorized-peers authorized_peers
    $ python examples/kvstore.py get greeting --identity ./alice.key --peer stalk:...

Any other client is refused during the handshake (:class:`stalk.PeerRefused`).

All commands take ``--backend trio`` to run on trio instead of asyncio.

From Python::

    async with KVClient("127.0.0.1", 7001, peer="stalk:...") as kv:
        await kv.put("greeting", b"hello")
        assert await kv.get("greeting") == b"hello"

The store keeps everything in memory and sets no quota: a real service would bound the
number and total size of the values each client may store.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import anyio
from anyio.abc import TaskGroup, TaskStatus

import stalk

__all__ = [
    "KVClient",
    "KVConnectionError",
    "KVError",
    "KVRequestError",
    "KVStore",
    "main",
    "serve",
]

logger = logging.getLogger("kvstore")

DEFAULT_ADDRESS = "127.0.0.1:7001"

#: The longest key accepted, in characters.
MAX_KEY_LENGTH = 1024


# --------------------------------------------------------------------------- errors


class KVError(Exception):
    """Base class of the errors :class:`KVClient` raises."""


class KVRequestError(KVError):
    """The server answered ERROR: the request was invalid. The connection is still usable."""


class KVConnectionError(KVError):
    """The connection ended, broke, or the server broke the protocol; the client is done."""


# --------------------------------------------------------------------------- server


class _BadRequest(Exception):
    """A request the store cannot carry out; its message goes back to the client."""


def _describe(value: object) -> str:
    """A short description of an untrusted value for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _key(args: Sequence[object], index: int = 0) -> str:
    key = args[index]
    if type(key) is not str:
        raise _BadRequest(f"the key must be a str, not {type(key).__name__}")
    if len(key) > MAX_KEY_LENGTH:
        raise _BadRequest(f"the key is longer than {MAX_KEY_LENGTH} characters")
    return key


def _arity(operation: str, args: Sequence[object], *counts: int) -> None:
    if len(args) not in counts:
        expected = " or ".join(map(str, counts))
        raise _BadRequest(f"{operation} takes {expected} argument(s), got {len(args)}")


class KVStore:
    """The server side: a ``dict[str, bytes]`` and the code that serves it to clients.

    One instance is shared by every connection; operations are atomic because they run
    between two awaits.
    """

    def __init__(self) -> None:
        """Start with an empty store."""
        self.data: dict[str, bytes] = {}

    def execute(self, request: Sequence[object]) -> stalk.Spack:
        """Carry out one request and return the response (never raises)."""
        if not request:
            return stalk.Spack(None, "ERROR", "empty request: expected [id, operation, ...]")
        request_id = request[0]
        if type(request_id) is not int:  # bool is an int subclass: refuse it too
            return stalk.Spack(None, "ERROR", "the request id must be an int")
        if len(request) < 2 or type(request[1]) is not str:
            return stalk.Spack(request_id, "ERROR", "the operation must be a str")
        operation, args = request[1], request[2:]
        try:
            return self._execute(request_id, operation, args)
        except _BadRequest as exc:
            logger.info("bad request %d: %s", request_id, exc)
            return stalk.Spack(request_id, "ERROR", str(exc))

    def _execute(self, request_id: int, operation: str, args: Sequence[object]) -> stalk.Spack:
        if operation == "GET":
            _arity(operation, args, 1)
            return stalk.Spack(request_id, "OK", self.data.get(_key(args)))
        if operation == "PUT":
            _arity(operation, args, 2)
            key, value = _key(args), args[1]
            if type(value) is not bytes:
                raise _BadRequest(f"the value must be bytes, not {type(value).__name__}")
            self.data[key] = value
            return stalk.Spack(request_id, "OK", None)
        if operation == "DELETE":
            _arity(operation, args, 1)
            return stalk.Spack(request_id, "OK", self.data.pop(_key(args), None))
        if operation == "LIST":
            _arity(operation, args, 0, 1)
            prefix = _key(args) if args else ""
            return stalk.Spack(
                request_id, "OK", [key for key in sorted(self.data) if key.startswith(prefix)]
            )
        raise _BadRequest(f"unknown operation {_describe(operation)}")

    async def handle(self, conn: stalk.Connection) -> None:
        """Serve one connection until the client closes it (the listener's handler)."""
        async for request in conn:
            response = self.execute(request)
            try:
                await conn.send(response)
            except stalk.MessageTooLarge:
                # The client accepts smaller messages than this answer (a big value or a
                # long LIST): say so rather than break the connection.
                await conn.send(
                    stalk.Spack(response[0], "ERROR", "the response exceeds your message limit")
                )


async def serve(
    host: str,
    port: int,
    *,
    identity: stalk.Identity,
    store: KVStore | None = None,
    authorized_peers: str | os.PathLike[str] | None = None,
    config: stalk.Config | None = None,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a key-value store on ``host:port`` until cancelled.

    With ``await task_group.start(partial(serve, host, 0, identity=...))`` the bound
    ``(host, port)`` is returned once the server accepts connections.

    :param store: the store to serve (default: a new empty one).
    :param authorized_peers: a file of client keys (see :class:`stalk.AuthorizedPeers`);
        clients whose key is not listed are refused. ``None`` admits everyone.
    :raises stalk.IdentityFileError: ``authorized_peers`` is missing or malformed.
    :raises OSError: the address cannot be bound.
    """
    async with await _create_listener(host, port, identity, authorized_peers, config) as listener:
        task_status.started(listener.address)
        await listener.serve((store or KVStore()).handle)


async def _create_listener(
    host: str,
    port: int,
    identity: stalk.Identity,
    authorized_peers: str | os.PathLike[str] | None,
    config: stalk.Config | None,
) -> stalk.Listener:
    authorize = None if authorized_peers is None else stalk.AuthorizedPeers(authorized_peers)
    return await stalk.create_listener(
        host, port, identity=identity, authorize=authorize, config=config
    )


# --------------------------------------------------------------------------- client


class _Pending:
    """A request waiting for its response."""

    __slots__ = ("done", "error", "response")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.response: stalk.Spack | None = None
        self.error: KVConnectionError | None = None


class KVClient:
    """A connection to a :class:`KVStore` server; use it as ``async with``.

    Methods may be called concurrently from several tasks: their requests are pipelined on
    the one connection and each response is matched to its request by id.

    :param peer: the server's public key (Noise IK, the server must hold it), or ``None``
        to accept any server key (XX; check :attr:`peer` afterwards).
    :param identity: our key pair (what an authorized-peers file lists); ``None`` makes
        a fresh one.
    :raises stalk.ConnectFailed: on entering, the server cannot be reached.
    :raises stalk.HandshakeFailed: on entering, the handshake failed: a different server
        key (:class:`stalk.PeerIdentityMismatch`), or we are not authorized
        (:class:`stalk.PeerRefused`).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        peer: stalk.PublicIdentity | str | None = None,
        identity: stalk.Identity | None = None,
        config: stalk.Config | None = None,
    ) -> None:
        """Remember where to connect; ``async with`` connects."""
        self._host = host
        self._port = port
        self._peer = peer
        self._identity = identity
        self._config = config
        self._conn: stalk.Connection | None = None
        self._task_group: TaskGroup | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._failure: KVConnectionError | None = None

    @property
    def connection(self) -> stalk.Connection:
        """The underlying stalk connection (once entered)."""
        if self._conn is None:
            raise RuntimeError("KVClient is not connected: use 'async with KVClient(...)'")
        return self._conn

    @property
    def peer(self) -> stalk.PublicIdentity:
        """The server's authenticated public key."""
        return self.connection.peer

    async def __aenter__(self) -> KVClient:
        """Connect, run the handshake and start reading responses."""
        if self._conn is not None:
            raise RuntimeError("a KVClient can only be entered once")
        conn = await stalk.connect(
            self._host, self._port, self._peer, identity=self._identity, config=self._config
        )
        group = anyio.create_task_group()
        try:
            await group.__aenter__()
        except BaseException:
            await conn.aclose()
            raise
        self._conn, self._task_group = conn, group
        group.start_soon(self._read_responses, conn)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop reading responses and close the connection."""
        conn, group = self.connection, self._task_group
        self._task_group = None
        try:
            if group is not None:
                group.cancel_scope.cancel()
                # Not (exc_type, exc, tb): anyio would wrap the caller's exception in an
                # ExceptionGroup. Returning None lets it propagate unchanged.
                await group.__aexit__(None, None, None)
        finally:
            await conn.aclose()
            self._fail(KVConnectionError("the client is closed"))

    async def request(self, operation: str, *args: str | bytes | None) -> object:
        """Send one request and return the value of its OK response.

        The typed methods below are more convenient; this one sends anything.

        :raises KVRequestError: the server answered ERROR.
        :raises KVConnectionError: the connection is gone (or was never opened).
        """
        conn = self.connection
        if self._failure is not None:
            raise self._failure
        request_id = self._next_id
        self._next_id += 1
        pending = self._pending[request_id] = _Pending()
        try:
            try:
                await conn.send(stalk.Spack(request_id, operation, *args))
            except (stalk.InvalidSpackValue, stalk.MessageTooLarge):
                raise  # our request is at fault, not the connection
            except (stalk.StalkError, anyio.BrokenResourceError) as exc:
                raise KVConnectionError(f"cannot send the request: {exc}") from exc
            await pending.done.wait()
        finally:
            del self._pending[request_id]
        if pending.error is not None:
            raise pending.error
        response = pending.response
        if response is None:  # pragma: no cover - done is set with a response or an error
            raise KVConnectionError("no response")
        if response[1] == "ERROR":
            raise KVRequestError(str(response[2]))
        return response[2]

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or ``None`` if there is none."""
        value = await self.request("GET", key)
        if value is None or isinstance(value, bytes):
            return value
        raise self._violation(f"GET answered a {type(value).__name__}")

    async def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""
        await self.request("PUT", key, value)

    async def delete(self, key: str) -> bytes | None:
        """Remove ``key``; return the value it had, or ``None`` if there was none."""
        value = await self.request("DELETE", key)
        if value is None or isinstance(value, bytes):
            return value
        raise self._violation(f"DELETE answered a {type(value).__name__}")

    async def list(self, prefix: str = "") -> list[str]:
        """The keys starting with ``prefix``, sorted."""
        keys = await self.request("LIST", prefix) if prefix else await self.request("LIST")
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise self._violation("LIST did not answer a list of str")
        return [str(key) for key in keys]

    # -- response dispatch ----------------------------------------------------------------

    def _violation(self, problem: str) -> KVConnectionError:
        error = KVConnectionError(f"the server broke the protocol: {problem}")
        self._fail(error)
        return error

    def _fail(self, error: KVConnectionError) -> None:
        """Mark the client unusable and wake every waiting request with ``error``."""
        if self._failure is None:
            self._failure = error
        for pending in self._pending.values():
            if not pending.done.is_set():
                pending.error = error
                pending.done.set()

    def _deliver(self, response: stalk.Spack) -> None:
        if len(response) != 3 or response[1] not in ("OK", "ERROR"):
            raise self._violation(f"malformed response {_describe(response)}")
        request_id = response[0]
        if request_id is None and response[1] == "ERROR":
            # The server could not even read a request id: we sent garbage.
            raise self._violation(f"the server could not parse a request: {response[2]!s:.200}")
        if type(request_id) is not int or not 0 < request_id < self._next_id:
            raise self._violation(f"response to a request never sent: {_describe(request_id)}")
        pending = self._pending.get(request_id)
        if pending is None:
            return  # its caller was cancelled and no longer waits
        pending.response = response
        pending.done.set()

    async def _read_responses(self, conn: stalk.Connection) -> None:
        try:
            async for response in conn:
                self._deliver(response)
            self._fail(KVConnectionError("the server closed the connection"))
        except KVConnectionError:
            await conn.aclose()
        except (stalk.StalkError, anyio.BrokenResourceError) as exc:
            error = KVConnectionError(f"the connection was lost: {exc}")
            error.__cause__ = exc
            self._fail(error)


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


def default_server_identity() -> Path:
    """``$STALK_HOME/kvstore_server.key`` (``~/.stalk/kvstore_server.key`` by default)."""
    home = os.environ.get("STALK_HOME") or "~/.stalk"
    return Path(home).expanduser() / "kvstore_server.key"


async def _cancel_on_signal(
    scope: anyio.CancelScope, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Cancel ``scope`` on SIGINT or SIGTERM: a clean stop, not a KeyboardInterrupt."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            scope.cancel()
            return


async def _serve_command(args: argparse.Namespace) -> int:
    identity = load_or_create_identity(args.identity)
    host, port = args.address
    store = KVStore()
    async with (
        await _create_listener(host, port, identity, args.authorized_peers, None) as listener,
        anyio.create_task_group() as tg,
    ):
        await tg.start(_cancel_on_signal, tg.cancel_scope)
        public = listener.identity.public
        print(f"address: {format_address(*listener.address)}", flush=True)
        print(f"key: {public}", flush=True)
        print(f"fingerprint: {public.fingerprint}", flush=True)
        if args.authorized_peers is not None:
            print(f"kvstore: admitting only the keys in {args.authorized_peers}", file=sys.stderr)
        await listener.serve(store.handle)
    return 0


async def _client_command(args: argparse.Namespace) -> int:
    identity = load_or_create_identity(args.identity) if args.identity else None
    host, port = args.address
    async with KVClient(host, port, peer=args.peer, identity=identity) as kv:
        if args.peer is None:
            print(f"server key: {kv.peer}", file=sys.stderr)
            print(f"  ({kv.peer.fingerprint}; not verified: pin it with --peer)", file=sys.stderr)
        if args.command == "get":
            value = await kv.get(args.key)
            if value is None:
                print(f"kvstore: {args.key!r}: no such key", file=sys.stderr)
                return 1
            print(value.decode("utf-8", errors="backslashreplace"))
        elif args.command == "put":
            if args.value == "-":
                data = await anyio.wrap_file(sys.stdin.buffer).read()
            else:
                data = args.value.encode("utf-8")
            await kv.put(args.key, data)
        elif args.command == "delete":
            if await kv.delete(args.key) is None:
                print(f"kvstore: {args.key!r}: no such key", file=sys.stderr)
                return 1
        else:
            for key in await kv.list(args.prefix):
                print(key)
    return 0


async def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "serve":
            return await _serve_command(args)
        if args.command == "pubkey":
            print(load_or_create_identity(args.identity).public)
            return 0
        return await _client_command(args)
    except OSError as exc:  # ConnectFailed is one too
        print(f"kvstore: {exc}", file=sys.stderr)
    except (stalk.StalkError, KVError) as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
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
    network = argparse.ArgumentParser(add_help=False)
    network.add_argument(
        "--address",
        type=_address_arg,
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"the server's address (default {DEFAULT_ADDRESS})",
    )
    client = argparse.ArgumentParser(add_help=False, parents=[common, network])
    client.add_argument(
        "--peer", type=_peer_arg, metavar="KEY", help="the server's key (stalk:...); pins it"
    )
    client.add_argument(
        "--identity", type=Path, metavar="PATH", help="our key file (created if missing)"
    )

    parser = argparse.ArgumentParser(description="stalk encrypted key-value store")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser("serve", parents=[common, network], help="run a server")
    serve_parser.add_argument(
        "--identity",
        type=Path,
        default=default_server_identity(),
        metavar="PATH",
        help="the server's key file, created if missing (default: %(default)s)",
    )
    serve_parser.add_argument(
        "--authorized-peers",
        type=Path,
        metavar="FILE",
        help="admit only the client keys listed in FILE (one stalk:... key per line)",
    )
    serve_parser.add_argument("--verbose", "-v", action="store_true", help="log to stderr")
    get_parser = commands.add_parser("get", parents=[client], help="print a value")
    get_parser.add_argument("key", metavar="KEY")
    put_parser = commands.add_parser("put", parents=[client], help="store a value")
    put_parser.add_argument("key", metavar="KEY")
    put_parser.add_argument("value", metavar="VALUE", help="the value ('-': read stdin)")
    delete_parser = commands.add_parser("delete", parents=[client], help="remove a key")
    delete_parser.add_argument("key", metavar="KEY")
    list_parser = commands.add_parser("list", parents=[client], help="list keys")
    list_parser.add_argument("prefix", nargs="?", default="", metavar="PREFIX")
    pubkey_parser = commands.add_parser(
        "pubkey", parents=[common], help="print the public key of a key file (creating it)"
    )
    pubkey_parser.add_argument("--identity", type=Path, required=True, metavar="PATH")
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
