"""Workflow runs on Temporal, against a real dev server: the same workflows give the same results and
the same calls as on the local runner; cancellation compensates; a run goes only to workers holding
its plan's digest; the workflow runs in Temporal's default sandbox and replays deterministically."""

import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

import anyio
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.worker import Replayer

from gateway.dispatch import Invocation
from gateway.store.memory import MemoryStore
from gateway.types import CallContext, JSONObject, Principal, ToolResult
from gateway.workflows.commands import AskModel, AskUser, CallTool, Command, Finished, StepError
from gateway.workflows.engine import Run
from gateway.workflows.history import timeline
from gateway.workflows.journal import JournalEvent
from gateway.workflows.plan import Plan
from gateway.workflows.runner import IDEMPOTENCY_META_KEY, Runner
from gateway.workflows.temporal import PatchbayRun
from gateway.workflows.temporal_engine import TemporalEngine, workflow_queue
from gateway.workflows.temporal_records import TemporalRecords
from gateway.workflows.temporal_types import RunInput
from tests import temporal_server as dev_server
from tests.workflows.test_runner import plan_of

pytestmark = pytest.mark.anyio

temporal_server = dev_server.temporal_server  # the fixtures: pytest finds them here
temporal_client = dev_server.temporal_client
second_temporal_client = dev_server.second_temporal_client

CALLER = CallContext(principal=Principal("tester"))
CALLER_JSON = {"kind": "client", "id": "tester"}
HEARTBEAT = 0.1
"""Seconds between a running step's heartbeats: how soon a cancellation reaches it."""
Call = tuple[str, dict[str, Any], str | None]
"""A call the fake tools saw: tool, arguments, idempotency key."""


class Tools:
    """Fake tools, the same behind both engines: ``slow`` waits until cancelled, ``stalls`` too but only
    its first call, ``boom`` fails, ``flaky`` fails its first call, ``huge`` answers 3 MiB; the others echo
    their arguments."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.runs: list[tuple[str, dict[str, str]]] = []
        self.cancelled: list[str] = []
        self.started = anyio.Event()
        self.stopped = anyio.Event()

    async def answer(self, tool: str, arguments: Mapping[str, Any], key: str | None) -> tuple[Any, StepError | None]:
        self.calls.append((tool, dict(arguments), key))
        if tool == "slow":
            self.started.set()
            try:
                await anyio.sleep_forever()
            finally:
                self.cancelled.append(tool)
                self.stopped.set()
        if tool == "stalls" and sum(called == "stalls" for called, _, _ in self.calls) == 1:
            self.started.set()
            await anyio.sleep_forever()
        if tool == "huge":
            return {"blob": "x" * 3 * 2**20}, None
        if tool == "boom" or (tool == "flaky" and sum(called == "flaky" for called, _, _ in self.calls) == 1):
            return None, StepError("error", "it broke")
        return {"tool": tool, **arguments}, None

    async def call(self, tool: str, arguments: JSONObject, context: CallContext) -> Invocation:
        """The local runner's call function."""
        result, error = await self.answer(tool, arguments, (context.meta or {}).get(IDEMPOTENCY_META_KEY))
        if error is not None:
            return Invocation(ToolResult.text(error.message, is_error=True), error.kind)
        return Invocation(ToolResult((), structured_content=result), "ok")

    async def execute(
        self, command: CallTool | AskUser | AskModel, run_id: str, caller: dict[str, str]
    ) -> tuple[Any, StepError | None]:
        """The Temporal engine's: what a gateway without a client behind the run answers (as the runner does)."""
        self.runs.append((run_id, caller))
        if isinstance(command, CallTool):
            return await self.answer(command.tool, command.arguments, command.idempotency_key)
        if command.default is not None:
            return command.default, None
        return None, StepError("unavailable", "no client to ask")


@asynccontextmanager
async def serving(client: Client, plans: Sequence[Plan], tools: Tools, **options: Any) -> AsyncIterator[TemporalEngine]:
    """An engine of ``plans`` on a task queue of the test's own, its workers running (``options``: the engine's)."""
    queue, by_name = f"test-{uuid.uuid4().hex[:12]}", {plan.name: plan for plan in plans}
    engine = TemporalEngine(client, queue, by_name, tools.execute, heartbeat=HEARTBEAT, **options)
    async with engine.serve():
        yield engine


async def run_locally(
    plan: Plan, arguments: dict[str, Any], run_id: str, journal: MemoryStore | None = None
) -> tuple[dict[str, Any], list[Call]]:
    """The local runner's run (journaled in ``journal``, if given): its ``Finished`` note (read back from its
    journal) as a result, and the calls."""
    tools, journal = Tools(), journal if journal is not None else MemoryStore()
    await Runner(tools.call, journal).run(plan, arguments, CALLER, run_id=run_id)
    finished: list[Finished] = []

    def observe(event: JournalEvent, commands: list[Command]) -> None:
        finished.extend(command for command in commands if isinstance(command, Finished))

    Run.restore(plan, await journal.events(run_id), observe)
    [end] = finished
    result = {
        "run_id": run_id,
        "status": end.status,
        "output": end.output,
        "error": asdict(end.error) if end.error is not None else None,
        "compensation_errors": [asdict(e) for e in end.compensation_errors],
    }
    return result, tools.calls


TEMPORAL_STATUS = {"succeeded": WorkflowExecutionStatus.COMPLETED, "failed": WorkflowExecutionStatus.FAILED}


def _same(value: Any) -> Any:
    return value


def _steps(view: Mapping[str, Any]) -> list[tuple[str, str, bool, list[str]]]:
    """A timeline's steps and compensations: key, status, degraded, each try's status (as on both engines)."""
    shown = [
        (step["key"], step["status"], bool(step.get("degraded")), [a["status"] for a in step["attempts"]])
        for step in view["steps"]
    ]
    undone = [(step["key"], step["status"], False, []) for step in view["compensations"]]
    return sorted(shown) + undone


def canonical(call: Call) -> str:
    return json.dumps(call, sort_keys=True)


SAME_ON_BOTH = {
    "a chain whose arguments and output are jq": (
        """
steps:
  - {id: a, call: t__echo, with: {name: "${.input.name | ascii_upcase}", n: "${.input.n + 1}"}}
  - {id: b, call: t__echo, with: {greeting: "hello ${.steps.a.result.name}", twice: "${.steps.a.result.n * 2}"}}
output: {greeting: "${.steps.b.result.greeting}", n: "${.steps.b.result.twice}", run: "${.run.id | length}"}
""",
        {"name": "ada", "n": 2},
    ),
    "a failed try retried after a timer": (
        "steps: [{id: a, call: flaky, with: {x: 1}, retry: {attempts: 3, backoff: 10ms}}]",
        {},
    ),
    "a for_each with concurrency": (
        """
steps:
  - id: lines
    for_each: "${.input.items}"
    as: item
    concurrency: 2
    steps:
      - {id: stock, call: t__stock, with: {sku: "${.item.sku}", at: "${.index}"}}
      - {id: label, set: {text: "${.item.sku}: ${.steps.stock.result.at}"}}
""",
        {"items": [{"sku": "a"}, {"sku": "b"}, {"sku": "c"}]},
    ),
    "a switch": (
        """
steps:
  - {id: a, call: t__n, with: {n: "${.input.n}"}}
  - id: route
    switch:
      - {when: '.steps.a.result.n > 10', steps: [{id: big, call: t__big}]}
      - {when: '.steps.a.result.n * 2 > 3', steps: [{id: mid, call: t__mid, with: {n: "${.steps.a.result.n}"}}]}
    default: [{id: small, call: t__small}]
""",
        {"n": 3},
    ),
    "a failed run compensating in reverse order": (
        """
steps:
  - {id: a, call: t__a, compensate: {call: undo__a, with: {of: "${.steps.a.result.tool}"}}}
  - {id: b, call: t__b, after: [a], compensate: {call: undo__b, with: {of: "${.steps.b.result.tool | ascii_upcase}"}}}
  - {id: c, call: boom, after: [b]}
""",
        {},
    ),
    "a fallback in place of a failed step": ("steps: [{id: a, call: boom, on_error: [{id: alt, call: t__alt}]}]", {}),
    "a degraded step succeeding with its on_error default": (
        """
steps:
  - {id: a, call: boom, retry: {attempts: 2, backoff: 10ms}, on_error: {default: {n: "${.input.n + 1}"}},
     compensate: {call: undo__a}}
  - {id: b, call: t__b, with: {got: "${.steps.a.result.n}", why: "${.steps.a.error.kind}"}}
  - {id: c, call: boom, after: [b]}
""",
        {"n": 1},
    ),
    "a short wait, then a wait until a time past": (
        """
steps:
  - {id: pause, wait: 50ms}
  - {id: then, wait: {until: "${.input.at}"}, after: [pause]}
  - {id: b, call: t__b, with: {waited: "${.steps.pause.result.waited}", until: "${.steps.then.result.waited_until}"}}
output: {b: "${.steps.b.result}"}
""",
        {"at": "2001-02-03T04:05:06+01:00"},
    ),
    "a loop polling with a growing delay until its condition holds": (
        """
steps:
  - id: poll
    loop:
      steps: [{id: s, call: t__status, with: {n: "${.iteration}", last: "${.last.n}"}}]
      until: .steps.s.result.n == 3
      max_iterations: 4
      delay: 20ms
      backoff: 2
      output: {n: "${.steps.s.result.n}", at: "${.iteration}"}
  - id: never
    loop: {steps: [{id: t, call: t__again}], until: 'false', max_iterations: 2}
    on_error: {default: gave up}
output: {poll: "${.steps.poll.result}", never: "${.steps.never.result}"}
""",
        {},
    ),
    "a success condition that does not hold": (
        "steps: [{id: a, call: t__n, with: {n: 1}, success: '.result.n > 3'}]",
        {},
    ),
    "a step past its timeout": ("steps: [{id: a, call: slow, timeout: 200ms}]", {}),
    "a question answered by its default and a fail step": (
        """
steps:
  - {id: ok, ask_user: {message: "Go ${.input.name}?", default: {ok: true}}}
  - {id: stop, fail: "stopped after ${.steps.ok.result.ok}"}
""",
        {"name": "ada"},
    ),
}


@pytest.mark.parametrize("case", SAME_ON_BOTH)
async def test_a_workflow_gives_the_same_result_and_calls_on_temporal_as_on_the_local_runner(
    temporal_client: Client, case: str
) -> None:
    text, arguments = SAME_ON_BOTH[case]
    plan, tools, run_id, journal = plan_of(text), Tools(), uuid.uuid4().hex, MemoryStore()
    expected, expected_calls = await run_locally(plan, arguments, run_id, journal)
    with anyio.fail_after(10):
        async with serving(temporal_client, [plan], tools) as engine:
            result = await engine.run(plan.name, arguments, CALLER_JSON, run_id)
        described = await temporal_client.get_workflow_handle(run_id).describe()
        records = TemporalRecords(temporal_client, engine.task_queue, {plan.name: plan})
        record, local = await records.record(run_id), await journal.run(run_id)
        assert record is not None
        assert local is not None
        view = timeline(record, await records.events(run_id), _same)
        expected_view = timeline(local, await journal.events(run_id), _same)
    assert result == expected
    # `patchbay runs RUN_ID` shows the same steps (their statuses, their tries), the same compensations.
    assert _steps(view) == _steps(expected_view)
    assert described.status == TEMPORAL_STATUS[result["status"]]  # what Temporal's UI and CLI show
    # Concurrent steps may start in another order; the compensations run one at a time, in order.
    assert sorted(tools.calls, key=canonical) == sorted(expected_calls, key=canonical)
    assert [c for c in tools.calls if c[0].startswith("undo")] == [c for c in expected_calls if c[0].startswith("undo")]


async def test_the_idempotency_key_run_id_and_caller_reach_the_executor(temporal_client: Client) -> None:
    plan = plan_of("steps: [{id: a, call: t__a}, {id: b, call: flaky, after: [a], retry: {backoff: 10ms}}]")
    tools, run_id = Tools(), "r-1"
    with anyio.fail_after(10):
        async with serving(temporal_client, [plan], tools) as engine:
            result = await engine.run(plan.name, {}, CALLER_JSON, run_id)
    assert result["status"] == "succeeded"
    assert [(tool, key) for tool, _, key in tools.calls] == [("t__a", "r-1:a"), ("flaky", "r-1:b"), ("flaky", "r-1:b")]
    assert tools.runs == [("r-1", CALLER_JSON)] * 3


async def test_cancelling_a_run_cancels_its_steps_in_flight_and_runs_the_compensations(temporal_client: Client) -> None:
    plan, tools, run_id = (
        plan_of("""
steps:
  - {id: a, call: t__a, compensate: {call: undo__a, with: {of: "${.steps.a.result.tool}"}}}
  - {id: b, call: slow, after: [a]}
"""),
        Tools(),
        uuid.uuid4().hex,
    )
    with anyio.fail_after(10):
        async with serving(temporal_client, [plan], tools) as engine:
            await engine.start(plan.name, {}, CALLER_JSON, run_id)
            await tools.started.wait()
            await engine.cancel(run_id)
            result = await engine.result(run_id)
            await tools.stopped.wait()  # the cancellation reaches the call with a heartbeat's answer
        described = await temporal_client.get_workflow_handle(run_id).describe()
    assert result["status"] == "cancelled"
    assert described.status == WorkflowExecutionStatus.CANCELED
    assert tools.cancelled == ["slow"]
    assert tools.calls[-1] == ("undo__a", {"of": "t__a"}, f"{run_id}:a#compensate")


async def history_kinds(client: Client, run_id: str) -> list[EventType.ValueType]:
    return [event.event_type for event in (await client.get_workflow_handle(run_id).fetch_history()).events]


async def test_a_worker_holding_another_digest_of_the_workflow_never_takes_its_run(
    temporal_client: Client, second_temporal_client: Client
) -> None:
    old, new = plan_of("steps: [{id: a, call: t__old}]"), plan_of("steps: [{id: a, call: t__new}]")
    assert old.name == new.name
    assert old.digest != new.digest
    tools, run_id = Tools(), uuid.uuid4().hex
    with anyio.fail_after(10):
        async with serving(temporal_client, [old], tools) as replica:
            # Another replica: a client of its own (one process may not run two workers of one queue per client).
            newer = TemporalEngine(
                second_temporal_client, replica.task_queue, {new.name: new}, tools.execute, heartbeat=HEARTBEAT
            )
            await newer.start(new.name, {}, CALLER_JSON, run_id)
            await anyio.sleep(0.5)  # what must not happen has time to happen: the old replica polls meanwhile
            assert EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED not in await history_kinds(temporal_client, run_id)
            async with newer.serve():  # a replica holding the new digest takes it
                result = await newer.result(run_id)
    assert result["status"] == "succeeded"
    assert tools.calls == [("t__new", {}, f"{run_id}:a")]


async def test_a_run_that_reaches_a_worker_without_its_plan_is_refused_and_not_failed(temporal_client: Client) -> None:
    plan, tools, run_id = plan_of("steps: [{id: a, call: t__a}]"), Tools(), uuid.uuid4().hex
    with anyio.fail_after(10):
        async with serving(temporal_client, [plan], tools) as engine:
            stranger = RunInput(plan.name, "0" * 64, {}, CALLER_JSON, run_id, engine.task_queue)
            handle = await temporal_client.start_workflow(
                PatchbayRun.run, stranger, id=run_id, task_queue=workflow_queue(engine.task_queue, plan)
            )
            while EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED not in await history_kinds(temporal_client, run_id):  # noqa: ASYNC110
                await anyio.sleep(0.02)  # polling is how a client learns what a worker did
            assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
            await handle.terminate("test over")
    assert tools.calls == []


async def test_starting_a_run_id_again_gives_the_first_run(temporal_client: Client) -> None:
    plan, tools, run_id = plan_of("steps: [{id: a, call: t__a, with: {n: '${.input.n}'}}]"), Tools(), uuid.uuid4().hex
    with anyio.fail_after(10):
        async with serving(temporal_client, [plan], tools) as engine:
            first = await engine.run(plan.name, {"n": 1}, CALLER_JSON, run_id)
            again = await engine.run(plan.name, {"n": 2}, CALLER_JSON, run_id)
    assert first == again
    assert first["output"] == {"a": {"tool": "t__a", "n": 1}}
    assert len(tools.calls) == 1


async def test_a_runs_history_holds_its_timers_and_jq_outcomes_and_replays_in_the_sandbox(
    temporal_client: Client,
) -> None:
    plan = plan_of("""
steps:
  - id: lines
    for_each: "${.input.items}"
    as: item
    concurrency: 2
    steps: [{id: stock, call: flaky, with: {sku: "${.item.sku}"}, retry: {attempts: 2, backoff: 10ms}}]
  - id: route
    switch: [{when: '(.steps.lines.result | length) > 2', steps: [{id: many, call: t__many}]}]
output: {n: "${.steps.lines.result | length}"}
""")
    tools, run_id = Tools(), uuid.uuid4().hex
    with anyio.fail_after(10):
        async with serving(temporal_client, [plan], tools) as engine:
            result = await engine.run(
                plan.name, {"items": [{"sku": "a"}, {"sku": "b"}, {"sku": "c"}]}, CALLER_JSON, run_id
            )
            history = await temporal_client.get_workflow_handle(run_id).fetch_history()
            replayed = await Replayer(workflows=[PatchbayRun]).replay_workflow(history, raise_on_replay_failure=False)
    assert result["output"] == {"n": 3}
    assert [tool for tool, _, _ in tools.calls].count("flaky") == 4  # one failed try, retried after a timer
    kinds = [event.event_type for event in history.events]
    assert EventType.EVENT_TYPE_TIMER_FIRED in kinds
    assert EventType.EVENT_TYPE_MARKER_RECORDED in kinds  # a local activity's outcome: jq ran outside the workflow
    assert replayed.replay_failure is None


async def test_a_call_whose_replica_stops_is_made_again_by_another_under_the_same_key(
    temporal_client: Client, second_temporal_client: Client
) -> None:
    plan, tools, run_id, queue = (
        plan_of("steps: [{id: a, call: stalls}]"),
        Tools(),
        uuid.uuid4().hex,
        f"test-{uuid.uuid4().hex}",
    )
    other = second_temporal_client
    with anyio.fail_after(20):
        # The first replica takes the run and makes the call; it stops while the call stalls.
        first = TemporalEngine(temporal_client, queue, {plan.name: plan}, tools.execute, silence=2.0)
        async with first.serve():
            await first.start(plan.name, {}, CALLER_JSON, run_id)
            await tools.started.wait()
        # Another replica holding the plan takes the run over (after the first's sticky queue times out).
        second = TemporalEngine(other, queue, {plan.name: plan}, tools.execute, silence=2.0)
        async with second.serve():
            result = await second.result(run_id)
        records = TemporalRecords(other, queue, {plan.name: plan})
        record = await records.record(run_id)
        assert record is not None
        view = timeline(record, await records.events(run_id), _same)
    assert result["status"] == "succeeded"
    assert tools.calls == [("stalls", {}, f"{run_id}:a"), ("stalls", {}, f"{run_id}:a")]
    # `patchbay runs RUN_ID` shows the first try as the run saw it (its replica stopped), not the activity's error.
    [step] = view["steps"]
    assert [(a["status"], (a["error"] or {}).get("kind")) for a in step["attempts"]] == [
        ("failed", "unavailable"),
        ("succeeded", None),
    ]
    assert step["status"] == "succeeded"


async def test_a_result_over_temporals_payload_limit_fails_its_step(temporal_client: Client) -> None:
    plan, tools, run_id = plan_of("steps: [{id: a, call: huge}]"), Tools(), uuid.uuid4().hex
    with anyio.fail_after(10):
        async with serving(temporal_client, [plan], tools) as engine:
            result = await engine.run(plan.name, {}, CALLER_JSON, run_id)
    assert result["status"] == "failed"
    assert (result["error"]["kind"], result["error"]["step"]) == ("error", "a")
    assert result["error"]["message"].startswith("the result is larger than Temporal keeps in a run's history")


async def test_a_loop_on_temporal_reports_each_iteration_as_progress(temporal_client: Client) -> None:
    plan, tools, run_id = (
        plan_of("""
steps:
  - id: poll
    loop: {steps: [{id: s, call: t__s, with: {n: "${.iteration}"}}], until: .steps.s.result.n == 2, max_iterations: 3,
           delay: 50ms}
"""),
        Tools(),
        uuid.uuid4().hex,
    )
    with anyio.fail_after(10):
        async with serving(temporal_client, [plan], tools) as engine:
            result = await engine.run(plan.name, {}, CALLER_JSON, run_id)
            notes = await engine.progress(run_id, 0)
    assert result["output"] == {"poll": {"tool": "t__s", "n": 2}}
    assert [note.message.split(" in ")[0] for note in notes] == [
        "poll[1]/s: succeeded",
        "poll: iteration 1 of at most 3, the condition does not hold yet",
        "poll[2]/s: succeeded",
        "poll: iteration 2 of at most 3, the condition holds",
        "poll: succeeded",
    ]
    assert [note.settled for note in notes] == [1, 2, 3, 4, 5]
    assert {note.total for note in notes} == {None}
