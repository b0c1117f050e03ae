"""The in-memory store's bounds: whole finished runs are forgotten, oldest first; runs still going are kept."""

import pytest

from gateway.store.memory import MemoryStore
from gateway.workflows.journal import JournalEvent

pytestmark = pytest.mark.anyio


async def record(store: MemoryStore, run_id: str, steps: int, *, finish: bool = True) -> None:
    """A run of ``steps`` settled steps: ``steps + 2`` events when finished."""
    await store.append(JournalEvent(run_id, 0, 0.0, "run_started", data={"workflow": "w"}))
    for n in range(steps):
        await store.append(JournalEvent(run_id, n + 1, 0.0, "step_settled", f"s{n}", 1, {"status": "succeeded"}))
    if finish:
        await store.append(JournalEvent(run_id, steps + 1, 0.0, "run_finished", data={"status": "succeeded"}))


async def run_ids(store: MemoryStore) -> list[str]:
    return [record.run_id for record in await store.runs()]


async def test_the_oldest_runs_are_forgotten_beyond_the_kept_runs() -> None:
    store = MemoryStore(kept_runs=2)
    for run_id in ("r1", "r2", "r3"):
        await record(store, run_id, 1)
    assert await run_ids(store) == ["r3", "r2"]
    assert await store.events("r1") == ()
    assert await store.run("r1") is None


async def test_whole_old_runs_are_forgotten_to_stay_within_the_kept_events() -> None:
    store = MemoryStore(kept_events=10)
    await record(store, "r1", 2)  # 4 events
    await record(store, "r2", 2)  # 8
    await record(store, "r3", 1)  # 11: r1 goes, 7 left
    assert await run_ids(store) == ["r3", "r2"]
    assert [len(await store.events(r)) for r in ("r1", "r2", "r3")] == [0, 4, 3]


async def test_runs_still_going_are_kept_whole_however_long() -> None:
    store = MemoryStore(kept_runs=1, kept_events=5)
    await record(store, "old", 1)
    await record(store, "going", 3, finish=False)
    await record(store, "big", 20, finish=False)
    assert await run_ids(store) == ["big", "going"]
    assert [event.seq for event in await store.events("big")] == list(range(21))
    assert len(await store.events("going")) == 4
    await store.append(JournalEvent("going", 4, 0.0, "run_finished", data={"status": "failed"}))
    assert await run_ids(store) == ["big"]  # finished, so over the limits
