"""Events a :class:`~stalk.session.Session` hands to its driver from ``next_event()``.

Events are frozen values (h11's rule: do not subclass them). ``NEED_DATA`` is a sentinel
meaning "feed more bytes with ``receive_data`` before asking again"; ``PAUSED`` one meaning
"write out what is owed, let other tasks run, and ask again without feeding more".
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeAlias

from stalk.identity import PublicIdentity
from stalk.spack import Spack
from stalk.wire import Pattern

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "ChannelCloseReceived",
    "ChannelMessageReceived",
    "ChannelOpened",
    "ChannelResetReceived",
    "CloseReceived",
    "Event",
    "HandshakeComplete",
    "MessageReceived",
    "NeedData",
    "Paused",
    "PeerIdentified",
    "PongReceived",
]


class NeedData(enum.Enum):
    """Type of the :data:`NEED_DATA` sentinel."""

    NEED_DATA = enum.auto()


#: ``next_event()`` returns this when no event can be produced from the bytes received.
NEED_DATA: Final = NeedData.NEED_DATA


class Paused(enum.Enum):
    """Type of the :data:`PAUSED` sentinel."""

    PAUSED = enum.auto()


#: ``next_event()`` returns this when the session stopped reading on its own: it did a
#: bounded step of work, or the peer made it owe more answers than it holds. Write out
#: ``data_to_send()``, let other tasks run, then call ``next_event()`` again, without
#: feeding more bytes first.
PAUSED: Final = Paused.PAUSED


@dataclass(frozen=True, slots=True)
class PeerIdentified:
    """Responder only: the initiator's static key is known; answer with accept() or refuse().

    With IK this comes from message 1, before the responder has answered, and it may be a
    replay: the key is proven only by the :class:`HandshakeComplete` that follows.
    """

    peer: PublicIdentity
    pattern: Pattern


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """Both parties are authenticated and the session is open for spacks.

    :ivar handshake_hash: Noise ``h``, identical on both sides: bind tokens to it.
    :ivar peer_max_message_size: the largest spack encoding the peer accepts.
    """

    peer: PublicIdentity
    pattern: Pattern
    handshake_hash: bytes
    peer_max_message_size: int


# The two events made once per spack are made without a frozen dataclass's generated
# __init__, which sets each field by name through object.__setattr__. MessageReceived sets
# its one field through its slot's own setter (110 ns, against 250). ChannelMessageReceived
# is a named tuple that the receiver builds with tuple.__new__ (90 ns, against 190 with
# three setters, 400 with __init__). Both stay immutable all the same.


@dataclass(frozen=True, slots=True, init=False)
class MessageReceived:
    """One whole spack, authenticated and decoded (a connection without channels)."""

    spack: Spack

    def __init__(self, spack: Spack) -> None:
        _set_message_spack(self, spack)


class ChannelMessageReceived(NamedTuple):
    """One whole spack on a connection with channels (channel 0 included)."""

    #: The spack.
    spack: Spack
    #: The channel it came on.
    channel: int
    #: Its data bytes, which the driver hands back to
    #: :attr:`~stalk.session.Session.release` once the application has the spack.
    size: int


def _slot_setter(cls: type, name: str) -> Callable[[object, object], None]:
    """The setter of the slot ``name`` of ``cls`` (its member descriptor's ``__set__``)."""
    setter: Callable[[object, object], None] = vars(cls)[name].__set__
    return setter


_set_message_spack: Final = _slot_setter(MessageReceived, "spack")


@dataclass(frozen=True, slots=True)
class ChannelOpened:
    """The peer opened a channel (its spacks follow as :class:`ChannelMessageReceived`)."""

    channel: int


@dataclass(frozen=True, slots=True)
class ChannelCloseReceived:
    """The peer ended its direction of a channel: it sends nothing more on it."""

    channel: int


@dataclass(frozen=True, slots=True)
class ChannelResetReceived:
    """The peer reset a channel: both directions ended, with a code and reason.

    Spacks of that channel not yet handed to the application are to be dropped, and the
    driver calls :meth:`~stalk.session.Session.release_channel` once the application let
    go of it (its answering RESET goes then).
    """

    channel: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The answer to one of our PINGs, with its payload."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """The peer sent an authenticated CLOSE: it will send nothing more.

    ``code`` 0 is a normal close; any other code is an error close (SPEC "Close codes").
    """

    code: int
    reason: str


#: Any event :meth:`Session.next_event() <stalk.session.Session.next_event>` returns.
Event: TypeAlias = (
    PeerIdentified
    | HandshakeComplete
    | MessageReceived
    | ChannelMessageReceived
    | PongReceived
    | CloseReceived
    | ChannelOpened
    | ChannelCloseReceived
    | ChannelResetReceived
)
