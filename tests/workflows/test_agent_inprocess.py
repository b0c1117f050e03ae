"""The ``agent`` step through a real gateway: the SDK's in-memory client plays a scripted model over MCP sampling
with tools, in both eras; the tools are a real upstream's, called through the dispatch path."""

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.client.session import ClientRequestContext
from mcp.server.mcpserver import MCPServer
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import parse_config
from gateway.dispatch import Invocation
from gateway.gateway import open_gateway
from gateway.server import McpFrontend
from gateway.store.memory import MemoryStore
from gateway.types import CallContext, JSONObject, Principal
from gateway.workflows.model import Workflow
from gateway.workflows.plan import compile_workflow
from gateway.workflows.runner import Runner
from tests.inprocess import WITHIN, frontend_client, serve_asgi

pytestmark = pytest.mark.anyio

ERAS = ["legacy", "2026-07-28"]
TOOLS = types.SamplingCapability(tools=types.SamplingToolsCapability())

WORKFLOW = """
workflows:
  late_order:
    input: {type: object, properties: {order_id: {type: string}}, required: [order_id]}
    steps:
      - id: research
        agent:
          goal: "Find why order ${.input.order_id} was late."
          tools: ["shop__search", "shop__get_*"]
          max_steps: 4
          system: "You are a support analyst."
%s
    output: "${.steps.research.result}"
"""


class Shop:
    """The upstream: its tools count their calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.server = MCPServer("shop")

        @self.server.tool()
        def get_order(id: str) -> dict[str, str]:
            """An order by id."""
            self.calls["get_order"] = self.calls.get("get_order", 0) + 1
            return {"id": id, "status": "late", "carrier": "DHL"}

        @self.server.tool()
        def search(q: str) -> str:
            """Search the knowledge base."""
            self.calls["search"] = self.calls.get("search", 0) + 1
            return f"storm in Leipzig ({q})"

        @self.server.tool()
        def refund(id: str) -> str:
            """Refund an order."""
            self.calls["refund"] = self.calls.get("refund", 0) + 1
            return "refunded"


@contextlib.asynccontextmanager
async def shop_front(shop: Shop, on_error: str = "", policies: str = "") -> AsyncIterator[McpFrontend]:
    """A frontend (caller ``ada``) of a gateway serving ``shop`` and the workflow (its step's ``on_error`` line)."""
    app = shop.server.streamable_http_app(host="127.0.0.1")
    with anyio.fail_after(WITHIN):
        async with serve_asgi(app) as base:
            config = f'servers:\n  shop: {{url: "{base}/mcp"}}\n' + WORKFLOW % on_error
            if policies:
                config += f"policies:\n{policies}\n"
            async with open_gateway(parse_config(config, environ={})) as gateway:
                yield McpFrontend(gateway, Principal("ada"))


class Model:
    """A scripted ReAct model: get the order (and try a refund it may not make), search, then answer."""

    def __init__(self) -> None:
        self.asked: list[types.CreateMessageRequestParams] = []

    async def __call__(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResultWithTools:
        self.asked.append(params)
        turn = len(self.asked)
        if turn == 1:
            content: list[Any] = [
                types.ToolUseContent(type="tool_use", id="u1", name="shop__get_order", input={"id": "A-7"}),
                types.ToolUseContent(type="tool_use", id="u2", name="shop__refund", input={"id": "A-7"}),
            ]
        elif turn == 2:
            content = [types.ToolUseContent(type="tool_use", id="u3", name="shop__search", input={"q": "DHL"})]
        else:
            content = [types.TextContent(type="text", text="A storm held the parcel.")]
        stop = "endTurn" if turn > 2 else "toolUse"
        return types.CreateMessageResultWithTools(role="assistant", content=content, model="scripted", stop_reason=stop)


def tool_calls(front: McpFrontend) -> dict[tuple[str, str], float]:
    """``patchbay_tool_calls_total`` as scraped: the count of each (tool, outcome) dispatched."""
    body, _ = front.gateway.metrics.render()
    return {
        (sample.labels["tool"], sample.labels["outcome"]): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "patchbay_tool_calls_total" and sample.value
    }


def results_of(params: types.CreateMessageRequestParams) -> list[dict[str, Any]]:
    """The tool_result blocks of the request's last message, as JSON."""
    last = params.messages[-1].model_dump(by_alias=True, mode="json", exclude_none=True)
    content = last["content"]
    return content if isinstance(content, list) else [content]


@pytest.mark.parametrize("mode", ERAS)
async def test_two_tool_uses_then_an_answer_and_a_tool_outside_the_list_is_not_called(mode: str) -> None:
    shop, model = Shop(), Model()
    progress: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async with (
        shop_front(shop) as fe,
        frontend_client(fe, mode, sampling_callback=model, sampling_capabilities=TOOLS) as client,
    ):
        with anyio.fail_after(WITHIN):
            result = await client.call_tool("late_order", {"order_id": "A-7"}, progress_callback=on_progress)
        dispatched = tool_calls(fe)
    assert not result.is_error, result
    # Each call the agent made went through the dispatch path once; the refused one never reached it.
    # (The workflow's own call counts once per round trip for a 2026-07-28 client: left out.)
    del dispatched["late_order", "ok"]
    assert dispatched == {("shop__get_order", "ok"): 1.0, ("shop__search", "ok"): 1.0}
    assert result.structured_content == {
        "answer": "A storm held the parcel.",
        "steps": [
            {
                "tool": "shop__get_order",
                "arguments": {"id": "A-7"},
                "result": {"id": "A-7", "status": "late", "carrier": "DHL"},
            },
            {
                "tool": "shop__refund",
                "arguments": {"id": "A-7"},
                "error": "tool shop__refund is not one this step may call: shop__search, shop__get_*",
            },
            {"tool": "shop__search", "arguments": {"q": "DHL"}, "result": {"result": "storm in Leipzig (DHL)"}},
        ],
    }
    assert shop.calls == {"get_order": 1, "search": 1}  # the refund was refused, never called
    first, second, third = model.asked
    assert first.system_prompt == "You are a support analyst."
    assert [m.content.text for m in first.messages] == ["Find why order A-7 was late."]  # type: ignore[union-attr]
    assert sorted(tool.name for tool in first.tools or []) == ["shop__get_order", "shop__search"]
    assert first.tools is not None
    assert first.tools[0].input_schema["type"] == "object"
    assert first.tool_choice is not None
    assert first.tool_choice.mode == "auto"
    assert third.tool_choice is not None
    assert third.tool_choice.mode == "auto"
    answered = results_of(second)
    assert [(block["toolUseId"], block.get("isError", False)) for block in answered] == [("u1", False), ("u2", True)]
    assert json.loads(answered[0]["content"][0]["text"]) == {"id": "A-7", "status": "late", "carrier": "DHL"}
    assert [m.role for m in third.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert "research: step 1 of at most 4: shop__get_order succeeded in" in "\n".join(progress)
    assert "research: step 2 of at most 4: shop__search succeeded in" in "\n".join(progress)
    assert progress[-1].startswith("research: succeeded in")


@pytest.mark.parametrize("mode", ERAS)
async def test_a_client_without_sampling_tools_gets_a_clear_error_or_the_default(mode: str) -> None:
    shop, model = Shop(), Model()
    async with shop_front(shop) as fe, frontend_client(fe, mode, sampling_callback=model) as client:
        with anyio.fail_after(WITHIN):
            result = await client.call_tool("late_order", {"order_id": "A-7"})
    assert result.is_error
    text = result.content[0].text  # type: ignore[union-attr]
    assert "step 'research' failed (unavailable)" in text
    assert "no sampling.tools capability" in text
    assert model.asked == []
    on_error = '        on_error: {default: {answer: "unknown", steps: []}}'
    async with shop_front(shop, on_error) as fe, frontend_client(fe, mode, sampling_callback=model) as client:
        with anyio.fail_after(WITHIN):
            result = await client.call_tool("late_order", {"order_id": "A-7"})
    assert result.structured_content == {"answer": "unknown", "steps": []}
    assert shop.calls == {}


async def test_the_tools_offered_are_only_those_the_caller_may_call() -> None:
    shop, model = Shop(), Model()
    deny = '  - {deny: "shop__search", reason: "searching is off today"}'
    async with (
        shop_front(shop, policies=deny) as fe,
        frontend_client(fe, "legacy", sampling_callback=model, sampling_capabilities=TOOLS) as client,
    ):
        with anyio.fail_after(WITHIN):
            result = await client.call_tool("late_order", {"order_id": "A-7"})
    assert [tool.name for tool in model.asked[0].tools or []] == ["shop__get_order"]
    # Asked for anyway, the denied tool is refused on the dispatch path: the model hears why, nothing is called.
    assert shop.calls == {"get_order": 1}
    assert result.structured_content is not None
    searched = result.structured_content["steps"][2]
    assert searched["tool"] == "shop__search"
    assert searched["error"].startswith("denied: ")
    [refusal] = [block for block in results_of(model.asked[2]) if block["toolUseId"] == "u3"]
    assert refusal["isError"] is True


class _SlowTools:
    """A call function whose tool waits until cancelled, recording that it was."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.cancelled = False

    async def __call__(self, tool: str, arguments: JSONObject, context: CallContext) -> Invocation:
        self.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.cancelled = True
        raise AssertionError("unreachable")


class _AsksForSlow:
    capabilities: JSONObject = {"sampling": {"tools": {}}}
    protocol_version = "2025-11-25"

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        use = {"type": "tool_use", "id": "1", "name": "kb__slow", "input": {}}
        return {"role": "assistant", "content": [use], "model": "m"}

    async def log(self, params: JSONObject) -> None:
        return None


async def test_cancelling_the_caller_cancels_the_agents_call_in_flight() -> None:
    step = {"id": "a", "agent": {"goal": "g", "tools": ["kb__*"], "max_steps": 2}}
    plan, problems = compile_workflow("w", Workflow.model_validate({"steps": [step]}))
    assert problems == []
    tools = _SlowTools()
    context = CallContext(principal=Principal("ada"), client=_AsksForSlow())
    with anyio.fail_after(WITHIN):
        async with anyio.create_task_group() as tg:
            tg.start_soon(Runner(tools, MemoryStore()).run, plan, {}, context)
            await tools.started.wait()
            tg.cancel_scope.cancel()
    assert tools.cancelled
