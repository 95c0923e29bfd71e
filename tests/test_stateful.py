"""Hypothesis stateful tests: two sans-IO sessions driven by random API calls and deliveries.

The machine owns both ends of one connection and the bytes in flight between them. Its
rules: send, queue and flush spacks of any size (up to ~300 KB, so fragmentation across
Noise messages and batching both happen), ping, request a rekey, close either side, deliver
bytes in each direction in random chunk sizes (partial frames, frames split anywhere), and
tamper: flip one bit of the bytes in flight.

Invariants, checked at every event:

- the spacks delivered in a direction are exactly the spacks flushed in it, in order
  (compared by their encodings, so types must match too);
- the pongs a side receives are its pings, in order;
- nothing is delivered after a CLOSE, and a CLOSE carries the code its sender gave;
- an untampered direction never raises; a tampered one fails with a typed error, after
  delivering exactly what the frames before the tampered one carried, and nothing more;
- nothing raises an exception that is not a StalkError (a local misuse that the model
  expects, such as sending after close, must raise the documented error).

At the end every byte is delivered, both directions get EOF, and the model checks the end
state: a CLOSE for a sender that closed, a truncation (ConnectionLost) otherwise.

Budget: the default run is derandomized and small (CI); ``pytest -m slow`` runs a random
search with ``STALK_STATEFUL_EXAMPLES`` examples (default 2000) of 60 steps.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Literal

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from helpers import take_all
from stalk.errors import (
    ConnectionClosed,
    ConnectionLost,
    MessageTooLarge,
    ProtocolError,
    StalkError,
)
from stalk.events import (
    NEED_DATA,
    PAUSED,
    CloseReceived,
    HandshakeComplete,
    MessageReceived,
    PeerIdentified,
    PongReceived,
)
from stalk.identity import Identity
from stalk.session import Role, Session, SessionConfig, SessionState
from stalk.spack import Spack
from stalk.wire import DEFAULT_MAX_MESSAGE_SIZE, Pattern

Side = Literal["client", "server"]
SIDES: tuple[Side, ...] = ("client", "server")

CLIENT = Identity.from_private_bytes(hashlib.sha256(b"stateful client").digest())
SERVER = Identity.from_private_bytes(hashlib.sha256(b"stateful server").digest())
EPHEMERALS = {
    "client": hashlib.sha256(b"stateful client e").digest(),
    "server": hashlib.sha256(b"stateful server e").digest(),
}

#: Spack payload sizes: tiny, around one Noise message (the fragmentation edge), anything.
SIZES = st.one_of(
    st.integers(0, 300),
    st.integers(65_000, 66_000),
    st.integers(0, 300_000),
)
#: Delivery chunk sizes: byte-sized (frame headers split), medium, whole frames.
CHUNKS = st.one_of(st.integers(1, 8), st.integers(1, 2_000), st.integers(1, 70_000))
SMALL_LIMIT = 100_000


def other(side: Side) -> Side:
    return "server" if side == "client" else "client"


@dataclass
class Wire:
    """One direction: the honest bytes sent, what is still in flight, and the tamper."""

    sender: Side
    #: Everything the sender wrote, untampered (to find frame boundaries).
    honest: bytearray = field(default_factory=bytearray)
    #: Written, not yet delivered (possibly tampered).
    inflight: bytearray = field(default_factory=bytearray)
    #: Bytes delivered so far.
    delivered: int = 0
    #: Absolute offset of the flipped byte, if any.
    tamper_at: int | None = None
    #: (spacks, pongs) the receiver had when the tampered frame started: the most it may
    #: ever deliver.
    frozen: tuple[int, int] | None = None

    def frame_start(self, offset: int) -> int:
        """Start of the unit (preamble, verdict or frame) holding byte ``offset``."""
        pos = 8 if self.sender == "client" else 1
        start = 0
        while pos <= offset:
            start = pos
            pos += 2 + int.from_bytes(self.honest[pos : pos + 2], "big")
        return start


class SessionPair(RuleBasedStateMachine):
    """Both ends of one stalk connection, and a model of what each must see."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = False
        self.sessions: dict[Side, Session] = {}
        self.wires: dict[Side, Wire] = {s: Wire(s) for s in SIDES}  # keyed by sender
        self.flushed: dict[Side, list[bytes]] = {s: [] for s in SIDES}
        self.pending: dict[Side, list[bytes]] = {s: [] for s in SIDES}
        self.delivered: dict[Side, list[bytes]] = {s: [] for s in SIDES}  # keyed by sender
        self.pings: dict[Side, list[bytes]] = {s: [] for s in SIDES}
        self.pongs: dict[Side, list[bytes]] = {s: [] for s in SIDES}
        #: The CLOSE each side received, and the code each side sent.
        self.closes: dict[Side, CloseReceived | None] = dict.fromkeys(SIDES)
        self.close_codes: dict[Side, int] = {}
        self.errors: dict[Side, StalkError] = {}
        self.opened: dict[Side, bool] = dict.fromkeys(SIDES, False)
        self.at_eof: set[Side] = set()
        self.counter = 0

    # -- set-up ------------------------------------------------------------------------------

    @initialize(
        pattern=st.sampled_from(["XX", "IK"]),
        client_limit=st.sampled_from([DEFAULT_MAX_MESSAGE_SIZE, SMALL_LIMIT]),
        server_limit=st.sampled_from([DEFAULT_MAX_MESSAGE_SIZE, SMALL_LIMIT]),
        rekey_messages=st.sampled_from([1, 3, 1 << 16]),
        rekey_bytes=st.sampled_from([40_000, 1 << 30]),
    )
    def start(
        self,
        pattern: Pattern,
        client_limit: int,
        server_limit: int,
        rekey_messages: int,
        rekey_bytes: int,
    ) -> None:
        def config(limit: int) -> SessionConfig:
            return SessionConfig(
                max_message_size=limit,
                rekey_after_messages=rekey_messages,
                rekey_after_bytes=rekey_bytes,
            )

        self.sessions = {
            "client": Session(
                Role.INITIATOR,
                CLIENT,
                peer=SERVER.public if pattern == "IK" else None,
                config=config(client_limit),
                ephemeral_for_testing_only=EPHEMERALS["client"],
            ),
            "server": Session(
                Role.RESPONDER,
                SERVER,
                config=config(server_limit),
                ephemeral_for_testing_only=EPHEMERALS["server"],
            ),
        }
        self.ready = True
        self.pump_all()  # pull() accepts the client and records the handshake events
        assert self.opened == {"client": True, "server": True}
        for side in SIDES:
            assert self.sessions[side].state is SessionState.OPEN

    # -- the model's view of each side -----------------------------------------------------------

    def can_send(self, side: Side) -> bool:
        session = self.sessions[side]
        return not session.close_sent and session.state is not SessionState.FAILED

    def make_spack(self, side: Side, size: int) -> Spack:
        self.counter += 1
        seed = hashlib.sha256(f"{side} {self.counter}".encode()).digest()
        return Spack(self.counter, side, (seed * (size // 32 + 1))[:size])

    def fail(self, side: Side, exc: StalkError) -> None:
        """``side`` raised ``exc`` while receiving: it must have been tampered with."""
        wire = self.wires[other(side)]
        assert self.sessions[side].state is SessionState.FAILED
        self.errors[side] = exc
        if side in self.at_eof and wire.tamper_at is None:
            # A truncation: EOF without the sender's CLOSE.
            assert isinstance(exc, ConnectionLost), repr(exc)
            assert not self.sessions[other(side)].close_sent
            return
        assert wire.tamper_at is not None, f"{side} failed on untampered input: {exc!r}"
        assert isinstance(exc, (ProtocolError, ConnectionLost)), repr(exc)
        self.pending[side].clear()  # a failed session drops what was queued, unflushed

    # -- bytes between the two sides ---------------------------------------------------------

    def collect(self, sender: Side) -> None:
        data = take_all(self.sessions[sender])
        wire = self.wires[sender]
        wire.honest += data
        wire.inflight += data

    def pull(self, receiver: Side) -> None:
        """Take the events ``receiver`` can produce and check each against the model.

        Not :func:`helpers.drain`: every event is checked as it comes, and PAUSED moves the
        owed output into the wire model (bytes in flight, delivered by the rules).
        """
        session = self.sessions[receiver]
        sender = other(receiver)
        if receiver in self.errors:
            with pytest.raises(StalkError) as info:
                session.next_event()
            assert info.value is self.errors[receiver]
            return
        while True:
            try:
                event = session.next_event()
            except StalkError as exc:
                self.fail(receiver, exc)
                return
            if event is NEED_DATA:
                return
            if event is PAUSED:
                self.collect(receiver)  # what it owes goes out, then it reads on
                continue
            close = self.closes[receiver]
            if close is not None:
                assert event == close, f"{event!r} after {close!r}"
                return
            if isinstance(event, PeerIdentified):
                session.accept()
            elif isinstance(event, HandshakeComplete):
                self.opened[receiver] = True
            elif isinstance(event, MessageReceived):
                got = self.delivered[sender]
                got.append(event.spack.encode())
                expected = self.flushed[sender]
                assert len(got) <= len(expected), "a spack was delivered that was never sent"
                assert got[-1] == expected[len(got) - 1], f"spack {len(got)} corrupted"
            elif isinstance(event, PongReceived):
                self.pongs[receiver].append(event.payload)
                pings = self.pings[receiver]
                assert self.pongs[receiver] == pings[: len(self.pongs[receiver])]
            else:
                assert isinstance(event, CloseReceived)
                self.closes[receiver] = event
                if self.wires[sender].tamper_at is None and sender in self.close_codes:
                    assert event.code == self.close_codes[sender]
                return
            self.check_frozen(sender)

    def check_frozen(self, sender: Side) -> None:
        wire = self.wires[sender]
        if wire.frozen is not None:
            receiver = other(sender)
            now = (len(self.delivered[sender]), len(self.pongs[receiver]))
            assert now == wire.frozen, f"delivered {now} after tampering, at most {wire.frozen}"

    def freeze(self, sender: Side) -> None:
        wire = self.wires[sender]
        receiver = other(sender)
        wire.frozen = (len(self.delivered[sender]), len(self.pongs[receiver]))

    def deliver(self, sender: Side, budget: int, chunk: int) -> None:
        """Move up to ``budget`` bytes from ``sender`` to the other side, ``chunk`` at a time."""
        self.collect(sender)
        wire = self.wires[sender]
        receiver = other(sender)
        while budget > 0 and wire.inflight:
            n = min(chunk, budget, len(wire.inflight))
            if wire.tamper_at is not None and wire.frozen is None:
                anchor = wire.frame_start(wire.tamper_at)
                if wire.delivered >= anchor:
                    self.freeze(sender)
                else:
                    n = min(n, anchor - wire.delivered)
            piece = bytes(wire.inflight[:n])
            del wire.inflight[:n]
            wire.delivered += n
            budget -= n
            self.sessions[receiver].receive_data(piece)
            self.pull(receiver)
            self.collect(receiver)  # PONGs, error CLOSEs
        self.check_frozen(sender)

    def pump_all(self) -> None:
        moved = True
        while moved:
            moved = False
            for sender in SIDES:
                self.collect(sender)
                if self.wires[sender].inflight:
                    moved = True
                    self.deliver(sender, 1 << 62, 1 << 16)

    # -- rules --------------------------------------------------------------------------------

    @precondition(lambda self: self.ready)
    @rule(side=st.sampled_from(SIDES), size=SIZES)
    def send(self, side: Side, size: int) -> None:
        self.queue(side, [size])
        self.flush(side)

    @precondition(lambda self: self.ready)
    @rule(side=st.sampled_from(SIDES), sizes=st.lists(SIZES, min_size=1, max_size=6))
    def queue(self, side: Side, sizes: list[int]) -> None:
        session = self.sessions[side]
        for size in sizes:
            spack = self.make_spack(side, size)
            if not self.can_send(side):
                with pytest.raises(ConnectionClosed):
                    session.queue(spack)
            elif len(spack.encode()) > (session.peer_max_message_size or 0):
                with pytest.raises(MessageTooLarge):
                    session.queue(spack)
            else:
                session.queue(spack)
                self.pending[side].append(spack.encode())

    def flushed_now(self, side: Side) -> None:
        self.flushed[side] += self.pending[side]
        self.pending[side].clear()

    @precondition(lambda self: self.ready)
    @rule(side=st.sampled_from(SIDES))
    def flush(self, side: Side) -> None:
        self.sessions[side].flush()  # never raises: nothing is pending once closed/failed
        self.flushed_now(side)

    @precondition(lambda self: self.ready)
    @rule(side=st.sampled_from(SIDES), payload=st.binary(max_size=1024))
    def ping(self, side: Side, payload: bytes) -> None:
        if not self.can_send(side):
            with pytest.raises(ConnectionClosed):
                self.sessions[side].ping(payload)
            return
        self.sessions[side].ping(payload)  # flushes what was queued, then the PING
        self.flushed_now(side)
        self.pings[side].append(payload)

    @precondition(lambda self: self.ready)
    @rule(side=st.sampled_from(SIDES))
    def request_rekey(self, side: Side) -> None:
        self.sessions[side].request_rekey()

    @precondition(lambda self: self.ready)
    @rule(
        side=st.sampled_from(SIDES),
        code=st.sampled_from([0, 0, 8, 0x1234]),
        reason=st.text(max_size=40),
    )
    def close(self, side: Side, code: int, reason: str) -> None:
        sending = self.can_send(side)
        self.sessions[side].close(code, reason)  # idempotent; a no-op once failed
        if sending:
            self.flushed_now(side)  # CLOSE goes after everything queued
            self.close_codes[side] = code

    @precondition(lambda self: self.ready)
    @rule(sender=st.sampled_from(SIDES), chunk=CHUNKS, chunks=st.integers(1, 40))
    def deliver_some(self, sender: Side, chunk: int, chunks: int) -> None:
        self.deliver(sender, chunk * chunks, chunk)

    @precondition(lambda self: self.ready)
    @rule()
    def deliver_everything(self) -> None:
        self.pump_all()

    @precondition(lambda self: self.ready)
    @rule(sender=st.sampled_from(SIDES), where=st.integers(0, 1 << 32), bit=st.integers(0, 7))
    def tamper(self, sender: Side, where: int, bit: int) -> None:
        self.collect(sender)
        wire = self.wires[sender]
        if wire.tamper_at is not None or not wire.inflight:
            return
        index = where % len(wire.inflight)
        wire.inflight[index] ^= 1 << bit
        wire.tamper_at = wire.delivered + index
        if wire.delivered >= wire.frame_start(wire.tamper_at):
            self.freeze(sender)  # the tampered frame is partly delivered: nothing more

    # -- the end ------------------------------------------------------------------------------

    def teardown(self) -> None:
        if not self.ready:
            return
        for side in SIDES:  # what this example covered (--hypothesis-show-statistics)
            flushed = len(self.flushed[side])
            bucket = "0" if not flushed else "1-9" if flushed < 10 else "10+"
            event(f"spacks flushed by one side: {bucket}")
            if any(len(spack) > 65_000 for spack in self.flushed[side]):
                event("a fragmented spack")
            if self.wires[side].tamper_at is not None:
                event("tampered")
            if side in self.close_codes:
                event("closed")
            if self.pings[side]:
                event("pinged")
        self.pump_all()
        for receiver in SIDES:
            self.at_eof.add(receiver)
            if receiver not in self.errors:
                self.sessions[receiver].receive_data(b"")
                self.pull(receiver)
        for sender in SIDES:
            receiver = other(sender)
            wire = self.wires[sender]
            if wire.tamper_at is not None:
                assert receiver in self.errors, "tampered bytes were accepted"
                self.check_frozen(sender)
                continue
            assert self.delivered[sender] == self.flushed[sender]
            close = self.closes[receiver]
            if self.sessions[sender].close_sent:
                assert receiver not in self.errors
                assert close is not None, "a CLOSE was sent but not received"
                if sender in self.close_codes:
                    assert close.code == self.close_codes[sender]
                else:  # the sender failed and closed with an error code
                    assert close.code != 0
            else:
                assert close is None
                assert isinstance(self.errors.get(receiver), ConnectionLost)
            # Every PING was answered, unless the answering side had closed or failed.
            answerer = self.sessions[receiver]
            untouched = all(w.tamper_at is None for w in self.wires.values())
            if untouched and not answerer.close_sent:
                assert self.pongs[sender] == self.pings[sender]


CI_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TestSessionPair = SessionPair.TestCase
TestSessionPair.settings = CI_SETTINGS


@pytest.mark.slow
def test_session_pair_long_search() -> None:
    run_state_machine_as_test(
        SessionPair,
        settings=settings(
            max_examples=int(os.environ.get("STALK_STATEFUL_EXAMPLES", "2000")),
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
