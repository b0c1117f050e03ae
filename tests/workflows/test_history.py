"""Run history: timelines built from the journals of real runs (the in-process runner, a memory store)."""

import json
from dataclasses import replace
from datetime import datetime
from typing import Any

import anyio
import pytest
import yaml

from gateway.dispatch import Invocation
from gateway.store import RunRecord
from gateway.store.memory import MemoryStore
from gateway.types import CallContext, JSONObject, Principal, ToolResult
from gateway.workflows.history import duration_text, render_rows, render_timeline, summary_rows, timeline
from gateway.workflows.model import Workflow
from gateway.workflows.plan import Plan, compile_workflow
from gateway.workflows.runner import RUN_META_KEY, Runner
from policies.redaction import REDACTED, Redactor

pytestmark = pytest.mark.anyio

CALLER = CallContext(principal=Principal("ada"))
REDACT = Redactor().redact
SECRET = "hunter2-very-secret"


def plan_of(text: str, name: str = "w") -> Plan:
    plan, problems = compile_workflow(name, Workflow.model_validate(yaml.safe_load(text)))
    assert problems == []
    return plan


class Tools:
    """Fake tools: ``flaky`` is unavailable on its first two calls, ``boom`` fails, the rest echo."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, tool: str, arguments: JSONObject, context: CallContext) -> Invocation:
        self.calls.append(tool)
        if tool == "flaky" and self.calls.count("flaky") <= 2:
            return Invocation(ToolResult.text("not connected", is_error=True), "unavailable")
        if tool == "boom":
            return Invocation(ToolResult.text(f"it broke (password={SECRET})", is_error=True), "error")
        return Invocation(ToolResult((), structured_content={"tool": tool, **arguments}), "ok")


async def run(text: str, arguments: dict[str, Any] | None = None) -> tuple[MemoryStore, RunRecord, dict[str, Any]]:
    """Run the workflow ``text``; its store, its record and its timeline."""
    store = MemoryStore()
    with anyio.fail_after(5):
        result = await Runner(Tools(), store).run(plan_of(text), arguments or {}, CALLER)
    assert result.meta is not None
    record = await store.run(result.meta[RUN_META_KEY])
    assert record is not None
    return store, record, timeline(record, await store.events(record.run_id), REDACT)


async def test_a_retried_step_shows_each_attempt_with_its_outcome() -> None:
    _, record, view = await run("steps: [{id: fetch, call: flaky, with: {n: 1}, retry: {attempts: 3, backoff: 1ms}}]")

    assert (view["run"], view["workflow"], view["status"], view["caller"]) == (
        record.run_id,
        "w",
        "succeeded",
        "client:ada",
    )
    [step] = view["steps"]
    assert (step["key"], step["step"], step["tool"], step["status"]) == ("fetch", "fetch", "flaky", "succeeded")
    assert [a["attempt"] for a in step["attempts"]] == [1, 2, 3]
    assert [a["status"] for a in step["attempts"]] == ["failed", "failed", "succeeded"]
    assert [a["error"]["kind"] if a["error"] else None for a in step["attempts"]] == [
        "unavailable",
        "unavailable",
        None,
    ]
    assert step["attempts"][0]["error"]["message"] == "not connected"
    assert all(a["arguments"] == {"n": 1} for a in step["attempts"])
    assert step["attempts"][2]["result"] == step["result"] == {"tool": "flaky", "n": 1}
    for tried in step["attempts"]:
        assert datetime.fromisoformat(tried["started"]) <= datetime.fromisoformat(tried["finished"])
        assert tried["duration_ms"] >= 0
    assert step["started"] == step["attempts"][0]["started"]
    assert view["compensations"] == []
    assert view["failed_step"] is None
    assert view["error"] is None


async def test_a_failed_run_shows_the_failed_step_its_error_and_the_compensation_of_what_completed() -> None:
    _, record, view = await run(
        """
steps:
  - {id: reserve, call: stock, with: {sku: A1}, compensate: {call: release, with: {sku: A1}}}
  - {id: charge, call: boom, after: [reserve]}
"""
    )

    assert view["status"] == "failed"
    assert view["failed_step"] == record.failed_step == "charge"
    assert [(s["key"], s["status"]) for s in view["steps"]] == [("reserve", "succeeded"), ("charge", "failed")]
    charge = view["steps"][1]
    assert charge["error"]["kind"] == "error"
    assert [a["status"] for a in charge["attempts"]] == ["failed"]
    [undo] = view["compensations"]
    assert (undo["key"], undo["step"], undo["tool"], undo["status"]) == (
        "reserve#compensate",
        "reserve",
        "release",
        "succeeded",
    )
    assert undo["result"] == {"tool": "release", "sku": "A1"}
    assert undo["started"] is not None
    assert undo["finished"] is not None
    assert "step 'charge' failed" in view["error"]
    assert view["output"] is None


async def test_secrets_in_arguments_results_and_errors_are_redacted() -> None:
    _, _, view = await run(
        """
input: {type: object, properties: {password: {type: string}}}
steps:
  - {id: login, call: auth, with: {user: ada, password: "${.input.password}"}}
  - {id: fail, call: boom, after: [login]}
""",
        {"password": SECRET},
    )

    assert SECRET not in json.dumps(view)
    assert view["arguments"] == {"password": REDACTED}
    login = view["steps"][0]
    assert login["attempts"][0]["arguments"] == {"user": "ada", "password": REDACTED}
    assert login["result"] == {"tool": "auth", "user": "ada", "password": REDACTED}
    assert REDACTED in view["steps"][1]["error"]["message"]
    assert SECRET not in render_timeline(view)


async def test_an_interrupted_run_shows_the_try_that_was_in_flight() -> None:
    store, record, _ = await run("steps: [{id: a, call: t}, {id: b, call: t, after: [a]}]")
    events = await store.events(record.run_id)
    # The journal as a crash would leave it: b started, nothing after.
    cut = next(i for i, e in enumerate(events) if e.kind == "step_started" and e.key == "b") + 1
    interrupted = replace(record, status="interrupted", finished_at=None, duration_ms=None, result=None)

    view = timeline(interrupted, events[:cut], REDACT)

    assert [(s["key"], s["status"]) for s in view["steps"]] == [("a", "succeeded"), ("b", "interrupted")]
    assert view["steps"][1]["attempts"][0]["status"] == "interrupted"
    assert view["steps"][1]["attempts"][0]["finished"] is None
    assert (view["output"], view["error"], view["finished"]) == (None, None, None)


async def test_a_resumed_run_shows_the_interrupted_try_and_the_one_made_again() -> None:
    text = "steps: [{id: a, call: t}, {id: b, call: t, with: {n: 2}, after: [a]}]"
    store, record, _ = await run(text)
    events = await store.events(record.run_id)
    cut = next(i for i, e in enumerate(events) if e.kind == "step_started" and e.key == "b") + 1
    after_crash = MemoryStore()
    for event in events[:cut]:
        after_crash.record(event)

    with anyio.fail_after(5):
        await Runner(Tools(), after_crash).resume(plan_of(text), events[:cut], CALLER)
    resumed = await after_crash.run(record.run_id)
    assert resumed is not None
    view = timeline(resumed, await after_crash.events(record.run_id), REDACT)

    assert view["status"] == "succeeded"
    assert len(view["resumed"]) == 1
    b = view["steps"][1]
    assert [(a["attempt"], a["status"]) for a in b["attempts"]] == [(1, "interrupted"), (1, "succeeded")]
    assert b["attempts"][1]["result"] == {"tool": "t", "n": 2}
    assert view["steps"][0]["attempts"][0]["status"] == "succeeded"  # done before the crash, not again
    assert "resumed " in render_timeline(view)


async def test_the_output_is_the_recorded_results_structured_content_else_its_text() -> None:
    _, record, view = await run("steps: [{id: a, call: t, with: {token: x}}]", {})
    assert view["output"] == {"a": {"tool": "t", "token": REDACTED}}
    structured = replace(record, result={"content": [], "structuredContent": {"token": SECRET, "n": 1}})
    text = replace(record, result={"content": [{"type": "text", "text": '{"n": 2}'}]})

    assert timeline(structured, [], REDACT)["output"] == {"token": REDACTED, "n": 1}
    assert timeline(text, [], REDACT)["output"] == {"n": 2}


async def test_the_list_has_a_row_per_run_and_aligned_columns() -> None:
    store = MemoryStore()
    runner = Runner(Tools(), store)
    await runner.run(plan_of("steps: [{id: a, call: t}]", "quick"), {}, CALLER)
    await runner.run(plan_of("steps: [{id: x, call: boom}]", "broken"), {}, CALLER)

    rows = summary_rows(await store.runs())

    assert [(r["workflow"], r["status"], r["failed_step"], r["caller"]) for r in rows] == [
        ("broken", "failed", "x", "client:ada"),
        ("quick", "succeeded", None, "client:ada"),
    ]
    assert all(isinstance(r["duration_ms"], float) for r in rows)
    lines = render_rows(rows).splitlines()
    assert lines[0].split()[:3] == ["RUN", "WORKFLOW", "STATUS"]
    assert lines[1].index("broken") == lines[2].index("quick") == lines[0].index("WORKFLOW")
    assert lines[1].index("failed") == lines[2].index("succeeded") == lines[0].index("STATUS")
    assert lines[1].split()[:3] == [rows[0]["run"], "broken", "failed"]
    assert lines[1].rstrip().endswith("x")
    assert render_rows([]) == "no runs\n"


async def test_the_text_timeline_lists_steps_attempts_compensations_and_the_error() -> None:
    _, _, view = await run(
        """
steps:
  - {id: reserve, call: flaky, retry: {attempts: 3, backoff: 1ms}, compensate: {call: release}}
  - {id: charge, call: boom, after: [reserve]}
"""
    )

    text = render_timeline(view)

    assert "failed step: charge" in text
    assert "3 attempts" in text
    assert "attempt 1" in text
    assert "unavailable: not connected" in text
    assert "compensations:" in text
    assert "reserve#compensate" in text
    assert text.rstrip().splitlines()[-1].startswith("error: workflow 'w' failed")


def test_durations_read_as_people_write_them() -> None:
    assert [duration_text(ms) for ms in (None, 4.24, 340.4, 1234, 59_900, 125_000, 3_720_000)] == [
        "-",
        "4.2 ms",
        "340 ms",
        "1.2 s",
        "59.9 s",
        "2 min 5 s",
        "1 h 2 min",
    ]


async def test_a_container_comes_before_the_steps_it_holds_and_started_with_the_first() -> None:
    _, _, view = await run(
        """
steps:
  - {id: each, for_each: "${[1, 2]}", steps: [{id: up, call: t, with: {n: "${.item}"}}]}
  - {id: after, call: t, after: [each]}
"""
    )

    assert [s["key"] for s in view["steps"]] == ["each", "each[0]/up", "each[1]/up", "after"]
    assert view["steps"][0]["started"] == min(s["started"] for s in view["steps"][1:3])
    assert view["steps"][0]["result"] == [{"tool": "t", "n": 1}, {"tool": "t", "n": 2}]


async def test_a_loop_comes_before_its_iterations_steps_each_under_its_own_key() -> None:
    _, _, view = await run(
        """
steps:
  - id: poll
    loop:
      steps: [{id: check, call: t, with: {n: "${.iteration}"}}]
      until: .steps.check.result.n == 3
      max_iterations: 5
      delay: 1ms
  - {id: after, call: t, after: [poll]}
"""
    )

    assert [s["key"] for s in view["steps"]] == ["poll", "poll[1]/check", "poll[2]/check", "poll[3]/check", "after"]
    assert [s["attempts"][0]["arguments"] for s in view["steps"][1:4]] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert (view["steps"][0]["status"], view["steps"][0]["result"]) == ("succeeded", {"tool": "t", "n": 3})
    assert view["steps"][0]["started"] == view["steps"][1]["started"]
    text = render_timeline(view)
    assert text.index("poll[1]/check") < text.index("poll[2]/check") < text.index("poll[3]/check")


async def test_a_degraded_step_shows_its_default_its_failure_and_the_mark_in_journal_timeline_and_progress() -> None:
    messages: list[str | None] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        messages.append(message)

    store = MemoryStore()
    plan = plan_of("""
steps:
  - {id: fetch, call: boom, retry: {attempts: 2, backoff: 1ms}, on_error: {default: {cached: "${.input.n}"}},
     compensate: {call: undo}}
  - {id: use, call: echo, with: {got: "${.steps.fetch.result.cached}"}}
""")
    with anyio.fail_after(5):
        result = await Runner(Tools(), store).run(plan, {"n": 7}, replace(CALLER, progress=progress))
    assert result.structured_content == {"fetch": {"cached": 7}, "use": {"tool": "echo", "got": 7}}
    assert result.meta is not None
    record = await store.run(result.meta[RUN_META_KEY])
    assert record is not None
    events = await store.events(record.run_id)
    [settled] = [e for e in events if e.kind == "step_settled" and e.key == "fetch"]
    assert settled.data["degraded"] is True
    assert settled.data["error"]["kind"] == "error"

    view = timeline(record, events, REDACT)
    fetch = view["steps"][0]
    assert (fetch["key"], fetch["status"], fetch["degraded"], fetch["result"]) == (
        "fetch",
        "succeeded",
        True,
        {"cached": 7},
    )
    assert fetch["error"]["kind"] == "error"
    assert [a["status"] for a in fetch["attempts"]] == ["failed", "failed"]
    assert "degraded" not in view["steps"][1]
    assert view["compensations"] == []
    text = render_timeline(view)
    assert "succeeded (degraded)" in text
    assert "error: error: it broke" in text
    assert 'result: {"cached": 7}' in text
    assert messages[0] is not None
    assert messages[0].startswith("fetch: succeeded (degraded) in ")
    assert "(error: it broke" in messages[0]


class _Model:
    """A client whose model calls ``kb__find`` once, then answers."""

    capabilities: JSONObject = {"sampling": {"tools": {}}}
    protocol_version = "2025-11-25"

    def __init__(self) -> None:
        self.turns = 0

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        self.turns += 1
        if self.turns == 1:
            use = {"type": "tool_use", "id": "1", "name": "kb__find", "input": {"q": "late"}}
            return {"role": "assistant", "content": [use], "model": "m", "stopReason": "toolUse"}
        return {"role": "assistant", "content": {"type": "text", "text": "a storm"}, "model": "m"}

    async def log(self, params: JSONObject) -> None:
        return None


async def test_an_agents_turns_and_calls_show_as_its_parts_after_it() -> None:
    store = MemoryStore()
    plan = plan_of("""
steps:
  - {id: research, agent: {goal: why, tools: ["kb__*"], max_steps: 3}}
  - {id: after, set: {answer: "${.steps.research.result.answer}"}}
""")
    context = CallContext(principal=Principal("ada"), client=_Model())
    with anyio.fail_after(5):
        result = await Runner(Tools(), store).run(plan, {}, context)
    assert result.structured_content == {
        "research": {
            "answer": "a storm",
            "steps": [{"tool": "kb__find", "arguments": {"q": "late"}, "result": {"tool": "kb__find", "q": "late"}}],
        },
        "after": {"answer": "a storm"},
    }
    assert result.meta is not None
    record = await store.run(result.meta[RUN_META_KEY])
    assert record is not None
    assert record.steps == 2  # the parts are not steps of the run
    view = timeline(record, await store.events(record.run_id), REDACT)
    keys = [(step["key"], step.get("tool") or step.get("kind"), step["status"]) for step in view["steps"]]
    assert keys == [
        ("research", None, "succeeded"),
        ("research#turn1", "agent", "succeeded"),
        ("research#call1", "kb__find", "succeeded"),
        ("research#turn2", "agent", "succeeded"),
        ("after", None, "succeeded"),
    ]
    assert view["steps"][2]["attempts"][0]["arguments"] == {"q": "late"}
    assert "research#call1  kb__find  succeeded" in render_timeline(view)
