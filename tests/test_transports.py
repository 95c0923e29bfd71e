"""Transports other than the default TCP: a chosen local address for ``connect``, listener
options, unix domain sockets, and stalk served from any anyio listener of byte streams.

Every test runs on asyncio and trio.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import stat
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream, SocketAttribute, TaskGroup
from anyio.streams.tls import TLSListener

from helpers import byte_stream_pair, echo, serving, wait_until
from stalk.bench.common import make_certificate
from stalk.config import Config
from stalk.connection import Connection, connect, connect_unix
from stalk.errors import ConnectFailed, PeerRefused
from stalk.identity import Identity
from stalk.link import address_text, remote_address, unix_text
from stalk.listener import (
    Listener,
    StreamListener,
    UnixListener,
    create_listener,
    create_unix_listener,
    listen_unix,
)
from stalk.spack import Spack
from stalk.wire import CloseCode
from stalk.writing import anyio_socket

pytestmark = pytest.mark.anyio

unix_only = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no unix domain sockets")
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="Linux only")


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


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost"], ids=["address", "name"])
async def test_a_local_address_that_cannot_be_bound_is_connect_failed(target: str) -> None:
    """It says why, also through anyio's connect_tcp (which puts it in the cause)."""
    async with serving(tell_where) as (_, port, server_id):
        with pytest.raises(ConnectFailed) as info:
            await connect(target, port, server_id.public, local_host="192.0.2.1")  # TEST-NET-1
    assert str(info.value).startswith(f"cannot connect to {target}:{port} from 192.0.2.1: ")
    assert os.strerror(errno.EADDRNOTAVAIL).lower() in str(info.value).lower()
    assert info.value.peer_address == (target, port)
    assert isinstance(info.value, OSError)


async def test_a_local_address_of_the_other_family_is_named() -> None:
    with pytest.raises(ConnectFailed, match="the local address is IPv4, the peer's IPv6"):
        await connect("::1", 1, local_host="127.0.0.1")


async def test_a_refused_name_says_why_each_address_failed() -> None:
    """anyio's connect_tcp says only "All connection attempts failed"; the cause says why."""
    with pytest.raises(ConnectFailed) as info:
        await connect("localhost", free_port())
    assert "All connection attempts failed (" in str(info.value)
    assert f"[Errno {errno.ECONNREFUSED}]" in str(info.value)


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost"], ids=["address", "name"])
async def test_a_local_port_alone(target: str) -> None:
    """From any address of the family dialled (anyio's connect_tcp would ignore the port)."""
    async with serving(tell_where) as (_, port, server_id):
        local_port = free_port()
        async with await connect(target, port, server_id.public, local_port=local_port) as conn:
            await conn.send(Spack("where am I?"))
            assert await conn.receive() == Spack("127.0.0.1", local_port)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            used = taken.getsockname()[1]
            with pytest.raises(ConnectFailed, match=f" from port {used}: "):
                await connect("127.0.0.1", port, server_id.public, local_port=used)


# -- listener options: backlog, reuse_port -------------------------------------------------


async def test_the_backlog_reaches_listen(monkeypatch: pytest.MonkeyPatch) -> None:
    """``backlog`` is what the kernel's listen() is called with (anyio's default else)."""
    backlogs: list[int] = []
    real_listen = socket.socket.listen

    def spy(sock: socket.socket, backlog: int = 0) -> None:
        backlogs.append(backlog)
        real_listen(sock, backlog)

    monkeypatch.setattr(socket.socket, "listen", spy)
    identity = Identity.generate()
    async with await create_listener("127.0.0.1", 0, identity=identity, backlog=7):
        pass
    async with await create_listener("127.0.0.1", 0, identity=identity):
        pass
    assert backlogs == [7, 65536]


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT")
async def test_reuse_port_lets_two_listeners_share_a_port() -> None:
    identity = Identity.generate()
    async with await create_listener("127.0.0.1", 0, identity=identity, reuse_port=True) as one:
        port = one.address[1]
        async with await create_listener(
            "127.0.0.1", port, identity=identity, reuse_port=True
        ) as two:
            assert two.address == ("127.0.0.1", port)
            async with anyio.create_task_group() as tg:
                await tg.start(one.serve, echo)
                await tg.start(two.serve, echo)
                for _ in range(3):  # whichever of the two the kernel picks answers
                    async with await connect("127.0.0.1", port, identity.public) as conn:
                        await conn.send(Spack("shared"))
                        assert await conn.receive() == Spack("shared")
                tg.cancel_scope.cancel()
        with pytest.raises(OSError, match=r"(?i)already in use") as info:
            await create_listener("127.0.0.1", port, identity=identity)
        assert info.value.errno == errno.EADDRINUSE


# -- unix domain sockets ---------------------------------------------------------------------


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short private directory: a socket's path has room for about 107 bytes only."""
    with tempfile.TemporaryDirectory(prefix="stalk-") as directory:
        yield Path(directory)


@asynccontextmanager
async def serving_unix(
    path: str | Path, handler: Callable[[Connection], Any] = echo, **kwargs: Any
) -> AsyncIterator[tuple[str, Identity, TaskGroup]]:
    """``listen_unix`` at ``path`` until the block ends; yields its path and identity."""
    identity = Identity.generate()
    async with anyio.create_task_group() as tg:
        bound = await tg.start(partial(listen_unix, path, handler, identity=identity, **kwargs))
        yield bound, identity, tg
        tg.cancel_scope.cancel()


def lines(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "stalk.connection")


@unix_only
@pytest.mark.parametrize("pin", [False, True], ids=["XX", "IK"])
async def test_unix_socket_round_trip(
    socket_dir: Path, caplog: pytest.LogCaptureFixture, pin: bool
) -> None:
    caplog.set_level(logging.INFO, logger="stalk")
    seen: list[tuple[str | None, str | None, int | None]] = []

    async def handler(conn: Connection) -> None:
        seen.append((conn.path, conn.host, conn.port))
        await echo(conn)

    path = str(socket_dir / "s.sock")
    client_id = Identity.generate()
    async with serving_unix(path, handler) as (bound, server_id, _):
        assert bound == path
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        peer = server_id.public if pin else None
        async with await connect_unix(Path(path), peer, identity=client_id) as conn:
            assert conn.peer == server_id.public
            assert conn.pattern == ("IK" if pin else "XX")
            assert (conn.path, conn.host, conn.port) == (path, None, None)
            assert f" unix:{path} open>" in repr(conn)
            await conn.send(Spack(1, "over a unix socket", b"\x00"))
            assert await conn.receive() == Spack(1, "over a unix socket", b"\x00")
        await wait_until(lambda: "connection from " in lines(caplog))
    assert seen == [(path, None, None)]
    logged = lines(caplog)
    assert f"connected to {server_id.public.fingerprint} at unix:{path} (" in logged
    assert f"accepted {client_id.public.fingerprint} from unix:{path} (" in logged
    assert f"connection to {server_id.public.fingerprint} at unix:{path} ended after " in logged
    assert not os.path.exists(path)  # the listener removed its socket file


@unix_only
async def test_a_missing_socket_is_connect_failed(socket_dir: Path) -> None:
    path = str(socket_dir / "nobody.sock")
    with pytest.raises(ConnectFailed) as info:
        await connect_unix(path)
    assert str(info.value).startswith(f"cannot connect to unix:{path}: ")
    assert info.value.peer_address == path


@unix_only
@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
async def test_the_socket_file_has_the_mode_asked_for(socket_dir: Path, mode: int) -> None:
    path = socket_dir / "s.sock"
    async with await create_unix_listener(path, identity=Identity.generate(), mode=mode):
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert not path.exists()


@unix_only
async def test_without_a_mode_the_umask_decides(socket_dir: Path) -> None:
    path = socket_dir / "s.sock"
    umask = os.umask(0o077)
    try:
        async with await create_unix_listener(path, identity=Identity.generate()):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o700  # owner only
    finally:
        os.umask(umask)


@unix_only
async def test_a_stale_socket_file_is_replaced(socket_dir: Path) -> None:
    """What a listener that was killed leaves behind: a socket file nobody accepts on."""
    path = str(socket_dir / "s.sock")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(path)
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    async with serving_unix(path) as (_, server_id, _):
        async with await connect_unix(path, server_id.public) as conn:
            await conn.send(Spack("after a crash"))
            assert await conn.receive() == Spack("after a crash")


@unix_only
async def test_a_live_listener_keeps_its_path(socket_dir: Path) -> None:
    """A second listener on a path in use fails; it never takes the path from the first."""
    path = str(socket_dir / "s.sock")
    async with serving_unix(path) as (_, server_id, _):
        with pytest.raises(OSError, match=r"(?i)already in use") as info:
            await create_unix_listener(path, identity=Identity.generate())
        assert info.value.errno == errno.EADDRINUSE
        assert info.value.filename == path
        async with await connect_unix(path, server_id.public) as conn:  # still the first
            await conn.send(Spack("still here"))
            assert await conn.receive() == Spack("still here")


@unix_only
async def test_a_file_that_is_not_a_socket_is_left_alone(socket_dir: Path) -> None:
    path = socket_dir / "data"
    path.write_text("precious")
    with pytest.raises(OSError, match=r"(?i)already in use") as info:
        await create_unix_listener(path, identity=Identity.generate())
    assert info.value.errno == errno.EADDRINUSE
    assert path.read_text() == "precious"


@unix_only
async def test_closing_removes_only_its_own_socket_file(socket_dir: Path) -> None:
    """A listener whose file was replaced (removed, then another listener started on the
    path) leaves the new file when it closes."""
    path = str(socket_dir / "s.sock")
    first = await create_unix_listener(path, identity=Identity.generate())
    try:
        os.unlink(path)
        async with serving_unix(path) as (_, server_id, _):
            await first.aclose()
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            async with await connect_unix(path, server_id.public) as conn:
                await conn.send(Spack("second"))
                assert await conn.receive() == Spack("second")
    finally:
        await first.aclose()
    assert not os.path.exists(path)


@unix_only
async def test_a_unix_listener_built_over_a_socket_made_elsewhere_leaves_its_file(
    socket_dir: Path,
) -> None:
    """As with a socket systemd passes: the file is not stalk's to remove."""
    path = str(socket_dir / "s.sock")
    identity = Identity.generate()
    async with UnixListener(await anyio.create_unix_listener(path), identity) as listener:
        assert listener.address == path
        assert repr(listener).startswith(f"<stalk.Listener unix:{path} ")
        async with anyio.create_task_group() as tg:
            assert await tg.start(listener.serve, echo) == path
            async with await connect_unix(path, identity.public) as conn:
                await conn.send(Spack("wrapped"))
                assert await conn.receive() == Spack("wrapped")
            tg.cancel_scope.cancel()
    assert stat.S_ISSOCK(os.stat(path).st_mode)


@unix_only
async def test_a_listener_class_checks_its_transport(socket_dir: Path) -> None:
    identity = Identity.generate()
    async with await anyio.create_unix_listener(socket_dir / "s.sock") as unix:
        with pytest.raises(TypeError, match="not a TCP listener"):
            Listener(unix, identity)
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as tcp:
        with pytest.raises(TypeError, match="not a unix socket listener"):
            UnixListener(tcp, identity)


@unix_only
@pytest.mark.skipif(not hasattr(socket, "SO_PEERCRED"), reason="no SO_PEERCRED")
async def test_the_per_address_cap_counts_a_unix_client_by_user(socket_dir: Path) -> None:
    """One user's handshakes beyond max_handshakes_per_address are refused with BUSY."""
    path = str(socket_dir / "s.sock")
    config = Config(max_handshakes_per_address=1)
    identity = Identity.generate()
    async with await create_unix_listener(path, identity=identity, config=config) as listener:
        async with anyio.create_task_group() as tg:
            await tg.start(listener.serve, echo)
            async with await anyio.connect_unix(path):  # connects, never handshakes
                user = f"uid {os.getuid()}"
                await wait_until(lambda: listener.handshakes_by_address == {user: 1})
                with pytest.raises(PeerRefused) as info:
                    await connect_unix(path, identity.public)
                assert info.value.code == CloseCode.BUSY
                assert info.value.reason == "too many handshakes from your address"
            await wait_until(lambda: listener.handshakes_by_address == {})
            async with await connect_unix(path, identity.public) as conn:  # its turn now
                await conn.send(Spack("in"))
                assert await conn.receive() == Spack("in")
            tg.cancel_scope.cancel()


@linux_only
async def test_an_abstract_unix_name(caplog: pytest.LogCaptureFixture) -> None:
    """Linux's abstract names: no file, written ``unix:@name``."""
    caplog.set_level(logging.INFO, logger="stalk")
    name = f"\0stalk-test-{uuid.uuid4().hex}"
    with pytest.raises(ValueError, match="no mode"):
        await create_unix_listener(name, identity=Identity.generate(), mode=0o600)
    async with serving_unix(name) as (bound, server_id, _):
        assert bound == name
        async with await connect_unix(name, server_id.public) as conn:
            assert conn.path == name
            await conn.send(Spack("abstract"))
            assert await conn.receive() == Spack("abstract")
    assert f"at unix:@{name[1:]} (" in lines(caplog)


def test_unix_addresses_as_messages_show_them() -> None:
    assert address_text("/run/stalk.sock") == "unix:/run/stalk.sock"
    assert address_text(("::1", 7413)) == "[::1]:7413"
    assert address_text(None) == "stream"
    assert unix_text("\0name") == "unix:@name"
    # A client may name its own socket: nothing in it can forge a log line.
    assert unix_text("/tmp/x\nforged line\x1b[2J") == "unix:/tmp/x\\nforged line\\x1b[2J"


# -- any anyio listener of byte streams ----------------------------------------------------


async def read_to_the_end(stream: ByteStream) -> None:
    """Read and drop until the stream ends (raises how it ended)."""
    while True:
        await stream.receive()


class MemoryListener(anyio.abc.Listener[ByteStream]):
    """An anyio listener of in-memory byte streams: :meth:`dial` is a client connecting."""

    def __init__(self) -> None:
        self._send, self._incoming = anyio.create_memory_object_stream[ByteStream](10)

    async def dial(self) -> ByteStream:
        """A client's end of a new stream; the listener accepts the other end."""
        client, server = byte_stream_pair()
        try:
            self._send.send_nowait(server)
        except anyio.ClosedResourceError:
            await client.aclose()
            await server.aclose()
            raise
        return client

    async def serve(
        self, handler: Callable[[ByteStream], Any], task_group: TaskGroup | None = None
    ) -> None:
        assert task_group is not None  # stalk always gives its own
        async for stream in self._incoming:
            task_group.start_soon(handler, stream)

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._incoming.aclose()


async def test_serving_from_any_anyio_listener_of_byte_streams() -> None:
    """A StreamListener serves stalk over the streams of a listener stalk knows nothing of."""
    seen: list[tuple[str | None, str | None]] = []

    async def handler(conn: Connection) -> None:
        seen.append((conn.host, conn.path))
        await echo(conn)

    memory = MemoryListener()
    server_id = Identity.generate()
    async with StreamListener(memory, server_id) as listener:
        assert listener.address is None
        assert repr(listener).startswith("<stalk.Listener stream ")
        async with anyio.create_task_group() as tg:
            assert await tg.start(listener.serve, handler) is None
            for pin in (None, server_id.public):
                conn = await Connection.wrap(
                    await memory.dial(), identity=Identity.generate(), peer=pin
                )
                async with conn:
                    await conn.send(Spack("in memory"))
                    assert await conn.receive() == Spack("in memory")
            # A stream that is not stalk fails its handshake alone; the listener goes on.
            async with await memory.dial() as stranger:
                await stranger.send(b"GET / HTTP/1.1\r\n\r\n")
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await read_to_the_end(stranger)
            conn = await Connection.wrap(await memory.dial(), identity=Identity.generate())
            async with conn:
                await conn.send(Spack("after"))
                assert await conn.receive() == Spack("after")
            await wait_until(lambda: listener.connections == 0)
            tg.cancel_scope.cancel()
    assert seen == [(None, None)] * 3
    with pytest.raises(anyio.ClosedResourceError):
        await memory.dial()  # closing the stalk listener closed the anyio one


async def test_the_caps_hold_over_any_anyio_listener() -> None:
    memory = MemoryListener()
    server_id = Identity.generate()
    config = Config(max_connections=1)
    async with StreamListener(memory, server_id, config=config) as listener:
        async with anyio.create_task_group() as tg:
            await tg.start(listener.serve, echo)
            conn = await Connection.wrap(await memory.dial(), identity=Identity.generate())
            async with conn:
                await wait_until(lambda: listener.connections == 1)
                with pytest.raises(PeerRefused) as info:
                    await Connection.wrap(await memory.dial(), identity=Identity.generate())
                assert info.value.code == CloseCode.BUSY
                assert info.value.reason == "too many connections"
            tg.cancel_scope.cancel()


async def test_stalk_inside_tls_from_anyio_s_tls_listener(tmp_path: Path) -> None:
    """TLS terminated by anyio, stalk inside it: the address and the caps still see TCP."""
    cert, key = make_certificate(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))
    seen: list[tuple[str | None, int | None]] = []

    async def handler(conn: Connection) -> None:
        seen.append((conn.host, conn.port))
        await echo(conn)

    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = tcp.extra(SocketAttribute.local_port)
    server_id = Identity.generate()
    config = Config(max_handshakes_per_address=1)
    async with StreamListener(TLSListener(tcp, server_tls), server_id, config=config) as listener:
        assert listener.address is None  # anyio's TLSListener does not say
        async with anyio.create_task_group() as tg:
            await tg.start(listener.serve, handler)
            stream = await anyio.connect_tcp("127.0.0.1", port, ssl_context=client_tls)
            async with await Connection.wrap(
                stream, identity=Identity.generate(), peer=server_id.public
            ) as conn:
                assert conn.host == "127.0.0.1"
                await conn.send(Spack("inside TLS"))
                assert await conn.receive() == Spack("inside TLS")
                local_port = conn.extra(SocketAttribute.local_port)
            # A client that stalls after TLS holds its address's one handshake slot.
            stalled = await anyio.connect_tcp("127.0.0.1", port, ssl_context=client_tls)
            try:
                await wait_until(lambda: listener.handshakes_by_address == {"127.0.0.1": 1})
                stream = await anyio.connect_tcp("127.0.0.1", port, ssl_context=client_tls)
                with pytest.raises(PeerRefused) as info:
                    await Connection.wrap(stream, identity=Identity.generate())
                assert info.value.code == CloseCode.BUSY
            finally:
                await anyio.aclose_forcefully(stalled)
            tg.cancel_scope.cancel()
    assert seen == [("127.0.0.1", local_port)]


# -- reading a socket stream's addresses ------------------------------------------------------


class _NotAnyiosOwn(ByteStream):
    """Another stream with the same attributes: :func:`remote_address`'s general path."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream

    @property
    def extra_attributes(self) -> Any:
        return self._stream.extra_attributes

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


@asynccontextmanager
async def _stream_pair(family: str, directory: Path) -> AsyncIterator[list[ByteStream]]:
    """A connected pair of anyio's socket streams of ``family``: [client's, server's]."""
    listener: Any
    if family == "unix":
        path = str(directory / "a.sock")
        listener = await anyio.create_unix_listener(path)
        dial: Callable[[], Any] = partial(anyio.connect_unix, path)
    else:
        host = "127.0.0.1" if family == "ipv4" else "::1"
        try:
            listener = (await anyio.create_tcp_listener(local_host=host)).listeners[0]
        except OSError:
            pytest.skip(f"cannot listen on {host}")
        dial = partial(anyio.connect_tcp, host, listener.extra(SocketAttribute.local_port))
    async with listener:
        client = await dial()
        server = await listener.accept()
        async with client, server:
            yield [client, server]


@pytest.mark.parametrize("family", ["ipv4", "ipv6", pytest.param("unix", marks=unix_only)])
async def test_socket_addresses_are_read_as_the_attributes_say(
    family: str, socket_dir: Path
) -> None:
    """Read from the socket itself, an anyio stream's addresses are its attributes' values.

    :func:`remote_address` and :func:`anyio_socket` skip anyio's attribute mapping for
    anyio's own socket streams (it costs about 10 us a call); the general path, through
    that mapping, must give the same, on both ends, open and closed.
    """
    async with _stream_pair(family, socket_dir) as streams:
        for stream in streams:
            assert anyio_socket(stream) is stream.extra(SocketAttribute.raw_socket)
            assert anyio_socket(_NotAnyiosOwn(stream)) is None
        expected = [remote_address(_NotAnyiosOwn(stream)) for stream in streams]
        assert [remote_address(stream) for stream in streams] == expected
        if family == "unix":  # the client is unnamed: both ends name the listener's path
            assert expected == [str(socket_dir / "a.sock")] * 2
        else:
            assert expected[0] == streams[1].extra(SocketAttribute.local_address)
            assert expected[1] == streams[0].extra(SocketAttribute.local_address)
        for stream in streams:
            await stream.aclose()
            assert remote_address(stream) == remote_address(_NotAnyiosOwn(stream))
