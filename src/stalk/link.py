"""A connection's side of the byte stream: every read and write of the transport.

Theory of operation
-------------------
A :class:`Link` is the anyio half of a :class:`~stalk.Connection`, the way anyio's
``TLSStream`` pairs an SSL object with a transport stream: the Connection decides what to
send and receive (its public API, the handshake's flow); the link moves the session's
bytes to and from the transport and owns everything that touches it:

- **Writing**: one lock (``send_lock``) orders every write, so the bytes on the wire are
  in the order the session encrypted them (nonce order); each buffer goes through the one
  :class:`~stalk.writing.Writer` (whole despite cancellation, within ``write_timeout``).
  The writer task (``write_behind``) batches what senders queued; PONGs and keepalive
  PINGs the receive path produced are written without ever waiting for the lock
  (``write_pong``).
- **Reading**: ``receive_into_session`` feeds the session, under the idle timer when
  ``Config.idle_timeout`` is set (:mod:`stalk.keepalive`: keepalive PING, then TIMEOUT).
- **Failure and teardown**: any protocol or transport error is terminal. ``fail`` marks
  the link broken, writes the session's error CLOSE when asked (and lingers so that the
  peer can read it), and closes the transport; errors are tagged with the peer's address
  and raised as anyio's stream errors where they map to one.
- **A connection's record**: the link counts the spacks each way (the session counts the
  bytes and rekeys), and logs the connection's end once, when the transport is closed:
  who, where, how long, how it ended and what it carried (``stalk.connection``, INFO).

The link makes no protocol decision: the session (sans-IO) makes them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Final, cast

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream, SocketAttribute

from stalk import _logs
from stalk.config import Config
from stalk.errors import (
    ChannelReset,
    ConnectionClosed,
    ConnectionLost,
    HandshakeFailed,
    IdleTimeout,
    ProtocolError,
    StalkError,
)
from stalk.keepalive import IdleTimer
from stalk.session import Role, Session
from stalk.spack import Spack
from stalk.wire import CloseCode, close_code_name
from stalk.writing import anyio_socket, closes_at_once, writer_for

__all__ = [
    "Link",
    "address_text",
    "format_address",
    "remote_address",
    "stream_error",
    "unix_text",
]

logger = _logs.CONNECTION

#: After our error CLOSE, the most we read and discard, and for how long, waiting for the
#: peer to close too (SPEC "Resource model"): see :meth:`Link.linger`.
_LINGER_BYTES = 1024 * 1024
_LINGER_SECONDS = 1.0


#: The anyio stream error each of these stalk errors also is when a Connection raises it.
_ANYIO_ERRORS: Final[tuple[tuple[type[StalkError], type[Exception]], ...]] = (
    (ConnectionLost, anyio.BrokenResourceError),
    (ConnectionClosed, anyio.ClosedResourceError),
    (ChannelReset, anyio.BrokenResourceError),
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


def remote_address(transport: ByteStream) -> tuple[str, int] | str | None:
    """Where the peer of ``transport`` is, as logs and errors name it.

    ``(host, port)`` over IP; a unix socket's path (Linux's abstract names start with
    ``"\\0"``): the peer's if it has one (the listener's, on the client side), else our own
    (the listener's, on the server side: clients are usually unnamed); ``None`` for a
    transport that is not a socket (memory streams, say).
    """
    sock = anyio_socket(transport)
    if sock is None:
        remote = transport.extra(SocketAttribute.remote_address, None)
    else:  # the same values, without building the stream's attribute mapping
        try:
            remote = sock.getpeername()
        except OSError:
            remote = None
    if isinstance(remote, tuple) and len(remote) >= 2:
        return _host(remote), int(remote[1])
    if isinstance(remote, (str, bytes)):
        path = os.fsdecode(remote)
        if not path:
            local = _local_address(transport, sock)
            path = os.fsdecode(local) if isinstance(local, (str, bytes)) else ""
        return path or None
    return None


def _host(address: tuple[object, ...]) -> str:
    """The host of a socket address, an IPv6 scope appended as ``SocketAttribute`` does."""
    host = str(address[0])
    if len(address) == 4 and address[3]:  # (host, port, flowinfo, scope_id)
        return f"{host.partition('%')[0]}%{address[3]}"
    return host


def _local_address(transport: ByteStream, sock: socket.socket | None) -> object:
    """Our own end's address: the socket's name, or the stream's ``local_address``."""
    if sock is None:
        return transport.extra(SocketAttribute.local_address, "")
    try:
        return sock.getsockname()
    except OSError:
        return ""


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:7413``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unix_text(path: str) -> str:
    """A unix socket's path as messages show it: ``unix:/run/app.sock``.

    An abstract name (Linux: it starts with NUL) is written ``unix:@name``. Characters
    ``str.isprintable()`` refuses are written as ``repr()`` escapes: a peer may name its
    own socket, so the text cannot forge a log line.
    """
    if path.startswith("\0"):
        path = "@" + path[1:]
    if not path.isprintable():
        path = "".join(char if char.isprintable() else repr(char)[1:-1] for char in path)
    return f"unix:{path}"


def address_text(address: tuple[str, int] | str | None) -> str:
    """An address as messages show it: ``host:port``, ``unix:PATH``, or ``stream`` for none."""
    if address is None:
        return "stream"
    if isinstance(address, str):
        return unix_text(address)
    return format_address(*address)


def _failure_text(exc: StalkError) -> str:
    """How a connection broken by ``exc`` ended, for its last log line."""
    if isinstance(exc, IdleTimeout):
        return f"idle timeout (TIMEOUT): {exc}"
    if isinstance(exc, ProtocolError):  # the code is that of the error CLOSE we sent
        return f"the peer broke the protocol ({close_code_name(exc.close_code)}): {exc}"
    if isinstance(exc, ConnectionLost):
        return f"lost: {exc}"  # truncated (EOF or reset without CLOSE), a write failed
    return f"failed: {exc}"


class Link:
    """The transport side of one connection: reads, writes, failure and teardown.

    :param transport: the byte stream (TCP in practice, memory streams in tests).
    :param session: the connection's sans-IO session.
    :param config: timeouts and limits.
    """

    def __init__(self, transport: ByteStream, session: Session, config: Config) -> None:
        self.transport = transport
        self.session = session
        self.config = config
        self._peer_address: tuple[str, int] | str | bool | None = False  # False: not yet
        # fast_acquire: taking a free lock costs no event-loop pass (one per send otherwise).
        self.send_lock = anyio.Lock(fast_acquire=True)
        self.writer = writer_for(transport, config.write_timeout)
        self.closed = False
        self.broken: StalkError | None = None
        #: Whether the writer task runs (or was started), and its wake-up call.
        self.writer_running = False
        self.wakeup = anyio.Event()
        #: Config.idle_timeout's timer of the reads, if set.
        self._idle = (
            None
            if config.idle_timeout is None
            else IdleTimer(transport, session, config.idle_timeout)
        )
        #: Spacks handed to the session to send, and returned by receive(): counted by the
        #: Connection where each one passes anyway (the session counts bytes and rekeys).
        self.spacks_sent = 0
        self.spacks_received = 0
        #: Set by establish(): seconds the handshake took, and when it completed
        #: (time.monotonic()); ``None`` until then.
        self.handshake_seconds: float | None = None
        self.established_at: float | None = None
        #: How we closed: (code, reason sent, what the log says instead of the reason).
        self.closed_with: tuple[int, str, str | None] | None = None
        #: The peer's CLOSE arrived before we sent ours (set when receive() sees it).
        self.peer_closed_first = False
        self._end_logged = False

    @property
    def address(self) -> tuple[str, int] | str | None:
        """Where the peer is (:func:`remote_address`), looked up on first use.

        Most connections never need it.
        """
        address = self._peer_address
        if address is False:
            address = self._peer_address = remote_address(self.transport)
        return cast("tuple[str, int] | str | None", address)

    def check_open(self) -> None:
        """Raise the typed error if the connection was closed or is broken."""
        if self.closed:
            raise self.tag(ConnectionClosed("the connection is closed"))
        if self.broken is not None:
            raise self.tag(ConnectionLost(f"the connection is broken: {self.broken}"))

    async def write_handshake(self) -> None:
        """Write handshake output directly: no shield or per-write deadline is needed here.

        A handshake interrupted in any way is abandoned whole (the transport is closed), so
        a half-written frame can never be misread, and ``handshake_timeout`` bounds it all.
        """
        while data := self.session.data_to_send():
            try:
                sent = self.writer.write_nowait(data)
                if sent < len(data):
                    await self.transport.send(cast("bytes", memoryview(data)[sent:]))
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise HandshakeFailed(f"connection lost during the handshake: {exc!r}") from exc

    async def write_behind(self, wrote: Callable[[], None] | None = None) -> None:
        """The writer task: write whatever senders queued, batched, until cancelled.

        :param wrote: called after each write (with channels: wakes the tasks it may
            concern).
        """
        self.writer_running = True
        try:
            while True:
                await self.wakeup.wait()
                self.wakeup = anyio.Event()
                async with self.send_lock:
                    if self.closed or self.broken is not None:
                        return
                    self.session.flush()
                    await self.write_pending()
                if wrote is not None:
                    wrote()
        except StalkError:
            return  # the connection is broken or closed; the next call reports it
        finally:
            self.writer_running = False

    async def write_pending(self) -> None:
        """Write what the session has for the transport (each buffer whole, in time).

        Callers hold ``send_lock`` (or are the only task, during the handshake).
        """
        # Loop: the receive path may encrypt a PONG while we write; it leaves it to us.
        while data := self.session.data_to_send():
            await self.write_chunk(data)

    async def write_all(self) -> None:
        """Write everything the session has for the transport; the caller holds no lock.

        When no other task is writing, each buffer is first offered to the kernel without
        taking the lock: nothing here waits before the kernel has taken it all, so no
        other write can come between (the lock orders writes that wait). Only a buffer the
        kernel does not take whole makes this take the lock, for the rest of it.
        """
        lock = self.send_lock
        if lock.locked():
            async with lock:
                self.check_open()
                await self.write_pending()
            return
        try:
            rest = self.offer_pending()
        except OSError as exc:
            raise await self._write_failed(exc) from exc
        await self._write_rest(rest)

    async def send_now(self, spack: Spack | None, *, flush: bool = False) -> bool:
        """Send ``spack`` (``flush``: what is queued), write it all; the caller holds no lock.

        As ``session.send(spack)`` (or ``session.flush()``) then :meth:`write_all`. When no
        other task is writing, the session seals the frame at once (``Session.send_now``,
        ``Session.flush_now``) and it is offered to the kernel there and then. Never while
        another task writes: that task writes what the session seals meanwhile, and a
        frame held here would be overtaken. One method for both, written out in full: it
        is the path of every send without a writer task, where a call more shows.

        :returns: whether the session sealed the frame at once and the kernel took it
            whole: then nothing the call queued is left (with channels, nothing waits for
            credit).
        """
        session = self.session
        lock = self.send_lock
        if lock.locked():
            if flush:
                session.flush()
            else:
                session.send(cast("Spack", spack))  # a non-Spack is refused there
                self.spacks_sent += 1
            async with lock:
                self.check_open()
                await self.write_pending()
            return False
        if flush:
            frame = session.flush_now()
        else:
            frame = session.send_now(cast("Spack", spack))  # a non-Spack is refused there
            self.spacks_sent += 1
        if frame is None:
            await self.write_all()
            return False
        try:
            sent = self.writer.write_nowait(frame)
        except OSError as exc:
            raise await self._write_failed(exc) from exc
        if sent == len(frame):  # the common case, in short
            await self.writer.checkpoint()  # a cancellation takes effect after the write
            return True
        await self._write_rest(memoryview(frame)[sent:])
        return False

    async def _write_rest(self, rest: memoryview | None) -> None:
        """After an offer to the kernel: write what it did not take, then what follows.

        Under the lock, which is free (nothing waited since the offer), so the rest goes
        before anything another task writes.
        """
        if rest is not None:
            self.send_lock.acquire_nowait()
            try:
                await self.write_chunk(rest)
                await self.write_pending()
            finally:
                self.send_lock.release()
        await self.writer.checkpoint()  # a cancellation takes effect after the writes

    def offer_pending(self) -> memoryview | None:
        """Offer what the session has to the kernel, without waiting; what it did not take.

        ``None`` when the kernel took everything; else the rest of the buffer it stopped
        in, which the caller must write (with the lock) before anything else.

        :raises OSError: the write failed.
        """
        while data := self.session.data_to_send():
            sent = self.writer.write_nowait(data)
            if sent < len(data):
                return memoryview(data)[sent:]
        return None

    async def write_closing(self, close: Callable[[], None]) -> None:
        """Queue the session's CLOSE (``close()``) and write it; errors are dropped.

        Within ``close_timeout`` and shielded, like every write that must wait: with the
        lock free and the kernel taking it all at once, nothing waits and no cancel scope
        is entered (most connections end this way).
        """
        lock = self.send_lock
        if lock.locked():
            with (
                anyio.move_on_after(self.config.close_timeout, shield=True),
                contextlib.suppress(StalkError),
            ):
                async with lock:
                    close()
                    await self.write_pending()
            return
        try:
            close()
            rest = self.offer_pending()
        except (StalkError, OSError):
            return
        if rest is None:
            return
        lock.acquire_nowait()  # free: nothing waited since locked() said so
        try:
            with (
                anyio.move_on_after(self.config.close_timeout, shield=True),
                contextlib.suppress(StalkError),
            ):
                await self.write_chunk(rest)
                await self.write_pending()
        finally:
            lock.release()

    async def write_chunk(self, data: bytes | bytearray | memoryview) -> None:
        """Write one buffer: whole even if cancelled, bounded by write_timeout (writing.py)."""
        try:
            await self.writer.write(data)
        except TimeoutError:
            raise await self.fail(
                ConnectionLost(f"a write did not complete within {self.config.write_timeout} s")
            ) from None
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise await self._write_failed(exc) from exc

    async def _write_failed(self, exc: Exception) -> StalkError:
        """The error for a write the transport refused (closed by us, or broken)."""
        if self.closed or isinstance(exc, anyio.ClosedResourceError):
            return self.closed_error()
        return await self.fail(ConnectionLost(f"write failed: {exc!r}"))

    async def write_best_effort(self) -> None:
        """Write an error CLOSE or refusal if no other task is writing (bounded, shielded).

        While a sender holds the lock it is blocked writing; the caller is about to tear
        the connection down, which ends that write, so the CLOSE is simply not sent.
        """
        if self.send_lock.locked():
            return
        with (
            anyio.move_on_after(self.config.close_timeout, shield=True),
            contextlib.suppress(StalkError),
        ):
            async with self.send_lock:
                await self.write_pending()

    async def write_pong(self) -> None:
        """Get what the receive path encrypted (a PONG, a keepalive PING) written.

        ``receive()`` may hold a spack it is about to return, so nothing here may be
        interrupted by cancellation (no event is ever lost): the writer task is only woken,
        and a direct write happens only when the lock is free, shielded (and bounded by
        write_timeout). If a sender holds the lock, it writes this before releasing it (see
        write_pending); waiting for the lock here could deadlock with a peer blocked
        writing to us.
        """
        if self.writer_running:
            self.wakeup.set()
        elif not self.send_lock.locked():
            with anyio.CancelScope(shield=True), contextlib.suppress(StalkError):
                async with self.send_lock:
                    await self.write_pending()

    async def resume_reading(self) -> None:
        """The session paused reading (PAUSED): let it read again.

        When it paused because the peer made us owe answers beyond the bound, those answers
        must reach the socket first: wait for the send lock and write them. A peer that
        does not read its PONGs thus stops being read (TCP carries the backpressure back to
        it) until write_timeout breaks the connection. Otherwise it paused after a bounded
        step of work: just let other tasks run. No event is held here, so cancellation is
        harmless.
        """
        if not self.session.has_output:
            await anyio.lowlevel.checkpoint()
            return
        async with self.send_lock:
            self.check_open()
            await self.write_pending()

    async def receive_into_session(self, *, handshake: bool = False) -> None:
        """Read once from the transport into the session (EOF included).

        :param handshake: any transport failure is then a failed handshake, and the idle
            timer does not run (``handshake_timeout`` bounds the handshake).
        """
        idle = None if handshake else self._idle
        try:
            if idle is None:
                data: bytes | None = await self.transport.receive(self.config.read_size)
            else:
                data = await idle.receive(self.config.read_size, self.write_pong)
        except anyio.EndOfStream:
            self.session.receive_data(b"")
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            if handshake:  # whatever cut it, the handshake failed
                raise HandshakeFailed(f"connection lost during the handshake: {exc!r}") from exc
            if isinstance(exc, anyio.ClosedResourceError):
                raise self.closed_error() from exc
            raise await self.fail(ConnectionLost(f"connection lost: {exc!r}")) from exc
        else:
            if data is None:  # the idle timer's verdict: the peer is gone
                raise await self._idle_timeout(idle.waited if idle is not None else 0.0)
            self.session.receive_data(data)

    async def _idle_timeout(self, waited: float) -> StalkError:
        """Close with TIMEOUT (best effort, never waiting for a blocked sender); the error."""
        if self.broken is None and not self.closed:
            self.session.close(CloseCode.TIMEOUT, "idle timeout")
            await self.write_best_effort()
        return await self.fail(
            IdleTimeout(
                f"the peer sent nothing during {waited:g} s of waiting and did not "
                "answer a keepalive PING"
            )
        )

    async def abort(self) -> None:
        """Close the transport without waiting on anything (even if we are cancelled).

        The first call after the handshake logs the connection's end.
        """
        if not self._end_logged and self.established_at is not None:
            self._end_logged = True
            if logger.isEnabledFor(logging.INFO):
                self._log_end()
        if closes_at_once(self.transport):
            await self.transport.aclose()
        else:
            await anyio.aclose_forcefully(self.transport)

    def closed_error(self) -> StalkError:
        """The error for a transport found closed: by our aclose(), or by a failure."""
        if self.broken is not None:
            return self.tag(ConnectionLost(f"the connection is broken: {self.broken}"))
        return self.tag(ConnectionClosed("the connection is closed"))

    def tag(self, exc: StalkError) -> StalkError:
        """``exc`` with the peer's address, as anyio's stream error where it maps to one."""
        exc.peer_address = self.address
        return stream_error(exc)

    async def fail(self, exc: StalkError, *, close: bool = False) -> StalkError:
        """Mark the connection broken by ``exc``, close the transport, return ``exc``.

        :param close: the session failed and queued an error CLOSE: write it first (if no
            other task is writing), and give the peer time to read it (:meth:`linger`).
        """
        self.tag(exc)
        if self.broken is None and not self.closed:
            self.broken = exc  # from here on no other task starts a write
        try:
            if close and not self.send_lock.locked():
                async with self.send_lock:
                    with contextlib.suppress(StalkError):
                        with anyio.move_on_after(self.config.close_timeout, shield=True):
                            await self.write_pending()
                        await self.linger()
        finally:
            await self.abort()
        return exc

    async def linger(self) -> None:
        """After our error CLOSE: stop writing, and give the peer time to read it.

        Closing a socket with unread bytes makes TCP reset the connection, and the reset can
        destroy our CLOSE before the peer reads it: a peer in the middle of a large send
        would see a cut connection instead of why (HTTP servers linger for the same
        reason). So for ``_LINGER_SECONDS`` at most, or until the peer closes too, we read
        and discard what it still sends, up to ``_LINGER_BYTES``; past that, TCP's flow
        control holds the peer until the time is up. Callers hold ``send_lock``.
        """
        with (
            anyio.move_on_after(min(_LINGER_SECONDS, self.config.close_timeout)),
            contextlib.suppress(
                anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
            ),
        ):
            await self.transport.send_eof()
            left = _LINGER_BYTES
            while left > 0:
                left -= len(await self.transport.receive(min(left, self.config.read_size)))
            await anyio.sleep_forever()

    def _log_end(self) -> None:
        """The connection's last log line: who, where, how long, how it ended, how much."""
        session = self.session
        peer = session.peer
        received = session.close_received
        if self.broken is not None:
            how = _failure_text(self.broken)
        elif received is not None and received.code != CloseCode.NORMAL:
            how = f"closed by the peer with {close_code_name(received.code)}: {received.reason!r}"
        elif self.closed_with is not None and self.closed_with[0] != CloseCode.NORMAL:
            code, reason, detail = self.closed_with
            how = f"closed by us with {close_code_name(code)}: {detail or repr(reason)}"
        elif received is not None and self.peer_closed_first:
            how = "closed by the peer"
        else:
            how = "closed by us"
        logger.info(
            "connection %s %s at %s ended after %.3f s: %s; sent %d spacks, %d bytes; "
            "received %d spacks, %d bytes",
            "to" if session.role is Role.INITIATOR else "from",
            peer.fingerprint if peer is not None else "an unconfirmed peer",
            address_text(self.address),
            time.monotonic() - (self.established_at or 0.0),
            how,
            self.spacks_sent,
            session.bytes_sent,
            self.spacks_received,
            session.bytes_received,
        )
