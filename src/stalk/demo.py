"""``stalk demo``: a self-contained tour of stalk on loopback that checks every byte.

It starts a listener on 127.0.0.1 (port 0), connects with XX (learning the server's key and
recording it in a temporary known-peers file), connects again with IK (pinning that key),
exchanges a spack of every value type and one 20 MiB fragmented spack, checks everything
that comes back, shows that a wrong pinned key is refused, and prints a short report. No
file outside a temporary directory is touched. The result is ``True`` only if every check
passed.
"""

from __future__ import annotations

import array
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio

from stalk.config import Config
from stalk.connection import Connection, connect
from stalk.errors import PeerIdentityMismatch, StalkError
from stalk.identity import Identity
from stalk.known_peers import KnownPeers
from stalk.listener import listen
from stalk.spack import Float32, Spack

__all__ = ["EVERY_TYPE", "run_demo"]

#: One spack holding every kind of value stalk carries.
EVERY_TYPE = Spack(
    None,
    True,
    -(2**63),
    2**64 - 1,
    3.141592653589793,
    Float32(1.5),
    "unicode: héllo ✓",
    b"\x00\x01\xfe\xff",
    [1, "two", [3.0]],
    ("a", "tuple"),
    {"key": "value", b"raw": [None]},
    array.array("d", [0.5, -2.25]),
    array.array("i", range(-3, 4)),
)
BLOB_SIZE = 20 * 1024 * 1024


def _same(a: object, b: object) -> bool:
    """Equal values with equal types, all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple, Spack)):
        other = list(b)  # type: ignore[call-overload]
        return len(a) == len(other) and all(_same(x, y) for x, y in zip(a, other, strict=True))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, array.array):
        assert isinstance(b, array.array)
        return a.typecode == b.typecode and a == b
    return a == b


async def _echo(conn: Connection) -> None:
    async for spack in conn:
        await conn.send(spack)


class _Report:
    """Collects named checks and prints them as they happen."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self.checks: list[bool] = []

    def check(self, name: str, ok: bool) -> None:
        self.checks.append(ok)
        self.out(f"  [{'ok' if ok else 'FAILED'}] {name}")


_CONFIG = Config(max_message_size=32 * 1024 * 1024)


async def _first_contact(
    report: _Report, host: str, port: int, *, server: Identity, client: Identity, known: KnownPeers
) -> None:
    report.out("1. first contact with XX (the client does not know the server's key)")
    started = time.perf_counter()
    async with await connect(host, port, identity=client, config=_CONFIG) as conn:
        elapsed = time.perf_counter() - started
        report.check(f"handshake {conn.pattern} in {elapsed * 1000:.1f} ms", conn.pattern == "XX")
        report.check("learned the server's real key", conn.peer == server.public)
        known.remember(host, port, conn.peer)
        await conn.send(EVERY_TYPE)
        echoed = await conn.receive()
        report.check("spack of every value type echoed intact", _same(echoed, EVERY_TYPE))


async def _pinned(
    report: _Report, host: str, port: int, client: Identity, known: KnownPeers
) -> None:
    report.out("2. reconnect with IK, pinning the key recorded in known_peers")
    pinned = known.lookup(host, port)
    started = time.perf_counter()
    async with await connect(host, port, pinned, identity=client, config=_CONFIG) as conn:
        elapsed = time.perf_counter() - started
        report.check(f"handshake {conn.pattern} in {elapsed * 1000:.1f} ms", conn.pattern == "IK")
        report.out(f"  handshake hash   {conn.handshake_hash.hex()[:32]}...")
        blob = os.urandom(BLOB_SIZE)
        started = time.perf_counter()
        await conn.send(Spack("blob", blob))
        echoed = await conn.receive()
        elapsed = time.perf_counter() - started
        body = echoed[1]
        intact = (
            echoed[0] == "blob"
            and isinstance(body, bytes)
            and hashlib.sha256(body).digest() == hashlib.sha256(blob).digest()
        )
        pieces = BLOB_SIZE // 65511 + 1
        report.check(
            f"20 MiB spack (fragmented into ~{pieces} Noise messages) echoed intact", intact
        )
        rate = 2 * BLOB_SIZE / elapsed / 1e6
        report.out(
            f"  round trip       {elapsed * 1000:.0f} ms ({rate:.0f} MB/s both ways together)"
        )


async def _impostor(report: _Report, host: str, port: int) -> None:
    report.out("3. a wrong pinned key must be refused, never silently accepted")
    refused = False
    try:
        async with await connect(host, port, Identity.generate().public, config=_CONFIG):
            pass
    except PeerIdentityMismatch as exc:
        refused = True
        report.out(f"  refused: {exc}")
    except StalkError as exc:
        report.out(f"  unexpected error: {exc!r}")
    report.check("connection with a wrong pinned key refused (PeerIdentityMismatch)", refused)


async def run_demo(out: Callable[[str], None] = print) -> bool:
    """Run the demo, printing through ``out``; return whether every check passed."""
    report = _Report(out)
    server_id = Identity.generate()
    client_id = Identity.generate()
    with tempfile.TemporaryDirectory(prefix="stalk-demo-") as home:
        known = KnownPeers(Path(home) / "known_peers")
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(
                partial(listen, "127.0.0.1", 0, _echo, identity=server_id, config=_CONFIG)
            )
            out(f"stalk demo: listener on {host}:{port}")
            out(f"  server identity  {server_id.public}")
            out(f"  server key       {server_id.public.fingerprint}")
            out(f"  client key       {client_id.public.fingerprint}")
            out("")
            await _first_contact(
                report, host, port, server=server_id, client=client_id, known=known
            )
            out("")
            await _pinned(report, host, port, client_id, known)
            out("")
            await _impostor(report, host, port)
            tg.cancel_scope.cancel()
    passed, total = sum(report.checks), len(report.checks)
    out("")
    out(f"{passed} of {total} checks passed" + ("" if passed == total else " -- FAILURE"))
    return passed == total
