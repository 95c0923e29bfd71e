"""The channels of one connection: :class:`Dispatcher`.

Theory of operation
-------------------
A connection that negotiated channels (SPEC "Channels"; both sides set
``Config.max_channels``) carries many spack streams: channel 0, which the
:class:`~stalk.Connection` itself sends and receives on as without channels, and the
channels either side opens, each a :class:`~stalk.Channel`. One :class:`Dispatcher` per
such connection holds them, between the application and the connection's
:class:`~stalk.link.Link`; the sans-IO session makes every protocol decision (ids,
states, credit, fairness), as everywhere. The work is split by job:

- the dispatcher: each of the session's events put in its channel's
  :class:`~stalk.inbox.Inbox`; the channels opened (``open_channel``, within the peer's
  limit), accepted (``accept_channel``) or handed to the ``channel_handler``, each in a
  task of the connection's task group; the connection's life (its tasks, draining what
  is queued before its CLOSE, its end);
- :mod:`stalk.inbox`: one channel's calls: receive, send with its backlog, its ends;
- :mod:`stalk.shared_io`: the transport shared by all their tasks: one reader at a time,
  the others waiting to be woken, the connection's reader and writer tasks.

An event reaches its inbox with no await in between, so no cancellation loses one. A
channel the peer opens keeps its place in our ``max_channels`` until it ends, one the peer
reset until the application let go of it: so a peer that opens and resets channels in a
loop has at most that many in hand, and without a handler or ``accept_channel()`` calls
it can open no more than that. The connection's end (its CLOSE either way, a failure)
ends every channel with the connection's error: every waiting task is woken to raise it.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from stalk import _logs
from stalk.channel import INTERNAL_ERROR_REASON, Channel, ChannelHandler
from stalk.channels import ChannelState
from stalk.errors import (
    ChannelLimitReached,
    ConnectionClosed,
    ConnectionLost,
    LocalProtocolError,
    StalkError,
)
from stalk.events import (
    ChannelCloseReceived,
    ChannelMessageReceived,
    ChannelOpened,
    ChannelResetReceived,
    Event,
)
from stalk.inbox import Inbox
from stalk.link import Link, address_text
from stalk.shared_io import SharedIO, Waiter
from stalk.wire import CloseCode

if TYPE_CHECKING:
    from stalk.connection import Connection

__all__ = ["Dispatcher"]

logger = _logs.CONNECTION


class Dispatcher:
    """The channels of one connection; see the module's theory of operation.

    :param link: the connection's link (its session has channels).
    :param connection: the connection, for its attributes and the peer's name.
    :param handler: run for every channel the peer opens, in the connection's task group;
        ``None``: such channels wait for :meth:`accept`.
    """

    def __init__(self, link: Link, connection: Connection, handler: ChannelHandler | None) -> None:
        self.link = link
        self._session = link.session
        self.connection = connection
        self._handler = handler
        #: The transport, as the channels' tasks share it.
        self.io = SharedIO(link, self._dispatch)
        #: Channel 0: the connection's own stream.
        self.channel0 = Inbox(self, 0)
        # The inboxes events may still arrive for: an inbox leaves when no more can (its
        # channel ended), or when the application closed or reset it (its events are then
        # dropped, their credit given back).
        self._inboxes: dict[int, Inbox] = {0: self.channel0}
        self._opened: deque[Inbox] = deque()  # opened by the peer, not yet accepted
        self._accept_waiter: Waiter | None = None

    # -- the connection's life ------------------------------------------------------------

    def start(self, task_group: TaskGroup) -> None:
        """The connection entered ``async with``: its reader, writer and handlers run in it."""
        self.io.start(task_group)
        if self._handler is not None:
            while self._opened:
                self._spawn(self._opened.popleft())

    def stop(self) -> None:
        """The connection's task group is ending."""
        self.io.stop()

    def ended(self) -> None:
        """The connection was closed or broke: every waiting task raises its error."""
        self.io.wake_all()

    async def drain(self, timeout: float | None) -> None:
        """Before the connection's CLOSE: send what is queued, reading for credit.

        The session sends its CLOSE only after every spack queued before it, some of which
        may wait for credit; this waits for them, within ``timeout`` seconds (shielded, as
        the CLOSE's own write is) or, with ``None``, as long as it takes.
        """
        session, link, io = self._session, self.link, self.io
        if not session.unsent or link.closed or link.broken is not None or session.close_sent:
            return

        async def sent() -> None:
            session.flush()
            await io.write()
            await io.until(
                lambda: not session.unsent or io.peer_close is not None, conditional=True
            )

        if timeout is None:
            await sent()
            return
        with anyio.move_on_after(timeout, shield=True), contextlib.suppress(StalkError):
            await sent()

    def closed_for_sending(self) -> StalkError | None:
        """The error a call that sends raises once our CLOSE of the connection is queued."""
        if self._session.close_sent:
            return self.link.tag(ConnectionClosed("the connection was closed for sending"))
        return None

    async def flush(self) -> None:
        """Write everything queued that credit allows; see :meth:`stalk.Channel.flush`."""
        self.link.check_open()
        self._session.flush()
        await self.io.write()

    # -- the session's events -------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        """Put one event of the session in its channel's inbox (the inbox wakes its task)."""
        session = self._session
        if type(event) is ChannelMessageReceived:
            inbox = self._inboxes.get(event.channel)
            if inbox is not None:
                inbox.received(event)
            else:  # closed or reset by the application: dropped, credit back
                session.release(event.channel, event.size)
        elif isinstance(event, ChannelOpened):
            inbox = self._inboxes[event.channel] = Inbox(self, event.channel)
            if self._handler is not None and self.io.task_group is not None:
                self._spawn(inbox)
            else:
                self._opened.append(inbox)
                self.io.wake(self._accept_waiter)
        elif isinstance(event, ChannelCloseReceived):
            inbox = self._inboxes.get(event.channel)
            if inbox is not None:
                inbox.peer_closed()
        elif isinstance(event, ChannelResetReceived):
            inbox = self._inboxes.pop(event.channel, None)
            if inbox is not None:
                inbox.peer_reset(event.code, event.reason)
            elif session.channel_state(event.channel) is ChannelState.RESET_RECEIVED:
                session.release_channel(event.channel)  # the application let go: answer now
        # PongReceived (answers to keepalive PINGs) needs nothing.

    def leave(self, inbox: Inbox) -> None:
        """``inbox`` needs no more events: those still coming for its channel are dropped."""
        self._inboxes.pop(inbox.id, None)

    # -- opening ------------------------------------------------------------------------

    async def open(self, *, wait: bool) -> Channel:
        """A new channel of ours (see :meth:`stalk.Connection.open_channel`)."""
        session, link, io = self._session, self.link, self.io
        link.check_open()
        if not session.can_open_channel:
            limit = session.peer_channels.max_channels if session.peer_channels else 0
            if not wait or not limit:
                raise link.tag(
                    ChannelLimitReached(
                        f"the peer accepts at most {limit} open channels of ours at once"
                    )
                )
            await io.until(
                lambda: session.can_open_channel or session.close_sent or io.peer_close is not None,
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
        if (problem := self.closed_for_sending()) is not None:
            raise problem
        inbox = Inbox(self, session.open_channel())
        self._inboxes[inbox.id] = inbox
        return Channel(self, inbox)

    async def accept(self) -> Channel:
        """The next channel the peer opened (see :meth:`stalk.Connection.accept_channel`)."""
        io = self.io
        self.link.check_open()
        if self._handler is not None:
            raise LocalProtocolError("the peer's channels go to the channel handler")
        if self._accept_waiter is not None:
            raise anyio.BusyResourceError("accepting channels from")
        opened = self._opened
        if not opened:
            waiter = self._accept_waiter = io.new_waiter()
            try:
                await io.until(lambda: bool(opened) or io.peer_close is not None, waiter)
            finally:
                self._accept_waiter = None
        if opened:
            return Channel(self, opened.popleft())
        raise io.peer_close_error()

    def _spawn(self, inbox: Inbox) -> None:
        group = self.io.task_group
        if group is not None:
            group.start_soon(self._run_handler, inbox, name=f"stalk channel {inbox.id}")

    async def _run_handler(self, inbox: Inbox) -> None:
        """Run the channel handler: close the channel when it returns, reset it if it raises.

        An exception that only says the channel or the connection ended under the handler
        (the peer reset the channel; the connection closed or broke) is not the handler's
        bug: it is logged at DEBUG. Any other is logged with its traceback, and the channel
        is reset with INTERNAL_ERROR and a fixed reason (the peer learns nothing of it).
        """
        handler = self._handler
        if handler is None:  # pragma: no cover - spawned only with a handler
            return
        try:
            await handler(Channel(self, inbox))
        except Exception as exc:
            link = self.link
            ended = link.closed or link.broken is not None or inbox.reset is not None
            if isinstance(exc, ConnectionLost) or (isinstance(exc, StalkError) and ended):
                logger.debug("channel handler for channel %d ended by %r", inbox.id, exc)
            else:
                logger.exception(
                    "channel handler for channel %d of %s at %s raised",
                    inbox.id,
                    self.connection.peer.fingerprint,
                    address_text(link.address),
                )
                with contextlib.suppress(StalkError):
                    await inbox.reset_channel(CloseCode.INTERNAL_ERROR, INTERNAL_ERROR_REASON)
                return
        await inbox.aclose()
