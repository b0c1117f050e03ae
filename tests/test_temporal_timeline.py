"""A run on Temporal reads back step by step as the same run on the local runner, against a real dev server:
each step with its status (``set``, ``wait``, ``switch``, ``for_each``, ``loop``, skipped and degraded steps
included), from the engine's own notes, recovered by replaying the history (``gateway.workflows._temporal_notes``);
across a continue-as-new too, and while the run runs. Without the plan the steps' ends are read from their calls,
and the timeline says so. (``tests/test_temporal_engine.py`` compares the timelines of its cases on both engines
as well.)"""

import uuid
from collections.abc import Mapping
from typing import Any

import anyio
import pytest
from temporalio.client import Client

from gateway.store.memory import MemoryStore
from gateway.workflows.history import timeline
from gateway.workflows.plan import Plan
from gateway.workflows.temporal_records import TemporalRecords
from tests import temporal_server as dev_server
from tests.test_temporal_continue import LOW_LIMIT, executions
from tests.test_temporal_engine import CALLER_JSON, Tools, run_locally, serving
from tests.workflows.test_runner import plan_of

pytestmark = pytest.mark.anyio

temporal_server = dev_server.temporal_server  # the fixtures: pytest finds them here
temporal_client = dev_server.temporal_client

MIXED = plan_of("""
steps:
  - {id: a, set: {x: 1}}
  - {id: pause, wait: 50ms, after: [a]}
  - {id: b, call: boom, after: [pause], on_error: {default: {fine: true}}}
  - id: pick
    after: [b]
    switch:
      - when: .steps.a.result.x == 2
        steps: [{id: never, call: t__never}]
    default: [{id: other, call: t__other, with: {fine: "${.steps.b.result.fine}"}}]
  - id: each
    after: [pick]
    for_each: "${[1, 2]}"
    as: item
    steps: [{id: up, call: t__up, with: {n: "${.item}"}}]
  - id: poll
    after: [each]
    loop:
      steps: [{id: tick, call: t__tick, with: {n: "${.iteration}"}}]
      until: .iteration == 2
      max_iterations: 3
      delay: 10ms
output: {b: "${.steps.b.result}", each: "${.steps.each.result | length}", polls: "${.steps.poll.result.n}"}
""")
SHOWN = [
    ("a", "succeeded", False),
    ("pause", "succeeded", False),
    ("b", "succeeded", True),
    ("never", "skipped", False),
    ("other", "succeeded", False),
    ("pick", "succeeded", False),
    ("each", "succeeded", False),
    ("each[0]/up", "succeeded", False),
    ("each[1]/up", "succeeded", False),
    ("poll", "succeeded", False),
    ("poll[1]/tick", "succeeded", False),
    ("poll[2]/tick", "succeeded", False),
]
"""The local runner's timeline of MIXED: each step, its status, whether it is degraded."""


def same(redacted: Any) -> Any:
    return redacted


def shown(view: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    return [(step["key"], step["status"], step.get("degraded", False)) for step in view["steps"]]


async def local_view(plan: Plan, arguments: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The timeline of the run on the local runner."""
    journal = MemoryStore()
    await run_locally(plan, arguments, run_id, journal)
    record = await journal.run(run_id)
    assert record is not None
    return timeline(record, await journal.events(run_id), same)


async def temporal_view(client: Client, queue: str, plans: list[Plan], run_id: str) -> dict[str, Any]:
    """The timeline of the run as ``patchbay runs RUN_ID`` reads it from Temporal, with ``plans`` held."""
    records = TemporalRecords(client, queue, {plan.name: plan for plan in plans})
    record = await records.record(run_id)
    assert record is not None
    return timeline(record, await records.events(run_id), same)


async def test_a_run_on_temporal_shows_each_step_as_the_local_runner_does(temporal_client: Client) -> None:
    run_id = uuid.uuid4().hex
    local = await local_view(MIXED, {}, run_id)
    with anyio.fail_after(15):
        async with serving(temporal_client, [MIXED], Tools()) as engine:
            result = await engine.run(MIXED.name, {}, CALLER_JSON, run_id)
            view = await temporal_view(temporal_client, engine.task_queue, [MIXED], run_id)
    assert result["output"] == {"b": {"fine": True}, "each": 2, "polls": 2}
    assert shown(view) == shown(local) == SHOWN
    degraded = next(step for step in view["steps"] if step["key"] == "b")
    assert degraded["result"] == {"fine": True}
    assert degraded["error"] == {"kind": "error", "message": "it broke", "step": "b"}  # the failure it stands in for
    assert [attempt["status"] for attempt in degraded["attempts"]] == ["failed"]
    assert view["note"] is None


async def test_a_run_continued_as_new_shows_the_steps_of_every_execution(temporal_client: Client) -> None:
    run_id = uuid.uuid4().hex
    with anyio.fail_after(15):
        async with serving(temporal_client, [MIXED], Tools(), history_limit=LOW_LIMIT) as engine:
            handle = await engine.start(MIXED.name, {}, CALLER_JSON, run_id)
            assert handle.result_run_id is not None
            result = await engine.result(run_id)
            chain = await executions(temporal_client, run_id, handle.result_run_id)
            view = await temporal_view(temporal_client, engine.task_queue, [MIXED], run_id)
    assert result["status"] == "succeeded"
    assert len(chain) >= 2
    assert sorted(shown(view)) == sorted(SHOWN)


async def test_a_running_run_shows_the_steps_settled_so_far(temporal_client: Client) -> None:
    plan = plan_of("""
steps:
  - {id: a, set: {x: 1}}
  - {id: skip, switch: [{when: .steps.a.result.x == 2, steps: [{id: never, call: t__never}]}], after: [a]}
  - {id: hold, call: slow, after: [skip]}
""")
    tools, run_id = Tools(), uuid.uuid4().hex
    with anyio.fail_after(15):
        async with serving(temporal_client, [plan], tools) as engine:
            await engine.start(plan.name, {}, CALLER_JSON, run_id)
            await tools.started.wait()
            view = await temporal_view(temporal_client, engine.task_queue, [plan], run_id)
            await engine.cancel(run_id)
    assert view["status"] == "running"
    assert sorted(shown(view)) == [
        ("a", "succeeded", False),
        ("hold", "running", False),
        ("never", "skipped", False),
        ("skip", "succeeded", False),
    ]


async def test_without_the_plan_the_steps_ends_are_read_from_their_calls_and_the_timeline_says_so(
    temporal_client: Client,
) -> None:
    run_id = uuid.uuid4().hex
    changed = plan_of("steps: [{id: a, set: {x: 2}}]")  # the workflow of that name, changed since the run
    with anyio.fail_after(15):
        async with serving(temporal_client, [MIXED], Tools()) as engine:
            await engine.run(MIXED.name, {}, CALLER_JSON, run_id)
            view = await temporal_view(temporal_client, engine.task_queue, [changed], run_id)
            unheld = await temporal_view(temporal_client, engine.task_queue, [], run_id)
    assert view == unheld
    assert sorted(shown(view)) == [  # the calls only; b as its call ended
        ("b", "failed", False),
        ("each[0]/up", "succeeded", False),
        ("each[1]/up", "succeeded", False),
        ("other", "succeeded", False),
        ("poll[1]/tick", "succeeded", False),
        ("poll[2]/tick", "succeeded", False),
    ]
    assert view["note"] is not None
    assert "read from their calls" in view["note"]
    assert "does not hold workflow 'w'" in view["note"]
