"""One channel of a connection, as the anyio layer keeps it: :class:`Inbox`.

Theory of operation
-------------------
Each channel, channel 0 included, has an :class:`Inbox`: the spacks the session delivered
for it and the application has not received yet, how each of its directions ended, and
the calls of :class:`~stalk.Channel` (channel 0's through the
:class:`~stalk.Connection`), which act through it. The sans-IO session makes every
protocol decision (states, credit, what goes on the wire); the inbox keeps what the
application has and has not seen.

**Receiving** takes the next spack from the inbox, waiting in the connection's
:class:`~stalk.shared_io.SharedIO` while it is empty (perhaps as the reader); channel 0,
its inbox empty, takes its spack from the session itself (``SharedIO.next_direct``, or
as the reader). **Sending** on channel 0, a reply or without the connection's tasks,
seals a small spack in one step as without channels (``Session.send_now``). **Credit**
goes back to the peer as the application receives a spack (``Session.release``), and the
WINDOW records that produces are written at once, as PONGs are: a channel that its
application does not read holds at most its window, and the peer stops sending on it,
and only on it.

**Sending** queues the spack; with the connection's writer task running (inside ``async
with conn``) ``send()`` wakes it and returns, else it writes what credit allows itself. A
reply (the channel's last receive had to wait) is written at once when no other write is
going on and no other task that the same input woke is still to run; the replies to a
burst of requests go out together instead, by the writer task or once 16 KiB of them wait.
Either way, while more than ``Config.send_buffer`` bytes of the channel wait (for the
writer, or for credit the peer has not granted), ``send()`` waits. Credit arrives only as
input, so a sender that waits may have to read: it waits like a ``receive()``.

**Ends.** A direction ends with its CLOSE: ours by ``send_eof()`` or ``aclose()``, the
peer's as an event. A RESET from the peer drops what the channel held and makes the
channel's calls raise :class:`~stalk.ChannelReset`; the answering RESET goes once the
application has seen that (or let go of the channel), so a peer that resets channels in a
loop holds at most ``max_channels`` of them. Once the application closed or reset the
channel, or both directions ended, the inbox leaves the dispatcher: what the peer still
sends on the channel is dropped, its credit given back. The connection's end (its CLOSE
either way, a failure) ends every channel with the connection's error.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final

import anyio
import anyio.lowlevel

from stalk.channels import ChannelState
from stalk.errors import ChannelClosed, ChannelReset, ConnectionLost, StalkError
from stalk.events import ChannelMessageReceived
from stalk.records import check_close
from stalk.shared_io import Waiter
from stalk.spack import Spack

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from stalk.dispatcher import Dispatcher

__all__ = ["Inbox"]

#: Replies queued together are written once they reach this many bytes, even while more are
#: coming: the peer starts on them while we produce the rest.
_REPLY_BATCH: Final = 16384
#: receive() lets other tasks run after this many spacks returned without waiting.
_YIELD_EVERY: Final = 512
_RESET_RECEIVED: Final = ChannelState.RESET_RECEIVED


class Inbox:
    """One channel of a connection: what it received, how it ended, and its calls.

    :param dispatcher: the channels of the connection.
    :param channel_id: the channel's id (0: the connection's own stream).
    """

    __slots__ = (
        "_answering",
        "_dispatcher",
        "_io",
        "_link",
        "_reset_seen",
        "_send_buffer",
        "_session",
        "_sizes",
        "_sleeper",
        "_streak",
        "_waiter",
        "closed",
        "eof",
        "id",
        "owed",
        "reset",
        "sent_eof",
        "spacks",
    )

    def __init__(self, dispatcher: Dispatcher, channel_id: int) -> None:
        self._dispatcher = dispatcher
        self._io = dispatcher.io
        self._link = dispatcher.link
        self._session = dispatcher.link.session
        self._send_buffer = dispatcher.link.config.send_buffer
        self.id = channel_id
        #: Spacks received and not yet returned, and beside them their sizes in data
        #: bytes (the credit each gives back once returned). Kept apart, not as their
        #: events: with many held (up to a window of small spacks), an object less each
        #: is a third less for the garbage collector to go through.
        self.spacks: deque[Spack] = deque()
        self._sizes: deque[int] = deque()
        #: The last spack taken owes the peer grants (write them with :meth:`write_owed`).
        self.owed = False
        #: The peer closed its direction (its CLOSE on the channel).
        self.eof = False
        #: The peer reset the channel: ``(code, reason)``.
        self.reset: tuple[int, str] | None = None
        # The application has seen the peer's reset (or let go of the channel): our
        # answering RESET is due.
        self._reset_seen = False
        #: We closed our direction (send_eof, or aclose).
        self.sent_eof = False
        #: We closed the channel (``"closed"``) or reset it (``"reset"``): any use raises.
        self.closed: str | None = None
        # The task waiting in receive(), if any; the waiter it sleeps on (one per inbox:
        # made at its first wait, kept for the next).
        self._waiter: Waiter | None = None
        self._sleeper: Waiter | None = None
        # Spacks receive() returned in a row without waiting.
        self._streak = 0
        # The last spack receive() returned had to wait: a send now is likely its reply.
        self._answering = False

    @property
    def held_bytes(self) -> int:
        """Data bytes of the spacks received and not yet returned."""
        return sum(self._sizes)

    # -- the peer's events (from the dispatcher) --------------------------------------

    def received(self, event: ChannelMessageReceived) -> None:
        """A spack arrived on the channel."""
        self.spacks.append(event.spack)
        self._sizes.append(event.size)
        self._io.held += 1
        if self._waiter is not None:
            self._io.delivered(self._waiter)

    def peer_closed(self) -> None:
        """The peer closed its direction."""
        self.eof = True
        if self._session.channel_state(self.id) is None:
            self._dispatcher.leave(self)  # ended both ways (our CLOSE went): nothing can come
        self._io.wake(self._waiter)

    def peer_reset(self, code: int, reason: str) -> None:
        """The peer reset the channel: nothing it held is delivered."""
        self._drop_spacks()
        self.reset = (code, reason)
        self._io.wake(self._waiter)
        self._io.progress()  # a sender waiting for its credit raises

    # -- receiving ----------------------------------------------------------------------

    # A receive is take_now(), which finds the spack waiting most of the time, else
    # receive_waiting(): no coroutine of its own for the common case (Channel.receive, and
    # Connection.receive for channel 0, take them in turn). Each spack handed over gives
    # its credit back at once; the grants that makes are written with write_owed(), as
    # PONGs are: nothing a cancellation could interrupt, so the spack is never lost.

    def take_now(self) -> Spack | None:
        """The next spack if one is here and nothing is in the way, taken, credit released.

        Channel 0 with its inbox empty takes it from what the session read, when no task
        reads (``SharedIO.next_direct``). The caller then calls :meth:`write_owed` if
        :attr:`owed` says so.
        """
        spacks = self.spacks
        if self.id and not spacks:
            return None  # (channel 0 may find its spack in the session)
        if self.closed is not None or self.reset is not None or self._streak >= _YIELD_EVERY:
            return None
        self._link.check_open()
        if spacks:
            return self._take(waited=False)
        if (event := self._io.next_direct()) is None:
            return None
        # (PONGs it owes go when the reader's way next needs input, as they do after a
        # batch the reader handed out.) It is handed over as _handed(size, waited=False)
        # does, in line: this is the way of most spacks channel 0 receives.
        self.owed = self._session.release(0, event.size)
        self._link.spacks_received += 1
        self._streak += 1
        self._answering = False
        return event.spack

    async def write_owed(self) -> None:
        """Write the grants (and any other record) the session owes, as PONGs are."""
        await self._io.write_owed()

    async def receive_waiting(self) -> Spack:
        """A receive after :meth:`take_now` found nothing to take: wait for the spack."""
        if self._streak >= _YIELD_EVERY:
            # A peer that sent many spacks at once must not keep a receive loop from ever
            # yielding (nothing is held yet, so a cancellation here loses nothing).
            self._streak = 0
            await anyio.lowlevel.checkpoint()
        io = self._io
        waited = False
        while True:
            self._link.check_open()
            if self.closed is not None or self.reset is not None:  # (else no problem)
                await self._check(sending=False)
            if self.spacks:
                spack = self._take(waited)
                if self.owed:
                    await self._io.write_owed()
                return spack
            if self.eof:
                raise anyio.EndOfStream
            if io.peer_close is not None:
                raise io.peer_close_error()
            waiter = self._sleeper
            if waiter is None:
                waiter = self._sleeper = io.new_waiter()
            self._waiter = waiter
            try:
                # Channel 0, its inbox empty, takes its next spack itself as the reader
                # while no other task reads. It is neither closed nor reset apart from the
                # connection: only input, or the connection's end, can end its wait.
                event = None if self.id else await io.read_direct(waiter)
                if event is None:
                    await io.until(self._receivable, waiter, input_only=not self.id)
            finally:
                self._waiter = None
            if event is not None:
                self._handed(event.size, waited=True)
                if self._session.has_output:  # the grant, and what else the batch owes
                    await io.write_owed()
                return event.spack
            waited = True

    def _receivable(self) -> bool:
        """Whether :meth:`receive_waiting` has something to return or raise."""
        return (
            bool(self.spacks)
            or self.eof
            or self.reset is not None
            or self.closed is not None
            or self._io.peer_close is not None
        )

    def _take(self, waited: bool) -> Spack:
        """Take the next spack, and give its credit back (:attr:`owed`: grants to write)."""
        spack = self.spacks.popleft()
        self._io.held -= 1
        self._handed(self._sizes.popleft(), waited)
        return spack

    def _handed(self, size: int, waited: bool) -> None:
        """A spack of ``size`` data bytes goes to the application: its credit goes back."""
        self.owed = self._session.release(self.id, size)
        self._link.spacks_received += 1
        self._streak = 0 if waited else self._streak + 1
        self._answering = waited

    # -- sending ------------------------------------------------------------------------

    def queue(self, item: Spack) -> bool:
        """Queue ``item`` without writing; see :meth:`stalk.Channel.queue`.

        :returns: ``False`` when the spack was dropped at once: the session has read the
            peer's RESET of the channel, and its event is still to be dispatched (the
            channel's unsent spacks go with it; the next call raises it).
        """
        link, session = self._link, self._session
        link.check_open()
        if self.closed is not None or self.reset is not None or self.sent_eof or session.close_sent:
            problem = self._problem(sending=True)  # (one of those four: never None here)
            if problem is not None:
                if self._sees(problem):
                    self._io.nudge_writer()  # the answering RESET goes with the next write
                raise problem
        if self.id and self._reset_unseen():
            return False
        session.queue(item, self.id)
        link.spacks_sent += 1
        return True

    # A send is three steps, so that the common one costs no coroutine of its own:
    # queue(); leave_to_writer(), which is all when it returns True; else write_queued().
    # (Channel.send and, for channel 0, Connection.send take them in turn.)

    async def raise_reset(self) -> None:
        """After :meth:`queue` dropped the spack: wait for the peer's RESET, and raise it."""
        await self._io.until(lambda: self.reset is not None, conditional=True)
        await self._check(sending=True)

    def _bound(self) -> int:
        """The bytes of the channel that may wait once send() returns.

        Without the connection's tasks (no ``async with``), nothing would write or read
        for a backlog: send() returns once its spack is written.
        """
        return self._send_buffer if self._io.task_group is not None else 0

    def leave_to_writer(self) -> bool:
        """After :meth:`queue`: leave what is queued to the writer task, if send() may return.

        :returns: ``False`` when the caller is to :meth:`write_queued`.
        """
        session, link, io = self._session, self._link, self._io
        answering, self._answering = self._answering, False
        # A reply (the last receive had to wait) is written at once when nothing else is
        # being written and no other task that input woke is still to run: latency
        # matters, and there is nothing to batch it with (as Connection.send does without
        # channels). The replies to a burst of requests are written together, by the last
        # of them or by the writer task.
        return (
            session.queued_bytes_on(self.id) <= self._bound()
            and not (
                answering
                and (not io.woken or session.queued_bytes >= _REPLY_BATCH)
                and not link.send_lock.locked()
            )
            and io.write_soon()
        )

    async def write_queued(self) -> None:
        """Write what is queued, then wait while more than the bound waits for credit."""
        if not await self._io.send_now(None):
            await self.keep_within_bound()

    def sends_now(self) -> bool:
        """Whether a send on channel 0 is written before it returns, by :meth:`send_now`.

        A reply (as :meth:`leave_to_writer` tells one) while the channel is open for
        sending; or any send without the connection's tasks.
        """
        link, io = self._link, self._io
        return (
            (
                (self._answering and not io.woken and not link.send_lock.locked())
                or io.task_group is None
            )
            and self.closed is None
            and not self.sent_eof
            and not self._session.close_sent
        )

    def send_now(self, item: Spack) -> Awaitable[bool]:
        """Channel 0, when :meth:`sends_now` says so: send ``item`` and write it at once.

        :meth:`queue` then :meth:`write_queued`, in one step: when nothing else waits to be
        sent and the credit covers it, the session seals a small spack at once
        (``Session.send_now``), as without channels. What to await (no coroutine of its
        own, on a reply's way): ``False`` when the caller is to :meth:`keep_within_bound`.
        """
        self._answering = False
        self._link.check_open()
        return self._io.send_now(item)

    async def keep_within_bound(self) -> None:
        """After a write that left some of what was queued: wait while it exceeds the bound."""
        if self._session.queued_bytes_on(self.id) > self._bound():
            await self._within_bound()

    async def _within_bound(self) -> None:
        """Wait until at most the bound of the channel waits for credit."""
        session, link, io = self._session, self._link, self._io
        bound = self._bound()
        await io.until(
            lambda: (
                # (a RESET read and not yet dispatched dropped the backlog: wait for it)
                (session.queued_bytes_on(self.id) <= bound and not self._reset_unseen())
                or self._problem(sending=True) is not None
                or io.peer_close is not None
            ),
            conditional=True,
        )
        await self._check(sending=True)
        if (left := session.queued_bytes_on(self.id)) > bound:  # the peer closed it all
            raise link.tag(
                ConnectionLost(
                    f"the peer closed the connection while {left} bytes of channel "
                    f"{self.id} waited for credit"
                )
            )

    # -- ending -------------------------------------------------------------------------

    async def send_eof(self) -> None:
        """Send the CLOSE of our direction (after what it queued)."""
        self._link.check_open()
        if self.sent_eof:
            return
        await self._check(sending=False)
        self._close_direction()
        await self._io.write_owed()

    def _close_direction(self) -> None:
        """Queue the channel's CLOSE if the session still has our direction open."""
        self.sent_eof = True
        session = self._session
        state = session.channel_state(self.id)
        if session.close_sent or state not in (ChannelState.OPEN, ChannelState.RECEIVE_CLOSED):
            return  # the connection's CLOSE ended it, or the channel is reset or ended
        session.close_channel(self.id)
        if self.eof:
            self._dispatcher.leave(self)  # both directions ended

    async def aclose(self) -> None:
        """Close the channel for the application; see :meth:`stalk.Channel.aclose`."""
        if self.closed is not None:
            return
        link = self._link
        if not link.closed and link.broken is None and not self.sent_eof and self.reset is None:
            self._close_direction()
        self.closed = "closed"
        self._forget()
        await self._io.write_owed()

    async def reset_channel(self, code: int, reason: str) -> None:
        """Reset the channel; see :meth:`stalk.Channel.reset`."""
        check_close(code, reason)
        if self.closed is not None:
            return
        self._link.check_open()
        session = self._session
        state = session.channel_state(self.id)
        self.closed = "reset"
        if state is ChannelState.RESET_RECEIVED:
            self._let_go()  # the peer reset it first: our RESET answers
        elif state is not None and not state.reset_by_us and not session.close_sent:
            session.reset_channel(self.id, code, reason)
        self._forget()
        await self._io.write_owed()

    def _forget(self) -> None:
        """The application let go of the channel: what it held goes back as credit.

        Its later events are dropped on arrival (their credit back too); its waiting
        task is woken to raise :class:`~stalk.ChannelClosed`.
        """
        self._drop_spacks()
        if self.reset is not None and not self._reset_seen:
            self._let_go()
        self._dispatcher.leave(self)
        self._io.wake(self._waiter)
        self._io.progress()

    def _drop_spacks(self) -> None:
        """Drop what the application has not received: its credit goes back."""
        for size in self._sizes:
            self._session.release(self.id, size)
        self._io.held -= len(self.spacks)
        self.spacks.clear()
        self._sizes.clear()

    # -- what a call raises --------------------------------------------------------------

    def _problem(self, *, sending: bool) -> StalkError | None:
        """The error a call on the channel raises now, if any.

        The connection's own state is checked apart (``Link.check_open``).
        """
        problem: StalkError
        if self.closed is not None:
            problem = ChannelClosed(f"channel {self.id} was {self.closed}")
        elif self.reset is not None:
            code, reason = self.reset
            problem = ChannelReset(f"the peer reset channel {self.id}", code=code, reason=reason)
        elif sending and self.sent_eof:
            problem = ChannelClosed(f"channel {self.id}: our direction was closed (send_eof)")
        elif sending:
            return self._dispatcher.closed_for_sending()
        else:
            return None
        return self._link.tag(problem)

    async def _check(self, *, sending: bool) -> None:
        """Raise :meth:`_problem`, the answering RESET written first if it is one."""
        problem = self._problem(sending=sending)
        if problem is None:
            return
        if self._sees(problem):
            await self._io.write_owed()
        raise problem

    def _sees(self, problem: StalkError) -> bool:
        """The application is about to see ``problem``: a reset it had not seen is let go.

        :returns: whether that made our answering RESET due.
        """
        if isinstance(problem, ChannelReset) and not self._reset_seen:
            self._let_go()
            return True
        return False

    def _let_go(self) -> None:
        """The application let go of the peer's reset: our answering RESET frees its slot."""
        self._reset_seen = True
        session = self._session
        if session.channel_state(self.id) is ChannelState.RESET_RECEIVED:
            session.release_channel(self.id)

    def _reset_unseen(self) -> bool:
        """Whether the session read the peer's RESET of the channel, not yet dispatched."""
        return (
            self.reset is None
            and self.id != 0
            and self._session.channel_state(self.id) is _RESET_RECEIVED
        )
