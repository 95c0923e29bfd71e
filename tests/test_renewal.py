"""Online renewal: the authority service, request_certificate and CertificateKeeper."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import pytest

import stalk
from helpers import wait_until
from stalk import renewal
from stalk.certificates import Authorities, Authority, Certificate
from stalk.errors import (
    CertificateNameMismatch,
    IdentityFileError,
    PeerRefused,
    RenewalFailed,
    UnknownAuthority,
)
from stalk.identity import Identity
from stalk.renewal import AuthorityService, CertificateKeeper, Enrollments, request_certificate
from stalk.spack import Spack
from stalk.wire import CloseCode

CA = Authority.from_private_bytes(bytes(range(32)))
TRUST = Authorities([CA.public])
MEMBER = Identity.from_private_bytes(bytes(range(64, 96)))
OUTSIDER = Identity.from_private_bytes(bytes(range(96, 128)))


@pytest.fixture(autouse=True)
def _umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def enrolled(tmp_path: Path) -> Path:
    path = tmp_path / "enrolled"
    path.write_text(f"# key name groups\n{MEMBER.public} db-1 ops,db\n")
    return path


@asynccontextmanager
async def service(enrolled: Path, *, valid: int = 3600) -> AsyncIterator[AuthorityService]:
    async with (
        await AuthorityService.create(
            "127.0.0.1", 0, authority=CA, enrollments=Enrollments(enrolled), valid=valid
        ) as svc,
        anyio.create_task_group() as tg,
    ):
        await tg.start(svc.serve)
        yield svc
        tg.cancel_scope.cancel()


# -- enrollment files ------------------------------------------------------------------------


def test_enrollments_read_names_and_groups(enrolled: Path) -> None:
    enrollments = Enrollments(enrolled)
    entry = enrollments.get(MEMBER.public)
    assert entry is not None
    assert (entry.name, entry.groups) == ("db-1", ("db", "ops"))
    assert MEMBER.public in enrollments
    assert OUTSIDER.public not in enrollments
    assert len(enrollments) == 1


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("stalk:xyz db-1", "line 1: not a stalk public identity"),
        (f"{MEMBER.public}", "expected KEY NAME"),
        (f"{MEMBER.public} a b c", "expected KEY NAME"),
        (f"{MEMBER.public} db-1 {'g,' * 16}g", "at most 16 groups"),
        (f"{MEMBER.public} {'n' * 129}", "1 to 128 visible ASCII"),
        (f"{MEMBER.public} a\n{MEMBER.public} b", "line 2: .* is enrolled twice"),
    ],
)
def test_enrollments_refuse_malformed_lines(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "enrolled"
    path.write_text(line + "\n")
    with pytest.raises(IdentityFileError, match=match):
        Enrollments(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_an_enrollment_file_others_can_write_is_refused(enrolled: Path) -> None:
    enrolled.chmod(0o666)
    with pytest.raises(IdentityFileError, match="chmod go-w"):
        Enrollments(enrolled)


# -- the service and one renewal ------------------------------------------------------------


@pytest.mark.anyio
async def test_an_enrolled_key_gets_a_certificate(anyio_backend: str, enrolled: Path) -> None:
    async with service(enrolled, valid=600) as svc:
        before = int(time.time())
        cert = await request_certificate(*svc.address, identity=MEMBER, authorities=TRUST)
        assert (cert.name, cert.groups, cert.subject) == ("db-1", ("db", "ops"), MEMBER.public)
        assert before <= cert.not_before <= int(time.time())
        assert cert.not_after - cert.not_before == 600
        assert cert.issuer == CA.public.digest
        second = await request_certificate(*svc.address, identity=MEMBER, authorities=TRUST)
        assert second.serial != cert.serial
        assert svc.issued == 2


@pytest.mark.anyio
async def test_an_outsider_is_refused_in_the_handshake(anyio_backend: str, enrolled: Path) -> None:
    async with service(enrolled) as svc:
        with pytest.raises(PeerRefused) as info:
            await request_certificate(*svc.address, identity=OUTSIDER, authorities=TRUST)
        assert info.value.code == CloseCode.NOT_AUTHORIZED
        assert svc.issued == 0


@pytest.mark.anyio
async def test_the_enrollment_file_is_read_again_when_it_changes(
    anyio_backend: str, enrolled: Path
) -> None:
    async with service(enrolled) as svc:
        enrolled.write_text(f"{OUTSIDER.public} web-1\n")
        cert = await request_certificate(*svc.address, identity=OUTSIDER, authorities=TRUST)
        assert cert.name == "web-1"
        with pytest.raises(PeerRefused):
            await request_certificate(*svc.address, identity=MEMBER, authorities=TRUST)


@pytest.mark.anyio
async def test_the_service_is_trusted_by_its_own_certificate(
    anyio_backend: str, enrolled: Path
) -> None:
    async with service(enrolled) as svc:
        with pytest.raises(CertificateNameMismatch, match="'authority'"):
            await request_certificate(
                *svc.address, identity=MEMBER, authorities=TRUST, service_name="other"
            )
        stranger = Authorities([Authority.generate().public])
        with pytest.raises(UnknownAuthority):
            await request_certificate(*svc.address, identity=MEMBER, authorities=stranger)


@pytest.mark.anyio
async def test_other_requests_are_refused(anyio_backend: str, enrolled: Path) -> None:
    async with (
        service(enrolled) as svc,
        await stalk.connect(
            *svc.address, identity=MEMBER, authorities=TRUST, expect_name="authority"
        ) as conn,
    ):
        await conn.send(Spack("renew", "please"))
        assert list(await conn.receive()) == ["refused", "unknown request"]
        await conn.send(Spack("renew"))
        kind, data = await conn.receive()
        assert kind == "certificate"
        assert Certificate.from_bytes(data).name == "db-1"


@pytest.mark.anyio
async def test_a_refusal_after_the_handshake_is_renewal_failed(
    anyio_backend: str, enrolled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with service(enrolled) as svc:
        monkeypatch.setattr(svc, "_answer", lambda peer, request: Spack("refused", "not today"))
        with pytest.raises(RenewalFailed, match="not today") as info:
            await request_certificate(*svc.address, identity=MEMBER, authorities=TRUST)
        assert info.value.reason == "not today"


@pytest.mark.anyio
async def test_the_service_issues_its_own_certificate_again(
    anyio_backend: str, enrolled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(renewal, "RETRY_MIN", 0.05)
    async with service(enrolled, valid=1) as svc:
        first = svc.listener.certificate
        assert first is not None
        await wait_until(lambda: svc.listener.certificate is not first, timeout=5)
        assert svc.listener.certificate is not None
        assert svc.listener.certificate.name == "authority"


# -- keeping a certificate fresh ----------------------------------------------------------------


@pytest.mark.anyio
async def test_the_keeper_starts_with_a_certificate(anyio_backend: str, enrolled: Path) -> None:
    async with service(enrolled) as svc, anyio.create_task_group() as tg:
        keeper = CertificateKeeper(svc.address, identity=MEMBER, authorities=TRUST)
        cert = await tg.start(keeper.run)
        assert cert == keeper.certificate
        assert cert.name == "db-1"
        assert keeper.due_in() > 2000  # two thirds of 3600 s
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_the_keeper_renews_a_due_certificate_and_feeds_a_listener(
    anyio_backend: str, enrolled: Path
) -> None:
    now = int(time.time())
    due = CA.sign(MEMBER.public, "db-1", not_before=now - 100, not_after=now + 50)
    renewed = anyio.Event()
    async with (
        service(enrolled) as svc,
        await stalk.create_listener("127.0.0.1", 0, identity=MEMBER, certificate=due) as listener,
        anyio.create_task_group() as tg,
    ):

        def on_renewed(cert: Certificate) -> None:
            listener.certificate = cert
            renewed.set()

        keeper = CertificateKeeper(
            svc.address,
            identity=MEMBER,
            authorities=TRUST,
            certificate=due,
            on_renewed=on_renewed,
        )
        assert keeper.due_in() == 0
        await tg.start(keeper.run)
        with anyio.fail_after(10):
            await renewed.wait()
        assert keeper.renewals == 1
        assert keeper.certificate is not None
        assert keeper.certificate.serial != due.serial
        await tg.start(listener.serve, lambda conn: conn.aclose())
        async with await stalk.connect(
            *listener.address, authorities=TRUST, expect_name="db-1"
        ) as conn:
            assert conn.peer_certificate == keeper.certificate  # the listener presents it
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_the_keeper_logs_and_retries_when_renewal_fails(
    anyio_backend: str,
    enrolled: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="stalk.renewal")
    monkeypatch.setattr(renewal, "RETRY_MIN", 0.01)
    now = int(time.time())
    due = CA.sign(OUTSIDER.public, "x", not_before=now - 100, not_after=now + 50)
    async with service(enrolled) as svc, anyio.create_task_group() as tg:
        keeper = CertificateKeeper(
            svc.address, identity=OUTSIDER, authorities=TRUST, certificate=due
        )
        await tg.start(keeper.run)
        await wait_until(lambda: keeper.failures >= 2)
        tg.cancel_scope.cancel()
    assert keeper.certificate is due  # kept while renewals fail
    assert "renewing the certificate from" in caplog.records[0].getMessage()


@pytest.mark.anyio
async def test_the_keeper_fails_at_once_without_a_certificate(
    anyio_backend: str, enrolled: Path
) -> None:
    async with service(enrolled) as svc:
        keeper = CertificateKeeper(svc.address, identity=OUTSIDER, authorities=TRUST)
        with pytest.raises(PeerRefused):
            await keeper.run()  # before it ever started: no certificate to keep


@pytest.mark.anyio
async def test_a_service_that_never_answers_is_renewal_failed(
    anyio_backend: str, enrolled: Path
) -> None:
    silent = anyio.Event()

    async def mute(conn: stalk.Connection) -> None:
        await silent.wait()

    now = int(time.time())
    own = CA.sign(OUTSIDER.public, "authority", not_before=now, not_after=now + 60)
    async with anyio.create_task_group() as tg:
        address = await tg.start(
            partial(stalk.listen, "127.0.0.1", 0, mute, identity=OUTSIDER, certificate=own)
        )
        with pytest.raises(RenewalFailed, match=r"did not answer within 0\.2 s"):
            await request_certificate(*address, identity=MEMBER, authorities=TRUST, timeout=0.2)
        silent.set()
        tg.cancel_scope.cancel()
