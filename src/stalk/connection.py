"""The anyio layer: a :class:`Connection` is an ``ObjectStream[Spack]`` over a byte stream.

Theory of operation
-------------------
A Connection owns one sans-IO :class:`~stalk.session.Session` and one anyio byte stream
(TCP in practice, memory streams in tests) and makes no protocol decision of its own, like
anyio's ``TLSStream``. It is the public API and the flow of a connection's life (the
handshake runs in :mod:`stalk.establish`); its :class:`~stalk.link.Link` moves the bytes
between session and stream, and maps outcomes onto anyio's vocabulary.

Concurrency. Sending and receiving may run at the same time in different tasks: they use
independent cipher states. Every write to the transport happens under the link's lock and
writes whatever :meth:`Session.data_to_send` returns at that moment, so the order of bytes
on the wire is the order in which the session encrypted them (nonce order). Encryption itself
may happen outside the lock (the receive path encrypts PONGs and error CLOSEs), which is
safe for the same reason. Two concurrent ``receive()`` calls are a usage error
(:class:`anyio.BusyResourceError`).

Coalescing. While a connection has a *writer task* (inside ``async with conn:``, and always
for connections handed to a listener's handler; the task starts with the first ``send()``
that is not a reply, see below), ``send()`` only encodes and queues its spack,
wakes the writer and returns without waiting for the socket; the writer encrypts everything
queued since its last write into as few Noise messages as possible and writes them in one
call (about 2 MiB at a time for large spacks, each buffer encrypted just before it is
written). A lone spack therefore goes out at the next scheduling point (no timer, so latency
does not grow), while a burst of sends shares Noise messages and socket writes. Once more than
``Config.send_buffer`` bytes are queued, ``send()`` waits for the writer (backpressure).
``flush()`` always waits until everything queued has been written. Without a writer task
(a connection used without ``async with``), ``send()`` writes before it returns. One more
case writes at once: the first ``send()`` after a ``receive()`` that had to wait for the
network. That is a reply in a request/response exchange, where latency matters and there
is nothing to batch with; a handler answering a burst of buffered requests still batches.

Cancellation. ``receive()`` can be cancelled at any point: anyio's ``receive`` either returns
bytes or consumes none, and the session buffers partial frames. A write, once it starts,
completes whatever the caller's cancellation says, so that no frame is ever half-written
(the peer would misread every later byte); the cancellation takes effect right after. A
write that cannot finish within ``Config.write_timeout`` (the peer stopped reading) marks
the connection broken and closes the transport. Both are :mod:`stalk.writing`'s job, which
pays for a shield and a deadline only when a write has to wait for the socket. Cancelling
``send()`` while it waits for the lock leaves its spack queued: the next ``send``/``flush``
writes it.

Idle timeout. With ``Config.idle_timeout`` set, ``receive()`` keeps a timer of the time it
has spent waiting for the network since the peer's last byte (cancelled calls included;
time between calls does not count). At ``idle_timeout`` it sends a PING, written like a
PONG (see ``Link.write_pong``: never waiting for the send lock); at twice that, with still no
byte, it closes the connection with TIMEOUT and raises :class:`~stalk.IdleTimeout`. A peer
that is receiving answers the PING by itself, so only a silent, unresponsive one is
dropped.

Failure. Any protocol or transport error is terminal: the connection becomes *broken*, a
best-effort error CLOSE is written, the transport is closed, and every later call raises
:class:`~stalk.ConnectionLost` (an :class:`anyio.BrokenResourceError`). After ``aclose()``
every call raises :class:`~stalk.ConnectionClosed` (an :class:`anyio.ClosedResourceError`).

Record. A connection logs at INFO on ``stalk.connection`` when it is established and when
it ends (see :mod:`stalk._logs`), never per spack; what it carried is counted where each
spack and buffer passes anyway, and published as :class:`StalkAttribute` values.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeAlias, cast

import anyio
from anyio.abc import ByteStream, ObjectStream, SocketStream, TaskGroup

from stalk import _logs
from stalk.certificates import Authorities, Certificate, CertificatePolicy
from stalk.channel import INTERNAL_ERROR_REASON, Channel, ChannelHandler
from stalk.config import DEFAULT_CONFIG, Config, check_channel_handler
from stalk.dispatcher import Dispatcher
from stalk.errors import (
    ClosedByPeer,
    ConnectFailed,
    ConnectionClosed,
    HandshakeTimeout,
    LocalProtocolError,
    StalkError,
)
from stalk.establish import Authorize, establish, maybe_await
from stalk.events import (
    NEED_DATA,
    PAUSED,
    CloseReceived,
    MessageReceived,
)
from stalk.identity import Identity, PublicIdentity
from stalk.link import Link, address_text, format_address, stream_error
from stalk.records import check_close
from stalk.session import Role, Session
from stalk.spack import Spack
from stalk.wire import CloseCode, Pattern

__all__ = [
    "Authorize",
    "ChannelHandler",
    "Connection",
    "MessageHandler",
    "StalkAttribute",
    "address_text",
    "certificate_policy",
    "connect",
    "connect_unix",
    "format_address",
    "stream_error",
]

logger = _logs.CONNECTION

#: receive() lets other tasks run after this many spacks returned without waiting.
_YIELD_EVERY = 512

#: ``handler(spack)`` (or a coroutine function) called for every spack received.
MessageHandler: TypeAlias = Callable[[Spack], "Awaitable[None] | None"]


class StalkAttribute(anyio.TypedAttributeSet):
    """Typed attributes a :class:`Connection` publishes (``conn.extra(StalkAttribute.peer)``).

    The statistics are read when asked for (each call gives the current count); counting
    costs an integer addition where a spack or a buffer passes anyway.
    """

    #: the peer's static public key (authenticated)
    peer: PublicIdentity = anyio.typed_attribute()
    #: the peer's verified certificate, or ``None`` (see :attr:`Connection.peer_certificate`)
    peer_certificate: Certificate | None = anyio.typed_attribute()
    #: our own static key pair
    identity: Identity = anyio.typed_attribute()
    #: ``"XX"`` or ``"IK"``
    pattern: Pattern = anyio.typed_attribute()
    #: Noise handshake hash: the channel-binding value
    handshake_hash: bytes = anyio.typed_attribute()
    #: seconds from the first handshake byte to the connection being established
    handshake_duration: float = anyio.typed_attribute()
    #: bytes handed to the transport (handshake, framing and encryption included)
    bytes_sent: int = anyio.typed_attribute()
    #: bytes read from the transport (handshake, framing and encryption included)
    bytes_received: int = anyio.typed_attribute()
    #: spacks accepted by ``send()`` or ``queue()``
    spacks_sent: int = anyio.typed_attribute()
    #: spacks returned by ``receive()`` (or given to the handler)
    spacks_received: int = anyio.typed_attribute()
    #: times our sending cipher was rekeyed
    rekeys_sent: int = anyio.typed_attribute()
    #: times the peer rekeyed (its REKEYs that took effect on our receiving cipher)
    rekeys_received: int = anyio.typed_attribute()


class Connection(ObjectStream[Spack]):
    """An established, authenticated stalk connection: an anyio ``ObjectStream`` of spacks.

    There is no public initializer: use :func:`connect`, a :class:`~stalk.Listener`, or
    :meth:`wrap` for an arbitrary anyio byte stream.
    """

    def __init__(
        self,
        transport: ByteStream,
        session: Session,
        config: Config,
        handler: MessageHandler | None = None,
        channel_handler: ChannelHandler | None = None,
    ) -> None:
        self._link = Link(transport, session, config)
        self._transport = transport
        self._session = session
        self._config = config
        self._receive_guard = anyio.ResourceGuard("receiving from")
        self._handler = handler
        self._task_group: TaskGroup | None = None
        #: The last spack receive() returned had to wait for the network: a reply sent
        #: now is latency-bound (request/response), so send() writes it at once.
        self._answering = False
        #: Spacks receive() returned in a row without waiting for the network.
        self._streak = 0
        #: With channels (both sides offered them), what feeds them: set once established.
        self._channels: Dispatcher | None = None
        self._channel_handler = channel_handler

    # -- construction ---------------------------------------------------------------------

    @classmethod
    async def wrap(
        cls,
        transport: ByteStream,
        *,
        identity: Identity,
        peer: PublicIdentity | None = None,
        server_side: bool = False,
        authorize: Authorize | None = None,
        config: Config | None = None,
        handler: MessageHandler | None = None,
        channel_handler: ChannelHandler | None = None,
        certificate: Certificate | None = None,
        authorities: Authorities | None = None,
        allow_names: Iterable[str] | None = None,
        allow_groups: Iterable[str] | None = None,
    ) -> Connection:
        """Run the stalk handshake over ``transport`` and return the connection.

        For transports other than the TCP of :func:`connect` and :func:`~stalk.listen`
        (anyio memory streams in tests, a stream over another socket type).

        :param transport: any anyio byte stream; the connection owns it from here on.
        :param identity: our static key pair.
        :param peer: client side: the server's expected key (IK), or ``None`` (XX).
        :param server_side: act as the responder.
        :param authorize: server side: asked whether the client's key may connect.
        :param config: timeouts and limits.
        :param handler: called (or awaited) with every spack received, in order, while the
            connection is used as ``async with``; ``receive()`` is then not available.
        :param channel_handler: run for every channel the peer opens, in its own task,
            while the connection is used as ``async with`` (see :func:`connect`).
        :param certificate: our certificate, presented to the peer (its subject must be
            ``identity``'s key).
        :param authorities: require a certificate of the peer, issued by one of these
            (see :func:`connect`).
        :param allow_names: with ``authorities``: accept only certificates for these names...
        :param allow_groups: ...or (either admits) in one of these groups.
        :returns: the established connection.
        :raises ~stalk.HandshakeFailed: the handshake failed; subclasses say why
            (:class:`~stalk.PeerIdentityMismatch`, :class:`~stalk.PeerRefused`,
            :class:`~stalk.InvalidPeerKey`, :class:`~stalk.HandshakeTimeout`, a
            :class:`~stalk.CertificateError` for the peer's certificate). The transport is
            closed.
        :raises ValueError: ``peer`` was given with ``server_side=True``,
            ``channel_handler`` without ``Config.max_channels``, ``certificate`` for
            another key, or names or groups to allow without ``authorities``.
        """
        config = config or DEFAULT_CONFIG
        conn = _unestablished(
            transport,
            identity=identity,
            peer=peer,
            server_side=server_side,
            config=config,
            handler=handler,
            channel_handler=channel_handler,
            certificate=certificate,
            policy=certificate_policy(authorities, config, names=allow_names, groups=allow_groups),
        )
        # A bare deadline scope, not anyio.fail_after: the same bound without its two
        # generator-based context managers, on every connection.
        with anyio.CancelScope(deadline=anyio.current_time() + config.handshake_timeout) as scope:
            await establish(conn._link, authorize)
        if scope.cancelled_caught:
            raise await conn._link.fail(
                HandshakeTimeout(f"no complete handshake within {config.handshake_timeout} s")
            )
        conn._established()
        return conn

    def _established(self) -> None:
        """The handshake completed: with channels, their dispatcher starts."""
        if self._session.channels:
            self._channels = Dispatcher(self._link, self, self._channel_handler)

    # -- attributes -----------------------------------------------------------------------

    @property
    def peer(self) -> PublicIdentity:
        """The peer's authenticated static public key."""
        peer = self._session.peer
        if peer is None:  # pragma: no cover - a Connection exists only once established
            raise ConnectionClosed("no authenticated peer")
        return peer

    @property
    def peer_certificate(self) -> Certificate | None:
        """The peer's certificate, verified in the handshake; ``None`` without one.

        Only a connection made with ``authorities=`` has one (then always): its
        ``name`` and ``groups`` say who the
        authority says the peer is. :attr:`peer` is then a :class:`~stalk.CertifiedIdentity`.
        """
        return self._session.peer_certificate

    @property
    def identity(self) -> Identity:
        """Our own static key pair."""
        return self._session.identity

    @property
    def pattern(self) -> Pattern:
        """The Noise pattern used: ``"XX"`` or ``"IK"``."""
        return self._session.pattern or "XX"

    @property
    def handshake_hash(self) -> bytes:
        """The Noise handshake hash, identical on both sides (channel binding)."""
        return self._session.handshake_hash or b""

    @property
    def host(self) -> str | None:
        """The peer's IP address (``None`` over a unix socket and other transports)."""
        address = self._link.address
        return address[0] if isinstance(address, tuple) else None

    @property
    def port(self) -> int | None:
        """The peer's TCP port (``None`` over a unix socket and other transports)."""
        address = self._link.address
        return address[1] if isinstance(address, tuple) else None

    @property
    def path(self) -> str | None:
        """Over a unix socket, its path: the listener's, on either side (``None`` else).

        A client normally has no name of its own, so on the server side this is the
        listener's path too; Linux's abstract names start with ``"\\0"``.
        """
        address = self._link.address
        return address if isinstance(address, str) else None

    @property
    def peer_max_message_size(self) -> int:
        """The largest encoded spack the peer accepts."""
        return self._session.peer_max_message_size or 0

    @property
    def channels(self) -> bool:
        """Whether the connection has channels (both sides set ``Config.max_channels``).

        Without, :meth:`open_channel` and :meth:`accept_channel` raise.
        """
        return self._channels is not None

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The transport's typed attributes plus :class:`StalkAttribute`."""
        link = self._link
        session = self._session
        return {
            **self._transport.extra_attributes,
            StalkAttribute.peer: lambda: self.peer,
            StalkAttribute.peer_certificate: lambda: self.peer_certificate,
            StalkAttribute.identity: lambda: self.identity,
            StalkAttribute.pattern: lambda: self.pattern,
            StalkAttribute.handshake_hash: lambda: self.handshake_hash,
            StalkAttribute.handshake_duration: lambda: link.handshake_seconds or 0.0,
            StalkAttribute.bytes_sent: lambda: session.bytes_sent,
            StalkAttribute.bytes_received: lambda: session.bytes_received,
            StalkAttribute.spacks_sent: lambda: link.spacks_sent,
            StalkAttribute.spacks_received: lambda: link.spacks_received,
            StalkAttribute.rekeys_sent: lambda: session.rekeys_sent,
            StalkAttribute.rekeys_received: lambda: session.rekeys_received,
        }

    def __repr__(self) -> str:
        where = address_text(self._link.address)
        state = "closed" if self._link.closed else "broken" if self._link.broken else "open"
        return f"<stalk.Connection {self.pattern} {self.peer.fingerprint} {where} {state}>"

    # -- sending --------------------------------------------------------------------------

    def queue(self, item: Spack) -> None:
        """Encode ``item`` and buffer it without writing; :meth:`flush` sends everything.

        :raises ~stalk.InvalidSpackValue: a value cannot be encoded (nothing is queued).
        :raises ~stalk.MessageTooLarge: larger than the peer accepts (nothing is queued).
        :raises ~stalk.ConnectionClosed: the connection was closed (or ``send_eof`` called).
        :raises ~stalk.ConnectionLost: the connection is broken.
        """
        self._link.check_open()
        self._session.queue(item)
        self._link.spacks_sent += 1

    async def flush(self) -> None:
        """Encrypt everything queued into as few Noise messages as possible and write it.

        :raises ~stalk.ConnectionClosed: the connection was closed.
        :raises ~stalk.ConnectionLost: the connection broke (or the write timed out).
        """
        if self._channels is not None:
            await self._channels.flush()
            return
        self._link.check_open()
        self._session.flush()
        await self._link.write_all()

    async def send(self, item: Spack) -> None:
        """Send one spack.

        With a writer task (see the module docs) the spack is queued for it and ``send``
        returns at once unless more than ``Config.send_buffer`` bytes are waiting; without
        one, it is written before ``send`` returns. Either way spacks go out in call order.
        With channels it may also wait for the peer's credit, as :meth:`Channel.send
        <stalk.Channel.send>` does.

        :raises ~stalk.InvalidSpackValue: a value cannot be encoded (nothing is written).
        :raises ~stalk.MessageTooLarge: larger than the peer accepts (nothing is written).
        :raises ~stalk.ConnectionClosed: the connection was closed.
        :raises ~stalk.ConnectionLost: the connection broke (or a write timed out).
        """
        if self._channels is not None:
            channel0 = self._channels.channel0
            if channel0.sends_now():
                if not await channel0.send_now(item):
                    await channel0.keep_within_bound()
                return
            channel0.queue(item)  # (True: channel 0 is never reset)
            if not channel0.leave_to_writer():
                await channel0.write_queued()
            return
        link = self._link
        answering, self._answering = self._answering, False
        # The first send that is not a reply starts the writer: a connection that only
        # answers (most of a server's) never pays for the task.
        starter = None if link.writer_running or answering else self._task_group
        if starter is not None or (
            link.writer_running and not (answering and not link.send_lock.locked())
        ):
            self.queue(item)
            if starter is not None:
                link.writer_running = True
                starter.start_soon(link.write_behind, name=f"stalk writer {link.address}")
            if self._session.queued_bytes <= self._config.send_buffer:
                link.wakeup.set()
                return
            self._session.flush()  # queue() checked that the connection is open
            await link.write_all()
            return
        # Written before send returns: a reply, or no writer task.
        link.check_open()
        await link.send_now(item)

    async def send_eof(self) -> None:
        """Send CLOSE (normal) and half-close: the peer's ``receive()`` ends, ours goes on.

        With channels it ends our direction of every channel, and first waits (reading as
        need be) until what they queued is sent, some of it perhaps waiting for credit.

        :raises ~stalk.ConnectionLost: the connection broke.
        """
        if self._channels is not None:
            await self._channels.drain(None)
        async with self._link.send_lock:
            if self._link.closed or self._session.close_sent:
                return
            self._link.check_open()
            self._session.close(CloseCode.NORMAL)
            await self._link.write_pending()
            # The CLOSE is written; a failed TCP half-close changes nothing.
            with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._transport.send_eof()
        if self._channels is not None:
            self._channels.ended()  # senders waiting for credit raise

    # -- receiving ------------------------------------------------------------------------

    async def receive(self) -> Spack:
        """The next spack from the peer.

        :raises ~anyio.EndOfStream: the peer closed its direction cleanly (CLOSE code 0).
        :raises ~stalk.ClosedByPeer: the peer sent CLOSE with an error code.
        :raises ~stalk.ConnectionLost: the stream was cut (EOF or reset without CLOSE), or
            the connection broke before this call (its message says how).
        :raises ~stalk.IdleTimeout: (a ConnectionLost) with ``Config.idle_timeout`` set, the
            peer stayed silent and did not answer a keepalive PING (see the module docs).
        :raises ~stalk.ProtocolError: the peer broke the protocol (also ends the connection).
            With channels, only the task that read it raises it (inside ``async with``, the
            connection's reader task); the others raise :class:`~stalk.ConnectionLost`
            saying so.
        :raises ~stalk.ConnectionClosed: we closed the connection.
        :raises ~anyio.BusyResourceError: another task is already receiving.
        """
        with self._receive_guard:
            if self._channels is not None:
                channel0 = self._channels.channel0  # as Channel.receive
                taken = channel0.take_now()
                if taken is None:
                    return await channel0.receive_waiting()
                if channel0.owed:
                    await channel0.write_owed()
                return taken
            if self._streak >= _YIELD_EVERY:
                # A peer that sent many spacks at once must not keep a receive loop from
                # ever yielding: let other tasks run (nothing is held yet, so a cancellation
                # here loses nothing).
                self._streak = 0
                await anyio.lowlevel.checkpoint()
            waited = False
            while True:
                self._link.check_open()
                try:
                    event = self._session.next_event()
                except StalkError as exc:
                    raise await self._link.fail(exc, close=True) from None
                if self._session.has_output:
                    await self._link.write_pong()
                if type(event) is MessageReceived:
                    self._answering = waited
                    self._streak = 0 if waited else self._streak + 1
                    self._link.spacks_received += 1
                    return event.spack
                if event is NEED_DATA:
                    await self._link.receive_into_session()
                    waited = True
                elif event is PAUSED:
                    await self._link.resume_reading()
                elif isinstance(event, CloseReceived):
                    if not self._link.closed and not self._session.close_sent:
                        self._link.peer_closed_first = True
                    if event.code == CloseCode.NORMAL:
                        raise anyio.EndOfStream
                    raise self._link.tag(
                        ClosedByPeer(
                            "the peer closed the connection",
                            code=event.code,
                            reason=event.reason,
                        )
                    )

    # -- channels -------------------------------------------------------------------------

    async def open_channel(self, *, wait: bool = True) -> Channel:
        """Open a channel of ours: a new spack stream beside the connection's own.

        Nothing is sent until its first spack (or its ``send_eof``): the peer learns of it
        then, with that spack (no round trip).

        :param wait: when the peer's ``max_channels`` of ours are open, wait until one of
            them ends (both directions closed, or reset); ``False``: raise instead.
        :raises ~stalk.ChannelLimitReached: ``wait=False`` and the peer's limit is reached,
            or the peer accepts no channel at all (``max_channels`` 0).
        :raises ~stalk.LocalProtocolError: the connection has no channels (see
            :attr:`channels`).
        :raises ~stalk.ConnectionClosed: the connection was closed (for sending too).
        :raises ~stalk.ConnectionLost: the connection is broken.
        """
        return await self._dispatcher().open(wait=wait)

    async def accept_channel(self) -> Channel:
        """The next channel the peer opened, in the order it opened them.

        A channel keeps its place in our ``max_channels`` until it ends, so a peer can
        have at most that many waiting here.

        :raises ~anyio.EndOfStream: the peer closed the connection cleanly (no channel can
            come any more).
        :raises ~stalk.ClosedByPeer: the peer closed the connection with an error code.
        :raises ~stalk.LocalProtocolError: the connection has no channels, or has a
            ``channel_handler`` (the peer's channels go to it).
        :raises ~stalk.ConnectionClosed: the connection was closed.
        :raises ~stalk.ConnectionLost: the connection is broken.
        :raises ~anyio.BusyResourceError: another task is already accepting.
        """
        return await self._dispatcher().accept()

    def _dispatcher(self) -> Dispatcher:
        if self._channels is None:
            self._link.check_open()
            raise LocalProtocolError(
                "this connection has no channels: both sides must set Config.max_channels"
            )
        return self._channels

    # -- closing --------------------------------------------------------------------------

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send CLOSE with ``code`` and ``reason`` (best effort), then close the transport.

        Idempotent. Waits at most ``Config.close_timeout`` for the CLOSE to be written.
        Errors while writing the CLOSE are not raised: the connection is closed either way.

        :param code: a :class:`~stalk.CloseCode`, or an application code from ``0x1000``
            to ``0xFFFF``; anything but ``NORMAL`` (0) is an error close, which the peer's
            ``receive()`` raises as :class:`~stalk.ClosedByPeer`.
        :param reason: text for the peer (at most 1024 UTF-8 bytes).
        :raises ValueError: ``code`` does not fit in 16 bits or ``reason`` is too long
            (nothing is closed then).
        """
        check_close(code, reason)
        await self._close(code, reason)

    async def _close(self, code: int, reason: str, detail: str | None = None) -> None:
        """:meth:`close`, arguments checked; ``detail`` replaces ``reason`` in the log."""
        if self._link.closed:
            return
        if self._channels is not None:
            await self._channels.drain(self._config.close_timeout)
            if self._link.closed:
                return
        self._link.closed = True
        if self._link.closed_with is None and not self._session.close_sent:
            self._link.closed_with = (code, reason, detail)
        try:
            if self._link.broken is None:
                await self._link.write_closing(lambda: self._session.close(code, reason))
        finally:
            await self._link.abort()
            if self._channels is not None:
                self._channels.ended()

    async def aclose(self) -> None:
        """Close cleanly: send CLOSE (normal), then close the transport. Idempotent."""
        await self.close()

    # -- handler-driven use ---------------------------------------------------------------

    async def __aenter__(self) -> Connection:
        """Enter: a writer task may run from here on; ``connect(handler=...)`` dispatches."""
        if self._task_group is None:
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
            if self._handler is not None:
                self._task_group.start_soon(self._dispatch, self._handler)
            if self._channels is not None:
                self._channels.start(self._task_group)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """Close the connection (and stop the writer and handler tasks, channels' included).

        Leaving normally sends CLOSE NORMAL; leaving through an exception sends
        INTERNAL_ERROR (GOING_AWAY for a cancellation), so the peer never mistakes an
        abandoned stream for a complete one. The INTERNAL_ERROR's reason is always
        ``"internal error"``: the exception is the caller's to report, and only the
        connection's log line names its class.
        """
        try:
            if exc_type is None:
                await self.aclose()
            elif issubclass(exc_type, anyio.get_cancelled_exc_class()):
                await self.close(CloseCode.GOING_AWAY, "cancelled")
            else:
                await self.close_internal_error(f"the async with block raised {exc_type.__name__}")
        finally:
            group, self._task_group = self._task_group, None
            if self._channels is not None:
                self._channels.stop()
            if group is not None:
                if (
                    self._link.writer_running
                    or self._handler is not None
                    or self._channels is not None  # its reader runs
                ):
                    group.cancel_scope.cancel()  # else no task ever ran: nothing to cancel
                # Not the body's exception: it propagates by itself once we return, and
                # handing it to the group would wrap it in an ExceptionGroup.
                await group.__aexit__(None, None, None)
                self._link.writer_running = False  # also if it was cancelled before it ran

    async def close_internal_error(self, detail: str) -> None:
        """Close with INTERNAL_ERROR and the fixed reason ``"internal error"``.

        For code that runs handlers: the peer learns that something failed on our side,
        never what (an exception's text could leak local details); ``detail`` goes only
        to this connection's end line in the log.
        """
        await self._close(CloseCode.INTERNAL_ERROR, INTERNAL_ERROR_REASON, detail)

    @property
    def broken(self) -> bool:
        """Whether the connection failed: cut, the peer broke the protocol, a write timed out.

        Then every call raises the failure; a handler that sees a
        :class:`~stalk.StalkError` can tell the connection's end from its own mistake.
        """
        return self._link.broken is not None

    async def _dispatch(self, handler: MessageHandler) -> None:
        # A connection that ends badly must not tear down the caller's ``async with`` body
        # from this background task: the error is kept (the connection is broken) and the
        # next send()/flush() raises it.
        try:
            async for spack in self:
                await maybe_await(handler(spack))
        except StalkError as exc:
            logger.debug("receiving from %s ended: %r", address_text(self._link.address), exc)


def _unestablished(
    transport: ByteStream,
    *,
    identity: Identity,
    peer: PublicIdentity | None,
    server_side: bool,
    config: Config,
    handler: MessageHandler | None,
    channel_handler: ChannelHandler | None = None,
    certificate: Certificate | None = None,
    policy: CertificatePolicy | None = None,
) -> Connection:
    """A connection over ``transport`` whose handshake has not run yet (:func:`establish`).

    What :meth:`Connection.wrap` and :func:`connect` share: the session for our role.
    """
    check_channel_handler(config, channel_handler)
    role = Role.RESPONDER if server_side else Role.INITIATOR
    session = Session(
        role,
        identity,
        peer=peer,
        config=config.session_config(),
        certificate=certificate,
        certificate_policy=policy,
    )
    return Connection(transport, session, config, handler, channel_handler)


@functools.lru_cache(maxsize=256)
def _ip_literal(host: str) -> bool:
    """Whether ``host`` is an IP address without a scope (dialled or bound directly).

    Cached: parsing an address costs several microseconds, at every connect.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return "%" not in host


#: A socket address as ``socket.getaddrinfo`` gives it: ``(host, port)``, or IPv6's
#: ``(host, port, flowinfo, scope_id)``.
_SockAddr: TypeAlias = "tuple[str, int] | tuple[str, int, int, int]"


async def _dial(
    host: str, port: int, local_host: str | None = None, local_port: int | None = None
) -> ByteStream:
    """A TCP connection to ``host:port``, from ``local_host:local_port`` when given.

    An IP address is dialled directly: anyio's ``connect_tcp`` races every address a name
    resolves to in a task group (happy eyeballs), which for one address costs more than
    the connection itself (measured: 170 against 75 microseconds on asyncio, 140 against
    40 on trio). A name, or an address with a scope, goes through ``connect_tcp``.

    With a local address or port, both ends are resolved here and the peer's addresses
    (of the local address's family) are tried in turn: anyio's ``connect_tcp`` ignores a
    port without an address, and on trio leaves its socket open when the bind fails
    (anyio 4.16).
    """
    if local_host is None and not local_port:
        if not _ip_literal(host):
            return await anyio.connect_tcp(host, port)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return await _dial_address(family, (host, port), None)
    local: _SockAddr | None = None
    local_family: int = socket.AF_UNSPEC
    if local_host is not None:
        local_family, local = await _resolve(local_host, local_port or 0)
    targets: list[tuple[int, _SockAddr]]
    if _ip_literal(host):
        targets = [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))]
        if local is not None and targets[0][0] != local_family:
            versions = [
                6 if family == socket.AF_INET6 else 4 for family in (local_family, targets[0][0])
            ]
            raise OSError(
                errno.EAFNOSUPPORT,
                f"the local address is IPv{versions[0]}, the peer's IPv{versions[1]}",
            )
    else:
        targets = await _resolve_all(host, port, local_family)
    failures: list[tuple[str, OSError]] = []
    for target_family, address in targets:
        any_address = "::" if target_family == socket.AF_INET6 else "0.0.0.0"  # noqa: S104
        try:
            return await _dial_address(
                target_family, address, local or (any_address, local_port or 0)
            )
        except OSError as exc:
            failures.append((address[0], exc))
    if len(failures) == 1:
        raise failures[0][1]
    raise OSError("; ".join(f"{where}: {exc}" for where, exc in failures))


async def _resolve(host: str, port: int) -> tuple[int, _SockAddr]:
    """The first address ``host`` resolves to (an IP address is its own), and its family."""
    if _ip_literal(host):
        return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, port)
    return (await _resolve_all(host, port, socket.AF_UNSPEC))[0]


async def _resolve_all(host: str, port: int, family: int) -> list[tuple[int, _SockAddr]]:
    """Every TCP address of ``host`` (of ``family``), in the resolver's order, once each."""
    found = await anyio.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    return list(dict.fromkeys((int(entry[0]), cast("_SockAddr", entry[4])) for entry in found))


async def _dial_address(family: int, address: _SockAddr, local: _SockAddr | None) -> ByteStream:
    """A TCP connection to one socket address, from ``local`` when given (no lookup)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if local is not None:
            sock.bind(local)
        try:
            sock.connect(address)
        except BlockingIOError:
            if not _connected(sock):
                await anyio.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error)) from None
        return await SocketStream.from_socket(sock)
    except BaseException:
        sock.close()
        raise


def _connected(sock: socket.socket) -> bool:
    """Whether a connect still in progress is complete already: it has a peer.

    On loopback the kernel completes the TCP handshake within ``connect()``, so the
    event loop need not be asked (a pass of it, about 10 microseconds).
    """
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _failure_text(exc: OSError) -> str:
    """Why a connect failed, and why each address did.

    anyio's ``connect_tcp`` says "All connection attempts failed" and keeps each address's
    error as the cause.
    """
    cause = exc.__cause__
    causes = getattr(cause, "exceptions", None) or ([cause] if cause is not None else [])
    details = list(dict.fromkeys(str(error) for error in causes if isinstance(error, OSError)))
    return f"{exc} ({'; '.join(details)})" if details else str(exc)


async def _open(
    dial: Callable[[], Awaitable[ByteStream]],
    where: tuple[str, int] | str,
    peer: PublicIdentity | str | None,
    *,
    identity: Identity | None,
    handler: MessageHandler | None,
    config: Config | None,
    channel_handler: ChannelHandler | None,
    local: str = "",
    certificate: Certificate | None = None,
    authorities: Authorities | None = None,
    expect_name: str | None = None,
) -> Connection:
    """Dial with ``dial()`` and run the handshake as the initiator (:func:`connect`'s body).

    :param where: the address dialled, for errors and logs.
    :param local: `` from ADDRESS`` when the caller chose our end's address.
    """
    config = config or DEFAULT_CONFIG
    check_channel_handler(config, channel_handler)
    if isinstance(peer, str):
        peer = PublicIdentity.from_string(peer)
    if certificate is not None and identity is None:
        raise ValueError("a certificate needs the identity it was issued for (identity=)")
    names = None if expect_name is None else [expect_name]
    policy = certificate_policy(authorities, config, names=names)
    identity = identity or Identity.generate()
    # One deadline for the connect and the handshake together (Config.handshake_timeout),
    # a bare deadline scope rather than anyio.fail_after (see Connection.wrap).
    with anyio.CancelScope(deadline=anyio.current_time() + config.handshake_timeout):
        try:
            stream = await dial()
        except OSError as exc:
            error = ConnectFailed(
                f"cannot connect to {address_text(where)}{local}: {_failure_text(exc)}"
            )
            error.peer_address = where
            raise error from exc
        conn = _unestablished(
            stream,
            identity=identity,
            peer=peer,
            server_side=False,
            config=config,
            handler=handler,
            channel_handler=channel_handler,
            certificate=certificate,
            policy=policy,
        )
        await establish(conn._link, None)
        conn._established()
        return conn
    # Only the deadline ends the block without a return or an exception.
    timeout = HandshakeTimeout(
        f"no connection and handshake with {address_text(where)} "
        f"within {config.handshake_timeout} s"
    )
    timeout.peer_address = where
    raise timeout


async def connect(
    host: str,
    port: int,
    peer: PublicIdentity | str | None = None,
    *,
    identity: Identity | None = None,
    handler: MessageHandler | None = None,
    config: Config | None = None,
    channel_handler: ChannelHandler | None = None,
    local_host: str | None = None,
    local_port: int | None = None,
    certificate: Certificate | None = None,
    authorities: Authorities | None = None,
    expect_name: str | None = None,
) -> Connection:
    """Open a TCP connection to ``host:port`` and run the stalk handshake.

    Use the result as ``async with await connect(...) as conn:`` so that it is closed
    (and its sends are batched by a writer task, see :class:`Connection`).

    :param host: a host name or an IP address (an address is dialled directly).
    :param port: the TCP port.
    :param peer: the server's expected static key (or its printable form): the handshake
        is IK and fails with :class:`~stalk.PeerIdentityMismatch` for any other key.
        ``None``: XX, and ``conn.peer`` tells who answered.
    :param identity: our static key pair; ``None`` makes a fresh one for this connection.
    :param handler: called (or awaited) with every spack received, in order, while the
        connection is used as ``async with``; ``receive()`` is then not available.
    :param config: timeouts and limits (default :class:`~stalk.Config`); its
        ``max_channels`` offers channels.
    :param channel_handler: ``async def handler(channel)``, run in its own task for every
        channel the peer opens, while the connection is used as ``async with`` (channels
        opened before wait for it); then :meth:`Connection.accept_channel` is not
        available. When it returns, the channel is closed (:meth:`Channel.aclose
        <stalk.Channel.aclose>`); when it raises, the error is logged and the channel alone
        is reset with INTERNAL_ERROR.
    :param local_host: the address of ours to connect from: one of this machine's
        addresses (a name stands for the first address it resolves to); ``host``'s
        addresses of its family are then tried in turn. ``None``: the system chooses.
    :param local_port: the port to connect from; ``None`` or 0: the system chooses.
        With a local address or port, a name's addresses are tried one after the other
        (not raced as without).
    :param certificate: our certificate, presented to the server in the handshake, for a
        server that requires one (its subject must be ``identity``'s key).
    :param authorities: require the server to present a certificate issued by one of
        these: no pinned key is needed (XX). Before anything more is sent, the handshake
        fails with a :class:`~stalk.CertificateError` when it presents none, or one that
        is forged, expired, revoked, for another key...
    :param expect_name: with ``authorities``: the certificate must be for this name
        (:class:`~stalk.CertificateNameMismatch` otherwise).
    :returns: the established connection.
    :raises ~stalk.ConnectFailed: the TCP connection could not be opened, or not from the
        local address given (also an :class:`OSError`).
    :raises ~stalk.HandshakeTimeout: the TCP connect and the handshake together took
        longer than ``Config.handshake_timeout``.
    :raises ~stalk.HandshakeFailed: the handshake failed; subclasses say why
        (:class:`~stalk.PeerIdentityMismatch`, :class:`~stalk.PeerRefused`,
        :class:`~stalk.InvalidPeerKey`).
    :raises ValueError: ``peer`` is a string that is not a valid printable public key,
        ``channel_handler`` was given without ``Config.max_channels``, ``certificate``
        without the ``identity`` it is for, or ``expect_name`` without ``authorities``.
    """
    local = ""
    if local_host is not None:
        local = f" from {format_address(local_host, local_port) if local_port else local_host}"
    elif local_port:
        local = f" from port {local_port}"
    return await _open(
        lambda: _dial(host, port, local_host, local_port),
        (host, port),
        peer,
        identity=identity,
        handler=handler,
        config=config,
        channel_handler=channel_handler,
        local=local,
        certificate=certificate,
        authorities=authorities,
        expect_name=expect_name,
    )


async def connect_unix(
    path: str | os.PathLike[str],
    peer: PublicIdentity | str | None = None,
    *,
    identity: Identity | None = None,
    handler: MessageHandler | None = None,
    config: Config | None = None,
    channel_handler: ChannelHandler | None = None,
    certificate: Certificate | None = None,
    authorities: Authorities | None = None,
    expect_name: str | None = None,
) -> Connection:
    """Connect to a unix domain socket at ``path`` and run the stalk handshake.

    The same as :func:`connect` over a unix socket (not on Windows): the handshake,
    trust, limits and errors are those of TCP. ``conn.path`` is ``path``; ``conn.host``
    and ``conn.port`` are ``None``.

    :param path: the socket's path; a ``str`` starting with ``"\\0"`` is an abstract
        name (Linux).
    :param peer: the server's expected static key (or its printable form): IK; ``None``:
        XX (see :func:`connect`).
    :param identity: our static key pair; ``None`` makes a fresh one for this connection.
    :param handler: called (or awaited) with every spack received (see :func:`connect`).
    :param config: timeouts and limits (default :class:`~stalk.Config`).
    :param channel_handler: run for every channel the peer opens (see :func:`connect`).
    :param certificate: our certificate, presented to the server (see :func:`connect`).
    :param authorities: require the server's certificate from one of these (see
        :func:`connect`).
    :param expect_name: with ``authorities``: the name it must bear.
    :returns: the established connection.
    :raises ~stalk.ConnectFailed: the socket could not be connected to (no file, nobody
        accepting, no permission); also an :class:`OSError`.
    :raises ~stalk.HandshakeTimeout: connecting and the handshake together took longer
        than ``Config.handshake_timeout``.
    :raises ~stalk.HandshakeFailed: the handshake failed (see :func:`connect`).
    :raises ValueError: as :func:`connect`.
    """
    where = os.fspath(path)
    return await _open(
        lambda: anyio.connect_unix(where),
        where,
        peer,
        identity=identity,
        handler=handler,
        config=config,
        channel_handler=channel_handler,
        certificate=certificate,
        authorities=authorities,
        expect_name=expect_name,
    )


def certificate_policy(
    authorities: Authorities | None,
    config: Config,
    *,
    names: Iterable[str] | None = None,
    groups: Iterable[str] | None = None,
) -> CertificatePolicy | None:
    """What to require of the peer's certificate: ``None`` without ``authorities``.

    The clock is the system's (``time.time``), the skew ``Config.clock_skew``.

    :raises ValueError: names or groups without ``authorities``.
    :raises TypeError: ``authorities`` is not an :class:`~stalk.Authorities`, or ``names``
        or ``groups`` is one string rather than an iterable of them.
    """
    if authorities is None:
        if names is not None or groups is not None:
            raise ValueError("names or groups to accept need authorities= to check them")
        return None
    if not isinstance(authorities, Authorities):
        raise TypeError(
            f"authorities must be a stalk.Authorities, not {type(authorities).__name__}"
        )
    for what in (names, groups):
        if isinstance(what, str):
            raise TypeError("names and groups are iterables of str, not one str")
    return CertificatePolicy(
        authorities,
        clock=time.time,
        clock_skew=config.clock_skew,
        names=None if names is None else frozenset(names),
        groups=None if groups is None else frozenset(groups),
    )
