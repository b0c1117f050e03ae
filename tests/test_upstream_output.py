"""What the user sees of the upstreams through ``patchbay``: a stdio server's stderr only as log lines of its own,
never on stdout; its crash with its last lines; connects, calls and workflow steps at the levels asked for. And
the stderr pipes cost no descriptor or thread once the gateway is closed."""

import contextlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.config import parse_config
from gateway.gateway import open_gateway
from gateway.types import CallContext, Principal
from tests.support import PYTHON, ROOT, TESTKIT, patchbay

CRASHING = {"TESTKIT_STDERR": "Traceback (most recent call last):|KeyError: 'DATABASE_URL'", "TESTKIT_CRASH": "2"}


def config(tmp_path: Path, env: dict[str, str] | None = None, extra: str = "") -> str:
    env_part = "".join(f"\n      {key}: {value!r}" for key, value in (env or {}).items())
    text = f"servers:\n  kit:\n    command: [{PYTHON}, {TESTKIT}]\n    env:{env_part or ' {}'}\n{extra}"
    path = tmp_path / "patchbay.yaml"
    path.write_text(text)
    return str(path)


def test_a_stdio_servers_stderr_reaches_neither_stdout_nor_the_default_output(tmp_path: Path) -> None:
    path = config(tmp_path, {"TESTKIT_STDERR": "starting up, noisily"})

    done = patchbay("call", path, "kit__say", "--args", '{"text": "said to stderr"}')

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"result": "said"}  # as a workflow step sees it
    assert "noisily" not in done.stderr
    assert "said to stderr" not in done.stderr  # INFO lines: not at the default level


def test_with_log_level_info_the_stderr_lines_are_logged_prefixed_and_the_connect_too(tmp_path: Path) -> None:
    path = config(tmp_path, {"TESTKIT_STDERR": "starting up, noisily"})

    done = patchbay("--log-level", "info", "call", path, "kit__say", "--args", '{"text": "said to stderr"}')

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"result": "said"}  # as a workflow step sees it
    lines = done.stderr.splitlines()
    assert any(line.endswith("INFO patchbay.upstream.kit: kit | starting up, noisily") for line in lines)
    assert any(line.endswith("INFO patchbay.upstream.kit: kit | said to stderr") for line in lines)
    carrying = [line for line in lines if "noisily" in line or "said to stderr" in line]
    assert len(carrying) == 2
    assert all("INFO patchbay.upstream.kit: kit | " in line for line in carrying)  # never unprefixed
    (connect,) = [line for line in lines if "upstream kit: connected" in line]
    assert re.search(r"INFO connectors\.mcp: upstream kit: connected over stdio, protocol [-0-9]+; \d+ tools", connect)
    assert "DEBUG" not in done.stderr


def test_a_stdio_server_that_crashes_at_start_shows_its_last_lines_at_the_default_level(tmp_path: Path) -> None:
    path = config(tmp_path, CRASHING)

    done = patchbay("call", path, "kit__say", "--args", '{"text": "x"}')

    assert done.returncode != 0
    assert "DATABASE_URL" not in done.stdout
    lines = done.stderr.splitlines()
    failed = next(i for i, line in enumerate(lines) if "WARNING connectors.mcp: upstream kit: " in line)
    assert "retrying in" in lines[failed]
    assert lines[failed + 1].endswith("WARNING patchbay.upstream.kit: kit | Traceback (most recent call last):")
    assert lines[failed + 2].endswith("WARNING patchbay.upstream.kit: kit | KeyError: 'DATABASE_URL'")


WORKFLOW = """\
workflows:
  hello:
    input: {type: object, properties: {text: {type: string}}}
    steps: [{id: speak, call: kit__say, with: {text: "${.input.text}"}}]
    output: {said: "${.steps.speak.result}"}
"""


def test_with_log_level_debug_each_call_and_each_workflow_step_is_logged(tmp_path: Path) -> None:
    path = config(tmp_path, extra=WORKFLOW)

    done = patchbay("--log-level", "debug", "call", path, "hello", "--args", '{"text": "hi"}')

    assert done.returncode == 0, done.stderr
    assert '"said"' in done.stdout
    calls = re.findall(r"DEBUG gateway\.dispatch: call (\S+) → (\S+): (\w+) in [0-9.]+ms", done.stderr)
    assert calls == [("kit__say", "kit/say", "ok"), ("hello", "@workflows/hello", "ok")]
    steps = re.findall(
        r"DEBUG gateway\.workflows\.runner: workflow hello run ([0-9a-f]+): step (\S+) attempt (\d+): (\w+) in ",
        done.stderr,
    )
    assert [step[1:] for step in steps] == [("speak", "1", "ok")]


def usage() -> tuple[int, int]:
    """This process's open descriptors and threads."""
    return len(os.listdir("/proc/self/fd")), threading.active_count()


@pytest.mark.anyio
async def test_opening_and_closing_a_gateway_with_stdio_upstreams_leaks_no_descriptor_or_thread(
    tmp_path: Path,
) -> None:
    crashing = ", ".join(f"{key}: {value!r}" for key, value in CRASHING.items())
    text = (
        f"servers:\n  kit: {{command: [{PYTHON}, {TESTKIT}], env: {{TESTKIT_STDERR: noisy}}}}\n"
        f"  broken: {{command: [{PYTHON}, {TESTKIT}], env: {{{crashing}}}}}\n"
    )
    cfg = parse_config(text, environ={})
    context = CallContext(principal=Principal("ada"))

    async def open_and_close() -> None:
        with anyio.fail_after(60):
            async with open_gateway(cfg) as gateway:
                result = await gateway.dispatcher.call("kit__say", {"text": "hello"}, context)
                assert not result.is_error

    await open_and_close()  # first use: whatever is opened once per process (imports, the loop's own)
    before = usage()
    for _ in range(3):
        await open_and_close()
    assert usage() == before


@pytest.mark.anyio
async def test_serve_stdio_keeps_stdout_to_mcp_messages_and_logs_the_servers_stderr_to_stderr(tmp_path: Path) -> None:
    path = config(tmp_path, {"TESTKIT_STDERR": "starting up, noisily"})
    argv = [PYTHON, "-m", "gateway", "--log-level", "info", "serve", path, "--stdio"]
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        process = await anyio.open_process(argv, cwd=ROOT, stderr=err)
    async with process:
        assert process.stdin is not None
        assert process.stdout is not None

        async def send(message: dict[str, Any]) -> None:
            assert process.stdin is not None
            await process.stdin.send(json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n")

        with anyio.fail_after(60):
            init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
            await send({"id": 0, "method": "initialize", "params": init})
            await send({"method": "notifications/initialized"})
            say = {"name": "kit__say", "arguments": {"text": "said to stderr"}}
            await send({"id": 1, "method": "tools/call", "params": say})
            out = b""
            while b'"id":1' not in out.replace(b" ", b""):
                out += await process.stdout.receive()
            await process.stdin.aclose()  # the client goes: the gateway ends
            with contextlib.suppress(anyio.EndOfStream):
                while True:  # to its end: all the gateway wrote on stdout
                    out += await process.stdout.receive()
            await process.wait()
    messages = [json.loads(line) for line in out.decode().splitlines()]  # nothing but JSON-RPC on stdout
    answers = {m["id"]: m for m in messages if "id" in m}
    assert sorted(answers) == [0, 1]
    assert answers[1]["result"]["structuredContent"] == {"result": "said"}
    stderr = log.read_text()
    assert "kit | starting up, noisily" in stderr
    assert "kit | said to stderr" in stderr
