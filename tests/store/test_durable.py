"""The stores that outlive the process (SQLite, PostgreSQL): group commit, reopening, a killed owner, schema
versions, and the URLs ``open_store`` takes."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import anyio
import asyncpg
import pytest

from gateway.errors import StoreError
from gateway.store import RunQuery, Store, open_store
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SqliteStore
from tests.store.conftest import Opener
from tests.store.support import finished, settled, started

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


def transactions(store: Store) -> int:
    assert isinstance(store, SqliteStore | PostgresStore)
    return store.transactions


async def test_concurrent_commits_share_a_few_transactions(durable_url: str, opener: Opener) -> None:
    async with opener(durable_url) as store:
        await store.append(started("r1", 1.0))
        before = transactions(store)

        async def step(n: int) -> None:
            store.record(settled("r1", n + 1, 2.0, f"s{n}"))
            await store.commit()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for n in range(50):
                    tg.start_soon(step, n)

        assert transactions(store) - before <= 3  # not 50: the first round, then everything that waited for it
        assert len(await store.events("r1")) == 51
        record = await store.run("r1")
        assert record is not None
        assert record.steps == 50


async def test_what_was_committed_is_there_after_reopening(durable_url: str, opener: Opener) -> None:
    async with opener(durable_url) as store:
        await store.append(started("r1", 1.0))
        await store.append(finished("r1", 1, 2.0))
        store.record(started("r2", 3.0))  # not committed: closing commits it
        await store.idempotency_claim("client:a", "k", "w", ttl=3600.0)

    async with opener(durable_url) as again:
        assert [e.kind for e in await again.events("r1")] == ["run_started", "run_finished"]
        assert [(r.run_id, r.status) for r in await again.runs()] == [("r2", "interrupted"), ("r1", "succeeded")]
        assert await again.idempotency_get("client:a", "k") is not None


async def test_a_killed_owners_committed_events_survive_and_its_run_reads_interrupted(
    durable_url: str, opener: Opener
) -> None:
    script = textwrap.dedent(
        """
        import sys, anyio
        from gateway.store import open_store
        from tests.store.support import settled, started

        async def main() -> None:
            async with open_store(sys.argv[1]) as store:
                store.record(started("victim", 1.0))
                store.record(settled("victim", 1, 2.0, "a"))
                await store.commit()
                print(store.instance, flush=True)
                await anyio.sleep(60)

        anyio.run(main)
        """
    )
    argv = [sys.executable, "-c", script, durable_url]
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True) as process:  # noqa: ASYNC220
        try:
            assert process.stdout is not None
            with anyio.fail_after(20):
                owner = (await anyio.to_thread.run_sync(process.stdout.readline)).strip()
            assert owner
            async with opener(durable_url) as store:
                record = await store.run("victim")
                assert record is not None
                assert (record.status, record.owner) == ("running", owner)
                process.send_signal(signal.SIGKILL)
                process.wait(10)

                assert [e.kind for e in await store.events("victim")] == ["run_started", "step_settled"]
                with anyio.fail_after(5):  # PostgreSQL ends the dead client's session (and its lock) a moment later
                    while (record := await store.run("victim")) is not None and record.status == "running":  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                assert record is not None
                assert (record.status, record.steps) == ("interrupted", 1)
                assert [r.run_id for r in await store.runs(RunQuery(status="interrupted"))] == ["victim"]
                assert await store.runs(RunQuery(status="running")) == []
        finally:
            process.kill()


async def test_exactly_one_instance_claims_an_orphaned_run(durable_url: str, opener: Opener) -> None:
    async with opener(durable_url) as gone:
        await store_run(gone, "orphan")
    async with opener(durable_url) as one, opener(durable_url) as two:
        wins: dict[str, bool] = {}

        async def claim(store: Store) -> None:
            wins[store.instance] = await store.claim("orphan")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(claim, one)
                tg.start_soon(claim, two)

        assert sorted(wins.values()) == [False, True]
        [winner] = [instance for instance, won in wins.items() if won]
        for store in (one, two):
            record = await store.run("orphan")
            assert record is not None
            assert (record.status, record.owner) == ("running", winner)
        assert not await one.claim("orphan")
        assert not await two.claim("orphan")
        loser = two if winner == one.instance else one
        await loser.append(settled("orphan", 1, 2.0, "a"))  # the owner is the claimer, whoever writes
        record = await loser.run("orphan")
        assert record is not None
        assert (record.owner, record.steps) == (winner, 1)


async def store_run(store: Store, run_id: str) -> None:
    await store.append(started(run_id, 1.0))


async def test_a_live_instances_runs_are_running_not_interrupted(durable_url: str, opener: Opener) -> None:
    async with opener(durable_url) as owner, opener(durable_url) as other:
        await store_run(owner, "r1")
        record = await other.run("r1")
        assert record is not None
        assert (record.status, record.owner) == ("running", owner.instance)
        assert [r.status for r in await other.runs()] == ["running"]
        assert not await other.claim("r1")
        await other.heartbeat()


async def test_a_finished_run_cannot_be_claimed(durable_url: str, opener: Opener) -> None:
    async with opener(durable_url) as gone:
        await store_run(gone, "r1")
        await gone.append(finished("r1", 1, 2.0))
    async with opener(durable_url) as store:
        assert not await store.claim("r1")
        assert not await store.claim("unknown")


async def test_two_gateways_opening_a_fresh_store_at_once_both_open_it(durable_url: str, opener: Opener) -> None:
    instances: list[str] = []

    async def open_one(n: int) -> None:
        async with opener(durable_url) as store:
            await store_run(store, f"run-{n}")
            instances.append(store.instance)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(open_one, n)
    assert len(set(instances)) == 3


async def set_schema_version(url: str, version: int) -> None:
    if url.startswith("sqlite:///"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as con, con:
            con.execute("UPDATE schema_version SET version = ?", (version,))
        return
    con = await asyncpg.connect(url)
    try:
        await con.execute("UPDATE schema_version SET version = $1", version)
    finally:
        await con.close()


async def test_a_store_with_a_newer_schema_is_refused(durable_url: str, opener: Opener) -> None:
    async with opener(durable_url) as store:
        await store_run(store, "r1")
    await set_schema_version(durable_url, 99)

    with pytest.raises(StoreError) as caught:
        async with opener(durable_url):
            pytest.fail("the store opened")
    message = str(caught.value)
    assert "schema version 99" in message
    assert "version 4" in message
    assert "upgrade Patchbay" in message


async def sql(url: str, statement: str) -> None:
    if url.startswith("sqlite:///"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as con, con:
            con.execute(statement)
        return
    con = await asyncpg.connect(url)
    try:
        await con.execute(statement)
    finally:
        await con.close()


async def test_a_version_1_store_is_migrated_and_keeps_its_runs(durable_url: str, opener: Opener) -> None:
    async with opener(durable_url) as store:
        await store_run(store, "r1")
    await sql(durable_url, "DROP TABLE cache")  # what version 1 had
    await sql(durable_url, "DROP TABLE relays")
    await sql(durable_url, "DROP TABLE cancel_requests")
    await set_schema_version(durable_url, 1)

    async with opener(durable_url) as store:
        record = await store.run("r1")
        assert await store.claim("r1")  # its owner is gone
        await store.request_cancel("r1", "asked by another gateway")
        requests = await store.cancel_requests()
    assert record is not None
    assert requests == [("r1", "asked by another gateway")]


async def test_a_version_2_store_is_migrated_and_relays_retries(durable_url: str, opener: Opener) -> None:
    async with opener(durable_url) as store:
        await store_run(store, "r1")
    await sql(durable_url, "DROP TABLE cache")  # what version 2 had
    await sql(durable_url, "DROP TABLE relays")
    await set_schema_version(durable_url, 2)

    async with opener(durable_url) as store:
        record = await store.run("r1")
        relay_id = await store.relay_put(f"{store.instance}/x/1", "h1", {"n": 1}, 2_000_000.0)
        taken = await store.relay_take(f"{store.instance}/x/1")
    assert record is not None
    assert relay_id is not None
    assert [(relay.id, relay.retry) for relay in taken] == [(relay_id, {"n": 1})]


async def test_a_version_3_store_is_migrated_and_caches_results(durable_url: str, opener: Opener) -> None:
    async with opener(durable_url) as store:
        await store_run(store, "r1")
    await sql(durable_url, "DROP TABLE cache")  # what version 3 had
    await set_schema_version(durable_url, 3)

    async with opener(durable_url) as store:
        record = await store.run("r1")
        await store.cache_put("crm", "k1", {"content": []}, 60.0, 10)
        entry = await store.cache_get("crm", "k1")
    assert record is not None
    assert entry is not None
    assert entry.result == {"content": []}


async def test_a_result_cached_through_one_instance_is_read_through_another(durable_url: str, opener: Opener) -> None:
    async with opener(durable_url) as one, opener(durable_url) as other:
        await one.cache_put("crm", "k1", {"structuredContent": {"id": 7}}, 60.0, 10)
        entry = await other.cache_get("crm", "k1")
    assert entry is not None
    assert entry.result == {"structuredContent": {"id": 7}}


async def test_a_retry_is_not_relayed_to_an_instance_that_is_gone(durable_url: str, opener: Opener) -> None:
    async with opener(durable_url) as gone:
        holder = f"{gone.instance}/workflows/1"
    async with opener(durable_url) as store:
        assert await store.relay_put(holder, "h1", {}, 2_000_000.0) is None


async def test_a_cancellation_asked_through_one_instance_is_given_once_to_the_owner(
    durable_url: str, opener: Opener
) -> None:
    async with opener(durable_url) as owner, opener(durable_url) as other:
        await store_run(owner, "r1")
        await other.request_cancel("r1", "the caller cancelled the run")
        seen_by_other = await other.cancel_requests()
        seen_by_owner = [await owner.cancel_requests() for _ in range(2)]
    assert seen_by_other == []
    assert seen_by_owner == [[("r1", "the caller cancelled the run")], []]


@pytest.mark.parametrize("durability", ["process", "machine"])
async def test_durability_sets_how_commits_reach_the_disk(durability: str, durable_url: str, opener: Opener) -> None:
    async with opener(durable_url, durability=durability) as store:
        if isinstance(store, SqliteStore):
            [(level,)] = store._db.execute("PRAGMA synchronous").fetchall()
            assert level == {"process": 1, "machine": 2}[durability]  # NORMAL, FULL
            [(mode,)] = store._db.execute("PRAGMA journal_mode").fetchall()
            assert mode == "wal"
        else:
            assert isinstance(store, PostgresStore)
            async with store._pool.acquire() as con:
                setting = await con.fetchval("SHOW synchronous_commit")
            assert setting == {"process": "off", "machine": "on"}[durability]


async def test_the_sqlite_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    umask = os.umask(0)
    try:
        async with open_store(f"sqlite:///{tmp_path / 'runs.db'}") as store:
            await store_run(store, "r1")
            modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}  # noqa: ASYNC240
    finally:
        os.umask(umask)
    assert modes == {"runs.db": 0o600, "runs.db-wal": 0o600, "runs.db-shm": 0o600, "runs.db.instances": 0o700}


async def test_a_relative_sqlite_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with open_store("sqlite:///sub.db") as store:
        await store_run(store, "r1")
    assert (tmp_path / "sub.db").is_file()


@pytest.mark.parametrize(
    "url", ["mysql://user:secret@db/patchbay", "sqlite:///", "sqlite:///:memory:", "patchbay.db", "redis://h"]
)
async def test_a_url_that_names_no_store_is_refused(url: str) -> None:
    with pytest.raises(StoreError) as caught:
        async with open_store(url):
            pytest.fail("a store opened")
    assert "secret" not in str(caught.value)


async def test_an_unreachable_postgresql_is_a_store_error_without_the_password() -> None:
    with pytest.raises(StoreError) as caught:
        async with open_store("postgresql://postgres:secret@127.0.0.1:1/test"):
            pytest.fail("a store opened")
    assert "secret" not in str(caught.value)
