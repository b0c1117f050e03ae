"""What only a shared state has: replicas on one Redis, leases that outlive a dead replica by at most their
length, Redis going away and coming back, cancelled commands. Real Redis, real time (short leases)."""

import contextlib
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from gateway.config import CircuitBreakerConfig, LimitRule
from gateway.errors import ConcurrencyLimited, RateLimited, SharedStateUnavailable, UpstreamUnavailable
from gateway.types import CallContext, Principal, ToolCall, ToolResult
from policies.breaker import BreakerPolicy
from policies.concurrency import ConcurrencyLimit
from policies.ratelimit import RateLimit
from policies.redis_state import open_redis_state
from policies.state import Admission, Refusal
from tests.policies.fakes import FakeClock, Gate
from tests.redis_support import (
    REDIS,
    CountingConnection,
    counting_state,
    forget,
    new_prefix,
    operations_sent,
    private_redis,
    redis_states,
    require_redis,
    shared_state,
)
from tests.support import ROOT

pytestmark = pytest.mark.anyio

CALL = ToolCall("crm__get_order", "crm", "get_order", {"id": 1}, CallContext(principal=Principal("alice")))
BREAKER = CircuitBreakerConfig(failures=1, reset_after=30)


async def instant(call: ToolCall) -> ToolResult:
    return ToolResult.text("ok")


async def refused(call: ToolCall) -> ToolResult:
    raise UpstreamUnavailable("connection refused", server=call.provider)


async def test_exactly_n_of_m_concurrent_calls_pass_across_two_replicas() -> None:
    rule = LimitRule.model_validate({"tools": ["*"], "max_concurrency": 3, "per": "global"})
    async with redis_states() as states:
        replicas = [ConcurrencyLimit([rule], states.new().limits) for _ in range(2)]
        gate = Gate(expected=10)

        async def call(index: int) -> None:
            try:
                await replicas[index % 2](CALL, gate)
            except ConcurrencyLimited:
                gate.end()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for index in range(10):
                    tg.start_soon(call, index)
                await gate.all_in.wait()
                gate.release.set()
        # Every slot was given back: all three are free again.
        assert [await states.made[0].limits.acquire("concurrency:" + rule.id + ":global:", 3) for _ in range(4)] == [
            True,
            True,
            True,
            False,
        ]
    assert (gate.entered, gate.ended) == (3, 10)


async def test_exactly_the_burst_of_m_concurrent_calls_pass_a_rate_limit_across_two_replicas() -> None:
    rule = LimitRule.model_validate({"tools": ["*"], "rate_limit": "5/h", "burst": 5, "per": "global"})
    async with redis_states() as states:
        replicas = [RateLimit([rule], states.new().limits) for _ in range(2)]
        passed, refused = 0, 0

        async def call(index: int) -> None:
            nonlocal passed, refused
            try:
                await replicas[index % 2](CALL, instant)
                passed += 1
            except RateLimited:
                refused += 1

        async with anyio.create_task_group() as tg:
            for index in range(40):
                tg.start_soon(call, index)
    assert (passed, refused) == (5, 35)


async def test_a_bucket_key_expires_once_the_bucket_is_full_again() -> None:
    async with redis_states() as states:
        limits = states.new().limits
        assert await limits.take("k", rate=100.0, burst=1) == 0.0
        ttl = await states.made[0].client.pttl(states.prefix + "k")
    assert 0 < ttl <= 10  # full again in 10 ms, and then forgotten: keys in use, never every key ever seen


async def test_slots_are_held_while_their_lease_is_renewed() -> None:
    async with redis_states() as states:
        holder, other = states.new(lease=0.3), states.new(lease=0.3)
        assert await holder.limits.acquire("slots", 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder.renew)
            await anyio.sleep(1.0)  # three leases long
            assert not await other.limits.acquire("slots", 1)
            tg.cancel_scope.cancel()
        await holder.limits.release("slots")
        assert await other.limits.acquire("slots", 1)


HOLDER = textwrap.dedent(
    """
    import sys, anyio
    from policies.redis_state import open_redis_state

    async def main() -> None:
        async with open_redis_state(sys.argv[1], prefix=sys.argv[2], lease=1.0) as state:
            assert await state.limits.acquire("slots", 2)
            assert await state.limits.acquire("slots", 2)
            print("held", flush=True)
            await anyio.sleep_forever()

    anyio.run(main)
    """
)


async def test_a_replica_killed_holding_slots_loses_them_within_the_lease() -> None:
    async with redis_states() as states:
        command = [sys.executable, "-c", HOLDER, REDIS, states.prefix]
        async with await anyio.open_process(command, cwd=ROOT, stderr=None) as process:
            try:
                assert process.stdout is not None
                assert (await process.stdout.receive()).startswith(b"held")
                await anyio.sleep(1.5)  # renewed past its first lease while alive
                other = states.new().limits
                assert not await other.acquire("slots", 2)
                process.kill()
                await process.wait()
                killed = anyio.current_time()
                with anyio.fail_after(3):
                    while not await other.acquire("slots", 2):  # noqa: ASYNC110  (the state is in Redis)
                        await anyio.sleep(0.05)
                waited = anyio.current_time() - killed
            finally:
                if process.returncode is None:
                    process.kill()
    assert waited <= 1.2  # within the lease (1 s), renewed last at most a third of it before the kill


async def test_a_circuit_opened_on_one_replica_refuses_calls_on_the_other_at_once() -> None:
    async with redis_states() as states:
        first, second = (BreakerPolicy({"crm": BREAKER}, states.new().breakers) for _ in range(2))
        admission = await states.made[0].breakers.admit("crm", BREAKER)
        assert isinstance(admission, Admission)
        await states.made[0].breakers.failed("crm", BREAKER, admission, "connection refused")
        assert await second.state("crm") == "open"
        refusal = await states.made[1].breakers.admit("crm", BREAKER)
    assert isinstance(refusal, Refusal)
    assert refusal.reason == "1 consecutive failures, the last: connection refused"
    assert 29 < refusal.retry_after <= 30


async def test_a_circuit_another_replica_opens_refuses_calls_here_within_a_second() -> None:
    async with redis_states() as states:
        here, there = states.new().breakers, states.new().breakers
        assert isinstance(await here.admit("crm", BREAKER), Admission)  # seen closed here
        admission = await there.admit("crm", BREAKER)
        assert isinstance(admission, Admission)
        assert await there.failed("crm", BREAKER, admission, "connection refused") == "open"
        opened = anyio.current_time()
        with anyio.fail_after(1.0):
            while isinstance(await here.admit("crm", BREAKER), Admission):  # noqa: ASYNC110  (the state is in Redis)
                await anyio.sleep(0.02)
        refused_after = anyio.current_time() - opened
    assert refused_after <= 0.6  # the half second a closed circuit is trusted, and a poll


async def test_half_open_probes_are_capped_across_replicas() -> None:
    clock = FakeClock()
    config = CircuitBreakerConfig(failures=1, reset_after=30, half_open_probes=2)
    async with redis_states() as states:
        replicas = [states.new(clock).breakers for _ in range(3)]
        admission = await replicas[0].admit("crm", config)
        assert isinstance(admission, Admission)
        await replicas[0].failed("crm", config, admission, "timeout")
        clock.advance(30)
        answers = [await replica.admit("crm", config) for replica in replicas]
        probe = answers[0]
        assert isinstance(probe, Admission)
        assert probe.entered == "half_open"
        await replicas[0].abandoned("crm", probe)  # a cancelled probe frees its slot for another replica
        again = await replicas[2].admit("crm", config)
    assert [type(answer) for answer in answers] == [Admission, Admission, Refusal]
    assert [answer.probe for answer in answers[:2] if isinstance(answer, Admission)] == [True, True]
    refusal = answers[2]
    assert isinstance(refusal, Refusal)
    assert (refusal.state, refusal.probes) == ("half_open", 2)
    assert isinstance(again, Admission)
    assert again.probe


async def test_a_probe_slot_of_a_replica_that_died_is_free_again_after_the_lease() -> None:
    clock = FakeClock()
    config = CircuitBreakerConfig(failures=1, reset_after=30, half_open_probes=1)
    async with redis_states() as states:
        dead, alive = states.new(clock, lease=5).breakers, states.new(clock, lease=5).breakers
        admission = await dead.admit("crm", config)
        assert isinstance(admission, Admission)
        await dead.failed("crm", config, admission, "timeout")
        clock.advance(30)
        assert isinstance(await dead.admit("crm", config), Admission)  # its probe, never reported: it died
        assert isinstance(await alive.admit("crm", config), Refusal)
        clock.advance(5)
        probe = await alive.admit("crm", config)
        assert isinstance(probe, Admission)
        assert probe.probe
        assert await alive.succeeded("crm", config, probe) == "closed"


@pytest.mark.parametrize("failure", ["allow", "deny"])
async def test_while_redis_is_away_calls_follow_the_failure_setting_and_limits_return_with_it(
    tmp_path: Path, failure: str
) -> None:
    rule = LimitRule.model_validate({"tools": ["*"], "rate_limit": "2/h", "burst": 2, "per": "global"})
    failures: list[str] = []
    with private_redis(tmp_path) as server:
        async with redis_states(server.url) as states:
            # closed_for=0: every call asks Redis about the circuit (a closed one seen is otherwise trusted for 0.5 s)
            state = states.new(failure=failure, on_failure=failures.append, retry_interval=0.2, closed_for=0)
            limit, breaker = RateLimit([rule], state.limits), BreakerPolicy({"crm": BREAKER}, state.breakers)

            async def through() -> str:
                try:
                    await limit(CALL, lambda call: breaker(call, instant))
                except SharedStateUnavailable as exc:
                    return f"unavailable, retry after {exc.retry_after}"
                except RateLimited:
                    return "limited"
                return "ok"

            before = [await through() for _ in range(3)]
            server.stop()
            away = [await through() for _ in range(5)]
            server.start()
            await anyio.sleep(0.3)  # past the retry interval: Redis is tried again, and is there
            back = [await through() for _ in range(3)]
    assert before == ["ok", "ok", "limited"]
    assert away == (["ok"] * 5 if failure == "allow" else ["unavailable, retry after 1.0"] * 5)
    assert back == ["ok", "ok", "limited"]  # a new Redis (it kept nothing): the limit counts again
    # Each operation that could not reach Redis is counted (the first tried it; the rest failed fast for a while).
    assert failures == (["take", "admit"] * 5 if failure == "allow" else ["take"] * 5)


async def test_a_cancelled_command_never_leaves_its_reply_for_another() -> None:
    require_redis()
    clock = FakeClock()
    async with redis_states() as states:
        shared = states.new(clock)
        shared.client.connection_pool.max_connections = 1  # every command on the same connection
        opened = CircuitBreakerConfig(failures=1, reset_after=3600)
        admission = await shared.breakers.admit("open", opened)
        assert isinstance(admission, Admission)
        await shared.breakers.failed("open", opened, admission, "down")
        wrong = 0
        for attempt in range(200):
            with anyio.move_on_after(attempt % 7 * 0.0002):
                await shared.breakers.state("open", opened)
            states_seen = (await shared.breakers.state("closed", opened), await shared.breakers.state("open", opened))
            wrong += states_seen != ("closed", "open")
    assert wrong == 0


async def test_every_key_lives_under_the_prefix() -> None:
    async with redis_states() as states:
        state = states.new()
        await state.limits.take("bucket", 1.0, 1)
        await state.limits.acquire("slots", 1)
        admission = await state.breakers.admit("crm", BREAKER)
        assert isinstance(admission, Admission)
        await state.breakers.failed("crm", BREAKER, admission, "down")
        client = Redis.from_url(REDIS)
        keys = sorted([key.decode() async for key in client.scan_iter(match=states.prefix + "*")])
        await client.aclose()
    assert keys == [states.prefix + key for key in ("bucket", "circuit:crm", "slots")]


async def test_a_caller_that_waits_for_its_call_never_finds_its_own_slot_still_taken() -> None:
    # Releases go to Redis in the background; the next acquire of the key removes them first.
    rule = LimitRule.model_validate({"tools": ["*"], "max_concurrency": 1, "per": "global"})
    async with shared_state() as state:
        limit = ConcurrencyLimit([rule], state.limits)
        for _ in range(300):
            await limit(CALL, instant)


async def test_one_replicas_reports_reach_redis_in_the_order_they_were_made() -> None:
    # Successes are sent in the background, failures awaited in the same queue: a streak is never mistaken.
    config = CircuitBreakerConfig(failures=2, reset_after=30)
    async with shared_state() as state:
        breaker = BreakerPolicy({"crm": config}, state.breakers)
        for _ in range(100):
            await breaker(CALL, instant)
            with pytest.raises(UpstreamUnavailable):
                await breaker(CALL, refused)
        closed = await breaker.state("crm")
        with pytest.raises(UpstreamUnavailable):
            await breaker(CALL, refused)
        opened = await breaker.state("crm")
    assert (closed, opened) == ("closed", "open")


async def test_what_is_queued_reaches_redis_before_the_state_closes() -> None:
    require_redis()
    prefix = new_prefix()
    try:
        async with open_redis_state(REDIS, prefix=prefix) as state:
            for _ in range(50):
                assert await state.limits.acquire("slots", 100)
            for _ in range(50):
                await state.limits.release("slots")
        client = Redis.from_url(REDIS)
        held = await client.zcard(prefix + "slots")
        await client.aclose()
    finally:
        await forget(prefix)
    assert held == 0


@pytest.mark.parametrize("background", [False, True])
async def test_under_deny_redis_going_away_during_a_call_never_replaces_its_outcome(
    tmp_path: Path, background: bool
) -> None:
    config = CircuitBreakerConfig(failures=1, reset_after=30)
    with private_redis(tmp_path) as server:
        async with contextlib.AsyncExitStack() as stack:
            if background:  # reports queued and sent by the state's own task, as in the gateway
                state = await stack.enter_async_context(
                    open_redis_state(server.url, prefix=new_prefix(), failure="deny")
                )
            else:
                state = (await stack.enter_async_context(redis_states(server.url))).new(failure="deny")
            breaker = BreakerPolicy({"crm": config}, state.breakers)

            async def answers_after_redis_stops(call: ToolCall) -> ToolResult:
                server.stop()
                return ToolResult.text("answered")

            async def fails_after_redis_stops(call: ToolCall) -> ToolResult:
                server.stop()
                raise UpstreamUnavailable("connection refused", server=call.provider)

            answered = await breaker(CALL, answers_after_redis_stops)
            server.start()
            await anyio.sleep(0.6)  # past the half second Redis is left alone after a failure
            with pytest.raises(UpstreamUnavailable):
                await breaker(CALL, fails_after_redis_stops)
    assert answered.content[0]["text"] == "answered"


async def test_a_circuits_successes_queued_together_are_one_operation_that_counts_each() -> None:
    config = CircuitBreakerConfig(failures=5, failure_rate=0.5, min_calls=100, window=60, reset_after=30)
    async with counting_state(clock=FakeClock()) as state:
        breaker = BreakerPolicy({"crm": config}, state.breakers)
        await breaker(CALL, instant)  # seen closed: the next calls are admitted without asking Redis
        await anyio.wait_all_tasks_blocked()
        started = len(CountingConnection.commands)
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(breaker, CALL, instant)
        await anyio.wait_all_tasks_blocked()  # the background batch sent
        operations = operations_sent(started)
        window = await state.client.hgetall(state.prefix + "circuit:crm:window")
    assert [(operation[0], operation[-1]) for operation in operations] == [("succeeded", "10")]
    # Exactly as eleven reports one by one: each success is a call in the window slot of the time Redis got it
    # (the fake clock's 1000 s: slot 333 of 3 s).
    assert window == {b"c333": b"11", b"f333": b"0"}


async def test_a_failure_parts_the_successes_merged_around_it_so_reports_keep_their_order() -> None:
    # Two failures apart never make a streak of two: merged across the first, the successes would come before
    # both failures and open the circuit.
    config = CircuitBreakerConfig(failures=2, failure_rate=0.9, min_calls=100, window=60, reset_after=30)
    async with counting_state(clock=FakeClock()) as state:
        breakers = state.breakers
        admission = await breakers.admit("crm", config)
        assert isinstance(admission, Admission)
        started = len(CountingConnection.commands)
        outcomes = ["ok"] * 3 + ["failed"] + ["ok"] * 2 + ["failed"]
        entered: list[str | None] = []

        async def report(outcome: str) -> None:
            if outcome == "ok":
                entered.append(await breakers.succeeded("crm", config, admission))
            else:
                entered.append(await breakers.failed("crm", config, admission, "timeout"))

        async with anyio.create_task_group() as tg:
            for outcome in outcomes:  # all made before the background sender runs: one batch
                tg.start_soon(report, outcome)
        operations = operations_sent(started)
        closed = await breakers.state("crm", config)
        window = await state.client.hgetall(state.prefix + "circuit:crm:window")
    assert [(operation[0], operation[-1] if operation[0] == "succeeded" else "") for operation in operations] == [
        ("succeeded", "3"),
        ("failed", ""),
        ("succeeded", "2"),
        ("failed", ""),
    ]
    assert (entered, closed) == ([None] * 7, "closed")
    assert window == {b"c333": b"7", b"f333": b"2"}


async def test_the_slots_of_calls_ending_together_are_released_in_one_operation() -> None:
    rule = LimitRule.model_validate({"tools": ["*"], "max_concurrency": 5, "per": "global"})
    async with counting_state() as state:
        limit = ConcurrencyLimit([rule], state.limits)
        gate = Gate(expected=5)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(limit, CALL, gate)
                await gate.all_in.wait()
                started = len(CountingConnection.commands)
                gate.release.set()
        await anyio.wait_all_tasks_blocked()  # the background batch sent
        operations = operations_sent(started)
        held = await state.client.zcard(state.prefix + f"concurrency:{rule.id}:global:")
    assert [(operation[0], len(operation) - 3) for operation in operations] == [("release", 5)]  # its members
    assert (held, state.releasing, state.leases) == (0, {}, {})


@pytest.mark.parametrize("failure", ["allow", "deny"])
async def test_merged_reports_redis_never_got_are_each_counted_and_change_no_outcome(
    tmp_path: Path, failure: str
) -> None:
    rule = LimitRule.model_validate({"tools": ["*"], "max_concurrency": 5, "per": "global"})
    failures: list[str] = []
    with private_redis(tmp_path) as server:
        async with counting_state(server.url, failure=failure, on_failure=failures.append) as state:
            limit, breaker = ConcurrencyLimit([rule], state.limits), BreakerPolicy({"crm": BREAKER}, state.breakers)
            gate = Gate(expected=3)
            answers: list[str] = []

            async def call() -> None:
                result = await limit(CALL, lambda call: breaker(call, gate))
                answers.append(result.content[0]["text"])

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for _ in range(3):
                        tg.start_soon(call)
                    await gate.all_in.wait()
                    server.stop()
                    gate.release.set()
            await anyio.wait_all_tasks_blocked()  # the background batch tried
            releasing = dict(state.releasing)
    assert answers == ["ok"] * 3
    # One operation each for the three successes and the three releases, each report counted.
    assert failures == ["succeeded"] * 3 + ["release"] * 3
    assert releasing == {}  # the leases run out on their own


async def test_an_operation_that_fails_in_redis_fails_alone_in_its_batch() -> None:
    failures: list[str] = []
    async with counting_state(on_failure=failures.append) as state:
        await state.client.hset(state.prefix + "not-a-bucket", "field", "value")  # GET on it fails: WRONGTYPE
        assert await state.limits.acquire("slots", 1)
        await state.limits.release("slots")  # queued: it rides with the next awaited operation
        started = len(CountingConnection.commands)
        waited = await state.limits.take("not-a-bucket", 1.0, 1)
        operations = [operation[0] for operation in operations_sent(started)]
        held = await state.client.zcard(state.prefix + "slots")
    assert operations == ["release", "enter"]
    assert (held, waited, failures) == (0, 0.0, ["take"])  # the release done; the take let through (allow), counted
