"""Long runs on Temporal continue as new before Temporal's history limits, against a real dev server: the
run ends as it would have (the same output, each step's call made once), a timer pending at the
continue fires when it was due, a run cancelled after continuing is compensated, a for_each with
concurrency continues too, and every execution of the chain replays deterministically."""

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, timedelta
from typing import Any

import anyio
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHistory
from temporalio.worker import Replayer

from gateway.workflows.commands import StepError
from gateway.workflows.plan import Plan
from gateway.workflows.temporal import PatchbayRun
from gateway.workflows.temporal_records import TemporalRecords
from tests import temporal_server as dev_server
from tests.test_temporal_engine import CALLER_JSON, SAME_ON_BOTH, Call, Tools, canonical, run_locally, serving
from tests.workflows.test_runner import plan_of

pytestmark = pytest.mark.anyio

temporal_server = dev_server.temporal_server  # the fixtures: pytest finds them here
temporal_client = dev_server.temporal_client

LOW_LIMIT = 20
"""Events: a history this long continues as new, every few steps."""
CONTINUED = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW


def chain(length: int) -> str:
    """A workflow of ``length`` calls in a row, each reading the one before (a jq program: an evaluation)."""
    lines = ["steps:", '  - {id: s1, call: t__step, with: {n: "${.input.n + 1}"}}']
    lines.extend(
        f'  - {{id: s{n}, call: t__step, with: {{n: "${{.steps.s{n - 1}.result.n + 1}}"}}}}'
        for n in range(2, length + 1)
    )
    return "\n".join([*lines, f'output: {{n: "${{.steps.s{length}.result.n}}"}}'])


async def executions(client: Client, run_id: str, first: str) -> list[WorkflowHistory]:
    """The histories of run ``run_id``'s executions, from ``first`` on, following each continue-as-new."""
    histories: list[WorkflowHistory] = []
    execution: str | None = first
    while execution is not None:
        history = await client.get_workflow_handle(run_id, run_id=execution).fetch_history()
        histories.append(history)
        last = history.events[-1]
        execution = (
            last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
            if last.event_type == CONTINUED
            else None
        )
    return histories


async def run_on_temporal(
    client: Client, plan: Plan, arguments: Mapping[str, Any], run_id: str, tools: Tools, **options: Any
) -> tuple[dict[str, Any], list[WorkflowHistory]]:
    """A run on a fresh engine: its result, and its executions' histories (replayed, each, while the plan is held)."""
    async with serving(client, [plan], tools, **options) as engine:
        handle = await engine.start(plan.name, arguments, CALLER_JSON, run_id)
        assert handle.result_run_id is not None
        result = await engine.result(run_id)
        histories = await executions(client, run_id, handle.result_run_id)
        replayer = Replayer(workflows=[PatchbayRun])
        for history in histories:
            replayed = await replayer.replay_workflow(history, raise_on_replay_failure=False)
            assert replayed.replay_failure is None
    return result, histories


def same(calls: list[Call], run_id: str) -> list[str]:
    """The calls, in a canonical order, their idempotency keys' run id left out (for runs of different ids)."""
    return sorted(canonical((tool, arguments, (key or "").removeprefix(run_id))) for tool, arguments, key in calls)


async def test_a_long_run_continues_as_new_and_ends_with_the_same_output_and_calls(temporal_client: Client) -> None:
    plan, run_id, plain_id = plan_of(chain(12)), uuid.uuid4().hex, uuid.uuid4().hex
    expected, expected_calls = await run_locally(plan, {"n": 0}, run_id)
    continued, plain = Tools(), Tools()
    with anyio.fail_after(30):
        result, histories = await run_on_temporal(
            temporal_client, plan, {"n": 0}, run_id, continued, history_limit=LOW_LIMIT
        )
        unlimited, one = await run_on_temporal(temporal_client, plan, {"n": 0}, plain_id, plain)
    assert len(histories) >= 3  # it continued at least twice
    assert all(len(history.events) < 2 * LOW_LIMIT for history in histories)
    assert len(one) == 1
    assert result == expected
    assert result["output"] == {"n": 12}
    assert unlimited == {**expected, "run_id": plain_id}
    assert continued.calls == expected_calls  # each step's call once, in the same order
    assert same(continued.calls, run_id) == same(plain.calls, plain_id)
    assert len({key for _, _, key in continued.calls}) == 12


async def test_the_replayer_replays_each_execution_of_a_continued_run(temporal_client: Client) -> None:
    plan, run_id, tools = plan_of(chain(6)), uuid.uuid4().hex, Tools()
    with anyio.fail_after(30):
        result, histories = await run_on_temporal(temporal_client, plan, {"n": 0}, run_id, tools, history_limit=15)
    assert result["status"] == "succeeded"
    assert [h.events[-1].event_type for h in histories[:-1]] == [CONTINUED] * (len(histories) - 1)
    assert len(histories) >= 2
    # The check can fail: the last execution without what it was carried starts the run over, which is
    # not what its history recorded.
    payload = histories[-1].events[0].workflow_execution_started_event_attributes.input.payloads[0]
    payload.data = json.dumps({**json.loads(payload.data), "carried": None}).encode()
    async with serving(temporal_client, [plan], tools):
        replayed = await Replayer(workflows=[PatchbayRun]).replay_workflow(histories[-1], raise_on_replay_failure=False)
    assert replayed.replay_failure is not None


class Pausing(Tools):
    """The tools, and ``pause``, which answers after 1 s."""

    async def answer(self, tool: str, arguments: Mapping[str, Any], key: str | None) -> tuple[Any, StepError | None]:
        if tool == "pause":
            await anyio.sleep(1.0)
        return await super().answer(tool, arguments, key)


def timer_events(history: WorkflowHistory, kind: EventType.ValueType) -> list[Any]:
    return [event for event in history.events if event.event_type == kind]


async def test_a_timer_pending_at_the_continue_fires_when_it_was_due(temporal_client: Client) -> None:
    plan = plan_of("""
steps:
  - {id: late, call: flaky, retry: {attempts: 2, backoff: 2s, jitter: 0}}
  - {id: p, call: pause}
  - {id: c1, call: t__c, with: {n: 1}, after: [p]}
  - {id: c2, call: t__c, with: {n: 2}, after: [c1]}
  - {id: c3, call: t__c, with: {n: 3}, after: [c2]}
""")
    tools, run_id = Pausing(), uuid.uuid4().hex
    with anyio.fail_after(30):
        result, histories = await run_on_temporal(temporal_client, plan, {}, run_id, tools, history_limit=LOW_LIMIT)
    assert result["status"] == "succeeded"
    assert [tool for tool, _, _ in tools.calls].count("flaky") == 2
    first, *later = histories
    [started] = timer_events(first, EventType.EVENT_TYPE_TIMER_STARTED)  # the retry's wait: 2 s
    assert timer_events(first, EventType.EVENT_TYPE_TIMER_FIRED) == []  # pending when the run continued
    [fired] = [e for h in later for e in timer_events(h, EventType.EVENT_TYPE_TIMER_FIRED)]
    [again] = [e for h in later for e in timer_events(h, EventType.EVENT_TYPE_TIMER_STARTED)]
    assert started.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta() == timedelta(seconds=2)
    # Started again for what remained (the pause took some of it), and fired 2 s after it first started.
    remaining = again.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
    elapsed = again.event_time.ToDatetime() - started.event_time.ToDatetime()
    assert remaining < timedelta(seconds=1.8)
    assert abs(elapsed + remaining - timedelta(seconds=2)) < timedelta(seconds=0.3)
    waited = fired.event_time.ToDatetime() - started.event_time.ToDatetime()
    # The server's event times may put the firing a hair before the 2 s (1.9995 s seen): not from scratch.
    assert timedelta(seconds=1.95) <= waited < timedelta(seconds=2.5)


async def test_a_run_cancelled_after_it_continued_compensates_the_steps_of_earlier_executions(
    temporal_client: Client,
) -> None:
    undo = 'compensate: {call: undo__a, with: {n: "${.steps.a%d.result.n}"}}'
    steps = "\n".join(
        f"  - {{id: a{n}, call: t__a, with: {{n: {n}}}, after: [a{n - 1}], {undo % n}}}" for n in range(2, 7)
    )
    plan = plan_of(f"""
steps:
  - {{id: a1, call: t__a, with: {{n: 1}}, {undo % 1}}}
{steps}
  - {{id: b, call: slow, after: [a6]}}
""")
    tools, run_id = Tools(), uuid.uuid4().hex
    with anyio.fail_after(30):
        async with serving(temporal_client, [plan], tools, history_limit=15) as engine:
            handle = await engine.start(plan.name, {}, CALLER_JSON, run_id)
            await tools.started.wait()
            current = await temporal_client.get_workflow_handle(run_id).describe()
            await engine.cancel(run_id)
            result = await engine.result(run_id)
            await tools.stopped.wait()
        described = await temporal_client.get_workflow_handle(run_id).describe()
    assert current.run_id != handle.result_run_id  # the call in flight is an execution's after the first
    assert result["status"] == "cancelled"
    assert described.status == WorkflowExecutionStatus.CANCELED
    assert tools.cancelled == ["slow"]
    undone = [(tool, arguments, key) for tool, arguments, key in tools.calls if tool == "undo__a"]
    assert undone == [("undo__a", {"n": n}, f"{run_id}:a{n}#compensate") for n in range(6, 0, -1)]
    assert [tool for tool, _, _ in tools.calls].count("t__a") == 6


async def test_a_for_each_with_concurrency_continues_as_new_too(temporal_client: Client) -> None:
    plan = plan_of("""
steps:
  - id: lines
    for_each: "${.input.items}"
    as: item
    concurrency: 3
    steps: [{id: stock, call: t__stock, with: {sku: "${.item.sku | ascii_upcase}", at: "${.index}"}}]
output: {skus: "${[.steps.lines.result[].sku]}"}
""")
    items = [{"sku": f"s{n}"} for n in range(12)]
    tools, run_id = Tools(), uuid.uuid4().hex
    expected, expected_calls = await run_locally(plan, {"items": items}, run_id)
    with anyio.fail_after(30):
        result, histories = await run_on_temporal(
            temporal_client, plan, {"items": items}, run_id, tools, history_limit=LOW_LIMIT
        )
    assert len(histories) >= 3
    assert result == expected
    assert result["output"] == {"skus": [f"S{n}" for n in range(12)]}
    assert sorted(tools.calls, key=canonical) == sorted(expected_calls, key=canonical)
    assert len(tools.calls) == 12


ONE_INPUT = {"a step past its timeout", "a question answered by its default and a fail step"}
"""Cases whose engine takes one event after it starts, and ends on it: no run of theirs has room to continue."""


@pytest.mark.parametrize("case", [case for case in SAME_ON_BOTH if case not in ONE_INPUT])
async def test_a_workflow_continued_after_nearly_every_event_gives_the_same_result_and_calls(
    temporal_client: Client, case: str
) -> None:
    text, arguments = SAME_ON_BOTH[case]
    plan, tools, run_id = plan_of(text), Tools(), uuid.uuid4().hex
    expected, expected_calls = await run_locally(plan, arguments, run_id)
    with anyio.fail_after(30):
        result, histories = await run_on_temporal(temporal_client, plan, arguments, run_id, tools, history_limit=4)
    assert len(histories) >= 2
    assert result == expected
    assert sorted(tools.calls, key=canonical) == sorted(expected_calls, key=canonical)
    assert [c for c in tools.calls if c[0].startswith("undo")] == [c for c in expected_calls if c[0].startswith("undo")]


async def test_a_continued_run_reads_back_as_one_run_its_steps_and_progress_from_every_execution(
    temporal_client: Client,
) -> None:
    plan, run_id, tools = plan_of(chain(8)), uuid.uuid4().hex, Tools()
    with anyio.fail_after(30):
        async with serving(temporal_client, [plan], tools, history_limit=LOW_LIMIT) as engine:
            handle = await engine.start(plan.name, {"n": 0}, CALLER_JSON, run_id)
            assert handle.result_run_id is not None
            await engine.result(run_id)
            histories = await executions(temporal_client, run_id, handle.result_run_id)
            notes = await engine.progress(run_id, 0)  # the last execution's, counting on from the ones before
        records = TemporalRecords(temporal_client, engine.task_queue)
        events = await records.events(run_id)
        record = await records.record(run_id)
    assert len(histories) >= 2
    assert [event.kind for event in events].count("run_started") == 1
    started = [event.key for event in events if event.kind == "step_started"]
    assert sorted(started) == sorted(f"s{n}" for n in range(1, 9))  # each step once, from every execution
    assert sorted(e.key for e in events if e.kind == "step_settled") == sorted(started)
    assert [note.settled for note in notes][-1] == 8
    assert notes[-1].total == 8
    assert notes[0].settled > 1  # the first execution's notes are not in the last one's: the count went on
    assert record is not None
    assert record.status == "succeeded"
    first = histories[0].events[0].event_time.ToDatetime(tzinfo=UTC).timestamp()
    assert first - 1 <= record.started_at <= first  # when the run began (its memo), not its last execution
