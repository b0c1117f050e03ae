"""Benchmark (issue 11, point 3): the CPU floor of one HTTP hop in Python, against an MCP server's whole call.

A gateway between an HTTP client and an HTTP upstream serves one HTTP request and makes one, whatever else it
does. This measures those two alone, with no MCP and no gateway logic, interleaved in one run:

- ``httpx2``: one JSON POST with ``httpx2.AsyncClient`` (the project's HTTP client, a fixed choice) to a bare
  ASGI app under uvicorn with httptools (how ``patchbay serve`` runs); the client's CPU and the app's CPU.
- ``httpcore2``: the same POST through httpx2's own transport layer (``httpcore2.AsyncConnectionPool``), the
  least the project's HTTP stack can do per request.
- ``upstream``: ``bench/echo_server.py`` (the paths benchmark's upstream, the SDK's server) answering a
  2026-07-28 ``tools/call`` of ``echo`` from the SDK's client: the upstream's CPU per call, which is the
  budget point 3 gives the gateway.
- ``gateway``: the same client and call through ``patchbay serve`` in front of that upstream (the paths
  benchmark's ``modern`` path): the gateway's CPU per call, and the upstream's.

::

    .venv/bin/python bench/http_floor.py            # about 40 s on 2 cores
    .venv/bin/python bench/http_floor.py --quick    # smoke run
"""

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpcore2
import httpx2
from mcp import Client
from run import BENCH, BIN, HOST, OUT, PAYLOAD, Procs, free_port, machine_facts, proc_cpu, wait_ready

REQUEST = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": PAYLOAD}}}
).encode()
ANSWER = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": PAYLOAD}], "isError": False}}
).encode()


async def bare_app(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
    """Reads the body, answers a fixed JSON-RPC result: an HTTP server's least work per request."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


def serve_bare(port: int) -> None:
    import uvicorn

    uvicorn.run(bare_app, host=HOST, port=port, http="httptools", log_level="warning", access_log=False)


Target = tuple[Callable[[], Awaitable[None]], int]
"""A call to make, and the pid of the process that answers it."""


async def _start(procs: Procs) -> tuple[str, int, str, int, str, int]:
    """The bare app, the echo upstream and a gateway in front of it: (url, pid) of each."""
    python = str(BIN / "python")
    bare_port, up_port, gw_port = free_port(), free_port(), free_port()
    bare = procs.start("floor-bare", [python, __file__, "--serve", str(bare_port)])
    upstream = procs.start("floor-upstream", [python, str(BENCH / "echo_server.py"), "--port", str(up_port)])
    up_url = f"http://{HOST}:{up_port}/mcp"
    await wait_ready(upstream, up_url, "echo")
    config = OUT / "floor-gateway.yaml"
    OUT.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"gateway": {"name": "bench"}, "servers": {"echo": {"url": up_url}}}))
    gateway = procs.start("floor-gateway", [str(BIN / "patchbay"), "serve", str(config), "--port", str(gw_port)])
    gw_url = f"http://{HOST}:{gw_port}/mcp"
    await wait_ready(gateway, gw_url, "echo__echo")
    return f"http://{HOST}:{bare_port}/mcp", bare.pid, up_url, upstream.pid, gw_url, gateway.pid


async def _measure(targets: dict[str, Target], upstream: int, calls: int, rounds: int) -> dict[str, Any]:
    """Rounds of ``calls`` calls per target, rotating the starting target; CPU per call of this process
    (the client), of the answering process and (through the gateway) of the upstream."""
    for call, _ in targets.values():
        for _ in range(calls // 5):
            await call()
    me = os.getpid()
    spent: defaultdict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    names = list(targets)
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            call, server = targets[name]
            before = (proc_cpu(me), proc_cpu(server), proc_cpu(upstream))
            for _ in range(calls):
                await call()
            after = (proc_cpu(me), proc_cpu(server), proc_cpu(upstream))
            spent[name] = [s + (a - b) for s, a, b in zip(spent[name], after, before, strict=True)]
    n = calls * rounds
    results: dict[str, Any] = {}
    for name, (client_cpu, server_cpu, up_cpu) in spent.items():
        row: dict[str, float] = {
            "client_cpu_ms_per_call": 1000 * client_cpu / n,
            "server_cpu_ms_per_call": 1000 * server_cpu / n,
        }
        if name == "gateway":
            row["upstream_cpu_ms_per_call"] = 1000 * up_cpu / n
        results[name] = {**row, "calls": n}
    return results


async def benchmark(calls: int, rounds: int, procs: Procs) -> dict[str, Any]:
    bare_url, bare_pid, up_url, up_pid, gw_url, gw_pid = await _start(procs)
    headers = [(b"host", bare_url.split("/")[2].encode()), (b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(REQUEST)).encode()))
    async with (
        httpx2.AsyncClient() as client,
        httpcore2.AsyncConnectionPool() as pool,
        Client(up_url, mode="2026-07-28", cache=None) as up_client,
        Client(gw_url, mode="2026-07-28", cache=None) as gw_client,
    ):

        async def with_httpx2() -> None:
            response = await client.post(bare_url, content=REQUEST, headers={"content-type": "application/json"})
            json.loads(response.content)

        async def with_httpcore2() -> None:
            response = await pool.request(b"POST", bare_url.encode(), headers=headers, content=REQUEST)
            json.loads(response.content)

        def mcp_call(mcp: Client, tool: str) -> Callable[[], Awaitable[None]]:
            async def call() -> None:
                result = await mcp.call_tool(tool, {"text": PAYLOAD})
                assert not result.is_error

            return call

        for _ in range(50):  # the bare app answers once it listens: wait for it here
            try:
                await with_httpx2()
                break
            except httpx2.TransportError:
                await anyio.sleep(0.1)
        targets: dict[str, Target] = {
            "httpx2": (with_httpx2, bare_pid),
            "httpcore2": (with_httpcore2, bare_pid),
            "upstream": (mcp_call(up_client, "echo"), up_pid),
            "gateway": (mcp_call(gw_client, "echo__echo"), gw_pid),
        }
        return await _measure(targets, up_pid, calls, rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations: a smoke run")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_bare(args.serve)
        return 0
    calls, rounds = (200, 3) if args.quick else (1000, 9)
    procs = Procs()
    try:
        results = anyio.run(benchmark, calls, rounds, procs)
    finally:
        procs.stop_all()
    httpx, core, upstream, gateway = (results[k] for k in ("httpx2", "httpcore2", "upstream", "gateway"))
    print(json.dumps(results, indent=1))
    floor = httpx["client_cpu_ms_per_call"] + httpx["server_cpu_ms_per_call"]
    least = core["client_cpu_ms_per_call"] + core["server_cpu_ms_per_call"]
    budget = upstream["server_cpu_ms_per_call"]
    print(f"\none request served + one made, no logic: {floor:.3f} ms CPU with httpx2, {least:.3f} ms with httpcore2")
    print(f"the upstream's whole 2026-07-28 call (point 3's budget for the gateway): {budget:.3f} ms CPU")
    print(
        f"through the gateway: gateway {gateway['server_cpu_ms_per_call']:.3f} ms CPU per call, upstream "
        f"{gateway['upstream_cpu_ms_per_call']:.3f} ms"
    )
    machine = machine_facts()
    print(f"commit {machine['commit']}; load average {machine['loadavg_at_start'][0]} at start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
