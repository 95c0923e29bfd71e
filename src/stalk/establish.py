"""Running the handshake of a new connection over its link.

The session decides everything about the handshake; this drives it: it writes what the
session produces, feeds it what the peer sends, and when the session has authenticated
the client (``PeerIdentified``), asks the application's ``authorize`` hook and tells the
session to accept or refuse. It fails closed: a hook that raises refuses the peer.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import anyio
import anyio.lowlevel

from stalk.errors import HandshakeFailed
from stalk.events import NEED_DATA, PAUSED, HandshakeComplete, PeerIdentified
from stalk.identity import PublicIdentity
from stalk.link import Link

__all__ = ["Authorize", "establish", "maybe_await"]

logger = logging.getLogger("stalk")

#: ``authorize(peer) -> bool`` (or a coroutine function): may this peer connect?
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
            await link.receive_into_session(handshake=True)
        elif event is PAUSED:
            await anyio.lowlevel.checkpoint()  # its output was just written
        elif isinstance(event, PeerIdentified):
            if await _authorized(authorize, event.peer):
                session.accept()
                continue
            session.refuse("not authorized")
            await link.write_handshake()
            raise HandshakeFailed(f"refused peer {event.peer.fingerprint} (not authorized)")
        elif isinstance(event, HandshakeComplete):
            await link.write_handshake()
            link.handshake_seconds = time.monotonic() - started
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "handshake complete with %s (%s) at %s",
                    event.peer.fingerprint,
                    event.pattern,
                    link.address,
                )
            return


async def _authorized(authorize: Authorize | None, peer: PublicIdentity) -> bool:
    """Ask the application's hook; a hook that raises refuses (fail closed)."""
    if authorize is None:
        return True
    try:
        return bool(await maybe_await(authorize(peer)))
    except Exception:
        logger.exception("authorize() raised for %s; refusing the peer", peer.fingerprint)
        return False
