"""Rate limits: token buckets per client, tool, server or overall, refused with a time to retry.

Each rule with a ``rate_limit`` (a ``LimitRule`` of the config) is one bucket
per scope value (each client, each tool, …), held in a ``LimitState`` so that
replicas sharing Redis share the limit. A call takes one token from the bucket
of every rule that applies, all of them in one operation on the state, or none:
a call refused by one rule takes no token from the others. The refusal
(``RateLimited``) names the rule whose bucket refills last; its ``retry_after``
is rounded *up* to a tenth of a second so that a client that retries when told
to is let through.

With concurrency limits in the same config, the chain checks both kinds in one
policy (:class:`policies.limits.Limits`, one round trip to a shared state per
call); this is that policy with the rate limits alone.
"""

from collections.abc import Sequence

from gateway.config import LimitRule
from policies.limits import Limits
from policies.state import LimitState

__all__ = ["RateLimit"]


class RateLimit(Limits):
    """The rate-limit policy: takes a token from every applying rule's bucket before the call goes on.

    ``rules``: the config's limit rules, in file order; those without a ``rate_limit`` are not its business.

    Raises:
        RateLimited: a bucket was empty; ``policy`` is the rule's id, ``retry_after`` the seconds to wait.
    """

    def __init__(self, rules: Sequence[LimitRule], state: LimitState) -> None:
        super().__init__(rules, state, concurrency=False)
