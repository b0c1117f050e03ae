"""A call whose arguments cannot be encoded (a lone surrogate) is that call's error, and nobody else's.

The string ``"\\ud800"`` is valid JSON but not UTF-8: sent towards a stdio upstream it used to break the
shared connection, so the server was restarted and another client's call in flight there failed.
"""

import json
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client

from tests.support import TESTKIT, run_gateway, stdio_server, text

pytestmark = pytest.mark.anyio

HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
LONE_SURROGATE_CALL = json.dumps(
    {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "kit__echo", "arguments": {"text": "?"}}}
).replace('"?"', '"\\ud800"')
"""Written by hand: the escape ``\\ud800`` itself on the wire, as a JSON client may send it."""


async def open_session(http: httpx2.AsyncClient, url: str) -> dict[str, str]:
    """A handshake-era session by hand (raw JSON-RPC), warmed up so its calls take the lean path."""
    hello = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
    reply = await http.post(
        url, headers=HEADERS, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello}
    )
    headers = {**HEADERS, "mcp-session-id": reply.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
    await http.post(url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    await http.post(url, headers=headers, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    return headers


async def whoami(client: Client) -> Any:
    result = await client.call_tool("kit__whoami", {})
    assert result.structured_content is not None
    return result.structured_content["pid"]


async def sent_beside_another_call(tmp_path: Path, content: str) -> httpx2.Response:
    """``content`` posted on a session of its own while another client's call is in flight on the shared stdio
    upstream; that call, the upstream process and its state are checked unaffected. The reply to ``content``."""
    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        Client(gw.url, mode="legacy", cache=None) as other,
        httpx2.AsyncClient(timeout=10) as http,
    ):
        pid = await whoami(other)
        headers = await open_session(http, gw.url)
        slow: dict[str, Any] = {}

        async def slow_call() -> None:
            slow["result"] = await other.call_tool("kit__slow", {"seconds": 1.0})

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow_call)
                reply = await http.post(gw.url, headers=headers, content=content)
        assert not slow["result"].is_error
        assert text(slow["result"]) == "done"
        assert await whoami(other) == pid  # not restarted
        ready = (await http.get(f"{gw.base}/readyz")).json()
        assert ready["upstreams"]["kit"]["state"] == "up"
    return reply


async def test_lone_surrogate_fails_its_own_call_and_not_the_shared_stdio_upstream(tmp_path: Path) -> None:
    reply = await sent_beside_another_call(tmp_path, LONE_SURROGATE_CALL)
    answer = json.loads(reply.text)
    assert answer["id"] == 9
    assert answer["result"]["isError"] is True


LONE_SURROGATE_PROMPT = json.dumps(
    {"jsonrpc": "2.0", "id": 10, "method": "prompts/get", "params": {"name": "kit__greet", "arguments": {"name": "?"}}}
).replace('"?"', '"\\ud800"')


async def test_a_lone_surrogate_in_a_prompt_request_fails_that_request_and_not_the_shared_stdio_upstream(
    tmp_path: Path,
) -> None:
    reply = await sent_beside_another_call(tmp_path, LONE_SURROGATE_PROMPT)
    # The SDK side's parser refuses the escape outright (-32700, no id: the request was never read), so the
    # request cannot reach the upstream; the lean path, which parses more leniently, takes only tools/call.
    assert reply.status_code == 400
    assert json.loads(reply.text)["error"]["code"] == -32700
