"""``Session.send_now`` against the general path (``send``, then ``data_to_send`` until empty).

``send_now`` frames and encrypts a lone small spack in one step when nothing else waits.
Two session pairs with the same keys (fixed ephemerals) run the same operations, one
sending with ``send_now`` and one with ``send``, each then writing all its output as a
connection does; the bytes each client puts on the wire
must be the same, in the same order, and so must what each server receives. Operations
mix in what makes the general path necessary: spacks queued and not flushed, output not
yet taken, answers owed to a PING, spacks over one Noise message, and rekeys.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import Pair, drain, take_all
from stalk.errors import MessageTooLarge
from stalk.events import MessageReceived, PongReceived
from stalk.identity import Identity
from stalk.session import Role, Session, SessionConfig
from stalk.spack import Spack

_CLIENT = Identity.from_private_bytes(bytes(range(1, 33)))
_SERVER = Identity.from_private_bytes(bytes(range(2, 34)))
_CLIENT_EPHEMERAL = bytes(range(3, 35))
_SERVER_EPHEMERAL = bytes(range(4, 36))
_LIMIT = 256 * 1024

# ("now", size): send a spack of ``size`` bytes; ("queue", size): queue one, no flush;
# ("take",): the driver takes one buffer of output (and the server receives it);
# ("ping",): the server pings, so the client owes a PONG; ("rekey",): request a rekey.
_op = st.one_of(
    st.tuples(st.just("now"), st.integers(0, 200)),
    st.tuples(st.just("now"), st.integers(60_000, 140_000)),
    st.tuples(st.just("queue"), st.integers(0, 3000)),
    st.tuples(st.just("take")),
    st.tuples(st.just("ping")),
    st.tuples(st.just("rekey")),
)


def _pair(rekey_after_messages: int) -> Pair:
    config = SessionConfig(max_message_size=_LIMIT, rekey_after_messages=rekey_after_messages)
    client = Session(
        Role.INITIATOR,
        _CLIENT,
        config=config,
        ephemeral_for_testing_only=_CLIENT_EPHEMERAL,
    )
    server = Session(
        Role.RESPONDER, _SERVER, config=config, ephemeral_for_testing_only=_SERVER_EPHEMERAL
    )
    pair = Pair(client, server)
    pair.pump()
    pair.client_events.clear()
    pair.server_events.clear()
    return pair


def _spack(index: int, size: int) -> Spack:
    return Spack(index, bytes((index + i) % 251 for i in range(size)))


class _Side:
    """One pair and what its client wrote and its server received."""

    def __init__(self, rekey_after_messages: int, *, fast: bool) -> None:
        self.pair = _pair(rekey_after_messages)
        self.fast = fast
        self.wire = bytearray()
        self.received: list[object] = []

    def deliver(self, data: bytes | bytearray) -> None:
        self.wire += data
        self.pair.server.receive_data(bytes(data))
        for event in drain(self.pair.server):
            if isinstance(event, MessageReceived):
                self.received.append(event.spack)
        if answers := take_all(self.pair.server):  # PONGs (b"" would be an EOF)
            self.pair.client.receive_data(answers)
        for event in drain(self.pair.client):
            if isinstance(event, PongReceived):
                self.received.append(("pong", event.payload))

    def run(self, op: tuple[object, ...], index: int) -> None:
        client = self.pair.client
        if op[0] == "now":
            size = op[1]
            assert isinstance(size, int)
            if self.fast and (frame := client.send_now(_spack(index, size))) is not None:
                assert client.data_to_send() == b""  # the frame was all there was
                self.deliver(frame)
                return
            if not self.fast:
                client.send(_spack(index, size))
            while data := client.data_to_send():  # a driver writes everything at once
                self.deliver(data)
        elif op[0] == "queue":
            size = op[1]
            assert isinstance(size, int)
            client.queue(_spack(index, size))
        elif op[0] == "take":
            if data := client.data_to_send():
                self.deliver(data)
        elif op[0] == "ping":
            self.pair.server.ping(b"p%d" % index)
            self.pair.client.receive_data(take_all(self.pair.server))
            drain(self.pair.client)
        else:
            client._sealer.request_rekey()


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(_op, max_size=40), rekey_after_messages=st.integers(1, 6))
@example(ops=[("now", 10)], rekey_after_messages=1)
@example(ops=[("queue", 10), ("now", 10)], rekey_after_messages=100)
@example(ops=[("ping",), ("now", 10)], rekey_after_messages=100)
@example(ops=[("now", 100_000), ("now", 10)], rekey_after_messages=100)
def test_send_now_puts_the_bytes_of_send_on_the_wire(
    ops: list[tuple[object, ...]], rekey_after_messages: int
) -> None:
    fast = _Side(rekey_after_messages, fast=True)
    general = _Side(rekey_after_messages, fast=False)
    for index, op in enumerate(ops):
        fast.run(op, index)
        general.run(op, index)
    for side in (fast, general):
        side.pair.client.flush()
        while data := side.pair.client.data_to_send():
            side.deliver(data)
    assert fast.wire == general.wire
    assert fast.received == general.received


def test_send_now_takes_the_shortcut_when_nothing_waits() -> None:
    """Idle: the frame comes back at once, and the server reads the spack from it alone."""
    side = _Side(1000, fast=True)
    frame = side.pair.client.send_now(Spack("hello"))
    assert frame is not None
    side.deliver(frame)
    assert side.received == [Spack("hello")]


def test_send_now_queues_nothing_for_a_spack_it_refuses() -> None:
    """Too large for the peer: the typed error, and the session is as before."""
    side = _Side(1000, fast=True)
    with pytest.raises(MessageTooLarge):
        side.pair.client.send_now(Spack(bytes(_LIMIT)))
    assert side.pair.client.data_to_send() == b""
    frame = side.pair.client.send_now(Spack(1))
    assert frame is not None
    side.deliver(frame)
    assert side.received == [Spack(1)]
