"""Benchmark: what the full policy chain costs per call, in-process (issue 4; target: under 50 µs).

One tool (``crm__search_orders``, a small ``inputSchema``: four properties, one required) on a no-op
provider whose ``call_tool`` returns a constant result at once, called through ``Dispatcher.call`` as a
configured client (``support-bot``) with realistic arguments. Timed ways, interleaved over the repeats
(their order rotates from one repeat to the next, so drift and noise hit each alike):

* **bare**: ``Dispatcher(..., policies=())``, no metrics, no audit: the floor;
* **all on**: built as ``gateway/gateway.py`` builds it from ``CONFIG`` below: ``build_chain`` over a
  config that turns every policy on so that each does its work on every call yet lets it through
  (access deny + allow rules and a client tools list, argument validation, a per-client rate limit
  that never refuses, a per-tool concurrency limit, a fallback route, a circuit breaker with a failure
  rate, retries for the idempotent tool), plus ``Metrics`` (its own registry) and the audit trail
  (``JsonlAuditSink`` to a temporary file, started in the task group, the default ``Redactor``);
* **all on + a jq ``if:``**: the same plus a deny rule whose jq condition runs on every call (in the jq
  worker process) and does not hold;
* **policy chain only**: the seven policies, no metrics, no audit;
* each policy alone, metrics alone, audit alone: where the time goes.

Cost per call = (way − bare), from the medians of the repeats. Calls run sequentially and yield to the
event loop every ``BATCH`` calls (a served call always does), so the audit writer keeps up as it would
under load; its JSON and write happen in a worker thread of this process, so they count in the wall
time (the GIL) and in the CPU column. The heap is frozen after setup (``gateway.heap``), as
``patchbay serve`` does::

    .venv/bin/python bench/policies.py              # full run: 15 repeats × 20,000 calls per way (~2 min)
    .venv/bin/python bench/policies.py --quick      # smoke run: 3 × 2,000
    .venv/bin/python bench/policies.py --markdown   # also print the Markdown for bench/RESULTS.md
    .venv/bin/python bench/policies.py --profile 50000  # also cProfile "all on" over 50,000 calls

Results go to ``bench/out/policies.json``.
"""

# ruff: noqa: E402  (the imports below wait for sys.path to be put right)
import sys
from pathlib import Path

# This script's folder is sys.path[0], and this file has the name of the `policies` package, which would then
# import as this file: the package is imported once with the folder off the path, then bench/run.py is found.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import policies  # noqa: F401  (the package, from now on in sys.modules)

sys.path.append(str(_HERE))

import argparse
import cProfile
import json
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from run import OUT, machine_facts, markdown_table, plain_table  # bench/run.py: this script's folder is sys.path[0]

from gateway.audit import JsonlAuditSink
from gateway.chain import build_chain
from gateway.config import Config, parse_config
from gateway.dispatch import Audit, Dispatcher
from gateway.heap import freeze_startup_heap
from gateway.metrics import Metrics
from gateway.registry import Entry, Registry
from gateway.types import CallContext, JSONObject, Policy, Principal, Tool, ToolResult
from policies.access import AccessPolicy
from policies.breaker import BreakerPolicy
from policies.concurrency import ConcurrencyLimit
from policies.fallback import FallbackPolicy
from policies.ratelimit import RateLimit
from policies.redaction import DEFAULT_KEYS, Redactor
from policies.retry import RetryPolicy
from policies.state import MemoryLimitState
from policies.validation import ArgumentValidation

BUDGET_US = 50.0
"""Target: what the full chain (all policies, metrics, audit) adds per call, in-process."""
LOOP = {"use_uvloop": True}
"""The gateway's own event loop (``gateway/cli.py``)."""
BATCH = 100
"""Calls between two yields to the event loop (where the audit writer hands its batch to a thread)."""

SERVER, REPLICA, CLIENT = "crm", "crm_replica", "support-bot"
TOOL = "search_orders"
NAME = f"{SERVER}__{TOOL}"
FALLBACK = f"{REPLICA}__{TOOL}"
CONTEXT = CallContext(principal=Principal(CLIENT, kind="client"))
ARGUMENTS: JSONObject = {"customer_id": "C-0042137", "status": "open", "limit": 20}
DEFINITION: JSONObject = {
    "name": TOOL,
    "description": "Search a customer's orders, newest first.",
    "inputSchema": {
        "type": "object",
        "properties": {
            "customer_id": {"type": "string", "pattern": "^C-[0-9]{7}$", "description": "The customer's id."},
            "status": {"type": "string", "enum": ["open", "shipped", "delivered", "cancelled"]},
            "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
            "since": {"type": "string", "description": "Only orders placed on or after this date (YYYY-MM-DD)."},
        },
        "required": ["customer_id"],
        "additionalProperties": False,
    },
    "annotations": {"readOnlyHint": True},
}
ORDERS: JSONObject = {
    "orders": [
        {"id": "O-881023", "status": "open", "placed": "2026-11-20", "total": 129.9, "items": 3},
        {"id": "O-880517", "status": "open", "placed": "2026-11-18", "total": 42.5, "items": 1},
    ],
    "next_cursor": None,
}
RESULT = ToolResult(content=({"type": "text", "text": json.dumps(ORDERS)},), structured_content=ORDERS)
"""What the no-op provider answers: a small structured result, as a typical server sends it (with its text)."""

TOKEN_SHA256 = "7137e16f75a1d75b6fd65930672814806cdc1a0d6e0aa38611afc996a402258b"
"""SHA-256 of ``bench-token`` (never sent: the call is made as the client, in-process)."""
CONFIG = f"""\
clients:
  {CLIENT}:
    token_sha256: {TOKEN_SHA256}
    tools: ["{SERVER}__*"]
policies:
  - deny: ["{SERVER}__delete_*", "{SERVER}__refund_*"]
    reason: destructive tools are off
  - allow: ["{SERVER}__*"]
    clients: [{CLIENT}]
  - tools: ["{SERVER}__*"]
    rate_limit: 1000000/s
    per: client
  - tools: ["{SERVER}__*"]
    max_concurrency: 64
    per: tool
servers:
  {SERVER}:
    url: http://127.0.0.1:9/mcp
    tools:
      idempotent: ["search_*"]
    retry:
      attempts: 3
      backoff: 200ms
    circuit_breaker:
      failures: 5
      failure_rate: 0.5
      window: 60s
      min_calls: 10
      reset_after: 30s
    fallback:
      "search_*": {FALLBACK}
  {REPLICA}:
    url: http://127.0.0.1:9/replica/mcp
audit:
  path: AUDIT_PATH
"""
"""The "all on" config; ``AUDIT_PATH`` is replaced by a temporary file."""
JQ_RULE = f"""\
  - deny: ["{SERVER}__search_orders"]
    if: (.arguments.limit // 20) > 100
    reason: pages of more than 100 orders are too slow
"""
"""Appended to ``policies:`` for the jq row: a condition that is not a plain path runs in the jq worker."""


@dataclass(frozen=True)
class Settings:
    repeats: int
    calls: int
    """Calls per way and repeat."""
    profile_calls: int


def make_settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(3, 2_000, args.profile)
    return Settings(15, 20_000, args.profile)


@dataclass(frozen=True)
class Spec:
    key: str
    label: str
    policies: tuple[type, ...] | None
    """The chain's policies of these types; None: all of them; (): none."""
    metrics: bool = False
    audit: bool = False
    jq: bool = False


SPECS = (
    Spec("bare", "bare: no policies, no metrics, no audit (the floor)", ()),
    Spec("all", "all on: every policy + metrics + audit", None, metrics=True, audit=True),
    Spec("all_jq", "all on + an access rule with a jq `if:`", None, metrics=True, audit=True, jq=True),
    Spec("chain", "the seven policies only (no metrics, no audit)", None),
    Spec("access", "access alone (deny + allow rules, client tools list)", (AccessPolicy,)),
    Spec("validation", "argument validation alone", (ArgumentValidation,)),
    Spec("rate", "rate limit alone (per client)", (RateLimit,)),
    Spec("concurrency", "concurrency limit alone (per tool)", (ConcurrencyLimit,)),
    Spec("fallback", "fallback alone", (FallbackPolicy,)),
    Spec("breaker", "circuit breaker alone", (BreakerPolicy,)),
    Spec("retry", "retry alone", (RetryPolicy,)),
    Spec("metrics", "metrics alone", (), metrics=True),
    Spec("audit", "audit alone (JSON lines, default redaction)", (), audit=True),
)


class NoopProvider:
    """A provider whose tool answers at once with a constant result."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def list_tools(self) -> Sequence[Tool]:
        return [Tool(TOOL, DEFINITION)]

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        return RESULT


REGISTRY = Registry(
    tools={
        NAME: Entry(SERVER, TOOL, Tool(NAME, {**DEFINITION, "name": NAME})),
        FALLBACK: Entry(REPLICA, TOOL, Tool(FALLBACK, {**DEFINITION, "name": FALLBACK})),
    }
)
PROVIDERS = {SERVER: NoopProvider(SERVER), REPLICA: NoopProvider(REPLICA)}


def config_text(audit_path: Path, jq: bool) -> str:
    text = CONFIG.replace("AUDIT_PATH", str(audit_path))
    if jq:
        text = text.replace("servers:\n", JQ_RULE + "servers:\n", 1)
    return text


@dataclass
class Way:
    spec: Spec
    dispatcher: Dispatcher
    policies: tuple[str, ...]
    sink: JsonlAuditSink | None
    audit_path: Path


async def build_way(spec: Spec, folder: Path, tg: TaskGroup) -> Way:
    """The dispatcher of one way, composed as ``Gateway.__init__`` composes it."""
    audit_path = folder / f"audit-{spec.key}.jsonl"
    config: Config = parse_config(config_text(audit_path, spec.jq), environ={})
    metrics = Metrics(known_tools=lambda name: name in REGISTRY.tools) if spec.metrics else None
    sink: JsonlAuditSink | None = None
    audit: Audit | None = None
    if spec.audit:
        assert config.audit.path is not None
        on_drop = metrics.audit_dropped if metrics is not None else None
        sink = JsonlAuditSink(config.audit.path, buffer=config.audit.buffer, on_drop=on_drop)
        await tg.start(sink.run)
        audit = Audit(sink, Redactor((*DEFAULT_KEYS, *config.audit.redact_keys), config.audit.redact_patterns))
    dispatcher = Dispatcher(lambda: REGISTRY, PROVIDERS, metrics=metrics, audit=audit)
    chosen: list[Policy] = []
    if spec.policies != ():
        on_change = (lambda s, state: metrics.circuit_open(s, state == "open")) if metrics is not None else None
        chain = build_chain(
            config, state=MemoryLimitState(), call_tool=dispatcher.call_or_raise, on_circuit_change=on_change
        )
        wanted = spec.policies
        chosen = [p for p in chain.policies if wanted is None or isinstance(p, wanted)]
        if wanted is not None and len(chosen) != len(wanted):
            raise RuntimeError(f"{spec.key}: the chain lacks one of {wanted}")
        dispatcher.use(chosen)
    return Way(spec, dispatcher, tuple(type(p).__name__ for p in chosen), sink, audit_path)


async def check_way(way: Way) -> None:
    """One call must go all the way through and come back as the provider's result."""
    result, outcome = await way.dispatcher.invoke(NAME, ARGUMENTS, CONTEXT)
    if outcome != "ok" or result.structured_content != ORDERS:
        raise RuntimeError(f"{way.spec.key}: the call came back {outcome}: {result.content}")


async def settle(way: Way) -> None:
    """Let the audit writer write what is queued (outside the timed block), then empty the file."""
    sink = way.sink
    if sink is None:
        return
    for _ in range(10_000):  # at most 10 s; a benchmark may look inside the sink
        if not sink._queue and sink._inflight is None:
            break
        await anyio.sleep(0.001)
    else:
        raise RuntimeError(f"{way.spec.key}: the audit writer did not catch up in 10 s")
    if sink.dropped:
        raise RuntimeError(f"{way.spec.key}: the audit sink dropped {sink.dropped} records")
    os.truncate(way.audit_path, 0)  # appends go to the new end: the file stays small


async def timed(way: Way, calls: int) -> tuple[float, float]:
    """Wall and CPU (this process, all threads) seconds for ``calls`` sequential calls."""
    call = way.dispatcher.call
    batches, rest = divmod(calls, BATCH)
    checkpoint = anyio.lowlevel.checkpoint
    started, cpu = time.perf_counter(), time.process_time()
    for size in [BATCH] * batches + ([rest] if rest else []):
        for _ in range(size):
            await call(NAME, ARGUMENTS, CONTEXT)
        await checkpoint()
    return time.perf_counter() - started, time.process_time() - cpu


def per_call_us(times: list[float], calls: int) -> dict[str, float]:
    """Median, best and worst repeat, in µs per call."""
    return {
        "median": round(statistics.median(times) * 1e6 / calls, 2),
        "min": round(min(times) * 1e6 / calls, 2),
        "max": round(max(times) * 1e6 / calls, 2),
    }


async def measure(ways: list[Way], settings: Settings) -> dict[str, dict[str, list[float]]]:
    samples: dict[str, dict[str, list[float]]] = {w.spec.key: {"wall": [], "cpu": []} for w in ways}
    for way in ways:  # warm-up: caches filled, validators built, metric children made
        await check_way(way)
        await timed(way, min(settings.calls, 2_000))
        await settle(way)
    for repeat in range(settings.repeats):
        shift = repeat % len(ways)
        started = time.monotonic()
        for way in ways[shift:] + ways[:shift]:
            wall, cpu = await timed(way, settings.calls)
            await settle(way)
            samples[way.spec.key]["wall"].append(wall)
            samples[way.spec.key]["cpu"].append(cpu)
        bare, everything = (statistics.median(samples[k]["wall"]) for k in ("bare", "all"))
        print(
            f"  repeat {repeat + 1}/{settings.repeats}: {time.monotonic() - started:.1f} s; so far bare "
            f"{bare * 1e6 / settings.calls:.2f} µs/call, all on {everything * 1e6 / settings.calls:.2f} µs/call",
            flush=True,
        )
    return samples


def profile_rows(profiler: cProfile.Profile, calls: int, top: int = 25) -> list[dict[str, Any]]:
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, function), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = file.split("/work/main/", 1)[-1].split("site-packages/", 1)[-1]
        rows.append(
            {
                "function": f"{where}:{line}:{function}",
                "calls_per_call": round(ncalls / calls, 2),
                "self_us": round(tottime * 1e6 / calls, 2),
                "cumulative_us": round(cumtime * 1e6 / calls, 2),
            }
        )
    rows.sort(key=lambda r: -r["self_us"])
    return rows[:top]


async def benchmark(settings: Settings) -> dict[str, Any]:
    began = time.monotonic()
    results: dict[str, Any] = {"machine": machine_facts(), "settings": asdict(settings), "config": CONFIG}
    print(f"{len(SPECS)} ways, {settings.repeats} repeats × {settings.calls} calls each:", flush=True)
    with tempfile.TemporaryDirectory(prefix="patchbay-bench-") as folder:
        async with anyio.create_task_group() as tg:
            ways = [await build_way(spec, Path(folder), tg) for spec in SPECS]
            freeze_startup_heap()  # as `patchbay serve` does once the gateway is open
            samples = await measure(ways, settings)
            if settings.profile_calls > 0:
                all_on = next(w for w in ways if w.spec.key == "all")
                profiler = cProfile.Profile()
                profiler.enable()
                await timed(all_on, settings.profile_calls)
                profiler.disable()
                await settle(all_on)
                results["profile"] = profile_rows(profiler, settings.profile_calls)
            tg.cancel_scope.cancel()
    rows = []
    bare = statistics.median(samples["bare"]["wall"]) * 1e6 / settings.calls
    bare_cpu = statistics.median(samples["bare"]["cpu"]) * 1e6 / settings.calls
    for way in ways:
        wall = per_call_us(samples[way.spec.key]["wall"], settings.calls)
        cpu = per_call_us(samples[way.spec.key]["cpu"], settings.calls)
        rows.append(
            {
                "key": way.spec.key,
                "way": way.spec.label,
                "policies": list(way.policies),
                "us": wall,
                "cpu_us": cpu,
                "added_us": round(wall["median"] - bare, 2),
                "added_cpu_us": round(cpu["median"] - bare_cpu, 2),
                "runs_us": [round(t * 1e6 / settings.calls, 2) for t in samples[way.spec.key]["wall"]],
            }
        )
    results["rows"] = rows
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["checks"] = evaluate(rows)
    results["seconds"] = round(time.monotonic() - began, 1)
    return results


# -- report ---------------------------------------------------------------------------------------------


def evaluate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {row["key"]: row for row in rows}
    added = by["all"]["added_us"]
    ratio = by["all"]["us"]["median"] / by["bare"]["us"]["median"]
    checks = [
        {
            "target": "the full policy chain per call (all on − bare), in-process",
            "threshold": f"< {BUDGET_US:.0f} µs",
            "measured": f"{added:.1f} µs ({by['all']['us']['median']:.1f} − {by['bare']['us']['median']:.1f}; "
            f"{ratio:.1f}× bare)",
            "pass": added < BUDGET_US,
        }
    ]
    jq = by["all_jq"]["added_us"]
    checks.append(
        {
            "target": "the same plus an access rule with a jq `if:` (not in the issue)",
            "threshold": f"< {BUDGET_US:.0f} µs",
            "measured": f"{jq:.1f} µs",
            "pass": jq < BUDGET_US,
        }
    )
    return checks


def spread(us: dict[str, float]) -> str:
    return f"{us['median']:.1f} ({us['min']:.1f}–{us['max']:.1f})"


def report_tables(results: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    header = ["way", "µs per call", "added to bare (µs)", "CPU µs per call", "added CPU (µs)"]
    rows = [
        [r["way"], spread(r["us"]), "–" if r["key"] == "bare" else f"{r['added_us']:.1f}"]
        + [f"{r['cpu_us']['median']:.1f}", "–" if r["key"] == "bare" else f"{r['added_cpu_us']:.1f}"]
        for r in results["rows"]
    ]
    by = {row["key"]: row for row in results["rows"]}
    parts = ("access", "validation", "rate", "concurrency", "fallback", "breaker", "retry", "metrics", "audit")
    total = sum(by[k]["added_us"] for k in parts)
    rows.append(["sum of the parts alone (µs added)", "", f"{total:.1f}", "", ""])
    checks = [[c["target"], c["threshold"], c["measured"], "PASS" if c["pass"] else "FAIL"] for c in results["checks"]]
    return [(header, rows), (["target", "threshold", "measured", "result"], checks)]


def print_report(results: dict[str, Any], markdown: bool) -> None:
    tables = report_tables(results)
    for header, rows in tables:
        print("\n" + plain_table(header, rows))
    m, s = results["machine"], results["settings"]
    print(
        f"\ncommit {m['commit']}; {m['nproc']} cores ({m['cpu']}), Python {m['python']}; {s['repeats']} repeats × "
        f"{s['calls']} calls per way; load average {m['loadavg_at_start'][0]} at start, {m['loadavg_at_end'][0]} at end"
    )
    if profile := results.get("profile"):
        print(f"\ncProfile of 'all on' over {s['profile_calls']} calls (µs per call, inflated by the profiler):")
        print(f"  {'self':>6} {'cumul':>7} {'n/call':>6}  function")
        for row in profile:
            print(
                f"  {row['self_us']:6.2f} {row['cumulative_us']:7.2f} {row['calls_per_call']:6.2f}  {row['function']}"
            )
    if markdown:
        for header, rows in tables:
            print("\n" + markdown_table(header, rows))
    print(f"\nwrote {OUT.name}/policies.json")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats × 2,000 calls per way")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    parser.add_argument("--profile", type=int, default=0, help="calls of 'all on' to cProfile after the run (0: off)")
    args = parser.parse_args(argv)
    settings = make_settings(args)
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        results = anyio.run(benchmark, settings, backend_options=LOOP)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    (OUT / "policies.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print_report(results, args.markdown)
    print(f"total {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
