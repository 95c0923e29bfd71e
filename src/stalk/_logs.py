"""stalk's loggers, and the throttle that keeps strangers from flooding them.

One child of the ``stalk`` logger per job, so that an application can set each one's level
apart (``logging.getLogger("stalk.handshake").setLevel(logging.WARNING)``):

- ``stalk.connection``: an established connection's life, on both sides: INFO when it is
  established and when it ends (who, where, pattern, duration, how it ended, what it
  carried); DEBUG for details;
- ``stalk.handshake``: handshakes that fail (a stranger's garbage, a timeout, a refused
  key) and an ``authorize`` hook that raises;
- ``stalk.listener``: the listener itself: clients refused with BUSY, ``accept()``
  failures, a file limit too low, handlers that raise, its revocation list reloaded;
- ``stalk.renewal``: online certificate renewal (:mod:`stalk.renewal`): each certificate
  an authority service issues (INFO), renewals that fail (WARNING).

The ``stalk`` logger has a :class:`logging.NullHandler`, the convention for libraries:
records go wherever the application configured logging, and nowhere (not even Python's
last-resort stderr output) when it configured nothing.

Nothing is logged per spack: the hot paths only count (see ``StalkAttribute``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

__all__ = [
    "CONNECTION",
    "HANDSHAKE",
    "LISTENER",
    "RENEWAL",
    "THROTTLE",
    "Throttle",
]

logging.getLogger("stalk").addHandler(logging.NullHandler())

CONNECTION: Final = logging.getLogger("stalk.connection")
HANDSHAKE: Final = logging.getLogger("stalk.handshake")
LISTENER: Final = logging.getLogger("stalk.listener")
RENEWAL: Final = logging.getLogger("stalk.renewal")

#: Seconds between two records of one kind at their own level (see :class:`Throttle`).
THROTTLE_INTERVAL: Final = 10.0


class Throttle:
    """At most one record of each kind per ``interval`` at its level; the rest at DEBUG.

    For what anyone who can open a TCP connection causes at will: failed handshakes,
    refusals, an ``authorize`` hook failing. Each is worth a line for an operator, but a
    flood of them (a scanner, a client stuck in a reconnect loop, an attack) must not
    bury the rest of the log or fill the disk: one per kind and interval is enough to
    see that it happens and what it looks like. The others still go out at DEBUG, whole,
    for whoever needs every one; the next record at the kind's level counts them. No
    timer is needed: a count is reported with the next record of its kind, like the
    kernel's "callbacks suppressed".

    :param interval: seconds during which a kind's further records go to DEBUG.
    :param clock: the time in seconds (monotonic); tests pass their own.
    """

    def __init__(
        self, interval: float = THROTTLE_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.clock = clock
        #: kind -> [until when its records go to DEBUG, how many went there since]
        self._kinds: dict[str, list[float]] = {}

    def log(
        self,
        logger: logging.Logger,
        level: int,
        kind: str,
        message: str,
        *args: object,
        exc_info: bool = False,
    ) -> None:
        """Log ``message % args`` at ``level``, or at DEBUG if ``kind`` had its turn.

        :param kind: what counts as the same thing (a short fixed string: the kinds are
            few, so the table stays small).
        :param exc_info: called in an ``except`` block: the exception's traceback goes
            with the record at ``level``.
        """
        now = self.clock()
        state = self._kinds.get(kind)
        if state is not None and now < state[0]:
            state[1] += 1
            logger.debug(message, *args)
            return
        if not logger.isEnabledFor(level):
            return  # not counted as a turn: nothing was shown at that level
        suppressed = int(state[1]) if state is not None else 0
        self._kinds[kind] = [now + self.interval, 0]
        if suppressed:
            message += " (and %d more like it since the last one, logged at DEBUG only)"
            args = (*args, suppressed)
        logger.log(level, message, *args, exc_info=exc_info)

    def reset(self) -> None:
        """Forget every kind's turn and count."""
        self._kinds.clear()


#: The process's one throttle: the log's volume is the process's, whatever the listener.
THROTTLE: Final = Throttle()
