"""The config's ``clients:``, ``policies:`` and ``audit:`` sections, and a server's resilience settings.

Models only (DESIGN §3); the interceptors that enforce them live in ``policies/`` and are built
from these once, at start-up. Kept apart from :mod:`gateway.config` so that each file holds one
concept; :mod:`gateway.config` re-exports them.

Policy rules are a list, each rule one of two shapes:

* **access**: ``{deny: GLOBS}`` or ``{allow: GLOBS}``, optionally for some ``clients`` only and
  only when a jq condition ``if`` holds over ``{arguments, client, tool}``; ``reason`` is what a
  refused caller is told;
* **limits**: ``{tools: GLOBS, rate_limit: "10/s", burst: 20, max_concurrency: 8, per: client}``
  (either limit or both), optionally for some ``clients`` only.
"""

import logging
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)

from gateway.units import Duration
from gateway.workflows.expressions import Condition, ExpressionError, compile_condition

__all__ = [
    "AccessRule",
    "AuditConfig",
    "CircuitBreakerConfig",
    "ClientConfig",
    "LimitRule",
    "PolicyRule",
    "Rate",
    "ServerRetry",
    "bucket_size",
]

logger = logging.getLogger(__name__)

DEFAULT_RETRY_ATTEMPTS = 3
DEFAULT_RETRY_BACKOFF = 0.2
DEFAULT_RETRY_MAX_BACKOFF = 5.0
DEFAULT_RETRY_JITTER = 0.2
DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_WINDOW = 60.0
DEFAULT_BREAKER_MIN_CALLS = 10
DEFAULT_BREAKER_RESET = 30.0
DEFAULT_AUDIT_BUFFER = 10_000

_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|sec|second|m|min|minute|h|hour)")
_PER_SECONDS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_PER_SECONDS |= {"h": 3600.0, "hour": 3600.0}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _parse_rate(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"expected a rate like 10/s, 100/min or 5/2s, got {value!r}")
    match = _RATE.fullmatch(value.strip())
    if match is None or float(match[1]) <= 0 or (match[2] is not None and float(match[2]) <= 0):
        raise ValueError(f"expected a rate like 10/s, 100/min or 5/2s, got {value!r}")
    return (value.strip(), float(match[1]) / (float(match[2] or 1) * _PER_SECONDS[match[3]]))


Rate = Annotated[tuple[str, float], BeforeValidator(_parse_rate)]
"""A rate as written (``"10/s"``) and in calls per second."""


def bucket_size(rate: float, burst: float | None) -> float:
    """A token bucket's size: ``burst``, or one second's worth of ``rate`` (at least 1)."""
    return burst if burst is not None else max(1.0, rate)


def _globs(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


def _non_empty(items: tuple[str, ...]) -> tuple[str, ...]:
    if not items or any(not item for item in items):
        raise ValueError("needs at least one name or glob, and none may be empty")
    return items


Globs = Annotated[tuple[str, ...], BeforeValidator(_globs), AfterValidator(_non_empty)]
"""One glob (``crm__*``) or a list of them, matched with fnmatch against tool (or client) names."""


def _check_sha256(value: str) -> str:
    value = value.strip().lower()
    if not _SHA256.fullmatch(value):
        raise ValueError("must be the SHA-256 of the client's token, 64 hex digits (`patchbay token` prints one)")
    return value


class ClientConfig(BaseModel):
    """One client that may connect over HTTP, known by the SHA-256 of its bearer token."""

    model_config = _MODEL_CONFIG

    token_sha256: Annotated[str, AfterValidator(_check_sha256)]
    """Hex SHA-256 of the token the client sends as ``Authorization: Bearer <token>``; never the token itself."""
    tools: Globs | None = None
    """The only tools this client may see and call (globs); None: whatever the policies allow."""


class AccessRule(BaseModel):
    """Allow or deny tools by glob, for all clients or some, optionally only when a jq condition holds."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    deny: Globs | None = None
    """Tools this rule refuses."""
    allow: Globs | None = None
    """Tools this rule permits; once any allow rule applies to a client, tools no such rule allows are refused."""
    clients: Globs | None = None
    """The clients the rule applies to (names from ``clients:``); None: every caller, workflow steps included."""
    if_: str | None = Field(None, alias="if")
    """A jq condition over ``{arguments, client, tool}``: the rule applies only to calls for which it holds."""
    reason: str | None = None
    """What a refused caller is told."""
    _condition: Condition | None = PrivateAttr(default=None)

    @field_validator("if_")
    @classmethod
    def _compiles(cls, source: str | None) -> str | None:
        if source is not None:
            try:
                compile_condition(source, where="if")
            except ExpressionError as exc:
                raise ValueError(exc.detail) from None
        return source

    @model_validator(mode="after")
    def _one_kind(self) -> "AccessRule":
        if (self.deny is None) == (self.allow is None):
            raise ValueError("an access rule has exactly one of `deny` and `allow`")
        if self.if_ is not None:
            self._condition = compile_condition(self.if_, where="if")
        return self

    @property
    def condition(self) -> Condition | None:
        """The compiled ``if``."""
        return self._condition

    async def applies_to(self, arguments: Mapping[str, Any], client: str, tool: str) -> bool:
        """Whether the ``if`` condition (if any) holds over ``{arguments, client, tool}``.

        A plain path is resolved at once; another jq program runs in the bounded worker pool,
        awaited without blocking the event loop. A condition that cannot be evaluated (a jq error,
        the time or memory limit) counts against the call (fail closed): a deny applies, an allow
        does not.
        """
        if self._condition is None:
            return True
        try:
            return await self._condition.holds_async({"arguments": dict(arguments), "client": client, "tool": tool})
        except ExpressionError as exc:
            logger.warning("policy condition %r failed for %s: %s", self.if_, tool, exc.detail)
            return self.deny is not None

    @property
    def tools(self) -> tuple[str, ...]:
        """The globs denied or allowed."""
        return self.deny or self.allow or ()


class LimitRule(BaseModel):
    """A rate limit and/or a concurrency limit on some tools, counted per client, tool, server or overall."""

    model_config = _MODEL_CONFIG

    tools: Globs = ("*",)
    """The tools limited."""
    clients: Globs | None = None
    """The clients the limits apply to; None: every caller."""
    rate_limit: Rate | None = None
    """Calls allowed on average, e.g. ``10/s``, ``100/min``; a refused call is told when to retry."""
    burst: float | None = Field(None, ge=1)
    """Calls allowed at once above the average rate (the bucket size); default: one second's worth, at least 1."""
    max_concurrency: int | None = Field(None, ge=1)
    """Calls in flight at once; one more is refused at once, not queued."""
    per: Literal["client", "tool", "server", "global"] = "global"
    """What is counted separately: each client, each tool, each server, or all matching calls together."""

    @model_validator(mode="after")
    def _some_limit(self) -> "LimitRule":
        if self.rate_limit is None and self.max_concurrency is None:
            raise ValueError("a policy needs `deny`, `allow`, `rate_limit` or `max_concurrency`")
        if self.burst is not None and self.rate_limit is None:
            raise ValueError("`burst` needs a `rate_limit`")
        return self

    @property
    def bucket(self) -> float:
        """The bucket size: ``burst``, or one second's worth of calls (at least 1)."""
        assert self.rate_limit is not None
        return bucket_size(self.rate_limit[1], self.burst)


def _rule_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "access" if "deny" in value or "allow" in value else "limits"
    return "access" if isinstance(value, AccessRule) else "limits"


PolicyRule = Annotated[
    Annotated[AccessRule, Tag("access")] | Annotated[LimitRule, Tag("limits")], Discriminator(_rule_kind)
]
"""One entry of ``policies:``: an access rule (``deny``/``allow``) or limits."""


class ServerRetry(BaseModel):
    """Retries of an upstream's calls that failed to connect or timed out; only for idempotent tools."""

    model_config = _MODEL_CONFIG

    attempts: int = Field(DEFAULT_RETRY_ATTEMPTS, ge=1)
    """Tries in all, the first included."""
    backoff: Duration = DEFAULT_RETRY_BACKOFF
    """Seconds before the first retry; doubled before each further one."""
    max_backoff: Duration = DEFAULT_RETRY_MAX_BACKOFF
    """The longest wait between two tries."""
    jitter: float = Field(DEFAULT_RETRY_JITTER, ge=0, le=1)
    """Each wait varies randomly by up to this fraction of itself."""


class CircuitBreakerConfig(BaseModel):
    """When to stop calling a failing upstream for a while, and how to try it again."""

    model_config = _MODEL_CONFIG

    failures: int | None = Field(DEFAULT_BREAKER_FAILURES, ge=1)
    """Opens after this many failures in a row (connection failures and timeouts; a tool's own error is an answer)."""
    failure_rate: float | None = Field(None, gt=0, le=1)
    """Or opens when this share of the calls in ``window`` failed…"""
    window: Duration = DEFAULT_BREAKER_WINDOW
    """…over this many seconds…"""
    min_calls: int = Field(DEFAULT_BREAKER_MIN_CALLS, ge=1)
    """…once at least this many calls ended in it."""
    reset_after: Duration = DEFAULT_BREAKER_RESET
    """Seconds an open circuit refuses calls before it lets probes through."""
    half_open_probes: int = Field(1, ge=1)
    """Calls let through at once to probe a recovering upstream."""


class AuditConfig(BaseModel):
    """Where the audit trail goes, and what is redacted from it."""

    model_config = _MODEL_CONFIG

    path: str | None = None
    """A JSON-lines file, one record per call (relative paths: to the config file); None: no audit file."""
    redact_keys: tuple[str, ...] = ()
    """Argument and result keys whose values are replaced by ``[REDACTED]``, besides the built-in ones
    (password, secret, token, authorization, api_key…)."""
    redact_patterns: tuple[str, ...] = ()
    """Regular expressions: matching text anywhere in arguments and results is replaced by ``[REDACTED]``."""
    buffer: int = Field(DEFAULT_AUDIT_BUFFER, ge=1)
    """Records held for a slow disk; beyond it, records are dropped and counted, never waited for."""

    @field_validator("redact_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
            if compiled.fullmatch(""):
                raise ValueError(f"{pattern!r} matches empty text, so it would redact between every character")
        return patterns
