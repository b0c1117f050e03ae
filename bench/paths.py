"""Benchmark (issue 11): every client/upstream path through Patchbay against the same client going direct.

Run through ``bench/run.py --paths`` (or this file); all targets are measured interleaved in one run::

    .venv/bin/python bench/run.py --paths            # full run (about 2 minutes on 2 cores)
    .venv/bin/python bench/run.py --paths --quick    # smoke run

The paths, each a gateway target and the direct target it is judged against:

- ``lean``: a handshake-era client over HTTP → gateway → HTTP upstream; direct: that client to the upstream.
- ``modern``: a 2026-07-28 client over HTTP → gateway → HTTP upstream; direct: that client to the upstream.
- ``modern-asks``: as ``modern``, with a client that can be asked something (it declares sampling, as clients
  with a model do): the gateway holds each of its calls for the input-required round trip.
- ``stdio-up``: a handshake-era client over HTTP → gateway → stdio upstream; direct: the client on its own
  stdio connection to the same server (``bench/echo_server.py --stdio``).
- ``stdio-both``: the client on stdio → ``patchbay serve --stdio`` → stdio upstream (one gateway and one
  upstream per client session, the Claude Desktop shape); direct as for ``stdio-up``.

Per target: echo p50 (sequential), calls/s at 8 clients (8 sessions calling back to back), and the CPU per
call of the gateway processes and of the upstream processes (``/proc/<pid>/stat``, read around each batch).
Results go to ``bench/out/paths.json``.
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
import yaml
from mcp import Client, StdioServerParameters
from run import BENCH, BIN, HOST, OUT, PAYLOAD, Procs, children_of, free_port, machine_facts, proc_cpu, wait_ready

LOAD = 8
"""Clients (each its own session) in the throughput measurement."""
CALL_TIMEOUT = 30.0
PATHS = {
    "lean": ("handshake client → HTTP upstream", "http-legacy-gw", "http-legacy-direct"),
    "modern": ("2026-07-28 client → HTTP upstream", "http-modern-gw", "http-modern-direct"),
    "modern-asks": ("2026-07-28 client declaring sampling → HTTP upstream", "http-asks-gw", "http-asks-direct"),
    "stdio-up": ("stdio upstream, client over HTTP", "stdio-up-gw", "stdio-direct"),
    "stdio-both": ("client and upstream both over stdio", "stdio-both-gw", "stdio-direct"),
}
"""Path: (label, gateway target, direct target)."""


@dataclass
class PathTarget:
    key: str
    tool: str
    connect: Callable[[], Client]
    spawns: str = ""
    """For targets whose every session starts processes: ``upstream`` (a stdio server) or ``gateway``
    (``patchbay serve --stdio``, whose child is the upstream)."""
    gateway_pids: list[int] = field(default_factory=list)
    upstream_pids: list[int] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seq_cpu: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    seq_calls: int = 0
    load_cpu: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    load_calls: int = 0
    load_errors: int = 0
    load_seconds: float = 0.0

    def cpu(self) -> dict[str, float]:
        return {
            "gateway": sum(_cpu(pid) for pid in self.gateway_pids),
            "upstream": sum(_cpu(pid) for pid in self.upstream_pids),
        }


def _cpu(pid: int) -> float:
    try:
        return proc_cpu(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


class measure:
    """Adds the CPU seconds ``target``'s processes spend inside the block to ``into``."""

    def __init__(self, target: PathTarget, into: defaultdict[str, float]) -> None:
        self.target, self.into = target, into

    def __enter__(self) -> None:
        self.before = self.target.cpu()

    def __exit__(self, *exc: object) -> None:
        for name, value in self.target.cpu().items():
            self.into[name] += value - self.before[name]


def http_client(url: str, mode: str, *, asks: bool = False) -> Callable[[], Client]:
    """``asks``: the client declares sampling (the echo server never asks it anything)."""
    sampling = _never_sampled if asks else None
    return lambda: Client(url, mode=mode, cache=None, read_timeout_seconds=CALL_TIMEOUT, sampling_callback=sampling)


async def _never_sampled(context: Any, params: Any) -> Any:
    raise RuntimeError("the echo server asks nothing")


def stdio_client(command: str, args: list[str]) -> Callable[[], Client]:
    # the whole environment: the SDK's default passes no PYTHONPATH, which picks the tree under test
    params = StdioServerParameters(command=command, args=args, cwd=str(BENCH.parent), env=dict(os.environ))
    return lambda: Client(params, mode="legacy", cache=None, read_timeout_seconds=CALL_TIMEOUT)


def _config(name: str, server: dict[str, Any]) -> str:
    path = OUT / f"paths-{name}.yaml"
    path.write_text(yaml.safe_dump({"gateway": {"name": "bench"}, "servers": {"echo": server}}, sort_keys=False))
    return str(path)


async def start(procs: Procs) -> list[PathTarget]:
    python, echo = str(BIN / "python"), str(BENCH / "echo_server.py")
    stdio_echo = {"command": [python, echo, "--stdio"]}
    up_port, http_gw_port, stdio_gw_port = free_port(), free_port(), free_port()
    up_url = f"http://{HOST}:{up_port}/mcp"
    upstream = procs.start("paths-upstream", [python, echo, "--port", str(up_port)])
    await wait_ready(upstream, up_url, "echo")
    serve = [str(BIN / "patchbay"), "serve"]
    http_gw = procs.start("paths-gw-http", [*serve, _config("http", {"url": up_url}), "--port", str(http_gw_port)])
    stdio_gw = procs.start("paths-gw-stdio", [*serve, _config("stdio", stdio_echo), "--port", str(stdio_gw_port)])
    http_gw_url, stdio_gw_url = f"http://{HOST}:{http_gw_port}/mcp", f"http://{HOST}:{stdio_gw_port}/mcp"
    await wait_ready(http_gw, http_gw_url, "echo__echo")
    await wait_ready(stdio_gw, stdio_gw_url, "echo__echo")
    both = [*serve[1:], _config("both", stdio_echo), "--stdio"]
    targets = [
        PathTarget("http-legacy-direct", "echo", http_client(up_url, "legacy"), upstream_pids=[upstream.pid]),
        PathTarget(
            "http-legacy-gw",
            "echo__echo",
            http_client(http_gw_url, "legacy"),
            gateway_pids=[http_gw.pid],
            upstream_pids=[upstream.pid],
        ),
        PathTarget("http-modern-direct", "echo", http_client(up_url, "2026-07-28"), upstream_pids=[upstream.pid]),
        PathTarget(
            "http-modern-gw",
            "echo__echo",
            http_client(http_gw_url, "2026-07-28"),
            gateway_pids=[http_gw.pid],
            upstream_pids=[upstream.pid],
        ),
        PathTarget(
            "http-asks-direct", "echo", http_client(up_url, "2026-07-28", asks=True), upstream_pids=[upstream.pid]
        ),
        PathTarget(
            "http-asks-gw",
            "echo__echo",
            http_client(http_gw_url, "2026-07-28", asks=True),
            gateway_pids=[http_gw.pid],
            upstream_pids=[upstream.pid],
        ),
        PathTarget("stdio-direct", "echo", stdio_client(python, [echo, "--stdio"]), spawns="upstream"),
        PathTarget(
            "stdio-up-gw",
            "echo__echo",
            http_client(stdio_gw_url, "legacy"),
            gateway_pids=[stdio_gw.pid],
            upstream_pids=children_of(stdio_gw.pid),
        ),
        PathTarget("stdio-both-gw", "echo__echo", stdio_client(serve[0], both), spawns="gateway"),
    ]
    return targets


async def open_sessions(stack: AsyncExitStack, targets: Sequence[PathTarget]) -> None:
    """``LOAD`` sessions per target, one at a time, so the processes each stdio session starts are known."""
    me = os.getpid()
    for target in targets:
        for _ in range(LOAD):
            before = set(children_of(me))
            client = await stack.enter_async_context(target.connect())
            target.clients.append(client)
            for pid in set(children_of(me)) - before:
                if target.spawns == "upstream":
                    target.upstream_pids.append(pid)
                elif target.spawns == "gateway":
                    target.gateway_pids.append(pid)
                    target.upstream_pids.extend(children_of(pid))


async def echo_once(client: Client, tool: str) -> bool:
    result = await client.call_tool(tool, {"text": PAYLOAD})
    return not result.is_error and [getattr(c, "text", None) for c in result.content] == [PAYLOAD]


def rotations(targets: Sequence[PathTarget], rounds: int) -> Iterator[tuple[int, PathTarget]]:
    for index in range(rounds):
        start = index % len(targets)
        for target in [*targets[start:], *targets[:start]]:
            yield index, target


async def sequential(targets: Sequence[PathTarget], calls: int, rounds: int) -> None:
    for _, target in rotations(targets, rounds):
        client = target.clients[0]
        with measure(target, target.seq_cpu):
            for _ in range(calls // rounds):
                started = time.perf_counter()
                if not await echo_once(client, target.tool):
                    raise RuntimeError(f"{target.key}: echo failed")
                target.latencies.append(time.perf_counter() - started)
        target.seq_calls += calls // rounds


async def throughput(targets: Sequence[PathTarget], seconds: float, rounds: int) -> None:
    for _, target in rotations(targets, rounds):
        done = errors = 0
        deadline = time.perf_counter() + seconds / rounds

        async def worker(client: Client, tool: str, deadline: float) -> None:
            nonlocal done, errors
            while time.perf_counter() < deadline:
                ok = await echo_once(client, tool)
                done += ok
                errors += not ok

        started = time.perf_counter()
        with measure(target, target.load_cpu), anyio.fail_after(seconds + CALL_TIMEOUT):
            async with anyio.create_task_group() as tg:
                for client in target.clients:
                    tg.start_soon(worker, client, target.tool, deadline)
        target.load_seconds += time.perf_counter() - started
        target.load_calls += done
        target.load_errors += errors


def target_result(target: PathTarget) -> dict[str, Any]:
    def per_call(cpu: dict[str, float], calls: int) -> dict[str, float]:
        return {name: round(1000 * value / max(calls, 1), 3) for name, value in cpu.items()}

    return {
        "p50_ms": round(1000 * statistics.median(target.latencies), 3),
        "p99_ms": round(1000 * statistics.quantiles(target.latencies, n=100)[98], 3),
        "calls_per_s": round(target.load_calls / target.load_seconds, 1),
        "errors": target.load_errors,
        "cpu_ms_per_call_sequential": per_call(target.seq_cpu, target.seq_calls),
        f"cpu_ms_per_call_c{LOAD}": per_call(target.load_cpu, target.load_calls),
        "gateway_processes": len(target.gateway_pids),
        "upstream_processes": len(target.upstream_pids),
    }


def path_results(targets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    results = {}
    for path, (label, gw_key, direct_key) in PATHS.items():
        gw, direct = targets[gw_key], targets[direct_key]
        busy = gw[f"cpu_ms_per_call_c{LOAD}"]
        results[path] = {
            "label": label,
            "added_p50_ms": round(gw["p50_ms"] - direct["p50_ms"], 2),
            "throughput_ratio": round(gw["calls_per_s"] / direct["calls_per_s"], 2),
            "gateway_cpu_ms_per_call": busy["gateway"],
            "upstream_cpu_ms_per_call": busy["upstream"],
            "gateway_cpu_ms_per_call_sequential": gw["cpu_ms_per_call_sequential"]["gateway"],
            "upstream_cpu_ms_per_call_sequential": gw["cpu_ms_per_call_sequential"]["upstream"],
        }
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        f"| path | added p50 over direct (ms) | calls/s at {LOAD} clients vs direct | gateway CPU per call (ms) "
        "| upstream CPU per call (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for path, (label, gw_key, direct_key) in PATHS.items():
        r, gw, direct = results["paths"][path], results["targets"][gw_key], results["targets"][direct_key]
        lines.append(
            f"| {label} (`{path}`) | {r['added_p50_ms']:+.2f} ({gw['p50_ms']:.2f} vs {direct['p50_ms']:.2f}) "
            f"| {r['throughput_ratio']:.2f}× ({gw['calls_per_s']:.0f} vs {direct['calls_per_s']:.0f}) "
            f"| {r['gateway_cpu_ms_per_call']:.2f} ({r['gateway_cpu_ms_per_call_sequential']:.2f} sequential) "
            f"| {r['upstream_cpu_ms_per_call']:.2f} ({r['upstream_cpu_ms_per_call_sequential']:.2f} sequential) |"
        )
    return "\n".join(lines)


async def benchmark(args: argparse.Namespace, procs: Procs) -> dict[str, Any]:
    calls = args.calls or (100 if args.quick else 1000)
    rounds, seconds = (2, 0.8) if args.quick else (10, 3.0)
    results: dict[str, Any] = {
        "machine": machine_facts(),
        "plan": {"calls": calls, "rounds": rounds, "load_clients": LOAD, "load_seconds_per_target": seconds},
    }
    targets = await start(procs)
    async with AsyncExitStack() as stack:
        began = time.monotonic()
        await open_sessions(stack, targets)
        print(f"  opened {LOAD} sessions per target: {time.monotonic() - began:.1f} s", flush=True)
        for target in targets:
            for _ in range(max(10, calls // 10)):
                await echo_once(target.clients[0], target.tool)
        began = time.monotonic()
        await sequential(targets, calls, rounds)
        print(f"  {calls} sequential calls per target: {time.monotonic() - began:.1f} s", flush=True)
        began = time.monotonic()
        await throughput(targets, seconds, min(rounds, 3))
        print(f"  {LOAD} clients for {seconds:g} s per target: {time.monotonic() - began:.1f} s", flush=True)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = {t.key: target_result(t) for t in targets}
    results["paths"] = path_results(results["targets"])
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", action="store_true", help="(accepted, for bench/run.py --paths)")
    parser.add_argument("--quick", action="store_true", help="fewer iterations: a smoke run")
    parser.add_argument("--calls", type=int, default=None, help="sequential calls per target (default 1000)")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    procs = Procs()
    try:
        results = anyio.run(benchmark, args, procs)
    finally:
        procs.stop_all()
    (OUT / "paths.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(json.dumps(results["targets"], indent=1))
    print()
    print(report(results))
    machine = results["machine"]
    print(
        f"\ncommit {machine['commit']}; {machine['nproc']} cores ({machine['cpu']}), Python {machine['python']}, "
        f"mcp {machine['mcp']}; load average {machine['loadavg_at_start'][0]} at start, "
        f"{machine['loadavg_at_end'][0]} at end"
    )
    print(f"wrote {(OUT / 'paths.json').relative_to(BENCH.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
