"""How big an upstream's reply may be (``gateway.max_result``), and how each transport is held to it.

The SDK's streamable-HTTP client and httpx2's ``EventSource`` stop reading one server-sent event at 1 MiB by
default; the SDK then answers the request with a ``CONNECTION_CLOSED`` error, which a proxy cannot tell from a
lost connection but by its message. This module owns both SDK-facing details: the event limit passed to the SDK
(a parameter it offers) and the recognition of the error it raises when a reply exceeds it (its text, pinned by
``tests/connectors/test_result_limit.py`` to the installed SDK). Over stdio, and for a reply sent as one JSON body
rather than an event stream, the SDK reads the whole reply; its size is measured after the fact.
"""

import json
import re
from typing import Any

__all__ = ["SSE_FRAMING", "event_limit", "is_oversize", "reply_size"]

SSE_FRAMING = 1024
"""Bytes an event's own lines (``event: message``, ``id: …``, the ``data: `` prefix) add to the reply it carries."""

_OVERSIZE = re.compile(r"Server-sent event exceeded the \d+ byte limit")
"""httpx2's ``SSEError`` text, which the SDK puts in the ``CONNECTION_CLOSED`` error it answers the request with."""

_ENVELOPE = 64
"""Bytes the JSON-RPC envelope (``{"jsonrpc":"2.0","id":…,"result":…}``) adds to a result."""


def event_limit(max_result: int) -> int:
    """The largest server-sent event to read for a reply of at most ``max_result`` bytes."""
    return max_result + SSE_FRAMING


def is_oversize(message: str) -> bool:
    """Whether an SDK error message says the reply's event exceeded the event limit (the connection is fine)."""
    return _OVERSIZE.search(message) is not None


def reply_size(result: Any, max_result: int) -> int | None:
    """About the bytes of the JSON-RPC reply that carried ``result`` (as the upstream wrote it, compactly) when that
    is more than ``max_result``; None when it fits."""
    text = json.dumps(result, separators=(",", ":"), ensure_ascii=False)
    if 4 * len(text) + _ENVELOPE <= max_result:  # no character takes more than 4 bytes in UTF-8
        return None
    size = len(text.encode()) + _ENVELOPE
    return size if size > max_result else None
