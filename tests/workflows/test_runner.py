"""The runner and the workflow provider in-process: a fake tool behind the call function, real anyio."""

from collections.abc import Mapping
from typing import Any

import anyio
import pytest
import yaml

from gateway.dispatch import Invocation
from gateway.errors import InvalidArguments, ToolNotFound, UpstreamTimeout
from gateway.store.memory import MemoryStore
from gateway.types import CallContext, JSONObject, Principal, ToolResult
from gateway.workflows import _jqsafe
from gateway.workflows.model import Workflow
from gateway.workflows.plan import Plan, compile_workflow
from gateway.workflows.provider import WorkflowProvider
from gateway.workflows.runner import RUN_META_KEY, Runner, result_value

pytestmark = pytest.mark.anyio

CALLER = CallContext(principal=Principal("tester"))


def plan_of(text: str, name: str = "w") -> Plan:
    plan, problems = compile_workflow(name, Workflow.model_validate(yaml.safe_load(text)))
    assert problems == []
    return plan


class Tools:
    """Fake tools: each call is recorded; ``slow`` waits until cancelled, ``boom`` fails, ``late`` times out."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.cancelled: list[str] = []
        self.started = anyio.Event()

    async def __call__(self, tool: str, arguments: JSONObject, context: CallContext) -> Invocation:
        self.calls.append((tool, dict(arguments)))
        if tool == "slow":
            self.started.set()
            try:
                await anyio.sleep_forever()
            finally:
                self.cancelled.append(tool)
        if tool == "boom":
            return Invocation(ToolResult.text("it broke", is_error=True), "error")
        if tool == "late":
            return Invocation(ToolResult.text(str(UpstreamTimeout("no answer")), is_error=True), "timeout")
        if tool == "limited" and sum(called == "limited" for called, _ in self.calls) == 1:
            return Invocation(ToolResult.text("retry after 0.01 s", is_error=True), "rate_limited", 0.01)
        if tool == "asks":
            return Invocation(ToolResult(content=(), input_required={"resultType": "input_required"}), "ok")
        return Invocation(ToolResult.text(f'{{"tool": "{tool}", "args": {len(arguments)}}}'), "ok")


def test_a_result_is_its_structured_content_else_its_text_as_json_else_the_text() -> None:
    assert result_value(ToolResult((), structured_content={"a": 1})) == {"a": 1}
    assert result_value(ToolResult.text('{"b": 2}')) == {"b": 2}
    assert result_value(ToolResult.text("plain words")) == "plain words"
    assert result_value(ToolResult.text(" [1, true]")) == [1, True]
    assert [result_value(ToolResult.text(t)) for t in ("-3", "null", "nothing", "{not json", "")] == [
        -3,
        None,
        "nothing",
        "{not json",
        "",
    ]
    image = {"type": "image", "data": "AA==", "mimeType": "image/png"}
    assert result_value(ToolResult((image,))) == [image]


async def test_a_run_reports_progress_per_settled_step_and_journals_every_event() -> None:
    tools, journal = Tools(), MemoryStore()
    seen: list[tuple[float, str | None]] = []
    totals: set[float | None] = set()

    async def progress(done: float, total: float | None, message: str | None) -> None:
        seen.append((done, message))
        totals.add(total)

    context = CallContext(principal=Principal("tester"), progress=progress)
    plan = plan_of("steps: [{id: a, call: t__a, with: {x: 1}}, {id: b, set: {y: '${.steps.a.result.tool}'}}]")
    result = await Runner(tools, journal).run(plan, {}, context)

    assert result.structured_content == {"a": {"tool": "t__a", "args": 1}, "b": {"y": "t__a"}}
    assert [done for done, _ in seen] == [1, 2]
    assert totals == {2}
    assert seen[1][1] == "b: succeeded"
    assert result.meta is not None
    run_id = result.meta[RUN_META_KEY]
    events = await journal.events(run_id)
    assert [(e.kind, e.key) for e in events] == [
        ("run_started", None),
        ("step_started", "a"),
        ("step_done", "a"),  # the input: journaled before what it leads to
        ("step_settled", "a"),
        ("step_settled", "b"),
        ("run_finished", None),
    ]
    assert events[0].data["caller"] == {"kind": "client", "id": "tester"}
    assert events[0].data["plan"] == plan.digest
    assert events[1].data["arguments"] == {"x": 1}
    assert events[2].data["result"] == {"tool": "t__a", "args": 1}
    assert [e.seq for e in events] == [0, 1, 2, 3, 4, 5]
    [summary] = await journal.runs()
    assert (summary.run_id, summary.workflow, summary.status, summary.steps) == (run_id, "w", "succeeded", 2)


async def test_a_step_past_its_timeout_fails_with_kind_timeout() -> None:
    tools = Tools()
    plan = plan_of("steps: [{id: a, call: slow, timeout: 50ms}]")
    with anyio.fail_after(5):
        result = await Runner(tools, MemoryStore()).run(plan, {}, CALLER)
    assert result.is_error
    assert "step 'a' failed (timeout)" in result.content[0]["text"]
    assert tools.cancelled == ["slow"]


async def test_the_outcome_of_a_refused_call_is_the_steps_kind_of_failure_and_can_be_retried() -> None:
    tools = Tools()
    plan = plan_of("steps: [{id: a, call: late, retry: {attempts: 2, backoff: 1ms}}]")
    result = await Runner(tools, MemoryStore()).run(plan, {}, CALLER)
    assert result.is_error
    assert "(timeout)" in result.content[0]["text"]
    assert [tool for tool, _ in tools.calls] == ["late", "late"]


async def test_a_call_refused_before_it_reached_the_tool_is_made_again_after_the_hinted_wait() -> None:
    tools = Tools()
    plan = plan_of("steps: [{id: a, call: limited}]")
    with anyio.fail_after(5):
        result = await Runner(tools, MemoryStore()).run(plan, {}, CALLER)
    assert not result.is_error, result.content
    assert [tool for tool, _ in tools.calls] == ["limited", "limited"]


async def test_a_failed_step_cancels_its_siblings_in_flight_and_compensates_the_finished_ones() -> None:
    tools = Tools()
    plan = plan_of("""
steps:
  - {id: a, call: t__a, compensate: {call: undo__a}}
  - {id: wait, call: slow, after: [a]}
  - {id: fails, call: boom, after: [a]}
""")
    with anyio.fail_after(5):
        result = await Runner(tools, MemoryStore()).run(plan, {}, CALLER)
    assert result.is_error
    assert "step 'fails' failed (error): it broke" in result.content[0]["text"]
    assert tools.cancelled == ["slow"]
    assert tools.calls[-1] == ("undo__a", {})


async def test_a_chain_runs_its_steps_one_after_another_in_order() -> None:
    tools = Tools()
    steps = [{"id": f"s{i}", "call": f"t__{i}", "after": [f"s{i - 1}"] if i else []} for i in range(20)]
    plan = plan_of(yaml.safe_dump({"steps": steps, "output": "${.steps.s19.result.tool}"}))
    result = await Runner(tools, MemoryStore()).run(plan, {}, CALLER)
    assert result.content[0]["text"] == "t__19"
    assert [tool for tool, _ in tools.calls] == [f"t__{i}" for i in range(20)]


async def test_cancelling_the_caller_cancels_the_steps_and_runs_the_compensations() -> None:
    tools = Tools()
    plan = plan_of("""
steps:
  - {id: a, call: t__a, compensate: {call: undo__a, with: {of: "${.steps.a.result.tool}"}}}
  - {id: b, call: slow, after: [a]}
""")
    journal = MemoryStore()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(Runner(tools, journal).run, plan, {}, CALLER)
            await tools.started.wait()
            tg.cancel_scope.cancel()
    assert tools.cancelled == ["slow"]
    assert tools.calls[-1] == ("undo__a", {"of": "t__a"})
    [summary] = await journal.runs()
    assert summary.status == "cancelled"


async def test_an_upstream_asking_for_input_mid_step_fails_the_step() -> None:
    result = await Runner(Tools(), MemoryStore()).run(plan_of("steps: [{id: a, call: asks}]"), {}, CALLER)
    assert result.is_error
    assert "asked for input" in result.content[0]["text"]


async def test_ask_steps_without_a_client_take_their_default_or_fail() -> None:
    plan = plan_of("""
steps:
  - {id: ok, ask_user: {message: "Go?", default: {ok: true}}}
  - {id: text, ask_model: {prompt: "Write"}}
""")
    result = await Runner(Tools(), MemoryStore()).run(plan, {}, CALLER)
    assert result.is_error
    assert "step 'text' failed (unavailable)" in result.content[0]["text"]


class _Client:
    def __init__(self, answer: Mapping[str, Any], protocol_version: str = "2025-11-25") -> None:
        self.answer = answer
        self.asked: list[tuple[str, Mapping[str, Any]]] = []
        self._version = protocol_version

    @property
    def capabilities(self) -> JSONObject:
        return {"elicitation": {}, "sampling": {}}

    @property
    def protocol_version(self) -> str:
        return self._version

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        self.asked.append((method, params))
        return self.answer

    async def log(self, params: JSONObject) -> None:
        pass


async def test_a_declined_question_fails_the_step_unless_it_has_a_default() -> None:
    client = _Client({"action": "decline"})
    context = CallContext(principal=Principal("tester"), client=client)
    plan = plan_of("steps: [{id: ok, ask_user: {message: 'Refund ${.input.id}?'}}]")
    result = await Runner(Tools(), MemoryStore()).run(plan, {"id": "A-1"}, context)
    assert result.is_error
    assert "failed (denied)" in result.content[0]["text"]
    method, params = client.asked[0]
    assert method == "elicitation/create"
    assert params["message"] == "Refund A-1?"
    assert params["requestedSchema"]["required"] == ["ok"]
    with_default = plan_of("steps: [{id: ok, ask_user: {message: 'Refund?', default: {ok: true}}}]")
    result = await Runner(Tools(), MemoryStore()).run(with_default, {}, context)
    assert result.structured_content == {"ok": {"ok": True}}


async def test_the_models_answer_is_the_text_of_its_content() -> None:
    client = _Client({"role": "assistant", "content": {"type": "text", "text": "Dear Ada"}, "model": "m"})
    context = CallContext(principal=Principal("tester"), client=client)
    plan = plan_of("steps: [{id: d, ask_model: {prompt: p, system: s, max_tokens: 9}}]")
    result = await Runner(Tools(), MemoryStore()).run(plan, {}, context)
    assert result.structured_content == {"d": "Dear Ada"}
    assert client.asked[0][1]["systemPrompt"] == "s"
    assert client.asked[0][1]["maxTokens"] == 9


async def test_the_provider_validates_arguments_before_anything_runs() -> None:
    tools = Tools()
    plan = plan_of("input: {type: object, properties: {n: {type: integer}}, required: [n]}\nsteps: [{id: a, call: t}]")
    provider = WorkflowProvider({"w": plan}, Runner(tools, MemoryStore()))
    with pytest.raises(InvalidArguments, match=r"\$\.n: 'x' is not of type 'integer'"):
        await provider.call_tool("w", {"n": "x"}, CALLER)
    with pytest.raises(ToolNotFound):
        await provider.call_tool("nope", {}, CALLER)
    assert tools.calls == []
    [tool] = await provider.list_tools()
    assert tool.input_schema["required"] == ["n"]


async def test_an_output_that_does_not_match_the_output_schema_is_an_error() -> None:
    plan = plan_of("""
output_schema: {type: object, properties: {n: {type: integer}}, required: [n]}
steps: [{id: a, set: {v: 1}}]
output: {n: "${.steps.a.result.v | tostring}"}
""")
    provider = WorkflowProvider({"w": plan}, Runner(Tools(), MemoryStore()))
    [tool] = await provider.list_tools()
    assert tool.output_schema == plan.workflow.output_schema
    result = await provider.call_tool("w", {}, CALLER)
    assert result.is_error
    assert "does not match its output_schema" in result.content[0]["text"]


ASKING = """
input: {type: object}
steps:
  - {id: ok, ask_user: {message: "Refund?"}}
  - {id: how, ask_model: {prompt: "How?"}}
  - {id: done, call: t__done, with: {ok: "${.steps.ok.result.ok}", how: "${.steps.how.result}"}}
output: {ok: "${.steps.ok.result.ok}", how: "${.steps.how.result}"}
"""


async def test_a_2026_client_is_asked_through_the_input_required_round_trip() -> None:
    tools = Tools()
    client = _Client({}, protocol_version="2026-07-28")
    context = CallContext(principal=Principal("tester"), client=client)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as background:
            provider = WorkflowProvider({"w": plan_of(ASKING)}, Runner(tools, MemoryStore()), lambda: background)
            first = await provider.call_tool("w", {}, context)
            assert first.input_required is not None
            state = first.input_required["requestState"]
            asked = first.input_required["inputRequests"]
            assert {r["method"] for r in asked.values()} == {"elicitation/create", "sampling/createMessage"}
            assert client.asked == []  # nothing went over a back channel
            answers = {
                key: {"action": "accept", "content": {"ok": True}}
                if request["method"] == "elicitation/create"
                else {"role": "assistant", "content": {"type": "text", "text": "kindly"}, "model": "m"}
                for key, request in asked.items()
            }
            retry = CallContext(
                principal=Principal("tester"), client=client, input_responses=answers, request_state=state
            )
            done = await provider.call_tool("w", {}, retry)
            assert done.structured_content == {"ok": True, "how": "kindly"}
            assert tools.calls == [("t__done", {"ok": True, "how": "kindly"})]
            again = await provider.call_tool("w", {}, retry)
            assert again.is_error
            assert "no longer waiting" in again.content[0]["text"]


async def test_unanswered_questions_are_asked_again() -> None:
    client = _Client({}, protocol_version="2026-07-28")
    context = CallContext(principal=Principal("tester"), client=client)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as background:
            provider = WorkflowProvider({"w": plan_of(ASKING)}, Runner(Tools(), MemoryStore()), lambda: background)
            first = await provider.call_tool("w", {}, context)
            assert first.input_required is not None
            state = first.input_required["requestState"]
            retry = CallContext(principal=Principal("tester"), client=client, input_responses={}, request_state=state)
            second = await provider.call_tool("w", {}, retry)
            assert second.input_required is not None
            assert second.input_required["inputRequests"] == first.input_required["inputRequests"]
            background.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("steps", "total"),
    [
        (
            "[{id: a, set: {}}, {id: s, switch: [{when: 'true', steps: [{id: x, set: {}}]}],"
            " default: [{id: y, set: {}}]}]",
            4,
        ),
        ("[{id: l, for_each: '${[1, 2]}', steps: [{id: x, set: {}}]}]", None),
        ("[{id: a, call: t, on_error: [{id: b, call: u}]}]", None),
        ("[{id: a, call: t, retry: {attempts: 2}}]", 1),
        ("[{id: l, loop: {steps: [{id: x, set: {}}], until: 'true', max_iterations: 3}}]", None),
    ],
)
def test_the_progress_total_is_known_when_every_step_settles_once(steps: str, total: int | None) -> None:
    assert plan_of(f"steps: {steps}").total_steps == total


async def test_a_runaway_jq_program_does_not_hold_up_another_run_on_the_event_loop() -> None:
    tools, journal = Tools(), MemoryStore()
    runner = Runner(tools, journal)
    runaway = plan_of("steps: [{id: big, set: {n: '${last(range(1e12))}'}}]")
    quick = plan_of("steps: [{id: echo, call: t__echo}]", name="quick")
    finished: list[str] = []

    async def run_away() -> None:
        result = await runner.run(runaway, {}, CALLER)
        assert result.is_error
        assert "jq evaluation exceeded" in result.content[0]["text"]  # it did run, for the whole time limit
        finished.append("runaway")

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_away)
        await anyio.wait_all_tasks_blocked()  # the runaway run waits for its program's answer
        began = anyio.current_time()
        result = await runner.run(quick, {}, CALLER)
        took = anyio.current_time() - began
        finished.append("quick")

    assert not result.is_error
    assert finished == ["quick", "runaway"]
    assert took < _jqsafe.TIME_LIMIT / 2  # in fact a few ms; before, the whole second the program ran


class Polled(Tools):
    """``status`` answers ``{n}``, its number of calls so far; the other tools as ``Tools``."""

    async def __call__(self, tool: str, arguments: JSONObject, context: CallContext) -> Invocation:
        if tool != "status":
            return await super().__call__(tool, arguments, context)
        self.calls.append((tool, dict(arguments)))
        n = sum(called == "status" for called, _ in self.calls)
        return Invocation(ToolResult((), structured_content={"n": n}), "ok")


async def test_a_loop_reports_each_iteration_as_progress_and_waits_its_delays_between_them() -> None:
    tools, journal = Polled(), MemoryStore()
    seen: list[tuple[float, str | None]] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        seen.append((done, message))

    plan = plan_of("""
steps:
  - id: poll
    loop:
      steps: [{id: s, call: status, with: {iteration: "${.iteration}"}}]
      until: .steps.s.result.n >= 3
      max_iterations: 5
      delay: 30ms
      backoff: 2
""")
    began = anyio.current_time()
    result = await Runner(tools, journal).run(plan, {}, CallContext(principal=Principal("tester"), progress=progress))
    assert anyio.current_time() - began >= 0.09  # 30 ms, then 60 ms

    assert result.structured_content == {"poll": {"n": 3}}
    assert [arguments for _, arguments in tools.calls] == [{"iteration": 1}, {"iteration": 2}, {"iteration": 3}]
    assert [message for _, message in seen if message and ": iteration" in message] == [
        "poll: iteration 1 of at most 5, the condition does not hold yet",
        "poll: iteration 2 of at most 5, the condition does not hold yet",
        "poll: iteration 3 of at most 5, the condition holds",
    ]
    assert [done for done, _ in seen] == list(range(1, len(seen) + 1))  # one count, steps and iterations
    assert result.meta is not None
    events = await journal.events(result.meta[RUN_META_KEY])
    assert [e.key for e in events if e.kind == "timer_fired"] == ["poll#delay", "poll#delay"]


async def test_a_cancelled_run_stops_a_loop_during_its_delay_at_once() -> None:
    tools, journal = Polled(), MemoryStore()
    plan = plan_of("""
steps:
  - id: poll
    loop: {steps: [{id: s, call: status}], until: .steps.s.result.n > 9, max_iterations: 5, delay: 1h}
""")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(Runner(tools, journal).run, plan, {}, CALLER)
            while not tools.calls:  # noqa: ASYNC110 - the first iteration has run; its delay begins
                await anyio.sleep(0.001)
            await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    [record] = await journal.runs()
    assert record.status == "cancelled"
    assert len(tools.calls) == 1
