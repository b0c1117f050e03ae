"""Cached results per upstream server: when a call cannot reach the server, answer with the tool's last good result.

A server's ``cache: {tools: [globs], ttl, max_entries}`` names tools (by the upstream's own names,
``call.target``) whose successful results are kept in the store, keyed by the tool and its arguments
as canonical JSON (sorted keys), for ``ttl`` seconds. When a call of such a tool cannot reach the
server – not connected, the connection lost, no answer in time (after the retries, further in), or
the circuit open – and a result of the same call is kept, the caller gets that result, its ``_meta``
saying so: ``{"io.patchbay/stale": {"age": seconds, "cached_at": RFC 3339, "reason": the error}}``.
Without one, the error stands.

Only tools that are safe to answer twice are cached: read-only or idempotent ones, as the retry
policy decides (:func:`policies.retry.safe_to_repeat`). The config check refuses a glob that
matches another tool; a tool that appears later and is neither is simply not cached.

What is not cached: a tool's own ``isError`` answer, a result that asks the client for input or
stands for a task, and a result larger than ``max_size`` (the gateway's ``max_result``). A store
that cannot be written or read costs the cache, never the call: it is logged and the call goes on
as if nothing were kept.

Whose results: the policy sits after access control in the chain, so a caller reaches it only for a
tool it may call; entries are shared by every caller of the same tool and arguments (upstreams are
called with the gateway's own credentials, so their answer does not depend on who asked).
"""

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import orjson

from gateway.config import ServerCache, rfc3339
from gateway.errors import CircuitOpen, StoreError, UpstreamTimeout, UpstreamUnavailable
from gateway.types import CallNext, JSONObject, ToolCall, ToolResult
from policies._globs import matcher
from policies.retry import safe_to_repeat

__all__ = ["META_KEY", "CachePolicy", "CachedResults", "cache_key"]

logger = logging.getLogger(__name__)

META_KEY = "io.patchbay/stale"
"""The result ``_meta`` key saying that the cache answered: ``{"age", "cached_at", "reason"}``."""

UNREACHED = (UpstreamUnavailable, UpstreamTimeout, CircuitOpen)
"""The errors of a call that did not reach the server, or got no answer from it."""


class _Entry(Protocol):
    @property
    def result(self) -> Mapping[str, Any]: ...
    @property
    def cached_at(self) -> float: ...


class CachedResults(Protocol):
    """The part of the gateway's store this policy uses (``gateway.store.Store``)."""

    async def cache_put(
        self, scope: str, key: str, result: Mapping[str, Any], ttl: float, max_entries: int
    ) -> None: ...
    async def cache_get(self, scope: str, key: str) -> _Entry | None: ...


def cache_key(tool: str, arguments: JSONObject) -> str:
    """The key of a call's result: a digest of the tool's name and its arguments as canonical JSON."""
    canonical = orjson.dumps([tool, arguments], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


class CachePolicy:
    """Keeps the results of configured servers' cached tools, and answers from them while a server is out of reach.

    ``caches`` is each server's ``cache:``; ``idempotent`` its ``tools.idempotent`` globs; ``on_hit(tool)`` is told
    of every call answered from the cache (for the metrics); ``gateway`` is the gateway's name, under which its
    servers' results are kept.
    """

    def __init__(
        self,
        caches: Mapping[str, ServerCache],
        idempotent: Mapping[str, Sequence[str]],
        store: CachedResults,
        *,
        max_size: int,
        on_hit: Callable[[str], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
        gateway: str = "",
    ) -> None:
        self._gateway = gateway
        self._settings = {
            server: (cache, matcher(cache.tools), matcher(idempotent.get(server, ())))
            for server, cache in caches.items()
        }
        self._store = store
        self._max_size = max_size
        self._on_hit = on_hit
        self._clock = wall_clock

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult:
        """Call; keep a good result of a cached tool, or answer with the kept one when the server is out of reach.

        Raises:
            UpstreamUnavailable, UpstreamTimeout, CircuitOpen: the server is out of reach and no result is kept.
            GatewayError: any other failure, as it came.
        """
        entry = self._settings.get(call.provider)
        if entry is None:
            return await call_next(call)
        cache, tools, idempotent = entry
        if not tools.fullmatch(call.target) or not safe_to_repeat(call, idempotent):
            return await call_next(call)
        key = cache_key(call.target, call.arguments)
        try:
            result = await call_next(call)
        except UNREACHED as exc:
            stale = await self._kept(call, key, str(exc))
            if stale is None:
                raise
            if self._on_hit is not None:
                self._on_hit(call.name)
            return stale
        if not result.is_error and result.input_required is None and result.task is None:
            await self._keep(call, key, result, cache)
        return result

    def _scope(self, call: ToolCall) -> str:
        """Whose results: the server's, in this gateway (gateways sharing one database have servers of one name
        that are not the same server; replicas of one gateway share its name)."""
        return f"{self._gateway}/{call.provider}"

    async def _keep(self, call: ToolCall, key: str, result: ToolResult, cache: ServerCache) -> None:
        wire = result.wire()
        if len(orjson.dumps(wire)) > self._max_size:
            logger.debug("%s: result larger than %d bytes, not cached", call.name, self._max_size)
            return
        try:
            await self._store.cache_put(self._scope(call), key, wire, cache.ttl, cache.max_entries)
        except StoreError as exc:
            logger.warning("%s: cannot keep its result in the cache: %s", call.name, exc)

    async def _kept(self, call: ToolCall, key: str, reason: str) -> ToolResult | None:
        try:
            kept = await self._store.cache_get(self._scope(call), key)
        except StoreError as exc:
            logger.warning("%s: cannot read the cache: %s", call.name, exc)
            return None
        if kept is None:
            return None
        result = ToolResult.from_wire(kept.result)
        age = max(0.0, self._clock() - kept.cached_at)
        note = {"age": round(age, 3), "cached_at": rfc3339(kept.cached_at), "reason": reason}
        return dataclasses.replace(result, meta={**(result.meta or {}), META_KEY: note})
