"""A small blocking facade for scripts and the REPL, over anyio's blocking portal.

::

    import stalk.sync
    with stalk.sync.connect("127.0.0.1", 7000, peer="stalk:...") as conn:
        conn.send(stalk.Spack("hello"))
        print(conn.receive())

Each :class:`SyncConnection` runs its own event loop in a background thread (anyio's
blocking portal); every method blocks the calling thread until the operation is done.
Errors are the same as for :class:`stalk.Connection`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType

from anyio import EndOfStream
from anyio.from_thread import BlockingPortal, start_blocking_portal

from stalk.config import Config
from stalk.connection import Connection
from stalk.connection import connect as _connect
from stalk.connection import connect_unix as _connect_unix
from stalk.identity import Identity, PublicIdentity
from stalk.spack import Spack
from stalk.wire import Pattern

__all__ = ["SyncConnection", "connect", "connect_unix"]


class SyncConnection:
    """A blocking wrapper around one :class:`stalk.Connection`; use :func:`connect`.

    :ivar connection: the wrapped connection, for its attributes (its coroutine methods
        belong to the background event loop).
    """

    def __init__(
        self, portal: BlockingPortal, stack: contextlib.ExitStack, conn: Connection
    ) -> None:
        self._portal = portal
        self._stack = stack
        self.connection = conn

    @property
    def peer(self) -> PublicIdentity:
        """The peer's authenticated static key."""
        return self.connection.peer

    @property
    def pattern(self) -> Pattern:
        """``"XX"`` or ``"IK"``."""
        return self.connection.pattern

    @property
    def handshake_hash(self) -> bytes:
        """The channel-binding value."""
        return self.connection.handshake_hash

    def send(self, spack: Spack) -> None:
        """Send one spack (see :meth:`stalk.Connection.send`)."""
        self._portal.call(self.connection.send, spack)

    def receive(self) -> Spack:
        """The next spack (see :meth:`stalk.Connection.receive`)."""
        return self._portal.call(self.connection.receive)

    def __iter__(self) -> Iterator[Spack]:
        """Spacks until the peer closes cleanly."""
        while True:
            try:
                yield self.receive()
            except EndOfStream:
                return

    def __repr__(self) -> str:
        return f"<stalk.sync.SyncConnection of {self.connection!r}>"

    def close(self) -> None:
        """Close the connection (CLOSE, then TCP) and stop the event loop thread."""
        try:
            self._portal.call(self.connection.aclose)
        finally:
            self._stack.close()

    def __enter__(self) -> SyncConnection:
        """Return self."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """Close the connection."""
        self.close()


def connect(
    host: str,
    port: int,
    peer: PublicIdentity | str | None = None,
    *,
    identity: Identity | None = None,
    config: Config | None = None,
    backend: str = "asyncio",
) -> SyncConnection:
    """Blocking :func:`stalk.connect`; the result must be closed (or used with ``with``).

    Starts an event loop in a background thread for this connection (closed with it).

    :param host: a host name or an IP address.
    :param port: the TCP port.
    :param peer: the server's expected key or its printable form (IK), or ``None`` (XX).
    :param identity: our static key pair; ``None`` makes a fresh one.
    :param config: timeouts and limits (default :class:`~stalk.Config`).
    :param backend: the anyio backend the thread runs: ``"asyncio"`` or ``"trio"``.
    :returns: the connected, blocking connection.
    :raises ~stalk.ConnectFailed: the TCP connection could not be opened.
    :raises ~stalk.HandshakeFailed: the handshake failed (see :func:`stalk.connect`).
    """
    return _blocking(lambda: _connect(host, port, peer, identity=identity, config=config), backend)


def connect_unix(
    path: str | os.PathLike[str],
    peer: PublicIdentity | str | None = None,
    *,
    identity: Identity | None = None,
    config: Config | None = None,
    backend: str = "asyncio",
) -> SyncConnection:
    """Blocking :func:`stalk.connect_unix`: :func:`connect` over a unix domain socket.

    :param path: the socket's path.
    :param peer: the server's expected key or its printable form (IK), or ``None`` (XX).
    :param identity: our static key pair; ``None`` makes a fresh one.
    :param config: timeouts and limits (default :class:`~stalk.Config`).
    :param backend: the anyio backend the thread runs: ``"asyncio"`` or ``"trio"``.
    :returns: the connected, blocking connection.
    :raises ~stalk.ConnectFailed: the socket could not be connected to.
    :raises ~stalk.HandshakeFailed: the handshake failed (see :func:`stalk.connect`).
    """
    return _blocking(lambda: _connect_unix(path, peer, identity=identity, config=config), backend)


def _blocking(opening: Callable[[], Awaitable[Connection]], backend: str) -> SyncConnection:
    """Run ``opening()`` on an event loop of its own, in a thread; the blocking connection."""
    stack = contextlib.ExitStack()
    portal = stack.enter_context(start_blocking_portal(backend))
    try:
        conn = portal.call(opening)
    except BaseException:
        stack.close()
        raise
    return SyncConnection(portal, stack, conn)
