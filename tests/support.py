"""Real processes on 127.0.0.1 for end-to-end tests: start them, wait until they answer, always reap them."""

import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
from anyio.abc import Process
from mcp import Client

ROOT = Path(__file__).resolve().parent.parent
TESTKIT = ROOT / "tests" / "servers" / "testkit.py"
PYTHON = sys.executable
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Running:
    process: Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


async def wait_http(url: str, process: Process | None = None) -> None:
    """Wait until ``url`` answers at all (any status), at most ``START_TIMEOUT`` seconds."""
    async with httpx2.AsyncClient() as http:
        with anyio.fail_after(START_TIMEOUT):
            while True:
                if process is not None and process.returncode is not None:
                    raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
                try:
                    async with http.stream("GET", url, timeout=1.0):  # headers suffice: /sse never ends
                        return
                except httpx2.TransportError:
                    await anyio.sleep(0.05)


@asynccontextmanager
async def run_process(
    argv: Sequence[str], log: Path, *, ready_url: str | None = None, env: dict[str, str] | None = None
) -> AsyncIterator[Running]:
    """Start ``argv``; wait for ``ready_url``; on exit terminate it and reap it (kill if it lingers)."""
    with log.open("ab") as out:
        process = await anyio.open_process(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    running = Running(process, log)
    try:
        if ready_url is not None:
            try:
                await wait_http(ready_url, process)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{argv} did not start: {exc}\n{running.output()}") from exc
        yield running
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
            with anyio.move_on_after(10) as waited:
                await process.wait()
            if waited.cancelled_caught:
                process.kill()
                await process.wait()


@dataclass
class Gateway:
    url: str
    """The MCP endpoint."""
    base: str
    process: Running


@asynccontextmanager
async def run_gateway(tmp_path: Path, config: str, *, name: str = "gateway") -> AsyncIterator[Gateway]:
    """``patchbay serve`` on a free port with this config text."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(config)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [PYTHON, "-m", "gateway", "serve", str(path), "--port", str(port)]
    async with run_process(argv, tmp_path / f"{name}.log", ready_url=f"{base}/healthz") as running:
        yield Gateway(f"{base}/mcp", base, running)


@asynccontextmanager
async def run_http_upstream(
    tmp_path: Path, script: Path, port: int, *, name: str = "upstream", sse: bool = False
) -> AsyncIterator[Running]:
    """An example or test server over streamable HTTP (or legacy SSE) on ``port`` (kb.py serves HTTP by default)."""
    mode = ["--sse"] if sse else [] if script.name == "kb.py" else ["--http"]
    argv = [PYTHON, str(script), *mode, "--port", str(port)]
    ready = f"http://127.0.0.1:{port}/{'sse' if sse else 'mcp'}"
    async with run_process(argv, tmp_path / f"{name}.log", ready_url=ready) as running:
        yield running


def stdio_server(script: Path, **env: str) -> str:
    """A YAML flow mapping for a stdio upstream running ``script`` with this interpreter."""
    env_part = ", env: {" + ", ".join(f"{k}: {v}" for k, v in env.items()) + "}" if env else ""
    return f"{{command: [{PYTHON}, {script}]{env_part}}}"


def text(result: types.CallToolResult) -> str:
    """The text of a tool result's first content block."""
    content = result.content[0]
    assert isinstance(content, types.TextContent)
    return content.text


async def upstream_events(client: Client, tool: str = "kit__events") -> list[str]:
    """What the testkit upstream says has happened to it (its ``events`` tool, through ``client``)."""
    result = await client.call_tool(tool, {})
    assert result.structured_content is not None
    return list(result.structured_content["result"])


def patchbay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``patchbay ARGS`` as a process (in ``env``, else this one's environment), its output captured."""
    return subprocess.run(
        [PYTHON, "-m", "gateway", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False, env=env
    )


class JsonLines:
    """JSON-RPC messages read line by line from a byte stream (a process's stdout)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> Any:
        while b"\n" not in self._buffer:
            self._buffer += await self._stream.receive()
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)
