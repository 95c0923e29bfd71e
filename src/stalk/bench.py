"""``stalk bench``: stalk against anyio TLS 1.3 and plain anyio TCP, over 127.0.0.1.

Theory of operation
-------------------
The *orchestrator* (:func:`run`) never does network I/O itself. For each event loop it
starts two *worker* processes, ``python -m stalk.bench --worker server|client``, and drives
the client with one JSON job per line on its stdin; the client answers one JSON line on its
stdout. The server worker serves four listeners (stalk, stalk with a raised message limit,
TLS 1.3, plain TCP) and obeys commands that the client sends *in band*, on the connection
under test, before the timed part: ``sink N`` (receive N messages, then acknowledge),
``echo N`` (send back N messages), ``rss EXPECTED`` (report the server's RSS once EXPECTED
connections of that kind are open), ``profile start|stop``.

Every transport carries the same workload: a spack holding one ``bytes`` payload of the
given size. stalk sends :class:`~stalk.Spack` objects; TLS and TCP send the same msgpack
array behind a 4-byte big-endian length prefix, packed per message by the sender and
unpacked per message by the receiver (big reads, no ``receive_exactly``), which is the
cheapest honest way to carry messages over an anyio byte stream.

The machine is shared and noisy, so the workload is measured in *rounds*: each round runs
every cell (figure x size x mode) once for each transport, in an order rotated from round
to round, and the report gives the median over rounds. Ratios are the median of the
per-round ratios (each taken between runs made seconds apart), not ratios of medians.
Every count (messages, round trips, connections) is calibrated once per cell and transport
before the first round so that one timed run lasts about ``Budget.cell_seconds``.

Memory per idle connection is measured in fresh process pairs (one per transport), so the
heap history of earlier cells cannot hide or inflate the growth. benchmarks/README.md
describes every figure exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import ipaddress
import json
import math
import os
import platform
import resource
import select
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any, Final

import anyio
import cryptography
import msgpack
from anyio.abc import AsyncResource, ByteStream, SocketAttribute, SocketStream
from anyio.streams.tls import TLSStream
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import stalk

__all__ = [
    "BUDGETS",
    "CONCURRENCY",
    "HANDSHAKE_KINDS",
    "LINEARITY_BIG",
    "LINEARITY_SMALL",
    "SIZES",
    "TRANSPORTS",
    "Budget",
    "Pair",
    "add_arguments",
    "available_backends",
    "batch_size",
    "format_report",
    "main",
    "make_certificate",
    "run",
    "run_from_args",
    "start_pair",
    "worker_env",
]

#: Spack payload sizes of the throughput figures.
SIZES: Final = (64, 1024, 16 * 1024, 256 * 1024, 1024 * 1024, 8 * 1024 * 1024)
#: Transports of the data figures; ratios are always stalk against "tls" and "tcp".
TRANSPORTS: Final = ("stalk", "tls", "tcp")
#: What the handshake figures open: stalk XX, stalk IK, a full TLS 1.3 handshake, and a plain
#: TCP connect (the floor).
HANDSHAKE_KINDS: Final = ("stalk_xx", "stalk_ik", "tls", "tcp")
#: Handshakes in flight at once, from one client process.
CONCURRENCY: Final = (1, 16)
#: Cost linearity: per-MiB time of one 64 MiB spack against that of 1 MiB spacks.
LINEARITY_SMALL: Final = 1024 * 1024
LINEARITY_BIG: Final = 64 * 1024 * 1024
#: Payload of the round-trip figure.
RTT_SIZE: Final = 64

HOST: Final = "127.0.0.1"
#: Bytes asked of the transport per read by the TLS/TCP framing (stalk's default too).
READ_SIZE: Final = 256 * 1024
#: max_message_size of the stalk listener and client used for the linearity figure.
BIG_LIMIT: Final = 2 * LINEARITY_BIG
#: Messages of at least this size are written as header + body (two writes, no copy).
_SPLIT_WRITE: Final = 64 * 1024
_HEADER: Final = struct.Struct(">I")
_NONCE: Final = struct.Struct(">4xQ")
#: Noise's largest plaintext per transport message (65535 - 16 bytes of tag).
_NOISE_CHUNK: Final = 65_519
_MB: Final = 1e6
_MIB: Final = 1024 * 1024
_SAMPLE_KEY_SEP: Final = "|"
#: Above this many CPUs' worth of other processes' work during a run, the report warns.
_NOISY_OTHER_CPUS: Final = 0.2


class BenchError(Exception):
    """The benchmark could not run (a worker failed, timed out or exited)."""


@dataclass(frozen=True, slots=True)
class Budget:
    """How long and how thoroughly to measure.

    :param rounds: interleaved rounds; every figure is a median over them.
    :param cell_seconds: target duration of one timed run (counts are calibrated to it).
    :param memory_connections: idle connections opened for the memory figure.
    :param linearity_big_count: 64 MiB spacks per round (and 64 x as many 1 MiB spacks).
    :param aes_seconds: time spent on the AES-GCM ceiling, per round.
    :param calibrate: calibrate counts; if not, every count is its small starting value.
    """

    name: str
    rounds: int
    cell_seconds: float
    memory_connections: int
    linearity_big_count: int
    aes_seconds: float
    calibrate: bool = True


BUDGETS: Final = {
    "full": Budget("full", 7, 0.3, 1000, 1, 0.3),
    "quick": Budget("quick", 3, 0.04, 200, 1, 0.04),
    "smoke": Budget("smoke", 1, 0.01, 100, 1, 0.01, calibrate=False),
}


def batch_size(size: int) -> int:
    """Messages per ``queue`` + ``flush`` batch (per write for TLS/TCP): about 1 MiB, 2..1000."""
    return max(2, min(1000, _MIB // size))


def available_backends() -> list[str]:
    """The event loops installed here: asyncio always, trio and uvloop if importable."""
    backends = ["asyncio"]
    for name, module in (("trio", "trio"), ("uvloop", "uvloop")):
        with contextlib.suppress(ImportError):
            __import__(module)
            backends.append(name)
    return backends


def _run_loop(fn: Callable[[], Awaitable[Any]], backend: str) -> Any:
    if backend == "uvloop":
        return anyio.run(fn, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(fn, backend=backend)


# -- shared helpers ----------------------------------------------------------------------

_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """The resident set size of the calling process (Linux: current; elsewhere: the peak)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def _raise_fd_limit(wanted: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def _p99(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def _payload(size: int) -> bytes:
    block = os.urandom(min(size, 64 * 1024))
    return (block * (size // len(block) + 1))[:size]


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj)


def _unpackb(data: memoryview) -> Any:
    return msgpack.unpackb(data)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed ECDSA P-256 certificate for 127.0.0.1 and its key; return paths."""
    # Imported here: `stalk --help` builds this command's parser, and x509 is slow to import.
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stalk-bench")])
    now = datetime.now(timezone.utc)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    return context


def _client_ssl_context(cafile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    return context


class _Framed:
    """Length-prefixed msgpack messages over an anyio byte stream (the TLS/TCP workload)."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._pending: deque[Any] = deque()

    async def receive(self) -> Any:
        pending = self._pending
        while not pending:
            self._buffer += await self.stream.receive(READ_SIZE)
            self._parse()
        return pending.popleft()

    def _parse(self) -> None:
        buffer = self._buffer
        size = len(buffer)
        offset = 0
        with memoryview(buffer) as view:
            while size - offset >= 4:
                (length,) = _HEADER.unpack_from(buffer, offset)
                end = offset + 4 + length
                if end > size:
                    break
                self._pending.append(_unpackb(view[offset + 4 : end]))
                offset = end
        if offset:
            del buffer[:offset]

    async def send(self, obj: Any) -> None:
        data = _packb(obj)
        if len(data) < _SPLIT_WRITE:
            await self.stream.send(_HEADER.pack(len(data)) + data)
        else:
            await self.stream.send(_HEADER.pack(len(data)))
            await self.stream.send(data)

    async def send_many(self, obj: Any, count: int) -> None:
        """Pack ``count`` copies of ``obj`` (each packed anew) and write them at once."""
        parts: list[bytes] = []
        for _ in range(count):
            data = _packb(obj)
            parts.append(_HEADER.pack(len(data)))
            parts.append(data)
        await self.stream.send(b"".join(parts))

    async def aclose(self) -> None:
        await self.stream.aclose()


#: Whatever ends a connection's command loop: the peer went away, cleanly or not.
_ENDED: Final = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
    stalk.StalkError,
)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _read_stdin_line() -> str:
    return await anyio.to_thread.run_sync(sys.stdin.readline)


# -- the server worker -------------------------------------------------------------------


@dataclass
class _Endpoint:
    """One connection as the command loop sees it, whatever the transport."""

    receive: Callable[[], Awaitable[Any]]
    #: sends back an object exactly as ``receive`` returned it
    echo: Callable[[Any], Awaitable[None]]
    #: sends a command or answer given as a list
    reply: Callable[[list[Any]], Awaitable[None]]


def _stalk_endpoint(conn: stalk.Connection) -> _Endpoint:
    async def reply(message: list[Any]) -> None:
        await conn.send(stalk.Spack(*message))

    return _Endpoint(conn.receive, conn.send, reply)


def _framed_endpoint(framed: _Framed) -> _Endpoint:
    return _Endpoint(framed.receive, framed.send, framed.send)


class _Server:
    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self.ssl_context = ssl_context
        self.open: dict[str, int] = defaultdict(int)
        self.profiler: cProfile.Profile | None = None

    async def serve_commands(self, kind: str, endpoint: _Endpoint) -> None:
        self.open[kind] += 1
        try:
            with contextlib.suppress(*_ENDED):
                while await self._command(kind, endpoint, list(await endpoint.receive())):
                    pass
        finally:
            self.open[kind] -= 1

    async def _command(self, kind: str, endpoint: _Endpoint, command: list[Any]) -> bool:
        op = command[0]
        receive = endpoint.receive
        if op == "sink":
            for _ in range(int(command[1])):
                await receive()
            await endpoint.reply(["ok"])
        elif op == "echo":
            echo = endpoint.echo
            for _ in range(int(command[1])):
                await echo(await receive())
        elif op == "rss":
            with anyio.move_on_after(60):
                while self.open[kind] != int(command[1]):
                    await anyio.sleep(0.01)
            await anyio.sleep(0.05)
            gc.collect()
            await endpoint.reply(["rss", rss_bytes(), self.open[kind]])
        elif op == "profile":
            self._profile(command)
            await endpoint.reply(["ok"])
        else:
            return False
        return True

    def _profile(self, command: list[Any]) -> None:
        if command[1] == "start":
            self.profiler = cProfile.Profile()
            self.profiler.enable()
        elif self.profiler is not None:
            self.profiler.disable()
            self.profiler.dump_stats(str(command[2]))
            self.profiler = None

    async def stalk_handler(self, kind: str, conn: stalk.Connection) -> None:
        await self.serve_commands(kind, _stalk_endpoint(conn))

    async def tcp_handler(self, stream: SocketStream) -> None:
        framed = _Framed(stream)
        try:
            await self.serve_commands("tcp", _framed_endpoint(framed))
        finally:
            await anyio.aclose_forcefully(stream)

    async def tls_handler(self, stream: SocketStream) -> None:
        try:
            tls = await TLSStream.wrap(
                stream, server_side=True, ssl_context=self.ssl_context, standard_compatible=False
            )
        except _ENDED:
            await anyio.aclose_forcefully(stream)
            return
        try:
            await self.serve_commands("tls", _framed_endpoint(_Framed(tls)))
        finally:
            await anyio.aclose_forcefully(tls)


async def _server_main(options: argparse.Namespace) -> None:
    server = _Server(_server_ssl_context(options.cert, options.key))
    identity = stalk.Identity.generate()
    # Every client is on HOST, and the memory figure holds a thousand connections open: the
    # listener caps are raised to what _raise_fd_limit() makes room for.
    plain = stalk.Config(max_connections=4096, max_handshakes_per_address=256)
    big = stalk.Config(
        max_connections=4096, max_handshakes_per_address=256, max_message_size=BIG_LIMIT
    )
    async with anyio.create_task_group() as tg:
        listeners = {
            "stalk": await stalk.create_listener(HOST, 0, identity=identity, config=plain),
            "stalk_big": await stalk.create_listener(HOST, 0, identity=identity, config=big),
        }
        tls = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
        tcp = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
        for kind, listener in listeners.items():
            tg.start_soon(listener.serve, partial(server.stalk_handler, kind))
        tg.start_soon(tls.serve, server.tls_handler)
        tg.start_soon(tcp.serve, server.tcp_handler)
        ports = {kind: listener.address[1] for kind, listener in listeners.items()}
        ports["tls"] = tls.extra(SocketAttribute.local_port)
        ports["tcp"] = tcp.extra(SocketAttribute.local_port)
        _emit({"ready": True, "ports": ports, "key": str(identity.public), "pid": os.getpid()})
        await _read_stdin_line()  # the orchestrator closes our stdin to stop us
        tg.cancel_scope.cancel()


# -- the client worker -------------------------------------------------------------------


class _Client:
    def __init__(self, options: argparse.Namespace) -> None:
        self.ports: dict[str, int] = json.loads(options.ports)
        self.server_key = stalk.PublicIdentity.from_string(options.server_key)
        self.identity = stalk.Identity.generate()
        self.ssl_context = _client_ssl_context(options.cafile)
        self.big_config = stalk.Config(max_message_size=BIG_LIMIT)
        self.conns: dict[str, stalk.Connection | _Framed] = {}
        self._spacks: dict[int, stalk.Spack] = {}
        self._messages: dict[int, list[bytes]] = {}

    # connections

    async def dial(self, kind: str) -> AsyncResource:
        """Open one connection of ``kind`` (full handshake) and return it."""
        if kind == "stalk_xx":
            return await stalk.connect(HOST, self.ports["stalk"], identity=self.identity)
        if kind in ("stalk", "stalk_ik"):
            return await stalk.connect(
                HOST, self.ports["stalk"], self.server_key, identity=self.identity
            )
        if kind == "stalk_big":
            return await stalk.connect(
                HOST,
                self.ports["stalk_big"],
                self.server_key,
                identity=self.identity,
                config=self.big_config,
            )
        if kind == "tls":
            return await anyio.connect_tcp(
                HOST,
                self.ports["tls"],
                ssl_context=self.ssl_context,
                tls=True,
                tls_standard_compatible=False,
            )
        if kind == "tcp":
            return await anyio.connect_tcp(HOST, self.ports["tcp"])
        raise BenchError(f"unknown connection kind {kind!r}")

    async def connect_data(self, kind: str) -> None:
        conn = await self.dial(kind)
        if isinstance(conn, stalk.Connection):
            self.conns[kind] = conn
        elif isinstance(conn, (TLSStream, SocketStream)):
            self.conns[kind] = _Framed(conn)

    def endpoint(self, kind: str) -> _Endpoint:
        conn = self.conns[kind]
        return (
            _stalk_endpoint(conn) if isinstance(conn, stalk.Connection) else _framed_endpoint(conn)
        )

    def spack(self, size: int) -> stalk.Spack:
        if size not in self._spacks:
            self._spacks[size] = stalk.Spack(_payload(size))
        return self._spacks[size]

    def message(self, size: int) -> list[bytes]:
        if size not in self._messages:
            self._messages[size] = [_payload(size)]
        return self._messages[size]

    # jobs

    async def run_job(self, job: dict[str, Any]) -> dict[str, Any]:
        profile: dict[str, str] | None = job.get("profile")
        profiler: cProfile.Profile | None = None
        if profile is not None:
            await self._remote(profile["via"], ["profile", "start"])
            profiler = cProfile.Profile()
            profiler.enable()
        try:
            return await self._dispatch(job)
        finally:
            if profile is not None and profiler is not None:
                profiler.disable()
                profiler.dump_stats(profile["client"])
                await self._remote(profile["via"], ["profile", "stop", profile["server"]])

    async def _remote(self, kind: str, command: list[Any]) -> list[Any]:
        endpoint = self.endpoint(kind)
        await endpoint.reply(command)
        return list(await endpoint.receive())

    async def _dispatch(self, job: dict[str, Any]) -> dict[str, Any]:
        op = job["op"]
        if op == "sink":
            seconds = await self.sink(job["conn"], job["size"], job["n"], job["batch"])
            return {"seconds": seconds}
        if op == "rtt":
            return await self.rtt(job["conn"], job["size"], job["n"])
        if op == "handshake":
            return await self.handshakes(job["kind"], job["concurrency"], job["n"])
        if op == "linearity":
            small = await self.sink(job["conn"], LINEARITY_SMALL, job["small_n"], 1)
            big = await self.sink(job["conn"], LINEARITY_BIG, job["big_n"], 1)
            return {"small_seconds": small, "big_seconds": big}
        if op == "memory":
            return await self.memory(job["conn"], job["n"], job["concurrency"])
        raise BenchError(f"unknown job {op!r}")

    async def sink(self, kind: str, size: int, n: int, batch: int) -> float:
        """Send ``n`` spacks of ``size`` bytes one way; seconds until the server has them all."""
        conn = self.conns[kind]
        if isinstance(conn, stalk.Connection):
            return await self._sink_stalk(conn, self.spack(size), n, batch)
        message = self.message(size)
        await conn.send(["sink", n])
        start = time.perf_counter()
        if batch <= 1:
            send = conn.send
            for _ in range(n):
                await send(message)
        else:
            send_many = conn.send_many
            full, rest = divmod(n, batch)
            for _ in range(full):
                await send_many(message, batch)
            if rest:
                await send_many(message, rest)
        await conn.receive()
        return time.perf_counter() - start

    @staticmethod
    async def _sink_stalk(conn: stalk.Connection, spack: stalk.Spack, n: int, batch: int) -> float:
        await conn.send(stalk.Spack("sink", n))
        start = time.perf_counter()
        if batch <= 1:
            send = conn.send
            for _ in range(n):
                await send(spack)
        else:
            queue, flush = conn.queue, conn.flush
            full, rest = divmod(n, batch)
            for _ in range(full):
                for _ in range(batch):
                    queue(spack)
                await flush()
            if rest:
                for _ in range(rest):
                    queue(spack)
                await flush()
        await conn.receive()
        return time.perf_counter() - start

    async def rtt(self, kind: str, size: int, n: int) -> dict[str, Any]:
        """``n`` request/response round trips of ``size`` bytes, timed one by one."""
        conn = self.conns[kind]
        samples: list[float] = []
        clock = time.perf_counter
        if isinstance(conn, stalk.Connection):
            spack = self.spack(size)
            await conn.send(stalk.Spack("echo", n))
            start = clock()
            for _ in range(n):
                t0 = clock()
                await conn.send(spack)
                await conn.receive()
                samples.append(clock() - t0)
        else:
            message = self.message(size)
            await conn.send(["echo", n])
            start = clock()
            for _ in range(n):
                t0 = clock()
                await conn.send(message)
                await conn.receive()
                samples.append(clock() - t0)
        return {"seconds": clock() - start, "median": _median(samples), "p99": _p99(samples)}

    async def handshakes(self, kind: str, concurrency: int, n: int) -> dict[str, Any]:
        """Open and close ``n`` connections, ``concurrency`` at a time; time each opening."""
        latencies: list[float] = []
        remaining = n
        clock = time.perf_counter

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t0 = clock()
                conn = await self.dial(kind)
                latencies.append(clock() - t0)
                await conn.aclose()

        start = clock()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        seconds = clock() - start
        return {"seconds": seconds, "median": _median(latencies), "p99": _p99(latencies)}

    async def _server_rss(self, kind: str, expected: int) -> int:
        answer = await self._remote(kind, ["rss", expected])
        if int(answer[2]) != expected:
            raise BenchError(f"server has {answer[2]} {kind} connections, expected {expected}")
        return int(answer[1])

    async def memory(self, kind: str, n: int, concurrency: int) -> dict[str, Any]:
        """RSS growth of both processes over ``n`` idle established connections."""
        dial_kind = "stalk_ik" if kind == "stalk" else kind
        for conn in [await self.dial(dial_kind) for _ in range(16)]:  # warm-up
            await conn.aclose()
        server_before = await self._server_rss(kind, 1)
        gc.collect()
        client_before = rss_bytes()
        held: list[AsyncResource] = []
        remaining = n

        async def opener() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                held.append(await self.dial(dial_kind))

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(opener)
        server_after = await self._server_rss(kind, 1 + n)
        gc.collect()
        client_after = rss_bytes()
        for conn in held:
            await conn.aclose()
        return {
            "server_before": server_before,
            "server_after": server_after,
            "client_before": client_before,
            "client_after": client_after,
        }


async def _client_main(options: argparse.Namespace) -> None:
    client = _Client(options)
    async with contextlib.AsyncExitStack() as stack:
        for kind in filter(None, options.connect.split(",")):
            await client.connect_data(kind)
            conn = client.conns[kind]
            if isinstance(conn, stalk.Connection):
                # As the README shows it: ``async with`` gives the connection its writer
                # task, which batches what the application sends.
                await stack.enter_async_context(conn)
            else:
                stack.push_async_callback(_close_quietly, conn)
        _emit({"ready": True, "pid": os.getpid()})
        while line := await _read_stdin_line():
            try:
                result = await client.run_job(json.loads(line))
            except Exception as exc:  # noqa: BLE001 - reported to the orchestrator, which stops
                result = {"error": f"{type(exc).__name__}: {exc}"}
            _emit(result)


async def _close_quietly(conn: AsyncResource | _Framed) -> None:
    with contextlib.suppress(*_ENDED):
        await conn.aclose()


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="stalk.bench --worker")
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--backend", default="asyncio")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--cafile")
    parser.add_argument("--ports")
    parser.add_argument("--server-key")
    parser.add_argument("--connect", default="")
    options = parser.parse_args(argv)
    _raise_fd_limit()
    main_fn = _server_main if options.role == "server" else _client_main
    _run_loop(partial(main_fn, options), options.backend)
    return 0


# -- the orchestrator: processes ---------------------------------------------------------


def worker_env(malloc_tuned: bool = False) -> dict[str, str]:
    """The environment of the worker processes (they import the same stalk as we do)."""
    env = dict(os.environ)
    # The workers run the same stalk as the orchestrator, installed or not.
    package_root = str(Path(stalk.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if malloc_tuned:
        env["MALLOC_MMAP_THRESHOLD_"] = str(32 * _MIB)
        env["MALLOC_TRIM_THRESHOLD_"] = str(128 * _MIB)
    return env


class _Process:
    """A worker process spoken to in JSON lines."""

    def __init__(self, args: Sequence[str], env: dict[str, str]) -> None:
        command = [sys.executable, "-m", "stalk.bench", "--worker", *args]
        self.name = " ".join(args[:3])
        # Our own interpreter and module, arguments built here: nothing untrusted.
        self.proc = subprocess.Popen(  # noqa: S603
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self._buffer = b""

    def read(self, timeout: float) -> dict[str, Any]:
        stdout = self.proc.stdout
        if stdout is None:  # pragma: no cover - always piped
            raise BenchError("worker has no stdout")
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"worker {self.name} gave no answer in {timeout:.0f} s")
            ready, _, _ = select.select([stdout.fileno()], [], [], left)
            if ready:
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    self.proc.wait(5)
                    raise BenchError(
                        f"worker {self.name} exited with status {self.proc.returncode}"
                    )
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise BenchError(f"worker {self.name} failed: {answer['error']}")
        return answer

    def request(self, job: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        stdin = self.proc.stdin
        if stdin is None:  # pragma: no cover - always piped
            raise BenchError("worker has no stdin")
        stdin.write(json.dumps(job).encode() + b"\n")
        stdin.flush()
        return self.read(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Pair:
    """A server worker and a client worker on one event loop."""

    server: _Process
    client: _Process

    def job(self, timeout: float = 300, **job: Any) -> dict[str, Any]:
        """Run one client job; return its answer."""
        return self.client.request(job, timeout)

    def close(self) -> None:
        """Stop both workers (client first)."""
        self.client.close()
        self.server.close()


def start_pair(
    backend: str, cert: Path, key: Path, connect: Iterable[str], env: dict[str, str]
) -> Pair:
    """Start a server and a client worker; the client opens the ``connect`` data connections."""
    server = _Process(["server", "--backend", backend, "--cert", str(cert), "--key", str(key)], env)
    try:
        ready = server.read(60)
        client = _Process(
            [
                "client",
                "--backend",
                backend,
                "--cafile",
                str(cert),
                "--ports",
                json.dumps(ready["ports"]),
                "--server-key",
                ready["key"],
                "--connect",
                ",".join(connect),
            ],
            env,
        )
    except BaseException:
        server.close()
        raise
    try:
        client.read(60)
    except BaseException:
        client.close()
        server.close()
        raise
    return Pair(server, client)


# -- the orchestrator: cells, calibration, rounds ----------------------------------------


@dataclass
class _Cell:
    """One figure at one size/mode, measured for each of its subjects every round."""

    id: str
    subjects: tuple[str, ...]
    #: (subject, count) -> the client job
    job: Callable[[str, int], dict[str, Any]]
    #: (job answer, count) -> the metrics of one run
    metrics: Callable[[dict[str, Any], int], dict[str, float]]
    start_count: int
    min_count: int = 1
    calibrated: bool = True


def _throughput_cell(mode: str, size: int) -> _Cell:
    batch = batch_size(size) if mode == "batch" else 1

    def job(transport: str, n: int) -> dict[str, Any]:
        return {"op": "sink", "conn": transport, "size": size, "n": n, "batch": batch}

    def metrics(answer: dict[str, Any], n: int) -> dict[str, float]:
        rate = n / answer["seconds"]
        return {"msgs_per_s": rate, "mb_per_s": rate * size / _MB}

    start = max(2, min(1000, 64 * 1024 // size))
    if mode == "batch":
        start = max(start, 2 * batch)
    return _Cell(f"throughput/{mode}/{size}", TRANSPORTS, job, metrics, start, min_count=3)


def _rtt_cell() -> _Cell:
    def job(transport: str, n: int) -> dict[str, Any]:
        return {"op": "rtt", "conn": transport, "size": RTT_SIZE, "n": n}

    def metrics(answer: dict[str, Any], n: int) -> dict[str, float]:
        return {"median_us": answer["median"] * 1e6, "p99_us": answer["p99"] * 1e6}

    return _Cell(f"rtt/{RTT_SIZE}", TRANSPORTS, job, metrics, 50, min_count=20)


def _handshake_cell(concurrency: int) -> _Cell:
    def job(kind: str, n: int) -> dict[str, Any]:
        return {"op": "handshake", "kind": kind, "concurrency": concurrency, "n": n}

    def metrics(answer: dict[str, Any], n: int) -> dict[str, float]:
        return {
            "conns_per_s": n / answer["seconds"],
            "median_ms": answer["median"] * 1e3,
            "p99_ms": answer["p99"] * 1e3,
        }

    return _Cell(
        f"handshake/{concurrency}",
        HANDSHAKE_KINDS,
        job,
        metrics,
        max(4, concurrency * 2),
        min_count=max(4, concurrency * 2),
    )


def _linearity_cell(big_count: int) -> _Cell:
    conn = {"stalk": "stalk_big", "tls": "tls", "tcp": "tcp"}
    small_count = big_count * LINEARITY_BIG // LINEARITY_SMALL

    def job(transport: str, n: int) -> dict[str, Any]:
        return {"op": "linearity", "conn": conn[transport], "small_n": small_count, "big_n": n}

    def metrics(answer: dict[str, Any], n: int) -> dict[str, float]:
        small = answer["small_seconds"] * 1e6 / (small_count * LINEARITY_SMALL / _MIB)
        big = answer["big_seconds"] * 1e6 / (n * LINEARITY_BIG / _MIB)
        return {"small_us_per_mib": small, "big_us_per_mib": big, "ratio": big / small}

    return _Cell("linearity", TRANSPORTS, job, metrics, big_count, calibrated=False)


FAMILIES: Final = ("throughput", "rtt", "handshake", "memory", "linearity")


def _cells(budget: Budget, families: Sequence[str]) -> list[_Cell]:
    cells: list[_Cell] = []
    if "throughput" in families:
        cells += [_throughput_cell(mode, size) for mode in ("send", "batch") for size in SIZES]
    if "rtt" in families:
        cells.append(_rtt_cell())
    if "handshake" in families:
        cells += [_handshake_cell(c) for c in CONCURRENCY]
    if "linearity" in families:
        cells.append(_linearity_cell(budget.linearity_big_count))
    return cells


def _seconds_of(answer: dict[str, Any]) -> float:
    return float(answer.get("seconds") or 0.0)


def _calibrate(run_job: Callable[[int], float], target: float, start: int, minimum: int) -> int:
    """A count for which one run lasts about ``target`` seconds (the runs warm up too)."""
    n = max(start, minimum)
    seconds = run_job(n)
    for _ in range(10):
        if seconds >= target / 4:
            break
        n = max(n * 2, min(n * 16, math.ceil(n * target / 4 / max(seconds, 1e-6))))
        seconds = run_job(n)
    return max(minimum, round(n * target / max(seconds, 1e-9)))


def _rotated(items: Sequence[str], k: int) -> list[str]:
    k %= len(items)
    return [*items[k:], *items[:k]]


Samples = dict[str, list[dict[str, float]]]
Progress = Callable[[str], None]


def _measure_rounds(pair: Pair, cells: list[_Cell], budget: Budget, say: Progress) -> Samples:
    counts: dict[tuple[str, str], int] = {}
    for cell in cells:
        for subject in cell.subjects:
            if not (budget.calibrate and cell.calibrated):
                counts[cell.id, subject] = max(cell.start_count, cell.min_count)
                continue

            def run_job(n: int, cell: _Cell = cell, subject: str = subject) -> float:
                return _seconds_of(pair.job(**cell.job(subject, n)))

            counts[cell.id, subject] = _calibrate(
                run_job, budget.cell_seconds, cell.start_count, cell.min_count
            )
    say("calibrated")
    samples: Samples = defaultdict(list)
    for round_index in range(budget.rounds):
        for cell_index, cell in enumerate(cells):
            for subject in _rotated(cell.subjects, round_index + cell_index):
                n = counts[cell.id, subject]
                answer = pair.job(**cell.job(subject, n))
                samples[_SAMPLE_KEY_SEP.join((cell.id, subject))].append(cell.metrics(answer, n))
        say(f"round {round_index + 1}/{budget.rounds} done")
    return dict(samples)


def _measure_memory(
    backend: str, transport: str, budget: Budget, tls_files: tuple[Path, Path], env: dict[str, str]
) -> dict[str, float]:
    pair = start_pair(backend, *tls_files, [transport], env)
    try:
        n = budget.memory_connections
        answer = pair.job(op="memory", conn=transport, n=n, concurrency=8)
    finally:
        pair.close()
    return {
        "connections": n,
        "server_bytes_per_conn": (answer["server_after"] - answer["server_before"]) / n,
        "client_bytes_per_conn": (answer["client_after"] - answer["client_before"]) / n,
    }


# -- the orchestrator: AES-GCM ceiling ---------------------------------------------------


def _seal(aead: AESGCM, message: bytes) -> list[bytes]:
    with memoryview(message) as view:
        return [
            aead.encrypt(_NONCE.pack(i), view[offset : offset + _NOISE_CHUNK], None)
            for i, offset in enumerate(range(0, len(message), _NOISE_CHUNK))
        ]


def _open(aead: AESGCM, sealed: list[bytes]) -> None:
    for i, chunk in enumerate(sealed):
        aead.decrypt(_NONCE.pack(i), chunk, None)


def _seconds_per_call(fn: Callable[[], object], budget: float) -> float:
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= budget / 4 or calls >= 1 << 24:
            break
        calls *= 4
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls)
    return min(runs)


def aes_ceiling(seconds: float) -> dict[str, dict[str, float]]:
    """AES-256-GCM from ``cryptography``, no I/O: seal and open each size in Noise-sized chunks.

    The sender seals while the receiver opens on the other core, so the one-way ceiling is
    set by the slower of the two.
    """
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    result: dict[str, dict[str, float]] = {}
    for size in SIZES:
        message = _payload(size)
        sealed = _seal(aead, message)
        share = seconds / len(SIZES) / 2
        seal_s = _seconds_per_call(partial(_seal, aead, message), share)
        open_s = _seconds_per_call(partial(_open, aead, sealed), share)
        slower = max(seal_s, open_s)
        result[str(size)] = {
            "seal_mb_per_s": size / seal_s / _MB,
            "open_mb_per_s": size / open_s / _MB,
            "ceiling_msgs_per_s": 1 / slower,
            "ceiling_mb_per_s": size / slower / _MB,
        }
    return result


# -- the orchestrator: summary, targets, table -------------------------------------------


def _metric_median(samples: Samples, key: str, metric: str) -> float:
    return _median([s[metric] for s in samples.get(key, [])])


def _ratio_median(samples: Samples, key: str, other: str, metric: str) -> float:
    mine, theirs = samples.get(key, []), samples.get(other, [])
    ratios = [a[metric] / b[metric] for a, b in zip(mine, theirs, strict=False) if b[metric] > 0]
    return _median(ratios)


def _k(cell: str, subject: str) -> str:
    return _SAMPLE_KEY_SEP.join((cell, subject))


def _summarise(samples: Samples, memory: dict[str, dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    throughput: dict[str, Any] = {}
    for mode in ("send", "batch"):
        for size in SIZES:
            cell = f"throughput/{mode}/{size}"
            if _k(cell, "stalk") not in samples:
                continue
            entry: dict[str, Any] = {"batch": batch_size(size) if mode == "batch" else 1}
            for t in TRANSPORTS:
                entry[t] = {
                    m: _metric_median(samples, _k(cell, t), m) for m in ("msgs_per_s", "mb_per_s")
                }
            for other in ("tls", "tcp"):
                entry[f"stalk_vs_{other}"] = _ratio_median(
                    samples, _k(cell, "stalk"), _k(cell, other), "msgs_per_s"
                )
            throughput.setdefault(mode, {})[str(size)] = entry
    if throughput:
        out["throughput"] = throughput
    cell = f"rtt/{RTT_SIZE}"
    if _k(cell, "stalk") in samples:
        rtt: dict[str, Any] = {
            t: {m: _metric_median(samples, _k(cell, t), m) for m in ("median_us", "p99_us")}
            for t in TRANSPORTS
        }
        for other in ("tls", "tcp"):
            rtt[f"stalk_vs_{other}"] = {
                m: _ratio_median(samples, _k(cell, "stalk"), _k(cell, other), m)
                for m in ("median_us", "p99_us")
            }
        out["rtt"] = rtt
    handshake: dict[str, Any] = {}
    for concurrency in CONCURRENCY:
        cell = f"handshake/{concurrency}"
        if _k(cell, "tls") not in samples:
            continue
        entry = {
            kind: {
                m: _metric_median(samples, _k(cell, kind), m)
                for m in ("conns_per_s", "median_ms", "p99_ms")
            }
            for kind in HANDSHAKE_KINDS
        }
        for kind in ("stalk_xx", "stalk_ik"):
            for other in ("tls", "tcp"):
                entry[f"{kind}_vs_{other}"] = _ratio_median(
                    samples, _k(cell, kind), _k(cell, other), "conns_per_s"
                )
        handshake[_concurrency_name(concurrency)] = entry
    if handshake:
        out["handshake"] = handshake
    if memory:
        mem: dict[str, Any] = dict(memory)
        for other in ("tls", "tcp"):
            for side in ("server", "client"):
                theirs = memory[other][f"{side}_bytes_per_conn"]
                mine = memory["stalk"][f"{side}_bytes_per_conn"]
                mem[f"stalk_vs_{other}_{side}"] = mine / theirs if theirs > 0 else math.nan
        out["memory"] = mem
    if _k("linearity", "stalk") in samples:
        out["linearity"] = {
            t: {
                m: _metric_median(samples, _k("linearity", t), m)
                for m in ("small_us_per_mib", "big_us_per_mib", "ratio")
            }
            for t in TRANSPORTS
        }
    return out


def _concurrency_name(concurrency: int) -> str:
    return "sequential" if concurrency == 1 else f"concurrent{concurrency}"


@dataclass(frozen=True)
class _Target:
    name: str
    value: float
    op: str
    threshold: float
    unit: str = "x"
    #: what the value is compared with, shown in the table ("TLS", "TCP batched"...)
    ref: str = ""

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "op": self.op,
            "threshold": self.threshold,
            "unit": self.unit,
            "ref": self.ref,
            "pass": self.passed,
        }


def _targets(samples: Samples, summary: dict[str, Any]) -> list[_Target]:
    targets: list[_Target] = []
    send, batch = "throughput/send/{}", "throughput/batch/{}"
    if "throughput" in summary:
        for size in (1024 * 1024, 8 * 1024 * 1024):
            cell = send.format(size)
            for other, threshold in (("tls", 2.5), ("tcp", 1.0)):
                value = _ratio_median(samples, _k(cell, "stalk"), _k(cell, other), "mb_per_s")
                name = f"{_size_name(size)} send MB/s vs {other.upper()}"
                targets.append(_Target(name, value, ">=", threshold, ref=other.upper()))
        b64, s64 = batch.format(64), send.format(64)
        targets += [
            _Target(
                "64 B queue+flush vs TCP batched",
                _ratio_median(samples, _k(b64, "stalk"), _k(b64, "tcp"), "msgs_per_s"),
                ">=",
                0.9,
                ref="TCP batched",
            ),
            _Target(
                "64 B queue+flush vs TLS one-per-send",
                _ratio_median(samples, _k(b64, "stalk"), _k(s64, "tls"), "msgs_per_s"),
                ">=",
                20,
                ref="TLS send",
            ),
            _Target(
                "64 B send loop vs TLS one-per-send",
                _ratio_median(samples, _k(s64, "stalk"), _k(s64, "tls"), "msgs_per_s"),
                ">=",
                3,
                ref="TLS send",
            ),
        ]
    if "rtt" in summary:
        targets.append(
            _Target(
                "RTT 64 B median vs TLS",
                summary["rtt"]["stalk_vs_tls"]["median_us"],
                "<=",
                1,
                ref="TLS",
            )
        )
    for concurrency in CONCURRENCY:
        name = _concurrency_name(concurrency)
        entry = summary.get("handshake", {}).get(name)
        if entry is None:
            continue
        for kind in ("stalk_xx", "stalk_ik"):
            label = kind.removeprefix("stalk_").upper()
            targets.append(
                _Target(
                    f"handshakes/s {label} {name} vs TLS",
                    entry[f"{kind}_vs_tls"],
                    ">=",
                    1.5,
                    ref="TLS",
                )
            )
    if "memory" in summary:
        for side in ("server", "client"):
            kib = summary["memory"]["stalk"][f"{side}_bytes_per_conn"] / 1024
            targets.append(_Target(f"memory per idle conn ({side})", kib, "<=", 64, "KiB"))
    if "linearity" in summary:
        ratio = summary["linearity"]["stalk"]["ratio"]
        targets.append(_Target("64 MiB vs 1 MiB time per MiB", ratio, "<=", 1.3))
    return targets


def _size_name(size: int) -> str:
    if size >= _MIB:
        return f"{size // _MIB} MiB"
    if size >= 1024:
        return f"{size // 1024} KiB"
    return f"{size} B"


def _num(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.2f}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:.1f}k"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def _grid(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _marks(targets: Sequence[_Target], *names: str) -> str:
    found = [t for t in targets if t.name in names]
    return ", ".join(
        f"{t.op}{t.threshold:g}{t.unit}{' ' + t.ref if t.ref else ''} "
        f"{'PASS' if t.passed else 'FAIL'}"
        for t in found
    )


def _throughput_lines(
    summary: dict[str, Any], aes: dict[str, dict[str, float]], targets: list[_Target]
) -> list[str]:
    lines: list[str] = []
    marks: dict[tuple[str, int], tuple[str, ...]] = {
        ("send", 64): ("64 B send loop vs TLS one-per-send",),
        ("batch", 64): ("64 B queue+flush vs TCP batched", "64 B queue+flush vs TLS one-per-send"),
    }
    for size in (1024 * 1024, 8 * 1024 * 1024):
        name = _size_name(size)
        marks["send", size] = (f"{name} send MB/s vs TLS", f"{name} send MB/s vs TCP")
    titles = {
        "send": "One-way throughput, one `send` per message (TLS/TCP: one write per message)",
        "batch": "One-way throughput, `queue` x k + `flush` (TLS/TCP: one write of k messages)",
    }
    for mode, by_size in summary.get("throughput", {}).items():
        rows = []
        for size_text, entry in by_size.items():
            size = int(size_text)
            rows.append(
                [
                    _size_name(size),
                    str(entry["batch"]),
                    *(_num(entry[t][m]) for t in TRANSPORTS for m in ("msgs_per_s", "mb_per_s")),
                    _ratio(entry["stalk_vs_tls"]),
                    _ratio(entry["stalk_vs_tcp"]),
                    _num(aes.get(size_text, {}).get("ceiling_mb_per_s", math.nan)),
                    _marks(targets, *marks.get((mode, size), ())),
                ]
            )
        headers = [
            "size",
            "k",
            "stalk msg/s",
            "stalk MB/s",
            "TLS msg/s",
            "TLS MB/s",
            "TCP msg/s",
            "TCP MB/s",
            "xTLS",
            "xTCP",
            "AES MB/s",
            "target",
        ]
        lines += ["", titles[mode], *_grid(headers, rows)]
    return lines


def _rtt_lines(summary: dict[str, Any], targets: list[_Target]) -> list[str]:
    rtt = summary.get("rtt")
    if rtt is None:
        return []
    rows = [
        [
            f"{metric.removesuffix('_us')} (us)",
            *(_num(rtt[t][metric]) for t in TRANSPORTS),
            _ratio(rtt["stalk_vs_tls"][metric]),
            _ratio(rtt["stalk_vs_tcp"][metric]),
            _marks(targets, "RTT 64 B median vs TLS") if metric == "median_us" else "",
        ]
        for metric in ("median_us", "p99_us")
    ]
    headers = ["64 B round trip", "stalk", "TLS", "TCP", "xTLS", "xTCP", "target"]
    return ["", "Request/response round trip, 64 B", *_grid(headers, rows)]


def _handshake_lines(summary: dict[str, Any], targets: list[_Target]) -> list[str]:
    lines: list[str] = []
    for name, entry in summary.get("handshake", {}).items():
        rows = []
        for kind in HANDSHAKE_KINDS:
            label = kind.removeprefix("stalk_").upper()
            is_stalk = kind.startswith("stalk_")
            rows.append(
                [
                    {"stalk_xx": "stalk XX", "stalk_ik": "stalk IK"}.get(kind, kind.upper()),
                    _num(entry[kind]["conns_per_s"]),
                    _num(entry[kind]["median_ms"]),
                    _num(entry[kind]["p99_ms"]),
                    _ratio(entry[f"{kind}_vs_tls"]) if is_stalk else "",
                    _ratio(entry[f"{kind}_vs_tcp"]) if is_stalk else "",
                    _marks(targets, f"handshakes/s {label} {name} vs TLS") if is_stalk else "",
                ]
            )
        title = (
            "New connections (full handshake, then close), one at a time"
            if name == "sequential"
            else f"New connections (full handshake, then close), {name[10:]} concurrently"
        )
        headers = ["kind", "conns/s", "median ms", "p99 ms", "xTLS", "xTCP", "target"]
        lines += ["", title, *_grid(headers, rows)]
    return lines


def _memory_lines(summary: dict[str, Any], targets: list[_Target]) -> list[str]:
    memory = summary.get("memory")
    if memory is None:
        return []
    rows = [
        [
            side,
            *(_num(memory[t][f"{side}_bytes_per_conn"] / 1024) for t in TRANSPORTS),
            _ratio(memory[f"stalk_vs_tls_{side}"]),
            _ratio(memory[f"stalk_vs_tcp_{side}"]),
            _marks(targets, f"memory per idle conn ({side})"),
        ]
        for side in ("server", "client")
    ]
    n = int(memory["stalk"]["connections"])
    headers = ["KiB per conn", "stalk", "TLS", "TCP", "xTLS", "xTCP", "target"]
    title = f"Memory per idle connection (RSS growth over {n} connections / {n})"
    return ["", title, *_grid(headers, rows)]


def _linearity_lines(summary: dict[str, Any], targets: list[_Target]) -> list[str]:
    linearity = summary.get("linearity")
    if linearity is None:
        return []
    rows = [
        [
            t,
            _num(linearity[t]["small_us_per_mib"]),
            _num(linearity[t]["big_us_per_mib"]),
            _ratio(linearity[t]["ratio"]),
            _marks(targets, "64 MiB vs 1 MiB time per MiB") if t == "stalk" else "",
        ]
        for t in TRANSPORTS
    ]
    headers = ["transport", "us/MiB @1 MiB", "us/MiB @64 MiB", "64 MiB/1 MiB", "target"]
    return ["", "Cost linearity (one-way, one send per spack)", *_grid(headers, rows)]


def _aes_lines(aes: dict[str, dict[str, float]]) -> list[str]:
    rows = [
        [
            _size_name(int(size)),
            _num(entry["seal_mb_per_s"]),
            _num(entry["open_mb_per_s"]),
            _num(entry["ceiling_msgs_per_s"]),
            _num(entry["ceiling_mb_per_s"]),
        ]
        for size, entry in aes.items()
    ]
    headers = ["size", "seal MB/s", "open MB/s", "ceiling msg/s", "ceiling MB/s"]
    title = "AES-256-GCM ceiling (cryptography, no I/O, 65519-byte chunks; one-way = slower side)"
    return ["", title, *_grid(headers, rows)]


def _loads(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def format_report(result: dict[str, Any]) -> str:
    """The human-readable tables of a :func:`run` result."""
    meta = result["meta"]
    source = meta.get("source") or "not a git checkout"
    lines = [
        f"stalk bench ({meta['budget']}): {meta['rounds']} interleaved rounds; figures are "
        "medians of rounds, ratios medians of per-round ratios; MB = 10^6 payload bytes",
        f"stalk {meta['stalk']} ({source}), Python {meta['python']}, anyio {meta['anyio']}, "
        f"cryptography {meta['cryptography']}, msgpack {meta['msgpack']}, {meta['cpus']} CPUs",
        f"malloc {meta['malloc']}; {meta['seconds']:.0f} s; load average "
        f"{_loads(meta['loadavg_start'])} (1/5/15 min) at start; other processes used "
        f"{_num(meta.get('other_cpus', math.nan))} CPUs on average during the run",
    ]
    if meta.get("other_cpus", 0) > _NOISY_OTHER_CPUS:
        lines.append("WARNING: other processes were busy during this run; figures are noisy")
    aes = result.get("aesgcm", {})
    for backend, data in result["backends"].items():
        targets = [_Target(**{k: v for k, v in t.items() if k != "pass"}) for t in data["targets"]]
        lines += ["", f"=== {backend} " + "=" * (70 - len(backend))]
        lines += _throughput_lines(data, aes, targets)
        lines += _rtt_lines(data, targets)
        lines += _handshake_lines(data, targets)
        lines += _memory_lines(data, targets)
        lines += _linearity_lines(data, targets)
        passed = sum(t.passed for t in targets)
        lines += ["", f"Targets ({backend}): {passed}/{len(targets)} pass"]
        lines += [
            f"  {'PASS' if t.passed else 'FAIL'}  {t.name}: {_num(t.value)}{t.unit} "
            f"(target {t.op} {t.threshold:g}{t.unit}{' ' + t.ref if t.ref else ''})"
            for t in targets
        ]
    if aes:
        lines += _aes_lines(aes)
    return "\n".join(lines)


# -- the orchestrator: the whole run -----------------------------------------------------


def run(
    budget: Budget,
    backends: Sequence[str],
    *,
    families: Sequence[str] = FAMILIES,
    malloc_tuned: bool = False,
    say: Progress | None = None,
) -> dict[str, Any]:
    """Run the benchmark; return every figure (the structure ``--json`` writes)."""
    report = say or (lambda text: None)
    env = worker_env(malloc_tuned)
    started = time.monotonic()
    busy_before, own_before = _machine_busy_seconds(), _own_cpu_seconds()
    result: dict[str, Any] = {"meta": _meta(budget, backends, malloc_tuned), "backends": {}}
    aes_runs = [aes_ceiling(budget.aes_seconds) for _ in range(budget.rounds)]
    result["aesgcm"] = {
        size: {m: _median([r[size][m] for r in aes_runs]) for m in aes_runs[0][size]}
        for size in aes_runs[0]
    }
    with tempfile.TemporaryDirectory(prefix="stalk-bench-") as tmp:
        tls_files = make_certificate(Path(tmp))
        for backend in backends:

            def tell(text: str, backend: str = backend) -> None:
                report(f"[{backend} {time.monotonic() - started:5.0f}s] {text}")

            samples: Samples = {}
            cells = _cells(budget, families)
            if cells:
                pair = start_pair(backend, *tls_files, ["stalk", "stalk_big", "tls", "tcp"], env)
                try:
                    samples = _measure_rounds(pair, cells, budget, tell)
                finally:
                    pair.close()
            memory: dict[str, dict[str, float]] = {}
            if "memory" in families:
                for transport in TRANSPORTS:
                    memory[transport] = _measure_memory(backend, transport, budget, tls_files, env)
                    tell(f"memory {transport} done")
            summary = _summarise(samples, memory)
            summary["targets"] = [t.as_dict() for t in _targets(samples, summary)]
            summary["samples"] = samples
            result["backends"][backend] = summary
    seconds = time.monotonic() - started
    result["meta"]["seconds"] = seconds
    busy = _machine_busy_seconds()
    if busy is not None and busy_before is not None:
        others = busy - busy_before - (_own_cpu_seconds() - own_before)
        result["meta"]["other_cpus"] = max(0.0, others / seconds)
    return result


def _meta(budget: Budget, backends: Sequence[str], malloc_tuned: bool) -> dict[str, Any]:
    return {
        "budget": budget.name,
        "rounds": budget.rounds,
        "cell_seconds": budget.cell_seconds,
        "backends": list(backends),
        "stalk": stalk.__version__,
        "source": _source_revision(),
        "python": platform.python_version(),
        "anyio": _version("anyio"),
        "cryptography": cryptography.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "malloc": "tuned (MALLOC_MMAP_THRESHOLD_=32MiB, MALLOC_TRIM_THRESHOLD_=128MiB)"
        if malloc_tuned
        else "default",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sizes": list(SIZES),
        "loadavg_start": list(os.getloadavg()),
    }


def _machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine spent not idle since boot (Linux), steal included."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished (waited-for) workers."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _source_revision() -> str | None:
    """``git describe --always --dirty`` of the checkout stalk runs from, if it is one."""
    root = Path(stalk.__file__).resolve().parent.parent.parent
    if not (root / ".git").exists():
        return None
    try:
        # Read-only; "git" from PATH, fixed arguments.
        proc = subprocess.run(
            ["git", "describe", "--always", "--dirty"],  # noqa: S607
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return None
    return proc.stdout.strip() or None


def _version(distribution: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415 - only for the report header

    return version(distribution)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser`` (``stalk bench`` and ``python -m benchmarks``)."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="3 short rounds (within a minute)")
    size.add_argument(
        "--smoke", action="store_true", help="one tiny round: checks that every figure runs"
    )
    parser.add_argument(
        "--backends",
        metavar="LIST",
        help=f"comma-separated event loops (default: {','.join(available_backends())})",
    )
    parser.add_argument(
        "--figures", metavar="LIST", help=f"comma-separated subset of {','.join(FAMILIES)}"
    )
    parser.add_argument("--rounds", type=int, metavar="N", help="override the number of rounds")
    parser.add_argument(
        "--seconds", type=float, metavar="S", help="override the duration of one timed run"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument(
        "--malloc-tuned",
        action="store_true",
        help="run the workers with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _finite(node: Any) -> Any:
    """``node`` with every NaN/infinity replaced by ``None`` (strict JSON has neither)."""
    if isinstance(node, float) and not math.isfinite(node):
        return None
    if isinstance(node, dict):
        return {key: _finite(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_finite(value) for value in node]
    return node


def _split(text: str | None, allowed: Sequence[str], what: str) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise ValueError(f"unknown {what} {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return items


def run_from_args(args: argparse.Namespace) -> int:
    """Run with parsed :func:`add_arguments` options; print the table; return the exit status."""
    budget = BUDGETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.rounds is not None or args.seconds is not None:
        budget = Budget(
            budget.name,
            args.rounds or budget.rounds,
            args.seconds or budget.cell_seconds,
            budget.memory_connections,
            budget.linearity_big_count,
            budget.aes_seconds,
            budget.calibrate,
        )
    available = available_backends()
    backends = _split(args.backends, ["asyncio", "trio", "uvloop"], "backend") or available
    missing = [b for b in backends if b not in available]
    if missing:
        raise ValueError(f"not installed here: {', '.join(missing)}")
    families = _split(args.figures, FAMILIES, "figure") or list(FAMILIES)

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    try:
        result = run(budget, backends, families=families, malloc_tuned=args.malloc_tuned, say=say)
    except BenchError as exc:
        print(f"stalk bench: error: {exc}", file=sys.stderr)
        return 1
    print(format_report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(_finite(result), indent=1) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m stalk.bench`` and ``python -m benchmarks``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="stalk bench", description="stalk vs TLS 1.3 vs plain TCP over 127.0.0.1"
    )
    add_arguments(parser)
    try:
        return run_from_args(parser.parse_args(argv))
    except ValueError as exc:
        print(f"stalk bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
