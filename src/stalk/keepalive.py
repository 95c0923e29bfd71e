"""``Config.idle_timeout``: reads under the idle timer, a keepalive PING, then the verdict.

The timer counts only time spent reading (so an application busy between two
``receive()`` calls is never mistaken for an idle peer), across reads, cancelled ones
included (so receiving under short application timeouts still counts). After ``idle``
seconds of waiting since the peer's last byte a PING goes out; after ``2 * idle`` the
peer has not answered it, and the connection ends with TIMEOUT. Any byte resets the
timer: a PONG, or anything else the peer had to say. A read either returns bytes or
consumes none when cancelled, so the timer's deadlines never lose data.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import ByteStream

from stalk.errors import StalkError
from stalk.session import Session

__all__ = ["IdleTimer"]


class IdleTimer:
    """The idle timer of one connection's reads.

    :param idle: ``Config.idle_timeout`` (seconds).
    """

    __slots__ = ("_idle", "_ping_sent", "_session", "_transport", "waited")

    def __init__(self, transport: ByteStream, session: Session, idle: float) -> None:
        self._transport = transport
        self._session = session
        self._idle = idle
        #: Seconds spent reading since the peer's last byte.
        self.waited = 0.0
        self._ping_sent = False  # a keepalive PING went out since the peer's last byte

    async def receive(
        self, read_size: int, write_ping: Callable[[], Awaitable[None]]
    ) -> bytes | None:
        """Read from the transport; ``None``: the peer answered nothing for ``2 * idle``.

        :param write_ping: gets the keepalive PING the session queued written, never
            waiting for a blocked sender (``Link.write_pong``). A call's argument, not an
            attribute: the link holds this timer, and the timer holding the link's method
            would make a reference cycle, freed only by the garbage collector.
        """
        idle = self._idle
        while True:
            phase_end = 2 * idle if self._ping_sent else idle
            started = anyio.current_time()
            with anyio.move_on_after(phase_end - self.waited):
                try:
                    data = await self._transport.receive(read_size)
                except BaseException:  # cancelled (by this timer or the caller), or failed
                    self.waited += anyio.current_time() - started
                    raise
                self.waited = 0.0
                self._ping_sent = False
                return data
            self.waited = phase_end
            if self._ping_sent:
                return None
            self._ping_sent = True
            try:
                # PING is an application record: it also sends what queue() left unflushed.
                self._session.ping()
            except StalkError:
                continue  # we already sent CLOSE: nothing can go out; the peer may still talk
            await write_ping()
