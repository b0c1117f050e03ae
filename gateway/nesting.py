"""The nesting limit (``gateway.max_depth``), checked on a request's raw text where it enters.

A JSON parser recurses once per level: Python's ``json`` raises ``RecursionError`` near 1,000
levels, pydantic-core (the SDK's parser) refuses 200, orjson will not write 255. A request deeper
than its path can take became a 500, or one the upstream dropped in silence while its caller
waited out the timeout. So the depth is measured before anything parses the request, with a
scan that does not recurse, and a request over the limit is answered at once with a JSON-RPC
error naming it: on ``/mcp`` (:class:`NestingLimit`, in front of both the lean path and the SDK)
and on stdio (:func:`nesting_error`, line by line, in ``gateway.server.serve_stdio``).

Depth counts the message's own object as 1, so a ``tools/call``'s ``arguments`` object is at 3.
"""

import json
import operator
import re
from itertools import accumulate, count
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["NestingLimit", "nesting_error"]

_INVALID_REQUEST = -32600
_INVALID_PARAMS = -32602
_PARSE_ERROR = -32700

# Strings (escapes included) hold brackets that are not structure.
_BYTE_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[]", b"\x02\x00")
# A string, an opening bracket, or a closing one, for locating the deep member (the regex engine skips strings).
_OPEN, _CLOSE = 2, 3
_TOKENS = re.compile(r'("[^"\\]*(?:\\.[^"\\]*)*")|([\[{])|([\]}])')
_TOKEN_BUDGET = 50_000
"""Tokens looked at to find where a too-deep message's deep member ends (and any ``id`` after it)."""
_DEEP_MARK = '"\\u0000patchbay-too-deep"'
_DEEP_MARK_VALUE = json.loads(_DEEP_MARK)


def _deeper_than(raw: bytes, limit: int) -> bool:
    """Whether ``raw`` nests more than ``limit`` levels, in C-speed passes over its brackets (nothing parsed).

    Each pass removes the innermost ``[]`` pairs, one level less; what passes do not shrink much
    (long chains) is measured by a running sum. Linear in the size; an unbalanced text (not JSON)
    may count as deep.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # no room for that many levels: the common case, at the cost of two scans
    brackets = _BYTE_STRINGS.sub(b"", raw).translate(_SQUARE, _NOT_BRACKETS)
    for passes in range(limit):
        if b"[" * (limit - passes + 1) in brackets:
            return True
        shorter = brackets.replace(b"[]", b"")
        if not shorter:
            return False
        if len(shorter) > len(brackets) * 3 // 4:
            # Depth after a pass = depth - 1: the running sum of +1 per "[" and -1 per "]" (as 2·opens - position).
            steps = shorter.translate(_STEPS)
            deepest: int = max(map(operator.sub, accumulate(steps), count(1)))
            return deepest > limit - passes - 1
        brackets = shorter
    return True


def nesting_error(raw: bytes | str, limit: int) -> dict[str, Any] | None:
    """The JSON-RPC error answering a message that nests deeper than ``limit``; None if it does not.

    The error carries the message's ``id`` when it has a usable one (else null) and is invalid
    params (-32602) when the depth is under ``params``, else invalid request (-32600), or a parse
    error (-32700) when the rest of the message is not JSON either.
    """
    if not _deeper_than(raw if isinstance(raw, bytes) else raw.encode(errors="replace"), limit):
        return None
    message = _shallow(raw.decode(errors="replace") if isinstance(raw, bytes) else raw, limit)
    code, request_id = _PARSE_ERROR, None
    if isinstance(message, dict):
        code = _INVALID_PARAMS if message.get("params") == _DEEP_MARK_VALUE else _INVALID_REQUEST
        candidate = message.get("id")
        request_id = candidate if isinstance(candidate, str | int) and not isinstance(candidate, bool) else None
    elif isinstance(message, list):
        code = _INVALID_REQUEST
    text = f"The request nests deeper than this gateway accepts (gateway.max_depth: {limit} levels)."
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": text}}


def _shallow(text: str, limit: int) -> Any:
    """A too-deep ``text`` parsed with its top-level members' containers cut out: the one deeper than ``limit``
    replaced by a mark, the others by 0; None if that is not JSON.

    Past :data:`_TOKEN_BUDGET` tokens, only the members before the deep one are kept.
    """
    pieces: list[str] = []
    depth = kept = start = 0
    deep = found = False
    closer = "}" if text.lstrip().startswith("{") else "]"
    for seen, token in enumerate(_TOKENS.finditer(text)):
        if seen > _TOKEN_BUDGET:  # keep what is complete, close the message there
            if depth > 1:  # the open member is taken for the deep one unless that was found before
                pieces += [text[kept:start], _DEEP_MARK if deep or not found else "0"]
            else:
                pieces.append(text[kept : token.start()].rstrip().rstrip(","))
            pieces.append(closer)
            break
        kind = token.lastindex
        if kind == _OPEN:
            depth += 1
            if depth == 2:
                start, deep = token.start(), False
            deep = deep or depth > limit
        elif kind == _CLOSE:
            depth -= 1
            if depth == 1:
                pieces += [text[kept:start], _DEEP_MARK if deep else "0"]
                kept, found = token.end(), found or deep
    else:
        if depth > 1:  # unbalanced: the open member runs to the end
            pieces += [text[kept:start], _DEEP_MARK, closer]
        else:
            pieces.append(text[kept:])
    try:
        return json.loads("".join(pieces))
    except (ValueError, RecursionError):
        return None


class NestingLimit:
    """ASGI middleware for ``/mcp``: a POST body nesting deeper than ``limit`` is answered with its JSON-RPC error.

    A request with an id gets HTTP 200 and the error (as any request the server refuses); anything
    else (a notification, a batch, no JSON) gets HTTP 400 with it. The body is read here once and
    handed on unchanged; one over ``max_body`` is handed on unread, for the app to refuse.
    """

    def __init__(self, app: ASGIApp, limit: int, *, max_body: int) -> None:
        self.app = app
        self.limit = limit
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                return await self.app(scope, _replay(b"".join(chunks), message, receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if not message.get("more_body"):
                break
            if size > self.max_body:  # the app refuses it unread (413)
                return await self.app(scope, _replay(b"".join(chunks), None, receive, more=True), send)
        body = b"".join(chunks)
        error = nesting_error(body, self.limit)
        if error is None:
            return await self.app(scope, _replay(body, None, receive), send)
        answer = json.dumps(error).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
        session = next((v for k, v in scope["headers"] if k == b"mcp-session-id"), None)
        if session is not None:
            headers.append((b"mcp-session-id", session))
        status = 200 if error["id"] is not None else 400
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


def _replay(body: bytes, then: Message | None, receive: Receive, *, more: bool = False) -> Receive:
    """A ``receive`` giving the body already read as one message (``more``: the rest still to come), then
    ``then`` (if any), then the real stream."""
    queued: list[Message] = [{"type": "http.request", "body": body, "more_body": more}]
    if then is not None:
        queued = [{"type": "http.request", "body": body, "more_body": True}, then]

    async def replayed() -> Message:
        return queued.pop(0) if queued else await receive()

    return replayed
