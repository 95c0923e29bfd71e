"""One event loop and four listeners per backend for the whole catalogue.

``anyio_backend`` is module-scoped here (tests/conftest.py makes it per test), which lets
the ``env`` fixture keep its listeners running across every case of a module: the cases
then also show that the listener survives the whole catalogue, not just one attack.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .harness import Env


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
async def env(anyio_backend: str) -> AsyncIterator[Env]:
    async with Env.start() as env:
        # Warm up: the first connection of a run starts lazily created machinery (trio
        # starts system tasks) that must not count as a leak of the first case.
        await env.control(env.main)
        yield env
