"""What a run on Temporal needs of its client reaches the replica holding the client's request, wherever the run's
steps execute: ``ask_user`` and ``ask_model`` questions, progress notifications and cancellation. The replica
holding the request (``front``) runs none of the plan's workers, so the run and its steps execute on the other
(``back``); a real dev server, real MCP clients in-process (both eras), no fakes of Temporal."""

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext
from temporalio.client import Client as TemporalClient
from temporalio.worker import Worker

from gateway.config import parse_config
from gateway.gateway import Gateway, open_gateway
from gateway.server import McpFrontend
from gateway.types import RUN_META_KEY, CallContext, JSONObject, Principal, Tool, ToolResult
from gateway.workflows.asking import STEP_META_KEY
from gateway.workflows.commands import AskModel, AskUser, CallTool, StepError
from gateway.workflows.plan import Plan
from gateway.workflows.temporal_engine import TemporalEngine
from gateway.workflows.temporal_records import TemporalRecords
from tests import taskclient
from tests import temporal_server as dev_server
from tests.test_gateway import Toolbox
from tests.workflows.test_runner import plan_of

pytestmark = pytest.mark.anyio

temporal_server = dev_server.temporal_server  # the fixtures: pytest finds them here
temporal_client = dev_server.temporal_client
second_temporal_client = dev_server.second_temporal_client

WITHIN = 20.0
"""Seconds a test may take on a loaded machine."""
ADA = Principal("ada")
WORKFLOWS = """
workflows:
  confirm:
    steps:
      - {id: sum, call: box__add, with: {a: 1, b: 2}}
      - {id: ok, ask_user: {message: "Add ${.steps.sum.result.sum}?"}}
      - {id: colour, ask_model: {prompt: "A colour for ${.steps.sum.result.sum}", max_tokens: 5}, after: [ok]}
    output: {sum: "${.steps.sum.result.sum}", ok: "${.steps.ok.result.ok}", colour: "${.steps.colour.result}"}
  research:
    steps:
      - {id: look, agent: {goal: "Add 2 and 3.", tools: ["box__add"], max_steps: 3}}
    output: "${.steps.look.result}"
  undone:
    steps:
      - {id: one, call: box__add, with: {a: 1, b: 2}, compensate: {call: box__echo, with: {text: undo one}}}
      - {id: two, call: box__wait, after: [one]}
"""


class Box(Toolbox):
    """One replica's upstream: ``add`` and ``echo`` (recorded), and ``wait``, which answers when cancelled."""

    def __init__(self) -> None:
        super().__init__()
        wait = Tool("wait", {"name": "wait", "inputSchema": {"type": "object"}})
        self.listing = type(self.listing)(tools=(*self.listing.tools, wait), prompts=self.listing.prompts)
        self.waiting = anyio.Event()
        self.undone = anyio.Event()

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        if name == "wait":
            self.calls.append((name, arguments))
            self.waiting.set()
            await anyio.sleep_forever()
        if name == "echo":
            self.undone.set()
        return await super().call_tool(name, arguments, context)


def no_plan_workers(engine: TemporalEngine, plans: list[Plan]) -> list[Worker]:
    return []


@contextlib.asynccontextmanager
async def front_and_back(address: str) -> AsyncIterator[tuple[Gateway, Box, Gateway, Box]]:
    """Two replicas of one config: ``front`` (the client's) runs only its questions' worker, ``back`` the plans'."""
    queue = f"asks-{uuid.uuid4().hex[:8]}"
    text = f"gateway: {{name: t, engine: 'temporal://{address}', temporal: {{task_queue: {queue}}}}}\n{WORKFLOWS}"
    config = parse_config(text, environ={})
    front_box, back_box = Box(), Box()
    async with contextlib.AsyncExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(TemporalEngine, "_plan_workers", no_plan_workers)
            front = await stack.enter_async_context(open_gateway(config, providers=[front_box]))
        back = await stack.enter_async_context(open_gateway(config, providers=[back_box]))
        yield front, front_box, back, back_box


ASKED_BY: list[Any] = []
"""The step each elicitation request named (handshake era: the 2026-07-28 round trip does not carry ``_meta``)."""


async def elicitation(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
    ASKED_BY.append((params.meta or {}).get(STEP_META_KEY))
    return types.ElicitResult(action="accept", content={"ok": params.message == "Add 3?"})


async def sampling(
    context: ClientRequestContext, params: types.CreateMessageRequestParams
) -> types.CreateMessageResult:
    asked = params.messages[0].content
    assert isinstance(asked, types.TextContent)
    return types.CreateMessageResult(
        role="assistant", content=types.TextContent(type="text", text=f"blue ({asked.text})"), model="m"
    )


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_questions_of_a_run_on_another_replica_are_answered_by_the_client_whose_request_is_here(
    temporal_server: dev_server.DevServer, mode: str
) -> None:
    ASKED_BY.clear()
    with anyio.fail_after(WITHIN):
        async with (
            front_and_back(temporal_server.address) as (front, front_box, _, back_box),
            Client(
                McpFrontend(front, ADA).server,
                mode=mode,  # a 2026-07-28 client is asked through the input-required round trip
                cache=None,
                elicitation_callback=elicitation,
                sampling_callback=sampling,
            ) as client,
        ):
            result = await client.call_tool("confirm", {})
    assert not result.is_error, result.content
    assert result.structured_content == {"sum": 3, "ok": True, "colour": "blue (A colour for 3)"}
    assert ASKED_BY == (["ok"] if mode == "legacy" else [None])  # the request the local engine sends
    assert front_box.calls == []  # the step's call was made at the other replica
    assert back_box.calls == [("add", {"a": 1, "b": 2})]


async def test_progress_of_a_run_on_another_replica_reaches_the_client_as_the_local_engines_does(
    temporal_server: dev_server.DevServer,
) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    with anyio.fail_after(WITHIN):
        async with (
            front_and_back(temporal_server.address) as (front, _, _, back_box),
            Client(
                McpFrontend(front, ADA).server,
                mode="legacy",
                cache=None,
                elicitation_callback=elicitation,
                sampling_callback=sampling,
            ) as client,
        ):
            result = await client.call_tool("confirm", {}, progress_callback=on_progress)
    assert not result.is_error, result.content
    assert [(progress, total) for progress, total, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    messages = [message or "" for _, _, message in seen]
    for message, step in zip(messages, ["sum", "ok", "colour"], strict=True):
        assert message.startswith(f"{step}: succeeded in "), message
        assert message.endswith(" ms")
    assert back_box.calls == [("add", {"a": 1, "b": 2})]


async def test_cancelling_the_request_cancels_the_run_on_the_other_replica_and_compensates_it(
    temporal_server: dev_server.DevServer,
) -> None:
    with anyio.fail_after(WITHIN):
        async with front_and_back(temporal_server.address) as (front, front_box, _, back_box):
            async with anyio.create_task_group() as tg:
                tg.start_soon(front.dispatcher.call, "undone", {}, CallContext(principal=ADA))
                await back_box.waiting.wait()  # the second step's call is being made at the other replica
                tg.cancel_scope.cancel()  # the client cancelled its request
            await back_box.undone.wait()  # the first step is undone there
    assert front_box.calls == []
    assert back_box.calls == [("add", {"a": 1, "b": 2}), ("wait", {}), ("echo", {"text": "undo one"})]


# --- The engine: where the questions go. ---


class Channel:
    """A client channel of this test's own: answers elicitation with ``answer``, or never (``None``), and says when
    asked and when a question was withdrawn (its request cancelled)."""

    def __init__(self, answer: JSONObject | None) -> None:
        self.answer = answer
        self.asked = anyio.Event()
        self.withdrawn = anyio.Event()

    @property
    def capabilities(self) -> JSONObject:
        return {"elicitation": {}}

    @property
    def protocol_version(self) -> str:
        return "2025-11-25"

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        self.asked.set()
        if self.answer is None:
            try:
                await anyio.sleep_forever()
            finally:
                self.withdrawn.set()
        return {"action": "accept", "content": self.answer}

    async def log(self, params: JSONObject) -> None:
        return None


async def no_calls(
    command: CallTool | AskUser | AskModel, run_id: str, caller: dict[str, str]
) -> tuple[Any, StepError | None]:
    return {"tool": getattr(command, "tool", None)}, None


class FrontOnly(TemporalEngine):
    """An engine that asks its callers' questions but runs no plan's workers."""

    def _plan_workers(self, plans: list[Plan]) -> list[Worker]:
        return []


ASK = """
steps: [{id: ok, ask_user: {message: "Go?", default: {ok: default}}}, {id: done, call: t__done, after: [ok]}]
output: ${.steps.ok.result.ok}
"""
ADA_JSON = {"kind": "client", "id": "ada"}


@contextlib.contextmanager
def engines(
    front: TemporalClient, back: TemporalClient, plan: Plan, silence: float = 30.0
) -> Iterator[tuple[TemporalEngine, TemporalEngine]]:
    queue = f"asks-{uuid.uuid4().hex[:8]}"
    plans = {plan.name: plan}
    yield (
        FrontOnly(front, queue, plans, no_calls, heartbeat=0.1, silence=silence),
        TemporalEngine(back, queue, plans, no_calls, heartbeat=0.1, silence=silence),
    )


async def test_a_keyed_call_reissued_at_another_replica_moves_the_question_there(
    temporal_client: TemporalClient, second_temporal_client: TemporalClient
) -> None:
    plan, run_id = plan_of(ASK), uuid.uuid4().hex
    silent, answering = Channel(None), Channel({"ok": "answered at the back"})
    with anyio.fail_after(WITHIN), engines(temporal_client, second_temporal_client, plan) as (front, back):
        async with front.serve(), back.serve():
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: front.run(plan.name, {}, ADA_JSON, run_id, client=silent, attach=True))
                await silent.asked.wait()
                tg.cancel_scope.cancel()  # the caller gave up at the front (a keyed run goes on)
            result = await back.run(plan.name, {}, ADA_JSON, run_id, client=answering, attach=True)
            await silent.withdrawn.wait()  # the question at the front was withdrawn
        records = TemporalRecords(second_temporal_client, back.task_queue, {plan.name: plan})
        steps = {event.key: event for event in await records.events(run_id) if event.kind == "step_settled"}
        asked = [(event.kind, event.attempt) for event in await records.events(run_id) if event.key == "ok"]
    assert result["status"] == "succeeded"
    assert result["output"] == "answered at the back"
    # `patchbay runs RUN_ID`: the question is one try, asked at the front, then at the back, where it was answered.
    assert asked == [("step_started", 1), ("step_done", 1), ("step_settled", 1)]
    assert steps["ok"].data["result"] == {"ok": "answered at the back"}
    assert steps["done"].data["status"] == "succeeded"


@pytest.mark.parametrize("default", [True, False])
async def test_a_question_nobody_takes_because_the_callers_replica_is_gone_takes_its_default_or_fails(
    temporal_client: TemporalClient, second_temporal_client: TemporalClient, default: bool
) -> None:
    plan, run_id = plan_of(ASK if default else ASK.replace(", default: {ok: default}", "")), uuid.uuid4().hex
    with anyio.fail_after(WITHIN), engines(temporal_client, second_temporal_client, plan, silence=1.0) as (front, back):
        async with back.serve():  # the front started the run and is gone: nobody polls its queue
            await front.start(plan.name, {}, ADA_JSON, run_id)
            result = await back.result(run_id)
    if default:
        assert result["status"] == "succeeded"
        assert result["output"] == "default"
    else:
        assert result["status"] == "failed"
        assert result["error"]["kind"] == "unavailable"
        assert "did not take the question" in result["error"]["message"]


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_question_of_a_task_goes_to_the_client_that_started_it_which_cannot_answer_once_its_call_returned(
    temporal_server: dev_server.DevServer, mode: str
) -> None:
    """As for a local run started as a task: the question is put to the client whose call started the task (at
    the replica holding it), not left waiting for a caller that never comes; that call has returned (the task
    was created), so the client cannot be asked, and the step fails saying so (or takes its default)."""
    with anyio.fail_after(WITHIN):
        async with (
            front_and_back(temporal_server.address) as (front, front_box, _, back_box),
            taskclient.client(
                McpFrontend(front, ADA), mode, elicitation_callback=elicitation, sampling_callback=sampling
            ) as client,
        ):
            task = await taskclient.start_task(client, "confirm", {}, ttl=60000)
            while (polled := await taskclient.rpc(client, "tasks/get", taskId=task["taskId"]))["status"] == "working":  # noqa: ASYNC110
                await anyio.sleep(0.05)  # polling is how a client learns a task ended
            if mode == "legacy":
                result = await taskclient.rpc(client, "tasks/result", taskId=task["taskId"])
            else:
                result = polled["result"]  # the extension inlines it
    assert result["isError"] is True
    text = result["content"][0]["text"]
    assert "step 'ok' failed (unavailable)" in text
    assert "back-channel" in text if mode == "legacy" else "elicitation/create cannot reach" in text
    assert front_box.calls == []  # the step's call was made at the other replica
    assert back_box.calls == [("add", {"a": 1, "b": 2})]


AGENT_ASKED: list[types.CreateMessageRequestParams] = []


async def agent_model(
    context: ClientRequestContext, params: types.CreateMessageRequestParams
) -> types.CreateMessageResultWithTools:
    """Call box__add (and box__echo, which the step may not call), then answer with the sum."""
    AGENT_ASKED.append(params)
    if len(params.messages) == 1:
        content: list[Any] = [
            types.ToolUseContent(type="tool_use", id="a", name="box__add", input={"a": 2, "b": 3}),
            types.ToolUseContent(type="tool_use", id="e", name="box__echo", input={"text": "hi"}),
        ]
    else:
        results = params.messages[-1].content
        assert isinstance(results, list)
        first = results[0]
        assert isinstance(first, types.ToolResultContent)
        assert first.structured_content is not None
        content = [types.TextContent(type="text", text=f"the sum is {first.structured_content['sum']}")]
    return types.CreateMessageResultWithTools(role="assistant", content=content, model="m")


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_an_agent_step_runs_on_temporal_asking_the_client_here_and_calling_tools_there(
    temporal_server: dev_server.DevServer, mode: str
) -> None:
    AGENT_ASKED.clear()
    tools = types.SamplingCapability(tools=types.SamplingToolsCapability())
    with anyio.fail_after(WITHIN):
        async with (
            front_and_back(temporal_server.address) as (front, front_box, _, back_box),
            Client(
                McpFrontend(front, ADA).server,
                mode=mode,
                cache=None,
                sampling_callback=agent_model,
                sampling_capabilities=tools,
            ) as client,
        ):
            result = await client.call_tool("research", {})
            assert result.meta is not None
            read = await client.read_resource(f"patchbay://runs/{result.meta[RUN_META_KEY]}")
    [content] = read.contents
    assert isinstance(content, types.TextResourceContents)
    view = json.loads(content.text)  # read back from Temporal: the turns and the call as a local run shows them
    assert [(step["key"], step.get("tool") or step.get("kind"), step["status"]) for step in view["steps"]] == [
        ("look", None, "succeeded"),
        ("look#turn1", "agent", "succeeded"),
        ("look#call1", "box__add", "succeeded"),
        ("look#turn2", "agent", "succeeded"),
    ]
    assert view["note"] is None
    assert not result.is_error, result.content
    assert result.structured_content == {
        "answer": "the sum is 5",
        "steps": [
            {"tool": "box__add", "arguments": {"a": 2, "b": 3}, "result": {"sum": 5}},
            {
                "tool": "box__echo",
                "arguments": {"text": "hi"},
                "error": "tool box__echo is not one this step may call: box__add",
            },
        ],
    }
    assert [tool.name for tool in AGENT_ASKED[0].tools or []] == ["box__add"]
    assert front_box.calls == []  # the tool was called at the replica running the plan, and only the allowed one
    assert back_box.calls == [("add", {"a": 2, "b": 3})]
