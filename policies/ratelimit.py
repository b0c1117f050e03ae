"""Rate limits: token buckets per client, tool, server or overall, refused with a time to retry.

Each ``RateRule`` is one bucket per scope value (each client, each tool, …),
held in a ``LimitState`` so that replicas sharing Redis share the limit. A
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
from typing import Generic, Literal, Protocol, TypeVar, get_args

from gateway.errors import RateLimited
from gateway.types import CallNext, ToolCall, ToolResult
from policies.state import SLACK, LimitState

__all__ = ["SCOPE_WORDS", "Per", "RateLimit", "RateRule", "RuleIndex", "scope_value"]

Per = Literal["client", "tool", "server", "global"]
"""What a limit counts separately: each client, each tool, each server, or all calls it applies to together."""

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


def check_scope(tools: tuple[str, ...], per: str, clients: tuple[str, ...] | None) -> None:
    """Check the fields every limit rule has.

    Raises:
        ValueError: no tool globs, an unknown ``per``, or an empty ``clients``.
    """
    if not tools:
        raise ValueError("a limit needs at least one tool glob")
    if per not in get_args(Per):
        raise ValueError(f"per must be one of {', '.join(get_args(Per))}, not {per!r}")
    if clients is not None and not clients:
        raise ValueError("clients, when given, needs at least one glob")


@dataclass(frozen=True, slots=True)
class RateRule:
    """One rate limit: ``rate`` calls/s on average, up to ``burst`` at once, on the tools matching ``tools``.

    Raises:
        ValueError: a rate that is not positive, a burst below 1, no tool globs, or an unknown ``per``.
    """

    tools: tuple[str, ...]
    """fnmatch globs on the registry tool name (``call.name``)."""
    rate: float
    """Tokens added per second."""
    burst: float
    """Bucket size (at least 1)."""
    per: Per
    label: str
    """Where the rule is (``policies[2]``): names the policy in refusals and metrics, and keys its buckets."""
    text: str
    """The rate as the user wrote it (``10/s``), for messages."""
    clients: tuple[str, ...] | None = None
    """fnmatch globs on the principal id: the rule applies to these callers only; None: to every caller."""

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number of calls per second, not {self.rate!r}")
        if not self.burst >= 1:
            raise ValueError(f"burst must be at least 1, not {self.burst!r}")
        check_scope(self.tools, self.per, self.clients)


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

    Raises:
        RateLimited: a bucket was empty; ``policy`` is the rule's label, ``retry_after`` the seconds to wait.
    """

    def __init__(self, rules: Sequence[RateRule], state: LimitState) -> None:
        self._index = RuleIndex(rules)
        self._state = state

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult:
        for rule in self._index.applying(call):
            key = f"rate:{rule.label}:{rule.per}:{scope_value(rule.per, call)}"
            wait = await self._state.take(key, rule.rate, rule.burst)
            if wait > 0:
                retry_after = max(_round_up(wait), 0.1)
                raise RateLimited(
                    f"rate limit {rule.text} {SCOPE_WORDS[rule.per]} ({rule.label}) reached for {call.name}: "
                    f"retry after {retry_after:.1f} s",
                    policy=rule.label,
                    retry_after=retry_after,
                )
        return await call_next(call)
