"""Per-connection statistics: what a connection carried, each way.

The counts are checked against counts made independently (bytes counted on the transport
itself), on asyncio and trio.
"""

from __future__ import annotations

import anyio
import pytest
from anyio.abc import ByteStream
from anyio.streams.stapled import StapledByteStream

from helpers import byte_stream_pair, connected_pair, drain, serving, take_all
from stalk.config import Config
from stalk.connection import Connection, StalkAttribute, connect
from stalk.errors import ClosedByPeer, ProtocolError
from stalk.identity import Identity
from stalk.spack import Spack

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
