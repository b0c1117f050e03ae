"""``tools/call`` on an upstream's existing streamable-HTTP session, without the SDK's per-message machinery.

The SDK client costs about twice the CPU of one plain httpx2 exchange per call,
and it closes each SSE response as soon as the JSON-RPC reply arrives, so every
call opens a new TCP connection. This caller speaks the session's wire format
directly: one POST, its response read to the end (the connection goes back to
the pool), progress and log notifications and server→client requests taken
from that response's own stream – so they are routed to the call that caused
them, exactly. The session itself (handshake, listing, the GET stream) stays
with the SDK client; this only borrows its id.
"""

import itertools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2

from connectors._result_limit import event_limit
from gateway.config import DEFAULT_MAX_RESULT

logger = logging.getLogger(__name__)

_DRAIN_SECONDS = 1.0
"""How long to keep reading after the reply for the server to end the stream (then the connection is reused)."""

ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]
LogFn = Callable[[dict[str, Any]], Awaitable[None]]
RequestFn = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""``async (method, params) -> result``; raises ``CallRefused`` to answer with a JSON-RPC error."""


class SessionGone(Exception):
    """The server no longer knows the session (404) or the connection broke: reconnect.

    ``unsent``: the request provably never reached the server (a 404 for the session id, or no connection
    could be made), so it may be sent again on a new session."""

    def __init__(self, message: str, *, unsent: bool = False) -> None:
        self.unsent = unsent
        super().__init__(message)


class CallFailed(Exception):
    """The server answered the request with a JSON-RPC error, or with something that is not JSON-RPC."""


class ReplyTooLarge(Exception):
    """The reply is larger than the caller's ``max_result``; it was not read to the end (the session is fine)."""

    def __init__(self, size: int | None) -> None:
        self.size = size
        """The reply's size when the server announced it (``content-length``), else None."""
        super().__init__(f"the reply is larger than {size} bytes" if size is not None else "the reply is too large")


class CallRefused(Exception):
    """Raised by a ``RequestFn`` to answer a server→client request with an error."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass
class SessionInfo:
    """The upstream session this caller rides on, filled in from the SDK session's own HTTP traffic."""

    session_id: str | None = None
    protocol_version: str | None = None


class HttpCaller:
    """Requests on one upstream session; or, with ``modern``, 2026-07-28 requests (no session: each carries its
    own envelope, which the caller puts in the params, and its routing headers, given per call)."""

    def __init__(
        self,
        http: httpx2.AsyncClient,
        url: str,
        session: SessionInfo,
        *,
        max_result: int = DEFAULT_MAX_RESULT,
        modern: bool = False,
    ) -> None:
        self._http = http
        self._url = url
        self._session = session
        self._max_result = max_result
        self._modern = modern
        self._ids = itertools.count(1)

    def _headers(self) -> dict[str, str]:
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        if self._session.session_id:
            headers["mcp-session-id"] = self._session.session_id
        if self._session.protocol_version:
            headers["mcp-protocol-version"] = self._session.protocol_version
        return headers

    async def call(
        self,
        method: str,
        params: Mapping[str, Any],
        *,
        on_progress: ProgressFn | None = None,
        on_log: LogFn | None = None,
        on_request: RequestFn | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Send one request and return its raw result; ``headers`` are added to the session's.

        Raises:
            SessionGone: the session or connection is gone.
            CallFailed: a JSON-RPC error (its message) or an unusable response.
            ReplyTooLarge: the reply is larger than ``max_result`` bytes.
        """
        request_id = f"patchbay-{next(self._ids)}"
        body_params = dict(params)
        if on_progress is not None:
            body_params["_meta"] = {**(body_params.get("_meta") or {}), "progressToken": request_id}
        body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": body_params}
        sent = self._headers()
        if headers:
            sent.update(headers)
        try:
            return await self._exchange(body, request_id, sent, on_progress, on_log, on_request)
        except anyio.get_cancelled_exc_class():  # the caller gave up (or timed out): tell the server
            if not self._modern:  # 2026-07-28: closing the response, done by now, is the cancellation
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await self._notify_cancelled(request_id)
            raise

    async def _exchange(
        self,
        body: dict[str, Any],
        request_id: str,
        headers: dict[str, str],
        on_progress: ProgressFn | None,
        on_log: LogFn | None,
        on_request: RequestFn | None,
    ) -> dict[str, Any]:
        try:
            async with self._http.stream("POST", self._url, content=json.dumps(body), headers=headers) as r:
                if r.status_code == 404 and not self._modern:  # 2026-07-28 has no session: a 404 is an error reply
                    raise SessionGone("the server no longer knows this session", unsent=True)
                if r.status_code != 200:
                    await r.aread()
                    raise CallFailed(_refusal(r))
                content_type = r.headers.get("content-type", "")
                if content_type.startswith("application/json"):
                    return _reply(json.loads(await self._read_capped(r)), request_id)
                if not content_type.startswith("text/event-stream"):
                    raise SessionGone(f"the server answered with content type {content_type!r}")
                return await self._read_events(r, request_id, on_progress, on_log, on_request)
        except httpx2.SSEError as exc:  # the content type was checked: only an event over the limit is left
            raise ReplyTooLarge(None) from exc
        except httpx2.ConnectError as exc:  # no connection, so no request: safe to send again
            raise SessionGone(f"{type(exc).__name__}: {exc}", unsent=True) from exc
        except (httpx2.TransportError, json.JSONDecodeError) as exc:
            raise SessionGone(f"{type(exc).__name__}: {exc}") from exc

    async def _read_events(
        self,
        response: httpx2.Response,
        request_id: str,
        on_progress: ProgressFn | None,
        on_log: LogFn | None,
        on_request: RequestFn | None,
    ) -> dict[str, Any]:
        """The reply from a response's event stream, handling what comes before it."""
        reply: dict[str, Any] | None = None
        # Past the limit the response is dropped (httpx2.SSEError): its connection closes, the session stays.
        events = aiter(httpx2.EventSource(response, max_event_size=event_limit(self._max_result)))
        async for event in events:
            if not event.data:
                continue
            message = json.loads(event.data)
            if message.get("id") == request_id and "method" not in message:
                reply = message
                break
            await self._handle(message, on_progress, on_log, on_request)
        if reply is None:
            raise SessionGone("the response stream ended without a reply")
        with anyio.move_on_after(_DRAIN_SECONDS):  # let the server end the stream: keeps the connection
            try:
                async for _ in events:
                    pass
            except httpx2.TransportError:  # the reply is in hand; only this connection is not reused
                logger.debug("the stream broke after the reply", exc_info=True)
        return _reply(reply, request_id)

    async def _read_capped(self, response: httpx2.Response) -> bytes:
        """A JSON body, read no further than ``max_result`` bytes."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_result:
            raise ReplyTooLarge(int(declared))
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self._max_result:
                raise ReplyTooLarge(None)
        return bytes(body)

    async def _handle(
        self,
        message: dict[str, Any],
        on_progress: ProgressFn | None,
        on_log: LogFn | None,
        on_request: RequestFn | None,
    ) -> None:
        method = message.get("method")
        params = message.get("params") or {}
        if "id" in message and method:  # a server→client request about this call
            await self._answer(message["id"], method, params, on_request)
        elif method == "notifications/progress" and on_progress is not None:
            await on_progress(params.get("progress", 0), params.get("total"), params.get("message"))
        elif method == "notifications/message" and on_log is not None:
            await on_log(params)
        else:
            logger.debug("ignored %s on a call's stream", method)

    async def _answer(self, request_id: Any, method: str, params: dict[str, Any], on_request: RequestFn | None) -> None:
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
        if on_request is None:
            reply["error"] = {"code": -32601, "message": f"{method} is not supported"}
        else:
            try:
                reply["result"] = await on_request(method, params)
            except CallRefused as exc:
                reply["error"] = {"code": exc.code, "message": str(exc)}
        response = await self._http.post(self._url, content=json.dumps(reply), headers=self._headers())
        if response.status_code >= 400:
            logger.warning("the server refused our answer to %s: HTTP %s", method, response.status_code)

    async def _notify_cancelled(self, request_id: str) -> None:
        notice = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": request_id, "reason": "the client cancelled the call"},
        }
        try:
            await self._http.post(self._url, content=json.dumps(notice), headers=self._headers())
        except httpx2.TransportError as exc:
            logger.debug("could not tell the server about a cancellation: %s", exc)


def _refusal(response: httpx2.Response) -> str:
    """What an HTTP error response says: its status and JSON-RPC error message (2026-07-28 answers errors so), else
    its text."""
    try:
        error = json.loads(response.content).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return f"HTTP {response.status_code}: {error['message']}"
    return f"HTTP {response.status_code}: {response.text[:200]}"


def _reply(message: Any, request_id: str) -> dict[str, Any]:
    if not isinstance(message, dict) or message.get("id") != request_id:
        raise CallFailed("the server answered with something that is not the reply to this request")
    if "error" in message:
        error = message["error"] if isinstance(message["error"], dict) else {}
        raise CallFailed(str(error.get("message", "unknown error")))
    result = message.get("result")
    if not isinstance(result, dict):
        raise CallFailed("the server's reply has no result")
    return result
