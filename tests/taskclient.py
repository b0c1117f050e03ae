"""The SDK's client side of MCP tasks, for tests: the 2026-07-28 extension (declared, its results claimed) and
the 2025-11-25 requests the SDK knows as types only."""

from typing import Any, Literal

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.shared.exceptions import MCPError
from pydantic import TypeAdapter

from gateway.server import McpFrontend
from gateway.tasks import TASKS_EXTENSION

_WIRE = TypeAdapter(dict[str, Any])


class CreatedTask(types.Result):
    """The 2026-07-28 extension's ``CreateTaskResult``."""

    result_type: Literal["task"] = "task"
    task_id: str
    status: str
    created_at: str
    last_updated_at: str
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None


class TasksExtension(ClientExtension):
    """A client's side of the tasks extension: declares it, and makes ``call_tool`` wait for a task's result."""

    identifier = TASKS_EXTENSION

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=CreatedTask, resolve=self._resolve)]

    async def _resolve(self, created: CreatedTask, context: ClaimContext) -> types.CallToolResult:
        while True:
            task = await context.session.send_request(_request("tasks/get", taskId=created.task_id), _WIRE)
            if task["status"] == "completed":
                return types.CallToolResult.model_validate(task["result"])
            assert task["status"] == "working", task
            await anyio.sleep(0.01)


def client(frontend: McpFrontend, mode: str, *, tasks: bool = True, **options: Any) -> Client:
    """The SDK's in-memory client of ``frontend``; in 2026-07-28, declaring the tasks extension unless told not to."""
    extensions = [TasksExtension()] if tasks and mode != "legacy" else None
    return Client(frontend.server, mode=mode, cache=None, extensions=extensions, **options)


def _request(method: str, **params: Any) -> types.Request[Any, Any]:
    return types.Request[Any, Any].model_validate({"method": method, "params": params})


async def rpc(client: Client, method: str, **params: Any) -> dict[str, Any]:
    """A ``tasks/*`` request's result, in wire form."""
    return await client.session.send_request(_request(method, **params), _WIRE)


async def start_task(client: Client, name: str, arguments: dict[str, Any], **task: Any) -> dict[str, Any]:
    """Call ``name`` as a task; the created task, in wire form (the 2026-07-28 shape in that era)."""
    if client.protocol_version == "2026-07-28":
        created = await client.session.call_tool(name, arguments, allow_claimed=True)
        assert isinstance(created, CreatedTask), created
        return created.model_dump(by_alias=True, mode="json", exclude_none=True)
    # The SDK's session checks a tools/call result against CallToolResult, which a CreateTaskResult is not.
    params = {"name": name, "arguments": arguments, "task": task}
    result = await client.session._dispatcher.send_raw_request("tools/call", params, {})
    return dict(result["task"])


def rpc_error(raised: pytest.ExceptionInfo[BaseException]) -> types.ErrorData:
    error = raised.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, MCPError), repr(error)
    return error.error
