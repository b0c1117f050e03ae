"""The benchmark's upstream: an MCP server with ``echo`` and ``sleep`` tools.

Served over streamable HTTP on 127.0.0.1 with stateful sessions and the SDK's
default SSE response framing (``json_response=False``), or over stdio::

    .venv/bin/python bench/echo_server.py --port 9201
    .venv/bin/python bench/echo_server.py --stdio
"""

import argparse
import logging
import sys

import anyio
from mcp.server.mcpserver import MCPServer

HOST = "127.0.0.1"
DEFAULT_PORT = 9201

server = MCPServer("bench-echo", log_level="WARNING")


@server.tool()
async def echo(text: str) -> str:
    """Return ``text`` unchanged."""
    return text


@server.tool()
async def sleep(ms: int) -> str:
    """Wait ``ms`` milliseconds, then say so."""
    await anyio.sleep(ms / 1000)
    return f"slept {ms} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    parser.add_argument("--stdio", action="store_true", help="serve one client over stdin/stdout instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.stdio:
        server.run("stdio")
        return
    server.run("streamable-http", host=HOST, port=args.port, stateless_http=False, json_response=False)


if __name__ == "__main__":
    main()
