"""Rebuilding a run from its journal: replaying the engine's recorded inputs gives the state the live run had."""

import itertools
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import jq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dispatch import Invocation
from gateway.store.memory import MemoryStore
from gateway.types import CallContext, JSONObject, Principal, ToolResult
from gateway.workflows import _jqsafe
from gateway.workflows.commands import (
    AskModel,
    AskUser,
    CallTool,
    Cancel,
    Command,
    Evaluate,
    StartTimer,
    StepError,
    retry_delay,
)
from gateway.workflows.engine import Run
from gateway.workflows.journal import INPUTS, JournalEvent
from gateway.workflows.model import Workflow
from gateway.workflows.plan import Plan, compile_workflow
from gateway.workflows.runner import RUN_META_KEY, Runner

_EMPTY = object()


def plan_of(raw: Any) -> Plan:
    plan, problems = compile_workflow(
        "w", Workflow.model_validate(yaml.safe_load(raw) if isinstance(raw, str) else raw)
    )
    assert problems == []
    return plan


class Recorded:
    """A live run whose inputs are journaled as the runner journals them; what it waits for, kept up to date."""

    def __init__(self, plan: Plan, arguments: dict[str, Any]) -> None:
        self.plan = plan
        self.run = Run(plan, arguments, "run-1")
        self.events: list[JournalEvent] = []
        self.snapshots: list[dict[str, Any]] = []
        self.calls: dict[str, CallTool | AskUser | AskModel] = {}
        self.evaluations: dict[str, Evaluate] = {}
        self.timers: dict[str, StartTimer] = {}
        self.cancelled: list[str] = []
        caller = {"kind": "client", "id": "tester"}
        data = {"workflow": plan.name, "arguments": arguments, "caller": caller, "plan": plan.digest}
        self._input("run_started", None, 0, data, self.run.start)

    def _input(self, kind: str, key: str | None, attempt: int, data: dict[str, Any], feed: Any) -> None:
        self.events.append(JournalEvent("run-1", len(self.events), 0.0, kind, key, attempt, data))  # type: ignore[arg-type]
        self._take(feed())
        self.snapshots.append(self.run.snapshot())
        # Nothing is left asked for that nothing waits for (its evaluations would be cancelled).
        stale = [key for key, (site, _, _) in self.run._sites.pending.items() if not self.run._valid(site)]
        assert stale == [], f"evaluations left outstanding after {kind}"

    def _take(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, CallTool | AskUser | AskModel):
                self.calls[command.key] = command
            elif isinstance(command, Evaluate):
                self.evaluations[command.key] = command
            elif isinstance(command, StartTimer):
                self.timers[command.key] = command
            elif isinstance(command, Cancel):
                self.calls.pop(command.key, None)
                self.evaluations.pop(command.key, None)
                self.cancelled.append(command.key)

    def done(
        self, key: str, attempt: int, result: Any = None, error: StepError | None = None, random: float = 0.5
    ) -> None:
        self.calls.pop(key, None)
        data = {"result": result, "error": asdict(error) if error else None, "random": random}
        self._input("step_done", key, attempt, data, lambda: self.run.done(key, attempt, result, error, random=random))

    def fire(self, key: str) -> None:
        self.timers.pop(key, None)
        self._input("timer_fired", key, 0, {}, lambda: self.run.fire(key))

    def evaluate(self, key: str, *, fail: bool = False) -> None:
        """Run the program as the runner would (here, synchronously), or fail it as a time limit would."""
        command = self.evaluations.pop(key, None)
        if command is None or fail:
            message = "jq evaluation exceeded 1 s"
            self._input("evaluated", key, 0, {"error": message}, lambda: self.run.evaluated(key, error=message))
            return
        try:  # in-process: these programs are known to be harmless, and the engine's own jq is switched off
            value = jq.compile(command.source).input_value(command.data).first()
        except StopIteration:
            value = _EMPTY
        except ValueError as exc:
            error = str(exc)
            self._input("evaluated", key, 0, {"error": error}, lambda: self.run.evaluated(key, error=error))
            return
        if value is _EMPTY:
            self._input("evaluated", key, 0, {"empty": True}, lambda: self.run.evaluated(key, empty=True))
        else:
            self._input("evaluated", key, 0, {"value": value}, lambda: self.run.evaluated(key, value))

    def cancel(self, message: str = "the caller cancelled the run") -> None:
        self._input("run_cancelled", None, 0, {"message": message}, lambda: self.run.cancel(message))


def assert_every_prefix_restores(recorded: Recorded) -> None:
    for length in range(1, len(recorded.events) + 1):
        restored, outstanding = Run.restore(recorded.plan, recorded.events[:length])
        assert restored.snapshot() == recorded.snapshots[length - 1], f"after {length} inputs"
        assert outstanding == restored.outstanding()


# --- Examples. ---

RETRYING = """
steps:
  - {id: order, call: crm__order, retry: {attempts: 3, backoff: 1s, jitter: 0.5, "on": [error]},
     compensate: {call: crm__cancel, with: {id: "${.steps.order.result.id | ascii_upcase}"}}}
  - {id: total, set: {sum: "${.steps.order.result.items | add}"}}
  - id: lines
    for_each: "${.steps.order.result.items}"
    steps: [{id: check, call: stock__check, with: {n: "${.item * 10}"}}]
  - {id: done, call: mail__send, after: [total, lines]}
"""


def test_restore_gives_the_state_the_run_had_and_what_it_was_waiting_for() -> None:
    recorded = Recorded(plan_of(RETRYING), {})
    recorded.done("order", 1, error=StepError("error", "flaky"), random=0.9)  # retried after a jittered delay
    [timer] = recorded.timers.values()
    recorded.fire(timer.key)
    recorded.done("order", 2, {"id": "a-1", "items": [1, 2]})
    while recorded.evaluations:
        recorded.evaluate(next(iter(recorded.evaluations)))
    assert set(recorded.calls) == {"lines[0]/check"}  # for_each concurrency 1

    restored, outstanding = Run.restore(recorded.plan, recorded.events)

    assert restored.snapshot() == recorded.run.snapshot()
    assert outstanding == [recorded.calls["lines[0]/check"]]
    assert restored.snapshot()["steps"]["order"] == {
        "status": "succeeded",
        "attempt": 2,
        "refusals": 0,
        "waited": 0.0,
        "result": {"id": "a-1", "items": [1, 2]},
        "error": None,
        "continued": False,
        "degraded": False,
        "branch": None,
        "items": None,
        "outputs": [],
        "next_item": 0,
        "iterations": [],
        "last": None,
    }
    assert_every_prefix_restores(recorded)


def test_restore_tells_which_evaluations_and_timers_were_outstanding() -> None:
    recorded = Recorded(plan_of(RETRYING), {})
    recorded.done("order", 1, error=StepError("error", "flaky"), random=0.1)
    [timer] = recorded.timers.values()
    _, outstanding = Run.restore(recorded.plan, recorded.events)
    assert outstanding == [timer]

    recorded.fire(timer.key)
    recorded.done("order", 2, {"id": "a-1", "items": [1]})
    _, outstanding = Run.restore(recorded.plan, recorded.events)
    assert [type(c) for c in outstanding] == [Evaluate, Evaluate]  # the set's, and the first iteration's call's
    assert sorted(c.source for c in outstanding if isinstance(c, Evaluate)) == [
        ".item * 10",
        ".steps.order.result.items | add",
    ]


def test_restore_of_a_run_with_a_degraded_step_gives_its_default_mark_and_error() -> None:
    recorded = Recorded(
        plan_of("""
steps:
  - {id: a, call: t, retry: {attempts: 2, backoff: 1s, jitter: 0}, on_error: {default: "${.input.n * 3}"}}
  - {id: b, call: t, with: {got: "${.steps.a.result}"}}
"""),
        {"n": 2},
    )
    recorded.done("a", 1, error=StepError("unavailable", "down"))
    recorded.fire("a#retry")
    recorded.done("a", 2, error=StepError("unavailable", "still down"))
    while recorded.evaluations:
        recorded.evaluate(next(iter(recorded.evaluations)))

    restored, outstanding = Run.restore(recorded.plan, recorded.events)

    assert restored.snapshot() == recorded.run.snapshot()
    step = restored.snapshot()["steps"]["a"]
    assert (step["status"], step["result"], step["degraded"]) == ("succeeded", 6, True)
    assert step["error"] == {"kind": "unavailable", "message": "still down", "step": "a"}
    assert [(c.key, c.arguments) for c in outstanding if isinstance(c, CallTool)] == [("b", {"got": 6})]
    assert_every_prefix_restores(recorded)


def test_restore_mid_loop_gives_the_live_state_and_its_pending_delay_and_compensates_each_iteration() -> None:
    recorded = Recorded(
        plan_of("""
steps:
  - id: poll
    loop:
      steps: [{id: s, call: t, with: {n: "${.iteration}"}, compensate: {call: undo, with: {n: "${.iteration}"}}}]
      until: .steps.s.result == "done"
      max_iterations: 5
      delay: 2s
      backoff: 2
"""),
        {},
    )
    for n in (1, 2):
        recorded.done(f"poll[{n}]/s", 1, "no")
        while recorded.evaluations:  # the condition (jq: not a plain path)
            recorded.evaluate(next(iter(recorded.evaluations)))
        if n == 1:
            recorded.fire("poll#delay")

    restored, outstanding = Run.restore(recorded.plan, recorded.events)

    assert restored.snapshot() == recorded.run.snapshot()
    assert outstanding == [StartTimer("poll#delay", 4.0)]  # 2 s · 2: the delay after the second iteration
    assert restored.snapshot()["steps"]["poll"]["last"] == "no"
    recorded.fire("poll#delay")
    recorded.cancel()
    assert [(c.key, c.arguments) for c in recorded.calls.values()] == [("poll[2]/s#compensate", {"n": 2})]
    recorded.done("poll[2]/s#compensate", 1)
    assert [(c.key, c.arguments) for c in recorded.calls.values()] == [("poll[1]/s#compensate", {"n": 1})]
    assert_every_prefix_restores(recorded)


def test_replay_skips_the_journals_outputs() -> None:
    recorded = Recorded(plan_of(RETRYING), {})
    recorded.done("order", 1, {"id": "x", "items": []})
    noisy = [recorded.events[0], JournalEvent("run-1", 1, 0.0, "step_started", "order", 1, {"step": "order"})]
    noisy += recorded.events[1:] + [JournalEvent("run-1", 9, 0.0, "step_settled", "order", 1, {"status": "failed"})]
    restored, _ = Run.restore(recorded.plan, noisy)
    assert restored.snapshot() == recorded.run.snapshot()


def test_restore_refuses_a_journal_of_another_version_of_the_workflow() -> None:
    recorded = Recorded(plan_of(RETRYING), {})
    changed = plan_of(RETRYING.replace("attempts: 3", "attempts: 4"))
    assert changed.digest != recorded.plan.digest
    with pytest.raises(ValueError, match="another version"):
        Run.restore(changed, recorded.events)
    with pytest.raises(ValueError, match="begins with run_started"):
        Run.restore(recorded.plan, recorded.events[1:] or [JournalEvent("r", 0, 0.0, "timer_fired", "x")])


class Flaky:
    """Fails each tool's first call, then answers with what it was called with."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def __call__(self, tool: str, arguments: JSONObject, context: CallContext) -> Invocation:
        if tool not in self.seen:
            self.seen.add(tool)
            return Invocation(ToolResult.text("try again", is_error=True), "unavailable")
        return Invocation(ToolResult((), structured_content={"tool": tool, **arguments}), "ok")


@pytest.mark.anyio
async def test_the_runners_journal_restores_the_finished_run() -> None:
    journal = MemoryStore()
    plan = plan_of("""
steps:
  - {id: a, call: t__a, with: {n: "${.input.n + 1}"}, retry: {attempts: 2, backoff: 1ms, jitter: 0}}
  - {id: b, set: {v: "${.steps.a.result.n * 2}"}}
output: {v: "${.steps.b.result.v}"}
""")
    result = await Runner(Flaky(), journal).run(plan, {"n": 1}, CallContext(principal=Principal("tester")))
    assert result.structured_content == {"v": 4}
    assert result.meta is not None
    events = await journal.events(result.meta[RUN_META_KEY])

    restored, outstanding = Run.restore(plan, events)

    assert [e.kind for e in events if e.kind in INPUTS] == [
        "run_started",
        "evaluated",  # a's arguments
        "step_done",  # failed: unavailable
        "timer_fired",
        "evaluated",  # a's arguments again, for its second try
        "step_done",
        "evaluated",  # b (the output is a plain path: resolved in the engine)
    ]
    assert restored.status == "succeeded"
    assert outstanding == []
    snapshot = restored.snapshot()
    assert snapshot["steps"]["a"]["attempt"] == 2
    assert snapshot["steps"]["b"]["result"] == {"v": 4}


# --- The property: any prefix of any run's inputs restores the state the live run had after it. ---


def _expression(draw: st.DrawFn, earlier: list[str], *, in_loop: bool) -> str:
    choices = ["${.input.n}", "${.input.n + 1}", "${.input.items | length}", "text ${.input.n * 2}", "plain"]
    if earlier:
        ref = draw(st.sampled_from(earlier))
        choices += [f"${{.steps.{ref}.result}}", f"${{.steps.{ref}.result | tostring}}"]
    if in_loop:
        choices += ["${.item}", "${.item + .index}"]
    return draw(st.sampled_from(choices))


def _step(
    draw: st.DrawFn, ids: Iterator[int], kind: str, earlier: list[str], depth: int, *, in_loop: bool
) -> dict[str, Any]:
    step = _kind(draw, ids, kind, earlier, depth, in_loop=in_loop)
    if draw(st.booleans()):
        step["retry"] = {"attempts": 2, "backoff": "1s", "jitter": 0.5, "on": ["error", "unavailable"]}
    if kind in ("set", "switch", "for_each", "wait", "loop") and draw(st.booleans()):
        step["timeout"] = "5s"
    on_error = draw(st.sampled_from([None, "continue", "fallback", "default"]))
    if on_error == "continue":
        step["on_error"] = "continue"
    elif on_error == "default":  # a literal, a plain path (resolved in the engine) or jq (asked for)
        step["on_error"] = {"default": draw(st.sampled_from([7, {"n": "${.input.n}"}, "${.input.n * 5}"]))}
    elif on_error == "fallback" and depth < 2:
        step["on_error"] = [{"id": f"s{next(ids)}", "set": {"v": "${.input.n - 1}"}}]
    return step


def _kind(
    draw: st.DrawFn, ids: Iterator[int], kind: str, earlier: list[str], depth: int, *, in_loop: bool
) -> dict[str, Any]:
    step: dict[str, Any] = {}
    if kind == "call":
        step |= {"call": "t", "with": {"v": _expression(draw, earlier, in_loop=in_loop)}}
        if draw(st.booleans()):
            step["success"] = draw(st.sampled_from([".result != false", ".result"]))
        if draw(st.booleans()):
            step["compensate"] = {"call": "undo", "with": {"v": _expression(draw, earlier, in_loop=in_loop)}}
    elif kind == "set":
        step["set"] = {"v": _expression(draw, earlier, in_loop=in_loop)}
    elif kind == "fail":
        step["fail"] = "stopped at ${.input.n}"
    elif kind == "wait":  # a duration, a time, or an expression that gives no time (the step fails, invalid)
        step["wait"] = draw(
            st.sampled_from(["2s", {"until": "2030-01-01T00:00:00Z"}, {"until": "${.input.n | tostring}"}])
        )
    elif kind == "loop":
        step["loop"] = _loop(draw, ids, depth, in_loop=in_loop)
    elif kind == "switch":
        when = draw(st.sampled_from([".input.flag", ".input.n > 2", ".input.n > 0 and .input.flag"]))
        step["switch"] = [{"when": when, "steps": _steps(draw, ids, depth + 1, in_loop=in_loop)}]
        if draw(st.booleans()):
            step["default"] = _steps(draw, ids, depth + 1, in_loop=in_loop)
    else:
        step["for_each"] = draw(st.sampled_from(["${.input.items}", "${.input.items | map(. + 1)}"]))
        step["concurrency"] = draw(st.integers(1, 2))
        step["steps"] = _steps(draw, ids, depth + 1, in_loop=True)
        if draw(st.booleans()):
            step["output"] = draw(st.sampled_from(["${.index}", "${.index * 2}"]))
    return step


def _loop(draw: st.DrawFn, ids: Iterator[int], depth: int, *, in_loop: bool) -> dict[str, Any]:
    """A loop whose condition reads its body's last step, the iteration or its output; with delays or not."""
    body = _steps(draw, ids, depth + 1, in_loop=in_loop)
    until = [".iteration >= 2", ".last == null", f'.steps.{body[-1]["id"]}.status == "succeeded"']
    loop = {"steps": body, "until": draw(st.sampled_from(until)), "max_iterations": draw(st.integers(1, 3))}
    if draw(st.booleans()):
        loop |= {"delay": "1s", "backoff": 2, "max_delay": "3s"}
    if draw(st.booleans()):
        loop["output"] = draw(st.sampled_from(["${.iteration}", "${.iteration * 2}"]))
    return loop


def _steps(draw: st.DrawFn, ids: Iterator[int], depth: int, *, in_loop: bool) -> list[dict[str, Any]]:
    """1–3 steps of any kind (containers two deep at most), each reading the steps before it or the input."""
    steps: list[dict[str, Any]] = []
    earlier: list[str] = []
    kinds = ["call", "call", "set", "fail", "wait"] + (["switch", "for_each", "loop"] if depth < 2 else [])
    for _ in range(draw(st.integers(1, 3 if depth == 0 else 2))):
        step_id = f"s{next(ids)}"
        kind = draw(st.sampled_from(kinds))
        steps.append({"id": step_id} | _step(draw, ids, kind, earlier, depth, in_loop=in_loop))
        earlier.append(step_id)
    return steps


@st.composite
def workflows(draw: st.DrawFn) -> dict[str, Any]:
    workflow: dict[str, Any] = {"steps": _steps(draw, itertools.count(), 0, in_loop=False)}
    workflow["max_concurrency"] = draw(st.integers(1, 3))
    if draw(st.booleans()):
        workflow["output"] = {"n": "${.input.n * 3}"}
    return workflow


RESULTS = st.sampled_from([None, True, False, 3, "text", {"k": 1}, [1, 2]])
KINDS = st.sampled_from(["error", "unavailable", "timeout", "denied"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workflow=workflows(),
    arguments=st.fixed_dictionaries(
        {"n": st.integers(-1, 4), "flag": st.booleans(), "items": st.lists(st.integers(0, 3), max_size=3)}
    ),
    data=st.data(),
)
def test_replaying_any_prefix_of_the_inputs_reproduces_the_live_state(
    workflow: dict[str, Any], arguments: dict[str, Any], data: st.DataObject
) -> None:
    with pytest.MonkeyPatch.context() as patch:  # and the engine never runs jq itself, wherever it needs a program
        patch.setattr(_jqsafe, "first", refuse)
        patch.setattr(_jqsafe.Evaluator, "first", refuse)
        drive_and_replay(plan_of(workflow), arguments, data)


def refuse(*args: object, **kwargs: object) -> Any:
    raise AssertionError("jq ran inside the engine")


def drive_and_replay(plan: Plan, arguments: dict[str, Any], data: st.DataObject) -> None:
    """Feed a live run outcomes in an order ``data`` draws, then replay every prefix of what it was fed."""
    recorded = Recorded(plan, arguments)
    for _ in range(40):
        work = sorted(recorded.calls) + sorted(recorded.evaluations) + sorted(recorded.timers)
        late = recorded.cancelled[-2:]  # outcomes that arrive after their call was cancelled
        if not work:
            break
        action = data.draw(st.sampled_from(["work"] * 8 + ["late"] * bool(late) + ["cancel"]))
        if action == "cancel":
            recorded.cancel()
            continue
        key = data.draw(st.sampled_from(late if action == "late" else work))
        if key in recorded.timers:
            recorded.fire(key)
        elif key in recorded.evaluations or "#eval" in key:
            recorded.evaluate(key, fail=data.draw(st.integers(0, 9)) == 0)
        elif key in recorded.calls or action == "late":
            attempt = recorded.calls[key].attempt if key in recorded.calls else 1
            if data.draw(st.booleans()):
                recorded.done(key, attempt, data.draw(RESULTS))
            else:
                refused = data.draw(st.sampled_from([None, None, 0.0, 0.5]))  # some refused before the tool
                error = StepError(data.draw(KINDS), "it failed", retry_after=refused)
                recorded.done(key, attempt, error=error, random=data.draw(st.floats(0, 0.99)))
    assert_every_prefix_restores(recorded)


@pytest.mark.anyio
async def test_the_runners_journal_holds_the_random_draw_that_jittered_a_retry() -> None:
    journal = MemoryStore()
    plan = plan_of("""
steps: [{id: a, call: t__a, retry: {attempts: 2, backoff: 1ms, jitter: 0.5}}]
""")
    runner = Runner(Flaky(), journal, rng=lambda: 0.9)
    result = await runner.run(plan, {}, CallContext(principal=Principal("tester")))
    assert result.meta is not None
    events = await journal.events(result.meta[RUN_META_KEY])
    failed = next(i for i, event in enumerate(events) if event.kind == "step_done")

    _, outstanding = Run.restore(plan, events[: failed + 1])

    retry = plan.steps["a"].step.retry
    assert retry is not None
    delay = retry_delay(1, retry.backoff, retry.max_backoff, retry.jitter, 0.9)
    assert delay != retry_delay(1, retry.backoff, retry.max_backoff, retry.jitter, 0.5)
    assert outstanding == [StartTimer("a#retry", delay)]  # the wait the live run waited
