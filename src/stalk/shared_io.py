"""The reads and writes of a connection with channels, shared by all its channels' tasks.

Theory of operation
-------------------
Many tasks of one connection need its input: every channel's ``receive()``, channel 0's
included, a sender waiting for the peer's credit, ``open_channel()`` waiting for a slot,
``accept_channel()``. :class:`SharedIO` lets them share the one transport without polling
and without losing an event.

**One reader at a time.** A task whose condition does not hold waits in
:meth:`SharedIO.until`. When no task is reading, it becomes the **reader**: it reads the
transport and hands each of the session's events to the dispatcher, which puts it in its
channel's inbox and wakes the task waiting there, until its own condition holds. Then it
gives the role up and wakes the first task still waiting, which becomes the next reader.
Every event goes from the session to an inbox with no await in between, so a reader
cancelled at any point loses nothing, and neither does a waiting task (its inbox keeps
what came).

**Channel 0 as the reader** (its receive() with its inbox empty, while no task reads)
takes its own next spack itself, not through its inbox, without the bookkeeping of a
waiting task (:meth:`SharedIO.read_direct`), and leaves the rest of that batch in the
session; its next receive() with its inbox empty takes the next one from there while no
task reads (:meth:`SharedIO.next_direct`), dispatching the events before it. Its inbox
is empty whenever it does, and only a reader fills inboxes, so the order holds. (While
another task reads, channel 0 waits as any channel does, and its spacks come through
its inbox.) A connection used only on channel 0 thus reads as one without channels
does.

**The reader task** (inside ``async with conn``) is the reader of last resort: it reads
while no other task waits, so that credit, the peer's new channels (for a
``channel_handler``) and every channel's spacks are taken as they come even when the
application is not receiving; it takes a free role only after the tasks already running
had their turn, and leaves it as soon as another task waits, so a task receiving its
answers reads them itself, with no task switch through the reader task. Nor is it woken
each time such a task gives the role up, only to find it taken again: on asyncio it is
woken only if the role is still free once the tasks that can run have run (a callback,
and a second one only if the role is free when the first runs; no task); on trio, while
the role changes hands at least once per :data:`_LOOK_AGAIN` (5 ms), it dozes that long
rather than sleep until woken, then looks again. (Not on asyncio: a pending timer makes
each of the event loop's waits for input cost more, about 8 µs a round trip here, more
than the wakes.) A request and its answer thus cost the reader task nothing, and a role
left free is taken at once, or within 5 ms on trio.
Flow control bounds what it takes in. It does not read while the application is taking
spacks already read (it looks again once the application stopped taking them, or the
application's own receive reads): more would only lengthen a backlog held decoded, up to
a window of small spacks, which the garbage collector goes through again and again.

**Waking.** A waiting task is woken by setting its event (a bare future on asyncio, a
parked task on trio: :class:`Waiter`); the reader, blocked on the transport, by
cancelling its read, which anyio makes safe (a read returns bytes or consumes none). A
reader whose condition only input can satisfy (channel 0's ``receive()``) reads without
that cancel scope, which costs more than the read's own work: the connection's end
closes the transport under it. Some conditions no single event announces: a sender's
backlog shrinks when a write packed its spack, a slot for ``open_channel()`` frees when
a channel of ours ended. The tasks waiting for those are *conditional*: every write and
every batch of input wakes them (:meth:`SharedIO.progress`), and they look again.

**Writes** go through the connection's :class:`~stalk.link.Link` as without channels (the
send lock, the writer task, each buffer whole), and each is followed by a
:meth:`~SharedIO.progress`. The records the protocol owes (WINDOW as the application
receives, RESET, a channel's CLOSE) are written as PONGs are, never waiting for the send
lock (:meth:`SharedIO.write_owed`): they may be written from a task being cancelled, or one
holding a spack it is about to return.

**The peer's CLOSE** of the connection ends its input: nothing can come after it, so a
task still waiting then raises instead of waiting for input forever.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from stalk.errors import ClosedByPeer, ConnectionLost, StalkError
from stalk.events import NEED_DATA, PAUSED, ChannelMessageReceived, CloseReceived, Event
from stalk.link import Link
from stalk.spack import Spack
from stalk.wire import CloseCode

if TYPE_CHECKING:
    import asyncio

__all__ = ["SharedIO", "Waiter"]

#: How soon (seconds) the reader task looks again when another task will likely read for
#: it: while the application takes spacks already read (before it reads more), and on
#: trio while the reader's role changes hands, as it does with every answer a task reads
#: itself (rather than be woken each time). It bounds how long input nobody waits for
#: (the peer's new channels, credit, a PING) may wait once that stops. Each look costs
#: a timer that fires: 1 ms took 4 us more CPU per 64 B round trip on trio (README).
_LOOK_AGAIN = 0.005


class Waiter:
    """A task waiting in :class:`SharedIO`: it sleeps until woken, then looks again.

    This one sleeps on an ``anyio.Event``; :func:`waiter_factory` picks a cheaper one for
    the running event loop, with the same behaviour (``tests/test_channels_api.py``).
    """

    __slots__ = ("_event",)

    #: Whether :meth:`wake_after_turn` waits for the tasks that can run to have run
    #: (else it decides at once).
    defers: bool = False

    def __init__(self) -> None:
        self._event: anyio.Event | None = None  # made by each sleep: most waits never sleep

    def sleep(self) -> Awaitable[None]:
        """Wait until woken from now on (a wake before this call is spent: look again).

        What to await, made when called: a waiter's sleep is no coroutine of its own.
        """
        self._event = anyio.Event()
        return self._event.wait()

    def wake(self) -> None:
        """End the current sleep, if any."""
        if self._event is not None:
            self._event.set()

    async def doze(self, seconds: float) -> None:
        """Sleep as :meth:`sleep` does, for at most ``seconds``."""
        with anyio.move_on_after(seconds):
            await self.sleep()

    def wake_after_turn(self, still: Callable[[], bool]) -> None:
        """Wake it if ``still()`` holds now and once the tasks that can run now have run.

        ``False`` either time ends the look. One look at a time: a call while one is due
        adds nothing (it asks after this call anyway). Without a cheap way to wait for the
        tasks, ``still()`` is asked at once only.
        """
        if still():
            self.wake()


class _FutureWaiter(Waiter):
    """On asyncio: a bare future per sleep (anyio's Event wraps asyncio's, which wraps one).

    A cancellation reaches the task in ``await future`` as in any asyncio wait, and
    cancels the future: a wake after it finds it done, and does nothing.
    """

    __slots__ = ("_future", "_looking", "_loop")

    defers = True

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self._future: asyncio.Future[None] | None = None
        self._looking = False  # a look of wake_after_turn is due

    def sleep(self) -> Awaitable[None]:
        future = self._future = self._loop.create_future()
        return future

    def wake(self) -> None:
        future = self._future
        if future is not None:
            self._future = None
            if not future.done():
                future.set_result(None)

    async def doze(self, seconds: float) -> None:
        # The event loop's own timer: a cancel scope costs more.
        future = self._future = self._loop.create_future()
        timer = self._loop.call_later(seconds, _time_out, future)
        try:
            await future
        finally:
            timer.cancel()

    def wake_after_turn(self, still: Callable[[], bool]) -> None:
        # Up to two hops: a callback queued now runs before the tasks that run next
        # (the event loop runs what is ready in order); one it queues runs after them.
        # Most looks end at the first (SharedIO: the role was taken back).
        if not self._looking:
            self._looking = True
            self._loop.call_soon(self._first_look, still)

    def _first_look(self, still: Callable[[], bool]) -> None:
        if still():
            self._loop.call_soon(self._last_look, still)
        else:
            self._looking = False

    def _last_look(self, still: Callable[[], bool]) -> None:
        self._looking = False
        if still():
            self.wake()


def _time_out(future: asyncio.Future[None]) -> None:
    """A doze's time ran out (unless a wake came first)."""
    if not future.done():
        future.set_result(None)


class _TrioWaiter(Waiter):
    """On trio: the task parks itself, and a wake reschedules it.

    What trio's Event does for each waiter, without the Event or anyio's layer over it.
    A cancellation aborts the park: the waiter forgets the task first, so a wake after it
    reschedules nothing.
    """

    __slots__ = ("_lowlevel", "_task", "_trio")

    def __init__(self, trio: Any) -> None:
        super().__init__()
        self._trio = trio  # (imported only when trio runs)
        self._lowlevel = trio.lowlevel
        self._task: object = None

    def sleep(self) -> Awaitable[None]:
        lowlevel = self._lowlevel
        self._task = lowlevel.current_task()
        return lowlevel.wait_task_rescheduled(self._abort)  # type: ignore[no-any-return]

    def _abort(self, _raise_cancel: object) -> object:
        self._task = None
        return self._lowlevel.Abort.SUCCEEDED

    def wake(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            self._lowlevel.reschedule(task)

    async def doze(self, seconds: float) -> None:
        # trio's own cancel scope: anyio's over it costs more.
        with self._trio.move_on_after(seconds):
            await self.sleep()


def waiter_factory() -> Callable[[], Waiter]:
    """What makes the cheapest :class:`Waiter` for the running event loop.

    A future per sleep on asyncio, a parked task on trio, anyio's Event otherwise. Neither
    event loop is imported for this: if it is not loaded, it is not running.
    """
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            return functools.partial(_FutureWaiter, loop)
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            return functools.partial(_TrioWaiter, trio)
    return Waiter


class SharedIO:
    """The transport of one connection with channels, as its tasks share it.

    :param link: the connection's link (its session has channels).
    :param dispatch: puts one event of the session where it belongs (every event but the
        peer's CLOSE of the connection, which this class keeps in :attr:`peer_close`).
    """

    def __init__(self, link: Link, dispatch: Callable[[Event], None]) -> None:
        self._link = link
        self._session = link.session
        self._dispatch = dispatch
        #: The connection's task group while it is used as ``async with``, else ``None``.
        self.task_group: TaskGroup | None = None
        #: Makes the waiter of a task that is to wait here.
        self.new_waiter = waiter_factory()
        # Every waiting task, in arrival order (the next reader is the first); those woken
        # by any progress too; the reader, and the cancel scope of its read from the
        # transport; the reader task's waiter, while it runs.
        self._waiting: dict[Waiter, None] = {}
        self._conditional: dict[Waiter, None] = {}
        self._reader: Waiter | None = None
        self._read_scope: anyio.CancelScope | None = None
        self._idle_reader: Waiter | None = None
        # Whether the reader task dozes (it looks again soon: no need to wake it), and
        # how many times a task gave the reader's role up.
        self._dozing = False
        self._handovers = 0
        #: The peer's CLOSE of the connection, once read.
        self.peer_close: CloseReceived | None = None
        #: The tasks that input woke (a spack arrived for them) and that have not run yet.
        self.woken: set[Waiter] = set()
        #: Spacks in the channels' inboxes, not yet taken by the application.
        self.held = 0
        #: Channel 0's receive() takes its spack itself as the reader (:meth:`read_direct`);
        #: ``False`` only to compare with the inbox's way.
        self.direct = True

    # -- the connection's tasks ---------------------------------------------------------

    def start(self, task_group: TaskGroup) -> None:
        """The connection entered ``async with``: the reader task starts, a writer may."""
        self.task_group = task_group
        task_group.start_soon(self._read_behind, name=f"stalk reader {self._link.address}")

    def stop(self) -> None:
        """The connection's task group is ending."""
        self.task_group = None

    # -- waiting and reading ------------------------------------------------------------

    async def until(
        self,
        ready: Callable[[], bool],
        waiter: Waiter | None = None,
        *,
        conditional: bool = False,
        input_only: bool = False,
    ) -> None:
        """Return once ``ready()`` holds: be the reader when no task is, else wait.

        :param waiter: how this task is woken (a channel's receive() registers one in its
            inbox, so that its events wake it).
        :param conditional: also woken by any progress (writes, input), for conditions
            no single event announces.
        :param input_only: ``ready()`` can come true only through input, or the end of
            the connection (which ends a read anyway: the transport closes): as the
            reader, this task reads without a cancel scope for :meth:`wake` to cancel.
        :raises ~stalk.StalkError: the connection's error, if it is closed or broken.
        """
        waiter = waiter or self.new_waiter()
        waiting = self._waiting
        waiting[waiter] = None
        if conditional:
            self._conditional[waiter] = None
        try:
            while not ready():
                self._link.check_open()
                if self._reader is None:
                    await self._read(ready, waiter, nudge=not input_only)
                else:
                    await waiter.sleep()
        finally:
            del waiting[waiter]
            self._conditional.pop(waiter, None)
            self.woken.discard(waiter)
            if self._reader is None:  # the reader's role is free: pass it on
                self._pass_role()

    async def _read_behind(self) -> None:
        """The reader task: read while no other task waits (the reader of last resort).

        It runs until the peer's CLOSE or the connection's end.
        """
        waiter = self._idle_reader = self.new_waiter()
        waiting, link, session = self._waiting, self._link, self._session
        taken = link.spacks_received  # by the application, when this task last looked
        # The handovers of the reader's role, and the time, when this task last slept.
        handovers, looked = self._handovers, time.monotonic()

        def taking() -> bool:
            """Whether the application took spacks already read since the last look.

            With some left (in the inboxes, or read and not yet handed out: channel 0
            takes those itself), reading more now would only lengthen that backlog:
            this task looks again a pause later (or when woken).
            """
            return (bool(self.held) or session.input_waiting) and link.spacks_received != taken

        try:
            with contextlib.suppress(StalkError):
                while self.peer_close is None:
                    link.check_open()
                    if self._reader is None and not waiting:
                        # The tasks already running go first: one that sends and then
                        # receives takes the role itself and reads its answer, with no
                        # task switch through this one.
                        await anyio.lowlevel.checkpoint()
                        if self._reader is not None or waiting:
                            continue
                        if taking():
                            taken = link.spacks_received
                            await waiter.doze(_LOOK_AGAIN)
                            continue
                        taken = link.spacks_received
                        await self._read(
                            lambda: bool(waiting) or self.peer_close is not None or taking(),
                            waiter,
                            nudge=False,  # it stops reading once another task waits
                        )
                        taken = link.spacks_received
                        if self._reader is None and waiting:
                            self.wake(next(iter(waiting)))
                    else:
                        # The role is taken. Where a wake cannot wait for the tasks
                        # that can run (Waiter.defers), and the role changed hands at
                        # least once per _LOOK_AGAIN since the last look, as it does with
                        # each answer a task reads itself, it will again: rather than be
                        # woken each time, look again a moment later.
                        if not waiter.defers:
                            now = time.monotonic()
                            often = (self._handovers - handovers) * _LOOK_AGAIN >= now - looked
                            handovers, looked = self._handovers, now
                            if often:
                                self._dozing = True
                                try:
                                    await waiter.doze(_LOOK_AGAIN)
                                finally:
                                    self._dozing = False
                                continue
                        await waiter.sleep()  # until the role is given up (_pass_role)
        finally:
            self._idle_reader = None

    async def _read(
        self,
        ready: Callable[[], bool],
        waiter: Waiter,
        *,
        nudge: bool = True,
    ) -> None:
        """Be the reader until ``ready()`` holds: read, and dispatch every event.

        Once it holds, the events the session can give without more input are dispatched
        too before the role is given up (each to its inbox, waking the task waiting
        there): a batch read at once is handed out at once, rather than one event per
        turn of the reader's role.

        :param nudge: read from the transport in a cancel scope that :meth:`wake`
            cancels, for a condition that may come true without input.
        """
        if ready():
            return
        link, session, dispatch = self._link, self._session, self._dispatch
        self._reader = waiter
        try:
            while True:
                link.check_open()
                try:
                    event = session.next_event()
                except StalkError as exc:
                    raise await link.fail(exc, close=True) from None
                if type(event) is ChannelMessageReceived:
                    dispatch(event)  # the most common event, first
                elif event is NEED_DATA:
                    if session.has_output:  # (most reads owe nothing: no coroutine then)
                        await self.write_owed()
                    self.progress()  # a batch of input is done: credit, ended channels
                    if ready():
                        return
                    if not nudge:
                        await link.receive_into_session()
                        continue
                    with anyio.CancelScope() as scope:
                        self._read_scope = scope  # wake() cancels it: ready() may hold
                        await link.receive_into_session()
                    self._read_scope = None
                elif event is PAUSED:
                    await self.write_owed()
                    self.progress()
                    if ready():
                        return  # the next reader resumes reading
                    await link.resume_reading()
                    self.progress()
                elif isinstance(event, CloseReceived):
                    self._peer_closed(event)
                    await self.write_owed()
                    if not ready():
                        # Nothing can come after the peer's CLOSE: a wait on input would
                        # never end (every caller's condition counts the CLOSE in).
                        raise link.tag(ConnectionLost("the peer closed the connection"))
                    return
                else:
                    dispatch(event)
        except StalkError:
            self.wake_all()
            raise
        finally:
            self._reader = None
            self._read_scope = None

    async def read_direct(self, waiter: Waiter) -> ChannelMessageReceived | None:
        """Channel 0's receive() with its inbox empty, while no task reads.

        It becomes the reader and reads until channel 0's next spack, which it returns
        (not through its inbox), dispatching the events before it; the rest of that
        batch waits in the session (:meth:`next_direct`). What :meth:`until` does for a
        waiting task, without its bookkeeping: the receive of a connection used as one
        without channels (``tests/test_channels_api.py`` compares it with the inbox's
        way).

        :returns: ``None`` when another task reads (or ``direct`` is off), or once the
            peer's CLOSE is read (:attr:`peer_close`).
        """
        if self._reader is not None or not self.direct:
            return None
        link, session, dispatch = self._link, self._session, self._dispatch
        self._reader = waiter
        try:
            while True:
                link.check_open()
                try:
                    event = session.next_event()
                except StalkError as exc:
                    raise await link.fail(exc, close=True) from None
                if type(event) is ChannelMessageReceived:
                    if not event.channel:
                        if self._conditional:
                            self.progress()  # what came before it may be their credit
                        return event  # the rest of its batch: see next_direct()
                    dispatch(event)
                elif event is NEED_DATA:
                    if session.has_output:
                        await self.write_owed()
                    if self._conditional:
                        self.progress()
                    await link.receive_into_session()
                elif event is PAUSED:
                    await self.write_owed()
                    self.progress()
                    await link.resume_reading()
                    self.progress()
                elif isinstance(event, CloseReceived):
                    self._peer_closed(event)
                    await self.write_owed()
                    return None
                else:
                    dispatch(event)
        except StalkError:
            self.wake_all()
            raise
        finally:
            self._reader = None
            self._pass_role()

    def _pass_role(self) -> None:
        """The reader's role is free: wake the first waiting task, else the reader task.

        The reader task only if the role is still free once the tasks that can run now
        have run (on asyncio: ``Waiter.wake_after_turn``), and not while it dozes (it
        looks again soon by itself): a task that reads its own answers takes the role
        back with each, and waking the reader task each time would cost it two turns
        per answer.
        """
        self._handovers += 1
        waiting = self._waiting
        if waiting:
            self.wake(next(iter(waiting)))
        elif not self._dozing and (reader := self._idle_reader) is not None:
            reader.wake_after_turn(self._role_free)

    def _role_free(self) -> bool:
        """Whether the role is free with no task waiting (the reader task's look)."""
        return self._reader is None and not self._waiting

    def next_direct(self) -> ChannelMessageReceived | None:
        """Channel 0's next spack from what the session read, when no task is reading.

        Channel 0's receive() with its inbox empty (see :meth:`read_direct`): the
        events before it are dispatched as the reader would. ``None`` when the session
        needs input first, paused, has the peer's CLOSE or an error, or another task
        reads: the reader's way then handles it (the session gives the same again).
        """
        session, dispatch = self._session, self._dispatch
        if self._reader is not None or not self.direct:
            return None
        try:
            while True:
                event = session.next_event()
                if type(event) is ChannelMessageReceived:
                    if not event.channel:
                        break
                    dispatch(event)
                elif event is NEED_DATA or event is PAUSED or isinstance(event, CloseReceived):
                    return None
                else:
                    dispatch(event)
        except StalkError:
            return None
        if self._conditional:
            self.progress()  # what came before it may be their credit
        return event

    def _peer_closed(self, event: CloseReceived) -> None:
        """The peer's CLOSE of the connection (the session returns it again and again)."""
        if self.peer_close is not None:
            return
        self.peer_close = event
        link = self._link
        if not link.closed and not self._session.close_sent:
            link.peer_closed_first = True
        self.wake_all()

    def peer_close_error(self) -> Exception:
        """What a receive() or accept_channel() raises once the peer closed the connection."""
        close = self.peer_close
        if close is None or close.code == CloseCode.NORMAL:
            return anyio.EndOfStream()
        return self._link.tag(
            ClosedByPeer("the peer closed the connection", code=close.code, reason=close.reason)
        )

    # -- waking -------------------------------------------------------------------------

    def wake(self, waiter: Waiter | None) -> None:
        """Wake ``waiter`` (the reader: by cancelling its read from the transport)."""
        if waiter is None:
            return
        if waiter is self._reader:
            if self._read_scope is not None:
                self._read_scope.cancel()
        else:
            waiter.wake()

    def delivered(self, waiter: Waiter | None) -> None:
        """A spack arrived for the task waiting as ``waiter`` (if any): wake it.

        Until it runs it is in :attr:`woken`: a task replying while others that input woke
        have yet to run leaves its reply to the writer task, which runs after them, so the
        replies to one burst of input go out together (one Noise message, one write)
        rather than each alone.
        """
        if waiter is not None:
            # The reader too: it is to run on with its spack, and the replies of tasks
            # that run before it are better left to the writer task, to go with its own.
            self.woken.add(waiter)
            if waiter is not self._reader:  # (the reader is running: nothing to wake)
                waiter.wake()

    def progress(self) -> None:
        """Something was written or read: wake the tasks whose condition it may satisfy."""
        for waiter in self._conditional:
            self.wake(waiter)

    def wake_all(self) -> None:
        """Wake every waiting task (the connection ended, or the peer closed it)."""
        for waiter in self._waiting:
            self.wake(waiter)
        self.wake(self._idle_reader)

    # -- writing ------------------------------------------------------------------------

    async def write(self) -> None:
        """Write what the session has (waiting for the send lock if need be)."""
        try:
            await self._link.write_all()
        except StalkError:
            self.wake_all()
            raise
        self.progress()

    async def send_now(self, spack: Spack | None) -> bool:
        """Send ``spack`` on channel 0 (``None``: flush what is queued) and write it all.

        ``Link.send_now``: a reply's way, and every send's without the connection's tasks.

        :returns: as ``Link.send_now``: whether nothing it queued is left.
        """
        try:
            whole = await self._link.send_now(spack, flush=spack is None)
        except StalkError:
            self.wake_all()
            raise
        if self._conditional:
            self.progress()
        return whole

    async def write_owed(self) -> None:
        """Write what the session owes now, never waiting for the send lock (a PONG's way).

        For records that must go promptly and may be written from a task being cancelled
        or holding a spack it is about to return: PONG, WINDOW, RESET, a channel's CLOSE.
        """
        link = self._link
        if self._session.has_output and not link.closed and link.broken is None:
            await link.write_pong()
            self.progress()

    def write_soon(self) -> bool:
        """Leave what was queued to the writer task, started if need be.

        :returns: ``False`` when there is no writer task (outside ``async with conn``): the
            caller writes.
        """
        group, link = self.task_group, self._link
        if group is None:
            return False
        if not link.writer_running:
            link.writer_running = True
            group.start_soon(self._write_behind, name=f"stalk writer {link.address}")
        link.wakeup.set()
        return True

    def nudge_writer(self) -> None:
        """Have a running writer task write what the session owes (a sync caller's way)."""
        if self._link.writer_running:
            self._link.wakeup.set()

    async def _write_behind(self) -> None:
        """The writer task: ``Link.write_behind``, waking the waiters after each write.

        Whichever way it ends, every waiter is woken: the connection is closed or broken.
        """
        try:
            await self._link.write_behind(self.progress)
        finally:
            self.wake_all()  # the connection is broken or closed: the waiters raise it
