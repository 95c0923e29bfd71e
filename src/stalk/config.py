"""Connection and listener settings for the anyio layer (all limits have a reason)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from stalk.certificates import DEFAULT_CLOCK_SKEW
from stalk.handshake import ChannelParams
from stalk.session import SessionConfig
from stalk.wire import (
    DEFAULT_CHANNEL_WINDOW,
    DEFAULT_CONNECTION_WINDOW,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_REKEY_AFTER_BYTES,
    DEFAULT_REKEY_AFTER_MESSAGES,
)

__all__ = ["DEFAULT_CONFIG", "Config"]


@dataclass(frozen=True, slots=True)
class Config:
    """Timeouts, limits and policy for connections and listeners.

    :param handshake_timeout: seconds for connecting (TCP or unix socket) plus the whole
        handshake (authorization included); a peer that stalls longer is dropped.
    :param write_timeout: seconds a single write may take. A write completes even if its
        caller is cancelled, so that a frame is never left half-written; one that cannot
        finish in this time (a peer that stopped reading) breaks the connection instead.
    :param close_timeout: seconds ``aclose()`` waits to deliver our CLOSE.
    :param max_message_size: the largest encoded spack we accept (advertised to the peer).
    :param max_handshakes: listener only: handshakes in progress at once; further clients
        are refused with BUSY at once instead of queueing.
    :param read_size: bytes asked of the transport per read (large reads make large
        messages cheap).
    :param send_buffer: bytes of queued spacks beyond which ``send()`` waits for the writer
        (write backpressure; see :class:`~stalk.Connection`).
    :param rekey_after_messages: rekey the sending cipher after this many Noise messages...
    :param rekey_after_bytes: ...or this many plaintext bytes, whichever comes first.
    :param max_connections: listener only: connections at once, established or still in
        their handshake; a client beyond it is refused with BUSY before any cryptography.
        The default fits the usual soft limit of 1024 open files per process with 64
        descriptors to spare for the process itself (the listener warns when the limit is
        lower). Raise both together for more.
    :param max_handshakes_per_address: listener only: handshakes in progress from one
        address (an IPv4 address, or an IPv6 /64 prefix, which one subscriber usually
        holds whole; over a unix socket, one user id, where the system tells it: Linux);
        beyond it that address is refused with BUSY at once, so one host cannot take
        every handshake slot. 16 leaves room for a burst of clients behind one NAT while
        a single address holds at most 1/16 of the default slots.
    :param idle_timeout: ``None`` (the default) or seconds. While ``receive()`` waits for
        the network and the peer has sent no byte for this long, a PING (keepalive) is
        sent; if no byte arrives within another ``idle_timeout``, the connection is closed
        with TIMEOUT and ``receive()`` raises :class:`~stalk.IdleTimeout`. Only time spent
        waiting in ``receive()`` counts (cancelled calls included); a connection that no
        one receives from is never timed out. With channels, inside ``async with conn``
        the connection's reader task is always receiving (see :class:`~stalk.Channel`).
    :param max_channels: ``None`` (the default) offers no channels: the connection is the
        one spack stream it always was. A number offers channels (SPEC "Channels") and is
        how many channels the peer may have open towards us at once (0: none, though we
        may still open channels towards a peer that accepts them). A connection has
        channels when both sides offer them (:attr:`~stalk.Connection.channels`).
    :param channel_window: with channels, the data bytes the peer may send on one channel
        (channel 0 included) before our application receives them: what one channel can
        make us hold.
    :param connection_window: with channels, the same for all channels together.
    :param clock_skew: with certificates (``authorities=``), the seconds of clock
        difference tolerated at each end of a certificate's validity: it is accepted from
        ``not_before - clock_skew`` until ``not_after + clock_skew`` (SPEC "Certificates").
    :raises ValueError: a timeout is not a positive number of seconds, a count or size is
        out of range (each must be positive; ``send_buffer`` may be 0), ``clock_skew`` is
        negative, or ``max_message_size`` or a channel setting is outside what the
        protocol allows.
    """

    handshake_timeout: float = 10.0
    write_timeout: float = 60.0
    close_timeout: float = 5.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_handshakes: int = 256
    read_size: int = 256 * 1024
    send_buffer: int = 256 * 1024
    rekey_after_messages: int = DEFAULT_REKEY_AFTER_MESSAGES
    rekey_after_bytes: int = DEFAULT_REKEY_AFTER_BYTES
    max_connections: int = 960
    max_handshakes_per_address: int = 16
    idle_timeout: float | None = None
    max_channels: int | None = None
    channel_window: int = DEFAULT_CHANNEL_WINDOW
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    clock_skew: float = DEFAULT_CLOCK_SKEW
    #: The sans-IO part, built once (a connection asks for it at every handshake).
    _session: SessionConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "write_timeout", "close_timeout"):
            value = getattr(self, name)
            if not (value > 0 and not math.isnan(value)):
                raise ValueError(f"{name} must be a positive number of seconds")
        if self.idle_timeout is not None and not (
            self.idle_timeout > 0 and not math.isnan(self.idle_timeout)
        ):
            raise ValueError("idle_timeout must be None or a positive number of seconds")
        if self.max_handshakes < 1 or self.read_size < 1 or self.send_buffer < 0:
            raise ValueError("max_handshakes, read_size and send_buffer must be positive")
        if self.max_connections < 1 or self.max_handshakes_per_address < 1:
            raise ValueError("max_connections and max_handshakes_per_address must be positive")
        if not 0 <= self.clock_skew < math.inf:
            raise ValueError("clock_skew must be a number of seconds, 0 or more")
        session = SessionConfig(  # validates the session fields
            max_message_size=self.max_message_size,
            rekey_after_messages=self.rekey_after_messages,
            rekey_after_bytes=self.rekey_after_bytes,
            channels=self._channel_params(),
        )
        object.__setattr__(self, "_session", session)

    def session_config(self) -> SessionConfig:
        """The sans-IO part of these settings."""
        return self._session

    def _channel_params(self) -> ChannelParams | None:
        """What we offer for channels; ``None`` for none. Checks the three settings."""
        params = ChannelParams(
            max_channels=0 if self.max_channels is None else self.max_channels,
            channel_window=self.channel_window,
            connection_window=self.connection_window,
        )
        return None if self.max_channels is None else params


#: The settings of a connection or listener given none (a Config is immutable).
DEFAULT_CONFIG: Final = Config()


def check_channel_handler(config: Config, channel_handler: object) -> None:
    """Refuse a channel handler when ``config`` offers no channels (every entry point's rule).

    :raises ValueError: ``channel_handler`` is given and ``config.max_channels`` is not.
    """
    if channel_handler is not None and not config.max_channels:
        raise ValueError("a channel_handler needs Config.max_channels to offer channels")
