"""The tests' one support module.

Sans-IO: :func:`take_all` (the one way a test reads a session's output), :func:`drain`
(events until NEED_DATA), :func:`pump` (bytes between two sessions until both are quiet)
and :class:`Pair` (two sessions wired back to back). anyio: :func:`echo` (the echo
handler), :func:`serving` (a listener serving a handler), :func:`wait_until` and
:func:`holds_within` (wait for a condition instead of sleeping) and
:func:`byte_stream_pair` (in-memory byte streams for tests that need no sockets).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import anyio
from anyio.abc import ByteReceiveStream, ByteSendStream
from anyio.streams.stapled import StapledByteStream

from stalk.channel import ChannelHandler
from stalk.config import Config
from stalk.connection import Connection
from stalk.events import NEED_DATA, PAUSED, CloseReceived, Event, PeerIdentified
from stalk.identity import Identity, PublicIdentity
from stalk.listener import ConnectionHandler, listen
from stalk.session import Role, Session, SessionConfig

# -- sans-IO ------------------------------------------------------------------------------


def take_all(session: Session) -> bytes:
    """Everything the session has to send now, in order (``b""`` if nothing).

    The one way a test reads a session's output: it calls ``data_to_send()`` until that
    returns ``b""``, so it holds whether one call hands out everything or a part of it.
    """
    pieces: list[bytes | bytearray] = []
    while data := session.data_to_send():
        pieces.append(data)
    return b"".join(pieces)


def drain(
    session: Session, into: list[Event] | None = None, *, may_owe: bool = True
) -> list[Event]:
    """Every event the session can produce now (a CloseReceived ends the list).

    PAUSED after a step of work is resumed at once; PAUSED with output owed ends the list
    (the caller moves that output, then drains again).

    :param into: append the events to this list as they come (so a caller that expects an
        exception keeps the events before it); returned as well.
    :param may_owe: False asserts that the session never pauses owing output.
    """
    events: list[Event] = [] if into is None else into
    while (event := session.next_event()) is not NEED_DATA:
        if event is PAUSED:
            if session.has_output:
                assert may_owe, "the session paused owing output"
                break
            continue
        events.append(event)
        if isinstance(event, CloseReceived):  # returned again and again from then on
            break
    return events


def pump(
    client: Session,
    server: Session,
    *,
    collect: Callable[[Session], Sequence[Event]] = drain,
    chunk: int | None = None,
    tap: Callable[[Session, bytes], None] | None = None,
    collect_sender: bool = True,
    into: tuple[list[Event], list[Event]] | None = None,
) -> tuple[list[Event], list[Event]]:
    """Move bytes both ways until neither side has anything to send.

    Returns the events each side produced (client's, server's).

    :param collect: takes the events of a session that just received bytes (default
        :func:`drain`); a caller that checks or answers events passes its own.
    :param chunk: deliver at most this many bytes per ``receive_data`` call.
    :param tap: sees every write (the session that wrote it, the bytes) before delivery.
    :param collect_sender: after a side's output left, collect its events too (it may have
        paused until its output went); not while it is handshaking or failed.
    :param into: append each side's events to these lists as they come (what came before
        an exception stays there); returned as well.
    """
    if into is None:
        into = ([], [])
    client_events, server_events = into
    moved = True
    while moved:
        moved = False
        for src, dst, src_seen, dst_seen in (
            (client, server, client_events, server_events),
            (server, client, server_events, client_events),
        ):
            data = take_all(src)
            if not data:
                continue
            moved = True
            if tap is not None:
                tap(src, data)
            step = chunk or len(data)
            for i in range(0, len(data), step):
                dst.receive_data(data[i : i + step])
                dst_seen.extend(collect(dst))
            if collect_sender and src.state.value not in ("handshaking", "authorizing", "failed"):
                src_seen.extend(collect(src))
    return client_events, server_events


@dataclass
class Pair:
    """An initiator and a responder wired back to back, with everything each saw."""

    client: Session
    server: Session
    client_events: list[Event] = field(default_factory=list)
    server_events: list[Event] = field(default_factory=list)
    authorize: bool = True

    def pump(self, *, chunk: int | None = None) -> None:
        """:func:`pump` both ways, answering PeerIdentified as ``authorize`` says.

        :param chunk: deliver at most this many bytes per ``receive_data`` call.
        """
        pump(
            self.client,
            self.server,
            collect=self._collect,
            chunk=chunk,
            into=(self.client_events, self.server_events),
        )

    def _collect(self, session: Session) -> list[Event]:
        seen: list[Event] = []
        pending = drain(session)
        while pending:
            event = pending.pop(0)
            seen.append(event)
            if isinstance(event, PeerIdentified):
                if self.authorize:
                    session.accept()
                    pending.extend(drain(session))
                else:
                    session.refuse("you are not on the list")
        return seen


def make_pair(
    *,
    ik: bool = False,
    client_config: SessionConfig | None = None,
    server_config: SessionConfig | None = None,
    client_identity: Identity | None = None,
    server_identity: Identity | None = None,
    authorize: bool = True,
) -> Pair:
    """A client/server pair; ``ik`` pins the server's real key (IK), else XX."""
    server_identity = server_identity or Identity.generate()
    client = Session(
        Role.INITIATOR,
        client_identity or Identity.generate(),
        peer=server_identity.public if ik else None,
        config=client_config,
    )
    server = Session(Role.RESPONDER, server_identity, config=server_config)
    return Pair(client, server, authorize=authorize)


def connected_pair(**kwargs: object) -> Pair:
    """A pair that finished its handshake; the event lists are cleared."""
    pair = make_pair(**kwargs)  # type: ignore[arg-type]
    pair.pump()
    assert pair.client.peer is not None
    assert pair.server.peer is not None
    pair.client_events.clear()
    pair.server_events.clear()
    return pair


# -- anyio ----------------------------------------------------------------------------------


async def echo(conn: Connection) -> None:
    """A connection handler that sends every spack back as it came."""
    async for spack in conn:
        await conn.send(spack)


@asynccontextmanager
async def serving(
    handler: ConnectionHandler = echo,
    *,
    authorize: Callable[[PublicIdentity], bool | Awaitable[bool]] | None = None,
    config: Config | None = None,
    channel_handler: ChannelHandler | None = None,
) -> AsyncIterator[tuple[str, int, Identity]]:
    """A listener on 127.0.0.1 with a fresh identity, serving ``handler`` (and
    ``channel_handler``) until the block ends; yields its host, port and identity."""
    identity = Identity.generate()
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(
                listen,
                "127.0.0.1",
                0,
                handler,
                identity=identity,
                authorize=authorize,
                config=config,
                channel_handler=channel_handler,
            )
        )
        yield host, port, identity
        tg.cancel_scope.cancel()


async def wait_until(
    condition: Callable[[], object], timeout: float = 5, *, interval: float = 0.01
) -> None:
    """Wait until ``condition()`` is true, polled every ``interval`` s.

    For what a test cannot await directly (the server side of a connection lags the
    client, a listener's counters): the test goes on as soon as it holds, instead of
    sleeping a fixed time and hoping.

    :raises TimeoutError: it was not true within ``timeout`` seconds.
    """
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(interval)


async def holds_within(condition: Callable[[], object], seconds: float) -> bool:
    """Whether ``condition()`` became true within ``seconds`` (polled as :func:`wait_until`).

    For an assertion that used to follow a fixed sleep of ``seconds`` (descriptors closed,
    say): it is checked as soon as it holds, and no later than before.
    """
    with anyio.move_on_after(seconds):
        await wait_until(condition, timeout=seconds + 1)
    return bool(condition())


class _Send(ByteSendStream):
    def __init__(self, stream: anyio.abc.ObjectSendStream[bytes]) -> None:
        self._stream = stream

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.aclose()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _Receive(ByteReceiveStream):
    def __init__(self, stream: anyio.abc.ObjectReceiveStream[bytes]) -> None:
        self._stream = stream

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._stream.receive()

    async def aclose(self) -> None:
        await self._stream.aclose()


def byte_stream_pair(buffer: float = 100) -> tuple[StapledByteStream, StapledByteStream]:
    """Two connected in-memory byte streams (each write arrives as one chunk).

    :param buffer: writes each direction holds before a write waits (``math.inf``: none
        waits, for two drivers that each read and write in one task).
    """
    a_send, b_receive = anyio.create_memory_object_stream[bytes](buffer)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](buffer)
    a = StapledByteStream(_Send(a_send), _Receive(a_receive))
    b = StapledByteStream(_Send(b_send), _Receive(b_receive))
    return a, b
