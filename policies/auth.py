"""Who is calling ``patchbay serve`` over HTTP: bearer tokens, or anonymous loopback peers.

Pure ASGI middleware (the shape of ``starlette/middleware/trustedhost.py``) that
answers refusals itself, so a refused request costs no MCP session, body
parsing or upstream call. The config holds only SHA-256 hashes of tokens (a
leaked config leaks no credential); ``Authorization`` is removed from the scope
passed on, so nothing downstream can forward a client's token upstream.
"""

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.types import Principal

__all__ = [
    "PRINCIPAL_KEY",
    "REALM",
    "TOKEN_PREFIX",
    "BearerAuth",
    "check_bind",
    "error_response",
    "is_loopback",
    "new_token",
    "principal_of",
    "token_hash",
    "under",
]

PRINCIPAL_KEY = "patchbay.principal"
"""Key of the authenticated ``Principal`` in ``scope["state"]``."""

TOKEN_PREFIX = "pb_"
"""Marks Patchbay tokens so secret scanners (and people) recognise a leaked one."""

REALM = "patchbay"
_QUERY_TOKEN_PARAMS = frozenset({"access_token", "token"})
_LOOPBACK_ONLY = "This gateway has no `clients:` configured, so it serves only loopback clients."
_NOT_IN_QUERY = "Tokens are never accepted in the query string (URLs get logged); send `Authorization: Bearer <token>`."


def new_token() -> tuple[str, str]:
    """A fresh client token and the SHA-256 hex to put in the config (``patchbay token``)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    """SHA-256 hex (lower case) of the UTF-8 token: what ``clients.<name>.token_sha256`` holds."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def principal_of(scope: Scope) -> Principal | None:
    """The principal ``BearerAuth`` authenticated for this request, or None if it did not run."""
    state = scope.get("state")
    principal = state.get(PRINCIPAL_KEY) if isinstance(state, Mapping) else None
    return principal if isinstance(principal, Principal) else None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1, ::ffff:127.x.x.x and ``localhost``; never resolves DNS."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # any other host name: it may resolve to anything, so it is not loopback
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_bind(host: str, clients: Mapping[str, object]) -> str | None:
    """Why ``serve`` must not listen on ``host`` (anonymous mode off loopback), or None when it may."""
    if clients or is_loopback(host):
        return None
    return (
        f"refusing to listen on {host!r}: there is no `clients:` section, so the gateway is anonymous and "
        "serves only loopback (127.0.0.1, ::1, localhost). Add clients with token hashes "
        "(`patchbay token` prints one) or listen on 127.0.0.1."
    )


def under(path: str, prefixes: Sequence[str]) -> bool:
    """``/mcp`` covers ``/mcp`` and ``/mcp/…`` but not ``/mcpx``."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


async def _refuse(scope: Scope, receive: Receive, send: Send, response: JSONResponse) -> None:
    """Send a refusal over HTTP, or as a websocket denial (close 1008 where the server cannot send one)."""
    if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": "refused by gateway auth"})
        return
    await response(scope, receive, send)


def error_response(
    status: int, error: str, description: str, headers: Mapping[str, str], **extra: object
) -> JSONResponse:
    body = {"error": error, "error_description": description, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


class BearerAuth:
    """Authenticate requests to the ``protected`` paths and record who made them.

    With ``clients`` (name → token SHA-256): a valid ``Authorization: Bearer``
    token, else 401 with an RFC 6750 challenge. Tokens in the query string are
    refused even when valid: URLs end up in proxy and access logs. Without
    ``clients``: anonymous, loopback peers only, else 403. Other paths
    (``/healthz``, ``/readyz``) stay open for probes. Websockets get the same
    check (Patchbay serves none today; a future one must not bypass auth).

    Raises:
        ValueError: a hash is not 64 hex digits, or two clients share a token.
    """

    def __init__(self, app: ASGIApp, clients: Mapping[str, str], *, protected: Sequence[str] = ("/mcp",)) -> None:
        self.app = app
        self.protected = tuple(protected)
        by_hash: dict[str, str] = {}
        for name, digest in clients.items():
            digest = digest.strip().lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"clients.{name}.token_sha256 must be 64 hex digits (`patchbay token` prints one)")
            if digest in by_hash:
                raise ValueError(f"clients {by_hash[digest]!r} and {name!r} have the same token")
            by_hash[digest] = name
        self._clients = tuple(by_hash.items())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not under(scope["path"], self.protected):
            await self.app(scope, receive, send)
            return
        principal_or_refusal = self._authenticate(scope)
        if isinstance(principal_or_refusal, JSONResponse):
            await _refuse(scope, receive, send, principal_or_refusal)
            return
        # A new scope without the credential: nothing downstream can log or forward it.
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"authorization"]
        scope.setdefault("state", {})[PRINCIPAL_KEY] = principal_or_refusal
        await self.app(scope, receive, send)

    def _authenticate(self, scope: Scope) -> Principal | JSONResponse:
        if not self._clients:
            client = scope.get("client")
            if client and is_loopback(str(client[0])):
                return Principal("anonymous", kind="anonymous")
            # No peer address (e.g. a unix socket) is refused too: fail closed.
            return error_response(403, "forbidden", _LOOPBACK_ONLY, {})
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        if any(key in _QUERY_TOKEN_PARAMS for key, _ in query):
            return self._challenge("invalid_request", _NOT_IN_QUERY)
        values = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"authorization"]
        if not values:
            return self._challenge(None, "Send `Authorization: Bearer <token>`.")
        scheme, _, token = values[0].strip().partition(" ")
        if len(values) > 1 or scheme.lower() != "bearer":
            return self._challenge(None, "Send exactly one `Authorization: Bearer <token>` header.")
        name = self._lookup(token_hash(token.strip()))
        if name is None:
            return self._challenge("invalid_token", "The bearer token is not valid for this gateway.")
        return Principal(name, kind="client")

    def _lookup(self, presented: str) -> str | None:
        """The client whose hash matches, comparing against every hash.

        A dict lookup would be safe too (timing would only reveal a prefix of
        the hash of the attacker's own guess, useless without a preimage), but
        constant-time comparison over all entries needs no such argument and
        costs microseconds for any realistic number of clients.
        """
        found = None
        for digest, name in self._clients:
            if hmac.compare_digest(digest, presented):
                found = name
        return found

    @staticmethod
    def _challenge(error: str | None, description: str) -> JSONResponse:
        challenge = f'Bearer realm="{REALM}"'
        if error is not None:  # RFC 6750 §3: no error code when no credentials were presented
            challenge += f', error="{error}"'
        return error_response(401, "unauthorized", description, {"WWW-Authenticate": challenge})
