"""Reusable hostile-client plays and row builders shared by the case tables."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio

from stalk.errors import ConnectionLost, HandshakeFailed, StalkError
from stalk.spack import Spack
from stalk.wire import CloseCode, RecordKind

from .harness import Attack, Case, Direction, Expect, Target, eventually, finish
from .peers import ChannelPeer, Initiator, Transport, client_handshake, close, reset

#: What an honest client sends before an attack; each travels in its own Noise message.
LEGIT = (Spack("legit", 1), Spack("legit", 2, b"\x00" * 10, [1.5, None]))
A = Spack("frame", "A")
B = Spack("frame", "B")

Build = Callable[[Transport], bytes]


async def send_raw(
    target: Target,
    data: bytes,
    *,
    eof: bool = True,
    chunk: int | None = None,
    pause: float = 0.0,
    reset: bool = False,
) -> Attack:
    """Send ``data`` (optionally in ``chunk``-byte writes), then half-close or stall or RST.

    A stalling attack (``eof`` false) keeps trickling while it waits for stalk to close,
    and its ``elapsed`` counts from the connection's start (the deadline is absolute).
    """
    opened = anyio.current_time()
    wire = await target.wire()
    if chunk and not eof:
        async with anyio.create_task_group() as tg:
            tg.start_soon(wire.trickle, data, chunk, pause)
            attack = await finish(wire, eof=False, since=opened)
            tg.cancel_scope.cancel()
        return attack
    if chunk:
        await wire.trickle(data, chunk, pause)
    else:
        await wire.send(data)
    if reset:
        port = wire.local_port
        await wire.reset()
        return Attack([port], reset=True)
    return await finish(wire, eof=eof, since=None if eof else opened)


async def after_handshake(
    target: Target,
    build: Build,
    *,
    ik: bool = False,
    legit: tuple[Spack, ...] = LEGIT,
    delivered_too: tuple[Spack, ...] = (),
    eof: bool = True,
    reset: bool = False,
) -> Attack:
    """A real handshake, the legit spacks (one Noise message each), then ``build(t)``.

    :param delivered_too: spacks inside ``build``'s bytes that stalk must deliver (they
        precede the attacked message, e.g. the frames a replay repeats).
    :param reset: end with a TCP RST (once stalk delivered the legit spacks) instead of
        a half-close.
    """
    wire = await target.wire()
    transport = await client_handshake(wire, Initiator(server=target.server if ik else None))
    for spack in legit:
        await wire.send(transport.spacks(spack))
    await wire.send(build(transport))
    if reset:
        port = wire.local_port
        expected = len(legit) + len(delivered_too)
        served = target.env.registry.served
        await eventually(
            lambda: port in served and len(served[port].received) == expected,
            "legit spacks delivered before the reset",
        )
        await wire.reset()
        return Attack([port], legit=[*legit, *delivered_too], reset=True)
    return await finish(wire, transport, legit=[*legit, *delivered_too], eof=eof)


async def before_ready(
    target: Target, build: Build, *, delivered: tuple[Spack, ...] = ()
) -> Attack:
    """IK: a real handshake whose first transport message (due to carry READY) is forged."""
    wire = await target.wire()
    transport = await client_handshake(wire, Initiator(server=target.server), ready=False)
    await wire.send(build(transport))
    return await finish(wire, transport, legit=list(delivered))


async def handshake_with(target: Target, make: Callable[[Target], Initiator]) -> Attack:
    """Run a (doctored) handshake; the listener must refuse or fail it.

    Should the listener accept it after all, the connection is half-closed and the row's
    ``established=False`` expectation fails.
    """
    wire = await target.wire()
    init = make(target)
    try:
        transport = await client_handshake(wire, init)
    except Exception:
        # Our own side may fail too (stalk answered with a refusal, or with a message 2
        # we cannot read): what matters is the listener's outcome.
        return await finish(wire)
    return await finish(wire, transport)


def row(
    category: str,
    direction: Direction,
    case_id: str,
    sends: str,
    expect: Expect,
    run: Callable[..., Any],
    **options: Any,
) -> Case:
    """A :class:`Case` (keyword options pass through: ``slow``, ``bug``...)."""
    return Case(case_id, category, direction, sends, expect, run, **options)


def play(
    fn: Callable[..., Awaitable[Attack]], /, *args: object, **kwargs: object
) -> Callable[..., Awaitable[Attack]]:
    """``partial`` with a name that reads well in the tables."""
    return partial(fn, *args, **kwargs)


async def honest_session(
    target: Target,
    *,
    ik: bool = False,
    splitter: Callable[[bytes], list[bytes]] | None = None,
    pause: float = 0.0,
    spacks: tuple[Spack, ...] = LEGIT,
    batch: bool = False,
    one_write: bool = False,
) -> Attack:
    """A fully valid session (handshake, spacks, CLOSE) delivered in an unusual shape.

    :param splitter: how the client's writes are cut (see :attr:`Wire.splitter`).
    :param batch: all spacks in one Noise message (else one each).
    :param one_write: every transport frame and the CLOSE in a single write.
    """
    wire = await target.wire()
    wire.splitter, wire.pause = splitter, pause
    transport = await client_handshake(wire, Initiator(server=target.server if ik else None))
    frames = [transport.spacks(*spacks)] if batch else [transport.spacks(s) for s in spacks]
    frames.append(transport.seal(close()))
    if one_write:
        await wire.send(b"".join(frames))
    else:
        for frame in frames:
            await wire.send(frame)
    return await finish(wire, transport, legit=list(spacks))


# -- expectations used by many rows -----------------------------------------------------------

#: The listener refuses a non-stalk or unsupported opening with UNSUPPORTED.
UNSUPPORTED = Expect(HandshakeFailed, False, code=CloseCode.UNSUPPORTED)
#: The listener refuses a malformed opening with PROTOCOL_ERROR.
MALFORMED = Expect(HandshakeFailed, False, code=CloseCode.PROTOCOL_ERROR)
#: The handshake fails after the listener already answered (no refusal is possible).
HS_FAILED = Expect(HandshakeFailed, False)
#: The IK message 1 did not decrypt with the listener's key.
UNDECRYPTABLE = Expect(HandshakeFailed, False, code=CloseCode.DECRYPT_FAILED)
#: A valid, if unusual, session: clean end, everything delivered, CLOSE(NORMAL) back.
CLEAN = Expect(anyio.EndOfStream, True, code=CloseCode.NORMAL)
#: The stream was cut (EOF or reset without CLOSE) after the handshake.
CUT = Expect(ConnectionLost, True)


def broken(error: type[StalkError], code: int = CloseCode.PROTOCOL_ERROR) -> Expect:
    """An established connection killed by a protocol error; the peer gets a CLOSE."""
    return Expect(error, True, code=code)


# -- channels: the rapid open/reset flood (CVE-2023-44487) -------------------------------------

#: The first piece of a spack that never completes: it opens a channel, delivers nothing.
PIECE = Spack("never completed", bytes(64)).encode()[:12]


def opened_and_reset(peer: ChannelPeer, channel: int) -> bytes:
    """The rapid-reset pair: a piece that opens ``channel`` (nothing to deliver), its RESET."""
    return peer.data(RecordKind.FRAGMENT, channel, PIECE) + reset(channel, 0x1000, b"never mind")


@dataclass
class Flood:
    """A rapid open/reset flood: how far it went.

    :ivar count: channels to open and reset (``None``: no such limit).
    :ivar deadline: open no more channels from this ``anyio.current_time()`` on.
    :ivar opened: channels opened and reset so far.
    :ivar most: the most channels in flight at once (opened, their answer not read).
    """

    count: int | None = None
    deadline: float | None = None
    opened: int = 0
    most: int = 0

    def more(self) -> bool:
        """Whether to open another channel."""
        if self.count is not None and self.opened >= self.count:
            return False
        return self.deadline is None or anyio.current_time() < self.deadline


async def rapid_reset(peer: ChannelPeer, flood: Flood) -> None:
    """Open and reset channels as fast as the victim frees their places.

    Each Noise message opens and resets as many channels as have a free place (the
    victim's limit, less channel 1, which stays open, and the channels whose answering
    RESET has not come), within the connection's credit (the pieces' bytes come back as
    CONNECTION_WINDOW, SPEC 24 "Reset"); then the victim's next message is read. Returns
    once the flood opened what it may (:meth:`Flood.more`) and every channel was answered.
    """
    in_flight: set[int] = set()
    next_id = 3
    while in_flight or flood.more():
        batch: list[bytes] = []
        room = peer.theirs.max_channels - 1 - len(in_flight)
        while room > 0 and flood.more() and peer.connection_credit >= len(PIECE):
            batch.append(opened_and_reset(peer, next_id))
            in_flight.add(next_id)
            next_id, flood.opened, room = next_id + 2, flood.opened + 1, room - 1
        if batch:
            await peer.wire.send(peer.seal(*batch))
        flood.most = max(flood.most, len(in_flight))
        for record in await peer.records():
            if record.kind is RecordKind.RESET:
                in_flight.discard(record.channel)
