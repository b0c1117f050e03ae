"""Benchmark: Patchbay against direct access and against FastMCP's proxy, measured interleaved in one run.

Starts the upstream (``bench/echo_server.py``), the gateway (``patchbay serve``) and
FastMCP's proxy (``bench/fastmcp_proxy.py``) as subprocesses on 127.0.0.1, then
measures the three targets in round-robin rounds so machine noise hits them alike::

    .venv/bin/python bench/run.py              # full run (about 2 minutes on 2 cores)
    .venv/bin/python bench/run.py --quick      # smoke run (under 30 s)
    .venv/bin/python bench/run.py --markdown   # also print Markdown tables
    .venv/bin/python bench/run.py --calls 2000 --profile 10
    .venv/bin/python bench/run.py --paths      # issue 11: every client/upstream path (bench/paths.py)

Results go to ``bench/out/results.json``; subprocess logs to ``bench/out/logs/``.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import yaml
from mcp import Client

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
LOGS = OUT / "logs"
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
KB_PORT = 9101
"""The port ``examples/servers/kb.py`` serves on by default (another is taken if it is busy)."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024.0
PAYLOAD = "The quick brown fox jumps over the lazy dog. 0123456789"
SLEEP_MS = 50
LEVELS = (1, 8, 32)
LOAD_LEVEL = 8
"""The concurrency whose throughput and CPU per call the targets are judged on."""
PYSPY_RATE = 200
READY_TIMEOUT = 45.0
CALL_TIMEOUT = 30.0
TARGET_KEYS = ("direct", "patchbay", "fastmcp")
LABELS = {"direct": "direct", "patchbay": "Patchbay", "fastmcp": "FastMCP proxy"}


# -- plan ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    calls: int
    """Sequential, measured tools/call requests per target."""
    warmup: int
    rounds: int
    """Round-robin rounds the sequential calls and list requests are split into."""
    lists: int
    seconds_per_level: float
    """Seconds of load per target and concurrency level, split over ``load_rounds`` rounds."""
    load_rounds: int
    sleep_rounds: int
    profile_seconds: float


def make_plan(args: argparse.Namespace) -> Plan:
    quick: bool = args.quick
    calls: int = args.calls or (100 if quick else 1000)
    profile: float = args.profile if args.profile is not None else (0.0 if quick else 5.0)
    return Plan(
        calls=calls,
        warmup=min(100, max(10, calls // 10)),
        rounds=5 if quick else 10,
        lists=max(20, calls // 5),
        seconds_per_level=0.4 if quick else 3.0,
        load_rounds=2 if quick else 3,
        sleep_rounds=2 if quick else 5,
        profile_seconds=profile,
    )


# -- subprocesses -------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: "subprocess.Popen[bytes]"
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


class Procs:
    """Every subprocess of this run, each the leader of its own process group."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        LOGS.mkdir(parents=True, exist_ok=True)
        log = LOGS / f"{name}.log"
        with log.open("wb") as sink:
            popen = subprocess.Popen(
                list(argv),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """SIGTERM each process group (newest first), SIGKILL what is left after 10 s, reap the leaders."""
        for proc in reversed(self.procs):
            try:
                _stop(proc)
            except (OSError, subprocess.SubprocessError) as exc:
                print(f"could not stop {proc.name} (pid {proc.pid}): {exc}", file=sys.stderr)
        self.procs.clear()


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _stop(proc: Proc) -> None:
    pgid = proc.pid  # start_new_session: the leader's pid is the group's id
    _signal_group(pgid, signal.SIGTERM)
    try:
        proc.popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _signal_group(pgid, signal.SIGKILL)
        proc.popen.wait(timeout=5)
    deadline = time.monotonic() + 5
    while _signal_group(pgid, 0) and time.monotonic() < deadline:  # stdio children of a gateway
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)


def free_port(preferred: int | None = None) -> int:
    candidates = [preferred] if preferred else []
    for port in [*candidates, 0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port or 0))
            except OSError:
                continue
            bound: int = sock.getsockname()[1]
            return bound
    raise RuntimeError("no free port")


async def _answers(url: str, tool: str | None) -> bool:
    parts = urlsplit(url)
    try:
        with anyio.fail_after(5):
            stream = await anyio.connect_tcp(parts.hostname or HOST, parts.port or 80)
            await stream.aclose()
            async with Client(url, mode="legacy", cache=None) as client:
                names = [t.name for t in (await client.list_tools()).tools]
    except Exception:
        return False
    return tool is None or tool in names


async def wait_ready(proc: Proc, url: str, tool: str | None) -> None:
    """Poll until ``url`` answers tools/list (naming ``tool``), or fail if ``proc`` exits or time runs out."""
    try:
        with anyio.fail_after(READY_TIMEOUT):
            while not await _answers(url, tool):
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{proc.name} exited with status {proc.popen.returncode}; see {proc.log}")
                await anyio.sleep(0.2)
    except TimeoutError:
        raise TimeoutError(
            f"{proc.name} did not answer at {url} within {READY_TIMEOUT:.0f} s; see {proc.log}"
        ) from None


# -- /proc readings -----------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_busy() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_mib(pid: int) -> dict[str, float]:
    return {
        "vmhwm_mib": round(proc_status_kb(pid, "VmHWM") / MIB, 1),
        "vmrss_mib": round(proc_status_kb(pid, "VmRSS") / MIB, 1),
    }


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


class CpuMeter:
    """CPU seconds of the serving processes and of this harness, read before and after a batch."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def snapshot(self) -> dict[str, float]:
        snap = {name: proc_cpu(pid) for name, pid in self.pids.items()}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        snap["harness"] = usage.ru_utime + usage.ru_stime
        return snap

    @contextmanager
    def measure(self, into: dict[str, float]) -> Iterator[None]:
        before = self.snapshot()
        yield
        after = self.snapshot()
        for name, value in after.items():
            into[name] += value - before[name]


# -- targets and their measurements ----------------------------------------------------------------------


@dataclass
class Stats:
    call_lat: list[float] = field(default_factory=list)
    list_lat: list[float] = field(default_factory=list)
    errors: int = 0
    seq_cpu: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    seq_calls: int = 0
    load_cpu: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    load_calls: int = 0
    load_done: Counter[int] = field(default_factory=Counter)
    load_seconds: defaultdict[int, float] = field(default_factory=lambda: defaultdict(float))
    sleeps_sessions: list[float] = field(default_factory=list)
    sleeps_one_session: list[float] = field(default_factory=list)


@dataclass
class Target:
    key: str
    url: str
    prefix: str
    proc: Proc
    """The process serving this target: the upstream itself for ``direct``."""
    main: Client | None = None
    pool: list[Client] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)

    @property
    def echo(self) -> str:
        return f"{self.prefix}echo"

    @property
    def sleep(self) -> str:
        return f"{self.prefix}sleep"

    @property
    def client(self) -> Client:
        assert self.main is not None
        return self.main


def rotations(targets: Sequence[Target], rounds: int) -> Iterator[tuple[int, Target]]:
    """Round-robin over the targets, ``rounds`` times, starting each round with the next target."""
    for index in range(rounds):
        start = index % len(targets)
        for target in [*targets[start:], *targets[:start]]:
            yield index, target


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def open_client(url: str) -> Client:
    return Client(url, mode="legacy", cache=None, read_timeout_seconds=CALL_TIMEOUT)


@asynccontextmanager
async def sessions(targets: Sequence[Target], pool_size: int) -> AsyncIterator[None]:
    """Open each target's main session and ``pool_size`` more, eight at a time; close them all on exit.

    Each session is entered and exited by a task of its own, so they open (and close) concurrently.
    """
    wanted = len(targets) * (1 + pool_size)
    opened, stop, limiter = anyio.Event(), anyio.Event(), anyio.CapacityLimiter(8)
    count = 0

    async def hold(target: Target, is_main: bool) -> None:
        nonlocal count
        async with AsyncExitStack() as stack:
            async with limiter:
                client = await stack.enter_async_context(open_client(target.url))
            if is_main:
                target.main = client
            else:
                target.pool.append(client)
            count += 1
            if count == wanted:
                opened.set()
            await stop.wait()

    async with anyio.create_task_group() as tg:
        for target in targets:
            for index in range(1 + pool_size):
                tg.start_soon(hold, target, index == 0)
        try:
            with anyio.fail_after(READY_TIMEOUT):
                await opened.wait()
            yield
        finally:
            stop.set()


async def echo_once(client: Client, tool: str) -> bool:
    result = await client.call_tool(tool, {"text": PAYLOAD})
    return not result.is_error


async def warm_up(targets: Sequence[Target], plan: Plan) -> None:
    for target in targets:
        result = await target.client.call_tool(target.echo, {"text": PAYLOAD})
        texts = [getattr(item, "text", None) for item in result.content]
        if result.is_error or texts != [PAYLOAD]:
            raise RuntimeError(f"{target.key}: {target.echo} answered {result!r}")
        for _ in range(plan.warmup):
            await echo_once(target.client, target.echo)
        for _ in range(10):
            await target.client.list_tools()
        async with anyio.create_task_group() as tg:
            for client in target.pool:
                tg.start_soon(echo_once, client, target.echo)


async def sequential_calls(targets: Sequence[Target], plan: Plan, meter: CpuMeter) -> None:
    counts = split(plan.calls, plan.rounds)
    for index, target in rotations(targets, plan.rounds):
        stats = target.stats
        with meter.measure(stats.seq_cpu):
            for _ in range(counts[index]):
                started = time.perf_counter()
                ok = await echo_once(target.client, target.echo)
                stats.call_lat.append(time.perf_counter() - started)
                stats.errors += not ok
        stats.seq_calls += counts[index]


async def list_calls(targets: Sequence[Target], plan: Plan) -> None:
    counts = split(plan.lists, plan.rounds)
    for index, target in rotations(targets, plan.rounds):
        for _ in range(counts[index]):
            started = time.perf_counter()
            await target.client.list_tools()
            target.stats.list_lat.append(time.perf_counter() - started)


async def load(clients: Sequence[Client], tool: str, seconds: float) -> tuple[int, int, float]:
    """Each client calls ``tool`` back to back until ``seconds`` have passed: (ok calls, errors, elapsed)."""
    done = errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(client: Client) -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            try:
                ok = await echo_once(client, tool)
            except Exception:
                ok = False
            done += ok
            errors += not ok

    started = time.perf_counter()
    with anyio.fail_after(seconds + CALL_TIMEOUT + 5):
        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(worker, client)
    return done, errors, time.perf_counter() - started


async def throughput(targets: Sequence[Target], plan: Plan, meter: CpuMeter) -> None:
    seconds = plan.seconds_per_level / plan.load_rounds
    for level in LEVELS:
        for _, target in rotations(targets, plan.load_rounds):
            stats = target.stats
            cpu = stats.load_cpu if level == LOAD_LEVEL else defaultdict(float)
            with meter.measure(cpu):
                done, errors, elapsed = await load(target.pool[:level], target.echo, seconds)
            stats.load_done[level] += done
            stats.load_seconds[level] += elapsed
            stats.errors += errors
            if level == LOAD_LEVEL:
                stats.load_calls += done + errors


async def _sleep_call(client: Client, tool: str) -> None:
    await client.call_tool(tool, {"ms": SLEEP_MS})


async def concurrent_sleeps(clients: Sequence[Client], tool: str) -> float:
    started = time.perf_counter()
    with anyio.fail_after(CALL_TIMEOUT):
        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(_sleep_call, client, tool)
    return time.perf_counter() - started


async def ten_sleeps(targets: Sequence[Target], plan: Plan) -> None:
    for target in targets:  # one unmeasured pass: the sleep tool's first calls
        await concurrent_sleeps(target.pool[:10], target.sleep)
    for _, target in rotations(targets, plan.sleep_rounds):
        target.stats.sleeps_sessions.append(await concurrent_sleeps(target.pool[:10], target.sleep))
        target.stats.sleeps_one_session.append(await concurrent_sleeps([target.client] * 10, target.sleep))


# -- the gateway serving the repo's example servers --------------------------------------------------------


@dataclass(frozen=True)
class ExamplesConfig:
    path: Path
    env: dict[str, str]
    description: str


def examples_configs(kb_port: int) -> list[ExamplesConfig]:
    """``examples/quickstart.yaml`` if it exists (its ``PYTHON`` and ``KB_PORT`` set), then a built-in fallback."""
    configs = []
    quickstart = ROOT / "examples" / "quickstart.yaml"
    if quickstart.exists():
        env = {"PYTHON": str(BIN / "python"), "KB_PORT": str(kb_port)}
        configs.append(ExamplesConfig(quickstart, env, str(quickstart.relative_to(ROOT))))
    builtin = OUT / "examples.yaml"
    config = {
        "gateway": {"name": "bench-examples"},
        "servers": {
            "orders": {"command": [str(BIN / "python"), str(ROOT / "examples" / "servers" / "orders.py")]},
            "kb": {"url": f"http://{HOST}:{kb_port}/mcp"},
        },
    }
    builtin.write_text(yaml.safe_dump(config, sort_keys=False))
    configs.append(ExamplesConfig(builtin, {}, "built-in: orders.py over stdio + kb.py over HTTP"))
    return configs


async def exercise_examples(url: str) -> dict[str, int]:
    """A little traffic through the examples gateway, so its peak RSS is that of a gateway in use."""
    calls = errors = 0
    async with open_client(url) as client:
        tools = [t.name for t in (await client.list_tools()).tools]
        for _ in range(20):
            await client.list_tools()
        samples = {"get_order": {"order_id": "A-1001"}, "search": {"query": "refund"}}
        for suffix, arguments in samples.items():
            name = next((t for t in tools if t.endswith(suffix)), None)
            for _ in range(50 if name else 0):
                result = await client.call_tool(name or "", arguments)
                calls += 1
                errors += result.is_error
    return {"tools": len(tools), "calls": calls, "errors": errors}


# -- profiling ------------------------------------------------------------------------------------------


def _package_of(frame: str) -> str:
    """``"func (asyncio/events.py:78)"`` -> ``"asyncio"``; py-spy shortens paths to the import root."""
    path = frame.rsplit(" (", 1)[-1].rstrip(")").rsplit(":", 1)[0]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif path.startswith(f"{ROOT}/"):
        path = path[len(str(ROOT)) + 1 :]
    return path.split("/", 1)[0].removesuffix(".py") or "?"


def summarize_profile(raw: str, top: int = 15) -> dict[str, Any]:
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf[frames[-1]] += count
        packages[_package_of(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": f, "pct": round(100 * n / max(total, 1), 1)} for f, n in counter.most_common(top)]

    # The event loop's spine is on (nearly) every sample; what is under it is what tells.
    spine = {frame for frame, n in inclusive.items() if n > 0.6 * total}
    below = Counter({frame: n for frame, n in inclusive.items() if frame not in spine})
    return {
        "samples": total,
        "self": share(leaf),
        "inclusive_below_event_loop": share(below),
        "self_by_package": share(packages),
    }


async def profile_gateway(procs: Procs, gateway: Target, seconds: float) -> dict[str, Any]:
    """py-spy samples the gateway for ``seconds`` while 8 clients load it."""
    pyspy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if pyspy is None:
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    out = OUT / "gateway-profile.txt"
    out.unlink(missing_ok=True)
    argv = [pyspy, "record", "--pid", str(gateway.proc.pid), "--duration", str(max(1, round(seconds)))]
    argv += ["--rate", str(PYSPY_RATE), "--format", "raw", "--function", "--nonblocking", "--output", str(out)]
    spy = procs.start("py-spy", argv)
    await anyio.sleep(0.5)
    done, _, elapsed = await load(gateway.pool[:LOAD_LEVEL], gateway.echo, seconds + 1.0)
    try:
        await anyio.to_thread.run_sync(spy.popen.wait, 30)
    except subprocess.TimeoutExpired:
        pass  # stopped with the other processes at the end
    if not out.exists():
        return {"error": f"py-spy wrote no profile (status {spy.popen.poll()}); see {spy.log}"}
    summary = summarize_profile(out.read_text())
    summary.update(
        file=str(out.relative_to(ROOT)),
        busy_pct=round(100 * summary["samples"] / (PYSPY_RATE * max(1, round(seconds))), 1),
        calls_per_s_under_profiler=round(done / elapsed, 1),
    )
    return summary


# -- report ---------------------------------------------------------------------------------------------


def quantile(data: Sequence[float], q: int) -> float:
    return statistics.quantiles(data, n=100, method="inclusive")[q - 1] if len(data) > 1 else data[0]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def per_call_ms(cpu: dict[str, float], calls: int) -> dict[str, float]:
    return {name: round(value * 1000 / max(calls, 1), 3) for name, value in sorted(cpu.items())}


def target_result(target: Target) -> dict[str, Any]:
    s = target.stats
    return {
        "label": LABELS[target.key],
        "url": target.url,
        "tool": target.echo,
        "call_p50_ms": ms(quantile(s.call_lat, 50)),
        "call_p99_ms": ms(quantile(s.call_lat, 99)),
        "call_mean_ms": ms(statistics.fmean(s.call_lat)),
        "list_p50_ms": ms(quantile(s.list_lat, 50)),
        "calls_per_s": {str(c): round(s.load_done[c] / s.load_seconds[c], 1) for c in LEVELS},
        "errors": s.errors,
        "cpu_ms_per_call_sequential": per_call_ms(s.seq_cpu, s.seq_calls),
        f"cpu_ms_per_call_c{LOAD_LEVEL}": per_call_ms(s.load_cpu, s.load_calls),
        "sleep10_sessions_ms": {"median": ms(statistics.median(s.sleeps_sessions)), "max": ms(max(s.sleeps_sessions))},
        "sleep10_one_session_ms": {
            "median": ms(statistics.median(s.sleeps_one_session)),
            "max": ms(max(s.sleeps_one_session)),
        },
        "serving_process": target.proc.name,
        **memory_mib(target.proc.pid),
    }


def check(name: str, threshold: str, measured: str, ok: bool) -> dict[str, Any]:
    return {"target": name, "threshold": threshold, "measured": measured, "pass": ok}


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    t = results["targets"]
    direct, gw = t["direct"], t["patchbay"]
    added = gw["call_p50_ms"] - direct["call_p50_ms"]
    load = str(LOAD_LEVEL)
    rates = {key: t[key]["calls_per_s"][load] for key in TARGET_KEYS}
    vs_direct, vs_fastmcp = rates["patchbay"] / rates["direct"], rates["patchbay"] / rates["fastmcp"]
    cpu = gw["cpu_ms_per_call_sequential"]["patchbay"]
    cpu_load = gw[f"cpu_ms_per_call_c{LOAD_LEVEL}"]["patchbay"]
    many, one = gw["sleep10_sessions_ms"]["median"], gw["sleep10_one_session_ms"]["median"]
    direct_sleeps = max(direct["sleep10_sessions_ms"]["median"], direct["sleep10_one_session_ms"]["median"])
    examples = results.get("examples", {})
    rss = examples.get("vmhwm_mib")
    return [
        check(
            "added p50 latency over direct",
            "<= 1 ms",
            f"{added:+.2f} ms ({gw['call_p50_ms']:.2f} vs {direct['call_p50_ms']:.2f})",
            added <= 1.0,
        ),
        check(
            f"throughput at {load} clients vs direct",
            ">= 0.8x",
            f"{vs_direct:.2f}x ({rates['patchbay']:.0f} vs {rates['direct']:.0f}/s)",
            vs_direct >= 0.8,
        ),
        check(
            f"throughput at {load} clients vs FastMCP proxy",
            ">= 2x",
            f"{vs_fastmcp:.2f}x ({rates['patchbay']:.0f} vs {rates['fastmcp']:.0f}/s)",
            vs_fastmcp >= 2.0,
        ),
        check(
            "gateway CPU per call (sequential)",
            "<= 1 ms",
            f"{cpu:.2f} ms ({cpu_load:.2f} at {load} clients)",
            cpu <= 1.0,
        ),
        check(
            f"ten concurrent {SLEEP_MS} ms calls (median, worse of 10 sessions / 1 session)",
            "<= 70 ms",
            f"{max(many, one):.1f} ms ({many:.1f} / {one:.1f}; direct {direct_sleeps:.1f})",
            max(many, one) <= 70.0,
        ),
        check(
            "peak RSS serving the example servers",
            "<= 100 MiB",
            "not measured" if rss is None else f"{rss:.1f} MiB",
            rss is not None and rss <= 100.0,
        ),
    ]


Row = tuple[str, Callable[[dict[str, Any]], str]]


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def metric_rows() -> list[Row]:
    def cpu(kind: str, proc: str | None = None) -> Callable[[dict[str, Any]], str]:
        def cell(r: dict[str, Any]) -> str:
            name = proc or r["serving_process"]
            return "—" if name == "upstream" and proc is None else _fmt(r[kind].get(name, 0.0))

        return cell

    def rate(level: int) -> Callable[[dict[str, Any]], str]:
        return lambda r: _fmt(r["calls_per_s"][str(level)], 0)

    seq, busy = "cpu_ms_per_call_sequential", f"cpu_ms_per_call_c{LOAD_LEVEL}"
    rows: list[Row] = [
        ("tools/call p50 (ms)", lambda r: _fmt(r["call_p50_ms"])),
        ("tools/call p99 (ms)", lambda r: _fmt(r["call_p99_ms"])),
        ("tools/list p50 (ms)", lambda r: _fmt(r["list_p50_ms"])),
    ]
    rows += [(f"calls/s, {c} client{'s' if c > 1 else ''}", rate(c)) for c in LEVELS]
    rows += [
        ("proxy CPU per call, sequential (ms)", cpu(seq)),
        (f"proxy CPU per call, {LOAD_LEVEL} clients (ms)", cpu(busy)),
        ("upstream CPU per call, sequential (ms)", cpu(seq, "upstream")),
        ("client (harness) CPU per call, sequential (ms)", cpu(seq, "harness")),
        (
            f"10 × sleep({SLEEP_MS} ms), 10 sessions: wall, median (ms)",
            lambda r: _fmt(r["sleep10_sessions_ms"]["median"], 1),
        ),
        (
            f"10 × sleep({SLEEP_MS} ms), 1 session: wall, median (ms)",
            lambda r: _fmt(r["sleep10_one_session_ms"]["median"], 1),
        ),
        ("peak RSS of the serving process (MiB)", lambda r: _fmt(r["vmhwm_mib"], 1)),
        ("errors", lambda r: str(r["errors"])),
    ]
    return rows


def tables(results: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    header = ["metric", *(LABELS[k] for k in TARGET_KEYS)]
    rows = [[label, *(cell(results["targets"][k]) for k in TARGET_KEYS)] for label, cell in metric_rows()]
    check_header = ["target", "threshold", "measured", "result"]
    check_rows = [
        [c["target"], c["threshold"], c["measured"], "PASS" if c["pass"] else "FAIL"] for c in results["checks"]
    ]
    return header, rows, check_header, check_rows


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---", *["---:"] * (len(header) - 1)]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, align, *rows])


def print_report(results: dict[str, Any], markdown: bool) -> None:
    header, rows, check_header, check_rows = tables(results)
    examples = results.get("examples", {})
    print()
    print(plain_table(header, rows))
    print()
    if "vmhwm_mib" in examples:
        print(f"Patchbay serving the example servers ({examples['config']}): peak RSS {examples['vmhwm_mib']} MiB")
    elif examples:
        print(f"Patchbay serving the example servers: not measured ({examples.get('error')})")
    print()
    print(plain_table(check_header, check_rows))
    machine = results["machine"]
    print(
        f"\ncommit {machine['commit']}; {machine['nproc']} cores, Python {machine['python']}, mcp {machine['mcp']}, "
        f"fastmcp {machine['fastmcp']}; other processes used {machine['other_processes_cpu_pct_of_one_core']}% "
        f"of one core during the measurements (load average {machine['loadavg_at_start'][0]} at start, "
        f"{machine['loadavg_at_end'][0]} at end)"
    )
    profile = results.get("profile")
    if profile and "self" in profile:
        print(
            f"\nGateway profile under {LOAD_LEVEL} clients ({profile['samples']} samples, "
            f"busy {profile['busy_pct']}% of the time, {profile['file']}):"
        )
        packages = ", ".join(f"{p['frame']} {p['pct']}%" for p in profile["self_by_package"][:10])
        print(f"  self time by package: {packages}")
        for item in profile["self"][:10]:
            print(f"  {item['pct']:5.1f}% self       {item['frame']}")
        for item in profile["inclusive_below_event_loop"][:15]:
            print(f"  {item['pct']:5.1f}% inclusive  {item['frame']}")
    elif profile:
        print(f"\nGateway profile: {profile.get('error')}")
    if markdown:
        print("\n" + markdown_table(header, rows))
        if "vmhwm_mib" in examples:
            rss = examples["vmhwm_mib"]
            print(f"\nPatchbay serving the example servers ({examples['config']}): peak RSS **{rss} MiB**")
        print("\n" + markdown_table(check_header, check_rows))
    print(f"\nwrote {(OUT / 'results.json').relative_to(ROOT)}")


# -- the run --------------------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return {
        "commit": f"{commit}{'+dirty' if dirty.stdout.strip() else ''}" or None,
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "mcp": version("mcp"),
        "fastmcp": version("fastmcp"),
        "patchbay": version("patchbay"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


@dataclass
class Examples:
    """The gateway serving the repo's example servers (for its memory footprint)."""

    proc: Proc | None = None
    url: str = ""
    config: str = ""
    error: str = ""


@dataclass
class Stack:
    """The processes of one run and the URLs they answer on."""

    upstream: Proc
    gateway: Proc
    fastmcp: Proc
    upstream_url: str
    gateway_url: str
    fastmcp_url: str
    examples: Examples


def _gateway_argv(config: dict[str, Any], name: str, port: int) -> list[str]:
    path = OUT / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [str(BIN / "patchbay"), "serve", str(path), "--port", str(port)]


async def start_examples(procs: Procs, examples: Examples) -> None:
    kb_port, port = free_port(KB_PORT), free_port()
    kb_argv = [str(BIN / "python"), str(ROOT / "examples" / "servers" / "kb.py"), "--port", str(kb_port)]
    kb = procs.start("kb", kb_argv)
    errors = []
    try:
        await wait_ready(kb, f"http://{HOST}:{kb_port}/mcp", None)
    except (RuntimeError, TimeoutError) as exc:
        examples.error = str(exc)
        return
    for attempt, config in enumerate(examples_configs(kb_port)):
        argv = [str(BIN / "patchbay"), "serve", str(config.path), "--port", str(port)]
        proc = procs.start(f"patchbay-examples-{attempt}", argv, config.env)
        try:
            await wait_ready(proc, f"http://{HOST}:{port}/mcp", None)
        except (RuntimeError, TimeoutError) as exc:
            errors.append(f"{config.description}: {exc}")
            _stop(proc)
            continue
        busy = f"; port {KB_PORT} was busy, so kb.py served on {kb_port}" if kb_port != KB_PORT else ""
        examples.proc, examples.url, examples.config = proc, f"http://{HOST}:{port}/mcp", config.description + busy
        break
    examples.error = "; ".join(errors)


async def start_stack(procs: Procs) -> Stack:
    """Upstream first; then the gateway and the FastMCP proxy in front of it; the examples gateway alongside."""
    up_port, gw_port, fm_port = free_port(), free_port(), free_port()
    up_url = f"http://{HOST}:{up_port}/mcp"
    examples = Examples()
    async with anyio.create_task_group() as tg:
        tg.start_soon(start_examples, procs, examples)
        upstream = procs.start("upstream", [str(BIN / "python"), str(BENCH / "echo_server.py"), "--port", str(up_port)])
        await wait_ready(upstream, up_url, "echo")
        gw_config = {"gateway": {"name": "bench"}, "servers": {"echo": {"url": up_url}}}
        gateway = procs.start("patchbay", _gateway_argv(gw_config, "gateway", gw_port))
        fm_argv = [str(BIN / "python"), str(BENCH / "fastmcp_proxy.py"), "--upstream", up_url, "--port", str(fm_port)]
        fastmcp = procs.start("fastmcp", fm_argv)
        gw_url, fm_url = f"http://{HOST}:{gw_port}/mcp", f"http://{HOST}:{fm_port}/mcp"
        await wait_ready(gateway, gw_url, "echo__echo")
        await wait_ready(fastmcp, fm_url, "echo")
    return Stack(upstream, gateway, fastmcp, up_url, gw_url, fm_url, examples)


async def measure_examples(examples: Examples) -> dict[str, Any]:
    if examples.proc is None:
        return {"error": examples.error or "not started"}
    traffic = await exercise_examples(examples.url)
    children = {str(pid): memory_mib(pid) for pid in children_of(examples.proc.pid)}
    return {
        "config": examples.config,
        **traffic,
        **memory_mib(examples.proc.pid),
        "stdio_children": children,
        "fallback_reason": examples.error or None,
    }


async def benchmark(plan: Plan, procs: Procs) -> dict[str, Any]:
    began = time.monotonic()
    results: dict[str, Any] = {"machine": machine_facts(), "plan": asdict(plan)}
    stack = await start_stack(procs)
    print(f"started upstream, gateway and FastMCP proxy in {time.monotonic() - began:.1f} s", flush=True)
    targets = [
        Target("direct", stack.upstream_url, "", stack.upstream),
        Target("patchbay", stack.gateway_url, "echo__", stack.gateway),
        Target("fastmcp", stack.fastmcp_url, "", stack.fastmcp),
    ]
    meter = CpuMeter({"upstream": stack.upstream.pid, "patchbay": stack.gateway.pid, "fastmcp": stack.fastmcp.pid})
    started = time.monotonic()
    async with sessions(targets, max(LEVELS)):
        print(f"  opened {len(targets) * (1 + max(LEVELS))} sessions: {time.monotonic() - started:.1f} s", flush=True)
        phases: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("warm-up", lambda: warm_up(targets, plan)),
            (f"{plan.calls} sequential calls per target", lambda: sequential_calls(targets, plan, meter)),
            (f"{plan.lists} tools/list per target", lambda: list_calls(targets, plan)),
            (f"throughput at {', '.join(map(str, LEVELS))} clients", lambda: throughput(targets, plan, meter)),
            (f"ten concurrent {SLEEP_MS} ms calls", lambda: ten_sleeps(targets, plan)),
        ]
        ours: defaultdict[str, float] = defaultdict(float)
        system_before, measuring = system_busy(), time.monotonic()
        with meter.measure(ours):
            for title, phase in phases:
                started = time.monotonic()
                await phase()
                print(f"  {title}: {time.monotonic() - started:.1f} s", flush=True)
        elapsed = time.monotonic() - measuring
        others = system_busy() - system_before - sum(ours.values())
        results["machine"]["other_processes_cpu_pct_of_one_core"] = round(100 * max(others, 0.0) / elapsed, 1)
        results["targets"] = {t.key: target_result(t) for t in targets}
        results["examples"] = await measure_examples(stack.examples)
        if plan.profile_seconds > 0:
            results["profile"] = await profile_gateway(procs, targets[1], plan.profile_seconds)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["checks"] = evaluate(results)
    results["seconds"] = round(time.monotonic() - began, 1)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations: a smoke run in under 30 s")
    parser.add_argument("--calls", type=int, default=None, help="sequential calls per target (default 1000)")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    parser.add_argument(
        "--profile", type=float, default=None, help="seconds of py-spy on the gateway under load (default 5; 0 = off)"
    )
    parser.add_argument("--paths", action="store_true", help="issue 11's client/upstream paths instead (paths.py)")
    args = parser.parse_args(argv)
    if args.paths:
        from paths import main as paths_main  # bench/ is this script's directory

        return paths_main(argv)
    plan = make_plan(args)
    OUT.mkdir(parents=True, exist_ok=True)
    procs = Procs()
    try:
        results = anyio.run(benchmark, plan, procs)
    finally:
        stopping = time.monotonic()
        procs.stop_all()
        print(f"  stopped the subprocesses: {time.monotonic() - stopping:.1f} s", flush=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_report(results, args.markdown)
    print(f"total {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
