"""In-process servers for tests: ASGI apps under uvicorn on 127.0.0.1 in the test's own event loop,
an upstream MCP server built fresh for each test, and a gateway in front of it.

Nothing here starts a process, so a failure points at the code, not at a port, a path or a child's log.
"""

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
import mcp_types as types
import pytest
import uvicorn
from mcp import Client
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError
from pydantic import Field
from starlette.types import ASGIApp

from gateway.config import parse_config
from gateway.gateway import Gateway, open_gateway
from gateway.server import McpFrontend
from gateway.types import Principal

UPSTREAM_DEPRECATIONS = [
    # The test upstream logs and samples, both deprecated as of 2026-07-28; the gateway must still forward them.
    pytest.mark.filterwarnings(
        f"ignore:The {feature} capability is deprecated:mcp.shared.exceptions.MCPDeprecationWarning"
    )
    for feature in ("logging", "sampling")
]
"""Marks for a test module whose upstream runs in-process (its warnings are the test's)."""

LOCAL = Principal("local", kind="stdio")
WITHIN = 20.0
"""Seconds any one in-process exchange may take on a loaded machine before the test fails."""


class _Uvicorn(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # leave the test runner's signal handlers alone


def _listening(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted server takes the same port back
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@contextlib.asynccontextmanager
async def serve_asgi(app: ASGIApp, *, port: int = 0, lifespan: str = "on", **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` (its lifespan too, unless ``lifespan="off"``) on 127.0.0.1 and yield ``http://127.0.0.1:PORT``;
    ``options`` are more of ``uvicorn.Config``'s.

    The socket is bound and listening before uvicorn starts, so connections queue until it
    accepts: no waiting for readiness. On exit, streams still open are cut after a second.
    """
    sock = _listening(port)
    config = uvicorn.Config(
        app, lifespan=lifespan, log_level="critical", ws="none", timeout_graceful_shutdown=1, **options
    )
    server = _Uvicorn(config)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            try:
                yield f"http://127.0.0.1:{sock.getsockname()[1]}"
            finally:
                server.should_exit = True
    finally:
        sock.close()


@dataclass
class Upstream:
    """An MCP server whose behaviour the tests control, and what has happened to it."""

    server: MCPServer
    events: list[str] = field(default_factory=list)
    release: anyio.Event = field(default_factory=anyio.Event)
    """Set it to let ``wait`` calls finish."""
    waiting: anyio.Event = field(default_factory=anyio.Event)
    """Set when a ``wait`` call has started."""
    cancelled: anyio.Event = field(default_factory=anyio.Event)
    """Set when a ``wait`` call was cancelled."""
    prompt_meta: list[dict[str, Any]] = field(default_factory=list)
    """The ``_meta`` of each ``prompts/get`` request, in the order they came."""
    pinged: anyio.Event = field(default_factory=anyio.Event)
    """Set when a ``ping`` arrived (replace it to wait for the next)."""
    answers_pings: bool = True
    """False: a ``ping`` is never answered, as by a server that hangs."""


def make_upstream(name: str = "kit") -> Upstream:
    """A fresh server (tools, a prompt, resources, completions) with state of its own."""
    up = Upstream(MCPServer(name))
    _plain_tools(up)
    _talking_tools(up)
    _catalog(up)
    return up


def _plain_tools(up: Upstream) -> None:
    mcp = up.server

    @mcp.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @mcp.tool()
    def in_region(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})]) -> str:
        """Name ``region``, which a 2026-07-28 client also sends as the ``Mcp-Param-Region`` header."""
        return f"in {region}"

    @mcp.tool()
    def fail(message: str) -> str:
        """Fail with the message (an isError result)."""
        raise ToolError(message)

    @mcp.tool()
    async def wait(label: str) -> str:
        """Wait until the test releases it, recording a cancellation."""
        up.events.append(f"{label} started")
        up.waiting.set()
        try:
            await up.release.wait()
        except anyio.get_cancelled_exc_class():
            up.events.append(f"{label} cancelled")
            up.cancelled.set()
            raise
        return f"{label} released"

    @mcp.tool()
    async def add_tool(tool_name: str, ctx: Context) -> str:
        """Add a tool called ``tool_name`` and announce it with tools/list_changed."""

        def fresh() -> str:
            return f"I am {tool_name}"

        mcp.add_tool(fresh, name=tool_name, description=f"added at run time: {tool_name}")
        await ctx.session.send_tool_list_changed()
        return f"added {tool_name}"

    @mcp.tool()
    async def add_tool_announced_to_listeners(tool_name: str, ctx: Context) -> str:
        """Add a tool called ``tool_name`` and announce it only on 2026-07-28 ``subscriptions/listen`` streams."""

        def fresh() -> str:
            return f"I am {tool_name}"

        mcp.add_tool(fresh, name=tool_name, description=f"added at run time: {tool_name}")
        await ctx.notify_tools_changed()
        return f"added {tool_name}"


def _talking_tools(up: Upstream) -> None:
    """Tools that send the client something mid-call: progress, log messages, requests."""
    mcp = up.server

    @mcp.tool()
    async def progress(steps: int, ctx: Context) -> str:
        """Report progress ``steps`` times, then log a debug and a warning message."""
        for step in range(1, steps + 1):
            await ctx.report_progress(step, steps, f"step {step}")
        await ctx.debug("debug detail")
        await ctx.warning(f"finished {steps} steps")
        return f"{steps} steps"

    async def sample(ctx: Context, prompt: str, **link: Any) -> str:
        """The client's model's answer to ``prompt`` (sampling), or why it was refused."""
        try:
            result = await ctx.session.create_message(
                messages=[types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))],
                max_tokens=50,
                **link,
            )
        except MCPError as exc:
            return f"refused: {exc.error.message}"
        content = result.content
        return content.text if isinstance(content, types.TextContent) else str(content)

    @mcp.tool()
    async def ask_model(prompt: str, ctx: Context) -> str:
        """Ask the client's model (sampling) on this call's stream and return its answer, or why it was refused."""
        return await sample(ctx, prompt, related_request_id=ctx.request_id)

    @mcp.tool()
    async def ask_model_aside(prompt: str, ctx: Context) -> str:
        """Ask the client's model on the session's own stream, with no link to this call (as old servers do)."""
        return await sample(ctx, prompt)

    @mcp.tool()
    async def confirm(action: str, ctx: Context) -> str | types.InputRequiredResult:
        """Ask the user to confirm through the 2026-07-28 input-required round trip, then act."""
        answer = (ctx.input_responses or {}).get("confirm")
        if not isinstance(answer, types.ElicitResult):
            schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
            params = types.ElicitRequestFormParams(message=f"Really {action}?", requested_schema=schema)
            question = types.ElicitRequest(params=params)
            return types.InputRequiredResult(input_requests={"confirm": question}, request_state=f"pending {action}")
        return f"{action}: {answer.action} {answer.content} (state: {ctx.request_state})"

    @mcp.tool()
    def request_meta(ctx: Context) -> dict[str, Any]:
        """The ``_meta`` of the request that carried this call."""
        meta = ctx.request_context.meta
        return dict(meta) if meta else {}

    @mcp.tool()
    async def client_capabilities(ctx: Context) -> dict[str, object]:
        """The capabilities this server sees for the client of this request."""
        caps = ctx.session.client_capabilities
        return caps.model_dump(by_alias=True, mode="json", exclude_none=True) if caps else {}


def _catalog(up: Upstream) -> None:
    """A prompt, a resource, a template, and completions for them."""
    mcp = up.server

    @mcp.prompt()
    def greet(person: str, ctx: Context) -> str:
        """Greet someone."""
        meta = ctx.request_context.meta
        up.prompt_meta.append(dict(meta) if meta else {})
        return f"Hello, {person}!"

    @mcp.resource("kit://static")
    def static() -> str:
        """A fixed resource."""
        return "static content"

    @mcp.resource("kit://items/{item_id}")
    def item(item_id: str) -> str:
        """One item by id."""
        return f"item {item_id}"

    async def subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        up.events.append(f"subscribed {params.uri}")
        return types.EmptyResult()

    async def unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        up.events.append(f"unsubscribed {params.uri}")
        return types.EmptyResult()

    async def ping(ctx: Any, params: types.RequestParams) -> types.EmptyResult:
        up.pinged.set()
        if not up.answers_pings:
            await anyio.sleep_forever()
        return types.EmptyResult()

    mcp._lowlevel_server.add_request_handler("ping", types.RequestParams, ping)
    mcp._lowlevel_server.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    mcp._lowlevel_server.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)

    @mcp.tool()
    async def touch(uri: str, ctx: Context) -> str:
        """Tell the session that the resource ``uri`` changed."""
        await ctx.session.send_resource_updated(uri)
        return f"touched {uri}"

    @mcp.completion()
    async def complete(
        ref: types.PromptReference | types.ResourceTemplateReference,
        argument: types.CompletionArgument,
        context: types.CompletionContext | None,
    ) -> types.Completion:
        names = ["Ada", "Alan", "Grace"] if isinstance(ref, types.PromptReference) else ["1", "2"]
        where = ref.name if isinstance(ref, types.PromptReference) else ref.uri
        up.events.append(f"completed {argument.name} of {where}")
        return types.Completion(values=[n for n in names if n.startswith(argument.value)])


@contextlib.asynccontextmanager
async def serve_upstream(upstream: Upstream, *, port: int = 0, json_response: bool = False) -> AsyncIterator[str]:
    """The upstream over streamable HTTP on 127.0.0.1; yields its MCP endpoint URL."""
    app = upstream.server.streamable_http_app(host="127.0.0.1", json_response=json_response)
    async with serve_asgi(app, port=port) as base:
        yield f"{base}/mcp"


@contextlib.asynccontextmanager
async def gateway_over(url: str, extra: str = "") -> AsyncIterator[Gateway]:
    """A gateway (``open_gateway``) with the upstream at ``url`` as server ``kit``; ``extra`` is more YAML."""
    config = f'servers:\n  kit: {{url: "{url}"}}\n{extra}'
    async with open_gateway(parse_config(config, environ={})) as gateway:
        yield gateway


def frontend_client(frontend: McpFrontend, mode: str, **options: Any) -> Client:
    """The SDK's in-memory client of ``frontend`` in ``mode`` (``legacy`` or ``2026-07-28``)."""
    return Client(frontend.server, mode=mode, cache=None, **options)


def tool_names(result: types.ListToolsResult) -> set[str]:
    return {tool.name for tool in result.tools}
