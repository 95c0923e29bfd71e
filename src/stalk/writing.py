"""Writing whole buffers to a byte stream: never half a frame, never longer than a deadline.

Theory of operation
-------------------
A :class:`~stalk.Connection` writes Noise frames. Two guarantees hold for every write:

- **Never half a frame.** A write that the caller's cancellation interrupts part-way would
  leave the peer misreading every later byte, so a write, once started, either completes
  or the connection is torn down.
- **Never longer than the deadline** (``Config.write_timeout``): a write that cannot finish
  because the peer stopped reading raises :class:`TimeoutError`, and the connection breaks.

The obvious way, a shielded cancel scope with a deadline around every write, costs more
than the rest of a small send (measured: 38 against 13 microseconds per 64-byte spack on
asyncio). Yet a write only needs either guarantee when it has to wait, and a write to a
socket whose kernel buffer has room never waits. So :class:`_SocketWriter`, used for
anyio's own socket streams, first offers the buffer to the kernel without waiting and
with no checkpoint before (nothing can interrupt it, so bytes the session handed out are
never dropped). Almost always the kernel takes it all; then there was nothing to shield
and nothing to time. Only a remainder (the socket buffer is full: the peer is slow) goes
the general way, :class:`Writer`: shielded, with the deadline; and so does, on asyncio,
a buffer larger than :data:`OFFER_MAX`, whose write is long beside the shield's cost
(measured; see there). Any other
byte stream (memory streams in tests, a stream a caller wrapped) always goes the general
way.

Each writer also carries its event loop's checkpoint (:attr:`Writer.checkpoint`): the
one ``anyio.lowlevel.checkpoint`` calls, looked up once per connection instead of on
every call (which asks sniffio which loop runs, a few Python calls per small send).

``tests/test_writing.py`` pins the stream traits each writer relies on.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream, SocketStream

__all__ = ["OFFER_MAX", "Writer", "anyio_socket", "closes_at_once", "writer_for"]

#: On asyncio, the largest buffer offered to the kernel first. A shield and a deadline
#: cost little beside a large write, and offering one first was slower: `stalk bench`
#: moved 1 MiB spacks batched two by two 18-30% slower, and 8 MiB spacks about 15%, when
#: the kernel took part of a 2 MiB buffer and the transport the rest (A/B, two runs each).
#: On trio the same limit made large spacks 5-10% slower, so trio offers every buffer.
OFFER_MAX: Final = 256 * 1024


class Writer:
    """Writes buffers whole to ``stream``, each within ``timeout`` seconds, shielded.

    :param stream: the byte stream; its errors (``OSError``, anyio's stream errors)
        propagate unchanged.
    :param timeout: the most one :meth:`write` may take.
    """

    __slots__ = ("_stream", "_timeout", "checkpoint")

    def __init__(self, stream: ByteStream, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout
        #: ``anyio.lowlevel.checkpoint``, or what it calls on the stream's event loop.
        self.checkpoint: Callable[[], Awaitable[None]] = anyio.lowlevel.checkpoint

    def write_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the stream takes without waiting; how many bytes that was.

        The general writer cannot tell, so it writes nothing (0).
        """
        return 0

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``, even if the caller is cancelled meanwhile.

        :raises TimeoutError: ``data`` was not all written within the timeout; the stream
            may hold part of it and must be closed.
        """
        deadline = anyio.current_time() + self._timeout
        with anyio.CancelScope(shield=True, deadline=deadline) as scope:
            # anyio types ``send`` as taking bytes; every byte stream accepts any bytes-like
            # object, and the caller never touches ``data`` again.
            await self._stream.send(cast("bytes", data))
        if scope.cancelled_caught:
            raise TimeoutError


class _SocketWriter(Writer):
    """For anyio's socket streams: offer the buffer to the kernel first, without waiting.

    :param try_send: writes what the socket takes at once without blocking and returns
        how many bytes that was (``BlockingIOError``: none).
    :param offer_max: the largest buffer offered first (``None``: any).
    """

    __slots__ = ("_offer_max", "_try_send")

    def __init__(
        self,
        stream: ByteStream,
        timeout: float,
        try_send: Callable[[bytes | bytearray | memoryview], int],
        checkpoint: Callable[[], Awaitable[None]],
        offer_max: int | None = None,
    ) -> None:
        super().__init__(stream, timeout)
        self._try_send = try_send
        self._offer_max = offer_max
        self.checkpoint = checkpoint

    def write_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Offer ``data`` to the kernel; how many bytes it took (0 if none).

        A buffer over ``offer_max`` is not offered (0): it goes the general way whole.
        """
        if self._offer_max is not None and len(data) > self._offer_max:
            return 0
        try:
            return self._try_send(data)
        except BlockingIOError:
            return 0

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data``: at once if the kernel takes it all, else as :class:`Writer` does.

        Nothing can interrupt the attempt (there is no checkpoint before it), so ``data``
        is never dropped: once the session has handed bytes out, they must go.
        """
        sent = self.write_nowait(data)
        if sent == len(data):
            await self.checkpoint()  # a cancellation takes effect after the write
            return
        await super().write(memoryview(data)[sent:])


def _fd_writer(sock: Any) -> Callable[[bytes | bytearray | memoryview], int]:
    """``os.write`` to the socket's current descriptor (-1 once closed: ``EBADF``)."""

    def try_send(data: bytes | bytearray | memoryview) -> int:
        return os.write(sock.fileno(), data)

    return try_send


#: The modules of anyio's own socket stream classes, by backend.
_ANYIO_SOCKET_MODULES: Final = {
    "anyio._backends._trio": "trio",
    "anyio._backends._asyncio": "asyncio",
}


def _anyio_socket_backend(stream: ByteStream) -> str | None:
    """``"trio"`` or ``"asyncio"`` for anyio's own socket streams, else ``None``.

    By class, never by duck typing: the traits relied on here are those of these classes.
    """
    if not isinstance(stream, SocketStream):
        return None
    return _ANYIO_SOCKET_MODULES.get(type(stream).__module__)


def anyio_socket(stream: ByteStream) -> socket.socket | None:
    """The socket under one of anyio's own socket streams; ``None`` for any other stream.

    Read from the stream's ``_raw_socket``, the property that anyio's ``SocketAttribute``
    getters read themselves, because ``stream.extra(SocketAttribute.raw_socket)`` builds
    the stream's whole attribute mapping (a ``getpeername()`` call included) on every
    call: about 10 microseconds, several times per connection.
    """
    if _anyio_socket_backend(stream) is None:
        return None
    return cast("SocketStream", stream)._raw_socket


def closes_at_once(stream: ByteStream) -> bool:
    """Whether ``stream.aclose()`` closes before it first waits: anyio's socket streams.

    Those need no cancelled scope around ``aclose()`` to close without waiting (anyio's
    ``aclose_forcefully``, whose cancellation costs more than the close itself).
    """
    return _anyio_socket_backend(stream) is not None


def writer_for(stream: ByteStream, timeout: float) -> Writer:
    """The cheapest :class:`Writer` that keeps both guarantees for ``stream``.

    The fast writer is chosen only for anyio's own socket stream classes, whose behaviour
    it relies on (``tests/test_writing.py`` pins it): a stream that buffered writes itself
    would have its bytes overtaken.

    - trio: the stream is a non-blocking socket with no buffer of its own.
    - asyncio (a selector loop, not Windows): the transport buffers what the kernel does not
      take, but anyio's ``send`` returns only once that buffer is empty, and every write
      that can leave a remainder in it is shielded here; so the buffer is always empty
      when a write starts, and writing to the descriptor directly keeps the byte order.
    """
    backend = _anyio_socket_backend(stream)
    sock = anyio_socket(stream)
    if backend == "trio" and isinstance(sock, socket.socket) and sock.gettimeout() == 0.0:
        import trio.lowlevel  # noqa: PLC0415 - anyio's trio streams exist only with trio

        return _SocketWriter(stream, timeout, sock.send, trio.lowlevel.checkpoint)
    if backend == "asyncio" and sock is not None and sys.platform != "win32":
        import asyncio  # noqa: PLC0415 - loaded already: the stream is asyncio's

        # anyio's checkpoint on asyncio: ``asyncio.sleep(0)``, one pass of the event loop.
        checkpoint = functools.partial(asyncio.sleep, 0)
        return _SocketWriter(stream, timeout, _fd_writer(sock), checkpoint, offer_max=OFFER_MAX)
    return Writer(stream, timeout)
