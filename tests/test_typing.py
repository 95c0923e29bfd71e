"""The public API type-checks as a user's program uses it, and mypy catches its mistakes.

mypy --strict runs once over two programs in tests/user_programs/: one written as README.md
shows the API (connect, send, receive and unpack, listen with a handler, an anyio Listener,
the sync facade), which must check cleanly and whose ``reveal_type`` lines must show the
types their ``# R:`` comments give; and one of mistakes, each line of which must fail with
the error codes its ``# E:`` comment gives, and no other line. The project's mypy cache
(filled by ``make typecheck``) keeps it to about a second.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PROGRAMS = ROOT / "tests" / "user_programs"
PROGRAM = PROGRAMS / "user_program.py"
MISTAKES = PROGRAMS / "user_mistakes.py"
LINE = re.compile(
    r"^(?P<path>[^:]+):(?P<line>\d+): (?P<kind>error|note): (?P<message>.*?)"
    r"(?:  \[(?P<code>[a-z-]+)\])?$"
)


def expected(path: Path, marker: str) -> dict[int, str]:
    """What each line of ``path`` says after ``# <marker>:``, by line number."""
    found = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if f"  # {marker}: " in line:
            found[number] = line.split(f"  # {marker}: ", 1)[1].strip()
    return found


def test_a_user_program_type_checks_and_its_mistakes_do_not() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "--strict",
            "--show-error-codes",
            "--no-pretty",
            "--no-error-summary",
            str(PROGRAM),
            str(MISTAKES),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr  # 1: errors found
    revealed: dict[int, str] = {}
    errors: dict[int, set[str]] = {}
    for line in result.stdout.splitlines():
        match = LINE.match(line)
        assert match is not None, line
        number = int(match["line"])
        if Path(match["path"]).name == PROGRAM.name:
            assert match["kind"] == "note", line  # the user's program has no error
            revealed[number] = match["message"].removeprefix("Revealed type is ").strip('"')
        elif match["kind"] == "error":
            assert Path(match["path"]).name == MISTAKES.name, line
            errors.setdefault(number, set()).add(match["code"])
    assert revealed == expected(PROGRAM, "R")
    assert errors == {line: set(codes.split()) for line, codes in expected(MISTAKES, "E").items()}
