"""The orchestrator: every figure of one run (:func:`run`).

It starts worker pairs, calibrates and runs every cell in interleaved rounds, measures
memory per idle connection and the AES-GCM ceiling; it does no network I/O itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import select
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import cryptography
import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import stalk
from stalk.bench import (
    CONCURRENCY,
    FAMILIES,
    FANOUT_KINDS,
    HANDSHAKE_KINDS,
    LINEARITY_BIG,
    LINEARITY_SMALL,
    PLAIN_SIZE,
    QUIET_KINDS,
    RTT_SIZE,
    SIZES,
    TRANSPORTS,
    batch_size,
)
from stalk.bench.common import (
    _MB,
    _MIB,
    _NOISE_CHUNK,
    _NONCE,
    _SAMPLE_KEY_SEP,
    BenchError,
    Budget,
    Progress,
    Samples,
    _median,
    _payload,
    make_certificate,
)
from stalk.bench.report import _summarise, _targets

# -- the orchestrator: processes ---------------------------------------------------------


def worker_env(malloc_tuned: bool = False) -> dict[str, str]:
    """The environment of the worker processes (they import the same stalk as we do)."""
    env = dict(os.environ)
    # The workers run the same stalk as the orchestrator, installed or not.
    package_root = str(Path(stalk.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if malloc_tuned:
        env["MALLOC_MMAP_THRESHOLD_"] = str(32 * _MIB)
        env["MALLOC_TRIM_THRESHOLD_"] = str(128 * _MIB)
    return env


class _Process:
    """A worker process spoken to in JSON lines.

    It runs in a session of its own, so that a Ctrl-C typed in the terminal interrupts
    the orchestrator alone (its workers would print tracebacks): the orchestrator then
    stops them (:meth:`Pair.__exit__`).
    """

    def __init__(self, args: Sequence[str], env: dict[str, str]) -> None:
        command = [sys.executable, "-m", "stalk.bench", "--worker", *args]
        self.name = " ".join(args[:3])
        # Our own interpreter and module, arguments built here: nothing untrusted.
        self.proc = subprocess.Popen(  # noqa: S603
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self._buffer = b""

    def read(self, timeout: float) -> dict[str, Any]:
        stdout = self.proc.stdout
        if stdout is None:  # pragma: no cover - always piped
            raise BenchError("worker has no stdout")
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"worker {self.name} gave no answer in {timeout:.0f} s")
            ready, _, _ = select.select([stdout.fileno()], [], [], left)
            if ready:
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    self.proc.wait(5)
                    raise BenchError(
                        f"worker {self.name} exited with status {self.proc.returncode}"
                    )
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise BenchError(f"worker {self.name} failed: {answer['error']}")
        return answer

    def request(self, job: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        stdin = self.proc.stdin
        if stdin is None:  # pragma: no cover - always piped
            raise BenchError("worker has no stdin")
        stdin.write(json.dumps(job).encode() + b"\n")
        stdin.flush()
        return self.read(timeout)

    def close(self, *, at_once: bool = False) -> None:
        """End the worker: its input ends and it exits after its current job, or at once."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            if at_once:
                self.proc.kill()
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Pair:
    """A server worker and a client worker on one event loop."""

    server: _Process
    client: _Process

    def job(self, timeout: float = 300, **job: Any) -> dict[str, Any]:
        """Run one client job; return its answer."""
        return self.client.request(job, timeout)

    def close(self, *, at_once: bool = False) -> None:
        """Stop both workers (client first); ``at_once`` kills them mid-job."""
        self.client.close(at_once=at_once)
        self.server.close(at_once=at_once)

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """Stop the workers; at once when an error or a Ctrl-C ends the measurement."""
        self.close(at_once=exc_type is not None)


def start_pair(
    backend: str, cert: Path, key: Path, connect: Iterable[str], env: dict[str, str]
) -> Pair:
    """Start a server and a client worker; the client opens the ``connect`` data connections."""
    server = _Process(["server", "--backend", backend, "--cert", str(cert), "--key", str(key)], env)
    try:
        ready = server.read(60)
        client = _Process(
            [
                "client",
                "--backend",
                backend,
                "--cafile",
                str(cert),
                "--ports",
                json.dumps(ready["ports"]),
                "--server-key",
                ready["key"],
                "--connect",
                ",".join(connect),
            ],
            env,
        )
    except BaseException:
        server.close(at_once=True)
        raise
    try:
        client.read(60)
    except BaseException:
        client.close(at_once=True)
        server.close(at_once=True)
        raise
    return Pair(server, client)


# -- the orchestrator: cells, calibration, rounds ----------------------------------------


@dataclass
class _Cell:
    """One figure at one size/mode, measured for each of its subjects every round."""

    id: str
    subjects: tuple[str, ...]
    #: (subject, count) -> the client job
    job: Callable[[str, int], dict[str, Any]]
    #: (job answer, count) -> the metrics of one run
    metrics: Callable[[dict[str, Any], int], dict[str, float]]
    start_count: int
    min_count: int = 1
    calibrated: bool = True
    #: one timed run lasts about this many times the budget's run time
    scale: float = 1.0


def _throughput_cell(mode: str, size: int, subjects: tuple[str, ...] = TRANSPORTS) -> _Cell:
    """One-way throughput of one ``mode``.

    ``send``: one per message; ``batch``: ``queue`` x k + ``flush``; ``plain``: one ``send``
    per message on a stalk connection used without ``async with``, so without a writer
    task (every send writes before it returns). Subject ``stalk_ch0``: channel 0 of a
    connection with channels.
    """
    batch = batch_size(size) if mode == "batch" else 1

    def job(transport: str, n: int) -> dict[str, Any]:
        is_stalk = transport.startswith("stalk")
        conn = f"{transport}_plain" if mode == "plain" and is_stalk else transport
        return {"op": "sink", "conn": conn, "size": size, "n": n, "batch": batch}

    def metrics(answer: dict[str, Any], n: int) -> dict[str, float]:
        rate = n / answer["seconds"]
        return {"msgs_per_s": rate, "mb_per_s": rate * size / _MB}

    start = max(2, min(1000, 64 * 1024 // size))
    if mode == "batch":
        start = max(start, 2 * batch)
    return _Cell(f"throughput/{mode}/{size}", subjects, job, metrics, start, min_count=3)


def _rtt_cell(subjects: tuple[str, ...] = TRANSPORTS) -> _Cell:
    def job(transport: str, n: int) -> dict[str, Any]:
        return {"op": "rtt", "conn": transport, "size": RTT_SIZE, "n": n}

    def metrics(answer: dict[str, Any], n: int) -> dict[str, float]:
        return {"median_us": answer["median"] * 1e6, "p99_us": answer["p99"] * 1e6}

    return _Cell(f"rtt/{RTT_SIZE}", subjects, job, metrics, 50, min_count=20)


def _handshake_cell(concurrency: int) -> _Cell:
    def job(kind: str, n: int) -> dict[str, Any]:
        return {"op": "handshake", "kind": kind, "concurrency": concurrency, "n": n}

    def metrics(answer: dict[str, Any], n: int) -> dict[str, float]:
        return {
            "conns_per_s": n / answer["seconds"],
            "median_ms": answer["median"] * 1e3,
            "p99_ms": answer["p99"] * 1e3,
        }

    return _Cell(
        f"handshake/{concurrency}",
        HANDSHAKE_KINDS,
        job,
        metrics,
        max(4, concurrency * 2),
        min_count=max(4, concurrency * 2),
    )


def _linearity_cell(big_count: int) -> _Cell:
    conn = {"stalk": "stalk_big", "tls": "tls", "tcp": "tcp"}
    small_count = big_count * LINEARITY_BIG // LINEARITY_SMALL

    def job(transport: str, n: int) -> dict[str, Any]:
        return {"op": "linearity", "conn": conn[transport], "small_n": small_count, "big_n": n}

    def metrics(answer: dict[str, Any], n: int) -> dict[str, float]:
        small = answer["small_seconds"] * 1e6 / (small_count * LINEARITY_SMALL / _MIB)
        big = answer["big_seconds"] * 1e6 / (n * LINEARITY_BIG / _MIB)
        return {"small_us_per_mib": small, "big_us_per_mib": big, "ratio": big / small}

    return _Cell("linearity", TRANSPORTS, job, metrics, big_count, calibrated=False)


def _fanout_cell(streams: int) -> _Cell:
    """``streams`` concurrent 64 B request/response streams, each a channel or a connection."""

    def job(kind: str, n: int) -> dict[str, Any]:
        return {"op": "fanout", "kind": kind, "streams": streams, "n": n}

    def metrics(answer: dict[str, Any], n: int) -> dict[str, float]:
        return {"requests_per_s": streams * n / answer["seconds"]}

    return _Cell("channels/fanout", FANOUT_KINDS, job, metrics, 2, min_count=2, scale=3)


def _quiet_cell(budget: Budget) -> _Cell:
    """64 B round trips on one stream, alone and while another streams big spacks.

    Round trips beside a stream vary widely from run to run (TLS's most), so a run also
    stops after twice its calibrated duration (at least 0.5 s), which keeps rounds
    bounded; its figures are the round trips it made.
    """
    scale = 3.0
    limit = max(0.5, 2 * scale * budget.cell_seconds)

    def job(kind: str, n: int) -> dict[str, Any]:
        return {"op": "quiet", "kind": kind, "n": n, "limit": limit}

    def metrics(answer: dict[str, Any], n: int) -> dict[str, float]:
        out = {"median_us": answer["median"] * 1e6, "p99_us": answer["p99"] * 1e6}
        if "stream_mb_per_s" in answer:
            out["stream_mb_per_s"] = answer["stream_mb_per_s"]
        return out

    return _Cell("channels/quiet", QUIET_KINDS, job, metrics, 50, min_count=20, scale=scale)


def _cells(budget: Budget, families: Sequence[str]) -> list[_Cell]:
    """The cells of the main worker pair: every family but memory and the channels pair's."""
    cells: list[_Cell] = []
    channels = "channels" in families
    # With channels, every throughput and round-trip cell also measures channel 0 of a
    # connection with channels, in the same rounds as the connection without.
    subjects = (*TRANSPORTS, "stalk_ch0") if channels else TRANSPORTS
    if "throughput" in families or channels:
        cells += [
            _throughput_cell(mode, size, subjects) for mode in ("send", "batch") for size in SIZES
        ]
        cells.append(_throughput_cell("plain", PLAIN_SIZE, subjects))
    if "rtt" in families or channels:
        cells.append(_rtt_cell(subjects))
    if "handshake" in families:
        cells += [_handshake_cell(c) for c in CONCURRENCY]
    if "linearity" in families:
        cells.append(_linearity_cell(budget.linearity_big_count))
    return cells


def _seconds_of(answer: dict[str, Any]) -> float:
    return float(answer.get("seconds") or 0.0)


def _calibrate(run_job: Callable[[int], float], target: float, start: int, minimum: int) -> int:
    """A count for which one run lasts about ``target`` seconds (the runs warm up too)."""
    n = max(start, minimum)
    seconds = run_job(n)
    for _ in range(10):
        if seconds >= target / 4:
            break
        n = max(n * 2, min(n * 16, math.ceil(n * target / 4 / max(seconds, 1e-6))))
        seconds = run_job(n)
    return max(minimum, round(n * target / max(seconds, 1e-9)))


def _rotated(items: Sequence[str], k: int) -> list[str]:
    k %= len(items)
    return [*items[k:], *items[:k]]


def _measure_rounds(pair: Pair, cells: list[_Cell], budget: Budget, say: Progress) -> Samples:
    counts: dict[tuple[str, str], int] = {}
    for cell in cells:
        for subject in cell.subjects:
            if not (budget.calibrate and cell.calibrated):
                counts[cell.id, subject] = max(cell.start_count, cell.min_count)
                continue

            def run_job(n: int, cell: _Cell = cell, subject: str = subject) -> float:
                return _seconds_of(pair.job(**cell.job(subject, n)))

            counts[cell.id, subject] = _calibrate(
                run_job, budget.cell_seconds * cell.scale, cell.start_count, cell.min_count
            )
    say("calibrated")
    samples: Samples = defaultdict(list)
    for round_index in range(budget.rounds):
        for cell_index, cell in enumerate(cells):
            for subject in _rotated(cell.subjects, round_index + cell_index):
                n = counts[cell.id, subject]
                answer = pair.job(**cell.job(subject, n))
                samples[_SAMPLE_KEY_SEP.join((cell.id, subject))].append(cell.metrics(answer, n))
        say(f"round {round_index + 1}/{budget.rounds} done")
    return dict(samples)


def _measure_memory(
    backend: str, transport: str, budget: Budget, tls_files: tuple[Path, Path], env: dict[str, str]
) -> dict[str, float]:
    with start_pair(backend, *tls_files, [transport], env) as pair:
        n = budget.memory_connections
        answer = pair.job(op="memory", conn=transport, n=n, concurrency=8)
    return {
        "connections": n,
        "server_bytes_per_conn": (answer["server_after"] - answer["server_before"]) / n,
        "client_bytes_per_conn": (answer["client_after"] - answer["client_before"]) / n,
    }


# -- the orchestrator: AES-GCM ceiling ---------------------------------------------------


def _seal(aead: AESGCM, message: bytes) -> list[bytes]:
    with memoryview(message) as view:
        return [
            aead.encrypt(_NONCE.pack(i), view[offset : offset + _NOISE_CHUNK], None)
            for i, offset in enumerate(range(0, len(message), _NOISE_CHUNK))
        ]


def _open(aead: AESGCM, sealed: list[bytes]) -> None:
    for i, chunk in enumerate(sealed):
        aead.decrypt(_NONCE.pack(i), chunk, None)


def _seconds_per_call(fn: Callable[[], object], budget: float) -> float:
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= budget / 4 or calls >= 1 << 24:
            break
        calls *= 4
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls)
    return min(runs)


def aes_ceiling(seconds: float) -> dict[str, dict[str, float]]:
    """AES-256-GCM from ``cryptography``, no I/O: seal and open each size in Noise-sized chunks.

    The sender seals while the receiver opens on the other core, so the one-way ceiling is
    set by the slower of the two.
    """
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    result: dict[str, dict[str, float]] = {}
    for size in SIZES:
        message = _payload(size)
        sealed = _seal(aead, message)
        share = seconds / len(SIZES) / 2
        seal_s = _seconds_per_call(partial(_seal, aead, message), share)
        open_s = _seconds_per_call(partial(_open, aead, sealed), share)
        slower = max(seal_s, open_s)
        result[str(size)] = {
            "seal_mb_per_s": size / seal_s / _MB,
            "open_mb_per_s": size / open_s / _MB,
            "ceiling_msgs_per_s": 1 / slower,
            "ceiling_mb_per_s": size / slower / _MB,
        }
    return result


# -- the orchestrator: the whole run -----------------------------------------------------


def run(
    budget: Budget,
    backends: Sequence[str],
    *,
    families: Sequence[str] = FAMILIES,
    malloc_tuned: bool = False,
    say: Progress | None = None,
) -> dict[str, Any]:
    """Run the benchmark; return every figure (the structure ``--json`` writes)."""
    report = say or (lambda text: None)
    env = worker_env(malloc_tuned)
    started = time.monotonic()
    busy_before, own_before = _machine_busy_seconds(), _own_cpu_seconds()
    result: dict[str, Any] = {"meta": _meta(budget, backends, malloc_tuned), "backends": {}}
    aes_runs = [aes_ceiling(budget.aes_seconds) for _ in range(budget.rounds)]
    result["aesgcm"] = {
        size: {m: _median([r[size][m] for r in aes_runs]) for m in aes_runs[0][size]}
        for size in aes_runs[0]
    }
    with tempfile.TemporaryDirectory(prefix="stalk-bench-") as tmp:
        tls_files = make_certificate(Path(tmp))
        for backend in backends:

            def tell(text: str, backend: str = backend) -> None:
                report(f"[{backend} {time.monotonic() - started:5.0f}s] {text}")

            samples: Samples = {}
            cells = _cells(budget, families)
            if cells:
                kinds = ["stalk", "stalk_plain", "stalk_big", "tls", "tcp"]
                if "channels" in families:
                    kinds += ["stalk_ch0", "stalk_ch0_plain"]
                with start_pair(backend, *tls_files, kinds, env) as pair:
                    samples = _measure_rounds(pair, cells, budget, tell)
            if "channels" in families:
                # A pair of its own: the fan-out's thousand connections and the 16 MiB
                # streams must not shape the heaps and loops of the other cells' workers.
                kinds = ["stalk_chbig", "tls", "tls2"]
                with start_pair(backend, *tls_files, kinds, env) as pair:
                    channel_cells = [_fanout_cell(budget.fanout), _quiet_cell(budget)]
                    samples |= _measure_rounds(pair, channel_cells, budget, tell)
            memory: dict[str, dict[str, float]] = {}
            if "memory" in families:
                for transport in TRANSPORTS:
                    memory[transport] = _measure_memory(backend, transport, budget, tls_files, env)
                    tell(f"memory {transport} done")
            summary = _summarise(samples, memory, budget.fanout)
            summary["targets"] = [t.as_dict() for t in _targets(samples, summary)]
            summary["samples"] = samples
            result["backends"][backend] = summary
    seconds = time.monotonic() - started
    result["meta"]["seconds"] = seconds
    busy = _machine_busy_seconds()
    if busy is not None and busy_before is not None:
        others = busy - busy_before - (_own_cpu_seconds() - own_before)
        result["meta"]["other_cpus"] = max(0.0, others / seconds)
    return result


def _meta(budget: Budget, backends: Sequence[str], malloc_tuned: bool) -> dict[str, Any]:
    return {
        "budget": budget.name,
        "rounds": budget.rounds,
        "cell_seconds": budget.cell_seconds,
        "backends": list(backends),
        "stalk": stalk.__version__,
        "source": _source_revision(),
        "python": platform.python_version(),
        "anyio": _version("anyio"),
        "cryptography": cryptography.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "malloc": "tuned (MALLOC_MMAP_THRESHOLD_=32MiB, MALLOC_TRIM_THRESHOLD_=128MiB)"
        if malloc_tuned
        else "default",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sizes": list(SIZES),
        "loadavg_start": list(os.getloadavg()),
    }


def _machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine spent not idle since boot (Linux), steal included."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished (waited-for) workers."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _source_revision() -> str | None:
    """``git describe --always --dirty`` of the checkout stalk runs from, if it is one."""
    root = Path(stalk.__file__).resolve().parent.parent.parent
    if not (root / ".git").exists():
        return None
    try:
        # Read-only; "git" from PATH, fixed arguments.
        proc = subprocess.run(
            ["git", "describe", "--always", "--dirty"],  # noqa: S607
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return None
    return proc.stdout.strip() or None


def _version(distribution: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415 - only for the report header

    return version(distribution)
