"""The composition root in-process: providers through their protocol only, the registry, readiness, the call path.

``Toolbox`` is a provider kind that exists only in this file (a few tools answered in-process); the
gateway serves it beside what the config builds without any change to ``gateway/gateway.py``, and
``patchbay serve``'s own code path (``gateway.app.serving``, ``gateway.cli.main``) serves it too.
"""

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx2
import mcp_types as types
import pytest
from mcp import Client

from connectors.mcp import McpUpstream
from gateway.app import readiness, serving
from gateway.cli import main
from gateway.config import Config, HttpServer, UpstreamConfig, parse_config
from gateway.dispatch import CallPath
from gateway.errors import ConfigError, ConfigProblem, UpstreamError, UpstreamUnavailable
from gateway.gateway import PROVIDER_KINDS, Gateway, open_gateway
from gateway.types import (
    CallContext,
    JSONObject,
    Listing,
    Principal,
    Prompt,
    Provider,
    ProviderEvents,
    ProviderState,
    Tool,
    ToolResult,
)
from gateway.workflows.provider import WORKFLOW_PROVIDER
from policies.fallback import META_KEY as FALLBACK_META_KEY
from policies.state import MemoryLimitState
from tests.inprocess import serve_asgi
from tests.support import free_port

pytestmark = pytest.mark.anyio

CALLER = CallContext(principal=Principal("alice"))
NUMBERS = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}
TEXT = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


class Toolbox:
    """A provider of a kind only this file knows: ``add`` and ``echo`` answered in-process, one prompt."""

    def __init__(self, name: str = "box", *, up: bool = True) -> None:
        self.name = name
        self.state = ProviderState.UP if up else ProviderState.DOWN
        self.last_error: str | None = None if up else "switched off"
        self.warnings: tuple[str, ...] = ()
        self.problems: tuple[ConfigProblem, ...] = ()
        self.listing = Listing(
            tools=(
                Tool("add", {"name": "add", "description": "Add two numbers.", "inputSchema": NUMBERS}),
                Tool("echo", {"name": "echo", "inputSchema": TEXT}),
            ),
            prompts=(Prompt("greet", {"name": "greet", "arguments": [{"name": "who", "required": True}]}),),
        )
        self.calls: list[tuple[str, JSONObject]] = []
        self.closed = False
        self._events: ProviderEvents | None = None
        self._stop = anyio.Event()

    async def run(
        self, events: ProviderEvents, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self._events = events
        task_status.started()
        await self._stop.wait()

    async def close(self) -> None:
        self.closed = True
        self._stop.set()

    async def list_tools(self) -> Sequence[Tool]:
        return self.listing.tools

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        if self.state is not ProviderState.UP:
            raise UpstreamUnavailable(f"{self.name} is switched off", server=self.name)
        self.calls.append((name, arguments))
        if name == "add":
            total = arguments["a"] + arguments["b"]
            return ToolResult(content=({"type": "text", "text": str(total)},), structured_content={"sum": total})
        return ToolResult.text(str(arguments["text"]))

    async def request(self, method: str, params: JSONObject, context: CallContext) -> JSONObject:
        if method != "prompts/get" or params.get("name") != "greet":
            raise UpstreamError(f"{self.name} has no answer to {method}", server=self.name)
        who = (params.get("arguments") or {}).get("who")
        return {"messages": [{"role": "user", "content": {"type": "text", "text": f"Hello, {who}!"}}]}

    # -- what the tests do to it ------------------------------------------------------------------

    async def go_down(self, reason: str) -> None:
        self.state, self.last_error = ProviderState.DOWN, reason
        assert self._events is not None
        await self._events.changed(self.name)

    async def come_up(self, *extra: Tool) -> None:
        self.state, self.last_error = ProviderState.UP, None
        self.listing = Listing(tools=(*self.listing.tools, *extra), prompts=self.listing.prompts)
        assert self._events is not None
        await self._events.changed(self.name)


def config_of(text: str = "") -> Config:
    return parse_config(text, environ={})


def test_the_test_provider_is_a_provider() -> None:
    provider: Provider = Toolbox()  # `mypy tests/test_gateway.py` checks that it satisfies the protocol
    assert provider.name == "box"


@contextlib.asynccontextmanager
async def gateway_with(config: Config, *providers: Provider, **options: Any) -> AsyncIterator[Gateway]:
    with anyio.fail_after(5):
        async with open_gateway(config, providers=providers, **options) as gateway:
            yield gateway


# -- the registry and readiness follow the providers -----------------------------------------------------


async def test_the_registry_is_built_from_every_providers_listing() -> None:
    workflow = "workflows:\n  double:\n    steps:\n      - {id: sum, call: box__add, with: {a: 1, b: 1}}\n"
    async with gateway_with(config_of(workflow), Toolbox()) as gateway:
        assert sorted(gateway.registry.tools) == ["box__add", "box__echo", "double"]
        entry = gateway.registry.tools["box__add"]
        assert (entry.provider, entry.target) == ("box", "add")
        assert gateway.registry.tools["double"].provider == WORKFLOW_PROVIDER
        assert list(gateway.registry.prompts) == ["box__greet"]
        status = {s.name: (s.state, s.tools, s.last_error) for s in gateway.status()}
        assert status == {WORKFLOW_PROVIDER: ("up", 1, None), "box": ("up", 2, None)}
        assert all(s.warnings == () for s in gateway.status())
        assert gateway.ready


async def test_a_provider_going_down_and_up_changes_readiness_and_the_registry() -> None:
    box = Toolbox()
    async with gateway_with(config_of(), box) as gateway:
        changes: list[str] = []

        async def changed() -> None:
            changes.append(",".join(sorted(gateway.registry.tools)))

        gateway.on_change(changed)
        await box.go_down("the disk is full")
        body, status = readiness(gateway)
        upstreams: Any = body["upstreams"]
        assert status == 503
        assert body["ready"] is False
        down = {"state": "down", "tools": 2, "last_error": "the disk is full", "warnings": (), "problems": ()}
        assert upstreams["box"] == down
        assert "box__add" in gateway.registry.tools  # the last known listing stays while it is down

        await box.come_up(Tool("mul", {"name": "mul", "inputSchema": NUMBERS}))
        body, status = readiness(gateway)
        upstreams = body["upstreams"]
        assert (status, body["ready"], upstreams["box"]["state"]) == (200, True, "up")
        assert "box__mul" in gateway.registry.tools
        assert changes == ["box__add,box__echo", "box__add,box__echo,box__mul"]


async def test_a_workflow_calling_what_no_provider_serves_is_pending_until_every_provider_is_up() -> None:
    text = "workflows:\n  w:\n    steps:\n      - {id: s, call: box__missing}\n"
    box = Toolbox(up=False)
    async with gateway_with(config_of(text), box) as gateway:
        assert gateway.problems == []
        assert [p.path for p in gateway.pending_problems] == ["workflows.w.steps[0].call"]
        await box.come_up()
        assert [p.path for p in gateway.problems] == ["workflows.w.steps[0].call"]
        assert gateway.pending_problems == []


async def test_a_call_to_a_tool_of_a_down_provider_is_pending_as_a_consequence_of_it() -> None:
    text = "workflows:\n  w:\n    steps:\n      - {id: s, call: box__missing}\n      - {id: t, call: other__x}\n"
    async with gateway_with(config_of(text), Toolbox(up=False)) as gateway:
        assert [(p.path, p.cause) for p in gateway.pending_problems] == [
            ("workflows.w.steps[0].call", "servers.box"),
            ("workflows.w.steps[1].call", None),
        ]
        assert gateway.pending_problems[0].message.endswith("(because servers.box could not connect)")


async def test_a_call_to_a_down_provider_gives_the_reason_readyz_gives() -> None:
    box = Toolbox()
    async with gateway_with(config_of(), box) as gateway:
        await box.go_down("ConnectError: All connection attempts failed")
        result, outcome, _ = await gateway.dispatcher.invoke("box__add", {"a": 1, "b": 2}, CALLER)
        body, _ = readiness(gateway)
        upstreams: Any = body["upstreams"]

        assert outcome == "unavailable"
        assert upstreams["box"]["last_error"] == "ConnectError: All connection attempts failed"
        assert result.content[0]["text"] == (
            "box is switched off (last error: ConnectError: All connection attempts failed)"
        )


async def test_a_call_to_a_down_provider_whose_error_names_its_reason_already_says_it_once() -> None:
    box = Toolbox()
    async with gateway_with(config_of(), box) as gateway:
        await box.go_down("switched off")
        result = await gateway.dispatcher.call("box__add", {"a": 1, "b": 2}, CALLER)
        assert result.content[0]["text"] == "box is switched off"


async def test_a_workflow_calling_what_no_provider_serves_stops_the_gateway_from_starting() -> None:
    text = "workflows:\n  w:\n    steps:\n      - {id: s, call: box__missing}\n"
    with pytest.raises(ConfigError) as caught:
        async with gateway_with(config_of(text), Toolbox()):
            pytest.fail("the gateway started")
    assert [p.path for p in caught.value.problems] == ["workflows.w.steps[0].call"]


async def test_a_server_colliding_with_a_workflow_is_reported_against_the_workflow() -> None:
    text = (
        "servers:\n  kit: {command: [unused], prefix: ''}\nworkflows:\n  add:\n    steps:\n      - {id: s, set: {}}\n"
    )
    kinds = {"stdio": lambda name, entry: Toolbox(name)}
    with pytest.raises(ConfigError) as caught:
        async with gateway_with(config_of(text), kinds=kinds):
            pytest.fail("the gateway started")
    [problem] = caught.value.problems
    assert problem.path == "servers.kit"
    assert "taken by a workflow" in problem.message


# -- the composition: kinds, names, backends, the call path ----------------------------------------------


async def test_servers_and_connectors_are_built_by_the_factory_of_their_kind() -> None:
    text = (
        "servers:\n  crm: {command: [unused]}\n  kb: {url: 'http://127.0.0.1:9/mcp'}\n"
        "connectors:\n  billing: {base_url: 'http://127.0.0.1:9', operations: []}\n"
    )
    built: list[tuple[str, str]] = []

    def factory(name: str, entry: UpstreamConfig) -> Provider:
        built.append((name, entry.kind))
        return Toolbox(name)

    async with gateway_with(config_of(text), kinds=dict.fromkeys(("stdio", "http", "rest"), factory)) as gateway:
        assert built == [("crm", "stdio"), ("kb", "http"), ("billing", "rest")]
        assert {"crm__add", "kb__add", "billing__add"} <= set(gateway.registry.tools)
    assert set(PROVIDER_KINDS) == {"stdio", "http", "rest"}


async def test_a_connector_and_a_server_of_one_name_are_a_config_error() -> None:
    text = (
        "servers:\n  crm: {command: [unused]}\nconnectors:\n  crm: {base_url: 'http://127.0.0.1:9', operations: []}\n"
    )
    with pytest.raises(ConfigError) as caught:
        config_of(text)
    assert [(p.path, p.line) for p in caught.value.problems] == [("connectors.crm", 4)]
    assert "the name 'crm' is taken by the server on line 2" in str(caught.value)


async def test_a_server_kind_without_a_factory_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        Gateway(config_of("servers:\n  crm: {command: [unused]}\n"), kinds={})
    assert [p.path for p in caught.value.problems] == ["servers.crm"]


async def test_two_providers_of_one_name_are_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        Gateway(config_of("servers:\n  box: {command: [unused]}\n"), providers=[Toolbox("box")])
    assert [p.path for p in caught.value.problems] == ["servers.box"]


async def test_calls_pass_the_policy_chain_against_the_limit_state_the_gateway_holds() -> None:
    text = "policies:\n  - {deny: box__echo}\n  - {tools: box__add, rate_limit: 1/h, burst: 1}\n"
    box = Toolbox()
    async with gateway_with(config_of(text), box) as gateway:
        denied, outcome, _ = await gateway.dispatcher.invoke("box__echo", {"text": "hi"}, CALLER)
        assert (denied.is_error, outcome) == (True, "denied")
        first = await gateway.dispatcher.call("box__add", {"a": 2, "b": 3}, CALLER)
        assert first.structured_content == {"sum": 5}
        _, outcome, _ = await gateway.dispatcher.invoke("box__add", {"a": 2, "b": 3}, CALLER)
        assert outcome == "rate_limited"
        assert box.calls == [("add", {"a": 2, "b": 3})]
        limits = gateway.backends.limits
        assert isinstance(limits, MemoryLimitState)
        assert limits.held == 1  # the bucket the chain filled is in the state the gateway holds


async def test_circuits_are_kept_in_the_breaker_state_the_gateway_holds() -> None:
    config = config_of("servers:\n  crm: {command: [unused], circuit_breaker: {failures: 1}}\n")
    kinds = {"stdio": lambda name, entry: Toolbox(name, up=False)}
    async with gateway_with(config, kinds=kinds) as gateway:
        _, outcome, _ = await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, CALLER)
        assert outcome == "unavailable"
        _, outcome, _ = await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, CALLER)
        assert outcome == "circuit_open"
        settings = config.servers["crm"].circuit_breaker
        assert settings is not None
        assert await gateway.backends.breakers.state("crm", settings) == "open"


async def test_a_fallback_calls_back_into_the_whole_call_path() -> None:
    text = "servers:\n  crm: {command: [unused], fallback: {'*': box__add}}\n"
    kinds = {"stdio": lambda name, entry: Toolbox(name, up=False)}
    box = Toolbox()
    async with gateway_with(config_of(text), box, kinds=kinds) as gateway:
        result, outcome, _ = await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, CALLER)
        assert (outcome, result.structured_content) == ("ok", {"sum": 3})
        assert result.meta is not None
        assert result.meta[FALLBACK_META_KEY]["to"] == "box__add"
        assert box.calls == [("add", {"a": 1, "b": 2})]


async def test_workflow_steps_call_through_the_dispatcher_and_runs_are_journaled_where_the_gateway_says() -> None:
    text = (
        "workflows:\n  w:\n    steps:\n"
        "      - {id: one, call: box__add, with: {a: 1, b: 2}}\n"
        "      - {id: two, call: box__add, with: {a: '${.steps.one.result.sum}', b: 10}}\n"
        "    output: {total: '${.steps.two.result.sum}'}\n"
    )
    box = Toolbox()
    async with gateway_with(config_of(text), box) as gateway:
        result = await gateway.dispatcher.call("w", {}, CALLER)
        assert result.structured_content == {"total": 13}
        assert box.calls == [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 10})]
        [run] = await gateway.backends.store.runs()
        assert (run.workflow, run.status) == ("w", "succeeded")


async def test_an_engine_the_gateway_cannot_use_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        async with gateway_with(config_of("gateway:\n  engine: temporal://secret@cache:7233\n")):
            pytest.fail("the gateway started")
    [problem] = caught.value.problems
    assert problem.path == "gateway.engine"
    assert "secret" not in str(problem)


async def test_stopping_the_gateway_closes_every_provider() -> None:
    box = Toolbox()
    async with gateway_with(config_of(), box):
        assert not box.closed
    assert box.closed


async def test_the_call_path_is_bound_once() -> None:
    calls = CallPath()
    with pytest.raises(RuntimeError):
        await calls.invoke("x", {}, CALLER)
    gateway = Gateway(config_of())
    calls.bind(gateway.dispatcher)
    with pytest.raises(RuntimeError):
        calls.bind(gateway.dispatcher)


# -- the MCP connector as a provider ----------------------------------------------------------------------


def unused_url() -> str:
    return f"http://127.0.0.1:{free_port()}/mcp"  # nothing listens once the port is free again


async def test_an_upstream_that_cannot_connect_is_down_and_once_closed_stops_retrying() -> None:
    upstream = McpUpstream("gone", HttpServer(url=unused_url()))
    told: list[str] = []

    async def changed(name: str) -> None:
        told.append(name)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(upstream.run, ProviderEvents(changed))
            assert upstream.state is ProviderState.DOWN
            assert upstream.last_error
            with pytest.raises(UpstreamUnavailable):
                await upstream.request("prompts/get", {"name": "greet"}, CALLER)
            await upstream.close()  # run returns: the task group ends without being cancelled
    assert (upstream.state, upstream.last_error) == (ProviderState.DOWN, "closed")
    assert told == []  # it never came up, so nothing changed


async def test_the_workflow_provider_once_closed_stops() -> None:
    workflows = Gateway(config_of()).workflows
    told: list[str] = []

    async def changed(name: str) -> None:
        told.append(name)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(workflows.run, ProviderEvents(changed))
            assert workflows.state is ProviderState.UP
            await workflows.close()  # run returns: the task group ends without being cancelled
    assert told == []  # its listing never changes


async def test_an_upstream_forwards_only_prompt_resource_and_completion_requests() -> None:
    upstream = McpUpstream("gone", HttpServer(url=unused_url()))
    with pytest.raises(UpstreamError) as caught:
        await upstream.request("tools/list", {}, CALLER)
    assert not isinstance(caught.value, UpstreamUnavailable)


# -- `patchbay serve`'s code path serves it ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_provider_kind_only_the_test_knows_is_served_over_streamable_http(mode: str) -> None:
    box = Toolbox()
    config = config_of("policies:\n  - {deny: box__echo}\n")
    with anyio.fail_after(10):
        async with serving(config, providers=[box]) as app, serve_asgi(app, lifespan="off") as base:
            async with Client(f"{base}/mcp", mode=mode) as client:
                tools = {tool.name for tool in (await client.list_tools()).tools}
                assert tools == {"box__add"}  # the access rule hides what it denies
                added = await client.call_tool("box__add", {"a": 20, "b": 22})
                assert (added.is_error, added.structured_content) == (False, {"sum": 42})
                denied = await client.call_tool("box__echo", {"text": "hi"})
                assert denied.is_error
                prompt = await client.get_prompt("box__greet", {"who": "Ada"})
                content = prompt.messages[0].content
                assert isinstance(content, types.TextContent)
                assert content.text == "Hello, Ada!"
            async with httpx2.AsyncClient() as http:
                ready = await http.get(f"{base}/readyz")
    assert ready.status_code == 200
    up = {"state": "up", "tools": 2, "last_error": None, "warnings": [], "problems": []}
    assert ready.json()["upstreams"]["box"] == up
    assert box.calls == [("add", {"a": 20, "b": 22})]
    assert box.closed


def test_patchbay_tools_prints_a_provider_kind_only_the_test_knows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "patchbay.yaml"
    path.write_text("gateway: {name: embedded}\n")
    with pytest.raises(SystemExit) as exited:
        main(["tools", str(path)], providers=[Toolbox(up=False)])
    assert exited.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["box__add", "box"] for line in lines)
    assert any(line.split()[:3] == ["box", "down", "2"] and "switched off" in line for line in lines)
