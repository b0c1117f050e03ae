"""``gateway.max_depth``: a too-deep request is answered at once with a JSON-RPC error on every path.

Hand-built JSON-RPC bodies over real sockets (and ``serve --stdio``'s pipes) to ``patchbay serve``
in front of the testkit over stdio: the lean handshake-era path, the SDK's handshake-era path (a
session it has not shown the lean path yet) and the 2026-07-28 path.
"""

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from gateway.config import MAX_MAX_DEPTH, parse_config
from gateway.errors import ConfigError
from gateway.nesting import nesting_error
from tests.support import PYTHON, ROOT, TESTKIT, JsonLines, run_gateway, stdio_server

pytestmark = pytest.mark.anyio

LIMIT = 64
"""The default."""
AT_ONCE = 5.0
"""Seconds a refusal may take on a loaded machine (the upstream timeout it used to wait out is 30 s)."""
STREAMS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
HANDSHAKE = "2025-11-25"
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}
CONFIG = f"servers:\n  kit: {stdio_server(TESTKIT)}\n"


def call(request_id: int, depth: int, meta: dict[str, Any] | None = None) -> bytes:
    """A ``tools/call`` of ``kit__echo`` whose message nests ``depth`` levels (its arguments are at level 3)."""
    deep = "[" * (depth - 3) + "]" * (depth - 3)
    extra = f', "_meta": {json.dumps(meta)}' if meta else ""
    params = f'{{"name": "kit__echo", "arguments": {{"text": "at {depth}", "deep": {deep}}}{extra}}}'
    return f'{{"jsonrpc": "2.0", "id": {request_id}, "method": "tools/call", "params": {params}}}'.encode()


def refused(request_id: int) -> dict[str, Any]:
    message = f"The request nests deeper than this gateway accepts (gateway.max_depth: {LIMIT} levels)."
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32602, "message": message}}


def reply(response: httpx2.Response) -> Any:
    """The JSON-RPC message of a response, plain JSON or one SSE event."""
    if response.headers["content-type"].startswith("text/event-stream"):
        [data] = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        return json.loads(data)
    return response.json()


async def handshake_session(http: httpx2.AsyncClient, url: str, *, lean: bool) -> dict[str, str]:
    """A handshake-era session's headers; ``lean``: after a listing, so the lean path serves its calls."""
    init = {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
    opened = await http.post(url, json={"jsonrpc": "2.0", "id": "i", "method": "initialize", "params": init})
    session = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": HANDSHAKE}
    await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
    if lean:
        await http.post(url, json={"jsonrpc": "2.0", "id": "l", "method": "tools/list"}, headers=session)
    return session


Post = Callable[[int, int], Awaitable[httpx2.Response]]


def paths(http: httpx2.AsyncClient, url: str) -> dict[str, Post]:
    """How each HTTP path is asked for a call of a given id and depth."""

    async def lean(request_id: int, depth: int) -> httpx2.Response:
        session = await handshake_session(http, url, lean=True)
        return await http.post(url, content=call(request_id, depth), headers=session)

    async def sdk(request_id: int, depth: int) -> httpx2.Response:
        session = await handshake_session(http, url, lean=False)
        return await http.post(url, content=call(request_id, depth), headers=session)

    async def modern(request_id: int, depth: int) -> httpx2.Response:
        headers = {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": "kit__echo"}
        return await http.post(url, content=call(request_id, depth, MODERN_META), headers=headers)

    return {"lean": lean, "sdk handshake": sdk, "2026-07-28": modern}


async def test_every_http_path_refuses_a_too_deep_call_at_once_and_passes_one_at_the_limit(tmp_path: Path) -> None:
    async with run_gateway(tmp_path, CONFIG) as gw, httpx2.AsyncClient(headers=STREAMS, timeout=40) as http:
        request_id = 0
        for name, post in paths(http, gw.url).items():
            for depth in (LIMIT + 1, 200, 500, 10_000):
                request_id += 1
                with anyio.fail_after(AT_ONCE):
                    response = await post(request_id, depth)
                assert (response.status_code, reply(response)) == (200, refused(request_id)), (name, depth)
            request_id += 1
            response = await post(request_id, LIMIT)
            assert response.status_code == 200, name
            result = reply(response)["result"]
            assert result["content"][0]["text"] == f"at {LIMIT}", name
        assert "Traceback" not in gw.process.output()


async def test_a_call_in_flight_is_unaffected_by_another_clients_too_deep_requests(tmp_path: Path) -> None:
    async with run_gateway(tmp_path, CONFIG) as gw, httpx2.AsyncClient(headers=STREAMS, timeout=40) as http:
        session = await handshake_session(http, gw.url, lean=True)
        slow = {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
        slow["params"] = {"name": "kit__slow", "arguments": {"seconds": 1.5}}
        answers: list[httpx2.Response] = []

        async def in_flight() -> None:
            answers.append(await http.post(gw.url, json=slow, headers=session))

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            await anyio.sleep(0.3)
            for request_id, post in enumerate(paths(http, gw.url).values(), start=2):
                for depth in (300, 900):
                    with anyio.fail_after(AT_ONCE):
                        assert reply(await post(request_id, depth)) == refused(request_id)
        [answer] = answers
        assert reply(answer)["result"]["isError"] is False, answer.text


async def test_serve_stdio_answers_a_too_deep_request_at_once_and_passes_one_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    argv = [PYTHON, "-m", "gateway", "serve", str(path), "--stdio"]
    async with await anyio.open_process(argv, cwd=ROOT, stderr=None) as process:
        assert process.stdin is not None
        assert process.stdout is not None
        lines = JsonLines(process.stdout)

        async def send(raw: bytes) -> None:
            assert process.stdin is not None
            await process.stdin.send(raw + b"\n")

        with anyio.fail_after(30):
            init = {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
            await send(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init}).encode())
            assert (await lines.next())["id"] == 0
            await send(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}')
        for request_id, depth in enumerate((LIMIT + 1, 200, 10_000), start=1):
            with anyio.fail_after(AT_ONCE):
                await send(call(request_id, depth))
                assert await lines.next() == refused(request_id)
        with anyio.fail_after(30):
            await send(call(9, LIMIT))
            answer = await lines.next()
        assert answer["id"] == 9
        assert answer["result"]["content"][0]["text"] == f"at {LIMIT}"
        await process.stdin.aclose()
        with anyio.fail_after(30):
            await process.wait()


def test_the_message_is_answered_with_its_id_wherever_the_id_stands_and_invalid_request_outside_params() -> None:
    deep = "[" * 100 + "]" * 100
    after = f'{{"jsonrpc": "2.0", "method": "tools/call", "params": {{"a": {deep}}}, "id": "late"}}'
    assert nesting_error(after, LIMIT) == {**refused(0), "id": "late"}
    outside = f'{{"jsonrpc": "2.0", "id": 3, "method": "ping", "params": {{}}, "x": {deep}}}'
    error = nesting_error(outside.encode(), LIMIT)
    assert error is not None
    assert (error["id"], error["error"]["code"]) == (3, -32600)
    notification = f'{{"jsonrpc": "2.0", "method": "notifications/x", "params": {{"a": {deep}}}}}'
    error = nesting_error(notification, LIMIT)
    assert error is not None
    assert error["id"] is None
    assert nesting_error('{"s": "' + "[" * 1000 + '"}', LIMIT) is None  # brackets in strings are text


async def test_a_too_deep_notification_over_http_is_refused_with_400(tmp_path: Path) -> None:
    async with run_gateway(tmp_path, CONFIG) as gw, httpx2.AsyncClient(headers=STREAMS, timeout=40) as http:
        session = await handshake_session(http, gw.url, lean=True)
        deep = "[" * 1000 + "]" * 1000
        body = f'{{"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {{"x": {deep}}}}}'
        with anyio.fail_after(AT_ONCE):
            response = await http.post(gw.url, content=body, headers=session)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == -32602


@pytest.mark.parametrize("depth", [15, MAX_MAX_DEPTH + 1])
def test_max_depth_is_bounded_in_the_config(depth: int) -> None:
    with pytest.raises(ConfigError, match="max_depth"):
        parse_config(f"gateway: {{max_depth: {depth}}}\n", environ={})


def test_max_depth_is_configurable() -> None:
    config = parse_config("gateway: {max_depth: 20}\n", environ={})
    assert config.gateway.max_depth == 20
    assert nesting_error(call(1, 21), 20) is not None
    assert nesting_error(call(1, 20), 20) is None
