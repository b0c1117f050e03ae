"""Upstream tasks end to end: ``patchbay serve`` in front of ``tests/servers/tasking.py`` (a tool that requires
tasks) over stdio and over streamable HTTP, with clients of both eras over real sockets."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.tasks import RELATED_TASK_META_KEY
from gateway.upstream_tasks import TASK_PREFIX
from policies.auth import new_token
from tests.support import ROOT, free_port, run_gateway, run_http_upstream, stdio_server, upstream_events
from tests.taskclient import TasksExtension, rpc, rpc_error, start_task

pytestmark = pytest.mark.anyio

TASKING = ROOT / "tests" / "servers" / "tasking.py"
WITHIN = 20.0
ERAS = ["legacy", "2026-07-28"]
TRANSPORTS = ["stdio", "http"]


@asynccontextmanager
async def upstream(tmp_path: Path, transport: str) -> AsyncIterator[str]:
    """The tasking server as the YAML of server ``kit``."""
    if transport == "stdio":
        yield stdio_server(TASKING)
        return
    port = free_port()
    async with run_http_upstream(tmp_path, TASKING, port, name="tasking"):
        yield f'{{url: "http://127.0.0.1:{port}/mcp"}}'


@asynccontextmanager
async def connect(url: str, mode: str, *, tasks: bool = True, token: str | None = None) -> AsyncIterator[Client]:
    """An SDK client of the gateway (with a bearer ``token``, if given); in 2026-07-28, declaring the tasks
    extension unless told not to."""
    extensions = [TasksExtension()] if tasks and mode != "legacy" else None
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"} if token else None) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode, cache=None, extensions=extensions) as client:
            yield client


async def until_ended(client: Client, task_id: str) -> dict[str, Any]:
    with anyio.fail_after(WITHIN):
        while (task := await rpc(client, "tasks/get", taskId=task_id))["status"] == "working":  # noqa: ASYNC110
            await anyio.sleep(0.02)  # polling is how a client learns a task ended
    return task


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", ERAS)
async def test_a_task_required_tool_runs_as_an_upstream_task_for_a_client_of_each_era(
    tmp_path: Path, transport: str, mode: str
) -> None:
    async with (
        upstream(tmp_path, transport) as kit,
        run_gateway(tmp_path, f"servers:\n  kit: {kit}\n") as gw,
        connect(gw.url, mode) as client,
    ):
        if mode == "legacy":
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            execution = tools["kit__research"].execution
            assert execution is not None
            assert execution.task_support == "required"
        task = await start_task(client, "kit__research", {"topic": "x", "seconds": 0.2})
        assert task["taskId"].startswith(TASK_PREFIX)
        ended = await until_ended(client, task["taskId"])
        assert ended["status"] == "completed"
        if mode == "legacy":
            result = await rpc(client, "tasks/result", taskId=task["taskId"])
        else:
            result = ended["result"]
        assert result["structuredContent"] == {"topic": "x"}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", ERAS)
async def test_a_client_that_knows_no_tasks_gets_the_result_of_a_task_required_tool(
    tmp_path: Path, transport: str, mode: str
) -> None:
    async with (
        upstream(tmp_path, transport) as kit,
        run_gateway(tmp_path, f"servers:\n  kit: {kit}\n") as gw,
        connect(gw.url, mode, tasks=False) as client,
    ):
        await client.list_tools()  # a handshake-era session is established: the lean path would take the call
        result = await client.call_tool("kit__research", {"topic": "x", "seconds": 0.1})
        assert not result.is_error
        assert result.structured_content == {"topic": "x"}
        # The task the gateway ran for it is the gateway's business: its upstream id is not shown.
        assert RELATED_TASK_META_KEY not in (result.meta or {})


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cancelling_a_plain_call_of_a_task_required_tool_cancels_the_upstream_task(
    tmp_path: Path, transport: str
) -> None:
    async with (
        upstream(tmp_path, transport) as kit,
        run_gateway(tmp_path, f"servers:\n  kit: {kit}\n") as gw,
        connect(gw.url, "legacy") as client,
    ):
        with anyio.fail_after(WITHIN):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "kit__research", {"topic": "x", "seconds": 60})
                while "research x started" not in await upstream_events(client):  # noqa: ASYNC110
                    await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
            while "research x cancelled" not in await upstream_events(client):  # noqa: ASYNC110
                await anyio.sleep(0.02)  # the cancellation travels: client → gateway → upstream task


@pytest.mark.parametrize("mode", ERAS)
async def test_over_http_an_upstream_task_is_its_creators_alone(tmp_path: Path, mode: str) -> None:
    tokens = {name: new_token() for name in ("alice", "bob")}
    clients = "".join(f'  {name}: {{token_sha256: "{sha}"}}\n' for name, (_, sha) in tokens.items())
    async with (
        upstream(tmp_path, "http") as kit,
        run_gateway(tmp_path, f"servers:\n  kit: {kit}\nclients:\n{clients}") as gw,
        connect(gw.url, mode, token=tokens["alice"][0]) as alice,
        connect(gw.url, mode, token=tokens["bob"][0]) as bob,
    ):
        task = await start_task(alice, "kit__research", {"topic": "x", "seconds": 60})
        for method in ("tasks/get", "tasks/cancel"):
            with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, sometimes inside an ExceptionGroup
                await rpc(bob, method, taskId=task["taskId"])
            assert rpc_error(raised).code == types.INVALID_PARAMS
        assert (await rpc(alice, "tasks/get", taskId=task["taskId"]))["status"] == "working"
        await rpc(alice, "tasks/cancel", taskId=task["taskId"])
        assert (await rpc(alice, "tasks/get", taskId=task["taskId"]))["status"] == "cancelled"
