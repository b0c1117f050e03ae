"""Fallbacks, and the three resilience policies composed the way the gateway chains them."""

from collections.abc import Mapping

import anyio
import pytest

from gateway.config import CircuitBreakerConfig, ServerRetry
from gateway.dispatch import compose
from gateway.errors import CircuitOpen, Forbidden, ToolNotFound, UpstreamTimeout, UpstreamUnavailable
from gateway.types import CallContext, CallNext, JSONObject, Policy, Principal, Tool, ToolCall, ToolResult
from policies.breaker import BreakerPolicy
from policies.fallback import META_KEY, FallbackPolicy
from policies.retry import RetryPolicy
from policies.state import MemoryBreakerState
from tests.policies.fakes import OK, Upstream, down

pytestmark = pytest.mark.anyio

CALLER = CallContext(principal=Principal("t"))


class Gateway:
    """A tiny dispatch path: registry names ``<server>__<tool>`` through a policy chain to fake servers.

    Like the real dispatcher's inner chain, ``call`` raises gateway errors rather than turning them into results.
    """

    def __init__(self, servers: Mapping[str, Upstream]) -> None:
        self.servers = servers
        self.chain: CallNext = self._invoke

    async def call(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        server, _, target = name.partition("__")
        if server not in self.servers:
            raise ToolNotFound(name)
        return await self.chain(call_to(server, target, arguments, context))

    async def _invoke(self, call: ToolCall) -> ToolResult:
        return await self.servers[call.provider](call)


def call_to(
    server: str = "crm", target: str = "get_order", arguments: JSONObject | None = None, context: CallContext = CALLER
) -> ToolCall:
    name = f"{server}__{target}"
    return ToolCall(name, server, target, {"id": 1} if arguments is None else arguments, context, Tool(name, {}))


def with_fallback(servers: Mapping[str, Upstream], routes: Mapping[str, Mapping[str, str]]) -> Gateway:
    gateway = Gateway(servers)
    gateway.chain = compose([FallbackPolicy(routes, gateway.call)], gateway.chain)
    return gateway


async def test_an_upstream_failure_is_answered_by_the_fallback_tool() -> None:
    replica = Upstream(answer=ToolResult.text("from the replica"))
    gateway = with_fallback({"crm": Upstream([down()]), "replica": replica}, {"crm": {"get_*": "replica__get_order"}})
    context = CallContext(principal=Principal("alice"))
    result = await gateway.call("crm__get_order", {"id": 7}, context)
    assert result.content == ToolResult.text("from the replica").content
    assert replica.calls == 1
    assert result.meta is not None
    assert result.meta[META_KEY] == {
        "from": "crm__get_order",
        "to": "replica__get_order",
        "reason": "crm is not connected",
    }


async def test_the_fallback_gets_the_original_arguments_and_context() -> None:
    seen: list[tuple[str, JSONObject, CallContext]] = []

    async def call_tool(name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        seen.append((name, arguments, context))
        return OK

    call = call_to(arguments={"id": 7}, context=CallContext(principal=Principal("alice")))
    await FallbackPolicy({"crm": {"*": "replica__get_order"}}, call_tool)(call, Upstream([down()]))
    assert seen == [("replica__get_order", {"id": 7}, call.context)]


async def test_an_open_circuit_is_answered_by_the_fallback_tool() -> None:
    gateway = with_fallback(
        {"crm": Upstream([CircuitOpen("open")]), "replica": Upstream()}, {"crm": {"*": "replica__x"}}
    )
    result = await gateway.call("crm__get_order", {}, CALLER)
    assert result.meta is not None
    assert result.meta[META_KEY]["reason"] == "open"


async def test_existing_meta_of_the_fallback_result_is_kept() -> None:
    answer = ToolResult(content=(), meta={"trace": "abc"})
    gateway = with_fallback(
        {"crm": Upstream([down()]), "replica": Upstream(answer=answer)}, {"crm": {"*": "replica__x"}}
    )
    result = await gateway.call("crm__get_order", {}, CALLER)
    assert result.meta is not None
    assert result.meta["trace"] == "abc"
    assert META_KEY in result.meta


async def test_a_tool_error_result_is_an_answer_and_does_not_fall_back() -> None:
    error = ToolResult.text("no such order", is_error=True)
    replica = Upstream()
    gateway = with_fallback({"crm": Upstream([error]), "replica": replica}, {"crm": {"*": "replica__x"}})
    assert await gateway.call("crm__get_order", {}, CALLER) is error
    assert replica.calls == 0


async def test_refusals_about_the_caller_do_not_fall_back() -> None:
    replica = Upstream()
    gateway = with_fallback({"crm": Upstream([Forbidden("no")]), "replica": replica}, {"crm": {"*": "replica__x"}})
    with pytest.raises(Forbidden):
        await gateway.call("crm__get_order", {}, CALLER)
    assert replica.calls == 0


async def test_calls_without_a_matching_route_raise_the_original_error() -> None:
    replica = Upstream()
    servers = {"crm": Upstream([down(), down()]), "files": Upstream([down()]), "replica": replica}
    gateway = with_fallback(servers, {"crm": {"get_*": "replica__x"}})
    for name in ("crm__delete_order", "files__read"):
        with pytest.raises(UpstreamUnavailable):
            await gateway.call(name, {}, CALLER)
    assert replica.calls == 0


async def test_the_first_matching_route_wins() -> None:
    gateway = with_fallback(
        {"crm": Upstream([down()]), "a": Upstream(), "b": Upstream()},
        {"crm": {"get_order": "a__x", "get_*": "b__x"}},
    )
    result = await gateway.call("crm__get_order", {}, CALLER)
    assert result.meta is not None
    assert result.meta[META_KEY]["to"] == "a__x"


async def test_a_failing_fallback_raises_the_original_error_with_its_failure_appended() -> None:
    original = down()
    servers = {"crm": Upstream([original]), "replica": Upstream([UpstreamTimeout("replica too slow")])}
    gateway = with_fallback(servers, {"crm": {"*": "replica__x"}})
    with pytest.raises(UpstreamUnavailable) as caught:
        await gateway.call("crm__get_order", {}, CALLER)
    assert caught.value is original
    assert "replica too slow" in str(caught.value)
    assert isinstance(caught.value.__cause__, UpstreamTimeout)


async def test_a_fallback_to_an_unknown_tool_raises_the_original_error() -> None:
    gateway = with_fallback({"crm": Upstream([down()])}, {"crm": {"*": "nowhere__x"}})
    with pytest.raises(UpstreamUnavailable) as caught:
        await gateway.call("crm__get_order", {}, CALLER)
    assert isinstance(caught.value.__cause__, ToolNotFound)


async def test_a_fallback_never_falls_back_again() -> None:
    crm, replica = Upstream([down("crm")], answer=OK), Upstream([down("replica")])
    routes = {"crm": {"*": "replica__get_order"}, "replica": {"*": "crm__get_order"}}
    gateway = with_fallback({"crm": crm, "replica": replica}, routes)
    with anyio.fail_after(5), pytest.raises(UpstreamUnavailable) as caught:
        await gateway.call("crm__get_order", {}, CALLER)
    assert caught.value.server == "crm"
    assert (crm.calls, replica.calls) == (1, 1)


async def test_after_a_fallback_later_calls_can_fall_back_again() -> None:
    crm, replica = Upstream([down(), down()]), Upstream()
    gateway = with_fallback({"crm": crm, "replica": replica}, {"crm": {"*": "replica__x"}})
    for _ in range(2):
        await gateway.call("crm__get_order", {}, CALLER)
    assert replica.calls == 2


def resilient(servers: Mapping[str, Upstream], sleeps: list[float]) -> tuple[Gateway, BreakerPolicy]:
    """Fallback → breaker → retry → server, the order the gateway chains them in."""

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    gateway = Gateway(servers)
    breaker = BreakerPolicy({"crm": CircuitBreakerConfig(failures=2, reset_after=30)}, MemoryBreakerState(lambda: 0.0))
    policies: list[Policy] = [
        FallbackPolicy({"crm": {"get_*": "replica__get_order"}}, gateway.call),
        breaker,
        RetryPolicy({"crm": ServerRetry(attempts=3)}, {"crm": ["get_*"]}, sleep=sleep),
    ]
    gateway.chain = compose(policies, gateway.chain)
    return gateway, breaker


async def test_retries_inside_the_breaker_count_as_one_failure_per_exhausted_call() -> None:
    crm, replica = Upstream([down()] * 6), Upstream(answer=ToolResult.text("replica"))
    sleeps: list[float] = []
    gateway, breaker = resilient({"crm": crm, "replica": replica}, sleeps)

    first = await gateway.call("crm__get_order", {}, CALLER)
    assert (crm.calls, await breaker.state("crm")) == (3, "closed")
    assert first.meta is not None
    assert "3 attempts" in first.meta[META_KEY]["reason"]

    await gateway.call("crm__get_order", {}, CALLER)
    assert (crm.calls, await breaker.state("crm")) == (6, "open")
    assert len(sleeps) == 4

    third = await gateway.call("crm__get_order", {}, CALLER)
    assert crm.calls == 6  # the open circuit answered without touching the server
    assert third.meta is not None
    assert "Retry after 30 s" in third.meta[META_KEY]["reason"]
    assert replica.calls == 3


async def test_a_call_that_succeeds_on_retry_is_no_failure_for_the_breaker() -> None:
    crm, replica = Upstream([down(), down(), OK, down(), down(), OK]), Upstream()
    gateway, breaker = resilient({"crm": crm, "replica": replica}, [])
    for _ in range(2):
        assert await gateway.call("crm__get_order", {}, CALLER) is OK
    assert await breaker.state("crm") == "closed"
    assert replica.calls == 0


async def test_without_a_route_an_open_circuit_reaches_the_caller() -> None:
    crm = Upstream([down()] * 6)
    gateway, _ = resilient({"crm": crm}, [])
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable):
            await gateway.call("crm__create_order", {}, CALLER)
    with pytest.raises(CircuitOpen) as caught:
        await gateway.call("crm__create_order", {}, CALLER)
    assert caught.value.policy == "circuit_breaker"
    assert crm.calls == 2  # create_order is not idempotent: never retried
