"""``HttpCaller``: one request on an upstream's streamable-HTTP session, against in-process servers on 127.0.0.1."""

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from starlette.types import Receive, Scope, Send

from connectors._http_call import CallFailed, CallRefused, HttpCaller, SessionGone, SessionInfo
from tests.inprocess import UPSTREAM_DEPRECATIONS, WITHIN, Upstream, make_upstream, serve_asgi, serve_upstream

pytestmark = [pytest.mark.anyio, *UPSTREAM_DEPRECATIONS]

VERSION = "2025-11-25"
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


async def open_session(http: httpx2.AsyncClient, url: str) -> SessionInfo:
    """A handshake-era session on the server at ``url``, opened by hand as the SDK client would."""
    init = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}
    opened = await http.post(url, json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init})
    session = SessionInfo(opened.headers["mcp-session-id"], VERSION)
    headers = {**HEADERS, "mcp-session-id": session.session_id or "", "mcp-protocol-version": VERSION}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await http.post(url, json=initialized, headers=headers)).status_code == 202
    return session


@asynccontextmanager
async def caller(
    upstream: Upstream | None = None, *, json_response: bool = False, version: str | None = None
) -> AsyncIterator[HttpCaller]:
    """An ``HttpCaller`` on a fresh session of ``upstream`` (a new test upstream by default).

    ``version``: the protocol version the caller says it speaks, if not the session's.
    """
    with anyio.fail_after(WITHIN):
        async with (
            serve_upstream(upstream or make_upstream(), json_response=json_response) as url,
            httpx2.AsyncClient(headers=HEADERS) as http,
        ):
            session = await open_session(http, url)
            session.protocol_version = version or session.protocol_version
            yield HttpCaller(http, url, session)


async def call_tool(http_caller: HttpCaller, name: str, arguments: dict[str, Any], **callbacks: Any) -> dict[str, Any]:
    return await http_caller.call("tools/call", {"name": name, "arguments": arguments}, **callbacks)


def first_text(result: dict[str, Any]) -> str:
    return str(result["content"][0]["text"])


async def test_a_call_returns_the_raw_result_of_its_request() -> None:
    async with caller() as c:
        result = await call_tool(c, "echo", {"text": "raw"})
        assert result == {
            "content": [{"type": "text", "text": "raw"}],
            "structuredContent": {"result": "raw"},
            "isError": False,
        }


async def test_a_plain_json_answer_is_read_as_well_as_a_stream() -> None:
    async with caller(json_response=True) as c:
        assert first_text(await call_tool(c, "echo", {"text": "json"})) == "json"


async def test_progress_and_log_messages_on_the_calls_stream_reach_its_callbacks() -> None:
    progress: list[tuple[float, float | None, str | None]] = []
    logs: list[dict[str, Any]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async def on_log(params: dict[str, Any]) -> None:
        logs.append(params)

    async with caller() as c:
        result = await call_tool(c, "progress", {"steps": 2}, on_progress=on_progress, on_log=on_log)
        assert first_text(result) == "2 steps"
    assert progress == [(1, 2, "step 1"), (2, 2, "step 2")]
    assert [(log["level"], log["data"]) for log in logs] == [("debug", "debug detail"), ("warning", "finished 2 steps")]


async def test_a_calls_own_sampling_request_is_answered_through_on_request() -> None:
    asked: list[tuple[str, dict[str, Any]]] = []

    async def on_request(method: str, params: dict[str, Any]) -> dict[str, Any]:
        asked.append((method, params))
        question = params["messages"][0]["content"]["text"]
        return {"role": "assistant", "content": {"type": "text", "text": f"model says: {question}"}, "model": "m"}

    async with caller() as c:
        result = await call_tool(c, "ask_model", {"prompt": "hello?"}, on_request=on_request)
        assert first_text(result) == "model says: hello?"
    assert [method for method, _ in asked] == ["sampling/createMessage"]


async def test_a_refusal_from_on_request_reaches_the_server_as_a_json_rpc_error() -> None:
    async def on_request(method: str, params: dict[str, Any]) -> dict[str, Any]:
        raise CallRefused(-32600, "the user said no")

    async with caller() as c:
        result = await call_tool(c, "ask_model", {"prompt": "hello?"}, on_request=on_request)
        assert first_text(result) == "refused: the user said no"


async def test_without_on_request_the_server_is_told_its_request_is_not_supported() -> None:
    async with caller() as c:
        result = await call_tool(c, "ask_model", {"prompt": "hello?"})
        assert first_text(result) == "refused: sampling/createMessage is not supported"


async def test_a_json_rpc_error_raises_call_failed_with_its_message() -> None:
    async with caller() as c:
        with pytest.raises(CallFailed, match="[Mm]ethod not found"):
            await c.call("no/such_method", {})


async def test_an_http_error_status_raises_call_failed() -> None:
    async with caller(version="1999-01-01") as c:  # a version the server does not speak: HTTP 400
        with pytest.raises(CallFailed, match="HTTP 400"):
            await call_tool(c, "echo", {"text": "x"})


async def test_a_session_the_server_no_longer_knows_raises_session_gone() -> None:
    upstream = make_upstream()
    with anyio.fail_after(WITHIN):
        async with serve_upstream(upstream) as url, httpx2.AsyncClient(headers=HEADERS) as http:
            session = await open_session(http, url)
            headers = {"mcp-session-id": session.session_id or "", "mcp-protocol-version": VERSION}
            assert (await http.delete(url, headers=headers)).status_code == 200
            with pytest.raises(SessionGone):
                await call_tool(HttpCaller(http, url, session), "echo", {"text": "x"})


async def test_a_server_that_cannot_be_reached_raises_session_gone() -> None:
    async with serve_asgi(_Scripted(b"application/json", b"{}"), lifespan="off") as base:
        url = f"{base}/mcp"  # the port was just served and is closed again now
    async with httpx2.AsyncClient() as http:
        with pytest.raises(SessionGone):
            await call_tool(HttpCaller(http, url, SessionInfo("s", VERSION)), "echo", {})


async def test_cancelling_a_call_tells_the_server_to_cancel_it_too() -> None:
    upstream = make_upstream()
    async with caller(upstream) as c:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(call_tool, c, "wait", {"label": "w"})
                await upstream.waiting.wait()
                scope.cancel()
        await upstream.cancelled.wait()
    assert upstream.events == ["w started", "w cancelled"]


class _Scripted:
    """A server that answers every POST with the same response (whatever JSON-RPC says it should)."""

    def __init__(self, content_type: bytes, body: bytes) -> None:
        self._content_type = content_type
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", self._content_type), (b"content-length", str(len(self._body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self._body})


def sse(*messages: dict[str, Any]) -> bytes:
    return b"".join(b"event: message\ndata: " + json.dumps(m).encode() + b"\n\n" for m in messages)


@pytest.mark.parametrize(
    ("content_type", "body", "error"),
    [
        pytest.param(
            b"text/event-stream",
            sse(
                {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "t", "progress": 1}}
            ),
            SessionGone,
            id="a stream that ends without the reply",
        ),
        pytest.param(
            b"application/json",
            json.dumps({"jsonrpc": "2.0", "id": "someone-else", "result": {}}).encode(),
            CallFailed,
            id="the reply to another request",
        ),
        pytest.param(
            b"text/event-stream",
            sse({"jsonrpc": "2.0", "id": "patchbay-1", "result": "not an object"}),
            CallFailed,
            id="a reply without a result object",
        ),
        pytest.param(b"application/json", b"<html>oops</html>", SessionGone, id="a body that is not JSON"),
    ],
)
async def test_an_unusable_answer_raises(content_type: bytes, body: bytes, error: type[Exception]) -> None:
    async with serve_asgi(_Scripted(content_type, body), lifespan="off") as base, httpx2.AsyncClient() as http:
        with anyio.fail_after(WITHIN), pytest.raises(error):
            await call_tool(HttpCaller(http, f"{base}/mcp", SessionInfo("s", VERSION)), "echo", {})
