"""Fallback per upstream server: when a server fails, answer with another tool instead.

Routes map a glob on the upstream's own tool name (``call.target``) to the
registry name of the tool to call instead, e.g. a replica or a cache. The
fallback is called through ``call_tool`` – the gateway's full dispatch path –
so its own policies, limits, metrics and audit apply to it as to any call.

It steps in when the call raises ``UpstreamError`` (the server failed) or
``CircuitOpen`` (the breaker, further in, knows it is failing). A tool's own
``isError`` result is an answer and is returned as it is; other refusals (a
rate limit, a forbidden tool) are about the caller, not the server, and would
be wrong to route around.

No fallback falls back again: a fallback that fails raises the original error,
with the fallback's failure added to its message. The marker is a context
variable set while the fallback runs, not a ``_meta`` key on the call: the
request's ``_meta`` is forwarded upstream and comes from the client, so a
marker there would leak to servers and could be set by anyone. Being a
context variable, it also covers everything the fallback call does in turn
(a workflow tool's steps, say): nothing under a fallback falls back.
"""

import dataclasses
import re
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar

from gateway.errors import CircuitOpen, GatewayError, UpstreamError
from gateway.types import CallContext, CallNext, JSONObject, ToolCall, ToolResult
from policies._globs import matcher

__all__ = ["META_KEY", "FallbackPolicy"]

META_KEY = "io.patchbay/fallback"
"""The result ``_meta`` key saying that a fallback answered: ``{"from", "to", "reason"}``."""

_in_fallback: ContextVar[bool] = ContextVar("patchbay_in_fallback", default=False)

CallTool = Callable[[str, JSONObject, CallContext], Awaitable[ToolResult]]


class FallbackPolicy:
    """Answers failed calls to configured servers with their fallback tool; other calls pass straight through."""

    def __init__(self, routes: Mapping[str, Mapping[str, str]], call_tool: CallTool) -> None:
        # Globs are tried in the order the config lists them; the first match wins.
        self._routes = {
            server: tuple((matcher((glob,)), name) for glob, name in server_routes.items())
            for server, server_routes in routes.items()
            if server_routes
        }
        self._call_tool = call_tool

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult:
        """Call, and on an upstream failure or open circuit call the route's fallback tool instead.

        Raises:
            UpstreamError, CircuitOpen: the call failed and no fallback applies, or the fallback failed too
                (its failure is then appended to the message).
        """
        routes = self._routes.get(call.provider)
        if routes is None:
            return await call_next(call)
        try:
            return await call_next(call)
        except (UpstreamError, CircuitOpen) as exc:
            fallback = _route(routes, call.target)
            if fallback is None or _in_fallback.get():
                raise
            return await self._fall_back(call, fallback, exc)

    async def _fall_back(self, call: ToolCall, fallback: str, error: GatewayError) -> ToolResult:
        token = _in_fallback.set(True)
        try:
            result = await self._call_tool(fallback, call.arguments, call.context)
        except GatewayError as fallback_error:
            error.args = (f"{error} (fallback {fallback!r} failed too: {fallback_error})",)
            raise error from fallback_error
        finally:
            _in_fallback.reset(token)
        note = {"from": call.name, "to": fallback, "reason": str(error)}
        return dataclasses.replace(result, meta={**(result.meta or {}), META_KEY: note})


def _route(routes: tuple[tuple[re.Pattern[str], str], ...], target: str) -> str | None:
    for pattern, fallback in routes:
        if pattern.fullmatch(target):
            return fallback
    return None
