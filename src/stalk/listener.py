"""Serving stalk: accept TCP connections, handshake each concurrently, run a handler.

Theory of operation
-------------------
Every accepted TCP connection gets its own task, so one slow or hostile client never
blocks the others. At most ``Config.max_handshakes`` handshakes run at once; a client that
arrives beyond that is refused with BUSY immediately (one byte and a reason) rather than
queued, so a flood of clients that never finish cannot pile up sockets behind the limit.
Each handshake is bounded by ``Config.handshake_timeout``.

After a successful handshake (and ``authorize``), ``handler(conn)`` runs in the same task.
When it returns, the connection is closed cleanly; when it raises, the error is logged, the
connection is closed with INTERNAL_ERROR, and the listener keeps serving.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeAlias

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskGroup, TaskStatus

from stalk.config import Config
from stalk.connection import Authorize, Connection
from stalk.errors import ConnectionLost, HandshakeFailed, StalkError
from stalk.framing import encode_refusal
from stalk.identity import Identity
from stalk.wire import CloseCode

__all__ = ["ConnectionHandler", "Listener", "create_listener", "listen"]

logger = logging.getLogger("stalk")

#: accept() errors that mean "out of resources for now" (file descriptors, buffers).
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: How long to pause accepting after such an error.
_ACCEPT_BACKOFF: Final = 0.1

#: ``async def handler(conn)``: serves one connection; it is closed when the handler ends.
ConnectionHandler: TypeAlias = Callable[[Connection], Awaitable[None]]


class Listener(anyio.abc.AsyncResource):
    """A bound stalk listener; use :func:`create_listener`, then :meth:`serve`.

    Usable as ``async with``: leaving closes the listening sockets.
    """

    def __init__(
        self,
        sockets: anyio.abc.Listener[anyio.abc.SocketStream],
        identity: Identity,
        authorize: Authorize | None,
        config: Config,
    ) -> None:
        self._sockets = sockets
        self.identity = identity
        self._authorize = authorize
        self._config = config
        self._handshakes = 0

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` actually bound (port 0 resolves to the real port)."""
        host = self._sockets.extra(SocketAttribute.local_address)
        return str(host[0]), int(host[1])

    @property
    def handshakes_in_progress(self) -> int:
        """How many handshakes are running now."""
        return self._handshakes

    async def serve(self, handler: ConnectionHandler, task_group: TaskGroup | None = None) -> None:
        """Accept connections until cancelled, running ``handler(conn)`` for each.

        :param task_group: where connection tasks run (default: a group of our own).
        """
        async with contextlib.AsyncExitStack() as stack:
            if task_group is None:
                task_group = await stack.enter_async_context(anyio.create_task_group())
            async with anyio.create_task_group() as acceptors:
                for sockets in self._socket_listeners():
                    acceptors.start_soon(self._accept_loop, sockets, handler, task_group)

    def _socket_listeners(self) -> list[anyio.abc.Listener[anyio.abc.SocketStream]]:
        inner = getattr(self._sockets, "listeners", None)
        return list(inner) if inner is not None else [self._sockets]

    async def _accept_loop(
        self,
        sockets: anyio.abc.Listener[anyio.abc.SocketStream],
        handler: ConnectionHandler,
        task_group: TaskGroup,
    ) -> None:
        """Accept forever; running out of file descriptors pauses accepting, never stops it."""
        accept = getattr(sockets, "accept", None)
        if accept is None:  # pragma: no cover - anyio's TCP listeners all have accept()
            await sockets.serve(lambda stream: self._handle(stream, handler), task_group)
            return
        while True:
            try:
                stream = await accept()
            except (OSError, anyio.BrokenResourceError) as exc:
                # anyio's trio backend reports the OSError as the cause of a
                # BrokenResourceError; asyncio's raises it as is.
                cause = exc if isinstance(exc, OSError) else exc.__cause__
                if not isinstance(cause, OSError) or cause.errno not in _RESOURCE_ERRNOS:
                    raise
                logger.warning("accept failed (%s); retrying shortly", cause)
                await anyio.sleep(_ACCEPT_BACKOFF)
                continue
            task_group.start_soon(self._handle, stream, handler)

    async def _handle(self, stream: ByteStream, handler: ConnectionHandler) -> None:
        address = stream.extra(SocketAttribute.remote_address, None)
        if self._handshakes >= self._config.max_handshakes:
            logger.warning("refusing %s: %d handshakes in progress", address, self._handshakes)
            with (
                anyio.move_on_after(1, shield=True),
                contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError),
            ):
                await stream.send(encode_refusal(CloseCode.BUSY, "too many handshakes"))
            await anyio.aclose_forcefully(stream)
            return
        self._handshakes += 1
        try:
            conn = await Connection.wrap(
                stream,
                identity=self.identity,
                server_side=True,
                authorize=self._authorize,
                config=self._config,
            )
        except HandshakeFailed as exc:
            logger.info("handshake with %s failed: %s", address, exc)
            return
        except Exception:  # one connection must never take the listener down
            logger.exception("handshake with %s failed unexpectedly", address)
            await anyio.aclose_forcefully(stream)
            return
        finally:
            self._handshakes -= 1
        logger.info("peer %s connected (%s) from %s", conn.peer.fingerprint, conn.pattern, address)
        try:
            async with anyio.create_task_group() as writer_group:
                conn._start_writer(writer_group)
                await self._run_handler(handler, conn, address)
                writer_group.cancel_scope.cancel()
        finally:
            # Reached with the connection still open only when the listener is being
            # stopped (cancelled): tell the peer instead of leaving it hanging.
            await conn.close(CloseCode.GOING_AWAY, "listener shutting down")

    @staticmethod
    async def _run_handler(handler: ConnectionHandler, conn: Connection, address: object) -> None:
        try:
            await handler(conn)
        except ConnectionLost as exc:
            logger.info("connection from %s lost: %s", address, exc)
            await conn.aclose()
        except StalkError as exc:
            # A peer's protocol error already closed the connection with its own code; what
            # reaches here with the connection open is the handler's own mistake.
            logger.warning("connection from %s failed: %s", address, exc)
            await conn.close(CloseCode.INTERNAL_ERROR, type(exc).__name__)
        except Exception as exc:  # a failing handler closes its own connection only
            logger.exception("handler for %s raised", address)
            await conn.close(CloseCode.INTERNAL_ERROR, type(exc).__name__)
        else:
            await conn.aclose()

    async def aclose(self) -> None:
        """Stop listening (connections already accepted are unaffected)."""
        await self._sockets.aclose()


async def create_listener(
    host: str,
    port: int,
    *,
    identity: Identity,
    authorize: Authorize | None = None,
    config: Config | None = None,
) -> Listener:
    """Bind a TCP listener for stalk on ``host:port`` (port 0 picks a free port).

    :param identity: our static key pair (clients pin its public key).
    :param authorize: ``authorize(peer) -> bool`` (or a coroutine function), asked before
        any handler runs; with IK before we answer message 1.
    :raises OSError: the address cannot be bound.
    """
    sockets = await anyio.create_tcp_listener(local_host=host, local_port=port)
    return Listener(sockets, identity, authorize, config or Config())


async def listen(
    host: str,
    port: int,
    handler: ConnectionHandler,
    *,
    identity: Identity,
    authorize: Authorize | None = None,
    config: Config | None = None,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve stalk on ``host:port`` until cancelled.

    With ``task_group.start(partial(listen, ...))`` the bound ``(host, port)`` is returned
    once the listener is ready (useful with port 0).
    """
    async with await create_listener(
        host, port, identity=identity, authorize=authorize, config=config
    ) as listener:
        task_status.started(listener.address)
        await listener.serve(handler)
