"""A handshake-era ``GET`` or ``DELETE`` of ``/mcp`` without a session: refused before the SDK sees it.

A GET opens the stream on which the server speaks first; in the handshake eras it belongs to a
session, so without an ``Mcp-Session-Id`` there is nothing to open. The SDK's session manager
registers a new session for every request that has no id, and its transport then refuses the GET
(400, "Missing session ID") with the new id in the response headers: each such GET, a load
balancer's probe, a client trying for the stream before ``initialize``, minted a session id that
led nowhere. Here it is answered 405 with ``Allow`` and a JSON-RPC error saying a session is
needed. The transport rules say a GET the server will not serve as an event stream gets 405, and
405 is what clients treat as "no stream here, go on with POST"; the MCP SDK's own change for
this (modelcontextprotocol/python-sdk#3129) answers the same.

A DELETE ends a session, so without one it is a bad request: 400, as the transport rules say of any
request but ``initialize`` that lacks the session id (the SDK answered that too, minting an id as well).
A request that names the 2026-07-28 era (its ``MCP-Protocol-Version`` header) is the SDK's to answer.
"""

import json
from collections.abc import Collection

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["SessionRequired"]

ALLOW = b"GET, POST, DELETE"
INVALID_REQUEST = -32600
GET_MESSAGE = (
    "Method Not Allowed: a GET stream belongs to a session; send `initialize` by POST first, then GET with the "
    "Mcp-Session-Id header it answers with"
)
DELETE_MESSAGE = "Bad Request: DELETE ends a session, and names it in the Mcp-Session-Id header, which is missing"


class SessionRequired:
    """ASGI app in front of the SDK's ``/mcp``: a handshake-era GET without ``Mcp-Session-Id`` gets 405, a DELETE
    400, with a JSON-RPC error saying why; neither makes a session."""

    def __init__(self, app: ASGIApp, handshake_versions: Collection[str]) -> None:
        self._app = app
        self._handshake = frozenset(version.encode("latin-1") for version in handshake_versions)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"] if scope["type"] == "http" else None
        if method in ("GET", "DELETE") and self._needs_session(scope):
            status, message, extra = (
                (405, GET_MESSAGE, [(b"allow", ALLOW)]) if method == "GET" else (400, DELETE_MESSAGE, [])
            )
            body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": INVALID_REQUEST, "message": message}})
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body.encode()})
            return
        await self._app(scope, receive, send)

    def _needs_session(self, scope: Scope) -> bool:
        session: bytes | None = None
        version: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"mcp-session-id":
                session = value
            elif name == b"mcp-protocol-version":
                version = value
        return not session and (version is None or version in self._handshake)
