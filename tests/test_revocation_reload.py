"""A listener's revocation list file, read again when it changes (at the next client).

A new version revokes from the next handshake on; a version that is damaged, deleted,
older than the list in force, or signed by a stranger changes nothing (a revocation is
never undone by a file) and is logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import pytest

import stalk
from stalk.certificates import Authorities, Authority, RevocationFile
from stalk.errors import IdentityFileError, PeerRefused, RevocationListError
from stalk.identity import Identity
from stalk.wire import CloseCode

CA = Authority.from_private_bytes(bytes(range(32)))
STRANGER_CA = Authority.from_private_bytes(bytes(range(1, 33)))
SERVER = Identity.from_private_bytes(bytes(range(96, 128)))
CLIENT = Identity.from_private_bytes(bytes(range(64, 96)))
T0 = int(time.time())
CLIENT_CERT = CA.sign(CLIENT.public, "alice", not_before=T0 - 60, not_after=T0 + 3600, serial=7)


@pytest.fixture
def revoked(tmp_path: Path) -> Path:
    """A revocation list file, at first revoking nothing."""
    path = tmp_path / "revoked"
    CA.revoke([], issued_at=T0).save(path)
    return path


async def _echo(conn: stalk.Connection) -> None:
    async for spack in conn:
        await conn.send(spack)


@asynccontextmanager
async def listening(revocations: Path) -> AsyncIterator[tuple[str, int]]:
    async with anyio.create_task_group() as tg:
        address = await tg.start(
            partial(
                stalk.listen,
                "127.0.0.1",
                0,
                _echo,
                identity=SERVER,
                authorities=Authorities([CA.public]),
                revocations=revocations,
            )
        )
        yield address
        tg.cancel_scope.cancel()


async def admitted(address: tuple[str, int]) -> bool:
    """Whether the listener admits CLIENT now (refused: with CERTIFICATE_REFUSED, revoked)."""
    try:
        async with await stalk.connect(*address, identity=CLIENT, certificate=CLIENT_CERT) as conn:
            await conn.send(stalk.Spack(1))
            assert list(await conn.receive()) == [1]
    except PeerRefused as exc:
        refusal = (exc.code, exc.reason)
    else:
        return True
    assert refusal == (CloseCode.CERTIFICATE_REFUSED, "certificate revoked")
    return False


@pytest.mark.anyio
async def test_a_new_list_revokes_from_the_next_handshake(
    anyio_backend: str, revoked: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stalk.listener")
    async with listening(revoked) as address:
        assert await admitted(address)
        CA.revoke([7], issued_at=T0 + 1).save(revoked, overwrite=True)
        assert not await admitted(address)
        CA.revoke([], issued_at=T0 + 2).save(revoked, overwrite=True)  # newer, lifts it
        assert await admitted(address)
    reloads = [r.getMessage() for r in caplog.records if "reloaded:" in r.getMessage()]
    assert reloads == [
        f"revocation list {revoked} reloaded: 1 serials and 0 keys revoked "
        f"(issued {stalk.certificates.utc_text(T0 + 1)})",
        f"revocation list {revoked} reloaded: 0 serials and 0 keys revoked "
        f"(issued {stalk.certificates.utc_text(T0 + 2)})",
    ]


@pytest.mark.anyio
async def test_no_file_ever_undoes_a_revocation(
    anyio_backend: str, revoked: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="stalk.listener")
    async with listening(revoked) as address:
        CA.revoke([7], issued_at=T0 + 10).save(revoked, overwrite=True)
        assert not await admitted(address)
        damaged = revoked.read_text().replace("stalk-revocations:l", "stalk-revocations:m")
        older = CA.revoke([], issued_at=T0 + 5)
        stranger = STRANGER_CA.revoke([], issued_at=T0 + 20)
        versions: list[tuple[str, Callable[[], object]]] = [
            ("damaged", partial(revoked.write_text, damaged)),
            ("older", partial(older.save, revoked, overwrite=True)),
            ("stranger", partial(stranger.save, revoked, overwrite=True)),
            ("deleted", revoked.unlink),
        ]
        for what, change in versions:
            caplog.clear()
            change()
            assert not await admitted(address), what
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1, (what, warnings)
            assert warnings[0].startswith(f"revocation list {revoked} not reloaded"), what
            caplog.clear()
            assert not await admitted(address), what
            assert caplog.records == [], what  # one warning per version, not per client


@pytest.mark.anyio
async def test_clients_arriving_together_after_a_change_all_see_it(
    anyio_backend: str, revoked: Path
) -> None:
    async with listening(revoked) as address:
        assert await admitted(address)
        CA.revoke([7], issued_at=T0 + 1).save(revoked, overwrite=True)
        results: list[bool] = []

        async def one() -> None:
            results.append(await admitted(address))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
    assert results == [False] * 8


@pytest.mark.anyio
async def test_a_client_arriving_during_a_reload_waits_for_the_new_list(
    anyio_backend: str, revoked: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's new version counts as read as soon as its reading starts (in a worker
    thread); a client arriving before the list is in force must wait for it, not be
    checked against the old one. The reading is held open here until the second client
    had every chance to get through."""
    entered, release = threading.Event(), threading.Event()
    read = RevocationFile.read

    def slow_read(self: RevocationFile) -> stalk.RevocationList:
        loaded = read(self)
        entered.set()
        release.wait(10)
        return loaded

    async with listening(revoked) as address:
        assert await admitted(address)
        monkeypatch.setattr(RevocationFile, "read", slow_read)
        CA.revoke([7], issued_at=T0 + 1).save(revoked, overwrite=True)
        results: dict[str, bool] = {}

        async def one(name: str) -> None:
            results[name] = await admitted(address)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "first")
            await anyio.to_thread.run_sync(entered.wait, 10)
            tg.start_soon(one, "second")
            with anyio.move_on_after(0.5):  # the second must not get through meanwhile
                while "second" not in results:
                    await anyio.sleep(0.01)
            release.set()
    assert results == {"first": False, "second": False}


@pytest.mark.anyio
async def test_a_listener_refuses_to_start_on_a_bad_list(
    anyio_backend: str, tmp_path: Path
) -> None:
    trust = Authorities([CA.public])
    start = partial(stalk.create_listener, "127.0.0.1", 0, identity=SERVER)
    with pytest.raises(IdentityFileError, match="does not exist"):
        await start(authorities=trust, revocations=tmp_path / "missing")
    STRANGER_CA.revoke([1], issued_at=T0).save(tmp_path / "theirs")
    with pytest.raises(RevocationListError, match="not a trusted authority"):
        await start(authorities=trust, revocations=tmp_path / "theirs")
    with pytest.raises(ValueError, match="need authorities"):
        await start(revocations=tmp_path / "theirs")


def test_revocation_file_notices_every_change(revoked: Path) -> None:
    trust = Authorities([CA.public])
    watched = RevocationFile(revoked, trust)
    assert trust.revocations[0].issued_at == T0
    assert not watched.changed()
    CA.revoke([7], issued_at=T0 + 1).save(revoked, overwrite=True)  # a new file (rename)
    assert watched.changed()
    assert watched.apply(watched.read())
    assert not watched.changed()
    with revoked.open("a") as f:  # an edit in place
        f.write("# a comment\n")
    assert watched.changed()
    assert not watched.apply(watched.read())  # the same list: not newer
    revoked.unlink()
    assert watched.changed()
    with pytest.raises(IdentityFileError):
        watched.read()
    assert not watched.changed()  # a failed version counts as seen: no retry per client
