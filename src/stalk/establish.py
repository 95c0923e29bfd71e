"""Running the handshake of a new connection over its link.

The session decides everything about the handshake; this drives it: it writes what the
session produces, feeds it what the peer sends, and when the session has authenticated
the client (``PeerIdentified``), asks the application's ``authorize`` hook and tells the
session to accept or refuse. It fails closed: a hook that raises refuses the peer.

A handshake that completes is logged at INFO on ``stalk.connection`` (on both sides: who,
where, the pattern and how long it took); the link logs the connection's end.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import anyio
import anyio.lowlevel

from stalk._logs import CONNECTION, HANDSHAKE, THROTTLE
from stalk._noise import prepare_ephemeral
from stalk.certificates import CertifiedIdentity
from stalk.errors import HandshakeFailed
from stalk.events import NEED_DATA, PAUSED, HandshakeComplete, PeerIdentified
from stalk.identity import PublicIdentity
from stalk.link import Link, address_text
from stalk.session import Role

__all__ = ["Authorize", "establish", "maybe_await"]

#: ``authorize(peer) -> bool`` (or a coroutine function): may this peer connect? With
#: ``authorities=``, ``peer`` is a :class:`~stalk.CertifiedIdentity`: its ``certificate``
#: (``.name``, ``.groups``) was verified before the hook runs.
Authorize: TypeAlias = Callable[[PublicIdentity], "bool | Awaitable[bool]"]


async def maybe_await(value: Any) -> Any:
    """``value``, awaited if it is awaitable (hooks may be plain or coroutine functions)."""
    return await value if inspect.isawaitable(value) else value


async def establish(link: Link, authorize: Authorize | None) -> None:
    """Run the handshake over ``link``; on any failure the transport is closed.

    The caller sets the deadline (:func:`~stalk.connect` one for TCP connect and handshake).

    :raises ~stalk.HandshakeFailed: the handshake failed (the subclass says why).
    """
    try:
        await _run(link, authorize, time.monotonic())
    except HandshakeFailed as exc:
        await link.write_best_effort()
        raise await link.fail(exc) from None
    except BaseException:
        await link.abort()
        raise


async def _run(link: Link, authorize: Authorize | None, started: float) -> None:
    session = link.session
    while True:
        event = session.next_event()
        await link.write_handshake()  # a responder answers as a side effect of reading
        if event is NEED_DATA:
            # While the peer works on its answer, the next handshake's key costs no one.
            prepare_ephemeral()
            await link.receive_into_session(handshake=True)
        elif event is PAUSED:
            await anyio.lowlevel.checkpoint()  # its output was just written
        elif isinstance(event, PeerIdentified):
            if await _authorized(authorize, event.peer, link):
                session.accept()
                continue
            session.refuse("not authorized")
            await link.write_handshake()
            raise HandshakeFailed(f"refused peer {event.peer.fingerprint} (not authorized)")
        elif isinstance(event, HandshakeComplete):
            await link.write_handshake()
            now = time.monotonic()
            link.established_at = now
            link.handshake_seconds = now - started
            if CONNECTION.isEnabledFor(logging.INFO):
                initiator = session.role is Role.INITIATOR
                certified = event.peer
                CONNECTION.info(
                    "%s %s%s %s %s (%s, handshake %.1f ms)",
                    "connected to" if initiator else "accepted",
                    event.peer.fingerprint,
                    f" ({certified.name!r})" if isinstance(certified, CertifiedIdentity) else "",
                    "at" if initiator else "from",
                    address_text(link.address),
                    event.pattern,
                    link.handshake_seconds * 1000,
                )
            return


async def _authorized(authorize: Authorize | None, peer: PublicIdentity, link: Link) -> bool:
    """Ask the application's hook; a hook that raises refuses (fail closed).

    The hook's failure is logged with its traceback, throttled: any client can make it run.
    """
    if authorize is None:
        return True
    try:
        return bool(await maybe_await(authorize(peer)))
    except Exception:  # noqa: BLE001 - logged (throttled, with the traceback)
        THROTTLE.log(
            HANDSHAKE,
            logging.ERROR,
            "authorize",
            "authorize() raised for %s from %s; refusing the peer",
            peer.fingerprint,
            address_text(link.address),
            exc_info=True,
        )
        return False
