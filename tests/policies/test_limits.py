"""Limits: a call's rate and concurrency limits taken together, in memory and on Redis; one Redis command
awaited per admitted call, counted on the connection."""

from collections.abc import AsyncIterator

import anyio
import pytest

from gateway.chain import build_chain
from gateway.config import CircuitBreakerConfig, LimitRule, parse_config
from gateway.errors import ConcurrencyLimited, RateLimited
from gateway.types import CallContext, CallNext, JSONObject, Principal, ToolCall, ToolResult
from policies.breaker import BreakerPolicy
from policies.concurrency import ConcurrencyLimit
from policies.limits import Limits
from policies.ratelimit import RateLimit
from policies.redis_state import RedisState
from policies.state import LimitState, MemoryBreakerState, MemoryLimitState
from tests.policies.fakes import OK, FakeClock, Gate
from tests.redis_support import CountingConnection, counting_state, operations_sent, redis_states

pytestmark = pytest.mark.anyio

CALL = ToolCall("crm__get_order", "crm", "get_order", {"id": 1}, CallContext(principal=Principal("alice")))
RATE = LimitRule.model_validate({"id": "rate", "tools": ["*"], "rate_limit": "5/h", "burst": 5, "per": "global"})
SLOTS = LimitRule.model_validate({"id": "slots", "tools": ["*"], "max_concurrency": 3, "per": "global"})


async def instant(call: ToolCall) -> ToolResult:
    return OK


@pytest.fixture(params=["memory", "redis"])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[LimitState]:
    if request.param == "memory":
        yield MemoryLimitState(FakeClock())
        return
    async with redis_states() as states:
        yield states.new(FakeClock()).limits


async def outcome(limits: Limits) -> str:
    try:
        await limits(CALL, instant)
    except RateLimited as exc:  # ConcurrencyLimited is one too: told apart by the policy named
        return exc.policy
    return "ok"


def test_the_chain_checks_rate_and_concurrency_limits_in_one_policy() -> None:
    text = 'policies:\n  - {tools: "*", rate_limit: 5/s}\n  - {tools: "*", max_concurrency: 2}\n'
    chain = build_chain(
        parse_config(text, environ={}), limits=MemoryLimitState(), breakers=MemoryBreakerState(), call_tool=_never
    )
    assert [type(policy) for policy in chain.policies if isinstance(policy, Limits)] == [Limits]
    rate_only = build_chain(
        parse_config('policies: [{tools: "*", rate_limit: 5/s}]', environ={}),
        limits=MemoryLimitState(),
        breakers=MemoryBreakerState(),
        call_tool=_never,
    )
    assert [type(policy) for policy in rate_only.policies if isinstance(policy, Limits)] == [RateLimit]


async def _never(name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
    raise AssertionError("no fallback is configured")


async def test_a_call_refused_for_a_full_slot_spends_no_token(state: LimitState) -> None:
    # Before the two policies were one, the rate limit's token was spent on a call the concurrency limit refused.
    limits = Limits([RATE, SLOTS], state)
    gate = Gate(expected=3)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(limits, CALL, gate)
            await gate.all_in.wait()
            refused = [await outcome(limits) for _ in range(5)]
            gate.release.set()
    assert refused == ["slots"] * 5
    assert [await outcome(limits) for _ in range(3)] == ["ok", "ok", "rate"]  # 5 tokens: 3 held calls, 2 more


async def test_an_empty_bucket_refuses_before_a_full_slot_and_takes_no_slot(state: LimitState) -> None:
    one = LimitRule.model_validate({"id": "one", "tools": ["*"], "rate_limit": "1/h", "per": "global"})
    limits = Limits([one, SLOTS], state)
    assert await outcome(limits) == "ok"
    assert await outcome(limits) == "one"
    # The refused call held no slot: all three are free.
    assert [await state.acquire("concurrency:slots:global:", 3) for _ in range(4)] == [True, True, True, False]


async def test_the_slots_are_given_back_when_the_call_fails_or_is_cancelled(state: LimitState) -> None:
    limits = Limits([RATE, SLOTS], state)

    async def failing(call: ToolCall) -> ToolResult:
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        await limits(CALL, failing)
    gate = Gate(expected=1)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(limits, CALL, gate)
            await gate.all_in.wait()
            tg.cancel_scope.cancel()
    assert [await state.acquire("concurrency:slots:global:", 3) for _ in range(4)] == [True, True, True, False]


async def test_the_refusals_are_those_of_the_two_policies_alone(state: LimitState) -> None:
    limits = Limits([RATE, SLOTS], state)
    alone = ConcurrencyLimit([SLOTS], state)
    gate = Gate(expected=3)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(alone, CALL, gate)
            await gate.all_in.wait()
            with pytest.raises(ConcurrencyLimited) as together:
                await limits(CALL, instant)
            with pytest.raises(ConcurrencyLimited) as apart:
                await alone(CALL, instant)
            gate.release.set()
    assert str(together.value) == str(apart.value)
    for _ in range(5):
        await limits(CALL, instant)
    with pytest.raises(RateLimited) as limited:
        await limits(CALL, instant)
    with pytest.raises(RateLimited) as limited_alone:
        await RateLimit([RATE], state)(CALL, instant)
    assert (limited.value.policy, limited.value.retry_after) == ("rate", limited_alone.value.retry_after)
    assert str(limited.value) == str(limited_alone.value)


async def test_exactly_the_limits_let_m_concurrent_calls_through_across_two_replicas() -> None:
    async with redis_states() as states:
        replicas = [Limits([RATE, SLOTS], states.new().limits) for _ in range(2)]
        gate = Gate(expected=40)
        refusals: list[str] = []

        async def call(index: int) -> None:
            try:
                await replicas[index % 2](CALL, gate)
            except RateLimited as exc:
                refusals.append(exc.policy)
                gate.end()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for index in range(40):
                    tg.start_soon(call, index)
                await gate.all_in.wait()
                gate.release.set()
        after = [await outcome(replica) for replica in replicas]
        after.append(await outcome(replicas[0]))
    assert (gate.entered, refusals) == (3, ["slots"] * 37)
    assert after == ["ok", "ok", "rate"]  # the 37 refused calls spent none of the 5 tokens


@pytest.fixture
async def counted() -> AsyncIterator[RedisState]:
    """A ``RedisState`` whose connections count what they send, its background sender running."""
    async with counting_state() as state:
        yield state


def through_breaker(state: RedisState, upstream: CallNext = instant) -> CallNext:
    breaker = BreakerPolicy({"crm": CircuitBreakerConfig(failures=5, reset_after=30)}, state.breakers)
    return lambda call: breaker(call, upstream)


async def test_an_admitted_call_awaits_one_redis_command_for_its_rate_and_concurrency_limits(
    counted: RedisState,
) -> None:
    several = [
        LimitRule.model_validate({"id": "all", "tools": ["*"], "rate_limit": "100/h", "burst": 100, "per": "global"}),
        LimitRule.model_validate({"id": "per-client", "tools": ["crm__*"], "rate_limit": "10/s", "per": "client"}),
        SLOTS,
        LimitRule.model_validate({"id": "per-tool", "tools": ["*"], "max_concurrency": 2, "per": "tool"}),
    ]
    limits = Limits(several, counted.limits)
    awaited: list[int] = []

    async def upstream(call: ToolCall) -> ToolResult:
        awaited.append(len(CountingConnection.commands) - before)
        return OK

    await limits(CALL, through_breaker(counted))  # script loaded, connections opened
    await anyio.wait_all_tasks_blocked()
    started, sends = len(CountingConnection.commands), CountingConnection.sends
    for _ in range(4):
        before = len(CountingConnection.commands)
        await limits(CALL, through_breaker(counted, upstream))
        await anyio.wait_all_tasks_blocked()  # the background batch sent
    assert awaited == [1, 1, 1, 1]  # every bucket and slot in one operation; the closed circuit trusted
    # And one command after each, in the background: the success and the two releases, in one script.
    assert (len(CountingConnection.commands) - started, CountingConnection.sends - sends) == (8, 8)
    assert [operation[0] for operation in operations_sent(started)] == ["enter", "succeeded", "release", "release"] * 4


async def test_one_call_after_another_costs_one_round_trip_each_the_background_riding_along(
    counted: RedisState,
) -> None:
    # What a call queues for the background (its slots' release, its success) goes ahead of the next call's
    # limits script, in the same round trip, when the background sender has nothing on its way.
    limits = Limits([RATE, SLOTS], counted.limits)
    chain = through_breaker(counted)
    await limits(CALL, chain)  # script loaded, connections opened
    await anyio.wait_all_tasks_blocked()
    started, sends = len(CountingConnection.commands), CountingConnection.sends
    for _ in range(4):
        await limits(CALL, chain)
    await anyio.wait_all_tasks_blocked()  # the last call's release and success, sent in the background
    assert (len(CountingConnection.commands) - started, CountingConnection.sends - sends) == (5, 5)  # one command each
    assert [operation[0] for operation in operations_sent(started)] == [
        "enter",
        *(["succeeded", "release", "enter"] * 3),  # what the call before queued, ahead of this call's limits
        "succeeded",
        "release",
    ]
    assert await counted.client.zcard(counted.prefix + "concurrency:slots:global:") == 0  # every release arrived
    # The successes arrived too (a closed circuit's hash is made by the first).
    assert await counted.client.hget(counted.prefix + "circuit:crm", "consec") == b"0"
