"""An HTTP upstream that no longer knows the connector's session (it restarted while idle, before a heartbeat
noticed): the request provably never reached it, so it is sent again on a new session and the caller sees no error."""

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from connectors.mcp import McpUpstream, State
from gateway.config import parse_config
from gateway.types import CallContext, Principal, ProviderEvents
from tests.inprocess import UPSTREAM_DEPRECATIONS, WITHIN, make_upstream, serve_asgi

pytestmark = [pytest.mark.anyio, *UPSTREAM_DEPRECATIONS]


@dataclass
class Forgetful:
    """An ASGI wrapper that answers 404, as a restarted server does, for the sessions it was told to forget."""

    app: ASGIApp
    known: set[str] = field(default_factory=set)
    forgotten: set[str] = field(default_factory=set)
    refused: int = 0

    def forget(self) -> None:
        self.forgotten |= self.known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            session = dict(scope["headers"]).get(b"mcp-session-id", b"").decode()
            if session in self.forgotten:
                self.refused += 1
                await send({"type": "http.response.start", "status": 404, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return

            async def noting(message: dict) -> None:  # type: ignore[type-arg]
                if message["type"] == "http.response.start":
                    for name, value in message.get("headers", []):
                        if name.lower() == b"mcp-session-id":
                            self.known.add(value.decode())
                await send(message)

            await self.app(scope, receive, noting)
            return
        await self.app(scope, receive, send)


@asynccontextmanager
async def forgetful_upstream() -> AsyncIterator[tuple[McpUpstream, Forgetful]]:
    """A connector (no heartbeat: nothing but a request can find the session gone) to a forgetful server."""
    forgetful = Forgetful(make_upstream().server.streamable_http_app(host="127.0.0.1"))
    async with serve_asgi(forgetful) as base:
        config = parse_config(f'servers:\n  kit: {{url: "{base}/mcp", heartbeat: null}}\n', environ={})
        upstream = McpUpstream("kit", config.servers["kit"])
        send, receive = anyio.create_memory_object_stream[str](math.inf)

        async def changed(name: str) -> None:
            send.send_nowait(name)

        async with send, receive, anyio.create_task_group() as tg:
            with anyio.fail_after(WITHIN):
                await tg.start(upstream.run, ProviderEvents(changed))
            assert upstream.state is State.UP, upstream.last_error
            try:
                yield upstream, forgetful
            finally:
                tg.cancel_scope.cancel()


def context() -> CallContext:
    return CallContext(principal=Principal("ada"))


async def test_a_call_on_a_session_the_server_no_longer_knows_is_sent_again_on_a_new_one() -> None:
    async with forgetful_upstream() as (upstream, forgetful):
        forgetful.forget()
        with anyio.fail_after(WITHIN):
            result = await upstream.call_tool("echo", {"text": "again"}, context())
        assert not result.is_error
        assert result.content[0]["text"] == "again"
        assert forgetful.refused >= 1
        assert upstream.connects == 2
        assert upstream.state is State.UP


async def test_a_prompt_request_on_a_session_the_server_no_longer_knows_is_sent_again_on_a_new_one() -> None:
    async with forgetful_upstream() as (upstream, forgetful):
        forgetful.forget()
        with anyio.fail_after(WITHIN):
            prompt = await upstream.request("prompts/get", {"name": "greet", "arguments": {"person": "Ada"}}, context())
        assert prompt["messages"][0]["content"]["text"] == "Hello, Ada!"
        assert upstream.connects == 2
