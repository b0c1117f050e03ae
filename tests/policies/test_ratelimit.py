"""RateLimit: which rules apply, what they count by, and when a refused caller is told to retry."""

from collections.abc import Sequence

import pytest
from pydantic import ValidationError

from gateway.config import LimitRule, Per
from gateway.errors import PolicyDenied, RateLimited
from gateway.types import CallContext, Principal, ToolCall, ToolResult
from policies.ratelimit import RateLimit
from policies.state import MemoryLimitState
from tests.policies.fakes import FakeClock

pytestmark = pytest.mark.anyio


class Upstream:
    """The rest of the chain: counts the calls that got through."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, call: ToolCall) -> ToolResult:
        self.calls.append(call.name)
        return ToolResult.text("ok")


def call(name: str = "crm__get_order", client: str = "alice", provider: str | None = None) -> ToolCall:
    server = provider if provider is not None else name.split("__")[0]
    return ToolCall(name, server, name.split("__")[-1], {}, CallContext(principal=Principal(client)))


def rule(
    tools: Sequence[str] = ("*",),
    rate: str = "1/s",
    burst: float = 1.0,
    per: Per = "global",
    id: str = "the-rule",
    clients: Sequence[str] | None = None,
) -> LimitRule:
    return LimitRule(tools=tuple(tools), rate_limit=rate, burst=burst, per=per, id=id, clients=clients)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(50.0)


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


def policy(clock: FakeClock, *rules: LimitRule) -> RateLimit:
    return RateLimit(rules, MemoryLimitState(clock))


async def passes(limit: RateLimit, upstream: Upstream, the_call: ToolCall) -> bool:
    try:
        await limit(the_call, upstream)
    except RateLimited:
        return False
    return True


async def test_calls_within_the_burst_pass_and_the_next_is_refused(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(clock, rule(rate="10/s", burst=3))
    assert [await passes(limit, upstream, call()) for _ in range(4)] == [True, True, True, False]
    assert len(upstream.calls) == 3


async def test_a_refusal_is_a_policy_denial_naming_the_rule_with_a_retry_after(
    clock: FakeClock, upstream: Upstream
) -> None:
    limit = policy(clock, rule(rate="10/s", per="client", id="crm-rate"))
    await limit(call(), upstream)
    with pytest.raises(RateLimited) as refused:
        await limit(call(), upstream)
    assert isinstance(refused.value, PolicyDenied)
    assert refused.value.policy == "crm-rate"
    assert refused.value.outcome == "rate_limited"
    assert refused.value.retry_after == pytest.approx(0.1)
    assert "10/s" in str(refused.value)
    assert "crm__get_order" in str(refused.value)


async def test_retry_after_is_rounded_up_to_a_tenth(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(clock, rule(rate="3/s"))  # a token every 0.333… s
    await limit(call(), upstream)
    with pytest.raises(RateLimited) as refused:
        await limit(call(), upstream)
    assert refused.value.retry_after == pytest.approx(0.4)


async def test_retrying_when_told_succeeds(clock: FakeClock, upstream: Upstream) -> None:
    for rate in ("3/s", "7/s", "10/s", "1/2s", "1/30s"):
        limit = policy(clock, rule(rate=rate, burst=2))
        await limit(call(), upstream)
        await limit(call(), upstream)
        with pytest.raises(RateLimited) as refused:
            await limit(call(), upstream)
        clock.advance(refused.value.retry_after)
        assert await passes(limit, upstream, call()), rate


async def test_retrying_a_tenth_before_the_stated_time_is_refused(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(clock, rule(rate="3/s"))
    await limit(call(), upstream)
    with pytest.raises(RateLimited) as refused:
        await limit(call(), upstream)
    clock.advance(refused.value.retry_after - 0.1)
    assert not await passes(limit, upstream, call())


async def test_the_bucket_refills_over_time(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(clock, rule(rate="2/s", burst=2))
    for _ in range(2):
        await limit(call(), upstream)
    clock.advance(0.5)
    assert await passes(limit, upstream, call())
    assert not await passes(limit, upstream, call())


async def test_per_client_limits_count_each_client_separately(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(clock, rule(per="client"))
    assert await passes(limit, upstream, call(client="alice"))
    assert await passes(limit, upstream, call(client="bob"))
    assert not await passes(limit, upstream, call(client="alice"))


async def test_per_tool_limits_count_each_tool_separately(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(clock, rule(per="tool"))
    assert await passes(limit, upstream, call("crm__get_order", client="alice"))
    assert await passes(limit, upstream, call("crm__list_orders", client="alice"))
    assert not await passes(limit, upstream, call("crm__get_order", client="bob"))


async def test_per_server_limits_count_each_server_separately(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(clock, rule(per="server"))
    assert await passes(limit, upstream, call("crm__get_order"))
    assert await passes(limit, upstream, call("files__read"))
    assert not await passes(limit, upstream, call("crm__list_orders"))


async def test_a_global_limit_counts_every_call_together(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(clock, rule(per="global", burst=2))
    assert await passes(limit, upstream, call("crm__get_order", client="alice"))
    assert await passes(limit, upstream, call("files__read", client="bob"))
    assert not await passes(limit, upstream, call("inventory__check", client="carol"))


async def test_rules_only_apply_to_tools_their_globs_match(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(clock, rule(tools=("crm__get_*", "files__read")))
    assert await passes(limit, upstream, call("crm__get_order"))
    assert not await passes(limit, upstream, call("crm__get_customer"))
    assert not await passes(limit, upstream, call("files__read"))
    for _ in range(3):
        assert await passes(limit, upstream, call("crm__list_orders"))
        assert await passes(limit, upstream, call("files__readme"))


async def test_glob_matching_is_case_sensitive(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(clock, rule(tools=("crm__*",)))
    for _ in range(3):
        assert await passes(limit, upstream, call("CRM__get_order"))


async def test_rules_limited_to_some_clients_leave_the_others_alone(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(clock, rule(per="client", clients=("bot-*",)))
    assert await passes(limit, upstream, call(client="bot-1"))
    assert not await passes(limit, upstream, call(client="bot-1"))
    for _ in range(3):
        assert await passes(limit, upstream, call(client="alice"))


async def test_every_matching_rule_applies(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(
        clock,
        rule(tools=("*",), per="client", burst=3, id="everything"),
        rule(tools=("crm__*",), per="global", burst=1, id="crm"),
    )
    assert await passes(limit, upstream, call("crm__get_order"))
    with pytest.raises(RateLimited) as refused:
        await limit(call("crm__get_order"), upstream)
    assert refused.value.policy == "crm"


async def test_a_call_refused_by_one_rule_takes_no_token_from_the_others(clock: FakeClock, upstream: Upstream) -> None:
    # All or nothing (LimitState.enter): the refused call does not count against the rule that let it through.
    limit = policy(
        clock,
        rule(tools=("*",), per="client", burst=2, id="everything"),
        rule(tools=("crm__*",), per="global", burst=1, id="crm"),
    )
    assert await passes(limit, upstream, call("crm__get_order"))
    assert not await passes(limit, upstream, call("crm__get_order"))  # refused by the crm rule
    assert await passes(limit, upstream, call("files__read"))  # the everything bucket's second token is still there
    with pytest.raises(RateLimited) as refused:
        await limit(call("files__read"), upstream)
    assert refused.value.policy == "everything"


async def test_the_refusal_names_the_rule_whose_bucket_refills_last(clock: FakeClock, upstream: Upstream) -> None:
    # Both buckets are empty: retrying when the quicker one refills would still be refused by the other.
    limit = policy(
        clock,
        rule(tools=("*",), rate="10/s", per="global", id="quick"),
        rule(tools=("*",), rate="1/s", per="global", id="slow"),
    )
    assert await passes(limit, upstream, call())
    with pytest.raises(RateLimited) as refused:
        await limit(call(), upstream)
    assert (refused.value.policy, refused.value.retry_after) == ("slow", pytest.approx(1.0))
    clock.advance(1.0)
    assert await passes(limit, upstream, call())


async def test_rules_with_different_ids_have_separate_buckets(clock: FakeClock, upstream: Upstream) -> None:
    shared = MemoryLimitState(clock)
    first = RateLimit([rule(id="first")], shared)
    second = RateLimit([rule(id="second")], shared)
    assert await passes(first, upstream, call())
    assert await passes(second, upstream, call())
    assert not await passes(first, upstream, call())


async def test_the_same_name_is_matched_again_after_many_other_names(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(clock, rule(tools=("crm__*",), per="tool"))
    assert await passes(limit, upstream, call("crm__get_order"))
    for index in range(2000):
        await limit(call(f"other__tool_{index}"), upstream)
    assert not await passes(limit, upstream, call("crm__get_order"))


async def test_no_rules_let_every_call_through(clock: FakeClock, upstream: Upstream) -> None:
    limit = policy(clock)
    for _ in range(5):
        assert await passes(limit, upstream, call())


@pytest.mark.parametrize(
    ("rate", "burst", "per", "tools", "fault"),
    [("0/s", 1.0, "global", ("*",), "rate_limit"), ("1" + "0" * 400 + "/s", 1.0, "global", ("*",), "rate_limit")]
    + [
        ("1/s", 0.5, "global", ("*",), "burst"),
        ("1/s", 1.0, "everyone", ("*",), "per"),
        ("1/s", 1.0, "global", (), "tools"),
    ],
)
def test_a_rule_that_cannot_work_is_rejected(
    rate: str, burst: float, per: str, tools: tuple[str, ...], fault: str
) -> None:
    with pytest.raises(ValidationError, match=fault):
        LimitRule.model_validate({"tools": tools, "rate_limit": rate, "burst": burst, "per": per})
