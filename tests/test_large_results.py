"""Large results end to end (issue 11, point 5): results up to ``gateway.max_result`` pass on every path; a larger
one is that call's error naming the limit, and nobody else's; never an HTTP 500."""

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

from tests.support import TESTKIT, free_port, run_gateway, run_http_upstream, stdio_server

pytestmark = pytest.mark.anyio

ERAS = ["legacy", "2026-07-28"]
KiB, MiB = 2**10, 2**20


@asynccontextmanager
async def client(url: str, mode: str) -> AsyncIterator[Client]:
    """An SDK client that reads results of any size (its own default stops at 1 MiB)."""
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(60, read=None)) as http:
        transport = streamable_http_client(url, http_client=http, max_sse_event_size=None)
        async with Client(transport, mode=mode, cache=None) as c:
            yield c


def only_text(result: types.CallToolResult) -> str:
    [content] = result.content
    assert isinstance(content, types.TextContent)
    return content.text


@pytest.mark.parametrize("kind", ["http", "stdio"])
@pytest.mark.parametrize("mode", ERAS)
async def test_results_of_600_kib_and_4_mib_pass_intact(tmp_path: Path, kind: str, mode: str) -> None:
    port = free_port()
    upstream = f"{{url: 'http://127.0.0.1:{port}/mcp'}}" if kind == "http" else stdio_server(TESTKIT)
    async with (
        run_http_upstream(tmp_path, TESTKIT, port, name="kit"),
        run_gateway(tmp_path, f"servers:\n  kit: {upstream}\n") as gw,
        client(gw.url, mode) as c,
    ):
        for size in (600 * KiB, 4 * MiB):  # each twice in the reply: as text and as structured content
            with anyio.fail_after(30):
                result = await c.call_tool("kit__big", {"size": size})
            assert not result.is_error, (size, result.content)
            assert only_text(result) == "x" * size
            assert result.structured_content == {"result": "x" * size}


@pytest.mark.parametrize(("kind", "mode"), [("http", "legacy"), ("http", "2026-07-28")])
async def test_a_result_over_max_result_is_that_calls_error_and_nobody_elses(
    tmp_path: Path, kind: str, mode: str
) -> None:
    port = free_port()
    upstream = f"{{url: 'http://127.0.0.1:{port}/mcp'}}" if kind == "http" else stdio_server(TESTKIT)
    config = f"gateway: {{max_result: 1MiB}}\nservers:\n  kit: {upstream}\n"
    async with (
        run_http_upstream(tmp_path, TESTKIT, port, name="kit"),
        run_gateway(tmp_path, config) as gw,
        client(gw.url, mode) as big,
        client(gw.url, mode) as other,
    ):
        before = await other.call_tool("kit__whoami", {})
        slow: dict[str, Any] = {}

        async def slow_call() -> None:
            slow["result"] = await other.call_tool("kit__slow", {"seconds": 1.0})

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow_call)
                while "slow started" not in await upstream_events(big):  # noqa: ASYNC110 - the state lives upstream
                    await anyio.sleep(0.05)
                too_big = await big.call_tool("kit__big", {"size": MiB})  # twice in the reply: 2 MiB
                assert too_big.is_error
                assert "gateway.max_result (1 MiB)" in only_text(too_big)
        assert only_text(slow["result"]) == "done"
        fits = await big.call_tool("kit__big", {"size": 400 * KiB})
        assert only_text(fits) == "x" * (400 * KiB)
        after = await other.call_tool("kit__whoami", {})
        assert after.structured_content == before.structured_content  # the same upstream process


async def upstream_events(c: Client) -> list[str]:
    """What the upstream recorded so far (its structured result: the text content is empty while nothing is)."""
    result = await c.call_tool("kit__events", {})
    assert result.structured_content is not None
    return list(result.structured_content["result"])


async def test_a_burst_of_calls_around_the_limit_gets_no_500(tmp_path: Path) -> None:
    port = free_port()
    config = f"gateway: {{max_result: 1MiB}}\nservers:\n  kit: {{url: 'http://127.0.0.1:{port}/mcp'}}\n"
    sizes = [100, 300 * KiB, 2 * MiB]  # the last is over the limit (twice in the reply)
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    statuses: list[int] = []
    bodies: list[str] = []
    async with (
        run_http_upstream(tmp_path, TESTKIT, port, name="kit"),
        run_gateway(tmp_path, config) as gw,
        httpx2.AsyncClient(timeout=60) as http,
    ):
        r = await http.post(gw.url, json=init, headers=headers)
        headers = {**headers, "mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
        await http.post(gw.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)

        async def one(i: int) -> None:
            call = {"name": "kit__big", "arguments": {"size": sizes[i % 3]}}
            r = await http.post(
                gw.url, json={"jsonrpc": "2.0", "id": i + 1, "method": "tools/call", "params": call}, headers=headers
            )
            statuses.append(r.status_code)
            bodies.append(r.text if i % 3 == 2 else "")

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(60):
                    tg.start_soon(one, i)
    assert statuses == [200] * 60
    for body in bodies:
        if body:
            assert '"isError": true' in body.replace('":true', '": true'), body[:400]
            assert "gateway.max_result" in body, body[:400]
    assert len([body for body in bodies if body]) == 20
