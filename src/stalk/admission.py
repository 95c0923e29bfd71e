"""Admission: which arriving clients a listener takes on, and BUSY for the others.

A listener counts its handshakes in progress (in all, and by the address they come
from) and its established connections, and checks the caps of :class:`~stalk.Config`
against those counts when a client arrives, before any cryptography. A client beyond a
cap is refused with BUSY at once rather than queued (see :mod:`stalk.listener`).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import socket
import struct
from typing import Final

import anyio
from anyio.abc import ByteStream, SocketAttribute

from stalk import _logs
from stalk._logs import THROTTLE
from stalk.config import Config
from stalk.handshake import busy_refusal
from stalk.link import address_text
from stalk.writing import anyio_socket

__all__ = ["Admission", "client_key"]

logger = _logs.LISTENER

#: How long a BUSY refusal may take to write before the socket is dropped anyway.
_REFUSAL_TIMEOUT: Final = 1.0


def client_key(stream: ByteStream, address: tuple[str, int] | str | None) -> str | None:
    """What the per-address handshake cap counts ``stream``'s client by, if anything.

    ``address`` is the stream's remote address: over IP the key is its IPv4 address or
    IPv6 /64 (:func:`_address_key`), over a unix socket the client's user id
    (:func:`_peer_user`).
    """
    return _peer_user(stream) if isinstance(address, str) else _address_key(address)


def _address_key(address: object) -> str | None:
    """What the per-address handshake cap counts by over IP: the IPv4 address, or the /64.

    ``address`` is a socket's remote address (``(host, port, ...)``); IPv4-mapped IPv6
    addresses count as IPv4. ``None`` for anything that is not an IP address (over a unix
    socket, :func:`_peer_user` gives the key).
    """
    host = address[0] if isinstance(address, tuple) and address else address
    if not isinstance(host, str):
        return None
    return _host_key(host)


@functools.lru_cache(maxsize=1024)
def _host_key(host: str) -> str | None:
    """:func:`_address_key` of a host: parsing it costs more than the rest of accepting.

    Cached: clients come back from the same addresses, and an entry is a few short
    strings (a flood from many addresses only evicts the oldest).
    """
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


#: ``struct ucred`` (Linux): pid, uid, gid.
_UCRED: Final = struct.Struct("3i")


def _peer_user(stream: ByteStream) -> str | None:
    """``"uid N"`` of the process at the other end of a unix socket (Linux), else ``None``."""
    option = getattr(socket, "SO_PEERCRED", None)
    sock = anyio_socket(stream) or stream.extra(SocketAttribute.raw_socket, None)
    if option is None or sock is None or sock.family != getattr(socket, "AF_UNIX", None):
        return None
    try:
        _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size))
    except OSError:
        return None
    return f"uid {uid}"


class Admission:
    """A listener's slots: its handshakes in progress and connections, within the caps.

    A handshake holds its slot from :meth:`admit` to :meth:`handshake_ended`, and an
    established connection from :meth:`connection_started` to :meth:`connection_ended`:
    every socket the listener holds is counted, so ``Config.max_connections`` is never
    overshot.

    :ivar handshakes: handshakes in progress.
    :ivar connections: connections established (their handlers are running).
    """

    __slots__ = ("_by_address", "_config", "connections", "handshakes")

    def __init__(self, config: Config) -> None:
        self._config = config
        self.handshakes = 0
        self.connections = 0
        #: handshakes in progress by client key; an entry is removed when it drops to 0
        self._by_address: dict[str, int] = {}

    @property
    def by_address(self) -> dict[str, int]:
        """Handshakes in progress per client key (see :func:`client_key`), a copy."""
        return dict(self._by_address)

    async def admit(
        self, stream: ByteStream, address: tuple[str, int] | str | None, key: str | None
    ) -> bool:
        """Take a handshake slot for the client of ``stream``, or refuse it with BUSY.

        ``address`` is where the client is (for the log), ``key`` what it counts by
        (:func:`client_key`). A refused client's stream is closed here; a ``True`` must
        be followed by :meth:`handshake_ended` with the same ``key``.
        """
        refusal = self._refusal(key)
        if refusal is None:
            self.handshakes += 1
            if key is not None:
                self._by_address[key] = self._by_address.get(key, 0) + 1
            return True
        level, reason, detail = refusal
        THROTTLE.log(
            logger,
            level,
            reason,
            "refusing %s with BUSY: %s (%s)",
            address_text(address),
            reason,
            detail,
        )
        with (
            anyio.move_on_after(_REFUSAL_TIMEOUT, shield=True),
            contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError),
        ):
            await stream.send(busy_refusal(reason))
        await anyio.aclose_forcefully(stream)
        return False

    def _refusal(self, key: str | None) -> tuple[int, str, str] | None:
        """Why a client from ``key`` is refused now: (log level, reason sent, detail).

        A full listener is the operator's business (WARNING); one address over its share
        is routine under attack (INFO). Either is throttled by its reason.
        """
        config = self._config
        if self.connections + self.handshakes >= config.max_connections:
            return (
                logging.WARNING,
                "too many connections",
                f"{self.connections} established + {self.handshakes} handshaking, "
                f"max_connections={config.max_connections}",
            )
        if self.handshakes >= config.max_handshakes:
            return (
                logging.WARNING,
                "too many handshakes",
                f"{self.handshakes} in progress, max_handshakes={config.max_handshakes}",
            )
        from_key = self._by_address.get(key, 0) if key is not None else 0
        if from_key >= config.max_handshakes_per_address:
            return (
                logging.INFO,
                "too many handshakes from your address",
                f"{from_key} in progress from {key}, "
                f"max_handshakes_per_address={config.max_handshakes_per_address}",
            )
        return None

    def handshake_ended(self, key: str | None) -> None:
        """Give back the handshake slot :meth:`admit` took for a client from ``key``."""
        self.handshakes -= 1
        if key is not None:
            left = self._by_address.pop(key) - 1
            if left:
                self._by_address[key] = left

    def connection_started(self) -> None:
        """Take a connection's slot (its handshake has just ended, successfully)."""
        self.connections += 1

    def connection_ended(self) -> None:
        """Give back the slot of a connection whose handler has ended."""
        self.connections -= 1
