"""The examples/ scripts: driven in-process, and once as the documented command lines."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import itertools
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
from anyio.abc import ByteReceiveStream, Process, SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

import stalk
from helpers import serving, wait_until
from stalk import Config, Identity, Spack

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: Every test is bounded by this many seconds.
TIMEOUT = 30


def _load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` by path (examples/ is not a package)."""
    module_name = f"_stalk_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses & co. look their module up here
    spec.loader.exec_module(module)
    return module


echo_server = _load("echo_server")
echo_client = _load("echo_client")
kvstore = _load("kvstore")
file_transfer = _load("file_transfer")


@asynccontextmanager
async def echo_serving() -> AsyncIterator[tuple[str, int, Identity]]:
    identity = Identity.generate()
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(echo_server.serve, "127.0.0.1", 0, identity)
        yield host, port, identity
        tg.cancel_scope.cancel()


@asynccontextmanager
async def kv_serving(
    authorized_peers: Path | None = None, *, store: Any = None, config: Config | None = None
) -> AsyncIterator[tuple[str, int, Identity, Any]]:
    identity = Identity.generate()
    store = kvstore.KVStore() if store is None else store
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(
                kvstore.serve,
                "127.0.0.1",
                0,
                identity=identity,
                store=store,
                authorized_peers=authorized_peers,
                config=config,
            )
        )
        yield host, port, identity, store
        tg.cancel_scope.cancel()


def test_readme_lists_every_example_and_its_commands_parse() -> None:
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Examples\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `(\w+\.py)`(?:, `(\w+\.py)`)? \|", section, re.MULTILINE)
    files = {name for row in listed for name in row if name}
    assert files == {path.name for path in EXAMPLES.glob("*.py")}
    commands = re.findall(r"^    python examples/(\w+)\.py(.*?)\s*(?:#.*)?$", section, re.MULTILINE)
    assert {f"{name}.py" for name, _ in commands} == files
    key = str(Identity.generate().public)
    for name, args in commands:
        _load(name).parse_args(shlex.split(args.replace("stalk:...", key)))  # exits if not


# --------------------------------------------------------------------------- echo


@pytest.mark.parametrize("pin", [True, False], ids=["IK", "XX"])
async def test_echo_client_and_server(pin: bool) -> None:
    out, err = io.StringIO(), io.StringIO()
    with anyio.fail_after(TIMEOUT):
        async with echo_serving() as (host, port, server_id):
            replies = await echo_client.run_client(
                host,
                port,
                [["hello", "world"], ["x"], []],
                peer=str(server_id.public) if pin else None,
                out=out,
                err=err,
            )
    assert replies == [Spack("hello", "world"), Spack("x"), Spack()]
    assert out.getvalue().splitlines() == ["Spack('hello', 'world')", "Spack('x')", "Spack()"]
    if pin:
        assert err.getvalue() == ""
    else:  # XX: the client reports the key it learned
        assert str(server_id.public) in err.getvalue()
        assert server_id.public.fingerprint in err.getvalue()


async def test_echo_client_reads_stdin_lines() -> None:
    stdin = io.StringIO('one\n\n  two "three four"  \nbad "quote\nlast\n')
    out, err = io.StringIO(), io.StringIO()
    with anyio.fail_after(TIMEOUT):
        async with echo_serving() as (host, port, server_id):
            replies = await echo_client.run_client(
                host,
                port,
                echo_client.stdin_messages(stdin, err),
                peer=server_id.public,
                out=out,
                err=err,
            )
    assert replies == [Spack("one"), Spack("two", "three four"), Spack("last")]
    assert "skipping line" in err.getvalue()


async def test_echo_client_command_line(
    anyio_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with echo_serving() as (host, port, server_id):
            address = f"{host}:{port}"
            # main() calls anyio.run, so it runs in a worker thread with its own event loop.
            common = ["--address", address, "--backend", anyio_backend]
            argv = [*common, "--peer", str(server_id.public), "a", "b c"]
            assert await anyio.to_thread.run_sync(echo_client.main, argv) == 0
            assert capsys.readouterr().out == "Spack('a', 'b c')\n"

            wrong = [*common, "--peer", str(Identity.generate().public), "a"]
            assert await anyio.to_thread.run_sync(echo_client.main, wrong) == 1
            captured = capsys.readouterr()
            assert captured.out == ""
            assert "does not hold the pinned key" in captured.err


async def test_echo_server_command_line_reports_a_busy_address(
    anyio_backend: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with echo_serving() as (host, port, _):
            argv = ["--address", f"{host}:{port}", "--identity", str(tmp_path / "k")]
            argv += ["--backend", anyio_backend]
            assert await anyio.to_thread.run_sync(echo_server.main, argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"cannot listen on {host}:{port}" in captured.err
    assert (tmp_path / "k").exists()


def test_load_or_create_identity_persists(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "server.key"
    created = echo_server.load_or_create_identity(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys" / "server.key.pub").read_text() == f"{created.public}\n"
    assert echo_server.load_or_create_identity(path) == created


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:7000", ("127.0.0.1", 7000)), ("[::1]:0", ("::1", 0)), ("h:65535", ("h", 65535))],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    for module in (echo_server, echo_client, kvstore, file_transfer):
        assert module.parse_address(text) == expected
    assert kvstore.format_address(*expected) == text
    assert file_transfer.format_address(*expected) == text


@pytest.mark.parametrize("text", ["7000", ":7000", "host:", "host:port", "host:65536", "h:-1"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        kvstore.parse_address(text)


# --------------------------------------------------------------------------- kv store


async def test_kv_clients_concurrently_with_pipelined_requests() -> None:
    clients, keys_each = 5, 20

    async def work(n: int, host: str, port: int, server_id: Identity) -> None:
        keys = [f"c{n}/k{i:02}" for i in range(keys_each)]
        async with kvstore.KVClient(host, port, peer=server_id.public) as kv:
            # Every call in a task group is in flight at once on the one connection.
            async with anyio.create_task_group() as tg:
                for i, key in enumerate(keys):
                    tg.start_soon(kv.put, key, f"{n}:{i}".encode())
            got: dict[str, bytes | None] = {}

            async def get(key: str) -> None:
                got[key] = await kv.get(key)

            async with anyio.create_task_group() as tg:
                for key in [*keys, f"c{n}/missing"]:
                    tg.start_soon(get, key)
            assert got == {
                **{key: f"{n}:{i}".encode() for i, key in enumerate(keys)},
                f"c{n}/missing": None,
            }
            assert await kv.list(f"c{n}/") == keys

            deleted: dict[str, bytes | None] = {}

            async def delete(key: str) -> None:
                deleted[key] = await kv.delete(key)

            async with anyio.create_task_group() as tg:
                for key in keys[::2]:
                    tg.start_soon(delete, key)
            assert deleted == {key: f"{n}:{keys.index(key)}".encode() for key in keys[::2]}
            assert await kv.list(f"c{n}/") == keys[1::2]
            assert await kv.get(keys[0]) is None
            assert await kv.delete(keys[0]) is None

    with anyio.fail_after(TIMEOUT):
        async with kv_serving() as (host, port, server_id, store):
            async with anyio.create_task_group() as tg:
                for n in range(clients):
                    tg.start_soon(work, n, host, port, server_id)
            async with kvstore.KVClient(host, port) as kv:  # XX
                assert kv.peer == server_id.public
                assert len(await kv.list()) == clients * keys_each // 2
    assert store.storage.data == {
        f"c{n}/k{i:02}": f"{n}:{i}".encode() for n in range(clients) for i in range(1, keys_each, 2)
    }


async def test_kv_server_answers_a_pipelined_burst_in_order() -> None:
    """Many requests written at once (one flush) before reading any response."""
    count = 50
    with anyio.fail_after(TIMEOUT):
        async with kv_serving() as (host, port, server_id, _):
            async with await stalk.connect(host, port, server_id.public) as conn:
                for i in range(count):
                    conn.queue(Spack(i, "PUT", f"k{i}", bytes([i])))
                for i in range(count):
                    conn.queue(Spack(1000 + i, "GET", f"k{i}"))
                conn.queue(Spack(2000, "LIST", "k4"))
                await conn.flush()
                responses = [await conn.receive() for _ in range(2 * count + 1)]
    assert responses[:count] == [Spack(i, "OK", None) for i in range(count)]
    assert responses[count:-1] == [Spack(1000 + i, "OK", bytes([i])) for i in range(count)]
    assert responses[-1] == Spack(2000, "OK", ["k4", *(f"k4{i}" for i in range(10))])


async def test_kv_client_matches_responses_by_id() -> None:
    """A server that answers a batch of requests in reverse order."""
    batch = 10

    async def reversing(conn: stalk.Connection) -> None:
        requests = [await conn.receive() for _ in range(batch)]
        for request in reversed(requests):
            key = request[2]
            assert isinstance(key, str)
            await conn.send(Spack(request[0], "OK", f"value of {key}".encode()))
        async for _ in conn:
            pass

    identity = Identity.generate()
    got: dict[str, bytes | None] = {}
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(
                partial(stalk.listen, "127.0.0.1", 0, reversing, identity=identity)
            )
            async with kvstore.KVClient(host, port, peer=identity.public) as kv:

                async def get(key: str) -> None:
                    got[key] = await kv.get(key)

                # Only concurrent (pipelined) requests can complete: the server answers
                # none before it has all of them.
                async with anyio.create_task_group() as gets:
                    for i in range(batch):
                        gets.start_soon(get, f"k{i}")
            tg.cancel_scope.cancel()
    assert got == {f"k{i}": f"value of k{i}".encode() for i in range(batch)}


async def test_kv_client_ignores_the_late_answer_to_a_cancelled_request() -> None:
    async def slow(conn: stalk.Connection) -> None:
        async for request in conn:
            await anyio.sleep(0.3)  # the point: a slow server
            await conn.send(Spack(request[0], "OK", repr(request[2]).encode()))

    identity = Identity.generate()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(
                partial(stalk.listen, "127.0.0.1", 0, slow, identity=identity)
            )
            async with kvstore.KVClient(host, port, peer=identity.public) as kv:
                with anyio.move_on_after(0.05) as scope:
                    await kv.get("first")
                assert scope.cancelled_caught
                assert await kv.get("second") == b"'second'"
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("pin", [True, False], ids=["IK", "XX"])
async def test_kv_authorized_peers(tmp_path: Path, pin: bool) -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    authorized = tmp_path / "authorized_peers"
    authorized.write_text(f"# who may use the store\n{alice.public} alice\n")
    with anyio.fail_after(TIMEOUT):
        async with kv_serving(authorized) as (host, port, server_id, _):
            peer = server_id.public if pin else None
            with pytest.raises(stalk.PeerRefused) as info:
                async with kvstore.KVClient(host, port, peer=peer, identity=mallory):
                    pass
            assert info.value.code == stalk.CloseCode.NOT_AUTHORIZED
            with pytest.raises(stalk.PeerRefused):
                async with kvstore.KVClient(host, port, peer=peer):  # a fresh key
                    pass
            async with kvstore.KVClient(host, port, peer=peer, identity=alice) as kv:
                await kv.put("k", b"v")
                assert await kv.get("k") == b"v"


async def test_kv_missing_authorized_peers_file_fails_to_start(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT), pytest.raises(stalk.IdentityFileError):
        await kvstore.serve(
            "127.0.0.1", 0, identity=Identity.generate(), authorized_peers=tmp_path / "nope"
        )


async def test_kv_malformed_requests_get_errors_and_the_server_keeps_serving() -> None:
    bad: list[tuple[Spack, int | None, str]] = [
        (Spack(), None, "empty request"),
        (Spack("1", "GET", "k"), None, "request id must be an int"),
        (Spack(True, "GET", "k"), None, "request id must be an int"),
        (Spack(1.0, "GET", "k"), None, "request id must be an int"),
        (Spack(1), 1, "operation must be a str"),
        (Spack(2, b"GET", "k"), 2, "operation must be a str"),
        (Spack(3, "FROB", "k"), 3, "unknown operation 'FROB'"),
        (Spack(4, "get", "k"), 4, "unknown operation 'get'"),
        (Spack(5, "X" * 10_000), 5, "unknown operation 'XXXX"),
        (Spack(6, "PUT", "k", "not bytes"), 6, "value must be bytes, not str"),
        (Spack(7, "PUT", "k", bytearray(b"v")), None, ""),  # arrives as bytes: valid
        (Spack(8, "PUT", "k"), 8, "PUT takes 2 argument(s), got 1"),
        (Spack(9, "GET", b"k"), 9, "key must be a str, not bytes"),
        (Spack(10, "GET", "k", "extra"), 10, "GET takes 1 argument(s), got 2"),
        (Spack(11, "DELETE"), 11, "DELETE takes 1 argument(s), got 0"),
        (Spack(12, "LIST", 7), 12, "key must be a str, not int"),
        (Spack(13, "LIST", "a", "b"), 13, "LIST takes 0 or 1 argument(s), got 2"),
        (Spack(14, "GET", "k" * 5000), 14, "longer than 1024"),
        (Spack(15, "PUT", "k", {"nested": [b"v"]}), 15, "value must be bytes, not dict"),
        (Spack(-(2**63), "GET", None), -(2**63), "key must be a str, not NoneType"),
    ]
    with anyio.fail_after(TIMEOUT):
        async with kv_serving() as (host, port, server_id, store):
            async with kvstore.KVClient(host, port, peer=server_id.public) as good:
                await good.put("before", b"1")
                async with await stalk.connect(host, port, server_id.public) as conn:
                    for request, _, _ in bad:
                        conn.queue(request)
                    await conn.flush()
                    for request, expected_id, message in bad:
                        response = await conn.receive()
                        if not message:
                            assert response == Spack(request[0], "OK", None)
                            continue
                        assert response[:2] == Spack(expected_id, "ERROR"), request
                        assert isinstance(response[2], str)
                        assert message in response[2]
                        assert len(response[2]) < 200
                    # The same connection still works.
                    await conn.send(Spack(100, "GET", "k"))
                    assert await conn.receive() == Spack(100, "OK", b"v")
                # The well-behaved client was not disturbed, and the typed client surfaces
                # ERROR responses as exceptions without losing its connection.
                assert await good.get("before") == b"1"
                with pytest.raises(kvstore.KVRequestError, match="unknown operation"):
                    await good.request("FROB")
                with pytest.raises(kvstore.KVRequestError, match="value must be bytes"):
                    await good.request("PUT", "k", "str")
                assert await good.list() == ["before", "k"]
    assert store.storage.data == {"before": b"1", "k": b"v"}


async def _drain(stream: ByteReceiveStream) -> None:
    """Read until the peer closes (which raises)."""
    while True:
        await stream.receive()


async def test_kv_misbehaving_connections_do_not_affect_others() -> None:
    with anyio.fail_after(TIMEOUT):
        async with kv_serving() as (host, port, server_id, _):
            async with kvstore.KVClient(host, port, peer=server_id.public) as good:
                await good.put("k", b"v")
                # Not stalk at all.
                async with await anyio.connect_tcp(host, port) as raw:
                    await raw.send(b"GET / HTTP/1.1\r\n\r\n" * 10)
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
                        await _drain(raw)
                # Pipelines requests, then aborts with an error CLOSE without reading any
                # response.
                conn = await stalk.connect(host, port, server_id.public)
                for i in range(100):
                    conn.queue(Spack(i, "PUT", f"junk{i}", b"x" * 1000))
                await conn.flush()
                await conn.close(code=stalk.CloseCode.INTERNAL_ERROR, reason="crash")
                # Starts a handshake and goes silent while the others carry on.
                async with await anyio.connect_tcp(host, port) as silent:
                    await silent.send(b"\x00")
                    assert await good.get("k") == b"v"
                    assert await good.delete("k") == b"v"
                    async with kvstore.KVClient(host, port, peer=server_id.public) as other:
                        assert await other.get("k") is None


async def test_kv_response_larger_than_the_client_accepts() -> None:
    small = stalk.Config(max_message_size=1024)
    with anyio.fail_after(TIMEOUT):
        async with kv_serving() as (host, port, server_id, _):
            async with kvstore.KVClient(host, port, peer=server_id.public) as kv:
                await kv.put("big", b"x" * 4096)
                await kv.put("small", b"y")
            async with kvstore.KVClient(host, port, peer=server_id.public, config=small) as kv:
                with pytest.raises(kvstore.KVRequestError, match="exceeds your message limit"):
                    await kv.get("big")
                assert await kv.get("small") == b"y"


async def test_kv_client_fails_pending_requests_when_the_server_goes_away() -> None:
    async def hang_up_after_one(conn: stalk.Connection) -> None:
        await conn.receive()

    identity = Identity.generate()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(
                partial(stalk.listen, "127.0.0.1", 0, hang_up_after_one, identity=identity)
            )
            async with kvstore.KVClient(host, port, peer=identity.public) as kv:
                with pytest.raises(kvstore.KVConnectionError, match="closed the connection"):
                    await kv.get("k")
                with pytest.raises(kvstore.KVConnectionError):
                    await kv.put("k", b"v")
            tg.cancel_scope.cancel()


async def test_kv_client_rejects_responses_to_requests_never_sent() -> None:
    async def confused(conn: stalk.Connection) -> None:
        request = await conn.receive()
        await conn.send(Spack(request[0], "OK", None, "extra"))
        async for _ in conn:
            pass

    identity = Identity.generate()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(
                partial(stalk.listen, "127.0.0.1", 0, confused, identity=identity)
            )
            async with kvstore.KVClient(host, port, peer=identity.public) as kv:
                with pytest.raises(kvstore.KVConnectionError, match="broke the protocol"):
                    await kv.get("k")
            tg.cancel_scope.cancel()


async def test_kv_client_errors_propagate_unwrapped() -> None:
    with anyio.fail_after(TIMEOUT):
        async with kv_serving() as (host, port, server_id, _):
            with pytest.raises(KeyError):
                async with kvstore.KVClient(host, port, peer=server_id.public):
                    raise KeyError("mine")
            with pytest.raises(kvstore.KVRequestError):
                async with kvstore.KVClient(host, port, peer=server_id.public) as kv:
                    await kv.request("NOPE")


# --------------------------------------------------------------------------- kv streams


class _Relay:
    """A TCP relay in front of a server that counts the bytes it forwards each way.

    A test waits for a direction to pass a mark (an event, not a clock), and reads how
    many bytes went by between two points of its own: progress measured in bytes.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.forwarded = {"c2s": 0, "s2c": 0}
        self._marks: list[tuple[str, int, anyio.Event]] = []

    def mark(self, direction: str, count: int) -> anyio.Event:
        """An event set once ``count`` more bytes than now were forwarded in ``direction``."""
        event = anyio.Event()
        self._marks.append((direction, self.forwarded[direction] + count, event))
        return event

    async def _pump(self, source: SocketStream, sink: SocketStream, direction: str) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            async for data in source:
                await sink.send(data)
                self.forwarded[direction] += len(data)
                for marked, count, event in self._marks:
                    if marked == direction and self.forwarded[direction] >= count:
                        event.set()
            await sink.send_eof()

    async def relay(self, client: SocketStream) -> None:
        async with client, await anyio.connect_tcp(*self.target) as server:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, server, "c2s")
                tg.start_soon(self._pump, server, client, "s2c")


@asynccontextmanager
async def relaying(target: tuple[str, int]) -> AsyncIterator[tuple[_Relay, int]]:
    """A :class:`_Relay` to ``target`` listening on 127.0.0.1; yields it and its port."""
    relay = _Relay(target)
    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, relay.relay)
        yield relay, listener.extra(SocketAttribute.local_port)
        tg.cancel_scope.cancel()


#: The large value of the fairness test, and how far into it the small requests start.
BIG = 12 << 20
BIG_STARTED = 1 << 20
#: The most bytes of the large value a small request may wait behind: a Noise message,
#: what the writer had already encrypted (at most about 2 MiB) and what credit lets be in
#: flight. Behind the whole value it would be over 10 MiB.
SMALL_WAITS_AT_MOST = 3 << 20
#: Windows small next to the large value, so that what TCP's buffers hold in flight (which
#: the default 4 MiB / 16 MiB windows would let fill) does not hide the writer's turns.
SMALL_WINDOWS = Config(max_channels=100, channel_window=256 << 10, connection_window=1 << 20)


@pytest.mark.parametrize("operation", ["PUT", "GET"])
async def test_kv_a_large_value_in_flight_does_not_hold_up_small_requests(operation: str) -> None:
    big = bytes(range(256)) * (BIG // 256)
    direction = "c2s" if operation == "PUT" else "s2c"
    behind: list[int] = []
    with anyio.fail_after(TIMEOUT):
        async with (
            kv_serving(config=SMALL_WINDOWS) as (host, port, server_id, store),
            relaying((host, port)) as (relay, relay_port),
            kvstore.KVClient(host, relay_port, peer=server_id.public, config=SMALL_WINDOWS) as kv,
        ):
            await kv.put("small", b"s")
            if operation == "GET":
                await kv.put("big", big)
            started = relay.mark(direction, BIG_STARTED)
            big_done = anyio.Event()

            async def big_request() -> None:
                if operation == "PUT":
                    await kv.put("big", big)
                else:
                    assert await kv.get("big") == big
                big_done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(big_request)
                await started.wait()
                # The large value is on its way: small requests, one after the other, each
                # get their answer after at most a few MiB of it, long before its end.
                for _ in range(3):
                    before = relay.forwarded[direction]
                    assert await kv.get("small") == b"s"
                    behind.append(relay.forwarded[direction] - before)
                    assert not big_done.is_set()
            assert kv.open_streams == 2  # the large value's stream, and one more
    assert store.storage.data["big"] == big
    assert max(behind) < SMALL_WAITS_AT_MOST, behind


class _GatedStorage(kvstore.MemoryStorage):  # type: ignore[misc,name-defined]
    """A memory store whose PUTs of the key ``"held"`` wait until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = anyio.Event()
        self.release = anyio.Event()

    async def put(self, key: str, value: bytes) -> None:
        if key == "held":
            self.holding.set()
            await self.release.wait()
        await super().put(key, value)


async def test_kv_a_request_the_server_holds_holds_up_only_its_stream() -> None:
    storage = _GatedStorage()
    with anyio.fail_after(TIMEOUT):
        async with (
            kv_serving(store=kvstore.KVStore(storage)) as (host, port, server_id, _),
            kvstore.KVClient(host, port, peer=server_id.public) as kv,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(kv.put, "held", b"1")
            await storage.holding.wait()
            # On one stream these would wait for the held PUT: the server answers a
            # stream's requests in order. On the client's other streams they do not.
            async with anyio.create_task_group() as others:
                for i in range(5):
                    others.start_soon(kv.put, f"k{i}", b"v")
            assert await kv.list("k") == [f"k{i}" for i in range(5)]
            assert "held" not in storage.data
            storage.release.set()
        assert storage.data["held"] == b"1"


async def test_kv_server_serves_each_channel_in_order_and_pipelined() -> None:
    """Raw channels, each a pipelined burst of requests, answered in order per channel."""
    config = stalk.Config(max_channels=0)
    with anyio.fail_after(TIMEOUT):
        async with (
            kv_serving() as (host, port, server_id, store),
            await stalk.connect(host, port, server_id.public, config=config) as conn,
        ):
            assert conn.channels
            channels = [await conn.open_channel() for _ in range(3)]
            for n, channel in enumerate(channels):
                for i in range(20):
                    channel.queue(Spack(i, "PUT", f"c{n}/{i:02}", bytes([n, i])))
                channel.queue(Spack(100, "LIST", f"c{n}/"))
            await conn.flush()
            for n, channel in enumerate(channels):
                responses = [await channel.receive() for _ in range(21)]
                assert responses[:20] == [Spack(i, "OK", None) for i in range(20)]
                assert responses[20] == Spack(100, "OK", [f"c{n}/{i:02}" for i in range(20)])
                await channel.aclose()
            # The connection's own stream is served as well.
            await conn.send(Spack(7, "GET", "c2/19"))
            assert await conn.receive() == Spack(7, "OK", bytes([2, 19]))
    assert len(store.storage.data) == 60


async def test_kv_client_matches_responses_by_id_on_each_channel() -> None:
    """A server that answers every stream's requests in reverse, once all have come."""
    streams, batch = 3, 12
    arrived: list[tuple[stalk.Connection | stalk.Channel, Spack]] = []
    all_arrived = anyio.Event()

    async def reversing(stream: Any) -> None:
        async for request in stream:
            arrived.append((stream, request))
            if len(arrived) == batch:
                all_arrived.set()
                for to, answered in reversed(arrived):
                    await to.send(Spack(answered[0], "OK", f"value of {answered[2]}".encode()))

    got: dict[str, bytes | None] = {}
    config = stalk.Config(max_channels=10)
    with anyio.fail_after(TIMEOUT):
        async with serving(reversing, config=config, channel_handler=reversing) as (
            host,
            port,
            identity,
        ):
            async with kvstore.KVClient(host, port, peer=identity.public, streams=streams) as kv:

                async def get(key: str) -> None:
                    got[key] = await kv.get(key)

                async with anyio.create_task_group() as gets:
                    for i in range(batch):
                        gets.start_soon(get, f"k{i}")
                assert kv.open_streams == streams
    assert got == {f"k{i}": f"value of k{i}".encode() for i in range(batch)}
    # Each stream carried several requests at once, with ids of its own.
    ids = sorted(request[0] for _, request in arrived)
    assert ids == sorted(list(range(1, batch // streams + 1)) * streams)


async def test_kv_client_a_reset_stream_fails_only_its_requests() -> None:
    store = kvstore.KVStore()
    holding, release = anyio.Event(), anyio.Event()

    async def hold_then_serve(conn: stalk.Connection) -> None:
        await holding_first(conn)
        await store.handle(conn)

    async def holding_first(conn: stalk.Connection) -> None:
        request = await conn.receive()
        holding.set()
        await release.wait()
        await conn.send(await store.execute(request))

    async def reset_at_once(channel: stalk.Channel) -> None:
        await channel.receive()
        await channel.reset(0x1000, "not today")

    config = stalk.Config(max_channels=10)
    with anyio.fail_after(TIMEOUT):
        async with (
            serving(hold_then_serve, config=config, channel_handler=reset_at_once) as (
                host,
                port,
                identity,
            ),
            kvstore.KVClient(host, port, peer=identity.public) as kv,
            anyio.create_task_group() as tg,
        ):
            first_done = anyio.Event()

            async def put_first() -> None:
                await kv.put("first", b"1")
                first_done.set()

            tg.start_soon(put_first)  # on channel 0, held
            await holding.wait()
            with pytest.raises(kvstore.KVConnectionError, match=r"reset the stream.*not today"):
                await kv.get("second")  # on a channel, reset
            assert kv.open_streams == 1
            release.set()
            await first_done.wait()
            await kv.put("third", b"3")  # channel 0 again
            assert await kv.get("first") == b"1"
            assert await kv.get("third") == b"3"


def test_kv_client_needs_a_stream() -> None:
    with pytest.raises(ValueError, match="at least one stream"):
        kvstore.KVClient("127.0.0.1", 1, streams=0)


# --------------------------------------------------------------------------- kv storage


async def test_kv_sqlite_storage_keeps_what_memory_keeps(tmp_path: Path) -> None:
    """The same requests against both storages give the same answers, and sqlite's last."""
    keys = ["a", "ab", "a\x00b", "b", "ключ", "ключи", "😀", "\u00e9", "e\u0301", "", "z" * 1024]
    path = tmp_path / "kv.sqlite"

    async def exercise(kv: Any) -> list[object]:
        answers: list[object] = []
        for i, key in enumerate(keys):
            await kv.put(key, f"{i}".encode() * i)
        await kv.put("ab", b"replaced")
        answers.append(await kv.delete("b"))
        answers.append(await kv.delete("b"))
        answers += [await kv.get(key) for key in keys]
        for prefix in ["", "a", "ab", "ключ", "\u00e9", "\U0010ffff", "a\x00"]:
            answers.append(await kv.list(prefix))
        return answers

    sqlite = await kvstore.SqliteStorage.open(path)
    try:
        with anyio.fail_after(TIMEOUT):
            async with kv_serving() as (host, port, server_id, _):
                async with kvstore.KVClient(host, port, peer=server_id.public) as kv:
                    expected = await exercise(kv)
            async with kv_serving(store=kvstore.KVStore(sqlite)) as (host, port, server_id, _):
                async with kvstore.KVClient(host, port, peer=server_id.public) as kv:
                    assert await exercise(kv) == expected
    finally:
        await sqlite.aclose()
    # Another process would read the same from the file, which is in WAL mode.
    reopened = await kvstore.SqliteStorage.open(path)
    try:
        assert await reopened.keys("") == sorted(set(keys) - {"b"})
        assert await reopened.get("ab") == b"replaced"
    finally:
        await reopened.aclose()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_kv_sqlite_storage_refuses_what_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "text").write_text("not a database, and longer than a header " * 10)
    with pytest.raises(kvstore.StorageError, match="not a database"):
        await kvstore.SqliteStorage.open(tmp_path / "text")
    with pytest.raises(kvstore.StorageError, match="cannot open the database"):
        await kvstore.SqliteStorage.open(tmp_path / "missing" / "kv.sqlite")
    storage = await kvstore.SqliteStorage.open(tmp_path / "kv.sqlite")
    await storage.aclose()
    await storage.aclose()
    with pytest.raises(kvstore.StorageError, match="closed"):
        await storage.get("k")


async def test_kv_a_failing_storage_is_an_error_answer_not_a_broken_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Failing(kvstore.MemoryStorage):  # type: ignore[misc,name-defined]
        async def put(self, key: str, value: bytes) -> None:
            raise kvstore.StorageError("disk full: /secret/path")

    with anyio.fail_after(TIMEOUT):
        async with (
            kv_serving(store=kvstore.KVStore(Failing())) as (host, port, server_id, store),
            kvstore.KVClient(host, port, peer=server_id.public) as kv,
        ):
            with pytest.raises(kvstore.KVRequestError, match="could not carry it out") as info:
                await kv.put("k", b"v")
            assert "secret" not in str(info.value)  # the operator's, not the client's
            assert await kv.get("k") is None
    assert store.storage.data == {}
    assert "disk full: /secret/path" in caplog.text


async def test_kvstore_serve_reports_a_bad_data_file(
    tmp_path: Path, anyio_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "text").write_text("not a database, and longer than a header " * 10)
    argv = ["serve", "--data", str(tmp_path / "text"), "--address", "127.0.0.1:0"]
    argv += ["--identity", str(tmp_path / "server.key"), "--backend", anyio_backend]
    assert await anyio.to_thread.run_sync(kvstore.main, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # it never listened
    assert "kvstore: cannot open the database" in captured.err
    assert "not a database" in captured.err


# --------------------------------------------------------------------------- file transfer


@asynccontextmanager
async def receiving(receiver: Any) -> AsyncIterator[tuple[str, int, Identity]]:
    identity = Identity.generate()
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(file_transfer.serve, "127.0.0.1", 0, identity=identity, receiver=receiver)
        )
        yield host, port, identity
        tg.cancel_scope.cancel()


@asynccontextmanager
async def sending_to(receiver: Any) -> AsyncIterator[stalk.Connection]:
    """A sender's connection to ``receiver``, served on 127.0.0.1."""
    async with (
        receiving(receiver) as (host, port, identity),
        await stalk.connect(
            host, port, identity.public, config=file_transfer.SENDER_CONFIG
        ) as conn,
    ):
        yield conn


#: The large file's size, and the most of it a message may wait behind once sent.
LARGE_FILE = 16 << 20
MESSAGE_WAITS_AT_MOST = 3 << 20


async def test_file_transfer_messages_flow_while_a_large_file_streams(tmp_path: Path) -> None:
    data = os.urandom(LARGE_FILE)
    source = tmp_path / "large.bin"
    source.write_bytes(data)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    every = file_transfer.REPORT_EVERY
    arrivals: list[tuple[str, int]] = []  # each message, and how much of the file was in

    class Recording(file_transfer.Receiver):  # type: ignore[misc,name-defined]
        def message(self, conn: stalk.Connection, text: str) -> None:
            super().message(conn, text)
            arrivals.append((text, sum(t.received for t in self.transfers) or -1))

    reports: list[int] = []
    reported = [anyio.Event() for _ in range(3)]

    class Watching(file_transfer.Sender):  # type: ignore[misc,name-defined]
        def progress(self, path: Path, received: int, size: int) -> None:
            super().progress(path, received, size)
            reports.append(received)
            reported[min(len(reports), 3) - 1].set()

    async def messages() -> AsyncIterator[str]:
        # Message k goes once the receiver has reported k MiB of the file.
        for k in range(3):
            await reported[k].wait()
            yield f"message {k + 1}"

    out, err = io.StringIO(), io.StringIO()
    with anyio.fail_after(TIMEOUT):
        async with sending_to(Recording(inbox, out=out)) as conn:
            [sent] = await Watching(conn, err=err).send([source], messages=messages())
    assert sent.ok, sent.error
    assert (sent.size, sent.sha256) == (LARGE_FILE, hashlib.sha256(data).hexdigest())
    assert (inbox / "large.bin").read_bytes() == data
    assert [path.name for path in inbox.iterdir()] == ["large.bin"]  # no .part left
    # Each message arrived while the file streamed, a few MiB at most after it was sent.
    assert [text for text, _ in arrivals] == ["message 1", "message 2", "message 3"]
    for k, (_, received) in enumerate(arrivals):
        assert (k + 1) * every <= received < (k + 1) * every + MESSAGE_WAITS_AT_MOST, arrivals
    assert reports == sorted(reports)
    assert reports[-1] == LARGE_FILE
    assert len(reports) == LARGE_FILE // every + 1  # every MiB, and the end
    assert f"stored large.bin: {LARGE_FILE} bytes, SHA-256 {sent.sha256}" in out.getvalue()
    assert "large.bin: 100% of 16.0 MiB" in err.getvalue()


async def test_file_transfer_several_files_at_once(tmp_path: Path) -> None:
    sizes = {"a.bin": 3 * file_transfer.CHUNK_SIZE + 1, "empty": 0, "b.txt": 100_000}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(os.urandom(size))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    paths = [tmp_path / name for name in sizes]
    with anyio.fail_after(TIMEOUT):
        async with sending_to(file_transfer.Receiver(inbox, out=io.StringIO())) as conn:
            results = await file_transfer.Sender(conn, err=io.StringIO()).send(paths)
            assert [result.path for result in results] == paths
            assert all(result.ok for result in results), results
    for path in paths:
        assert (inbox / path.name).read_bytes() == path.read_bytes()


async def _offer(channel: stalk.Channel, spacks: list[Spack]) -> Spack:
    """Send ``spacks`` on ``channel`` as a file and return the receiver's answer."""
    for spack in spacks:
        await channel.send(spack)
    await channel.send_eof()
    return await channel.receive()


async def test_file_transfer_refuses_what_it_should_not_store(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "taken").write_bytes(b"already here")
    out = io.StringIO()
    receiver = file_transfer.Receiver(inbox, max_size=1000, out=out)
    code = file_transfer.ResetCode
    data = b"abc"
    digest = hashlib.sha256(data).digest()
    cases: list[tuple[list[Spack], int, str]] = [
        ([Spack("FILE", "../x", 3)], code.REFUSED, "not a plain file name"),
        ([Spack("FILE", "a/b", 3)], code.REFUSED, "not a plain file name"),
        ([Spack("FILE", "a\\b", 3)], code.REFUSED, "not a plain file name"),
        ([Spack("FILE", ".hidden", 3)], code.REFUSED, "not a plain file name"),
        ([Spack("FILE", "x.part", 3)], code.REFUSED, "not a plain file name"),
        ([Spack("FILE", "\x1b[2J", 3)], code.REFUSED, "not a plain file name"),
        ([Spack("FILE", "", 3)], code.REFUSED, "not a plain file name"),
        ([Spack("FILE", "x" * 201, 3)], code.REFUSED, "not a plain file name"),
        ([Spack("FILE", "taken", 3)], code.REFUSED, "a file named 'taken' exists"),
        ([Spack("FILE", "x", 1001)], code.REFUSED, "the limit is 1000"),
        ([Spack("FILE", "x", -1)], code.REFUSED, "the limit is 1000"),
        ([Spack("FILE", b"x", 3)], code.BAD_REQUEST, "must be a str"),
        ([Spack("FILE", "x", True)], code.BAD_REQUEST, "expected ('FILE', name, size)"),
        ([Spack("PUT", "x", 3)], code.BAD_REQUEST, "expected ('FILE', name, size)"),
        ([], code.BAD_REQUEST, "ended before the file"),
        ([Spack("FILE", "x", 3), Spack("data")], code.BAD_REQUEST, "expected (data,)"),
        ([Spack("FILE", "x", 3), Spack(data)], code.BAD_REQUEST, "ended before the file"),
        ([Spack("FILE", "x", 2), Spack(data)], code.CORRUPT, "more than the 2 bytes"),
        ([Spack("FILE", "x", 5), Spack(data), Spack("END", digest)], code.CORRUPT, "3 of the 5"),
        ([Spack("FILE", "x", 3), Spack(data), Spack("END", bytes(32))], code.CORRUPT, "SHA-256"),
    ]
    with anyio.fail_after(TIMEOUT):
        async with sending_to(receiver) as conn:
            # Each on a channel of its own, one connection: a reset channel harms no other.
            for spacks, expected_code, reason in cases:
                channel = await conn.open_channel()
                with pytest.raises(stalk.ChannelReset) as info:
                    await _offer(channel, spacks)
                assert (info.value.code, spacks) == (expected_code, spacks)
                assert reason in info.value.reason, (info.value.reason, spacks)
                await channel.aclose()
            # Through the Sender: what a refusal gives, and a file stored after all that.
            (tmp_path / "taken").write_bytes(b"another")
            (tmp_path / "x").write_bytes(data)
            sender = file_transfer.Sender(conn, err=io.StringIO())
            taken, x = await sender.send([tmp_path / "taken", tmp_path / "x"])
    assert taken.error == "refused: a file named 'taken' exists"
    assert x.ok
    assert {path.name: path.read_bytes() for path in inbox.iterdir()} == {
        "taken": b"already here",
        "x": data,
    }
    assert "not stored: 'taken': refused: a file named 'taken' exists" in out.getvalue()
    assert "not stored: a file: refused: '../x' is not a plain file name" in out.getvalue()


async def test_file_transfer_a_sender_that_fails_leaves_nothing_behind(tmp_path: Path) -> None:
    """A file the sender cannot read: its channel is reset, the receiver drops the part."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    unreadable = tmp_path / "a-directory"
    unreadable.mkdir()
    receiver = file_transfer.Receiver(inbox, out=io.StringIO())
    with anyio.fail_after(TIMEOUT):
        async with sending_to(receiver) as conn:
            with pytest.raises(IsADirectoryError):
                await file_transfer.Sender(conn).send([unreadable])
            await wait_until(lambda: not receiver.transfers)
    assert list(inbox.iterdir()) == []


async def test_file_transfer_needs_a_receiver_with_channels(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with anyio.fail_after(TIMEOUT):
        async with (
            serving() as (host, port, identity),
            await stalk.connect(host, port, identity.public) as conn,
        ):
            with pytest.raises(file_transfer.TransferError, match="does not offer channels"):
                await file_transfer.Sender(conn).send([tmp_path / "f"])


# --------------------------------------------------------------------------- as scripts


def _script_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "STALK_HOME": str(tmp_path / "home")}


async def run_script(
    tmp_path: Path, backend: str, name: str, *args: str
) -> subprocess.CompletedProcess[bytes]:
    """``python examples/<name>.py ARGS --backend BACKEND`` in ``tmp_path``, to its end."""
    with anyio.fail_after(TIMEOUT):
        return await anyio.run_process(
            [sys.executable, str(EXAMPLES / f"{name}.py"), *args, "--backend", backend],
            check=False,
            cwd=tmp_path,
            env=_script_env(tmp_path),
        )


@asynccontextmanager
async def script_server(
    tmp_path: Path, backend: str, name: str, *args: str
) -> AsyncIterator[tuple[Process, dict[str, str]]]:
    """A server example in a process of its own, on a free port of 127.0.0.1.

    Yields the process and the banner it printed (``address``, ``key``, ``fingerprint``);
    stops it with SIGTERM at the end unless it already ended (the caller checks its
    ``returncode``: 0 after a clean stop). Its stderr goes to ``tmp_path/<name>.err``.
    """
    command = [sys.executable, str(EXAMPLES / f"{name}.py"), *args]
    command += ["--address", "127.0.0.1:0", "--backend", backend]
    with (tmp_path / f"{name}.err").open("ab") as stderr:
        server = await anyio.open_process(
            command, cwd=tmp_path, env=_script_env(tmp_path), stderr=stderr
        )
        try:
            assert server.stdout is not None
            lines = BufferedByteReceiveStream(server.stdout)
            banner: dict[str, str] = {}
            with anyio.fail_after(TIMEOUT):
                for _ in range(3):
                    label, _, value = (
                        (await lines.receive_until(b"\n", 1000)).decode().partition(": ")
                    )
                    banner[label] = value
            assert set(banner) == {"address", "key", "fingerprint"}
            yield server, banner
        finally:
            if server.returncode is None:
                server.terminate()  # SIGTERM: the server stops cleanly
                with anyio.move_on_after(TIMEOUT):
                    await server.wait()
            if server.returncode is None:
                server.kill()
                await server.wait()
            await server.aclose()


async def test_kvstore_script_runs_as_documented(tmp_path: Path, anyio_backend: str) -> None:
    """``python examples/kvstore.py serve`` and the client commands, as separate processes."""

    async def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return await run_script(tmp_path, anyio_backend, "kvstore", *args)

    pubkey = await run("pubkey", "--identity", "alice.key")
    assert pubkey.returncode == 0, pubkey.stderr
    alice_key = pubkey.stdout.decode().strip()
    stalk.PublicIdentity.from_string(alice_key)
    (tmp_path / "authorized_peers").write_text(f"{alice_key} alice\n")

    serve = ["serve", "--identity", "server.key", "--authorized-peers", "authorized_peers"]
    async with script_server(tmp_path, anyio_backend, "kvstore", *serve) as (server, banner):
        server_key = stalk.PublicIdentity.from_string(banner["key"])
        assert banner["fingerprint"] == server_key.fingerprint
        assert server_key == Identity.load(tmp_path / "server.key").public

        alice = ["--address", banner["address"], "--identity", "alice.key"]
        pinned = [*alice, "--peer", banner["key"]]
        assert (await run("put", "greeting", "hello world", *pinned)).returncode == 0
        got = await run("get", "greeting", *pinned)
        assert (got.returncode, got.stdout) == (0, b"hello world\n")
        listed = await run("list", *alice)  # XX: prints the key it learned
        assert (listed.returncode, listed.stdout) == (0, b"greeting\n")
        assert banner["key"].encode() in listed.stderr
        assert (await run("delete", "greeting", *pinned)).returncode == 0
        missing = await run("get", "greeting", *pinned)
        assert missing.returncode == 1
        assert b"no such key" in missing.stderr

        stranger = await run("get", "greeting", "--address", banner["address"])
        assert stranger.returncode == 2
        assert b"not authorized" in stranger.stderr
    assert server.returncode == 0, (tmp_path / "kvstore.err").read_text()


async def test_kvstore_acknowledged_writes_survive_a_killed_server(
    tmp_path: Path, anyio_backend: str
) -> None:
    """``serve --data``: SIGKILL while writes are in flight loses none that was answered OK."""
    serve = ["serve", "--identity", "server.key", "--data", "kv.sqlite"]
    writers, enough = 4, 60
    acknowledged: dict[str, bytes | None] = {}
    # Per writer, the operation it was waiting for when the server died: its key, and the
    # value before and after it (either may be what the server stored).
    interrupted: list[tuple[str, bytes | None, bytes | None] | None] = []
    killing = anyio.Event()

    async def write(kv: Any, n: int) -> None:
        waiting_for: tuple[str, bytes | None, bytes | None] | None = None
        try:
            for i in itertools.count():
                key = f"w{n}/{i}"
                value = f"{n}:{i};".encode() * (1 + i % 100)
                waiting_for = (key, None, value)
                await kv.put(key, value)
                acknowledged[key] = value
                if i % 3 == 2:  # and delete one written before
                    old = f"w{n}/{i - 1}"
                    waiting_for = (old, acknowledged[old], None)
                    assert await kv.delete(old) == acknowledged[old]
                    acknowledged[old] = None
                waiting_for = None
                if len(acknowledged) >= enough:
                    killing.set()
        except kvstore.KVConnectionError:
            interrupted.append(waiting_for)

    with anyio.fail_after(TIMEOUT):
        async with script_server(tmp_path, anyio_backend, "kvstore", *serve) as (server, banner):
            host, port = kvstore.parse_address(banner["address"])
            async with (
                kvstore.KVClient(host, port, peer=banner["key"]) as kv,
                anyio.create_task_group() as tg,
            ):
                for n in range(writers):
                    tg.start_soon(write, kv, n)
                await killing.wait()
                server.kill()  # SIGKILL: no shutdown at all
            assert await server.wait() == -signal.SIGKILL
        # Each writer was waiting for an answer when the server died.
        assert len(interrupted) == writers
        assert None not in interrupted
        assert (tmp_path / "kv.sqlite-wal").exists()  # never closed: recovered from its WAL

        async with script_server(tmp_path, anyio_backend, "kvstore", *serve) as (server, banner):
            host, port = kvstore.parse_address(banner["address"])
            async with kvstore.KVClient(host, port, peer=banner["key"]) as kv:
                stored = {key: await kv.get(key) for key in acknowledged}
                for operation in interrupted:
                    assert operation is not None
                    key, before, after = operation
                    stored_value = await kv.get(key)
                    assert stored_value in (before, after), key
                    stored.pop(key, None)
                    acknowledged.pop(key, None)
        assert server.returncode == 0, (tmp_path / "kvstore.err").read_text()
    assert len(acknowledged) >= enough - writers
    assert stored == acknowledged  # every write answered OK, none lost
    assert not (tmp_path / "kv.sqlite-wal").exists()  # closed cleanly this time


async def test_file_transfer_script_runs_as_documented(tmp_path: Path, anyio_backend: str) -> None:
    """``python examples/file_transfer.py receive`` and ``send``, as separate processes."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    files = {"one.bin": os.urandom(300_000), "two.txt": b"hello\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    receive = ["receive", "--dir", "inbox", "--identity", "receiver.key"]
    async with script_server(tmp_path, anyio_backend, "file_transfer", *receive) as (
        receiver,
        banner,
    ):
        to = ["--address", banner["address"], "--peer", banner["key"]]
        send = ["send", "one.bin", "two.txt", "--message", "two files", *to]
        sent = await run_script(tmp_path, anyio_backend, "file_transfer", *send)
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.decode().splitlines() == [
            f"{name}: stored, {len(data)} bytes, SHA-256 {hashlib.sha256(data).hexdigest()}"
            for name, data in files.items()
        ]
        assert b"one.bin: 100% of 0.3 MiB" in sent.stderr
        again = await run_script(tmp_path, anyio_backend, "file_transfer", "send", "two.txt", *to)
        assert again.returncode == 1
        assert b"two.txt: not stored: refused: a file named 'two.txt' exists" in again.stderr
        assert receiver.stdout is not None
        lines = BufferedByteReceiveStream(receiver.stdout)
        printed = []
        with anyio.fail_after(TIMEOUT):
            for _ in range(4):
                printed.append((await lines.receive_until(b"\n", 1000)).decode())
    assert receiver.returncode == 0, (tmp_path / "file_transfer.err").read_text()
    assert {path.name: path.read_bytes() for path in inbox.iterdir()} == files
    # The first send's three lines come in the order they happened to end.
    [message] = [line for line in printed[:3] if line.startswith("message from SHA256:")]
    assert message.endswith(": 'two files'")
    assert sorted(set(printed[:3]) - {message}) == [
        f"stored {name}: {len(data)} bytes, SHA-256 {hashlib.sha256(data).hexdigest()}"
        for name, data in files.items()
    ]
    assert printed[3] == "not stored: 'two.txt': refused: a file named 'two.txt' exists"
