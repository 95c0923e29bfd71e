"""A channel of a connection: :class:`Channel`, the spack stream the application uses.

A connection that negotiated channels (SPEC "Channels"; both sides set
``Config.max_channels``) carries many spack streams besides its own (channel 0). Each is a
:class:`Channel`, a thin face over the anyio layer beneath it, split by job:
:mod:`stalk.dispatcher` (the channels of one connection: the session's events to their
channels, opening, accepting, handlers), :mod:`stalk.inbox` (one channel's receive,
send and ends) and :mod:`stalk.shared_io` (one reader of the transport at a time for all
their tasks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import anyio
from anyio.abc import ObjectStream

from stalk.errors import StalkError
from stalk.spack import Spack
from stalk.wire import CloseCode

if TYPE_CHECKING:
    from stalk.connection import Connection
    from stalk.dispatcher import Dispatcher
    from stalk.inbox import Inbox

__all__ = ["INTERNAL_ERROR_REASON", "Channel", "ChannelHandler"]

#: The reason of every CLOSE or RESET with INTERNAL_ERROR we send for an exception of our
#: own (a handler's, an ``async with`` body's): what failed is logged locally, never told
#: to the peer, which has no business knowing our code's class names or messages.
INTERNAL_ERROR_REASON: Final = "internal error"

#: ``async def handler(channel)``: serves one channel the peer opened (see ``listen``).
ChannelHandler: TypeAlias = Callable[["Channel"], Awaitable[None]]


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

    def __init__(self, dispatcher: Dispatcher, inbox: Inbox) -> None:
        self._dispatcher = dispatcher
        self._inbox = inbox
        self._receiving = False  # a receive() is running (a second one is refused)

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
        self._inbox.queue(item)

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
        inbox = self._inbox
        if not inbox.queue(item):
            await inbox.raise_reset()
        if not inbox.leave_to_writer():
            await inbox.write_queued()

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
        if self._receiving:
            raise anyio.BusyResourceError("receiving from")
        self._receiving = True
        try:
            inbox = self._inbox
            spack = inbox.take_now()
            if spack is None:
                return await inbox.receive_waiting()
            if inbox.owed:
                await inbox.write_owed()
            return spack
        finally:
            self._receiving = False

    async def send_eof(self) -> None:
        """Close our direction (the channel's CLOSE, after what it queued); receive goes on.

        :raises ~stalk.ChannelReset: the peer reset the channel.
        :raises ~stalk.ChannelClosed: we closed or reset the channel.
        :raises ~stalk.ConnectionLost: the connection broke.
        """
        await self._inbox.send_eof()

    async def aclose(self) -> None:
        """Close the channel: CLOSE our direction (after what it queued), stop receiving.

        A channel the peer already closed ends; spacks the peer still sends on one it has
        not closed are dropped (use :meth:`reset` to tell the peer to stop). A channel the
        peer reset is let go. Idempotent; never raises for the connection's state.
        """
        await self._inbox.aclose()

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
        await self._inbox.reset_channel(code, reason)

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
