"""Transports other than the default TCP: a chosen local address for ``connect``, listener
options, unix domain sockets, and stalk served from any anyio listener of byte streams.

Every test runs on asyncio and trio.
"""

from __future__ import annotations

import socket

import anyio
import pytest
from anyio.abc import SocketAttribute

from helpers import serving
from stalk.connection import Connection, connect
from stalk.errors import ConnectFailed
from stalk.spack import Spack

pytestmark = pytest.mark.anyio


async def tell_where(conn: Connection) -> None:
    """Answer every spack with where the server sees the client: ``(host, port)``."""
    async for _ in conn:
        await conn.send(Spack(conn.host, conn.port))


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 uses now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- connect(local_host=, local_port=) -----------------------------------------------------


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost"], ids=["address", "name"])
async def test_connect_from_a_chosen_local_address(target: str) -> None:
    """The server sees the address we bound; an IP is dialled directly, a name by anyio."""
    async with serving(tell_where) as (_, port, server_id):
        local_port = free_port()
        async with await connect(
            target, port, server_id.public, local_host="127.0.0.2", local_port=local_port
        ) as conn:
            assert conn.extra(SocketAttribute.local_address) == ("127.0.0.2", local_port)
            await conn.send(Spack("where am I?"))
            assert await conn.receive() == Spack("127.0.0.2", local_port)
        async with await connect(target, port, server_id.public, local_host="127.0.0.2") as conn:
            await conn.send(Spack("and now?"))
            host, chosen = await conn.receive()
            assert host == "127.0.0.2"
            assert chosen != local_port  # any port the system chose


async def test_a_local_address_that_cannot_be_bound_is_connect_failed() -> None:
    async with serving(tell_where) as (host, port, server_id):
        with pytest.raises(ConnectFailed) as info:
            await connect(host, port, server_id.public, local_host="192.0.2.1")  # TEST-NET-1
    assert str(info.value).startswith(f"cannot connect to {host}:{port} from 192.0.2.1: ")
    assert info.value.peer_address == (host, port)
    assert isinstance(info.value, OSError)


async def test_a_local_port_alone_is_refused() -> None:
    """anyio would ignore it and connect from another port: refused before any I/O."""
    with pytest.raises(ValueError, match="local_port needs local_host"):
        await connect("127.0.0.1", 1, local_port=free_port())
