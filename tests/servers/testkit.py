"""An upstream MCP server whose behaviour the tests control: crashes, slowness, new tools, server→client requests.

Run over stdio (default) or ``--http --port N``. It remembers what happened to it
(``events``) so a test can ask, through the gateway, whether a cancellation arrived.
What it prints to stderr is the tests' to choose: ``TESTKIT_STDERR`` is printed there at start (one line per
``|``-separated part), ``TESTKIT_CRASH`` makes it exit at start with that status (after printing), and the
``say`` tool prints its text.
"""

import argparse
import os
import sys

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import (
    ElicitRequest,
    ElicitRequestFormParams,
    ElicitResult,
    InputRequiredResult,
    SamplingMessage,
    TextContent,
)
from pydantic import BaseModel

mcp = MCPServer("testkit")
EVENTS: list[str] = []


@mcp.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@mcp.tool()
def big(size: int) -> str:
    """``size`` bytes of text (the reply carries them twice: as text content and as structured content)."""
    return "x" * size


@mcp.tool()
def whoami() -> dict[str, int | str]:
    """This process's id and name (to tell a restarted server from the old one)."""
    return {"pid": os.getpid(), "name": os.environ.get("TESTKIT_NAME", "testkit")}


@mcp.tool()
async def slow(seconds: float) -> str:
    """Sleep, recording whether the call was cancelled."""
    EVENTS.append("slow started")
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        EVENTS.append("slow cancelled")
        raise
    return "done"


@mcp.tool()
async def record(label: str, seconds: float = 0.0, fail: bool = False) -> dict[str, object]:
    """Record ``label`` in the events (``<label> cancelled`` when cancelled), after sleeping; fail if asked."""
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        EVENTS.append(f"{label} cancelled")
        raise
    if fail:
        EVENTS.append(f"{label} failed")
        raise ToolError(f"{label} failed as asked")
    EVENTS.append(label)
    return {"label": label, "count": len(EVENTS)}


@mcp.tool()
async def step(
    label: str, ctx: Context, seconds: float = 0.0, fail: bool = False, again: float | None = None
) -> dict[str, object]:
    """Record ``<label> started <key>`` and, after sleeping, ``<label> done <key>`` (``<key>``: the call's
    ``io.patchbay/idempotency-key``); fail after sleeping if asked. ``again``: the seconds to sleep instead
    when a call of ``label`` with this key was started before (a try made again: only the first one stalls)."""
    meta = ctx.request_context.meta
    fields = meta if isinstance(meta, dict) else meta.model_dump(by_alias=True) if meta is not None else {}
    key = fields.get("io.patchbay/idempotency-key")
    repeated = f"{label} started {key}" in EVENTS
    EVENTS.append(f"{label} started {key}")
    await anyio.sleep(again if repeated and again is not None else seconds)
    if fail:
        EVENTS.append(f"{label} failed {key}")
        raise ToolError(f"{label} failed as asked")
    EVENTS.append(f"{label} done {key}")
    return {"label": label}


ATTEMPTS: dict[str, int] = {}


@mcp.tool()
def flaky(key: str, failures: int) -> dict[str, object]:
    """Fail the first ``failures`` calls for ``key``, then succeed; returns the attempt that succeeded."""
    ATTEMPTS[key] = attempt = ATTEMPTS.get(key, 0) + 1
    EVENTS.append(f"{key} attempt {attempt}")
    if attempt <= failures:
        raise ToolError(f"{key}: failure {attempt} of {failures}")
    return {"key": key, "attempt": attempt}


@mcp.tool()
def request_headers(ctx: Context) -> dict[str, str]:
    """The HTTP headers of the request that carried this call (empty over stdio)."""
    request = ctx.request_context.request
    headers = getattr(request, "headers", None)
    return dict(headers.items()) if headers is not None else {}


@mcp.tool()
def events() -> list[str]:
    """What has happened to this server so far."""
    return list(EVENTS)


@mcp.tool()
def say(text: str) -> str:
    """Print ``text`` to stderr (and answer ``said``)."""
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()
    return "said"


@mcp.tool()
def crash() -> str:
    """Exit the process at once, as a crashing server would."""
    os._exit(3)


@mcp.tool()
def fail(message: str) -> str:
    """Fail with the message (an isError result)."""
    raise ToolError(message)


@mcp.tool()
async def add_tool(name: str, ctx: Context) -> str:
    """Add a tool called ``name`` and announce it with tools/list_changed."""

    def fresh() -> str:
        return f"I am {name}"

    mcp.add_tool(fresh, name=name, description=f"added at run time: {name}")
    await ctx.session.send_tool_list_changed()
    return f"added {name}"


@mcp.tool()
async def progress(steps: int, ctx: Context) -> str:
    """Report progress ``steps`` times, then log a message."""
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, f"step {step}")
    await ctx.info(f"finished {steps} steps")
    return f"{steps} steps"


@mcp.tool()
async def ask_model(prompt: str, ctx: Context) -> str:
    """Ask the client's model (sampling) and return its answer."""
    result = await ctx.session.create_message(
        messages=[SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
        max_tokens=50,
        related_request_id=ctx.request_id,  # on this call's own stream, as the spec asks
    )
    content = result.content
    return content.text if isinstance(content, TextContent) else str(content)


class Answer(BaseModel):
    answer: str


@mcp.tool()
async def ask_user(question: str, ctx: Context) -> str:
    """Ask the user (elicitation) and return what they said."""
    result = await ctx.elicit(question, schema=Answer)
    return f"{result.action}: {result.data.answer if result.action == 'accept' else ''}"


@mcp.tool()
async def confirm(action: str, ctx: Context) -> str | InputRequiredResult:
    """Ask the user to confirm through the 2026-07-28 input-required round trip, then act."""
    answer = (ctx.input_responses or {}).get("confirm")
    if not isinstance(answer, ElicitResult):
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
        question = ElicitRequest(params=ElicitRequestFormParams(message=f"Really {action}?", requested_schema=schema))
        return InputRequiredResult(input_requests={"confirm": question}, request_state=f"pending {action}")
    return f"{action}: {answer.action} {answer.content} (state: {ctx.request_state})"


@mcp.tool()
async def client_capabilities(ctx: Context) -> dict[str, object]:
    """The capabilities this server sees for the client of this request."""
    caps = ctx.session.client_capabilities
    return caps.model_dump(by_alias=True, mode="json", exclude_none=True) if caps else {}


@mcp.prompt()
def greet(name: str) -> str:
    """Greet someone."""
    return f"Hello, {name}!"


@mcp.resource("kit://static")
def static() -> str:
    """A fixed resource."""
    return "static content"


@mcp.resource("kit://items/{item_id}")
def item(item_id: str) -> str:
    """One item by id."""
    return f"item {item_id}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--sse", action="store_true", help="the legacy HTTP+SSE transport (GET /sse)")
    parser.add_argument("--port", type=int, default=9301)
    args = parser.parse_args()
    for line in os.environ.get("TESTKIT_STDERR", "").split("|"):
        if line:
            sys.stderr.write(f"{line}\n")
    sys.stderr.flush()
    if crash := os.environ.get("TESTKIT_CRASH"):
        sys.exit(int(crash))
    if args.sse:
        mcp.run("sse", host="127.0.0.1", port=args.port)
    elif args.http:
        mcp.run("streamable-http", host="127.0.0.1", port=args.port)
    else:
        mcp.run()


if __name__ == "__main__":
    main()
