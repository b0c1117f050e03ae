"""The lean ``tools/call`` path (``gateway.fastpath``) behind ``http_endpoint``, spoken to in raw HTTP on 127.0.0.1.

What tells the two paths apart on the wire: the SDK app always answers a request with an SSE
stream (it runs with ``json_response=False``), the lean path with plain JSON unless something
has to stream during the call; and the lean path's server→client request ids are its own.
"""

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client

from gateway.app import serving
from gateway.config import parse_config
from gateway.server import McpFrontend, http_endpoint
from policies.auth import new_token
from tests.inprocess import (
    LOCAL,
    UPSTREAM_DEPRECATIONS,
    WITHIN,
    Upstream,
    gateway_over,
    make_upstream,
    serve_asgi,
    serve_upstream,
    tool_names,
)
from tests.support import text

pytestmark = [pytest.mark.anyio, *UPSTREAM_DEPRECATIONS]

STREAMS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
VERSION = "2025-11-25"


def rpc(method: str, params: dict[str, Any] | None = None, request_id: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
    return message if request_id is None else {**message, "id": request_id}


def call(name: str, arguments: dict[str, Any], request_id: Any, **meta: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": arguments}
    if meta:
        params["_meta"] = meta
    return rpc("tools/call", params, request_id)


def events(response: httpx2.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of a complete SSE response."""
    return [json.loads(line[len("data: ") :]) for line in response.text.splitlines() if line.startswith("data: ")]


def is_sse(response: httpx2.Response) -> bool:
    return response.headers["content-type"].startswith("text/event-stream")


def is_json(response: httpx2.Response) -> bool:
    return response.headers["content-type"].startswith("application/json")


@dataclass
class Gateway:
    """The gateway's ``/mcp`` endpoint, a raw HTTP client of it, and the upstream behind it."""

    url: str
    http: httpx2.AsyncClient
    upstream: Upstream

    async def post(self, message: dict[str, Any], session: dict[str, str] | None = None, **headers: str) -> Any:
        return await self.http.post(self.url, json=message, headers={**(session or {}), **headers})

    async def open_session(self, capabilities: dict[str, Any] | None = None) -> dict[str, str]:
        """A handshake-era session, its headers; the SDK side has not seen a request on it yet."""
        init = {
            "protocolVersion": VERSION,
            "capabilities": capabilities or {},
            "clientInfo": {"name": "raw", "version": "1"},
        }
        opened = await self.post(rpc("initialize", init, "init"))
        assert opened.status_code == 200, opened.text
        session = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": VERSION}
        assert (await self.post(rpc("notifications/initialized"), session)).status_code == 202
        return session

    async def seen_session(self, capabilities: dict[str, Any] | None = None) -> dict[str, str]:
        """A session the SDK side has answered a listing on, so the lean path knows it."""
        session = await self.open_session(capabilities)
        listed = await self.post(rpc("tools/list", {}, "list"), session)
        assert listed.status_code == 200
        return session


@asynccontextmanager
async def gateway(extra: str = "", *, host: str = "127.0.0.1") -> AsyncIterator[Gateway]:
    """``http_endpoint`` of a frontend over an in-process upstream, served on 127.0.0.1 (named ``host``)."""
    upstream = make_upstream()
    with anyio.fail_after(WITHIN):
        async with serve_upstream(upstream) as upstream_url, gateway_over(upstream_url, extra) as gw:
            app, run = http_endpoint(McpFrontend(gw, LOCAL), host)
            async with run(), serve_asgi(app, lifespan="off") as base, httpx2.AsyncClient(headers=STREAMS) as http:
                yield Gateway(f"{base}/mcp", http, upstream)


async def test_a_sessions_calls_take_the_lean_path_once_the_sdk_side_has_seen_the_session() -> None:
    async with gateway() as gw:
        session = await gw.open_session()
        first = await gw.post(call("kit__echo", {"text": "x"}, 1), session)
        assert is_sse(first)  # unknown to the lean path yet: the SDK answered (and registered the session)
        assert events(first)[-1]["result"]["content"] == [{"type": "text", "text": "x"}]
        second = await gw.post(call("kit__echo", {"text": "y"}, 2), session)
        assert is_json(second)
        assert second.headers["mcp-session-id"] == session["mcp-session-id"]
        assert second.json() == {
            "jsonrpc": "2.0",
            "id": 2,
            "result": {
                "content": [{"type": "text", "text": "y"}],
                "isError": False,
                "structuredContent": {"result": "y"},
            },
        }


async def test_a_lean_call_switches_to_sse_when_progress_is_streamed() -> None:
    async with gateway() as gw:
        session = await gw.seen_session()
        streamed = await gw.post(call("kit__progress", {"steps": 2}, 3, progressToken="p1"), session)
        assert is_sse(streamed)
        messages = events(streamed)
        progress = [m["params"] for m in messages if m.get("method") == "notifications/progress"]
        assert progress == [
            {"progressToken": "p1", "progress": 1, "total": 2, "message": "step 1"},
            {"progressToken": "p1", "progress": 2, "total": 2, "message": "step 2"},
        ]
        assert messages[-1]["id"] == 3
        assert messages[-1]["result"]["content"][0]["text"] == "2 steps"


async def test_log_messages_on_the_lean_path_respect_the_level_the_client_set() -> None:
    async with gateway() as gw:
        session = await gw.seen_session()
        chatty = await gw.post(call("kit__progress", {"steps": 1}, 4), session)
        levels = [m["params"]["level"] for m in events(chatty) if m.get("method") == "notifications/message"]
        assert levels == ["debug", "warning"]
        assert (await gw.post(rpc("logging/setLevel", {"level": "warning"}, 5), session)).status_code == 200
        quiet = await gw.post(call("kit__progress", {"steps": 1}, 6), session)
        logs = [m["params"] for m in events(quiet) if m.get("method") == "notifications/message"]
        assert [(log["level"], log["data"]) for log in logs] == [("warning", "finished 1 steps")]


async def test_other_requests_go_to_the_sdk() -> None:
    async with gateway() as gw:
        session = await gw.seen_session()
        listed = await gw.post(rpc("tools/list", {}, 7), session)
        assert is_sse(listed)
        assert "kit__echo" in {tool["name"] for tool in events(listed)[-1]["result"]["tools"]}
        pinged = await gw.post(rpc("ping", {}, 8), session)
        assert is_sse(pinged)
        assert events(pinged)[-1] == {"jsonrpc": "2.0", "id": 8, "result": {}}
        not_json = await gw.http.post(gw.url, content=b"{not json", headers=session)
        assert not_json.status_code == 400  # the SDK's parse error, not the lean path's


async def test_an_unknown_tool_on_the_lean_path_is_a_json_rpc_invalid_params_error() -> None:
    async with gateway() as gw:
        session = await gw.seen_session()
        unknown = await gw.post(call("kit__nope", {}, 9), session)
        assert is_json(unknown)
        assert unknown.json()["error"]["code"] == types.INVALID_PARAMS
        assert "kit__nope" in unknown.json()["error"]["message"]


async def test_a_refused_call_on_the_lean_path_is_an_is_error_result() -> None:
    async with gateway('policies:\n  - {deny: "kit__echo", reason: "no echoes today"}\n') as gw:
        session = await gw.seen_session()
        refused = await gw.post(call("kit__echo", {"text": "x"}, 10), session)
        assert is_json(refused)
        result = refused.json()["result"]
        assert result["isError"] is True
        assert "no echoes today" in result["content"][0]["text"]


async def test_an_unknown_or_ended_session_is_refused() -> None:
    async with gateway() as gw:
        session = await gw.seen_session()
        stranger = {**session, "mcp-session-id": "0" * 32}
        assert (await gw.post(call("kit__echo", {"text": "x"}, 11), stranger)).status_code == 404
        assert (await gw.http.delete(gw.url, headers=session)).status_code == 200
        ended = await gw.post(call("kit__echo", {"text": "x"}, 12), session)
        assert ended.status_code == 404


async def test_dns_rebinding_protection_applies_to_lean_calls() -> None:
    async with gateway() as gw:
        session = await gw.seen_session()
        message = call("kit__echo", {"text": "x"}, 13)
        assert (await gw.post(message, session, host="evil.example:80")).status_code == 421
        assert (await gw.post(message, session, origin="http://evil.example")).status_code == 403
        assert (await gw.post(message, session, origin="http://localhost:1234")).status_code == 200


async def test_the_host_the_gateway_is_served_as_is_accepted_as_well_as_loopback_names() -> None:
    async with gateway(host="gateway.internal") as gw:
        session = await gw.seen_session()
        message = call("kit__echo", {"text": "x"}, 16)
        assert (await gw.post(message, session, host="gateway.internal:8765")).status_code == 200
        assert (await gw.post(message, session, host="localhost:8765")).status_code == 200
        assert (await gw.post(message, session, host="evil.example:8765")).status_code == 421


async def test_requests_the_lean_path_cannot_answer_as_asked_are_left_to_the_sdk() -> None:
    async with gateway() as gw:
        session = await gw.seen_session()
        message = call("kit__echo", {"text": "x"}, 17)
        json_only = await gw.post(message, session, accept="application/json")
        assert json_only.status_code == 406  # the SDK insists on both; the lean path would have answered
        other_version = await gw.post(message, session, **{"mcp-protocol-version": "2025-06-18"})
        assert is_sse(other_version)  # a version other than the session's: the SDK judges it
        huge = call("kit__echo", {"text": "x" * (5 * 2**20)}, 18)
        assert (await gw.post(huge, session)).status_code == 413


async def test_a_lean_call_is_made_as_the_client_the_auth_middleware_recognised() -> None:
    token, token_sha256 = new_token()
    upstream = make_upstream()
    with anyio.fail_after(WITHIN):
        async with serve_upstream(upstream) as upstream_url:
            config = f"""
servers:
  kit: {{url: "{upstream_url}"}}
clients:
  bot: {{token_sha256: "{token_sha256}", tools: ["kit__echo"]}}
"""
            async with (
                serving(parse_config(config, environ={})) as app,
                serve_asgi(app, lifespan="off") as base,
                httpx2.AsyncClient(headers={**STREAMS, "authorization": f"Bearer {token}"}) as http,
            ):
                gw = Gateway(f"{base}/mcp", http, upstream)
                session = await gw.seen_session()
                allowed = await gw.post(call("kit__echo", {"text": "x"}, 19), session)
                assert is_json(allowed)
                assert allowed.json()["result"]["isError"] is False
                refused = await gw.post(call("kit__progress", {"steps": 1}, 20), session)
                assert is_json(refused)
                assert refused.json()["result"]["isError"] is True


async def answer_sampling(gw: Gateway, session: dict[str, str], reply: dict[str, Any]) -> list[dict[str, Any]]:
    """Call ``kit__ask_model`` and answer its sampling request with ``reply`` (``result`` or ``error``).

    Returns every message of the call's response stream.
    """
    seen: list[dict[str, Any]] = []
    message = call("kit__ask_model", {"prompt": "hello?"}, 14)
    async with gw.http.stream("POST", gw.url, json=message, headers=session) as response:
        assert is_sse(response)
        async for event in httpx2.EventSource(response):
            seen.append(json.loads(event.data))
            if seen[-1].get("method") == "sampling/createMessage":
                answered = await gw.post({"jsonrpc": "2.0", "id": seen[-1]["id"], **reply}, session)
                assert answered.status_code == 202
    return seen


async def test_a_calls_sampling_request_rides_its_response_and_the_answer_is_taken_by_the_lean_path() -> None:
    model_says = {"role": "assistant", "content": {"type": "text", "text": "hi there"}, "model": "m"}
    async with gateway() as gw:
        session = await gw.seen_session({"sampling": {}})
        request, reply = await answer_sampling(gw, session, {"result": model_says})
        assert request["method"] == "sampling/createMessage"
        assert request["id"].startswith("patchbay-s")
        assert request["params"]["messages"][0]["content"]["text"] == "hello?"
        assert reply["id"] == 14
        assert reply["result"]["content"][0]["text"] == "hi there"


async def test_a_client_refusing_a_sampling_request_is_answered_upstream_with_its_reason() -> None:
    async with gateway() as gw:
        session = await gw.seen_session({"sampling": {}})
        *_, reply = await answer_sampling(gw, session, {"error": {"code": -1, "message": "the user said no"}})
        assert reply["id"] == 14
        assert "the user said no" in reply["result"]["content"][0]["text"]


async def test_cancelling_a_lean_call_cancels_it_upstream_and_answers_nothing() -> None:
    async with gateway() as gw:
        session = await gw.seen_session()
        replies: list[Any] = []

        async def wait_call() -> None:
            replies.append(await gw.post(call("kit__wait", {"label": "w"}, 15), session))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_call)
            await gw.upstream.waiting.wait()
            cancel = rpc("notifications/cancelled", {"requestId": 15, "reason": "changed my mind"})
            assert (await gw.post(cancel, session)).status_code == 202
            await gw.upstream.cancelled.wait()
        # No response follows a cancelled request (the spec: SHOULD NOT); the POST ends with 202 and no body, which
        # a client whose session is already closing takes calmly (a late JSON-RPC error broke its teardown).
        assert (replies[0].status_code, replies[0].content) == (202, b"")


# -- 2026-07-28: no session, each request carries its envelope ----------------------------------------

MODERN = "2026-07-28"


def modern_call(name: str, arguments: dict[str, Any], request_id: Any, capabilities: Any = None, **meta: Any) -> Any:
    """A 2026-07-28 ``tools/call`` with its envelope; the headers to send it with."""
    envelope = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": capabilities or {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
    }
    message = call(name, arguments, request_id, **envelope, **meta)
    return message, {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": name}


SDK_SIDE = {"mcp-param-unused": "x"}
"""A header only the SDK side looks at (no tool maps it): the lean path leaves such a request to the SDK, so a test
can compare the two answers to one request."""


async def test_a_2026_client_over_http_is_served() -> None:
    async with gateway() as gw, Client(gw.url, mode="2026-07-28", cache=None) as client:
        assert "kit__echo" in tool_names(await client.list_tools())
        assert text(await client.call_tool("kit__echo", {"text": "modern"})) == "modern"


async def test_a_2026_call_takes_the_lean_path_and_answers_as_the_sdk_side_does() -> None:
    async with gateway() as gw:
        message, headers = modern_call("kit__echo", {"text": "x"}, 21)
        lean = await gw.post(message, **headers)
        sdk = await gw.post(message, **headers, **SDK_SIDE)
        assert (lean.status_code, sdk.status_code) == (200, 200)
        assert is_json(lean)
        assert "mcp-session-id" not in lean.headers
        assert lean.json() == sdk.json()
        result = lean.json()["result"]
        assert result["resultType"] == "complete"
        assert result["content"] == [{"type": "text", "text": "x"}]
        assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "kit"  # the upstream's, kept
        assert lean.content != sdk.content  # the same message, but not the same bytes: two writers


async def test_a_2026_client_declaring_tasks_takes_the_lean_path_for_a_tool_that_needs_none() -> None:
    async with gateway() as gw:
        tasks = {"extensions": {"io.modelcontextprotocol/tasks": {}}}
        message, headers = modern_call("kit__echo", {"text": "x"}, 31, tasks)
        lean = await gw.post(message, **headers)
        sdk = await gw.post(message, **headers, **SDK_SIDE)
        assert lean.json() == sdk.json()
        assert lean.json()["result"]["resultType"] == "complete"
        assert lean.content != sdk.content


async def test_an_unknown_tool_on_the_2026_lean_path_is_answered_as_the_sdk_side_does() -> None:
    async with gateway() as gw:
        message, headers = modern_call("kit__nope", {}, 22)
        lean = await gw.post(message, **headers)
        sdk = await gw.post(message, **headers, **SDK_SIDE)
        assert lean.status_code == sdk.status_code == 400
        assert lean.json() == sdk.json()
        assert lean.json()["error"]["code"] == types.INVALID_PARAMS
        assert "kit__nope" in lean.json()["error"]["message"]


async def test_a_2026_lean_call_streams_progress_and_only_the_log_levels_it_opted_into() -> None:
    async with gateway() as gw:
        message, headers = modern_call("kit__progress", {"steps": 2}, 23, progressToken="p2")
        streamed = await gw.post(message, **headers)
        assert is_sse(streamed)
        messages = events(streamed)
        progress = [m["params"]["progress"] for m in messages if m.get("method") == "notifications/progress"]
        assert progress == [1, 2]
        assert not [m for m in messages if m.get("method") == "notifications/message"]  # it did not opt in
        assert messages[-1]["result"]["content"][0]["text"] == "2 steps"
        meta = {"io.modelcontextprotocol/logLevel": "warning"}
        message, headers = modern_call("kit__progress", {"steps": 1}, 24, **meta)
        logs = [m["params"] for m in events(await gw.post(message, **headers)) if m.get("method")]
        assert [(log["level"], log["data"]) for log in logs] == [("warning", "finished 1 steps")]


async def test_closing_a_2026_lean_calls_response_cancels_it_and_a_silent_one_is_pinged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.fastpath.PING_INTERVAL", 0.2)
    async with gateway() as gw:
        message, headers = modern_call("kit__wait", {"label": "m"}, 25)
        async with gw.http.stream("POST", gw.url, json=message, headers=headers) as response:
            assert is_sse(response)  # the first ping turned the silent response into a stream
            lines = aiter(response.aiter_lines())
            assert await anext(lines) == ": ping"
            assert gw.upstream.waiting.is_set()
        await gw.upstream.cancelled.wait()  # closing the response cancelled the call, upstream too
        assert gw.upstream.events[-1] == "m cancelled"


async def test_2026_calls_the_lean_path_does_not_serve_are_the_sdk_sides() -> None:
    async with gateway() as gw:
        # A tool mapping an argument to an Mcp-Param-* header: the SDK side checks the header against the body.
        message, headers = modern_call("kit__in_region", {"region": "eu"}, 26)
        unchecked = await gw.post(message, **headers)
        assert unchecked.status_code == 400
        assert unchecked.json()["error"]["code"] == types.HEADER_MISMATCH
        checked = await gw.post(message, **headers, **{"mcp-param-region": "eu"})
        assert checked.json()["result"]["content"][0]["text"] == "in eu"
        # (A client that can be asked something has its call held by the SDK side: tests/test_held_calls.py.)
        # An envelope the SDK refuses.
        message, headers = modern_call("kit__echo", {"text": "x"}, 28)
        mismatched = await gw.post(message, **{**headers, "mcp-name": "kit__other"})
        assert mismatched.status_code == 400
        assert mismatched.json()["error"]["code"] == types.HEADER_MISMATCH


async def test_dns_rebinding_protection_applies_to_2026_lean_calls() -> None:
    async with gateway() as gw:
        message, headers = modern_call("kit__echo", {"text": "x"}, 29)
        assert (await gw.post(message, **headers, host="evil.example:80")).status_code == 421
        assert (await gw.post(message, **headers, origin="http://evil.example")).status_code == 403
        assert (await gw.post(message, **headers)).status_code == 200
