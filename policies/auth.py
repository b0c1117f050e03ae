"""HTTP-level protection of ``patchbay serve``: bearer tokens, body size, a gateway-wide rate limit.

Pure ASGI middlewares (the shape of ``starlette/middleware/trustedhost.py``)
that answer refusals themselves, so a refused request costs no MCP session,
body parsing or upstream call. The config holds only SHA-256 hashes of tokens
(a leaked config leaks no credential); ``Authorization`` is removed from the
scope passed on, so nothing downstream can forward a client's token upstream.
``GlobalRateLimit`` is the backstop under the policy chain's per-client and
per-tool limits.
"""

import hashlib
import hmac
import ipaddress
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.types import Principal

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


def check_bind(host: str, clients: Mapping[str, str]) -> str | None:
    """Why ``serve`` must not listen on ``host`` (anonymous mode off loopback), or None when it may."""
    if clients or is_loopback(host):
        return None
    return (
        f"refusing to listen on {host!r}: there is no `clients:` section, so the gateway is anonymous and "
        "serves only loopback (127.0.0.1, ::1, localhost). Add clients with token hashes "
        "(`patchbay token` prints one) or listen on 127.0.0.1."
    )


def _matches(path: str, prefixes: Sequence[str]) -> bool:
    """``/mcp`` covers ``/mcp`` and ``/mcp/…`` but not ``/mcpx``."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


async def _refuse(scope: Scope, receive: Receive, send: Send, response: JSONResponse) -> None:
    """Send a refusal over HTTP, or as a websocket denial (close 1008 where the server cannot send one)."""
    if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": "refused by gateway auth"})
        return
    await response(scope, receive, send)


def _error(status: int, error: str, description: str, headers: Mapping[str, str], **extra: object) -> JSONResponse:
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
        if scope["type"] not in ("http", "websocket") or not _matches(scope["path"], self.protected):
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
            return _error(403, "forbidden", _LOOPBACK_ONLY, {})
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
        return _error(401, "unauthorized", description, {"WWW-Authenticate": challenge})


def _declared_length(scope: Scope) -> int:
    """The ``Content-Length`` header, or 0 (chunked; a malformed one never gets past the HTTP server)."""
    declared = next((v.strip() for k, v in scope["headers"] if k.lower() == b"content-length"), b"")
    return int(declared) if declared.isdigit() else 0


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once a streamed body passes the limit, to stop the app reading."""


class _Guard:
    """One request's ``receive`` and ``send`` for ``BodyLimit``: counts the body, tracks the response."""

    def __init__(self, receive: Receive, send: Send, max_bytes: int) -> None:
        self._receive, self._send, self.max_bytes = receive, send, max_bytes
        self.received, self.exceeded, self.started = 0, False, False

    async def receive(self) -> Message:
        if self.exceeded:
            raise _BodyTooLarge
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.exceeded = self.received > self.max_bytes
            if self.exceeded:
                raise _BodyTooLarge
        return message

    async def send(self, message: Message) -> None:
        if self.exceeded:
            return  # the app's reaction to the cut-off body: the 413 replaces it
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


class BodyLimit:
    """413 for request bodies over ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before reading. A
    chunked body is counted as the app reads it: past the limit, ``receive``
    raises, the app's own reaction (often a 500) is discarded, and a 413 goes
    out instead. If the app had already started its response, the status line
    is on the wire and cannot change, so the middleware raises and the server
    drops the connection: a truncated reply that looks complete would be worse.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return

        guard = _Guard(receive, send, self.max_bytes)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.exceeded:
                raise
            # The app failed because its body was cut off (maybe wrapped in an ExceptionGroup): answered below.
        if guard.exceeded:
            if guard.started:
                raise _BodyTooLarge(f"request body over {self.max_bytes} bytes after the response started")
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        description = f"The request body is larger than this gateway accepts ({self.max_bytes} bytes)."
        await _error(413, "payload_too_large", description, {"Connection": "close"})(scope, receive, send)


class GlobalRateLimit:
    """One token bucket for every request to ``paths``: 429 with ``Retry-After`` when it is empty.

    ``rate`` requests per second refill a bucket of ``burst``. No lock is
    needed: the bucket is read and updated without an ``await`` in between.

    Raises:
        ValueError: ``rate`` is not positive or ``burst`` is below 1.
    """

    def __init__(
        self,
        app: ASGIApp,
        rate: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        paths: Sequence[str] = ("/mcp",),
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.app, self.rate, self.burst, self.clock, self.paths = app, rate, burst, clock, tuple(paths)
        self._tokens = burst
        self._last = clock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _matches(scope["path"], self.paths):
            await self.app(scope, receive, send)
            return
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            await self.app(scope, receive, send)
            return
        retry_after = max(1, math.ceil((1 - self._tokens) / self.rate))
        description = f"The gateway is over its request limit; retry after {retry_after} s."
        headers = {"Retry-After": str(retry_after)}
        await _error(429, "rate_limited", description, headers, retry_after=retry_after)(scope, receive, send)
