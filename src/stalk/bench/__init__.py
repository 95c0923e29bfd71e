"""``stalk bench``: stalk against anyio TLS 1.3 and plain anyio TCP, over 127.0.0.1.

Theory of operation
-------------------
The *orchestrator* (:func:`run`) never does network I/O itself. For each event loop it
starts two *worker* processes, ``python -m stalk.bench --worker server|client``, and drives
the client with one JSON job per line on its stdin; the client answers one JSON line on its
stdout. The server worker serves four listeners (stalk, stalk with a raised message limit,
TLS 1.3, plain TCP) and obeys commands that the client sends *in band*, on the connection
under test, before the timed part: ``sink N`` (receive N messages, then acknowledge),
``echo N`` (send back N messages), ``rss EXPECTED`` (report the server's RSS once EXPECTED
connections of that kind are open), ``profile start|stop``.

Every transport carries the same workload: a spack holding one ``bytes`` payload of the
given size. stalk sends :class:`~stalk.Spack` objects; TLS and TCP send the same msgpack
array behind a 4-byte big-endian length prefix, packed per message by the sender and
unpacked per message by the receiver (big reads, no ``receive_exactly``), which is the
cheapest honest way to carry messages over an anyio byte stream.

The machine is shared and noisy, so the workload is measured in *rounds*: each round runs
every cell (figure x size x mode) once for each transport, in an order rotated from round
to round, and the report gives the median over rounds. Ratios are the median of the
per-round ratios (each taken between runs made seconds apart), not ratios of medians.
Every count (messages, round trips, connections) is calibrated once per cell and transport
before the first round so that one timed run lasts about ``Budget.cell_seconds``.

Memory per idle connection is measured in fresh process pairs (one per transport), so the
heap history of earlier cells cannot hide or inflate the growth. README.md in this package
describes every figure exactly.

The modules, one job each: this one (the command line, imported by ``stalk`` on every
command, so it imports nothing heavy), :mod:`~stalk.bench.common` (budgets, framing, TLS
material, statistics), :mod:`~stalk.bench.workers` (the server and the client worker),
:mod:`~stalk.bench.dialer` (the client's connection of each kind),
:mod:`~stalk.bench.crowd` (the client's figures that open many connections: handshakes,
memory, fan-out), :mod:`~stalk.bench.orchestrator`, :mod:`~stalk.bench.report`, and two
tools of their own: :mod:`~stalk.bench.hostile` (CPU of adversarial record mixes) and
:mod:`~stalk.bench.profile_cell` (one cell under cProfile).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

__all__ = [
    "BIG_LIMIT",
    "CERTIFIED_COST",
    "CERTIFIED_KINDS",
    "CERTIFIED_NAME",
    "CHANNEL_LIMIT",
    "CONCURRENCY",
    "FAMILIES",
    "FANOUT_KINDS",
    "FANOUT_SIZE",
    "HANDSHAKE_KINDS",
    "HOST",
    "LINEARITY_BIG",
    "LINEARITY_SMALL",
    "PLAIN_SIZE",
    "QUIET_KINDS",
    "READ_SIZE",
    "RTT_SIZE",
    "SIZES",
    "STREAM_SIZE",
    "TRANSPORTS",
    "add_arguments",
    "available_backends",
    "batch_size",
    "main",
    "run_from_args",
]

#: Spack payload sizes of the throughput figures.
SIZES: Final = (64, 1024, 16 * 1024, 256 * 1024, 1024 * 1024, 8 * 1024 * 1024)
#: Transports of the data figures; ratios are always stalk against "tls" and "tcp".
TRANSPORTS: Final = ("stalk", "tls", "tcp")
#: What the handshake figures open: stalk XX, stalk IK, the same two with certificates
#: presented and checked by both sides (issue 12) between peers new to each other (every
#: signature verified) and between returning peers (each side has verified the other's
#: certificate before: its signature check is remembered, every other check is made), a
#: full TLS 1.3 handshake, and a plain TCP connect (the floor).
HANDSHAKE_KINDS: Final = (
    "stalk_xx",
    "stalk_ik",
    "stalk_xx_cert",
    "stalk_xx_cert_known",
    "stalk_ik_cert",
    "stalk_ik_cert_known",
    "tls",
    "tcp",
)
#: Each certified handshake kind and the plain one it is compared with.
CERTIFIED_KINDS: Final = {
    "stalk_xx_cert": "stalk_xx",
    "stalk_ik_cert": "stalk_ik",
    "stalk_xx_cert_known": "stalk_xx",
    "stalk_ik_cert_known": "stalk_ik",
}
#: The issue's bound: a certified handshake costs at most this many times a plain one.
CERTIFIED_COST: Final = 1.2
#: The name in the benchmark server's certificate (the XX client expects it).
CERTIFIED_NAME: Final = "bench-server"
#: Handshakes in flight at once, from one client process.
CONCURRENCY: Final = (1, 16)
#: Cost linearity: per-MiB time of one 64 MiB spack against that of 1 MiB spacks.
LINEARITY_SMALL: Final = 1024 * 1024
LINEARITY_BIG: Final = 64 * 1024 * 1024
#: Payload of the round-trip figure.
RTT_SIZE: Final = 64
#: Payload of the figure of a connection used without ``async with`` (no writer task).
PLAIN_SIZE: Final = 64

HOST: Final = "127.0.0.1"
#: Bytes asked of the transport per read by the TLS/TCP framing (stalk's default too).
READ_SIZE: Final = 256 * 1024
#: max_message_size of the stalk listener and client used for the linearity figure.
BIG_LIMIT: Final = 2 * LINEARITY_BIG
#: The figure families, in the order they run (``--figures`` picks a subset). ``channels``
#: adds channel 0 of a connection with channels to the throughput and round-trip cells
#: (which it runs even when their own families are not picked), then its own cells.
FAMILIES: Final = ("throughput", "rtt", "handshake", "memory", "linearity", "channels")
#: Concurrent request/response streams: ``channels`` on one connection, against as many
#: separate connections of stalk, TLS 1.3 and plain TCP.
FANOUT_KINDS: Final = ("channels", "stalk", "tls", "tcp")
#: Payload of each request (and its echo) of the fan-out figure.
FANOUT_SIZE: Final = 64
#: Round trips timed on one stream while another streams spacks of STREAM_SIZE bytes:
#: stalk channels A and B of one connection, TLS connections 1 and 2 (each also idle).
QUIET_KINDS: Final = ("stalk_idle", "stalk_busy", "tls_idle", "tls_busy")
#: Payload of each spack streamed beside the round trips.
STREAM_SIZE: Final = 16 * 1024 * 1024
#: max_channels of the benchmark's connections with channels (room for the fan-out).
CHANNEL_LIMIT: Final = 1024


def batch_size(size: int) -> int:
    """Messages per ``queue`` + ``flush`` batch (per write for TLS/TCP): about 1 MiB, 2..1000."""
    return max(2, min(1000, (1024 * 1024) // size))


def available_backends() -> list[str]:
    """The event loops installed here: asyncio always, trio and uvloop if importable."""
    backends = ["asyncio"]
    for name, module in (("trio", "trio"), ("uvloop", "uvloop")):
        with contextlib.suppress(ImportError):
            __import__(module)
            backends.append(name)
    return backends


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser`` (``stalk bench`` and ``python -m stalk.bench``)."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="3 short rounds (within a minute)")
    size.add_argument(
        "--smoke", action="store_true", help="one tiny round: checks that every figure runs"
    )
    parser.add_argument(
        "--backends",
        metavar="LIST",
        help="comma-separated event loops (default: every one installed of asyncio, trio, uvloop)",
    )
    parser.add_argument(
        "--figures", metavar="LIST", help=f"comma-separated subset of {','.join(FAMILIES)}"
    )
    parser.add_argument("--rounds", type=int, metavar="N", help="override the number of rounds")
    parser.add_argument(
        "--seconds", type=float, metavar="S", help="override the duration of one timed run"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument(
        "--malloc-tuned",
        action="store_true",
        help="run the workers with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _split(text: str | None, allowed: Sequence[str], what: str) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise ValueError(f"unknown {what} {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return items


def run_from_args(args: argparse.Namespace) -> int:
    """Run with parsed :func:`add_arguments` options; print the table; return the exit status."""
    # Imported here: the CLI builds its parser from this module on every command.
    from stalk.bench.common import BUDGETS, BenchError  # noqa: PLC0415
    from stalk.bench.orchestrator import run  # noqa: PLC0415
    from stalk.bench.report import finite, format_report  # noqa: PLC0415

    budget = BUDGETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.rounds is not None or args.seconds is not None:
        budget = dataclasses.replace(
            budget,
            rounds=args.rounds or budget.rounds,
            cell_seconds=args.seconds or budget.cell_seconds,
        )
    available = available_backends()
    backends = _split(args.backends, ["asyncio", "trio", "uvloop"], "backend") or available
    missing = [b for b in backends if b not in available]
    if missing:
        raise ValueError(f"not installed here: {', '.join(missing)}")
    families = _split(args.figures, FAMILIES, "figure") or list(FAMILIES)

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    try:
        result = run(budget, backends, families=families, malloc_tuned=args.malloc_tuned, say=say)
    except BenchError as exc:
        print(f"stalk bench: error: {exc}", file=sys.stderr)
        return 1
    print(format_report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(finite(result), indent=1) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m stalk.bench`` (also how the workers are started)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        from stalk.bench.workers import worker_main  # noqa: PLC0415

        return worker_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="stalk bench", description="stalk vs TLS 1.3 vs plain TCP over 127.0.0.1"
    )
    add_arguments(parser)
    try:
        return run_from_args(parser.parse_args(argv))
    except ValueError as exc:
        print(f"stalk bench: error: {exc}", file=sys.stderr)
        return 2
