"""Run one stalk fuzz target under atheris (libFuzzer, coverage-guided) for as long as you like.

Usage::

    python fuzz/run_atheris.py TARGET [libFuzzer options] [CORPUS_DIR ...]
    python fuzz/run_atheris.py TARGET --write-seeds DIR
    python fuzz/run_atheris.py --list

TARGET is a name from ``fuzz/targets.py`` (``--list`` prints them). Everything after the
options this script knows is passed to libFuzzer, e.g. ``-max_total_time=3600``,
``-jobs=2 -workers=2``, ``-max_len=70000``, a corpus directory. ``--write-seeds DIR``
writes the target's seed inputs into DIR (start a corpus with it).

atheris is not a stalk dependency: ``pip install atheris`` (into the same virtualenv as
stalk). See fuzz/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

try:
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]
except ImportError:  # pragma: no cover - depends on the environment
    atheris = None


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Fuzz one stalk target with atheris.",
        epilog="Unknown options and positional corpus directories go to libFuzzer.",
    )
    parser.add_argument("target", nargs="?", help="a target name (see --list)")
    parser.add_argument("--list", action="store_true", help="print the target names")
    parser.add_argument("--write-seeds", type=Path, metavar="DIR", help="write the seeds, exit")
    return parser.parse_known_args(argv)


def main(argv: list[str]) -> int:
    """Entry point: parse the options, then hand over to libFuzzer."""
    args, libfuzzer_args = _parse(argv[1:])
    if atheris is None and not (args.list or args.write_seeds):
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    if atheris is not None:
        # Instrument stalk (imported for the first time by targets) for coverage feedback.
        with atheris.instrument_imports(include=["stalk", "targets"]):
            import targets  # noqa: PLC0415 - imported inside the block to be instrumented
    else:
        import targets  # noqa: PLC0415 - same module, uninstrumented

    if args.list:
        print("\n".join(sorted(targets.TARGETS)))
        return 0
    if args.target not in targets.TARGETS:
        print(f"unknown target {args.target!r}; --list shows them", file=sys.stderr)
        return 2
    if args.write_seeds:
        args.write_seeds.mkdir(parents=True, exist_ok=True)
        for seed in targets.seeds(args.target):
            name = hashlib.sha1(seed, usedforsecurity=False).hexdigest()
            (args.write_seeds / name).write_bytes(seed)
        return 0

    fuzz: Callable[[], None] = atheris.Fuzz
    atheris.Setup([argv[0], *libfuzzer_args], targets.TARGETS[args.target])
    fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
