"""The ``stalk authority`` and ``stalk cert`` commands, run in-process with a private STALK_HOME.

Every failure must be one ``stalk: error:`` line (or argparse's usage error), never a
traceback; the files they write are checked with the library.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import stalk
from stalk.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main

NESTED = (
    ("authority", "init"),
    ("authority", "sign"),
    ("authority", "revoke"),
    ("authority", "serve"),
    ("cert", "show"),
    ("cert", "renew"),
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "stalk-home"
    monkeypatch.setenv("STALK_HOME", str(path))
    old = os.umask(0o022)
    try:
        yield path
    finally:
        os.umask(old)


def stalk_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``stalk ARGS`` in this process: its status, standard output and error."""
    try:
        status = main(list(args))
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("stalk: error: ")
    return lines[0].removeprefix("stalk: error: ")


@pytest.fixture
def authority(home: Path, capsys: pytest.CaptureFixture[str]) -> stalk.Authority:
    status, _, err = stalk_cli(capsys, "authority", "init")
    assert status == EXIT_OK, err
    return stalk.Authority.load(home / "authority")


SUBJECT = stalk.Identity.generate()


@pytest.mark.parametrize("command", NESTED)
def test_every_command_has_a_description_an_example_and_the_exit_statuses(
    capsys: pytest.CaptureFixture[str], command: tuple[str, str]
) -> None:
    status, raw, _ = stalk_cli(capsys, *command, "--help")
    assert status == EXIT_OK
    usage, description = raw.split("\n\n")[:2]
    assert usage.startswith(f"usage: stalk {' '.join(command)} ")
    assert len(description) > 100, description
    text = " ".join(raw.split())
    assert f"examples: stalk {' '.join(command)}" in text
    assert "global options (before or after the command): --backend {asyncio,trio}" in text
    assert f"{EXIT_INTERRUPTED} interrupted (Ctrl-C), silently" in text


def test_authority_init_prints_the_public_form(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = stalk_cli(capsys, "authority", "init")
    assert status == EXIT_OK
    path = home / "authority"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    public, fingerprint = out.splitlines()[-1].split()
    authority = stalk.Authority.load(path)
    assert public == str(authority.public)
    assert fingerprint == authority.public.fingerprint
    assert (home / "authority.pub").read_text() == f"{public}\n"
    status, _, err = stalk_cli(capsys, "authority", "init")
    assert status == EXIT_ERROR
    assert "--force" in error_line(err)
    assert stalk_cli(capsys, "authority", "init", "--force")[0] == EXIT_OK
    assert stalk.Authority.load(path).public != authority.public


def test_authority_init_elsewhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ca" / "key"
    status, out, _ = stalk_cli(capsys, "authority", "init", "-f", str(path))
    assert status == EXIT_OK
    assert out.splitlines()[-1].split()[0] == str(stalk.Authority.load(path).public)


def test_sign_writes_a_certificate_that_verifies(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], authority: stalk.Authority
) -> None:
    cert_path = tmp_path / "db-1.cert"
    before = int(time.time())
    status, out, err = stalk_cli(
        capsys,
        "authority",
        "sign",
        "--name",
        "db-1",
        "--group",
        "ops",
        "--group",
        "db",
        "--valid",
        "24h",
        "--serial",
        "42",
        str(SUBJECT.public),
        "-o",
        str(cert_path),
    )
    assert status == EXIT_OK, err
    assert out.splitlines()[0] == f"wrote {cert_path}"
    assert "  name:       db-1" in out.splitlines()
    cert = stalk.Certificate.load(cert_path)
    assert (cert.name, cert.groups, cert.serial, cert.subject) == (
        "db-1",
        ("db", "ops"),
        42,
        SUBJECT.public,
    )
    assert before <= cert.not_before <= int(time.time())
    assert cert.not_after - cert.not_before == 86_400
    trusted = stalk.Authorities([authority.public])
    assert trusted.verify(cert, now=time.time(), key=SUBJECT.public) == cert
    status, _, err = stalk_cli(
        capsys, "authority", "sign", "--name", "x", "--valid", "1h", str(SUBJECT.public), "-o",
        str(cert_path),
    )  # fmt: skip
    assert status == EXIT_ERROR
    assert "--force" in error_line(err)


def test_sign_without_output_prints_the_file_form(
    capsys: pytest.CaptureFixture[str], authority: stalk.Authority
) -> None:
    status, out, _ = stalk_cli(
        capsys, "authority", "sign", "--name", "alice", "--valid", "90m", str(SUBJECT.public)
    )
    assert status == EXIT_OK
    cert = stalk.Certificate.from_string(out)
    assert cert.name == "alice"
    assert cert.not_after - cert.not_before == 5400
    assert cert.issuer == authority.public.digest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--valid", "1x"), "not a duration: '1x'"),
        (("--valid", "0s"), "between 1 second and 100 years"),
        (("--valid", "6000w"), "between 1 second and 100 years"),
        (("--valid", "1h", "--serial", "-1"), "a serial is between 0 and 2^64-1"),
    ],
)
def test_sign_refuses_bad_arguments_as_usage_errors(
    capsys: pytest.CaptureFixture[str],
    authority: stalk.Authority,
    args: tuple[str, ...],
    message: str,
) -> None:
    status, _, err = stalk_cli(
        capsys, "authority", "sign", "--name", "n", *args, str(SUBJECT.public)
    )
    assert status == EXIT_USAGE
    assert message in err.splitlines()[-1]


def test_sign_refuses_a_fingerprint_for_a_key(
    capsys: pytest.CaptureFixture[str], authority: stalk.Authority
) -> None:
    fingerprint = SUBJECT.public.fingerprint
    status, _, err = stalk_cli(
        capsys, "authority", "sign", "--name", "n", "--valid", "1h", fingerprint
    )
    assert status == EXIT_USAGE
    assert err.splitlines()[-1].endswith(
        f"{fingerprint} is a fingerprint, not a key: give the public key, stalk:..., which "
        "'stalk id' prints"
    )


def test_sign_refuses_a_bad_name_in_one_line(
    capsys: pytest.CaptureFixture[str], authority: stalk.Authority
) -> None:
    status, _, err = stalk_cli(
        capsys, "authority", "sign", "--name", "db 1", "--valid", "1h", str(SUBJECT.public)
    )
    assert status == EXIT_ERROR
    assert error_line(err) == (
        "cannot sign: a name must be 1 to 128 visible ASCII characters (no spaces or controls)"
    )


def test_sign_without_an_authority_says_how_to_make_one(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = stalk_cli(
        capsys, "authority", "sign", "--name", "n", "--valid", "1h", str(SUBJECT.public)
    )
    assert status == EXIT_ERROR
    assert error_line(err) == (
        f"authority file '{home / 'authority'}' does not exist; create one with "
        "'stalk authority init'"
    )


def test_revoke_accumulates_in_one_signed_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], authority: stalk.Authority
) -> None:
    now = int(time.time())
    cert = authority.sign(SUBJECT.public, "db-1", not_before=now, not_after=now + 60, serial=9)
    cert.save(tmp_path / "db-1.cert")
    listed = tmp_path / "revoked"
    status, out, err = stalk_cli(
        capsys, "authority", "revoke", "--cert", str(tmp_path / "db-1.cert"), "-o", str(listed)
    )
    assert status == EXIT_OK, err
    assert out == f"wrote {listed}: 1 serial and 0 keys revoked\n"
    first = stalk.RevocationList.load(listed)
    other = stalk.Identity.generate().public
    status, out, _ = stalk_cli(
        capsys, "authority", "revoke", "--serial", "3", "--key", str(other), "-o", str(listed)
    )
    assert status == EXIT_OK
    assert out == f"wrote {listed}: 2 serials and 1 key revoked\n"
    second = stalk.RevocationList.load(listed)
    assert second.serials == {3, 9}
    assert second.subjects == {other}
    assert second.issued_at > first.issued_at  # so a listener takes it over the first
    trusted = stalk.Authorities([authority.public], [first])
    assert trusted.add_revocations(second)
    with pytest.raises(stalk.CertificateRevoked):
        trusted.verify(cert, now=now, key=SUBJECT.public)


def test_revoke_an_empty_list_to_start_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], authority: stalk.Authority
) -> None:
    status, out, _ = stalk_cli(capsys, "authority", "revoke", "-o", str(tmp_path / "revoked"))
    assert status == EXIT_OK
    assert out.endswith("0 serials and 0 keys revoked\n")


def test_revoke_refuses_another_authoritys_certificate_or_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], authority: stalk.Authority
) -> None:
    stranger = stalk.Authority.generate()
    now = int(time.time())
    cert = stranger.sign(SUBJECT.public, "x", not_before=now, not_after=now + 60)
    cert.save(tmp_path / "x.cert")
    status, _, err = stalk_cli(
        capsys, "authority", "revoke", "--cert", str(tmp_path / "x.cert"), "-o", "revoked"
    )
    assert status == EXIT_ERROR
    assert "not by this authority" in error_line(err)
    stranger.revoke([1], issued_at=now).save(tmp_path / "theirs")
    status, _, err = stalk_cli(
        capsys, "authority", "revoke", "--serial", "2", "-o", str(tmp_path / "theirs")
    )
    assert status == EXIT_ERROR
    assert "is not this authority's revocation list" in error_line(err)


def test_cert_show_prints_and_checks(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str], authority: stalk.Authority
) -> None:
    now = int(time.time())
    cert = authority.sign(SUBJECT.public, "db-1", ["db"], not_before=now, not_after=now + 600)
    cert.save(tmp_path / "db-1.cert")
    status, out, _ = stalk_cli(capsys, "cert", "show", str(tmp_path / "db-1.cert"))
    assert status == EXIT_OK
    assert out.splitlines() == cert.describe()
    pub = str(home / "authority.pub")
    status, out, _ = stalk_cli(
        capsys, "cert", "show", str(tmp_path / "db-1.cert"), "--authority", pub
    )
    assert status == EXIT_OK
    assert out.splitlines()[-1] == (
        f"valid now, signed by {authority.public.fingerprint} (trusted), not revoked"
    )
    authority.revoke([cert.serial], issued_at=now).save(tmp_path / "revoked")
    status, _, err = stalk_cli(
        capsys, "cert", "show", str(tmp_path / "db-1.cert"), "--authority", pub,
        "--revocations", str(tmp_path / "revoked"),
    )  # fmt: skip
    assert status == EXIT_ERROR
    assert error_line(err) == f"certificate for 'db-1' (serial {cert.serial}) is revoked"


def test_cert_show_names_what_is_wrong(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str], authority: stalk.Authority
) -> None:
    expired = authority.sign(SUBJECT.public, "old", not_before=1_000_000, not_after=1_000_060)
    expired.save(tmp_path / "old.cert")
    pub = str(home / "authority.pub")
    status, _, err = stalk_cli(
        capsys, "cert", "show", str(tmp_path / "old.cert"), "--authority", pub
    )
    assert status == EXIT_ERROR
    assert error_line(err) == "certificate for 'old' expired at 1970-01-12T13:47:40Z"
    other = tmp_path / "other.pub"
    other.write_text(f"{stalk.Authority.generate().public}\n")
    status, _, err = stalk_cli(
        capsys, "cert", "show", str(tmp_path / "old.cert"), "--authority", str(other)
    )
    assert status == EXIT_ERROR
    assert "not a trusted authority" in error_line(err)
    status, _, err = stalk_cli(
        capsys, "cert", "show", str(tmp_path / "old.cert"), "--revocations", "x"
    )
    assert status == EXIT_ERROR
    assert error_line(err) == "--revocations needs --authority"


def test_cert_show_of_a_damaged_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.cert").write_text("stalk-certificate:AAAA\n")
    status, _, err = stalk_cli(capsys, "cert", "show", str(tmp_path / "bad.cert"))
    assert status == EXIT_ERROR
    assert error_line(err).startswith(f"certificate file '{tmp_path / 'bad.cert'}': ")
    status, _, err = stalk_cli(capsys, "cert", "show", str(tmp_path / "missing.cert"))
    assert status == EXIT_ERROR
    assert error_line(err) == f"certificate file '{tmp_path / 'missing.cert'}' does not exist"


# -- listen, connect and send with certificates ------------------------------------------------


@dataclass
class Setup:
    """An authority, a server and a client, each with its files in ``home``."""

    home: Path
    authority: stalk.Authority
    authorities: Path  # the authorities file (the authority's .pub)
    server: stalk.Identity
    server_cert: Path
    client_key: Path  # the client's identity file
    client: stalk.Identity
    client_cert: Path


@pytest.fixture
def setup(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Setup:
    assert stalk_cli(capsys, "authority", "init")[0] == EXIT_OK
    authority = stalk.Authority.load(home / "authority")
    now = int(time.time())
    server, client = stalk.Identity.generate(), stalk.Identity.generate()
    client.save(tmp_path / "client")
    authority.sign(server.public, "db-1", ["db"], not_before=now, not_after=now + 600).save(
        tmp_path / "server.cert"
    )
    authority.sign(client.public, "alice", ["ops"], not_before=now, not_after=now + 600).save(
        tmp_path / "client.cert"
    )
    return Setup(
        home,
        authority,
        home / "authority.pub",
        server,
        tmp_path / "server.cert",
        tmp_path / "client",
        client,
        tmp_path / "client.cert",
    )


@asynccontextmanager
async def certified_listener(setup: Setup, **kwargs: Any) -> AsyncIterator[str]:
    """A library listener presenting the server's certificate; yields its HOST:PORT."""

    async def echo(conn: stalk.Connection) -> None:
        async for spack in conn:
            await conn.send(spack)

    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(
                stalk.listen,
                "127.0.0.1",
                0,
                echo,
                identity=setup.server,
                certificate=stalk.Certificate.load(setup.server_cert),
                **kwargs,
            )
        )
        yield f"{host}:{port}"
        tg.cancel_scope.cancel()


async def stalk_in_thread(
    capsys: pytest.CaptureFixture[str], backend: str, *args: str
) -> tuple[int, str, str]:
    """``stalk ARGS`` in a worker thread (it runs its own event loop), on ``backend``."""
    return await anyio.to_thread.run_sync(partial(stalk_cli, capsys, "--backend", backend, *args))


@pytest.mark.anyio
async def test_send_by_name_with_a_certificate(
    anyio_backend: str, setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    trust = stalk.Authorities.load(setup.authorities)
    async with certified_listener(setup, authorities=trust, allow_groups=["ops"]) as address:
        status, out, err = await stalk_in_thread(
            capsys, anyio_backend, "send", address, "-f", str(setup.client_key),
            "--authority", str(setup.authorities), "--name", "db-1",
            "--certificate", str(setup.client_cert), "hello", "--wait", "10",
        )  # fmt: skip
    assert status == EXIT_OK, err
    assert out == "Spack('hello')\n"
    assert not (setup.home / "known_peers").exists()  # the certificate was the trust


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--name", "db-2"), "certificate is for 'db-1' (groups db), not 'db-2'"),
        (
            ("--name", "db-1", "--no-certificate"),
            "the peer closed the connection during the handshake (CERTIFICATE_REFUSED): "
            "certificate required",
        ),
    ],
)
async def test_send_refused_by_certificate_is_one_line(
    anyio_backend: str,
    setup: Setup,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    message: str,
) -> None:
    trust = stalk.Authorities.load(setup.authorities)
    certificate = [] if "--no-certificate" in args else ["--certificate", str(setup.client_cert)]
    args = tuple(a for a in args if a != "--no-certificate")
    async with certified_listener(setup, authorities=trust) as address:
        status, _, err = await stalk_in_thread(
            capsys, anyio_backend, "send", address, "-f", str(setup.client_key),
            "--authority", str(setup.authorities), *args, *certificate, "x",
        )  # fmt: skip
    assert status == EXIT_ERROR
    assert error_line(err) == message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--authority", "AUTH"), "--authority needs --name: the name the server's certificate "
         "must bear"),
        (("--name", "db-1"), "--name needs --authority: the authorities that certify names"),
    ],
)  # fmt: skip
def test_dial_options_go_together(
    setup: Setup, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    args = tuple(str(setup.authorities) if a == "AUTH" else a for a in args)
    status, _, err = stalk_cli(capsys, "send", "127.0.0.1:1", *args, "x")
    assert status == EXIT_ERROR
    assert error_line(err) == message


def test_a_certificate_for_another_identity_is_refused_before_dialling(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = stalk_cli(
        capsys, "send", "127.0.0.1:1", "--certificate", str(setup.server_cert),
        "-f", str(setup.client_key), "x",
    )  # fmt: skip
    assert status == EXIT_ERROR
    assert error_line(err) == (
        f"{setup.server_cert} is a certificate for {setup.server.public.fingerprint}, not for "
        f"your identity {setup.client.public.fingerprint} ({setup.client_key})"
    )


def test_listen_allow_options_need_an_authority(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = stalk_cli(capsys, "listen", "0", "--allow-group", "ops")
    assert status == EXIT_ERROR
    assert error_line(err) == "--allow-name and --allow-group need --authority"


@pytest.mark.anyio
async def test_listen_admits_certified_clients_and_says_who(
    anyio_backend: str, setup: Setup, tmp_path: Path
) -> None:
    setup.server.save(tmp_path / "server")
    revoked = tmp_path / "revoked"
    setup.authority.revoke([], issued_at=int(time.time())).save(revoked)
    command = [
        sys.executable, "-m", "stalk", "--backend", anyio_backend, "listen", "0", "--echo",
        "-f", str(tmp_path / "server"), "--authority", str(setup.authorities),
        "--certificate", str(setup.server_cert), "--allow-group", "ops", "-v",
        "--revocations", str(revoked),
    ]  # fmt: skip
    env = {**os.environ, "STALK_HOME": str(setup.home)}
    trust = stalk.Authorities.load(setup.authorities)
    async with await anyio.open_process(command, env=env, stderr=subprocess.STDOUT) as process:
        assert process.stdout is not None
        output = BufferedByteReceiveStream(process.stdout)

        async def line() -> str:
            with anyio.fail_after(30):
                return (await output.receive_until(b"\n", 16 * 1024)).decode()

        try:
            while not (match := re.match(r"listening on 127.0.0.1:(\d+)", await line())):
                pass
            port = int(match.group(1))
            assert (await line()).startswith("fingerprint ")
            assert (await line()).startswith("presenting certificate 'db-1' (groups db), valid ")
            assert await line() == (
                f"admitting group 'ops' certified by {setup.authority.public.fingerprint}"
            )
            assert await line() == f"revocations from {revoked}, reloaded when it changes"
            async with await stalk.connect(
                "127.0.0.1", port, identity=setup.client,
                certificate=stalk.Certificate.load(setup.client_cert),
                authorities=trust, expect_name="db-1",
            ) as conn:  # fmt: skip
                await conn.send(stalk.Spack(1))
                assert list(await conn.receive()) == [1]
            who = setup.client.public.fingerprint
            while not (text := await line()).startswith(f"peer {who} connected"):
                pass
            assert text.endswith(", certified as 'alice', groups ops")
            with pytest.raises(stalk.PeerRefused) as info:
                await stalk.connect("127.0.0.1", port)  # no certificate
            assert info.value.code == stalk.CloseCode.CERTIFICATE_REFUSED
            while "presented no certificate" not in (text := await line()):
                pass
            assert text.startswith("stalk: info: handshake with 127.0.0.1:")
            serial = stalk.Certificate.load(setup.client_cert).serial
            setup.authority.revoke([serial], issued_at=int(time.time()) + 1).save(
                revoked, overwrite=True
            )
            with pytest.raises(stalk.PeerRefused) as info:
                await stalk.connect(
                    "127.0.0.1", port, identity=setup.client,
                    certificate=stalk.Certificate.load(setup.client_cert),
                )  # fmt: skip
            assert info.value.reason == "certificate revoked"
            while f"revocation list {revoked} reloaded: 1 serials" not in await line():
                pass
        finally:
            process.terminate()


def test_revocations_need_an_authority(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    for command in (("listen", "0"), ("send", "127.0.0.1:1", "x")):
        status, _, err = stalk_cli(capsys, *command, "--revocations", "revoked")
        assert status == EXIT_ERROR
        assert error_line(err) == "--revocations needs --authority"


@pytest.mark.anyio
async def test_send_refuses_a_revoked_server(
    anyio_backend: str, setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serial = stalk.Certificate.load(setup.server_cert).serial
    setup.authority.revoke([serial], issued_at=int(time.time())).save(tmp_path / "revoked")
    async with certified_listener(setup) as address:
        status, _, err = await stalk_in_thread(
            capsys, anyio_backend, "send", address, "--authority", str(setup.authorities),
            "--name", "db-1", "--revocations", str(tmp_path / "revoked"), "x",
        )  # fmt: skip
    assert status == EXIT_ERROR
    assert error_line(err) == f"certificate for 'db-1' (serial {serial}) is revoked"


@pytest.mark.anyio
async def test_authority_serve_and_cert_renew(
    anyio_backend: str, setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enrolled = tmp_path / "enrolled"
    enrolled.write_text(f"{setup.client.public} alice ops,db\n")
    command = [
        sys.executable, "-m", "stalk", "--backend", anyio_backend, "authority", "serve", "0",
        "--enrolled", str(enrolled), "--valid", "2h", "-v",
    ]  # fmt: skip
    env = {**os.environ, "STALK_HOME": str(setup.home)}
    async with await anyio.open_process(command, env=env, stderr=subprocess.STDOUT) as process:
        assert process.stdout is not None
        output = BufferedByteReceiveStream(process.stdout)

        async def line() -> str:
            with anyio.fail_after(30):
                return (await output.receive_until(b"\n", 16 * 1024)).decode()

        try:
            match = re.match(r"serving certificates on (\S+) as 'authority'", await line())
            assert match is not None
            assert await line() == (
                f"signed by {setup.authority.public}  {setup.authority.public.fingerprint}"
            )
            assert await line() == f"1 key enrolled in {enrolled}; each certificate valid 7200 s"
            out_cert = tmp_path / "renewed.cert"
            status, out, err = await stalk_in_thread(
                capsys, anyio_backend, "cert", "renew", match.group(1),
                "--authority", str(setup.authorities), "-f", str(setup.client_key),
                "-o", str(out_cert),
            )  # fmt: skip
            assert status == EXIT_OK, err
            assert out.splitlines()[0] == f"wrote {out_cert}"
            cert = stalk.Certificate.load(out_cert)
            assert (cert.name, cert.groups, cert.subject) == (
                "alice",
                ("db", "ops"),
                setup.client.public,
            )
            assert cert.not_after - cert.not_before == 7200
            while "issued a certificate for 'alice'" not in await line():
                pass
            stalk.Identity.generate().save(tmp_path / "outsider")
            status, _, err = await stalk_in_thread(
                capsys, anyio_backend, "cert", "renew", match.group(1),
                "--authority", str(setup.authorities), "-o", str(tmp_path / "x.cert"),
                "-f", str(tmp_path / "outsider"),
            )  # fmt: skip
            assert status == EXIT_ERROR
            assert error_line(err) == (
                "the peer closed the connection during the handshake (NOT_AUTHORIZED): "
                "not authorized"
            )
            assert not (tmp_path / "x.cert").exists()
        finally:
            process.terminate()


def test_cert_renew_of_an_outsider_is_one_line(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = stalk_cli(
        capsys, "cert", "renew", "127.0.0.1:1", "--authority", str(setup.authorities),
        "-f", str(setup.client_key), "-o", str(tmp_path / "x.cert"),
    )  # fmt: skip
    assert status == EXIT_ERROR
    assert error_line(err).startswith("cannot connect to 127.0.0.1:1")
