"""Concurrency limits: at most N calls in flight per client, tool, server or overall; one more is refused at once.

Refused, never queued: a queue inside the gateway would hold the client's
request open with no progress and no bound on the wait, while a refusal tells
the model what happened and lets it decide (the same choice Envoy's circuit
breakers make for ``max_requests``).

A call takes a slot under every rule that applies, all or nothing, in one
operation on the ``LimitState``: when one rule is full, no slot is taken, so a
refused call never holds capacity. Slots are given back when the call ends
however it ends – result, error or cancellation – and a state that awaits I/O
shields both the taking and the giving back: with a shared backend the count
may land just as a cancellation arrives, and a slot counted but not recorded
here could never be released.

With rate limits in the same config, the chain checks both kinds in one policy
(:class:`policies.limits.Limits`); this is that policy with the concurrency
limits alone.
"""

from collections.abc import Sequence

from gateway.config import LimitRule
from policies.limits import Limits
from policies.state import LimitState

__all__ = ["ConcurrencyLimit"]


class ConcurrencyLimit(Limits):
    """The concurrency-limit policy: holds a slot under every applying rule while the call is in flight.

    Raises:
        ConcurrencyLimited: a rule already has ``limit`` calls in flight in the call's scope.
    """

    def __init__(self, rules: Sequence[LimitRule], state: LimitState) -> None:
        """``rules``: the config's limit rules, in file order; those without ``max_concurrency`` are skipped."""
        super().__init__(rules, state, rate=False)
