"""The hot request, served lean: ``tools/call`` over streamable HTTP.

Two eras take this path: a handshake-era ``tools/call`` on a session the SDK has already
established, and a 2026-07-28 ``tools/call`` (no session; each request carries its own envelope),
once the SDK side has checked that envelope (``SessionHost.modern``) and found nothing this path
does not do: no task, no input round trip, no ``Mcp-Param-*`` headers to validate.

The SDK's server spends about 3 ms of CPU on each message (memory streams,
several tasks, an SSE response machine); a bare ASGI answer costs about
0.25 ms. This path answers ``tools/call`` on a session the SDK has already
established, with the session's own semantics: a plain JSON response when
nothing has to stream, switching to SSE as soon as progress, a log message or a
server→client request must reach the client during the call; the client's
answers to those requests and its ``notifications/cancelled`` are taken here
too. A 2026-07-28 call has no back channel: its log messages (the levels it opted
into) and progress ride its response, and closing the response cancels the call.
Everything else – the handshake, listings, other methods, sessions the SDK
has not shown us yet, any request this path is unsure of – goes to the SDK app
untouched, so behaviour is the SDK's wherever this path steps aside.
"""

import itertools
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.dispatch import Dispatcher
from gateway.errors import ClientRefused, ToolNotFound, UpstreamError
from gateway.types import LOG_LEVELS, CallContext, JSONObject, Principal, ToolResult
from policies.auth import principal_of

MAX_BODY = 4 * 1024 * 1024
"""Larger bodies are left to the SDK (which refuses them with 413)."""

PING_INTERVAL = 15.0
"""Seconds of silence after which a 2026-07-28 call's response turns to SSE and sends a comment line, as the
SDK's does, so that a proxy's idle-read timeout does not close it."""

_INVALID_PARAMS = -32602
_ROUND_TRIP_KEYS = frozenset(("task", "inputResponses", "requestState"))
"""``tools/call`` params that make a 2026-07-28 call the SDK side's: a task, or the retry of an input round trip."""
_INTERNAL_ERROR = -32603


@dataclass
class FastSession:
    """What this path knows of one client session; registered by the SDK-side handlers when they first see it."""

    capabilities: JSONObject
    protocol_version: str
    log_level: Callable[[], str]
    forwardable_meta: Callable[[Mapping[str, Any] | None], dict[str, Any] | None]
    pending: dict[str, "_Pending"] = field(default_factory=dict)
    calls: dict[Any, anyio.CancelScope] = field(default_factory=dict)


@dataclass(frozen=True)
class ModernCall:
    """A 2026-07-28 ``tools/call`` whose envelope the SDK side accepted for this path."""

    capabilities: JSONObject
    protocol_version: str
    meta: JSONObject | None
    """The request's ``_meta`` to forward upstream (``CallContext.meta``)."""
    log_level: str | None
    """The levels of log messages the client opted into on this request (that one and above); None: none."""
    progress_token: Any = None
    held: bool = False
    """The client can be asked something (sampling, elicitation): the call is held for its answers
    (``SessionHost.hold``), and what the upstream asks comes back as an input-required result."""


class SessionHost(Protocol):
    """The SDK side, as this path needs it."""

    modern_versions: frozenset[str]
    """The 2026-07-28-era protocol versions (requests that carry their own envelope)."""

    def lookup(self, session_id: str) -> FastSession | None:
        """The live session, or None (unknown to this path, ended, or expiring)."""
        ...

    def activity(self, session_id: str) -> AbstractContextManager[None]:
        """Mark a request in flight on the session (its idle countdown stops meanwhile)."""
        ...

    async def refusal(self, scope: Scope) -> ASGIApp | None:
        """The SDK's own answer if the request's Host, Origin or Content-Type is not acceptable."""
        ...

    def modern(self, scope: Scope, message: dict[str, Any]) -> ModernCall | None:
        """The call if this path may answer it: its envelope is valid and it asks for nothing only the SDK side
        does (a task, an input round trip, ``Mcp-Param-*`` validation); else None."""
        ...

    async def hold(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        """The call, held for its 2026-07-28 client's answers: its result, or the questions asked meanwhile.

        Raises:
            ToolNotFound: no such tool (for this client).
        """
        ...

    def modern_result(self, result: ToolResult, version: str) -> JSONObject:
        """A call's outcome as the result of that version the SDK side would send (``resultType``, ``serverInfo``;
        an input-required result shaped for the version)."""
        ...

    def error_status(self, code: int) -> int:
        """The HTTP status of a 2026-07-28 JSON-RPC error response with this code."""
        ...


@dataclass
class _Pending:
    done: anyio.Event = field(default_factory=anyio.Event)
    reply: dict[str, Any] = field(default_factory=dict)


class FastPath:
    """ASGI app for ``/mcp``: lean ``tools/call``, the SDK app for everything else."""

    def __init__(self, sdk: ASGIApp, host: SessionHost, dispatcher: Dispatcher, principal: Principal) -> None:
        self._sdk = sdk
        self._host = host
        self._dispatcher = dispatcher
        self._principal = principal
        self._ids = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self._sdk(scope, receive, send)
        headers = dict(scope["headers"])
        session_id = headers.get(b"mcp-session-id", b"").decode("latin-1")
        session = self._host.lookup(session_id) if session_id else None
        version = headers.get(b"mcp-protocol-version", b"").decode("latin-1")
        accept = headers.get(b"accept", b"")
        if b"application/json" not in accept or b"text/event-stream" not in accept:
            return await self._sdk(scope, receive, send)
        if session is None:
            if not session_id and version in self._host.modern_versions:
                return await self._modern(scope, receive, send)
            return await self._sdk(scope, receive, send)
        if version and version != session.protocol_version:
            return await self._sdk(scope, receive, send)
        body, complete = await _read_body(receive)
        message = _parse(body) if complete else None
        if message is None:
            return await self._sdk(scope, _replay(body, complete, receive), send)
        refusal = await self._host.refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        method = message.get("method")
        params = message.get("params")
        # A task-augmented call (params.task) is the SDK side's: it answers with a task, not a CallToolResult.
        if method == "tools/call" and "id" in message and isinstance(params, dict) and "task" not in params:
            with self._host.activity(session_id):
                return await self._call(session, session_id, message, send, principal_of(scope) or self._principal)
        if method is None and message.get("id") in session.pending:  # the client's answer to our request
            pending = session.pending.pop(message["id"])
            pending.reply = message
            pending.done.set()
            return await _accepted(send)
        if method == "notifications/cancelled":
            request_id = (message.get("params") or {}).get("requestId")
            if request_id in session.calls:
                session.calls[request_id].cancel()
                return await _accepted(send)
        return await self._sdk(scope, _replay(body, complete, receive), send)

    async def _modern(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request without a session, of the 2026-07-28 era: a plain ``tools/call`` is answered here."""
        body, complete = await _read_body(receive)
        message = _parse(body) if complete else None
        params = message.get("params") if message is not None else None
        call = None
        if (
            message is not None
            and message.get("method") == "tools/call"
            and "id" in message
            and isinstance(params, dict)
            and not _ROUND_TRIP_KEYS.intersection(params)
        ):
            call = self._host.modern(scope, message)
        if message is None or call is None:
            return await self._sdk(scope, _replay(body, complete, receive), send)
        refusal = await self._host.refusal(scope)
        if refusal is not None:
            return await refusal(scope, _replay(body, complete, receive), send)
        principal = principal_of(scope) or self._principal
        responder = _Responder(send, None)
        request_id = message["id"]
        params = message["params"]
        name, arguments = params.get("name"), params.get("arguments") or {}
        if not isinstance(name, str) or not isinstance(arguments, dict):
            return await responder.finish(
                _error(request_id, _INVALID_PARAMS, "bad params"), self._host.error_status(_INVALID_PARAMS)
            )
        token = call.progress_token
        context = CallContext(
            principal=principal,
            progress=_progress(responder, token) if token is not None else None,
            client=_ModernChannel(call, responder),
            meta=call.meta,
            log_level=call.log_level,
        )
        reply: dict[str, Any] | None = None
        status = 200
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch, receive, responder, tg.cancel_scope)
            try:
                if call.held:
                    result = await self._host.hold(name, arguments, context)
                else:
                    result = await self._dispatcher.call(name, arguments, context)
                answer = self._host.modern_result(result, call.protocol_version)
                reply = {"jsonrpc": "2.0", "id": request_id, "result": answer}
            except ToolNotFound as exc:
                reply = _error(request_id, _INVALID_PARAMS, str(exc))
                status = self._host.error_status(_INVALID_PARAMS)
            tg.cancel_scope.cancel()
        if reply is None:  # the client closed the response: it cancelled the call
            return
        await responder.finish(reply, status)

    async def _call(
        self, session: FastSession, session_id: str, message: dict[str, Any], send: Send, principal: Principal
    ) -> None:
        params: dict[str, Any] = message["params"]
        name = params.get("name")
        arguments = params.get("arguments") or {}
        if not isinstance(name, str) or not isinstance(arguments, dict):
            return await _Responder(send, session_id).finish(_error(message["id"], _INVALID_PARAMS, "bad params"))
        responder = _Responder(send, session_id)
        meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else None
        token = meta.get("progressToken") if meta else None
        context = CallContext(
            principal=principal,
            progress=_progress(responder, token) if token is not None else None,
            client=_Channel(session, responder, self._ids),
            meta=session.forwardable_meta(meta),
        )
        reply: dict[str, Any] | None = None
        with anyio.CancelScope() as scope:
            session.calls[message["id"]] = scope
            try:
                result = await self._dispatcher.call(name, arguments, context)
                reply = {"jsonrpc": "2.0", "id": message["id"], "result": result.wire()}
            except ToolNotFound as exc:
                reply = _error(message["id"], _INVALID_PARAMS, str(exc))
            finally:
                session.calls.pop(message["id"], None)
        if reply is None:  # the client cancelled it: no response follows (the spec's SHOULD NOT), only the POST's end
            await responder.abandon()
        else:
            await responder.finish(reply)


class _Responder:
    """One HTTP response: JSON if the call ends before anything had to stream, else SSE."""

    def __init__(self, send: Send, session_id: str | None) -> None:
        self._send = send
        self._session = [(b"mcp-session-id", session_id.encode("latin-1"))] if session_id is not None else []
        self._streaming = False
        self._lock = anyio.Lock()

    async def event(self, message: JSONObject) -> None:
        async with self._lock:
            if not self._streaming:
                await self._start(b"text/event-stream", None)
                self._streaming = True
            await self._send({"type": "http.response.body", "body": _sse(message), "more_body": True})

    async def abandon(self) -> None:
        """End the response without a JSON-RPC message: the stream if one was started, else 202 Accepted."""
        async with self._lock:
            if self._streaming:
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            headers = [(b"content-length", b"0"), *self._session]
            await self._send({"type": "http.response.start", "status": 202, "headers": headers})
            await self._send({"type": "http.response.body", "body": b""})

    async def ping(self) -> None:
        """Send an SSE comment line, turning the response to SSE if it is not yet."""
        async with self._lock:
            if not self._streaming:
                await self._start(b"text/event-stream", None)
                self._streaming = True
            await self._send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})

    async def finish(self, message: JSONObject, status: int = 200) -> None:
        """Send the last message: as an SSE event if streaming, else as JSON with ``status``."""
        async with self._lock:
            if self._streaming:
                await self._send({"type": "http.response.body", "body": _sse(message), "more_body": False})
                return
            body = json.dumps(message).encode()
            await self._start(b"application/json", len(body), status)
            await self._send({"type": "http.response.body", "body": body})

    async def _start(self, content_type: bytes, length: int | None, status: int = 200) -> None:
        headers = [(b"content-type", content_type), *self._session]
        if length is None:
            headers.append((b"cache-control", b"no-cache, no-transform"))
        else:
            headers.append((b"content-length", str(length).encode()))
        await self._send({"type": "http.response.start", "status": status, "headers": headers})


class _Channel:
    """The client of a fast-path call (``gateway.types.ClientChannel``): requests and logs ride its response."""

    def __init__(self, session: FastSession, responder: _Responder, ids: Iterator[int]) -> None:
        self._session = session
        self._responder = responder
        self._ids = ids

    @property
    def capabilities(self) -> JSONObject:
        return self._session.capabilities

    @property
    def protocol_version(self) -> str:
        return self._session.protocol_version

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        request_id = f"patchbay-s{next(self._ids)}"
        pending = self._session.pending[request_id] = _Pending()
        try:
            await self._responder.event({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            await pending.done.wait()
        finally:
            self._session.pending.pop(request_id, None)
        if "error" in pending.reply:
            error = pending.reply["error"] if isinstance(pending.reply["error"], dict) else {}
            code = error.get("code")
            raise ClientRefused(
                method,
                code=code if isinstance(code, int) else _INTERNAL_ERROR,
                reason=str(error.get("message", "")),
                data=error.get("data"),
            )
        result = pending.reply.get("result")
        return result if isinstance(result, dict) else {}

    async def log(self, params: JSONObject) -> None:
        if LOG_LEVELS.index(params.get("level", "info")) < LOG_LEVELS.index(self._session.log_level()):
            return
        await self._responder.event({"jsonrpc": "2.0", "method": "notifications/message", "params": dict(params)})


class _ModernChannel:
    """The client of a 2026-07-28 fast-path call: no requests (that era has none mid-call except by an input
    round trip, which is the SDK side's); log messages of the levels it opted into ride its response."""

    def __init__(self, call: ModernCall, responder: _Responder) -> None:
        self._call = call
        self._responder = responder
        self._floor = LOG_LEVELS.index(call.log_level) if call.log_level in LOG_LEVELS else len(LOG_LEVELS)

    @property
    def capabilities(self) -> JSONObject:
        return self._call.capabilities

    @property
    def protocol_version(self) -> str:
        return self._call.protocol_version

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        raise UpstreamError(no_back_channel(method, self._call.protocol_version, "tools/call"))

    async def log(self, params: JSONObject) -> None:
        level = params.get("level", "info")
        if level not in LOG_LEVELS or LOG_LEVELS.index(level) < self._floor:
            return  # 2026-07-28: only the levels the request opted into, none if it did not
        await self._responder.event({"jsonrpc": "2.0", "method": "notifications/message", "params": dict(params)})


def no_back_channel(method: str, version: str, during: str) -> str:
    """Why ``method`` cannot reach a client of ``version`` during its ``during`` request."""
    return (
        f"{method} cannot reach a {version} client during {during}: that revision has no server→client "
        "requests, and patchbay asks them only within a tools/call (as an input-required result) of a client "
        "that declares it can answer them"
    )


async def _watch(receive: Receive, responder: _Responder, scope: anyio.CancelScope) -> None:
    """Cancel the call when the client closes its response; ping it after each ``PING_INTERVAL`` of silence."""
    while True:
        with anyio.move_on_after(PING_INTERVAL):
            if (await receive())["type"] == "http.disconnect":
                scope.cancel()
                return
            continue
        await responder.ping()


def _progress(responder: _Responder, token: Any) -> Callable[[float, float | None, str | None], Any]:
    async def report(progress: float, total: float | None, message: str | None) -> None:
        params: dict[str, Any] = {"progressToken": token, "progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None:
            params["message"] = message
        await responder.event({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})

    return report


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _sse(message: JSONObject) -> bytes:
    return b"event: message\ndata: " + json.dumps(message).encode() + b"\n\n"


def _parse(body: bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(body)
    except ValueError:
        return None
    return message if isinstance(message, dict) and message.get("jsonrpc") == "2.0" else None


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The body read so far and whether that is all of it (reading stops past ``MAX_BODY``)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body"):
            return b"".join(chunks), True
        if size > MAX_BODY:
            return b"".join(chunks), False


def _replay(body: bytes, complete: bool, receive: Receive) -> Receive:
    """A ``receive`` that gives what was already read first, then the rest of the real stream."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return replayed


async def _accepted(send: Send) -> None:
    await send({"type": "http.response.start", "status": 202, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
