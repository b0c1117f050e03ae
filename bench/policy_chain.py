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

With ``--without``, also "all on" less each part in turn: what each part costs among the others.

Cost per call = (way − bare), from the medians of the repeats. Calls run sequentially, yielding to the
event loop every ``BATCH`` calls. A timed block ends once the audit writer has written every record of
it: its JSON and write run in a worker thread of this process, so they count, in the wall time (the
GIL) and in the CPU column (all threads). While calls keep the event loop busy that thread hardly
gets the GIL (CPython 3.11), so the records of a block mostly wait for its end: the sink's buffer is
sized to hold a block, where the default 10,000 would drop records in the fastest ways. The heap is
frozen after setup (``gateway.heap``), as ``patchbay serve`` does::

    .venv/bin/python bench/policy_chain.py              # full run: 15 repeats × 20,000 calls per way (~2.5 min)
    .venv/bin/python bench/policy_chain.py --quick      # smoke run: 3 × 2,000
    .venv/bin/python bench/policy_chain.py --markdown   # also print the Markdown for bench/RESULTS.md
    .venv/bin/python bench/policy_chain.py --without    # also "all on" less each part (~4.5 min in all)
    .venv/bin/python bench/policy_chain.py --profile 20 # then py-spy "all on" for 20 s, and time its costliest pieces

Results go to ``bench/out/policy_chain.json``.
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from jsonschema.validators import validator_for
from run import OUT, machine_facts, markdown_table, plain_table  # bench/run.py: this script's folder is sys.path[0]

from gateway.audit import JsonlAuditSink, build_record
from gateway.chain import build_chain
from gateway.config import AccessRule, CircuitBreakerConfig, Config, parse_config
from gateway.dispatch import Audit, CallPath, Dispatcher
from gateway.errors import CircuitOpen, UpstreamUnavailable
from gateway.heap import freeze_startup_heap
from gateway.metrics import Metrics
from gateway.registry import Entry, Registry
from gateway.types import CallContext, JSONObject, Policy, Principal, Tool, ToolCall, ToolResult
from gateway.workflows.expressions import Condition
from policies.access import AccessPolicy
from policies.breaker import BreakerPolicy
from policies.concurrency import ConcurrencyLimit
from policies.fallback import FallbackPolicy
from policies.limits import Limits
from policies.ratelimit import RateLimit
from policies.redaction import DEFAULT_KEYS, Redactor
from policies.retry import RetryPolicy
from policies.state import MemoryBreakerState, MemoryLimitState
from policies.validation import ArgumentValidation, violations

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
    profile_seconds: float
    """py-spy on "all on" after the measurement (0: off)."""
    without: bool
    """Also time ``WITHOUT``."""


def make_settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(3, 2_000, args.profile, args.without)
    return Settings(15, 20_000, args.profile, args.without)


@dataclass(frozen=True)
class Spec:
    key: str
    label: str
    policies: tuple[type, ...] | None
    """The chain's policies of these types; None: all of them; (): none."""
    metrics: bool = False
    audit: bool = False
    jq: bool = False


POLICIES = (
    ("access", "access", AccessPolicy),
    ("validation", "argument validation", ArgumentValidation),
    ("rate", "rate limit", RateLimit),
    ("concurrency", "concurrency limit", ConcurrencyLimit),
    ("fallback", "fallback", FallbackPolicy),
    ("breaker", "circuit breaker", BreakerPolicy),
    ("retry", "retry", RetryPolicy),
)
"""The chain's policies, in its order (``gateway/chain.py``)."""
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
WITHOUT = (
    *(
        Spec(f"-{key}", f"all on without {label}", tuple(t for _, _, t in POLICIES if t is not kind), True, True)
        for key, label, kind in POLICIES
    ),
    Spec("-metrics", "all on without metrics", None, audit=True),
    Spec("-audit", "all on without audit", None, metrics=True),
)
"""With ``--without``: "all on" less one part each, for what each costs among the others."""


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


def separated(policies: Sequence[Policy], wanted: tuple[type, ...] | None) -> list[Policy]:
    """``policies``, with the chain's combined rate and concurrency limits (one ``Limits``, as ``serve`` runs
    them) split into ``RateLimit`` and ``ConcurrencyLimit`` when only some policies are wanted, so each kind
    can be timed alone or left out."""
    if wanted is None:
        return list(policies)
    split: list[Policy] = []
    for policy in policies:
        if type(policy) is Limits:
            split += [RateLimit(policy.rules, policy.state), ConcurrencyLimit(policy.rules, policy.state)]
        else:
            split.append(policy)
    return split


async def build_way(spec: Spec, folder: Path, tg: TaskGroup, block: int) -> Way:
    """The dispatcher of one way, composed as ``Gateway.__init__`` composes it."""
    audit_path = folder / f"audit-{spec.key}.jsonl"
    config: Config = parse_config(config_text(audit_path, spec.jq), environ={})
    metrics = Metrics(known_tools=lambda name: name in REGISTRY.tools) if spec.metrics else None
    sink: JsonlAuditSink | None = None
    audit: Audit | None = None
    if spec.audit:
        assert config.audit.path is not None
        on_drop = metrics.audit_dropped if metrics is not None else None
        # In-process calls outrun the writer's thread (see the module docstring): hold a whole timed block.
        buffer = max(config.audit.buffer, block)
        sink = JsonlAuditSink(config.audit.path, buffer=buffer, on_drop=on_drop)
        await tg.start(sink.run)
        audit = Audit(sink, Redactor((*DEFAULT_KEYS, *config.audit.redact_keys), config.audit.redact_patterns))
    calls = CallPath()
    chosen: list[Policy] = []
    if spec.policies != ():
        on_change = (lambda s, state: metrics.circuit_open(s, state == "open")) if metrics is not None else None
        chain = build_chain(
            config,
            limits=MemoryLimitState(),
            breakers=MemoryBreakerState(),
            call_tool=calls.call_or_raise,
            on_circuit_change=on_change,
        )
        wanted = spec.policies
        chosen = [p for p in separated(chain.policies, wanted) if wanted is None or isinstance(p, wanted)]
        if wanted is not None and len(chosen) != len(wanted):
            raise RuntimeError(f"{spec.key}: the chain lacks one of {wanted}")
    dispatcher = Dispatcher(lambda: REGISTRY, PROVIDERS, chosen, metrics=metrics, audit=audit)
    calls.bind(dispatcher)
    return Way(spec, dispatcher, tuple(type(p).__name__ for p in chosen), sink, audit_path)


async def check_way(way: Way) -> None:
    """One call must go all the way through and come back as the provider's result."""
    result, outcome, _ = await way.dispatcher.invoke(NAME, ARGUMENTS, CONTEXT)
    if outcome != "ok" or result.structured_content != ORDERS:
        raise RuntimeError(f"{way.spec.key}: the call came back {outcome}: {result.content}")


async def drained(way: Way) -> None:
    """Wait until the audit writer has written every queued record (inside the timing: it is the calls' work)."""
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


async def timed(way: Way, calls: int) -> tuple[float, float]:
    """Wall and CPU (this process, all threads) seconds for ``calls`` sequential calls, their audit records written."""
    call = way.dispatcher.call
    batches, rest = divmod(calls, BATCH)
    checkpoint = anyio.lowlevel.checkpoint
    started, cpu = time.perf_counter(), time.process_time()
    for size in [BATCH] * batches + ([rest] if rest else []):
        for _ in range(size):
            await call(NAME, ARGUMENTS, CONTEXT)
        await checkpoint()
    await drained(way)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    if way.sink is not None:
        os.truncate(way.audit_path, 0)  # appends go to the new end: the file stays small
    return wall, cpu


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
    for repeat in range(settings.repeats):
        shift = repeat % len(ways)
        started = time.monotonic()
        for way in ways[shift:] + ways[:shift]:
            wall, cpu = await timed(way, settings.calls)
            samples[way.spec.key]["wall"].append(wall)
            samples[way.spec.key]["cpu"].append(cpu)
        bare, everything = (statistics.median(samples[k]["wall"]) for k in ("bare", "all"))
        print(
            f"  repeat {repeat + 1}/{settings.repeats}: {time.monotonic() - started:.1f} s; so far bare "
            f"{bare * 1e6 / settings.calls:.2f} µs/call, all on {everything * 1e6 / settings.calls:.2f} µs/call",
            flush=True,
        )
    return samples


PROFILE_RATE = 1000
"""py-spy samples per second."""
PROFILE_BLOCK = 5_000
"""Calls per timed block while py-spy samples (each ends with the audit writer caught up)."""
PROFILE_PARTS = (
    # Checked from the sample's innermost frame outwards; the first that matches takes the sample, so a
    # policy's helpers (jsonschema, anyio's CancelScope, the limit state) count for the policy that called them.
    ("audit writer thread: AuditRecord.json + write", ("_write_in_thread",)),
    ("access", ("policies/access.py",)),
    # py-spy often loses a generator's callers: jsonschema's frames count for validation on their own.
    ("argument validation (jsonschema)", ("policies/validation.py", "jsonschema/", "referencing/")),
    ("rate limit", ("policies/ratelimit.py",)),
    ("concurrency limit (anyio CancelScope × 2)", ("policies/concurrency.py",)),
    ("fallback", ("policies/fallback.py",)),
    ("circuit breaker", ("policies/breaker.py",)),
    ("retry", ("policies/retry.py",)),
    ("metrics (prometheus_client)", ("gateway/metrics.py", "prometheus_client/")),
    ("audit on the call path: build_record + redaction", ("gateway/audit.py", "policies/redaction.py")),
    ("dispatcher, compose, tracing", ("gateway/dispatch.py", "gateway/tracing.py")),
    ("no-op provider and harness", ("NoopProvider", "timed (")),
)
"""Where a sample of "all on" goes."""


def profile_part(frames: list[str]) -> str:
    whole = ";".join(frames)
    if PROFILE_PARTS[0][1][0] in whole:
        return PROFILE_PARTS[0][0]
    for frame in reversed(frames):
        for name, marks in PROFILE_PARTS[1:]:
            if any(mark in frame for mark in marks):
                return name
    return "event loop, other" if frames != [""] else "no Python frame (uvloop, C)"


def summarize(raw: str, us_per_call: float, top: int = 25) -> dict[str, Any]:
    """Samples by part and by innermost frame, as µs per call (their share of the samples × µs per call)."""
    parts: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames, count = stack.split(";"), int(count_text)
        total += count
        parts[profile_part(frames)] += count
        leaves[frames[-1]] += count

    def us(counter: Counter[str], n: int | None) -> list[dict[str, Any]]:
        return [
            {"frame": frame, "pct": round(100 * c / total, 1), "us": round(us_per_call * c / total, 2)}
            for frame, c in counter.most_common(n)
        ]

    return {"samples": total, "us_per_call": round(us_per_call, 2), "parts": us(parts, None), "self": us(leaves, top)}


async def profile(way: Way, seconds: float) -> dict[str, Any]:
    """py-spy (``--gil``: whichever thread holds the GIL) on this process while "all on" runs back to back."""
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if pyspy is None:
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    out = OUT / "policy_chain-profile.txt"
    out.unlink(missing_ok=True)
    argv = [pyspy, "record", "--pid", str(os.getpid()), "--duration", str(max(1, round(seconds)))]
    argv += ["--rate", str(PROFILE_RATE), "--format", "raw", "--function", "--gil", "--nonblocking"]
    calls, elapsed = 0, 0.0
    async with await anyio.open_process([*argv, "--output", str(out)]) as spy:
        while spy.returncode is None:
            wall, _ = await timed(way, PROFILE_BLOCK)
            calls, elapsed = calls + PROFILE_BLOCK, elapsed + wall
    if not out.exists() or not calls:
        return {"error": f"py-spy wrote no profile (status {spy.returncode})"}
    summary = summarize(out.read_text(), elapsed * 1e6 / calls)
    return {**summary, "calls": calls, "file": f"{OUT.name}/{out.name}"}


def table_rows(ways: list[Way], samples: dict[str, dict[str, list[float]]], calls: int) -> list[dict[str, Any]]:
    rows = []
    bare = statistics.median(samples["bare"]["wall"]) * 1e6 / calls
    bare_cpu = statistics.median(samples["bare"]["cpu"]) * 1e6 / calls
    for way in ways:
        wall = per_call_us(samples[way.spec.key]["wall"], calls)
        cpu = per_call_us(samples[way.spec.key]["cpu"], calls)
        rows.append(
            {
                "key": way.spec.key,
                "way": way.spec.label,
                "policies": list(way.policies),
                "us": wall,
                "cpu_us": cpu,
                "added_us": round(wall["median"] - bare, 2),
                "added_cpu_us": round(cpu["median"] - bare_cpu, 2),
                "runs_us": [round(t * 1e6 / calls, 2) for t in samples[way.spec.key]["wall"]],
            }
        )
    return rows


def best_us(fn: Callable[[], object], number: int = 20_000) -> float:
    """µs per call of ``fn``: the best of 7 loops of ``number`` calls."""
    return round(min(timeit.repeat(fn, number=number, repeat=7)) * 1e6 / number, 2)


def jq_round_trip_us(condition: Condition, scope: dict[str, Any], gap: float, calls: int = 2_000) -> float:
    """Median µs of ``condition.holds`` when each call comes ``gap`` seconds (busy) after the one before."""
    times = []
    for _ in range(calls):
        until = time.perf_counter() + gap
        while time.perf_counter() < until:
            pass
        started = time.perf_counter()
        condition.holds(scope)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e6, 2)


async def open_circuit_us(number: int = 50_000) -> float:
    """µs for an open circuit to refuse a call (``CircuitOpen`` raised and caught), the upstream untouched."""
    breaker = BreakerPolicy({SERVER: CircuitBreakerConfig(failures=1, reset_after=3600.0)}, MemoryBreakerState())
    call = ToolCall(NAME, SERVER, TOOL, ARGUMENTS, CONTEXT, REGISTRY.tools[NAME].tool)
    reached = 0

    async def upstream(_: ToolCall) -> ToolResult:
        nonlocal reached
        reached += 1
        raise UpstreamUnavailable("down", server=SERVER)

    with contextlib.suppress(UpstreamUnavailable):
        await breaker(call, upstream)
    best = float("inf")
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(number):
            try:
                await breaker(call, upstream)
            except CircuitOpen:
                pass
        best = min(best, time.perf_counter() - started)
    if reached != 1:
        raise RuntimeError(f"the open circuit let {reached - 1} calls through")
    return round(best * 1e6 / number, 2)


async def pieces(folder: Path) -> list[dict[str, Any]]:
    """The costliest pieces of "all on", each timed alone in a loop (hot caches: a floor for each)."""
    config = parse_config(config_text(folder / "unused.jsonl", jq=True), environ={})
    allow, jq_rule = config.policies[1], config.policies[-1]
    assert isinstance(allow, AccessRule)
    assert isinstance(jq_rule, AccessRule)
    assert jq_rule.condition is not None
    schema = REGISTRY.tools[NAME].tool.input_schema
    validator = ArgumentValidation()._validator(NAME, schema)
    assert validator is not None
    minimal_schema = {"type": "object", "required": ["customer_id"]}
    minimal = validator_for(minimal_schema)(minimal_schema)
    redactor = Redactor(DEFAULT_KEYS)
    record = build_record(NAME, SERVER, CONTEXT, "ok", 1e-5, (), ARGUMENTS, RESULT, None, redactor)
    metrics = Metrics(known_tools=lambda name: name in REGISTRY.tools)

    def metered() -> None:
        metrics.call_started(NAME, SERVER)
        metrics.call_finished(NAME, SERVER, "ok", 1e-5)

    scope = {"arguments": dict(ARGUMENTS), "client": CLIENT, "tool": NAME}
    measured = [
        (
            "policies/validation.py:violations: jsonschema over the arguments",
            best_us(lambda: violations(validator, ARGUMENTS)),
        ),
        ("  against {type: object, required: [customer_id]} alone", best_us(lambda: violations(minimal, ARGUMENTS))),
        ("policies/breaker.py: an open circuit refusing a call (upstream untouched)", await open_circuit_us()),
        (
            "gateway/audit.py:build_record (call path: redacts arguments and result)",
            best_us(lambda: build_record(NAME, SERVER, CONTEXT, "ok", 1e-5, (), ARGUMENTS, RESULT, None, redactor)),
        ),
        ("  policies/redaction.py:Redactor.redact(structured result)", best_us(lambda: redactor.redact(ORDERS))),
        ("gateway/audit.py:AuditRecord.json (writer thread)", best_us(record.json)),
        ("gateway/metrics.py:call_started + call_finished", best_us(metered)),
        (
            "jq `if:` Condition.holds, next call at once (worker still polling)",
            jq_round_trip_us(jq_rule.condition, scope, 0.0),
        ),
        (
            "jq `if:` Condition.holds, next call 100 µs later (worker asleep)",
            jq_round_trip_us(jq_rule.condition, scope, 100e-6),
        ),
    ]
    return [{"piece": name, "us": us} for name, us in measured]


async def benchmark(settings: Settings) -> dict[str, Any]:
    began = time.monotonic()
    results: dict[str, Any] = {"machine": machine_facts(), "settings": asdict(settings), "config": CONFIG}
    specs = SPECS + WITHOUT if settings.without else SPECS
    print(f"{len(specs)} ways, {settings.repeats} repeats × {settings.calls} calls each:", flush=True)
    with tempfile.TemporaryDirectory(prefix="patchbay-bench-") as folder:
        async with anyio.create_task_group() as tg:
            block = max(settings.calls, PROFILE_BLOCK)
            ways = [await build_way(spec, Path(folder), tg, block) for spec in specs]
            freeze_startup_heap()  # as `patchbay serve` does once the gateway is open
            samples = await measure(ways, settings)
            if settings.profile_seconds > 0:
                print(
                    f"py-spy on 'all on' for {settings.profile_seconds:g} s, then the costliest pieces alone:",
                    flush=True,
                )
                all_on = next(w for w in ways if w.spec.key == "all")
                results["profile"] = await profile(all_on, settings.profile_seconds)
                results["pieces"] = await pieces(Path(folder))
            tg.cancel_scope.cancel()
    results["rows"] = rows = table_rows(ways, samples, settings.calls)
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


PARTS = (*((key, label) for key, label, _ in POLICIES), ("metrics", "metrics"), ("audit", "audit"))


def report_tables(results: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    header = ["way", "µs per call", "added to bare (µs)", "CPU µs per call", "added CPU (µs)"]
    rows = [
        [r["way"], spread(r["us"]), "–" if r["key"] == "bare" else f"{r['added_us']:.1f}"]
        + [f"{r['cpu_us']['median']:.1f}", "–" if r["key"] == "bare" else f"{r['added_cpu_us']:.1f}"]
        for r in results["rows"]
        if not r["key"].startswith("-")
    ]
    by = {row["key"]: row for row in results["rows"]}
    alone = sum(by[key]["added_us"] for key, _ in PARTS)
    rows.append(["sum of the nine parts, each alone", "", f"{alone:.1f}", "", ""])
    tables = [(header, rows)]
    if "-audit" in by:
        everything = by["all"]["us"]["median"]
        saved = {key: everything - by[f"-{key}"]["us"]["median"] for key, _ in PARTS}
        parts = [[label, f"{by[key]['added_us']:.1f}", f"{saved[key]:.1f}"] for key, label in PARTS]
        parts.append(["sum", f"{alone:.1f}", f"{sum(saved.values()):.1f}"])
        tables.append((["part", "alone: added to bare (µs)", "in all on: all on − all on without it (µs)"], parts))
    checks = [[c["target"], c["threshold"], c["measured"], "PASS" if c["pass"] else "FAIL"] for c in results["checks"]]
    return [*tables, (["target", "threshold", "measured", "result"], checks)]


def print_profile(profile: dict[str, Any] | None, markdown: bool) -> None:
    if not profile:
        return
    if "error" in profile:
        print(f"\nprofile: {profile['error']}")
        return
    print(
        f"\npy-spy --gil on 'all on' ({profile['samples']} samples over {profile['calls']} calls at "
        f"{profile['us_per_call']:.1f} µs per call, {profile['file']}); µs per call = share × µs per call:"
    )
    parts = [[p["frame"], f"{p['pct']:.1f}", f"{p['us']:.1f}"] for p in profile["parts"]]
    leaves = [[p["frame"], f"{p['pct']:.1f}", f"{p['us']:.2f}"] for p in profile["self"]]
    print(plain_table(["part (innermost frame that names one)", "%", "µs per call"], parts))
    print("\n" + plain_table(["innermost frame (self time)", "%", "µs per call"], leaves))
    if markdown:
        print("\n" + markdown_table(["part", "% of samples", "µs per call"], parts))
        print("\n" + markdown_table(["innermost frame (self time)", "% of samples", "µs per call"], leaves))


def print_report(results: dict[str, Any], markdown: bool) -> None:
    tables = report_tables(results)
    for header, rows in tables:
        print("\n" + plain_table(header, rows))
    m, s = results["machine"], results["settings"]
    print(
        f"\ncommit {m['commit']}; {m['nproc']} cores ({m['cpu']}), Python {m['python']}; {s['repeats']} repeats × "
        f"{s['calls']} calls per way; load average {m['loadavg_at_start'][0]} at start, {m['loadavg_at_end'][0]} at end"
    )
    print_profile(results.get("profile"), markdown)
    if pieces := results.get("pieces"):
        table = [[p["piece"], f"{p['us']:.2f}"] for p in pieces]
        print("\nThe costliest pieces, each alone in a loop (hot caches):\n" + plain_table(["piece", "µs"], table))
        if markdown:
            print("\n" + markdown_table(["piece", "µs"], table))
    if markdown:
        for header, rows in tables:
            print("\n" + markdown_table(header, rows))
    print(f"\nwrote {OUT.name}/policy_chain.json")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats × 2,000 calls per way")
    parser.add_argument("--without", action="store_true", help="also time 'all on' less each part in turn")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    parser.add_argument(
        "--profile", type=float, default=0.0, help="seconds of py-spy on 'all on' after the run (0: off)"
    )
    args = parser.parse_args(argv)
    settings = make_settings(args)
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        results = anyio.run(benchmark, settings, backend_options=LOOP)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    (OUT / "policy_chain.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print_report(results, args.markdown)
    print(f"total {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
