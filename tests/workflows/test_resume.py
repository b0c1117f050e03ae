"""Resuming runs from their journal, in-process: a run stopped mid-way (as a crash leaves it) goes on
from its recorded events; what completed is not done again, what was in flight is done again under
the same idempotency key. And idempotent workflow calls: one run per key and caller."""

from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import anyio
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.dispatch import Invocation
from gateway.metrics import Metrics
from gateway.store import RunQuery, RunRecord, open_store
from gateway.store.memory import MemoryStore
from gateway.types import CallContext, JSONObject, Principal, ToolResult
from gateway.workflows.journal import JournalEvent
from gateway.workflows.model import Workflow
from gateway.workflows.plan import Plan, compile_workflow
from gateway.workflows.runner import IDEMPOTENCY_META_KEY, RUN_META_KEY, Runner
from gateway.workflows.runs import RunNotResumable, Runs

pytestmark = pytest.mark.anyio

CALLER = CallContext(principal=Principal("tester"))


def plan_of(text: str, name: str = "w") -> Plan:
    plan, problems = compile_workflow(name, Workflow.model_validate(yaml.safe_load(text)))
    assert problems == []
    return plan


class Upstream:
    """Records each call with its idempotency key; tools named in ``hold`` wait until released."""

    def __init__(self, hold: Sequence[str] = ()) -> None:
        self.calls: list[tuple[str, dict[str, Any], str | None]] = []
        self.hold = set(hold)
        self.held = 0
        self.release = anyio.Event()
        self.holding = anyio.Event()
        self.failures: dict[str, int] = {}

    async def __call__(self, tool: str, arguments: JSONObject, context: CallContext) -> Invocation:
        key = (context.meta or {}).get(IDEMPOTENCY_META_KEY)
        self.calls.append((tool, dict(arguments), key))
        if tool in self.hold or f"{tool}@{arguments.get('n')}" in self.hold:
            self.held += 1
            self.holding.set()
            await self.release.wait()
        if self.failures.get(tool, 0) > 0:
            self.failures[tool] -= 1
            return Invocation(ToolResult.text("it broke", is_error=True), "error")
        return Invocation(ToolResult((), structured_content={"tool": tool, **arguments}), "ok")

    def called(self, tool: str) -> list[tuple[dict[str, Any], str | None]]:
        return [(args, key) for name, args, key in self.calls if name == tool]


async def crash(runner: Runner, plan: Plan, arguments: dict[str, Any], journal: MemoryStore, until: Any) -> str:
    """Start a run, wait until ``until()`` holds, then stop it as a gateway going down leaves it: its id."""
    runner.stopping = True
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run, plan, arguments, CALLER)
            while not until():  # noqa: ASYNC110 - a condition on the fake upstream, polled
                await anyio.sleep(0.001)
            tg.cancel_scope.cancel()
    [record] = await journal.runs()
    assert record.status == "running"  # not finished, not compensated
    return record.run_id


CHAIN = """
steps:
  - {id: a, call: t.a, with: {n: 1}}
  - {id: b, call: t.b, with: {n: "${.steps.a.result.n}"}}
  - {id: c, call: t.c, with: {n: "${.steps.b.result.n}", run: "${.run.id}"}}
output: {c: "${.steps.c.result}"}
"""


async def test_a_resumed_run_does_not_repeat_completed_steps_and_repeats_the_one_in_flight_under_its_key() -> None:
    plan = plan_of(CHAIN)
    journal, first = MemoryStore(), Upstream(hold=["t.b"])
    run_id = await crash(Runner(first, journal), plan, {}, journal, lambda: first.held)
    assert [name for name, _, _ in first.calls] == ["t.a", "t.b"]

    second = Upstream()
    with anyio.fail_after(5):
        result = await Runner(second, journal).resume(plan, await journal.events(run_id), CALLER)
    assert not result.is_error, result.content
    assert [name for name, _, _ in second.calls] == ["t.b", "t.c"]  # a is not called again
    assert first.called("t.b")[0][1] == second.called("t.b")[0][1] == f"{run_id}:b"
    assert second.called("t.c") == [({"n": 1, "run": run_id}, f"{run_id}:c")]
    assert result.structured_content == {"c": {"tool": "t.c", "n": 1, "run": run_id}}
    assert result.meta == {RUN_META_KEY: run_id}
    record = await journal.run(run_id)
    assert record is not None
    assert record.status == "succeeded"
    kinds = [event.kind for event in await journal.events(run_id)]
    assert kinds.count("run_resumed") == 1
    assert kinds[-1] == "run_finished"


async def test_in_a_fan_out_only_the_unfinished_branches_run_again() -> None:
    plan = plan_of("""
steps:
  - id: each
    for_each: "${.input.ns}"
    as: n
    concurrency: 5
    steps:
      - {id: x, call: t.x, with: {n: "${.n}"}}
output: "${[.steps.each.result[].n]}"
""")
    journal, first = MemoryStore(), Upstream(hold=["t.x@3", "t.x@4"])
    run_id = await crash(Runner(first, journal), plan, {"ns": [0, 1, 2, 3, 4]}, journal, lambda: first.held == 2)
    assert sorted(args["n"] for args, _ in first.called("t.x")) == [0, 1, 2, 3, 4]

    second = Upstream()
    with anyio.fail_after(5):
        result = await Runner(second, journal).resume(plan, await journal.events(run_id), CALLER)
    assert not result.is_error, result.content
    assert sorted((args["n"], key) for args, key in second.called("t.x")) == [
        (3, f"{run_id}:each[3]/x"),
        (4, f"{run_id}:each[4]/x"),
    ]
    assert result.structured_content is None
    assert "[\n  0,\n  1,\n  2,\n  3,\n  4\n]" in result.content[0]["text"]


async def test_an_interrupted_compensation_goes_on_where_it_stopped() -> None:
    plan = plan_of("""
steps:
  - {id: a, call: t.a, compensate: {call: undo.a}}
  - {id: b, call: t.b, compensate: {call: undo.b}, after: [a]}
  - {id: c, call: t.c, after: [b]}
""")
    journal, first = MemoryStore(), Upstream(hold=["undo.a"])
    first.failures["t.c"] = 1
    run_id = await crash(Runner(first, journal), plan, {}, journal, lambda: first.held)
    assert [name for name, _, _ in first.calls] == ["t.a", "t.b", "t.c", "undo.b", "undo.a"]

    second = Upstream()
    with anyio.fail_after(5):
        result = await Runner(second, journal).resume(plan, await journal.events(run_id), CALLER)
    assert result.is_error
    assert "step 'c'" in result.content[0]["text"]
    assert second.calls == [("undo.a", {}, f"{run_id}:a#compensate")]  # undo.b is not undone twice
    assert first.called("undo.a")[0][1] == f"{run_id}:a#compensate"


async def test_a_pending_retry_fires_when_it_would_have_not_a_whole_backoff_after_the_restart() -> None:
    plan = plan_of("steps: [{id: a, call: t.a, retry: {attempts: 2, backoff: 60s, max_backoff: 60s, jitter: 0}}]")
    journal, first = MemoryStore(), Upstream()
    first.failures["t.a"] = 1
    run_id = await crash(Runner(first, journal), plan, {}, journal, lambda: len(first.calls) == 1)

    later = 100.0 + max(event.at for event in await journal.events(run_id))  # the restart came after the backoff
    second = Upstream()
    with anyio.fail_after(5):
        result = await Runner(second, journal, wall_clock=lambda: later).resume(
            plan, await journal.events(run_id), CALLER
        )
    assert not result.is_error
    assert second.called("t.a") == [({}, f"{run_id}:a")]


async def test_a_resumed_try_has_only_what_was_left_of_its_timeout() -> None:
    plan = plan_of("steps: [{id: a, call: t.a, timeout: 30s}]")
    journal, first = MemoryStore(), Upstream(hold=["t.a"])
    run_id = await crash(Runner(first, journal), plan, {}, journal, lambda: first.held)

    later = 31.0 + max(event.at for event in await journal.events(run_id))
    second = Upstream(hold=["t.a"])  # would never answer
    with anyio.fail_after(5):
        result = await Runner(second, journal, wall_clock=lambda: later).resume(
            plan, await journal.events(run_id), CALLER
        )
    assert result.is_error
    assert "timeout" in result.content[0]["text"]


async def test_a_run_whose_workflow_changed_is_not_resumed_and_says_why() -> None:
    plan = plan_of(CHAIN)
    journal, first = MemoryStore(), Upstream(hold=["t.b"])
    run_id = await crash(Runner(first, journal), plan, {}, journal, lambda: first.held)
    changed = plan_of(CHAIN.replace("n: 1", "n: 2"))
    with pytest.raises(ValueError, match="another version"):
        await Runner(Upstream(), journal).resume(changed, await journal.events(run_id), CALLER)


class Orphaned(MemoryStore):
    """A memory store whose ``running`` runs read as interrupted (as a dead gateway's do in a database)."""

    async def run(self, run_id: str) -> Any:
        record = await super().run(run_id)
        if record is not None and record.status == "running" and record.owner == "dead":
            from dataclasses import replace

            return replace(record, status="interrupted")
        return record

    async def runs(self, query: RunQuery | None = None) -> Sequence[RunRecord]:
        records = [await self.run(record.run_id) for record in await super().runs()]
        wanted = query.status if query is not None else None
        return [r for r in records if r is not None and (wanted is None or r.status == wanted)]

    async def claim(self, run_id: str) -> bool:
        record = self._records.get(run_id)
        if record is None or record.owner != "dead":
            return False
        from dataclasses import replace

        self._records[run_id] = replace(record, owner=self.instance)
        return True


async def orphan(store: Orphaned, events: Sequence[JournalEvent]) -> None:
    """Put a dead gateway's run into ``store``."""
    first, *rest = events
    store.record(JournalEvent(first.run_id, 0, first.at, "run_started", data={**first.data, "owner": "dead"}))
    for event in rest:
        store.record(event)


async def test_runs_resume_takes_up_an_interrupted_run_once_and_refuses_a_changed_workflow() -> None:
    plan = plan_of(CHAIN)
    journal, first = MemoryStore(), Upstream(hold=["t.b"])
    run_id = await crash(Runner(first, journal), plan, {}, journal, lambda: first.held)
    store, second = Orphaned(), Upstream()
    await orphan(store, await journal.events(run_id))

    changed = Runs(Runner(second, store), store, {"w": plan_of(CHAIN.replace("n: 1", "n: 2"))})
    async with anyio.create_task_group() as tg:
        await tg.start(changed.run)
        with pytest.raises(RunNotResumable, match="changed since the run started"):
            await changed.resume(run_id)
        tg.cancel_scope.cancel()
    record = await store.run(run_id)
    assert record is not None
    assert record.note is not None
    assert "changed" in record.note
    assert second.calls == []

    await store.mark(run_id, None)
    runs = Runs(Runner(second, store), store, {"w": plan})
    async with anyio.create_task_group() as tg:
        await tg.start(runs.run)
        with anyio.fail_after(5):
            result = await runs.resume(run_id)
        with pytest.raises(RunNotResumable, match="has finished: succeeded"):
            await runs.resume(run_id)
        tg.cancel_scope.cancel()
    assert not result.is_error
    assert [name for name, _, _ in second.calls] == ["t.b", "t.c"]


def keyed(key: str, who: str = "tester") -> CallContext:
    return CallContext(principal=Principal(who), meta={IDEMPOTENCY_META_KEY: key})


async def test_a_call_reissued_with_its_idempotency_key_gets_the_same_run_during_and_after_it() -> None:
    plan = plan_of(CHAIN)
    store, upstream = MemoryStore(), Upstream(hold=["t.b"])
    runs = Runs(Runner(upstream, store), store, {"w": plan})
    results: list[ToolResult] = []

    async def call(context: CallContext) -> None:
        results.append(await runs.call(plan, {}, context))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(runs.run)
            async with anyio.create_task_group() as callers:
                callers.start_soon(call, keyed("k1"))
                await upstream.holding.wait()
                callers.start_soon(call, keyed("k1"))  # a duplicate while the first runs: it waits for it
                await anyio.sleep(0.05)
                upstream.release.set()
            again = await runs.call(plan, {}, keyed("k1"))  # after it finished: its recorded result
            other = await runs.call(plan, {}, keyed("k1", who="someone-else"))  # keys are per caller
            tg.cancel_scope.cancel()
    assert len(results) == 2
    assert results[0] == results[1] == again
    assert [name for name, _, _ in upstream.calls] == ["t.a", "t.b", "t.c"] * 2  # the first run, then other's
    assert other.meta != results[0].meta
    records = await store.runs()
    assert [r.idempotency_key for r in records] == ["k1", "k1"]


async def test_a_keyed_run_goes_on_when_its_caller_goes_away_and_the_reissue_gets_its_result() -> None:
    plan = plan_of(CHAIN)
    store, upstream = MemoryStore(), Upstream(hold=["t.b"])
    runs = Runs(Runner(upstream, store), store, {"w": plan})
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(runs.run)
            async with anyio.create_task_group() as caller:  # the client's stream breaks mid-run
                caller.start_soon(runs.call, plan, {}, keyed("k2"))
                await upstream.holding.wait()
                caller.cancel_scope.cancel()
            upstream.release.set()
            result = await runs.call(plan, {}, keyed("k2"))
            tg.cancel_scope.cancel()
    assert not result.is_error
    assert [name for name, _, _ in upstream.calls] == ["t.a", "t.b", "t.c"]  # one run, not compensated


class Asker:
    """A client that answers elicitation with ``answer``, or never (None)."""

    capabilities: JSONObject = {"elicitation": {}}
    protocol_version = "2025-11-25"

    def __init__(self, answer: JSONObject | None = None) -> None:
        self.answer = answer
        self.asked: list[str] = []

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        self.asked.append(str(params.get("message")))
        if self.answer is None:
            await anyio.sleep_forever()
        assert self.answer is not None
        return self.answer

    async def log(self, params: JSONObject) -> None:
        return None


async def test_a_resumed_run_waiting_on_its_user_asks_again_whoever_reissues_the_call() -> None:
    plan = plan_of("""
steps:
  - {id: ok, ask_user: {message: "Go ahead?"}}
  - {id: a, call: t.a, with: {ok: "${.steps.ok.result.ok}"}, after: [ok]}
output: "${.steps.a.result}"
""")
    journal, first = MemoryStore(), Upstream()
    runs = Runs(Runner(first, journal), journal, {"w": plan})
    asker = Asker()
    async with anyio.create_task_group() as tg:
        await tg.start(runs.run)
        tg.start_soon(runs.call, plan, {}, replace(keyed("k9"), client=asker))
        with anyio.fail_after(5):
            while not asker.asked:  # noqa: ASYNC110 - the fake client's record, polled
                await anyio.sleep(0.001)
        await runs.close()  # the gateway goes down while the user is being asked
        tg.cancel_scope.cancel()
    [record] = await journal.runs()
    assert record.status == "running"

    store, second = Orphaned(), Upstream()
    await orphan(store, await journal.events(record.run_id))
    assert await store.idempotency_claim("client:tester", "k9", "w", 60) is None
    await store.idempotency_bind("client:tester", "k9", record.run_id)
    resumed = Runs(Runner(second, store), store, {"w": plan})
    answering = Asker({"action": "accept", "content": {"ok": True}})
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(partial(resumed.run, resume=True))
            result = await resumed.call(plan, {}, replace(keyed("k9"), client=answering))
            tg.cancel_scope.cancel()
    assert answering.asked == ["Go ahead?"]
    assert result.structured_content == {"tool": "t.a", "ok": True}
    assert [name for name, _, _ in second.calls] == ["t.a"]


async def test_interrupted_and_resumed_runs_are_counted() -> None:
    plan = plan_of(CHAIN)
    journal, first = MemoryStore(), Upstream(hold=["t.b"])
    stopped = Metrics(known_tools=lambda name: True)
    runs = Runs(Runner(first, journal, metrics=stopped), journal, {"w": plan}, metrics=stopped)
    async with anyio.create_task_group() as tg:
        await tg.start(runs.run)
        tg.start_soon(runs.call, plan, {}, keyed("k10"))
        await first.holding.wait()
        await runs.close()
        tg.cancel_scope.cancel()
    [record] = await journal.runs()
    store, resumed_metrics = Orphaned(), Metrics(known_tools=lambda name: True)
    await orphan(store, await journal.events(record.run_id))
    resumed = Runs(Runner(Upstream(), store, metrics=resumed_metrics), store, {"w": plan}, metrics=resumed_metrics)
    async with anyio.create_task_group() as tg:
        await tg.start(resumed.run)
        with anyio.fail_after(5):
            await resumed.resume(record.run_id)
        tg.cancel_scope.cancel()

    def count(metrics: Metrics, name: str, **labels: str) -> float:
        families = text_string_to_metric_families(metrics.render()[0].decode())
        found = [s.value for f in families for s in f.samples if s.name == name and s.labels == labels]
        return found[0] if found else 0.0

    runs_total = "patchbay_workflow_runs_total"
    assert count(stopped, runs_total, workflow="w", outcome="interrupted") == 1
    assert count(stopped, "patchbay_workflow_runs_in_flight", workflow="w") == 0
    assert count(resumed_metrics, runs_total, workflow="w", outcome="resumed") == 1
    assert count(resumed_metrics, runs_total, workflow="w", outcome="succeeded") == 1
    assert count(resumed_metrics, "patchbay_workflow_runs_in_flight", workflow="w") == 0


async def test_cancelling_an_interrupted_run_runs_its_compensations_and_nothing_else() -> None:
    plan = plan_of("""
steps:
  - {id: a, call: t.a, compensate: {call: undo.a}}
  - {id: b, call: t.b, after: [a]}
""")
    journal, first = MemoryStore(), Upstream(hold=["t.b"])
    run_id = await crash(Runner(first, journal), plan, {}, journal, lambda: first.held)
    store, second = Orphaned(), Upstream()
    await orphan(store, await journal.events(run_id))
    runs = Runs(Runner(second, store), store, {"w": plan})
    async with anyio.create_task_group() as tg:
        await tg.start(runs.run)
        with anyio.fail_after(5):
            record = await runs.cancel(run_id, CALLER.principal)
        tg.cancel_scope.cancel()
    assert record is not None
    assert record.status == "cancelled"
    assert second.calls == [("undo.a", {}, f"{run_id}:a#compensate")]  # t.b is not called again


async def test_a_task_reissued_with_its_idempotency_key_is_the_same_task() -> None:
    plan = plan_of(CHAIN)
    store, upstream = MemoryStore(), Upstream(hold=["t.b"])
    runs = Runs(Runner(upstream, store), store, {"w": plan})
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(runs.run)
            first = await runs.start_task(plan, {}, keyed("k11"), {"ttl": 60000})
            again = await runs.start_task(plan, {}, keyed("k11"), {"ttl": 60000})
            other = await runs.start_task(plan, {}, keyed("k12"), {"ttl": 60000})
            upstream.release.set()
            finished = await runs.wait(first.run_id, Principal("tester"))
            tg.cancel_scope.cancel()
    assert again.run_id == first.run_id
    assert other.run_id != first.run_id
    assert finished is not None
    assert finished.status == "succeeded"
    assert [name for name, _, _ in upstream.calls].count("t.a") == 2  # two runs, not three


async def test_a_task_cancelled_through_another_gateway_on_the_same_store_is_cancelled_where_it_runs(
    durable_url: str,
) -> None:
    # Replicas behind one address: tasks/cancel may reach one that does not run the task.
    plan = plan_of("""
steps:
  - {id: a, call: t.a, compensate: {call: undo.a}}
  - {id: b, call: t.b, after: [a]}
""")
    upstream = Upstream(hold=["t.b"])
    async with open_store(durable_url) as home_store, open_store(durable_url) as other_store:
        home = Runs(Runner(upstream, home_store), home_store, {"w": plan})
        other = Runs(Runner(upstream, other_store), other_store, {"w": plan})
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(home.run)
                await tg.start(other.run)
                task = await home.start_task(plan, {}, CALLER, {"ttl": 60000})
                await upstream.holding.wait()
                record = await other.cancel(task.run_id, CALLER.principal)
                tg.cancel_scope.cancel()
    assert record is not None
    assert (record.status, record.owner) == ("cancelled", home_store.instance)
    assert [name for name, _, _ in upstream.calls] == ["t.a", "t.b", "undo.a"]


async def test_a_pending_wait_fires_at_its_original_time_after_a_restart_not_a_whole_wait_later() -> None:
    plan = plan_of("steps: [{id: pause, wait: 1h}, {id: b, call: t.b, after: [pause]}]")
    journal, first, started = MemoryStore(), Upstream(), 1_000_000.0
    run_id = await crash(Runner(first, journal, wall_clock=lambda: started), plan, {}, journal, lambda: journal._count)
    assert first.calls == []

    second = Upstream()
    almost = started + 3600 - 0.05  # from scratch it would be another hour: fail_after would catch that
    with anyio.fail_after(5):
        result = await Runner(second, journal, wall_clock=lambda: almost).resume(
            plan, await journal.events(run_id), CALLER
        )
    assert result.structured_content == {"pause": {"waited": 3600.0}, "b": {"tool": "t.b"}}
    assert [name for name, _, _ in second.calls] == ["t.b"]


async def test_a_wait_until_a_time_keeps_that_time_across_a_restart_and_one_past_fires_at_once() -> None:
    plan = plan_of("steps: [{id: pause, wait: {until: '${.input.at}'}}, {id: b, call: t.b, after: [pause]}]")
    arguments = {"at": "2030-01-01T00:00:00Z"}
    journal, first = MemoryStore(), Upstream()
    run_id = await crash(Runner(first, journal), plan, arguments, journal, lambda: journal._count)

    later = 1893456000.0 - 0.2  # 0.2 s before 2030-01-01T00:00:00Z, whenever the run started
    with anyio.fail_after(5):
        began = anyio.current_time()
        result = await Runner(Upstream(), journal, wall_clock=lambda: later).resume(
            plan, await journal.events(run_id), CALLER
        )
        assert anyio.current_time() - began >= 0.2  # what was left of it, and a timer never fires early
        past = await Runner(Upstream(), MemoryStore()).run(plan, {"at": "2001-02-03T04:05:06+01:00"}, CALLER)
    assert result.structured_content == {"pause": {"waited_until": "2030-01-01T00:00:00Z"}, "b": {"tool": "t.b"}}
    assert past.structured_content == {"pause": {"waited_until": "2001-02-03T03:05:06Z"}, "b": {"tool": "t.b"}}


async def test_a_cancelled_run_stops_waiting_at_once() -> None:
    plan = plan_of("steps: [{id: pause, wait: 1h}, {id: b, call: t.b, after: [pause]}]")
    journal, upstream = MemoryStore(), Upstream()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(Runner(upstream, journal).run, plan, {}, CALLER)
            while not journal._count:  # noqa: ASYNC110 - the run has started its timer
                await anyio.sleep(0.001)
            tg.cancel_scope.cancel()
    [record] = await journal.runs()
    assert record.status == "cancelled"
    assert upstream.calls == []


async def test_a_loops_pending_delay_fires_when_it_was_due_after_a_restart() -> None:
    plan = plan_of("""
steps:
  - id: poll
    loop:
      steps: [{id: s, call: t.s, with: {n: "${.iteration}", done: "${.iteration == 2}"}}]
      until: .steps.s.result.done
      max_iterations: 3
      delay: 1h
""")
    journal, first, started = MemoryStore(), Upstream(), 1_000_000.0

    def first_iteration_settled() -> bool:
        return any(e.kind == "step_settled" and e.key == "poll[1]/s" for run in journal._events.values() for e in run)

    runner = Runner(first, journal, wall_clock=lambda: started)
    run_id = await crash(runner, plan, {}, journal, first_iteration_settled)
    assert [args for args, _ in first.called("t.s")] == [{"n": 1, "done": False}]

    second = Upstream()
    almost = started + 3600 - 0.05  # from scratch it would be another hour: fail_after would catch that
    with anyio.fail_after(5):
        result = await Runner(second, journal, wall_clock=lambda: almost).resume(
            plan, await journal.events(run_id), CALLER
        )
    assert result.structured_content == {"poll": {"tool": "t.s", "n": 2, "done": True}}
    assert [args for args, _ in second.called("t.s")] == [{"n": 2, "done": True}]
