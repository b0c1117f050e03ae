"""FastMCP's proxy in front of the benchmark's upstream, for comparison with Patchbay.

The proxy is given a ``fastmcp.Client`` that is already connected, so
``create_proxy`` reuses that one upstream session for every request (a
disconnected client, a URL or a connected ``ProxyClient`` would make it open a
fresh upstream session per request instead). It serves streamable HTTP on
127.0.0.1 with stateful sessions, like the gateway::

    .venv/bin/python bench/fastmcp_proxy.py --upstream http://127.0.0.1:9201/mcp --port 9203
"""

import argparse
import logging
import sys

import anyio
from fastmcp import Client
from fastmcp.server import create_proxy

HOST = "127.0.0.1"


async def serve(upstream: str, port: int) -> None:
    # mode="legacy": the same handshake-era session the gateway keeps upstream.
    client = Client(upstream, mode="legacy", timeout=30)
    async with client:
        if not client.is_connected():
            raise RuntimeError(f"could not connect to {upstream}")
        proxy = create_proxy(client, name="fastmcp-proxy")
        await proxy.run_http_async(
            show_banner=False,
            transport="http",
            host=HOST,
            port=port,
            log_level="warning",
            stateless_http=False,
            json_response=False,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the upstream's streamable-HTTP URL")
    parser.add_argument("--port", type=int, required=True, help="HTTP port to serve on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    anyio.run(serve, args.upstream, args.port)


if __name__ == "__main__":
    main()
