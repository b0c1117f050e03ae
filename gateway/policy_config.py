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

Every rule is known by its ``id`` – in refusals, in the ``policy`` label of the metrics, in the
audit trail and in the keys of its limits' state – never by its position, so inserting or moving
a rule leaves every other rule's identity and half-used limits alone (and replicas on different
config versions agree on what a key means). Without ``id:`` it is derived from what the rule does:
``<kind>-<first glob>-<hash>``, e.g. ``deny-files__delete_all-e557dab2``; the hash is of the
rule's canonical content (globs sorted, the rate in calls per second, the bucket size as it
applies), so it is the same in every process and wherever the rule stands in the list. ``reason``
is not part of it: rewording a refusal does not rename the rule.
"""

import hashlib
import json
import logging
import math
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

from gateway.units import Duration, Size, retry_delay
from gateway.workflows.expressions import Condition, ExpressionError, compile_condition

__all__ = [
    "AccessRule",
    "AuditConfig",
    "CircuitBreakerConfig",
    "ClientConfig",
    "LimitRule",
    "Per",
    "PolicyId",
    "PolicyRule",
    "Rate",
    "ServerCache",
    "ServerRetry",
    "bucket_size",
    "derive_id",
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
DEFAULT_CACHE_ENTRIES = 1000
"""Results a server's ``cache:`` keeps by default, the most recent ones."""
DEFAULT_AUDIT_BUFFER = 10_000
DEFAULT_AUDIT_MAX_RECORD = 64 * 2**10
DEFAULT_AUDIT_ROTATE_SIZE = 100 * 2**20
DEFAULT_AUDIT_KEEP = 5
MIN_AUDIT_MAX_RECORD = 2**10

_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|sec|second|m|min|minute|h|hour)")
_PER_SECONDS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_PER_SECONDS |= {"h": 3600.0, "hour": 3600.0}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NOT_ID = re.compile(r"[^A-Za-z0-9_.-]+")
_STEM_LENGTH = 40


def _parse_rate(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"expected a rate like 10/s, 100/min or 5/2s, got {value!r}")
    match = _RATE.fullmatch(value.strip())
    if match is None or float(match[1]) <= 0 or (match[2] is not None and float(match[2]) <= 0):
        raise ValueError(f"expected a rate like 10/s, 100/min or 5/2s, got {value!r}")
    rate = float(match[1]) / (float(match[2] or 1) * _PER_SECONDS[match[3]])
    if not 0 < rate < math.inf:
        raise ValueError(f"{value!r} is not a finite, positive rate")
    return (value.strip(), rate)


Per = Literal["client", "tool", "server", "global"]
"""What a limit counts separately: each client, each tool, each server, or all calls it applies to together."""

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


def _check_id(value: str) -> str:
    if not _ID.fullmatch(value):
        raise ValueError(
            f"{value!r} is not an id: 1 to 64 letters, digits, `_`, `.` or `-`, starting with a letter or digit"
        )
    return value


PolicyId = Annotated[str, AfterValidator(_check_id)]
"""A rule's name in refusals, metrics, audit records and limit keys: safe in each of them (no ``:``, no spaces)."""


def derive_id(kind: str, globs: tuple[str, ...], content: Mapping[str, Any]) -> str:
    """``<kind>-<first glob in sort order>-<hash of content>``: readable, and stable across processes, rule
    orders and spellings of the same content."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
    stem = _NOT_ID.sub("_", min(globs).replace("*", "all"))[:_STEM_LENGTH]
    return f"{kind}-{stem}-{digest}"


def _set_derived_id(rule: BaseModel, derived: str) -> None:
    # The model is frozen for everyone else; filling in the default it could not compute before the
    # other fields were validated is part of building it.
    object.__setattr__(rule, "id", derived)


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
    id: PolicyId = ""
    """Names the rule in refusals, metrics, the audit trail; default: derived from its content."""
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

    @model_validator(mode="after")
    def _identified(self) -> "AccessRule":
        if not self.id:
            kind = "deny" if self.deny is not None else "allow"
            content = {"kind": kind, "tools": _canonical(self.tools), "clients": _canonical(self.clients)}
            _set_derived_id(self, derive_id(kind, self.tools, content | {"if": self.if_}))
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
    per: Per = "global"
    """What is counted separately: each client, each tool, each server, or all matching calls together."""
    id: PolicyId = ""
    """Names the rule in refusals, metrics, the audit trail and the keys of its limits' state; default:
    derived from its content. Give one to keep a rule's identity (and its half-used limits) across edits."""

    @model_validator(mode="after")
    def _some_limit(self) -> "LimitRule":
        if self.rate_limit is None and self.max_concurrency is None:
            raise ValueError("a policy needs `deny`, `allow`, `rate_limit` or `max_concurrency`")
        if self.burst is not None and self.rate_limit is None:
            raise ValueError("`burst` needs a `rate_limit`")
        if not self.id:
            kind = "concurrency" if self.rate_limit is None else "rate" if self.max_concurrency is None else "limit"
            content = {
                "tools": _canonical(self.tools),
                "clients": _canonical(self.clients),
                "rate": self.rate_limit[1] if self.rate_limit is not None else None,
                "burst": self.bucket if self.rate_limit is not None else None,
                "max_concurrency": self.max_concurrency,
                "per": self.per,
            }
            _set_derived_id(self, derive_id(kind, self.tools, content))
        return self

    @property
    def bucket(self) -> float:
        """The bucket size: ``burst``, or one second's worth of calls (at least 1)."""
        assert self.rate_limit is not None
        return bucket_size(self.rate_limit[1], self.burst)


def _canonical(globs: tuple[str, ...] | None) -> list[str] | None:
    """Globs as a set: their order and repeats do not change what a rule matches."""
    return None if globs is None else sorted(set(globs))


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

    def delay(self, retry: int, random: float) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), given a uniform ``random`` in [0, 1)."""
        return retry_delay(retry, self.backoff, self.max_backoff, self.jitter, random)


class ServerCache(BaseModel):
    """The last good results of an upstream's read-only or idempotent tools, answered (marked stale) while a call
    cannot reach it."""

    model_config = _MODEL_CONFIG

    tools: list[str] = Field(min_length=1)
    """Glob patterns of upstream tool names whose results are kept; each tool they match must be read-only or
    idempotent (``readOnlyHint``, ``idempotentHint``, or ``tools.idempotent``), else the config is refused."""
    ttl: Duration
    """How long a result may be answered after it was kept (``10m``)."""
    max_entries: int = Field(DEFAULT_CACHE_ENTRIES, ge=1)
    """Results kept for this server, the most recently kept ones; the oldest go first."""


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
    max_record: Annotated[Size, Field(ge=MIN_AUDIT_MAX_RECORD)] = DEFAULT_AUDIT_MAX_RECORD
    """Bytes one record's line may take (``64KiB``): larger arguments or results are cut to fit, the cut
    marked (the field becomes the start of its JSON text ending ``…[cut: …]``, and ``cut`` gives its full size)."""
    rotate_size: Size | None = DEFAULT_AUDIT_ROTATE_SIZE
    """Once the file reaches this size (``100MiB``) it becomes ``<path>.1`` (older ones shift to ``.2``…) and a new
    one is started; None: never rotated by the gateway (which keeps the file open: rotate it with copy-and-truncate).
    Rotation assumes one gateway process writes the file."""
    keep: int = Field(DEFAULT_AUDIT_KEEP, ge=1)
    """Rotated files kept (``<path>.1`` … ``<path>.<keep>``); the oldest beyond them is deleted."""

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
