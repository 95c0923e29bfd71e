"""The ``stalk`` command line, run as a user would: in subprocesses, with a private STALK_HOME.

Ctrl-C, Ctrl-D and the interactive ``stalk connect`` are tested in a pseudo-terminal that
is the command's controlling terminal, on both backends, every step with a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import tracemalloc
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteReceiveStream
from anyio.streams.buffered import BufferedByteReceiveStream
from hypothesis import given

import stalk
from adversarial.peers import Responder, Wire, raw_msg, raw_server, server_handshake
from stalk.cli import (
    ANSWER_CHARS,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT_CLOSED,
    EXIT_USAGE,
    SIZE_VALUES,
    VALUES,
    _logging,
    _resolve_globals,
    build_parser,
    encoded_size,
    escape,
    full_text,
    main,
    parse_value,
    summarize,
)
from stalk.known_peers import KnownPeers
from stalk.spack import MAX_DEPTH
from stalk.summary import SUMMARY_CHARS, VALUE_CHARS
from stalk.wire import CloseCode
from test_spack import spack_values

TIMEOUT = 60


def run(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STALK_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "stalk", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "stalk-home"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A ``stalk listen 0 --echo`` process; yields its ``host:port`` and public key."""
    server_home = tmp_path / "server-home"
    env = {**os.environ, "STALK_HOME": str(server_home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stalk", "listen", "127.0.0.1:0", "--echo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        address = key = ""
        for line in proc.stdout:
            if match := re.match(r"listening on (\S+) as (\S+)", line):
                address, key = match.groups()
                break
        assert address, "the listener did not start"
        yield address, key
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


def test_version(home: Path) -> None:
    result = run(home, "--version")
    assert result.stdout.strip() == f"stalk {stalk.__version__}"


def help_text(capsys: pytest.CaptureFixture[str], *args: str, raw: bool = False) -> str:
    """What ``stalk ARGS --help`` prints (in this process: argparse exits with status 0).

    Unless ``raw``, its whitespace is collapsed (argparse's line breaks undone).
    """
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    return text if raw else " ".join(text.split())


COMMANDS = ("keygen", "id", "listen", "connect", "send", "forget", "demo", "vectors", "bench")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_description_an_example_and_the_exit_statuses(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    usage, description = help_text(capsys, command, raw=True).split("\n\n")[:2]
    assert usage.startswith(f"usage: stalk {command} ")
    assert len(description) > 100, description  # a paragraph, not an argument list
    assert not description.startswith(("positional arguments:", "options:")), description
    text = help_text(capsys, command)
    assert f"examples: stalk {command}" in text
    assert "global options (before or after the command): --backend {asyncio,trio}" in text
    assert "exit status: 0 success" in text
    assert f"{EXIT_INTERRUPTED} interrupted (Ctrl-C), silently" in text
    assert f"{EXIT_OUTPUT_CLOSED} standard output closed early" in text


def test_help_states_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    listen = help_text(capsys, "listen")
    assert "HOST defaults to 127.0.0.1 (this machine only)" in listen
    assert "default: admit any key" in listen
    send = help_text(capsys, "send")
    assert "waiting at most SECONDS for it (default: do not wait)" in send
    assert f"default {stalk.Config().max_message_size})" in send
    assert "default: $STALK_HOME/identity; $STALK_HOME defaults to ~/.stalk" in send
    # connect and send read values with the one function, and both say how.
    assert VALUES in send
    assert VALUES in help_text(capsys, "connect")
    assert "(default: asyncio;" in help_text(capsys)


def test_global_options_count_before_and_after_the_command() -> None:
    parser = build_parser()
    after = parser.parse_args(["send", "h:1", "x", "--backend", "trio", "-vv"])
    before = parser.parse_args(["--backend", "trio", "-v", "send", "h:1", "x", "-v"])
    neither = parser.parse_args(["send", "h:1", "x"])
    for args in (after, before, neither):
        _resolve_globals(args)
    assert (after.backend, after.verbose) == ("trio", 2)
    assert (before.backend, before.verbose) == ("trio", 2)
    assert (neither.backend, neither.verbose, neither.backend_given) == ("asyncio", 0, False)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("-1.5", -1.5),
        ("True", True),
        ("None", None),
        ("b'raw'", b"raw"),
        ("'42'", "42"),
        ("[1, (2, 3), {'k': b''}]", [1, (2, 3), {"k": b""}]),
        ("hello world", "hello world"),
        ("", ""),
        ("2 +", "2 +"),
        ("x" * 100 + "(", "x" * 100 + "("),
    ],
)
def test_parse_value_reads_literals_and_else_text(text: str, value: object) -> None:
    parsed = parse_value(text)
    assert parsed == value
    assert type(parsed) is type(value)


def test_keygen_and_id(home: Path) -> None:
    made = run(home, "keygen")
    assert made.returncode == 0, made.stderr
    key_file = home / "identity"
    assert key_file.stat().st_mode & 0o777 == 0o600
    shown = run(home, "id")
    public, fingerprint = shown.stdout.split()
    assert public == stalk.Identity.load(key_file).public.__str__()
    assert fingerprint.startswith("SHA256:")
    assert public in made.stdout
    again = run(home, "keygen")
    assert again.returncode == 1
    assert again.stderr.startswith("stalk: error:")
    assert "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert run(home, "keygen", "--force").returncode == 0
    assert run(home, "id").stdout.split()[0] != public


def test_id_without_identity_suggests_keygen(home: Path, tmp_path: Path) -> None:
    result = run(home, "id")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"stalk: error: identity file '{home / 'identity'}' does not exist; "
        "create one with 'stalk keygen'"
    ]
    elsewhere = tmp_path / "my key"
    result = run(home, "id", "-f", str(elsewhere))
    assert result.stderr.endswith(f"create one with 'stalk keygen -f '{elsewhere}''\n")


def test_a_fingerprint_is_not_a_key(capsys: pytest.CaptureFixture[str]) -> None:
    fingerprint = stalk.Identity.generate().public.fingerprint
    with pytest.raises(SystemExit) as exit_info:
        main(["send", "127.0.0.1:1", "x", "--peer", fingerprint])
    assert exit_info.value.code == EXIT_USAGE
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == (
        f"stalk send: error: argument --peer: {fingerprint} is a fingerprint, not a key: "
        "--peer takes the server's public key, stalk:..., which 'stalk id' prints on the "
        "server (as does the first line of 'stalk listen')"
    )


def test_send_records_the_key_then_pins_it(home: Path, server: tuple[str, str]) -> None:
    address, key = server
    first = run(home, "send", address, "42", "hello", "b'raw'", "--wait", "10")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "Spack(42, 'hello', b'raw')"
    assert "recorded key" in first.stderr
    host, port = address.rsplit(":", 1)
    assert str(KnownPeers(home / "known_peers").lookup(host, int(port))) == key
    second = run(home, "send", address, "[1, 2]", "--wait", "10")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "Spack([1, 2])"
    assert "recorded key" not in second.stderr


def test_changed_key_is_refused_loudly(home: Path, server: tuple[str, str]) -> None:
    address, key = server
    host, port = address.rsplit(":", 1)
    old = stalk.Identity.generate().public
    KnownPeers(home / "known_peers").remember(host, int(port), old)
    result = run(home, "send", address, "x")
    assert result.returncode == 1
    assert "HAS CHANGED" in result.stderr
    assert old.fingerprint in result.stderr
    assert stalk.PublicIdentity.from_string(key).fingerprint in result.stderr
    assert f"stalk forget {host}:{port}" in result.stderr
    assert run(home, "forget", address).returncode == 0
    assert run(home, "send", address, "x").returncode == 0


def test_explicit_wrong_peer_is_refused(home: Path, server: tuple[str, str]) -> None:
    address, _key = server
    wrong = str(stalk.Identity.generate().public)
    result = run(home, "send", address, "x", "--peer", wrong)
    assert result.returncode == 1
    assert "does not hold the pinned key" in result.stderr


def test_connect_sends_stdin_lines(home: Path, server: tuple[str, str]) -> None:
    address, key = server
    result = run(home, "connect", address, "--peer", key, stdin="one\ntwo\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Spack('one')", "Spack('two')"]


def test_listen_with_authorized_peers(home: Path, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    friend_home = tmp_path / "friend"
    assert run(friend_home, "keygen").returncode == 0
    friend = run(friend_home, "id").stdout.split()[0]
    allowed.write_text(f"# only my friend\n{friend} friend's laptop\n")
    env = {**os.environ, "STALK_HOME": str(home)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stalk",
            "listen",
            "0",
            "--echo",
            "--authorized-peers",
            str(allowed),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        address = next(
            m.group(1) for line in proc.stdout if (m := re.match(r"listening on (\S+)", line))
        )
        stranger = run(tmp_path / "stranger", "send", address, "hi", "--wait", "10")
        assert stranger.returncode == 1
        assert "NOT_AUTHORIZED" in stranger.stderr
        ok = run(friend_home, "send", address, "hi", "--wait", "10")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "Spack('hi')"
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


def test_unreachable_address_is_one_readable_line(home: Path) -> None:
    result = run(home, "send", "127.0.0.1:1", "x")
    assert result.returncode == 1
    assert result.stderr.startswith("stalk: error: cannot connect to 127.0.0.1:1")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["send", "nohost", "x"],
            "argument ADDRESS: expected HOST:PORT or unix:PATH, got 'nohost'",
        ),
        (["send", "host:notaport", "x"], "argument ADDRESS: invalid port 'notaport'"),
        (["listen", "70000"], "argument ADDRESS: port 70000 out of range (0-65535)"),
        (["send", "h:1", "{1, 2}"], "argument VALUE: {1, 2}: cannot encode set"),
        (["send", "h:1", "x", "--wait", "0"], "expected a positive number of seconds, not 0"),
        (["send", "h:1", "x", "--max-message-size", "10"], "max_message_size must be"),
    ],
)
def test_a_bad_argument_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_demo_passes_and_reports(home: Path) -> None:
    result = run(home, "demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"(\d+) of \1 checks passed", result.stdout)
    assert "XX" in result.stdout
    assert "IK" in result.stdout
    assert "FAILED" not in result.stdout
    assert not home.exists()  # the demo touches nothing outside its temporary directory


def test_demo_on_trio(home: Path) -> None:
    result = run(home, "--backend", "trio", "demo")
    assert result.returncode == 0, result.stdout + result.stderr


def test_vectors_command(home: Path) -> None:
    shared = Path(
        os.environ.get("STALK_NOISE_VECTORS", Path(__file__).parents[2] / "shared/vectors")
    )
    if not (shared / "snow.txt").exists():
        pytest.skip("published Noise vectors not found: set STALK_NOISE_VECTORS")
    result = run(home, "vectors", str(shared / "snow.txt"))
    assert result.returncode == 0
    assert re.search(r"^\d+ passed, 0 failed, \d+ skipped$", result.stdout, re.MULTILINE)


# -- peer data on the terminal ------------------------------------------------------------

#: Terminal controls a peer might send: an OSC title change ended by BEL, clear-screen, a
#: C1 CSI (U+009B), bidirectional overrides and isolates, a zero-width joiner, a BOM, a line
#: separator, CR/LF to forge extra lines, and a tag character.
HOSTILE = (
    "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eevil\u202c\u2066x\u2069\u200f\u200d\ufeff"
    "\u2028\r\n\U000e0041"
)
#: Bidi and other format characters that must never reach the terminal raw.
FORMAT_CHARS = (
    "\u061c\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2066\u2067\u2068\u2069\ufeff\u00ad\U000e0041"
)


def assert_clean(output: bytes) -> None:
    """No terminal control or format character in ``output``: lines of printable text."""
    assert b"\x1b" not in output
    assert b"\x07" not in output
    text = output.decode("utf-8")  # every byte the CLI writes is UTF-8
    for line in text.split("\n"):
        assert line.isprintable(), line
    assert not set(text) & set(FORMAT_CHARS)


def test_escape_shows_every_control_and_format_character() -> None:
    hostile = [
        *map(chr, range(0x20)),
        "\x7f",
        *map(chr, range(0x80, 0xA0)),
        *FORMAT_CHARS,
        "\u2028",
        "\u2029",
        "\u00a0",
        "\ud800",
        "\ue000",
    ]
    for char in hostile:
        shown = escape(f"a{char}b")
        assert shown == f"a{repr(char)[1:-1]}b"
        assert shown.isascii()
        assert shown.isprintable()
    assert escape(HOSTILE) == repr(HOSTILE)[1:-1]
    for text in ("plain", "café 東京 🚀", "C:\\path", "tab-less 'quotes' \"too\""):
        assert escape(text) == text


@given(spack_values)
def test_encoded_size_is_the_encoding_length(value: object) -> None:
    spack = stalk.Spack(value)  # type: ignore[arg-type]
    assert encoded_size(spack) == len(spack.encode())


@pytest.mark.parametrize(
    "value",
    [
        *(size * "a" for size in (31, 32, 255, 256, 65535, 65536)),
        *(size * "é" for size in (15, 16, 127, 128, 32767, 32768, 40000)),
        *(bytes(size) for size in (0, 255, 256, 65535, 65536)),
        *([0] * size for size in (15, 16, 65535, 65536)),
        *({str(i): None for i in range(size)} for size in (15, 16, 65536)),
        *(tuple(range(size)) for size in (0, 1, 3, 4, 14, 15, 16, 300, 70000)),
        *(array("b", bytes(size)) for size in (0, 1, 2, 3, 4, 8, 16, 17, 255, 256, 65536)),
        array("d", [1.5] * 10),
        *(
            sign * 2**bits + delta
            for sign in (1, -1)
            for bits in (5, 7, 8, 15, 16, 31, 32, 63)
            for delta in (-1, 0, 1)
            if -(2**63) <= sign * 2**bits + delta < 2**64
        ),
        2**64 - 1,
        stalk.Float32(1.5),
        0.1,
    ],
)
def test_encoded_size_at_every_length_boundary(value: object) -> None:
    spack = stalk.Spack(value)  # type: ignore[arg-type]
    assert encoded_size(spack) == len(spack.encode())


def test_encoded_size_gives_up_beyond_its_budget_of_values() -> None:
    assert encoded_size(stalk.Spack(*range(SIZE_VALUES))) is not None
    assert encoded_size(stalk.Spack(*range(SIZE_VALUES + 1))) is None
    rows: list[stalk.SpackValue] = [[{"k": (1, 2)}] * 100] * 1000
    nested = stalk.Spack(*rows)  # 1000 + 1000 * (100 + 100 * 3) = 401,000 values
    assert encoded_size(nested, max_values=401_000) == len(nested.encode())
    assert encoded_size(nested, max_values=400_999) is None
    assert encoded_size(nested) is None
    assert summarize(nested).endswith(
        f"(spack of 1000 values, over {SIZE_VALUES} in all; --full prints it all)"
    )


def test_a_short_spack_reads_as_its_repr() -> None:
    for spack in (
        stalk.Spack(42, "hello", b"raw"),
        stalk.Spack(),
        stalk.Spack((1,), (), {"a": [1.5, None, True]}, array("d", [1.0]), array("q")),
        stalk.Spack(stalk.Float32(0.5), b"x" * 200, "y" * 200),
        stalk.Spack(HOSTILE, {HOSTILE: HOSTILE.encode()}),
    ):
        assert summarize(spack) == repr(spack)


def test_summary_is_short_and_built_from_slices() -> None:
    size = 16 * 1024 * 1024
    big = stalk.Spack(b"\x1b" * size)
    tracemalloc.start()
    try:
        text = summarize(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # a 16 MiB value costs a slice, not its 64 MiB repr
    assert text.startswith("Spack(b'\\x1b\\x1b")
    shown = text.count("\\x1b")
    assert 0 < shown <= VALUE_CHARS // 4
    assert text.endswith(
        f"... ({size - shown} more bytes)) "
        f"(spack of {size + 6} bytes, 1 value; --full prints it all)"
    )
    many = stalk.Spack(*range(100_000))
    wide = summarize(many)
    assert SUMMARY_CHARS < len(wide) < SUMMARY_CHARS + 200
    assert f"220, ... (99779 more values)) (spack of {len(many.encode())} bytes," in wide
    text_value = summarize(stalk.Spack(HOSTILE * 1000))
    assert "more characters)" in text_value
    assert text_value.isprintable()


def nested(depth: int, filler: object) -> object:
    value = filler
    for _ in range(depth):
        value = [filler, value, 2**63, {"k": filler}]
    return value


@pytest.mark.parametrize(
    "filler",
    [b"\xff" * 1000, "\U0010ffff" * 1000, {"\U0010ffff" * 300: b"\xff" * 300}, 2**64 - 1],
)
def test_summary_line_is_bounded_for_any_shape(filler: object) -> None:
    longest = 0
    for depth in range(MAX_DEPTH - 2):
        spack = stalk.Spack(*[nested(depth, filler)] * 3)  # type: ignore[arg-type]
        text = summarize(spack)
        assert text.isprintable()
        longest = max(longest, len(text))
    assert longest < 2600


async def cli(
    home: Path, backend: str, *args: str, stdin: bytes | None = b"", timeout: float = TIMEOUT
) -> tuple[int, bytes, bytes]:
    """Run ``stalk --backend BACKEND ARGS``: exit status, stdout, stderr.

    ``stdin=None`` gives the command a pipe that stays open (no EOF) until it exits.
    """
    command = [sys.executable, "-m", "stalk", "--backend", backend, *args]
    env = {**os.environ, "STALK_HOME": str(home)}
    with anyio.fail_after(timeout):
        if stdin is not None:
            done = await anyio.run_process(command, input=stdin, check=False, env=env)
            return done.returncode, done.stdout, done.stderr
        process = await anyio.open_process(command, env=env)
        try:
            out, err = bytearray(), bytearray()

            async def drain(stream: ByteReceiveStream | None, into: bytearray) -> None:
                assert stream is not None
                async for chunk in stream:
                    into += chunk

            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, process.stdout, out)
                tg.start_soon(drain, process.stderr, err)
            return await process.wait(), bytes(out), bytes(err)
        finally:
            if process.returncode is None:
                process.kill()
            await process.aclose()


def assert_one_error_line(status: int, out: bytes, err: bytes, *expected: str) -> None:
    """A failure reported as one escaped ``stalk: error:`` line, no traceback."""
    assert status == 1, err
    assert_clean(out)
    assert_clean(err)
    status_lines = ("stalk: recorded key ", "connected to ")
    lines = [line for line in err.decode().split("\n")[:-1] if not line.startswith(status_lines)]
    assert len(lines) == 1, lines
    assert lines[0].startswith("stalk: error: "), lines
    for text in expected:
        assert text in lines[0], (text, lines[0])


ESCAPED = ("\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202eevil", "\\u2028\\r\\n\\U000e0041")


@asynccontextmanager
async def stalk_server(handler: stalk.ConnectionHandler) -> AsyncIterator[str]:
    """An in-process ``stalk.listen`` on loopback; yields ``host:port``."""
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(stalk.listen, "127.0.0.1", 0, handler, identity=stalk.Identity.generate())
        )
        yield f"{host}:{port}"
        tg.cancel_scope.cancel()


@asynccontextmanager
async def hostile_server(behave: Callable[[Wire], Awaitable[None]]) -> AsyncIterator[str]:
    """A raw TCP server speaking stalk by hand (tests/adversarial); yields ``host:port``."""
    async with raw_server(behave) as (port, _):
        yield f"127.0.0.1:{port}"


async def refuse_with_hostile_reason(wire: Wire) -> None:
    """A forged refusal (SPEC section 5): ``code || len || reason`` after the preamble."""
    await wire.read_exact(8)
    reason = HOSTILE.encode()
    await wire.send(bytes([CloseCode.NOT_AUTHORIZED, len(reason)]) + reason)


@pytest.mark.parametrize("command", ["send", "connect"])
async def test_a_forged_refusal_reason_is_escaped(
    anyio_backend: str, home: Path, command: str
) -> None:
    async with hostile_server(refuse_with_hostile_reason) as address:
        args = [command, address] + (["x"] if command == "send" else [])
        result = await cli(home, anyio_backend, *args)
    assert_one_error_line(*result, "refused the handshake (NOT_AUTHORIZED)", *ESCAPED)


async def close_at_once(conn: stalk.Connection) -> None:
    await conn.close(0x1234, HOSTILE)


async def close_after_one_spack(conn: stalk.Connection) -> None:
    await conn.receive()
    await conn.close(CloseCode.INTERNAL_ERROR, HOSTILE)


async def test_an_error_close_ends_connect_with_one_line(anyio_backend: str, home: Path) -> None:
    # stdin stays open: the CLOSE must end the command without waiting for input.
    async with stalk_server(close_at_once) as address:
        result = await cli(home, anyio_backend, "connect", address, stdin=None, timeout=20)
    assert_one_error_line(*result, "(code 4660)", *ESCAPED)


async def test_an_error_close_ends_send_wait_with_one_line(anyio_backend: str, home: Path) -> None:
    async with stalk_server(close_after_one_spack) as address:
        result = await cli(home, anyio_backend, "send", address, "hi", "--wait", "10")
    assert_one_error_line(*result, "closed the connection (INTERNAL_ERROR)", *ESCAPED)


def malformed_spack_after_handshake(encoding: bytes) -> Callable[[Wire], Awaitable[None]]:
    async def behave(wire: Wire) -> None:
        transport = await server_handshake(wire, Responder())
        await wire.send(transport.spacks(stalk.Spack("fine")))
        await wire.send(transport.seal(raw_msg(encoding)))
        await wire.read_to_eof()

    return behave


@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        (b"\x91\xc1", "reserved type byte 0xc1"),
        (b"\x91\xa2\xff\xfe", "not valid UTF-8"),
        (b"\x91\xd4\x7f\x1b", "unknown ext code 127"),
    ],
)
async def test_a_malformed_spack_ends_connect_with_one_line(
    anyio_backend: str, home: Path, encoding: bytes, message: str
) -> None:
    async with hostile_server(malformed_spack_after_handshake(encoding)) as address:
        status, out, err = await cli(home, anyio_backend, "connect", address)
    assert out == b"Spack('fine')\n"  # what came before is printed; nothing of the bad one
    assert_one_error_line(status, out, err, message)


def reply_with(*spacks: stalk.Spack) -> stalk.ConnectionHandler:
    async def handler(conn: stalk.Connection) -> None:
        await conn.receive()
        for spack in spacks:
            await conn.send(spack)
        with contextlib.suppress(anyio.EndOfStream, stalk.ConnectionLost):
            await conn.receive()

    return handler


HOSTILE_SPACK = stalk.Spack(HOSTILE, {HOSTILE: HOSTILE.encode()}, [HOSTILE * 100], (HOSTILE,))


@pytest.mark.parametrize("full", [False, True])
async def test_hostile_spack_text_is_escaped(anyio_backend: str, home: Path, full: bool) -> None:
    async with stalk_server(reply_with(HOSTILE_SPACK)) as address:
        args = ["send", address, "hi", "--wait", "10", *(["--full"] if full else [])]
        status, out, err = await cli(home, anyio_backend, *args)
        assert status == 0, err
        connected = await cli(home, anyio_backend, "connect", address, stdin=b"hi\n")
    for output in (out, err, *connected[1:]):
        assert_clean(output)
    everything = "Spack(" + ", ".join(map(repr, HOSTILE_SPACK)) + ")"
    assert full_text(HOSTILE_SPACK) == everything
    assert out.decode().rstrip("\n") == (everything if full else summarize(HOSTILE_SPACK))
    assert connected[1] == (summarize(HOSTILE_SPACK) + "\n").encode()
    assert "more characters)" in summarize(HOSTILE_SPACK)


def run_measured(command: list[str], home: Path, out: Path) -> tuple[int, int]:
    """Run ``command`` with stdout in ``out``: its exit status and peak RSS in bytes."""
    env = {**os.environ, "STALK_HOME": str(home)}
    with out.open("wb") as stdout:
        process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.DEVNULL, env=env)
        _, wait_status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(wait_status)
    return process.returncode, usage.ru_maxrss * 1024  # Linux: ru_maxrss is in KiB


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="needs os.wait4 (peak RSS per child)")
async def test_a_16_mib_reply_is_summarized_in_bounded_memory(
    anyio_backend: str, home: Path, tmp_path: Path
) -> None:
    size = 16 * 1024 * 1024 - 64  # the largest bytes value under the default limit
    replies = {"small": stalk.Spack(bytes(100)), "large": stalk.Spack(bytes(size))}
    peaks = {}

    async def handler(conn: stalk.Connection) -> None:
        name = (await conn.receive())[0]
        await conn.send(replies[str(name)])
        with contextlib.suppress(anyio.EndOfStream, stalk.ConnectionLost):
            await conn.receive()

    async with stalk_server(handler) as address:
        for name in replies:
            command = [sys.executable, "-m", "stalk", "--backend", anyio_backend, "send"]
            command += [address, name, "--wait", "30"]
            out = tmp_path / f"{name}.out"
            status, peaks[name] = await anyio.to_thread.run_sync(run_measured, command, home, out)
            assert status == 0
    line = (tmp_path / "large.out").read_text()
    assert line.endswith(
        f"more bytes)) (spack of {size + 6} bytes, 1 value; --full prints it all)\n"
    )
    assert len(line) < 400  # it was the 64 MiB repr
    # The library holds the reply while it is decoded (about twice its size, and less once
    # the core's decode budget lands); the CLI adds nothing that grows with it. Printing
    # the repr added 140 MiB here (8.7 times the reply).
    assert peaks["large"] - peaks["small"] < 4 * size


async def test_listen_prints_summaries_and_escaped_errors(anyio_backend: str, home: Path) -> None:
    size = 15 * 1024 * 1024
    command = [sys.executable, "-m", "stalk", "--backend", anyio_backend, "listen", "0"]
    env = {**os.environ, "STALK_HOME": str(home)}
    async with await anyio.open_process(command, env=env, stderr=subprocess.STDOUT) as process:
        assert process.stdout is not None
        output = BufferedByteReceiveStream(process.stdout)

        async def line() -> str:
            """The next line of output, without its line feed."""
            with anyio.fail_after(TIMEOUT):
                text = await output.receive_until(b"\n", 16 * 1024)
            assert_clean(text)
            return text.decode()

        try:
            while not (match := re.match(r"listening on 127.0.0.1:(\d+)", await line())):
                pass
            assert (await line()).startswith("fingerprint ")
            async with await stalk.connect("127.0.0.1", int(match.group(1))) as conn:
                await conn.send(stalk.Spack(bytes(size)))
                await conn.send(HOSTILE_SPACK)
                await conn.close(CloseCode.INTERNAL_ERROR, HOSTILE)
            assert (await line()).startswith("peer SHA256:")
            who = conn.identity.public.fingerprint
            assert await line() == f"{who}: {summarize(stalk.Spack(bytes(size)))}"
            assert await line() == f"{who}: {summarize(HOSTILE_SPACK)}"
            ending = await line()
            assert ending.startswith(f"peer {who} disconnected: the peer closed the connection")
            for text in ESCAPED:
                assert text in ending
        finally:
            process.terminate()


async def test_max_message_size_option(anyio_backend: str, home: Path) -> None:
    reply = stalk.Spack(bytes(3000))
    key = stalk.Identity.generate()  # the same on every connection: the client pins it

    async def oversize(wire: Wire) -> None:
        transport = await server_handshake(wire, Responder(identity=key))
        await wire.send(transport.spacks(reply))  # whatever limit the client advertised
        await wire.read_to_eof()

    async with hostile_server(oversize) as address:
        small = await cli(
            home, anyio_backend, "send", address, "x", "--wait", "10", "--max-message-size", "2048"
        )
        large = await cli(
            home, anyio_backend, "send", address, "x", "--wait", "10", "--max-message-size", "4096"
        )
        connect = await cli(home, anyio_backend, "connect", address, "--max-message-size", "2048")
    assert_one_error_line(*small, "larger than our 2048-byte limit")
    assert_one_error_line(*connect, "larger than our 2048-byte limit")
    assert large[0] == 0, large[2]
    assert large[1].decode() == summarize(reply) + "\n"


# -- as a person runs it: in a terminal, Ctrl-C, Ctrl-D, a pipe closed early ---------------------

#: Run in the command's new session before the command, as a shell starts a foreground
#: job: opening the terminal by name makes it the session's controlling terminal, so that
#: Ctrl-C typed on it signals the command; SIGINT gets its default action back (a test
#: run started in the background of a script inherits it ignored); then the command
#: replaces this process.
CONTROLLING_TERMINAL = (
    "import os, signal, sys; os.close(os.open(os.ttyname(0), os.O_RDWR)); "
    "signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)
#: How long one step of a terminal test may take before it fails instead of hanging.
STEP_TIMEOUT = 20


def stalk_command() -> list[str]:
    """The installed ``stalk`` console script (``python -m stalk`` if there is none)."""
    script = Path(sys.executable).with_name("stalk")
    return [str(script)] if script.exists() else [sys.executable, "-m", "stalk"]


class Terminal:
    """The output of a command running in a pseudo-terminal, and the keys typed into it."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.output = bytearray()
        self.seen = 0  # output before this offset was matched by expect()

    async def _read(self) -> bool:
        """Read what the command wrote; ``False`` once it closed the terminal."""
        await anyio.wait_readable(self.master)
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the command exited and nothing holds the terminal open
            return False
        self.output += data
        return bool(data)

    async def expect(self, text: str) -> None:
        """Wait until ``text`` appears in the output after what was matched before."""
        wanted = text.encode()
        try:
            with anyio.fail_after(STEP_TIMEOUT):
                while (found := self.output.find(wanted, self.seen)) < 0:
                    if not await self._read():
                        break
        except TimeoutError:
            found = -1
        assert found >= 0, f"{text!r} never came; the terminal shows {bytes(self.output)!r}"
        self.seen = found + len(wanted)

    def type(self, keys: bytes) -> None:
        """Type ``keys`` (``b"\\x03"`` is Ctrl-C, ``b"\\x04"`` Ctrl-D at the start of a line)."""
        os.write(self.master, keys)

    async def drain(self) -> str:
        """Everything the command writes until it exits, as text (CR LF read as LF)."""
        with anyio.fail_after(STEP_TIMEOUT):
            while await self._read():
                pass
        return self.output.decode(errors="replace").replace("\r\n", "\n")


@asynccontextmanager
async def terminal(
    home: Path, backend: str, *args: str
) -> AsyncIterator[tuple[Terminal, anyio.abc.Process]]:
    """``stalk --backend BACKEND ARGS`` in a new pseudo-terminal, as its controlling one."""
    if not hasattr(os, "openpty") or not hasattr(os, "ttyname"):
        pytest.skip("needs a POSIX pseudo-terminal")
    master, slave = os.openpty()
    command = [sys.executable, "-c", CONTROLLING_TERMINAL, *stalk_command()]
    try:
        process = await anyio.open_process(
            [*command, "--backend", backend, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            env={**os.environ, "STALK_HOME": str(home)},
        )
    finally:
        os.close(slave)
    try:
        yield Terminal(master), process
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()
        os.close(master)


async def ended(term: Terminal, process: anyio.abc.Process) -> tuple[int, str]:
    """The command's exit status and everything it wrote, once it ends (with a deadline)."""
    text = await term.drain()
    with anyio.fail_after(STEP_TIMEOUT):
        status = await process.wait()
    return status, text


def assert_silent_interrupt(status: int, text: str) -> None:
    """Ctrl-C ended the command: status 130, and nothing after the ``^C`` the terminal echoed."""
    assert status == EXIT_INTERRUPTED, text
    assert "Traceback" not in text
    assert "error" not in text
    assert text.endswith("^C"), text


async def hold(conn: stalk.Connection) -> None:
    """A handler that receives until the client leaves."""
    with contextlib.suppress(anyio.EndOfStream, stalk.ConnectionLost):
        while True:
            await conn.receive()


async def test_ctrl_c_ends_listen_with_a_client_silently(anyio_backend: str, home: Path) -> None:
    async with terminal(home, anyio_backend, "listen", "0") as (term, process):
        await term.expect("listening on 127.0.0.1:")
        await term.expect(" as ")
        port = int(term.output.split(b"listening on 127.0.0.1:")[1].split(b" ")[0])
        async with await stalk.connect("127.0.0.1", port) as conn:
            await conn.send(stalk.Spack("hi"))
            await term.expect(": Spack('hi')")
            term.type(b"\x03")
            with anyio.fail_after(STEP_TIMEOUT), pytest.raises(stalk.ConnectionLost):
                await conn.receive()
        status, text = await ended(term, process)
    # The listener says goodbye to its client on the way out.
    assert status == EXIT_INTERRUPTED, text
    assert "Traceback" not in text
    assert "error" not in text
    assert text.endswith(" disconnected\n"), text


async def test_ctrl_c_ends_connect_waiting_for_a_line(anyio_backend: str, home: Path) -> None:
    async with (
        stalk_server(hold) as address,
        terminal(home, anyio_backend, "connect", address) as (term, process),
    ):
        await term.expect("connected to SHA256:")
        await term.expect("each line is sent as a spack, Ctrl-D ends\r\n")
        term.type(b"half a line")
        await term.expect("half a line")  # echoed: Ctrl-C comes while the line is typed
        term.type(b"\x03")
        assert_silent_interrupt(*await ended(term, process))


async def test_ctrl_c_ends_send_waiting_for_a_reply(anyio_backend: str, home: Path) -> None:
    arrived = anyio.Event()

    async def silent(conn: stalk.Connection) -> None:
        await conn.receive()
        arrived.set()
        await hold(conn)

    async with (
        stalk_server(silent) as address,
        terminal(home, anyio_backend, "send", address, "x", "--wait", "60") as (term, process),
    ):
        with anyio.fail_after(STEP_TIMEOUT):
            await arrived.wait()
        term.type(b"\x03")
        status, text = await ended(term, process)
    assert_silent_interrupt(status, text)


async def test_ctrl_c_ends_a_handshake_nobody_answers(anyio_backend: str, home: Path) -> None:
    reached = anyio.Event()

    async def mute(wire: Wire) -> None:
        await wire.read_exact(8)
        reached.set()
        await wire.read_to_eof()

    async with (
        hostile_server(mute) as address,
        terminal(home, anyio_backend, "send", address, "x") as (term, process),
    ):
        with anyio.fail_after(STEP_TIMEOUT):
            await reached.wait()
        term.type(b"\x03")
        status, text = await ended(term, process)
    assert_silent_interrupt(status, text)


async def test_ctrl_c_ends_bench_and_its_workers_silently(anyio_backend: str, home: Path) -> None:
    # --backend X is short for --backends X; the workers run in sessions of their own, so
    # the Ctrl-C reaches the orchestrator only, which kills them mid-job.
    async with terminal(home, anyio_backend, "bench", "--smoke") as (term, process):
        await term.expect(f"[{anyio_backend} ")
        await term.expect("calibrated")
        term.type(b"\x03")
        assert_silent_interrupt(*await ended(term, process))


async def echo(conn: stalk.Connection) -> None:
    async for spack in conn:
        await conn.send(spack)


async def test_connect_in_a_terminal(anyio_backend: str, home: Path) -> None:
    async with (
        stalk_server(echo) as address,
        terminal(home, anyio_backend, "connect", address) as (term, process),
    ):
        await term.expect("Ctrl-D ends")
        term.type(b"42\n")
        await term.expect("Spack(42)")  # a literal, read as send reads its VALUEs
        term.type(b"hello world\n")
        await term.expect("Spack('hello world')")
        term.type(b"{1, 2}\n")
        await term.expect("stalk: not sent: spack element 0: cannot encode set")
        term.type(b"b'\\x1b'\n")  # the session goes on; what comes back is escaped
        await term.expect("Spack(b'\\x1b')")
        term.type(b"\x04")  # Ctrl-D: the end of input closes the connection cleanly
        status, text = await ended(term, process)
    assert status == EXIT_OK, text
    assert "error" not in text
    assert "the peer closed" not in text  # we closed it


async def close_normally(conn: stalk.Connection) -> None:
    """A handler that returns at once: the listener closes the connection cleanly."""


async def close_with_an_error(conn: stalk.Connection) -> None:
    await conn.close(CloseCode.INTERNAL_ERROR, "out of \x1b[2Jcheese")


async def cut_after_the_handshake(wire: Wire) -> None:
    await server_handshake(wire, Responder())  # then the socket closes, without a CLOSE


@pytest.mark.parametrize(
    ("server", "status", "last_line"),
    [
        (partial(stalk_server, close_normally), EXIT_OK, "stalk: the peer closed the connection"),
        (
            partial(stalk_server, close_with_an_error),
            EXIT_ERROR,
            "stalk: error: the peer closed the connection (INTERNAL_ERROR): out of \\x1b[2Jcheese",
        ),
        (
            partial(hostile_server, cut_after_the_handshake),
            EXIT_ERROR,
            "stalk: error: the peer closed the connection without a CLOSE",
        ),
    ],
    ids=["clean", "error", "cut"],
)
async def test_connect_notices_the_peer_leaving_while_waiting_for_a_line(
    anyio_backend: str,
    home: Path,
    server: Callable[[], AbstractAsyncContextManager[str]],
    status: int,
    last_line: str,
) -> None:
    async with (
        server() as address,
        terminal(home, anyio_backend, "connect", address) as (term, process),
    ):
        # Nothing is typed: connect must not wait for a line to notice.
        ending = await ended(term, process)
    assert ending[0] == status, ending[1]
    assert ending[1].splitlines()[-1] == last_line
    assert "Traceback" not in ending[1]


async def run_with_closed_output(home: Path, *command: str) -> tuple[int, bytes]:
    """Run ``stalk COMMAND`` writing to a pipe whose reader has gone: status and stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with anyio.fail_after(TIMEOUT):
            process = await anyio.open_process(
                [*stalk_command(), *command],
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                env={**os.environ, "STALK_HOME": str(home)},
            )
            async with process:
                assert process.stderr is not None
                err = b"".join([chunk async for chunk in process.stderr])
                return await process.wait(), err
    finally:
        os.close(write_end)


async def test_a_closed_output_ends_every_command_quietly(anyio_backend: str, home: Path) -> None:
    assert run(home, "keygen").returncode == 0
    # id and the demo print and end; listen would serve forever; send prints a reply.
    async with stalk_server(echo) as address:
        for command in (
            ["id"],
            ["--backend", anyio_backend, "demo"],
            ["listen", "0", "--backend", anyio_backend],
            ["send", address, "x", "--wait", "10", "--backend", anyio_backend],
        ):
            status, err = await run_with_closed_output(home, *command)
            assert status == EXIT_OUTPUT_CLOSED, (command, err)
            assert all(line.startswith(b"stalk: recorded key ") for line in err.splitlines()), err


# -- what a command says: failures, addresses, the log ---------------------------------------


async def test_send_waiting_for_a_silent_server_says_so(anyio_backend: str, home: Path) -> None:
    async with stalk_server(hold) as address:
        result = await cli(home, anyio_backend, "send", address, "x", "--wait", "0.25")
    assert_one_error_line(*result, "stalk: error: no reply within 0.25 s")


def answer(data: bytes) -> Callable[[Wire], Awaitable[None]]:
    """A TCP service that is not stalk: it reads the client's first bytes and answers."""

    async def behave(wire: Wire) -> None:
        await wire.read_exact(8)
        await wire.send(data)

    return behave


HTTP_ANSWER = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (HTTP_ANSWER + b"400 Bad Request", "HTTP/1.1 400 Bad Request"),  # refusal code 72
        (b"SSH-2.0-OpenSSH_9.6\r\n", "SSH-2.0-OpenSSH_9.6"),  # the stream ends inside it
        (b"\x15\x03\x03\x00\x02\x02\x32", "\\x15\\x03\\x03\\x00\\x02\\x022"),  # a TLS alert
        # Escaped, bytes that are not UTF-8 as \xNN, and cut after ANSWER_CHARS characters
        # (16 before the x's: the escapes count as one character, \xff as four).
        (
            b"<\x1b]0;pwned\x07 \xff" + b"x" * 300,
            "<\\x1b]0;pwned\\x07 \\xff" + "x" * (ANSWER_CHARS - 16) + "...",
        ),
    ],
)
@pytest.mark.parametrize("command", ["send", "connect"])
async def test_a_service_that_is_not_stalk_is_named(
    anyio_backend: str, home: Path, command: str, data: bytes, shown: str
) -> None:
    async with hostile_server(answer(data)) as address:
        args = [command, address] + (["x"] if command == "send" else [])
        result = await cli(home, anyio_backend, *args)
    assert_one_error_line(
        *result, f"stalk: error: this does not look like a stalk listener: it answered '{shown}'"
    )
    assert result[2].decode().endswith(f"'{shown}'\n")


async def test_listen_names_an_address_in_use(anyio_backend: str, home: Path) -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as taken:
        port = taken.extra(anyio.abc.SocketAttribute.local_port)
        result = await cli(home, anyio_backend, "listen", f"127.0.0.1:{port}")
    assert_one_error_line(*result, f"stalk: error: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in result[2].decode()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


async def first_line(stream: ByteReceiveStream | None, prefix: bytes) -> str:
    """The first line of ``stream`` that starts with ``prefix`` (with a deadline)."""
    assert stream is not None
    lines = BufferedByteReceiveStream(stream)
    with anyio.fail_after(TIMEOUT):
        while not (line := await lines.receive_until(b"\n", 16 * 1024)).startswith(prefix):
            pass
    return line.decode()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_addresses_print_in_brackets(anyio_backend: str, home: Path) -> None:
    command = [*stalk_command(), "--backend", anyio_backend, "listen", "[::1]:0", "--echo"]
    env = {**os.environ, "STALK_HOME": str(home / "server")}
    async with await anyio.open_process(command, env=env, stderr=subprocess.STDOUT) as server:
        try:
            line = await first_line(server.stdout, b"listening on ")
            address = line.split()[2]
            assert re.fullmatch(r"\[::1\]:\d+", address), line
            sent = await cli(home, anyio_backend, "send", address, "x", "--wait", "10")
            assert sent[0] == EXIT_OK, sent
            assert f" for {address} in " in sent[2].decode()
            line = await first_line(server.stdout, b"peer ")
            assert re.search(r" connected \(XX\) from \[::1\]:\d+$", line), line
        finally:
            server.terminate()
    forgot = await cli(home, anyio_backend, "forget", address)
    assert forgot[1].decode() == f"forgot the key of {address}\n"
    unreachable = await cli(home, anyio_backend, "send", "[::1]:1", "x")
    assert_one_error_line(*unreachable, "stalk: error: cannot connect to [::1]:1: ")


def test_an_address_may_name_a_unix_socket() -> None:
    parser = build_parser()
    relative = parser.parse_args(["send", "unix:app.sock", "x"]).address
    assert relative == os.path.abspath("app.sock")  # the entry known_peers keeps
    assert parser.parse_args(["connect", "unix:/run/app.sock"]).address == "/run/app.sock"
    assert parser.parse_args(["listen", "unix:@name"]).address == "\0name"
    assert parser.parse_args(["listen", "7417"]).address == ("127.0.0.1", 7417)
    assert parser.parse_args(["listen", "unix:/s", "--socket-mode", "660"]).socket_mode == 0o660


@pytest.mark.parametrize(
    "args", [["send", "unix:", "x"], ["listen", "unix:/s", "--socket-mode", "9"]]
)
def test_a_bad_unix_address_or_mode_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == EXIT_USAGE
    assert "error: argument" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no unix domain sockets")
async def test_a_unix_socket_as_the_address(anyio_backend: str, home: Path) -> None:
    """listen, send (first use, then pinned), forget and Ctrl-C, with unix:PATH."""
    with tempfile.TemporaryDirectory(prefix="stalk-") as directory:
        path = f"{directory}/app.sock"
        address = f"unix:{path}"
        listen = ["listen", address, "--echo", "--socket-mode", "600"]
        async with terminal(home / "server", anyio_backend, *listen) as (term, server):
            await term.expect(f"listening on {address} as stalk:")
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            taken = await cli(home / "other", anyio_backend, "listen", address)
            assert_one_error_line(
                *taken, f"stalk: error: cannot listen on {address}: Address already in use"
            )
            first = await cli(home, anyio_backend, "send", address, "x", "--wait", "10")
            assert first[:2] == (EXIT_OK, b"Spack('x')\n"), first
            assert f" for {address} in " in first[2].decode()
            await term.expect(f" connected (XX) from {address}\r\n")
            pinned = await cli(home, anyio_backend, "send", address, "y", "--wait", "10")
            assert pinned[:2] == (EXIT_OK, b"Spack('y')\n"), pinned
            await term.expect(f" connected (IK) from {address}\r\n")
            term.type(b"\x03")
            assert_silent_interrupt(*await ended(term, server))
        assert not os.path.exists(path)  # Ctrl-C removed the socket file
        forgot = await cli(home, anyio_backend, "forget", address)
        assert forgot[1].decode() == f"forgot the key of {address}\n"
        unreachable = await cli(home, anyio_backend, "send", address, "x")
        assert_one_error_line(*unreachable, f"stalk: error: cannot connect to {address}: ")


@pytest.mark.parametrize("place", ["before", "after"])
async def test_verbose_shows_refused_clients_on_listen(
    anyio_backend: str, home: Path, place: str
) -> None:
    options = ["--backend", anyio_backend, "-v"]
    args = [*options, "listen", "0"] if place == "before" else ["listen", "0", *options]
    env = {**os.environ, "STALK_HOME": str(home)}
    async with await anyio.open_process([*stalk_command(), *args], env=env) as server:
        try:
            line = await first_line(server.stdout, b"listening on ")
            port = int(line.split()[2].rsplit(":", 1)[1])
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET / HTTP/1.1\r\n\r\n")
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    await stream.receive()
            logged = await first_line(server.stderr, b"stalk: ")
        finally:
            server.terminate()
    assert re.fullmatch(
        r"stalk: info: handshake with 127\.0\.0\.1:\d+ failed: .*not a stalk peer.*", logged
    ), logged


async def test_listen_without_verbose_shows_no_info(anyio_backend: str, home: Path) -> None:
    env = {**os.environ, "STALK_HOME": str(home)}
    command = [*stalk_command(), "--backend", anyio_backend, "listen", "0"]
    async with await anyio.open_process(command, env=env) as server:
        try:
            line = await first_line(server.stdout, b"listening on ")
            port = int(line.split()[2].rsplit(":", 1)[1])
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET / HTTP/1.1\r\n\r\n")
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    await stream.receive()
            # The refused client is handled: a stalk client is served after it.
            async with await stalk.connect("127.0.0.1", port) as conn:
                await conn.send(stalk.Spack("after"))
            await first_line(server.stdout, b"peer ")
        finally:
            server.terminate()
        assert server.stderr is not None
        err = b"".join([chunk async for chunk in server.stderr])
    assert err == b""


def test_trio_missing_says_how_to_install_it(home: Path, tmp_path: Path) -> None:
    hidden = tmp_path / "no-trio" / "trio"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'trio'\", name='trio')\n"
    )
    env = {**os.environ, "STALK_HOME": str(home), "PYTHONPATH": str(hidden.parent)}
    for args in (["--backend", "trio", "demo"], ["send", "127.0.0.1:1", "x", "--backend", "trio"]):
        result = subprocess.run(
            [*stalk_command(), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=TIMEOUT,
            check=False,
        )
        assert (result.returncode, result.stdout) == (EXIT_ERROR, "")
        assert result.stderr == (
            "stalk: error: the trio backend is not installed: pip install 'stalk[trio]'\n"
        )


def test_log_records_are_single_escaped_lines(capsys: pytest.CaptureFixture[str]) -> None:
    library, other = logging.getLogger("stalk.listener"), logging.getLogger("asyncio")
    before = logging.getLogger().level, logging.getLogger("stalk").level
    for verbose in (0, 1, 2):
        with _logging(verbose):
            library.debug("debug")
            library.info("info from %s", "127.0.0.1:1")
            library.warning("warning\x1b[2J")
            other.info("not ours")
            try:
                raise stalk.ConnectionLost("cut\nshort")
            except stalk.ConnectionLost:
                other.exception("a task failed")
        lines = capsys.readouterr().err.splitlines()
        expected = [
            *(["stalk: debug: debug"] if verbose >= 2 else []),
            *(["stalk: info: info from 127.0.0.1:1"] if verbose >= 1 else []),
            "stalk: warning: warning\\x1b[2J",
            "stalk: error: asyncio: a task failed: cut\\nshort",
        ]
        assert lines == expected
    assert (logging.getLogger().level, logging.getLogger("stalk").level) == before
