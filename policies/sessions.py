"""Handshake-era sessions belong to the client that opened them.

A streamable-HTTP session is named by its ``Mcp-Session-Id`` alone. Without this check, any client
with a valid token that learned another client's session id could send requests in that session,
or open its stream and receive what the gateway sends there. :class:`SessionOwnership` remembers
which principal each session was created for (from the response that hands out the id) and answers
a request carrying that id for anyone else as the MCP spec answers an unknown session: 404.

A session lives in the process that opened it: replicas behind one address need the load balancer
to send each session's requests to one replica (sticky sessions, on ``Mcp-Session-Id``). A session
id this process does not hold – it ended, it expired, or another replica opened it – gets the same
404, whose message says so (the SDK's own says only "Session not found"), so that a client or an
operator can tell what happened; a client then opens a new session, as the spec asks.
"""

import json
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
            await self.app(scope, receive, _Explained(send))
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


NOT_HERE = (
    "Session not found: this gateway does not hold it. It ended or expired, or another replica of the "
    "gateway opened it (a session lives in the process that opened it: behind a load balancer, send each "
    "session's requests to one replica). Open a new session with initialize."
)
"""The message of every 404 for a session: unknown here, ended, or another client's (told apart by none)."""


def _not_found_body(request_id: object = None) -> bytes:
    body = {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32600, "message": NOT_HERE}}
    return json.dumps(body).encode()


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(json.loads(_not_found_body()), status_code=404)(scope, receive, send)


class _Explained:
    """``send`` of a request that names a session: the SDK's 404 for a session it does not hold gets :data:`NOT_HERE`
    as its message (its JSON-RPC error code and id are kept)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._held: Message | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 404:
            self._held = message  # sent with the new body's length
            return
        if self._held is None or message["type"] != "http.response.body":
            await self._send(message)
            return
        start, self._held = self._held, None
        body = message.get("body", b"")
        try:
            error = json.loads(body)
            request_id = error.get("id")
            known = error["error"]["message"] == "Session not found"
        except (ValueError, TypeError, KeyError, AttributeError):
            known = False
        if known and not message.get("more_body", False):
            body = _not_found_body(request_id)
            headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
            start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
            message = {**message, "body": body}
        await self._send(start)
        await self._send(message)
