"""LimitState, in memory and on Redis: token-bucket math on a fake clock, exact counters; bounded memory."""

import inspect
from collections.abc import AsyncIterator

import pytest

from policies.state import Full, LimitState, MemoryLimitState, Slot, Take
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
    for method in ("enter", "take", "acquire", "release"):
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


async def test_enter_takes_a_token_from_every_bucket_and_a_slot_under_every_key(state: LimitState) -> None:
    assert await state.enter([Take("a", 1.0, 2), Take("b", 1.0, 1)], [Slot("x", 2), Slot("y", 1)]) is None
    assert await state.take("a", rate=1.0, burst=2) == 0.0  # a's second token
    assert await state.take("a", rate=1.0, burst=2) > 0
    assert await state.take("b", rate=1.0, burst=1) > 0
    assert [await state.acquire("x", 2), await state.acquire("x", 2), await state.acquire("y", 1)] == [
        True,
        False,
        False,
    ]


async def test_a_bucket_without_a_token_refuses_and_nothing_is_taken(state: LimitState, clock: FakeClock) -> None:
    assert await state.take("empty", rate=2.0, burst=1) == 0.0
    full = await state.enter([Take("full", 1.0, 1), Take("empty", 2.0, 1)], [Slot("x", 1)])
    assert isinstance(full, Full)
    assert (full.bucket, full.index, full.wait) == (True, 1, pytest.approx(0.5))
    assert await state.take("full", rate=1.0, burst=1) == 0.0  # still full: the refused call took nothing
    assert await state.acquire("x", 1)  # nor a slot
    clock.advance(0.5)
    assert await state.enter([Take("empty", 2.0, 1)], []) is None  # at the stated wait, it passes


async def test_a_full_slot_refuses_and_no_token_or_other_slot_is_taken(state: LimitState) -> None:
    assert await state.acquire("busy", 1)
    full = await state.enter([Take("bucket", 1.0, 1)], [Slot("free", 1), Slot("busy", 1)])
    assert isinstance(full, Full)
    assert (full.bucket, full.index, full.wait) == (False, 1, 0.0)
    assert await state.take("bucket", rate=1.0, burst=1) == 0.0  # the refused call spent no token
    assert await state.acquire("free", 1)  # and held no slot


async def test_with_several_buckets_empty_the_refusal_names_the_one_whose_token_comes_last(state: LimitState) -> None:
    for key, rate in (("quick", 10.0), ("slow", 1.0), ("slower", 0.5)):
        assert await state.take(key, rate=rate, burst=1) == 0.0
    full = await state.enter([Take("quick", 10.0, 1), Take("slower", 0.5, 1), Take("slow", 1.0, 1)], [])
    assert isinstance(full, Full)
    assert (full.bucket, full.index, full.wait) == (True, 1, pytest.approx(2.0))


async def test_an_empty_bucket_is_the_refusal_even_when_a_slot_is_full_too(state: LimitState) -> None:
    assert await state.take("bucket", rate=1.0, burst=1) == 0.0
    assert await state.acquire("busy", 1)
    full = await state.enter([Take("bucket", 1.0, 1)], [Slot("busy", 1)])
    assert isinstance(full, Full)
    assert (full.bucket, full.index) == (True, 0)


async def test_a_key_named_twice_counts_twice(state: LimitState) -> None:
    assert isinstance(await state.enter([Take("b", 1.0, 1), Take("b", 1.0, 1)], []), Full)
    assert isinstance(await state.enter([], [Slot("s", 1), Slot("s", 1)]), Full)
    assert await state.enter([Take("b", 1.0, 2), Take("b", 1.0, 2)], [Slot("s", 2), Slot("s", 2)]) is None
    assert await state.take("b", rate=1.0, burst=2) > 0
    assert not await state.acquire("s", 2)


async def test_enter_with_nothing_to_take_admits(state: LimitState) -> None:
    assert await state.enter([], []) is None
