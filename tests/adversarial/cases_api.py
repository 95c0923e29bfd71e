"""API misuse on real connections, listener-killing faults, and sans-IO rows.

``api`` rows use :func:`stalk.connect` against the shared listener (through a recording
relay, so the bytes actually written can be counted) and misuse the connection; the
listener's handler must receive exactly the spacks that were legitimately sent, and
nothing at all for a call that failed. ``sans-io`` rows feed a
:class:`~stalk.session.Session` directly: states no socket can reach cheaply, and
exhaustive sweeps (every bit flip, every truncation point).
"""

from __future__ import annotations

import array
import collections
import contextlib
import decimal
import enum
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
from anyio.abc import ByteStream

from helpers import byte_stream_pair, connected_pair, drain, make_pair, take_all, wait_until
from stalk.config import Config
from stalk.connection import Connection, connect
from stalk.errors import (
    ConnectionClosed,
    ConnectionLost,
    DecryptionFailed,
    HandshakeFailed,
    InvalidSpackValue,
    LocalProtocolError,
    MessageTooLarge,
    NonceExhausted,
    StalkError,
)
from stalk.events import CloseReceived, Event, MessageReceived
from stalk.framing import encode_frame
from stalk.identity import Identity, PublicIdentity
from stalk.session import Session, SessionState
from stalk.spack import Spack
from stalk.wire import CloseCode

from .attacks import A, B, row
from .harness import (
    MAX_MESSAGE,
    TEARDOWN,
    Attack,
    Case,
    Expect,
    Outcome,
    ServerSide,
    Target,
    eventually,
    finish,
)
from .peers import (
    Initiator,
    Refused,
    Responder,
    Wire,
    client_handshake,
    frames,
    proxy,
    raw_server,
    read_verdict,
    server_handshake,
)

CONFIG = Config(handshake_timeout=3, close_timeout=1)


# -- api: a real connection used wrongly -----------------------------------------------------


Misuse = Callable[[Connection], Awaitable[BaseException | None]]


async def misuse(
    target: Target,
    act: Misuse,
    *,
    sent: tuple[Spack, ...] = (A,),
    then: tuple[Spack, ...] = (),
) -> Outcome:
    """Connect (through a relay), send ``sent``, ``act(conn)``, send ``then``; close.

    ``act`` returns the error the misuse raised (``None`` if it raised nothing, which
    every row treats as a failure). ``then`` shows that the connection is still usable
    after a misuse that must leave it so. The connection is closed afterwards.
    """
    async with proxy(target.address) as relay:
        conn = await connect("127.0.0.1", relay.port, target.server, config=CONFIG)
        for spack in sent:
            await conn.send(spack)
        error = await act(conn)
        for spack in then:
            await conn.send(spack)
        await conn.aclose()
        with anyio.fail_after(TEARDOWN):
            await relay.done.wait()
        port = relay.upstream_ports[0]
    served = target.env.registry.served
    await eventually(lambda: port in served and served[port].done, "the handler ended")
    return Outcome(error, True, list(served[port].received), [*sent, *then], torn_down=True)


async def _raises(call: Awaitable[object]) -> BaseException | None:
    try:
        await call
    except (StalkError, anyio.BusyResourceError, anyio.EndOfStream) as exc:
        return exc
    return None


async def send_after_aclose(conn: Connection) -> BaseException | None:
    await conn.aclose()
    return await _raises(conn.send(B))


async def send_after_send_eof(conn: Connection) -> BaseException | None:
    await conn.send_eof()
    return await _raises(conn.send(B))


async def send_after_two_send_eofs(conn: Connection) -> BaseException | None:
    await conn.send_eof()
    await conn.send_eof()  # idempotent
    return await _raises(conn.send(B))


async def flush_after_aclose(conn: Connection) -> BaseException | None:
    await conn.aclose()
    return await _raises(conn.flush())


async def queue_after_aclose(conn: Connection) -> BaseException | None:
    await conn.aclose()
    try:
        conn.queue(B)
    except StalkError as exc:
        return exc
    return None


async def receive_after_aclose(conn: Connection) -> BaseException | None:
    await conn.aclose()
    await conn.aclose()  # idempotent
    return await _raises(conn.receive())


async def concurrent_receives(conn: Connection) -> BaseException | None:
    errors: list[BaseException | None] = []
    async with anyio.create_task_group() as tg:

        async def first() -> None:
            errors.append(await _raises(conn.receive()))

        tg.start_soon(first)
        await anyio.wait_all_tasks_blocked()  # the first receiver is waiting
        second = await _raises(conn.receive())
        await conn.aclose()  # wakes the first receiver
    assert isinstance(errors[0], ConnectionClosed), errors
    return second


async def aclose_while_receiving(conn: Connection) -> BaseException | None:
    errors: list[BaseException | None] = []
    async with anyio.create_task_group() as tg:

        async def receiver() -> None:
            errors.append(await _raises(conn.receive()))

        tg.start_soon(receiver)
        await anyio.wait_all_tasks_blocked()  # the receiver is waiting
        await conn.aclose()
    return errors[0]


def _bad_value(value: Any) -> Misuse:
    async def act(conn: Connection) -> BaseException | None:
        return await _raises(conn.send(Spack(value)))

    return act


def _bad_item(item: Any) -> Misuse:
    async def act(conn: Connection) -> BaseException | None:
        try:
            await conn.send(item)
        except (StalkError, TypeError) as exc:
            error: BaseException | None = exc
        else:
            error = None
        return error

    return act


async def queue_invalid_then_flush(conn: Connection) -> BaseException | None:
    try:
        conn.queue(Spack({1, 2}))  # type: ignore[arg-type]
    except StalkError as exc:
        error: BaseException | None = exc
    else:
        error = None
    await conn.flush()  # nothing queued: nothing written
    return error


async def too_large_for_peer(conn: Connection) -> BaseException | None:
    assert conn.peer_max_message_size == MAX_MESSAGE
    return await _raises(conn.send(Spack(b"x" * MAX_MESSAGE)))


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    __slots__ = ()


class Real(float):
    __slots__ = ()


def _deep(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _deep_tuple(depth: int) -> tuple[Any, ...]:
    value: tuple[Any, ...] = ()
    for _ in range(depth - 1):
        value = (value,)
    return value


#: (id, what is passed): values no spack can carry (SPEC 19); the peer must get nothing.
BAD_VALUES: list[tuple[str, str, Any]] = [
    ("set", "a set", {1, 2}),
    ("frozenset", "a frozenset", frozenset({1})),
    ("object", "a plain object", object()),
    ("complex", "a complex number", 1j),
    ("decimal", "a Decimal", decimal.Decimal("1.5")),
    ("int_enum", "an IntEnum member", Color.RED),
    ("ordered_dict", "an OrderedDict", collections.OrderedDict(a=1)),
    ("str_subclass", "a str subclass", Text("x")),
    ("float_subclass", "a float subclass", Real(1.0)),
    ("int_2_64", "the integer 2^64", 2**64),
    ("int_below_min", "the integer -2^63 - 1", -(2**63) - 1),
    ("lone_surrogate", "a string with a lone surrogate", "a\ud800b"),
    ("int_dict_key", "a dict with an integer key", {1: 2}),
    ("tuple_dict_key", "a dict with a tuple key", {(1,): 2}),
    ("list_depth_33", "lists nested 33 deep", _deep(33)),
    ("tuple_depth_33", "tuples nested 33 deep", _deep_tuple(33)),
    ("generator", "a generator", (i for i in range(0))),
    ("strided_memoryview", "a non-contiguous memoryview", memoryview(b"abcd")[::2]),
    ("unicode_array", "an array of typecode 'u'", array.array("u", "ab")),
]

#: (id, what is passed to ``send`` instead of a Spack, bug or None).
NOT_SPACKS: list[tuple[str, str, Any, str | None]] = [
    ("send_str", '`send("hello")`', "hello", None),
    ("send_bytes", '`send(b"ab")`', b"ab", None),
    ("send_dict", '`send({"a": 1})`', {"a": 1}, None),
    ("send_int", "`send(5)`", 5, None),
    ("send_none", "`send(None)`", None, None),
]


async def broken_then(target: Target, act: Misuse) -> Outcome:
    """A connection that a hostile server breaks (garbage after READY), then ``act``."""
    side = ServerSide()
    after: list[bytes] = []

    async def behave(wire: Wire) -> None:
        resp = Responder(identity=side.identity)
        transport = await server_handshake(wire, resp)
        await wire.send(transport.spacks(A) + b"\x00\x20" + bytes(32))
        after.append(await wire.read_to_eof())  # the client's error CLOSE, then EOF
        side.finished.set()

    async with raw_server(behave) as (port, _):
        conn = await connect("127.0.0.1", port, side.identity.public, config=CONFIG)
        delivered = [await conn.receive()]
        first = await _raises(conn.receive())
        assert isinstance(first, DecryptionFailed), first
        with anyio.fail_after(TEARDOWN):
            await side.finished.wait()
        error = await act(conn)
        await conn.aclose()
    assert len(frames(after[0])) <= 1, "bytes written after the connection broke"
    return Outcome(error, True, delivered, [A], torn_down=True)


async def receive_again(conn: Connection) -> BaseException | None:
    return await _raises(conn.receive())


async def send_again(conn: Connection) -> BaseException | None:
    return await _raises(conn.send(B))


# -- a fault that kills the listener --------------------------------------------------------


#: The keys :func:`slow_authorize` was asked about: an attack knows when it is inside.
AUTHORIZING: set[bytes] = set()


async def slow_authorize(peer: PublicIdentity) -> bool:
    """An authorization that takes a while (a database, a prompt...)."""
    AUTHORIZING.add(peer.raw)
    await anyio.sleep(0.2)  # the point: the listener is inside authorize() for a while
    return bool(peer)


async def rst_while_authorizing(target: Target, *, ik: bool) -> Attack:
    """Reset the connection while the listener is inside ``authorize``."""
    wire = await target.wire()
    init = Initiator(server=target.server if ik else None)
    if ik:
        await wire.send(init.opening())
    else:
        await wire.send(init.opening())
        assert await read_verdict(wire) == 0
        body = await wire.read_frame()
        assert body is not None
        init.read_msg2(body)
        await wire.send(encode_frame(init.msg3()))
    await wait_until(lambda: init.identity.public.raw in AUTHORIZING)  # it awaits authorize()
    port = wire.local_port
    await wire.reset()
    return Attack([port], reset=True)


#: The one key :func:`raising_authorize` chokes on (think: a lookup that raises KeyError).
STRANGER = Identity.generate()


def raising_authorize(peer: PublicIdentity) -> bool:
    """An authorization callback with a bug: it raises for a key it does not know."""
    known = {"anyone but the stranger": True}
    if peer == STRANGER.public:
        return known[peer.fingerprint]
    return True


async def stranger_connects(target: Target) -> Attack:
    """A plain valid handshake from the key ``authorize`` raises for."""
    wire = await target.wire()
    with contextlib.suppress(EOFError, Refused, StalkError):
        await client_handshake(wire, Initiator(identity=STRANGER))
    return await finish(wire)


class FailingStream(ByteStream):
    """A byte stream whose ``fail_at``-th write fails as a reset socket's would."""

    def __init__(self, inner: ByteStream, fail_at: int) -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.sends = 0

    async def send(self, item: bytes) -> None:
        self.sends += 1
        if self.sends == self.fail_at:
            raise anyio.BrokenResourceError
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def write_fails_in_handshake(_target: Target, *, server_side: bool, ik: bool) -> Outcome:
    """``Connection.wrap`` on both ends of a memory pipe; one side's answer fails to write.

    Client: its second write (XX message 3 / IK READY). Server: its first (message 2).
    """
    a, b = byte_stream_pair()
    server_id = Identity.generate()
    client_stream: ByteStream = a if server_side else FailingStream(a, fail_at=2)
    server_stream: ByteStream = FailingStream(b, fail_at=1) if server_side else b
    errors: dict[str, BaseException] = {}

    async def run(name: str, call: Awaitable[Connection]) -> None:
        try:
            conn = await call
        except Exception as exc:
            errors[name] = exc
        else:
            await conn.aclose()

    with anyio.fail_after(TEARDOWN):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                run,
                "server",
                Connection.wrap(server_stream, identity=server_id, server_side=True, config=CONFIG),
            )
            tg.start_soon(
                run,
                "client",
                Connection.wrap(
                    client_stream,
                    identity=Identity.generate(),
                    peer=server_id.public if ik else None,
                    config=CONFIG,
                ),
            )
    return Outcome(errors.get("server" if server_side else "client"), False)


def refusing_authorize(peer: PublicIdentity) -> bool:
    """Everyone but the stranger may connect."""
    return peer != STRANGER.public


async def refused_then_pipelines(target: Target, *, ik: bool) -> Attack:
    """The stranger handshakes and sends spacks right away, without waiting for a verdict."""
    wire = await target.wire()
    init = Initiator(server=target.server if ik else None, identity=STRANGER)
    await wire.send(init.opening())
    if not ik:
        assert await read_verdict(wire) == 0
        body = await wire.read_frame()
        assert body is not None
        init.read_msg2(body)
        msg3 = encode_frame(init.msg3())
        transport = init.transport()
        await wire.send(msg3 + transport.spacks(A) + transport.spacks(B))
        return await finish(wire, transport)
    return await finish(wire)


# -- sans-io ----------------------------------------------------------------------------------


def _deliveries(session: Session) -> tuple[list[Spack], BaseException | None]:
    """The spacks delivered now, and the error that ended the session, if one did."""
    events: list[Event] = []
    error: BaseException | None = None
    try:
        drain(session, events)
    except StalkError as exc:
        error = exc
    return [e.spack for e in events if isinstance(e, MessageReceived)], error


def _close_code(session: Session, data: bytes | bytearray) -> int | None:
    session.receive_data(data)
    try:
        events = drain(session)
    except StalkError:
        return None
    codes = [e.code for e in events if isinstance(e, CloseReceived)]
    return codes[-1] if codes else None


def nonce_reserved_value() -> Outcome:
    """Both sides reach nonce 2^64-1: the sender refuses to encrypt, the receiver to decrypt."""
    pair = connected_pair()
    pair.client.send(A)
    pair.server.receive_data(take_all(pair.client))
    got, _ = _deliveries(pair.server)
    assert pair.client._sealer.cipher is not None
    assert pair.server._receiver is not None
    pair.client._sealer.cipher.set_nonce_for_testing_only(2**64 - 2)
    pair.server._receiver._cipher.set_nonce_for_testing_only(2**64 - 2)
    pair.client.send(B)  # n = 2^64 - 2, the last nonce a message may use
    pair.server.receive_data(take_all(pair.client))
    more, error = _deliveries(pair.server)
    assert error is None
    pair.client.send(Spack("no nonce left"))  # queued: it is encrypted as it is taken
    try:
        pair.client.data_to_send()
    except NonceExhausted as exc:
        send_error: BaseException = exc
    else:
        raise AssertionError("encrypted with the reserved nonce 2^64 - 1")
    assert take_all(pair.client) == b"", "bytes queued after NonceExhausted"
    refused_again = False
    try:
        pair.client.send(Spack("still none"))
    except NonceExhausted:
        refused_again = True
    return Outcome(send_error, True, got + more, [A, B], torn_down=refused_again)


def receive_at_reserved_nonce() -> Outcome:
    """The receiver's nonce at 2^64-1: any message is refused, nothing delivered."""
    pair = connected_pair()
    pair.client.send(A)
    pair.server.receive_data(take_all(pair.client))
    got, _ = _deliveries(pair.server)
    assert pair.server._receiver is not None
    pair.server._receiver._cipher.set_nonce_for_testing_only(2**64 - 1)
    pair.client.send(B)
    pair.server.receive_data(take_all(pair.client))
    more, error = _deliveries(pair.server)
    code = _close_code(pair.client, take_all(pair.server))
    return Outcome(
        error, True, got + more, [A], code=code, torn_down=pair.server.state is SessionState.FAILED
    )


def data_after_close() -> Outcome:
    """CLOSE and a further valid message in one read: the CLOSE ends the stream, and what
    follows it is never read (SPEC "Close"), so the result does not depend on how TCP
    segments the bytes."""
    pair = connected_pair()
    pair.client.send(A)
    pair.client.close()
    wire = take_all(pair.client)
    assert pair.client._sealer.cipher is not None
    extra = encode_frame(pair.client._sealer.cipher.encrypt(b"\x01\x00\x01\x90"))
    pair.server.receive_data(wire + extra)
    got, error = _deliveries(pair.server)  # A, then the CLOSE
    assert error is None
    assert pair.server.next_event() == CloseReceived(CloseCode.NORMAL, "")
    pair.server.receive_data(extra)  # nor anything later
    assert pair.server.next_event() == CloseReceived(CloseCode.NORMAL, "")
    code = _close_code(pair.client, take_all(pair.server))
    # Its receiving direction is over: the session reads nothing more.
    return Outcome(anyio.EndOfStream(), True, got, [A], code=code, torn_down=True)


def _usage(call: Callable[[], object]) -> Outcome:
    try:
        call()
    except StalkError as exc:
        return Outcome(exc, False)
    return Outcome(None, False)


def _accept_twice() -> None:
    pair = make_pair(ik=True)
    pair.server.receive_data(take_all(pair.client))
    pair.server.next_event()
    pair.server.accept()
    pair.server.accept()


def _refuse_after_accept() -> None:
    pair = make_pair(ik=True)
    pair.server.receive_data(take_all(pair.client))
    pair.server.next_event()
    pair.server.accept()
    pair.server.refuse()


def _data_after_eof() -> None:
    pair = make_pair()
    pair.server.receive_data(b"")
    pair.server.receive_data(b"S")


def every_bit_flip_of_a_frame() -> Outcome:
    """Flip each bit of one transport frame in turn: never a delivery, always typed."""
    pair = connected_pair()
    pair.client.send(A)
    frame = take_all(pair.client)
    errors: set[type[BaseException]] = set()
    for bit in range(len(frame) * 8):
        fresh = connected_pair()
        fresh.client.send(A)
        wire = bytearray(take_all(fresh.client))
        wire[bit // 8] ^= 1 << (bit % 8)
        fresh.server.receive_data(bytes(wire))
        fresh.server.receive_data(b"")
        got, error = _deliveries(fresh.server)
        assert got == [], f"bit {bit}: delivered {got}"
        assert isinstance(error, (DecryptionFailed, ConnectionLost)), (bit, error)
        errors.add(type(error))
    return Outcome(DecryptionFailed("every flip refused"), True, torn_down=bool(errors))


def every_truncation_of_a_stream() -> Outcome:
    """Cut two frames at every byte: the first spack only once whole, then a truncation."""
    pair = connected_pair()
    pair.client.send(A)
    pair.client.send(B)
    wire = take_all(pair.client)
    first_len = 2 + int.from_bytes(wire[:2], "big")
    for cut in range(len(wire)):
        fresh = connected_pair()
        fresh.client.send(A)
        fresh.client.send(B)
        data = take_all(fresh.client)[:cut]
        fresh.server.receive_data(data)
        fresh.server.receive_data(b"")
        got, error = _deliveries(fresh.server)
        assert got == ([A] if cut >= first_len else []), (cut, got)
        assert isinstance(error, ConnectionLost), (cut, error)
    return Outcome(ConnectionLost("every cut"), True, torn_down=True)


def every_bit_flip_of_ik_msg1() -> Outcome:
    """Flip each bit of IK message 1 (preamble included): the handshake always fails."""
    for bit in range(8 * (8 + 2 + 128)):
        pair = make_pair(ik=True)
        opening = bytearray(take_all(pair.client))
        opening[bit // 8] ^= 1 << (bit % 8)
        pair.server.receive_data(bytes(opening))
        pair.server.receive_data(b"")
        try:
            events = drain(pair.server)
        except HandshakeFailed:
            continue
        raise AssertionError(f"bit {bit}: {events}")
    return Outcome(HandshakeFailed("every flip refused"), False)


def every_bit_flip_of_xx_msg2() -> Outcome:
    """Flip each bit of the XX verdict and message 2: the initiator always fails."""
    pair = make_pair()
    pair.server.receive_data(take_all(pair.client))
    drain(pair.server)
    answer = take_all(pair.server)
    for bit in range(8 * len(answer)):
        fresh = make_pair()
        fresh.server.receive_data(take_all(fresh.client))
        drain(fresh.server)
        reply = bytearray(take_all(fresh.server))
        reply[bit // 8] ^= 1 << (bit % 8)
        fresh.client.receive_data(bytes(reply))
        fresh.client.receive_data(b"")
        try:
            events = drain(fresh.client)
        except HandshakeFailed:
            continue
        raise AssertionError(f"bit {bit}: {events}")
    return Outcome(HandshakeFailed("every flip refused"), False)


def _api(case_id: str, sends: str, expect: Expect, act: Misuse, **kw: Any) -> Case:
    async def run(target: Target) -> Outcome:
        return await misuse(target, act, **kw)

    return row("api", "api", case_id, sends, expect, run)


def _sans_io(case_id: str, sends: str, expect: Expect, fn: Callable[[], Outcome]) -> Case:
    return row("sans-io", "sans-io", case_id, sends, expect, fn)


CLOSED = Expect(ConnectionClosed, True)

CASES: list[Case] = [
    _api("send_after_aclose", "`send()` after `aclose()`", CLOSED, send_after_aclose),
    _api("send_after_send_eof", "`send()` after `send_eof()`", CLOSED, send_after_send_eof),
    _api(
        "send_after_two_send_eofs",
        "`send_eof()` twice (idempotent), then `send()`",
        CLOSED,
        send_after_two_send_eofs,
    ),
    _api("flush_after_aclose", "`flush()` after `aclose()`", CLOSED, flush_after_aclose),
    _api("queue_after_aclose", "`queue()` after `aclose()`", CLOSED, queue_after_aclose),
    _api(
        "receive_after_aclose",
        "`aclose()` twice (idempotent), then `receive()`",
        CLOSED,
        receive_after_aclose,
    ),
    _api(
        "concurrent_receives",
        "two tasks call `receive()` at once",
        Expect(anyio.BusyResourceError, True),
        concurrent_receives,
    ),
    _api(
        "aclose_while_receiving",
        "`aclose()` while another task is blocked in `receive()`",
        CLOSED,
        aclose_while_receiving,
    ),
    _api(
        "queue_invalid_then_flush",
        "`queue()` of an invalid spack, then `flush()`: nothing may be written",
        Expect(InvalidSpackValue, True),
        queue_invalid_then_flush,
        then=(B,),
    ),
    row(
        "api",
        "api",
        "too_large_for_peer",
        f"`send()` of a spack of {MAX_MESSAGE + 6} bytes to a peer whose limit is {MAX_MESSAGE}",
        Expect(MessageTooLarge, True),
        lambda target: misuse(target, too_large_for_peer, then=(B,)),
    ),
    *[
        row(
            "api",
            "api",
            f"invalid_value_{case_id}",
            f"`send(Spack(...))` holding {sends}; then a valid spack",
            Expect(InvalidSpackValue, True),
            partial(misuse, act=_bad_value(value), then=(B,)),
        )
        for case_id, sends, value in BAD_VALUES
    ],
    *[
        row(
            "api",
            "api",
            case_id,
            f"{sends} instead of a Spack; then a valid spack",
            Expect(InvalidSpackValue, True),
            partial(misuse, act=_bad_item(item), then=(B,)),
            bug=bug,
        )
        for case_id, sends, item, bug in NOT_SPACKS
    ],
    row(
        "api",
        "api",
        "receive_after_broken",
        "a hostile server breaks the stream; then `receive()` again",
        Expect(ConnectionLost, True),
        lambda target: broken_then(target, receive_again),
    ),
    row(
        "api",
        "api",
        "send_after_broken",
        "a hostile server breaks the stream; then `send()` (nothing may be written)",
        Expect(ConnectionLost, True),
        lambda target: broken_then(target, send_again),
    ),
    *[
        row(
            "handshake",
            "client",
            f"rst_while_authorizing_{pattern}",
            f"{pattern.upper()}: reset the connection while the listener awaits `authorize()`",
            # XX: READY may still be written before the reset is seen; the handshake is then
            # complete and the loss shows on the next receive.
            Expect(
                (HandshakeFailed, ConnectionLost) if pattern == "xx" else HandshakeFailed,
                None if pattern == "xx" else False,
            ),
            partial(rst_while_authorizing, ik=pattern == "ik"),
            isolated=True,
            authorize=slow_authorize,
        )
        for pattern in ("xx", "ik")
    ],
    row(
        "handshake",
        "client",
        "authorize_raises",
        "a valid XX handshake from a key the listener's `authorize()` raises KeyError for",
        Expect(HandshakeFailed, False),
        stranger_connects,
        isolated=True,
        authorize=raising_authorize,
    ),
    *[
        row(
            "handshake",
            "fault",
            f"{side}_write_fails_in_handshake_{pattern}",
            f"{pattern.upper()}: the {side}'s "
            + ("message 2" if side == "server" else "message 3" if pattern == "xx" else "READY")
            + " cannot be written (the peer reset the connection)",
            Expect(HandshakeFailed, False),
            partial(write_fails_in_handshake, server_side=side == "server", ik=pattern == "ik"),
        )
        for side in ("server", "client")
        for pattern in ("xx", "ik")
    ],
    row(
        "handshake",
        "client",
        "xx_refused_client_pipelines_spacks",
        "XX: an unauthorized client sends message 3 and two spacks without waiting for READY",
        Expect(HandshakeFailed, False, code=CloseCode.NOT_AUTHORIZED),
        partial(refused_then_pipelines, ik=False),
        isolated=True,
        authorize=refusing_authorize,
    ),
    row(
        "handshake",
        "client",
        "ik_refused_client",
        "IK: an unauthorized client's message 1 (refused before any DH is spent on it)",
        Expect(HandshakeFailed, False, code=CloseCode.NOT_AUTHORIZED),
        partial(refused_then_pipelines, ik=True),
        isolated=True,
        authorize=refusing_authorize,
    ),
    _sans_io(
        "nonce_reserved_value",
        "both sides at nonce 2^64-2: one message, then the sender must refuse 2^64-1",
        Expect(NonceExhausted, True),
        nonce_reserved_value,
    ),
    _sans_io(
        "receive_at_reserved_nonce",
        "the receiver's nonce at 2^64-1, then a message",
        Expect(NonceExhausted, True, code=CloseCode.PROTOCOL_ERROR),
        receive_at_reserved_nonce,
    ),
    _sans_io(
        "data_after_close_same_read",
        "CLOSE and another valid message in one read: the message is never read",
        Expect(anyio.EndOfStream, True),
        data_after_close,
    ),
    _sans_io(
        "accept_twice",
        "`accept()` twice",
        Expect(LocalProtocolError, False),
        lambda: _usage(_accept_twice),
    ),
    _sans_io(
        "refuse_after_accept",
        "`refuse()` after `accept()`",
        Expect(LocalProtocolError, False),
        lambda: _usage(_refuse_after_accept),
    ),
    _sans_io(
        "data_after_eof",
        "`receive_data()` after EOF",
        Expect(LocalProtocolError, False),
        lambda: _usage(_data_after_eof),
    ),
    _sans_io(
        "send_before_handshake",
        "`send()` before the handshake",
        Expect(LocalProtocolError, False),
        lambda: _usage(lambda: make_pair().client.send(A)),
    ),
    _sans_io(
        "every_bit_flip_of_a_frame",
        "each bit of a transport frame flipped in turn (sweep)",
        Expect(DecryptionFailed, True),
        every_bit_flip_of_a_frame,
    ),
    _sans_io(
        "every_truncation_of_a_stream",
        "two frames cut at every byte, then EOF (sweep)",
        Expect(ConnectionLost, True),
        every_truncation_of_a_stream,
    ),
    _sans_io(
        "every_bit_flip_of_ik_msg1",
        "each bit of an IK opening (preamble and message 1) flipped in turn (sweep)",
        Expect(HandshakeFailed, False),
        every_bit_flip_of_ik_msg1,
    ),
    _sans_io(
        "every_bit_flip_of_xx_msg2",
        "each bit of an XX verdict and message 2 flipped in turn (sweep)",
        Expect(HandshakeFailed, False),
        every_bit_flip_of_xx_msg2,
    ),
]
