"""A server's ``cache:``: its read-only tools' last good results answer, marked stale, while it is out of reach.

The policy alone on a store with a test clock (expiry, bounds, what is and is not kept), then the whole
gateway with an in-process upstream that goes down and comes back (the chain's order: access before the
cache, the breaker after it; metrics, audit, the load-time check).
"""

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.chain import build_chain
from gateway.config import Config, ServerCache, parse_config
from gateway.errors import (
    CircuitOpen,
    ConfigError,
    GatewayError,
    RateLimited,
    StoreError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.gateway import Gateway, open_gateway
from gateway.store.memory import MemoryStore
from gateway.types import CallContext, JSONObject, Listing, Principal, Tool, ToolCall, ToolResult
from policies.cache import META_KEY, CachePolicy, cache_key
from policies.fallback import META_KEY as FALLBACK_META_KEY
from policies.state import MemoryBreakerState, MemoryLimitState
from tests.store.support import Clock
from tests.test_gateway import Toolbox

pytestmark = pytest.mark.anyio

READ_ONLY = {"readOnlyHint": True}
NUMBERS = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}
ALICE = CallContext(principal=Principal("alice"))


def tool(name: str, annotations: JSONObject | None = None) -> Tool:
    definition: dict[str, Any] = {"name": name, "inputSchema": NUMBERS}
    if annotations is not None:
        definition["annotations"] = annotations
    return Tool(name, definition)


def call_of(
    target: str = "add", arguments: JSONObject | None = None, *, annotations: JSONObject | None = READ_ONLY
) -> ToolCall:
    return ToolCall(f"crm__{target}", "crm", target, arguments or {"a": 1, "b": 2}, ALICE, tool(target, annotations))


class Upstream:
    """The rest of the chain: answers with ``result``, or raises ``error``; counts the calls that reached it."""

    def __init__(self) -> None:
        self.result = ToolResult(content=({"type": "text", "text": "3"},), structured_content={"sum": 3})
        self.error: GatewayError | None = None
        self.calls = 0

    async def __call__(self, call: ToolCall) -> ToolResult:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.result

    @staticmethod
    async def unused(name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        raise AssertionError("no fallback is called here")


def policy_on(
    store: MemoryStore,
    clock: Clock,
    *,
    ttl: float = 600.0,
    max_entries: int = 1000,
    max_size: int = 2**20,
    idempotent: Sequence[str] = (),
    gateway: str = "acme",
) -> CachePolicy:
    caches = {"crm": ServerCache(tools=["add", "get_*"], ttl=ttl, max_entries=max_entries)}
    return CachePolicy(caches, {"crm": list(idempotent)}, store, max_size=max_size, wall_clock=clock, gateway=gateway)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    return MemoryStore(wall_clock=clock)


# -- the policy alone -------------------------------------------------------------------------------------------


async def test_an_unreachable_server_is_answered_with_the_last_good_result_marked_stale(
    store: MemoryStore, clock: Clock
) -> None:
    cache, upstream = policy_on(store, clock), Upstream()
    kept_at = clock.now
    fresh = await cache(call_of(), upstream)
    assert fresh.meta is None  # a fresh answer is not marked

    clock.now += 42.5
    upstream.error = UpstreamUnavailable("crm is not connected", server="crm")
    stale = await cache(call_of(), upstream)

    assert (stale.structured_content, stale.content, stale.is_error) == (fresh.structured_content, fresh.content, False)
    assert stale.meta is not None
    note = stale.meta[META_KEY]
    assert note["age"] == 42.5
    assert datetime.fromisoformat(note["cached_at"]).timestamp() == kept_at
    assert note["cached_at"].endswith("Z")
    assert note["reason"] == "crm is not connected"
    assert upstream.calls == 2  # the server was tried first


async def test_another_gateway_sharing_the_store_does_not_get_the_results_of_its_server_of_the_same_name(
    store: MemoryStore, clock: Clock
) -> None:
    ours, theirs, upstream = policy_on(store, clock), policy_on(store, clock, gateway="other"), Upstream()
    await ours(call_of(), upstream)
    upstream.error = UpstreamUnavailable("crm is not connected", server="crm")
    with pytest.raises(UpstreamUnavailable):  # its `crm` is another server: nothing of ours is its answer
        await theirs(call_of(), upstream)
    stale = await policy_on(store, clock)(call_of(), upstream)  # a replica of ours (the same gateway name) gets it
    assert stale.meta is not None
    assert META_KEY in stale.meta


@pytest.mark.parametrize(
    "error",
    [UpstreamUnavailable("lost", server="crm"), UpstreamTimeout("slow", server="crm"), CircuitOpen("open", policy="c")],
)
async def test_every_way_of_not_reaching_the_server_is_answered_from_the_cache(
    store: MemoryStore, clock: Clock, error: GatewayError
) -> None:
    cache, upstream = policy_on(store, clock), Upstream()
    await cache(call_of(), upstream)
    upstream.error = error
    result = await cache(call_of(), upstream)
    assert result.meta is not None
    assert META_KEY in result.meta


@pytest.mark.parametrize(
    "error",
    [UpstreamRefused("bad request", server="crm", code=-32602), RateLimited("slow down", policy="r", retry_after=1.0)],
)
async def test_an_answer_of_the_server_or_a_refusal_of_the_caller_is_not_answered_from_the_cache(
    store: MemoryStore, clock: Clock, error: GatewayError
) -> None:
    cache, upstream = policy_on(store, clock), Upstream()
    await cache(call_of(), upstream)
    upstream.error = error
    with pytest.raises(type(error)):
        await cache(call_of(), upstream)


async def test_without_a_kept_result_for_the_same_arguments_the_error_stands(store: MemoryStore, clock: Clock) -> None:
    cache, upstream = policy_on(store, clock), Upstream()
    await cache(call_of(arguments={"a": 1, "b": 2}), upstream)
    upstream.error = UpstreamUnavailable("lost", server="crm")
    with pytest.raises(UpstreamUnavailable):
        await cache(call_of(arguments={"a": 1, "b": 3}), upstream)
    # The same arguments in another order are the same call.
    result = await cache(call_of(arguments={"b": 2, "a": 1}), upstream)
    assert result.structured_content == {"sum": 3}


def test_the_key_is_the_tool_and_its_arguments_as_canonical_json() -> None:
    assert cache_key("add", {"a": 1, "b": {"x": 1, "y": 2}}) == cache_key("add", {"b": {"y": 2, "x": 1}, "a": 1})
    assert cache_key("add", {"a": 1}) != cache_key("sub", {"a": 1})
    assert cache_key("add", {"a": 1}) != cache_key("add", {"a": "1"})


async def test_a_kept_result_expires_after_the_ttl(store: MemoryStore, clock: Clock) -> None:
    cache, upstream = policy_on(store, clock, ttl=60.0), Upstream()
    await cache(call_of(), upstream)
    upstream.error = UpstreamUnavailable("lost", server="crm")
    clock.now += 59.0
    assert (await cache(call_of(), upstream)).structured_content == {"sum": 3}
    clock.now += 1.0
    with pytest.raises(UpstreamUnavailable):
        await cache(call_of(), upstream)


async def test_the_oldest_kept_results_are_forgotten_beyond_max_entries(store: MemoryStore, clock: Clock) -> None:
    cache, upstream = policy_on(store, clock, max_entries=2), Upstream()
    for a in range(3):
        await cache(call_of(arguments={"a": a, "b": 0}), upstream)
        clock.now += 1.0
    upstream.error = UpstreamUnavailable("lost", server="crm")
    with pytest.raises(UpstreamUnavailable):
        await cache(call_of(arguments={"a": 0, "b": 0}), upstream)
    for a in (1, 2):
        await cache(call_of(arguments={"a": a, "b": 0}), upstream)


async def test_a_result_larger_than_the_limit_is_not_kept(store: MemoryStore, clock: Clock) -> None:
    cache, upstream = policy_on(store, clock, max_size=200), Upstream()
    upstream.result = ToolResult.text("x" * 300)
    await cache(call_of(), upstream)
    upstream.error = UpstreamUnavailable("lost", server="crm")
    with pytest.raises(UpstreamUnavailable):
        await cache(call_of(), upstream)


async def test_a_tools_own_error_is_not_kept(store: MemoryStore, clock: Clock) -> None:
    cache, upstream = policy_on(store, clock), Upstream()
    await cache(call_of(), upstream)
    upstream.result = ToolResult.text("no such order", is_error=True)
    assert (await cache(call_of(), upstream)).is_error  # passed through, and the good result is still the one kept
    upstream.error = UpstreamUnavailable("lost", server="crm")
    assert (await cache(call_of(), upstream)).structured_content == {"sum": 3}


async def test_only_named_tools_that_are_safe_to_repeat_are_cached(store: MemoryStore, clock: Clock) -> None:
    cache, upstream = policy_on(store, clock, idempotent=["get_marked"]), Upstream()
    calls = [
        call_of("echo"),  # not named by the cache's globs
        call_of("get_unmarked", annotations={"readOnlyHint": False}),  # named, but may have effects
    ]
    safe = [call_of("get_marked", annotations=None), call_of("get_hinted", annotations={"idempotentHint": True})]
    for call in (*calls, *safe):
        await cache(call, upstream)
    upstream.error = UpstreamUnavailable("lost", server="crm")
    for call in calls:
        with pytest.raises(UpstreamUnavailable):
            await cache(call, upstream)
    for call in safe:
        assert (await cache(call, upstream)).structured_content == {"sum": 3}


async def test_another_servers_calls_pass_straight_through(store: MemoryStore, clock: Clock) -> None:
    cache, upstream = policy_on(store, clock), Upstream()
    other = ToolCall("kb__add", "kb", "add", {"a": 1, "b": 2}, ALICE, tool("add", READ_ONLY))
    await cache(other, upstream)
    upstream.error = UpstreamUnavailable("lost", server="kb")
    with pytest.raises(UpstreamUnavailable):
        await cache(other, upstream)


class BrokenStore:
    """A store that cannot be reached."""

    async def cache_put(self, scope: str, key: str, result: Any, ttl: float, max_entries: int) -> None:
        raise StoreError("the store is down")

    async def cache_get(self, scope: str, key: str) -> None:
        raise StoreError("the store is down")


async def test_a_store_that_cannot_be_reached_costs_the_cache_not_the_call() -> None:
    caches = {"crm": ServerCache(tools=["add"], ttl=60.0)}
    cache, upstream = CachePolicy(caches, {}, BrokenStore(), max_size=2**20), Upstream()
    assert (await cache(call_of(), upstream)).structured_content == {"sum": 3}
    upstream.error = UpstreamUnavailable("lost", server="crm")
    with pytest.raises(UpstreamUnavailable):  # the call's own error, not the store's
        await cache(call_of(), upstream)


# -- the whole gateway, with an upstream that goes down and comes back ------------------------------------------

HASHES = {"alice": "ab" * 32, "bob": "cd" * 32}


def cached_config(server: str = "", sections: str = "", tools: str = '["add"]') -> Config:
    text = f"servers:\n  crm: {{command: [unused], cache: {{tools: {tools}, ttl: 10m}}{server}}}\n{sections}"
    return parse_config(text, environ={})


def crm_box() -> Toolbox:
    box = Toolbox("crm")
    box.listing = Listing(tools=(tool("add", READ_ONLY), Tool("echo", {"name": "echo", "inputSchema": {}})))
    return box


@asynccontextmanager
async def open_with(config: Config, box: Toolbox) -> AsyncIterator[Gateway]:
    with anyio.fail_after(5):
        async with open_gateway(config, kinds={"stdio": lambda name, entry: box}) as gateway:
            yield gateway


def counter(gateway: Gateway, name: str, **labels: str) -> float:
    value = gateway.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_a_server_that_goes_down_is_answered_from_the_cache_until_it_is_back(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    box = crm_box()
    config = cached_config(sections=f"audit: {{path: {audit}}}\n")
    async with open_with(config, box) as gateway:
        first, outcome, _ = await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, ALICE)
        assert (outcome, first.structured_content, first.meta) == ("ok", {"sum": 3}, None)

        await box.go_down("the crm process exited")
        stale, outcome, _ = await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, ALICE)
        assert (outcome, stale.structured_content, stale.is_error) == ("ok", {"sum": 3}, False)
        assert stale.meta is not None
        note = stale.meta[META_KEY]
        assert 0 <= note["age"] < 5
        assert "crm is switched off" in note["reason"]
        missing, outcome, _ = await gateway.dispatcher.invoke("crm__add", {"a": 2, "b": 2}, ALICE)
        assert (outcome, missing.is_error) == ("unavailable", True)  # nothing kept for these arguments
        assert counter(gateway, "patchbay_cache_hits_total", tool="crm__add") == 1

        await box.come_up()
        again, outcome, _ = await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, ALICE)
        assert (outcome, again.structured_content, again.meta) == ("ok", {"sum": 3}, None)
        assert box.calls == [("add", {"a": 1, "b": 2}), ("add", {"a": 1, "b": 2})]
        assert counter(gateway, "patchbay_cache_hits_total", tool="crm__add") == 1
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    decisions = [r["decisions"] for r in records if r["tool"] == "crm__add"]
    assert decisions[0] == decisions[2] == decisions[3] == []
    [answered] = decisions[1]
    assert answered.startswith("answered from cache (kept ")
    assert "crm is switched off" in answered


async def test_an_open_circuit_is_answered_from_the_cache_without_calling_the_server() -> None:
    box = crm_box()
    config = cached_config(server=", circuit_breaker: {failures: 1, reset_after: 1h}")
    async with open_with(config, box) as gateway:
        await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, ALICE)
        box.state = box.state.DOWN  # calls fail; the registry keeps the tool
        await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, ALICE)  # the failure that opens the circuit
        box.state = box.state.UP
        result, outcome, _ = await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, ALICE)

        assert (outcome, result.structured_content) == ("ok", {"sum": 3})
        assert result.meta is not None
        assert "circuit" in result.meta[META_KEY]["reason"]
        assert len(box.calls) == 1  # the server, up again, was not called while the circuit is open
        assert counter(gateway, "patchbay_cache_hits_total", tool="crm__add") == 2


async def test_a_client_that_may_not_call_the_tool_gets_the_access_error_not_the_cache() -> None:
    clients = (
        f'clients:\n  alice: {{token_sha256: "{HASHES["alice"]}", tools: ["crm__*"]}}\n'
        f'  bob: {{token_sha256: "{HASHES["bob"]}", tools: ["crm__echo"]}}\n'
    )
    box = crm_box()
    async with open_with(cached_config(sections=clients), box) as gateway:
        await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, ALICE)
        await box.go_down("the crm process exited")
        bob = CallContext(principal=Principal("bob"))
        refused, outcome, _ = await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, bob)
        answered, _, _ = await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, ALICE)

        assert (outcome, refused.is_error, refused.meta) == ("denied", True, None)
        assert refused.structured_content is None
        assert answered.meta is not None
        assert META_KEY in answered.meta  # the entry was there to be served: only access kept bob from it


async def test_a_cache_naming_a_tool_that_is_neither_read_only_nor_idempotent_is_a_config_error() -> None:
    config = cached_config(tools='["add", "ec*"]')
    with pytest.raises(ConfigError) as caught:
        async with open_with(config, crm_box()):
            pytest.fail("the gateway started")
    [problem] = caught.value.problems
    assert problem.path == "servers.crm.cache.tools[1]"
    assert problem.line == 2
    assert "'echo'" in problem.message
    assert "neither read-only nor idempotent" in problem.message


async def test_a_tool_listed_idempotent_in_the_config_may_be_cached() -> None:
    config = cached_config(server=", tools: {idempotent: [echo]}", tools='["add", "echo"]')
    async with open_with(config, crm_box()) as gateway:
        assert gateway.problems == []


async def test_the_cache_key_is_refused_where_it_does_not_belong() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("servers:\n  crm: {command: [x], cache: {tools: [], ttl: 0}}\n", environ={})
    paths = sorted(problem.path for problem in caught.value.problems)
    assert paths == ["servers.crm.cache.tools", "servers.crm.cache.ttl"]


async def test_a_call_nothing_is_kept_for_falls_back_and_a_kept_one_does_not() -> None:
    box, other = crm_box(), Toolbox("box")
    config = cached_config(server=", fallback: {'*': box__add}")
    with anyio.fail_after(5):
        async with open_gateway(config, providers=(other,), kinds={"stdio": lambda name, entry: box}) as gateway:
            await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, ALICE)
            await box.go_down("the crm process exited")
            kept, _, _ = await gateway.dispatcher.invoke("crm__add", {"a": 1, "b": 2}, ALICE)
            fallen, _, _ = await gateway.dispatcher.invoke("crm__add", {"a": 5, "b": 5}, ALICE)
    assert kept.meta is not None
    assert fallen.meta is not None
    assert (META_KEY in kept.meta, FALLBACK_META_KEY in kept.meta) == (True, False)
    assert (META_KEY in fallen.meta, FALLBACK_META_KEY in fallen.meta) == (False, True)
    assert other.calls == [("add", {"a": 5, "b": 5})]


def test_the_cache_is_after_access_and_the_fallback_and_before_the_breaker_and_retries() -> None:
    text = (
        "servers:\n  crm: {command: [x], cache: {tools: [add], ttl: 1m}, fallback: {'*': box__add},"
        " circuit_breaker: {}, retry: {}}\n"
        "policies:\n  - {deny: 'crm__echo'}\n"
    )
    built = build_chain(
        parse_config(text, environ={}),
        limits=MemoryLimitState(),
        breakers=MemoryBreakerState(),
        call_tool=Upstream.unused,
        cache=MemoryStore(),
    )
    order = [type(policy).__name__ for policy in built.policies]
    assert order == [
        "AccessPolicy",
        "ArgumentValidation",
        "FallbackPolicy",
        "CachePolicy",
        "BreakerPolicy",
        "RetryPolicy",
    ]


def test_a_cache_without_a_store_to_keep_it_in_is_refused() -> None:
    config = cached_config()
    with pytest.raises(ValueError, match="no store"):
        build_chain(config, limits=MemoryLimitState(), breakers=MemoryBreakerState(), call_tool=Upstream.unused)
