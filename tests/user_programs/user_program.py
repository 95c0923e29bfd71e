"""A program written as a user would, against the public API as README.md shows it.

Not run: tests/test_typing.py type-checks it with mypy --strict and expects no error;
each ``reveal_type`` pins, after ``# R:``, what mypy infers where the API promises a
precise type.
"""

from __future__ import annotations

from functools import partial

import anyio

import stalk
import stalk.sync


async def handler(conn: stalk.Connection) -> None:
    async for spack in conn:
        op, count = spack  # elements are Any: arithmetic needs no cast
        print(op, count + 1)
        name, amount = spack.unpack(str, int)
        reveal_type(spack.unpack(str, int))  # R: tuple[str, int]
        await conn.send(stalk.Spack("ok", name.upper(), amount + 1))


def describe(value: stalk.Received) -> str:
    """Narrowing a received value, the way the union is meant to be used."""
    if isinstance(value, int):
        return str(value + 1)
    if isinstance(value, (bytes, str)):
        return f"{len(value)} long"
    if isinstance(value, dict):
        return ", ".join(key if isinstance(key, str) else key.hex() for key in value)
    return repr(value)


async def main() -> None:
    server = stalk.Identity.generate()
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(partial(stalk.listen, "127.0.0.1", 0, handler, identity=server))
        async with await stalk.connect(host, port, peer=server.public) as conn:
            await conn.send(stalk.Spack("add", 2))
            status, name, total = (await conn.receive()).unpack(str, str, int)
            print(status.lower(), name, total * 2)
            reveal_type(conn.pattern)  # R: Literal['XX'] | Literal['IK']
            pattern = conn.extra(stalk.StalkAttribute.pattern)
            reveal_type(pattern)  # R: Literal['XX'] | Literal['IK']
            print(describe((await conn.receive())[0]))

        listener = await stalk.create_listener("127.0.0.1", 0, identity=server)
        async with listener:
            serving: anyio.abc.Listener[stalk.Connection] = listener
            print(await tg.start(serving.serve, handler), repr(listener))
            reveal_type(listener.address)  # R: tuple[str, int]
        tg.cancel_scope.cancel()


async def over_a_unix_socket(server: stalk.Identity) -> None:
    async with await stalk.create_unix_listener("/tmp/app.sock", identity=server) as unix:
        reveal_type(unix.address)  # R: str
        any_listener: stalk.StreamListener = unix
        reveal_type(any_listener.address)  # R: tuple[str, int] | str | None
    async with await stalk.connect_unix("/tmp/app.sock", server.public) as conn:
        reveal_type(conn.path)  # R: str | None


def blocking(host: str, port: int, key: stalk.PublicIdentity) -> int:
    with stalk.sync.connect(host, port, key) as conn:
        conn.send(stalk.Spack("add", 1, 2.5, b"raw", [1, "x"], {"k": None}))
        reveal_type(conn.pattern)  # R: Literal['XX'] | Literal['IK']
        (total,) = conn.receive().unpack(int)
        for spack in conn:
            print(spack)
        return total + 1


anyio.run(main)
