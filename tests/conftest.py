import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from tests.everything_support import Everything, run_everything

POSTGRES = os.environ.get("PATCHBAY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
"""The PostgreSQL database the tests use: each test gets a schema of its own in it."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _postgres(sql: str) -> None:
    con = await asyncpg.connect(POSTGRES, timeout=5)
    try:
        await con.execute(sql)
    finally:
        await con.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A ``postgresql://`` URL whose ``search_path`` is a fresh schema, dropped after the test.

    Without a PostgreSQL to reach the test fails (it is not skipped): every machine of ours runs one, and
    ``.ci/run`` starts it when it is not running, so both stores are always tested.
    """
    schema = f"test_{uuid.uuid4().hex[:16]}"
    try:
        anyio.run(_postgres, f"CREATE SCHEMA {schema}")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES} cannot be used ({exc!r}): start it (see .ci/run)")
    yield f"{POSTGRES}?search_path={schema}"
    anyio.run(_postgres, f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store that outlives the process: a SQLite file in the test's folder, a PostgreSQL schema."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite:///{tmp_path / 'patchbay.db'}"


@pytest.fixture(scope="module")
async def everything(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Everything]:
    """server-everything over HTTP and stdio behind one ``patchbay serve``, shared by a module's tests.

    A module that uses it declares a module-scoped ``anyio_backend`` fixture (an async fixture cannot
    outlive its event loop). Its tests share the gateway, so none may leave a call held there: a
    2026-07-28 round trip the client abandons holds the stdio upstream's call until it times out.
    """
    async with run_everything(tmp_path_factory.mktemp("everything")) as stack:
        yield stack
