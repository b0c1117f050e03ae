"""``patchbay serve`` stopped by SIGTERM: its stdio upstreams are stopped and reaped before it exits.

A stdio upstream gets stdin EOF, then SIGTERM, then SIGKILL, each after a bounded wait (the SDK's stdio
transport); a gateway that exited first would leave them running, or as zombies, reparented to init.
"""

import json
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from mcp import Client

from tests.support import PYTHON, ROOT, TESTKIT, JsonLines, run_gateway, stdio_server

pytestmark = pytest.mark.anyio

STUBBORN = ROOT / "tests" / "servers" / "stubborn.py"
SHUTDOWN_BOUND = 15.0
"""Seconds the gateway may take to exit: the SDK waits 2 s after stdin EOF, 2 s after SIGTERM, 2 s after SIGKILL."""


def gone(pid: int) -> bool:
    """Whether no process, not even a zombie, has this id."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def upstream_pid(url: str) -> int:
    async with Client(url, mode="legacy", cache=None) as client:
        result = await client.call_tool("kit__whoami", {})
    assert result.structured_content is not None
    return int(result.structured_content["pid"])


async def terminate(process: Process) -> int:
    process.send_signal(signal.SIGTERM)
    with anyio.fail_after(SHUTDOWN_BOUND):
        return await process.wait()


@pytest.mark.parametrize("server", [TESTKIT, STUBBORN], ids=["exits-on-eof", "ignores-eof-and-sigterm"])
async def test_sigterm_reaps_stdio_upstreams_before_the_gateway_exits(tmp_path: Path, server: Path) -> None:
    async with run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(server)}\n") as gw:
        pid = await upstream_pid(gw.url)
        assert not gone(pid)
        status = await terminate(gw.process.process)
        assert status == 0, gw.process.output()
        assert gone(pid)


@pytest.mark.parametrize("server", [TESTKIT, STUBBORN], ids=["exits-on-eof", "ignores-eof-and-sigterm"])
async def test_sigterm_stops_serve_stdio_while_its_client_holds_stdin_open(tmp_path: Path, server: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(f"servers:\n  kit: {stdio_server(server)}\n")
    argv = [PYTHON, "-m", "gateway", "serve", str(path), "--stdio"]
    async with await anyio.open_process(argv, cwd=ROOT, stderr=None) as process:
        assert process.stdin is not None  # held open until the gateway has exited
        assert process.stdout is not None
        lines = JsonLines(process.stdout)

        async def send(message: dict[str, Any]) -> None:
            assert process.stdin is not None
            await process.stdin.send(json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n")

        with anyio.fail_after(30):
            init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
            await send({"id": 0, "method": "initialize", "params": init})
            assert (await lines.next())["id"] == 0
            await send({"method": "notifications/initialized"})
            await send({"id": 1, "method": "tools/call", "params": {"name": "kit__whoami", "arguments": {}}})
            answer = await lines.next()
        assert answer["id"] == 1, answer
        pid = int(answer["result"]["structuredContent"]["pid"])
        assert not gone(pid)
        assert await terminate(process) == 0
        assert gone(pid)
