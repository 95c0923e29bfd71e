"""The harness every adversarial case runs in, and the one end state every case asserts.

Theory of operation
-------------------
A case (:class:`Case`) is one row of the catalogue: an id, what the hostile side sends, the
:class:`Expect`-ed outcome, and a ``run`` coroutine. ``run`` plays the hostile side and
returns an :class:`Outcome`: what stalk raised, what stalk's application received, what
the honest part of the peer had sent before the attack, and what the hostile side saw.
:func:`run_case` then asserts, identically for every case:

1. **typed error**: stalk raised a :class:`~stalk.StalkError` (or anyio's
   ``EndOfStream``/``BrokenResourceError``/``ClosedResourceError``/``BusyResourceError``
   where the case is a clean close or API misuse), of the class the row names;
2. **torn down**: stalk closed the connection by itself (the hostile side read EOF);
3. **nothing corrupt or partial delivered**: the application received exactly the spacks
   the peer sent legitimately before the attack (no spack of an attacked message, no
   partial spack), and the application was called at all only where the row says so;
4. **still serving**: a control client completes a handshake and an echo round trip with
   the listener the case attacked;
5. **no leak**: no handshake in progress, no handler running, and the process holds no
   more file descriptors and tasks than before the case.

Directions (:data:`Direction`):

- ``client``: a hostile client against stalk's listener (shared by the module, see
  ``conftest.py``). The listener's handler records every spack it receives and how its
  connection ended (:class:`Registry`); a failed handshake is known from the listener's
  log record on ``stalk.handshake``, which carries the exception object (read at DEBUG:
  at INFO the listener throttles them). Rows about channels (SPEC 24) attack a third
  listener that offers them, whose ``channel_handler`` records every spack each channel
  receives; rows about certificates (SPEC 25) a fourth, which requires them
  (:data:`TRUST`, :data:`ALLOW_NAMES`, :data:`ALLOW_GROUPS`).
- ``server``: a hostile server (a plain anyio TCP listener speaking the protocol by hand)
  against :func:`stalk.connect`; the "application" is a receive loop.
- ``mitm``: a real client and the real listener with a man in the middle.
- ``api``: stalk's API used wrongly on a real connection.
- ``fault``: :meth:`~stalk.Connection.wrap` over a stream that fails on cue (faults that
  a real socket produces only in a race).
- ``sans-io``: a :class:`~stalk.session.Session` fed bytes directly (no socket needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

import anyio
import sniffio
from anyio.abc import SocketAttribute, TaskGroup

from helpers import wait_until
from stalk.certificates import Authorities, Authority, Certificate
from stalk.channel import Channel
from stalk.config import Config
from stalk.connection import Authorize, Connection, connect
from stalk.errors import ClosedByPeer, ConnectionClosed, ConnectionLost, StalkError
from stalk.identity import Identity, PublicIdentity
from stalk.listener import Listener, create_listener
from stalk.spack import Spack
from stalk.wire import RecordKind

from .peers import Transport, Wire, close_codes, peer_records, raw_server

Direction = Literal["client", "server", "mitm", "api", "fault", "sans-io"]

#: Every error a case may end with: stalk's own, or anyio's stream vocabulary.
TYPED: tuple[type[BaseException], ...] = (
    StalkError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.BusyResourceError,
)

#: Listener limits for the shared listeners: room for a maximal Noise message (65514-byte
#: spack) yet small enough to test the limit with two fragments.
MAX_MESSAGE = 100_000
#: The short handshake deadline of the listener used by stall cases.
SLOW_HANDSHAKE = 0.4
MAIN_CONFIG = Config(handshake_timeout=5, close_timeout=1, max_message_size=MAX_MESSAGE)
#: The listener with channels: small windows (SPEC's least connection window), so that a
#: hostile client can pass them within a few Noise messages, and room for 16 channels full
#: of their window within the connection's.
CHANNELS_CONFIG = replace(
    MAIN_CONFIG, max_channels=32, channel_window=4096, connection_window=65_516
)
SLOW_CONFIG = Config(
    handshake_timeout=SLOW_HANDSHAKE, close_timeout=1, max_message_size=MAX_MESSAGE
)

#: The certificate listener's authority (a fixed key: nothing here is secret).
CA = Authority.from_private_bytes(bytes(range(32)))
#: The real time at import: the listener checks certificates against the system clock,
#: and the certificates of the rows are valid for a day around it (or hostile on purpose).
CERT_NOW = int(time.time())
#: The serial the certificate listener's revocation list names.
REVOKED_SERIAL = 666
#: Whom the certificate listener trusts: :data:`CA`, with serial 666 revoked.
TRUST = Authorities([CA.public], [CA.revoke([REVOKED_SERIAL], issued_at=CERT_NOW)])
#: The certificate listener admits these names, or members of these groups.
ALLOW_NAMES = ("client-1",)
ALLOW_GROUPS = ("clients",)


def valid_certificate(identity: Identity, name: str = "client-2", **kwargs: Any) -> Certificate:
    """A certificate from :data:`CA` that the certificate listener admits (overridable)."""
    args: dict[str, Any] = {
        "groups": ALLOW_GROUPS,
        "not_before": CERT_NOW - 60,
        "not_after": CERT_NOW + 86_400,
        "serial": 7,
    }
    args.update(kwargs)
    return CA.sign(identity.public, name, **args)


# -- the case table -----------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """The outcome a row promises.

    :param error: the class stalk raises on the side under test.
    :param established: whether stalk's application gets a connection at all (the listener
        calls its handler / ``connect`` returns); ``None`` where a race decides.
    :param code: the refusal code or CLOSE code stalk sends the hostile peer (``None``: not
        checked, e.g. when stalk may send nothing).
    :param client_error: ``mitm`` cases: the real client's error class.
    :param deadline: stalk must close the connection within this many seconds of the
        attack's end (stall cases: the handshake deadline, absolute, plus slack).
    :param silent: ``server`` cases: stalk's client sends nothing after the hostile
        server's last message and closes (an initiator has no refusal of its own, SPEC 25).
    """

    error: type[BaseException] | tuple[type[BaseException], ...]
    established: bool | None
    code: int | None = None
    client_error: type[BaseException] | None = None
    deadline: float | None = None
    silent: bool = False

    def describe(self) -> str:
        """The expected outcome in words (README table)."""
        errors = self.error if isinstance(self.error, tuple) else (self.error,)
        text = " or ".join(f"`{e.__name__}`" for e in errors)
        if self.client_error is not None:
            text = f"client `{self.client_error.__name__}`, server {text}"
        if anyio.EndOfStream in errors:
            text += ", everything delivered"
        elif self.established is None:
            text += ", nothing delivered (established or not, as the race goes)"
        elif self.established:
            text += ", only the legitimate spacks delivered"
        else:
            text += ", never established"
        if self.code is not None:
            text += f", peer gets code {self.code}"
        if self.silent:
            text += ", peer gets nothing more"
        if self.deadline is not None:
            text += f", closed within {self.deadline:g} s"
        return text


@dataclass
class Outcome:
    """What one case observed.

    :ivar error: what stalk raised on the side under test (``EndOfStream`` for a clean end).
    :ivar established: the application got a connection (handler called / connect returned).
    :ivar delivered: every spack stalk's application received.
    :ivar legit: the spacks the peer sent legitimately before the attack.
    :ivar delivered_on: with channels: every spack each channel (not 0) delivered.
    :ivar legit_on: with channels: the spacks the peer sent legitimately on each channel.
    :ivar code: the refusal or CLOSE code the hostile side received from stalk, if any.
    :ivar torn_down: stalk closed the connection by itself.
    :ivar client_error: ``mitm``: the real client's error.
    :ivar rest: ``server``: what stalk's client sent after the hostile server's last read.
    """

    error: BaseException | None
    established: bool
    delivered: list[Spack] = field(default_factory=list)
    legit: list[Spack] = field(default_factory=list)
    delivered_on: dict[int, list[Spack]] = field(default_factory=dict)
    legit_on: dict[int, list[Spack]] = field(default_factory=dict)
    code: int | None = None
    torn_down: bool = True
    client_error: BaseException | None = None
    elapsed: float = 0.0
    rest: bytes = b""


@dataclass(frozen=True)
class Case:
    """One row of the catalogue.

    :param run: the hostile side; its signature depends on ``direction`` (see
        :func:`run_case`).
    :param slow: attack the listener with the short handshake deadline.
    :param channels: attack the listener that offers channels.
    :param certified: attack the listener that requires certificates.
    :param isolated: attack a listener of its own (the case may kill it).
    :param authorize: ``isolated`` only: the listener's ``authorize`` callback.
    :param bug: the ``BUG: ...`` reason when the case finds a bug (strict xfail).
    :param bug_backends: the backends on which the bug shows.
    """

    id: str
    category: str
    direction: Direction
    sends: str
    expect: Expect
    run: Callable[..., Any] | ServerPlay
    slow: bool = False
    channels: bool = False
    certified: bool = False
    isolated: bool = False
    authorize: Authorize | None = None
    bug: str | None = None
    bug_backends: frozenset[str] = frozenset({"asyncio", "trio"})
    timeout: float = 6.0

    @property
    def ref(self) -> str:
        """The pytest id: ``category/id``."""
        return f"{self.category}/{self.id}"


# -- the listener side: registry, environment -------------------------------------------------


@dataclass
class Served:
    """One connection the listener's handler served."""

    peer: PublicIdentity
    received: list[Spack] = field(default_factory=list)
    end: BaseException | None = None
    done: bool = False
    #: With channels: the spacks each channel (not 0) received, by id.
    channels: dict[int, list[Spack]] = field(default_factory=dict)


class Registry:
    """Everything the shared listeners did, keyed by the client's TCP port."""

    def __init__(self) -> None:
        self.served: dict[int, Served] = {}
        self.failed: dict[int | None, list[BaseException]] = {}
        self.active = 0

    async def handler(self, conn: Connection) -> None:
        """The application: record every spack; echo ``("control", n)``; re-raise errors."""
        record = Served(conn.peer)
        self.served[conn.port or 0] = record
        self.active += 1
        try:
            while True:
                try:
                    spack = await conn.receive()
                except BaseException as exc:
                    record.end = exc
                    if isinstance(exc, anyio.EndOfStream):
                        return
                    raise
                record.received.append(spack)
                if len(spack) == 2 and spack[0] == "control":
                    await conn.send(Spack("echo", spack[1]))
        finally:
            record.done = True
            self.active -= 1

    async def channel_handler(self, channel: Channel) -> None:
        """The listener's ``channel_handler``: record every spack of the channel.

        The connection's handler registered the connection first: a channel's handler
        starts only once the connection's runs (``async with conn`` starts them).
        """
        record = self.served[channel.connection.port or 0]
        received = record.channels.setdefault(channel.id, [])
        async for spack in channel:
            received.append(spack)

    def log(self, record: logging.LogRecord) -> None:
        """Take a handshake failure from the listener's log record (it holds the error).

        Its arguments start with the client's ``host:port`` (as the listener saw it when
        accepting) and the exception.
        """
        if str(record.msg).startswith("handshake with %s failed") and isinstance(
            record.args, tuple
        ):
            where, exc = record.args[:2]
            port_text = str(where).rpartition(":")[2]
            port = int(port_text) if port_text.isdigit() else None
            if isinstance(exc, BaseException):
                self.failed.setdefault(port, []).append(exc)

    def settled(self, port: int) -> bool:
        """Whether the listener finished with the connection from ``port``."""
        served = self.served.get(port)
        return port in self.failed or (served is not None and served.done)


class _LogTap(logging.Handler):
    def __init__(self, registry: Registry) -> None:
        super().__init__(logging.DEBUG)
        self.registry = registry

    def emit(self, record: logging.LogRecord) -> None:
        self.registry.log(record)


@dataclass
class Snapshot:
    """Resources held by the process at one moment."""

    fds: int
    tasks: int


def count_tasks() -> int:
    """Tasks alive in the current event loop, on either backend."""
    if sniffio.current_async_library() == "trio":
        import trio  # noqa: PLC0415 - only on the trio backend

        def walk(task: Any) -> int:
            return 1 + sum(
                walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
            )

        return walk(trio.lowlevel.current_root_task())
    return len(asyncio.all_tasks())


def snapshot() -> Snapshot:
    """Open file descriptors and live tasks now."""
    return Snapshot(len(os.listdir("/proc/self/fd")), count_tasks())


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    """Poll until ``predicate()`` holds; fail with ``what`` after ``timeout`` seconds."""
    try:
        await wait_until(predicate, timeout, interval=0.002)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


@dataclass
class Env:
    """Four stalk listeners (normal, short handshake deadline, with channels, requiring
    certificates) and their registry."""

    identity: Identity
    main: Listener
    slow: Listener
    channels: Listener
    certified: Listener
    registry: Registry
    group: TaskGroup
    controls: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def server(self) -> PublicIdentity:
        """The listeners' public key (both share one identity)."""
        return self.identity.public

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, authorize: Authorize | None = None) -> AsyncIterator[Env]:
        """Serve the four listeners while the block runs."""
        identity = Identity.generate()
        registry = Registry()
        tap = _LogTap(registry)
        logger = logging.getLogger("stalk")
        level = logger.level
        logger.setLevel(logging.DEBUG)  # every failed handshake, throttled or not
        logger.addHandler(tap)
        try:
            main = await create_listener(
                "127.0.0.1", 0, identity=identity, authorize=authorize, config=MAIN_CONFIG
            )
            slow = await create_listener(
                "127.0.0.1", 0, identity=identity, authorize=authorize, config=SLOW_CONFIG
            )
            channels = await create_listener(
                "127.0.0.1",
                0,
                identity=identity,
                authorize=authorize,
                config=CHANNELS_CONFIG,
                channel_handler=registry.channel_handler,
            )
            certified = await create_listener(
                "127.0.0.1",
                0,
                identity=identity,
                authorize=authorize,
                config=MAIN_CONFIG,
                authorities=TRUST,
                allow_names=ALLOW_NAMES,
                allow_groups=ALLOW_GROUPS,
            )
            listeners = (main, slow, channels, certified)
            async with main, slow, channels, certified, anyio.create_task_group() as group:
                for listener in listeners:
                    group.start_soon(listener.serve, registry.handler)
                yield cls(identity, main, slow, channels, certified, registry, group)
                group.cancel_scope.cancel()
        finally:
            logger.removeHandler(tap)
            logger.setLevel(level)

    async def control(self, listener: Listener) -> None:
        """A well-behaved client completes a handshake and an echo round trip."""
        n = next(self.controls)
        me = Identity.generate()
        cert = valid_certificate(me) if listener is self.certified else None
        with anyio.fail_after(5):
            async with await connect(
                *listener.address, self.server, identity=me, certificate=cert
            ) as conn:
                port = int(conn.extra(SocketAttribute.local_port))
                await conn.send(Spack("control", n))
                assert await conn.receive() == Spack("echo", n), "control echo"
            served = self.registry.served

            def ended() -> bool:  # matched by content: a port may have served before
                record = served.get(port)
                return (
                    record is not None and record.done and record.received == [Spack("control", n)]
                )

            await eventually(ended, "control connection ended")
        assert isinstance(served[port].end, anyio.EndOfStream), served[port].end

    async def settle(self, before: Snapshot) -> None:
        """No handshake, handler, socket or task left over from the case."""

        def clean() -> bool:
            now = snapshot()
            return (
                self.main.handshakes_in_progress == 0
                and self.slow.handshakes_in_progress == 0
                and self.channels.handshakes_in_progress == 0
                and self.certified.handshakes_in_progress == 0
                and self.registry.active == 0
                and now.fds <= before.fds
                and now.tasks <= before.tasks
            )

        try:
            await eventually(clean, "resources released")
        except AssertionError as exc:
            now = snapshot()
            raise AssertionError(
                f"leak: handshakes {self.main.handshakes_in_progress}+"
                f"{self.slow.handshakes_in_progress}+{self.channels.handshakes_in_progress}+"
                f"{self.certified.handshakes_in_progress}, "
                f"handlers {self.registry.active}, "
                f"fds {before.fds}->{now.fds}, tasks {before.tasks}->{now.tasks}"
            ) from exc


# -- what a hostile client reports ----------------------------------------------------------


@dataclass
class Attack:
    """What a hostile client did and saw.

    :ivar ports: its connections' local ports (the listener's registry keys).
    :ivar legit: the spacks it sent legitimately before the attack.
    :ivar legit_on: with channels: those it sent on each channel (not 0).
    :ivar code: the refusal or CLOSE code stalk sent it.
    :ivar torn_down: stalk closed the connection (it read EOF).
    :ivar client_error: ``mitm``: the real client's error.
    :ivar elapsed: seconds from the end of the attack until stalk closed the connection.
    :ivar kinds: the kinds of the records stalk sent after the handshake.
    :ivar reset: the attack ended with a TCP RST: the listener may no longer know the
        client's address, so its outcome may be logged without a port.
    """

    ports: list[int]
    legit: list[Spack] = field(default_factory=list)
    legit_on: dict[int, list[Spack]] = field(default_factory=dict)
    code: int | None = None
    torn_down: bool = True
    client_error: BaseException | None = None
    elapsed: float = 0.0
    reset: bool = False
    kinds: list[RecordKind] = field(default_factory=list)


@dataclass
class Target:
    """The listener a hostile client attacks."""

    env: Env
    listener: Listener

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``."""
        return self.listener.address

    @property
    def server(self) -> PublicIdentity:
        """The listener's key (for IK)."""
        return self.env.server

    async def wire(self) -> Wire:
        """A fresh TCP connection to the listener."""
        return await Wire.connect(*self.address)


#: Seconds stalk gets to close a connection after the attack ended (or stalled).
TEARDOWN = 3.0


async def finish(
    wire: Wire,
    transport: Transport | None = None,
    *,
    legit: list[Spack] | None = None,
    legit_on: dict[int, list[Spack]] | None = None,
    eof: bool = True,
    since: float | None = None,
) -> Attack:
    """End an attack: half-close (unless ``eof`` is false), read until stalk closes.

    The code is the refusal verdict when stalk answered the handshake with one, else the
    last CLOSE code stalk sent (decrypted with ``transport``).

    :param since: the clock reading ``elapsed`` counts from (default: now).
    """
    started = anyio.current_time() if since is None else since
    if eof:
        await wire.send_eof()
    torn_down = False
    rest = b""
    with anyio.move_on_after(TEARDOWN):
        rest = await wire.read_to_eof()
        torn_down = True
    elapsed = anyio.current_time() - started
    await wire.aclose()
    code: int | None = None
    if transport is None:
        if wire.received and wire.received[0]:
            code = wire.received[0]
        kinds: list[RecordKind] = []
    else:
        records = peer_records(transport, rest)
        kinds = [record.kind for record in records]
        codes = close_codes(records)
        code = codes[-1] if codes else None
    return Attack(
        [wire.local_port],
        legit=list(legit or []),
        legit_on=dict(legit_on or {}),
        code=code,
        torn_down=torn_down,
        elapsed=elapsed,
        kinds=kinds,
    )


# -- running one case --------------------------------------------------------------------------


async def _listener_outcome(env: Env, attack: Attack) -> Outcome:
    registry = env.registry

    def settled(port: int) -> bool:
        return registry.settled(port) or (attack.reset and None in registry.failed)

    for port in attack.ports:
        await eventually(partial(settled, port), f"listener done with port {port}")
    outcomes = []
    for port in attack.ports:
        served = registry.served.get(port)
        if served is not None:
            delivered_on = {n: list(spacks) for n, spacks in served.channels.items() if spacks}
            outcomes.append(
                Outcome(served.end, True, list(served.received), delivered_on=delivered_on)
            )
        elif port in registry.failed:
            outcomes.append(Outcome(registry.failed[port][-1], False))
        else:  # a reset connection the listener could no longer put an address on
            outcomes.append(Outcome(registry.failed.pop(None)[-1], False))
    first = outcomes[0]
    for other in outcomes[1:]:  # every connection of a multi-connection attack alike
        assert type(other.error) is type(first.error), (first.error, other.error)
        assert other.established == first.established
        assert other.delivered == first.delivered
        assert other.delivered_on == first.delivered_on
    first.legit = attack.legit
    first.legit_on = attack.legit_on
    first.code = attack.code
    first.torn_down = attack.torn_down
    first.client_error = attack.client_error
    first.elapsed = attack.elapsed
    return first


@dataclass
class ServerSide:
    """A hostile server's record of one connection.

    :ivar legit: spacks it sent legitimately before the attack.
    :ivar code: the CLOSE code (or nothing) stalk's client sent it before closing.
    :ivar rest: every byte stalk's client sent after the play's last read.
    :ivar finished: set once the client closed the connection (EOF read).
    """

    identity: Identity = field(default_factory=Identity.generate)
    legit: list[Spack] = field(default_factory=list)
    code: int | None = None
    rest: bytes = b""
    finished: anyio.Event = field(default_factory=anyio.Event)
    transport: Transport | None = None

    async def finish(self, wire: Wire, transport: Transport | None = None) -> None:
        """Read until the client closes; note its CLOSE code."""
        with anyio.move_on_after(TEARDOWN + 2):
            rest = self.rest = await wire.read_to_eof()
            codes = close_codes(peer_records(transport or self.transport, rest))
            self.code = codes[-1] if codes else None


@dataclass(frozen=True)
class ServerPlay:
    """The ``run`` of a ``server`` case: how the hostile server behaves.

    :param behave: ``behave(wire, side)``; it must end with ``side.finish(...)``.
    :param ik: the client pins the hostile server's key (IK) instead of running XX.
    :param config: the client's configuration.
    :param authorities: the client requires the server's certificate from these (SPEC 25).
    :param expect_name: with ``authorities``: the name the certificate must bear.
    """

    behave: Callable[[Wire, ServerSide], Awaitable[None]]
    ik: bool = False
    config: Config = field(default_factory=lambda: Config(handshake_timeout=3, close_timeout=1))
    authorities: Authorities | None = None
    expect_name: str | None = None


async def _run_server_case(play: ServerPlay) -> Outcome:
    side = ServerSide()

    async def behave(wire: Wire) -> None:
        try:
            await play.behave(wire, side)
        except EOFError:  # the client left in the middle of the play: that is its answer
            await side.finish(wire)
        finally:
            side.finished.set()

    async with raw_server(behave) as (port, _):
        peer = side.identity.public if play.ik else None
        started = anyio.current_time()
        try:
            conn = await connect(
                "127.0.0.1",
                port,
                peer,
                config=play.config,
                authorities=play.authorities,
                expect_name=play.expect_name,
            )
        except StalkError as exc:
            outcome = Outcome(exc, False, elapsed=anyio.current_time() - started)
            with anyio.move_on_after(TEARDOWN):
                await side.finished.wait()
            outcome.torn_down = side.finished.is_set()
        else:
            outcome = await _drain_client(conn, side)
    outcome.legit = side.legit
    outcome.code = side.code
    outcome.rest = side.rest
    return outcome


async def _drain_client(conn: Connection, side: ServerSide) -> Outcome:
    outcome = Outcome(None, True)
    try:
        while True:
            outcome.delivered.append(await conn.receive())
    except (StalkError, anyio.EndOfStream) as exc:
        outcome.error = exc
    if isinstance(outcome.error, (anyio.EndOfStream, ClosedByPeer)):
        # An authenticated CLOSE ends the peer's direction only (SPEC 13); ours stays
        # open until the application closes it, which it does now.
        await conn.aclose()
        with contextlib.suppress(ConnectionClosed):
            await conn.receive()  # ClosedResourceError expected; EndOfStream would not do
            raise AssertionError("receive() after aclose() returned")
    else:
        # stalk must close by itself, before the application does anything.
        with anyio.move_on_after(TEARDOWN):
            await side.finished.wait()
        outcome.torn_down = side.finished.is_set()
        try:
            await conn.receive()
        except (ConnectionLost, ConnectionClosed):
            pass
        else:
            raise AssertionError("a broken connection delivered a spack")
        await conn.aclose()
    with anyio.move_on_after(TEARDOWN):
        await side.finished.wait()
    outcome.torn_down = outcome.torn_down and side.finished.is_set()
    return outcome


def check(case: Case, out: Outcome) -> None:
    """The end state every case must reach (see the module docstring)."""
    expect = case.expect
    assert out.error is not None, "the case ended without an error or a clean close"
    assert isinstance(out.error, TYPED), f"untyped error {type(out.error).__name__}: {out.error}"
    assert isinstance(out.error, expect.error), (
        f"expected {expect.error}, got {type(out.error).__name__}: {out.error}"
    )
    assert expect.established is None or out.established == expect.established, (
        f"established={out.established}, expected {expect.established} ({out.error!r})"
    )
    assert out.delivered == out.legit, (
        f"delivered {out.delivered!r}, but the peer sent only {out.legit!r} legitimately"
    )
    assert out.delivered_on == out.legit_on, (
        f"channels delivered {out.delivered_on!r}, but the peer sent only {out.legit_on!r} "
        "legitimately"
    )
    assert out.torn_down, "stalk did not close the connection"
    if expect.code is not None:
        assert out.code == expect.code, f"peer got code {out.code}, expected {expect.code}"
    if expect.silent:
        assert out.rest == b"", f"stalk sent {len(out.rest)} bytes after the peer's last message"
    if expect.deadline is not None:
        assert out.elapsed <= expect.deadline, f"closed after {out.elapsed:.2f} s"
    if expect.client_error is not None:
        assert isinstance(out.client_error, expect.client_error), (
            f"client: expected {expect.client_error.__name__}, got {out.client_error!r}"
        )


async def run_case(case: Case, env: Env) -> None:
    """Run one row and assert the common end state, then control and leak checks."""
    if case.isolated:
        async with Env.start(case.authorize) as own:
            await own.control(own.main)  # warm up, as the shared env is
            await _run_in(case, own)
    else:
        await _run_in(case, env)


async def _run_in(case: Case, env: Env) -> None:
    # Ports are reused over a run: forget every connection of earlier cases (all ended).
    env.registry.served.clear()
    env.registry.failed.clear()
    before = snapshot()
    listener = env.main
    if case.slow:
        listener = env.slow
    elif case.channels:
        listener = env.channels
    elif case.certified:
        listener = env.certified
    target = Target(env, listener)
    run = case.run
    with anyio.fail_after(case.timeout):
        if isinstance(run, ServerPlay):
            outcome = await _run_server_case(run)
        elif case.direction in ("client", "mitm"):
            attack: Attack = await run(target)
            outcome = await _listener_outcome(env, attack)
        elif case.direction in ("api", "fault"):
            outcome = await run(target)
        else:
            outcome = run()
    if os.environ.get("ADVERSARIAL_TRACE"):
        print(f"\n{case.ref}: {outcome!r}")
    check(case, outcome)
    await env.control(target.listener)
    await env.settle(before)
