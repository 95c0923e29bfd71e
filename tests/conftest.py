"""Every I/O test runs on both anyio backends."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The tests' helpers, and the repository root (for ``fuzz`` and ``examples``) are importable.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# hypothesis is imported here, before any test runs: importing it late (its pytest plugin does
# at the end of a run that used no hypothesis test) can hit a CPython 3.11 ast.parse bug.
import hypothesis  # noqa: E402, F401
