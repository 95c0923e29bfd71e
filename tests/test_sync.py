"""The blocking facade, driven from plain (non-async) test code on both backends."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator

import pytest
from anyio.from_thread import start_blocking_portal

import stalk
import stalk.sync
from helpers import echo


@pytest.fixture(params=["asyncio", "trio"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, int, stalk.Identity, str]]:
    identity = stalk.Identity.generate()

    with start_blocking_portal(request.param) as portal:
        listener = portal.call(lambda: stalk.create_listener("127.0.0.1", 0, identity=identity))
        future = portal.start_task_soon(listener.serve, echo)
        host, port = listener.address
        yield host, port, identity, request.param
        future.cancel()
        portal.call(listener.aclose)


def test_blocking_round_trip(server: tuple[str, int, stalk.Identity, str]) -> None:
    host, port, identity, backend = server
    with stalk.sync.connect(host, port, str(identity.public), backend=backend) as conn:
        assert conn.peer == identity.public
        assert conn.pattern == "IK"
        assert len(conn.handshake_hash) == 32
        conn.send(stalk.Spack("one", 1))
        conn.send(stalk.Spack("two", 2))
        assert conn.receive() == stalk.Spack("one", 1)
        assert conn.receive() == stalk.Spack("two", 2)


def test_blocking_errors_are_the_async_ones(server: tuple[str, int, stalk.Identity, str]) -> None:
    host, port, _identity, backend = server
    with pytest.raises(stalk.PeerIdentityMismatch):
        stalk.sync.connect(host, port, stalk.Identity.generate().public, backend=backend)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no unix domain sockets")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_blocking_over_a_unix_socket(backend: str) -> None:
    identity = stalk.Identity.generate()
    with tempfile.TemporaryDirectory(prefix="stalk-") as directory:
        path = f"{directory}/s.sock"
        with start_blocking_portal(backend) as portal:
            listener = portal.call(lambda: stalk.create_unix_listener(path, identity=identity))
            future = portal.start_task_soon(listener.serve, echo)
            try:
                with stalk.sync.connect_unix(path, identity.public, backend=backend) as conn:
                    assert conn.connection.path == path
                    conn.send(stalk.Spack("unix", 1))
                    assert conn.receive() == stalk.Spack("unix", 1)
            finally:
                future.cancel()
                portal.call(listener.aclose)
