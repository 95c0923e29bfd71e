"""Serving stalk: accept connections, handshake each concurrently, run a handler.

Theory of operation
-------------------
A :class:`StreamListener` serves stalk over any anyio listener of byte streams: TCP
(:func:`create_listener` makes a :class:`Listener`), unix domain sockets
(:func:`create_unix_listener` makes a :class:`UnixListener`), or one of the
application's own (TLS-terminating, in-memory...: ``StreamListener(anyio_listener,
identity)``). Every accepted stream gets its own task, so one slow or hostile client
never blocks the others. Three caps are checked when a client arrives, before any
cryptography:

- ``Config.max_connections``: connections at once, established or still handshaking (a
  handshake holds its slot from the start, so the cap is never overshot and is a bound on
  the sockets the listener holds);
- ``Config.max_handshakes``: handshakes in progress at once;
- ``Config.max_handshakes_per_address``: handshakes in progress from one address (IPv4
  address, or IPv6 /64 prefix; IPv4-mapped IPv6 counts as IPv4), so one host cannot take
  every handshake slot. Over a unix socket the "address" is the client's user id, where
  the system tells it (Linux's ``SO_PEERCRED``): every local process of one user is one
  host, as every client on 127.0.0.1 is over TCP, and another local user cannot take
  every slot. Where the system does not tell it, and for streams that are not sockets,
  there is no per-address cap (the other two still hold).

A client beyond any of them is refused with BUSY immediately (one byte and a reason saying
which cap) rather than queued, so a flood of clients that never finish cannot pile up
sockets behind the limit. Each handshake is bounded by ``Config.handshake_timeout``; an
established connection whose handler receives can be bounded by ``Config.idle_timeout``.

After a successful handshake (and ``authorize``), ``handler(conn)`` runs in the same task.
When it returns, the connection is closed cleanly; when it raises, the error is logged, the
connection is closed with INTERNAL_ERROR (its reason a fixed ``"internal error"``: the
exception is described in our log, never to the peer), and the listener keeps serving.

Logging (see :mod:`stalk._logs`): each established connection gets two INFO lines on
``stalk.connection``, when it is established and when it ends, like an access log. What
strangers cause before they are authenticated (failed handshakes on ``stalk.handshake``,
BUSY refusals on ``stalk.listener``) is throttled: anyone who can reach the port can
cause thousands a second.

A :class:`Listener` is an ``anyio.abc.Listener[Connection]``: code written for anyio's
listeners (``serve(handler, task_group=None)``, ``async with``, ``extra()``) serves
stalk connections unchanged. Its ``serve`` also takes anyio's ``task_status``, so
``await task_group.start(listener.serve, handler)`` returns the bound address once the
listener is accepting.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, TypeAlias, TypedDict

import anyio
import anyio.streams.stapled
from anyio.abc import ByteStream, SocketAttribute, TaskGroup, TaskStatus

from stalk import _logs
from stalk._logs import HANDSHAKE, THROTTLE
from stalk.admission import Admission, client_key
from stalk.certificates import Authorities, Certificate, RevocationFile
from stalk.channel import ChannelHandler
from stalk.config import DEFAULT_CONFIG, Config, check_channel_handler
from stalk.connection import Authorize, Connection, certificate_policy
from stalk.errors import ConnectionLost, HandshakeFailed, StalkError
from stalk.identity import Identity
from stalk.link import address_text, remote_address
from stalk.revocation_reload import RevocationReloader
from stalk.wire import CloseCode

__all__ = [
    "ConnectionHandler",
    "Listener",
    "StreamListener",
    "UnixListener",
    "create_listener",
    "create_unix_listener",
    "listen",
    "listen_unix",
]

logger = _logs.LISTENER

#: accept() errors that mean "out of resources for now" (file descriptors, buffers).
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: How long to pause accepting after such an error.
_ACCEPT_BACKOFF: Final = 0.1
#: Descriptors a process needs besides the listener's connections: listening sockets,
#: standard streams, the event loop's own, log files, the application's other files and
#: outgoing connections, refusals being written.
_FD_MARGIN: Final = 64

#: ``async def handler(conn)``: serves one connection; it is closed when the handler ends.
ConnectionHandler: TypeAlias = Callable[[Connection], Awaitable[None]]


def _check_certificate(certificate: Certificate | None, identity: Identity) -> None:
    """Refuse, up front, a certificate that is not for the listener's own key."""
    if certificate is not None and certificate.subject != identity.public:
        raise ValueError(
            f"the certificate is for {certificate.subject.fingerprint}, not for this "
            f"identity ({identity.public.fingerprint})"
        )


def _names(names: Iterable[str] | None) -> frozenset[str] | None:
    """Names or groups to allow, as a set (one string would be a set of its characters)."""
    if names is None:
        return None
    if isinstance(names, str):
        raise TypeError("allow_names and allow_groups are iterables of str, not one str")
    return frozenset(names)


def _revocation_file(
    revocations: RevocationFile | str | os.PathLike[str] | None,
    authorities: Authorities | None,
) -> RevocationFile | None:
    """The revocation file to watch, read now (so that a bad one fails before serving).

    :raises ValueError: revocations without authorities, or for other authorities.
    :raises IdentityFileError: the file cannot be read, or is unsafe.
    :raises RevocationListError: it is malformed or not signed by one of ``authorities``.
    """
    if revocations is None:
        return None
    if authorities is None:
        raise ValueError("revocations need authorities= (the lists are theirs)")
    if not isinstance(revocations, RevocationFile):
        return RevocationFile(revocations, authorities)
    if revocations.authorities is not authorities:
        raise ValueError("a revocation file must put its lists in the listener's authorities")
    return revocations


def _who(conn: Connection) -> str:
    """A connection's peer and address, as log lines name it."""
    host, port, path = conn.host, conn.port, conn.path
    where = address_text((host, port) if host is not None and port is not None else path)
    return f"{conn.peer.fingerprint} at {where}"


def _listener_address(listener: anyio.abc.Listener[Any]) -> tuple[str, int] | str | None:
    """Where an anyio listener accepts: ``(host, port)``, a unix socket's path, or ``None``."""
    local = listener.extra(SocketAttribute.local_address, None)
    if isinstance(local, tuple) and len(local) >= 2:
        return str(local[0]), int(local[1])
    if isinstance(local, (str, bytes)):
        return os.fsdecode(local) or None
    return None


def _check_file_limit(config: Config) -> None:
    """Warn when the process may not open as many files as the listener may hold sockets."""
    if sys.platform == "win32":  # no RLIMIT_NOFILE; Windows sockets are not file descriptors
        return
    import resource  # noqa: PLC0415 - Unix only

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = config.max_connections + _FD_MARGIN
    if soft != resource.RLIM_INFINITY and needed > soft:
        logger.warning(
            "Config.max_connections=%d plus %d descriptors for the process need %d open "
            "files, but the soft RLIMIT_NOFILE is %d: beyond it clients are not refused "
            "but left waiting while accept() fails; raise the limit (ulimit -n, systemd "
            "LimitNOFILE=) or lower max_connections to %d",
            config.max_connections,
            _FD_MARGIN,
            needed,
            soft,
            max(1, soft - _FD_MARGIN),
        )


class StreamListener(anyio.abc.Listener[Connection]):
    """A stalk listener over any anyio listener of byte streams.

    It is an anyio ``Listener`` of :class:`~stalk.Connection` objects.
    :func:`create_listener` and :func:`create_unix_listener` bind a socket and return its
    subclasses :class:`Listener` (TCP) and :class:`UnixListener`. Built directly, it serves
    stalk over the streams of any other anyio listener (one that terminates TLS, one
    over sockets made elsewhere, an in-memory one in tests):
    ``StreamListener(anyio_listener, identity)``. Then :meth:`serve`. Usable as ``async
    with``: leaving closes the anyio listener. Its typed attributes are the anyio
    listener's (``listener.extra(SocketAttribute.local_address)`` for a socket).

    The caps of :class:`~stalk.Config` count from when a stream reaches stalk: a TLS
    handshake the anyio listener runs first is its own business (anyio's ``TLSListener``
    bounds it with its ``handshake_timeout``).

    :param listener: the anyio listener; the stalk listener owns it from here on.
    :param identity: our static key pair (clients pin its public key).
    :param authorize: ``authorize(peer) -> bool`` (or a coroutine function), asked before
        any handler runs (see :func:`listen`).
    :param config: timeouts and limits (default :class:`~stalk.Config`).
    :param channel_handler: run for every channel a client opens (see :func:`listen`).
    :param certificate: our certificate (see :func:`create_listener`).
    :param authorities: require clients' certificates (see :func:`create_listener`).
    :param allow_names: with ``authorities``: these names...
    :param allow_groups: ...or these groups admit.
    :param revocations: a revocation list file (or its path), read now and reloaded when
        it changes (see :func:`create_listener`).
    :raises ValueError: ``channel_handler`` was given without ``Config.max_channels``,
        ``certificate`` is for another key, or names or groups to allow, or revocations,
        were given without ``authorities``.
    :raises ~stalk.IdentityFileError: the revocation list file cannot be read, or is unsafe.
    :raises ~stalk.RevocationListError: it is malformed or not signed by an authority of
        ``authorities``.
    :ivar identity: our static key pair, the one clients pin.
    :ivar certificate: our certificate, presented to every client (``None``: none); set it
        to present another from the next client on (a renewed one, say).
    :ivar authorities: the authorities whose certificates clients must present (``None``:
        no certificate needed); its revocation lists can be replaced while serving.
    :ivar revocations: the revocation list file reloaded when it changes (``None``: none).
    """

    def __init__(
        self,
        listener: anyio.abc.Listener[ByteStream],
        identity: Identity,
        authorize: Authorize | None = None,
        config: Config | None = None,
        channel_handler: ChannelHandler | None = None,
        *,
        certificate: Certificate | None = None,
        authorities: Authorities | None = None,
        allow_names: Iterable[str] | None = None,
        allow_groups: Iterable[str] | None = None,
        revocations: RevocationFile | str | os.PathLike[str] | None = None,
    ) -> None:
        config = config or DEFAULT_CONFIG
        check_channel_handler(config, channel_handler)
        trust = _certificates(
            identity,
            config,
            certificate=certificate,
            authorities=authorities,
            allow_names=allow_names,
            allow_groups=allow_groups,
            revocations=revocations,
        )
        self.revocations = trust["revocations"]
        self.certificate = certificate
        self.authorities = authorities
        self._allow = trust["allow_names"], trust["allow_groups"]
        self._reloader = RevocationReloader()
        self._sockets = listener
        self.identity = identity
        self._authorize = authorize
        self._config = config
        self._channel_handler = channel_handler
        self._admission = Admission(config)
        self._address = _listener_address(listener)
        self._closed = False
        self._bound(self._address)
        _check_file_limit(config)

    def _bound(self, address: tuple[str, int] | str | None) -> None:
        """Check ``address``, what the anyio listener says it accepts on (subclasses do).

        :raises TypeError: not the kind of address the class serves.
        """

    @property
    def address(self) -> tuple[str, int] | str | None:
        """Where it accepts: ``(host, port)``, a unix socket's path, or ``None``.

        ``None`` when the anyio listener does not say (it has no ``local_address``).
        """
        return self._address

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The anyio listener's typed attributes (``SocketAttribute`` for a socket)."""
        return self._sockets.extra_attributes

    @property
    def handshakes_in_progress(self) -> int:
        """How many handshakes are running now."""
        return self._admission.handshakes

    @property
    def connections(self) -> int:
        """How many connections are established now (their handlers are running)."""
        return self._admission.connections

    @property
    def handshakes_by_address(self) -> dict[str, int]:
        """Handshakes in progress per address key, a copy.

        A key is an IPv4 address or an IPv6 /64 (``"2001:db8::/64"``); over a unix socket,
        the client's user id (``"uid 1000"``).

        Only keys with a handshake in progress appear, so its size is bounded by
        ``Config.max_handshakes``.
        """
        return self._admission.by_address

    async def serve(
        self,
        handler: ConnectionHandler,
        task_group: TaskGroup | None = None,
        *,
        task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until cancelled, running ``handler(conn)`` for each.

        Each client gets its own task: the caps of :class:`~stalk.Config` are checked, the
        handshake runs (and ``authorize``), then ``handler(conn)`` inside ``async with
        conn``. A client that fails its handshake, and a handler that raises, are logged on
        the ``stalk`` logger and end only their own connection. Running out of file
        descriptors pauses accepting briefly; it never stops the listener.

        :param handler: ``async def handler(conn)``, run once per established connection;
            the connection is closed when it returns (CLOSE NORMAL) or raises (CLOSE
            INTERNAL_ERROR).
        :param task_group: where connection tasks run (default: a group of our own, so
            cancelling ``serve`` stops every connection with CLOSE GOING_AWAY).
        :param task_status: anyio's: with ``await task_group.start(listener.serve,
            handler)``, :attr:`address` is returned once accepting has started.
        :raises OSError: accepting failed for another reason than a lack of resources
            (or the anyio listener's ``serve`` raised it).
        """
        async with contextlib.AsyncExitStack() as stack:
            if task_group is None:
                task_group = await stack.enter_async_context(anyio.create_task_group())
            async with anyio.create_task_group() as acceptors:
                for sockets in self._socket_listeners():
                    acceptors.start_soon(self._accept_loop, sockets, handler, task_group)
                task_status.started(self.address)

    def _socket_listeners(self) -> list[anyio.abc.Listener[ByteStream]]:
        """The listeners to accept from: a ``MultiListener``'s own (IPv4 and IPv6...)."""
        if isinstance(self._sockets, anyio.streams.stapled.MultiListener):
            return list(self._sockets.listeners)
        return [self._sockets]

    async def _accept_loop(
        self,
        sockets: anyio.abc.Listener[ByteStream],
        handler: ConnectionHandler,
        task_group: TaskGroup,
    ) -> None:
        """Accept forever; running out of file descriptors pauses accepting, never stops it.

        An anyio socket listener is accepted from here; any other serves on its own terms
        (its ``serve`` calls us with each stream).
        """
        if not isinstance(sockets, anyio.abc.SocketListener):
            await sockets.serve(lambda stream: self._handle(stream, handler), task_group)
            return
        while True:
            try:
                stream = await sockets.accept()
            except (OSError, anyio.BrokenResourceError) as exc:
                # anyio's trio backend reports the OSError as the cause of a
                # BrokenResourceError; asyncio's raises it as is.
                cause = exc if isinstance(exc, OSError) else exc.__cause__
                if not isinstance(cause, OSError) or cause.errno not in _RESOURCE_ERRNOS:
                    raise
                # Throttled: with clients still arriving this repeats every backoff.
                THROTTLE.log(
                    logger,
                    logging.WARNING,
                    "accept",
                    "accept failed (%s); retrying in %g s",
                    cause,
                    _ACCEPT_BACKOFF,
                )
                await anyio.sleep(_ACCEPT_BACKOFF)
                continue
            task_group.start_soon(self._handle, stream, handler)

    async def _handle(self, stream: ByteStream, handler: ConnectionHandler) -> None:
        address = remote_address(stream)
        key = client_key(stream, address)
        admission = self._admission
        if not await admission.admit(stream, address, key):
            return
        try:
            if self.revocations is not None:
                await self._reloader.up_to_date(self.revocations)
            conn = await Connection.wrap(
                stream,
                identity=self.identity,
                server_side=True,
                authorize=self._authorize,
                config=self._config,
                channel_handler=self._channel_handler,
                certificate=self.certificate,
                authorities=self.authorities,
                allow_names=self._allow[0],
                allow_groups=self._allow[1],
            )
        except HandshakeFailed as exc:
            # Anyone can fail a handshake at will, so these are throttled by kind: a stray
            # scanner shows, a flood of them does not bury the log (every one is at DEBUG).
            THROTTLE.log(
                HANDSHAKE,
                logging.INFO,
                type(exc).__name__,
                "handshake with %s failed: %s",
                address_text(address),
                exc,
            )
            return
        except Exception:  # noqa: BLE001 - logged; one connection must not stop the listener
            HANDSHAKE.exception("handshake with %s failed unexpectedly", address_text(address))
            await anyio.aclose_forcefully(stream)
            return
        finally:
            admission.handshake_ended(key)
        admission.connection_started()
        try:
            async with conn:  # its writer task runs while the handler does
                try:
                    await self._run_handler(handler, conn)
                finally:
                    # Reached with the connection still open only when the listener is
                    # being stopped (cancelled): tell the peer instead of leaving it hanging.
                    await conn.close(CloseCode.GOING_AWAY, "listener shutting down")
        finally:
            admission.connection_ended()

    @staticmethod
    async def _run_handler(handler: ConnectionHandler, conn: Connection) -> None:
        try:
            await handler(conn)
        except Exception as exc:  # a failing handler closes its own connection only
            if isinstance(exc, ConnectionLost) or (isinstance(exc, StalkError) and conn.broken):
                # The connection ended under the handler (the peer closed with an error,
                # cut it, broke the protocol): its INFO line says how; not the handler's bug.
                logger.debug("handler for %s ended by %r", _who(conn), exc)
                await conn.aclose()
                return
            logger.exception("handler for %s raised", _who(conn))
            await conn.close_internal_error(f"the handler raised {type(exc).__name__}")
        else:
            await conn.aclose()

    async def aclose(self) -> None:
        """Stop listening (connections already accepted are unaffected)."""
        self._closed = True
        await self._sockets.aclose()

    def __repr__(self) -> str:
        state = (
            "closed"
            if self._closed
            else f"{self.connections} connected, {self.handshakes_in_progress} handshaking"
        )
        where = address_text(self.address)
        return f"<stalk.Listener {where} {self.identity.public.fingerprint} {state}>"


class Listener(StreamListener):
    """A bound stalk listener on TCP: its :attr:`address` is ``(host, port)``.

    A :class:`StreamListener`; use :func:`create_listener`. Built directly, it wraps an
    anyio listener of TCP sockets (``Listener(await anyio.create_tcp_listener(), identity)``).

    :raises TypeError: the anyio listener's ``local_address`` is not ``(host, port)``.
    """

    def _bound(self, address: tuple[str, int] | str | None) -> None:
        if not isinstance(address, tuple):
            raise TypeError(f"not a TCP listener: its local address is {address!r}")
        self._tcp_address = address

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` actually bound (port 0 resolves to the real port)."""
        return self._tcp_address


class UnixListener(StreamListener):
    """A bound stalk listener on a unix domain socket: its :attr:`address` is the path.

    A :class:`StreamListener`; use :func:`create_unix_listener`, whose listener also
    removes the socket file when it closes (unless another file has taken its path since).
    Built directly, over an anyio listener of unix sockets (one on a socket that systemd
    passed, say), it leaves the file alone. Not available on Windows.

    :raises TypeError: the anyio listener's ``local_address`` is not a path.
    """

    #: The socket file create_unix_listener made, removed on close if it is still that
    #: file: (its path made absolute, st_dev, st_ino).
    _socket_file: tuple[str, int, int] | None = None

    def _bound(self, address: tuple[str, int] | str | None) -> None:
        if not isinstance(address, str):
            raise TypeError(f"not a unix socket listener: its local address is {address!r}")
        self._path = address

    @property
    def address(self) -> str:
        """The socket's path (Linux's abstract names start with ``"\\0"``)."""
        return self._path

    async def aclose(self) -> None:
        """Stop listening and remove the socket file :func:`create_unix_listener` made.

        Connections already accepted are unaffected. The file is removed only if it is
        still the one this listener made: a listener started on the same path since (the
        path was reused after this one's file was removed) keeps its own.
        """
        try:
            await super().aclose()
        finally:
            socket_file, self._socket_file = self._socket_file, None
            if socket_file is not None:
                path, device, inode = socket_file
                with contextlib.suppress(OSError):
                    found = os.stat(path)
                    if (found.st_dev, found.st_ino) == (device, inode):
                        os.unlink(path)


def _refuse_a_live_socket(path: str) -> None:
    """Raise ``EADDRINUSE`` when a listener accepts on the socket file at ``path``.

    anyio's ``create_unix_listener`` removes a socket file already at its path: right for
    one that a process which ended left behind, but a live server would silently lose its
    path to us (its clients would reach us from then on). So a socket file there is
    probed first: a connection that is refused means nobody accepts (the file is stale).
    A live stalk listener sees the probe as a client that left before its handshake.
    """
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return  # nothing there, or not a socket: binding says what is wrong
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        probe.connect(path)
    except BlockingIOError:
        pass  # its accept queue is full: it is alive
    except OSError:
        return  # refused (stale), or we cannot tell: anyio decides
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "Address already in use (a listener accepts on it)", path)


class _Trust(TypedDict):
    """The certificate options a listener is built with (see :func:`_certificates`)."""

    certificate: Certificate | None
    authorities: Authorities | None
    allow_names: frozenset[str] | None
    allow_groups: frozenset[str] | None
    revocations: RevocationFile | None


def _certificates(
    identity: Identity,
    config: Config,
    *,
    certificate: Certificate | None,
    authorities: Authorities | None,
    allow_names: Iterable[str] | None,
    allow_groups: Iterable[str] | None,
    revocations: RevocationFile | str | os.PathLike[str] | None,
) -> _Trust:
    """The certificate options, checked (and the revocation file read) before binding.

    :raises ValueError, TypeError, IdentityFileError, RevocationListError: as the
        listener's constructor.
    """
    _check_certificate(certificate, identity)
    names, groups = _names(allow_names), _names(allow_groups)
    certificate_policy(authorities, config, names=names, groups=groups)
    return {
        "certificate": certificate,
        "authorities": authorities,
        "allow_names": names,
        "allow_groups": groups,
        "revocations": _revocation_file(revocations, authorities),
    }


async def create_listener(
    host: str,
    port: int,
    *,
    identity: Identity,
    authorize: Authorize | None = None,
    config: Config | None = None,
    channel_handler: ChannelHandler | None = None,
    backlog: int = 65536,
    reuse_port: bool = False,
    certificate: Certificate | None = None,
    authorities: Authorities | None = None,
    allow_names: Iterable[str] | None = None,
    allow_groups: Iterable[str] | None = None,
    revocations: str | os.PathLike[str] | None = None,
) -> Listener:
    """Bind a TCP listener for stalk on ``host:port`` (port 0 picks a free port).

    Nothing is accepted until :meth:`StreamListener.serve` runs; use the listener as ``async
    with`` (or call :meth:`StreamListener.aclose`) to close its sockets.

    :param host: the address to bind (a name may bind several addresses, e.g. IPv4 and
        IPv6 for ``localhost``).
    :param port: the TCP port; 0 picks a free one (see :attr:`Listener.address`).
    :param identity: our static key pair (clients pin its public key).
    :param authorize: ``authorize(peer) -> bool`` (or a coroutine function), asked before
        any handler runs; with IK before we answer message 1. A peer it refuses (or for
        which it raises) is refused with NOT_AUTHORIZED.
    :param config: timeouts and limits (default :class:`~stalk.Config`); its
        ``max_channels`` offers channels.
    :param channel_handler: ``async def handler(channel)``, run in its own task for every
        channel a client opens, beside the connection's handler (see :func:`listen`).
    :param backlog: connections the kernel queues for accepting (``listen()``'s backlog;
        anyio's default, which the kernel caps: at ``net.core.somaxconn`` on Linux).
    :param reuse_port: set ``SO_REUSEPORT``, so that several listeners (processes) may
        bind the same port and share its clients (Linux, BSD, macOS).
    :param certificate: our certificate, presented to every client in the handshake (its
        subject must be ``identity``'s key): clients that trust its authority connect by
        name, without pinning our key.
    :param authorities: require every client to present a certificate issued by one of
        these, checked in the handshake before ``authorize`` runs: a client without one,
        or with one that is forged, expired, revoked, for another key... is refused with
        CERTIFICATE_REFUSED (and never reaches ``authorize`` or the handler).
    :param allow_names: with ``authorities``: admit only certificates for these names...
    :param allow_groups: ...or (either admits) in one of these groups.
    :param revocations: with ``authorities``: a revocation list file (``stalk authority
        revoke`` writes one), read now and again whenever it has changed when a client
        arrives, so a revocation applies from the next handshake on. A version that cannot
        be read or is refused is logged and leaves the list in force (connections already
        established are not affected).
    :returns: the bound, not yet serving, listener.
    :raises OSError: the address cannot be bound.
    :raises ValueError: ``channel_handler`` was given without ``Config.max_channels``,
        ``certificate`` is for another key, or names or groups to allow, or revocations,
        were given without ``authorities``.
    :raises ~stalk.IdentityFileError: the revocation list file cannot be read, or is unsafe.
    :raises ~stalk.RevocationListError: it is malformed or not signed by an authority of
        ``authorities``.
    """
    config = config or DEFAULT_CONFIG
    check_channel_handler(config, channel_handler)
    trust = _certificates(
        identity,
        config,
        certificate=certificate,
        authorities=authorities,
        allow_names=allow_names,
        allow_groups=allow_groups,
        revocations=revocations,
    )
    sockets = await anyio.create_tcp_listener(
        local_host=host, local_port=port, backlog=backlog, reuse_port=reuse_port
    )
    return Listener(
        sockets,
        identity=identity,
        authorize=authorize,
        config=config,
        channel_handler=channel_handler,
        **trust,
    )


async def listen(
    host: str,
    port: int,
    handler: ConnectionHandler,
    *,
    identity: Identity,
    authorize: Authorize | None = None,
    config: Config | None = None,
    channel_handler: ChannelHandler | None = None,
    backlog: int = 65536,
    reuse_port: bool = False,
    certificate: Certificate | None = None,
    authorities: Authorities | None = None,
    allow_names: Iterable[str] | None = None,
    allow_groups: Iterable[str] | None = None,
    revocations: str | os.PathLike[str] | None = None,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve stalk on ``host:port`` until cancelled.

    :func:`create_listener` then :meth:`StreamListener.serve`, as one call. With
    ``task_group.start(partial(listen, ...))`` the bound ``(host, port)`` is returned
    once the listener is ready (useful with port 0). Cancelling it closes the listening
    sockets and every connection (CLOSE GOING_AWAY). Failures of one client (a refused
    or failed handshake, a handler that raises) are logged and never end the listener.

    :param host: the address to bind.
    :param port: the TCP port; 0 picks a free one.
    :param handler: ``async def handler(conn)``, run once per established connection
        (see :meth:`StreamListener.serve`).
    :param identity: our static key pair (clients pin its public key).
    :param authorize: ``authorize(peer) -> bool`` (or a coroutine function), asked for
        each client's key before its handler runs; a refused peer gets NOT_AUTHORIZED.
        :class:`~stalk.AuthorizedPeers` is one.
    :param config: timeouts and limits (default :class:`~stalk.Config`); its
        ``max_channels`` offers channels.
    :param channel_handler: ``async def handler(channel)``, run in its own task (in the
        connection's task group) for every channel a client opens, while the connection's
        ``handler`` runs; :meth:`Connection.accept_channel <stalk.Connection.accept_channel>`
        is then not available. When it returns, the channel is closed; when it raises, the
        error is logged (``stalk.connection``, ERROR) and that channel alone is reset with
        INTERNAL_ERROR (the reason ``"internal error"``).
    :param backlog: connections the kernel queues for accepting (see
        :func:`create_listener`).
    :param reuse_port: set ``SO_REUSEPORT``: several listeners may share the port.
    :param certificate: our certificate, presented to every client in the handshake (its
        subject must be ``identity``'s key): clients that trust its authority connect by
        name, without pinning our key.
    :param authorities: require every client to present a certificate issued by one of
        these, checked in the handshake before ``authorize`` runs: a client without one,
        or with one that is forged, expired, revoked, for another key... is refused with
        CERTIFICATE_REFUSED (and never reaches ``authorize`` or the handler).
    :param allow_names: with ``authorities``: admit only certificates for these names...
    :param allow_groups: ...or (either admits) in one of these groups.
    :param revocations: with ``authorities``: a revocation list file (``stalk authority
        revoke`` writes one), read now and again whenever it has changed when a client
        arrives, so a revocation applies from the next handshake on. A version that cannot
        be read or is refused is logged and leaves the list in force (connections already
        established are not affected).
    :param task_status: set by ``task_group.start()``: receives the bound ``(host, port)``.
    :raises OSError: the address cannot be bound, or accepting failed for another reason
        than a lack of resources.
    :raises ValueError: as :func:`create_listener`.
    :raises ~stalk.IdentityFileError: the revocation list file cannot be read, or is unsafe.
    :raises ~stalk.RevocationListError: it is malformed or not signed by an authority of
        ``authorities``.
    """
    async with await create_listener(
        host,
        port,
        identity=identity,
        authorize=authorize,
        config=config,
        channel_handler=channel_handler,
        backlog=backlog,
        reuse_port=reuse_port,
        certificate=certificate,
        authorities=authorities,
        allow_names=allow_names,
        allow_groups=allow_groups,
        revocations=revocations,
    ) as listener:
        await listener.serve(handler, task_status=task_status)


async def create_unix_listener(
    path: str | os.PathLike[str],
    *,
    identity: Identity,
    authorize: Authorize | None = None,
    config: Config | None = None,
    channel_handler: ChannelHandler | None = None,
    mode: int | None = None,
    backlog: int = 65536,
    certificate: Certificate | None = None,
    authorities: Authorities | None = None,
    allow_names: Iterable[str] | None = None,
    allow_groups: Iterable[str] | None = None,
    revocations: str | os.PathLike[str] | None = None,
) -> UnixListener:
    """Bind a unix domain socket listener for stalk at ``path`` (not on Windows).

    The handshake, limits and errors are those of TCP (:func:`create_listener`); the
    per-address handshake cap counts each client user id (see :class:`~stalk.Config`).
    A socket file that a listener which ended left at ``path`` is replaced; one where a
    listener still accepts is not (``OSError`` ``EADDRINUSE``). Closing the listener
    removes the file (see :meth:`UnixListener.aclose`); a process that is killed leaves
    it, and the next listener replaces it.

    :param path: the socket file's path; a ``str`` starting with ``"\\0"`` is an abstract
        name (Linux), with no file.
    :param identity: our static key pair (clients pin its public key).
    :param authorize: ``authorize(peer) -> bool`` (or a coroutine function), asked before
        any handler runs (see :func:`listen`).
    :param config: timeouts and limits (default :class:`~stalk.Config`).
    :param channel_handler: run for every channel a client opens (see :func:`listen`).
    :param mode: the socket file's permissions (``0o660``: its owner and group may
        connect), set before it accepts anyone; ``None`` leaves those the umask gives
        (with the usual ``022``, only the owner may connect: connecting needs write
        permission). Clients are authenticated by their keys either way; the mode decides
        which local users may try.
    :param backlog: connections the kernel queues for accepting.
    :param certificate: our certificate (see :func:`create_listener`).
    :param authorities: require clients' certificates (see :func:`create_listener`).
    :param allow_names: with ``authorities``: these names...
    :param allow_groups: ...or these groups admit.
    :param revocations: a revocation list file, reloaded when it changes.
    :returns: the bound, not yet serving, listener.
    :raises OSError: the path cannot be bound (a listener accepts there, a file that is
        not a socket is there, its directory is missing, it is too long: about 107
        bytes at most).
    :raises ValueError: ``channel_handler`` was given without ``Config.max_channels``,
        ``mode`` with an abstract name, or certificate options as :func:`create_listener`.
    :raises ~stalk.IdentityFileError: the revocation list file cannot be read, or is unsafe.
    :raises ~stalk.RevocationListError: it is malformed or not signed by an authority of
        ``authorities``.
    """
    config = config or DEFAULT_CONFIG
    check_channel_handler(config, channel_handler)
    trust = _certificates(
        identity,
        config,
        certificate=certificate,
        authorities=authorities,
        allow_names=allow_names,
        allow_groups=allow_groups,
        revocations=revocations,
    )
    path = os.fspath(path)
    abstract = path.startswith("\0")
    if abstract and mode is not None:
        raise ValueError("an abstract unix socket name has no file, so no mode")
    if not abstract:
        _refuse_a_live_socket(path)
    sockets = await anyio.create_unix_listener(path, mode=mode, backlog=backlog)
    try:
        found = None if abstract else os.stat(path)
    except BaseException:
        await anyio.aclose_forcefully(sockets)
        raise
    listener = UnixListener(
        sockets,
        identity=identity,
        authorize=authorize,
        config=config,
        channel_handler=channel_handler,
        **trust,
    )
    if found is not None:
        listener._socket_file = (os.path.abspath(path), found.st_dev, found.st_ino)
    return listener


async def listen_unix(
    path: str | os.PathLike[str],
    handler: ConnectionHandler,
    *,
    identity: Identity,
    authorize: Authorize | None = None,
    config: Config | None = None,
    channel_handler: ChannelHandler | None = None,
    mode: int | None = None,
    backlog: int = 65536,
    certificate: Certificate | None = None,
    authorities: Authorities | None = None,
    allow_names: Iterable[str] | None = None,
    allow_groups: Iterable[str] | None = None,
    revocations: str | os.PathLike[str] | None = None,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve stalk on a unix domain socket at ``path`` until cancelled (not on Windows).

    :func:`create_unix_listener` then :meth:`StreamListener.serve`, as :func:`listen` is
    for TCP; cancelling it closes the listener (removing the socket file) and every
    connection (CLOSE GOING_AWAY).

    :param path: the socket file's path (or an abstract name, see
        :func:`create_unix_listener`).
    :param handler: ``async def handler(conn)``, run once per established connection.
    :param identity: our static key pair (clients pin its public key).
    :param authorize: ``authorize(peer) -> bool`` (or a coroutine function), asked for
        each client's key before its handler runs.
    :param config: timeouts and limits (default :class:`~stalk.Config`).
    :param channel_handler: run for every channel a client opens (see :func:`listen`).
    :param mode: the socket file's permissions (see :func:`create_unix_listener`).
    :param backlog: connections the kernel queues for accepting.
    :param certificate: our certificate (see :func:`create_listener`).
    :param authorities: require clients' certificates (see :func:`create_listener`).
    :param allow_names: with ``authorities``: these names...
    :param allow_groups: ...or these groups admit.
    :param revocations: a revocation list file, reloaded when it changes.
    :param task_status: set by ``task_group.start()``: receives the socket's path.
    :raises OSError: the path cannot be bound (see :func:`create_unix_listener`), or
        accepting failed for another reason than a lack of resources.
    :raises ValueError: as :func:`create_unix_listener`.
    """
    async with await create_unix_listener(
        path,
        identity=identity,
        authorize=authorize,
        config=config,
        channel_handler=channel_handler,
        mode=mode,
        backlog=backlog,
        certificate=certificate,
        authorities=authorities,
        allow_names=allow_names,
        allow_groups=allow_groups,
        revocations=revocations,
    ) as listener:
        await listener.serve(handler, task_status=task_status)
