"""The HTTP surface of ``patchbay serve`` beside ``/mcp`` (``gateway.app``), served by uvicorn on 127.0.0.1."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx2
import pytest

from gateway.app import serving
from gateway.config import parse_config
from tests.inprocess import WITHIN, serve_asgi
from tests.support import free_port

pytestmark = pytest.mark.anyio

DOWN_UPSTREAM = "gone"
"""A server whose name, state and error ``/readyz`` and ``/metrics`` report."""


@asynccontextmanager
async def endpoints(host: str = "127.0.0.1") -> AsyncIterator[tuple[httpx2.AsyncClient, str]]:
    """A raw HTTP client and the base URL of a gateway (served as ``host``) whose one upstream is down."""
    config = parse_config(f'servers:\n  {DOWN_UPSTREAM}: {{url: "http://127.0.0.1:{free_port()}/mcp"}}\n', environ={})
    with anyio.fail_after(WITHIN):
        async with (
            serving(config, host=host) as app,
            serve_asgi(app, lifespan="off") as base,
            httpx2.AsyncClient() as http,
        ):
            yield http, base


@pytest.mark.parametrize("path", ["/readyz", "/metrics"])
async def test_endpoints_naming_upstreams_refuse_a_rebound_host_or_a_foreign_origin(path: str) -> None:
    async with endpoints() as (http, base):
        rebound = await http.get(f"{base}{path}", headers={"Host": "evil.example:8765"})
        foreign = await http.get(f"{base}{path}", headers={"Origin": "http://evil.example"})
        local = await http.get(f"{base}{path}", headers={"Origin": "http://localhost:8765"})
    assert (rebound.status_code, foreign.status_code) == (421, 403)  # what /mcp answers them
    assert DOWN_UPSTREAM not in rebound.text + foreign.text
    assert local.status_code in (200, 503)  # 503: readiness with its upstream down
    assert DOWN_UPSTREAM in local.text


async def test_endpoints_accept_the_host_the_gateway_is_served_as_and_healthz_any_host() -> None:
    async with endpoints(host="gateway.internal") as (http, base):
        named = await http.get(f"{base}/metrics", headers={"Host": "gateway.internal:8765"})
        rebound = await http.get(f"{base}/metrics", headers={"Host": "evil.example:8765"})
        health = await http.get(f"{base}/healthz", headers={"Host": "10.0.0.7:8765"})
    assert (named.status_code, rebound.status_code) == (200, 421)
    assert (health.status_code, health.text) == (200, "ok")  # says nothing; probes address the machine directly


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "probe", "version": "1"}},
}
BOTH = {"Accept": "application/json, text/event-stream"}


async def test_a_get_of_mcp_without_a_session_is_refused_and_makes_no_session() -> None:
    async with endpoints() as (http, base):
        answers = [await http.get(f"{base}/mcp", headers={"Accept": "text/event-stream"}) for _ in range(2)]
        ended = await http.delete(f"{base}/mcp")

    for answer in answers:
        assert answer.status_code == 405
        assert answer.headers["allow"] == "GET, POST, DELETE"
        assert "mcp-session-id" not in answer.headers
        error = answer.json()["error"]
        assert error["code"] == -32600
        assert "Mcp-Session-Id" in error["message"]
    assert ended.status_code == 400
    assert "mcp-session-id" not in ended.headers
    assert ended.json()["error"]["code"] == -32600


async def test_a_get_of_mcp_on_a_session_still_opens_its_stream() -> None:
    async with endpoints() as (http, base):
        opened = await http.post(f"{base}/mcp", json=INITIALIZE, headers=BOTH)
        session = opened.headers["mcp-session-id"]
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-06-18"}
        async with http.stream("GET", f"{base}/mcp", headers=headers) as stream:
            status, kind = stream.status_code, stream.headers["content-type"]

    assert opened.status_code == 200
    assert (status, kind.split(";")[0]) == (200, "text/event-stream")
