"""Channels over a connection: :class:`Channel`, and the :class:`Dispatcher` feeding them.

Theory of operation
-------------------
A connection that negotiated channels (SPEC "Channels"; both sides set
``Config.max_channels``) carries many spack streams: channel 0, which the
:class:`~stalk.Connection` itself sends and receives on as without channels, and the
channels either side opens, each a :class:`Channel`. One :class:`Dispatcher` per such
connection sits between them and the connection's :class:`~stalk.link.Link`; the sans-IO
session makes every protocol decision (ids, states, credit, fairness), as everywhere.

**Receiving.** Each channel, channel 0 included, has an inbox: the spacks the session
delivered for it and the application has not received yet, and how it ended. A task whose
``receive()`` finds its inbox empty either becomes the **reader**, when no task is one, or
waits to be woken. There is at most one reader at a time: it reads the transport, takes
the session's events and puts each in its channel's inbox, waking the task waiting there,
until its own inbox has something. Then it gives the role up and wakes one of the tasks
still waiting, which becomes the next reader. So nothing polls, and every event goes
straight from the session to an inbox without an await in between: a reader cancelled at
any point loses nothing, and neither does a waiting task (its inbox keeps what came).

Inside ``async with conn`` a **reader task** also runs, the reader of last resort: it
reads while no other task waits, so that credit, the peer's new channels (for a
``channel_handler``) and every channel's spacks are taken as they come even when the
application is not receiving; it leaves the role as soon as another task waits, so a task
receiving its answers reads them itself (no task switch through the reader task).

**Credit** goes back to the peer when the application receives a spack
(``Session.release``), and the WINDOW records that produces are written at once without
waiting for the send lock (``Link.write_pong``, as PONGs are). A channel that its
application does not read holds at most its window: the peer then stops sending on it,
and only on it.

**Sending.** ``send()`` queues the spack; with the connection's writer task running (inside
``async with conn``) it wakes the writer and returns, else (or for a reply, the channel's
last receive having waited, when no other write is going on) it writes what credit
allows itself. Either way, while more than ``Config.send_buffer`` bytes of the channel wait (for
the writer, or for credit the peer has not granted), ``send()`` waits. Credit arrives only
as input, so a sender that waits may have to read: it waits like a ``receive()``, becoming
the reader when no other task is, until its channel's backlog is within the bound.

**Waking.** Besides a channel's own events, some waits end on what anyone's reading or
writing changed: a sender's backlog shrinks when a write packed its spack, a slot for
``open_channel()`` frees when a channel of ours ended. Those waiters are woken after every
write and every batch of input (:meth:`Dispatcher._progress`). A reader blocked on the
transport is woken the same way, by cancelling its read, which anyio makes safe (a read
either returns bytes or consumes none).

**Ends.** A RESET from the peer drops what the channel held and makes the channel's calls
raise :class:`~stalk.ChannelReset`; the answering RESET goes once the application has seen
that (or closed the channel), so a peer that resets channels in a loop holds at most
``max_channels`` of them. The connection's end (its CLOSE either way, a failure) ends every
channel with the connection's error.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import anyio
import anyio.lowlevel
from anyio.abc import ObjectStream, TaskGroup

from stalk import _logs
from stalk.channels import ChannelState
from stalk.errors import (
    ChannelClosed,
    ChannelLimitReached,
    ChannelReset,
    ClosedByPeer,
    ConnectionClosed,
    ConnectionLost,
    LocalProtocolError,
    StalkError,
)
from stalk.events import (
    NEED_DATA,
    PAUSED,
    ChannelCloseReceived,
    ChannelMessageReceived,
    ChannelOpened,
    ChannelResetReceived,
    CloseReceived,
    Event,
)
from stalk.link import Link, address_text
from stalk.records import check_close
from stalk.spack import Spack
from stalk.wire import CloseCode

if TYPE_CHECKING:
    from stalk.connection import Connection

__all__ = ["INTERNAL_ERROR_REASON", "Channel", "ChannelHandler", "Dispatcher"]

logger = _logs.CONNECTION

#: The reason of every CLOSE or RESET with INTERNAL_ERROR we send for an exception of our
#: own (a handler's, an ``async with`` body's): what failed is logged locally, never told
#: to the peer, which has no business knowing our code's class names or messages.
INTERNAL_ERROR_REASON: Final = "internal error"

#: ``async def handler(channel)``: serves one channel the peer opened (see ``listen``).
ChannelHandler: TypeAlias = Callable[["Channel"], Awaitable[None]]

#: receive() lets other tasks run after this many spacks returned without waiting.
_YIELD_EVERY: Final = 512


class _Waiter:
    """A task waiting in the dispatcher: woken by setting its current event."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = anyio.Event()


class _Inbox:
    """One channel as the dispatcher keeps it: what it received, and how it ended."""

    __slots__ = (
        "answering",
        "closed",
        "eof",
        "id",
        "let_go",
        "reset",
        "sent_eof",
        "spacks",
        "streak",
        "waiter",
    )

    def __init__(self, channel_id: int) -> None:
        self.id = channel_id
        #: Spacks received and not yet returned, with their sizes in data bytes (credit).
        self.spacks: deque[tuple[Spack, int]] = deque()
        #: The peer closed its direction (its CLOSE on the channel).
        self.eof = False
        #: The peer reset the channel: ``(code, reason)``.
        self.reset: tuple[int, str] | None = None
        #: The application has seen the reset: our answering RESET is sent.
        self.let_go = False
        #: We closed our direction (send_eof, or aclose).
        self.sent_eof = False
        #: We closed the channel (``"closed"``) or reset it (``"reset"``): any use raises.
        self.closed: str | None = None
        #: The task waiting in receive(), if any.
        self.waiter: _Waiter | None = None
        #: Spacks receive() returned in a row without waiting.
        self.streak = 0
        #: The last spack receive() returned had to wait: a send now is likely its reply.
        self.answering = False


class Dispatcher:
    """The channels of one connection; see the module's theory of operation.

    :param link: the connection's link (its session has channels).
    :param connection: the connection, for its attributes and the peer's name.
    :param handler: run for every channel the peer opens, in the connection's task group;
        ``None``: such channels wait for :meth:`accept`.
    """

    def __init__(self, link: Link, connection: Connection, handler: ChannelHandler | None) -> None:
        self._link = link
        self._session = link.session
        self._bound = link.config.send_buffer
        self.connection = connection
        self._handler = handler
        self._task_group: TaskGroup | None = None
        #: Channel 0: the connection's own stream.
        self.channel0 = _Inbox(0)
        # The inboxes events may still arrive for: a channel leaves when no more can (it
        # ended), or when the application closed or reset it (its events are dropped).
        self._inboxes: dict[int, _Inbox] = {0: self.channel0}
        self._opened: deque[Channel] = deque()  # opened by the peer, not yet accepted
        self._accept_waiter: _Waiter | None = None
        # Every waiting task, in arrival order (the next reader is the first); those woken
        # by any progress; the reader, and the cancel scope of its read from the transport.
        self._waiting: dict[_Waiter, None] = {}
        self._conditional: dict[_Waiter, None] = {}
        self._reader: _Waiter | None = None
        self._read_scope: anyio.CancelScope | None = None
        self._idle_reader: _Waiter | None = None  # the reader task's, inside async with
        #: The peer's CLOSE of the connection, once dispatched.
        self.peer_close: CloseReceived | None = None

    # -- the connection's life ------------------------------------------------------------

    def start(self, task_group: TaskGroup) -> None:
        """The connection entered ``async with``: its reader, writer and handlers run in it."""
        self._task_group = task_group
        if self._handler is not None:
            while self._opened:
                self._spawn(self._opened.popleft())
        task_group.start_soon(self._read_behind, name=f"stalk reader {self._link.address}")

    async def _read_behind(self) -> None:
        """Read while no other task waits, until the peer's CLOSE or the connection's end.

        So that credit, the peer's new channels (for the handler) and every channel's
        spacks are taken as they come, whoever receives: a backlog that waits for credit
        goes out without the application receiving, and an application that does not read
        a channel holds its window (flow control bounds what this takes in). The reader of
        last resort: it leaves the role to any task that waits, so that a task receiving
        its answers reads them itself, without a task switch through this one.
        """
        waiter = self._idle_reader = _Waiter()
        waiting = self._waiting
        try:
            with contextlib.suppress(StalkError):
                while self.peer_close is None:
                    self._link.check_open()
                    if self._reader is None and not waiting:
                        await self._read(
                            lambda: bool(waiting) or self.peer_close is not None,
                            waiter,
                            nudge=False,  # it stops reading once another task waits
                        )
                        if self._reader is None and waiting:
                            self._wake(next(iter(waiting)))
                    else:
                        waiter.event = anyio.Event()
                        await waiter.event.wait()
        finally:
            self._idle_reader = None

    def stop(self) -> None:
        """The connection's task group is ending."""
        self._task_group = None

    def ended(self) -> None:
        """The connection was closed or broke: every waiting task raises its error."""
        self._wake_all()

    async def drain(self, timeout: float | None) -> None:
        """Before the connection's CLOSE: send what is queued, reading for credit.

        The session sends its CLOSE only after every spack queued before it, some of which
        may wait for credit; this waits for them, within ``timeout`` seconds (shielded, as
        the CLOSE's own write is) or, with ``None``, as long as it takes.
        """
        session, link = self._session, self._link
        if not session.unsent or link.closed or link.broken is not None or session.close_sent:
            return

        def ready() -> bool:
            return not session.unsent or self.peer_close is not None

        if timeout is None:
            session.flush()
            await self._write()
            await self._until(ready, conditional=True)
            return
        with anyio.move_on_after(timeout, shield=True), contextlib.suppress(StalkError):
            session.flush()
            await self._write()
            await self._until(ready, conditional=True)

    # -- opening ------------------------------------------------------------------------

    async def open(self, *, wait: bool) -> Channel:
        """A new channel of ours (see :meth:`stalk.Connection.open_channel`)."""
        session, link = self._session, self._link
        link.check_open()
        if not session.can_open_channel:
            limit = session.peer_channels.max_channels if session.peer_channels else 0
            if not wait or not limit:
                raise link.tag(
                    ChannelLimitReached(
                        f"the peer accepts at most {limit} open channels of ours at once"
                    )
                )
            await self._until(
                lambda: (
                    session.can_open_channel or session.close_sent or self.peer_close is not None
                ),
                conditional=True,
            )
            link.check_open()
            if not session.can_open_channel and not session.close_sent:
                raise link.tag(
                    ChannelLimitReached(
                        "the peer closed the connection while all the channels of ours "
                        "it accepts were open: none of them can end any more"
                    )
                )
        self._check_sending()
        inbox = _Inbox(session.open_channel())
        self._inboxes[inbox.id] = inbox
        return Channel(self, inbox)

    async def accept(self) -> Channel:
        """The next channel the peer opened (see :meth:`stalk.Connection.accept_channel`)."""
        link = self._link
        link.check_open()
        if self._handler is not None:
            raise LocalProtocolError("the peer's channels go to the channel handler")
        if self._accept_waiter is not None:
            raise anyio.BusyResourceError("accepting channels from")
        opened = self._opened
        if not opened:
            waiter = self._accept_waiter = _Waiter()
            try:
                await self._until(lambda: bool(opened) or self.peer_close is not None, waiter)
            finally:
                self._accept_waiter = None
        if opened:
            return opened.popleft()
        raise self._peer_close_error()

    def _spawn(self, channel: Channel) -> None:
        group = self._task_group
        if group is not None:
            group.start_soon(self._run_handler, channel, name=f"stalk channel {channel.id}")

    async def _run_handler(self, channel: Channel) -> None:
        """Run the channel handler: close the channel when it returns, reset it if it raises.

        An exception that only says the channel or the connection ended under the handler
        (the peer reset the channel; the connection closed or broke) is not the handler's
        bug: it is logged at DEBUG. Any other is logged with its traceback, and the channel
        is reset with INTERNAL_ERROR and a fixed reason (the peer learns nothing of it).
        """
        handler = self._handler
        if handler is None:  # pragma: no cover - spawned only with a handler
            return
        inbox = channel._inbox
        try:
            await handler(channel)
        except Exception as exc:
            link = self._link
            ended = link.closed or link.broken is not None or inbox.reset is not None
            if isinstance(exc, ConnectionLost) or (isinstance(exc, StalkError) and ended):
                logger.debug("channel handler for channel %d ended by %r", channel.id, exc)
            else:
                logger.exception(
                    "channel handler for channel %d of %s at %s raised",
                    channel.id,
                    self.connection.peer.fingerprint,
                    address_text(link.address),
                )
                with contextlib.suppress(StalkError):
                    await channel.reset(CloseCode.INTERNAL_ERROR, INTERNAL_ERROR_REASON)
                return
        await channel.aclose()

    # -- receiving ------------------------------------------------------------------------

    async def receive(self, inbox: _Inbox) -> Spack:
        """The next spack of ``inbox``'s channel; see :meth:`Channel.receive`."""
        if inbox.streak >= _YIELD_EVERY:
            # A peer that sent many spacks at once must not keep a receive loop from ever
            # yielding (nothing is held yet, so a cancellation here loses nothing).
            inbox.streak = 0
            await anyio.lowlevel.checkpoint()
        waited = False
        while True:
            self._link.check_open()
            await self._check(inbox, sending=False)
            if inbox.spacks:
                return await self._take(inbox, waited)
            if inbox.eof:
                raise anyio.EndOfStream
            if self.peer_close is not None:
                raise self._peer_close_error()
            waiter = inbox.waiter = _Waiter()
            try:
                await self._until(
                    lambda: (
                        bool(inbox.spacks)
                        or inbox.eof
                        or inbox.reset is not None
                        or inbox.closed is not None
                        or self.peer_close is not None
                    ),
                    waiter,
                )
            finally:
                inbox.waiter = None
            waited = True

    async def _take(self, inbox: _Inbox, waited: bool) -> Spack:
        """Hand the next spack over, and its credit back to the peer.

        Nothing here waits for anything a cancellation could interrupt: the WINDOW is
        written as PONGs are (``Link.write_pong``), so the spack is never lost.
        """
        spack, size = inbox.spacks.popleft()
        session = self._session
        session.release(inbox.id, size)
        self._link.spacks_received += 1
        inbox.streak = 0 if waited else inbox.streak + 1
        inbox.answering = waited
        if session.has_output:
            await self._link.write_pong()
            self._progress()
        return spack

    def _peer_close_error(self) -> Exception:
        """What a channel's receive() raises once the peer closed the connection."""
        close = self.peer_close
        if close is None or close.code == CloseCode.NORMAL:
            return anyio.EndOfStream()
        return self._link.tag(
            ClosedByPeer("the peer closed the connection", code=close.code, reason=close.reason)
        )

    # -- sending --------------------------------------------------------------------------

    def queue(self, inbox: _Inbox, item: Spack) -> bool:
        """Queue ``item`` on ``inbox``'s channel without writing; see :meth:`Channel.queue`.

        :returns: ``False`` when the spack was dropped at once: the session has read the
            peer's RESET of the channel, and its event is still to be dispatched (the
            channel's unsent spacks go with it; the next call raises it).
        """
        link = self._link
        link.check_open()
        problem = self._problem(inbox, sending=True)
        if problem is not None:
            if isinstance(problem, ChannelReset) and not inbox.let_go:
                self._let_go(inbox)
                if link.writer_running:
                    link.wakeup.set()  # the answering RESET goes with the next write
            raise problem
        if self._reset_unseen(inbox):
            return False
        self._session.queue(item, inbox.id)
        link.spacks_sent += 1
        return True

    async def send(self, inbox: _Inbox, item: Spack) -> None:
        """Queue ``item`` and get it going; see :meth:`Channel.send`."""
        session, link = self._session, self._link
        if not self.queue(inbox, item):
            await self._until(lambda: inbox.reset is not None, conditional=True)
            await self._check(inbox, sending=True)  # raises the reset
        group = self._task_group
        # Without the connection's tasks (no ``async with``), nothing would write or read
        # for a backlog: send() returns once its spack is written.
        channel, bound = inbox.id, self._bound if group is not None else 0
        answering, inbox.answering = inbox.answering, False
        # A reply (the last receive had to wait) is written at once when nothing else is
        # being written: latency matters, and there is nothing to batch it with (as
        # Connection.send does without channels).
        if (
            group is not None
            and session.queued_bytes_on(channel) <= bound
            and not (answering and not link.send_lock.locked())
        ):
            if not link.writer_running:
                link.writer_running = True
                group.start_soon(self._write_behind, name=f"stalk writer {link.address}")
            link.wakeup.set()
            return
        session.flush()
        await self._write()
        if session.queued_bytes_on(channel) > bound:
            await self._until(
                lambda: (
                    # (a RESET read and not yet dispatched dropped the backlog: wait for it)
                    (session.queued_bytes_on(channel) <= bound and not self._reset_unseen(inbox))
                    or self._problem(inbox, sending=True) is not None
                    or self.peer_close is not None
                ),
                conditional=True,
            )
            await self._check(inbox, sending=True)
            if session.queued_bytes_on(channel) > bound:  # the peer closed the connection
                raise link.tag(
                    ConnectionLost(
                        f"the peer closed the connection while {session.queued_bytes_on(channel)}"
                        f" bytes of channel {channel} waited for credit"
                    )
                )

    async def flush(self) -> None:
        """Write everything queued that credit allows; see :meth:`Channel.flush`."""
        self._link.check_open()
        self._session.flush()
        await self._write()

    async def send_eof(self, inbox: _Inbox) -> None:
        """Send the CLOSE of our direction of ``inbox``'s channel (after what it queued)."""
        self._link.check_open()
        if inbox.sent_eof:
            return
        await self._check(inbox, sending=False)
        self._close_direction(inbox)
        await self._write_control()

    def _close_direction(self, inbox: _Inbox) -> None:
        """Queue the channel's CLOSE if the session still has our direction open."""
        inbox.sent_eof = True
        session = self._session
        state = session.channel_state(inbox.id)
        if session.close_sent or state not in (ChannelState.OPEN, ChannelState.RECEIVE_CLOSED):
            return  # the connection's CLOSE ended it, or the channel is reset or ended
        session.close_channel(inbox.id)
        if inbox.eof:
            self._inboxes.pop(inbox.id, None)  # both directions ended: no event can come

    async def aclose(self, inbox: _Inbox) -> None:
        """Close ``inbox``'s channel for the application; see :meth:`Channel.aclose`."""
        if inbox.closed is not None:
            return
        link = self._link
        usable = not link.closed and link.broken is None
        if usable and not inbox.sent_eof and inbox.reset is None:
            self._close_direction(inbox)
        inbox.closed = "closed"
        self._forget(inbox)
        if usable:
            with contextlib.suppress(StalkError):
                await self._write_control()

    async def reset(self, inbox: _Inbox, code: int, reason: str) -> None:
        """Reset ``inbox``'s channel; see :meth:`Channel.reset`."""
        check_close(code, reason)
        link, session = self._link, self._session
        if inbox.closed is not None:
            return
        link.check_open()
        state = session.channel_state(inbox.id)
        inbox.closed = "reset"
        if state is not None and not state.reset_by_us and not session.close_sent:
            if state is ChannelState.RESET_RECEIVED:
                inbox.let_go = True
                session.release_channel(inbox.id)  # already reset by the peer: answer it
            else:
                session.reset_channel(inbox.id, code, reason)
        self._forget(inbox)
        await self._write_control()

    def _forget(self, inbox: _Inbox) -> None:
        """The application let go of the channel: what it held goes back as credit.

        Its later events are dropped on arrival (their credit back too); its waiting
        tasks are woken to raise :class:`~stalk.ChannelClosed`.
        """
        session = self._session
        for _, size in inbox.spacks:
            session.release(inbox.id, size)
        inbox.spacks.clear()
        if inbox.reset is not None and not inbox.let_go:
            self._let_go(inbox)
        self._inboxes.pop(inbox.id, None)
        self._wake(inbox.waiter)
        self._progress()

    # -- checks -----------------------------------------------------------------------------

    def _problem(self, inbox: _Inbox, *, sending: bool) -> StalkError | None:
        """The error a call on ``inbox``'s channel raises now, if any.

        The connection's own state is checked apart (``Link.check_open``).
        """
        if inbox.closed is not None:
            return self._link.tag(ChannelClosed(f"channel {inbox.id} was {inbox.closed}"))
        if inbox.reset is not None:
            code, reason = inbox.reset
            return self._link.tag(
                ChannelReset(f"the peer reset channel {inbox.id}", code=code, reason=reason)
            )
        if sending and inbox.sent_eof:
            return self._link.tag(
                ChannelClosed(f"channel {inbox.id}: our direction was closed (send_eof)")
            )
        if sending and self._session.close_sent:
            return self._link.tag(ConnectionClosed("the connection was closed for sending"))
        return None

    async def _check(self, inbox: _Inbox, *, sending: bool) -> None:
        """Raise :meth:`_problem`; a reset seen is let go, and the answering RESET written."""
        problem = self._problem(inbox, sending=sending)
        if problem is None:
            return
        if isinstance(problem, ChannelReset) and not inbox.let_go:
            self._let_go(inbox)
            await self._write_control()
        raise problem

    def _reset_unseen(self, inbox: _Inbox) -> bool:
        """Whether the session read the peer's RESET of the channel, not yet dispatched."""
        return (
            inbox.reset is None
            and inbox.id != 0
            and self._session.channel_state(inbox.id) is ChannelState.RESET_RECEIVED
        )

    def _check_sending(self) -> None:
        if self._session.close_sent:
            raise self._link.tag(ConnectionClosed("the connection was closed for sending"))

    def _let_go(self, inbox: _Inbox) -> None:
        """The application saw the peer's reset: our answering RESET frees its slot."""
        inbox.let_go = True
        session = self._session
        if session.channel_state(inbox.id) is ChannelState.RESET_RECEIVED:
            session.release_channel(inbox.id)

    # -- writing ----------------------------------------------------------------------------

    async def _write(self) -> None:
        """Write what the session has (waiting for the send lock if need be)."""
        try:
            await self._link.write_all()
        except StalkError:
            self._wake_all()
            raise
        self._progress()

    async def _write_control(self) -> None:
        """Write what the session owes now, never waiting for the send lock (a PONG's way).

        For records that must go promptly and may be written from a task being cancelled:
        WINDOW, RESET, a channel's CLOSE.
        """
        if self._session.has_output and not self._link.closed and self._link.broken is None:
            await self._link.write_pong()
            self._progress()

    async def _write_behind(self) -> None:
        """The writer task of a connection with channels: as ``Link.write_behind``.

        After each write, the waiters whose backlog it may have shrunk are woken.
        """
        link = self._link
        link.writer_running = True
        try:
            while True:
                await link.wakeup.wait()
                link.wakeup = anyio.Event()
                async with link.send_lock:
                    if link.closed or link.broken is not None:
                        return
                    self._session.flush()
                    await link.write_pending()
                self._progress()
        except StalkError:
            self._wake_all()  # the connection is broken or closed; the waiters raise it
        finally:
            link.writer_running = False

    # -- waiting and reading ------------------------------------------------------------------

    async def _until(
        self,
        ready: Callable[[], bool],
        waiter: _Waiter | None = None,
        *,
        conditional: bool = False,
    ) -> None:
        """Return once ``ready()`` holds: be the reader when no task is, else wait.

        :param waiter: how this task is woken (a channel's receive() registers one in its
            inbox, so that its events wake it).
        :param conditional: also woken by any progress (writes, input), for conditions
            no single event announces.
        :raises ~stalk.StalkError: the connection's error, if it is closed or broken.
        """
        waiter = waiter or _Waiter()
        waiting = self._waiting
        waiting[waiter] = None
        if conditional:
            self._conditional[waiter] = None
        try:
            while not ready():
                self._link.check_open()
                if self._reader is None:
                    await self._read(ready, waiter)
                else:
                    waiter.event = anyio.Event()
                    await waiter.event.wait()
        finally:
            del waiting[waiter]
            self._conditional.pop(waiter, None)
            if self._reader is None:  # the reader's role is free: pass it on
                self._wake(next(iter(waiting)) if waiting else self._idle_reader)

    async def _read(
        self, ready: Callable[[], bool], waiter: _Waiter, *, nudge: bool = True
    ) -> None:
        """Be the reader until ``ready()`` holds: read, and dispatch every event.

        :param nudge: read from the transport in a cancel scope that :meth:`_wake`
            cancels, for a condition that may come true without input.
        """
        link, session = self._link, self._session
        self._reader = waiter
        try:
            while not ready():
                link.check_open()
                try:
                    event = session.next_event()
                except StalkError as exc:
                    raise await link.fail(exc, close=True) from None
                if session.has_output:
                    await link.write_pong()
                    self._progress()
                if event is NEED_DATA:
                    self._progress()  # a batch of input is done: credit, ended channels
                    if ready():
                        return
                    if not nudge:
                        await link.receive_into_session()
                        continue
                    with anyio.CancelScope() as scope:
                        self._read_scope = scope  # _wake() cancels it: ready() may hold
                        await link.receive_into_session()
                    self._read_scope = None
                elif event is PAUSED:
                    await link.resume_reading()
                    self._progress()
                else:
                    self._dispatch(event)
                    if event is self.peer_close and not ready():
                        # Nothing can come after the peer's CLOSE: a wait on input would
                        # never end (every caller's condition counts the CLOSE in).
                        raise link.tag(ConnectionLost("the peer closed the connection"))
        except StalkError:
            self._wake_all()
            raise
        finally:
            self._reader = None
            self._read_scope = None

    def _dispatch(self, event: Event) -> None:
        """Put one event of the session where it belongs, and wake who waits for it."""
        session = self._session
        if isinstance(event, ChannelMessageReceived):
            inbox = self._inboxes.get(event.channel)
            if inbox is None:  # closed or reset by the application: dropped, credit back
                session.release(event.channel, event.size)
                return
            inbox.spacks.append((event.spack, event.size))
            self._wake(inbox.waiter)
        elif isinstance(event, ChannelOpened):
            inbox = self._inboxes[event.channel] = _Inbox(event.channel)
            channel = Channel(self, inbox)
            if self._handler is not None and self._task_group is not None:
                self._spawn(channel)
            else:
                self._opened.append(channel)
                self._wake(self._accept_waiter)
        elif isinstance(event, ChannelCloseReceived):
            inbox = self._inboxes.get(event.channel)
            if inbox is not None:
                inbox.eof = True
                if session.channel_state(event.channel) is None:
                    del self._inboxes[event.channel]  # ended both ways: no event can come
                self._wake(inbox.waiter)
        elif isinstance(event, ChannelResetReceived):
            inbox = self._inboxes.pop(event.channel, None)
            if inbox is None:  # the application closed it already: answer at once
                if session.channel_state(event.channel) is ChannelState.RESET_RECEIVED:
                    session.release_channel(event.channel)
                return
            for _, size in inbox.spacks:  # nothing it held is delivered: credit back
                session.release(event.channel, size)
            inbox.spacks.clear()
            inbox.reset = (event.code, event.reason)
            self._wake(inbox.waiter)
            self._progress()  # a sender waiting for its credit raises
        elif isinstance(event, CloseReceived) and self.peer_close is None:
            self.peer_close = event
            link = self._link
            if not link.closed and not session.close_sent:
                link.peer_closed_first = True
            self._wake_all()
        # PongReceived (answers to keepalive PINGs) needs nothing.

    def _wake(self, waiter: _Waiter | None) -> None:
        """Wake ``waiter`` (the reader: by cancelling its read from the transport)."""
        if waiter is None:
            return
        if waiter is self._reader:
            if self._read_scope is not None:
                self._read_scope.cancel()
        else:
            waiter.event.set()

    def _progress(self) -> None:
        """Something was written or read: wake the tasks whose condition it may satisfy."""
        if self._conditional:
            for waiter in self._conditional:
                self._wake(waiter)

    def _wake_all(self) -> None:
        for waiter in self._waiting:
            self._wake(waiter)
        self._wake(self._idle_reader)


class Channel(ObjectStream[Spack]):
    """One channel of a connection: an anyio ``ObjectStream`` of spacks, like a Connection.

    There is no public initializer: :meth:`Connection.open_channel
    <stalk.Connection.open_channel>` opens one, :meth:`Connection.accept_channel
    <stalk.Connection.accept_channel>` (or a ``channel_handler``) gives those the peer
    opened.

    Each direction of a channel ends on its own: :meth:`send_eof` ends ours (the peer's
    ``receive()`` then raises :class:`anyio.EndOfStream`), the peer's CLOSE ends its.
    :meth:`reset` ends both at once, dropping what was not delivered, and the peer's calls
    raise :class:`~stalk.ChannelReset`. Closing or losing the connection ends every channel
    with the connection's error. Spacks on one channel arrive in order; channels are
    independent: one that its application does not read stops only itself (its window is
    ``Config.channel_window``).

    Use the connection as ``async with``: its reader task then takes the peer's input as
    it comes (credit for our sends, the peer's new channels), whoever receives. Without
    it, only calls that wait read the connection, and ``send()`` returns once its spack
    is written.
    """

    def __init__(self, dispatcher: Dispatcher, inbox: _Inbox) -> None:
        self._dispatcher = dispatcher
        self._inbox = inbox
        self._receive_guard = anyio.ResourceGuard("receiving from")

    @property
    def id(self) -> int:
        """The channel's id: odd for channels the initiator opened, even for the responder's."""
        return self._inbox.id

    @property
    def connection(self) -> Connection:
        """The connection the channel belongs to."""
        return self._dispatcher.connection

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The connection's typed attributes (the transport's and ``StalkAttribute``)."""
        return self._dispatcher.connection.extra_attributes

    def __repr__(self) -> str:
        inbox = self._inbox
        state = (
            inbox.closed
            or ("reset by the peer" if inbox.reset is not None else None)
            or ("ended" if inbox.eof and inbox.sent_eof else None)
            or "open"
        )
        return f"<stalk.Channel {inbox.id} of {self.connection!r} {state}>"

    def queue(self, item: Spack) -> None:
        """Encode ``item`` and queue it without writing; :meth:`flush` sends it.

        :raises ~stalk.InvalidSpackValue: a value cannot be encoded (nothing is queued).
        :raises ~stalk.MessageTooLarge: larger than the peer accepts (nothing is queued).
        :raises ~stalk.ChannelClosed: we closed or reset the channel, or sent its EOF.
        :raises ~stalk.ChannelReset: the peer reset the channel.
        :raises ~stalk.ConnectionClosed: the connection was closed.
        :raises ~stalk.ConnectionLost: the connection is broken.
        """
        self._dispatcher.queue(self._inbox, item)

    async def flush(self) -> None:
        """Write what is queued, on every channel, as far as the peer's credit allows.

        :raises ~stalk.ConnectionClosed: the connection was closed.
        :raises ~stalk.ConnectionLost: the connection broke (or the write timed out).
        """
        await self._dispatcher.flush()

    async def send(self, item: Spack) -> None:
        """Send one spack on this channel.

        Returns once the spack is handed to the connection's writer task (inside ``async
        with conn``) or written, or waits for the peer's credit with at most
        ``Config.send_buffer`` bytes of this channel before it; beyond that it waits,
        reading the connection if no other task does (credit arrives as input). Cancelled,
        it leaves its spack queued: it goes out when credit allows.

        :raises ~stalk.InvalidSpackValue: a value cannot be encoded (nothing is sent).
        :raises ~stalk.MessageTooLarge: larger than the peer accepts (nothing is sent).
        :raises ~stalk.ChannelClosed: we closed or reset the channel, or sent its EOF.
        :raises ~stalk.ChannelReset: the peer reset the channel (before or while this waited;
            what was not sent is dropped).
        :raises ~stalk.ConnectionClosed: the connection was closed.
        :raises ~stalk.ConnectionLost: the connection broke, or the peer closed it while
            this spack waited for credit.
        """
        await self._dispatcher.send(self._inbox, item)

    async def receive(self) -> Spack:
        """The next spack the peer sent on this channel.

        Cancelled at any point, it loses nothing: the spack stays for the next call.

        :raises ~anyio.EndOfStream: the peer closed its direction of the channel (or the
            connection) cleanly.
        :raises ~stalk.ChannelReset: the peer reset the channel (what it had sent and we had
            not received is dropped).
        :raises ~stalk.ChannelClosed: we closed or reset the channel.
        :raises ~stalk.ClosedByPeer: the peer closed the connection with an error code.
        :raises ~stalk.ConnectionClosed: the connection was closed.
        :raises ~stalk.ConnectionLost: the connection broke (a ``ProtocolError`` for the
            task that read the peer's offence).
        :raises ~anyio.BusyResourceError: another task is already receiving on it.
        """
        with self._receive_guard:
            return await self._dispatcher.receive(self._inbox)

    async def send_eof(self) -> None:
        """Close our direction (the channel's CLOSE, after what it queued); receive goes on.

        :raises ~stalk.ChannelReset: the peer reset the channel.
        :raises ~stalk.ChannelClosed: we closed or reset the channel.
        :raises ~stalk.ConnectionLost: the connection broke.
        """
        await self._dispatcher.send_eof(self._inbox)

    async def aclose(self) -> None:
        """Close the channel: CLOSE our direction (after what it queued), stop receiving.

        A channel the peer already closed ends; spacks the peer still sends on one it has
        not closed are dropped (use :meth:`reset` to tell the peer to stop). A channel the
        peer reset is let go. Idempotent; never raises for the connection's state.
        """
        await self._dispatcher.aclose(self._inbox)

    async def reset(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Reset the channel: both directions end now, what was not sent is dropped.

        The peer's calls on it raise :class:`~stalk.ChannelReset` with ``code`` and
        ``reason``. Then every call here raises :class:`~stalk.ChannelClosed`.
        Idempotent.

        :param code: a :class:`~stalk.CloseCode`, or an application code from ``0x1000``.
        :param reason: text for the peer (at most 1024 UTF-8 bytes).
        :raises ValueError: ``code`` does not fit in 16 bits or ``reason`` is too long.
        :raises ~stalk.ConnectionClosed: the connection was closed.
        :raises ~stalk.ConnectionLost: the connection broke.
        """
        await self._dispatcher.reset(self._inbox, code, reason)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """Close the channel; reset it if the block raised.

        Leaving normally closes it (:meth:`aclose`); leaving through an exception resets
        it with INTERNAL_ERROR and the reason ``"internal error"`` (GOING_AWAY for a
        cancellation), so the peer never takes an abandoned stream for a complete one.
        """
        if exc_type is None:
            await self.aclose()
            return
        code = (
            CloseCode.GOING_AWAY
            if issubclass(exc_type, anyio.get_cancelled_exc_class())
            else CloseCode.INTERNAL_ERROR
        )
        reason = "cancelled" if code == CloseCode.GOING_AWAY else INTERNAL_ERROR_REASON
        with contextlib.suppress(StalkError):
            await self.reset(code, reason)
        await self.aclose()
