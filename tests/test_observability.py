"""Logging and per-connection statistics: what an operator and an application can see.

The log lines are read from the records (caplog) of stalk's child loggers; the statistics
are checked against counts made independently (bytes counted on the transport itself).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from collections.abc import Iterator

import anyio
import pytest
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.stapled import StapledByteStream

from helpers import byte_stream_pair, connected_pair, drain, serving, take_all, wait_until
from stalk._logs import THROTTLE, Throttle
from stalk.config import Config
from stalk.connection import Connection, StalkAttribute, connect, format_address
from stalk.errors import ClosedByPeer, ConnectFailed, ConnectionLost, ProtocolError, StalkError
from stalk.identity import Identity
from stalk.listener import create_listener
from stalk.spack import Spack
from stalk.wire import CloseCode


@pytest.fixture(autouse=True)
def fresh_throttle() -> Iterator[None]:
    """Each test starts with no kind of record throttled (the throttle is per process)."""
    THROTTLE.reset()
    yield
    THROTTLE.reset()


def lines(caplog: pytest.LogCaptureFixture, logger: str, level: int = logging.INFO) -> list[str]:
    """The messages logged on ``logger`` at exactly ``level``."""
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]


def ended(caplog: pytest.LogCaptureFixture, side: str) -> list[str]:
    """The end-of-connection lines of one side (``"to"``: client, ``"from"``: server)."""
    return [
        line
        for line in lines(caplog, "stalk.connection")
        if line.startswith(f"connection {side} ") and " ended after " in line
    ]


class Collect(logging.Handler):
    """Keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def read_until_closed(stream: ByteStream) -> None:
    """Read and drop until the stream ends (raises how it ended)."""
    while True:
        await stream.receive()


# -- the loggers --------------------------------------------------------------------------


def test_stalk_is_silent_unless_the_application_configures_logging() -> None:
    """The NullHandler: even a WARNING does not reach Python's last-resort stderr output."""
    program = (
        "import logging, stalk\n"
        "logging.getLogger('stalk.listener').warning('from stalk')\n"
        "logging.getLogger('elsewhere').warning('from elsewhere')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    )
    assert "from elsewhere" in result.stderr  # the last resort is there for other loggers
    assert "from stalk" not in result.stderr


def test_format_address_brackets_ipv6() -> None:
    assert format_address("127.0.0.1", 7413) == "127.0.0.1:7413"
    assert format_address("::1", 7413) == "[::1]:7413"
    assert format_address("fe80::1%eth0", 7413) == "[fe80::1%eth0]:7413"


@pytest.mark.anyio
@pytest.mark.parametrize("pin", [False, True], ids=["XX", "IK"])
async def test_both_sides_log_the_connection_and_its_clean_end_at_info(
    caplog: pytest.LogCaptureFixture, pin: bool
) -> None:
    caplog.set_level(logging.INFO, logger="stalk")
    client_id = Identity.generate()
    pattern = "IK" if pin else "XX"
    async with serving() as (host, port, server_id):
        peer = server_id.public if pin else None
        async with await connect(host, port, peer, identity=client_id) as conn:
            await conn.send(Spack("hello"))
            assert await conn.receive() == Spack("hello")
            local_port = conn.extra(SocketAttribute.local_port)
        await wait_until(lambda: ended(caplog, "from"))
    server_at = f"127.0.0.1:{port}"
    client_at = f"127.0.0.1:{local_port}"
    assert (
        f"connected to {server_id.public.fingerprint} at {server_at} ({pattern}, handshake "
        in "\n".join(lines(caplog, "stalk.connection"))
    )
    assert (
        f"accepted {client_id.public.fingerprint} from {client_at} ({pattern}, handshake "
        in "\n".join(lines(caplog, "stalk.connection"))
    )
    (client_end,) = ended(caplog, "to")
    assert client_end.startswith(f"connection to {server_id.public.fingerprint} at {server_at}")
    assert ": closed by us; sent 1 spacks, " in client_end
    assert "; received 1 spacks, " in client_end
    (server_end,) = ended(caplog, "from")
    assert server_end.startswith(
        f"connection from {client_id.public.fingerprint} at {client_at} ended after "
    )
    assert ": closed by the peer; sent 1 spacks, " in server_end
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.anyio
async def test_ipv6_addresses_are_logged_in_brackets(caplog: pytest.LogCaptureFixture) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    caplog.set_level(logging.INFO, logger="stalk")
    server_id = Identity.generate()
    async with (
        await create_listener("::1", 0, identity=server_id) as listener,
        anyio.create_task_group() as tg,
    ):
        _, port = await tg.start(listener.serve, Connection.aclose)
        async with await connect("::1", port, server_id.public):
            pass
        await wait_until(lambda: ended(caplog, "from"))
        tg.cancel_scope.cancel()
    (client_end,) = ended(caplog, "to")
    assert f" at [::1]:{port} ended after " in client_end
    (server_end,) = ended(caplog, "from")
    assert " at [::1]:" in server_end


@pytest.mark.anyio
async def test_a_refused_connect_names_an_ipv6_address_in_brackets() -> None:
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
        port = probe.getsockname()[1]  # bound, not listening: the connect is refused
        with pytest.raises(ConnectFailed, match=rf"cannot connect to \[::1\]:{port}: "):
            await connect("::1", port)


# -- how a connection ended ----------------------------------------------------------------


@pytest.mark.anyio
async def test_the_end_line_says_how_the_peer_ended_it(caplog: pytest.LogCaptureFixture) -> None:
    """A peer's error CLOSE (with its code and reason), a truncation, a protocol error."""
    caplog.set_level(logging.INFO, logger="stalk")
    async with serving() as (host, port, server_id):
        conn = await connect(host, port, server_id.public)
        await conn.close(CloseCode.GOING_AWAY, "maintenance\n")
        await wait_until(lambda: len(ended(caplog, "from")) == 1)

        conn = await connect(host, port, server_id.public)
        await conn.send(Spack("x"))
        await conn.receive()
        await anyio.aclose_forcefully(conn._transport)  # TCP FIN without CLOSE
        await wait_until(lambda: len(ended(caplog, "from")) == 2)

        conn = await connect(host, port, server_id.public)
        await conn._transport.send(b"\x00\x20" + bytes(32))  # a frame that fails to decrypt
        with pytest.raises(ClosedByPeer) as info:
            await conn.receive()
        assert info.value.code == CloseCode.PROTOCOL_ERROR
        await conn.aclose()
        await wait_until(lambda: len(ended(caplog, "from")) == 3)
    peer_close, truncated, broken = ended(caplog, "from")
    assert ": closed by the peer with GOING_AWAY: 'maintenance\\n'; sent 0 spacks" in peer_close
    assert ": lost: the peer closed the connection without a CLOSE; sent 1 spacks" in truncated
    assert ": the peer broke the protocol (PROTOCOL_ERROR): " in broken
    client_ends = ended(caplog, "to")
    assert ": closed by us with GOING_AWAY: 'maintenance\\n'" in client_ends[0]
    assert ": closed by the peer with PROTOCOL_ERROR: " in client_ends[-1]


@pytest.mark.anyio
async def test_the_end_line_of_an_idle_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="stalk")
    async with serving(config=Config(idle_timeout=0.05)) as (host, port, server_id):
        async with await connect(host, port, server_id.public):
            await wait_until(lambda: ended(caplog, "from"))  # we never read its PING
    (server_end,) = ended(caplog, "from")
    assert ": idle timeout (TIMEOUT): the peer sent nothing " in server_end
    (client_end,) = ended(caplog, "to")
    assert ": closed by us; " in client_end  # it never read the server's CLOSE TIMEOUT


@pytest.mark.anyio
async def test_bad_records_from_many_peers_log_one_info_line_each_and_no_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer that breaks the protocol is not the operator's problem: no WARNING flood."""
    caplog.set_level(logging.DEBUG, logger="stalk")
    peers = 4
    async with serving() as (host, port, server_id):
        for _ in range(peers):
            conn = await connect(host, port, server_id.public)
            await conn._transport.send(b"\x00\x20" + bytes(32))
            with pytest.raises(ClosedByPeer):
                await conn.receive()
            await conn.aclose()
        await wait_until(lambda: len(ended(caplog, "from")) == peers)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert all("the peer broke the protocol" in line for line in ended(caplog, "from"))


# -- failed handshakes and refusals: throttled ---------------------------------------------


def test_throttle_lets_one_record_per_kind_and_interval_through() -> None:
    now = [100.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    logger = logging.getLogger("stalk.test_throttle")
    records = (handler := Collect()).records
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        for n in range(5):
            throttle.log(logger, logging.INFO, "a", "event %d", n)
        throttle.log(logger, logging.WARNING, "b", "other")  # another kind has its own turn
        now[0] += 9.9
        throttle.log(logger, logging.INFO, "a", "event %d", 5)
        now[0] += 0.1
        throttle.log(logger, logging.INFO, "a", "event %d", 6)
        throttle.log(logger, logging.INFO, "a", "event %d", 7)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    seen = [(logging.getLevelName(r.levelno), r.getMessage()) for r in records]
    assert seen == [
        ("INFO", "event 0"),
        ("DEBUG", "event 1"),
        ("DEBUG", "event 2"),
        ("DEBUG", "event 3"),
        ("DEBUG", "event 4"),
        ("WARNING", "other"),
        ("DEBUG", "event 5"),
        ("INFO", "event 6 (and 5 more like it since the last one, logged at DEBUG only)"),
        ("DEBUG", "event 7"),
    ]


def test_throttle_does_not_spend_a_turn_on_a_level_nobody_sees() -> None:
    now = [0.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    logger = logging.getLogger("stalk.test_throttle_quiet")
    records = (handler := Collect()).records
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        throttle.log(logger, logging.INFO, "a", "hidden")
        logger.setLevel(logging.INFO)
        throttle.log(logger, logging.INFO, "a", "shown")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert [r.getMessage() for r in records] == ["shown"]


@pytest.mark.anyio
async def test_a_flood_of_failed_handshakes_logs_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="stalk")
    strangers = 6
    async with serving() as (host, port, _):
        for _ in range(strangers):
            async with await anyio.connect_tcp(host, port) as stream:
                await stream.send(b"GET / HTTP/1.1\r\n\r\n")
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await read_until_closed(stream)
        failed = "failed: not a stalk peer"
        await wait_until(lambda: sum(failed in r.getMessage() for r in caplog.records) == strangers)
    info = lines(caplog, "stalk.handshake")
    assert len(info) == 1
    assert info[0].startswith("handshake with 127.0.0.1:")
    assert len([m for m in lines(caplog, "stalk.handshake", logging.DEBUG) if failed in m]) == 5
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.anyio
async def test_busy_refusals_at_capacity_warn_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="stalk")
    release = anyio.Event()

    async def hold(conn: Connection) -> None:
        await release.wait()

    async with serving(hold, config=Config(max_connections=1)) as (host, port, server_id):
        async with await connect(host, port, server_id.public):
            for _ in range(3):
                with pytest.raises(StalkError, match="BUSY"):
                    await connect(host, port, server_id.public)
            release.set()
    warnings = lines(caplog, "stalk.listener", logging.WARNING)
    assert len(warnings) == 1
    assert warnings[0].startswith("refusing 127.0.0.1:")
    assert "with BUSY: too many connections" in warnings[0]
    refusals = lines(caplog, "stalk.listener", logging.DEBUG)
    assert len([m for m in refusals if "with BUSY" in m]) == 2


@pytest.mark.anyio
async def test_an_authorize_hook_that_raises_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="stalk")

    def authorize(_peer: object) -> bool:
        raise KeyError("broken allow-list")

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if "(not authorized)" in r.getMessage()]

    async with serving(authorize=authorize) as (host, port, server_id):
        for _ in range(2):
            with pytest.raises(StalkError, match="NOT_AUTHORIZED"):
                await connect(host, port, server_id.public)
        await wait_until(lambda: len(refusals()) == 2)
    (error,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (error.name, error.levelno) == ("stalk.handshake", logging.ERROR)
    assert error.getMessage().startswith("authorize() raised for SHA256:")
    assert error.exc_info is not None
    assert isinstance(error.exc_info[1], KeyError)
    # The second failure of the hook went to DEBUG (throttled), without its traceback.
    (again,) = [
        r
        for r in caplog.records
        if r.levelno == logging.DEBUG and r.getMessage().startswith("authorize() raised")
    ]
    assert again.exc_info is None


# -- a handler's exception stays local ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("failure", ["RuntimeError", "MessageTooLarge"])
async def test_a_handler_exception_is_internal_error_to_the_peer_and_details_to_the_log(
    caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    caplog.set_level(logging.INFO, logger="stalk")

    async def handler(conn: Connection) -> None:
        await conn.receive()
        if failure == "RuntimeError":
            raise RuntimeError("secret detail")
        await conn.send(Spack(b"x" * (conn.peer_max_message_size + 1)))

    async with serving(handler) as (host, port, server_id):
        async with await connect(host, port, server_id.public) as conn:
            await conn.send(Spack("go"))
            with pytest.raises(ClosedByPeer) as info:
                await conn.receive()
        await wait_until(lambda: ended(caplog, "from"))
    assert info.value.code == CloseCode.INTERNAL_ERROR
    assert info.value.reason == "internal error"
    (error,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert error.levelno == logging.ERROR
    assert error.name == "stalk.listener"
    assert error.getMessage().startswith("handler for SHA256:")
    assert error.exc_info is not None
    assert type(error.exc_info[1]).__name__ == failure
    (server_end,) = ended(caplog, "from")
    assert f": closed by us with INTERNAL_ERROR: the handler raised {failure};" in server_end


@pytest.mark.anyio
async def test_leaving_async_with_by_an_exception_tells_the_peer_only_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="stalk")
    seen: list[BaseException] = []

    async def handler(conn: Connection) -> None:
        try:
            await conn.receive()
        except ConnectionLost as exc:
            seen.append(exc)

    async with serving(handler) as (host, port, server_id):
        with pytest.raises(ValueError, match="secret"):
            async with await connect(host, port, server_id.public):
                raise ValueError("secret")
        await wait_until(lambda: seen)
    (error,) = seen
    assert isinstance(error, ClosedByPeer)
    assert (error.code, error.reason) == (CloseCode.INTERNAL_ERROR, "internal error")
    (client_end,) = ended(caplog, "to")
    assert ": closed by us with INTERNAL_ERROR: the async with block raised ValueError;" in (
        client_end
    )


# -- nothing per message --------------------------------------------------------------------


@pytest.mark.anyio
async def test_nothing_is_logged_per_spack(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="stalk")
    counts = []
    async with serving() as (host, port, server_id):
        for spacks in (1, 300):
            caplog.clear()
            async with await connect(host, port, server_id.public) as conn:
                for n in range(spacks):
                    await conn.send(Spack(n))
                for n in range(spacks):
                    assert await conn.receive() == Spack(n)
            await wait_until(lambda: ended(caplog, "from"))
            counts.append(len(caplog.records))
    assert counts[0] == counts[1] == 4  # connected and ended, on each side


# -- statistics -----------------------------------------------------------------------------


class CountingStream(ByteStream):
    """A byte stream that counts what goes through it each way (the reference counts)."""

    def __init__(self, inner: StapledByteStream) -> None:
        self.inner = inner
        self.sent = 0
        self.received = 0

    async def send(self, item: bytes) -> None:
        self.sent += len(item)
        await self.inner.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self.inner.receive(max_bytes)
        self.received += len(data)
        return data

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def stats(conn: Connection) -> dict[str, int]:
    return {
        name: conn.extra(getattr(StalkAttribute, name))
        for name in (
            "bytes_sent",
            "bytes_received",
            "spacks_sent",
            "spacks_received",
            "rekeys_sent",
            "rekeys_received",
        )
    }


@pytest.mark.anyio
async def test_statistics_count_exactly_what_a_known_exchange_carried() -> None:
    """10 spacks one way and 4 back, each in its own Noise message, rekeying every third
    message: every count is known, and the bytes are those the transport carried."""
    a, b = byte_stream_pair()
    client_stream, server_stream = CountingStream(a), CountingStream(b)
    client_id, server_id = Identity.generate(), Identity.generate()
    config = Config(rekey_after_messages=3)
    servers: list[Connection] = []

    async def accept() -> None:
        servers.append(
            await Connection.wrap(
                server_stream, identity=server_id, server_side=True, config=config
            )
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(accept)
        client = await Connection.wrap(client_stream, identity=client_id, config=config)
    (server,) = servers
    # Without a writer task, each send() is one Noise message written before it returns.
    for n in range(10):
        await client.send(Spack(n, "x" * n))
    for n in range(10):
        assert await server.receive() == Spack(n, "x" * n)
    for n in range(4):
        await server.send(Spack(b"reply", n))
    for n in range(4):
        assert await client.receive() == Spack(b"reply", n)
    # Client: 10 messages, a REKEY in the 3rd, 6th and 9th. Server: READY, then 4 replies,
    # a REKEY in its 3rd message.
    assert stats(client) == {
        "bytes_sent": client_stream.sent,
        "bytes_received": client_stream.received,
        "spacks_sent": 10,
        "spacks_received": 4,
        "rekeys_sent": 3,
        "rekeys_received": 1,
    }
    assert stats(server) == {
        "bytes_sent": server_stream.sent,
        "bytes_received": server_stream.received,
        "spacks_sent": 4,
        "spacks_received": 10,
        "rekeys_sent": 1,
        "rekeys_received": 3,
    }
    assert client_stream.sent == server_stream.received
    assert server_stream.sent == client_stream.received
    await client.aclose()  # its CLOSE is counted too
    with pytest.raises(anyio.EndOfStream):
        await server.receive()
    assert client.extra(StalkAttribute.bytes_sent) == client_stream.sent
    assert server.extra(StalkAttribute.bytes_received) == client_stream.sent
    assert server.extra(StalkAttribute.spacks_received) == 10
    await server.aclose()
    for conn in (client, server):
        duration = conn.extra(StalkAttribute.handshake_duration)
        assert 0 < duration < config.handshake_timeout


@pytest.mark.anyio
async def test_statistics_of_a_listener_connection_with_batched_sends() -> None:
    """Through the writer task, which batches: spacks are still counted one by one, and
    what one side sent is what the other received."""
    done = anyio.Event()
    server_stats: dict[str, int] = {}

    async def handler(conn: Connection) -> None:
        async for spack in conn:
            await conn.send(spack)
        server_stats.update(stats(conn))
        done.set()

    async with serving(handler) as (host, port, server_id):
        async with await connect(host, port, server_id.public) as conn:
            for n in range(100):
                await conn.send(Spack(n))
            for n in range(100):
                assert await conn.receive() == Spack(n)
        client_stats = stats(conn)
        with anyio.fail_after(5):
            await done.wait()
    assert client_stats["spacks_sent"] == server_stats["spacks_received"] == 100
    assert client_stats["spacks_received"] == server_stats["spacks_sent"] == 100
    assert client_stats["bytes_sent"] == server_stats["bytes_received"]
    assert client_stats["bytes_received"] == server_stats["bytes_sent"]
    assert client_stats["rekeys_sent"] == server_stats["rekeys_received"] == 0
    assert conn.extra(StalkAttribute.handshake_duration) > 0


def test_session_counts_bytes_and_rekeys_sans_io() -> None:
    pair = connected_pair()
    client, server = pair.client, pair.server
    assert client.bytes_sent == server.bytes_received > 0
    assert server.bytes_sent == client.bytes_received > 0
    before = client.bytes_sent
    client.request_rekey()
    client.send(Spack("after a rekey"))
    data = take_all(client)
    assert client.bytes_sent == before + len(data)
    server.receive_data(data)
    drain(server)
    assert (client.rekeys_sent, server.rekeys_received) == (1, 1)
    assert (server.rekeys_sent, client.rekeys_received) == (0, 0)


@pytest.mark.anyio
async def test_a_protocol_error_is_counted_as_received_bytes() -> None:
    """Bytes the session rejects still came from the transport."""
    a, b = byte_stream_pair()
    client_id, server_id = Identity.generate(), Identity.generate()
    servers: list[Connection] = []

    async def accept() -> None:
        servers.append(await Connection.wrap(b, identity=server_id, server_side=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(accept)
        client = await Connection.wrap(a, identity=client_id)
    (server,) = servers
    before = server.extra(StalkAttribute.bytes_received)
    await a.send(b"\x00\x20" + bytes(32))  # a frame that fails to decrypt

    async with anyio.create_task_group() as tg:

        @tg.start_soon
        async def client_side() -> None:
            with pytest.raises(ClosedByPeer):
                await client.receive()  # the server's PROTOCOL_ERROR
            await client.aclose()  # ends the server's linger at once

        with pytest.raises(ProtocolError):
            await server.receive()
    assert server.extra(StalkAttribute.bytes_received) == before + 34
    assert server.extra(StalkAttribute.spacks_received) == 0
