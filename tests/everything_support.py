"""The MCP project's reference server, `@modelcontextprotocol/server-everything` (npm), behind `patchbay serve`.

Installed with Node 22 into ``.cache/everything`` (`tests.npm_support`), it runs twice: as a
streamable-HTTP server on a free port, and as a stdio child of the gateway. A gateway fronts
each (a gateway per upstream: the two serve the same resource URIs), as the server ``everything``:

    async with run_everything(tmp_path) as stack:
        async with Client(stack.url("stdio")) as client:                  # through the gateway
            await client.call_tool(stack.tool("get-sum"), {"a": 1, "b": 2})
        async with Client(stack.direct("http"), mode="legacy") as client:  # the same server, no gateway
            await client.call_tool("get-sum", {"a": 1, "b": 2})

What 2026.8.31 is, found by running it: a TypeScript SDK 1.x server of the handshake era
(``initialize``; it answers with 2025-11-25 and does not speak 2026-07-28). It declares
``tools``/``prompts``/``resources`` (subscribe, listChanged), ``logging`` and 2025-11-25 tasks
(``tasks: {list, cancel, requests: {tools: {call}}}``), and lists every tool with
``execution.taskSupport``: ``required`` for ``simulate-research-query``, ``forbidden`` for the
rest; a call to ``simulate-research-query`` without a task is refused (``isError``, "MCP error
-32601: ... requires task augmentation"). It lists ``trigger-sampling-request`` and
``trigger-elicitation-request`` only to a client that declared sampling / elicitation at
``initialize`` (``get-roots-list`` only to one with roots). Its tool names contain ``-``.
Its HTTP transport takes the port from ``PORT`` and refuses request bodies over 4 MiB; the
Python SDK client refuses a server-sent event over 1 MiB, so a direct connection cannot
carry results larger than that.
"""

import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2
from mcp import StdioServerParameters

from tests.npm_support import NpmPackage, ensure_npm_packages
from tests.support import ROOT, START_TIMEOUT, Gateway, free_port, run_gateway, run_process

EVERYTHING = NpmPackage("@modelcontextprotocol/server-everything", "2026.8.31")
CACHE_DIR = ROOT / ".cache" / "everything"
SERVER = "everything"
"""The name the gateways of :func:`run_everything` give server-everything: its tools are ``everything__<tool>``."""
UPSTREAMS = ("http", "stdio")
"""The transports server-everything is served over, each behind a gateway of its own."""


def ensure_everything(cache_dir: Path = CACHE_DIR) -> list[str]:
    """Install Node 22 and server-everything into ``cache_dir`` unless they are there.

    Returns the argv that starts it, less the transport (``stdio`` or ``streamableHttp``).

    Raises:
        tests.npm_support.NpmError: it could not be installed (npm missing, failing, or Node older than 22).
    """
    node = ensure_npm_packages(cache_dir, [EVERYTHING])
    return [str(node), str(EVERYTHING.path(cache_dir) / "dist" / "index.js")]


@asynccontextmanager
async def run_everything_http(log_dir: Path, argv: Sequence[str], *, name: str = "everything") -> AsyncIterator[str]:
    """server-everything over streamable HTTP on a free port of 127.0.0.1; yields its MCP URL, reaps it at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    env = {**os.environ, "PORT": str(port)}
    async with run_process([*argv, "streamableHttp"], log_dir / f"{name}.log", ready_url=url, env=env):
        yield url


def stdio_upstream(argv: Sequence[str]) -> str:
    """A YAML flow mapping for server-everything as the gateway's stdio upstream."""
    return json.dumps({"command": [*argv, "stdio"]})


async def check_ready(gateway: Gateway) -> None:
    """Raise unless ``/readyz`` says every upstream is up: the gateway serves once each has had its first
    attempt to connect, so a server-everything that could not start shows here, not as a missing tool."""
    async with httpx2.AsyncClient() as http:
        response = await http.get(f"{gateway.base}/readyz", timeout=START_TIMEOUT)
    if response.status_code != 200:
        raise RuntimeError(f"the gateway in front of server-everything is not ready: {response.text}")


@dataclass(frozen=True)
class Everything:
    """server-everything over HTTP and over stdio, each behind a gateway of its own.

    One gateway cannot front both: the two serve the same resource URIs, which collide.
    """

    gateways: dict[str, Gateway]
    """By upstream transport (``http``, ``stdio``): the gateway fronting server-everything over it."""
    argv: tuple[str, ...]
    """Starts server-everything, less the transport argument."""
    http_url: str
    """The HTTP server-everything, the upstream of ``gateways["http"]``."""

    def url(self, upstream: str) -> str:
        """The MCP endpoint of the gateway in front of server-everything over ``upstream``."""
        return self.gateways[upstream].url

    @staticmethod
    def tool(name: str) -> str:
        """The gateway's name for server-everything's tool ``name``."""
        return f"{SERVER}__{name}"

    def direct(self, upstream: str) -> str | StdioServerParameters:
        """A ``Client`` target for server-everything without the gateway, over ``upstream``'s transport."""
        if upstream == "http":
            return self.http_url
        return StdioServerParameters(command=self.argv[0], args=[*self.argv[1:], "stdio"], cwd=str(ROOT))


@asynccontextmanager
async def run_everything(tmp_path: Path) -> AsyncIterator[Everything]:
    """Install (once) and start server-everything over HTTP, a gateway fronting it, and a gateway fronting
    it as a stdio child; all ready when this yields, all reaped (with the stdio child) when it ends."""
    argv = ensure_everything()
    async with run_everything_http(tmp_path, argv) as url, AsyncExitStack() as stack:
        servers = {"http": json.dumps({"url": url}), "stdio": stdio_upstream(argv)}
        gateways: dict[str, Gateway] = {}
        for upstream, server in servers.items():
            config = f"servers:\n  {SERVER}: {server}\n"
            gateway = await stack.enter_async_context(run_gateway(tmp_path, config, name=f"gateway-{upstream}"))
            await check_ready(gateway)
            gateways[upstream] = gateway
        yield Everything(gateways, tuple(argv), url)
