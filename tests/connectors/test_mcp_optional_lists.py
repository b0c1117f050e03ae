"""An upstream that lacks an optional list method is served with what it has, never reconnected forever."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client

from connectors.mcp import McpUpstream, State
from gateway.config import StdioServer
from gateway.types import CallContext, Principal, ProviderEvents
from tests.support import PYTHON, ROOT, run_gateway, stdio_server, text

pytestmark = pytest.mark.anyio

PARTIAL = ROOT / "tests" / "servers" / "partial.py"
LOCAL = CallContext(principal=Principal("local", kind="stdio"))


@asynccontextmanager
async def connected(*flags: str, until: str | None = None) -> AsyncIterator[tuple[McpUpstream, anyio.Event]]:
    """The partial server as an upstream, after its first connection attempt; the event fires once it
    lists a tool called ``until``."""
    listed = anyio.Event()

    async def on_change(name: str) -> None:
        if any(tool.name == until for tool in upstream.listing.tools):
            listed.set()

    upstream = McpUpstream("sqlish", StdioServer(command=[PYTHON, str(PARTIAL), *flags]))
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(20):
            await tg.start(upstream.run, ProviderEvents(on_change))
        yield upstream, listed
        tg.cancel_scope.cancel()


def lack_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "connectors.mcp" and r.levelno == logging.WARNING]


async def test_a_server_without_resource_templates_is_served_with_its_tools_and_resources(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with connected() as (upstream, _):
        assert upstream.state is State.UP
        assert {tool.name for tool in upstream.listing.tools} == {"echo", "add_tool"}
        assert [(r.uri, r.template) for r in upstream.listing.resources] == [("memo://insights", False)]
        result = await upstream.call_tool("echo", {"text": "served"}, LOCAL)
        assert result.content[0]["text"] == "served"
        assert len(upstream.warnings) == 1
        assert "resources/templates/list" in upstream.warnings[0]
        assert upstream.connects == 1
    (warning,) = lack_warnings(caplog)
    assert "sqlish" in warning
    assert "resources/templates/list" in warning


async def test_a_list_changed_refresh_skips_the_missing_method_and_warns_no_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with connected(until="fresh") as (upstream, listed):
        await upstream.call_tool("add_tool", {"name": "fresh"}, LOCAL)
        with anyio.fail_after(10):
            await listed.wait()
        assert {tool.name for tool in upstream.listing.tools} == {"echo", "add_tool", "fresh"}
        assert [r.uri for r in upstream.listing.resources] == ["memo://insights"]
        assert upstream.connects == 1
    assert len(lack_warnings(caplog)) == 1


async def test_a_server_that_cannot_list_its_declared_tools_is_served_without_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Reconnecting would never make tools/list appear: serve its resources, say why there are no tools.
    async with connected("--unlisted-tools") as (upstream, _):
        assert upstream.state is State.UP
        assert upstream.listing.tools == ()
        assert [r.uri for r in upstream.listing.resources] == ["memo://insights"]
        assert [w.split()[1] for w in upstream.warnings] == ["tools/list", "resources/templates/list"]
    assert len(lack_warnings(caplog)) == 2


async def test_the_gateway_serves_such_a_server_and_reports_what_it_lacks(tmp_path: Path) -> None:
    async with (
        run_gateway(tmp_path, f"servers:\n  sqlish: {stdio_server(PARTIAL)}\n") as gw,
        Client(gw.url, mode="legacy", cache=None) as client,
        httpx2.AsyncClient() as http,
    ):
        assert {tool.name for tool in (await client.list_tools()).tools} == {"sqlish__echo", "sqlish__add_tool"}
        assert text(await client.call_tool("sqlish__echo", {"text": "through the gateway"})) == "through the gateway"
        assert [str(r.uri) for r in (await client.list_resources()).resources] == ["memo://insights"]
        ready = await http.get(f"{gw.base}/readyz")
        assert ready.status_code == 200
        (warning,) = ready.json()["upstreams"]["sqlish"]["warnings"]
        assert "resources/templates/list" in warning
