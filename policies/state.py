"""Where rate-limit buckets, concurrency counters and circuit-breaker state live.

Limits and breakers are only as good as the state behind them: one process keeps it in
memory (``MemoryLimitState``, ``MemoryBreakerState``), replicas share it on Redis (a later
issue). The ``LimitState`` and ``BreakerState`` interfaces are shaped for the shared case:
every operation is ONE atomic call – check and update together – so a Redis implementation
is one Lua script per method and never a read followed by a racing write. A call's limits are
one operation too (``LimitState.enter``: every bucket and slot that applies, all or nothing), so
admitting a call costs one round trip to a shared backend however many rules apply.

Token buckets are kept in GCRA form (the "generic cell rate algorithm"): a
bucket is a single number, the time at which it will be full again. A bucket
refilling at ``rate`` tokens/s and holding at most ``burst`` has
``burst - (full_at - now) * rate`` tokens at ``now``; taking one moves
``full_at`` forward by ``1 / rate``. One number per key means no separate
refill step, and a bucket whose ``full_at`` has passed holds nothing a new,
full bucket would not: it can be forgotten, which is how memory stays bounded.
"""

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from gateway.config import CircuitBreakerConfig

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "SLACK",
    "Admission",
    "BreakerState",
    "Full",
    "LimitState",
    "MemoryBreakerState",
    "MemoryLimitState",
    "Refusal",
    "Slot",
    "Take",
]

SLACK = 1e-6
"""Seconds early a take may come and still succeed: float noise never refuses a retry made when it was told.

Lets at most ``rate * 1e-6`` extra tokens through, nothing a limit would notice; callers that round a
wait down by less than this (see ``policies.ratelimit``) can promise the rounded time.
"""

_PRUNE_AT = 4096
"""Bucket count past which full buckets are dropped (the threshold then grows with what stays)."""


class Take(NamedTuple):
    """One token from bucket ``key``, refilled at ``rate`` tokens/s and holding at most ``burst`` (a new bucket
    starts full). ``rate > 0`` and ``burst >= 1``. (A tuple: one is made per rule on every call.)"""

    key: str
    rate: float
    burst: float


class Slot(NamedTuple):
    """One more call in flight under ``key``, unless ``limit`` are already."""

    key: str
    limit: int


@dataclass(frozen=True, slots=True)
class Full:
    """Why ``LimitState.enter`` took nothing: a bucket had no token, or a slot's limit was reached."""

    bucket: bool
    """True: ``takes[index]`` had no token; False: every bucket had one and ``slots[index]`` was full."""
    index: int
    wait: float
    """Seconds until the bucket has a token (0 for a slot: it is free when a call ends, not at a time)."""


class LimitState(Protocol):
    """Shared state for limits. Each method is one atomic operation on the backend.

    ``enter``, ``acquire`` and ``release`` are awaited in a caller that may be cancelled at any moment: an
    implementation that awaits I/O shields the operation itself (``anyio.CancelScope(shield=True)``),
    so a slot is never counted without the caller knowing, and a release always completes. The
    in-memory state never awaits, so it needs no shield (two shields cost ~6 µs per call).
    """

    async def enter(self, takes: Sequence[Take], slots: Sequence[Slot]) -> Full | None:
        """All of a call's limits at once: a token from every bucket in ``takes`` and a slot under every key in
        ``slots``, or nothing at all. None when all were taken (each slot is then given back with ``release``).

        When a bucket has no token, the ``Full`` names the one whose token comes last (retrying after its wait
        is the earliest a retry can pass them all) and no slot is looked at; otherwise the first full slot.
        A take up to ``SLACK`` seconds early succeeds, as in ``take``.
        """
        ...

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

    async def enter(self, takes: Sequence[Take], slots: Sequence[Slot]) -> Full | None:
        now = self._clock()
        taken: dict[str, float] = {}  # bucket key → its new full_at (a key named twice takes twice)
        refused: Full | None = None
        full_at_of = self._full_at
        for index, (key, rate, burst) in enumerate(takes):
            full_at = taken[key] if key in taken else full_at_of.get(key, now)
            if full_at < now:
                full_at = now
            # A take is allowed while it leaves at most `burst - 1` tokens of debt: (full_at - now) * rate <= burst - 1.
            wait = (full_at - now) - (burst - 1) / rate
            if wait > SLACK and (refused is None or wait > refused.wait):
                refused = Full(bucket=True, index=index, wait=wait)
            taken[key] = full_at + 1 / rate
        if refused is not None:
            return refused
        counted: dict[str, int] = {}
        in_flight = self._in_flight
        for index, (key, limit) in enumerate(slots):
            count = counted[key] if key in counted else in_flight.get(key, 0)
            if count >= limit:
                return Full(bucket=False, index=index, wait=0.0)
            counted[key] = count + 1
        if taken:
            full_at_of.update(taken)
            if len(full_at_of) > self._prune_at:
                self._prune(now)
        if counted:
            in_flight.update(counted)
        return None

    async def take(self, key: str, rate: float, burst: float) -> float:
        refused = await self.enter((Take(key, rate, burst),), ())
        return 0.0 if refused is None else refused.wait

    async def acquire(self, key: str, limit: int) -> bool:
        return await self.enter((), (Slot(key, limit),)) is None

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


CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

_WINDOW_BUCKETS = 20
"""A failure-rate window is kept as this many counters: memory is fixed, the window exact to 1/20 of its length."""


@dataclass(frozen=True, slots=True)
class Admission:
    """A call the breaker let through: the state ``generation`` that admitted it, and whether it is a probe.

    Every state change starts a new generation, so the late outcome of a call
    admitted before the change (one that was in flight when the circuit
    opened, say) cannot close or reopen the circuit it no longer describes.
    """

    generation: int
    probe: bool
    entered: str | None = None
    """The state this admission moved the circuit into (``half_open``: open → half-open is due to time
    alone and is noticed by the next call), else None."""
    token: str = ""
    """The backend's name for a probe's slot (a shared backend leases it), or ""."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call the breaker refused: the circuit is open, or half-open with every probe slot taken."""

    state: str
    """``open`` or ``half_open``."""
    reason: str
    """What opened the circuit, e.g. ``5 consecutive failures, the last: …``."""
    retry_after: float
    """Seconds until an open circuit turns half-open; 0 when half-open."""
    probes: int
    """Probe calls in flight (half-open)."""


class BreakerState(Protocol):
    """Circuit-breaker state, one circuit per key (the breaker policy uses the server's name).

    Each method is one atomic operation on the backend, given the circuit's ``config`` (the thresholds
    travel with every call, as a Lua script's arguments would). The caller asks ``admit`` before a call
    and reports how an admitted call ended with exactly one of ``succeeded``, ``failed`` or
    ``abandoned``. Methods that change the state return the state they moved the circuit into, if any,
    so the caller can report transitions (the ``patchbay_circuit_open`` gauge).

    ``abandoned`` and the outcome reports may be awaited in a caller that is being cancelled: an
    implementation that awaits I/O shields them (``anyio.CancelScope(shield=True)``) so a probe slot is
    never leaked. The in-memory state never awaits, so it needs no shield.
    """

    async def admit(self, key: str, config: CircuitBreakerConfig) -> Admission | Refusal:
        """Let a call through (taking a probe slot when half-open), or say why not; an open circuit whose
        ``reset_after`` has passed turns half-open here."""
        ...

    async def succeeded(self, key: str, config: CircuitBreakerConfig, admission: Admission) -> str | None:
        """The admitted call got an answer: a probe closes the circuit; otherwise the failure streak ends."""
        ...

    async def failed(self, key: str, config: CircuitBreakerConfig, admission: Admission, error: str) -> str | None:
        """The admitted call failed upstream with ``error``: a probe reopens the circuit; a streak or rate
        over the limit opens it."""
        ...

    async def abandoned(self, key: str, admission: Admission) -> None:
        """The admitted call ended without a verdict on the server: free its probe slot, count nothing."""
        ...

    async def state(self, key: str, config: CircuitBreakerConfig) -> str:
        """``closed``, ``open`` or ``half_open`` (an open circuit past ``reset_after`` reads as half-open);
        changes nothing."""
        ...


class _Circuit:
    """One circuit's state, as a shared backend would keep it under its key."""

    __slots__ = ("buckets", "consecutive", "generation", "opened_at", "probes", "reason", "state")

    def __init__(self) -> None:
        self.state = CLOSED
        self.generation = 0
        self.consecutive = 0
        self.buckets: deque[list[int]] = deque(maxlen=_WINDOW_BUCKETS)  # [bucket index, calls, failures]
        self.opened_at = 0.0
        self.reason = ""
        self.probes = 0


class MemoryBreakerState:
    """``BreakerState`` for one process: the closed → open → half-open state machine of each key.

    Atomic for the same reason as ``MemoryLimitState``: no method awaits anything.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    @property
    def held(self) -> int:
        """Failure-rate counters in memory, over all circuits: lets tests see that memory stays bounded."""
        return sum(len(circuit.buckets) for circuit in self._circuits.values())

    async def admit(self, key: str, config: CircuitBreakerConfig) -> Admission | Refusal:
        circuit = self._circuits.get(key)
        if circuit is None:
            circuit = self._circuits[key] = _Circuit()
        if circuit.state == CLOSED:
            return Admission(circuit.generation, probe=False)
        entered = None
        if circuit.state == OPEN:
            left = circuit.opened_at + config.reset_after - self._clock()
            if left > 0:
                return Refusal(OPEN, circuit.reason, left, circuit.probes)
            # Open → half-open is due to time alone: decided lazily, on the next call.
            entered = self._transition(circuit, HALF_OPEN)
        if circuit.probes >= config.half_open_probes:
            return Refusal(HALF_OPEN, circuit.reason, 0.0, circuit.probes)
        circuit.probes += 1
        return Admission(circuit.generation, probe=True, entered=entered)

    async def succeeded(self, key: str, config: CircuitBreakerConfig, admission: Admission) -> str | None:
        circuit = self._circuits.get(key)
        if circuit is None or admission.generation != circuit.generation:
            return None
        if admission.probe:
            return self._transition(circuit, CLOSED)
        circuit.consecutive = 0
        if config.failure_rate is not None:
            self._count(circuit, config, failed=False)
        return None

    async def failed(self, key: str, config: CircuitBreakerConfig, admission: Admission, error: str) -> str | None:
        circuit = self._circuits.get(key)
        if circuit is None or admission.generation != circuit.generation:
            return None
        if admission.probe:
            return self._open(circuit, f"a failed probe call ({error})")
        circuit.consecutive += 1
        if config.failures is not None and circuit.consecutive >= config.failures:
            return self._open(circuit, f"{circuit.consecutive} consecutive failures, the last: {error}")
        if config.failure_rate is not None:
            calls, failures = self._count(circuit, config, failed=True)
            if calls >= config.min_calls and failures / calls >= config.failure_rate:
                window = f"{config.window:g} s"
                return self._open(circuit, f"{failures} failures in {calls} calls within {window}, the last: {error}")
        return None

    async def abandoned(self, key: str, admission: Admission) -> None:
        circuit = self._circuits.get(key)
        if circuit is not None and admission.probe and admission.generation == circuit.generation:
            circuit.probes -= 1

    async def state(self, key: str, config: CircuitBreakerConfig) -> str:
        circuit = self._circuits.get(key)
        if circuit is None:
            return CLOSED
        if circuit.state == OPEN and self._clock() >= circuit.opened_at + config.reset_after:
            return HALF_OPEN
        return circuit.state

    def _open(self, circuit: _Circuit, reason: str) -> str:
        circuit.opened_at = self._clock()
        circuit.reason = reason
        return self._transition(circuit, OPEN)

    @staticmethod
    def _transition(circuit: _Circuit, state: str) -> str:
        # Every state starts from clean counters: a closed circuit judges the server afresh.
        circuit.state = state
        circuit.generation += 1
        circuit.probes = 0
        circuit.consecutive = 0
        circuit.buckets.clear()
        return state

    def _count(self, circuit: _Circuit, config: CircuitBreakerConfig, *, failed: bool) -> tuple[int, int]:
        """Record a call that ended now in the rate window; return the window's (calls, failures)."""
        index = int(self._clock() // (config.window / _WINDOW_BUCKETS))
        buckets = circuit.buckets
        while buckets and buckets[0][0] <= index - _WINDOW_BUCKETS:
            buckets.popleft()
        if not buckets or buckets[-1][0] != index:
            buckets.append([index, 0, 0])
        bucket = buckets[-1]
        bucket[1] += 1
        bucket[2] += failed
        return sum(b[1] for b in buckets), sum(b[2] for b in buckets)
