"""The SDK-facing side of ``gateway.max_result``, pinned to the installed SDK: the event limit it takes and the
error it answers an oversized reply with (``connectors._result_limit`` recognises it by its text)."""

from importlib.metadata import version
from pathlib import Path

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from connectors._result_limit import event_limit, is_oversize, reply_size
from tests.support import TESTKIT, free_port, run_http_upstream

pytestmark = pytest.mark.anyio

MiB = 2**20


def test_the_sdk_is_the_version_these_facts_were_checked_on() -> None:
    # On a new SDK, check the oversize error below still holds, then move the pin.
    assert version("mcp") == "2.3.0"


async def test_the_sdk_answers_a_reply_over_its_event_limit_with_an_error_we_recognise(tmp_path: Path) -> None:
    port = free_port()
    async with run_http_upstream(tmp_path, TESTKIT, port, name="kit"):
        http = httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=None))
        transport = streamable_http_client(
            f"http://127.0.0.1:{port}/mcp", http_client=http, max_sse_event_size=event_limit(MiB)
        )
        async with http, Client(transport, mode="legacy", cache=None) as client:
            with anyio.fail_after(20):
                with pytest.raises(MCPError) as caught:
                    await client.call_tool("big", {"size": MiB})
                assert caught.value.error.code == types.CONNECTION_CLOSED
                assert is_oversize(caught.value.error.message)
                fits = await client.call_tool("big", {"size": MiB // 2 - 1024})  # twice in the reply: just fits
                assert not fits.is_error
                echo = await client.call_tool("echo", {"text": "still here"})  # the session outlived the error
                assert echo.content == [types.TextContent(type="text", text="still here")]


def test_a_lost_connection_is_not_taken_for_an_oversized_reply() -> None:
    assert not is_oversize("SSE stream ended without a response")
    assert not is_oversize("Connection closed")


def test_a_reply_is_measured_only_when_it_may_not_fit() -> None:
    assert reply_size({"content": [{"type": "text", "text": "x" * 100}]}, 1000) is None
    size = reply_size({"content": [{"type": "text", "text": "é" * 1000}]}, 1000)  # 2 bytes each in UTF-8
    assert size is not None
    assert size > 2000
    assert reply_size({"content": [{"type": "text", "text": "é" * 300}]}, 1000) is None  # 4 × 300 chars > 1000
