"""Concurrency limits: at most N calls in flight per client, tool, server or overall; one more is refused at once.

Refused, never queued: a queue inside the gateway would hold the client's
request open with no progress and no bound on the wait, while a refusal tells
the model what happened and lets it decide (the same choice Envoy's circuit
breakers make for ``max_requests``).

A call takes a slot under every rule that applies, all or nothing: when one
rule is full, the slots already taken are given back before the refusal, so
a refused call never holds capacity. Slots are given back when the call ends
however it ends – result, error or cancellation – inside a shielded scope, so
a cancelled caller cannot leak a slot. Each ``acquire`` is shielded too: with
a shared backend the count may land just as a cancellation arrives, and a
slot counted but not recorded here could never be released.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config import LimitRule, Per
from gateway.errors import ConcurrencyLimited
from gateway.types import CallNext, ToolCall, ToolResult
from policies.ratelimit import SCOPE_WORDS, RuleIndex, scope_value
from policies.state import LimitState

__all__ = ["ConcurrencyLimit"]


@dataclass(frozen=True, slots=True)
class _Slots:
    """A rule's concurrency limit as the policy uses it on every call, read from the ``LimitRule`` once."""

    tools: tuple[str, ...]
    clients: tuple[str, ...] | None
    id: str
    per: Per
    limit: int
    key: str
    """The counter key less its scope value: ``concurrency:<rule id>:<per>:``."""

    @classmethod
    def of(cls, rule: LimitRule) -> "_Slots":
        assert rule.max_concurrency is not None
        return cls(
            rule.tools, rule.clients, rule.id, rule.per, rule.max_concurrency, f"concurrency:{rule.id}:{rule.per}:"
        )


class ConcurrencyLimit:
    """The concurrency-limit policy: holds a slot under every applying rule while the call is in flight.

    Raises:
        ConcurrencyLimited: a rule already has ``limit`` calls in flight in the call's scope.
    """

    def __init__(self, rules: Sequence[LimitRule], state: LimitState) -> None:
        """``rules``: the config's limit rules, in file order; those without ``max_concurrency`` are skipped."""
        self._index = RuleIndex([_Slots.of(rule) for rule in rules if rule.max_concurrency is not None])
        self._state = state

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult:
        rules = self._index.applying(call)
        if not rules:
            return await call_next(call)
        held: list[str] = []
        try:
            for rule in rules:
                key = rule.key + scope_value(rule.per, call)
                counted = await self._state.acquire(key, rule.limit)
                if not counted:
                    raise ConcurrencyLimited(
                        f"concurrency limit {rule.limit} {SCOPE_WORDS[rule.per]} ({rule.id}) reached for "
                        f"{call.name}: {rule.limit} calls already in flight; retry when one of them finishes",
                        policy=rule.id,
                    )
                held.append(key)
            return await call_next(call)
        finally:
            # Also when the call was cancelled: a state that awaits I/O shields its own release (LimitState).
            for key in reversed(held):
                await self._state.release(key)
