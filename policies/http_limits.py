"""HTTP-level limits of ``patchbay serve``: the request body size (413) and a gateway-wide rate (429).

Pure ASGI middlewares, like :mod:`policies.auth`. ``GlobalRateLimit`` is the backstop under the
policy chain's per-client and per-tool limits: it protects the gateway itself, whoever calls.
"""

import math
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import SharedStateUnavailable
from policies.auth import error_response, under
from policies.state import LimitState, MemoryLimitState

__all__ = ["GLOBAL_BUCKET", "BodyLimit", "GlobalRateLimit"]

GLOBAL_BUCKET = "http:global"
"""The key of the gateway-wide request bucket in the limit state."""


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
        await error_response(413, "payload_too_large", description, {"Connection": "close"})(scope, receive, send)


class GlobalRateLimit:
    """One token bucket for every request to ``paths``: 429 with ``Retry-After`` when it is empty.

    ``rate`` requests per second refill a bucket of ``burst``, kept in ``state`` under
    :data:`GLOBAL_BUCKET`: in this process's memory, or on Redis, where every replica of the gateway
    takes from the same bucket. While a shared state cannot be reached under ``shared_state_failure:
    deny``, requests get 503 with ``Retry-After``.

    Raises:
        ValueError: ``rate`` is not positive or ``burst`` is below 1.
    """

    def __init__(
        self,
        app: ASGIApp,
        rate: float,
        burst: float,
        state: LimitState | None = None,
        *,
        paths: Sequence[str] = ("/mcp",),
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.app, self.rate, self.burst, self.paths = app, rate, burst, tuple(paths)
        self.state = state if state is not None else MemoryLimitState()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not under(scope["path"], self.paths):
            await self.app(scope, receive, send)
            return
        try:
            wait = await self.state.take(GLOBAL_BUCKET, self.rate, self.burst)
        except SharedStateUnavailable as exc:
            retry_after = max(1, math.ceil(exc.retry_after or 1))
            headers = {"Retry-After": str(retry_after)}
            await error_response(503, "unavailable", str(exc), headers, retry_after=retry_after)(scope, receive, send)
            return
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        retry_after = max(1, math.ceil(wait))
        description = f"The gateway is over its request limit; retry after {retry_after} s."
        headers = {"Retry-After": str(retry_after)}
        await error_response(429, "rate_limited", description, headers, retry_after=retry_after)(scope, receive, send)
