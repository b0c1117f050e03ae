"""``tools/call`` on an upstream's stdio connection, beside the SDK client session that owns it.

Per request the SDK session builds and validates a request model, runs it through its dispatcher
(request clock, tracing span, a memory-stream hop per message) and validates the result: about a
third of the gateway's CPU per call to a stdio server. This caller writes the request onto the
transport's write stream itself and takes the response off the read stream before the session sees it
(:meth:`StreamCaller.take`, called by the connector's read-stream wrapper for every message), so the
session never learns of the request. Everything else – the handshake, listings, notifications, the
server's requests to the client, the responses to the session's own requests – passes to the session
untouched, so those keep the SDK's behaviour.

The one module besides ``connectors.mcp`` that touches the SDK's transport contract (a stream pair of
``SessionMessage``); ``tests/connectors/test_stream_call.py`` pins it against the real stdio transport.
"""

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
from mcp.shared.message import SessionMessage

__all__ = ["StreamCallFailed", "StreamCaller", "StreamLost"]

_CANCEL_NOTICE_SECONDS = 2.0

ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]


class StreamLost(Exception):
    """The connection ended before the response came."""


class StreamCallFailed(Exception):
    """The server answered with a JSON-RPC error: its ``code``, message and ``data``."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        self.code = code
        self.data = data
        super().__init__(message)


@dataclass
class _Pending:
    """One request's mailbox: what the reader took for it, for the request's own task to act on (the reader,
    shared by every call on the connection, never waits on one call's client)."""

    changed: anyio.Event = field(default_factory=anyio.Event)
    progress: list[dict[str, Any]] = field(default_factory=list)
    reply: types.JSONRPCResponse | types.JSONRPCError | None = None
    ended: bool = False


class StreamCaller:
    """Requests written straight onto a transport's write stream, their responses taken off its read stream."""

    def __init__(self, write: Any) -> None:
        self._write = write
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._lost: str | None = None

    async def call(
        self, method: str, params: dict[str, Any], *, on_progress: ProgressFn | None = None
    ) -> dict[str, Any]:
        """Send one request and return its raw result, relaying its progress to ``on_progress``. Cancelled, it
        tells the server (``notifications/cancelled``).

        Raises:
            StreamLost: the connection ended (or had ended) before the response.
            StreamCallFailed: the server answered with a JSON-RPC error.
        """
        if self._lost is not None:
            raise StreamLost(self._lost)
        request_id = f"patchbay-{next(self._ids)}"
        if on_progress is not None:
            params = {**params, "_meta": {**(params.get("_meta") or {}), "progressToken": request_id}}
        pending = self._pending[request_id] = _Pending()
        request = types.JSONRPCRequest(jsonrpc="2.0", id=request_id, method=method, params=params)
        try:
            await self._write.send(SessionMessage(request))
            while not pending.ended:
                await pending.changed.wait()
                pending.changed = anyio.Event()
                reports, pending.progress = pending.progress, []
                if on_progress is not None:
                    for report in reports:
                        await on_progress(report.get("progress", 0), report.get("total"), report.get("message"))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise StreamLost("the connection is closed") from None
        except anyio.get_cancelled_exc_class():
            if self._lost is None:
                notice = types.JSONRPCNotification(
                    jsonrpc="2.0",
                    method="notifications/cancelled",
                    params={"requestId": request_id, "reason": "the client cancelled the call"},
                )
                with anyio.CancelScope(shield=True), anyio.move_on_after(_CANCEL_NOTICE_SECONDS):
                    try:
                        await self._write.send(SessionMessage(notice))
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                        pass  # the connection went meanwhile: nothing is left to cancel
            raise
        finally:
            self._pending.pop(request_id, None)
        reply = pending.reply
        if reply is None:
            raise StreamLost(self._lost or "the connection closed")
        if isinstance(reply, types.JSONRPCError):
            raise StreamCallFailed(reply.error.code, reply.error.message, reply.error.data)
        return reply.result

    def take(self, message: object) -> bool:
        """Whether ``message``, just read, is for one of this caller's requests (its response or its progress);
        if so it is delivered to that request."""
        if not isinstance(message, SessionMessage):
            return False
        inner = message.message
        if isinstance(inner, types.JSONRPCResponse | types.JSONRPCError):
            pending = self._pending.get(inner.id) if isinstance(inner.id, str) else None
            if pending is None:
                return False
            pending.reply = inner
            pending.ended = True
        elif isinstance(inner, types.JSONRPCNotification) and inner.method == "notifications/progress":
            token = (inner.params or {}).get("progressToken")
            pending = self._pending.get(token) if isinstance(token, str) else None
            if pending is None:
                return False
            pending.progress.append(inner.params or {})
        else:
            return False
        pending.changed.set()
        return True

    def lose(self, reason: str) -> None:
        """The read stream ended: every request waiting, and every later one, fails with ``reason``."""
        self._lost = reason
        for pending in self._pending.values():
            pending.ended = True
            pending.changed.set()
