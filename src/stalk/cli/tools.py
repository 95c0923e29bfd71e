"""The tools: ``demo``, ``vectors`` and ``bench`` (the benchmark is imported only when it runs)."""

from __future__ import annotations

import argparse

from stalk import bench  # light: the benchmark itself is imported when it runs
from stalk.cli.output import EXIT_ERROR, EXIT_OK, _run
from stalk.demo import run_demo
from stalk.vectors import main as vectors_main


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the self-checking loopback demo."""
    return EXIT_OK if _run(args, run_demo) else EXIT_ERROR


def cmd_vectors(args: argparse.Namespace) -> int:
    """Run published Noise test vectors through stalk's Noise layer."""
    return vectors_main([*(["-v"] if args.verbose else []), *args.files], prog="stalk")


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark stalk against TLS 1.3 and plain TCP (see src/stalk/bench/README.md)."""
    if args.backends is None and args.backend_given:
        args.backends = args.backend
    return bench.run_from_args(args)
