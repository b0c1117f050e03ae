"""Upstream tasks through the gateway (``gateway.upstream_tasks``): a tool that requires tasks, served in-process.

The upstream (``tests/servers/tasking.py``) runs ``research`` only as a 2025-11-25 task; its work holds until
the test releases it when asked to, so a task is seen ``working`` without racing the clock.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client

from gateway.gateway import Gateway
from gateway.server import McpFrontend
from gateway.tasks import RELATED_TASK_META_KEY
from gateway.types import Principal
from gateway.upstream_tasks import TASK_PREFIX
from tests.inprocess import WITHIN, gateway_over, serve_asgi
from tests.servers.tasking import Tasking, make_tasking
from tests.taskclient import client, rpc, rpc_error, start_task

pytestmark = pytest.mark.anyio

ERAS = ["legacy", "2026-07-28"]
ALICE = Principal("alice")
BOB = Principal("bob")
DIGEST = """
workflows:
  digest:
    description: Summarise a text.
    input: {type: object, properties: {text: {type: string}}, required: [text]}
    steps:
      - {id: sum, call: kit__summarise, with: {text: "${.input.text}"}}
"""


@dataclass
class Served:
    gateway: Gateway
    upstream: Tasking
    alice: McpFrontend
    bob: McpFrontend


@asynccontextmanager
async def served(extra: str = "") -> AsyncIterator[Served]:
    up = make_tasking()
    with anyio.fail_after(WITHIN):
        async with (
            serve_asgi(up.server.streamable_http_app(host="127.0.0.1")) as base,
            gateway_over(f"{base}/mcp", extra) as gateway,
        ):
            yield Served(gateway, up, McpFrontend(gateway, ALICE), McpFrontend(gateway, BOB))
            up.release.set()


async def until_ended(client: Client, task_id: str) -> dict[str, Any]:
    with anyio.fail_after(WITHIN):
        while (task := await rpc(client, "tasks/get", taskId=task_id))["status"] == "working":  # noqa: ASYNC110
            await anyio.sleep(0.01)  # polling is how a client learns a task ended
    return task


async def until_started(up: Tasking) -> None:
    with anyio.fail_after(WITHIN):
        await up.started.wait()


async def refused(call: Any) -> types.ErrorData:
    with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, sometimes inside an ExceptionGroup
        await call
    return rpc_error(raised)


async def test_the_listing_keeps_an_upstream_tools_task_support() -> None:
    # Handshake era only: a 2026-07-28 Tool has no `execution` (there the server decides what runs as a task).
    async with served() as s, client(s.alice, "legacy") as alice:
        tools = {tool.name: tool for tool in (await alice.list_tools()).tools}
        assert tools["kit__research"].execution is not None
        assert tools["kit__research"].execution.task_support == "required"
        assert tools["kit__summarise"].execution is not None
        assert tools["kit__summarise"].execution.task_support == "optional"
        assert tools["kit__events"].execution is None


async def test_the_gateway_declares_tasks_for_an_upstream_tool_that_runs_as_one() -> None:
    async with served() as s, client(s.alice, "legacy") as alice:
        tasks = alice.server_capabilities.tasks
        assert tasks is not None
        assert tasks.requests is not None
        assert tasks.requests.tools is not None


@pytest.mark.parametrize("mode", ERAS)
async def test_a_task_of_an_upstream_tool_is_created_upstream_under_a_gateway_id_and_completes(mode: str) -> None:
    async with served() as s, client(s.alice, mode) as alice:
        task = await start_task(alice, "kit__research", {"topic": "x", "hold": True}, ttl=60000)
        assert task["status"] == "working"
        assert task["taskId"].startswith(TASK_PREFIX)  # the upstream's own id ("up-1") is never shown
        assert set(s.upstream.tasks) == {"up-1"}
        await until_started(s.upstream)
        assert (await rpc(alice, "tasks/get", taskId=task["taskId"]))["status"] == "working"
        s.upstream.release.set()
        polled = await until_ended(alice, task["taskId"])
        assert polled["status"] == "completed"
        if mode == "legacy":
            assert task["ttl"] == 60000
            result = await rpc(alice, "tasks/result", taskId=task["taskId"])
            assert result["_meta"][RELATED_TASK_META_KEY] == {"taskId": task["taskId"]}
        else:
            assert "ttl" not in polled
            result = polled["result"]  # the 2026-07-28 shape inlines it
            assert RELATED_TASK_META_KEY not in result.get("_meta", {})
        assert result["structuredContent"] == {"topic": "x"}
        assert s.upstream.events == ["research x started", "research x done"]


@pytest.mark.parametrize("mode", ERAS)
async def test_an_upstream_task_ending_with_an_error_result_has_the_status_each_era_gives_it(mode: str) -> None:
    async with served() as s, client(s.alice, mode) as alice:
        task = await start_task(alice, "kit__research", {"topic": "x", "fail": True})
        polled = await until_ended(alice, task["taskId"])
        if mode == "legacy":
            assert polled["status"] == "failed"
            result = await rpc(alice, "tasks/result", taskId=task["taskId"])
        else:
            assert polled["status"] == "completed"  # 2026-07-28: `failed` is for protocol errors only
            result = polled["result"]
        assert result["isError"] is True


async def test_tasks_result_waits_for_the_upstream_task_to_end() -> None:
    async with served() as s, client(s.alice, "legacy") as alice:
        task = await start_task(alice, "kit__research", {"topic": "x", "hold": True})
        await until_started(s.upstream)
        results: list[dict[str, Any]] = []
        async with anyio.create_task_group() as tg:

            async def fetch() -> None:
                results.append(await rpc(alice, "tasks/result", taskId=task["taskId"]))

            tg.start_soon(fetch)
            assert (await rpc(alice, "tasks/get", taskId=task["taskId"]))["status"] == "working"
            assert results == []
            s.upstream.release.set()
        assert results[0]["structuredContent"] == {"topic": "x"}


@pytest.mark.parametrize(("mode", "tasks"), [("legacy", False), ("2026-07-28", False), ("2026-07-28", True)])
async def test_a_client_that_asks_for_no_task_gets_the_result_of_a_tool_that_requires_one(
    mode: str, tasks: bool
) -> None:
    async with served() as s, client(s.alice, mode, tasks=tasks) as alice:
        s.upstream.release.set()
        result = await alice.call_tool("kit__research", {"topic": "x"})  # with the extension: its resolver polls
        assert not result.is_error
        assert result.structured_content == {"topic": "x"}
        assert s.upstream.events == ["research x started", "research x done"]


@pytest.mark.parametrize("mode", ERAS)
async def test_cancelling_an_upstream_task_cancels_it_upstream(mode: str) -> None:
    async with served() as s, client(s.alice, mode) as alice:
        task = await start_task(alice, "kit__research", {"topic": "x", "hold": True})
        await until_started(s.upstream)
        answer = await rpc(alice, "tasks/cancel", taskId=task["taskId"])
        if mode == "legacy":
            assert (answer["taskId"], answer["status"]) == (task["taskId"], "cancelled")
        else:
            assert answer["resultType"] == "complete"  # an acknowledgement
        assert s.upstream.tasks["up-1"].wire["status"] == "cancelled"
        with anyio.fail_after(WITHIN):
            while "research x cancelled" not in s.upstream.events:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert (await rpc(alice, "tasks/get", taskId=task["taskId"]))["status"] == "cancelled"


@pytest.mark.parametrize("mode", ERAS)
async def test_another_clients_upstream_task_is_not_found_like_an_unknown_one(mode: str) -> None:
    methods = ["tasks/get", "tasks/cancel"] + (["tasks/result"] if mode == "legacy" else ["tasks/update"])
    async with served() as s, client(s.alice, mode) as alice, client(s.bob, mode) as bob:
        task = await start_task(alice, "kit__research", {"topic": "x", "hold": True})
        body, _, mac = task["taskId"].partition(".")
        altered = f"{body}.{mac[:-2]}{'AA' if not mac.endswith('AA') else 'BB'}"
        for method in methods:
            mine = await refused(rpc(bob, method, taskId=task["taskId"]))
            unknown = await refused(rpc(bob, method, taskId="no-such-task"))
            forged = await refused(rpc(alice, method, taskId=altered))
            assert mine == unknown == forged
            assert mine.code == types.INVALID_PARAMS
        assert (await rpc(alice, "tasks/get", taskId=task["taskId"]))["status"] == "working"  # bob cancelled nothing
        assert "research x cancelled" not in s.upstream.events


async def test_tasks_list_merges_the_clients_workflow_and_upstream_tasks_and_no_one_elses() -> None:
    async with served(DIGEST) as s, client(s.alice, "legacy") as alice, client(s.bob, "legacy") as bob:
        run = await start_task(alice, "digest", {"text": "hello"})
        upstream = await start_task(alice, "kit__research", {"topic": "x", "hold": True})
        await start_task(bob, "kit__research", {"topic": "y", "hold": True})
        listed = await rpc(alice, "tasks/list")
        assert [t["taskId"] for t in listed["tasks"]] == [upstream["taskId"], run["taskId"]]
        assert listed["tasks"][0]["status"] == "working"
        assert len((await rpc(bob, "tasks/list"))["tasks"]) == 1


async def test_a_task_call_takes_the_dispatch_path_where_policies_and_metrics_see_it() -> None:
    rule = 'policies:\n  - {id: no-summaries, deny: "kit__summarise", reason: "no summaries today"}\n'
    async with served(rule) as s, client(s.alice, "legacy") as alice:
        params = {"name": "kit__summarise", "arguments": {"text": "x"}, "task": {}}
        refused = await alice.session._dispatcher.send_raw_request("tools/call", params, {})
        assert refused["isError"] is True
        assert "no summaries today" in refused["content"][0]["text"]
        assert s.upstream.tasks == {}  # it never reached the upstream
        await start_task(alice, "kit__research", {"topic": "x", "hold": True})
        assert set(s.upstream.tasks) == {"up-1"}
        metrics = s.gateway.metrics
        assert metrics is not None
        calls = {"tool": "kit__research", "server": "kit", "outcome": "ok"}
        assert metrics.registry.get_sample_value("patchbay_tool_calls_total", calls) == 1  # the creating call


async def test_a_task_asked_of_an_upstream_tool_without_task_support_is_method_not_found() -> None:
    async with served() as s, client(s.alice, "legacy") as alice:
        error = await refused(start_task(alice, "kit__events", {}))
        assert error.code == types.METHOD_NOT_FOUND


async def test_an_optional_task_tool_runs_as_a_task_when_asked_and_plainly_otherwise() -> None:
    async with served() as s, client(s.alice, "legacy") as alice:
        task = await start_task(alice, "kit__summarise", {"text": "hello"})
        assert task["taskId"].startswith(TASK_PREFIX)
        result = await rpc(alice, "tasks/result", taskId=task["taskId"])
        assert result["content"][0]["text"] == "summary: hello"
        plain = await alice.call_tool("kit__summarise", {"text": "hello"})
        assert plain.structured_content is None
        assert len(s.upstream.tasks) == 1  # the plain call made no task
