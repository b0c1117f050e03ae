"""``McpUpstream`` against in-process MCP servers on 127.0.0.1, and the testkit over stdio where stdio is the point."""

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from connectors.mcp import McpUpstream, State
from gateway.config import parse_config
from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.types import CallContext, JSONObject, Principal, ProviderEvents, ToolResult
from tests.inprocess import UPSTREAM_DEPRECATIONS, WITHIN, Upstream, make_upstream, serve_asgi, serve_upstream
from tests.support import PYTHON, TESTKIT

pytestmark = [pytest.mark.anyio, *UPSTREAM_DEPRECATIONS]

HANDSHAKE = "2025-11-25"
MODERN = "2026-07-28"
SAMPLES = {"sampling": {}}
NOTICED_WITHIN = 10.0
"""Seconds for the connector to notice a change it is not told of on its handshake-era session."""


@dataclass
class Channel:
    """A downstream client as the upstream connector sees it: what it was asked and told."""

    name: str
    capabilities: JSONObject = field(default_factory=lambda: dict(SAMPLES))
    protocol_version: str = HANDSHAKE
    asked: list[tuple[str, JSONObject]] = field(default_factory=list)
    logs: list[JSONObject] = field(default_factory=list)

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        self.asked.append((method, params))
        return {"role": "assistant", "content": {"type": "text", "text": f"{self.name} says hi"}, "model": "m"}

    async def log(self, params: JSONObject) -> None:
        self.logs.append(params)


def context(channel: Channel | None = None, **options: Any) -> CallContext:
    return CallContext(principal=Principal(channel.name if channel else "nobody"), client=channel, **options)


def first_text(result: ToolResult) -> str:
    return str(result.content[0]["text"])


@dataclass
class Connected:
    upstream: McpUpstream
    changes: MemoryObjectReceiveStream[str]

    async def until(self, holds: Callable[[McpUpstream], bool], within: float = WITHIN) -> None:
        """Wait until the connector has announced a change after which ``holds(upstream)``."""
        with anyio.fail_after(within):
            while not holds(self.upstream):
                await self.changes.receive()

    async def call(self, name: str, arguments: JSONObject, ctx: CallContext | None = None) -> ToolResult:
        with anyio.fail_after(WITHIN):
            return await self.upstream.call_tool(name, arguments, ctx or context())


@asynccontextmanager
async def connected(server: str) -> AsyncIterator[Connected]:
    """An ``McpUpstream`` for the server entry ``server`` (YAML flow mapping), running until the block ends."""
    config = parse_config(f"servers:\n  kit: {server}\n", environ={}).servers["kit"]
    send, receive = anyio.create_memory_object_stream[str](math.inf)

    async def on_change(name: str) -> None:
        send.send_nowait(name)

    upstream = McpUpstream("kit", config)
    async with send, receive, anyio.create_task_group() as tg:
        with anyio.fail_after(WITHIN):
            await tg.start(upstream.run, ProviderEvents(on_change))
        try:
            yield Connected(upstream, receive)
        finally:
            tg.cancel_scope.cancel()


@asynccontextmanager
async def connected_to(upstream: Upstream, settings: str = "") -> AsyncIterator[Connected]:
    """An ``McpUpstream`` connected to ``upstream`` served over streamable HTTP."""
    async with serve_upstream(upstream) as url, connected(f'{{url: "{url}"{settings}}}') as conn:
        assert conn.upstream.state is State.UP, conn.upstream.last_error
        yield conn


async def test_connects_and_lists_the_servers_tools_prompts_and_resources() -> None:
    async with connected_to(make_upstream()) as conn:
        upstream = conn.upstream
        assert upstream.connects == 1
        assert upstream.last_error is None
        assert {"echo", "wait", "progress", "ask_model"} <= {tool.name for tool in await upstream.list_tools()}
        listing = upstream.listing
        assert [prompt.name for prompt in listing.prompts] == ["greet"]
        assert {(r.uri, r.template) for r in listing.resources} == {
            ("kit://static", False),
            ("kit://items/{item_id}", True),
        }


@pytest.mark.parametrize("era", [HANDSHAKE, MODERN])
async def test_a_call_is_answered_with_the_servers_result_in_both_eras(era: str) -> None:
    async with connected_to(make_upstream()) as conn:
        result = await conn.call("echo", {"text": "hi"}, context(Channel("ada", protocol_version=era)))
        assert first_text(result) == "hi"
        assert result.structured_content == {"result": "hi"}
        assert not result.is_error
        failed = await conn.call("fail", {"message": "out of stock"}, context(Channel("ada", protocol_version=era)))
        assert failed.is_error
        assert "out of stock" in first_text(failed)


async def test_a_2026_callers_own_capabilities_are_what_the_server_sees() -> None:
    async with connected_to(make_upstream()) as conn:
        asks_users = Channel("new", {"elicitation": {}}, protocol_version=MODERN)
        seen = (await conn.call("client_capabilities", {}, context(asks_users))).structured_content
        assert seen is not None
        assert "elicitation" in seen
        plain = await conn.call("client_capabilities", {}, context(Channel("new", {}, protocol_version=MODERN)))
        assert plain.structured_content == {}
        shared = await conn.call("client_capabilities", {}, context(Channel("old", {})))
        assert shared.structured_content is not None
        assert "sampling" in shared.structured_content  # the handshake session is the gateway's own


async def test_a_2026_call_carries_the_envelope_and_routing_headers_the_sdk_client_would_send() -> None:
    upstream = make_upstream()
    async with connected_to(upstream) as conn:
        caller = Channel("new", {"elicitation": {}}, protocol_version=MODERN)
        seen = (await conn.call("request_meta", {}, context(caller, log_level="info"))).structured_content
        assert seen is not None
        assert seen["io.modelcontextprotocol/protocolVersion"] == MODERN
        assert seen["io.modelcontextprotocol/clientInfo"]["name"] == "patchbay"
        assert seen["io.modelcontextprotocol/clientCapabilities"] == {"elicitation": {}}
        assert seen["io.modelcontextprotocol/logLevel"] == "info"
        # Routing headers: the server checks Mcp-Name against the body, and refuses a call missing an Mcp-Param-*
        # header of a tool that maps one (such a call goes through the SDK client, which sends it).
        assert first_text(await conn.call("in_region", {"region": "eu"}, context(caller))) == "in eu"
        unknown = await conn.call("nope", {}, context(caller))
        assert unknown.is_error
        assert "nope" in first_text(unknown)


@pytest.mark.parametrize("era", [HANDSHAKE, MODERN])
async def test_progress_and_log_messages_of_a_call_reach_its_client(era: str) -> None:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    ada = Channel("ada", protocol_version=era)
    async with connected_to(make_upstream()) as conn:
        await conn.call("progress", {"steps": 2}, context(ada, progress=on_progress, log_level="debug"))
    assert progress == [1, 2]
    assert [log["data"] for log in ada.logs] == ["debug detail", "finished 2 steps"]


async def test_a_list_changed_from_the_server_refreshes_the_listing() -> None:
    async with connected_to(make_upstream()) as conn:
        assert "fresh" not in {tool.name for tool in conn.upstream.listing.tools}
        await conn.call("add_tool", {"tool_name": "fresh"})
        await conn.until(lambda up: "fresh" in {tool.name for tool in up.listing.tools})
        assert first_text(await conn.call("fresh", {})) == "I am fresh"


async def test_a_change_the_server_announces_only_to_2026_listeners_refreshes_the_listing() -> None:
    # A 2026-07-28 server pushes nothing on its sessions: changes reach only `subscriptions/listen` streams.
    async with connected_to(make_upstream()) as conn:
        await conn.call("add_tool_announced_to_listeners", {"tool_name": "fresh"})
        await conn.until(lambda up: "fresh" in {tool.name for tool in up.listing.tools}, within=NOTICED_WITHIN)


@pytest.mark.parametrize("era", [HANDSHAKE, MODERN])
async def test_a_call_past_the_servers_timeout_raises_upstream_timeout_and_is_cancelled_there(era: str) -> None:
    upstream = make_upstream()
    # Long enough for the call to reach the server on a loaded machine: it must be cancelled there too.
    async with connected_to(upstream, ", timeout: 1s") as conn:
        with pytest.raises(UpstreamTimeout, match="did not answer within 1s"):
            await conn.call("wait", {"label": "slow"}, context(Channel("ada", protocol_version=era)))
        with anyio.fail_after(WITHIN):
            await upstream.cancelled.wait()
        assert upstream.events == ["slow started", "slow cancelled"]


async def test_a_calls_own_sampling_request_goes_to_its_client_while_others_are_in_flight() -> None:
    upstream = make_upstream()
    ada, bob = Channel("ada"), Channel("bob")
    async with connected_to(upstream) as conn, anyio.create_task_group() as tg:
        tg.start_soon(conn.call, "wait", {"label": "bob waits"}, context(bob))
        await upstream.waiting.wait()
        result = await conn.call("ask_model", {"prompt": "hello?"}, context(ada))
        upstream.release.set()
    assert first_text(result) == "ada says hi"
    assert [method for method, _ in ada.asked] == ["sampling/createMessage"]
    assert bob.asked == []


async def test_a_sampling_request_with_no_link_to_a_call_goes_to_the_only_client_with_a_call_in_flight() -> None:
    ada = Channel("ada")
    async with connected_to(make_upstream()) as conn:
        result = await conn.call("ask_model_aside", {"prompt": "hello?"}, context(ada))
    assert first_text(result) == "ada says hi"
    assert [method for method, _ in ada.asked] == ["sampling/createMessage"]


async def test_a_sampling_request_with_no_link_to_a_call_is_refused_while_several_clients_have_calls_in_flight() -> (
    None
):
    upstream = make_upstream()
    ada, bob = Channel("ada"), Channel("bob")
    async with connected_to(upstream) as conn, anyio.create_task_group() as tg:
        tg.start_soon(conn.call, "wait", {"label": "bob waits"}, context(bob))
        await upstream.waiting.wait()
        result = await conn.call("ask_model_aside", {"prompt": "hello?"}, context(ada))
        upstream.release.set()
    assert first_text(result) == (
        "refused: patchbay cannot route sampling/createMessage: calls of several clients are in flight on this server"
    )
    assert ada.asked == bob.asked == []


async def test_a_client_that_cannot_sample_is_not_asked_to() -> None:
    ada = Channel("ada", capabilities={})
    async with connected_to(make_upstream()) as conn:
        result = await conn.call("ask_model", {"prompt": "hello?"}, context(ada))
    assert first_text(result) == "refused: the client behind patchbay does not support sampling/createMessage"
    assert ada.asked == []


async def test_a_legacy_sse_server_is_connected_and_called_on_its_one_session() -> None:
    ada = Channel("ada", protocol_version=MODERN)  # a 2026 caller too: an SSE server has no 2026-07-28 session
    async with (
        serve_asgi(make_upstream().server.sse_app()) as base,
        connected(f'{{url: "{base}/sse", sse: true}}') as conn,
    ):
        assert conn.upstream.state is State.UP, conn.upstream.last_error
        assert "echo" in {tool.name for tool in conn.upstream.listing.tools}
        assert first_text(await conn.call("echo", {"text": "over sse"}, context(ada))) == "over sse"
        result = await conn.call("ask_model_aside", {"prompt": "hello?"}, context(Channel("bob")))
        assert first_text(result) == "bob says hi"


async def test_other_requests_are_forwarded_and_their_json_rpc_errors_are_upstream_errors() -> None:
    async with connected_to(make_upstream()) as conn:
        params = {"name": "greet", "arguments": {"person": "Ada"}}
        prompt = await conn.upstream.request("prompts/get", params, context())
        assert prompt["messages"][0]["content"]["text"] == "Hello, Ada!"
        with pytest.raises(UpstreamError, match="answered with an error"):
            await conn.upstream.request("prompts/get", {"name": "nope"}, context())


async def test_a_server_that_cannot_be_reached_is_down_and_its_calls_fail_at_once() -> None:
    async with serve_asgi(make_upstream().server.streamable_http_app(), lifespan="off") as base:
        url = f"{base}/mcp"  # served and closed again: nothing listens there now
    async with connected(f'{{url: "{url}"}}') as conn:
        upstream = conn.upstream
        assert upstream.state is not State.UP
        assert upstream.last_error
        with pytest.raises(UpstreamUnavailable, match="is not connected"):
            await conn.call("echo", {"text": "x"})


@asynccontextmanager
async def mortal_upstream() -> AsyncIterator[tuple[str, Callable[[], Awaitable[None]]]]:
    """A test upstream over HTTP, its URL, and ``go_away()``, which stops it (its port is free again after)."""
    stop, stopped = anyio.Event(), anyio.Event()

    async def life(*, task_status: TaskStatus[str]) -> None:
        async with serve_upstream(make_upstream()) as url:
            task_status.started(url)
            await stop.wait()
        stopped.set()

    async def go_away() -> None:
        stop.set()
        with anyio.fail_after(WITHIN):
            await stopped.wait()

    async with anyio.create_task_group() as tg:
        url = await tg.start(life)
        try:
            yield url, go_away
        finally:
            stop.set()


async def test_reconnects_when_the_server_comes_back_after_going_away() -> None:
    async with mortal_upstream() as (url, go_away), connected(f'{{url: "{url}"}}') as conn:
        assert first_text(await conn.call("echo", {"text": "first"})) == "first"
        await go_away()
        with pytest.raises(UpstreamUnavailable):
            await conn.call("echo", {"text": "lost"})
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        async with serve_upstream(make_upstream(), port=port):
            await conn.until(lambda up: up.connects == 2 and up.state is State.UP)
            assert first_text(await conn.call("echo", {"text": "second"})) == "second"


async def test_an_http_server_that_goes_away_is_noticed_without_a_call() -> None:
    async with mortal_upstream() as (url, go_away), connected(f'{{url: "{url}", heartbeat: 100ms}}') as conn:
        await go_away()
        await conn.until(lambda up: up.state is not State.UP, within=NOTICED_WITHIN)
        assert conn.upstream.last_error


async def test_a_server_that_answers_its_pings_stays_up_and_is_not_reconnected() -> None:
    upstream = make_upstream()
    async with connected_to(upstream, ", heartbeat: 50ms") as conn:
        for _ in range(5):  # several heartbeats, each answered
            await upstream.pinged.wait()
            upstream.pinged = anyio.Event()
        assert conn.upstream.state is State.UP
        assert conn.upstream.connects == 1


async def test_a_server_that_stops_answering_its_pings_is_reconnected(caplog: pytest.LogCaptureFixture) -> None:
    # The server is still there and every stream stays open: only the heartbeat can tell that it hangs.
    upstream = make_upstream()
    async with connected_to(upstream, ", heartbeat: 50ms, timeout: 1s") as conn:
        upstream.answers_pings = False
        await conn.until(lambda up: up.connects == 2 and up.state is State.UP, within=NOTICED_WITHIN)
    assert any("no answer to a ping within 1s" in r.getMessage() for r in caplog.records if r.name == "connectors.mcp")


async def test_a_stdio_server_that_exits_is_restarted() -> None:
    async with connected(f"{{command: [{PYTHON}, {TESTKIT}]}}") as conn:
        whoami = await conn.call("whoami", {})
        assert whoami.structured_content is not None
        with pytest.raises(UpstreamUnavailable, match="closed during the call"):
            await conn.call("crash", {})
        await conn.until(lambda up: up.connects == 2 and up.state is State.UP)
        again = await conn.call("whoami", {})
        assert again.structured_content is not None
        assert again.structured_content["pid"] != whoami.structured_content["pid"]
