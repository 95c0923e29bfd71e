"""Security hygiene: private keys never leak into repr, logs or error messages."""

from __future__ import annotations

import base64
import logging
from functools import partial

import anyio
import pytest

import stalk
from helpers import connected_pair
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
