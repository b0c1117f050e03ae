"""A call's rate and concurrency limits, checked and taken together: one ``LimitState.enter`` per call.

Each rule with a ``rate_limit`` is one token bucket per scope value, keyed
``rate:<rule id>:<per>:<scope value>``; each rule with ``max_concurrency`` one counter of calls in flight,
keyed ``concurrency:<rule id>:<per>:<scope value>`` – the rule's id, never its position, so inserting or
moving rules leaves every other rule's state as it is. A call takes a token from the bucket of every rule
that applies and a slot under every rule that applies, all or nothing, in ONE operation on the state: a
shared backend (Redis) is asked once per call however many rules apply, and a refused call takes nothing –
no token from a bucket that had one, no slot – so it never counts against a limit it did not pass.

Refusals: when a bucket is empty, ``RateLimited`` names the rule whose bucket refills last, its
``retry_after`` rounded *up* to a tenth of a second so that a client that retries when told to is let
through; when every bucket has a token but a rule's slots are all held, ``ConcurrencyLimited``. Slots are
given back when the call ends however it ends – result, error or cancellation; a state that awaits I/O
shields its ``enter`` and ``release`` (``LimitState``), so a cancelled caller never leaks a slot.

The policy is :class:`Limits`; :class:`~policies.ratelimit.RateLimit` and
:class:`~policies.concurrency.ConcurrencyLimit` are the same with one kind of rule, for a config that has only
one (and for timing one alone). Also here: which rules apply to a call (``RuleIndex``) and the scope a rule
counts by (``scope_value``).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Generic, Protocol, TypeVar

from gateway.config import LimitRule, Per
from gateway.errors import ConcurrencyLimited, RateLimited
from gateway.types import CallNext, ToolCall, ToolResult
from policies.state import SLACK, Full, LimitState, Slot, Take

__all__ = ["SCOPE_WORDS", "Limits", "RuleIndex", "scope_value"]

SCOPE_WORDS: dict[str, str] = {"client": "per client", "tool": "per tool", "server": "per server", "global": "in total"}
"""How refusals name a scope."""

_CACHE_SIZE = 1024
"""Tool names whose applying rules are remembered; the registry can change, so the memo starts over when full."""


def scope_value(per: Per, call: ToolCall) -> str:
    """The value a limit with ``per`` counts ``call`` under."""
    if per == "client":
        return call.context.principal.id
    if per == "tool":
        return call.name
    if per == "server":
        return call.provider
    return ""


@dataclass(frozen=True, slots=True)
class _Bucket:
    """A rule's rate limit as the policy uses it on every call, read from the ``LimitRule`` once."""

    tools: tuple[str, ...]
    clients: tuple[str, ...] | None
    id: str
    per: Per
    rate: float
    size: float
    text: str
    key: str
    """The bucket key less its scope value: ``rate:<rule id>:<per>:``."""

    @classmethod
    def of(cls, rule: LimitRule) -> "_Bucket":
        assert rule.rate_limit is not None
        text, rate = rule.rate_limit
        return cls(rule.tools, rule.clients, rule.id, rule.per, rate, rule.bucket, text, f"rate:{rule.id}:{rule.per}:")


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
        key = f"concurrency:{rule.id}:{rule.per}:"
        return cls(rule.tools, rule.clients, rule.id, rule.per, rule.max_concurrency, key)


class _Scoped(Protocol):
    @property
    def tools(self) -> tuple[str, ...]: ...
    @property
    def clients(self) -> tuple[str, ...] | None: ...


R = TypeVar("R", bound=_Scoped)


class RuleIndex(Generic[R]):
    """The rules that apply to a call, in their order: tool globs matched once per tool name, then client globs.

    Matching is memoised by tool name, never by tool object, because the
    registry can change what a name resolves to while the rules stay; the memo
    is bounded because names come and go with upstreams.
    """

    def __init__(self, rules: Sequence[R]) -> None:
        self._rules = tuple(rules)
        self._by_client = any(rule.clients is not None for rule in self._rules)
        self._by_tool: dict[str, tuple[R, ...]] = {}

    def applying(self, call: ToolCall) -> tuple[R, ...]:
        rules = self._by_tool.get(call.name)
        if rules is None:
            if len(self._by_tool) >= _CACHE_SIZE:
                self._by_tool.clear()
            rules = tuple(rule for rule in self._rules if any(fnmatchcase(call.name, glob) for glob in rule.tools))
            self._by_tool[call.name] = rules
        if not self._by_client:
            return rules
        principal = call.context.principal.id
        return tuple(
            rule for rule in rules if rule.clients is None or any(fnmatchcase(principal, glob) for glob in rule.clients)
        )


def _round_up(seconds: float) -> float:
    """``seconds`` rounded up to a tenth, less half a ``SLACK`` so float noise never adds a tenth.

    The state lets a take through up to ``SLACK`` early, so a retry at the rounded time still succeeds.
    """
    return math.ceil(seconds * 10 - SLACK * 5) / 10


class Limits:
    """The limits policy: a token from every applying rule's bucket and a slot under every applying rule's
    concurrency limit, taken in one ``state.enter`` before the call goes on; the slots held until it ends.

    ``rules``: the config's limit rules, in file order; ``rate`` / ``concurrency`` False leaves that kind of
    rule out.

    Raises:
        RateLimited: a bucket was empty; ``policy`` is the rule's id, ``retry_after`` the seconds to wait.
        ConcurrencyLimited: a rule already has ``limit`` calls in flight in the call's scope.
        SharedStateUnavailable: the shared state cannot be reached under ``shared_state_failure: deny``.
    """

    def __init__(
        self, rules: Sequence[LimitRule], state: LimitState, *, rate: bool = True, concurrency: bool = True
    ) -> None:
        self.rules = tuple(rules)
        """The rules as given (a benchmark splits the policy into its two kinds with them)."""
        self.state = state
        buckets = [_Bucket.of(rule) for rule in rules if rate and rule.rate_limit is not None]
        slots = [_Slots.of(rule) for rule in rules if concurrency and rule.max_concurrency is not None]
        self._buckets = RuleIndex(buckets) if buckets else None
        self._slots = RuleIndex(slots) if slots else None

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult:
        buckets = self._buckets.applying(call) if self._buckets is not None else ()
        slots = self._slots.applying(call) if self._slots is not None else ()
        if not buckets and not slots:
            return await call_next(call)
        takes = [Take(bucket.key + scope_value(bucket.per, call), bucket.rate, bucket.size) for bucket in buckets]
        held = [Slot(rule.key + scope_value(rule.per, call), rule.limit) for rule in slots]
        full = await self.state.enter(takes, held)
        if full is not None:
            raise _refusal(call, buckets[full.index], full) if full.bucket else _full(call, slots[full.index])
        if not held:
            return await call_next(call)
        try:
            return await call_next(call)
        finally:
            # Also when the call was cancelled: a state that awaits I/O shields its own release (LimitState).
            for slot in reversed(held):
                await self.state.release(slot.key)


def _refusal(call: ToolCall, bucket: _Bucket, full: Full) -> RateLimited:
    retry_after = max(_round_up(full.wait), 0.1)
    return RateLimited(
        f"rate limit {bucket.text} {SCOPE_WORDS[bucket.per]} ({bucket.id}) reached for {call.name}: "
        f"retry after {retry_after:.1f} s",
        policy=bucket.id,
        retry_after=retry_after,
    )


def _full(call: ToolCall, rule: _Slots) -> ConcurrencyLimited:
    return ConcurrencyLimited(
        f"concurrency limit {rule.limit} {SCOPE_WORDS[rule.per]} ({rule.id}) reached for "
        f"{call.name}: {rule.limit} calls already in flight; retry when one of them finishes",
        policy=rule.id,
    )
