"""An upstream MCP server that runs tools as tasks (2025-11-25, the core ``tasks`` utility), as
``@modelcontextprotocol/server-everything``'s ``simulate-research-query`` does.

The SDK knows tasks as types only (its ``MCPServer`` cannot declare ``execution`` nor answer a tool call
with a ``CreateTaskResult``), so this is a low-level ``Server`` with the ``tasks`` capability, the
``tasks/*`` methods and a middleware that routes a task-augmented ``tools/call`` to its own handler.

Tools:

* ``research(topic, seconds=0, hold=False, fail=False)``: ``execution.taskSupport: required``; a plain
  call is refused with -32601, as the spec says. The task sleeps ``seconds`` (or, in process, waits for
  ``Tasking.release`` when ``hold``), then completes with a report, or an ``isError`` result if ``fail``.
* ``summarise(text)``: ``taskSupport: optional``.
* ``events()``: what has happened to this server (``research <topic> started|done|cancelled``).

Run over stdio (default) or ``--http --port N``; in process, :func:`make_tasking`.
"""

import argparse
import itertools
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
import mcp_types as types
from mcp.server import Server, ServerRequestContext
from mcp.server.context import CallNext, HandlerResult
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

POLL_INTERVAL_MS = 20
RELATED_TASK = "io.modelcontextprotocol/related-task"
_TASK_CALL = "tasking/call-as-task"
_TERMINAL = frozenset({"completed", "failed", "cancelled"})

_TOOLS = [
    types.Tool(
        name="research",
        description="Research a topic (long-running: runs only as a task).",
        input_schema={
            "type": "object",
            "properties": {
                "topic": {"type": "string"},
                "seconds": {"type": "number"},
                "hold": {"type": "boolean"},
                "fail": {"type": "boolean"},
            },
            "required": ["topic"],
        },
        execution=types.ToolExecution(task_support="required"),
    ),
    types.Tool(
        name="summarise",
        description="Summarise a text (as a task if asked).",
        input_schema={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        execution=types.ToolExecution(task_support="optional"),
    ),
    types.Tool(name="events", description="What has happened to this server.", input_schema={"type": "object"}),
]


@dataclass
class _Task:
    wire: dict[str, Any]
    ended: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    result: dict[str, Any] | None = None


@dataclass
class Tasking:
    """The server and what has happened to it."""

    server: Server[Any]
    events: list[str] = field(default_factory=list)
    release: anyio.Event = field(default_factory=anyio.Event)
    """Set it to let ``hold`` tasks finish."""
    started: anyio.Event = field(default_factory=anyio.Event)
    """Set when a task's work has started."""
    tasks: dict[str, _Task] = field(default_factory=dict)


class _TaskServer(Server[Any]):
    def get_capabilities(self, *args: Any, **kwargs: Any) -> types.ServerCapabilities:
        capabilities = super().get_capabilities(*args, **kwargs)
        tasks = types.ServerTasksCapability(
            list=types.TasksListCapability(),
            cancel=types.TasksCancelCapability(),
            requests=types.ServerTasksRequestsCapability(
                tools=types.TasksToolsCapability(call=types.TasksCallCapability())
            ),
        )
        return capabilities.model_copy(update={"tasks": tasks})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _not_found() -> MCPError:
    return MCPError(types.INVALID_PARAMS, "Failed to retrieve task: Task not found")


def make_tasking() -> Tasking:  # noqa: C901 - one closure per handler reads best here
    """A fresh server with state of its own."""
    ids = itertools.count(1)
    state: Tasking

    @asynccontextmanager
    async def lifespan(_: Server[Any]) -> AsyncIterator[dict[str, Any]]:
        async with anyio.create_task_group() as background:
            try:
                yield {"background": background}
            finally:
                background.cancel_scope.cancel()

    async def work(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
        if name == "summarise":
            return {"content": [{"type": "text", "text": f"summary: {str(arguments.get('text'))[:20]}"}]}
        topic = arguments.get("topic")
        state.events.append(f"research {topic} started")
        state.started.set()
        try:
            if arguments.get("hold"):
                await state.release.wait()
            await anyio.sleep(float(arguments.get("seconds") or 0))
        except anyio.get_cancelled_exc_class():
            state.events.append(f"research {topic} cancelled")
            raise
        state.events.append(f"research {topic} done")
        if arguments.get("fail"):
            return {"content": [{"type": "text", "text": f"no sources on {topic}"}], "isError": True}
        return {"content": [{"type": "text", "text": f"report on {topic}"}], "structuredContent": {"topic": topic}}

    async def list_tools(ctx: ServerRequestContext[Any], params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=_TOOLS)

    async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> HandlerResult:
        if params.name == "events":
            return {
                "content": [{"type": "text", "text": "\n".join(state.events)}],
                "structuredContent": {"result": list(state.events)},
            }
        if params.name == "research":
            raise MCPError(types.METHOD_NOT_FOUND, "research runs only as a task: call it with params.task")
        if params.name == "summarise":
            return await work(params.name, params.arguments or {})
        raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {params.name}")

    async def call_as_task(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> HandlerResult:
        if params.name not in ("research", "summarise"):
            raise MCPError(types.METHOD_NOT_FOUND, f"{params.name} does not run as a task")
        now = _now()
        ttl = params.task.ttl if params.task is not None else None
        wire = {
            "taskId": f"up-{next(ids)}",
            "status": "working",
            "createdAt": now,
            "lastUpdatedAt": now,
            "ttl": ttl,
            "pollInterval": POLL_INTERVAL_MS,
        }
        task = _Task(wire)
        state.tasks[wire["taskId"]] = task

        async def run() -> None:
            with task.scope:
                result = await work(params.name, params.arguments or {})
                task.result = result
                task.wire.update(status="failed" if result.get("isError") else "completed", lastUpdatedAt=_now())
            task.ended.set()

        ctx.lifespan_context["background"].start_soon(run)
        return {"task": dict(wire)}

    def found(task_id: str) -> _Task:
        task = state.tasks.get(task_id)
        if task is None:
            raise _not_found()
        return task

    async def get_task(ctx: ServerRequestContext[Any], params: types.GetTaskRequestParams) -> HandlerResult:
        return dict(found(params.task_id).wire)

    async def task_result(ctx: ServerRequestContext[Any], params: types.GetTaskPayloadRequestParams) -> HandlerResult:
        task = found(params.task_id)
        await task.ended.wait()
        if task.result is None:
            raise MCPError(types.INTERNAL_ERROR, f"task {params.task_id} was {task.wire['status']}")
        return {**task.result, "_meta": {RELATED_TASK: {"taskId": params.task_id}}}

    async def list_tasks(ctx: ServerRequestContext[Any], params: Any) -> HandlerResult:
        return {"tasks": [dict(task.wire) for task in state.tasks.values()]}

    async def cancel_task(ctx: ServerRequestContext[Any], params: types.CancelTaskRequestParams) -> HandlerResult:
        task = found(params.task_id)
        if task.wire["status"] in _TERMINAL:
            raise MCPError(
                types.INVALID_PARAMS, f"Cannot cancel task: already in terminal status {task.wire['status']!r}"
            )
        task.scope.cancel()
        task.wire.update(status="cancelled", lastUpdatedAt=_now())
        task.ended.set()
        return dict(task.wire)

    async def route_task_calls(ctx: ServerRequestContext[Any], call_next: CallNext) -> HandlerResult:
        if ctx.method == "tools/call" and isinstance(ctx.params, Mapping) and ctx.params.get("task") is not None:
            return await call_next(replace(ctx, method=_TASK_CALL))
        return await call_next(ctx)

    server = _TaskServer(
        "tasking", version="0.1.0", lifespan=lifespan, on_list_tools=list_tools, on_call_tool=call_tool
    )
    server.middleware = [route_task_calls]
    add = server.add_request_handler
    add(_TASK_CALL, types.CallToolRequestParams, call_as_task)
    add("tasks/get", types.GetTaskRequestParams, get_task)
    add("tasks/result", types.GetTaskPayloadRequestParams, task_result)
    add("tasks/list", types.PaginatedRequestParams, list_tasks)
    add("tasks/cancel", types.CancelTaskRequestParams, cancel_task)
    state = Tasking(server)
    return state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--port", type=int, default=9302)
    args = parser.parse_args()
    server = make_tasking().server
    if args.http:
        import uvicorn

        uvicorn.run(server.streamable_http_app(host="127.0.0.1"), host="127.0.0.1", port=args.port, log_level="warning")
        return

    async def serve() -> None:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(serve)


if __name__ == "__main__":
    main()
