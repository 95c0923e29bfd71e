"""Load: a thousand concurrent connections, and a gigabyte soak on one connection.

Both carry checksummed messages verified where they arrive: every message holds its
connection id, its sequence number and the SHA-256 of its payload, and each side keeps a
running SHA-256 chain over everything it received, so a lost, duplicated, reordered or
corrupted message fails the test at the receiver.

All traffic is on 127.0.0.1 and bounded in count and time. Run ``pytest -m slow`` for the
soak on both backends (the default run soaks on asyncio only).
"""

from __future__ import annotations

import hashlib
import random
import resource
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import pytest

from helpers import wait_until
from stalk import _noise
from stalk.config import Config
from stalk.connection import Connection, connect
from stalk.identity import Identity
from stalk.listener import create_listener
from stalk.spack import Spack

CONNECTIONS = 1_000
#: every XX_EVERY-th connection runs XX, the others IK (cheaper: no extra round trip)
XX_EVERY = 10
MESSAGES = 8
#: handshakes in flight at once from the clients, all from 127.0.0.1 (the listener's
#: per-address cap is raised to match; its global max_handshakes is 256)
CONNECT_CONCURRENCY = 64
LOAD_DEADLINE = 120.0

SOAK_BYTES = 1 << 30
SOAK_DEADLINE = 240.0
SOAK_REKEY_AFTER_MESSAGES = 256
#: exact sizes around the fragment boundaries (a spack's plaintext is at most 65516 bytes,
#: 65511 of them for a MESSAGE record's body)
SOAK_SMALL = (64, 100, 200, 500, 1000, 2048, 4096)
SOAK_MEDIUM = (8192, 16_384, 32_768, 65_000, 65_450, 65_511, 65_512, 65_536)
SOAK_LARGE = (100_000, 131_072, 262_144, 500_000, 1 << 20, (1 << 20) + 17, (2 << 20) + 1)


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:  # pragma: no cover - depends on the machine
        pytest.skip(f"open-file limit {soft} < {needed} (hard limit {hard})")


def _digest(cid: int, seq: int, payload: bytes) -> bytes:
    h = hashlib.sha256(cid.to_bytes(8, "big"))
    h.update(seq.to_bytes(8, "big"))
    h.update(payload)
    return h.digest()


def _check(spack: Spack, tag: str, cid: int, seq: int) -> bytes:
    """The payload of message ``seq`` of connection ``cid``; fails on any difference."""
    values = list(spack)
    assert len(values) == 5, f"malformed message on connection {cid}: {len(values)} values"
    got_tag, got_cid, got_seq, payload, digest = values
    assert isinstance(payload, bytes)
    assert got_tag == tag
    assert isinstance(got_cid, int)
    assert isinstance(got_seq, int)
    assert digest == _digest(got_cid, got_seq, payload), f"corrupted message {cid}/{seq}"
    assert got_cid == cid, f"message of connection {got_cid} on connection {cid}"
    assert got_seq == seq, f"connection {cid}: message {got_seq} where {seq} was due"
    return payload


# -- a thousand concurrent connections -----------------------------------------------------------


@dataclass
class _Server:
    active: int = 0
    peak: int = 0
    received: int = 0
    patterns: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


async def _load_handler(conn: Connection, server: _Server) -> None:
    server.active += 1
    server.peak = max(server.peak, server.active)
    server.patterns[conn.pattern] += 1
    try:
        hello = await conn.receive()
        cid = hello[1]
        assert hello[0] == "hello"
        assert isinstance(cid, int)
        await conn.send(Spack("welcome", cid))
        chain = hashlib.sha256()
        seq = 0
        async for spack in conn:  # ends with the client's CLOSE
            payload = _check(spack, "m", cid, seq)
            chain.update(spack[4])
            await conn.send(Spack("e", cid, seq, payload, _digest(cid, seq, payload)))
            seq += 1
            server.received += 1
        await conn.send(Spack("sum", cid, seq, chain.digest()))
    except Exception as exc:
        server.errors.append(repr(exc))
        raise
    finally:
        server.active -= 1


async def test_a_thousand_concurrent_connections(anyio_backend: str) -> None:
    _raise_fd_limit(4 * CONNECTIONS + 256)
    server_id = Identity.generate()
    server = _Server()
    connected = 0
    all_open = anyio.Event()
    handshakes = anyio.Semaphore(CONNECT_CONCURRENCY)
    verified: Counter[str] = Counter()
    started = time.perf_counter()
    timings: dict[str, float] = {}

    async def client(cid: int, host: str, port: int) -> None:
        nonlocal connected
        rng = random.Random(cid)
        pin = None if cid % XX_EVERY == 0 else server_id.public
        async with handshakes:
            conn = await connect(host, port, pin, config=Config(handshake_timeout=30))
        # Half the clients write through a writer task (async with), half directly.
        async with conn if cid % 2 else _no_writer(conn):
            await conn.send(Spack("hello", cid))
            assert await conn.receive() == Spack("welcome", cid)
            connected += 1
            if connected == CONNECTIONS:
                timings["all connected"] = time.perf_counter() - started
                all_open.set()
            await all_open.wait()  # every connection is open at once from here
            chain = hashlib.sha256()
            for seq in range(MESSAGES):
                size = rng.choice((0, 1, 64, 500, 2048, 9000)) if seq else 70_000 * (cid % 97 == 0)
                payload = rng.randbytes(size)
                digest = _digest(cid, seq, payload)
                chain.update(digest)
                await conn.send(Spack("m", cid, seq, payload, digest))
            await conn.send_eof()
            for seq in range(MESSAGES):
                _check(await conn.receive(), "e", cid, seq)
                verified["echoes"] += 1
            assert await conn.receive() == Spack("sum", cid, MESSAGES, chain.digest())
            with pytest.raises(anyio.EndOfStream):
                await conn.receive()
            verified["connections"] += 1

    with anyio.fail_after(LOAD_DEADLINE):
        # Every client is on 127.0.0.1 and all are open at once: the caps are raised to fit.
        config = Config(max_connections=CONNECTIONS, max_handshakes_per_address=CONNECT_CONCURRENCY)
        async with await create_listener(
            "127.0.0.1", 0, identity=server_id, config=config
        ) as listener:
            host, port = listener.address
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, lambda conn: _load_handler(conn, server))
                async with anyio.create_task_group() as clients:
                    for cid in range(CONNECTIONS):
                        clients.start_soon(client, cid, host, port)
                timings["done"] = time.perf_counter() - started
                await wait_until(lambda: not server.active, timeout=LOAD_DEADLINE)
                tg.cancel_scope.cancel()
    print(
        f"\nload/{anyio_backend}: {CONNECTIONS} connections ({dict(server.patterns)}), "
        f"peak {server.peak} open at once, {server.received} messages in and "
        f"{verified['echoes']} echoes out verified; all connected after "
        f"{timings['all connected']:.1f} s, done after {timings['done']:.1f} s"
    )
    assert not server.errors, server.errors[:5]
    assert server.peak == CONNECTIONS
    assert server.patterns == {
        "IK": CONNECTIONS - CONNECTIONS // XX_EVERY,
        "XX": CONNECTIONS // XX_EVERY,
    }
    assert server.received == verified["echoes"] == CONNECTIONS * MESSAGES
    assert verified["connections"] == CONNECTIONS


class _no_writer:
    """``async with`` that closes the connection without starting its writer task."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def __aenter__(self) -> Connection:
        return self._conn

    async def __aexit__(self, *exc_info: object) -> None:
        await self._conn.aclose()


# -- the soak ------------------------------------------------------------------------------------


def _soak_sizes(seed: int) -> Iterator[int]:
    """Sizes in a fixed pseudo-random mix until SOAK_BYTES: many small, most bytes large."""
    rng = random.Random(seed)
    total = 0
    forced = list(SOAK_MEDIUM + SOAK_LARGE)  # every boundary size at least once, early
    while total < SOAK_BYTES:
        if forced:
            size = forced.pop()
        else:
            r = rng.random()
            table = SOAK_SMALL if r < 0.6 else SOAK_MEDIUM if r < 0.85 else SOAK_LARGE
            size = rng.choice(table)
        total += size
        yield size


@dataclass
class _SoakStats:
    messages: int = 0
    bytes: int = 0
    rekeys: Counter[int] = field(default_factory=Counter)


async def _soak(anyio_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stats = _SoakStats()
    original_rekey = _noise.TransportCipher.rekey

    def counting_rekey(self: _noise.TransportCipher) -> None:
        stats.rekeys[id(self)] += 1
        original_rekey(self)

    monkeypatch.setattr(_noise.TransportCipher, "rekey", counting_rekey)
    config = Config(rekey_after_messages=SOAK_REKEY_AFTER_MESSAGES, write_timeout=30)
    pool = random.Random(7).randbytes(4 << 20)
    server_id = Identity.generate()
    acked: list[int] = []
    chain_in = hashlib.sha256()

    async def sink(conn: Connection) -> None:
        seq = 0
        async for spack in conn:
            payload = _check(spack, "m", 0, seq)
            chain_in.update(spack[4])
            stats.messages += 1
            stats.bytes += len(payload)
            if seq % 16 == 15:  # acknowledge now and then: the client checks these too
                await conn.send(Spack("ack", seq))
            seq += 1
        await conn.send(Spack("sum", seq, chain_in.digest()))

    async def read_acks(conn: Connection, chain_out: hashlib._Hash, total: list[int]) -> None:
        while True:
            reply = await conn.receive()
            if reply[0] == "sum":
                assert reply[1] == total[0]
                assert reply[2] == chain_out.digest()
                return
            assert reply[0] == "ack"
            assert isinstance(reply[1], int)
            assert not acked or reply[1] == acked[-1] + 16
            acked.append(reply[1])

    started = time.perf_counter()
    with anyio.fail_after(SOAK_DEADLINE):
        async with await create_listener("127.0.0.1", 0, identity=server_id, config=config) as lst:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lst.serve, sink)
                async with await connect(*lst.address, server_id.public, config=config) as conn:
                    chain_out = hashlib.sha256()
                    total = [0]
                    async with anyio.create_task_group() as io:
                        io.start_soon(read_acks, conn, chain_out, total)
                        for seq, size in enumerate(_soak_sizes(seed=11)):
                            offset = (seq * 7919) % (len(pool) - size)
                            payload = pool[offset : offset + size]
                            digest = _digest(0, seq, payload)
                            chain_out.update(digest)
                            await conn.send(Spack("m", 0, seq, payload, digest))
                            total[0] = seq + 1
                        await conn.send_eof()
                tg.cancel_scope.cancel()
    elapsed = time.perf_counter() - started
    per_cipher = sorted(stats.rekeys.values(), reverse=True)
    print(
        f"\nsoak/{anyio_backend}: {stats.messages} messages, {stats.bytes / 2**30:.3f} GiB "
        f"verified in {elapsed:.1f} s = {stats.bytes / 2**20 / elapsed:.0f} MiB/s; "
        f"rekeys per cipher state {per_cipher[:4]}; {len(acked)} acks"
    )
    assert stats.bytes >= SOAK_BYTES
    # Sender and receiver rekeyed in step, dozens of times (the ack direction a few times).
    assert per_cipher[0] == per_cipher[1] >= 48


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_soak_one_gibibyte(anyio_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default run soaks on asyncio; ``-m slow`` runs both backends."""
    await _soak(anyio_backend, monkeypatch)


@pytest.mark.slow
async def test_soak_one_gibibyte_every_backend(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("a long soak: run with -m slow")
    await _soak(anyio_backend, monkeypatch)
