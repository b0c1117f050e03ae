"""The policy chain every call passes (DESIGN §1), built once from the config.

Outermost first; each refuses as early as it can, so refused calls cost little and never reach
what they would have used up:

1. **access** (``policies:`` deny/allow, ``clients.<name>.tools``): who may call what;
2. **validation**: the arguments against the tool's ``inputSchema``; then **idempotency**: a call
   re-issued with its ``io.patchbay/idempotency-key`` gets the first call's recorded result;
3. **rate limits**, then 4. **concurrency limits** (``policies:`` rate_limit, max_concurrency): one
   policy when the config has both, so a call's tokens and slots are taken in one operation on the
   limit state (one round trip to Redis when it is shared);
5. **fallback** (a server's ``fallback:``): answers a failed call with another tool;
6. **cache** (a server's ``cache:``): keeps read-only tools' good results, and answers a call that
   cannot reach the server with the one kept for the same arguments, marked stale;
7. **circuit breaker** (a server's ``circuit_breaker:``): fails fast while a server is failing;
8. **retry** (a server's ``retry:``): idempotent calls again after a connection failure or timeout.

So a call that is retried and still fails counts as one failure for the breaker, and an open
circuit can still be answered by the cache or the fallback. The cache is after access control, so
it only ever answers a caller that may call the tool (a denied call never reaches it); it is
outside the breaker and the retries, so it sees what they end with: the last attempt's failure,
or the breaker's refusal while the circuit is open (the breaker, further in, still counts every
failure, a call answered from the cache included). It is inside the fallback: a kept result of
the tool itself is closer to the answer than another tool's, the fallback steps in only when
nothing is kept, and the fallback tool's answers are never kept as this tool's. The call timeout
is the connector's (a server's ``timeout:``), per attempt.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.config import DEFAULT_MAX_RESULT, AccessRule, Config, LimitRule
from gateway.types import CallContext, JSONObject, Policy, ToolResult
from policies.access import AccessPolicy
from policies.breaker import BreakerPolicy
from policies.cache import CachedResults, CachePolicy
from policies.concurrency import ConcurrencyLimit
from policies.fallback import FallbackPolicy
from policies.idempotency import IdempotencyKeys, IdempotencyPolicy
from policies.limits import Limits
from policies.ratelimit import RateLimit
from policies.retry import RetryPolicy
from policies.state import BreakerState, LimitState
from policies.validation import ArgumentValidation

__all__ = ["Chain", "build_chain"]


@dataclass(frozen=True, slots=True)
class Chain:
    """The policies in order, and the ones the gateway consults outside calls."""

    policies: tuple[Policy, ...]
    access: AccessPolicy
    """Also filters ``tools/list`` per caller."""
    breakers: BreakerPolicy


def build_chain(
    config: Config,
    *,
    limits: LimitState,
    breakers: BreakerState,
    call_tool: Callable[[str, JSONObject, CallContext], Awaitable[ToolResult]],
    on_circuit_change: Callable[[str, str], None] | None = None,
    keys: IdempotencyKeys | None = None,
    idempotency_ttl: float = 24 * 3600.0,
    own_idempotency: frozenset[str] = frozenset(),
    cache: CachedResults | None = None,
    max_result: int = DEFAULT_MAX_RESULT,
    on_cache_hit: Callable[[str], None] | None = None,
) -> Chain:
    """The chain for ``config``, its rate and concurrency limits kept in ``limits`` and its circuits in
    ``breakers``; ``call_tool`` makes a fallback's call (through the whole chain, raising gateway errors
    rather than turning them into results); ``keys`` records the results of calls with an idempotency key
    for ``idempotency_ttl`` seconds, except for the providers in ``own_idempotency`` (workflows, which
    attach a re-issued call to its run); ``cache`` keeps the results of the servers with a ``cache:`` (none larger
    than ``max_result`` bytes), ``on_cache_hit(tool)`` being told of each call it answers.

    Raises:
        ValueError: a server has a ``cache:`` and no ``cache`` store is given.
    """
    access = AccessPolicy([rule for rule in config.policies if isinstance(rule, AccessRule)], config.clients)
    limit_rules = [rule for rule in config.policies if isinstance(rule, LimitRule)]
    upstreams = config.upstreams
    circuits = {name: b for name, server in upstreams.items() if (b := server.circuit_breaker) is not None}
    breaker = BreakerPolicy(circuits, breakers, on_change=on_circuit_change)
    retries = {name: r for name, server in upstreams.items() if (r := server.retry) is not None}
    idempotent = {name: server.tools.idempotent for name, server in upstreams.items()}
    fallbacks = {name: server.fallback for name, server in upstreams.items() if server.fallback}
    caches = {name: c for name, server in upstreams.items() if (c := server.cache) is not None}
    policies: list[Policy] = []
    if access.active:
        policies.append(access)
    policies.append(ArgumentValidation())
    if keys is not None:
        policies.append(IdempotencyPolicy(keys, idempotency_ttl, skip_providers=own_idempotency))
    rates = any(rule.rate_limit is not None for rule in limit_rules)
    slots = any(rule.max_concurrency is not None for rule in limit_rules)
    if rates and slots:
        policies.append(Limits(limit_rules, limits))
    elif rates:
        policies.append(RateLimit(limit_rules, limits))
    elif slots:
        policies.append(ConcurrencyLimit(limit_rules, limits))
    if fallbacks:
        policies.append(FallbackPolicy(fallbacks, call_tool))
    if caches:
        if cache is None:
            raise ValueError(f"the servers {sorted(caches)} have a cache: and no store is given to keep it in")
        policies.append(
            CachePolicy(
                caches, idempotent, cache, max_size=max_result, on_hit=on_cache_hit, gateway=config.gateway.name
            )
        )
    if circuits:
        policies.append(breaker)
    if retries:
        policies.append(RetryPolicy(retries, idempotent))
    return Chain(tuple(policies), access, breaker)
