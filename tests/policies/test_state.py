"""LimitState, in memory and on Redis: token-bucket math on a fake clock, exact counters; bounded memory."""

import inspect
from collections.abc import AsyncIterator

import pytest

from policies.state import LimitState, MemoryLimitState
from tests.policies.fakes import FakeClock
from tests.redis_support import redis_states

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def memory(clock: FakeClock) -> MemoryLimitState:
    return MemoryLimitState(clock)


@pytest.fixture(params=["memory", "redis"])
async def state(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[LimitState]:
    """Each backend, on the same fake clock (Redis's scripts are given its time instead of their own)."""
    if request.param == "memory":
        yield MemoryLimitState(clock)
        return
    async with redis_states() as states:
        yield states.new(clock).limits


async def test_each_state_implements_the_protocol(state: LimitState) -> None:
    for method in ("take", "acquire", "release"):
        ours, protocol = getattr(state, method), getattr(LimitState, method)
        assert inspect.iscoroutinefunction(ours)
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(protocol).parameters)[1:]


async def test_a_new_bucket_starts_full_and_gives_burst_tokens_at_once(state: LimitState) -> None:
    results = [await state.take("k", rate=1.0, burst=5) for _ in range(6)]
    assert results[:5] == [0.0] * 5
    assert results[5] == pytest.approx(1.0)


async def test_an_empty_bucket_says_how_long_until_the_next_token(state: LimitState) -> None:
    assert await state.take("k", rate=4.0, burst=1) == 0.0
    assert await state.take("k", rate=4.0, burst=1) == pytest.approx(0.25)


async def test_a_refused_take_takes_nothing(state: LimitState, clock: FakeClock) -> None:
    await state.take("k", rate=1.0, burst=1)
    for _ in range(10):
        assert await state.take("k", rate=1.0, burst=1) > 0
    clock.advance(1.0)
    assert await state.take("k", rate=1.0, burst=1) == 0.0


async def test_the_bucket_refills_at_the_rate(state: LimitState, clock: FakeClock) -> None:
    for _ in range(3):
        await state.take("k", rate=2.0, burst=3)
    clock.advance(0.5)  # one token back
    assert await state.take("k", rate=2.0, burst=3) == 0.0
    assert await state.take("k", rate=2.0, burst=3) == pytest.approx(0.5)
    clock.advance(0.3)
    assert await state.take("k", rate=2.0, burst=3) == pytest.approx(0.2)


async def test_the_bucket_never_holds_more_than_burst(state: LimitState, clock: FakeClock) -> None:
    clock.advance(3600)
    results = [await state.take("k", rate=10.0, burst=2) for _ in range(3)]
    assert results[:2] == [0.0, 0.0]
    assert results[2] > 0


async def test_retrying_after_the_stated_wait_succeeds(state: LimitState, clock: FakeClock) -> None:
    # A third of a second does not add up exactly in floats: the retry must still be let through.
    await state.take("k", rate=3.0, burst=1)
    wait = await state.take("k", rate=3.0, burst=1)
    clock.advance(wait)
    assert await state.take("k", rate=3.0, burst=1) == 0.0


async def test_buckets_under_different_keys_are_separate(state: LimitState) -> None:
    assert await state.take("a", rate=1.0, burst=1) == 0.0
    assert await state.take("b", rate=1.0, burst=1) == 0.0
    assert await state.take("a", rate=1.0, burst=1) > 0


async def test_buckets_that_are_full_again_are_forgotten(memory: MemoryLimitState, clock: FakeClock) -> None:
    # Keys come and go (clients, tools): memory follows the keys in use, not every key ever seen.
    for batch in range(10):
        for index in range(5000):
            await memory.take(f"{batch}-{index}", rate=1.0, burst=1)
        clock.advance(2.0)
    assert memory.held < 20_000


async def test_forgetting_full_buckets_keeps_the_ones_still_refilling(
    memory: MemoryLimitState, clock: FakeClock
) -> None:
    await memory.take("slow", rate=0.001, burst=1)
    for batch in range(3):
        for index in range(5000):
            await memory.take(f"{batch}-{index}", rate=1.0, burst=1)
        clock.advance(2.0)
    assert memory.held < 15_001  # some were forgotten
    assert await memory.take("slow", rate=0.001, burst=1) > 0


async def test_acquire_counts_up_to_the_limit(state: LimitState) -> None:
    assert [await state.acquire("k", 2) for _ in range(3)] == [True, True, False]


async def test_release_frees_a_slot(state: LimitState) -> None:
    await state.acquire("k", 1)
    assert not await state.acquire("k", 1)
    await state.release("k")
    assert await state.acquire("k", 1)


async def test_counters_under_different_keys_are_separate(state: LimitState) -> None:
    assert await state.acquire("a", 1)
    assert await state.acquire("b", 1)


async def test_a_counter_back_at_zero_is_removed(memory: MemoryLimitState) -> None:
    await memory.acquire("k", 3)
    await memory.acquire("k", 3)
    await memory.release("k")
    assert memory.held == 1
    await memory.release("k")
    assert memory.held == 0
