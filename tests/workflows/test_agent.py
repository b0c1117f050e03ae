"""The ``agent`` step in the engine: a scripted model's turns in, calls and turns out, no I/O."""

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.workflows.agent import AgentReplyError, allowed, parse_reply
from gateway.workflows.commands import (
    AskAgent,
    CallTool,
    Cancel,
    Command,
    Finished,
    Settled,
    StartTimer,
    StepError,
)
from gateway.workflows.engine import Run
from gateway.workflows.journal import JournalEvent
from gateway.workflows.model import Workflow
from gateway.workflows.plan import Plan, check_tools, compile_workflow

AGENT = """
input: {type: object, properties: {order_id: {type: string}}}
steps:
  - id: research
    agent:
      goal: "Find why order ${.input.order_id} was late."
      tools: ["kb__*", "orders__get_*"]
      max_steps: 3
      system: "You are a support analyst."
      max_tokens: 200
"""


def plan_of(text: str) -> Plan:
    plan, problems = compile_workflow("w", Workflow.model_validate(yaml.safe_load(text)))
    assert problems == []
    return plan


def uses(*calls: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    """A model's reply asking for tools: (tool_use id, tool, input) each."""
    content = [{"type": "text", "text": "Let me look."}]
    content += [{"type": "tool_use", "id": use_id, "name": name, "input": args} for use_id, name, args in calls]
    return {"role": "assistant", "content": content, "model": "m", "stopReason": "toolUse"}


def says(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": {"type": "text", "text": text}, "model": "m", "stopReason": "endTurn"}


class Journal:
    """Drives a run and journals its inputs as the runner does, so it can be restored from any point."""

    def __init__(self, text: str = AGENT, arguments: dict[str, Any] | None = None) -> None:
        self.plan = plan_of(text)
        arguments = arguments if arguments is not None else {"order_id": "A-7"}
        self.run = Run(self.plan, arguments, "run-1")
        data = {"workflow": "w", "arguments": arguments, "caller": {}, "plan": self.plan.digest}
        self.events = [JournalEvent("run-1", 0, 0.0, "run_started", None, 0, data)]
        self.out: list[Command] = self.run.start()

    def done(self, key: str, result: Any = None, error: StepError | None = None, attempt: int = 1) -> list[Command]:
        data = {"result": result, "error": None if error is None else {"kind": error.kind, "message": error.message}}
        self.events.append(JournalEvent("run-1", len(self.events), 0.0, "step_done", key, attempt, data))
        self.out = self.run.done(key, attempt, result, error)
        return self.out

    def fire(self, key: str) -> list[Command]:
        self.events.append(JournalEvent("run-1", len(self.events), 0.0, "timer_fired", key))
        self.out = self.run.fire(key)
        return self.out


def of(kind: type, commands: list[Command]) -> list[Any]:
    return [command for command in commands if isinstance(command, kind)]


def test_a_scripted_transcript_gives_its_calls_turns_and_the_answer() -> None:
    run = Journal()
    [first] = run.out
    assert isinstance(first, AskAgent)
    assert first.key == "research#turn1"
    assert first.messages == ({"role": "user", "content": {"type": "text", "text": "Find why order A-7 was late."}},)
    assert (first.system, first.tools, first.tool_choice, first.max_tokens) == (
        "You are a support analyst.",
        ("kb__*", "orders__get_*"),
        "auto",
        200,
    )
    [call] = of(CallTool, run.done("research#turn1", uses(("u1", "orders__get_order", {"id": "A-7"}))))
    assert call == CallTool(
        "research#call1", "research", 1, "orders__get_order", {"id": "A-7"}, None, "run-1:research#call1"
    )
    [note] = of(Settled, run.done("research#call1", {"status": "late", "carrier": "DHL"}))
    assert note.describe(12) == "research: step 1 of at most 3: orders__get_order succeeded in 12 ms"
    [second] = of(AskAgent, run.out)
    assert second.key == "research#turn2"
    assert second.tool_choice == "auto"
    assert second.messages[1] == {
        "role": "assistant",
        "content": uses(("u1", "orders__get_order", {"id": "A-7"}))["content"],
    }
    assert second.messages[2] == {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "toolUseId": "u1",
                "content": [{"type": "text", "text": '{"status": "late", "carrier": "DHL"}'}],
                "structuredContent": {"status": "late", "carrier": "DHL"},
            }
        ],
    }
    [call2] = of(CallTool, run.done("research#turn2", uses(("u2", "kb__search", {"q": "DHL delays"}))))
    assert call2.key == "research#call2"
    run.done("research#call2", "A storm in Leipzig.")
    [last] = of(AskAgent, run.out)
    assert last.key == "research#turn3"
    assert last.tool_choice == "none"  # the last allowed turn: the model must answer
    assert last.messages[-1]["content"][0]["content"] == [{"type": "text", "text": "A storm in Leipzig."}]
    out = run.done("research#turn3", says("A storm held the parcel; we apologised."))
    [finished] = of(Finished, out)
    assert finished.status == "succeeded"
    assert finished.output == {
        "research": {
            "answer": "A storm held the parcel; we apologised.",
            "steps": [
                {
                    "tool": "orders__get_order",
                    "arguments": {"id": "A-7"},
                    "result": {"status": "late", "carrier": "DHL"},
                },
                {"tool": "kb__search", "arguments": {"q": "DHL delays"}, "result": "A storm in Leipzig."},
            ],
        }
    }
    settled = [note for note in of(Settled, out) if note.part is None]
    assert [(note.key, note.status) for note in settled] == [("research", "succeeded")]


def test_the_calls_of_one_turn_go_out_together_and_the_next_turn_waits_for_all() -> None:
    run = Journal()
    calls = of(CallTool, run.done("research#turn1", uses(("a", "kb__search", {}), ("b", "orders__get_x", {}))))
    assert [call.key for call in calls] == ["research#call1", "research#call2"]
    assert of(AskAgent, run.done("research#call2", "two")) == []
    [turn] = of(AskAgent, run.done("research#call1", error=StepError("timeout", "no answer")))
    results = turn.messages[-1]["content"]
    assert [r["toolUseId"] for r in results] == ["a", "b"]  # in the order the model asked, not as they came back
    assert results[0]["isError"] is True
    assert results[0]["content"] == [{"type": "text", "text": "timeout: no answer"}]
    assert run.run.status == "running"  # a failed call goes back to the model; it does not fail the step


def test_a_tool_outside_the_globs_is_refused_and_not_called() -> None:
    run = Journal()
    out = run.done("research#turn1", uses(("x", "orders__refund", {"id": "A-7"}), ("y", "kb__search", {"q": "A-7"})))
    assert [call.tool for call in of(CallTool, out)] == ["kb__search"]
    [turn] = of(AskAgent, run.done("research#call1", "nothing"))
    refused = turn.messages[-1]["content"][0]
    assert refused["toolUseId"] == "x"
    assert refused["isError"] is True
    message = "tool orders__refund is not one this step may call: kb__*, orders__get_*"
    assert refused["content"] == [{"type": "text", "text": message}]
    # Only refusals: the next turn goes out at once, nothing called.
    only = of(AskAgent, run.done("research#turn2", uses(("z", "orders__cancel", {}))))
    assert [command.key for command in only] == ["research#turn3"]
    assert of(CallTool, run.out) == []
    out = run.done("research#turn3", says("Cannot tell."))
    [finished] = of(Finished, out)
    steps = finished.output["research"]["steps"]
    assert steps[0] == {"tool": "orders__refund", "arguments": {"id": "A-7"}, "error": message}
    assert [step["tool"] for step in steps] == ["orders__refund", "kb__search", "orders__cancel"]


def test_a_tool_use_on_the_last_turn_fails_the_step() -> None:
    run = Journal(AGENT.replace("max_steps: 3", "max_steps: 1"))
    [turn] = of(AskAgent, run.out)
    assert turn.tool_choice == "none"
    [finished] = of(Finished, run.done("research#turn1", uses(("u", "kb__search", {}))))
    assert finished.status == "failed"
    assert finished.error is not None
    assert finished.error.step == "research"
    assert "last turn (max_steps: 1)" in finished.error.message


@pytest.mark.parametrize(
    "reply",
    [
        "text",
        {"role": "assistant"},
        {"role": "assistant", "content": [{"type": "tool_use", "name": "kb__x", "input": {}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "1", "name": "kb__x", "input": []}]},
        {"role": "user", "content": {"type": "text", "text": "hi"}},
    ],
)
def test_a_malformed_reply_fails_the_step(reply: Any) -> None:
    with pytest.raises(AgentReplyError):
        parse_reply(reply)
    run = Journal()
    [finished] = of(Finished, run.done("research#turn1", reply))
    assert finished.status == "failed"


def test_an_unavailable_model_fails_the_step_into_its_default() -> None:
    text = AGENT + '    on_error: {default: {answer: "unknown", steps: []}}\n'
    run = Journal(text)
    no_tools = StepError(
        "unavailable", "the client cannot let its model call tools (it has no sampling.tools capability)"
    )
    [finished] = of(Finished, run.done("research#turn1", error=no_tools))
    assert finished.output == {"research": {"answer": "unknown", "steps": []}}
    [note] = [n for n in of(Settled, run.out) if n.part is None]
    assert note.degraded
    assert note.error is not None
    assert "sampling.tools" in note.error.message


def test_a_retry_starts_the_agent_over_under_new_idempotency_keys() -> None:
    run = Journal(AGENT + "    retry: {attempts: 2, 'on': [error]}\n")
    run.done("research#turn1", uses(("u", "kb__search", {})))
    run.done("research#call1", "x")
    [timer] = of(StartTimer, run.done("research#turn2", {"role": "assistant", "content": []}))
    [again] = of(AskAgent, run.fire(timer.key))
    assert (again.key, again.attempt, len(again.messages)) == ("research#turn1", 2, 1)
    [call] = of(CallTool, run.done("research#turn1", uses(("u", "kb__search", {})), attempt=2))
    assert (call.key, call.idempotency_key) == ("research#call1", "run-1:research#call1~2")


def test_restore_mid_agent_gives_the_same_state_and_only_what_was_outstanding() -> None:
    run = Journal()
    run.done("research#turn1", uses(("a", "kb__search", {}), ("b", "orders__get_order", {"id": "A-7"})))
    run.done("research#call1", "found")
    restored, outstanding = Run.restore(run.plan, run.events)
    assert restored.snapshot() == run.run.snapshot()
    assert outstanding == run.run.outstanding()
    assert [(type(c).__name__, getattr(c, "key", "")) for c in outstanding] == [("CallTool", "research#call2")]
    # The restored run goes on as the live one would: the completed call is not made again.
    out = restored.done("research#call2", 1, {"id": "A-7"})
    assert [c.key for c in of(AskAgent, out)] == ["research#turn2"]
    assert of(CallTool, out) == []
    assert of(AskAgent, out) == of(AskAgent, run.done("research#call2", {"id": "A-7"}))


def test_cancelling_the_run_cancels_the_agents_calls_in_flight() -> None:
    run = Journal()
    run.done("research#turn1", uses(("a", "kb__search", {}), ("b", "kb__read", {})))
    out = run.run.cancel()
    assert sorted(c.key for c in of(Cancel, out)) == ["research#call1", "research#call2"]
    [finished] = of(Finished, out)
    assert finished.status == "failed"
    assert run.run.done("research#call1", 1, "late") == []  # an outcome after the cancellation is ignored


def test_the_steps_timeout_bounds_the_whole_agent() -> None:
    run = Journal(AGENT + "    timeout: 30s\n")
    [timer] = of(StartTimer, run.out)
    assert timer.key == "research#timeout1"
    run.done("research#turn1", uses(("a", "kb__search", {})))
    out = run.fire(timer.key)
    assert [c.key for c in of(Cancel, out)] == ["research#call1"]
    [finished] = of(Finished, out)
    assert finished.error is not None
    assert finished.error.kind == "timeout"


def test_the_agent_counts_against_max_concurrency_part_by_part() -> None:
    text = AGENT.replace("steps:\n", "max_concurrency: 1\nsteps:\n", 1)
    run = Journal(text)
    calls = of(CallTool, run.done("research#turn1", uses(("a", "kb__a", {}), ("b", "kb__b", {}))))
    assert [c.key for c in calls] == ["research#call1"]
    assert [c.key for c in of(CallTool, run.done("research#call1", 1))] == ["research#call2"]


def test_globs_match_case_sensitively_and_max_steps_is_required() -> None:
    assert allowed("kb__search", ["kb__*"])
    assert not allowed("KB__search", ["kb__*"])
    with pytest.raises(ValidationError, match=r"agent\.max_steps\n  Field required"):
        Workflow.model_validate(yaml.safe_load("steps: [{id: a, agent: {goal: g, tools: [x]}}]"))
    with pytest.raises(ValidationError, match="needs at least one tool glob"):
        Workflow.model_validate(yaml.safe_load("steps: [{id: a, agent: {goal: g, tools: [], max_steps: 2}}]"))


def test_each_glob_must_match_a_served_tool_other_than_the_workflow_itself() -> None:
    plan = plan_of(AGENT)
    served = {"kb__search": {"type": "object"}, "w": {"type": "object"}}
    [problem] = check_tools({"w": plan}, served)
    assert problem.path == "workflows.w.steps[0].agent.tools[1]"
    assert "'orders__get_*', which matches no tool this gateway serves" in problem.message
    assert check_tools({"w": plan}, {**served, "orders__get_order": {}}) == []


def test_an_agent_without_max_steps_is_a_config_error_at_its_location() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("workflows:\n  w:\n    steps:\n      - {id: a, agent: {goal: g, tools: [x]}}\n", environ={})
    [problem] = caught.value.problems
    assert (problem.path, problem.message) == ("workflows.w.steps[0].agent.max_steps", "Field required")


def test_an_agent_in_a_loop_body_starts_afresh_each_iteration_and_its_calls_are_keyed_by_iteration() -> None:
    journal = Journal(
        """
steps:
  - id: poll
    loop:
      steps:
        - {id: ask, agent: {goal: "Is it done? (${.iteration})", tools: ["kb__*"], max_steps: 2}}
      until: .steps.ask.result.answer == "done"
      max_iterations: 3
      output: "${.steps.ask.result}"
""",
        {},
    )
    [turn] = of(AskAgent, journal.out)
    assert turn.key == "poll[1]/ask#turn1"
    assert turn.messages[0]["content"]["text"] == "Is it done? (1)"
    [call] = of(CallTool, journal.done(turn.key, uses(("u1", "kb__find", {"q": "job"}))))
    assert call.key == "poll[1]/ask#call1"
    [turn] = of(AskAgent, journal.done(call.key, {"status": "running"}))
    journal.done(turn.key, says("not yet"))
    while not of(AskAgent, journal.out):  # the condition, evaluated by jq: its outcome comes back
        evaluations = [command for command in journal.out if type(command).__name__ == "Evaluate"]
        assert evaluations, journal.out
        for evaluation in evaluations:
            journal.out = journal.run.evaluated(evaluation.key, False)
    [turn] = of(AskAgent, journal.out)
    assert turn.key == "poll[2]/ask#turn1"  # a fresh conversation: its own turns and calls
    assert [message["role"] for message in turn.messages] == ["user"]
    assert turn.messages[0]["content"]["text"] == "Is it done? (2)"
    out = journal.done(turn.key, says("done"))
    while not of(Finished, out):
        evaluations = [command for command in out if type(command).__name__ == "Evaluate"]
        assert evaluations, out
        for evaluation in evaluations:
            out = journal.run.evaluated(evaluation.key, True)
    [finished] = of(Finished, out)
    assert finished.status == "succeeded"
    assert finished.output == {"poll": {"answer": "done", "steps": []}}
