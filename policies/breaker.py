"""Circuit breaker per upstream server: stop calling a server that keeps failing.

A failing server costs every caller a timeout; once it has failed often enough
the breaker *opens* and calls fail at once with ``CircuitOpen`` (which the
fallback policy, outside it, may answer instead). After ``reset_after`` seconds
it turns *half-open* and lets a few probe calls through: one success closes it,
a failure opens it again.

Only ``UpstreamError`` is a failure. A tool's own ``isError`` result is an
answer – the server is up and talking – so it counts as a success, like any
other result. Other errors (a policy further in refusing, cancellation) say
nothing about the server's health and are not counted at all.

``CircuitBreaker`` is the state machine for one server: no awaits, the clock
injected, so it is tested without time passing. ``BreakerPolicy`` wraps one
per configured server around the rest of the chain.
"""

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.errors import CircuitOpen, UpstreamError
from gateway.types import CallNext, ToolCall, ToolResult

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Admission", "BreakerPolicy", "BreakerSettings", "CircuitBreaker"]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

_BUCKETS = 20
"""The failure-rate window is kept as this many counters: memory is fixed, the window exact to 1/20 of its length."""


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When one server's circuit opens and how it recovers."""

    failures: int | None = 5
    """Open after this many consecutive failures (None: never on a streak alone)."""
    failure_rate: float | None = None
    """Or open once this share (0–1) of the calls that ended within ``window`` failed (None: off)."""
    window: float = 60.0
    """Seconds over which ``failure_rate`` is measured."""
    min_calls: int = 10
    """``failure_rate`` applies only once at least this many calls ended within the window."""
    reset_after: float = 30.0
    """Seconds an open circuit waits before it admits probe calls."""
    half_open_probes: int = 1
    """Probe calls admitted at once while half-open."""

    def __post_init__(self) -> None:
        if self.failures is not None and self.failures < 1:
            raise ValueError("failures must be at least 1")
        if self.failure_rate is not None and not 0 < self.failure_rate <= 1:
            raise ValueError("failure_rate must be in (0, 1]")
        if self.window <= 0 or self.reset_after < 0:
            raise ValueError("window must be positive and reset_after not negative")
        if self.min_calls < 1 or self.half_open_probes < 1:
            raise ValueError("min_calls and half_open_probes must be at least 1")


@dataclass(frozen=True, slots=True)
class Admission:
    """A call the breaker let through: the state ``generation`` that admitted it, and whether it is a probe.

    Every state change starts a new generation, so the late outcome of a call
    admitted before the change (one that was in flight when the circuit
    opened, say) cannot close or reopen the circuit it no longer describes.
    """

    generation: int
    probe: bool


class CircuitBreaker:
    """The closed → open → half-open state machine of one server.

    The caller asks ``admit()`` before a call and reports how it ended with
    exactly one of ``succeeded``, ``failed`` or ``abandoned``.
    """

    def __init__(
        self,
        server: str,
        settings: BreakerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.server = server
        self.settings = settings
        self._clock = clock
        self._on_change = on_change
        self._state = CLOSED
        self._generation = 0
        self._consecutive = 0
        self._buckets: deque[list[int]] = deque(maxlen=_BUCKETS)  # [bucket index, calls, failures]
        self._opened_at = 0.0
        self._reason = ""
        self._probes = 0

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (an open circuit past ``reset_after`` turns half-open here)."""
        self._refresh()
        return self._state

    def admit(self) -> Admission:
        """Let a call through, or refuse it at once.

        Raises:
            CircuitOpen: the circuit is open, or half-open with every probe slot taken.
        """
        self._refresh()
        if self._state == CLOSED:
            return Admission(self._generation, probe=False)
        if self._state == OPEN:
            left = self._opened_at + self.settings.reset_after - self._clock()
            raise CircuitOpen(
                f"Server {self.server!r} is failing, so calls to it are refused for now (circuit open after "
                f"{self._reason}). Retry after {max(1, math.ceil(left))} s.",
                policy="circuit_breaker",
                retry_after=max(left, 0.0),
            )
        if self._probes >= self.settings.half_open_probes:
            raise CircuitOpen(
                f"Server {self.server!r} is recovering from {self._reason}: {self._probes} probe call(s) are "
                "testing it and no more are admitted until they end. Retry after 1 s.",
                policy="circuit_breaker",
            )
        self._probes += 1
        return Admission(self._generation, probe=True)

    def succeeded(self, admission: Admission) -> None:
        """The call got an answer (an ``isError`` result included): a probe closes the circuit."""
        if admission.generation != self._generation:
            return
        if admission.probe:
            self._transition(CLOSED)
            return
        self._consecutive = 0
        self._count(failed=False)

    def failed(self, admission: Admission, error: BaseException) -> None:
        """The call failed upstream: a probe reopens the circuit; a streak or rate over the limit opens it."""
        if admission.generation != self._generation:
            return
        if admission.probe:
            self._open(f"a failed probe call ({error})")
            return
        settings = self.settings
        self._consecutive += 1
        calls, failures = self._count(failed=True)
        if settings.failures is not None and self._consecutive >= settings.failures:
            self._open(f"{self._consecutive} consecutive failures, the last: {error}")
        elif settings.failure_rate is not None and calls >= settings.min_calls:
            if failures / calls >= settings.failure_rate:
                self._open(f"{failures} failures in {calls} calls within {settings.window:g} s, the last: {error}")

    def abandoned(self, admission: Admission) -> None:
        """The call ended without a verdict on the server (cancelled, refused further in): free its probe slot."""
        if admission.probe and admission.generation == self._generation:
            self._probes -= 1

    def _refresh(self) -> None:
        # Open → half-open is due to time alone: decided lazily, on the next look at the state.
        if self._state == OPEN and self._clock() >= self._opened_at + self.settings.reset_after:
            self._transition(HALF_OPEN)

    def _open(self, reason: str) -> None:
        self._opened_at = self._clock()
        self._reason = reason
        self._transition(OPEN)

    def _transition(self, state: str) -> None:
        # Every state starts from clean counters: a closed circuit judges the server afresh.
        self._state = state
        self._generation += 1
        self._probes = 0
        self._consecutive = 0
        self._buckets.clear()
        if self._on_change is not None:
            self._on_change(state)

    def _count(self, *, failed: bool) -> tuple[int, int]:
        """Record a call that ended now in the rate window; return the window's (calls, failures)."""
        if self.settings.failure_rate is None:
            return 0, 0
        index = int(self._clock() // (self.settings.window / _BUCKETS))
        buckets = self._buckets
        while buckets and buckets[0][0] <= index - _BUCKETS:
            buckets.popleft()
        if not buckets or buckets[-1][0] != index:
            buckets.append([index, 0, 0])
        bucket = buckets[-1]
        bucket[1] += 1
        bucket[2] += failed
        return sum(b[1] for b in buckets), sum(b[2] for b in buckets)


class BreakerPolicy:
    """One circuit breaker per configured server; calls to other servers pass straight through.

    ``on_change(server, state)`` is told every transition (for the
    ``patchbay_circuit_open`` gauge). Open → half-open is noticed on the next
    call to that server or the next ``state()`` look, not on a timer.
    """

    def __init__(
        self,
        settings: Mapping[str, BreakerSettings],
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self._breakers = {
            server: CircuitBreaker(server, s, clock=clock, on_change=_bind(on_change, server))
            for server, s in settings.items()
        }

    def state(self, server: str) -> str:
        """The circuit state of ``server`` (``closed`` for a server without a breaker)."""
        breaker = self._breakers.get(server)
        return CLOSED if breaker is None else breaker.state

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult:
        """Call through the server's breaker.

        Raises:
            CircuitOpen: the server's circuit is open (``call_next`` is not called).
            UpstreamError: the call failed (and was counted).
        """
        breaker = self._breakers.get(call.provider)
        if breaker is None:
            return await call_next(call)
        admission = breaker.admit()
        try:
            result = await call_next(call)
        except UpstreamError as exc:
            breaker.failed(admission, exc)
            raise
        except BaseException:
            breaker.abandoned(admission)
            raise
        breaker.succeeded(admission)
        return result


def _bind(on_change: Callable[[str, str], None] | None, server: str) -> Callable[[str], None] | None:
    if on_change is None:
        return None
    return lambda state: on_change(server, state)
