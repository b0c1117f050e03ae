"""Benchmark: the workflow engine's own cost per step, in-process and through ``patchbay serve`` (issue 3).

In-process, with a no-op tool: 1,000-step chains, 1,000-wide fan-outs and 1,000-item for_each loops,
each timed three ways – the engine alone (its commands answered synchronously), the runner with a
bare no-op ``call`` (orchestration only) and the runner through ``Dispatcher.invoke`` (what a step
costs inside the gateway). Loading (validating the model, compiling every expression) is timed apart.

Through ``patchbay serve``, two gateways in front of one ``bench/echo_server.py``, the same but for their
store (``gateway.store: memory``, and ``sqlite:///bench/out/workflows-gateway.db`` with ``durability:
process``, a fresh file each run): on each, a 200-step chain of ``echo__echo`` (against the upstream's own
echo latency) and a workflow fanning out 50 ``echo__sleep(100 ms)`` calls (against each other, and against
the same 50 calls sent concurrently from one client straight to the upstream). And the store's journal
cost per step in-process: a 200-step chain on the runner (no-op calls) journaled in memory against the
same chain journaled in SQLite (``durability: process``). All of it is measured in interleaved rounds
(each round changes which goes first), so machine noise hits each side alike::

    .venv/bin/python bench/workflows.py              # full run (about 2 minutes on 2 cores)
    .venv/bin/python bench/workflows.py --quick      # smoke run (200 steps, a few rounds)
    .venv/bin/python bench/workflows.py --markdown   # also print the Markdown for bench/RESULTS.md
    .venv/bin/python bench/workflows.py --profile 5  # also py-spy the SQLite gateway for 5 s of chain runs
    .venv/bin/python bench/workflows.py --profile 5 --profile-store memory  # ... or the other gateway
    .venv/bin/python bench/workflows.py --journal    # only the journal's cost per step (a few seconds)

Results go to ``bench/out/workflows.json``; subprocess logs to ``bench/out/logs/``.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import permutations
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client
from run import (  # bench/run.py: this script's folder is sys.path[0]
    BENCH,
    BIN,
    HOST,
    OUT,
    PAYLOAD,
    PYSPY_RATE,
    READY_TIMEOUT,
    ROOT,
    CpuMeter,
    Proc,
    Procs,
    _gateway_argv,
    free_port,
    machine_facts,
    markdown_table,
    open_client,
    plain_table,
    summarize_profile,
    system_busy,
    wait_ready,
)

from connectors.mcp import McpUpstream
from gateway.config import HttpServer
from gateway.dispatch import Dispatcher, Invocation
from gateway.heap import freeze_startup_heap
from gateway.registry import Entry, Registry
from gateway.store import Store, open_store
from gateway.store.memory import MemoryStore
from gateway.store.sqlite import SqliteStore
from gateway.types import CallContext, JSONObject, Principal, ProviderEvents, Tool, ToolResult
from gateway.workflows._jqsafe import first as jq_first
from gateway.workflows.commands import CallTool, Evaluate
from gateway.workflows.engine import Run
from gateway.workflows.journal import JournalEvent
from gateway.workflows.model import Workflow
from gateway.workflows.plan import Plan, compile_workflow
from gateway.workflows.runner import Runner

STEPS = 1000
QUICK_STEPS = 200
DEFAULT_CONCURRENCY = 8
"""A throttled fan-out's ``max_concurrency`` (the model's default until issue 9: kept so results compare)."""
CHAIN_STEPS = 200
FAN_WIDTH = 50
FAN_MS = 100
CHAIN, FAN = "chain200", "fanout50"
STEP_BUDGET_US = 100.0
"""Target: orchestration per step in-process."""
SERVE_STEP_BUDGET_MS = 0.5
"""Target: what a chain step costs through ``patchbay serve`` beyond the upstream call."""
FAN_RATIO = 1.15
"""Target: the fan-out workflow against the same calls sent concurrently straight to the upstream."""
STORE_RATIO = 1.2
"""Target: the chain and the fan-out through a gateway journaling in SQLite, against one journaling in memory."""
STORES = ("memory", "sqlite")
"""The two gateways through ``patchbay serve``, by ``gateway.store``."""
FANS = (*STORES, "direct")
FAN_ORDERS = tuple(permutations(FANS))
SQLITE_DB = OUT / "workflows-gateway.db"
"""The SQLite gateway's store: deleted before each run, so every run starts from an empty file."""
DURABILITY = "process"
"""The SQLite gateway's ``gateway.durability`` (the default): ``synchronous=NORMAL``, no fsync per commit."""
CALL_TIMEOUT = 60.0
SETTLE = 0.3
"""Seconds of quiet before each fan-out, so neither starts while the upstream still finishes the other."""
LOOP = {"use_uvloop": True}
"""The gateway's own event loop (``gateway/cli.py``)."""
JOURNAL_STEPS = 200
JOURNAL_BUDGET_MS = 0.2
"""Target: what journaling a chain step in SQLite adds to journaling it in memory, in-process."""
JOURNAL_REPEATS = 21
NOOP_RESULT = ToolResult.text("ok")
CONTEXT = CallContext(principal=Principal("bench"))


@dataclass(frozen=True)
class Settings:
    steps: int
    """Steps (or fan-out width, or items) of each in-process workflow."""
    repeats: int
    """Timed runs per in-process case and way; the median is reported."""
    rounds: int
    """Interleaved rounds through ``patchbay serve``: a chain on each gateway, a fan-out on each and one direct."""
    echo_calls: int
    """Sequential echo calls per round and baseline."""
    profile_seconds: float
    profile_store: str
    """The gateway py-spy samples: the one with this store."""


def make_settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(QUICK_STEPS, 2, 3, 20, args.profile, args.profile_store)
    # 18 rounds: each of the six orders of the three fan-outs three times.
    return Settings(STEPS, 15, 3 * len(FAN_ORDERS), 40, args.profile, args.profile_store)


# -- workflows ----------------------------------------------------------------------------------------


def chain(n: int, tool: str, ref: str = "${{.steps.{prev}.result}}") -> dict[str, Any]:
    """``n`` calls, each passing on what the one before returned (``ref`` names it)."""
    steps = [{"id": "s0", "call": tool, "with": {"text": "${.input.text}"}}]
    steps += [{"id": f"s{i}", "call": tool, "with": {"text": ref.format(prev=f"s{i - 1}")}} for i in range(1, n)]
    return {"steps": steps, "output": ref.format(prev=f"s{n - 1}")}


def fan_out(n: int, tool: str, arguments: dict[str, Any], max_concurrency: int) -> dict[str, Any]:
    """``n`` independent calls, ``max_concurrency`` in flight at a time."""
    steps = [{"id": f"f{i}", "call": tool, "with": arguments} for i in range(n)]
    return {"max_concurrency": max_concurrency, "steps": steps, "output": "done"}


def for_each(tool: str, concurrency: int, max_concurrency: int) -> dict[str, Any]:
    """One call per item of ``.input.items``, ``concurrency`` iterations at a time."""
    body = [{"id": "c", "call": tool, "with": {"text": "${.item}"}}]
    step = {"id": "each", "for_each": "${.input.items}", "concurrency": concurrency, "steps": body}
    return {"max_concurrency": max_concurrency, "steps": [step], "output": "done"}


@dataclass(frozen=True)
class Case:
    name: str
    workflow: dict[str, Any]
    arguments: dict[str, Any]


def cases(n: int) -> list[Case]:
    text, items = {"text": PAYLOAD}, {"items": list(range(n))}
    each = {"text": "${.input.text}"}
    return [
        Case(f"chain, {n} steps (plain paths)", chain(n, "noop"), text),
        Case(
            f"chain, {n} steps (jq programs: `length` of the result)",
            chain(n, "noop", "${{.steps.{prev}.result | length}}"),
            text,
        ),
        Case(f"fan-out, {n} wide, max_concurrency {n}", fan_out(n, "noop", each, n), text),
        Case(
            f"fan-out, {n} wide, max_concurrency {DEFAULT_CONCURRENCY}",
            fan_out(n, "noop", each, DEFAULT_CONCURRENCY),
            text,
        ),
        Case(f"for_each, {n} items, concurrency {n}", for_each("noop", n, n), items),
        Case(f"for_each, {n} items, concurrency 1", for_each("noop", 1, DEFAULT_CONCURRENCY), items),
    ]


def load(name: str, raw: dict[str, Any]) -> Plan:
    plan, problems = compile_workflow(name, Workflow.model_validate(raw))
    if problems:
        raise RuntimeError(f"workflow {name}: {problems[0]}")
    return plan


# -- in-process ---------------------------------------------------------------------------------------


class NoopProvider:
    """A provider whose one tool answers at once."""

    name = "p"

    async def list_tools(self) -> Sequence[Tool]:
        return [Tool("noop", {"name": "noop", "inputSchema": {"type": "object"}})]

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        return NOOP_RESULT


async def noop_call(name: str, arguments: JSONObject, context: CallContext) -> Invocation:
    return Invocation(NOOP_RESULT, "ok")


def drive_engine(plan: Plan, arguments: dict[str, Any]) -> int:
    """Run ``plan`` on the engine alone, answering each call and evaluation at once, in order: the calls made."""
    run = Run(plan, arguments)
    pending = deque(run.start())
    calls = 0
    while pending:
        command = pending.popleft()
        if isinstance(command, CallTool):
            calls += 1
            pending.extend(run.done(command.key, command.attempt, "ok"))
        elif isinstance(command, Evaluate):  # the engine asks; here, the worker answers synchronously
            pending.extend(run.evaluated(command.key, jq_first(command.source, command.data)))
    if run.status != "succeeded":
        raise RuntimeError(f"{plan.name}: the engine finished {run.status}")
    return calls


async def run_once(runner: Runner, plan: Plan, arguments: dict[str, Any]) -> float:
    started = time.perf_counter()
    result = await runner.run(plan, arguments, CONTEXT)
    elapsed = time.perf_counter() - started
    if result.is_error:
        raise RuntimeError(f"{plan.name}: {result.content}")
    return elapsed


def engine_once(plan: Plan, arguments: dict[str, Any]) -> float:
    started = time.perf_counter()
    drive_engine(plan, arguments)
    return time.perf_counter() - started


def per_step_us(times: list[float], steps: int) -> dict[str, float]:
    """Median, best and worst run, in µs per step (the spread shows garbage collections)."""
    return {
        "median": round(statistics.median(times) * 1e6 / steps, 1),
        "min": round(min(times) * 1e6 / steps, 1),
        "max": round(max(times) * 1e6 / steps, 1),
    }


async def in_process(settings: Settings) -> list[dict[str, Any]]:
    registry = Registry(tools={"noop": Entry("p", "noop", Tool("noop", {"name": "noop"}))})
    dispatcher = Dispatcher(lambda: registry, {"p": NoopProvider()})
    loaded_plans = []
    for number, case in enumerate(cases(settings.steps)):
        began = time.perf_counter()
        plan = load(f"case{number}", case.workflow)
        loaded_plans.append((case, plan, time.perf_counter() - began))
    freeze_startup_heap()  # as `patchbay serve` does once the gateway is open
    rows = []
    for case, plan, loaded in loaded_plans:
        calls = drive_engine(plan, case.arguments)  # a warm-up; and every step is a call
        bare_runner, dispatching_runner = Runner(noop_call, MemoryStore()), Runner(dispatcher.invoke, MemoryStore())
        await run_once(bare_runner, plan, case.arguments)
        await run_once(dispatching_runner, plan, case.arguments)
        engine, bare, dispatched = [], [], []
        for _ in range(settings.repeats):  # interleaved: a burst of noise hits all three ways alike
            engine.append(engine_once(plan, case.arguments))
            bare.append(await run_once(bare_runner, plan, case.arguments))
            dispatched.append(await run_once(dispatching_runner, plan, case.arguments))
        row: dict[str, Any] = {
            "case": case.name,
            "steps": calls,
            "load_ms": round(loaded * 1000, 1),
            "engine_us": per_step_us(engine, calls),
            "runner_us": per_step_us(bare, calls),
            "dispatch_us": per_step_us(dispatched, calls),
        }
        rows.append(row)
        print(
            f"  {case.name}: load {row['load_ms']:.0f} ms; per step: engine {spread(row['engine_us'])} µs, "
            f"runner {spread(row['runner_us'])} µs, runner + dispatcher {spread(row['dispatch_us'])} µs",
            flush=True,
        )
    return rows


async def journal_cost(repeats: int) -> dict[str, Any]:
    """A ``JOURNAL_STEPS``-step chain of no-op calls on the runner, journaled in memory and in SQLite, interleaved."""
    plan = load("journal", chain(JOURNAL_STEPS, "noop"))
    arguments = {"text": PAYLOAD}
    with tempfile.TemporaryDirectory() as tmp:
        async with open_store(f"sqlite:///{tmp}/bench.db", durability="process") as store:
            assert isinstance(store, SqliteStore)
            runners = {"memory": Runner(noop_call, MemoryStore()), "sqlite": Runner(noop_call, store)}
            for runner in runners.values():  # warm-up
                await run_once(runner, plan, arguments)
            times: dict[str, list[float]] = {name: [] for name in runners}
            before = store.transactions
            for index in range(repeats):
                order = list(runners) if index % 2 == 0 else list(reversed(runners))  # neither always goes first
                for name in order:
                    times[name].append(await run_once(runners[name], plan, arguments))
            transactions = (store.transactions - before) / repeats
            grouped = {
                name: statistics.median([await grouped_once(target) for _ in range(repeats)])
                for name, target in (("memory", MemoryStore()), ("sqlite", store))
            }
    memory, sqlite = (statistics.median(times[name]) * 1000 / JOURNAL_STEPS for name in ("memory", "sqlite"))
    row = {
        "steps": JOURNAL_STEPS,
        "repeats": repeats,
        "durability": "process",
        "memory_ms_per_step": round(memory, 4),
        "sqlite_ms_per_step": round(sqlite, 4),
        "added_ms_per_step": round(sqlite - memory, 4),
        "sqlite_transactions_per_step": round(transactions / JOURNAL_STEPS, 2),
        "one_commit_per_step_ms": {name: round(v * 1000 / JOURNAL_STEPS, 4) for name, v in grouped.items()},
    }
    print(
        f"  {JOURNAL_STEPS}-step chain, median of {repeats}: memory {memory:.3f} ms/step, SQLite {sqlite:.3f} ms/step, "
        f"added {sqlite - memory:.3f} ms/step ({row['sqlite_transactions_per_step']} transactions/step)",
        flush=True,
    )
    one = row["one_commit_per_step_ms"]
    print(
        f"  the store alone, 3 events and one commit a step: memory {one['memory']:.3f} ms/step, "
        f"SQLite {one['sqlite']:.3f} ms/step",
        flush=True,
    )
    return row


async def grouped_once(store: Store) -> float:
    """A chain's journal as a runner that commits once a step writes it: three events, then one commit, per step."""
    run_id = uuid.uuid4().hex
    began = time.perf_counter()
    store.record(JournalEvent(run_id, 0, 0.0, "run_started", data={"workflow": "journal"}))
    for step in range(JOURNAL_STEPS):
        key, seq = f"s{step}", 3 * step + 1
        store.record(JournalEvent(run_id, seq, 0.0, "step_started", key, 1, {"step": key, "tool": "noop"}))
        store.record(JournalEvent(run_id, seq + 1, 0.0, "step_done", key, 1, {"result": PAYLOAD, "error": None}))
        store.record(JournalEvent(run_id, seq + 2, 0.0, "step_settled", key, 1, {"step": key, "status": "succeeded"}))
        await store.commit()
    store.record(JournalEvent(run_id, 3 * JOURNAL_STEPS + 1, 0.0, "run_finished", data={"status": "succeeded"}))
    await store.commit()
    return time.perf_counter() - began


# -- through patchbay serve ---------------------------------------------------------------------------------


@dataclass
class Serving:
    upstream_url: str
    gateway_urls: dict[str, str]
    """Each gateway's MCP endpoint, by store: ``memory`` and ``sqlite``."""
    pids: dict[str, int]
    """The upstream's and each gateway's process id (``upstream``, ``memory``, ``sqlite``)."""
    startup_s: dict[str, float]
    """From starting each ``patchbay serve`` to ``/readyz`` answering 200 (loads and compiles the workflows)."""


async def wait_readyz(proc: Proc, url: str) -> None:
    async with httpx2.AsyncClient(timeout=5) as http:
        with anyio.fail_after(READY_TIMEOUT):
            while True:
                try:
                    if (await http.get(url)).status_code == 200:
                        return
                except httpx2.TransportError:
                    pass
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{proc.name} exited with status {proc.popen.returncode}; see {proc.log}")
                await anyio.sleep(0.1)


def fresh_db() -> Path:
    """``SQLITE_DB`` with no trace of an earlier run: the file, its WAL and shared memory, its instances' locks."""
    for leftover in (SQLITE_DB, *(Path(f"{SQLITE_DB}{suffix}") for suffix in ("-wal", "-shm", "-journal"))):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(f"{SQLITE_DB}.instances", ignore_errors=True)
    return SQLITE_DB


def gateway_env() -> dict[str, str]:
    """The gateways import this tree's code, not whatever the venv's editable install points at."""
    inherited = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path and path != str(ROOT)]
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), *inherited])}


async def start_serving(procs: Procs) -> Serving:
    """The echo upstream, then two gateways in front of it, the same but for the store their runs are journaled in."""
    up_port = free_port()
    up_url = f"http://{HOST}:{up_port}/mcp"
    upstream = procs.start("wf-upstream", [str(BIN / "python"), str(BENCH / "echo_server.py"), "--port", str(up_port)])
    await wait_ready(upstream, up_url, "echo")
    workflows = {
        # The echo tool's structured result is {"result": text}.
        CHAIN: chain(CHAIN_STEPS, "echo__echo", "${{.steps.{prev}.result.result}}"),
        FAN: fan_out(FAN_WIDTH, "echo__sleep", {"ms": FAN_MS}, FAN_WIDTH),
    }
    # Set on each gateway: a config file's default store would be patchbay.db next to the file.
    stores = {"memory": "memory", "sqlite": f"sqlite:///{fresh_db()}"}
    urls, pids, startup = {}, {"upstream": upstream.pid}, {}
    for store, url in stores.items():
        port = free_port()
        gateway_config = {"name": f"bench-workflows-{store}", "store": url, "durability": DURABILITY}
        config = {"gateway": gateway_config, "servers": {"echo": {"url": up_url}}, "workflows": workflows}
        started = time.monotonic()
        argv = _gateway_argv(config, f"workflows-gateway-{store}", port)
        gateway = procs.start(f"wf-gateway-{store}", argv, gateway_env())
        await wait_readyz(gateway, f"http://{HOST}:{port}/readyz")
        startup[store] = time.monotonic() - started
        urls[store], pids[store] = f"http://{HOST}:{port}/mcp", gateway.pid
    return Serving(up_url, urls, pids, startup)


@asynccontextmanager
async def connector(url: str) -> AsyncIterator[McpUpstream]:
    """The gateway's own upstream connection (``connectors.mcp``), in this process: its calls are what a step pays."""

    async def unchanged(name: str) -> None:
        pass

    upstream = McpUpstream("echo", HttpServer(url=url))
    async with anyio.create_task_group() as tg:
        await tg.start(upstream.run, ProviderEvents(unchanged))
        yield upstream
        tg.cancel_scope.cancel()


def by_name(names: Sequence[str]) -> dict[str, list[float]]:
    return {name: [] for name in names}


def cpu_by_name(names: Sequence[str]) -> dict[str, defaultdict[str, float]]:
    return {name: defaultdict(float) for name in names}


@dataclass
class Samples:
    echo_client: list[float] = field(default_factory=list)
    echo_connector: list[float] = field(default_factory=list)
    echo_gateway: list[float] = field(default_factory=list)
    chain: dict[str, list[float]] = field(default_factory=lambda: by_name(STORES))
    """Each gateway's chains, by store."""
    fan: dict[str, list[float]] = field(default_factory=lambda: by_name(FANS))
    """The fan-outs: through each gateway, by store, and ``direct``."""
    chain_cpu: dict[str, defaultdict[str, float]] = field(default_factory=lambda: cpu_by_name(STORES))
    fan_cpu: dict[str, defaultdict[str, float]] = field(default_factory=lambda: cpu_by_name(FANS))
    """CPU seconds of each process during the chains and the fan-outs, by store (or ``direct``)."""
    connector_cpu: float = 0.0
    """CPU seconds this process spent in the ``echo_connector`` calls."""


async def expect_text(call: Awaitable[Any], text: str) -> None:
    result = await call
    texts = [getattr(item, "text", None) for item in result.content]
    if result.is_error or texts != [text]:
        raise RuntimeError(f"unexpected answer: {result!r}")


@dataclass
class Calls:
    """The measured calls: straight to the upstream (two ways) and through each gateway."""

    direct: Client
    gateways: dict[str, Client]
    """A session with each gateway, by store."""
    connector: McpUpstream

    async def echo_client(self) -> None:
        await expect_text(self.direct.call_tool("echo", {"text": PAYLOAD}), PAYLOAD)

    async def echo_connector(self) -> None:
        result = await self.connector.call_tool("echo", {"text": PAYLOAD}, CONTEXT)
        if result.is_error:
            raise RuntimeError(f"unexpected answer: {result!r}")

    async def echo_gateway(self) -> None:
        """A plain tool call through the gateway (the one with the store in memory: no run, nothing journaled)."""
        await expect_text(self.gateways["memory"].call_tool("echo__echo", {"text": PAYLOAD}), PAYLOAD)

    async def chain(self, store: str) -> None:
        await expect_text(self.gateways[store].call_tool(CHAIN, {"text": PAYLOAD}), PAYLOAD)

    async def fan(self, kind: str) -> None:
        """The fan-out workflow through the gateway with store ``kind``, or its calls sent ``direct``."""
        if kind != "direct":
            await expect_text(self.gateways[kind].call_tool(FAN, {}), "done")
            return
        # The floor: the fan-out's calls, sent concurrently from one client straight to the upstream.
        with anyio.fail_after(CALL_TIMEOUT):
            async with anyio.create_task_group() as tg:
                for _ in range(FAN_WIDTH):
                    tg.start_soon(expect_text, self.direct.call_tool("sleep", {"ms": FAN_MS}), f"slept {FAN_MS} ms")


async def timed(call: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


async def warm_up(calls: Calls) -> None:
    for _ in range(20):
        await calls.echo_client()
        await calls.echo_connector()
        await calls.echo_gateway()
    for _ in range(2):
        for store in STORES:
            await calls.chain(store)
        for kind in FANS:
            await calls.fan(kind)


def fan_order(index: int) -> tuple[str, ...]:
    """Round ``index``'s order of the fan-outs: every order in turn, so each comes first, and before another, alike."""
    return FAN_ORDERS[index % len(FAN_ORDERS)]


async def serve_rounds(calls: Calls, settings: Settings, samples: Samples, meters: dict[str, CpuMeter]) -> None:
    for index in range(settings.rounds):
        started = time.monotonic()
        for _ in range(settings.echo_calls):
            samples.echo_client.append(await timed(calls.echo_client))
            cpu = time.process_time()
            samples.echo_connector.append(await timed(calls.echo_connector))
            samples.connector_cpu += time.process_time() - cpu
            samples.echo_gateway.append(await timed(calls.echo_gateway))
        for store in STORES if index % 2 == 0 else reversed(STORES):  # neither always goes first
            with meters[store].measure(samples.chain_cpu[store]):
                samples.chain[store].append(await timed(partial(calls.chain, store)))
        for kind in fan_order(index):
            await anyio.sleep(SETTLE)
            with meters[kind].measure(samples.fan_cpu[kind]):
                samples.fan[kind].append(await timed(partial(calls.fan, kind)))
        chains = ", ".join(f"{store} {samples.chain[store][-1] * 1000:.0f}" for store in STORES)
        fans = ", ".join(f"{kind} {samples.fan[kind][-1] * 1000:.0f}" for kind in FANS)
        print(
            f"  round {index + 1}/{settings.rounds}: chain {chains} ms; fan-out {fans} ms; "
            f"{time.monotonic() - started:.1f} s",
            flush=True,
        )


PROFILE_PARTS = (
    # py-spy's reading of a coroutine stack can be torn: the HTTP client's own frames count here too.
    ("the upstream call (connectors/, httpx2)", ("connectors/", "httpx2/", "httpcore2/", "h11/")),
    # The store's own thread (its SQL) and the event loop's calls into it (recording, awaiting a commit).
    ("the store (gateway/store/, its thread included)", ("gateway/store/",)),
    ("workflow engine and expressions", ("gateway/workflows/engine.py", "gateway/workflows/expressions.py")),
    ("workflow runner", ("gateway/workflows/",)),
    ("dispatcher", ("gateway/dispatch.py",)),
    ("the downstream request", ("gateway/server.py", "gateway/fastpath.py", "uvicorn/", "starlette/")),
)
"""Where a sample of the gateway goes: the first part with a frame in its stack."""


def profile_parts(raw: str) -> dict[str, float]:
    """The share of samples in each of ``PROFILE_PARTS``; ``event loop, other`` is what none holds."""
    counts: defaultdict[str, int] = defaultdict(int)
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        part = next((name for name, marks in PROFILE_PARTS if any(mark in stack for mark in marks)), None)
        counts[part or "event loop, other"] += int(count)
        total += int(count)
    return {name: round(100 * n / max(total, 1), 1) for name, n in sorted(counts.items(), key=lambda kv: -kv[1])}


async def profile_chains(procs: Procs, serving: Serving, store: str, seconds: float, calls: Calls) -> dict[str, Any]:
    """py-spy samples the gateway with store ``store`` while chains run on it back to back for ``seconds``."""
    pyspy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if pyspy is None:
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    out = OUT / f"workflows-gateway-{store}-profile.txt"
    out.unlink(missing_ok=True)
    argv = [pyspy, "record", "--pid", str(serving.pids[store]), "--duration", str(max(1, round(seconds)))]
    argv += ["--rate", str(PYSPY_RATE), "--format", "raw", "--function", "--nonblocking", "--output", str(out)]
    spy = procs.start("wf-py-spy", argv)
    await anyio.sleep(0.5)
    deadline, chains = time.monotonic() + seconds + 1.0, 0
    while time.monotonic() < deadline:
        await calls.chain(store)
        chains += 1
    try:
        await anyio.to_thread.run_sync(spy.popen.wait, 30)
    except subprocess.TimeoutExpired:
        pass  # stopped with the other processes at the end
    if not out.exists():
        return {"error": f"py-spy wrote no profile (status {spy.popen.poll()}); see {spy.log}"}
    raw = out.read_text()
    summary = summarize_profile(raw, top=20)
    return {**summary, "store": store, "chains": chains, "parts": profile_parts(raw), "file": f"{OUT.name}/{out.name}"}


def chain_result(times: list[float], cpu: dict[str, float], echo: dict[str, float]) -> dict[str, Any]:
    """A gateway's chains: the median, per step, beyond each echo baseline, CPU per step."""
    chain_ms = statistics.median(times) * 1000
    return {
        "ms": round(chain_ms, 1),
        "runs_ms": [round(t * 1000, 1) for t in times],
        "step_ms": round(chain_ms / CHAIN_STEPS, 3),
        "beyond_client_ms": round((chain_ms - CHAIN_STEPS * echo["client"]) / CHAIN_STEPS, 3),
        "beyond_connector_ms": round((chain_ms - CHAIN_STEPS * echo["connector"]) / CHAIN_STEPS, 3),
        "cpu_ms_per_step": {
            name: round(seconds * 1000 / (len(times) * CHAIN_STEPS), 3) for name, seconds in sorted(cpu.items())
        },
    }


def fan_result(times: list[float], cpu: dict[str, float]) -> dict[str, Any]:
    return {
        "ms": round(statistics.median(times) * 1000, 1),
        "runs_ms": [round(t * 1000, 1) for t in times],
        "cpu_ms_per_run": {name: round(seconds * 1000 / len(times), 1) for name, seconds in sorted(cpu.items())},
    }


def paired_ratio(over: list[float], under: list[float]) -> float:
    """The median of the rounds' own ratios: a check on the ratio of medians, less moved by a slow stretch."""
    return round(statistics.median(a / b for a, b in zip(over, under, strict=True)), 3)


async def through_serve(procs: Procs, settings: Settings) -> dict[str, Any]:
    serving = await start_serving(procs)
    ready = ", ".join(f"{store} {seconds:.1f} s" for store, seconds in serving.startup_s.items())
    print(f"  started the upstream and the gateways (/readyz: {ready})", flush=True)
    samples = Samples()
    # The fan-out sent direct is metered with the memory gateway, idle meanwhile, in its "gateway" column.
    gateway_of = {"memory": "memory", "sqlite": "sqlite", "direct": "memory"}
    meters = {
        kind: CpuMeter({"upstream": serving.pids["upstream"], "gateway": serving.pids[gateway_of[kind]]})
        for kind in FANS
    }
    ours: defaultdict[str, float] = defaultdict(float)
    everything = CpuMeter(serving.pids)
    profile: dict[str, Any] = {}
    async with (
        open_client(serving.upstream_url) as direct,
        open_client(serving.gateway_urls["memory"]) as memory,
        open_client(serving.gateway_urls["sqlite"]) as sqlite,
        connector(serving.upstream_url) as conn,
    ):
        calls = Calls(direct, {"memory": memory, "sqlite": sqlite}, conn)
        started = time.monotonic()
        await warm_up(calls)
        print(f"  warm-up: {time.monotonic() - started:.1f} s", flush=True)
        started, busy = time.monotonic(), system_busy()
        with everything.measure(ours):  # the harness, the gateways and the upstream
            await serve_rounds(calls, settings, samples, meters)
        others = other_cpu_pct(busy, sum(ours.values()), started)
        if settings.profile_seconds > 0:
            profile = await profile_chains(procs, serving, settings.profile_store, settings.profile_seconds, calls)
    echo = {name: statistics.median(getattr(samples, f"echo_{name}")) * 1000 for name in ("client", "connector")}
    return {
        "other_processes_pct": others,
        "profile": profile,
        "stores": {"memory": "memory", "sqlite": f"sqlite:///{SQLITE_DB.relative_to(ROOT)}"},
        "durability": DURABILITY,
        "gateway_startup_s": {store: round(seconds, 2) for store, seconds in serving.startup_s.items()},
        "echo_client_ms": round(echo["client"], 3),
        "echo_connector_ms": round(echo["connector"], 3),
        "echo_gateway_ms": round(statistics.median(samples.echo_gateway) * 1000, 3),
        "connector_cpu_ms_per_call": round(samples.connector_cpu * 1000 / len(samples.echo_connector), 3),
        "chain": {store: chain_result(samples.chain[store], samples.chain_cpu[store], echo) for store in STORES},
        "fan": {kind: fan_result(samples.fan[kind], samples.fan_cpu[kind]) for kind in FANS},
        "paired_ratios": {
            "chain_sqlite_memory": paired_ratio(samples.chain["sqlite"], samples.chain["memory"]),
            "fan_sqlite_memory": paired_ratio(samples.fan["sqlite"], samples.fan["memory"]),
            "fan_sqlite_direct": paired_ratio(samples.fan["sqlite"], samples.fan["direct"]),
            "fan_memory_direct": paired_ratio(samples.fan["memory"], samples.fan["direct"]),
        },
    }


# -- report ---------------------------------------------------------------------------------------------


def check(name: str, threshold: str, measured: str, ok: bool) -> dict[str, Any]:
    return {"target": name, "threshold": threshold, "measured": measured, "pass": ok}


def fan_cpu(ms: dict[str, float]) -> str:
    return " / ".join(f"{ms.get(name, 0.0):.0f}" for name in ("gateway", "upstream", "harness"))


def spread(us: dict[str, float]) -> str:
    return f"{us['median']:.0f} ({us['min']:.0f}–{us['max']:.0f})"


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks = [
        check(
            f"orchestration per step in-process: {row['case']}",
            f"< {STEP_BUDGET_US:.0f} µs",
            f"{row['runner_us']['median']:.0f} µs ({row['dispatch_us']['median']:.0f} with the dispatcher)",
            row["runner_us"]["median"] < STEP_BUDGET_US,
        )
        for row in results["in_process"]
    ]
    journal = results["journal"]
    checks.append(
        check(
            f"journal per step in-process, {journal['steps']}-step chain: SQLite ({journal['durability']}) − memory",
            f"<= {JOURNAL_BUDGET_MS} ms",
            f"{journal['added_ms_per_step']:.3f} ms ({journal['sqlite_ms_per_step']:.3f} − "
            f"{journal['memory_ms_per_step']:.3f})",
            journal["added_ms_per_step"] <= JOURNAL_BUDGET_MS,
        )
    )
    serve = results["serve"]
    echo_client, echo_connector = serve["echo_client_ms"], serve["echo_connector_ms"]
    memory_chain, sqlite_chain = (serve["chain"][store] for store in STORES)
    fan = {kind: serve["fan"][kind]["ms"] for kind in FANS}
    sqlite = f"SQLite ({serve['durability']})"

    def ratio_check(target: str, threshold: float, over: float, under: float, names: str) -> dict[str, Any]:
        ratio = over / under
        measured = f"{ratio:.3f}x ({over:.1f} vs {under:.1f} ms, {names})"
        return check(target, f"<= {threshold}x", measured, ratio <= threshold)

    checks += [
        # Issue 3's targets, on the gateway journaling in memory (as when they were set).
        check(
            f"{CHAIN_STEPS}-step chain through serve (store: memory): per step beyond the upstream's echo",
            f"<= {SERVE_STEP_BUDGET_MS} ms",
            f"{memory_chain['beyond_client_ms']:.3f} ms ({memory_chain['step_ms']:.3f} − {echo_client:.3f})",
            memory_chain["beyond_client_ms"] <= SERVE_STEP_BUDGET_MS,
        ),
        check(
            "the same, stricter: beyond the upstream call as the gateway makes it (its connector, in-process)",
            f"<= {SERVE_STEP_BUDGET_MS} ms",
            f"{memory_chain['beyond_connector_ms']:.3f} ms ({memory_chain['step_ms']:.3f} − {echo_connector:.3f})",
            memory_chain["beyond_connector_ms"] <= SERVE_STEP_BUDGET_MS,
        ),
        ratio_check(
            f"fan-out of {FAN_WIDTH} × {FAN_MS} ms calls (store: memory) vs the same calls sent concurrently, direct",
            FAN_RATIO,
            fan["memory"],
            fan["direct"],
            "memory vs direct",
        ),
        # Issue 10's: the same runs through the gateway journaling in SQLite.
        ratio_check(
            f"{CHAIN_STEPS}-step chain through serve: {sqlite} vs memory",
            STORE_RATIO,
            sqlite_chain["ms"],
            memory_chain["ms"],
            "SQLite vs memory",
        ),
        ratio_check(
            f"fan-out of {FAN_WIDTH} × {FAN_MS} ms calls through serve: {sqlite} vs memory",
            STORE_RATIO,
            fan["sqlite"],
            fan["memory"],
            "SQLite vs memory",
        ),
        ratio_check(
            f"fan-out of {FAN_WIDTH} × {FAN_MS} ms calls through serve, {sqlite}, vs the same calls direct",
            FAN_RATIO,
            fan["sqlite"],
            fan["direct"],
            "SQLite vs direct",
        ),
    ]
    return checks


def ratio(over: float, under: float) -> str:
    return f"{over / under:.2f}x"


def report_tables(results: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    header = [
        "case",
        "steps",
        "load (ms)",
        "engine alone (µs/step)",
        "runner, no-op call (µs/step)",
        "runner + dispatcher (µs/step)",
    ]
    rows = [
        [r["case"], str(r["steps"]), f"{r['load_ms']:.0f}", spread(r["engine_us"])]
        + [spread(r["runner_us"]), spread(r["dispatch_us"])]
        for r in results["in_process"]
    ]
    j = results["journal"]
    journal_rows = [
        [
            f"{j['steps']}-step chain on the runner, no-op calls: median of {j['repeats']} (ms/step)",
            f"{j['memory_ms_per_step']:.3f}",
            f"{j['sqlite_ms_per_step']:.3f}",
            f"{j['added_ms_per_step']:+.3f}",
        ],
        ["  SQLite transactions per step", "", f"{j['sqlite_transactions_per_step']}", ""],
        [
            "the store alone, 3 events and a commit per step (ms/step)",
            f"{j['one_commit_per_step_ms']['memory']:.3f}",
            f"{j['one_commit_per_step_ms']['sqlite']:.3f}",
            f"{j['one_commit_per_step_ms']['sqlite'] - j['one_commit_per_step_ms']['memory']:+.3f}",
        ],
    ]
    s = results["serve"]
    direct = s["fan"]["direct"]["ms"]
    serve_rows = [
        ["echo, straight to the upstream, mcp Client: p50 (ms)", f"{s['echo_client_ms']:.2f}"],
        ["echo, straight to the upstream, the gateway's connector: p50 (ms)", f"{s['echo_connector_ms']:.2f}"],
        ["the connector's CPU per echo call, in this process (ms)", f"{s['connector_cpu_ms_per_call']:.3f}"],
        ["echo__echo through the gateway (store: memory): p50 (ms)", f"{s['echo_gateway_ms']:.2f}"],
        [f"{FAN_WIDTH} × sleep({FAN_MS} ms) concurrently, direct, one client: median (ms)", f"{direct:.1f}"],
        ["  CPU per run: idle gateway / upstream / harness (ms)", fan_cpu(s["fan"]["direct"]["cpu_ms_per_run"])],
    ]
    chains, fans = s["chain"], s["fan"]
    memory, sqlite = chains["memory"], chains["sqlite"]

    def pair(label: str, cell: Callable[[str], str], both: str = "") -> list[str]:
        return [label, *(cell(store) for store in STORES), both]

    store_rows = [
        pair(
            f"{CHAIN_STEPS}-step chain: median (ms)",
            lambda k: f"{chains[k]['ms']:.1f}",
            ratio(sqlite["ms"], memory["ms"]),
        ),
        pair("  per step (ms)", lambda k: f"{chains[k]['step_ms']:.3f}"),
        pair("  per step beyond the echo via mcp Client (ms)", lambda k: f"{chains[k]['beyond_client_ms']:.3f}"),
        pair("  per step beyond the echo via the connector (ms)", lambda k: f"{chains[k]['beyond_connector_ms']:.3f}"),
        pair("  gateway CPU per step (ms)", lambda k: f"{chains[k]['cpu_ms_per_step'].get('gateway', 0.0):.3f}"),
        pair("  upstream CPU per step (ms)", lambda k: f"{chains[k]['cpu_ms_per_step'].get('upstream', 0.0):.3f}"),
        pair(
            f"fan-out workflow, {FAN_WIDTH} × sleep({FAN_MS} ms): median (ms)",
            lambda k: f"{fans[k]['ms']:.1f}",
            ratio(fans["sqlite"]["ms"], fans["memory"]["ms"]),
        ),
        pair("  vs the same calls direct", lambda k: ratio(fans[k]["ms"], direct)),
        pair("  CPU per run: gateway / upstream / harness (ms)", lambda k: fan_cpu(fans[k]["cpu_ms_per_run"])),
        pair("gateway start to /readyz 200 (s)", lambda k: f"{s['gateway_startup_s'][k]:.2f}"),
    ]
    check_rows = [
        [c["target"], c["threshold"], c["measured"], "PASS" if c["pass"] else "FAIL"] for c in results["checks"]
    ]
    return [
        (header, rows),
        (["journal in-process", "memory", f"SQLite ({j['durability']})", "SQLite − memory"], journal_rows),
        (["through patchbay serve: baselines", "value"], serve_rows),
        (["through patchbay serve, by store", "memory", f"SQLite ({s['durability']})", "SQLite / memory"], store_rows),
        (["target", "threshold", "measured", "result"], check_rows),
    ]


def print_report(results: dict[str, Any], markdown: bool) -> None:
    tables = report_tables(results)
    for header, rows in tables:
        print("\n" + plain_table(header, rows))
    m = results["machine"]
    print(
        f"\ncommit {m['commit']}; {m['nproc']} cores ({m['cpu']}), Python {m['python']}, mcp {m['mcp']}; "
        f"other processes used {m['other_in_process_pct']}% of one core in-process and "
        f"{m['other_serve_pct']}% through serve; load average {m['loadavg_at_start'][0]} at start, "
        f"{m['loadavg_at_end'][0]} at end"
    )
    profile = results.get("profile")
    if profile and "self" in profile:
        print(
            f"\nThe gateway with store {profile['store']} during {profile['chains']} chain runs "
            f"({profile['samples']} samples, {profile['file']}):"
        )
        print("  by part: " + ", ".join(f"{name} {pct}%" for name, pct in profile["parts"].items()))
        print("  self time by package: " + ", ".join(f"{p['frame']} {p['pct']}%" for p in profile["self_by_package"]))
        for item in profile["self"][:12]:
            print(f"  {item['pct']:5.1f}% self       {item['frame']}")
        for item in profile["inclusive_below_event_loop"][:20]:
            print(f"  {item['pct']:5.1f}% inclusive  {item['frame']}")
    elif profile:
        print(f"\nGateway profile: {profile.get('error')}")
    if markdown:
        for header, rows in tables:
            print("\n" + markdown_table(header, rows))
    print(f"\nwrote {OUT.name}/workflows.json")


# -- the run ----------------------------------------------------------------------------------------------


def other_cpu_pct(busy_before: float, ours: float, since: float) -> float:
    """CPU the rest of the machine used meanwhile, in % of one core."""
    others = system_busy() - busy_before - ours
    return round(100 * max(others, 0.0) / (time.monotonic() - since), 1)


async def benchmark(settings: Settings, procs: Procs) -> dict[str, Any]:
    began = time.monotonic()
    results: dict[str, Any] = {"machine": machine_facts(), "settings": asdict(settings)}
    print(f"in-process, {settings.steps} steps, median of {settings.repeats} runs:", flush=True)
    busy, cpu = system_busy(), time.process_time()
    results["in_process"] = await in_process(settings)
    print(f"journal cost per step in-process (SQLite, durability process), {JOURNAL_REPEATS} runs:", flush=True)
    results["journal"] = await journal_cost(JOURNAL_REPEATS)
    results["machine"]["other_in_process_pct"] = other_cpu_pct(busy, time.process_time() - cpu, began)
    print(f"through patchbay serve, {settings.rounds} rounds:", flush=True)
    serve = results["serve"] = await through_serve(procs, settings)
    results["machine"]["other_serve_pct"] = serve.pop("other_processes_pct")
    if profile := serve.pop("profile"):
        results["profile"] = profile
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["checks"] = evaluate(results)
    results["seconds"] = round(time.monotonic() - began, 1)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS}-step workflows, fewer rounds")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    parser.add_argument("--profile", type=float, default=0.0, help="seconds of py-spy on the gateway (default 0: off)")
    parser.add_argument(
        "--profile-store", choices=STORES, default="sqlite", help="the gateway to profile, by store (default sqlite)"
    )
    parser.add_argument("--journal", action="store_true", help="only the journal's cost per step, in-process")
    args = parser.parse_args(argv)
    if args.journal:
        anyio.run(journal_cost, JOURNAL_REPEATS, backend_options=LOOP)
        return 0
    settings = make_settings(args)
    OUT.mkdir(parents=True, exist_ok=True)
    procs = Procs()
    try:
        results = anyio.run(benchmark, settings, procs, backend_options=LOOP)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()  # also on Ctrl-C: each subprocess group is stopped and reaped
    (OUT / "workflows.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print_report(results, args.markdown)
    print(f"total {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
