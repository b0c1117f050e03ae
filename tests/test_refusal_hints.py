"""A call refused before it reached the tool says when to try again; one that may have had effects does not.

Workflow steps retry refused calls after the hinted wait (``gateway.workflows.engine``); these tests
pin where the hints come from.
"""

import sys
from collections.abc import Sequence

import anyio
import pytest

from connectors.mcp import INITIAL_BACKOFF, McpUpstream, State
from gateway.config import StdioServer
from gateway.dispatch import Dispatcher
from gateway.errors import UpstreamUnavailable
from gateway.registry import Entry, Registry
from gateway.types import CallContext, JSONObject, Principal, ProviderEvents, Tool, ToolResult

pytestmark = pytest.mark.anyio

CALLER = CallContext(principal=Principal("t"))


class Refusing:
    """A provider that raises ``error`` on every call."""

    name = "p"

    def __init__(self, error: UpstreamUnavailable) -> None:
        self.error = error

    async def list_tools(self) -> Sequence[Tool]:
        return [Tool("t", {"name": "t"})]

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        raise self.error


def dispatcher_for(provider: Refusing) -> Dispatcher:
    registry = Registry(tools={"t": Entry("p", "t", Tool("t", {"name": "t"}))})
    return Dispatcher(lambda: registry, {"p": provider})


async def test_invoke_reports_the_wait_a_refusal_hints() -> None:
    refused = dispatcher_for(Refusing(UpstreamUnavailable("not connected", retry_after=1.5)))
    result, outcome, retry_after = await refused.invoke("t", {}, CALLER)
    assert result.is_error
    assert (outcome, retry_after) == ("unavailable", 1.5)


async def test_invoke_reports_no_wait_for_a_call_that_may_have_reached_the_tool() -> None:
    lost = dispatcher_for(Refusing(UpstreamUnavailable("the connection closed during the call")))
    _, outcome, retry_after = await lost.invoke("t", {}, CALLER)
    assert (outcome, retry_after) == ("unavailable", None)


async def test_a_server_that_is_not_connected_refuses_with_the_wait_until_its_next_attempt() -> None:
    dead = StdioServer(command=[sys.executable, "-c", "raise SystemExit(3)"])

    async def ignore(name: str) -> None:
        return None

    upstream = McpUpstream("dead", dead)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            await tg.start(upstream.run, ProviderEvents(ignore))  # after the first attempt, which fails
            assert upstream.state is State.DOWN
            with pytest.raises(UpstreamUnavailable) as caught:
                await upstream.call_tool("anything", {}, CALLER)
            assert caught.value.retry_after is not None
            # The call asked for an attempt at once, which failed too: the next one is a doubled backoff away.
            assert 0 < caught.value.retry_after <= 2 * INITIAL_BACKOFF
            tg.cancel_scope.cancel()
