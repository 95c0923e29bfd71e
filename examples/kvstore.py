"""An end-to-end encrypted key-value store over stalk: server, client class and CLI.

The server keeps a ``dict[str, bytes]`` in memory, or an sqlite database with ``--data
FILE`` (durable: see below), and answers requests sent as spacks over stalk connections,
so nobody on the path can read or alter them. A connection carries many independent
request streams (stalk channels), so that a large value on one does not hold up small
requests on the others.

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
``Spack(None, "ERROR", message)``. Bad requests never close a stream or the connection, or
disturb other clients.

Requests travel on **streams**: the connection's own spack stream (channel 0) and every
channel the client opens (SPEC.md section 24; the server offers channels with
``Config(max_channels=100)``, so a client may have 100 open at once). The server answers
the requests of one stream in order, one at a time, and serves the streams of a
connection independently, each in its own task: a request on one stream never waits for
another stream's, and stalk's writer interleaves the streams' bytes, so a small answer
waits behind about one Noise message of a 16 MiB one, not all of it. Within a stream,
requests may be pipelined: a client can send many before reading any response and match
the responses by id. A client that does not offer channels talks on channel 0 alone, as
one pipelined stream.

:class:`KVClient` sends each request on a stream with no request in flight: the
connection's own first, then channels it opens as requests overlap (``streams``, 8 by
default, in all); beyond that, it pipelines a request on the stream with the fewest in
flight.

Durability
----------
``serve --data FILE`` keeps the store in the sqlite database ``FILE`` (created if missing)
rather than in memory: in WAL mode with ``synchronous=FULL``, so every PUT and DELETE is
committed and synced to disk before its OK is sent, and a write that was acknowledged
survives a crash of the server process, or of the machine. The database is used from a
worker thread, one operation at a time, so the event loop never waits for the disk (reads
too; a busy server would give readers connections of their own). Without ``--data`` the
store is in memory, and gone when the server stops.

Running it
----------
Start the server (``--address`` defaults to 127.0.0.1:7001; port 0 picks a free port)::

    $ python examples/kvstore.py serve --identity ./kv-server.key --data ./kv.sqlite
    address: 127.0.0.1:7001
    key: stalk:E61b4t4ryytElYdUWbk_scUpTHgyaDEkMNEoVbQlSRg
    fingerprint: SHA256:uoZfZXTJj04srVguD5ueZQ2A9DWL1vJF1/Fs3xvc1pA

Those three ``label: value`` lines are printed to stdout once the socket is bound, so a
script can read the address and key from them (the store's file, and log lines with
``--verbose``, go to stderr). The identity file is created if missing, so the key survives
restarts; the default is ``$STALK_HOME/kvstore_server.key`` (``~/.stalk/kvstore_server.key``).

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
        async with anyio.create_task_group() as tg:  # side by side, on their own streams
            tg.start_soon(kv.put, "video", big_value)
            tg.start_soon(kv.get, "greeting")

The store sets no quota: a real service would bound the number and total size of the
values each client may store.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

import anyio
from anyio.abc import ObjectStream, TaskGroup, TaskStatus

import stalk

__all__ = [
    "KVClient",
    "KVConnectionError",
    "KVError",
    "KVRequestError",
    "KVStore",
    "MemoryStorage",
    "SqliteStorage",
    "Storage",
    "StorageError",
    "main",
    "serve",
]

logger = logging.getLogger("kvstore")

DEFAULT_ADDRESS = "127.0.0.1:7001"

#: The longest key accepted, in characters.
MAX_KEY_LENGTH = 1024

#: Channels a client may have open towards the server at once (SPEC's usual figure).
SERVER_CHANNELS = 100

#: Request streams a :class:`KVClient` uses at most by default, channel 0 included.
CLIENT_STREAMS = 8

_T = TypeVar("_T")


# --------------------------------------------------------------------------- errors


class KVError(Exception):
    """Base class of the errors :class:`KVClient` raises."""


class KVRequestError(KVError):
    """The server answered ERROR: the request was invalid, or could not be carried out.

    The server's storage failing is the second case. The connection is still usable.
    """


class KVConnectionError(KVError):
    """The connection ended, broke, or the server broke the protocol: the client is done.

    Also raised for the requests on one stream that the server reset, or closed, while
    they waited; the client's other streams go on.
    """


class StorageError(Exception):
    """The storage failed (the disk, the database file): the operation did not happen."""


# --------------------------------------------------------------------------- storage


class Storage(Protocol):
    """Where a :class:`KVStore` keeps its keys and values."""

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or ``None``."""

    async def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``; durable storage has it on disk on return."""

    async def delete(self, key: str) -> bytes | None:
        """Remove ``key``; return the value it had, or ``None``."""

    async def keys(self, prefix: str) -> list[str]:
        """The keys that start with ``prefix``, sorted."""

    async def aclose(self) -> None:
        """Let go of what the storage holds (files, threads)."""


class MemoryStorage:
    """A ``dict[str, bytes]``: fast, and gone when the process ends (the default).

    No operation awaits anything, so each is atomic.
    """

    def __init__(self) -> None:
        """Start empty."""
        self.data: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or ``None``."""
        return self.data.get(key)

    async def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``."""
        self.data[key] = value

    async def delete(self, key: str) -> bytes | None:
        """Remove ``key``; return the value it had, or ``None``."""
        return self.data.pop(key, None)

    async def keys(self, prefix: str) -> list[str]:
        """The keys that start with ``prefix``, sorted."""
        return [key for key in sorted(self.data) if key.startswith(prefix)]

    async def aclose(self) -> None:
        """Nothing to let go of."""


_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"


def _connect(path: Path) -> sqlite3.Connection:
    """Open (or create) the database: WAL, every commit synced, the table made."""
    # isolation_level=None: autocommit, so a statement outside BEGIN ... COMMIT is a
    # transaction of its own, committed when execute() returns. The connection is used
    # from whichever worker thread runs an operation, one at a time (SqliteStorage).
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        _configure(db)
    except BaseException:
        db.close()
        raise
    return db


def _configure(db: sqlite3.Connection) -> None:
    (mode,) = db.execute("PRAGMA journal_mode=WAL").fetchone()
    if mode != "wal":
        raise sqlite3.OperationalError(f"the database cannot use WAL (journal mode {mode})")
    # FULL: the WAL is synced at every commit, so a commit survives a power loss too
    # (NORMAL would only survive a crash of the process).
    db.execute("PRAGMA synchronous=FULL")
    db.execute(_SCHEMA)


class SqliteStorage:
    """An sqlite database file: durable, each write committed and synced before it returns.

    Every operation runs in a worker thread (:func:`anyio.to_thread.run_sync`), one at a
    time; a write's thread is not abandoned when its caller is cancelled, so a write
    that started completes. Keys sort as in :class:`MemoryStorage`: sqlite compares TEXT
    as UTF-8 bytes, which is code point order.

    Open it with ``await SqliteStorage.open(path)``; :meth:`aclose` closes it.
    """

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        """Wrap an open database (use :meth:`open`; this needs a running event loop)."""
        self._db: sqlite3.Connection | None = db
        self.path = path
        self._limiter = anyio.CapacityLimiter(1)  # one thread at a time uses the database

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> SqliteStorage:
        """Open the database at ``path``, creating it if missing.

        :raises StorageError: it cannot be opened or created, is not an sqlite database,
            or cannot use WAL.
        """
        path = Path(path).expanduser()
        try:
            db = await anyio.to_thread.run_sync(_connect, path)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the database {str(path)!r}: {exc}") from exc
        return cls(db, path)

    async def _run(self, operation: Callable[[sqlite3.Connection, str], _T], key: str) -> _T:
        db = self._db
        if db is None:
            raise StorageError(f"the database {str(self.path)!r} is closed")
        try:
            return await anyio.to_thread.run_sync(operation, db, key, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: {exc}") from exc

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or ``None``."""
        return await self._run(_get, key)

    async def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``: committed and synced on return."""

        def put(db: sqlite3.Connection, key: str) -> None:
            db.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        await self._run(put, key)

    async def delete(self, key: str) -> bytes | None:
        """Remove ``key`` and return the value it had, or ``None``: committed on return."""
        return await self._run(_delete, key)

    async def keys(self, prefix: str) -> list[str]:
        """The keys that start with ``prefix``, sorted."""
        return await self._run(_keys, prefix)

    async def aclose(self) -> None:
        """Close the database (idempotent)."""
        db, self._db = self._db, None
        if db is not None:
            await anyio.to_thread.run_sync(db.close, limiter=self._limiter)


def _get(db: sqlite3.Connection, key: str) -> bytes | None:
    row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return None if row is None else bytes(row[0])


def _delete(db: sqlite3.Connection, key: str) -> bytes | None:
    db.execute("BEGIN IMMEDIATE")  # the read and the delete in one transaction
    try:
        old = _get(db, key)
        if old is not None:
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return old


def _keys(db: sqlite3.Connection, prefix: str) -> list[str]:
    # The keys with the prefix are the ones from the prefix on, until one lacks it.
    keys: list[str] = []
    for (key,) in db.execute("SELECT key FROM kv WHERE key >= ? ORDER BY key", (prefix,)):
        if not key.startswith(prefix):
            break
        keys.append(key)
    return keys


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
    """The server side: a :class:`Storage` and the code that serves it to clients.

    One instance is shared by every connection and stream.

    :param storage: where the keys and values live (default: a new :class:`MemoryStorage`).
    """

    def __init__(self, storage: Storage | None = None) -> None:
        """Serve ``storage``."""
        self.storage: Storage = MemoryStorage() if storage is None else storage

    async def execute(self, request: Sequence[object]) -> stalk.Spack:
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
            return await self._execute(request_id, operation, args)
        except _BadRequest as exc:
            logger.info("bad request %d: %s", request_id, exc)
            return stalk.Spack(request_id, "ERROR", str(exc))
        except StorageError:
            # Not acknowledged, so the client knows the write may not have happened; what
            # failed is for the operator, not the client.
            logger.exception("request %d (%s) failed", request_id, operation)
            return stalk.Spack(request_id, "ERROR", "the server could not carry it out")

    async def _execute(
        self, request_id: int, operation: str, args: Sequence[object]
    ) -> stalk.Spack:
        storage = self.storage
        if operation == "GET":
            _arity(operation, args, 1)
            return stalk.Spack(request_id, "OK", await storage.get(_key(args)))
        if operation == "PUT":
            _arity(operation, args, 2)
            key, value = _key(args), args[1]
            if type(value) is not bytes:
                raise _BadRequest(f"the value must be bytes, not {type(value).__name__}")
            await storage.put(key, value)
            return stalk.Spack(request_id, "OK", None)
        if operation == "DELETE":
            _arity(operation, args, 1)
            return stalk.Spack(request_id, "OK", await storage.delete(_key(args)))
        if operation == "LIST":
            _arity(operation, args, 0, 1)
            keys: list[stalk.SpackValue] = [*await storage.keys(_key(args) if args else "")]
            return stalk.Spack(request_id, "OK", keys)
        raise _BadRequest(f"unknown operation {_describe(operation)}")

    async def handle(self, stream: ObjectStream[stalk.Spack]) -> None:
        """Serve one stream's requests, in order, until the client ends the stream.

        The listener's handler for the connection's own stream (channel 0), and its
        channel handler for each channel.
        """
        async for request in stream:
            response = await self.execute(request)
            try:
                await stream.send(response)
            except stalk.MessageTooLarge:
                # The client accepts smaller messages than this answer (a big value or a
                # long LIST): say so rather than break the connection.
                await stream.send(
                    stalk.Spack(response[0], "ERROR", "the response exceeds your message limit")
                )


def server_config(config: stalk.Config | None = None) -> stalk.Config:
    """The settings a server uses: ``config``, or by default ones that offer channels."""
    return stalk.Config(max_channels=SERVER_CHANNELS) if config is None else config


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

    :param store: the store to serve (default: a new one, in memory).
    :param authorized_peers: a file of client keys (see :class:`stalk.AuthorizedPeers`);
        clients whose key is not listed are refused. ``None`` admits everyone.
    :param config: the connections' settings (default: ``Config(max_channels=100)``);
        without ``max_channels`` the server offers no channels, and every client talks on
        channel 0 alone.
    :raises stalk.IdentityFileError: ``authorized_peers`` is missing or malformed.
    :raises OSError: the address cannot be bound.
    """
    store = KVStore() if store is None else store
    async with await _create_listener(
        host,
        port,
        identity=identity,
        authorized_peers=authorized_peers,
        config=server_config(config),
        store=store,
    ) as listener:
        task_status.started(listener.address)
        await listener.serve(store.handle)


async def _create_listener(
    host: str,
    port: int,
    *,
    identity: stalk.Identity,
    authorized_peers: str | os.PathLike[str] | None,
    config: stalk.Config,
    store: KVStore,
) -> stalk.Listener:
    authorize = None if authorized_peers is None else stalk.AuthorizedPeers(authorized_peers)
    return await stalk.create_listener(
        host,
        port,
        identity=identity,
        authorize=authorize,
        config=config,
        channel_handler=store.handle if config.max_channels is not None else None,
    )


# --------------------------------------------------------------------------- client


class _Pending:
    """A request waiting for its response."""

    __slots__ = ("done", "error", "response")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.response: stalk.Spack | None = None
        self.error: KVConnectionError | None = None


class _Stream:
    """One request stream of a client: the connection's own, or a channel.

    Its requests are pipelined, and matched to their responses by an id counted per stream.
    """

    __slots__ = ("next_id", "pending", "spacks")

    def __init__(self, spacks: ObjectStream[stalk.Spack]) -> None:
        self.spacks = spacks
        self.pending: dict[int, _Pending] = {}
        self.next_id = 1

    def fail(self, error: KVConnectionError) -> None:
        """Wake every request waiting here with ``error``."""
        for pending in self.pending.values():
            if not pending.done.is_set():
                pending.error = error
                pending.done.set()


class KVClient:
    """A connection to a :class:`KVStore` server; use it as ``async with``.

    Methods may be called concurrently from several tasks. Each request goes on a stream
    with no request in flight: the connection's own, else a channel opened for it, up to
    ``streams`` streams in all, so that a large value on one stream does not hold up
    requests on the others. Beyond that a request is pipelined on the stream with the
    fewest in flight, and matched to its response by id. A server that offers no
    channels gets every request on the connection's own stream.

    :param peer: the server's public key (Noise IK, the server must hold it), or ``None``
        to accept any server key (XX; check :attr:`peer` afterwards).
    :param identity: our key pair (what an authorized-peers file lists); ``None`` makes
        a fresh one.
    :param config: the connection's settings; the client offers channels in any case
        (``max_channels=0``, unless ``config`` sets it: the server opens none).
    :param streams: the most request streams at once, channel 0 included (1: channel 0
        alone).
    :raises ValueError: ``streams`` is less than 1.
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
        streams: int = CLIENT_STREAMS,
    ) -> None:
        """Remember where to connect; ``async with`` connects."""
        if streams < 1:
            raise ValueError("a KVClient needs at least one stream")
        config = config or stalk.Config()
        self._host = host
        self._port = port
        self._peer = peer
        self._identity = identity
        self._config = (
            config if config.max_channels is not None else replace(config, max_channels=0)
        )
        self._max_streams = streams
        self._conn: stalk.Connection | None = None
        self._task_group: TaskGroup | None = None
        self._streams: list[_Stream] = []
        self._channel_limit = False  # the server let us open no more channels
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

    @property
    def open_streams(self) -> int:
        """How many request streams are open: the connection's own and the channels."""
        return len(self._streams)

    async def __aenter__(self) -> KVClient:
        """Connect, run the handshake and start reading responses."""
        if self._conn is not None:
            raise RuntimeError("a KVClient can only be entered once")
        conn = await stalk.connect(
            self._host, self._port, self._peer, identity=self._identity, config=self._config
        )
        try:
            await conn.__aenter__()  # its writer and reader tasks
        except BaseException:
            await conn.aclose()
            raise
        group = anyio.create_task_group()
        try:
            await group.__aenter__()
        except BaseException:
            await conn.__aexit__(None, None, None)
            raise
        self._conn, self._task_group = conn, group
        self._add_stream(conn)
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
            await conn.__aexit__(None, None, None)
            self._fail(KVConnectionError("the client is closed"))

    async def request(self, operation: str, *args: str | bytes | None) -> object:
        """Send one request and return the value of its OK response.

        The typed methods below are more convenient; this one sends anything.

        :raises KVRequestError: the server answered ERROR.
        :raises KVConnectionError: the connection is gone (or was never opened), or the
            server ended the request's stream.
        """
        conn = self.connection
        if self._failure is not None:
            raise self._failure
        stream = await self._stream_for_request(conn)
        if self._failure is not None:  # it failed while a channel was being opened
            raise self._failure
        request_id = stream.next_id
        stream.next_id += 1
        pending = stream.pending[request_id] = _Pending()
        try:
            try:
                await stream.spacks.send(stalk.Spack(request_id, operation, *args))
            except (stalk.InvalidSpackValue, stalk.MessageTooLarge):
                raise  # our request is at fault, not the connection
            except (stalk.StalkError, anyio.BrokenResourceError) as exc:
                raise KVConnectionError(f"cannot send the request: {exc}") from exc
            await pending.done.wait()
        finally:
            del stream.pending[request_id]
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

    # -- streams --------------------------------------------------------------------------

    async def _stream_for_request(self, conn: stalk.Connection) -> _Stream:
        """A stream with no request in flight, else a new channel, else the least busy."""
        for stream in self._streams:
            if not stream.pending:
                return stream
        if conn.channels and not self._channel_limit and len(self._streams) < self._max_streams:
            try:
                channel = await conn.open_channel(wait=False)
            except stalk.ChannelLimitReached:
                self._channel_limit = True  # pipeline until one of our channels ends
            except (stalk.StalkError, anyio.BrokenResourceError) as exc:
                raise KVConnectionError(f"cannot open a stream: {exc}") from exc
            else:
                return self._add_stream(channel)
        return min(self._streams, key=lambda stream: len(stream.pending))

    def _add_stream(self, spacks: ObjectStream[stalk.Spack]) -> _Stream:
        stream = _Stream(spacks)
        self._streams.append(stream)
        if self._task_group is not None:
            self._task_group.start_soon(self._read_responses, stream)
        return stream

    def _drop(self, stream: _Stream, error: KVConnectionError) -> None:
        """The server ended a channel: fail its requests; the other streams go on."""
        self._streams.remove(stream)
        self._channel_limit = False
        stream.fail(error)

    # -- response dispatch ----------------------------------------------------------------

    def _violation(self, problem: str) -> KVConnectionError:
        error = KVConnectionError(f"the server broke the protocol: {problem}")
        self._fail(error)
        return error

    def _fail(self, error: KVConnectionError) -> None:
        """Mark the client unusable and wake every waiting request with ``error``."""
        if self._failure is None:
            self._failure = error
        for stream in self._streams:
            stream.fail(error)

    def _deliver(self, stream: _Stream, response: stalk.Spack) -> None:
        if len(response) != 3 or response[1] not in ("OK", "ERROR"):
            raise self._violation(f"malformed response {_describe(response)}")
        request_id = response[0]
        if request_id is None and response[1] == "ERROR":
            # The server could not even read a request id: we sent garbage.
            raise self._violation(f"the server could not parse a request: {response[2]!s:.200}")
        if type(request_id) is not int or not 0 < request_id < stream.next_id:
            raise self._violation(f"response to a request never sent: {_describe(request_id)}")
        pending = stream.pending.get(request_id)
        if pending is None:
            return  # its caller was cancelled and no longer waits
        pending.response = response
        pending.done.set()

    async def _read_responses(self, stream: _Stream) -> None:
        spacks, conn = stream.spacks, self.connection
        try:
            async for response in spacks:
                self._deliver(stream, response)
            if spacks is conn:
                self._fail(KVConnectionError("the server closed the connection"))
            else:
                self._drop(stream, KVConnectionError("the server closed the stream"))
                await spacks.aclose()
        except KVConnectionError:
            await conn.aclose()
        except stalk.ChannelReset as exc:
            error = KVConnectionError(f"the server reset the stream: {exc}")
            error.__cause__ = exc
            self._drop(stream, error)
            await spacks.aclose()
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
    storage: Storage = MemoryStorage() if args.data is None else await SqliteStorage.open(args.data)
    store = KVStore(storage)
    try:
        async with (
            await _create_listener(
                host,
                port,
                identity=identity,
                authorized_peers=args.authorized_peers,
                config=server_config(),
                store=store,
            ) as listener,
            anyio.create_task_group() as tg,
        ):
            await tg.start(_cancel_on_signal, tg.cancel_scope)
            public = listener.identity.public
            print(f"address: {format_address(*listener.address)}", flush=True)
            print(f"key: {public}", flush=True)
            print(f"fingerprint: {public.fingerprint}", flush=True)
            if args.data is not None:
                print(f"kvstore: storing in {args.data} (sqlite, WAL)", file=sys.stderr)
            if args.authorized_peers is not None:
                print(
                    f"kvstore: admitting only the keys in {args.authorized_peers}", file=sys.stderr
                )
            await listener.serve(store.handle)
    finally:
        await storage.aclose()
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
    except (stalk.StalkError, KVError, StorageError) as exc:
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
    serve_parser.add_argument(
        "--data",
        type=Path,
        metavar="FILE",
        help="keep the store in this sqlite database, created if missing; every write is"
        " committed before it is acknowledged (default: in memory, lost at exit)",
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
