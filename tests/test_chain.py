"""The chain built from a config: rules are known by their ids, so editing the rules keeps each one's limits."""

from textwrap import dedent

import anyio
import pytest

from gateway.chain import build_chain
from gateway.config import parse_config
from gateway.dispatch import compose
from gateway.errors import PolicyDenied, RateLimited
from gateway.types import CallContext, CallNext, JSONObject, Principal, ToolCall, ToolResult
from policies.state import MemoryBreakerState, MemoryLimitState
from tests.policies.fakes import OK, FakeClock

pytestmark = pytest.mark.anyio

RULES = """\
policies:
  - {tools: "crm__*", rate_limit: 1/s, burst: 2}
  - {id: kb, tools: "kb__*", rate_limit: 1/s, burst: 2}
"""
EDITED = """\
policies:
  - {deny: "files__delete_*"}
  - {id: kb, tools: "kb__*", rate_limit: 1/s, burst: 2}
  - {tools: "files__*", rate_limit: 5/s}
  - {tools: "crm__*", rate_limit: 1/s, burst: 2}
"""
"""RULES with a rule inserted before each of its rules and their order changed."""


async def unreachable(name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
    raise AssertionError("no fallback is configured")


async def upstream(call: ToolCall) -> ToolResult:
    return OK


def chain(config: str, limits: MemoryLimitState, terminal: CallNext = upstream) -> CallNext:
    built = build_chain(
        parse_config(dedent(config), environ={}), limits=limits, breakers=MemoryBreakerState(), call_tool=unreachable
    )
    return compose(built.policies, terminal)


def call(name: str) -> ToolCall:
    server, _, target = name.partition("__")
    return ToolCall(name, server, target, {}, CallContext(principal=Principal("alice")))


async def passes(chain: CallNext, name: str) -> bool:
    try:
        await chain(call(name))
    except RateLimited:
        return False
    return True


async def refused_by(chain: CallNext, name: str) -> str:
    """The policy that refuses calls to ``name`` once its limit (if any) is used up."""
    for _ in range(10):
        try:
            await chain(call(name))
        except PolicyDenied as exc:
            return exc.policy
    raise AssertionError(f"{name} was never refused")


async def test_a_half_used_limit_stays_half_used_when_rules_are_inserted_before_it_or_moved() -> None:
    limits = MemoryLimitState(FakeClock())
    before = chain(RULES, limits)
    for name in ("crm__get_order", "kb__search"):
        assert await passes(before, name)  # one of the bucket's two tokens taken
    after = chain(EDITED, limits)  # the same state, as after a reload, or on a replica with the new config
    for name in ("crm__get_order", "kb__search"):
        assert await passes(after, name)
        assert not await passes(after, name)


async def test_a_slot_held_under_a_rule_still_counts_after_rules_are_inserted_before_it() -> None:
    limits = MemoryLimitState()
    release = anyio.Event()

    async def blocking(call: ToolCall) -> ToolResult:
        await release.wait()
        return OK

    before = chain('policies: [{tools: "crm__*", max_concurrency: 1}]', limits, blocking)
    after = chain(
        'policies: [{deny: "x"}, {tools: "kb__*", max_concurrency: 1}, {tools: "crm__*", max_concurrency: 1}]', limits
    )
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(before, call("crm__get_order"))
            await anyio.wait_all_tasks_blocked()
            assert not await passes(after, "crm__get_order")
            assert await passes(after, "kb__search")
            release.set()
    assert await passes(after, "crm__get_order")


async def test_a_refusal_names_the_rule_by_its_given_or_derived_id() -> None:
    edited = chain(EDITED, MemoryLimitState(FakeClock()))
    assert await refused_by(edited, "kb__search") == "kb"
    assert await refused_by(edited, "crm__get_order") == "rate-crm__all-f423af64"
    assert await refused_by(edited, "files__delete_all") == "deny-files__delete_all-e557dab2"
