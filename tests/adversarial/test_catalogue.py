"""Run every row of the catalogue on both backends (see README.md here)."""

from __future__ import annotations

from collections import Counter

import pytest

from .catalogue import CASES, README, generated_part, render
from .harness import Case, Env, run_case


@pytest.mark.parametrize("case", CASES, ids=[case.ref for case in CASES])
async def test_case(
    case: Case, env: Env, anyio_backend: str, request: pytest.FixtureRequest
) -> None:
    if case.bug is not None and anyio_backend in case.bug_backends:
        request.applymarker(pytest.mark.xfail(strict=True, reason=case.bug))
    await run_case(case, env)


def test_readme_table_is_generated_from_the_cases() -> None:
    text = README.read_text(encoding="utf-8")
    assert generated_part(text) == render(CASES), (
        "README.md is out of date: run `../.venv/bin/python -m adversarial.catalogue --write` "
        "from the tests directory"
    )


def test_the_catalogue_is_large_named_and_mostly_real_tcp() -> None:
    refs = Counter(case.ref for case in CASES)
    assert not [ref for ref, n in refs.items() if n > 1], "case ids must be unique"
    assert len(CASES) >= 250
    over_tcp = [case for case in CASES if case.direction not in ("sans-io", "fault")]
    assert len(over_tcp) * 2 >= len(CASES)
    for case in CASES:
        assert case.id.replace("_", "").isalnum(), case.id
        assert case.bug is None or case.bug.startswith("BUG: "), case.ref
        assert case.sends, case.ref
