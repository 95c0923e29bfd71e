"""Fault injection and cancellation: every faulted connection ends intact or with a typed error.

Three harnesses share one fault model (``tests/faultproxy.py``):

- **sockets**: stalk client -> :class:`~faultproxy.FaultProxy` on 127.0.0.1 -> stalk listener,
  on asyncio and trio. Every connection gets one primary fault (bit flip, inserted or deleted
  bytes, dropped/duplicated/reordered frame, FIN, close, RST, stall, 1-byte trickle,
  re-segmentation) and often an extra benign re-segmentation, aimed at a random unit of a
  random direction, chosen from a fixed seed (a failure names its case, which replays it).
- **sans-IO**: the same mutators between two :class:`~stalk.session.Session` objects, no
  sockets and no clock: the bulk of the fault count, cheaply.
- **cancellation**: ``connect``, ``send``, ``receive`` and ``aclose`` cancelled after ``k``
  scheduler ticks, for ``k = 0, 1, 2, ...`` until the operation completes uncancelled.

Every message carries ``(tag, connection id, sequence number, count, payload, sha256)``; the
receiver checks the digest and the sequence number, so a lost, duplicated, reordered,
corrupted or partial message is caught where it arrives. Outcomes of a faulted connection:

- *intact*: every message arrived, in order, and each side saw the other's clean CLOSE;
  required when the only faults were benign (trickle, re-segmentation, a short stall);
- *typed error*: a :class:`~stalk.StalkError` (or an ``anyio.BrokenResourceError``) within
  the deadline; required when a destructive fault reached a unit the receiver needed;
- *handshake timeout* (sans-IO only: no clock) when the handshake can no longer progress,
  and the application's own deadline for a stall longer than it in the transport phase
  (stalk has no idle timeout; README "Limits").

``anyio.EndOfStream`` is accepted only after every message arrived (it means the peer's
genuine CLOSE).

Fault counts: each connection carries one *primary* fault (destructive or benign, by the
weights below) plus benign re-segmentations of about a quarter of its units (``reseg``: the
unit goes out in two writes). Re-segmentations are counted as faults, separately by kind, so
the totals say how many of each were injected. A fault aimed at a unit that never came is
not counted. ``test_fault_count_reaches_target`` checks that the default run injects at least
10,000 destructive faults (re-segmentations and trickles on top).

Bugs this suite found are kept as deterministic regression tests at the end of this file
(and in ``test_limits.py``); the socket harness fails on any untyped error, including any
exception that escapes the listener.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, TypeVar

import anyio
import anyio.lowlevel
import pytest

from faultproxy import (
    FRAME_KINDS,
    Applied,
    Close,
    Fault,
    FaultProxy,
    HalfClose,
    Mutator,
    Pause,
    Reset,
    Send,
    guarded_listener,
    reset_stream,
)
from helpers import echo, holds_within, take_all, wait_until
from stalk.config import Config
from stalk.connection import Authorize, Connection, connect
from stalk.errors import (
    ConnectionClosed,
    ConnectionLost,
    HandshakeFailed,
    ProtocolError,
    StalkError,
)
from stalk.events import (
    NEED_DATA,
    CloseReceived,
    HandshakeComplete,
    MessageReceived,
    PeerIdentified,
)
from stalk.identity import Identity
from stalk.listener import listen
from stalk.session import Role, Session, SessionState
from stalk.spack import Spack

T = TypeVar("T")
Pattern = Literal["IK", "XX"]

SEED = 20_261_129
#: faulted connections through real sockets, per backend
SOCKET_CASES = int(os.environ.get("STALK_FAULT_SOCKET_CASES", "400"))
#: the same under ``-m slow``
SOCKET_CASES_SLOW = 4_000
SOCKET_WORKERS = 24
#: faulted sans-IO sessions (run once: no event loop involved)
SANS_IO_CASES = int(os.environ.get("STALK_FAULT_SANS_IO_CASES", "11000"))
#: destructive faults the default run must inject, all harnesses together (both backends);
#: benign re-segmentations and trickles come on top
FAULT_TARGET = 10_000

HANDSHAKE_TIMEOUT = 2.0
APP_DEADLINE = 5.0
CLIENT_CONFIG = Config(handshake_timeout=HANDSHAKE_TIMEOUT, write_timeout=1.0, close_timeout=0.5)
SERVER_CONFIG = Config(
    handshake_timeout=HANDSHAKE_TIMEOUT,
    write_timeout=1.0,
    close_timeout=0.5,
    max_handshakes=4 * SOCKET_WORKERS,
    max_handshakes_per_address=4 * SOCKET_WORKERS,  # every worker is on 127.0.0.1
)
#: CLOSE code a client uses when its own deadline expires (an application code)
APP_DEADLINE_CODE = 0x1001
#: size of the one spack sent first on a ``stall-write`` connection: far more than the
#: loopback socket buffers hold, so the write blocks while the proxy stalls
STALL_WRITE_SIZE = 8 << 20
#: connection id of the healthy control connections
CONTROL_CID = 1 << 40
#: share of units that also get a benign re-segmentation
RESEG_RATE = 0.25
#: a spack payload this large is fragmented over several Noise messages
FRAGMENT_PAYLOAD = 65_511


# -- messages with checksums ---------------------------------------------------------------------


def digest(tag: str, cid: int, seq: int, payload: bytes) -> bytes:
    h = hashlib.sha256(tag.encode())
    h.update(cid.to_bytes(8, "big"))
    h.update(seq.to_bytes(8, "big"))
    h.update(payload)
    return h.digest()


def message(tag: str, cid: int, seq: int, count: int, payload: bytes) -> Spack:
    return Spack(tag, cid, seq, count, payload, digest(tag, cid, seq, payload))


def payload_for(cid: int, seq: int, size: int) -> bytes:
    if size > 4096:
        block = hashlib.sha256(f"{cid}/{seq}".encode()).digest()
        return (block * (size // 32 + 1))[:size]
    return random.Random(cid * 1_000_003 + seq).randbytes(size)


def check(spack: Spack, tag: str, cid: int | None, seq: int) -> str | None:
    """Why ``spack`` is not message ``seq`` of connection ``cid`` (``None``: it is)."""
    values = list(spack)
    if len(values) != 6:
        return f"malformed message with {len(values)} values"
    got_tag, got_cid, got_seq, _count, payload, got_digest = values
    if not (
        isinstance(got_tag, str)
        and isinstance(got_cid, int)
        and isinstance(got_seq, int)
        and isinstance(payload, bytes)
    ):
        return "malformed message"
    if got_tag != tag or got_digest != digest(got_tag, got_cid, got_seq, payload):
        return "corrupted message (checksum mismatch)"
    if cid is not None and got_cid != cid:
        return f"message of connection {got_cid} on connection {cid}"
    if got_seq != seq:
        return f"message {got_seq} where {seq} was due (lost, duplicated or reordered)"
    return None


# -- fault plans -----------------------------------------------------------------------------------

#: primary fault labels and their weights; ``stall-*`` labels are ``stall`` faults
SOCKET_WEIGHTS: dict[str, float] = {
    "flip": 20,
    "insert": 8,
    "delete": 8,
    "drop": 8,
    "dup": 8,
    "reorder": 8,
    "fin": 6,
    "close": 5,
    "rst": 8,
    "trickle": 4,
    "reseg": 6,
    "stall-short": 5,
    "stall-handshake": 2,
    "stall-transport": 0.6,
    "stall-write": 0.6,
}
FORCED = {42: "stall-transport", 77: "stall-write", 91: "stall-write"}
#: sans-IO: no clock, so no stalls; re-segmentation is already everywhere as an extra fault
SANS_IO_WEIGHTS = {
    k: v for k, v in SOCKET_WEIGHTS.items() if not k.startswith("stall") and k != "reseg"
}
#: labels that must leave every message intact
BENIGN_LABELS = frozenset({"trickle", "reseg", "stall-short"})


@dataclass(frozen=True)
class Plan:
    """One faulted connection: who speaks which pattern, what is sent, what goes wrong."""

    cid: int
    pattern: Pattern
    sizes: tuple[int, ...]
    concurrent: bool
    faults: tuple[Fault, ...]

    @property
    def primary(self) -> str:
        return self.faults[0].name

    def __str__(self) -> str:
        faults = ", ".join(
            f"{f.name}@{f.direction}[{f.unit}]+{f.offset}"
            + (f" {f.seconds:.2f}s" if f.kind == "stall" else "")
            for f in self.faults
        )
        mode = "concurrent" if self.concurrent else "sequential"
        return f"case {self.cid} ({self.pattern}, sizes {list(self.sizes)}, {mode}): {faults}"


def frames_for(payload: int) -> int:
    return 1 + (payload + 100) // FRAGMENT_PAYLOAD


def units(plan: Plan, direction: str) -> int:
    """How many units (preamble/verdict + frames) each direction of ``plan`` carries."""
    data = sum(frames_for(size) for size in plan.sizes)
    if direction == "c2s":  # preamble, msg1, msg3 (XX) or READY (IK), messages, CLOSE
        return 3 + data + 1
    return 2 + (plan.pattern == "XX") + data + 1  # verdict, msg2, READY (XX), replies, CLOSE


def make_plan(cid: int, weights: dict[str, float], *, seed: int = SEED) -> Plan:
    rng = random.Random(seed * 1_000_003 + cid)
    label = rng.choices(list(weights), list(weights.values()))[0]
    if "stall-write" in weights and cid % 100 in FORCED:  # rare kinds, but never absent
        label = FORCED[cid % 100]
    pattern: Pattern = "IK" if rng.random() < 0.8 else "XX"
    sizes = [rng.choice((0, 1, 17, 100, 300, 1000)) for _ in range(3)]
    if label == "stall-write":
        sizes[0] = STALL_WRITE_SIZE
    elif rng.random() < 0.1:
        sizes[1] = rng.randrange(FRAGMENT_PAYLOAD, 3 * FRAGMENT_PAYLOAD)
    plan = Plan(cid, pattern, tuple(sizes), rng.random() < 0.25, ())
    direction: Literal["c2s", "s2c"] = rng.choice(("c2s", "s2c"))
    handshake_units = 2 + (pattern == "XX") if direction == "c2s" else 2
    first_data = 3 if direction == "c2s" else 2 + (pattern == "XX")
    total = units(plan, direction)
    kind = label
    seconds = 0.0
    unit = rng.randrange(1 if label in FRAME_KINDS else 0, total)
    if label == "stall-short":
        kind, seconds = "stall", rng.uniform(0.02, 0.3)
    elif label == "stall-handshake":
        kind, seconds = "stall", HANDSHAKE_TIMEOUT + 0.6
        unit = rng.randrange(0, handshake_units)
    elif label == "stall-transport":
        kind, seconds = "stall", APP_DEADLINE + 0.5
        unit = rng.randrange(first_data, total)
    elif label == "stall-write":
        kind, seconds, direction, unit = "stall", 3.0, "c2s", 3
    faults = [
        Fault(
            kind,
            direction,
            unit,
            offset=rng.randrange(1 << 16),
            bit=rng.randrange(8),
            data=rng.randbytes(rng.randint(1, 3)),
            count=rng.randint(1, 3),
            seconds=seconds,
            label=label,
        )
    ]
    # Extra benign faults: re-segment about a quarter of all units, either direction.
    for other in ("c2s", "s2c"):
        for unit in range(units(plan, other)):
            if rng.random() < RESEG_RATE:
                faults.append(Fault("reseg", other, unit, offset=rng.randrange(1 << 16)))
    return Plan(cid, pattern, tuple(sizes), plan.concurrent, tuple(faults))


def must_detect(applied: Applied, units_seen: int) -> bool:
    """Whether the receiver is bound to notice ``applied`` (it changed a unit it needs)."""
    fault = applied.fault
    if not applied.effective or fault.name in BENIGN_LABELS:
        return False
    last = units_seen - 1
    if fault.kind == "dup" and fault.unit >= last:
        return False  # the copy comes after the final CLOSE, which ends reading
    return not (
        fault.kind == "insert" and fault.unit >= last and applied.offset >= applied.unit_len
    )


@dataclass
class Tally:
    """What a harness did and saw."""

    cases: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    by_label: Counter[tuple[str, str]] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def total_faults(self) -> int:
        return sum(self.faults.values())

    def report(self, title: str) -> str:
        lines = [
            f"{title}: {self.cases} faulted connections, {self.total_faults()} faults applied",
            "  faults by kind: " + ", ".join(f"{k}={v}" for k, v in sorted(self.faults.items())),
            "  outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())),
        ]
        primaries = sorted({label for label, _ in self.by_label})
        for label in primaries:
            seen = {o: n for (lab, o), n in sorted(self.by_label.items()) if lab == label}
            lines.append(f"    primary {label}: {seen}")
        if self.slowest:
            lines.append(f"  slowest faulted connection: {self.slowest:.2f} s")
        return "\n".join(lines)


_TOTALS: Counter[str] = Counter()


def _fault_total_hint() -> str:
    return f"faults applied so far this session: {dict(_TOTALS)}"


# -- sans-IO harness -----------------------------------------------------------------------------


@dataclass
class _End:
    """One side of a sans-IO connection, driven as an application would drive it."""

    session: Session
    plan: Plan
    client: bool
    received: int = 0
    close_code: int | None = None
    error: BaseException | None = None
    eof_in: bool = False
    stopped: bool = False
    #: this side has finished writing (CLOSE sent or transport closed): EOF to the peer
    write_eof: bool = False
    eof_sent: bool = False
    violations: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "client" if self.client else "server"

    def feed(self, data: bytes) -> None:
        if self.eof_in or self.stopped:
            return
        self.session.receive_data(data)
        self.process()

    def feed_eof(self) -> None:
        if self.eof_in:
            return
        self.eof_in = True
        if self.stopped:
            return
        self.session.receive_data(b"")
        self.process()

    def fail(self, exc: BaseException) -> None:
        if not isinstance(exc, StalkError):
            self.violations.append(f"{self.name}: untyped {exc!r}")
        self.error = exc
        self.stopped = True
        self.write_eof = True  # a failed peer closes its transport

    def process(self) -> None:
        plan = self.plan
        n = len(plan.sizes)
        while not self.stopped:
            try:
                event = self.session.next_event()
                if event is NEED_DATA:
                    return
                if isinstance(event, PeerIdentified):
                    self.session.accept()
                elif isinstance(event, HandshakeComplete) and self.client:
                    for seq, size in enumerate(plan.sizes):
                        self.session.send(
                            message("m", plan.cid, seq, n, payload_for(plan.cid, seq, size))
                        )
                    self.session.close()
                    self.write_eof = True  # Connection.send_eof: CLOSE, then TCP half-close
                elif isinstance(event, MessageReceived):
                    tag = "r" if self.client else "m"
                    problem = check(event.spack, tag, plan.cid, self.received)
                    if problem:
                        self.violations.append(f"{self.name}: {problem}")
                    self.received += 1
                    if not self.client:
                        payload = list(event.spack)[4]
                        assert isinstance(payload, bytes)
                        self.session.send(message("r", plan.cid, self.received - 1, n, payload))
                elif isinstance(event, CloseReceived):
                    self.close_code = event.code
                    if event.code == 0 and self.received != n:
                        self.violations.append(
                            f"{self.name}: clean CLOSE after {self.received} of {n} messages"
                        )
                    if not self.client and event.code == 0:
                        self.session.close()  # the handler returned: CLOSE, then close
                    self.stopped = True
                    self.write_eof = True
                    return
            except StalkError as exc:
                self.fail(exc)
            except Exception as exc:
                self.fail(exc)


def run_sans_io(
    plan: Plan, client_id: Identity, server_id: Identity
) -> tuple[str, list[str], Mutator, Mutator]:
    """Run one faulted connection between two Sessions; return its outcome."""
    client = _End(
        Session(Role.INITIATOR, client_id, peer=server_id.public if plan.pattern == "IK" else None),
        plan,
        client=True,
    )
    server = _End(Session(Role.RESPONDER, server_id), plan, client=False)
    c2s = Mutator("c2s", plan.faults)
    s2c = Mutator("s2c", plan.faults)

    def perform(actions: list[Send | Pause | HalfClose | Close | Reset], dst: _End) -> None:
        for action in actions:
            if isinstance(action, Send):
                dst.feed(action.data)
            elif isinstance(action, HalfClose):
                dst.feed_eof()
            elif isinstance(action, (Close, Reset)):
                c2s.terminated = s2c.terminated = True
                client.feed_eof()
                server.feed_eof()

    # Not helpers.pump: the bytes go through a faulty link (the mutators split, corrupt,
    # pause and cut them) and each end may half-close, so the loop is this test's own.
    moved = True
    while moved:
        moved = False
        for src, dst, mutator in ((client, server, c2s), (server, client, s2c)):
            if src.eof_sent:
                continue
            data = take_all(src.session)
            if data:
                moved = True
                perform(mutator.feed(data), dst)
            if src.write_eof:
                src.eof_sent = True
                moved = True
                perform(mutator.end(), dst)
    violations = client.violations + server.violations
    n = len(plan.sizes)
    if client.error is not None or server.error is not None:
        first = client.error or server.error
        outcome = f"error:{type(first).__name__}"
    elif client.close_code not in (None, 0) or server.close_code not in (None, 0):
        outcome = "error:ClosedByPeer"
    elif (client.received, client.close_code, server.received, server.close_code) == (n, 0, n, 0):
        outcome = "intact"
    elif {client.session.state, server.session.state} & {
        SessionState.HANDSHAKING,
        SessionState.AUTHORIZING,
        SessionState.CONFIRMING,
    }:
        outcome = "handshake-timeout"  # stalled handshake: Config.handshake_timeout ends it
    else:
        outcome = "stuck"
        violations.append(
            f"transport phase stalled: client {client.session.state}, server {server.session.state}"
        )
    return outcome, violations, c2s, s2c


def judge(plan: Plan, outcome: str, c2s: Mutator, s2c: Mutator, tally: Tally) -> None:
    """Count the faults of one case and check its outcome against them."""
    tally.cases += 1
    c2s.settle()
    s2c.settle()
    applied = [(a, c2s.units) for a in c2s.applied] + [(a, s2c.units) for a in s2c.applied]
    for a, _ in applied:
        tally.faults[a.fault.name] += 1
        _TOTALS[a.fault.name] += 1
    tally.outcomes[outcome] += 1
    detect = [a for a, seen in applied if must_detect(a, seen)]
    label = plan.primary
    primary = [a for a, _ in applied if a.fault is plan.faults[0]]
    if not primary:
        shown = f"{label} (unit never came)"
    elif not all(a.effective for a in primary):
        shown = f"{label} (held to the end of the stream)"
    elif label not in BENIGN_LABELS and not any(a in detect for a in primary):
        shown = f"{label} (after the final CLOSE)"
    else:
        shown = label
    tally.by_label[(shown, outcome)] += 1
    if outcome == "intact" and detect:
        tally.violations.append(f"{plan}: undetected fault(s) {detect}")
    # (A reorder whose unit was held until the end of the stream, or a copy of the final
    # CLOSE, may or may not matter: no requirement either way.)
    benign_only = all(a.fault.name in BENIGN_LABELS for a, _ in applied)
    if outcome != "intact" and benign_only:
        tally.violations.append(f"{plan}: benign faults only, but the outcome was {outcome}")
    if outcome == "app-deadline" and label != "stall-transport":
        tally.violations.append(f"{plan}: hit the application deadline")


def test_sans_io_faults() -> None:
    """Thousands of faulted sessions without sockets (the bulk of the fault count)."""
    tally = Tally()
    ids = [Identity.generate() for _ in range(8)]
    started = time.perf_counter()
    for cid in range(SANS_IO_CASES):
        plan = make_plan(cid, SANS_IO_WEIGHTS, seed=SEED + 1)
        outcome, violations, c2s, s2c = run_sans_io(plan, ids[cid % 4], ids[4 + cid % 4])
        tally.violations += [f"{plan}: {v}" for v in violations]
        judge(plan, outcome, c2s, s2c, tally)
    elapsed = time.perf_counter() - started
    print(f"\n{tally.report('sans-IO')}\n  {elapsed:.1f} s")
    assert not tally.violations, "\n".join(tally.violations[:20])
    assert tally.total_faults() >= SANS_IO_CASES
    # every kind was exercised many times
    assert all(tally.faults[k] >= 50 for k in [*SANS_IO_WEIGHTS, "reseg"]), tally.faults


# -- the socket harness ---------------------------------------------------------------------------


@dataclass
class _ServerBook:
    active: int = 0
    ends: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


def _faulted_handler(book: _ServerBook) -> Callable[[Connection], Awaitable[None]]:
    async def handler(conn: Connection) -> None:
        book.active += 1
        cid: int | None = None
        count = 0
        seen = 0
        try:
            async for spack in conn:
                values = list(spack)
                if cid is None and len(values) == 6 and isinstance(values[1], int):
                    cid = values[1]
                    count = values[3] if isinstance(values[3], int) else 0
                problem = check(spack, "m", cid, seen)
                if problem:
                    book.violations.append(f"server, case {cid}: {problem}")
                    return
                payload = values[4]
                assert isinstance(payload, bytes)
                assert cid is not None
                await conn.send(message("r", cid, seen, count, payload))
                seen += 1
            if seen == 0 or seen != count:
                book.violations.append(f"server, case {cid}: EndOfStream after {seen}/{count}")
            book.ends["EndOfStream"] += 1
        except (StalkError, anyio.BrokenResourceError) as exc:
            book.ends[type(exc).__name__] += 1
            raise
        except Exception as exc:
            book.violations.append(f"server, case {cid}: untyped {exc!r}")
            raise
        finally:
            book.active -= 1

    return handler


@dataclass
class _ClientRun:
    outcome: str = "?"
    error: BaseException | None = None
    violations: list[str] = field(default_factory=list)
    elapsed: float = 0.0


async def _send_all(conn: Connection, plan: Plan) -> None:
    n = len(plan.sizes)
    for seq, size in enumerate(plan.sizes):
        await conn.send(message("m", plan.cid, seq, n, payload_for(plan.cid, seq, size)))
    await conn.send_eof()


async def _receive_all(conn: Connection, plan: Plan, run: _ClientRun) -> None:
    for seq in range(len(plan.sizes)):
        try:
            reply = await conn.receive()
        except anyio.EndOfStream:
            run.violations.append(f"EndOfStream after {seq} of {len(plan.sizes)} replies")
            raise
        problem = check(reply, "r", plan.cid, seq)
        if problem:
            run.violations.append(problem)
            raise AssertionError(problem)
    try:
        extra = await conn.receive()
    except anyio.EndOfStream:
        return
    run.violations.append(f"unexpected extra message {extra!r}")


async def _faulted_client(plan: Plan, address: tuple[str, int], server: Identity) -> _ClientRun:
    run = _ClientRun()
    started = anyio.current_time()
    conn: Connection | None = None
    errors: list[BaseException] = []

    async def guarded(fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except Exception as exc:
            errors.append(exc)

    try:
        with anyio.fail_after(APP_DEADLINE):
            try:
                conn = await connect(
                    *address,
                    server.public if plan.pattern == "IK" else None,
                    config=CLIENT_CONFIG,
                )
            except Exception as exc:
                errors.append(exc)
            else:
                if plan.concurrent:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(guarded, partial(_send_all, conn, plan))
                        tg.start_soon(guarded, partial(_receive_all, conn, plan, run))
                else:
                    await guarded(partial(_send_all, conn, plan))
                    if not errors:
                        await guarded(partial(_receive_all, conn, plan, run))
    except TimeoutError:
        run.outcome = "app-deadline"
    run.elapsed = anyio.current_time() - started
    if run.outcome == "?":
        typed = [e for e in errors if isinstance(e, (StalkError, anyio.BrokenResourceError))]
        # EndOfStream too early and checksum failures are already in run.violations.
        untyped = [
            e
            for e in errors
            if e not in typed and not isinstance(e, (anyio.EndOfStream, AssertionError))
        ]
        run.error = errors[0] if errors else None
        run.violations += [f"untyped error {e!r}" for e in untyped]
        if run.violations:
            run.outcome = "violation"
        elif typed:
            run.outcome = f"error:{type(typed[0]).__name__}"
        else:
            run.outcome = "intact"
    if conn is not None:
        with anyio.move_on_after(2, shield=True):
            if run.outcome == "app-deadline":
                await conn.close(APP_DEADLINE_CODE, "application deadline")
            else:
                await conn.aclose()
    return run


async def _control_round_trips(host: str, port: int, server: Identity, stop: anyio.Event) -> int:
    """A healthy connection now and then, straight to the listener: it must always work."""
    done = 0
    while not stop.is_set():
        with anyio.fail_after(5):
            async with await connect(host, port, server.public) as conn:
                await conn.send(message("m", CONTROL_CID, 0, 1, b"control"))
                assert check(await conn.receive(), "r", CONTROL_CID, 0) is None
        done += 1
        await anyio.sleep(0.25)  # the point: a control connection now and then, not a flood
    return done


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - not Linux
        return 0


async def test_fault_proxy(anyio_backend: str) -> None:
    """Hundreds of connections through the fault proxy on real loopback sockets."""
    await _run_fault_proxy(anyio_backend, SOCKET_CASES, SEED)


@pytest.mark.slow
async def test_fault_proxy_long(anyio_backend: str, request: pytest.FixtureRequest) -> None:
    """Ten times as many faulted connections, other seeds: ``pytest -m slow``."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("a long fault run: run with -m slow")
    await _run_fault_proxy(anyio_backend, SOCKET_CASES_SLOW, SEED + 2)


async def _run_fault_proxy(anyio_backend: str, cases: int, seed: int) -> None:
    server_id = Identity.generate()
    book = _ServerBook()
    listener, guard = await guarded_listener(server_id, config=SERVER_CONFIG)
    host, port = listener.address
    proxy = FaultProxy((host, port))
    tally = Tally()
    pending = iter(range(cases))
    fds_before = _open_fds()
    started = anyio.current_time()

    async def worker() -> None:
        for cid in pending:
            plan = make_plan(cid, SOCKET_WEIGHTS, seed=seed)
            async with proxy.route(plan.faults, linger=0.5) as route:
                run = await _faulted_client(plan, route.address, server_id)
            tally.violations += [
                f"{plan}: {v}" for v in run.violations + [repr(e) for e in route.errors]
            ]
            if run.elapsed > APP_DEADLINE + 1.0:
                tally.violations.append(f"{plan}: took {run.elapsed:.2f} s")
            tally.slowest = max(tally.slowest, run.elapsed)
            judge(plan, run.outcome, route.c2s, route.s2c, tally)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, _faulted_handler(book))
        stop = anyio.Event()
        controls: list[int] = []

        async def control() -> None:
            controls.append(await _control_round_trips(host, port, server_id, stop))

        tg.start_soon(control)
        async with anyio.create_task_group() as workers:
            for _ in range(SOCKET_WORKERS):
                workers.start_soon(worker)
        stop.set()
        await wait_until(
            lambda: not (book.active or listener.handshakes_in_progress) and controls,
            timeout=HANDSHAKE_TIMEOUT + 3,
        )
        # The listener still serves after the storm.
        assert controls[0] > 0
        await _control_round_trips(host, port, server_id, _set_event())
        tg.cancel_scope.cancel()
    elapsed = anyio.current_time() - started
    tally.violations += [f"exception escaped the listener: {exc!r}" for exc in guard.escaped]
    print(f"\n{tally.report(f'sockets/{anyio_backend}')}")
    print(f"  server ends: {dict(book.ends)}; control round trips: {controls[0]}; {elapsed:.1f} s")
    print(f"  {_fault_total_hint()}")
    violations = tally.violations + book.violations
    assert not violations, "\n".join(violations[:20])
    assert tally.cases == cases
    assert tally.total_faults() >= cases
    leak_free = await holds_within(lambda: _open_fds() <= fds_before + 2, 0.2)
    assert leak_free, "leaked file descriptors"


def _set_event() -> anyio.Event:
    event = anyio.Event()
    event.set()
    return event


def test_fault_count_reaches_target(request: pytest.FixtureRequest) -> None:
    """The default run injects >= 10,000 destructive faults (runs after the harnesses)."""
    if not _TOTALS:
        pytest.skip("the fault harnesses did not run in this session")
    names = [item.name for item in request.session.items]
    ran_all = all(
        any(name.startswith(prefix) for name in names)
        for prefix in ("test_sans_io_faults", "test_fault_proxy[asyncio]", "test_fault_proxy[trio]")
    )
    if not ran_all:
        pytest.skip("only part of the fault harnesses was selected")
    if (SOCKET_CASES, SANS_IO_CASES) != (400, 11_000):
        pytest.skip("case counts overridden through the environment")
    total = sum(_TOTALS.values())
    destructive = sum(n for name, n in _TOTALS.items() if name not in BENIGN_LABELS)
    print(
        f"\nfaults applied in this run: {total}, {destructive} of them destructive "
        f"({dict(sorted(_TOTALS.items()))})"
    )
    assert destructive >= FAULT_TARGET


# -- cancellation ----------------------------------------------------------------------------------


async def cancel_after(ticks: int, operation: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """Run ``operation`` in a scope cancelled after ``ticks`` scheduler ticks.

    ``ticks == 0`` cancels before the operation starts, so its first checkpoint raises;
    otherwise a ticker task yields ``ticks`` times and then cancels. Returns whether the
    operation completed and its result.
    """
    scope = anyio.CancelScope()
    result: list[T] = []
    if ticks == 0:
        scope.cancel()

    async def ticker() -> None:
        for _ in range(ticks):
            await anyio.lowlevel.checkpoint()
        scope.cancel()

    async with anyio.create_task_group() as tg:
        if ticks:
            tg.start_soon(ticker)
        with scope:
            result.append(await operation())
        tg.cancel_scope.cancel()
    return (True, result[0]) if result else (False, None)


@dataclass
class _Peer:
    """What the server side of the cancellation tests saw, per connection."""

    received: list[list[Spack]] = field(default_factory=list)
    ends: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    active: int = 0


def _recording_handler(peer: _Peer) -> Callable[[Connection], Awaitable[None]]:
    async def handler(conn: Connection) -> None:
        peer.active += 1
        got: list[Spack] = []
        peer.received.append(got)
        try:
            async for spack in conn:
                if spack[0] == "echo":
                    await conn.send(Spack("echo", *spack[1:]))
                elif spack[0] == "next":
                    seq, size = spack[1], spack[2]
                    assert isinstance(seq, int)
                    assert isinstance(size, int)
                    await conn.send(message("r", 0, seq, 0, payload_for(0, seq, size)))
                else:
                    got.append(spack)
            peer.ends.append("EndOfStream")
        except ProtocolError as exc:  # a misparsed or undecryptable frame: never acceptable
            peer.bad.append(repr(exc))
        except (ConnectionLost, HandshakeFailed) as exc:
            peer.ends.append(type(exc).__name__)
        finally:
            peer.active -= 1

    return handler


async def _settle(listener_active: Callable[[], int], timeout: float = 5.0) -> None:
    await wait_until(lambda: not listener_active(), timeout)


def _repeats(backend: str) -> int:
    """Trio runs the tasks of one scheduler batch in random order: try each point thrice."""
    return 3 if backend == "trio" else 1


@pytest.mark.parametrize("pattern", ["IK", "XX"])
async def test_cancelled_connect_leaves_nothing_behind(anyio_backend: str, pattern: str) -> None:
    """Cancel connect() at every tick: no half-open connection, no stray bytes at the peer."""
    server_id = Identity.generate()
    peer = _Peer()
    listener, guard = await guarded_listener(server_id, config=Config(handshake_timeout=2))
    fds_before = _open_fds()
    cancelled = completed = 0
    points = 0
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, _recording_handler(peer))
        host, port = listener.address
        pin = server_id.public if pattern == "IK" else None
        for ticks in range(1000):
            outcomes = set()
            for _ in range(_repeats(anyio_backend)):
                done, conn = await cancel_after(ticks, partial(connect, host, port, pin))
                outcomes.add(done)
                if not done:
                    cancelled += 1
                    continue
                completed += 1
                assert conn is not None
                async with conn:  # a connect that completed works
                    await conn.send(Spack("echo", ticks))
                    assert await conn.receive() == Spack("echo", ticks)
            if outcomes == {True}:
                break
            points = ticks + 1
        else:
            pytest.fail("connect never completed")
        await _settle(lambda: peer.active + listener.handshakes_in_progress)
        tg.cancel_scope.cancel()
    print(
        f"\nconnect/{pattern}/{anyio_backend}: {points} cancellation points, "
        f"{cancelled} cancelled and {completed} completed connects"
    )
    assert points >= 3
    assert not peer.bad
    assert not guard.escaped
    assert all(not spacks for spacks in peer.received)  # echoes only, nothing stray
    assert await holds_within(lambda: _open_fds() <= fds_before + 1, 0.1)


SEND_SIZES = (10, 3 * FRAGMENT_PAYLOAD, 1 << 20)


@pytest.mark.parametrize("writer", [False, True], ids=["direct", "writer-task"])
async def test_cancelled_send_delivers_whole_or_breaks(anyio_backend: str, writer: bool) -> None:
    """A cancelled send is written whole or stays queued for the next write: never half.

    ``writer-task``: inside ``async with conn`` a writer task coalesces sends; a small
    ``send_buffer`` makes the large spacks take the waiting path, racing the writer.
    """
    server_id = Identity.generate()
    peer = _Peer()
    listener, guard = await guarded_listener(server_id)
    attempts = 0
    cancelled = 0
    broken: BaseException | None = None
    config = Config(send_buffer=100_000)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, _recording_handler(peer))
        conn = await connect(*listener.address, server_id.public, config=config)
        async with contextlib.AsyncExitStack() as stack:
            if writer:
                await stack.enter_async_context(conn)
            for size in SEND_SIZES:
                for ticks in range(50):
                    outcomes = set()
                    for _ in range(_repeats(anyio_backend)):
                        item = message("s", 0, attempts, 0, payload_for(1, attempts, size))
                        attempts += 1
                        try:
                            done, _ = await cancel_after(ticks, partial(conn.send, item))
                        except (ConnectionLost, ConnectionClosed) as exc:
                            broken = exc
                            break
                        outcomes.add(done)
                        cancelled += not done
                    if broken or outcomes == {True}:
                        break
                if broken:
                    break
            if broken is None:
                await conn.send(message("s", 0, attempts, 0, b"tail"))
                attempts += 1
                await conn.send_eof()
            await conn.aclose()
        await _settle(lambda: peer.active)
        tg.cancel_scope.cancel()
    print(f"\nsend/{anyio_backend}/writer={writer}: {attempts} sends, {cancelled} cancelled")
    assert not peer.bad
    assert not guard.escaped
    got = peer.received[0]
    for seq, spack in enumerate(got):
        assert check(spack, "s", 0, seq) is None, (seq, spack[:3])
    if broken is None:
        # Nothing was lost: every cancelled send was either written or flushed later.
        assert len(got) == attempts
        assert peer.ends == ["EndOfStream"]
    else:
        assert isinstance(broken, ConnectionLost)
    if not writer:
        assert cancelled >= len(SEND_SIZES)


RECEIVE_SIZES = (5, 200, FRAGMENT_PAYLOAD - 60, 2 * FRAGMENT_PAYLOAD, 700_000, 3, 1000)


async def test_cancelled_receive_loses_nothing(anyio_backend: str) -> None:
    """Cancel receive() after every tick while a reply is in flight: never lost or misread."""
    server_id = Identity.generate()
    peer = _Peer()
    listener, guard = await guarded_listener(server_id)
    cancelled = 0
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, _recording_handler(peer))
        async with await connect(*listener.address, server_id.public) as conn:
            for seq in range(len(RECEIVE_SIZES) * 3):
                size = RECEIVE_SIZES[seq % len(RECEIVE_SIZES)]
                await conn.send(Spack("next", seq, size))
                reply = None
                for ticks in range(100_000):
                    done, reply = await cancel_after(ticks, conn.receive)
                    if done:
                        break
                    cancelled += 1
                assert reply is not None
                assert check(reply, "r", 0, seq) is None
        await _settle(lambda: peer.active)
        tg.cancel_scope.cancel()
    print(f"\nreceive/{anyio_backend}: cancelled at {cancelled} points")
    assert not peer.bad
    assert not guard.escaped
    assert cancelled >= 2 * len(RECEIVE_SIZES)


async def test_cancelled_aclose_still_closes(anyio_backend: str) -> None:
    """aclose() cancelled at any tick still delivers CLOSE and wakes a blocked receiver."""
    server_id = Identity.generate()
    peer = _Peer()
    listener, guard = await guarded_listener(server_id)
    fds_before = _open_fds()
    outcomes: Counter[str] = Counter()
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, _recording_handler(peer))
        for ticks in range(40):
            conn = await connect(*listener.address, server_id.public)
            for seq in range(3):
                await conn.send(message("s", 0, seq, 0, payload_for(2, seq, 100 * seq)))
            woke: list[BaseException] = []

            async def blocked_receiver(
                conn: Connection = conn, woke: list[BaseException] = woke
            ) -> None:
                try:
                    await conn.receive()
                except (ConnectionClosed, anyio.ClosedResourceError) as exc:
                    woke.append(exc)

            async with anyio.create_task_group() as inner:
                inner.start_soon(blocked_receiver)
                await anyio.sleep(0)  # a checkpoint, not a wait: the receiver starts
                done, _ = await cancel_after(ticks, conn.aclose)
                outcomes["completed" if done else "cancelled"] += 1
                await wait_until(partial(bool, woke), timeout=2)
            with pytest.raises(ConnectionClosed):
                await conn.send(Spack(1))
        await _settle(lambda: peer.active)
        tg.cancel_scope.cancel()
    print(f"\naclose/{anyio_backend}: {dict(outcomes)}; server ends {Counter(peer.ends)}")
    assert not peer.bad
    assert not guard.escaped
    for got in peer.received:
        assert [check(s, "s", 0, i) for i, s in enumerate(got)] == [None] * 3
    assert peer.ends == ["EndOfStream"] * 40  # the CLOSE always went out
    assert await holds_within(lambda: _open_fds() <= fds_before + 1, 0.1)


def _closing(
    handler: Callable[[Connection], Awaitable[None]],
) -> Callable[[Connection], Awaitable[None]]:
    """``handler``, closing its connection however it ends.

    Even when the listener is cancelled with the handler running: stalk's listener does not
    close connections then (``test_limits.py`` reproduces it), and a socket left to the
    garbage collector would warn in whatever test runs next.
    """

    async def closing(conn: Connection) -> None:
        try:
            await handler(conn)
        finally:
            await conn.aclose()

    return closing


# -- regression tests for the bugs this suite found ---------------------------------------------


async def _echo_listener(
    server_id: Identity,
    authorize: Authorize,
    died: list[BaseException],
    *,
    task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """An echo listener with ``authorize``; an exception that ends it goes into ``died``."""
    try:
        await listen(
            "127.0.0.1",
            0,
            echo,
            identity=server_id,
            authorize=authorize,
            task_status=task_status,
        )
    except Exception as exc:
        died.append(exc)


async def test_reset_during_authorize_does_not_kill_the_listener(anyio_backend: str) -> None:
    """An IK client sends message 1 and resets while ``authorize`` runs.

    The listener then writes message 2 to a reset socket. On trio that write fails at once
    (asyncio's transport swallows the first failed write; the read that follows fails).
    Regression test: until 75d3c7a the resulting ConnectionLost escaped Listener._handle
    and took the whole listener down (trio).
    """
    server_id = Identity.generate()

    authorizing, authorized = anyio.Event(), anyio.Event()

    async def slow_authorize(_peer: object) -> bool:
        authorizing.set()
        try:
            await anyio.sleep(0.2)  # the point: the reset comes while this runs
        finally:
            authorized.set()  # returned or cancelled, it is over
        return True

    died: list[BaseException] = []

    async with anyio.create_task_group() as tg:
        host, port = await tg.start(partial(_echo_listener, server_id, slow_authorize, died))
        hello = Session(Role.INITIATOR, Identity.generate(), peer=server_id.public)
        raw = await anyio.connect_tcp(host, port)
        await raw.send(take_all(hello))  # preamble + IK message 1
        with anyio.fail_after(5):
            await authorizing.wait()
        reset_stream(raw)
        await raw.aclose()  # TCP RST while the listener awaits authorize()
        with anyio.fail_after(5):
            await authorized.wait()
        # The listener now writes to the reset socket and fails on its own schedule (at a
        # later read, on asyncio): nothing in this process to wait on.
        await anyio.sleep(0.25)
        assert not died, f"the listener died: {died[0]!r}"
        with anyio.fail_after(5):
            async with await connect(host, port, server_id.public) as conn:
                await conn.send(Spack("still serving"))
                assert await conn.receive() == Spack("still serving")
        tg.cancel_scope.cancel()


async def test_cancelled_receive_with_a_ping_pending_loses_nothing(anyio_backend: str) -> None:
    """Two Noise messages, each ``[spack, PING]``, arrive in one read; the second receive()
    runs in an already-cancelled scope. Whether it returns Spack(1) or is cancelled, no spack
    may be lost. (It once took Spack(1) from the session, then waited for the send lock to
    write the PONG and was cancelled there: Spack(1) was gone.)
    """
    server_id = Identity.generate()
    ready = anyio.Event()

    async def pinger(conn: Connection) -> None:
        await conn.receive()  # "go"
        conn.queue(Spack(0))
        conn._session.ping(b"a")  # a PING is legal from any peer (SPEC "Ping")
        conn.queue(Spack(1))
        conn._session.ping(b"b")
        await conn.flush()  # both Noise messages in one write
        await ready.wait()
        await conn.send(Spack(2))
        async for _ in conn:
            pass

    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(listen, "127.0.0.1", 0, _closing(pinger), identity=server_id)
        )
        async with await connect(host, port, server_id.public) as conn:
            await conn.send(Spack("go"))
            assert await conn.receive() == Spack(0)
            got: list[Spack] = []
            with anyio.CancelScope() as scope:
                scope.cancel()
                got.append(await conn.receive())
            ready.set()
            with anyio.fail_after(5):
                got.append(await conn.receive())
                if scope.cancelled_caught:
                    got.append(await conn.receive())
            assert got == [Spack(1), Spack(2)]
        tg.cancel_scope.cancel()


async def test_protocol_error_during_a_concurrent_send_is_typed(anyio_backend: str) -> None:
    server_id = Identity.generate()

    async def corrupt(conn: Connection) -> None:
        # A frame no cipher state can decrypt; then never read, so the client's write blocks.
        await conn._transport.send(b"\x00\x20" + bytes(32))
        await anyio.sleep(5)  # the point: it never reads

    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(listen, "127.0.0.1", 0, _closing(corrupt), identity=server_id)
        )
        conn = await connect(host, port, server_id.public, config=Config(write_timeout=1))
        sender_error: list[BaseException] = []

        async def big_send() -> None:
            try:
                await conn.send(Spack(bytes(15 << 20)))  # far beyond the socket buffers
            except Exception as exc:
                sender_error.append(exc)

        async with anyio.create_task_group() as inner:
            inner.start_soon(big_send)
            await anyio.sleep(0.3)  # the sender is now blocked in its shielded write
            with anyio.fail_after(5), pytest.raises(StalkError):
                await conn.receive()
            inner.cancel_scope.cancel()
        await conn.aclose()
        tg.cancel_scope.cancel()


async def test_a_failing_authorize_refuses_one_client_only(anyio_backend: str) -> None:
    """An ``authorize`` that fails (a lookup that times out, say) must cost one client only.

    Regression test: until 75d3c7a the exception escaped Listener._handle and cancelled the
    whole listener.
    """
    server_id = Identity.generate()
    calls = 0

    async def flaky_authorize(_peer: object) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("the authorization database is unreachable")
        return True

    died: list[BaseException] = []

    async with anyio.create_task_group() as tg:
        host, port = await tg.start(partial(_echo_listener, server_id, flaky_authorize, died))
        with anyio.fail_after(5), pytest.raises(HandshakeFailed):
            await connect(host, port, server_id.public)
        await anyio.sleep(0.1)  # the listener ends that handshake on its own schedule
        assert not died, f"the listener died: {died[0]!r}"
        with anyio.fail_after(5):
            async with await connect(host, port, server_id.public) as conn:
                await conn.send(Spack("still serving"))
                assert await conn.receive() == Spack("still serving")
        tg.cancel_scope.cancel()


class _ApplicationFailed(Exception):
    """The application gave up half-way through what it meant to send."""


@pytest.mark.parametrize("how", ["exception", "cancellation"])
async def test_an_abandoned_stream_does_not_look_complete(anyio_backend: str, how: str) -> None:
    server_id = Identity.generate()
    ends: list[str] = []

    async def collect(conn: Connection) -> None:
        try:
            async for _ in conn:
                pass
            ends.append("EndOfStream")
        except StalkError as exc:
            ends.append(type(exc).__name__)

    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(listen, "127.0.0.1", 0, _closing(collect), identity=server_id)
        )
        conn = await connect(host, port, server_id.public)
        if how == "exception":
            with contextlib.suppress(_ApplicationFailed):
                async with conn:
                    await conn.send(Spack("part 1 of 2"))
                    raise _ApplicationFailed
        else:
            with anyio.move_on_after(0.1):
                async with conn:
                    await conn.send(Spack("part 1 of 2"))
                    await anyio.sleep_forever()  # the application's deadline expires here
        await wait_until(lambda: ends)
        tg.cancel_scope.cancel()
    assert ends != ["EndOfStream"], "the peer was told the stream ended cleanly"


async def test_a_blocked_receiver_learns_that_the_connection_broke(anyio_backend: str) -> None:
    server_id = Identity.generate()
    stop = anyio.Event()

    async def never_reads(conn: Connection) -> None:
        await stop.wait()

    errors: dict[str, BaseException] = {}
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(listen, "127.0.0.1", 0, _closing(never_reads), identity=server_id)
        )
        conn = await connect(host, port, server_id.public, config=Config(write_timeout=0.5))

        async def receiver() -> None:
            try:
                await conn.receive()
            except StalkError as exc:
                errors["receive"] = exc

        async def flood() -> None:
            try:
                while True:
                    await conn.send(Spack(bytes(64 * 1024)))
            except StalkError as exc:
                errors["send"] = exc

        with anyio.fail_after(10):
            async with anyio.create_task_group() as inner:
                inner.start_soon(receiver)
                inner.start_soon(flood)
        stop.set()
        await conn.aclose()
        tg.cancel_scope.cancel()
    assert isinstance(errors["send"], ConnectionLost)
    # The connection broke; nobody closed it.
    assert isinstance(errors["receive"], ConnectionLost), repr(errors["receive"])
