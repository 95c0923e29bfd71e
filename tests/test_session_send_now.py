"""``Session.send_now`` against the general path (``send``, then ``data_to_send`` until empty).

``send_now`` frames and encrypts a lone small spack in one step when nothing else waits.
Two session pairs with the same keys (fixed ephemerals) run the same operations, one
sending with ``send_now`` and one with ``send``, each then writing all its output as a
connection does; the bytes each client puts on the wire
must be the same, in the same order, and so must what each server receives. Operations
mix in what makes the general path necessary: spacks queued and not flushed, output not
yet taken, answers owed to a PING, spacks over one Noise message, and rekeys. With
channels, ``flush_now`` against ``flush`` the same way, with spacks on several channels
and waiting for credit (the server's application releases what it received now and then).
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import Pair, drain, take_all
from stalk.errors import MessageTooLarge
from stalk.events import ChannelMessageReceived, MessageReceived, PongReceived
from stalk.handshake import ChannelParams
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

    def finish(self) -> None:
        """Flush what is left and write it all, as a connection's end does."""
        self.pair.client.flush()
        while data := self.pair.client.data_to_send():
            self.deliver(data)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(_op, max_size=40), rekey_after_messages=st.integers(1, 6))
@example(ops=[("now", 10)], rekey_after_messages=1)
@example(ops=[("queue", 10), ("now", 10)], rekey_after_messages=100)
@example(ops=[("ping",), ("now", 10)], rekey_after_messages=100)
@example(ops=[("now", 100_000), ("now", 10)], rekey_after_messages=100)
def test_send_now_puts_the_bytes_of_send_on_the_wire(
    ops: list[tuple[object, ...]], rekey_after_messages: int
) -> None:
    _same_wire(_Side(rekey_after_messages, fast=True), _Side(rekey_after_messages, fast=False), ops)


def _same_wire(fast: _Side, general: _Side, ops: list[tuple[object, ...]]) -> None:
    """Both sides run ``ops`` and finish: the same bytes on the wire, the same received."""
    for index, op in enumerate(ops):
        fast.run(op, index)
        general.run(op, index)
    for side in (fast, general):
        side.finish()
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


# -- with channels: flush_now against flush ---------------------------------------------------

_SMALL = ChannelParams(max_channels=4, channel_window=6000, connection_window=65_516)
_LARGE = ChannelParams(max_channels=4, channel_window=100_000, connection_window=200_000)
# Windows smaller than a Noise message (spacks wait for credit), and larger (a spack
# takes several messages at once).
_WINDOWS = st.sampled_from(
    [
        _SMALL,
        _LARGE,
    ]
)

# ("now", c, size): queue a spack on channel slot ``c`` and flush it (flush_now on the fast
# side); ("queue", c, size): queue one, no flush; ("take",), ("ping",), ("rekey",): as
# above; ("release",): the server's application takes what it received (credit goes back);
# ("send", size): send a spack on channel 0 (send_now on the fast side, send on the other).
_channel_op = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 200)),
    st.tuples(st.just("now"), st.integers(0, 2), st.integers(0, 200)),
    st.tuples(st.just("now"), st.integers(0, 2), st.integers(2000, 70_000)),
    st.tuples(st.just("queue"), st.integers(0, 2), st.integers(0, 3000)),
    st.tuples(st.just("take")),
    st.tuples(st.just("ping")),
    st.tuples(st.just("rekey")),
    st.tuples(st.just("release")),
)


class _ChannelSide(_Side):
    """A pair with channels: channel 0 and two channels of the client's."""

    def __init__(self, rekey_after_messages: int, *, fast: bool, windows: ChannelParams) -> None:
        config = SessionConfig(
            max_message_size=_LIMIT, rekey_after_messages=rekey_after_messages, channels=windows
        )
        client = Session(
            Role.INITIATOR, _CLIENT, config=config, ephemeral_for_testing_only=_CLIENT_EPHEMERAL
        )
        server = Session(
            Role.RESPONDER, _SERVER, config=config, ephemeral_for_testing_only=_SERVER_EPHEMERAL
        )
        self.pair = Pair(client, server)
        self.pair.pump()
        self.fast = fast
        self.wire = bytearray()
        self.received = []
        self.held: list[ChannelMessageReceived] = []
        self.channels = [0, client.open_channel(), client.open_channel()]

    def deliver(self, data: bytes | bytearray) -> None:
        """Deliver ``data``, then what the credit granted back lets go, until nothing does.

        A loop, not a recursion: a large spack over a small window takes many rounds.
        """
        while data:
            self.wire += data
            self.pair.server.receive_data(bytes(data))
            for event in drain(self.pair.server):
                if isinstance(event, ChannelMessageReceived):
                    self.received.append((event.channel, event.spack))
                    self.held.append(event)
            data = self._answers()

    def _answers(self) -> bytes | bytearray:
        """The server's answers (grants, PONGs) to the client; the client's next output."""
        if answers := take_all(self.pair.server):
            self.pair.client.receive_data(answers)
        for event in drain(self.pair.client):
            if isinstance(event, PongReceived):
                self.received.append(("pong", event.payload))
        return self.pair.client.data_to_send()  # what the credit let go

    def run(self, op: tuple[object, ...], index: int) -> None:
        client = self.pair.client
        if op[0] == "send":  # the base class's "now": channel 0, send_now against send
            super().run(("now", op[1]), index)
        elif op[0] in ("now", "queue"):
            slot, size = op[1], op[2]
            assert isinstance(slot, int)
            assert isinstance(size, int)
            client.queue(_spack(index, size), self.channels[slot])
            if op[0] == "queue":
                return
            if self.fast and (frame := client.flush_now()) is not None:
                assert client.data_to_send() == b""  # the frame was all there was
                self.deliver(frame)
                return
            if not self.fast:
                client.flush()
            while data := client.data_to_send():
                self.deliver(data)
        elif op[0] == "release":
            for event in self.held:
                self.pair.server.release(event.channel, event.size)
            self.held.clear()
            self.deliver(self._answers())
        else:
            super().run(op, index)

    def finish(self) -> None:
        """As a connection's end, then the server's application takes what is left."""
        super().finish()
        self.run(("release",), 0)


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(_channel_op, max_size=40),
    rekey_after_messages=st.integers(1, 6),
    windows=_WINDOWS,
)
@example(ops=[("now", 1, 10)], rekey_after_messages=100, windows=_SMALL)
@example(ops=[("queue", 2, 10), ("now", 1, 10)], rekey_after_messages=100, windows=_SMALL)
@example(
    ops=[("now", 0, 8000), ("now", 0, 10), ("release",)], rekey_after_messages=100, windows=_SMALL
)
@example(ops=[("now", 1, 70_000)], rekey_after_messages=100, windows=_LARGE)
@example(
    ops=[("send", 10), ("queue", 1, 10), ("send", 10)], rekey_after_messages=100, windows=_SMALL
)
@example(
    ops=[("now", 0, 5990), ("send", 20), ("release",), ("send", 20)],
    rekey_after_messages=100,
    windows=_SMALL,
)
def test_flush_now_puts_the_bytes_of_flush_on_the_wire_with_channels(
    ops: list[tuple[object, ...]], rekey_after_messages: int, windows: ChannelParams
) -> None:
    """Channels pack through the multiplexer: flush_now seals its one plaintext at once,
    and leaves more than one (or a spack waiting for credit) to the general path; send_now
    seals a lone small spack on channel 0 itself, within credit."""
    _same_wire(
        _ChannelSide(rekey_after_messages, fast=True, windows=windows),
        _ChannelSide(rekey_after_messages, fast=False, windows=windows),
        ops,
    )


def test_flush_now_seals_a_lone_spack_on_a_channel_at_once() -> None:
    side = _ChannelSide(1000, fast=True, windows=_SMALL)
    client = side.pair.client
    client.queue(Spack("hello"), side.channels[1])
    frame = client.flush_now()
    assert frame is not None
    side.deliver(frame)
    assert side.received == [(side.channels[1], Spack("hello"))]


def test_send_now_seals_a_lone_spack_on_channel_0_at_once_within_credit() -> None:
    """Channel 0 with channels: the shortcut spends the credit; without credit it waits."""
    side = _ChannelSide(1000, fast=True, windows=_SMALL)
    client = side.pair.client
    frame = client.send_now(Spack("hello"))
    assert frame is not None
    side.deliver(frame)
    assert side.received == [(0, Spack("hello"))]
    big = client.send_now(Spack(bytes(_SMALL.channel_window - 20)))  # what is left, nearly
    assert big is not None
    side.deliver(big)
    # Over channel 0's credit: the general path, in parts as the assembly slot grants.
    assert client.send_now(Spack(bytes(30))) is None
    while data := client.data_to_send():
        side.deliver(data)
    assert side.received[-1] == (0, Spack(bytes(30)))
