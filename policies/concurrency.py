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

from gateway.errors import ConcurrencyLimited
from gateway.types import CallNext, ToolCall, ToolResult
from policies.ratelimit import SCOPE_WORDS, Per, RuleIndex, check_scope, scope_value
from policies.state import LimitState

__all__ = ["ConcurrencyLimit", "ConcurrencyRule"]


@dataclass(frozen=True, slots=True)
class ConcurrencyRule:
    """One concurrency limit: at most ``limit`` calls in flight on the tools matching ``tools``, counted ``per``.

    Raises:
        ValueError: a limit below 1, no tool globs, or an unknown ``per``.
    """

    tools: tuple[str, ...]
    """fnmatch globs on the registry tool name (``call.name``)."""
    limit: int
    """Calls in flight at once."""
    per: Per
    label: str
    """Where the rule is (``policies[3]``): names the policy in refusals and metrics, and keys its counters."""
    clients: tuple[str, ...] | None = None
    """fnmatch globs on the principal id: the rule applies to these callers only; None: to every caller."""

    def __post_init__(self) -> None:
        if not self.limit >= 1:
            raise ValueError(f"limit must be at least 1, not {self.limit!r}")
        check_scope(self.tools, self.per, self.clients)


class ConcurrencyLimit:
    """The concurrency-limit policy: holds a slot under every applying rule while the call is in flight.

    Raises:
        ConcurrencyLimited: a rule already has ``limit`` calls in flight in the call's scope.
    """

    def __init__(self, rules: Sequence[ConcurrencyRule], state: LimitState) -> None:
        self._index = RuleIndex(rules)
        self._state = state

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult:
        rules = self._index.applying(call)
        if not rules:
            return await call_next(call)
        held: list[str] = []
        try:
            for rule in rules:
                key = f"concurrency:{rule.label}:{rule.per}:{scope_value(rule.per, call)}"
                counted = await self._state.acquire(key, rule.limit)
                if not counted:
                    raise ConcurrencyLimited(
                        f"concurrency limit {rule.limit} {SCOPE_WORDS[rule.per]} ({rule.label}) reached for "
                        f"{call.name}: {rule.limit} calls already in flight; retry when one of them finishes",
                        policy=rule.label,
                    )
                held.append(key)
            return await call_next(call)
        finally:
            # Also when the call was cancelled: a state that awaits I/O shields its own release (LimitState).
            for key in reversed(held):
                await self._state.release(key)
