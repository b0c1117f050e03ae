"""ConcurrencyLimit: truly concurrent calls on real anyio, held in flight by events, never by sleeps."""

from collections.abc import Sequence

import anyio
import pytest
from pydantic import ValidationError

from gateway.config import LimitRule, Per
from gateway.errors import ConcurrencyLimited, RateLimited, UpstreamError
from gateway.types import CallContext, Principal, ToolCall, ToolResult
from policies.concurrency import ConcurrencyLimit
from policies.state import MemoryLimitState

pytestmark = pytest.mark.anyio


class BlockingUpstream:
    """The rest of the chain: each call waits for ``release`` (or fails, when ``fail`` is set)."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.in_flight = 0
        self.entered = 0
        self.fail = False

    async def __call__(self, call: ToolCall) -> ToolResult:
        self.in_flight += 1
        self.entered += 1
        try:
            await self.release.wait()
            if self.fail:
                raise UpstreamError("upstream broke", server=call.provider)
            return ToolResult.text("ok")
        finally:
            self.in_flight -= 1


async def instant(call: ToolCall) -> ToolResult:
    return ToolResult.text("ok")


def call(name: str = "crm__get_order", client: str = "alice") -> ToolCall:
    server, _, target = name.partition("__")
    return ToolCall(name, server, target, {}, CallContext(principal=Principal(client)))


def rule(
    tools: Sequence[str] = ("*",),
    limit: int = 1,
    per: Per = "global",
    id: str = "the-rule",
    clients: Sequence[str] | None = None,
) -> LimitRule:
    return LimitRule(tools=tuple(tools), max_concurrency=limit, per=per, id=id, clients=clients)


class Outcomes:
    def __init__(self) -> None:
        self.ok = 0
        self.refused: list[ConcurrencyLimited] = []


async def run(limit: ConcurrencyLimit, upstream: BlockingUpstream, the_call: ToolCall, outcomes: Outcomes) -> None:
    try:
        await limit(the_call, upstream)
    except ConcurrencyLimited as exc:
        outcomes.refused.append(exc)
    else:
        outcomes.ok += 1


async def test_exactly_n_of_m_concurrent_calls_pass_a_limit_of_n() -> None:
    state = MemoryLimitState()
    limit = ConcurrencyLimit([rule(limit=3)], state)
    upstream = BlockingUpstream()
    outcomes = Outcomes()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(run, limit, upstream, call(), outcomes)
            await anyio.wait_all_tasks_blocked()
            assert upstream.in_flight == 3
            assert len(outcomes.refused) == 7
            upstream.release.set()
    assert outcomes.ok == 3
    assert state.held == 0


async def test_a_refusal_names_the_rule_and_is_a_rate_limit() -> None:
    limit = ConcurrencyLimit([rule(limit=1, per="client", id="one-each")], MemoryLimitState())
    upstream = BlockingUpstream()
    outcomes = Outcomes()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, limit, upstream, call(), outcomes)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(ConcurrencyLimited) as refused:
                await limit(call(), upstream)
            upstream.release.set()
    assert isinstance(refused.value, RateLimited)
    assert refused.value.policy == "one-each"
    assert refused.value.outcome == "rate_limited"
    assert "retry when one of them finishes" in str(refused.value)


async def test_a_slot_is_free_again_once_a_call_finishes() -> None:
    limit = ConcurrencyLimit([rule(limit=1)], MemoryLimitState())
    for _ in range(3):
        await limit(call(), instant)


@pytest.mark.parametrize(
    ("per", "first", "second", "shares_a_slot"),
    [
        ("client", call(client="alice"), call(client="bob"), False),
        ("client", call("crm__a", client="alice"), call("files__b", client="alice"), True),
        ("tool", call("crm__a", client="alice"), call("crm__b", client="alice"), False),
        ("tool", call("crm__a", client="alice"), call("crm__a", client="bob"), True),
        ("server", call("crm__a"), call("files__a"), False),
        ("server", call("crm__a"), call("crm__b"), True),
        ("global", call("crm__a", client="alice"), call("files__b", client="bob"), True),
    ],
)
async def test_each_scope_counts_its_own_calls_together(
    per: Per, first: ToolCall, second: ToolCall, shares_a_slot: bool
) -> None:
    limit = ConcurrencyLimit([rule(limit=1, per=per)], MemoryLimitState())
    upstream = BlockingUpstream()
    outcomes = Outcomes()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, limit, upstream, first, outcomes)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(run, limit, upstream, second, outcomes)
            await anyio.wait_all_tasks_blocked()
            upstream.release.set()
    assert len(outcomes.refused) == (1 if shares_a_slot else 0)


async def test_rules_only_apply_to_tools_their_globs_match() -> None:
    limit = ConcurrencyLimit([rule(tools=("crm__*",), limit=1)], MemoryLimitState())
    upstream = BlockingUpstream()
    outcomes = Outcomes()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, limit, upstream, call("crm__a"), outcomes)
            await anyio.wait_all_tasks_blocked()
            for _ in range(3):
                tg.start_soon(run, limit, upstream, call("files__a"), outcomes)
            tg.start_soon(run, limit, upstream, call("crm__b"), outcomes)
            await anyio.wait_all_tasks_blocked()
            upstream.release.set()
    assert outcomes.ok == 4
    assert len(outcomes.refused) == 1


async def test_rules_limited_to_some_clients_leave_the_others_alone() -> None:
    limit = ConcurrencyLimit([rule(limit=1, clients=("bot-*",))], MemoryLimitState())
    upstream = BlockingUpstream()
    outcomes = Outcomes()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for client in ("bot-1", "bot-2", "alice", "bob"):
                tg.start_soon(run, limit, upstream, call(client=client), outcomes)
            await anyio.wait_all_tasks_blocked()
            upstream.release.set()
    assert outcomes.ok == 3
    assert len(outcomes.refused) == 1


async def test_the_slot_is_released_when_the_call_fails() -> None:
    state = MemoryLimitState()
    limit = ConcurrencyLimit([rule(limit=1)], state)
    upstream = BlockingUpstream()
    upstream.fail = True
    upstream.release.set()
    with pytest.raises(UpstreamError):
        await limit(call(), upstream)
    assert state.held == 0
    await limit(call(), instant)


async def test_the_slot_is_released_when_the_call_is_cancelled() -> None:
    state = MemoryLimitState()
    limit = ConcurrencyLimit([rule(limit=1)], state)
    upstream = BlockingUpstream()
    outcomes = Outcomes()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, limit, upstream, call(), outcomes)
            await anyio.wait_all_tasks_blocked()
            assert state.held == 1
            tg.cancel_scope.cancel()
    assert upstream.entered == 1
    assert outcomes.ok == 0
    assert state.held == 0
    await limit(call(), instant)


async def test_acquisition_is_all_or_nothing() -> None:
    # The per-client rule has room, the global one does not: the per-client slot must not stay taken.
    state = MemoryLimitState()
    limit = ConcurrencyLimit(
        [rule(limit=1, per="client", id="one-each"), rule(limit=1, per="global", id="one-at-all")], state
    )
    upstream = BlockingUpstream()
    outcomes = Outcomes()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, limit, upstream, call(client="bob"), outcomes)
            await anyio.wait_all_tasks_blocked()
            held = state.held
            with pytest.raises(ConcurrencyLimited) as refused:
                await limit(call(client="alice"), upstream)
            assert refused.value.policy == "one-at-all"
            assert state.held == held
            upstream.release.set()
    assert state.held == 0
    # Had alice's per-client slot leaked, this would be refused by one-each.
    await limit(call(client="alice"), instant)


async def test_slots_held_under_several_rules_are_all_released() -> None:
    state = MemoryLimitState()
    limit = ConcurrencyLimit([rule(limit=1, per=per, id=f"by-{per}") for per in ("client", "tool")], state)
    await limit(call(), instant)
    assert state.held == 0


async def test_no_applying_rule_lets_every_call_through() -> None:
    limit = ConcurrencyLimit([rule(tools=("none__*",), limit=1)], MemoryLimitState())
    upstream = BlockingUpstream()
    outcomes = Outcomes()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(run, limit, upstream, call(), outcomes)
            await anyio.wait_all_tasks_blocked()
            assert upstream.in_flight == 5
            upstream.release.set()
    assert outcomes.ok == 5


@pytest.mark.parametrize(
    ("limit", "per", "tools", "fault"),
    [(0, "global", ("*",), "max_concurrency"), (1, "nobody", ("*",), "per"), (1, "global", (), "tools")],
)
def test_a_rule_that_cannot_work_is_rejected(limit: int, per: str, tools: tuple[str, ...], fault: str) -> None:
    with pytest.raises(ValidationError, match=fault):
        LimitRule.model_validate({"tools": tools, "max_concurrency": limit, "per": per})
