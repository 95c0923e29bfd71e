"""The ``stalk`` command line, run as a user would: in subprocesses, with a private STALK_HOME."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tracemalloc
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteReceiveStream
from anyio.streams.buffered import BufferedByteReceiveStream
from hypothesis import given

import stalk
from adversarial.peers import Responder, Wire, raw_msg, raw_server, server_handshake
from stalk.cli import SIZE_VALUES, encoded_size, escape, full_text, main, summarize
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


def test_version_and_help(home: Path) -> None:
    result = run(home, "--version")
    assert result.stdout.strip() == f"stalk {stalk.__version__}"
    for command in ("keygen", "id", "listen", "connect", "send", "forget", "demo", "vectors"):
        assert run(home, command, "--help").returncode == 0


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


def test_id_without_identity_is_one_readable_line(home: Path) -> None:
    result = run(home, "id")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1


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


def test_bad_address_is_a_usage_error(home: Path) -> None:
    assert main(["send", "nohost", "x"]) == 1
    assert main(["send", "host:notaport", "x"]) == 1


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
    invalid = await cli(home, anyio_backend, "send", "127.0.0.1:1", "x", "--max-message-size", "10")
    assert_one_error_line(*invalid, "max_message_size must be")
