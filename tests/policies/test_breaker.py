"""The circuit breaker, its state in memory and on Redis: a fake clock and a scripted upstream, no time passing."""

import inspect
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
from pydantic import ValidationError

from gateway.config import CircuitBreakerConfig
from gateway.errors import CircuitOpen, Forbidden, UpstreamTimeout, UpstreamUnavailable
from gateway.types import CallContext, Principal, ToolCall, ToolResult
from policies.breaker import BreakerPolicy
from policies.state import Admission, BreakerState, MemoryBreakerState
from tests.policies.fakes import OK, FakeClock, Upstream, down
from tests.redis_support import redis_states

pytestmark = pytest.mark.anyio

TOOL_ERROR = ToolResult.text("no such order", is_error=True)


class Blocking:
    """An upstream whose calls wait until released, to hold calls in flight; ``started`` once ``expected`` are in."""

    def __init__(self, expected: int = 1) -> None:
        self.expected = expected
        self.entered = 0
        self.started = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self, call: ToolCall) -> ToolResult:
        self.entered += 1
        if self.entered == self.expected:
            self.started.set()
        await self.release.wait()
        return OK


def call_to(server: str = "crm") -> ToolCall:
    return ToolCall(f"{server}__get_order", server, "get_order", {"id": 1}, CallContext(principal=Principal("t")))


async def fail(policy: BreakerPolicy, times: int, server: str = "crm") -> None:
    for _ in range(times):
        with pytest.raises(UpstreamUnavailable):
            await policy(call_to(server), Upstream([down()]))


class Backend:
    """Makes breaker states of one backend; two made by one ``Backend`` are replicas sharing their circuits."""

    def __init__(self, new: Callable[[FakeClock], BreakerState]) -> None:
        self.new = new

    def make(self, clock: FakeClock, changes: list[tuple[str, str]] | None = None, **settings: object) -> BreakerPolicy:
        on_change = None if changes is None else (lambda server, state: changes.append((server, state)))
        config = CircuitBreakerConfig(**settings)  # type: ignore[arg-type]
        return BreakerPolicy({"crm": config}, self.new(clock), on_change=on_change)


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        memory: dict[int, MemoryBreakerState] = {}  # one state per clock: what replicas share
        yield Backend(lambda clock: memory.setdefault(id(clock), MemoryBreakerState(clock)))
        return
    async with redis_states() as states:
        yield Backend(lambda clock: states.new(clock).breakers)


async def test_circuit_opens_after_the_configured_number_of_consecutive_failures(backend: Backend) -> None:
    policy = backend.make(FakeClock(), failures=3)
    await fail(policy, 2)
    assert await policy.state("crm") == "closed"
    await fail(policy, 1)
    assert await policy.state("crm") == "open"


async def test_a_success_resets_the_consecutive_failure_count(backend: Backend) -> None:
    policy = backend.make(FakeClock(), failures=3)
    await fail(policy, 2)
    await policy(call_to(), Upstream())
    await fail(policy, 2)
    assert await policy.state("crm") == "closed"


async def test_open_circuit_rejects_without_calling_upstream(backend: Backend) -> None:
    clock = FakeClock()
    policy = backend.make(clock, failures=1, reset_after=30)
    await fail(policy, 1)
    clock.now += 10
    upstream = Upstream()
    with anyio.fail_after(5), pytest.raises(CircuitOpen) as caught:
        await policy(call_to(), upstream)
    assert upstream.calls == 0
    assert caught.value.policy == "circuit_breaker"
    assert caught.value.outcome == "circuit_open"
    assert "'crm'" in str(caught.value)
    assert "retry after 20 s" in str(caught.value).lower()
    assert caught.value.retry_after == pytest.approx(20)


async def test_timeouts_count_as_failures_too(backend: Backend) -> None:
    policy = backend.make(FakeClock(), failures=2)
    for _ in range(2):
        with pytest.raises(UpstreamTimeout):
            await policy(call_to(), Upstream([UpstreamTimeout("no answer in 20 s", server="crm")]))
    assert await policy.state("crm") == "open"


async def test_tool_error_results_are_answers_and_never_open_the_circuit(backend: Backend) -> None:
    policy = backend.make(FakeClock(), failures=2)
    upstream = Upstream([TOOL_ERROR] * 5)
    for _ in range(5):
        assert await policy(call_to(), upstream) is TOOL_ERROR
    assert await policy.state("crm") == "closed"


async def test_errors_that_say_nothing_about_the_server_are_not_counted(backend: Backend) -> None:
    policy = backend.make(FakeClock(), failures=1)
    with pytest.raises(Forbidden):
        await policy(call_to(), Upstream([Forbidden("no")]))
    assert await policy.state("crm") == "closed"


async def test_servers_without_settings_pass_straight_through(backend: Backend) -> None:
    policy = backend.make(FakeClock(), failures=1)
    upstream = Upstream([down(), down(), OK])
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable):
            await policy(call_to("files"), upstream)
    assert await policy(call_to("files"), upstream) is OK
    assert await policy.state("files") == "closed"
    assert await policy.state("crm") == "closed"


async def test_failure_rate_over_the_threshold_opens_the_circuit_once_enough_calls_ended(backend: Backend) -> None:
    policy = backend.make(FakeClock(), failures=None, failure_rate=0.5, window=60, min_calls=4)
    upstream = Upstream([down(), OK, down()])
    for _ in range(3):
        try:
            await policy(call_to(), upstream)
        except UpstreamUnavailable:
            pass
    assert await policy.state("crm") == "closed"  # 2 of 3 failed, but fewer than min_calls ended
    await fail(policy, 1)
    assert await policy.state("crm") == "open"


async def test_failure_rate_forgets_calls_older_than_the_window(backend: Backend) -> None:
    clock = FakeClock()
    policy = backend.make(clock, failures=None, failure_rate=0.5, window=60, min_calls=4)
    await fail(policy, 3)
    clock.now += 61
    upstream = Upstream()
    for _ in range(3):
        await policy(call_to(), upstream)
    await fail(policy, 1)  # 1 failure in the 4 calls of the last minute
    assert await policy.state("crm") == "closed"


async def test_failure_rate_window_keeps_bounded_memory() -> None:
    clock = FakeClock()
    state = MemoryBreakerState(clock)
    config = CircuitBreakerConfig(failures=None, failure_rate=0.9, window=60)
    for _ in range(10_000):
        clock.now += 0.7
        admission = await state.admit("crm", config)
        assert isinstance(admission, Admission)
        await state.succeeded("crm", config, admission)
    assert 0 < state.held <= 20


async def test_open_circuit_turns_half_open_after_reset_after(backend: Backend) -> None:
    clock = FakeClock()
    policy = backend.make(clock, failures=1, reset_after=30)
    await fail(policy, 1)
    clock.now += 29.9
    assert await policy.state("crm") == "open"
    clock.now += 0.1
    assert await policy.state("crm") == "half_open"


async def test_a_successful_probe_closes_the_circuit_and_resets_the_counters(backend: Backend) -> None:
    clock = FakeClock()
    policy = backend.make(clock, failures=2, reset_after=30)
    await fail(policy, 2)
    clock.now += 30
    assert await policy(call_to(), Upstream()) is OK
    assert await policy.state("crm") == "closed"
    await fail(policy, 1)
    assert await policy.state("crm") == "closed"


async def test_a_tool_error_result_from_a_probe_closes_the_circuit(backend: Backend) -> None:
    clock = FakeClock()
    policy = backend.make(clock, failures=1, reset_after=30)
    await fail(policy, 1)
    clock.now += 30
    assert await policy(call_to(), Upstream([TOOL_ERROR])) is TOOL_ERROR
    assert await policy.state("crm") == "closed"


async def test_a_failed_probe_reopens_the_circuit_for_another_reset_after(backend: Backend) -> None:
    clock = FakeClock()
    policy = backend.make(clock, failures=1, reset_after=30)
    await fail(policy, 1)
    clock.now += 30
    await fail(policy, 1)
    assert await policy.state("crm") == "open"
    clock.now += 29
    with pytest.raises(CircuitOpen) as caught:
        await policy(call_to(), Upstream())
    assert "probe" in str(caught.value)
    clock.now += 1
    assert await policy.state("crm") == "half_open"


async def test_half_open_admits_at_most_the_configured_number_of_concurrent_probes(backend: Backend) -> None:
    clock = FakeClock()
    policy = backend.make(clock, failures=1, reset_after=30, half_open_probes=2)
    await fail(policy, 1)
    clock.now += 30
    upstream = Blocking(expected=2)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(policy, call_to(), upstream)
            tg.start_soon(policy, call_to(), upstream)
            await upstream.started.wait()
            rejected = Upstream()
            with pytest.raises(CircuitOpen):
                await policy(call_to(), rejected)
            assert rejected.calls == 0
            upstream.release.set()
    assert await policy.state("crm") == "closed"


async def test_a_cancelled_probe_frees_its_slot_without_deciding(backend: Backend) -> None:
    clock = FakeClock()
    policy = backend.make(clock, failures=1, reset_after=30)
    await fail(policy, 1)
    clock.now += 30
    upstream = Blocking()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(policy, call_to(), upstream)
            await upstream.started.wait()
            tg.cancel_scope.cancel()
    assert await policy.state("crm") == "half_open"
    assert await policy(call_to(), Upstream()) is OK
    assert await policy.state("crm") == "closed"


async def test_a_call_admitted_before_the_circuit_opened_cannot_close_it_later(backend: Backend) -> None:
    clock = FakeClock()
    policy = backend.make(clock, failures=1, reset_after=30)
    slow = Blocking()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(policy, call_to(), slow)
            await slow.started.wait()
            await fail(policy, 1)
            slow.release.set()
    assert await policy.state("crm") == "open"


async def test_every_transition_is_reported_with_the_server_name(backend: Backend) -> None:
    clock = FakeClock()
    changes: list[tuple[str, str]] = []
    policy = backend.make(clock, changes, failures=1, reset_after=30)
    await fail(policy, 1)
    clock.now += 30
    await fail(policy, 1)
    clock.now += 30
    await policy(call_to(), Upstream())
    assert changes == [("crm", "open"), ("crm", "half_open"), ("crm", "open"), ("crm", "half_open"), ("crm", "closed")]


def test_settings_that_can_never_work_are_refused() -> None:
    for bad in ({"failures": 0}, {"failure_rate": 1.5}, {"window": 0}, {"half_open_probes": 0}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            CircuitBreakerConfig(**bad)  # type: ignore[arg-type]


async def test_each_breaker_state_implements_the_protocol(backend: Backend) -> None:
    for method in ("admit", "succeeded", "failed", "abandoned", "state"):
        ours, protocol = getattr(backend.new(FakeClock()), method), getattr(BreakerState, method)
        assert inspect.iscoroutinefunction(ours)
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(protocol).parameters)[1:]


async def test_circuits_in_one_shared_state_are_separate_per_server_and_seen_by_every_policy(backend: Backend) -> None:
    clock = FakeClock()
    config = CircuitBreakerConfig(failures=1)
    first = BreakerPolicy({"crm": config, "files": config}, backend.new(clock))
    second = BreakerPolicy({"crm": config, "files": config}, backend.new(clock))  # another replica
    await fail(first, 1)
    assert (await second.state("crm"), await second.state("files")) == ("open", "closed")
    with pytest.raises(CircuitOpen):
        await second(call_to(), Upstream())
