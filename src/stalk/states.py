"""The connection state machine: a table per direction, the one source of truth for what is allowed.

Theory of operation
-------------------
A session has two directions (SPEC "Connection states"): ``SEND``, what we may send, and
``RECEIVE``, what we accept from the peer. Each is in one :class:`DirectionState` and changes
only through its table, ``(state, input) -> state``, in the style of h11's ``_state.py``:

- the handshake milestones (:data:`JOINT_INPUTS`) move both directions together: the peer's
  key is read, the application accepts or refuses it, the transport keys exist, READY goes
  out or comes in, the session is abandoned before it had keys, or it fails;
- the other inputs belong to one direction: we send data or CLOSE; the peer sends data,
  CLOSE or reaches EOF.

A pair missing from a table is not allowed, and :meth:`Directions.process` raises the error
for it (:func:`refusal`): an API call at the wrong time is a
:class:`~stalk.LocalProtocolError` (a :class:`~stalk.ConnectionClosed` once our direction is
closed or broken); the peer's input at the wrong time is a :class:`~stalk.ProtocolError`,
or a :class:`~stalk.HandshakeFailed` before it is authenticated, and EOF before its CLOSE a
:class:`~stalk.ConnectionLost`. Data inputs never change a state: their tables say only in
which states they are allowed, and :class:`Directions` caches that as two booleans, so the
per-record and per-send checks are one attribute read.

:class:`SessionState`, the summary the API shows, is a function of the two directions
(:data:`SESSION_STATE`).
"""

from __future__ import annotations

import enum
from typing import Final

from stalk.errors import (
    ConnectionClosed,
    ConnectionLost,
    HandshakeFailed,
    LocalProtocolError,
    ProtocolError,
    StalkError,
)

__all__ = [
    "JOINT_INPUTS",
    "RECEIVE",
    "SEND",
    "SESSION_STATE",
    "Direction",
    "DirectionState",
    "Directions",
    "Input",
    "SessionState",
    "refusal",
]


class Direction(enum.Enum):
    """One way of a connection."""

    SEND = "send"
    RECEIVE = "receive"


# Integer enums: the tables are dicts keyed by (state, input), and an IntEnum hashes in C
# where a plain Enum member runs Python code.
class DirectionState(enum.IntEnum):
    """Where one direction is in its life."""

    HANDSHAKE = 1  # the Noise handshake is running: no transport keys
    AUTHORIZING = 2  # responder: the peer's key is known, the verdict is not
    CONFIRMING = 3  # transport keys exist; READY has not gone either way yet
    OPEN = 4  # spacks, PINGs and PONGs flow
    CLOSED = 5  # CLOSE sent (SEND) or received (RECEIVE); or refused, or abandoned
    BROKEN = 6  # the session failed (terminal)

    def __str__(self) -> str:
        return self.name.lower()


class Input(enum.IntEnum):
    """What moves a direction: a handshake milestone, an API call or the peer's input."""

    PEER_IDENTIFIED = 1  # responder: the peer's static key was read
    ACCEPT = 2  # responder: the application admits the peer
    REFUSE = 3  # responder: the application refuses the peer
    KEYS = 4  # initiator: the last handshake message was read or written
    READY_SENT = 5  # we read the last handshake message and confirm it
    READY_RECEIVED = 6  # the peer confirmed the handshake
    ABANDON = 7  # close() before there are keys to authenticate a CLOSE with
    FAIL = 8  # any error: the session is dead
    DATA_SENT = 9  # queue(), send(), ping()
    CLOSE_SENT = 10
    DATA_RECEIVED = 11  # MESSAGE, FRAGMENT, PING, PONG, REKEY records
    CLOSE_RECEIVED = 12
    EOF = 13  # the transport's end of input

    def __str__(self) -> str:
        """Its name as SPEC writes it: ``READY received``, ``data sent``, ``EOF``."""
        return " ".join(
            word if word in ("READY", "CLOSE", "EOF") else word.lower()
            for word in self.name.split("_")
        )


class SessionState(enum.Enum):
    """Where a session is in its life: a summary of its two directions."""

    HANDSHAKING = "handshaking"
    AUTHORIZING = "authorizing"
    CONFIRMING = "confirming"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"  # we sent CLOSE; the peer may still send
    HALF_CLOSED_REMOTE = "half-closed (remote)"  # the peer sent CLOSE; we may still send
    CLOSED = "closed"
    FAILED = "failed"


_H: Final = DirectionState.HANDSHAKE
_A: Final = DirectionState.AUTHORIZING
_C: Final = DirectionState.CONFIRMING
_O: Final = DirectionState.OPEN
_X: Final = DirectionState.CLOSED
_B: Final = DirectionState.BROKEN

#: Inputs that move both directions at once.
JOINT_INPUTS: Final = frozenset(
    {
        Input.PEER_IDENTIFIED,
        Input.ACCEPT,
        Input.REFUSE,
        Input.KEYS,
        Input.READY_SENT,
        Input.READY_RECEIVED,
        Input.ABANDON,
        Input.FAIL,
    }
)

# The handshake part, the same in both directions.
_HANDSHAKE: Final[dict[tuple[DirectionState, Input], DirectionState]] = {
    (_H, Input.PEER_IDENTIFIED): _A,
    (_H, Input.KEYS): _C,
    (_H, Input.ABANDON): _X,
    (_A, Input.ACCEPT): _C,
    (_A, Input.REFUSE): _X,
    (_A, Input.ABANDON): _X,
    (_C, Input.READY_SENT): _O,
    (_C, Input.READY_RECEIVED): _O,
    **{(state, Input.FAIL): _B for state in DirectionState},
}

#: Our direction.
SEND: Final[dict[tuple[DirectionState, Input], DirectionState]] = {
    **_HANDSHAKE,
    (_O, Input.DATA_SENT): _O,
    (_O, Input.CLOSE_SENT): _X,
    # A CLOSE may go out while we wait for the peer's READY (it is encrypted already);
    # READY arriving after it leaves our direction closed.
    (_C, Input.CLOSE_SENT): _X,
    (_X, Input.READY_RECEIVED): _X,
}

#: The peer's direction.
RECEIVE: Final[dict[tuple[DirectionState, Input], DirectionState]] = {
    **_HANDSHAKE,
    (_O, Input.DATA_RECEIVED): _O,
    (_O, Input.CLOSE_RECEIVED): _X,
    (_X, Input.EOF): _X,  # TCP's end after the peer's CLOSE: a clean end
}

_TABLES: Final = {Direction.SEND: SEND, Direction.RECEIVE: RECEIVE}
_SEND_INPUTS: Final = JOINT_INPUTS | {Input.DATA_SENT, Input.CLOSE_SENT}
_RECEIVE_INPUTS: Final = JOINT_INPUTS | {Input.DATA_RECEIVED, Input.CLOSE_RECEIVED, Input.EOF}
#: Inputs the application causes (API calls); the others come from the peer.
_LOCAL_INPUTS: Final = frozenset(
    {Input.ACCEPT, Input.REFUSE, Input.ABANDON, Input.DATA_SENT, Input.CLOSE_SENT}
)

#: The summary of every pair of direction states a session can reach.
SESSION_STATE: Final[dict[tuple[DirectionState, DirectionState], SessionState]] = {
    (_H, _H): SessionState.HANDSHAKING,
    (_A, _A): SessionState.AUTHORIZING,
    (_C, _C): SessionState.CONFIRMING,
    (_X, _C): SessionState.CONFIRMING,
    (_O, _O): SessionState.OPEN,
    (_X, _O): SessionState.HALF_CLOSED_LOCAL,
    (_O, _X): SessionState.HALF_CLOSED_REMOTE,
    (_X, _X): SessionState.CLOSED,
    (_B, _B): SessionState.FAILED,
}


def refusal(direction: Direction, state: DirectionState, what: Input) -> StalkError:
    """The error for ``what`` arriving while ``direction`` is in ``state`` (not allowed)."""
    text = f"{what} is not allowed while {direction.value} is {state}"
    if what in _LOCAL_INPUTS:
        if state in (_X, _B):
            return ConnectionClosed(f"the session is closed for sending ({text})")
        return LocalProtocolError(text)
    if what is Input.EOF:
        if state is _C:
            return HandshakeFailed("the peer closed the connection before confirming the handshake")
        if state in (_H, _A):
            return HandshakeFailed("the peer closed the connection during the handshake")
        return ConnectionLost("the peer closed the connection without a CLOSE")
    if state in (_H, _A, _C):
        return HandshakeFailed(f"the peer broke the handshake: {text}")
    return ProtocolError(f"the peer broke the protocol: {text}")


class Directions:
    """The two directions of one session and the only code that changes them."""

    __slots__ = ("can_receive_data", "can_send_data", "receive", "send")

    def __init__(
        self,
        send: DirectionState = DirectionState.HANDSHAKE,
        receive: DirectionState = DirectionState.HANDSHAKE,
    ) -> None:
        self.send = send
        self.receive = receive
        #: (state, DATA_SENT) / (state, DATA_RECEIVED) is in its table: the hot paths' check.
        self.can_send_data = (send, Input.DATA_SENT) in SEND
        self.can_receive_data = (receive, Input.DATA_RECEIVED) in RECEIVE

    @property
    def session_state(self) -> SessionState:
        """The summary the API shows."""
        return SESSION_STATE[self.send, self.receive]

    def allows(self, what: Input) -> bool:
        """Whether ``what`` is allowed now (in every direction it moves)."""
        return (what not in _SEND_INPUTS or (self.send, what) in SEND) and (
            what not in _RECEIVE_INPUTS or (self.receive, what) in RECEIVE
        )

    def process(self, what: Input) -> None:
        """Move the directions ``what`` belongs to.

        :raises ~stalk.StalkError: ``what`` is not allowed now (see :func:`refusal`);
            nothing changed.
        """
        send, receive = self.send, self.receive
        if what in _SEND_INPUTS:
            new = SEND.get((send, what))
            if new is None:
                raise refusal(Direction.SEND, send, what)
            send = new
        if what in _RECEIVE_INPUTS:
            new = RECEIVE.get((receive, what))
            if new is None:
                raise refusal(Direction.RECEIVE, receive, what)
            receive = new
        self.send, self.receive = send, receive
        self.can_send_data = (send, Input.DATA_SENT) in SEND
        self.can_receive_data = (receive, Input.DATA_RECEIVED) in RECEIVE
