"""Mistakes a type checker must catch in a user's program (tests/test_typing.py).

Each line that must fail names the mypy error codes it must fail with, after ``# E:``;
no other line may fail.
"""

from __future__ import annotations

import stalk
import stalk.sync


async def handler(conn: stalk.Connection) -> None:
    spack = await conn.receive()
    name, count = spack.unpack(str, int)
    print(name + 1)  # E: operator
    print(count.upper())  # E: attr-defined
    if conn.pattern == "NN":  # E: comparison-overlap
        return
    await conn.send(stalk.Spack(object()))  # E: arg-type
    await conn.send(spack.values)  # E: arg-type


async def serve(listener: stalk.Listener) -> None:
    await listener.serve(lambda conn: None)  # E: arg-type return-value


async def unix(listener: stalk.UnixListener, anywhere: stalk.StreamListener) -> None:
    _host, _port = listener.address  # E: str-unpack
    await stalk.connect(*anywhere.address)  # E: misc


def blocking(conn: stalk.sync.SyncConnection) -> None:
    if conn.pattern == "xx":  # E: comparison-overlap
        return
