"""Security hygiene: private keys never leak into repr, logs or error messages."""

from __future__ import annotations

import base64
import collections
import gc
import logging
from functools import partial

import anyio
import pytest

import stalk
import stalk.sync
from helpers import connected_pair
from stalk._noise import TransportCipher
from stalk.errors import StalkError


def secret_forms(identity: stalk.Identity) -> list[str]:
    raw = identity.private_bytes()
    return [
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        repr(raw)[2:-1],
    ]


def assert_no_secret(text: str, *identities: stalk.Identity) -> None:
    for identity in identities:
        for form in secret_forms(identity):
            assert form not in text


def test_reprs_show_no_private_key() -> None:
    pair = connected_pair()
    identities = [pair.client.identity, pair.server.identity]
    texts = [repr(i) for i in identities] + [str(i) for i in identities]
    texts += [repr(pair.client), repr(pair.server), repr(stalk.Config())]
    assert_no_secret("\n".join(texts), *identities)


def stalk_objects(*roots: object) -> list[object]:
    """Every stalk object reachable from ``roots`` through stalk objects and containers.

    Foreign objects (anyio streams, cryptography keys, the event loop) are not followed:
    their reprs are not ours, and through them everything in the process is reachable.
    """
    containers = (dict, list, tuple, set, frozenset, collections.deque)
    seen: set[int] = set()
    found: list[object] = []
    todo = list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        ours = type(obj).__module__.split(".")[0] == "stalk"
        if ours:
            found.append(obj)
        if ours or isinstance(obj, containers):
            todo.extend(gc.get_referents(obj))
    return found


def key_forms(raw: bytes) -> list[str]:
    return [raw.hex(), base64.b64encode(raw).decode().rstrip("="), repr(raw)[2:-1]]


@pytest.mark.anyio
async def test_no_repr_of_a_live_connection_listener_or_sync_connection_shows_a_key() -> None:
    """``repr`` and ``str`` of every stalk object a live connection holds (sessions,
    sealers, ciphers, handshake results...) show neither private key nor transport key."""
    server_id, client_id = stalk.Identity.generate(), stalk.Identity.generate()
    server_side: list[stalk.Connection] = []
    done = anyio.Event()

    async def handler(conn: stalk.Connection) -> None:
        server_side.append(conn)
        await conn.send(await conn.receive())
        await done.wait()

    async with await stalk.create_listener("127.0.0.1", 0, identity=server_id) as listener:
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(listener.serve, handler)
            async with await stalk.connect(
                host, port, server_id.public, identity=client_id
            ) as conn:
                await conn.send(stalk.Spack("hi"))
                await conn.receive()
                synced = await anyio.to_thread.run_sync(
                    partial(stalk.sync.connect, host, port, server_id.public, identity=client_id)
                )
                try:
                    objects = stalk_objects(listener, conn, server_side, synced)
                    texts = [f"{obj!r} {obj}" for obj in objects]
                    ciphers = [obj for obj in objects if type(obj) is TransportCipher]
                finally:
                    await anyio.to_thread.run_sync(synced.close)
            done.set()
            tg.cancel_scope.cancel()
    keys = [key for cipher in ciphers if isinstance(key := cipher._key, bytes)]
    assert len(keys) >= 4  # both directions of the client's and the server's connections
    assert {type(obj).__name__ for obj in objects} >= {"Session", "Sealer", "Receiver", "Link"}
    text = "\n".join(texts)
    assert_no_secret(text, server_id, client_id)
    for key in keys:
        for form in key_forms(key):
            assert form not in text


@pytest.mark.anyio
async def test_logs_and_errors_carry_no_private_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server_id, client_id = stalk.Identity.generate(), stalk.Identity.generate()
    errors: list[BaseException] = []

    async def handler(conn: stalk.Connection) -> None:
        spack = await conn.receive()
        if spack[0] == "fail":
            raise RuntimeError("handler failure")
        await conn.send(spack)

    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(
                stalk.listen,
                "127.0.0.1",
                0,
                handler,
                identity=server_id,
                authorize=lambda peer: peer == client_id.public,
            )
        )
        async with await stalk.connect(host, port, server_id.public, identity=client_id) as conn:
            await conn.send(stalk.Spack("ok"))
            await conn.receive()
        async with await stalk.connect(host, port, server_id.public, identity=client_id) as conn:
            await conn.send(stalk.Spack("fail"))
            with pytest.raises(StalkError) as info:
                await conn.receive()
            errors.append(info.value)
        for peer in (None, stalk.Identity.generate().public):
            with pytest.raises(StalkError) as failure:
                await stalk.connect(host, port, peer)  # unauthorized or wrong key
            errors.append(failure.value)
        tg.cancel_scope.cancel()
    text = caplog.text + "\n".join(f"{e!r} {e} {e.__cause__!r}" for e in errors)
    assert "handler failure" in caplog.text  # the logs did capture the interesting events
    assert_no_secret(text, server_id, client_id)
