"""A fault-injecting TCP proxy for stalk, and the sans-IO mutator it is built on.

Theory of operation
-------------------
A stalk connection is two independent byte streams (SPEC "Byte stream"). Each is a sequence
of *units* the proxy can parse without any key: the initiator's 8-byte preamble or the
responder's verdict (one byte, or a refusal), then ``u16`` length-prefixed frames. Unit 0 is
the preamble (client to server, ``c2s``) or the verdict (``s2c``); unit ``k >= 1`` is the
``k``-th frame. After a refusal verdict the rest of that direction is passed through as is.

A :class:`Mutator` is the sans-IO core: it is fed the *honest* bytes of one direction and
returns :class:`Action` values (bytes to write as one write, pauses, half-close, close, reset)
with its :class:`Fault` list applied at unit granularity. Because it is sans-IO, the same
mutator drives both the socket proxy (:class:`FaultProxy`) and in-memory pumps between two
sans-IO :class:`~stalk.session.Session` objects (``tests/test_faults.py``). Every fault that
actually took effect is recorded in :attr:`Mutator.applied` (a fault aimed at a unit that
never came is not counted).

Fault kinds (``DESTRUCTIVE`` change what the receiver gets; ``BENIGN`` change only timing or
segmentation, so the application must see every message intact):

- ``flip``: XOR one bit; ``insert``: insert bytes; ``delete``: delete bytes (byte offsets
  are inside the unit, header included);
- ``drop``, ``dup``, ``reorder`` (swap with the next unit): whole frames;
- ``fin`` (half-close toward the receiver, the rest of the direction is discarded),
  ``close`` (both directions, FIN), ``rst`` (both directions, ``SO_LINGER`` 0 then close:
  a TCP reset), each after ``offset`` bytes of the unit;
- ``stall``: pause forwarding this direction for ``seconds`` before the unit (benign when
  shorter than every timeout, destructive when longer);
- ``trickle``: from this unit on, forward one byte per write (at most ``TRICKLE_CAP`` bytes);
- ``reseg``: split the unit into two writes at ``offset``.

:class:`FaultProxy` gives every faulted connection its own route (a one-shot listener on
127.0.0.1), so a test always knows which faults hit which client connection.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup

from stalk.config import Config
from stalk.connection import Authorize
from stalk.identity import Identity
from stalk.listener import Listener

__all__ = [
    "BENIGN",
    "DESTRUCTIVE",
    "FRAME_KINDS",
    "KINDS",
    "TRICKLE_CAP",
    "Action",
    "Applied",
    "Close",
    "Direction",
    "Fault",
    "FaultProxy",
    "GuardedSocketListener",
    "HalfClose",
    "Mutator",
    "Pause",
    "Reset",
    "Route",
    "Send",
    "guarded_listener",
    "reset_stream",
]

Direction = Literal["c2s", "s2c"]

#: kinds that change the bytes the receiver gets
DESTRUCTIVE = frozenset(
    {"flip", "insert", "delete", "drop", "dup", "reorder", "fin", "close", "rst"}
)
#: kinds that change only segmentation (the receiver must see exactly the same messages)
BENIGN = frozenset({"trickle", "reseg"})
#: every kind; a ``stall`` is benign or destructive depending on its length
KINDS = DESTRUCTIVE | BENIGN | {"stall"}
#: Kinds that operate on whole frames (never on the preamble or the verdict).
FRAME_KINDS = frozenset({"drop", "dup", "reorder"})
#: A trickle forwards at most this many bytes one at a time, then goes back to normal.
TRICKLE_CAP = 4096
_CUTS = frozenset({"fin", "close", "rst"})
_PREAMBLE_LEN = 8


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault aimed at unit ``unit`` of one direction (see the module docstring)."""

    kind: str
    direction: Direction
    unit: int
    offset: int = 0
    bit: int = 0
    data: bytes = b"\x00"
    count: int = 1
    seconds: float = 0.0
    #: the name a test reports this fault under (default: ``kind``)
    label: str = ""

    @property
    def name(self) -> str:
        """``label`` or ``kind``."""
        return self.label or self.kind

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.kind in FRAME_KINDS and self.unit < 1:
            raise ValueError(f"{self.kind} operates on frames (unit >= 1)")


@dataclass(frozen=True, slots=True)
class Applied:
    """A fault that took effect: on which unit, at which offset, and whether it changed bytes.

    ``effective`` is false for a ``reorder`` whose unit had no successor (it was only
    delayed to the end of the stream).
    """

    fault: Fault
    unit_len: int
    offset: int
    effective: bool = True


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` in one write; ``then_yield``: let the receiver run before the next."""

    data: bytes
    then_yield: bool = False


@dataclass(frozen=True, slots=True)
class Pause:
    """Stop forwarding this direction for ``seconds``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class HalfClose:
    """Half-close toward the receiver (TCP FIN); nothing more is forwarded this way."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close both directions (FIN both ways)."""


@dataclass(frozen=True, slots=True)
class Reset:
    """Reset both directions (``SO_LINGER`` 0, then close: TCP RST)."""


Action: TypeAlias = Send | Pause | HalfClose | Close | Reset


class _Splitter:
    """Cuts one honest direction into units (preamble/verdict, then frames)."""

    def __init__(self, direction: Direction) -> None:
        self._direction = direction
        self._buf = bytearray()
        self.index = 0
        #: after a refusal verdict: no more units, pass everything through
        self.raw = False

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """Complete units, plus raw bytes to pass through (after a refusal)."""
        if self.raw:
            return [], bytes(data)
        self._buf += data
        units: list[bytes] = []
        while (size := self._next_size()) is not None and len(self._buf) >= size:
            units.append(bytes(self._buf[:size]))
            del self._buf[:size]
            self.index += 1
            if self.raw:
                rest = bytes(self._buf)
                self._buf.clear()
                return units, rest
        return units, b""

    def _next_size(self) -> int | None:
        buf = self._buf
        if self.index == 0:
            if self._direction == "c2s":
                return _PREAMBLE_LEN
            if not buf:
                return None
            if buf[0] == 0:
                return 1
            if len(buf) < 2:
                return None
            self.raw = True  # a refusal: code, length, reason; then the responder closes
            return 2 + buf[1]
        if len(buf) < 2:
            return None
        return 2 + int.from_bytes(buf[:2], "big")

    def rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


@dataclass
class Mutator:
    """Applies ``faults`` to one direction of a stalk stream (sans-IO).

    Feed it the honest bytes with :meth:`feed` and the end of the stream with :meth:`end`;
    perform the returned actions in order.
    """

    direction: Direction
    faults: Iterable[Fault] = ()
    applied: list[Applied] = field(default_factory=list)
    #: units seen complete, and bytes in/out (for reports)
    units: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    #: true once a cut happened (everything after it is discarded)
    terminated: bool = False

    def __post_init__(self) -> None:
        self._splitter = _Splitter(self.direction)
        self._by_unit: dict[int, list[Fault]] = {}
        for fault in self.faults:
            if fault.direction == self.direction:
                self._by_unit.setdefault(fault.unit, []).append(fault)
        self._held: bytes | None = None
        self._held_fault: Fault | None = None
        self._trickle_left = 0

    def feed(self, data: bytes) -> list[Action]:
        """Actions for newly received honest bytes."""
        self.bytes_in += len(data)
        if self.terminated:
            return []
        units, raw = self._splitter.feed(data)
        actions: list[Action] = []
        for unit in units:
            actions += self._unit(self.units, unit)
            self.units += 1
            if self.terminated:
                return self._count(actions)
        if raw:
            actions.append(Send(raw))
        return self._count(actions)

    def end(self) -> list[Action]:
        """Actions at the end of the honest stream: flush what is left, then half-close."""
        if self.terminated:
            return []
        actions: list[Action] = []
        rest = self._splitter.rest()
        if rest:
            actions.append(Send(rest))
        actions += self._release(swapped=False)
        actions.append(HalfClose())
        return self._count(actions)

    def settle(self) -> None:
        """Record a unit a ``reorder`` still holds: it never went out (in effect, dropped).

        Call once the connection is over, before reading :attr:`applied`.
        """
        if self._held is not None and self._held_fault is not None:
            self.applied.append(Applied(self._held_fault, len(self._held), 0))
            self._held = None
            self._held_fault = None

    def _count(self, actions: list[Action]) -> list[Action]:
        merged: list[Action] = []
        for action in actions:
            if isinstance(action, Send):
                if not action.data:
                    continue
                self.bytes_out += len(action.data)
                last = merged[-1] if merged else None
                if isinstance(last, Send) and not last.then_yield and not action.then_yield:
                    merged[-1] = Send(last.data + action.data)
                    continue
            merged.append(action)
        return merged

    def _unit(self, index: int, unit: bytes) -> list[Action]:
        faults = self._by_unit.get(index, ())
        actions: list[Action] = []
        data = bytearray(unit)
        pieces: list[bytes] | None = None
        cut: tuple[int, Action] | None = None
        hold: Fault | None = None
        split: int | None = None
        for fault in faults:
            kind = fault.kind
            if kind == "stall":
                actions.append(Pause(fault.seconds))
                self._record(fault, unit, 0)
            elif kind == "flip":
                offset = fault.offset % len(data)
                data[offset] ^= 1 << (fault.bit % 8)
                self._record(fault, unit, offset)
            elif kind == "insert":
                offset = min(fault.offset, len(data))
                data[offset:offset] = fault.data
                self._record(fault, unit, offset)
            elif kind == "delete":
                offset = fault.offset % len(data)
                del data[offset : offset + max(1, fault.count)]
                self._record(fault, unit, offset)
            elif kind == "drop":
                pieces = []
                self._record(fault, unit, 0)
            elif kind == "dup":
                pieces = [bytes(data), bytes(data)]
                self._record(fault, unit, 0)
            elif kind == "reorder":
                hold = fault
            elif kind in _CUTS:
                offset = fault.offset % max(1, len(data))
                terminal: Action = (
                    HalfClose() if kind == "fin" else Close() if kind == "close" else Reset()
                )
                cut = (offset, terminal)
                self._record(fault, unit, offset)
            elif kind == "trickle":
                self._trickle_left = TRICKLE_CAP
                self._record(fault, unit, 0)
            elif kind == "reseg" and len(data) > 1:
                split = 1 + fault.offset % (len(data) - 1)
                self._record(fault, unit, split)
        if pieces is None:
            pieces = [bytes(data)]
        if cut is not None:
            offset, terminal = cut
            actions += self._emit([bytes(data[:offset])], None)
            actions.append(terminal)
            self.terminated = True
            return actions
        if hold is not None:
            # The held unit goes out right after the next one (or at the end of the stream).
            actions += self._release(swapped=False)
            self._held = b"".join(pieces)
            self._held_fault = hold
            return actions
        actions += self._emit(pieces, split)
        actions += self._release(swapped=True)
        return actions

    def _release(self, *, swapped: bool) -> list[Action]:
        if self._held is None or self._held_fault is None:
            return []
        held, fault = self._held, self._held_fault
        self._held = None
        self._held_fault = None
        self.applied.append(Applied(fault, len(held), 0, effective=swapped))
        return self._emit([held], None)

    def _emit(self, pieces: Sequence[bytes], split: int | None) -> list[Action]:
        actions: list[Action] = []
        for piece in pieces:
            if self._trickle_left > 0:
                n = min(len(piece), self._trickle_left)
                self._trickle_left -= n
                actions += [Send(piece[i : i + 1], then_yield=True) for i in range(n)]
                if n < len(piece):
                    actions.append(Send(piece[n:]))
            elif split is not None and 0 < split < len(piece):
                actions += [Send(piece[:split], then_yield=True), Send(piece[split:])]
            else:
                actions.append(Send(piece))
        return actions

    def _record(self, fault: Fault, unit: bytes, offset: int) -> None:
        self.applied.append(Applied(fault, len(unit), offset))


# -- the socket proxy ---------------------------------------------------------------------------


def reset_stream(stream: SocketStream) -> None:
    """Arm ``stream`` so that closing it sends a TCP RST (``SO_LINGER`` on, 0 seconds)."""
    with contextlib.suppress(OSError, anyio.TypedAttributeLookupError):
        raw = stream.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@dataclass
class Route:
    """One proxied connection: where the client dials, and what the proxy did."""

    address: tuple[str, int]
    c2s: Mutator
    s2c: Mutator
    #: set once both directions are finished (or the connection was cut)
    done: anyio.Event = field(default_factory=anyio.Event)
    #: any exception the proxy itself raised (a bug in the harness, never expected)
    errors: list[BaseException] = field(default_factory=list)
    #: which endpoint reset or closed first, for reports
    notes: list[str] = field(default_factory=list)

    @property
    def applied(self) -> list[Applied]:
        """Every fault that took effect, both directions."""
        return self.c2s.applied + self.s2c.applied


class FaultProxy:
    """Forwards client connections to ``target`` through :class:`Mutator` s, one route each."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target

    @asynccontextmanager
    async def route(self, faults: Sequence[Fault], *, linger: float = 5.0) -> AsyncIterator[Route]:
        """A one-shot listener on 127.0.0.1 that proxies the first connection it accepts.

        On exit, waits up to ``linger`` seconds for the proxied connection to finish, then
        resets whatever is left.
        """
        multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        listener = multi.listeners[0]
        if not isinstance(listener, anyio.abc.SocketListener):  # pragma: no cover
            raise TypeError("expected a TCP socket listener")
        port = listener.extra(SocketAttribute.local_port)
        route = Route(("127.0.0.1", port), Mutator("c2s", faults), Mutator("s2c", faults))
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._serve_one, listener, route)
            try:
                yield route
                with anyio.move_on_after(linger):
                    await route.done.wait()
            finally:
                tg.cancel_scope.cancel()

    async def _serve_one(self, listener: anyio.abc.SocketListener, route: Route) -> None:
        client: SocketStream | None = None
        server: SocketStream | None = None
        try:
            async with listener:
                client = await listener.accept()
            try:
                server = await anyio.connect_tcp(*self.target)
            except OSError:
                reset_stream(client)
                return
            pair = _Pair(client, server)
            async with anyio.create_task_group() as tg:
                pair.scope = tg.cancel_scope
                tg.start_soon(self._pump, pair, client, server, route.c2s, route)
                tg.start_soon(self._pump, pair, server, client, route.s2c, route)
        except anyio.get_cancelled_exc_class():
            if client is not None:
                reset_stream(client)
            if server is not None:
                reset_stream(server)
            raise
        except Exception as exc:  # a harness bug: report it, never hide it
            route.errors.append(exc)
        finally:
            with anyio.CancelScope(shield=True):
                for stream in (client, server):
                    if stream is not None:
                        await anyio.aclose_forcefully(stream)
            route.done.set()

    async def _pump(
        self,
        pair: _Pair,
        src: SocketStream,
        dst: SocketStream,
        mutator: Mutator,
        route: Route,
    ) -> None:
        """Relay one direction between two sockets through the mutator.

        A socket relay, not helpers.pump (which moves bytes between two sans-IO sessions).
        """
        while True:
            try:
                data = await src.receive(65536)
            except anyio.EndOfStream:
                await self._run(pair, dst, mutator.end(), route)
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                # The endpoint reset its connection: pass the reset on.
                route.notes.append(f"{mutator.direction}: source reset")
                await pair.terminate(reset=True)
                return
            await self._run(pair, dst, mutator.feed(data), route)

    async def _run(
        self, pair: _Pair, dst: SocketStream, actions: list[Action], route: Route
    ) -> None:
        for action in actions:
            if isinstance(action, Send):
                try:
                    await dst.send(action.data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    route.notes.append("destination gone")
                    await pair.terminate(reset=True)
                    return
                if action.then_yield:
                    await anyio.sleep(0)  # a checkpoint, not a wait
            elif isinstance(action, Pause):
                await anyio.sleep(action.seconds)  # the fault itself: a stall on the link
            elif isinstance(action, HalfClose):
                with contextlib.suppress(
                    anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
                ):
                    await dst.send_eof()
            elif isinstance(action, Close):
                await pair.terminate(reset=False)
                return
            else:
                await pair.terminate(reset=True)
                return


@dataclass
class _Pair:
    client: SocketStream
    server: SocketStream
    scope: anyio.CancelScope | None = None

    async def terminate(self, *, reset: bool) -> None:
        with anyio.CancelScope(shield=True):
            for stream in (self.client, self.server):
                if reset:
                    reset_stream(stream)
                await anyio.aclose_forcefully(stream)
        if self.scope is not None:
            self.scope.cancel()


# -- a listener that survives its connection handlers -------------------------------------------


class GuardedSocketListener(anyio.abc.Listener[SocketStream]):
    """A TCP listener whose per-connection handlers cannot take the listener down.

    anyio's ``serve`` runs every handler in one task group, so an exception that escapes a
    handler (for stalk: one that escapes ``Listener._handle``) cancels the whole listener.
    Fault tests wrap the listening socket in this to keep serving, and record each escaped
    exception in :attr:`escaped` so that the test can assert on them. Every accepted socket
    is closed when its handler ends, however it ends (stalk's own listener leaves them open
    when it is cancelled: ``test_limits.py`` reproduces that).
    """

    def __init__(self, inner: anyio.abc.Listener[SocketStream]) -> None:
        self._inner = inner
        self.escaped: list[Exception] = []

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The wrapped listener's attributes (local address...)."""
        return self._inner.extra_attributes

    async def aclose(self) -> None:
        """Close the listening socket."""
        await self._inner.aclose()

    async def serve(
        self, handler: Callable[[SocketStream], Any], task_group: TaskGroup | None = None
    ) -> None:
        """Accept forever; record instead of propagate what escapes ``handler``."""

        async def guarded(stream: SocketStream) -> None:
            try:
                await handler(stream)
            except Exception as exc:
                self.escaped.append(exc)
            finally:
                # Whatever happened (a crash, or the listener was cancelled with handlers
                # still running), never leave the socket to the garbage collector.
                await anyio.aclose_forcefully(stream)

        await self._inner.serve(guarded, task_group)


async def guarded_listener(
    identity: Identity,
    *,
    authorize: Authorize | None = None,
    config: Config | None = None,
) -> tuple[Listener, GuardedSocketListener]:
    """A stalk :class:`~stalk.Listener` on 127.0.0.1 over a :class:`GuardedSocketListener`."""
    sockets = GuardedSocketListener(await anyio.create_tcp_listener(local_host="127.0.0.1"))
    return Listener(sockets, identity, authorize, config or Config()), sockets
