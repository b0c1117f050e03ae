"""A stdio MCP server that outlives its stdin and ignores SIGTERM: only SIGKILL stops it.

Its one tool, ``whoami``, returns its process id, for a test to check that the process is gone.
"""

import os
import signal
import time

from mcp.server.mcpserver import MCPServer

mcp = MCPServer("stubborn")


@mcp.tool()
def whoami() -> dict[str, int]:
    """This process's id."""
    return {"pid": os.getpid()}


def main() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    mcp.run()  # returns when stdin ends
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
