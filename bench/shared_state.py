"""Benchmark: what sharing limits and circuits on Redis adds per call (issue 14; target: at most 0.3 ms on loopback).

One tool on a no-op provider, called through ``Dispatcher.call`` with the three policies that use the shared
state, built by ``build_chain`` as the gateway builds them: a per-client rate limit that never refuses, a
global concurrency limit, and a circuit breaker (consecutive failures). Ways, interleaved over the repeats
(their order rotates, so drift and noise hit each alike):

* **bare**: no policies (the floor);
* **memory**: the three policies on ``MemoryLimitState`` / ``MemoryBreakerState`` (``shared_state: memory``);
* **redis**: the same on ``RedisState`` (``shared_state: redis://127.0.0.1:6379/0``), its leases renewed in the
  background as in ``serve``;
* **redis-split**: the same, with the rate and concurrency limits as two policies (``RateLimit`` then
  ``ConcurrencyLimit``), each awaiting its own round trip: what the chain did before it combined them.

Sequential calls give the added latency per call (median of the repeats' means); ``--concurrency N`` also
times N callers at once (calls/s). The event loop is uvloop, as in ``patchbay serve``. Redis commands per call:
one ``EVALSHA``, awaited, for the rate and concurrency limits (two in redis-split); a closed circuit is trusted
for half a second, so the breaker awaits none; the slot's release and the success report go in the background,
or, when the next call comes first, in that call's ``EVALSHA`` (the state's one script runs a batch of
operations in order)::

    .venv/bin/python bench/shared_state.py              # 15 repeats × 2,000 calls per way (~1 min)
    .venv/bin/python bench/shared_state.py --quick      # 3 × 300
    .venv/bin/python bench/shared_state.py --markdown   # also the Markdown for bench/RESULTS.md
"""

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from redis.asyncio import Redis
from run import OUT, machine_facts, markdown_table, plain_table  # bench/run.py: this script's folder is sys.path[0]

from gateway.chain import build_chain
from gateway.config import parse_config
from gateway.dispatch import CallPath, Dispatcher
from gateway.registry import Entry, Registry
from gateway.types import CallContext, JSONObject, Policy, Principal, Tool, ToolResult
from policies.concurrency import ConcurrencyLimit
from policies.limits import Limits
from policies.ratelimit import RateLimit
from policies.redis_state import open_redis_state
from policies.state import BreakerState, LimitState, MemoryBreakerState, MemoryLimitState

REDIS = "redis://127.0.0.1:6379/0"
NAME, SERVER, TOOL = "crm__get_order", "crm", "get_order"
DEFINITION = {"name": TOOL, "inputSchema": {"type": "object", "properties": {"id": {"type": "integer"}}}}
RESULT = ToolResult.text("ok")
CALLER = CallContext(principal=Principal("support-bot"))
CONFIG = """
servers:
  crm:
    command: [unused]
    circuit_breaker: {failures: 5, reset_after: 30s}
policies:
  - {id: rate, tools: "crm__*", rate_limit: 1000000/s, burst: 1000000, per: client}
  - {id: slots, tools: "*", max_concurrency: 1000, per: global}
"""


class NoopProvider:
    name = SERVER

    async def list_tools(self) -> list[Tool]:
        return [Tool(TOOL, DEFINITION)]

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        return RESULT


REGISTRY = Registry(tools={NAME: Entry(SERVER, TOOL, Tool(NAME, {**DEFINITION, "name": NAME}))})


def dispatcher(limits: LimitState | None, breakers: BreakerState | None, *, split: bool = False) -> Dispatcher:
    if limits is None or breakers is None:
        return Dispatcher(lambda: REGISTRY, {SERVER: NoopProvider()}, ())
    config = parse_config(CONFIG, environ={})
    calls = CallPath()
    chain = build_chain(config, limits=limits, breakers=breakers, call_tool=calls.call_or_raise)
    policies: list[Policy] = []
    for policy in chain.policies:
        if split and type(policy) is Limits:
            policies += [RateLimit(policy.rules, limits), ConcurrencyLimit(policy.rules, limits)]
        else:
            policies.append(policy)
    dispatch = Dispatcher(lambda: REGISTRY, {SERVER: NoopProvider()}, policies)
    calls.bind(dispatch)
    return dispatch


async def sequential(dispatch: Dispatcher, calls: int) -> float:
    """Seconds per call."""
    arguments: JSONObject = {"id": 7}
    started = time.perf_counter()
    for _ in range(calls):
        result = await dispatch.call(NAME, arguments, CALLER)
        assert not result.is_error, result
    return (time.perf_counter() - started) / calls


async def concurrent(dispatch: Dispatcher, callers: int, calls: int) -> float:
    """Calls per second with ``callers`` at once, ``calls`` each."""

    async def caller() -> None:
        for _ in range(calls):
            await dispatch.call(NAME, {"id": 7}, CALLER)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(callers):
            tg.start_soon(caller)
    return callers * calls / (time.perf_counter() - started)


async def ping(client: Redis, calls: int) -> float:
    """Seconds per ``PING`` round trip on the state's own client: what one round trip costs right now (the
    host's loopback varies by the hour), timed within each repeat."""
    started = time.perf_counter()
    for _ in range(calls):
        await client.ping()
    return (time.perf_counter() - started) / calls


async def main(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"patchbay-bench:{uuid.uuid4().hex[:8]}:"
    async with open_redis_state(REDIS, prefix=prefix) as redis:
        ways: dict[str, Dispatcher] = {
            "bare": dispatcher(None, None),
            "memory": dispatcher(MemoryLimitState(), MemoryBreakerState()),
            "redis": dispatcher(redis.limits, redis.breakers),
            "redis-split": dispatcher(redis.limits, redis.breakers, split=True),
        }
        for way in ways.values():  # warm up: scripts loaded, connections open
            await sequential(way, 200)
        per_call: dict[str, list[float]] = {name: [] for name in ways}
        rates: dict[str, list[float]] = {name: [] for name in ways}
        names = list(ways)
        pings: list[float] = []
        for repeat in range(args.repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                per_call[name].append(await sequential(ways[name], args.calls))
                if args.concurrency:
                    rates[name].append(await concurrent(ways[name], args.concurrency, args.calls // args.concurrency))
            pings.append(await ping(redis.client, args.calls))
            print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
        await redis.client.delete(*[key async for key in redis.client.scan_iter(match=prefix + "*")] or [prefix])
    median = {name: statistics.median(values) for name, values in per_call.items()}
    return {
        "machine": machine_facts(),
        "settings": vars(args),
        "per_call_us": {name: value * 1e6 for name, value in median.items()},
        "added_us": {
            "memory over bare": (median["memory"] - median["bare"]) * 1e6,
            "redis over bare": (median["redis"] - median["bare"]) * 1e6,
            "redis over memory": (median["redis"] - median["memory"]) * 1e6,
            "redis-split over memory": (median["redis-split"] - median["memory"]) * 1e6,
        },
        "calls_per_s": {name: statistics.median(values) for name, values in rates.items() if values},
        "ping_us": {"median": statistics.median(pings) * 1e6, "min": min(pings) * 1e6, "max": max(pings) * 1e6},
        "spread_us": {name: [min(v) * 1e6, max(v) * 1e6] for name, v in per_call.items()},
    }


def report(results: dict[str, Any], markdown: bool) -> None:
    header = ["way", "µs per call (median)", "min–max of repeats", "calls/s at once"]
    rows = []
    for name, value in results["per_call_us"].items():
        low, high = results["spread_us"][name]
        rate = results["calls_per_s"].get(name)
        rows.append([name, f"{value:.1f}", f"{low:.1f}–{high:.1f}", f"{rate:,.0f}" if rate else "–"])
    print(plain_table(header, rows))
    for what, value in results["added_us"].items():
        print(f"{what}: {value:+.1f} µs per call")
    ping = results["ping_us"]
    print(f"PING round trip meanwhile: {ping['median']:.1f} µs (repeats {ping['min']:.1f}–{ping['max']:.1f})")
    if markdown:
        print(markdown_table(header, rows))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.calls = 3, 300
    return args


def run(main_fn: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]) -> None:
    args = parse()
    results = anyio.run(main_fn, args, backend_options={"use_uvloop": True})  # as `patchbay serve` runs
    OUT.mkdir(exist_ok=True)
    (OUT / "shared_state.json").write_text(json.dumps(results, indent=2))
    report(results, args.markdown)


if __name__ == "__main__":
    run(main)
