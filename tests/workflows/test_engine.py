"""The engine as a pure state machine: events in, commands out, no I/O and no clock."""

import gc
import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from gateway.workflows import _jqpool, _jqsafe
from gateway.workflows.commands import (
    AskModel,
    AskUser,
    CallTool,
    Cancel,
    Command,
    Evaluate,
    Finished,
    Settled,
    StartTimer,
    StepError,
    retry_delay,
)
from gateway.workflows.engine import Run
from gateway.workflows.model import Workflow
from gateway.workflows.plan import Plan, compile_workflow
from gateway.workflows.retries import REFUSAL_BUDGET

Leaf = CallTool | AskUser | AskModel

_JQ = _jqsafe.Evaluator()
"""The tests' own worker: the Driver runs the programs the engine asks for (as the runner does) through it."""
_RUN_JQ = _jqsafe.Evaluator.first
"""Taken before ``no_jq_here`` replaces it, so only the Driver can run jq."""


@pytest.fixture(autouse=True)
def no_jq_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any jq run in this process but the Driver's fails the test: the engine must not run one, in any test here."""

    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError("jq ran inside the engine")

    for owner, name in [
        (_jqsafe, "first"),
        (_jqpool, "afirst"),
        (_jqsafe.Evaluator, "first"),
        (_jqpool.AsyncEvaluator, "first"),
    ]:
        monkeypatch.setattr(owner, name, refuse)


def plan_of(text: str) -> Plan:
    plan, problems = compile_workflow("w", Workflow.model_validate(yaml.safe_load(text)))
    assert problems == []
    return plan


class Driver:
    """Runs an engine by hand: collects what it asks for, answers when told to."""

    def __init__(self, text: str, arguments: dict[str, Any] | None = None, *, evaluate: bool = True) -> None:
        """``evaluate``: run the jq programs the engine asks for at once (as the runner does), in order."""
        self.run = Run(plan_of(text), arguments or {})
        self.in_flight: dict[str, Leaf] = {}
        self.evaluations: dict[str, Evaluate] = {}
        self.timers: dict[str, float] = {}
        self.log: list[Command] = []
        self.finished: Finished | None = None
        self.evaluate = evaluate
        self._evaluating = False
        self.take(self.run.start())

    def take(self, commands: list[Command]) -> list[Command]:
        for command in commands:
            self.log.append(command)
            if isinstance(command, CallTool | AskUser | AskModel):
                self.in_flight[command.key] = command
            elif isinstance(command, Evaluate):
                self.evaluations[command.key] = command
            elif isinstance(command, StartTimer):
                self.timers[command.key] = command.seconds
            elif isinstance(command, Cancel):
                self.in_flight.pop(command.key, None)
                self.evaluations.pop(command.key, None)
            elif isinstance(command, Finished):
                assert self.finished is None, "finished twice"
                self.finished = command
        if self.evaluate and not self._evaluating:
            self._evaluating = True
            try:
                while self.evaluations:
                    self.evaluated(next(iter(self.evaluations)))
            finally:
                self._evaluating = False
        return commands

    def evaluated(self, key: str) -> list[Command]:
        """Run the program of evaluation ``key`` (here, in the test: the engine never does) and report it."""
        command = self.evaluations.pop(key)
        empty = object()
        try:
            value = _RUN_JQ(_JQ, command.source, command.data, empty)
        except _jqsafe.JqError as exc:
            return self.take(self.run.evaluated(key, error=str(exc)))
        if value is empty:
            return self.take(self.run.evaluated(key, empty=True))
        return self.take(self.run.evaluated(key, value))

    def ok(self, key: str, result: Any = None) -> list[Command]:
        command = self.in_flight.pop(key)
        return self.take(self.run.done(key, command.attempt, result))

    def fail(self, key: str, kind: str = "error", message: str = "boom", random: float = 0.5) -> list[Command]:
        command = self.in_flight.pop(key)
        return self.take(self.run.done(key, command.attempt, error=StepError(kind, message), random=random))

    def fire(self, key: str) -> list[Command]:
        del self.timers[key]
        return self.take(self.run.fire(key))

    def answer_all(self, results: Callable[[Leaf], Any] = lambda c: None) -> None:
        """Answer every call as it comes, oldest first, until none is left."""
        while self.in_flight:
            key, command = next(iter(self.in_flight.items()))
            self.ok(key, results(command))

    @property
    def started(self) -> list[str]:
        return [c.key for c in self.log if isinstance(c, CallTool | AskUser | AskModel)]

    @property
    def settled(self) -> dict[str, str]:
        return {c.key: c.status for c in self.log if isinstance(c, Settled)}


def test_independent_steps_start_together_and_a_dependent_one_after_both() -> None:
    d = Driver("""
steps:
  - {id: a, call: t__a}
  - {id: b, call: t__b}
  - {id: c, call: t__c, with: {x: "${.steps.a.result}", y: "${.steps.b.result}"}}
""")
    assert set(d.in_flight) == {"a", "b"}
    d.ok("a", 1)
    assert set(d.in_flight) == {"b"}
    d.ok("b", 2)
    assert d.in_flight["c"].arguments == {"x": 1, "y": 2}  # type: ignore[union-attr]
    d.ok("c", 3)
    assert d.finished == Finished("succeeded", {"a": 1, "b": 2, "c": 3})


def test_by_default_a_wide_fan_out_starts_every_call_at_once() -> None:
    steps = ", ".join(f"{{id: f{i}, call: t}}" for i in range(50))
    d = Driver(f"steps: [{steps}]")
    assert len(d.in_flight) == 50


def test_max_concurrency_bounds_the_calls_in_flight_and_keeps_their_order() -> None:
    d = Driver("""
max_concurrency: 2
steps: [{id: a, call: t}, {id: b, call: t}, {id: c, call: t}, {id: d, call: t}]
""")
    assert list(d.in_flight) == ["a", "b"]
    d.ok("b")
    assert list(d.in_flight) == ["a", "c"]
    d.answer_all()
    assert d.started == ["a", "b", "c", "d"]
    assert d.finished is not None
    assert d.finished.status == "succeeded"


def test_arguments_and_output_are_evaluated_over_input_and_results() -> None:
    d = Driver(
        """
steps:
  - {id: order, call: crm__order, with: {id: "${.input.order_id}", note: "for ${.input.order_id}"}}
  - {id: total, set: {sum: "${.steps.order.result.items | map(.price) | add}"}}
output: {status: "${.steps.order.result.status}", sum: "${.steps.total.result.sum}"}
""",
        {"order_id": "A-1"},
    )
    assert d.in_flight["order"].arguments == {"id": "A-1", "note": "for A-1"}  # type: ignore[union-attr]
    d.ok("order", {"status": "shipped", "items": [{"price": 2}, {"price": 3}]})
    assert d.finished == Finished("succeeded", {"status": "shipped", "sum": 5})


def test_a_switch_runs_the_first_matching_branch_and_skips_the_others() -> None:
    d = Driver(
        """
steps:
  - id: route
    switch:
      - {when: '.input.n > 10', steps: [{id: big, call: t__big}]}
      - {when: '.input.n > 1', steps: [{id: mid, call: t__mid}, {id: mid2, set: {x: 1}, after: [mid]}]}
    default: [{id: small, call: t__small}]
  - {id: after_route, set: {picked: "${.steps.route.result}"}}
""",
        {"n": 5},
    )
    assert list(d.in_flight) == ["mid"]
    d.ok("mid", "m")
    assert d.settled == {"big": "skipped", "small": "skipped", "mid": "succeeded", "mid2": "succeeded",
                         "route": "succeeded", "after_route": "succeeded"}  # fmt: skip
    assert d.finished is not None
    assert d.finished.output["after_route"] == {"picked": {"x": 1}}


def test_a_switch_with_no_matching_case_and_no_default_succeeds_with_null() -> None:
    d = Driver("""
steps:
  - {id: s, switch: [{when: 'false', steps: [{id: x, call: t}]}]}
""")
    assert d.settled == {"x": "skipped", "s": "succeeded"}
    assert d.finished == Finished("succeeded", {"s": None})


def test_steps_that_depend_only_on_skipped_steps_are_skipped() -> None:
    d = Driver("""
steps:
  - id: s
    switch:
      - when: 'false'
        steps: [{id: x, call: t}, {id: y, call: t, with: {v: "${.steps.x.result}"}}]
  - {id: z, call: t, after: [s]}
""")
    assert d.settled["x"] == "skipped"
    assert d.settled["y"] == "skipped"
    assert list(d.in_flight) == ["z"]


def test_for_each_maps_its_body_over_the_items_with_bounded_concurrency() -> None:
    d = Driver(
        """
steps:
  - id: lines
    for_each: "${.input.skus}"
    as: sku
    concurrency: 2
    steps:
      - {id: stock, call: inventory__check, with: {sku: "${.sku}", position: "${.index}"}}
      - {id: label, set: {text: "${.sku}: ${.steps.stock.result}"}}
""",
        {"skus": ["a", "b", "c"]},
    )
    assert list(d.in_flight) == ["lines[0]/stock", "lines[1]/stock"]
    assert d.in_flight["lines[1]/stock"].arguments == {"sku": "b", "position": 1}  # type: ignore[union-attr]
    d.ok("lines[1]/stock", 7)
    assert list(d.in_flight) == ["lines[0]/stock", "lines[2]/stock"]
    d.ok("lines[2]/stock", 0)
    d.ok("lines[0]/stock", 3)
    assert d.finished == Finished("succeeded", {"lines": [{"text": "a: 3"}, {"text": "b: 7"}, {"text": "c: 0"}]})


def test_for_each_output_picks_each_iterations_value_and_an_empty_list_gives_an_empty_result() -> None:
    d = Driver(
        """
steps:
  - id: each
    for_each: "${.input.xs}"
    steps: [{id: sq, set: {v: "${.item * .item}"}}]
    output: "${.steps.sq.result.v}"
  - {id: none, for_each: "${[]}", steps: [{id: never, call: t}]}
""",
        {"xs": [1, 2, 3]},
    )
    assert d.finished == Finished("succeeded", {"each": [1, 4, 9], "none": []})


def test_for_each_over_something_other_than_a_list_fails_the_step() -> None:
    d = Driver("""
steps: [{id: each, for_each: "${.input}", steps: [{id: x, call: t}]}]
""")
    assert d.finished is not None
    assert d.finished.status == "failed"
    assert d.finished.error is not None
    assert "needs a list" in d.finished.error.message


def test_retries_wait_with_exponential_backoff_and_then_succeed() -> None:
    d = Driver("""
steps: [{id: a, call: t, retry: {attempts: 3, backoff: 1s, max_backoff: 10s, jitter: 0}}]
""")
    d.fail("a", "timeout")
    assert d.timers == {"a#retry": 1.0}
    assert d.in_flight == {}
    d.fire("a#retry")
    d.fail("a", "unavailable")
    assert d.timers == {"a#retry": 2.0}
    d.fire("a#retry")
    d.ok("a", "finally")
    assert d.finished == Finished("succeeded", {"a": "finally"})
    assert [c.attempt for c in d.log if isinstance(c, CallTool)] == [1, 2, 3]


def test_a_kind_of_failure_not_named_in_retry_on_fails_at_once() -> None:
    d = Driver("""
steps: [{id: a, call: t, retry: {attempts: 5, "on": [timeout]}}]
""")
    d.fail("a", "error", "bad input")
    assert d.timers == {}
    assert d.finished is not None
    assert d.finished.error == StepError("error", "bad input", "a")


def test_by_default_retry_covers_every_failure_but_denied_and_invalid() -> None:
    for kind in ("error", "rate_limited", "circuit_open", "timeout", "unavailable"):
        d = Driver("""
steps: [{id: a, call: t, retry: {attempts: 2}}]
""")
        d.fail("a", kind, "the tool said no")
        assert list(d.timers) == ["a#retry"], kind
        d.fire("a#retry")
        d.ok("a", "then yes")
        assert d.finished == Finished("succeeded", {"a": "then yes"}), kind
    for kind in ("denied", "invalid"):
        d = Driver("""
steps: [{id: a, call: t, retry: {attempts: 2}}]
""")
        d.fail("a", kind, "would fail again")
        assert d.timers == {}, kind
        assert d.finished is not None, kind
        assert d.finished.status == "failed", kind


def refuse(d: "Driver", key: str, kind: str, retry_after: float, random: float = 0.0) -> None:
    command = d.in_flight.pop(key)
    error = StepError(kind, "refused before it reached the tool", retry_after=retry_after)
    d.take(d.run.done(key, command.attempt, error=error, random=random))


def test_a_call_refused_before_reaching_the_tool_is_retried_after_the_hinted_wait_without_retry() -> None:
    d = Driver("""
steps: [{id: a, call: t}]
""")
    refuse(d, "a", "rate_limited", 0.4)
    assert d.timers == {"a#retry": pytest.approx(0.4)}
    d.fire("a#retry")
    refuse(d, "a", "circuit_open", 3.0)
    assert d.timers == {"a#retry": pytest.approx(3.0)}
    d.fire("a#retry")
    d.ok("a", "served")
    assert d.finished == Finished("succeeded", {"a": "served"})


def test_refusals_are_retried_only_within_the_steps_timeout() -> None:
    d = Driver("""
steps: [{id: a, call: t, timeout: 1s}]
""")
    refuse(d, "a", "rate_limited", 0.6)
    d.fire("a#retry")
    refuse(d, "a", "rate_limited", 0.6)  # 1.2 s of waiting in all would pass the step's 1 s
    assert d.timers == {}
    assert d.finished is not None
    assert d.finished.error is not None
    assert d.finished.error.kind == "rate_limited"


def test_refusals_without_a_step_timeout_wait_at_most_the_refusal_budget() -> None:
    d = Driver("""
steps: [{id: a, call: t}]
""")
    waited = 0.0
    while "a" in d.in_flight:
        refuse(d, "a", "unavailable", 7.0)
        if "a#retry" in d.timers:
            waited += d.timers["a#retry"]
            d.fire("a#retry")
    assert waited <= REFUSAL_BUDGET
    assert waited >= REFUSAL_BUDGET - 7.0
    assert d.finished is not None
    assert d.finished.status == "failed"


def test_a_refusal_that_hints_no_wait_backs_off_exponentially() -> None:
    d = Driver("""
steps: [{id: a, call: t}]
""")
    waits = []
    for _ in range(4):
        refuse(d, "a", "rate_limited", 0.0)
        waits.append(d.timers["a#retry"])
        d.fire("a#retry")
    assert waits == pytest.approx([0.05, 0.1, 0.2, 0.4])


def test_refusals_do_not_use_up_the_steps_retry_attempts() -> None:
    d = Driver("""
steps: [{id: a, call: t, retry: {attempts: 2, backoff: 1s, jitter: 0}}]
""")
    refuse(d, "a", "rate_limited", 0.5)
    d.fire("a#retry")
    refuse(d, "a", "rate_limited", 0.5)
    d.fire("a#retry")
    d.fail("a", "error", "a real failure")  # the first real try: one retry left
    assert d.timers == {"a#retry": 1.0}
    d.fire("a#retry")
    d.fail("a", "error", "again")
    assert d.finished is not None
    assert d.finished.status == "failed"


def test_retries_stop_after_the_last_attempt() -> None:
    d = Driver("""
steps: [{id: a, call: t, retry: {attempts: 2, "on": [error]}}]
""")
    d.fail("a")
    d.fire("a#retry")
    d.fail("a", message="again")
    assert d.finished is not None
    assert d.finished.error == StepError("error", "again", "a")


@pytest.mark.parametrize(
    ("attempt", "random", "expected"),
    [(1, 0.5, 0.2), (2, 0.5, 0.4), (3, 0.5, 0.8), (10, 0.5, 5.0), (1, 0.0, 0.18), (1, 0.999999, 0.22)],
)
def test_retry_delay_doubles_up_to_the_maximum_and_jitter_spreads_it(
    attempt: int, random: float, expected: float
) -> None:
    assert retry_delay(attempt, 0.2, 5.0, 0.1, random) == pytest.approx(expected, abs=1e-5)


def test_on_error_continue_lets_dependents_run_and_read_the_error() -> None:
    d = Driver("""
steps:
  - {id: a, call: t, on_error: continue}
  - {id: b, set: {why: "${.steps.a.error.message}", kind: "${.steps.a.error.kind}"}}
""")
    d.fail("a", "unavailable", "down")
    assert d.finished == Finished("succeeded", {"b": {"why": "down", "kind": "unavailable"}})
    assert d.settled["a"] == "failed"


def test_a_fallback_runs_in_place_of_a_failed_step_and_gives_it_its_result() -> None:
    d = Driver("""
steps:
  - id: a
    call: primary
    on_error:
      - {id: backup, call: secondary, with: {reason: "${.steps.a.error.message}"}}
  - {id: b, set: {got: "${.steps.a.result}"}}
""")
    d.fail("a", "unavailable", "primary down")
    assert d.in_flight["backup"].arguments == {"reason": "primary down"}  # type: ignore[union-attr]
    d.ok("backup", "from backup")
    assert d.finished == Finished("succeeded", {"a": "from backup", "b": {"got": "from backup"}})


def test_a_failing_fallback_fails_the_step() -> None:
    d = Driver("""
steps:
  - {id: a, call: primary, on_error: [{id: backup, call: secondary}]}
""")
    d.fail("a", "unavailable", "primary down")
    d.fail("backup", "error", "secondary down too")
    assert d.finished is not None
    assert d.finished.error == StepError("error", "secondary down too", "backup")


def test_a_success_condition_that_does_not_hold_fails_the_step() -> None:
    d = Driver("""
steps: [{id: a, call: t, success: '.result.ok == true'}]
""")
    d.ok("a", {"ok": False})
    assert d.finished is not None
    assert d.finished.error is not None
    assert d.finished.error.kind == "error"
    assert "success condition" in d.finished.error.message


def test_a_failed_run_compensates_completed_steps_in_reverse_completion_order() -> None:
    d = Driver("""
steps:
  - {id: a, call: t__a, compensate: {call: undo__a, with: {id: "${.steps.a.result.id}"}}}
  - {id: b, call: t__b, compensate: {call: undo__b}}
  - {id: c, call: t__c, compensate: {call: undo__c}}
  - {id: d, call: t__d, after: [a, b, c]}
""")
    d.ok("b", {"id": "B"})
    d.ok("a", {"id": "A"})
    d.ok("c", {"id": "C"})
    d.fail("d", "error", "nope")
    assert d.in_flight["c#compensate"].tool == "undo__c"  # type: ignore[union-attr]
    assert d.finished is None  # one compensation at a time
    d.ok("c#compensate")
    d.ok("a#compensate")
    assert d.in_flight["b#compensate"].tool == "undo__b"  # type: ignore[union-attr]
    d.ok("b#compensate")
    assert [c.tool for c in d.log if isinstance(c, CallTool) and c.compensation] == ["undo__c", "undo__a", "undo__b"]
    assert next(c for c in d.log if isinstance(c, CallTool) and c.tool == "undo__a").arguments == {"id": "A"}
    assert d.finished == Finished("failed", error=StepError("error", "nope", "d"))


def test_a_failed_run_cancels_the_steps_in_flight() -> None:
    d = Driver("""
steps: [{id: a, call: t}, {id: b, call: t}, {id: c, call: t}]
""")
    d.fail("a", "error")
    assert Cancel("b") in d.log
    assert Cancel("c") in d.log
    assert d.take(d.run.done("b", 1, "late")) == []  # an outcome after cancellation is ignored
    assert d.finished is not None
    assert d.finished.status == "failed"


def test_a_failed_compensation_is_reported_and_the_rest_still_run() -> None:
    d = Driver("""
steps:
  - {id: a, call: t, compensate: {call: undo__a}}
  - {id: b, call: t, compensate: {call: undo__b}, after: [a]}
  - {id: c, fail: "stop at ${.steps.b.result}"}
""")
    d.ok("a")
    d.ok("b", "B")
    d.fail("b#compensate", "unavailable", "undo service down")
    d.ok("a#compensate")
    assert d.finished is not None
    assert d.finished.error == StepError("error", "stop at B", "c")
    assert [e.step for e in d.finished.compensation_errors] == ["b"]


def test_cancelling_the_run_cancels_in_flight_steps_and_compensates() -> None:
    d = Driver("""
steps:
  - {id: a, call: t, compensate: {call: undo__a}}
  - {id: b, call: t, after: [a]}
""")
    d.ok("a")
    d.take(d.run.cancel())
    assert Cancel("b") in d.log
    d.ok("a#compensate")
    assert d.finished is not None
    assert d.finished.error is not None
    assert d.finished.error.kind == "cancelled"


def test_a_failing_nested_step_fails_its_container_whose_on_error_can_catch_it() -> None:
    d = Driver("""
steps:
  - id: lines
    for_each: "${[1, 2, 3]}"
    concurrency: 3
    on_error: continue
    steps: [{id: check, call: t}]
  - {id: after, set: {error: "${.steps.lines.error.step}"}}
""")
    d.fail("lines[1]/check", "error", "no stock")
    assert Cancel("lines[0]/check") in d.log
    assert Cancel("lines[2]/check") in d.log
    assert d.finished == Finished("succeeded", {"after": {"error": "lines[1]/check"}})


def test_a_container_retries_from_scratch() -> None:
    d = Driver("""
steps:
  - id: lines
    for_each: "${[1, 2]}"
    retry: {attempts: 2, "on": [error], backoff: 1s, jitter: 0}
    steps: [{id: check, call: t}]
""")
    d.ok("lines[0]/check", "first")
    d.fail("lines[1]/check")
    d.fire("lines#retry")
    assert set(d.in_flight) == {"lines[0]/check"}
    d.answer_all(lambda c: "again")
    assert d.finished == Finished("succeeded", {"lines": ["again", "again"]})


def test_a_container_timeout_fails_it_and_cancels_what_runs_inside() -> None:
    d = Driver("""
steps:
  - {id: s, timeout: 2s, switch: [{when: 'true', steps: [{id: slow, call: t}]}]}
""")
    assert d.timers == {"s#timeout1": 2.0}
    d.fire("s#timeout1")
    assert Cancel("slow") in d.log
    assert d.finished is not None
    assert d.finished.error is not None
    assert d.finished.error.kind == "timeout"


def test_a_leaf_step_timeout_is_left_to_the_runner() -> None:
    d = Driver("""
steps: [{id: a, call: t, timeout: 3s}]
""")
    assert d.in_flight["a"].timeout == 3.0
    assert d.timers == {}


def test_a_runtime_jq_error_fails_the_step_naming_the_expression() -> None:
    d = Driver("""
steps: [{id: a, set: {x: "${.input.n + 1}"}}]
""", {"n": "text"})  # fmt: skip
    assert d.finished is not None
    assert d.finished.error is not None
    assert d.finished.error.step == "a"
    assert ".input.n + 1" in d.finished.error.message


def test_a_fail_step_ends_the_run_with_its_message() -> None:
    d = Driver("""
steps: [{id: stop, fail: "order ${.input.id} is locked"}]
""", {"id": "A-1"})  # fmt: skip
    assert d.finished == Finished("failed", error=StepError("error", "order A-1 is locked", "stop"))


def test_ask_steps_carry_their_question_and_default() -> None:
    d = Driver("""
steps:
  - {id: ok, ask_user: {message: "Refund ${.input.id}?", default: {ok: false}}}
  - {id: draft, ask_model: {prompt: "Write to ${.input.id}", system: be brief, max_tokens: 50, default: hi}}
""", {"id": "A-1"})  # fmt: skip
    ask = d.in_flight["ok"]
    assert isinstance(ask, AskUser)
    assert (ask.message, ask.default) == ("Refund A-1?", {"ok": False})
    model = d.in_flight["draft"]
    assert isinstance(model, AskModel)
    assert (model.prompt, model.system, model.max_tokens, model.default) == ("Write to A-1", "be brief", 50, "hi")


def test_a_long_chain_of_instant_steps_runs_without_recursion() -> None:
    steps = [{"id": "s0", "set": {"v": 0}}] + [
        {"id": f"s{i}", "set": {"v": f"${{.steps.s{i - 1}.result.v}}", "i": i}} for i in range(1, 1500)
    ]
    d = Driver(yaml.safe_dump({"steps": steps, "output": "${.steps.s1499.result}"}))
    assert d.finished == Finished("succeeded", {"v": 0, "i": 1499})


def test_the_same_events_give_the_same_commands() -> None:
    text = """
steps:
  - {id: a, call: t, retry: {attempts: 2, "on": [error]}}
  - {id: b, for_each: "${[1, 2]}", steps: [{id: x, call: t, with: {i: "${.item}"}}]}
"""

    def replay() -> list[Command]:
        d = Driver(text)
        d.fail("a", random=0.3)
        d.fire("a#retry")
        d.answer_all(lambda c: c.key)
        return d.log

    assert replay() == replay()


@pytest.mark.parametrize("outcome", ["succeeds", "fails"])
def test_a_finished_run_leaves_no_garbage_for_the_cycle_collector(outcome: str) -> None:
    """Frames and states refer to each other; a finished run must not leave that for a full collection."""
    text = """
steps:
  - {id: first, call: t, compensate: {call: undo}}
  - id: each
    for_each: "${.input.xs}"
    after: [first]
    steps: [{id: c, call: t, with: {x: "${.item}"}}, {id: d, call: t, after: [c]}]
  - {id: last, call: t, after: [each]}
"""
    gc.collect()
    gc.disable()
    try:
        driver = Driver(text, {"xs": [1, 2, 3]})
        while driver.finished is None:
            key = next(iter(driver.in_flight))
            if outcome == "fails" and key == "last":
                driver.fail(key)
            else:
                driver.ok(key)
        assert driver.finished.status == ("succeeded" if outcome == "succeeds" else "failed")
        del driver
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_a_call_cancelled_in_the_same_batch_of_events_is_never_handed_out() -> None:
    driver = Driver("""
steps:
  - {id: slow, call: t}
  - id: sw
    switch: [{when: "true", steps: [{id: side, call: side_effect}, {id: stop, fail: "no"}]}]
    on_error: continue
""")
    assert driver.started == ["slow"]  # `side` was queued, then cancelled when `stop` failed its switch
    assert not any(isinstance(c, Cancel) for c in driver.log)


def test_expressions_over_all_steps_see_a_copy_inside_loops_and_out() -> None:
    driver = Driver("""
steps:
  - {id: first, set: {x: 1}}
  - {id: seen, set: {all: "${.steps}"}, after: [first]}
  - id: each
    for_each: "${[1, 2]}"
    steps: [{id: names, set: {keys: "${. | keys}"}}]
""")
    assert driver.finished is not None
    assert driver.finished.status == "succeeded", driver.finished.error
    output = driver.finished.output
    assert output["seen"] == {"all": {"first": {"result": {"x": 1}, "error": None, "status": "succeeded"}}}
    assert output["each"] == [{"keys": ["index", "input", "item", "run", "steps"]}] * 2
    json.dumps(output)  # no reference back into the engine's own state


# --- jq programs are the runner's to run: the engine asks, and waits for the outcome. ---


def test_a_jq_program_is_asked_for_and_nothing_happens_until_its_outcome_comes_back() -> None:
    d = Driver(
        """
steps:
  - {id: order, call: crm__order}
  - {id: total, set: {sum: "${.steps.order.result.items | map(.price) | add}", id: "${.input.id}"}}
  - {id: notify, call: mail__send, with: {sum: "${.steps.total.result.sum}"}}
""",
        {"id": "A-1", "other": "not read"},
        evaluate=False,
    )
    asked = d.ok("order", {"items": [{"price": 2}, {"price": 3}]})
    entry = {"result": {"items": [{"price": 2}, {"price": 3}]}, "error": None, "status": "succeeded"}
    settled, evaluate = asked  # and nothing else: no call, no step settled but `order`
    assert isinstance(settled, Settled)
    assert settled.key == "order"
    assert isinstance(evaluate, Evaluate)
    assert evaluate == Evaluate(
        evaluate.key, ".steps.order.result.items | map(.price) | add", {"steps": {"order": entry}}
    )
    assert d.run.snapshot()["steps"]["total"]["status"] == "evaluating"

    assert d.take(d.run.fire("total#timeout1")) == []  # no timer of its: nothing moves but the outcome
    commands = d.take(d.run.evaluated(evaluate.key, 5))
    assert [c.key for c in commands if isinstance(c, Settled)] == ["total"]
    assert d.in_flight["notify"].arguments == {"sum": 5}  # type: ignore[union-attr]


def test_the_programs_of_one_value_are_asked_for_together_and_a_switchs_conditions_in_turn() -> None:
    d = Driver(
        """
steps:
  - {id: a, call: t, with: {x: "${.input.n + 1}", y: "${.input.n * 2}", z: "${.input.n}"}}
  - id: s
    after: [a]
    switch:
      - {when: ".input.n > 5", steps: [{id: big, set: {}}]}
      - {when: ".input.n > 1", steps: [{id: mid, set: {}}]}
    default: [{id: small, set: {}}]
""",
        {"n": 3},
        evaluate=False,
    )
    assert [(c.source, c.data) for c in d.evaluations.values()] == [
        (".input.n + 1", {"input": {"n": 3}}),
        (".input.n * 2", {"input": {"n": 3}}),
    ]
    first, second = d.evaluations
    d.take(d.run.evaluated(second, 6))
    assert d.in_flight == {}  # still waiting for the first
    d.take(d.run.evaluated(first, 4))
    assert d.in_flight["a"].arguments == {"x": 4, "y": 6, "z": 3}  # type: ignore[union-attr]
    d.evaluations.clear()

    d.ok("a")
    [case0] = d.evaluations
    assert d.evaluations[case0].source == ".input.n > 5"
    d.evaluations.clear()
    d.take(d.run.evaluated(case0, False))
    [case1] = d.evaluations
    assert d.evaluations[case1].source == ".input.n > 1"
    d.evaluations.clear()
    d.take(d.run.evaluated(case1, True))
    assert d.finished is not None
    assert d.run.snapshot()["steps"]["mid"]["status"] == "succeeded"
    assert d.run.snapshot()["steps"]["big"]["status"] == "skipped"


def test_an_evaluation_error_fails_the_step_like_a_jq_error_and_no_output_is_null() -> None:
    d = Driver(
        """
steps:
  - {id: a, set: {x: "${.input.n + 1}"}, on_error: continue}
  - {id: b, set: {x: "${.input.missing | values}"}}
""",
        {"n": "text"},
        evaluate=False,
    )
    a, b = d.evaluations
    d.take(d.run.evaluated(a, error="string and number cannot be added"))
    d.take(d.run.evaluated(b, empty=True))
    assert d.run.snapshot()["steps"]["a"]["error"] == {
        "kind": "error",
        "message": "jq error in '.input.n + 1': string and number cannot be added",
        "step": "a",
    }
    assert d.finished == Finished("succeeded", {"b": {"x": None}})  # the default output: the steps that succeeded


def test_a_step_timing_out_while_its_program_runs_fails_and_its_evaluation_is_cancelled() -> None:
    d = Driver(
        """
steps: [{id: slow, timeout: 2s, set: {x: "${[range(100000000)] | length}"}}]
""",
        evaluate=False,
    )
    [key] = d.evaluations
    commands = d.fire("slow#timeout1")
    assert Cancel(key) in commands
    assert d.finished is not None
    assert d.finished.error == StepError("timeout", "did not finish within 2s", "slow")
    assert d.run.outstanding() == []
    assert d.take(d.run.evaluated(key, 100000000)) == []  # a late outcome changes nothing


def test_a_run_of_plain_paths_asks_for_no_evaluation() -> None:
    d = Driver(
        """
steps:
  - {id: a, call: t, with: {id: "${.input.id}"}, success: ".result.ok"}
  - {id: b, set: {v: "${.steps.a.result.v}"}}
output: {v: "${.steps.b.result.v}"}
""",
        {"id": 1},
    )
    d.ok("a", {"ok": True, "v": 7})
    assert d.finished == Finished("succeeded", {"v": 7})
    assert not any(isinstance(c, Evaluate) for c in d.log)


def test_a_timer_of_a_step_that_a_container_retry_replaced_does_not_reach_its_replacement() -> None:
    d = Driver(
        """
steps:
  - id: outer
    retry: {attempts: 2, "on": [error], backoff: 1s, jitter: 0}
    switch:
      - when: ".input.go"
        steps:
          - {id: inner, timeout: 10s, switch: [{when: ".input.go", steps: [{id: slow, call: t}]}]}
          - {id: flaky, call: t, retry: {attempts: 3, backoff: 30s, max_backoff: 60s, jitter: 0}}
          - {id: boom, call: t}
""",
        {"go": True},
    )
    d.fail("flaky")  # waits 30 s to try again
    d.fail("boom")  # fails `outer`, which starts over after 1 s
    old_timeout, old_retry = "inner#timeout1", "flaky#retry"
    assert {old_timeout, old_retry} <= set(d.timers)
    d.fire("outer#retry")
    d.fail("flaky")
    started = [c.key for c in d.log if isinstance(c, StartTimer)]
    assert len(started) == len(set(started))  # a timer's key is never that of one still pending

    d.take(d.run.fire(old_timeout))  # the replaced `inner`'s timer: not the new one's
    d.take(d.run.fire(old_retry))  # the replaced `flaky`'s retry: the new one waits its own 30 s
    steps = d.run.snapshot()["steps"]
    assert steps["inner"]["status"] == "running"
    assert steps["flaky"]["status"] == "retrying"
    assert set(d.in_flight) == {"slow", "boom"}
    assert d.finished is None


def test_an_evaluations_outcome_costs_the_same_however_many_others_are_outstanding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 200-wide fan-out of jq steps: each outcome must not look over every other evaluation (O(n²) in all)."""
    checks = 0
    valid = Run._valid

    def counted(run: Run, site: Any) -> bool:
        nonlocal checks
        checks += 1
        return valid(run, site)

    monkeypatch.setattr(Run, "_valid", counted)
    steps = ", ".join(f'{{id: f{i}, call: t, with: {{n: "${{.input.n + {i}}}"}}}}' for i in range(200))
    d = Driver(f"steps: [{steps}]", {"n": 1}, evaluate=False)
    assert len(d.evaluations) == 200
    for key in list(d.evaluations):
        d.take(d.run.evaluated(key, 1))
    d.evaluations.clear()
    assert len(d.in_flight) == 200
    assert checks <= 2 * 200


# --- on_error: {default: …}. ---


def test_an_on_error_default_after_the_retries_succeeds_the_step_marked_degraded_with_its_error_kept() -> None:
    d = Driver("""
steps:
  - {id: a, call: t, retry: {attempts: 2, backoff: 1s, jitter: 0}, on_error: {default: {items: []}}}
  - {id: b, set: {got: "${.steps.a.result}", why: "${.steps.a.error.message}"}}
""")
    d.fail("a", "unavailable", "down")
    assert d.timers == {"a#retry": 1.0}  # the default waits for the retries
    assert "a" not in d.settled
    d.fire("a#retry")
    d.fail("a", "unavailable", "still down")
    note = next(c for c in d.log if isinstance(c, Settled) and c.key == "a")
    assert note == Settled("a", "a", "succeeded", 2, {"items": []}, StepError("unavailable", "still down", "a"), True)
    assert note.describe(12) == "a: succeeded (degraded) in 12 ms (unavailable: still down)"
    assert d.finished == Finished("succeeded", {"a": {"items": []}, "b": {"got": {"items": []}, "why": "still down"}})
    assert d.run.snapshot()["steps"]["a"]["degraded"] is True


def test_a_step_that_succeeds_is_not_degraded_and_its_default_is_not_evaluated() -> None:
    d = Driver("steps: [{id: a, call: t, on_error: {default: '${.input.n * 2}'}}]", {"n": 1})
    d.ok("a", "fine")
    assert [c for c in d.log if isinstance(c, Evaluate)] == []
    note = next(c for c in d.log if isinstance(c, Settled))
    assert (note.status, note.degraded, note.error) == ("succeeded", False, None)
    assert note.describe() == "a: succeeded"


def test_an_on_error_default_expression_is_evaluated_by_jq_over_the_context_and_the_steps_own_error() -> None:
    d = Driver(
        """
steps:
  - {id: a, call: t, on_error: {default: {n: "${.input.n * 10}", why: "${.steps.a.error.kind | ascii_upcase}"}}}
""",
        {"n": 4},
        evaluate=False,
    )
    d.fail("a", "timeout", "slow")
    asked = sorted(d.evaluations)
    assert len(asked) == 2  # both programs together, and nothing settles until they come back
    assert d.settled == {}
    for key in asked:
        d.evaluated(key)
    assert d.finished == Finished("succeeded", {"a": {"n": 40, "why": "TIMEOUT"}})
    assert d.settled == {"a": "succeeded"}


def test_an_on_error_default_that_cannot_be_evaluated_fails_the_step() -> None:
    d = Driver("steps: [{id: a, call: t, on_error: {default: '${.input.n + {}}'}}]", {"n": 1})
    d.fail("a", "error", "boom")
    assert d.finished is not None
    assert d.finished.status == "failed"
    assert d.finished.error is not None
    assert (d.finished.error.kind, d.finished.error.step) == ("error", "a")
    assert d.finished.error.message.startswith("on_error default: ")


def test_a_degraded_step_is_not_compensated_when_the_run_fails_later() -> None:
    d = Driver("""
steps:
  - {id: a, call: t__a, compensate: {call: undo__a}}
  - {id: b, call: t__b, compensate: {call: undo__b}, on_error: {default: null}}
  - {id: c, call: t__c, after: [a, b]}
""")
    d.ok("a", 1)
    d.fail("b", "error", "b broke")
    d.fail("c", "error", "c broke")
    d.answer_all()
    assert [c.tool for c in d.log if isinstance(c, CallTool) and c.compensation] == ["undo__a"]
    assert d.finished == Finished("failed", error=StepError("error", "c broke", "c"))


def test_a_container_whose_nested_step_failed_succeeds_with_its_default() -> None:
    d = Driver("""
steps:
  - id: lines
    for_each: [1, 2]
    concurrency: 2
    steps: [{id: check, call: t}]
    on_error: {default: []}
""")
    assert set(d.in_flight) == {"lines[0]/check", "lines[1]/check"}
    d.fail("lines[0]/check", "error", "nope")
    assert Cancel("lines[1]/check") in d.log  # cancelled with its container
    assert d.finished == Finished("succeeded", {"lines": []})
    note = next(c for c in d.log if isinstance(c, Settled) and c.key == "lines")
    assert note.degraded
    assert note.error == StepError("error", "nope", "lines[0]/check")


def test_an_on_error_default_that_reads_another_step_waits_for_it_and_its_own_error_is_no_cycle() -> None:
    plan = plan_of("""
steps:
  - {id: cached, call: cache__get}
  - {id: live, call: crm__get, on_error: {default: {v: "${.steps.cached.result}", e: "${.steps.live.error.kind}"}}}
""")
    assert plan.graph.nodes["live"].deps == frozenset({"cached"})
    d = Driver("""
steps:
  - {id: cached, call: cache__get}
  - {id: live, call: crm__get, on_error: {default: {v: "${.steps.cached.result}", e: "${.steps.live.error.kind}"}}}
""")
    assert d.started == ["cached"]
    d.ok("cached", "old")
    d.fail("live", "unavailable")
    assert d.finished == Finished("succeeded", {"cached": "old", "live": {"v": "old", "e": "unavailable"}})


# --- wait. ---


def test_a_wait_starts_a_timer_of_its_seconds_and_succeeds_when_it_fires() -> None:
    d = Driver("""
steps:
  - {id: pause, wait: 1.5m}
  - {id: after, call: t, with: {waited: "${.steps.pause.result.waited}"}}
""")
    assert [c for c in d.log if isinstance(c, StartTimer)] == [StartTimer("pause#wait", 90.0)]
    assert d.started == []
    d.fire("pause#wait")
    assert d.settled["pause"] == "succeeded"
    assert d.in_flight["after"].arguments == {"waited": 90.0}  # type: ignore[union-attr]


def test_a_wait_until_a_time_asks_for_a_timer_due_then_whatever_the_clock_says() -> None:
    d = Driver(
        "steps: [{id: pause, wait: {until: '${.input.deadline}'}}]",
        {"deadline": "2026-05-01T11:00:00+02:00"},
    )
    [timer] = [c for c in d.log if isinstance(c, StartTimer)]
    assert timer == StartTimer("pause#wait", 0.0, 1777626000.0)  # 09:00 UTC: the runner measures what is left
    d.fire("pause#wait")
    assert d.finished == Finished("succeeded", {"pause": {"waited_until": "2026-05-01T09:00:00Z"}})


def test_a_wait_until_a_time_past_is_due_then_and_a_literal_time_needs_no_evaluation() -> None:
    d = Driver("steps: [{id: pause, wait: {until: '1999-12-31T23:59:59Z'}}]")
    assert [c for c in d.log if isinstance(c, Evaluate)] == []
    assert [c for c in d.log if isinstance(c, StartTimer)] == [StartTimer("pause#wait", 0.0, 946684799.0)]


@pytest.mark.parametrize("deadline", ["tomorrow", "2026-05-01T09:00:00", 1777626000, None])
def test_a_wait_until_something_not_an_rfc_3339_time_fails_the_step_as_invalid(deadline: Any) -> None:
    d = Driver(
        "steps: [{id: pause, wait: {until: '${.input.deadline}'}, retry: {attempts: 3}}]", {"deadline": deadline}
    )
    assert d.timers == {}  # invalid: not retried
    assert d.finished is not None
    assert d.finished.error is not None
    assert (d.finished.error.kind, d.finished.error.step) == ("invalid", "pause")
    assert d.finished.error.message.startswith("wait until: ")


def test_cancelling_a_waiting_run_finishes_it_at_once_and_compensates() -> None:
    d = Driver("""
steps:
  - {id: a, call: t, compensate: {call: undo}}
  - {id: pause, wait: 1h, after: [a]}
""")
    d.ok("a", 1)
    assert d.timers == {"pause#wait": 3600.0}
    d.take(d.run.cancel("stop"))
    d.answer_all()
    assert d.finished == Finished("failed", error=StepError("cancelled", "stop"))
    assert d.run.outstanding() == []  # the timer is not waited for
    assert d.run.fire("pause#wait") == []


def test_a_wait_inside_a_container_that_timed_out_is_cancelled_and_its_timer_ignored() -> None:
    d = Driver(
        """
steps:
  - id: each
    for_each: [1, 2]
    concurrency: 2
    on_error: continue
    steps: [{id: pause, wait: 10s}]
  - id: box
    switch: [{when: .input.go, steps: [{id: slow, wait: 1h}]}]
    timeout: 5s
    on_error: {default: late}
""",
        {"go": True},
    )
    assert d.timers == {
        "each[0]/pause#wait": 10.0,
        "each[1]/pause#wait": 10.0,
        "box#timeout1": 5.0,
        "slow#wait": 3600.0,
    }
    d.fire("box#timeout1")
    assert d.run.snapshot()["steps"]["slow"]["status"] == "cancelled"
    assert d.settled["box"] == "succeeded"
    assert d.run.fire("slow#wait") == []
    d.fire("each[0]/pause#wait")
    d.fire("each[1]/pause#wait")
    assert d.finished is not None
    assert d.finished.output["box"] == "late"
    assert d.finished.output["each"] == [{"waited": 10.0}, {"waited": 10.0}]
