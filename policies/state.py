"""Where rate-limit buckets and concurrency counters live.

Limits are only as good as the state behind them: one process keeps it in
memory (``MemoryLimitState``), replicas share it on Redis (a later issue).
The ``LimitState`` interface is shaped for the shared case: every operation is
ONE atomic call – check and update together – so a Redis implementation is one
Lua script per method and never a read followed by a racing write.

Token buckets are kept in GCRA form (the "generic cell rate algorithm"): a
bucket is a single number, the time at which it will be full again. A bucket
refilling at ``rate`` tokens/s and holding at most ``burst`` has
``burst - (full_at - now) * rate`` tokens at ``now``; taking one moves
``full_at`` forward by ``1 / rate``. One number per key means no separate
refill step, and a bucket whose ``full_at`` has passed holds nothing a new,
full bucket would not: it can be forgotten, which is how memory stays bounded.
"""

import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["SLACK", "LimitState", "MemoryLimitState"]

SLACK = 1e-6
"""Seconds early a take may come and still succeed: float noise never refuses a retry made when it was told.

Lets at most ``rate * 1e-6`` extra tokens through, nothing a limit would notice; callers that round a
wait down by less than this (see ``policies.ratelimit``) can promise the rounded time.
"""

_PRUNE_AT = 4096
"""Bucket count past which full buckets are dropped (the threshold then grows with what stays)."""


class LimitState(Protocol):
    """Shared state for limits. Each method is one atomic operation on the backend.

    ``acquire`` and ``release`` are awaited in a caller that may be cancelled at any moment: an
    implementation that awaits I/O shields the operation itself (``anyio.CancelScope(shield=True)``),
    so a slot is never counted without the caller knowing, and a release always completes. The
    in-memory state never awaits, so it needs no shield (two shields cost ~6 µs per call).
    """

    async def take(self, key: str, rate: float, burst: float) -> float:
        """Take one token from bucket ``key`` (refilled at ``rate`` tokens/s, holding at most ``burst``;
        a new bucket starts full).

        Returns 0.0 when taken; otherwise the seconds until one can be taken, and nothing is taken.
        A take up to ``SLACK`` seconds before that time succeeds. ``rate > 0`` and ``burst >= 1``.
        """
        ...

    async def acquire(self, key: str, limit: int) -> bool:
        """Count one more in flight under ``key`` unless ``limit`` are already; True when counted."""
        ...

    async def release(self, key: str) -> None:
        """Count one fewer in flight under ``key``; only after an ``acquire`` that returned True."""
        ...


class MemoryLimitState:
    """``LimitState`` for one process.

    Atomic because no method awaits anything: on one event loop nothing else
    runs between the check and the update. Not safe to share across threads.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._full_at: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}
        self._prune_at = _PRUNE_AT

    @property
    def held(self) -> int:
        """Buckets and counters in memory: lets tests (and a curious operator) see that memory stays bounded."""
        return len(self._full_at) + len(self._in_flight)

    async def take(self, key: str, rate: float, burst: float) -> float:
        now = self._clock()
        full_at = max(self._full_at.get(key, now), now)
        # A take is allowed while it leaves at most `burst - 1` tokens of debt: (full_at - now) * rate <= burst - 1.
        wait = (full_at - now) - (burst - 1) / rate
        if wait > SLACK:
            return wait
        self._full_at[key] = full_at + 1 / rate
        if len(self._full_at) > self._prune_at:
            self._prune(now)
        return 0.0

    async def acquire(self, key: str, limit: int) -> bool:
        count = self._in_flight.get(key, 0)
        if count >= limit:
            return False
        self._in_flight[key] = count + 1
        return True

    async def release(self, key: str) -> None:
        count = self._in_flight.get(key, 0) - 1
        if count > 0:
            self._in_flight[key] = count
        else:
            # A zero counter means the same as none: dropping it keeps one entry per key with calls in flight.
            self._in_flight.pop(key, None)

    def _prune(self, now: float) -> None:
        """Forget buckets that are full again; amortised O(1) per take, as the threshold doubles with what stays."""
        self._full_at = {key: full_at for key, full_at in self._full_at.items() if full_at > now}
        self._prune_at = max(_PRUNE_AT, 2 * len(self._full_at))
