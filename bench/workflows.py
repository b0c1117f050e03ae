"""Benchmark: the workflow engine's own cost per step, in-process and through ``patchbay serve`` (issue 3).

In-process, with a no-op tool: 1,000-step chains, 1,000-wide fan-outs and 1,000-item for_each loops,
each timed three ways – the engine alone (its commands answered synchronously), the runner with a
bare no-op ``call`` (orchestration only) and the runner through ``Dispatcher.invoke`` (what a step
costs inside the gateway). Loading (validating the model, compiling every expression) is timed apart.

Through ``patchbay serve``, in front of ``bench/echo_server.py``: a 200-step chain of ``echo__echo``
against the upstream's own echo latency, and a workflow fanning out 50 ``echo__sleep(100 ms)`` calls
against the same 50 calls sent concurrently from one client straight to the upstream. And the store's
journal cost per step in-process: a 200-step chain on the runner (no-op calls) journaled in memory
against the same chain journaled in SQLite (``durability: process``). All of it is measured in
interleaved rounds, so machine noise hits each side alike::

    .venv/bin/python bench/workflows.py              # full run (about 70 s on 2 cores)
    .venv/bin/python bench/workflows.py --quick      # smoke run (200 steps, a few rounds)
    .venv/bin/python bench/workflows.py --markdown   # also print the Markdown for bench/RESULTS.md
    .venv/bin/python bench/workflows.py --profile 5  # also py-spy the gateway for 5 s of chain runs
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
from dataclasses import asdict, dataclass
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
    CpuMeter,
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
from gateway.workflows.commands import Evaluate
from gateway.workflows.engine import CallTool, Run
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
    """Interleaved rounds through ``patchbay serve``: one chain, one fan-out, one direct fan-out each."""
    echo_calls: int
    """Sequential echo calls per round and baseline."""
    profile_seconds: float


def make_settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(QUICK_STEPS, 2, 3, 20, args.profile)
    return Settings(STEPS, 15, 11, 40, args.profile)


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
    gateway_url: str
    pids: dict[str, int]
    startup_s: float
    """From starting ``patchbay serve`` to ``/readyz`` answering 200 (loads and compiles the workflows)."""


async def wait_readyz(procs: Procs, url: str) -> None:
    proc = procs.procs[-1]
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


async def start_serving(procs: Procs) -> Serving:
    up_port, gw_port = free_port(), free_port()
    up_url = f"http://{HOST}:{up_port}/mcp"
    upstream = procs.start("wf-upstream", [str(BIN / "python"), str(BENCH / "echo_server.py"), "--port", str(up_port)])
    await wait_ready(upstream, up_url, "echo")
    config = {
        "gateway": {"name": "bench-workflows"},
        "servers": {"echo": {"url": up_url}},
        "workflows": {
            # The echo tool's structured result is {"result": text}.
            CHAIN: chain(CHAIN_STEPS, "echo__echo", "${{.steps.{prev}.result.result}}"),
            FAN: fan_out(FAN_WIDTH, "echo__sleep", {"ms": FAN_MS}, FAN_WIDTH),
        },
    }
    started = time.monotonic()
    gateway = procs.start("wf-gateway", _gateway_argv(config, "workflows-gateway", gw_port))
    await wait_readyz(procs, f"http://{HOST}:{gw_port}/readyz")
    startup = time.monotonic() - started
    return Serving(up_url, f"http://{HOST}:{gw_port}/mcp", {"upstream": upstream.pid, "gateway": gateway.pid}, startup)


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


@dataclass
class Samples:
    echo_client: list[float]
    echo_connector: list[float]
    echo_gateway: list[float]
    chain: list[float]
    fan_gateway: list[float]
    fan_direct: list[float]
    chain_cpu: defaultdict[str, float]
    fan_cpu: dict[str, defaultdict[str, float]]
    """CPU seconds of each process during the fan-outs, through the gateway and direct."""
    connector_cpu: float = 0.0
    """CPU seconds this process spent in the ``echo_connector`` calls."""


async def expect_text(call: Awaitable[Any], text: str) -> None:
    result = await call
    texts = [getattr(item, "text", None) for item in result.content]
    if result.is_error or texts != [text]:
        raise RuntimeError(f"unexpected answer: {result!r}")


@dataclass
class Calls:
    """The measured calls: straight to the upstream (two ways) and through the gateway."""

    direct: Client
    gateway: Client
    connector: McpUpstream

    async def echo_client(self) -> None:
        await expect_text(self.direct.call_tool("echo", {"text": PAYLOAD}), PAYLOAD)

    async def echo_connector(self) -> None:
        result = await self.connector.call_tool("echo", {"text": PAYLOAD}, CONTEXT)
        if result.is_error:
            raise RuntimeError(f"unexpected answer: {result!r}")

    async def echo_gateway(self) -> None:
        await expect_text(self.gateway.call_tool("echo__echo", {"text": PAYLOAD}), PAYLOAD)

    async def chain(self) -> None:
        await expect_text(self.gateway.call_tool(CHAIN, {"text": PAYLOAD}), PAYLOAD)

    async def fan_gateway(self) -> None:
        await expect_text(self.gateway.call_tool(FAN, {}), "done")

    async def fan_direct(self) -> None:
        """The floor: the fan-out's calls, sent concurrently from one client straight to the upstream."""
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
        await calls.chain()
        await calls.fan_gateway()
        await calls.fan_direct()


async def serve_rounds(calls: Calls, settings: Settings, samples: Samples, meter: CpuMeter) -> None:
    for index in range(settings.rounds):
        started = time.monotonic()
        for _ in range(settings.echo_calls):
            samples.echo_client.append(await timed(calls.echo_client))
            cpu = time.process_time()
            samples.echo_connector.append(await timed(calls.echo_connector))
            samples.connector_cpu += time.process_time() - cpu
            samples.echo_gateway.append(await timed(calls.echo_gateway))
        with meter.measure(samples.chain_cpu):
            samples.chain.append(await timed(calls.chain))
        fans = [("gateway", samples.fan_gateway, calls.fan_gateway), ("direct", samples.fan_direct, calls.fan_direct)]
        for kind, into, fan in fans if index % 2 == 0 else reversed(fans):  # neither always goes first
            await anyio.sleep(SETTLE)
            with meter.measure(samples.fan_cpu[kind]):
                into.append(await timed(fan))
        print(
            f"  round {index + 1}/{settings.rounds}: chain {samples.chain[-1] * 1000:.0f} ms, "
            f"fan-out {samples.fan_gateway[-1] * 1000:.0f} ms (direct {samples.fan_direct[-1] * 1000:.0f} ms), "
            f"{time.monotonic() - started:.1f} s",
            flush=True,
        )


PROFILE_PARTS = (
    # py-spy's reading of a coroutine stack can be torn: the HTTP client's own frames count here too.
    ("the upstream call (connectors/, httpx2)", ("connectors/", "httpx2/", "httpcore2/", "h11/")),
    ("workflow engine and expressions", ("gateway/workflows/engine.py", "gateway/workflows/expressions.py")),
    ("workflow runner and journal", ("gateway/workflows/",)),
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


async def profile_chains(procs: Procs, gateway_pid: int, seconds: float, calls: Calls) -> dict[str, Any]:
    """py-spy samples the gateway while chains run back to back for ``seconds``."""
    pyspy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if pyspy is None:
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    out = OUT / "workflows-gateway-profile.txt"
    out.unlink(missing_ok=True)
    argv = [pyspy, "record", "--pid", str(gateway_pid), "--duration", str(max(1, round(seconds)))]
    argv += ["--rate", str(PYSPY_RATE), "--format", "raw", "--function", "--nonblocking", "--output", str(out)]
    spy = procs.start("wf-py-spy", argv)
    await anyio.sleep(0.5)
    deadline = time.monotonic() + seconds + 1.0
    while time.monotonic() < deadline:
        await calls.chain()
    try:
        await anyio.to_thread.run_sync(spy.popen.wait, 30)
    except subprocess.TimeoutExpired:
        pass  # stopped with the other processes at the end
    if not out.exists():
        return {"error": f"py-spy wrote no profile (status {spy.popen.poll()}); see {spy.log}"}
    raw = out.read_text()
    return {**summarize_profile(raw, top=20), "parts": profile_parts(raw), "file": f"{OUT.name}/{out.name}"}


async def through_serve(procs: Procs, settings: Settings) -> dict[str, Any]:
    serving = await start_serving(procs)
    print(f"  started the upstream and the gateway (/readyz in {serving.startup_s:.1f} s)", flush=True)
    samples = Samples([], [], [], [], [], [], defaultdict(float), defaultdict(lambda: defaultdict(float)))
    meter = CpuMeter(serving.pids)
    ours: defaultdict[str, float] = defaultdict(float)
    profile: dict[str, Any] = {}
    async with (
        open_client(serving.upstream_url) as direct,
        open_client(serving.gateway_url) as gateway,
        connector(serving.upstream_url) as conn,
    ):
        calls = Calls(direct, gateway, conn)
        started = time.monotonic()
        await warm_up(calls)
        print(f"  warm-up: {time.monotonic() - started:.1f} s", flush=True)
        started, busy = time.monotonic(), system_busy()
        with meter.measure(ours):  # the harness, the gateway and the upstream
            await serve_rounds(calls, settings, samples, meter)
        others = other_cpu_pct(busy, sum(ours.values()), started)
        if settings.profile_seconds > 0:
            profile = await profile_chains(procs, serving.pids["gateway"], settings.profile_seconds, calls)
    chain_ms = statistics.median(samples.chain) * 1000
    echo = {name: statistics.median(getattr(samples, f"echo_{name}")) * 1000 for name in ("client", "connector")}
    runs = len(samples.chain)
    return {
        "other_processes_pct": others,
        "profile": profile,
        "gateway_startup_s": round(serving.startup_s, 2),
        "echo_client_ms": round(echo["client"], 3),
        "echo_connector_ms": round(echo["connector"], 3),
        "echo_gateway_ms": round(statistics.median(samples.echo_gateway) * 1000, 3),
        "chain_ms": round(chain_ms, 1),
        "chain_runs_ms": [round(t * 1000, 1) for t in samples.chain],
        "chain_step_ms": round(chain_ms / CHAIN_STEPS, 3),
        "beyond_client_ms": round((chain_ms - CHAIN_STEPS * echo["client"]) / CHAIN_STEPS, 3),
        "beyond_connector_ms": round((chain_ms - CHAIN_STEPS * echo["connector"]) / CHAIN_STEPS, 3),
        "chain_cpu_ms_per_step": {
            name: round(cpu * 1000 / (runs * CHAIN_STEPS), 3) for name, cpu in sorted(samples.chain_cpu.items())
        },
        "fan_cpu_ms_per_run": {
            kind: {name: round(cpu * 1000 / runs, 1) for name, cpu in sorted(by_process.items())}
            for kind, by_process in samples.fan_cpu.items()
        },
        "connector_cpu_ms_per_call": round(samples.connector_cpu * 1000 / len(samples.echo_connector), 3),
        "fan_gateway_ms": round(statistics.median(samples.fan_gateway) * 1000, 1),
        "fan_direct_ms": round(statistics.median(samples.fan_direct) * 1000, 1),
        "fan_gateway_runs_ms": [round(t * 1000, 1) for t in samples.fan_gateway],
        "fan_direct_runs_ms": [round(t * 1000, 1) for t in samples.fan_direct],
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
    ratio = serve["fan_gateway_ms"] / serve["fan_direct_ms"]
    checks += [
        check(
            f"{CHAIN_STEPS}-step chain through serve: per step beyond the upstream's echo",
            f"<= {SERVE_STEP_BUDGET_MS} ms",
            f"{serve['beyond_client_ms']:.3f} ms ({serve['chain_step_ms']:.3f} − {serve['echo_client_ms']:.3f})",
            serve["beyond_client_ms"] <= SERVE_STEP_BUDGET_MS,
        ),
        check(
            "the same, stricter: beyond the upstream call as the gateway makes it (its connector, in-process)",
            f"<= {SERVE_STEP_BUDGET_MS} ms",
            f"{serve['beyond_connector_ms']:.3f} ms ({serve['chain_step_ms']:.3f} − {serve['echo_connector_ms']:.3f})",
            serve["beyond_connector_ms"] <= SERVE_STEP_BUDGET_MS,
        ),
        check(
            f"fan-out of {FAN_WIDTH} × {FAN_MS} ms calls vs the same calls sent concurrently, direct",
            f"<= {FAN_RATIO}x",
            f"{ratio:.2f}x ({serve['fan_gateway_ms']:.1f} vs {serve['fan_direct_ms']:.1f} ms)",
            ratio <= FAN_RATIO,
        ),
    ]
    return checks


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
    s = results["serve"]
    cpu = s["chain_cpu_ms_per_step"]
    serve_rows = [
        ["echo, straight to the upstream, mcp Client: p50 (ms)", f"{s['echo_client_ms']:.2f}"],
        ["echo, straight to the upstream, the gateway's connector: p50 (ms)", f"{s['echo_connector_ms']:.2f}"],
        ["echo__echo through the gateway: p50 (ms)", f"{s['echo_gateway_ms']:.2f}"],
        [f"{CHAIN_STEPS}-step chain through the gateway: median (ms)", f"{s['chain_ms']:.1f}"],
        ["  per step (ms)", f"{s['chain_step_ms']:.3f}"],
        ["  per step beyond the echo via mcp Client (ms)", f"{s['beyond_client_ms']:.3f}"],
        ["  per step beyond the echo via the gateway's connector (ms)", f"{s['beyond_connector_ms']:.3f}"],
        ["  gateway CPU per step (ms)", f"{cpu.get('gateway', 0.0):.3f}"],
        ["  upstream CPU per step (ms)", f"{cpu.get('upstream', 0.0):.3f}"],
        ["the connector's CPU per echo call, in this process (ms)", f"{s['connector_cpu_ms_per_call']:.3f}"],
        [f"fan-out workflow, {FAN_WIDTH} × sleep({FAN_MS} ms): median (ms)", f"{s['fan_gateway_ms']:.1f}"],
        ["  CPU per run: gateway / upstream / harness (ms)", fan_cpu(s["fan_cpu_ms_per_run"]["gateway"])],
        [f"the same {FAN_WIDTH} calls concurrently, direct, one client: median (ms)", f"{s['fan_direct_ms']:.1f}"],
        ["  CPU per run: gateway / upstream / harness (ms)", fan_cpu(s["fan_cpu_ms_per_run"]["direct"])],
        ["gateway start to /readyz 200 (s)", f"{s['gateway_startup_s']:.2f}"],
    ]
    check_rows = [
        [c["target"], c["threshold"], c["measured"], "PASS" if c["pass"] else "FAIL"] for c in results["checks"]
    ]
    return [
        (header, rows),
        (["through patchbay serve", "value"], serve_rows),
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
        print(f"\nGateway profile during chain runs ({profile['samples']} samples, {profile['file']}):")
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
