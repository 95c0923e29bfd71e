"""A hostile but protocol-valid peer, as a hypothesis state machine (issue 9).

The peer holds real keys and sends only what SPEC allows, in whatever mix hypothesis
chooses: 1-byte FRAGMENTs of a spack, PINGs whose PONGs it never reads, unsolicited
PONGs, REKEYs, dense spacks of empty containers, batches of tiny spacks. The victim is a
sans-IO responder driven as the anyio layer drives it: while it is PAUSED owing PONGs the
peer is blocked (it cannot push more until it reads, which it does only when a rule says
so). After every step the victim's Python heap (tracemalloc, the victim's only
allocations in this process besides the peer's frames) must be within the resource model
of SPEC 21: what it holds of the spack in progress (a little over what was counted), the
objects decoded so far (their weight), the spacks decoded from a transport message it has
not finished (their weight), the PONGs owed (one Noise message beyond the one being
processed), and a constant; and whatever it delivers must be exactly what was sent.
"""

from __future__ import annotations

import ast
import gc
import os
import tracemalloc
from collections import deque
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from helpers import connected_pair, take_all
from stalk.errors import MessageLimitExceeded
from stalk.events import NEED_DATA, PAUSED, MessageReceived
from stalk.framing import encode_frame
from stalk.records import encode_uvarint
from stalk.session import SessionConfig
from stalk.spack import Spack
from stalk.weigh import MAX_WEIGHT_PER_BYTE, weigh
from stalk.wire import RECORD_CAPACITY, RecordKind

KiB = 1024
LIMIT = 256 * KiB
#: Where the test's own machinery allocates in the traced heap: hypothesis (which, among
#: other things, collects constants from newly imported modules' source in the middle of
#: an example: 390 KB seen) and what it uses. Not the victim's.
_HARNESS = [
    tracemalloc.Filter(False, f"*{os.sep}hypothesis{os.sep}*"),
    tracemalloc.Filter(False, f"*{os.sep}sortedcontainers{os.sep}*"),
    tracemalloc.Filter(False, ast.__file__),
    tracemalloc.Filter(False, tracemalloc.__file__),  # the snapshots themselves
]
#: What the victim may hold besides the model's terms: the piecewise decoder's own state,
#: list and dict overheads (measured: under 8 KiB).
CONSTANT = 64 * KiB


def _item_weight(shape: bytes) -> int:
    """The weight of one more item of ``shape`` in a long array (its slot included)."""
    return (weigh(b"\xdc\x03\xe8" + shape * 1000) - weigh(b"\x90")) // 1000 + 1


#: Shapes of dense spacks (empty lists, tiny maps, pairs), and the weight of one item.
SHAPES = {shape: _item_weight(shape) for shape in (b"\x90", b"\x81\xa0\x90", b"\x92\x01\x02")}


def record(kind: RecordKind, body: bytes) -> bytes:
    return bytes((kind, 0)) + encode_uvarint(len(body)) + body


class HostilePeer(RuleBasedStateMachine):
    """The peer's moves; the victim's memory is checked against the model after each."""

    def __init__(self) -> None:
        super().__init__()
        self.connect()
        # The spack in progress: its encoding so far, what it promises, its shape.
        self.sent = b""
        self.total = 0
        self.shape: bytes | None = None
        #: Every byte of it was sent, but the victim has not read them all yet.
        self.sent_whole = False
        #: Encodings of the spacks sent whole and not yet delivered, oldest first.
        self.expected: deque[bytes] = deque()
        #: The heap before the first move. Taken at the first check, not in start_tracing:
        #: hypothesis allocates between the two (240 KB seen in a long search), and that is
        #: not the victim's.
        self.base: int | None = None
        self.base_snapshot: tracemalloc.Snapshot | None = None

    def connect(self) -> None:
        """A fresh connection to a fresh victim."""
        self.pair = connected_pair(server_config=SessionConfig(max_message_size=LIMIT))
        self.victim = self.pair.server
        self.cipher = self.pair.client._sealer.cipher
        self.blocked = False  # the victim owes PONGs it cannot write: the peer cannot send
        #: The plaintext the victim stopped in when it blocked (it may hold its spacks).
        self.in_flight = 0
        self.refused: Exception | None = None

    @initialize()
    def start_tracing(self) -> None:
        gc.collect()
        # Traces from this example on only: earlier examples' blocks (hypothesis keeps
        # much of each) would make every snapshot of a long search slower and slower.
        tracemalloc.stop()
        tracemalloc.start()
        self.base = None

    # -- driving the victim ---------------------------------------------------------------

    def send(self, plaintext: bytes) -> None:
        """One Noise message to the victim, then let it work as a driver would."""
        assert self.cipher is not None
        self.victim.receive_data(encode_frame(self.cipher.encrypt(plaintext)))
        self.in_flight = len(plaintext)
        self.pump()

    def pump(self) -> None:
        """Let the victim work until it needs data or blocks owing output.

        Not :func:`helpers.pump`: only the victim is a Session (the peer writes frames by
        hand), and PAUSED owing output blocks the peer instead of moving the output.
        """
        try:
            while True:
                event = self.victim.next_event()
                if event is NEED_DATA:
                    self.blocked = False
                    self.in_flight = 0
                    if self.sent_whole:  # its last piece was read: it was delivered
                        self.spack_done()
                    return
                if event is PAUSED:
                    if self.victim.has_output:
                        self.blocked = True  # its writes block: the peer reads nothing
                        return
                    continue
                if isinstance(event, MessageReceived):
                    # The application takes it: checked, then no longer the victim's.
                    assert self.expected, f"delivered {event.spack!r}, never sent"
                    assert event.spack == Spack.decode(self.expected.popleft())
        except MessageLimitExceeded as exc:
            self.refused = exc
            # Nothing of the refused spack, nor anything after it, is delivered.
            self.expected.clear()

    def can_send(self) -> bool:
        return not self.blocked and self.refused is None

    # -- the peer's moves -----------------------------------------------------------------

    @precondition(lambda self: self.can_send() and self.shape is None)
    @rule(
        size=st.one_of(st.integers(1000, 70_000), st.integers(1000, LIMIT - 6)),
        shape=st.sampled_from([b"bin", *SHAPES]),
    )
    def start_spack(self, size: int, shape: bytes) -> None:
        """The first FRAGMENT of a spack: a bin of ``size`` zeros, or ``size`` bytes of a
        dense shape (an array of empty containers, of tiny maps or of pairs)."""
        if shape == b"bin":
            self.sent = b"\x91\xc6" + size.to_bytes(4, "big")
            self.total = size + 6
        else:
            count = size // len(shape)
            self.sent = b"\xdd" + count.to_bytes(4, "big")
            self.total = 5 + count * len(shape)
        self.shape = shape
        self.send(record(RecordKind.FRAGMENT, self.sent))

    def next_bytes(self, n: int) -> bytes:
        assert self.shape is not None
        if self.shape == b"bin":
            return bytes(n)
        body = self.sent[5:]
        start = len(body) % len(self.shape)
        pattern = (self.shape * (n // len(self.shape) + 2))[start:]
        return pattern[:n]

    @precondition(lambda self: self.can_send() and self.shape is not None)
    @rule(count=st.integers(1, RECORD_CAPACITY // 4), padding=st.integers(0, 40))
    def tiny_fragments(self, count: int, padding: int) -> None:
        """``count`` 1-byte FRAGMENTs in one message, padded with PONG records."""
        count = min(count, self.total - len(self.sent) - 1)
        if count < 1:
            return
        chunk = self.next_bytes(count)
        self.sent += chunk
        plaintext = b"".join(record(RecordKind.FRAGMENT, bytes([b])) for b in chunk)
        pong = record(RecordKind.PONG, bytes(1024))
        padding = min(padding, (RECORD_CAPACITY - len(plaintext)) // len(pong))
        self.send(plaintext + pong * padding)

    @precondition(lambda self: self.can_send() and self.shape is not None)
    @rule(count=st.integers(1, 16))
    def lone_tiny_fragments(self, count: int) -> None:
        """``count`` messages, each one 1-byte FRAGMENT padded with PONGs to fill it."""
        pong = record(RecordKind.PONG, bytes(1024))
        padding = pong * ((RECORD_CAPACITY - 4) // len(pong))
        for _ in range(min(count, self.total - len(self.sent) - 1)):
            if not self.can_send():
                return
            chunk = self.next_bytes(1)
            self.sent += chunk
            self.send(record(RecordKind.FRAGMENT, chunk) + padding)

    @precondition(lambda self: self.can_send() and self.shape is not None)
    @rule(size=st.integers(1, 65_000))
    def big_fragment(self, size: int) -> None:
        size = min(size, self.total - len(self.sent) - 1)
        if size < 1:
            return
        chunk = self.next_bytes(size)
        self.sent += chunk
        self.send(record(RecordKind.FRAGMENT, chunk))

    @precondition(lambda self: self.can_send() and self.shape is not None)
    @rule()
    def finish_spack(self) -> None:
        """The final MESSAGE (in pieces of at most one Noise message's worth)."""
        self.expected.append(self.sent + self.next_bytes(self.total - len(self.sent)))
        while self.can_send() and len(self.sent) < self.total:
            chunk = self.next_bytes(min(self.total - len(self.sent), 65_000))
            self.sent += chunk
            kind = RecordKind.MESSAGE if len(self.sent) == self.total else RecordKind.FRAGMENT
            self.send(record(kind, chunk))
        if len(self.sent) < self.total:
            if self.refused is None:  # refused: pump() dropped every expected spack
                self.expected.pop()  # blocked before the end: still in progress
            return
        if self.blocked:
            # All sent, but the victim stopped inside it (its step ended while it owed
            # PONGs): it holds the spack decoded so far until it reads on.
            self.sent_whole = True
            return
        self.spack_done()

    def spack_done(self) -> None:
        """The spack in progress was delivered (or refused): the victim holds none of it."""
        self.shape = None
        self.sent = b""
        self.sent_whole = False

    @precondition(lambda self: self.can_send())
    @rule(
        messages=st.integers(1, 8),
        count=st.integers(1, 63),
        size=st.sampled_from([0, 16, 1024]),
    )
    def pings_never_read(self, messages: int, count: int, size: int) -> None:
        """``messages`` messages of ``count`` PINGs each, sent for as long as the victim
        reads; their PONGs are never read."""
        ping = record(RecordKind.PING, bytes(size))
        for _ in range(messages):
            if not self.can_send():
                return
            self.send(ping * min(count, RECORD_CAPACITY // len(ping)))

    @precondition(lambda self: self.blocked)
    @rule()
    def peer_reads(self) -> None:
        """The peer finally reads: what the victim owes is written, and it reads on."""
        take_all(self.victim)
        self.blocked = False
        self.pump()

    @precondition(lambda self: self.can_send())
    @rule(count=st.integers(1, RECORD_CAPACITY // 3))
    def unsolicited_pongs(self, count: int) -> None:
        self.send(record(RecordKind.PONG, b"") * count)

    @precondition(lambda self: self.refused is not None)
    @rule()
    def reconnect(self) -> None:
        """After a refusal the connection is gone: the peer connects again."""
        del self.pair, self.victim, self.cipher
        self.spack_done()
        self.connect()
        self.start_tracing()

    @precondition(lambda self: self.can_send())
    @rule()
    def rekey(self) -> None:
        assert self.cipher is not None
        self.send(record(RecordKind.PING, b"r") + bytes((RecordKind.REKEY, 0, 0)))
        self.cipher.rekey()

    @precondition(lambda self: self.can_send() and self.shape is None)
    @rule(count=st.integers(1, RECORD_CAPACITY // 4))
    def tiny_spacks(self, count: int) -> None:
        self.expected += [b"\x90"] * count
        self.send(record(RecordKind.MESSAGE, b"\x90") * count)

    # -- the model --------------------------------------------------------------------------

    def model(self) -> int:
        """The most the victim may hold now (SPEC 21, "Resource model")."""
        counted = len(self.sent)
        weight = 0
        if self.shape is not None and self.shape != b"bin":
            weight = (counted // len(self.shape) + 1) * SHAPES[self.shape]
        owed = 2 * 65_536
        in_flight = MAX_WEIGHT_PER_BYTE * self.in_flight  # spacks of a message not yet done
        return int(1.2 * counted) + weight + owed + in_flight + CONSTANT

    @invariant()
    def within_the_model(self) -> None:
        if self.base is None:
            # (The snapshot is in the base: it is the test's, not the victim's.)
            self.base_snapshot = tracemalloc.take_snapshot().filter_traces(_HARNESS)
            self.base = tracemalloc.get_traced_memory()[0]
        if self.refused is not None:
            return
        # The peer's own copy of what it sent and expects is in this heap too.
        copies = {id(b): len(b) for b in self.expected}
        peer = sum(copies.values()) + len(self.sent) + 8 * len(self.expected)
        held = tracemalloc.get_traced_memory()[0] - self.base - peer
        if held > self.model():
            held = self.held_without_the_harness(peer)
        assert held <= self.model(), (held, self.model(), len(self.sent), self.shape)

    def held_without_the_harness(self, peer: int) -> int:
        """What the heap grew by since the base, but what the test's machinery allocated.

        Slower than the traced total (two snapshots), so asked only when that total is
        over the model.
        """
        assert self.base_snapshot is not None
        now = tracemalloc.take_snapshot().filter_traces(_HARNESS)
        grown = sum(stat.size_diff for stat in now.compare_to(self.base_snapshot, "filename"))
        return grown - peer


TestHostilePeer = HostilePeer.TestCase
TestHostilePeer.settings = settings(
    max_examples=12,
    stateful_step_count=15,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def test_a_spack_the_victim_stopped_inside_counts_until_delivered() -> None:
    """All of a dense spack sent, the victim stops inside it (its step ended while it owed a
    PONG): it holds the spack's objects decoded so far, within the model, and delivers the
    spack once the peer reads. Found by the long search: a model that counted the spack as
    done once sent saw 1.8 MB held against 197 KB."""
    peer = HostilePeer()
    peer.start_tracing()
    peer.within_the_model()
    peer.pings_never_read(messages=1, count=1, size=0)
    peer.start_spack(size=65_001, shape=b"\x81\xa0\x90")
    peer.finish_spack()
    assert peer.blocked
    assert peer.expected
    assert peer.sent_whole
    peer.within_the_model()
    peer.peer_reads()
    assert not peer.blocked
    assert not peer.expected
    assert peer.shape is None
    peer.within_the_model()


@pytest.mark.slow
def test_hostile_peer_long_search() -> None:
    run_state_machine_as_test(
        HostilePeer,
        settings=settings(
            # No explain phase: its tracer allocates 100+ KB per example in this heap, which
            # would count as the victim's and make a failure replay as another one.
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
            max_examples=int(os.environ.get("STALK_STATEFUL_EXAMPLES", "300")),
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


@pytest.fixture(autouse=True)
def _tracing() -> Any:
    tracemalloc.start()
    yield
    tracemalloc.stop()
