"""Patchbay demo: one MCP gateway in front of two example servers and a REST service, seen through an MCP client.

Starts the knowledge base (examples/servers/kb.py, streamable HTTP), the billing service
(examples/servers/billing.py, REST with an OpenAPI document) and
`patchbay serve examples/quickstart.yaml` (which runs examples/servers/orders.py over stdio),
then talks to the gateway the way an assistant would: it lists the merged tools, calls a few,
watches progress arrive, runs the `support_reply` workflow and shows an error result. All three
subprocesses are stopped at the end.

    .venv/bin/python examples/demo.py        # or: make demo
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
from mcp import Client

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "examples/quickstart.yaml"
BIN = Path(sys.executable).absolute().parent  # .venv/bin when run as .venv/bin/python
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 10.0  # seconds each subprocess gets to become ready
SESSION_TIMEOUT = 20.0  # seconds the whole client session may take
WIDTH = 78  # separator lines; tool descriptions may run to 100 columns


class DemoError(Exception):
    """Something the demo needs did not work; the message says what."""


# --- output -------------------------------------------------------------------------------------


def section(title: str) -> None:
    print(f"\n── {title} " + "─" * max(3, WIDTH - len(title) - 4))


def step(label: str, detail: str = "") -> None:
    print(f"{label:<28}{detail}", flush=True)


def clip(text: str, limit: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def to_json(value: Any, levels: int) -> str:
    """JSON with the outer `levels` of objects one key per line and everything deeper on one line."""
    if levels == 0 or not isinstance(value, dict) or not value:
        return json.dumps(value)
    items = [f"{json.dumps(key)}: {to_json(item, levels - 1)}" for key, item in value.items()]
    return "{\n" + textwrap.indent(",\n".join(items), "  ") + "\n}"


# --- subprocesses -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Service:
    """A subprocess whose stderr goes to a log file, so a failure can show what it said."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise DemoError(f"{self.name} exited with status {self.proc.returncode}\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        return textwrap.indent("\n".join(text) or "(no output)", f"  {self.name} | ")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until(service: Service, ready: Any, what: str) -> float:
    """Poll `ready()` until it is true; return the seconds it took, or raise after STARTUP_TIMEOUT."""
    started = time.monotonic()
    while not ready():
        service.check_alive()
        if time.monotonic() - started > STARTUP_TIMEOUT:
            raise DemoError(f"{what} not ready after {STARTUP_TIMEOUT:.0f} s\n{service.tail()}")
        time.sleep(0.1)
    return time.monotonic() - started


def port_open(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
    except (OSError, ValueError):
        return 0, None


# --- the MCP session ----------------------------------------------------------------------------


def text_of(result: Any) -> str:
    return "\n".join(item.text for item in result.content if getattr(item, "type", "") == "text")


async def show_tools(client: Client) -> None:
    tools = (await client.list_tools()).tools
    section(f"What the assistant sees: {len(tools)} tools")
    servers: dict[str, list[Any]] = {}
    for tool in tools:
        server = tool.name.split("__", 1)[0] if "__" in tool.name else "workflows (run by the gateway)"
        servers.setdefault(server, []).append(tool)
    width = max(len(tool.name) for tool in tools)
    for server, group in servers.items():
        print(f"{server}")
        for tool in group:
            print(f"  {tool.name:<{width}}  {clip(tool.description or '', 100 - width - 4)}")


async def call(client: Client, name: str, args: dict[str, Any], **kwargs: Any) -> Any:
    section(f"{name} {json.dumps(args)}")
    result = await client.call_tool(name, args, **kwargs)
    if result.is_error:
        raise DemoError(f"{name} failed: {text_of(result)}")
    return result.structured_content or json.loads(text_of(result))


async def show_order(client: Client) -> None:
    order = await call(client, "orders__get_order", {"order_id": "A-1002"})
    print(f"{order['id']}  {order['customer']}  {order['status']}  ${order['total']:.2f}  placed {order['placed_at']}")
    for item in order["items"]:
        print(f"  {item['qty']} × {item['name']:<16} ${item['price']:>7.2f}")


async def show_search(client: Client) -> None:
    found = await call(client, "kb__search", {"query": "how long does a refund take", "limit": 2})
    for hit in found["results"]:
        print(f"{hit['id']}  {hit['title']}  (score {hit['score']:g})")
        print(f"  {clip(hit['snippet'], WIDTH - 2)}")


async def show_progress(client: Client) -> None:
    started = time.monotonic()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        elapsed = (time.monotonic() - started) * 1000
        print(f"  progress {progress:g}/{total:g}  {message or '':<18} +{elapsed:.0f} ms")

    done = await call(client, "orders__export_orders", {"batch": 5}, progress_callback=on_progress)
    print(f"result: exported {done['exported']} orders ({', '.join(done['order_ids'])})")


async def show_workflow(client: Client) -> None:
    """The workflow tool: one call, several upstream calls planned and run by the gateway."""
    started = time.monotonic()

    async def on_step(progress: float, total: float | None, message: str | None) -> None:
        elapsed = (time.monotonic() - started) * 1000
        print(f"  step {progress:g}  {message or '':<52} +{elapsed:.0f} ms")

    args = {"order_id": "A-1003", "question": "how long does a refund take?"}
    done = await call(client, "support_reply", args, progress_callback=on_step)
    print(f"result: {to_json(done, levels=1)}")
    print("(order and docs ran in parallel; the failed order was refunded through the billing REST API;")
    print(" no sampling here, so the draft step fell back to the template reply)")


async def show_error(client: Client) -> None:
    name, args = "orders__get_order", {"order_id": "Z-9999"}
    section(f"{name} {json.dumps(args)}  (an unknown order)")
    result = await client.call_tool(name, args)
    if not result.is_error:
        raise DemoError(f"{name} for an unknown order did not return an error result")
    content = [item.model_dump(mode="json", by_alias=True, exclude_none=True) for item in result.content]
    print(f"isError: true\ncontent: {json.dumps(content)}")
    print("(not an exception: the model reads the text and can recover, e.g. ask for the right id)")


async def show_policy(client: Client) -> None:
    name, args = "orders__export_orders", {"batch": 50}
    section(f"{name} {json.dumps(args)}  (over the quick-start's policy limit)")
    result = await client.call_tool(name, args)
    if not result.is_error:
        raise DemoError(f"{name} with batch 50 was not refused by the policy")
    print(f"isError: true\n{text_of(result)}")
    print("(refused by the gateway's policy before the orders server saw it)")


def show_metrics(base: str) -> None:
    section("GET /metrics  (patchbay_tool_calls_total)")
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    calls = [line for line in lines if line.startswith("patchbay_tool_calls_total{")]
    if not calls:
        raise DemoError("/metrics has no patchbay_tool_calls_total")
    print("\n".join(calls))


async def session(url: str) -> None:
    with anyio.fail_after(SESSION_TIMEOUT):
        async with Client(url) as client:
            info = client.server_info
            step("connected to the gateway:", f"{info.name if info else '?'}, MCP {client.protocol_version}")
            await show_tools(client)
            await show_order(client)
            await show_search(client)
            await show_progress(client)
            await show_workflow(client)
            await show_error(client)
            await show_policy(client)


def run_session(base: str, gateway: Service) -> None:
    """Run the client session; turn whatever it raises into one clear DemoError."""
    try:
        anyio.run(session, f"{base}/mcp")
    except Exception as exc:
        cause: BaseException = exc
        while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:  # unwrap task groups
            cause = cause.exceptions[0]
        if isinstance(cause, DemoError):
            raise cause from None
        if isinstance(cause, TimeoutError):
            raise DemoError(f"the MCP session took longer than {SESSION_TIMEOUT:g} s") from None
        raise DemoError(f"MCP session failed: {type(cause).__name__}: {cause}\n{gateway.tail()}") from None


# --- the demo -----------------------------------------------------------------------------------


def start_services(log_dir: Path, services: list[Service]) -> str:
    """Start kb, billing and the gateway (appending each to `services`); return the gateway's base URL."""
    kb_port, billing_port, gateway_port = free_port(), free_port(), free_port()
    step("starting knowledge base…", f"examples/servers/kb.py on http://{HOST}:{kb_port}/mcp")
    kb = Service("kb", [sys.executable, "examples/servers/kb.py", "--port", str(kb_port)], dict(os.environ), log_dir)
    services.append(kb)
    step("starting billing…", f"examples/servers/billing.py (REST) on http://{HOST}:{billing_port}")
    billing_argv = [sys.executable, "examples/servers/billing.py", "--port", str(billing_port)]
    billing = Service("billing", billing_argv, dict(os.environ), log_dir)
    services.append(billing)
    wait_until(kb, lambda: port_open(kb_port), "the knowledge base")
    wait_until(billing, lambda: port_open(billing_port), "the billing service")

    step("starting patchbay…", f"patchbay serve {CONFIG} --port {gateway_port}  (orders over stdio)")
    env = dict(os.environ, KB_PORT=str(kb_port), BILLING_PORT=str(billing_port), PYTHON=sys.executable)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    patchbay = [str(BIN / "patchbay")] if (BIN / "patchbay").exists() else [sys.executable, "-m", "gateway"]
    gateway = Service("patchbay", [*patchbay, "serve", CONFIG, "--port", str(gateway_port)], env, log_dir)
    services.append(gateway)
    base = f"http://{HOST}:{gateway_port}"
    took = wait_until(gateway, lambda: get_json(f"{base}/readyz")[0] == 200, "patchbay")
    step("waiting for /readyz…", f"200 after {took:.1f} s")
    return base


def show_readyz(base: str) -> None:
    section("GET /readyz")
    status, body = get_json(f"{base}/readyz")
    print(f"HTTP {status}")
    print(to_json(body, levels=2))


def show_connect() -> None:
    section("Connect your assistant")
    desktop = {
        "mcpServers": {
            "patchbay": {
                "command": str(BIN / "patchbay"),
                "args": ["serve", str(ROOT / CONFIG), "--stdio"],
                "env": {"PYTHON": sys.executable},
            }
        }
    }
    print("Claude Desktop (claude_desktop_config.json), gateway over stdio:")
    print(textwrap.indent(to_json(desktop, levels=3), "  "))
    print("  The gateway connects to kb and billing over HTTP, so start them first and keep them running:")
    print(f"    {BIN / 'python'} {ROOT / 'examples/servers/kb.py'}")
    print(f"    {BIN / 'python'} {ROOT / 'examples/servers/billing.py'}")
    print("Streamable HTTP (any client): with the venv active and kb and billing running,")
    print(f"  patchbay serve {CONFIG}       # then connect to http://{HOST}:8765/mcp")
    print("MCP Inspector (Node 22+), against that HTTP gateway:")
    print(f"  npx @modelcontextprotocol/inspector --cli http://{HOST}:8765/mcp --method tools/list")
    print(f"  npx @modelcontextprotocol/inspector              # UI: connect to http://{HOST}:8765/mcp")


def main() -> int:
    print("Patchbay demo: one MCP gateway, two MCP servers (orders over stdio, kb over HTTP) and a REST service\n")
    services: list[Service] = []
    try:
        with tempfile.TemporaryDirectory(prefix="patchbay-demo-") as logs:
            try:
                base = start_services(Path(logs), services)
                run_session(base, services[-1])
                show_readyz(base)
                show_metrics(base)
                show_connect()
            finally:
                for service in reversed(services):
                    service.stop()
    except DemoError as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        return 130
    print("\nDemo finished: the gateway and the example services stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
