"""The anyio layer: a :class:`Connection` is an ``ObjectStream[Spack]`` over a byte stream.

Theory of operation
-------------------
A Connection owns one sans-IO :class:`~stalk.session.Session` and one anyio byte stream
(TCP in practice, memory streams in tests) and makes no protocol decision of its own: it
moves bytes between the two and maps outcomes onto anyio's vocabulary, like anyio's
``TLSStream``.

Concurrency. Sending and receiving may run at the same time in different tasks: they use
independent cipher states. Every write to the transport happens under ``_send_lock`` and
writes whatever :meth:`Session.data_to_send` returns at that moment, so the order of bytes on
the wire is the order in which the session encrypted them (nonce order). Encryption itself
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
PONG (see ``_write_pong``: never waiting for the send lock); at twice that, with still no
byte, it closes the connection with TIMEOUT and raises :class:`~stalk.IdleTimeout`. A peer
that is receiving answers the PING by itself, so only a silent, unresponsive one is
dropped.

Failure. Any protocol or transport error is terminal: the connection becomes *broken*, a
best-effort error CLOSE is written, the transport is closed, and every later call raises
:class:`~stalk.ConnectionLost` (an :class:`anyio.BrokenResourceError`). After ``aclose()``
every call raises :class:`~stalk.ConnectionClosed` (an :class:`anyio.ClosedResourceError`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Final, TypeAlias, cast

import anyio
from anyio.abc import ByteStream, ObjectStream, SocketAttribute, TaskGroup

from stalk.config import Config
from stalk.errors import (
    ClosedByPeer,
    ConnectFailed,
    ConnectionClosed,
    ConnectionLost,
    HandshakeFailed,
    HandshakeTimeout,
    IdleTimeout,
    StalkError,
)
from stalk.events import (
    NEED_DATA,
    PAUSED,
    CloseReceived,
    HandshakeComplete,
    MessageReceived,
    PeerIdentified,
)
from stalk.identity import Identity, PublicIdentity
from stalk.session import Role, Session
from stalk.spack import Spack
from stalk.wire import CloseCode, Pattern
from stalk.writing import closes_at_once, writer_for

__all__ = [
    "Authorize",
    "Connection",
    "MessageHandler",
    "StalkAttribute",
    "connect",
    "stream_error",
]

logger = logging.getLogger("stalk")

#: receive() lets other tasks run after this many spacks returned without waiting.
_YIELD_EVERY = 512
#: After our error CLOSE, the most we read and discard, and for how long, waiting for the
#: peer to close too (SPEC "Resource model"): see :meth:`Connection._linger`.
_LINGER_BYTES = 1024 * 1024
_LINGER_SECONDS = 1.0

#: ``authorize(peer) -> bool`` (or a coroutine function): may this peer connect?
Authorize: TypeAlias = Callable[[PublicIdentity], "bool | Awaitable[bool]"]
#: ``handler(spack)`` (or a coroutine function) called for every spack received.
MessageHandler: TypeAlias = Callable[[Spack], "Awaitable[None] | None"]


#: The anyio stream error each of these stalk errors also is when a Connection raises it.
_ANYIO_ERRORS: Final[tuple[tuple[type[StalkError], type[Exception]], ...]] = (
    (ConnectionLost, anyio.BrokenResourceError),
    (ConnectionClosed, anyio.ClosedResourceError),
)
_stream_classes: dict[type[StalkError], type[StalkError]] = {}


def stream_error(exc: StalkError) -> StalkError:
    """``exc`` as the anyio layer raises it: also anyio's stream error where it maps to one.

    A :class:`~stalk.ConnectionLost` (and its subclasses) becomes also an
    :class:`anyio.BrokenResourceError`, a :class:`~stalk.ConnectionClosed` also an
    :class:`anyio.ClosedResourceError`; the sans-IO core, which knows nothing of anyio,
    raises the plain classes. The instance keeps its identity, message and attributes:
    only its class changes, to a subclass of both named like the original.
    """
    cls = type(exc)
    stream_class = _stream_classes.get(cls)
    if stream_class is None:
        base = next(
            (anyio_error for ours, anyio_error in _ANYIO_ERRORS if issubclass(cls, ours)), None
        )
        if base is None or issubclass(cls, base):
            return exc
        stream_class = _stream_classes[cls] = type(
            cls.__name__,
            (cls, base),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
            },
        )
    exc.__class__ = stream_class
    return exc


class StalkAttribute(anyio.TypedAttributeSet):
    """Typed attributes a :class:`Connection` publishes (``conn.extra(StalkAttribute.peer)``)."""

    #: the peer's static public key (authenticated)
    peer: PublicIdentity = anyio.typed_attribute()
    #: our own static key pair
    identity: Identity = anyio.typed_attribute()
    #: ``"XX"`` or ``"IK"``
    pattern: str = anyio.typed_attribute()
    #: Noise handshake hash: the channel-binding value
    handshake_hash: bytes = anyio.typed_attribute()


def _address(transport: ByteStream) -> tuple[str, int] | None:
    remote = transport.extra(SocketAttribute.remote_address, None)
    if isinstance(remote, tuple) and len(remote) >= 2:
        return str(remote[0]), int(remote[1])
    return None


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class Connection(ObjectStream[Spack]):
    """An established, authenticated stalk connection: an anyio ``ObjectStream`` of spacks.

    There is no public initializer: use :func:`connect`, a :class:`~stalk.Listener`, or
    :meth:`wrap` for an arbitrary anyio byte stream.
    """

    def __init__(self, transport: ByteStream, session: Session, config: Config) -> None:
        self._transport = transport
        self._session = session
        self._config = config
        self._peer_address: tuple[str, int] | bool | None = False  # False: not looked up yet
        # fast_acquire: taking a free lock costs no event-loop pass (one per send otherwise).
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._writer = writer_for(transport, config.write_timeout)
        self._receive_guard = anyio.ResourceGuard("receiving from")
        self._closed = False
        self._broken: StalkError | None = None
        self._handler: MessageHandler | None = None
        self._task_group: TaskGroup | None = None
        self._writer_running = False
        self._wakeup = anyio.Event()
        #: The last spack receive() returned had to wait for the network: a reply sent
        #: now is latency-bound (request/response), so send() writes it at once.
        self._answering = False
        #: Spacks receive() returned in a row without waiting for the network.
        self._streak = 0
        #: Idle timer (Config.idle_timeout): seconds receive() has waited for the network
        #: since the peer's last byte, and whether a keepalive PING went out since then.
        self._idle_waited = 0.0
        self._keepalive_sent = False

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
    ) -> Connection:
        """Run the stalk handshake over ``transport`` and return the connection.

        :param identity: our static key pair.
        :param peer: client side: the server's expected key (IK), or ``None`` (XX).
        :param server_side: act as the responder.
        :param authorize: server side: asked whether the client's key may connect.
        :param config: timeouts and limits.
        :param handler: called (or awaited) with every spack received, in order, while the
            connection is used as ``async with``; ``receive()`` is then not available.
        :raises ~stalk.HandshakeFailed: the handshake failed; subclasses say why
            (:class:`~stalk.PeerIdentityMismatch`, :class:`~stalk.PeerRefused`,
            :class:`~stalk.HandshakeTimeout`). The transport is closed.
        """
        config = config or Config()
        conn = cls._start(
            transport,
            identity=identity,
            peer=peer,
            server_side=server_side,
            config=config,
            handler=handler,
        )
        try:
            with anyio.fail_after(config.handshake_timeout):
                await conn._establish(authorize)
        except TimeoutError as exc:
            raise await conn._fail(
                HandshakeTimeout(f"no complete handshake within {config.handshake_timeout} s")
            ) from exc
        return conn

    @classmethod
    def _start(
        cls,
        transport: ByteStream,
        *,
        identity: Identity,
        peer: PublicIdentity | None,
        server_side: bool,
        config: Config,
        handler: MessageHandler | None,
    ) -> Connection:
        """A connection whose handshake has not run yet (see :meth:`_establish`)."""
        role = Role.RESPONDER if server_side else Role.INITIATOR
        session = Session(role, identity, peer=peer, config=config.session_config())
        conn = cls(transport, session, config)
        conn._handler = handler
        return conn

    async def _establish(self, authorize: Authorize | None) -> None:
        """Run the handshake; on any failure the transport is closed.

        The caller sets the deadline: :func:`connect` one for TCP connect and handshake.
        """
        try:
            await self._run_handshake(authorize)
        except HandshakeFailed as exc:
            await self._write_best_effort()
            raise await self._fail(exc) from None
        except BaseException:
            await self._abort()
            raise

    async def _write_handshake(self) -> None:
        """Write handshake output directly: no shield or per-write deadline is needed here.

        A handshake interrupted in any way is abandoned whole (the transport is closed), so
        a half-written frame can never be misread, and ``handshake_timeout`` bounds it all.
        """
        while data := self._session.data_to_send():
            try:
                sent = self._writer.write_nowait(data)
                if sent < len(data):
                    await self._transport.send(cast("bytes", memoryview(data)[sent:]))
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise HandshakeFailed(f"connection lost during the handshake: {exc!r}") from exc

    async def _run_handshake(self, authorize: Authorize | None) -> None:
        session = self._session
        while True:
            event = session.next_event()
            await self._write_handshake()  # a responder answers as a side effect of reading
            if event is NEED_DATA:
                await self._receive_into_session(handshake=True)
            elif event is PAUSED:
                await anyio.lowlevel.checkpoint()  # its output was just written
            elif isinstance(event, PeerIdentified):
                allowed = await self._authorized(authorize, event.peer)
                if allowed:
                    session.accept()
                    continue
                session.refuse("not authorized")
                await self._write_handshake()
                raise HandshakeFailed(f"refused peer {event.peer.fingerprint} (not authorized)")
            elif isinstance(event, HandshakeComplete):
                await self._write_handshake()
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug(
                        "handshake complete with %s (%s) at %s",
                        event.peer.fingerprint,
                        event.pattern,
                        self._address,
                    )
                return

    @staticmethod
    async def _authorized(authorize: Authorize | None, peer: PublicIdentity) -> bool:
        """Ask the application's hook; a hook that raises refuses (fail closed)."""
        if authorize is None:
            return True
        try:
            return bool(await _maybe_await(authorize(peer)))
        except Exception:
            logger.exception("authorize() raised for %s; refusing the peer", peer.fingerprint)
            return False

    # -- attributes -----------------------------------------------------------------------

    @property
    def _address(self) -> tuple[str, int] | None:
        """The peer's address, looked up on first use (most connections never need it)."""
        address = self._peer_address
        if address is False:
            address = self._peer_address = _address(self._transport)
        return cast("tuple[str, int] | None", address)

    @property
    def peer(self) -> PublicIdentity:
        """The peer's authenticated static public key."""
        peer = self._session.peer
        if peer is None:  # pragma: no cover - a Connection exists only once established
            raise ConnectionClosed("no authenticated peer")
        return peer

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
        """The peer's IP address (``None`` for non-socket transports)."""
        return self._address[0] if self._address else None

    @property
    def port(self) -> int | None:
        """The peer's TCP port (``None`` for non-socket transports)."""
        return self._address[1] if self._address else None

    @property
    def peer_max_message_size(self) -> int:
        """The largest encoded spack the peer accepts."""
        return self._session.peer_max_message_size or 0

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The transport's typed attributes plus :class:`StalkAttribute`."""
        return {
            **self._transport.extra_attributes,
            StalkAttribute.peer: lambda: self.peer,
            StalkAttribute.identity: lambda: self.identity,
            StalkAttribute.pattern: lambda: self.pattern,
            StalkAttribute.handshake_hash: lambda: self.handshake_hash,
        }

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self._address else "stream"
        state = "closed" if self._closed else "broken" if self._broken else "open"
        return f"<stalk.Connection {self.pattern} {self.peer.fingerprint} {where} {state}>"

    # -- sending --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise self._tag(ConnectionClosed("the connection is closed"))
        if self._broken is not None:
            raise self._tag(ConnectionLost(f"the connection is broken: {self._broken}"))

    def queue(self, item: Spack) -> None:
        """Encode ``item`` and buffer it without writing; :meth:`flush` sends everything.

        :raises ~stalk.InvalidSpackValue: a value cannot be encoded (nothing is queued).
        :raises ~stalk.MessageTooLarge: larger than the peer accepts (nothing is queued).
        :raises ~stalk.ConnectionClosed: the connection was closed (or ``send_eof`` called).
        :raises ~stalk.ConnectionLost: the connection is broken.
        """
        self._check_open()
        self._session.queue(item)

    async def flush(self) -> None:
        """Encrypt everything queued into as few Noise messages as possible and write it.

        :raises ~stalk.ConnectionClosed: the connection was closed.
        :raises ~stalk.ConnectionLost: the connection broke (or the write timed out).
        """
        async with self._send_lock:
            self._check_open()
            self._session.flush()
            await self._write_pending()

    async def send(self, item: Spack) -> None:
        """Send one spack.

        With a writer task (see the module docs) the spack is queued for it and ``send``
        returns at once unless more than ``Config.send_buffer`` bytes are waiting; without
        one, it is written before ``send`` returns. Either way spacks go out in call order.

        :raises ~stalk.InvalidSpackValue: a value cannot be encoded (nothing is written).
        :raises ~stalk.MessageTooLarge: larger than the peer accepts (nothing is written).
        :raises ~stalk.ConnectionClosed: the connection was closed.
        :raises ~stalk.ConnectionLost: the connection broke (or a write timed out).
        """
        self.queue(item)
        answering, self._answering = self._answering, False
        if not self._writer_running and self._task_group is not None and not answering:
            # The first send that is not a reply starts the writer: a connection that only
            # answers (most of a server's) never pays for the task.
            self._writer_running = True
            self._task_group.start_soon(self._write_behind, name=f"stalk writer {self._address}")
        if (
            self._writer_running
            and not (answering and not self._send_lock.locked())
            and self._session.queued_bytes <= self._config.send_buffer
        ):
            self._wakeup.set()
            return
        await self.flush()

    async def _write_behind(self) -> None:
        """The writer task: write whatever senders queued, batched, until cancelled."""
        self._writer_running = True
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                async with self._send_lock:
                    if self._closed or self._broken is not None:
                        return
                    self._session.flush()
                    await self._write_pending()
        except StalkError:
            return  # the connection is broken or closed; the next call reports it
        finally:
            self._writer_running = False

    async def send_eof(self) -> None:
        """Send CLOSE (normal) and half-close: the peer's ``receive()`` ends, ours goes on.

        :raises ~stalk.ConnectionLost: the connection broke.
        """
        async with self._send_lock:
            if self._closed or self._session.close_sent:
                return
            self._check_open()
            self._session.close(CloseCode.NORMAL)
            await self._write_pending()
            # The CLOSE is written; a failed TCP half-close changes nothing.
            with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._transport.send_eof()

    async def _write_pending(self) -> None:
        """Write what the session has for the transport (each buffer whole, in time).

        Callers hold ``_send_lock`` (or are the only task, during the handshake).
        """
        # Loop: the receive path may encrypt a PONG while we write; it leaves it to us.
        while data := self._session.data_to_send():
            await self._write_chunk(data)

    async def _write_chunk(self, data: bytes | bytearray) -> None:
        """Write one buffer: whole even if cancelled, bounded by write_timeout (writing.py)."""
        try:
            await self._writer.write(data)
        except TimeoutError:
            raise await self._fail(
                ConnectionLost(f"a write did not complete within {self._config.write_timeout} s")
            ) from None
        except (OSError, anyio.BrokenResourceError) as exc:
            if self._closed:
                raise self._closed_error() from exc
            raise await self._fail(ConnectionLost(f"write failed: {exc!r}")) from exc
        except anyio.ClosedResourceError as exc:
            raise self._closed_error() from exc

    async def _write_best_effort(self) -> None:
        """Write an error CLOSE or refusal if no other task is writing (bounded, shielded).

        While a sender holds the lock it is blocked writing; the caller is about to tear
        the connection down, which ends that write, so the CLOSE is simply not sent.
        """
        if self._send_lock.locked():
            return
        with (
            anyio.move_on_after(self._config.close_timeout, shield=True),
            contextlib.suppress(StalkError),
        ):
            async with self._send_lock:
                await self._write_pending()

    async def _write_pong(self) -> None:
        """Get what the receive path encrypted (a PONG, a keepalive PING) written.

        ``receive()`` may hold a spack it is about to return, so nothing here may be
        interrupted by cancellation (no event is ever lost): the writer task is only woken,
        and a direct write happens only when the lock is free, shielded (and bounded by
        write_timeout). If a sender holds the lock, it writes this before releasing it (see
        _write_pending); waiting for the lock here could deadlock with a peer blocked
        writing to us.
        """
        if self._writer_running:
            self._wakeup.set()
        elif not self._send_lock.locked():
            with anyio.CancelScope(shield=True), contextlib.suppress(StalkError):
                async with self._send_lock:
                    await self._write_pending()

    async def _resume_reading(self) -> None:
        """The session paused reading (PAUSED): let it read again.

        When it paused because the peer made us owe answers beyond the bound, those answers
        must reach the socket first: wait for the send lock and write them. A peer that
        does not read its PONGs thus stops being read (TCP carries the backpressure back to
        it) until write_timeout breaks the connection. Otherwise it paused after a bounded
        step of work: just let other tasks run. No event is held here, so cancellation is
        harmless.
        """
        if not self._session.has_output:
            await anyio.lowlevel.checkpoint()
            return
        async with self._send_lock:
            self._check_open()
            await self._write_pending()

    # -- receiving ------------------------------------------------------------------------

    async def _receive_into_session(self, *, handshake: bool = False) -> None:
        idle = None if handshake else self._config.idle_timeout
        try:
            if idle is None:
                data: bytes | None = await self._transport.receive(self._config.read_size)
            else:
                data = await self._receive_or_keepalive(idle)
        except anyio.EndOfStream:
            self._session.receive_data(b"")
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            if handshake:  # whatever cut it, the handshake failed
                raise HandshakeFailed(f"connection lost during the handshake: {exc!r}") from exc
            if isinstance(exc, anyio.ClosedResourceError):
                raise self._closed_error() from exc
            raise await self._fail(ConnectionLost(f"connection lost: {exc!r}")) from exc
        else:
            if data is None:
                raise await self._idle_timeout()
            self._session.receive_data(data)

    async def _receive_or_keepalive(self, idle: float) -> bytes | None:
        """Read from the transport under the idle timer; ``None``: the peer is gone.

        The timer counts only time spent here (so an application busy between two
        ``receive()`` calls is never mistaken for an idle peer), across calls, cancelled
        ones included (so receiving under short application timeouts still counts). After
        ``idle`` seconds of waiting since the peer's last byte a PING goes out; after
        ``2 * idle`` the peer has not answered it. Any byte resets the timer: a PONG, or
        anything else the peer had to say. A read either returns bytes or consumes none
        when cancelled, so the timer's deadlines never lose data.
        """
        while True:
            phase_end = 2 * idle if self._keepalive_sent else idle
            started = anyio.current_time()
            with anyio.move_on_after(phase_end - self._idle_waited):
                try:
                    data = await self._transport.receive(self._config.read_size)
                except BaseException:  # cancelled (by this timer or the caller), or failed
                    self._idle_waited += anyio.current_time() - started
                    raise
                self._idle_waited = 0.0
                self._keepalive_sent = False
                return data
            self._idle_waited = phase_end
            if self._keepalive_sent:
                return None
            self._keepalive_sent = True
            try:
                # PING is an application record: it also sends what queue() left unflushed.
                self._session.ping()
            except StalkError:
                continue  # we already sent CLOSE: nothing can go out; the peer may still talk
            await self._write_pong()

    async def _idle_timeout(self) -> StalkError:
        """Close with TIMEOUT (best effort, never waiting for a blocked sender); the error."""
        if self._broken is None and not self._closed:
            self._session.close(CloseCode.TIMEOUT, "idle timeout")
            await self._write_best_effort()
        return await self._fail(
            IdleTimeout(
                f"the peer sent nothing during {self._idle_waited:g} s of waiting and did not "
                "answer a keepalive PING"
            )
        )

    async def receive(self) -> Spack:
        """The next spack from the peer.

        :raises ~anyio.EndOfStream: the peer closed its direction cleanly (CLOSE code 0).
        :raises ~stalk.ClosedByPeer: the peer sent CLOSE with an error code.
        :raises ~stalk.ConnectionLost: the stream was cut (EOF or reset without CLOSE), or
            the peer broke the protocol (the error's ``__cause__`` says how).
        :raises ~stalk.IdleTimeout: (a ConnectionLost) with ``Config.idle_timeout`` set, the
            peer stayed silent and did not answer a keepalive PING (see the module docs).
        :raises ~stalk.ProtocolError: the peer broke the protocol (also ends the connection).
        :raises ~stalk.ConnectionClosed: we closed the connection.
        :raises ~anyio.BusyResourceError: another task is already receiving.
        """
        with self._receive_guard:
            if self._streak >= _YIELD_EVERY:
                # A peer that sent many spacks at once must not keep a receive loop from
                # ever yielding: let other tasks run (nothing is held yet, so a cancellation
                # here loses nothing).
                self._streak = 0
                await anyio.lowlevel.checkpoint()
            waited = False
            while True:
                self._check_open()
                try:
                    event = self._session.next_event()
                except StalkError as exc:
                    raise await self._fail(exc, close=True) from None
                if self._session.has_output:
                    await self._write_pong()
                if type(event) is MessageReceived:
                    self._answering = waited
                    self._streak = 0 if waited else self._streak + 1
                    return event.spack
                if event is NEED_DATA:
                    await self._receive_into_session()
                    waited = True
                elif event is PAUSED:
                    await self._resume_reading()
                elif isinstance(event, CloseReceived):
                    if event.code == CloseCode.NORMAL:
                        raise anyio.EndOfStream
                    raise self._tag(
                        ClosedByPeer(
                            "the peer closed the connection",
                            code=event.code,
                            reason=event.reason,
                        )
                    )

    # -- closing --------------------------------------------------------------------------

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send CLOSE with ``code`` and ``reason`` (best effort), then close the transport.

        Idempotent. Waits at most ``Config.close_timeout`` for the CLOSE to be written.
        """
        if self._closed:
            return
        self._closed = True
        if self._broken is None:
            with anyio.move_on_after(self._config.close_timeout, shield=True):
                async with self._send_lock:
                    try:
                        self._session.close(code, reason)
                        await self._write_pending()
                    except StalkError:
                        pass
        await self._abort()

    async def aclose(self) -> None:
        """Close cleanly: send CLOSE (normal), then close the transport. Idempotent."""
        await self.close()

    async def _abort(self) -> None:
        """Close the transport without waiting on anything (even if we are cancelled)."""
        if closes_at_once(self._transport):
            await self._transport.aclose()
        else:
            await anyio.aclose_forcefully(self._transport)

    def _closed_error(self) -> StalkError:
        """The error for a transport found closed: by our aclose(), or by a failure."""
        if self._broken is not None:
            return self._tag(ConnectionLost(f"the connection is broken: {self._broken}"))
        return self._tag(ConnectionClosed("the connection is closed"))

    def _tag(self, exc: StalkError) -> StalkError:
        """``exc`` with the peer's address, as anyio's stream error where it maps to one."""
        exc.peer_address = self._address
        return stream_error(exc)

    async def _fail(self, exc: StalkError, *, close: bool = False) -> StalkError:
        """Mark the connection broken by ``exc``, close the transport, return ``exc``.

        :param close: the session failed and queued an error CLOSE: write it first (if no
            other task is writing), and give the peer time to read it (:meth:`_linger`).
        """
        self._tag(exc)
        if self._broken is None and not self._closed:
            self._broken = exc  # from here on no other task starts a write
            logger.debug("connection to %s failed: %s", self._address, exc)
        try:
            if close and not self._send_lock.locked():
                async with self._send_lock:
                    with contextlib.suppress(StalkError):
                        with anyio.move_on_after(self._config.close_timeout, shield=True):
                            await self._write_pending()
                        await self._linger()
        finally:
            await self._abort()
        return exc

    async def _linger(self) -> None:
        """After our error CLOSE: stop writing, and give the peer time to read it.

        Closing a socket with unread bytes makes TCP reset the connection, and the reset can
        destroy our CLOSE before the peer reads it: a peer in the middle of a large send
        would see a cut connection instead of why (HTTP servers linger for the same
        reason). So for ``_LINGER_SECONDS`` at most, or until the peer closes too, we read
        and discard what it still sends, up to ``_LINGER_BYTES``; past that, TCP's flow
        control holds the peer until the time is up. Callers hold ``_send_lock``.
        """
        with (
            anyio.move_on_after(min(_LINGER_SECONDS, self._config.close_timeout)),
            contextlib.suppress(
                anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
            ),
        ):
            await self._transport.send_eof()
            left = _LINGER_BYTES
            while left > 0:
                left -= len(await self._transport.receive(min(left, self._config.read_size)))
            await anyio.sleep_forever()

    # -- handler-driven use ---------------------------------------------------------------

    async def __aenter__(self) -> Connection:
        """Enter: a writer task may run from here on; ``connect(handler=...)`` dispatches."""
        if self._task_group is None:
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
            if self._handler is not None:
                self._task_group.start_soon(self._dispatch, self._handler)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """Close the connection (and stop the writer and handler tasks).

        Leaving normally sends CLOSE NORMAL; leaving through an exception sends
        INTERNAL_ERROR (GOING_AWAY for a cancellation), so the peer never mistakes an
        abandoned stream for a complete one.
        """
        try:
            if exc_type is None:
                await self.aclose()
            elif issubclass(exc_type, anyio.get_cancelled_exc_class()):
                await self.close(CloseCode.GOING_AWAY, "cancelled")
            else:
                await self.close(CloseCode.INTERNAL_ERROR, exc_type.__name__)
        finally:
            group, self._task_group = self._task_group, None
            if group is not None:
                group.cancel_scope.cancel()
                # Not the body's exception: it propagates by itself once we return, and
                # handing it to the group would wrap it in an ExceptionGroup.
                await group.__aexit__(None, None, None)
                self._writer_running = False  # also if it was cancelled before it ran

    async def _dispatch(self, handler: MessageHandler) -> None:
        # A connection that ends badly must not tear down the caller's ``async with`` body
        # from this background task: the error is kept (the connection is broken) and the
        # next send()/flush() raises it.
        try:
            async for spack in self:
                await _maybe_await(handler(spack))
        except StalkError as exc:
            logger.debug("receiving from %s ended: %s", self._address, exc)


async def connect(
    host: str,
    port: int,
    peer: PublicIdentity | str | None = None,
    *,
    identity: Identity | None = None,
    handler: MessageHandler | None = None,
    config: Config | None = None,
) -> Connection:
    """Open a TCP connection to ``host:port`` and run the stalk handshake.

    :param peer: the server's expected static key (or its printable form): the handshake
        is IK and fails with :class:`~stalk.PeerIdentityMismatch` for any other key.
        ``None``: XX, and ``conn.peer`` tells who answered.
    :param identity: our static key pair; ``None`` makes a fresh one for this connection.
    :param handler: called (or awaited) with every spack received, in order, while the
        connection is used as ``async with``; ``receive()`` is then not available.
    :param config: timeouts and limits.
    :raises ~stalk.ConnectFailed: the TCP connection could not be opened.
    :raises ~stalk.HandshakeFailed: the handshake failed (see :meth:`Connection.wrap`).
    """
    config = config or Config()
    if isinstance(peer, str):
        peer = PublicIdentity.from_string(peer)
    identity = identity or Identity.generate()
    # One deadline for the TCP connect and the handshake together (Config.handshake_timeout).
    try:
        with anyio.fail_after(config.handshake_timeout):
            try:
                stream = await anyio.connect_tcp(host, port)
            except OSError as exc:
                error = ConnectFailed(f"cannot connect to {host}:{port}: {exc}")
                error.peer_address = (host, port)
                raise error from exc
            conn = Connection._start(
                stream,
                identity=identity,
                peer=peer,
                server_side=False,
                config=config,
                handler=handler,
            )
            await conn._establish(None)
    except TimeoutError as exc:
        timeout = HandshakeTimeout(
            f"no connection and handshake with {host}:{port} within {config.handshake_timeout} s"
        )
        timeout.peer_address = (host, port)
        raise timeout from exc
    return conn
