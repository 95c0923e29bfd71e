"""Exhaustive sans-IO sweeps: every bit flip and every cut of recorded stalk transcripts.

Three byte-exact transcripts are recorded once, with fixed static and ephemeral keys, so
every case is reproducible from its (transcript, direction, offset, bit) alone:

- ``xx``: a complete XX session (handshake, a spack each way, CLOSE each way);
- ``ik``: the same over IK;
- ``transport``: an XX session whose transport phase has a batch of spacks, a spack batched
  with the start of a fragmented one (with a REKEY between its FRAGMENT and its MESSAGE),
  PING/PONG both ways, a requested REKEY, and CLOSE batched after a spack.

The attacker controls one direction of the TCP stream. For each direction, a fresh receiving
Session (same keys, same ephemeral, so it answers exactly as in the recording) is fed the
tampered stream whole, then EOF. The oracle is the honest replay of the same direction, fed
unit by unit (preamble or verdict, then one frame at a time), which gives the events each
unit produces; the honest replay itself is checked against what was sent (spacks, pings).

Properties checked for every case:

- **flip** (one bit, anywhere): the receiver produces exactly the honest events of the units
  *before* the tampered one, then fails with a typed error (HandshakeFailed during the
  handshake, ProtocolError or ConnectionLost after it); the error is terminal; nothing is
  ever delivered from the tampered unit on, and there is never a CLOSE.
- **truncation** (cut after every byte, then EOF): exactly the honest events of the complete
  units, then a truncation error (HandshakeFailed during the handshake, ConnectionLost after
  it), never a clean close, except for the cut after the very last byte.
- **split** (the stream in two chunks, cut at every offset): exactly the honest outcome.

Any exception that is not a StalkError is a failure. Frame bodies larger than
``BIG_UNIT`` bytes (the 64 KiB transport frames) are sampled by default (their edges and a
stride of their interior: every interior byte of a ciphertext is equivalent to the AEAD);
``pytest -m slow`` sweeps every bit of every byte and every cut of every stream.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import anyio
import pytest

from helpers import echo, pump, take_all
from stalk.connection import connect
from stalk.errors import ConnectionLost, HandshakeFailed, ProtocolError, StalkError
from stalk.events import (
    NEED_DATA,
    PAUSED,
    CloseReceived,
    Event,
    HandshakeComplete,
    MessageReceived,
    PeerIdentified,
    PongReceived,
)
from stalk.identity import Identity
from stalk.listener import create_listener
from stalk.session import Role, Session, SessionState
from stalk.spack import Float32, Spack
from stalk.wire import Pattern

Direction = Literal["c2s", "s2c"]
DIRECTIONS: tuple[Direction, ...] = ("c2s", "s2c")

CLIENT = Identity.from_private_bytes(bytes(range(1, 33)))
SERVER = Identity.from_private_bytes(bytes(range(33, 65)))
CLIENT_EPHEMERAL = bytes(range(65, 97))
SERVER_EPHEMERAL = bytes(range(97, 129))

#: Units (frames) longer than this are sampled unless the sweep is exhaustive.
BIG_UNIT = 2048
#: Sampled big units: this many bytes at each edge, and every STRIDE-th byte in between.
EDGE = 48
STRIDE = 397


def new_session(role: Role, pattern: Pattern, cls: type[Session] = Session) -> Session:
    """A session with the fixed keys: it writes exactly the recorded bytes."""
    if role is Role.INITIATOR:
        return cls(
            Role.INITIATOR,
            CLIENT,
            peer=SERVER.public if pattern == "IK" else None,
            ephemeral_for_testing_only=CLIENT_EPHEMERAL,
        )
    return cls(Role.RESPONDER, SERVER, ephemeral_for_testing_only=SERVER_EPHEMERAL)


def receiver_role(direction: Direction) -> Role:
    return Role.RESPONDER if direction == "c2s" else Role.INITIATOR


class Replaying(Session):
    """A receiver that sends the PINGs its original sent (once open; what it writes is
    dropped), so the PONGs in the stream answer PINGs of its own (SPEC "Ping")."""

    pings: tuple[bytes, ...] = ()


def replaying(role: Role, pattern: Pattern, pings: Sequence[bytes]) -> Replaying:
    session = new_session(role, pattern, Replaying)
    assert isinstance(session, Replaying)
    session.pings = tuple(pings)
    return session


# -- driving a receiver -------------------------------------------------------------------


@dataclass
class Outcome:
    """What a receiver did with some input: its events, and the error that ended it."""

    events: list[Event]
    #: ``len(events)`` after each chunk was fed and drained.
    marks: list[int]
    error: StalkError | None
    session: Session


def pull(session: Session, events: list[Event]) -> None:
    """Take every event the session can produce now; accept any identified peer.

    Not :func:`helpers.drain`: a replaying receiver reads on past PAUSED (its writes are
    dropped), sends its pings once open, and a CLOSE is recorded once.
    """
    while True:
        event = session.next_event()
        if event is NEED_DATA:
            return
        if event is PAUSED:
            take_all(session)  # a replay: what it writes is dropped
            continue
        if isinstance(event, CloseReceived):
            # next_event() repeats the CLOSE once nothing more can happen: record it once.
            if not any(isinstance(e, CloseReceived) for e in events):
                events.append(event)
            return
        events.append(event)
        if isinstance(event, PeerIdentified):
            session.accept()
        elif isinstance(event, HandshakeComplete) and isinstance(session, Replaying):
            for ping in session.pings:
                session.ping(ping)
            take_all(session)


def pulled(session: Session) -> list[Event]:
    """:func:`pull` into a fresh list: a ``collect`` for :func:`helpers.pump`."""
    events: list[Event] = []
    pull(session, events)
    return events


def feed(session: Session, chunks: Sequence[bytes], *, eof: bool = True) -> Outcome:
    """Feed ``chunks`` (draining after each), then EOF; stop at the first StalkError.

    Any other exception propagates: the sweeps report it as an untyped failure.
    """
    events: list[Event] = []
    marks: list[int] = []
    try:
        for chunk in chunks:
            session.receive_data(chunk)
            pull(session, events)
            marks.append(len(events))
        if eof:
            session.receive_data(b"")
            pull(session, events)
    except StalkError as exc:
        return Outcome(events, marks, exc, session)
    return Outcome(events, marks, None, session)


# -- transcripts ----------------------------------------------------------------------------


class Recorder:
    """Two live sessions wired back to back; records every byte each one writes."""

    def __init__(self, pattern: Pattern) -> None:
        self.pattern: Pattern = pattern
        self.sessions = {
            Role.INITIATOR: new_session(Role.INITIATOR, pattern),
            Role.RESPONDER: new_session(Role.RESPONDER, pattern),
        }
        self.wire: dict[Direction, bytearray] = {"c2s": bytearray(), "s2c": bytearray()}
        self.spacks: dict[Direction, list[Spack]] = {"c2s": [], "s2c": []}
        self.pings: dict[Direction, list[bytes]] = {"c2s": [], "s2c": []}
        self.pump()

    @staticmethod
    def direction(role: Role) -> Direction:
        return "c2s" if role is Role.INITIATOR else "s2c"

    def pump(self) -> None:
        def record(src: Session, data: bytes) -> None:
            self.wire[self.direction(src.role)] += data

        # The receiver is pulled as the sweeps pull it (accepting, its own writes on PAUSED
        # dropped); a sender is not pulled again after its output left.
        pump(
            self.sessions[Role.INITIATOR],
            self.sessions[Role.RESPONDER],
            collect=pulled,
            tap=record,
            collect_sender=False,
        )

    def queue(self, role: Role, *spacks: Spack) -> None:
        for spack in spacks:
            self.sessions[role].queue(spack)
            self.spacks[self.direction(role)].append(spack)

    def flush(self, role: Role) -> None:
        self.sessions[role].flush()
        self.pump()

    def send(self, role: Role, spack: Spack) -> None:
        self.queue(role, spack)
        self.flush(role)

    def ping(self, role: Role, payload: bytes) -> None:
        self.sessions[role].ping(payload)
        self.pings[self.direction(role)].append(payload)
        self.pump()

    def close(self, role: Role, reason: str) -> None:
        self.sessions[role].close(0, reason)
        self.pump()


@dataclass(frozen=True)
class Stream:
    """One direction of a transcript, cut into units, with the honest receiver's events."""

    transcript: str
    pattern: Pattern
    direction: Direction
    data: bytes
    #: (start, end) of each unit: the preamble or verdict, then one frame each.
    units: tuple[tuple[int, int], ...]
    #: Units up to (not including) this index belong to the handshake messages.
    first_transport_unit: int
    #: The honest receiver's events, and len(events) after each unit.
    events: tuple[Event, ...]
    marks: tuple[int, ...]
    #: The PINGs the receiving side sent in the original session.
    pings: tuple[bytes, ...]

    def unit_at(self, offset: int) -> int:
        """Index of the unit holding byte ``offset``."""
        for index, (start, end) in enumerate(self.units):
            if start <= offset < end:
                return index
        raise IndexError(offset)

    def events_before(self, unit: int) -> list[Event]:
        """The honest events of units ``0 .. unit - 1``."""
        return list(self.events[: self.marks[unit - 1]]) if unit else []

    def complete_units(self, cut: int) -> int:
        """How many whole units the first ``cut`` bytes hold."""
        return sum(1 for _, end in self.units if end <= cut)

    def receiver(self) -> Session:
        return replaying(receiver_role(self.direction), self.pattern, self.pings)


def split_units(data: bytes, direction: Direction) -> tuple[tuple[int, int], ...]:
    """Our own parse of the stream: 8-byte preamble or 1-byte verdict, then u16 frames."""
    pos = 8 if direction == "c2s" else 1
    units = [(0, pos)]
    while pos < len(data):
        end = pos + 2 + int.from_bytes(data[pos : pos + 2], "big")
        assert end <= len(data), "the recording ends inside a frame"
        units.append((pos, end))
        pos = end
    return tuple(units)


def script_basic(rec: Recorder) -> None:
    """A complete session: a spack each way, then each side closes."""
    rec.send(Role.INITIATOR, Spack("hello", 1, b"\x00\xff"))
    rec.send(Role.RESPONDER, Spack("hi", [1.5, None]))
    rec.close(Role.INITIATOR, "client done")
    rec.send(Role.RESPONDER, Spack("after your close"))
    rec.close(Role.RESPONDER, "server done")


def script_transport(rec: Recorder) -> None:
    """Batches, fragmentation across a rekey, ping/pong both ways, rekey, batched CLOSE."""
    client, server = Role.INITIATOR, Role.RESPONDER
    rec.queue(client, Spack(1), Spack("two", b"2"), Spack(Float32(3.0), (3,)), Spack())
    rec.flush(client)
    rec.send(server, Spack("s1"))
    # A spack that nearly fills one Noise message, then one that does not fit: it is
    # fragmented (FRAGMENT in the first message, MESSAGE in the next), and the requested
    # REKEY lands between its two pieces.
    rec.sessions[client].request_rekey()
    rec.queue(client, Spack(b"A" * 64_000), Spack("B", b"b" * 2_000))
    rec.flush(client)
    rec.ping(client, b"ping from client")
    rec.ping(server, b"ping from server")
    rec.sessions[client].request_rekey()
    rec.send(client, Spack("rekeyed after this"))
    rec.send(client, Spack("under the new key"))
    rec.send(server, Spack("s2", {"k": [1, 2]}))
    rec.queue(client, Spack("last"))
    rec.close(client, "client done")
    rec.close(server, "server done")


TRANSCRIPTS: dict[str, tuple[Pattern, Callable[[Recorder], None]]] = {
    "xx": ("XX", script_basic),
    "ik": ("IK", script_basic),
    "transport": ("XX", script_transport),
}


@cache
def stream(name: str, direction: Direction) -> Stream:
    pattern, script = TRANSCRIPTS[name]
    rec = Recorder(pattern)
    script(rec)
    data = bytes(rec.wire[direction])
    units = split_units(data, direction)
    other: Direction = "s2c" if direction == "c2s" else "c2s"
    receiver = replaying(receiver_role(direction), pattern, rec.pings[other])
    honest = feed(receiver, [data[a:b] for a, b in units])
    # The oracle is itself checked against what the sender really sent.
    assert honest.error is None, honest.error
    delivered = [e.spack for e in honest.events if isinstance(e, MessageReceived)]
    assert [s.encode() for s in delivered] == [s.encode() for s in rec.spacks[direction]]
    pongs = [e.payload for e in honest.events if isinstance(e, PongReceived)]
    assert pongs == rec.pings[other]
    close = honest.events[-1]
    assert isinstance(close, CloseReceived)
    assert close.code == 0
    handshake_units = 3 if direction == "c2s" and pattern == "XX" else 2
    return Stream(
        transcript=name,
        pattern=pattern,
        direction=direction,
        data=data,
        units=units,
        first_transport_unit=handshake_units,
        events=tuple(honest.events),
        marks=tuple(honest.marks),
        pings=tuple(rec.pings[other]),
    )


def open_after(events: Sequence[Event]) -> bool:
    """Whether the receiver had completed its handshake after ``events``."""
    return any(isinstance(e, HandshakeComplete) for e in events)


# -- the sweeps -------------------------------------------------------------------------------


@dataclass
class Tally:
    """Counts cases and outcomes; keeps the first failures with a reproducer each."""

    label: str
    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def fail(self, case: str, problem: str) -> None:
        self.failures.append(f"{case}: {problem}")

    def report(self) -> str:
        elapsed = time.perf_counter() - self.started
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return f"{self.label}: {self.cases} cases in {elapsed:.2f} s ({outcomes})"

    def finish(self) -> None:
        print(self.report())
        shown = "\n".join(self.failures[:20])
        assert not self.failures, f"{len(self.failures)} failing cases, first ones:\n{shown}"


def offsets(s: Stream, *, exhaustive: bool, skip_units: int = 0) -> Iterator[int]:
    """Every byte offset of the units from ``skip_units`` on; big units sampled unless
    ``exhaustive``."""
    for start, end in s.units[skip_units:]:
        if exhaustive or end - start <= BIG_UNIT:
            yield from range(start, end)
        else:
            body = (start + 2 + EDGE, end - EDGE)
            yield from range(start, body[0])
            yield from range(body[0], body[1], STRIDE)
            yield from range(body[1], end)


def run_case(tally: Tally, case: str, session: Session, chunks: Sequence[bytes]) -> Outcome | None:
    tally.cases += 1
    try:
        return feed(session, chunks)
    except Exception as exc:  # anything but a StalkError is a bug
        tally.outcomes["UNTYPED"] += 1
        tally.fail(case, f"untyped {type(exc).__name__}: {exc}")
        return None


def check_failed(tally: Tally, case: str, out: Outcome, expected: list[Event]) -> None:
    """The receiver produced exactly ``expected``, then failed for good."""
    if out.events != expected:
        tally.fail(case, f"events {out.events!r}, expected {expected!r}")
    if out.error is None:
        tally.fail(case, f"no error (events {out.events!r})")
        return
    tally.outcomes[type(out.error).__name__] += 1
    if out.session.state is not SessionState.FAILED:
        tally.fail(case, f"state {out.session.state} after {out.error!r}")
    try:
        out.session.next_event()
    except StalkError as again:
        if again is not out.error:
            tally.fail(case, f"error changed from {out.error!r} to {again!r}")
    else:
        tally.fail(case, f"next_event() returned after {out.error!r}")


def sweep_flips(s: Stream, bits: Sequence[int], *, exhaustive: bool) -> Tally:
    tally = Tally(f"{s.transcript} {s.direction} bit flips")
    skip = s.first_transport_unit if s.transcript == "transport" else 0
    for offset in offsets(s, exhaustive=exhaustive, skip_units=skip):
        unit = s.unit_at(offset)
        expected = s.events_before(unit)
        for bit in bits:
            case = f"{s.transcript}/{s.direction} flip offset {offset} bit {bit}"
            data = bytearray(s.data)
            data[offset] ^= 1 << bit
            out = run_case(tally, case, s.receiver(), [bytes(data)])
            if out is None:
                continue
            check_failed(tally, case, out, expected)
            allowed: tuple[type[StalkError], ...] = (
                (ProtocolError, ConnectionLost) if open_after(expected) else (HandshakeFailed,)
            )
            if out.error is not None and not isinstance(out.error, allowed):
                tally.fail(case, f"{out.error!r} is not one of {allowed}")
    return tally


def sweep_truncations(s: Stream, *, exhaustive: bool) -> Tally:
    tally = Tally(f"{s.transcript} {s.direction} truncations")
    skip = s.first_transport_unit if s.transcript == "transport" else 0
    for cut in offsets(s, exhaustive=exhaustive, skip_units=skip):
        case = f"{s.transcript}/{s.direction} cut after {cut} bytes"
        out = run_case(tally, case, s.receiver(), [s.data[:cut]])
        if out is None:
            continue
        expected = s.events_before(s.complete_units(cut))
        check_failed(tally, case, out, expected)
        if open_after(expected):
            if not isinstance(out.error, ConnectionLost):
                tally.fail(case, f"{out.error!r} is not a truncation (ConnectionLost)")
        elif not isinstance(out.error, HandshakeFailed):
            tally.fail(case, f"{out.error!r} is not a failed handshake (cut during it)")
    # The one cut that is not a truncation: after the last byte, a clean close.
    case = f"{s.transcript}/{s.direction} whole stream"
    out = run_case(tally, case, s.receiver(), [s.data])
    if out is not None:
        tally.outcomes["clean close" if out.error is None else "ERROR"] += 1
        if out.error is not None or out.events != list(s.events):
            tally.fail(case, f"{out.error!r}, events {out.events!r}")
    return tally


def sweep_splits(s: Stream, *, exhaustive: bool) -> Tally:
    tally = Tally(f"{s.transcript} {s.direction} two-chunk splits")
    for cut in offsets(s, exhaustive=exhaustive):
        if cut == 0:
            continue  # an empty first chunk would be EOF
        case = f"{s.transcript}/{s.direction} split at {cut}"
        out = run_case(tally, case, s.receiver(), [s.data[:cut], s.data[cut:]])
        if out is None:
            continue
        tally.outcomes["clean close" if out.error is None else "ERROR"] += 1
        if out.error is not None or out.events != list(s.events):
            tally.fail(case, f"{out.error!r}, events {out.events!r}")
    case = f"{s.transcript}/{s.direction} one byte at a time"
    out = run_case(tally, case, s.receiver(), [s.data[i : i + 1] for i in range(len(s.data))])
    if out is not None and (out.error is not None or out.events != list(s.events)):
        tally.fail(case, f"{out.error!r}, events {out.events!r}")
    return tally


STREAMS = [(name, d) for name in TRANSCRIPTS for d in DIRECTIONS]
STREAM_IDS = [f"{name}-{d}" for name, d in STREAMS]
ALL_BITS = tuple(range(8))


@pytest.mark.parametrize(("name", "direction"), STREAMS, ids=STREAM_IDS)
def test_every_bit_flip_fails_typed_and_delivers_nothing_tampered(
    name: str, direction: Direction
) -> None:
    # Every bit of every byte of the handshake transcripts; big frame interiors sampled.
    sweep_flips(stream(name, direction), ALL_BITS, exhaustive=False).finish()


@pytest.mark.parametrize(("name", "direction"), STREAMS, ids=STREAM_IDS)
def test_every_truncation_is_reported_as_one(name: str, direction: Direction) -> None:
    sweep_truncations(stream(name, direction), exhaustive=False).finish()


@pytest.mark.parametrize(("name", "direction"), STREAMS, ids=STREAM_IDS)
def test_every_two_chunk_split_delivers_the_same(name: str, direction: Direction) -> None:
    sweep_splits(stream(name, direction), exhaustive=False).finish()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "direction"), STREAMS, ids=STREAM_IDS)
def test_exhaustive_sweeps(name: str, direction: Direction) -> None:
    s = stream(name, direction)
    sweep_flips(s, ALL_BITS, exhaustive=True).finish()
    sweep_truncations(s, exhaustive=True).finish()
    sweep_splits(s, exhaustive=True).finish()


def test_transcripts_have_the_intended_shape() -> None:
    """Guards the sweeps' coverage: the recorded streams hold what their docstring says."""
    transport = stream("transport", "c2s")
    big = [end - start for start, end in transport.units if end - start > BIG_UNIT]
    assert big == [2 + 65_535]  # the one full Noise message: MESSAGE + FRAGMENT + REKEY
    for name in ("xx", "ik"):
        for direction in DIRECTIONS:
            s = stream(name, direction)
            assert len(s.data) < 400, (name, direction, len(s.data))
    assert len(stream("xx", "c2s").units) == 3 + 2  # preamble, msg1, msg3, spack, CLOSE
    assert len(stream("ik", "c2s").units) == 2 + 3  # preamble, msg1, READY, spack, CLOSE


# -- regressions: what the truncation sweep found (fixed in 75d3c7a) ---------------------------


def confirmation_cases() -> Iterator[tuple[str, Stream, int]]:
    """Every cut inside the frame that confirms the handshake (SPEC "Confirmation").

    XX: the initiator waits for the responder's READY; IK: the responder waits for the
    initiator's READY. The cut is inside that frame, so the receiver is still confirming.
    """
    for name, direction in (("xx", "s2c"), ("ik", "c2s")):
        s = stream(name, direction)
        start, end = s.units[s.first_transport_unit]
        for cut in range(start + 1, end):
            yield f"{name}/{direction} cut after {cut} bytes", s, cut


def test_truncation_during_confirmation_is_a_failed_handshake() -> None:
    """EOF inside the READY frame was ConnectionLost (a mid-frame check came first)."""
    wrong = []
    for case, s, cut in confirmation_cases():
        out = feed(s.receiver(), [s.data[:cut]])
        assert not open_after(out.events)
        if not isinstance(out.error, HandshakeFailed):
            wrong.append(f"{case}: {out.error!r}")
    assert not wrong, "\n".join(wrong)


def test_truncation_at_the_confirming_frame_boundary_is_a_failed_handshake() -> None:
    """The half that works: EOF right before the READY frame is a failed handshake."""
    for name, direction in (("xx", "s2c"), ("ik", "c2s")):
        s = stream(name, direction)
        start, _ = s.units[s.first_transport_unit]
        out = feed(s.receiver(), [s.data[:start]])
        assert isinstance(out.error, HandshakeFailed), (name, direction, out.error)


async def test_listener_survives_a_cut_during_ik_confirmation() -> None:
    """The ConnectionLost above escaped Connection.wrap and killed Listener.serve().

    Any IK client that passed authorization (anyone when ``authorize`` is None; a replayed
    message 1 of an authorized client takes the same path) could stop the server with one
    byte of a frame and a FIN.
    """
    listener = await create_listener("127.0.0.1", 0, identity=SERVER)
    host, port = listener.address

    with anyio.fail_after(10):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            # The attacker: a real IK message 1 (any key: authorize is None), then one byte
            # of a frame header and EOF while the server waits for READY.
            attacker = Session(Role.INITIATOR, Identity.generate(), peer=SERVER.public)
            async with await anyio.connect_tcp(host, port) as raw:
                await raw.send(take_all(attacker))
                assert await raw.receive()  # verdict + message 2: the server is confirming
                await raw.send(b"\x00")
                await raw.send_eof()
                # The server has handled the cut once it ends this connection.
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:
                        await raw.receive()
            # The control client must still be served.
            async with await connect(host, port, SERVER.public) as conn:
                await conn.send(Spack("still there?"))
                assert await conn.receive() == Spack("still there?")
            tg.cancel_scope.cancel()
