"""``connectors._stream_call.StreamCaller`` on the SDK's real stdio transport to a real server (``testkit.py``),
with no session beside it: what it takes off the read stream, and what it leaves for the session."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.message import SessionMessage

from connectors._stream_call import StreamCaller, StreamCallFailed, StreamLost
from tests.support import PYTHON, TESTKIT

pytestmark = pytest.mark.anyio

WITHIN = 20.0


@dataclass
class Link:
    caller: StreamCaller
    left: list[Any] = field(default_factory=list)
    """What the caller did not take (the session's share)."""
    ended: anyio.Event = field(default_factory=anyio.Event)


@asynccontextmanager
async def linked() -> AsyncIterator[Link]:
    """A stdio connection to testkit, initialized through the caller itself, its read stream fed to ``take``."""
    params = StdioServerParameters(command=str(PYTHON), args=[str(TESTKIT)])
    with anyio.fail_after(WITHIN):
        async with stdio_client(params) as (read, write), anyio.create_task_group() as tg:
            link = Link(StreamCaller(write))

            async def reader() -> None:
                try:
                    async for message in read:
                        if not link.caller.take(message):
                            link.left.append(message)
                finally:
                    link.caller.lose("the connection to the server closed")
                    link.ended.set()

            tg.start_soon(reader)
            init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
            assert (await link.caller.call("initialize", init))["protocolVersion"] == "2025-11-25"
            await write.send(SessionMessage(_notification("notifications/initialized")))
            yield link
            tg.cancel_scope.cancel()


def _notification(method: str) -> types.JSONRPCNotification:
    return types.JSONRPCNotification(jsonrpc="2.0", method=method)


async def test_a_call_gets_its_result_and_the_session_sees_nothing_of_it() -> None:
    async with linked() as link:
        result = await link.caller.call("tools/call", {"name": "echo", "arguments": {"text": "hé"}})
        assert result["content"] == [{"type": "text", "text": "hé"}]
        assert link.left == []


async def test_progress_goes_to_its_call_and_a_log_message_is_left_for_the_session() -> None:
    reports: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, total, message))

    async with linked() as link:
        arguments = {"name": "progress", "arguments": {"steps": 2}}
        result = await link.caller.call("tools/call", arguments, on_progress=on_progress)
        assert result["content"][0]["text"] == "2 steps"
        assert reports == [(1, 2, "step 1"), (2, 2, "step 2")]
        methods = [getattr(m.message, "method", None) for m in link.left if isinstance(m, SessionMessage)]
        assert methods == ["notifications/message"]


async def test_a_json_rpc_error_is_raised_with_its_code() -> None:
    async with linked() as link:
        with pytest.raises(StreamCallFailed) as failed:
            await link.caller.call("no/such/method", {})
        assert failed.value.code == -32601


async def test_a_cancelled_call_is_cancelled_at_the_server() -> None:
    async with linked() as link:
        with anyio.move_on_after(0.5):
            await link.caller.call("tools/call", {"name": "slow", "arguments": {"seconds": 30}})
        with anyio.fail_after(5):
            while True:  # the server notes the cancellation once the notice is in
                events = await link.caller.call("tools/call", {"name": "events", "arguments": {}})
                if "slow cancelled" in events["structuredContent"]["result"]:
                    break
                await anyio.sleep(0.05)


async def test_a_lost_connection_fails_the_call_in_flight_and_every_later_one() -> None:
    async with linked() as link:
        with anyio.fail_after(5), pytest.raises(StreamLost):
            await link.caller.call("tools/call", {"name": "crash", "arguments": {}})
        await link.ended.wait()
        with pytest.raises(StreamLost):
            await link.caller.call("tools/call", {"name": "echo", "arguments": {"text": "x"}})
