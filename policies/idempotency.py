"""Idempotent calls: a call re-issued with the same ``_meta["io.patchbay/idempotency-key"]`` reaches the tool once.

A 2026-07-28 client has no stream resumption: when its stream breaks mid-call it must send the call
again. With a key, the first call's result is recorded in the store for ``gateway.idempotency_ttl``
and a re-issued call with the same key gets that result without reaching the upstream; a duplicate
that arrives while the first is under way waits for it. Keys are scoped to the caller: another
client's key is another key. Only results that are not errors are kept: after an error (or a refusal,
or a cancelled first call) the key is free again, so a retry really is tried again.

Not here: workflow tools (their provider attaches a re-issued call to the run the key started, which
outlives the first request), and the calls of workflow steps (their key, ``<run id>:<step path>``, is
for the upstream to recognise a step re-run after a crash; the run's journal already keeps each
completed step's result).
"""

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import anyio

from gateway.types import CallNext, ToolCall, ToolResult

__all__ = ["META_KEY", "IdempotencyKeys", "IdempotencyPolicy"]

logger = logging.getLogger(__name__)

META_KEY = "io.patchbay/idempotency-key"
POLL = 0.05
"""Seconds between looks at the store while another gateway makes the first call."""


class _Entry(Protocol):
    @property
    def tool(self) -> str: ...
    @property
    def result(self) -> Mapping[str, Any] | None: ...


class IdempotencyKeys(Protocol):
    """The part of the gateway's store this policy uses (``gateway.store.Store``)."""

    async def idempotency_claim(self, scope: str, key: str, tool: str, ttl: float) -> _Entry | None: ...
    async def idempotency_finish(self, scope: str, key: str, result: Mapping[str, Any]) -> None: ...
    async def idempotency_release(self, scope: str, key: str) -> None: ...


class IdempotencyPolicy:
    """Answers a re-issued call from the first call's recorded result."""

    def __init__(self, store: IdempotencyKeys, ttl: float, *, skip_providers: frozenset[str] = frozenset()) -> None:
        self._store = store
        self._ttl = ttl
        self._skip = skip_providers
        self._finished: dict[tuple[str, str], anyio.Event] = {}
        """Keys whose first call is under way in this process: set when it ends."""

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult:
        context = call.context
        key = context.meta.get(META_KEY) if context.meta else None
        if not isinstance(key, str) or not key or call.provider in self._skip or context.workflow_run is not None:
            return await call_next(call)
        scope = f"{context.principal.kind}:{context.principal.id}"
        while True:
            entry = await self._store.idempotency_claim(scope, key, call.name, self._ttl)
            if entry is None:
                break
            if entry.tool != call.name:
                message = f"idempotency key {key!r} was used for {entry.tool!r}: use a new key for another tool"
                return ToolResult.text(message, is_error=True)
            if entry.result is not None:
                return ToolResult.from_wire(entry.result)
            finished = self._finished.get((scope, key))
            if finished is not None:
                await finished.wait()
            else:  # made by another gateway
                await anyio.sleep(POLL)
        done = self._finished[scope, key] = anyio.Event()
        keep = False
        try:
            result = await call_next(call)
            if not result.is_error and result.input_required is None:
                await self._store.idempotency_finish(scope, key, result.wire())
                keep = True
            return result
        finally:
            try:
                if not keep:
                    with anyio.CancelScope(shield=True):
                        await self._store.idempotency_release(scope, key)
            finally:
                del self._finished[scope, key]
                done.set()
