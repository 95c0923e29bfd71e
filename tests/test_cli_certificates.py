"""The ``stalk authority`` and ``stalk cert`` commands, run in-process with a private STALK_HOME.

Every failure must be one ``stalk: error:`` line (or argparse's usage error), never a
traceback; the files they write are checked with the library.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import stalk
from stalk.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main

NESTED = (("authority", "init"), ("authority", "sign"), ("authority", "revoke"), ("cert", "show"))


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
