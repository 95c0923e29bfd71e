"""What the benchmark's workers and orchestrator share.

Budgets, framing for TLS and TCP, TLS material, statistics, and the JSON-lines protocol
between the processes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import ssl
import statistics
import struct
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final, TypeAlias

import anyio
import msgpack
from anyio.abc import AsyncResource, ByteStream

import stalk
from stalk.bench import HOST, READ_SIZE

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
    :param fanout: concurrent request/response streams of the fan-out figure (channels on
        one connection, and as many connections of each transport).
    """

    name: str
    rounds: int
    cell_seconds: float
    memory_connections: int
    linearity_big_count: int
    aes_seconds: float
    calibrate: bool = True
    fanout: int = 1000


BUDGETS: Final = {
    "full": Budget("full", 7, 0.3, 1000, 1, 0.3),
    "quick": Budget("quick", 3, 0.04, 200, 1, 0.04),
    "smoke": Budget("smoke", 1, 0.01, 100, 1, 0.01, calibrate=False, fanout=50),
}


def _run_loop(fn: Callable[[], Awaitable[Any]], backend: str) -> Any:
    if backend == "uvloop":
        return anyio.run(fn, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(fn, backend=backend)


# -- shared helpers ----------------------------------------------------------------------


def rss_bytes() -> int:
    """The resident set size of the calling process (Linux: current; elsewhere: the peak)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        import resource  # noqa: PLC0415 - Unix only
    except ImportError:  # Windows: no per-process figure without more machinery
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _raise_fd_limit(wanted: int = 8192) -> None:
    """Let a worker open ``wanted`` sockets where the hard limit allows (Unix only)."""
    try:
        import resource  # noqa: PLC0415 - Unix only
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _fd_limit() -> int | None:
    """The soft limit on open files (Unix); ``None`` where there is none or it is unknown."""
    try:
        import resource  # noqa: PLC0415 - Unix only
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


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


#: A stream of spacks the client times: a stalk connection, one of its channels, or a
#: TLS/TCP connection with the framing of the workload.
_Stream: TypeAlias = stalk.Connection | stalk.Channel | _Framed


#: Whatever ends a connection's command loop: the peer went away, cleanly or not.
_ENDED: Final = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
    stalk.StalkError,
)


async def _close_quietly(conn: AsyncResource | _Framed) -> None:
    with contextlib.suppress(*_ENDED):
        await conn.aclose()


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _read_stdin_line() -> str:
    return await anyio.to_thread.run_sync(sys.stdin.readline)


#: Every figure's samples, by cell key: one dict of metrics per round.
Samples = dict[str, list[dict[str, float]]]
#: Where progress lines go.
Progress = Callable[[str], None]


#: Seed of the authority the benchmark's certified handshakes trust. A fixed, public key:
#: both workers sign their own certificates with it, so nothing has to be passed between
#: processes (never do this outside a benchmark).
_BENCH_AUTHORITY_SEED: Final = b"stalk bench authority, not secret"[:32]
#: Validity of the benchmark's certificates around the time they are issued.
_BENCH_VALIDITY: Final = 86_400


def bench_authority() -> stalk.Authority:
    """The authority of the certified handshake figures (see :data:`_BENCH_AUTHORITY_SEED`)."""
    return stalk.Authority.from_private_bytes(_BENCH_AUTHORITY_SEED)


def bench_certificate(
    identity: stalk.Identity, name: str, serial: int, now: int
) -> stalk.Certificate:
    """A certificate from :func:`bench_authority` for ``identity``, valid around ``now``."""
    return bench_authority().sign(
        identity.public,
        name,
        ["bench"],
        not_before=now - 60,
        not_after=now + _BENCH_VALIDITY,
        serial=serial,
    )
