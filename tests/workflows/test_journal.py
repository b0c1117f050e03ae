"""The in-memory journal: append-only events per run, bounded by runs and by events."""

import pytest

from gateway.workflows.journal import JournalEvent, MemoryJournal

pytestmark = pytest.mark.anyio


async def record(journal: MemoryJournal, run_id: str, steps: int, *, finish: bool = True) -> None:
    """A run of ``steps`` settled steps: ``steps + 2`` events when finished."""
    await journal.append(JournalEvent(run_id, 0, 0.0, "run_started", data={"workflow": "w"}))
    for n in range(steps):
        await journal.append(JournalEvent(run_id, n + 1, 0.0, "step_settled", f"s{n}", 1, {"status": "succeeded"}))
    if finish:
        await journal.append(JournalEvent(run_id, steps + 1, 0.0, "run_finished", data={"status": "succeeded"}))


async def test_the_oldest_runs_are_forgotten_beyond_the_kept_runs() -> None:
    journal = MemoryJournal(kept_runs=2)
    for run_id in ("r1", "r2", "r3"):
        await record(journal, run_id, 1)
    assert [summary.run_id for summary in await journal.runs()] == ["r3", "r2"]
    assert await journal.events("r1") == ()


async def test_whole_old_runs_are_forgotten_to_stay_within_the_kept_events() -> None:
    journal = MemoryJournal(kept_events=10)
    await record(journal, "r1", 2)  # 4 events
    await record(journal, "r2", 2)  # 8
    await record(journal, "r3", 1)  # 11: r1 goes, 7 left
    assert [summary.run_id for summary in await journal.runs()] == ["r3", "r2"]
    assert [len(await journal.events(r)) for r in ("r1", "r2", "r3")] == [0, 4, 3]


async def test_runs_still_going_are_kept_whole_however_long() -> None:
    journal = MemoryJournal(kept_runs=1, kept_events=5)
    await record(journal, "old", 1)
    await record(journal, "going", 3, finish=False)
    await record(journal, "big", 20, finish=False)
    assert [summary.run_id for summary in await journal.runs()] == ["big", "going"]
    assert [event.seq for event in await journal.events("big")] == list(range(21))
    assert len(await journal.events("going")) == 4
    await journal.append(JournalEvent("going", 4, 0.0, "run_finished", data={"status": "failed"}))
    assert [summary.run_id for summary in await journal.runs()] == ["big"]  # finished, so over the limits
