"""The store suite's fixtures: one URL per store kind, so each test runs against every store it applies to."""

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from gateway.store import Store, open_store
from tests.store.support import Clock


def _url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "memory":
        return "memory"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'patchbay.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every store."""
    return _url(request.param, request, tmp_path)


@pytest.fixture
def clock() -> Clock:
    return Clock()


Opener = Callable[..., AbstractAsyncContextManager[Store]]


@pytest.fixture
def opener(clock: Clock) -> Opener:
    """``open_store`` on the test's clock."""

    def open_(url: str, **options: Any) -> AbstractAsyncContextManager[Store]:
        return open_store(url, wall_clock=clock, **options)

    return open_


@pytest.fixture
async def store(url: str, opener: Opener) -> AsyncIterator[Store]:
    async with opener(url) as opened:
        yield opened
