"""One suite, every store: the journal, run records, queries, pruning, idempotency keys and cached results."""

import anyio
import pytest

from gateway.store import RunQuery, Store
from gateway.workflows.journal import JournalEvent
from tests.store.conftest import Opener
from tests.store.support import Clock, finished, settled, started

pytestmark = pytest.mark.anyio


async def test_committed_events_read_back_in_order(store: Store) -> None:
    store.record(started("r1", 10.0))
    store.record(settled("r1", 1, 11.0, "a"))
    await store.commit()
    await store.append(
        JournalEvent("r1", 2, 12.0, "step_done", "b", 2, {"result": {"n": [1, 2.5, None]}, "error": None})
    )

    events = await store.events("r1")

    assert [(e.seq, e.kind, e.key, e.attempt) for e in events] == [
        (0, "run_started", None, 0),
        (1, "step_settled", "a", 1),
        (2, "step_done", "b", 2),
    ]
    assert events[2].data == {"result": {"n": [1, 2.5, None]}, "error": None}
    assert events[0].at == 10.0
    assert await store.events("nope") == ()


async def test_a_runs_record_is_folded_from_its_events(store: Store) -> None:
    await store.append(started("r1", 10.0, caller=("client", "bot")))
    store.record(settled("r1", 1, 11.0, "a"))
    store.record(settled("r1", 2, 12.0, "b", status="failed"))
    store.record(settled("r1", 3, 13.0, "c", status="failed"))
    await store.commit()

    running = await store.run("r1")
    assert running is not None
    assert (running.status, running.steps, running.failed_step) == ("running", 3, "b")
    assert (running.workflow, running.caller_kind, running.caller_id, running.plan) == ("w", "client", "bot", "p1")
    assert running.owner == store.instance
    assert running.updated_at == 13.0
    store.record(JournalEvent("r1", 4, 14.0, "step_started", "d", 1, {"step": "d", "tool": "t", "arguments": {}}))
    store.record(JournalEvent("r1", 5, 14.5, "step_done", "d", 1, {"result": None, "error": None}))
    await store.commit()
    touched = await store.run("r1")  # events that change nothing else still move updated_at, listed or not
    assert touched is not None
    assert (touched.steps, touched.updated_at) == (3, 14.5)
    assert [(r.run_id, r.updated_at) for r in await store.runs()] == [("r1", 14.5)]

    await store.append(finished("r1", 6, 15.0, status="failed"))
    done = await store.run("r1")
    assert done is not None
    assert (done.status, done.finished_at, done.duration_ms) == ("failed", 15.0, 5.0)
    assert done.result == {"content": [{"type": "text", "text": "done"}], "isError": True}
    assert await store.run("unknown") is None


async def test_runs_are_listed_most_recent_first_and_filtered(store: Store) -> None:
    await store.append(started("old", 10.0, workflow="a", caller=("client", "x")))
    await store.append(finished("old", 1, 11.0))
    await store.append(started("mid", 20.0, workflow="b", caller=("client", "y")))
    await store.append(finished("mid", 1, 21.0, status="failed"))
    await store.append(started("new", 30.0, workflow="a", caller=("client", "y")))

    async def ids(**query: object) -> list[str]:
        return [record.run_id for record in await store.runs(RunQuery(**query))]  # type: ignore[arg-type]

    assert await ids() == ["new", "mid", "old"]
    assert await ids(workflow="a") == ["new", "old"]
    assert await ids(status="failed") == ["mid"]
    assert await ids(status="succeeded") == ["old"]
    assert await ids(status="running") == ["new"]
    assert await ids(status="interrupted") == []
    assert await ids(since=20.0) == ["new", "mid"]
    assert await ids(caller=("client", "y")) == ["new", "mid"]
    assert await ids(caller=("user", "y")) == []
    assert await ids(limit=2) == ["new", "mid"]
    assert await ids(workflow="a", status="running", limit=1) == ["new"]


async def test_mark_sets_and_clears_a_runs_note(store: Store) -> None:
    await store.append(started("r1", 10.0))
    await store.mark("r1", "its workflow changed since it started")
    record = await store.run("r1")
    assert record is not None
    assert record.note == "its workflow changed since it started"
    await store.append(settled("r1", 1, 11.0, "a"))  # later events keep the note
    record = await store.run("r1")
    assert record is not None
    assert (record.note, record.steps) == ("its workflow changed since it started", 1)
    await store.mark("r1", None)
    record = await store.run("r1")
    assert record is not None
    assert record.note is None


async def test_prune_forgets_finished_runs_by_age_and_by_count(store: Store, clock: Clock) -> None:
    for n in range(5):  # r0 … r4 finished at 100, 200, … 500; "going" is still running
        await store.append(started(f"r{n}", 100.0 * n + 50))
        await store.append(finished(f"r{n}", 1, 100.0 * n + 100))
    await store.append(started("going", 600.0))
    clock.now = 1000.0

    assert await store.prune(age=750.0) == 2  # finished before 250: r0, r1
    assert [r.run_id for r in await store.runs()] == ["going", "r4", "r3", "r2"]
    assert await store.events("r0") == ()
    assert await store.prune(count=1) == 2  # of r2, r3, r4 only the most recent stays
    assert [r.run_id for r in await store.runs()] == ["going", "r4"]
    assert len(await store.events("going")) == 1
    assert await store.prune(age=1.0, count=0) == 1
    assert [r.run_id for r in await store.runs()] == ["going"]


async def test_an_idempotency_key_is_held_by_the_first_call_until_it_expires(store: Store, clock: Clock) -> None:
    assert await store.idempotency_claim("client:a", "k1", "w", ttl=60.0) is None
    held = await store.idempotency_claim("client:a", "k1", "other", ttl=60.0)
    assert held is not None
    assert (held.tool, held.run_id, held.result, held.owner) == ("w", None, None, store.instance)
    assert (held.created_at, held.expires_at) == (clock.now, clock.now + 60.0)
    assert await store.idempotency_claim("client:b", "k1", "w", ttl=60.0) is None  # keys are scoped

    await store.idempotency_bind("client:a", "k1", "run-1")
    await store.idempotency_finish("client:a", "k1", {"content": [], "isError": False})
    entry = await store.idempotency_get("client:a", "k1")
    assert entry is not None
    assert (entry.run_id, entry.result) == ("run-1", {"content": [], "isError": False})

    clock.now += 60.0  # expired: absent, and claimable afresh
    assert await store.idempotency_get("client:a", "k1") is None
    assert await store.idempotency_claim("client:a", "k1", "w2", ttl=60.0) is None
    again = await store.idempotency_get("client:a", "k1")
    assert again is not None
    assert (again.tool, again.run_id, again.result) == ("w2", None, None)


async def test_a_released_idempotency_key_can_be_claimed_again(store: Store) -> None:
    assert await store.idempotency_claim("client:a", "k", "w", ttl=60.0) is None
    await store.idempotency_release("client:a", "k")
    assert await store.idempotency_get("client:a", "k") is None
    assert await store.idempotency_claim("client:a", "k", "w", ttl=60.0) is None


async def test_prune_forgets_expired_idempotency_keys(store: Store, clock: Clock) -> None:
    await store.idempotency_claim("client:a", "short", "w", ttl=10.0)
    await store.idempotency_claim("client:a", "long", "w", ttl=100.0)
    clock.now += 50.0
    await store.prune()
    clock.now -= 50.0  # back in time: only what prune deleted is gone
    assert await store.idempotency_get("client:a", "short") is None
    assert await store.idempotency_get("client:a", "long") is not None


async def test_concurrent_claims_of_one_idempotency_key_have_one_winner(url: str, opener: Opener) -> None:
    async with opener(url) as store:
        results: list[object] = []

        async def claim() -> None:
            results.append(await store.idempotency_claim("client:a", "k", "w", ttl=60.0))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(claim)
    assert results.count(None) == 1


# -- retries relayed to the replica holding their call ------------------------------------------------------------


async def test_a_relayed_retry_is_taken_once_by_its_holder_and_its_answer_read_once(store: Store) -> None:
    holder, other = f"{store.instance}/workflows/a", f"{store.instance}/server/b"
    retry = {"principal": {"kind": "client", "id": "ada"}, "inputResponses": {"q1": {"action": "accept"}}}
    relay_id = await store.relay_put(holder, "held-1", retry, 1_000_060.0)
    assert relay_id is not None

    assert await store.relay_take(other) == []
    [taken] = await store.relay_take(holder)
    assert (taken.id, taken.holder, taken.held, taken.retry, taken.deadline) == (
        relay_id,
        holder,
        "held-1",
        retry,
        1_000_060.0,
    )
    assert await store.relay_take(holder) == []  # given once
    assert await store.relay_answer_of(relay_id) is None  # not answered yet
    assert not await store.relay_withdraw(relay_id)  # taken: its answer is coming

    await store.relay_answer(relay_id, {"result": {"content": [], "isError": False}})
    assert await store.relay_answer_of(relay_id) == {"result": {"content": [], "isError": False}}
    assert await store.relay_answer_of(relay_id) is None  # read once, then forgotten


async def test_a_relayed_retry_nobody_took_is_withdrawn_and_none_is_taken_past_its_deadline(
    store: Store, clock: Clock
) -> None:
    holder = f"{store.instance}/workflows/a"
    withdrawn = await store.relay_put(holder, "held-1", {}, 1_000_060.0)
    late = await store.relay_put(holder, "held-2", {}, 1_000_060.0)
    assert withdrawn is not None
    assert late is not None

    assert await store.relay_withdraw(withdrawn)
    assert await store.relay_withdraw("unknown")
    clock.now = 1_000_061.0
    assert await store.relay_take(holder) == []
    assert await store.prune() == 0
    clock.now = 1_000_059.0
    assert await store.relay_take(holder) == []  # pruned: gone


# -- cached results (a server's cache:) ----------------------------------------------------------------------------


async def test_a_cached_result_is_read_back_until_it_expires(store: Store, clock: Clock) -> None:
    result = {"content": [{"type": "text", "text": "7 in stock"}], "isError": False}
    kept_at = clock.now
    await store.cache_put("crm", "k1", result, 60.0, 10)

    entry = await store.cache_get("crm", "k1")
    assert entry is not None
    assert (entry.result, entry.cached_at) == (result, kept_at)
    assert await store.cache_get("crm", "k2") is None
    assert await store.cache_get("billing", "k1") is None  # another server's cache
    clock.now += 59.0
    assert await store.cache_get("crm", "k1") is not None
    clock.now += 1.0
    assert await store.cache_get("crm", "k1") is None


async def test_a_cached_result_is_replaced_by_the_next_one_kept(store: Store, clock: Clock) -> None:
    await store.cache_put("crm", "k1", {"n": 1}, 60.0, 10)
    clock.now += 50.0
    await store.cache_put("crm", "k1", {"n": 2}, 60.0, 10)
    clock.now += 50.0  # the first would have expired; the second has not

    entry = await store.cache_get("crm", "k1")
    assert entry is not None
    assert (entry.result, entry.cached_at) == ({"n": 2}, clock.now - 50.0)


async def test_the_oldest_cached_results_of_a_scope_are_forgotten_beyond_its_bound(store: Store, clock: Clock) -> None:
    for n in range(4):
        await store.cache_put("crm", f"k{n}", {"n": n}, 600.0, 10)
        clock.now += 1.0
    await store.cache_put("billing", "b", {}, 600.0, 10)
    await store.cache_put("crm", "k0", {"n": 0}, 600.0, 3)  # kept again: now the newest; k1 is the oldest
    clock.now += 1.0
    await store.cache_put("crm", "k4", {"n": 4}, 600.0, 3)

    kept = [key for key in ("k0", "k1", "k2", "k3", "k4") if await store.cache_get("crm", key) is not None]
    assert kept == ["k0", "k3", "k4"]
    assert await store.cache_get("billing", "b") is not None  # another scope's are not counted


async def test_prune_forgets_expired_cached_results(store: Store, clock: Clock) -> None:
    await store.cache_put("crm", "short", {}, 10.0, 10)
    await store.cache_put("crm", "long", {}, 100.0, 10)
    clock.now += 50.0
    await store.prune()
    clock.now -= 50.0  # back in time: only what prune deleted is gone
    assert await store.cache_get("crm", "short") is None
    assert await store.cache_get("crm", "long") is not None
