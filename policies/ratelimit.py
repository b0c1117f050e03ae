"""Rate limits: token buckets per client, tool, server or overall, refused with a time to retry.

Each rule with a ``rate_limit`` (a ``LimitRule`` of the config) is one bucket
per scope value (each client, each tool, …), held in a ``LimitState`` so that
replicas sharing Redis share the limit. A bucket's key is
``rate:<rule id>:<per>:<scope value>``: the rule's id, never its position, so
inserting or moving rules leaves every other rule's buckets as they are. A
call takes one token from the bucket of every rule that applies, in rule
order; the first empty bucket refuses it with ``RateLimited``, whose
``retry_after`` is rounded *up* to a tenth of a second so that a client that
retries when told to is let through.

Tokens already taken from earlier rules' buckets stay taken when a later rule
refuses: refunding them would need a second, separate call per bucket, and in
between other callers would see the bucket emptier than it is – no cleaner
than keeping the token. The effect is conservative (a refused call may count
against a narrower limit, never lets more through than any limit allows);
an all-or-nothing multi-bucket take is a possible later ``LimitState`` method.

Also home to what the rate and concurrency limits share: which rules apply to
a call (``RuleIndex``) and the scope a rule counts by (``scope_value``).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Generic, Protocol, TypeVar

from gateway.config import LimitRule, Per
from gateway.errors import RateLimited
from gateway.types import CallNext, ToolCall, ToolResult
from policies.state import SLACK, LimitState

__all__ = ["SCOPE_WORDS", "RateLimit", "RuleIndex", "scope_value"]

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
    """The bucket key less its scope value."""

    @classmethod
    def of(cls, rule: LimitRule) -> "_Bucket":
        assert rule.rate_limit is not None
        text, rate = rule.rate_limit
        key = f"rate:{rule.id}:{rule.per}:"
        return cls(rule.tools, rule.clients, rule.id, rule.per, rate, rule.bucket, text, key)


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


class RateLimit:
    """The rate-limit policy: takes a token from every applying rule's bucket before the call goes on.

    ``rules``: the config's limit rules, in file order; those without a ``rate_limit`` are not its business.

    Raises:
        RateLimited: a bucket was empty; ``policy`` is the rule's id, ``retry_after`` the seconds to wait.
    """

    def __init__(self, rules: Sequence[LimitRule], state: LimitState) -> None:
        self._index = RuleIndex([_Bucket.of(rule) for rule in rules if rule.rate_limit is not None])
        self._state = state

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult:
        for bucket in self._index.applying(call):
            wait = await self._state.take(bucket.key + scope_value(bucket.per, call), bucket.rate, bucket.size)
            if wait > 0:
                retry_after = max(_round_up(wait), 0.1)
                raise RateLimited(
                    f"rate limit {bucket.text} {SCOPE_WORDS[bucket.per]} ({bucket.id}) reached for {call.name}: "
                    f"retry after {retry_after:.1f} s",
                    policy=bucket.id,
                    retry_after=retry_after,
                )
        return await call_next(call)
