"""Profile one benchmark cell with cProfile, in the client and in the server process.

    python -m stalk.bench.profile_cell send 64               # stalk, one send per 64 B spack
    python -m stalk.bench.profile_cell batch 64 --transport tcp
    python -m stalk.bench.profile_cell send 1048576 --n 200
    python -m stalk.bench.profile_cell rtt
    python -m stalk.bench.profile_cell handshake xx --concurrency 16
    python -m stalk.bench.profile_cell linearity
    python -m stalk.bench.profile_cell send 64 --transport stalk_ch0   # channel 0, channels on
    python -m stalk.bench.profile_cell send 64 --transport stalk_plain # no writer task
    python -m stalk.bench.profile_cell fanout channels     # 1000 channels, 64 B round trips
    python -m stalk.bench.profile_cell fanout stalk --streams 100
    python -m stalk.bench.profile_cell quiet stalk_busy    # channel A while B streams

The cell runs twice unprofiled (warm-up, then the unprofiled time), then once with both
workers under cProfile. For each side the report gives the time blocked in the event loop's
poll (``epoll.poll``, ``select``...) apart from the busy time, per unit (message, round trip,
connection, MiB), then the top functions by own time. cProfile inflates Python-heavy code
2-3x; compare shares, not absolute times, with unprofiled figures.
"""

from __future__ import annotations

import argparse
import pstats
import tempfile
from pathlib import Path
from typing import Any

from stalk import bench
from stalk.bench.common import make_certificate
from stalk.bench.orchestrator import start_pair, worker_env

#: cProfile entries that are the event loop waiting for I/O, not work.
_BLOCKING = ("poll' of 'select.epoll", "'select.select'", "control' of 'select.kqueue")


def _job(args: argparse.Namespace) -> tuple[dict[str, Any], str, int, str]:
    """The client job, the connection that carries profile commands, units, unit name."""
    conn = "stalk_big" if args.cell == "linearity" and args.transport == "stalk" else args.transport
    if args.cell in ("send", "batch"):
        size = int(args.arg or 64)
        n = args.n or max(20, min(20_000, 64 * 1024 * 1024 // size))
        batch = bench.batch_size(size) if args.cell == "batch" else 1
        job = {"op": "sink", "conn": conn, "size": size, "n": n, "batch": batch}
        return job, conn, n, "msg"
    if args.cell == "rtt":
        n = args.n or 5000
        return {"op": "rtt", "conn": conn, "size": bench.RTT_SIZE, "n": n}, conn, n, "round trip"
    if args.cell == "handshake":
        kind = {"xx": "stalk_xx", "ik": "stalk_ik"}.get(args.arg or "xx", args.arg or "xx")
        n = args.n or 300
        job = {"op": "handshake", "kind": kind, "concurrency": args.concurrency, "n": n}
        return job, "stalk", n, "connection"
    if args.cell == "linearity":
        job = {"op": "linearity", "conn": conn, "small_n": 0, "big_n": args.n or 2}
        return job, conn, 64 * (args.n or 2), "MiB"
    if args.cell == "fanout":
        kind = args.arg or "channels"
        if kind not in bench.FANOUT_KINDS:
            raise SystemExit(f"fanout: choose one of {', '.join(bench.FANOUT_KINDS)}")
        n = args.n or 20
        job = {"op": "fanout", "kind": kind, "streams": args.streams, "n": n}
        return job, "stalk", args.streams * n, "request"
    if args.cell == "quiet":
        kind = args.arg or "stalk_busy"
        if kind not in bench.QUIET_KINDS:
            raise SystemExit(f"quiet: choose one of {', '.join(bench.QUIET_KINDS)}")
        n = args.n or 2000
        job = {"op": "quiet", "kind": kind, "n": n, "limit": 3600}
        return job, "stalk", n, "round trip"
    raise SystemExit(f"unknown cell {args.cell!r}")


def _label(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    if filename == "~":
        return name
    parts = Path(filename).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else filename
    return f"{short}:{line}({name})"


def _report(path: Path, side: str, units: int, unit: str, *, top: int, sort: str) -> None:
    stats = pstats.Stats(str(path))
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(value[2] for value in entries.values())
    blocked = sum(
        value[2]
        for key, value in entries.items()
        if any(pattern in _label(key) for pattern in _BLOCKING)
    )
    busy = total - blocked
    print(
        f"\n== {side}: busy {busy * 1e6 / units:.1f} us/{unit}, blocked in poll "
        f"{blocked * 1e6 / units:.1f} us/{unit} (profiled)"
    )
    column = 2 if sort == "tottime" else 3
    ranked = sorted(entries.items(), key=lambda item: item[1][column], reverse=True)[:top]
    print(f"{'own %busy':>9} {'own us/u':>9} {'cum us/u':>9} {'calls/u':>8}  function")
    for key, (_, calls, own, cumulative, _) in ranked:
        share = 100 * own / busy if busy else 0.0
        print(
            f"{share:8.1f}% {own * 1e6 / units:9.2f} {cumulative * 1e6 / units:9.2f} "
            f"{calls / units:8.2f}  {_label(key)}"
        )


def main() -> int:
    """Profile the cell named on the command line; print both sides' top entries."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "cell", choices=["send", "batch", "rtt", "handshake", "linearity", "fanout", "quiet"]
    )
    parser.add_argument(
        "arg",
        nargs="?",
        help=(
            "size in bytes; xx/ik/tls/tcp or a kind of HANDSHAKE_KINDS (stalk_xx_cert...)"
            " for handshake; the kind for fanout and quiet"
        ),
    )
    parser.add_argument(
        "--transport",
        default="stalk",
        choices=[*bench.TRANSPORTS, "stalk_ch0", "stalk_plain", "stalk_ch0_plain"],
        help="stalk_ch0: channel 0 of a connection with channels; *_plain: a connection "
        "used without async with (no writer task)",
    )
    parser.add_argument("--backend", default="asyncio", choices=bench.available_backends())
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--streams", type=int, default=1000, help="fanout: streams at once")
    parser.add_argument("--n", type=int, help="messages / round trips / connections")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"])
    parser.add_argument("--out", help="keep the .prof files in this directory")
    parser.add_argument("--malloc-tuned", action="store_true")
    args = parser.parse_args()
    job, via, units, unit = _job(args)
    with tempfile.TemporaryDirectory(prefix="stalk-profile-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        cert, key = make_certificate(Path(tmp))
        connect = sorted({via, job.get("conn", via)})
        if args.cell == "quiet":
            connect = sorted({via, "stalk_chbig", "tls", "tls2"})
        with start_pair(args.backend, cert, key, connect, worker_env(args.malloc_tuned)) as pair:
            pair.job(**job)  # warm-up
            plain = pair.job(**job)
            client, server = out / "client.prof", out / "server.prof"
            profile = {"via": via, "client": str(client), "server": str(server)}
            profiled = pair.job(**job, profile=profile)
        seconds = plain.get("seconds", plain.get("big_seconds", 0.0))
        seconds_profiled = profiled.get("seconds", profiled.get("big_seconds", 0.0))
        print(f"cell {args.cell} {args.arg or ''} {args.transport} on {args.backend}: {job}")
        print(
            f"unprofiled {seconds * 1e6 / units:.1f} us/{unit} ({units / seconds:.0f} {unit}/s), "
            f"profiled {seconds_profiled * 1e6 / units:.1f} us/{unit}"
        )
        for side, path in (("client", client), ("server", server)):
            _report(path, side, units, unit, top=args.top, sort=args.sort)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
