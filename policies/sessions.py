"""Handshake-era sessions belong to the client that opened them.

A streamable-HTTP session is named by its ``Mcp-Session-Id`` alone. Without this check, any client
with a valid token that learned another client's session id could send requests in that session,
or open its stream and receive what the gateway sends there. :class:`SessionOwnership` remembers
which principal each session was created for (from the response that hands out the id) and answers
a request carrying that id for anyone else as the MCP spec answers an unknown session: 404.
"""

from collections import OrderedDict

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from policies.auth import principal_of

__all__ = ["SessionOwnership"]

_HEADER = b"mcp-session-id"
_REMEMBERED = 100_000
"""Sessions remembered; the oldest are forgotten first (idle sessions expire in the SDK long before)."""


class SessionOwnership:
    """Pure ASGI middleware, inside the authentication: binds each session id to its creator's principal."""

    def __init__(self, app: ASGIApp, *, remembered: int = _REMEMBERED) -> None:
        self.app = app
        self._owners: OrderedDict[bytes, str] = OrderedDict()
        self._remembered = remembered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        principal = principal_of(scope)
        caller = f"{principal.kind}:{principal.id}" if principal is not None else ""
        session = next((value for name, value in scope["headers"] if name == _HEADER), None)
        if session is not None:
            owner = self._owners.get(session)
            if owner is not None and owner != caller:
                await _not_found(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return

        async def remember(message: Message) -> None:
            if message["type"] == "http.response.start":
                created = next((value for name, value in message.get("headers", ()) if name.lower() == _HEADER), None)
                if created is not None:
                    self._owners[created] = caller
                    while len(self._owners) > self._remembered:
                        self._owners.popitem(last=False)
            await send(message)

        await self.app(scope, receive, remember)


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}}
    await JSONResponse(body, status_code=404)(scope, receive, send)
