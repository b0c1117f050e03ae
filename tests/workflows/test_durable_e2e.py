"""Durable runs over real processes: ``kill -9`` of ``patchbay serve`` mid-run, then a restart.

The upstream (testkit over streamable HTTP, its own process) outlives the gateway and records each
call with its idempotency key: a completed step is never called again, the step in flight at the
kill is called again under the same key, and the run's output equals an uninterrupted run's. A client
re-issuing its call with the same idempotency key gets that run's result, not a second run.
"""

import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext

from tests.support import ROOT, free_port, patchbay, run_gateway, run_http_upstream

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

TESTKIT = ROOT / "tests" / "servers" / "testkit.py"
KEY = "io.patchbay/idempotency-key"


def config(port: int, store: str, workflow: str) -> str:
    return f"""
gateway:
  store: {store}
  resume: auto
servers:
  kit: {{url: "http://127.0.0.1:{port}/mcp"}}
workflows:
{workflow}
"""


CHAIN = """
  five:
    steps:
      - {id: s1, call: kit__step, with: {label: s1, seconds: 0.2}}
      - {id: s2, call: kit__step, with: {label: s2, seconds: 0.2}, after: [s1]}
      - {id: s3, call: kit__step, with: {label: s3, seconds: 0.6}, after: [s2]}
      - {id: s4, call: kit__step, with: {label: s4, seconds: 0.2}, after: [s3]}
      - {id: s5, call: kit__step, with: {label: s5, seconds: 0.2}, after: [s4]}
    output: {done: "${[.steps.s1.result.label, .steps.s2.result.label, .steps.s3.result.label,
      .steps.s4.result.label, .steps.s5.result.label]}"}
"""

FAN_OUT = """
  fan:
    steps:
      - id: each
        for_each: "${[range(6)]}"
        as: n
        concurrency: 6
        steps:
          - {id: x, call: kit__step, with: {label: "x${.n}", seconds: "${if .n < 3 then 0.05 else 1.5 end}"}}
    output: {done: "${[.steps.each.result[].label]}"}
"""

COMPENSATED = """
  undo:
    steps:
      - {id: a, call: kit__step, with: {label: a}, compensate: {call: kit__step, with: {label: undo-a, seconds: 0.2}}}
      - id: b
        call: kit__step
        with: {label: b}
        after: [a]
        compensate: {call: kit__step, with: {label: undo-b, seconds: 1.5}}
      - {id: c, call: kit__step, with: {label: c, fail: true}, after: [b]}
"""

AGENT = """
  research:
    steps:
      - id: look
        agent: {goal: "Run step a, then step b.", tools: ["kit__step"], max_steps: 4}
    output: "${.steps.look.result}"
"""


@asynccontextmanager
async def upstream(tmp_path: Path) -> AsyncIterator[tuple[int, Client]]:
    port = free_port()
    async with run_http_upstream(tmp_path, TESTKIT, port), Client(f"http://127.0.0.1:{port}/mcp") as client:
        yield port, client


async def events(kit: Client) -> list[str]:
    result = await kit.call_tool("events", {})
    assert result.structured_content is not None
    return list(result.structured_content["result"])


async def until(kit: Client, holds: Callable[[list[str]], bool], seconds: float = 30.0) -> list[str]:
    with anyio.fail_after(seconds):
        while not holds(seen := await events(kit)):  # noqa: ASYNC110 - another process, polled
            await anyio.sleep(0.05)
    return seen


async def call_and_crash(
    tmp_path: Path,
    text: str,
    tool: str,
    key: str,
    kit: Client,
    crash_when: Callable[[list[str]], bool],
    settle: float = 0.0,
) -> None:
    """Call ``tool`` with ``key`` through a gateway, and ``kill -9`` the gateway ``settle`` seconds after
    ``crash_when`` holds (time for the answers the upstream sent to reach the gateway's journal)."""
    async with run_gateway(tmp_path, text) as gateway:
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                try:
                    async with Client(gateway.url) as client:
                        await client.call_tool(tool, {}, meta={KEY: key})
                except Exception:  # the gateway is killed under it
                    return
                pytest.fail("the call finished before the gateway was killed")

            tg.start_soon(call)
            await until(kit, crash_when)
            await anyio.sleep(settle)
            gateway.process.process.kill()
            await gateway.process.process.wait()
            tg.cancel_scope.cancel()


async def reissue(url: str, tool: str, key: str) -> Any:
    async with Client(url) as client:
        with anyio.fail_after(30):
            result = await client.call_tool(tool, {}, meta={KEY: key})
    assert not result.is_error, result.content
    return result.structured_content


@pytest.fixture
def store(durable_url: str) -> str:
    """Where the runs are kept: each store that outlives a gateway."""
    return durable_url


async def test_a_run_killed_mid_chain_resumes_after_a_restart_without_repeating_completed_steps(
    tmp_path: Path, store: str
) -> None:
    async with upstream(tmp_path) as (port, kit):
        text = config(port, store, CHAIN)
        await call_and_crash(tmp_path, text, "five", "K1", kit, lambda seen: any("s3 started" in e for e in seen))
        async with run_gateway(tmp_path, text) as gateway:
            seen = await until(kit, lambda seen: any("s5 done" in e for e in seen))
            output = await reissue(gateway.url, "five", "K1")
            after = await events(kit)
    starts = [e for e in seen if " started " in e]
    assert [e.split()[0] for e in starts] == ["s1", "s2", "s3", "s3", "s4", "s5"]
    s3_keys = {e.split()[2] for e in starts if e.startswith("s3")}
    assert len(s3_keys) == 1
    assert s3_keys.pop().endswith(":s3")
    assert output == {"done": ["s1", "s2", "s3", "s4", "s5"]}
    assert after == seen  # the re-issued call got the run's result: nothing was called again


async def test_a_fan_out_killed_mid_way_runs_again_only_its_unfinished_branches(tmp_path: Path, store: str) -> None:
    async with upstream(tmp_path) as (port, kit):
        text = config(port, store, FAN_OUT)

        def three_done_three_going(seen: list[str]) -> bool:
            return sum(" done " in e for e in seen) == 3 and sum(" started " in e for e in seen) == 6

        await call_and_crash(tmp_path, text, "fan", "K2", kit, three_done_three_going, settle=0.3)
        async with run_gateway(tmp_path, text) as gateway:
            seen = await until(kit, lambda seen: sum(" done " in e for e in seen) == 6)
            output = await reissue(gateway.url, "fan", "K2")
    started = sorted(e.split()[0] for e in seen if " started " in e)
    assert started == ["x0", "x1", "x2", "x3", "x3", "x4", "x4", "x5", "x5"]
    for label in ("x3", "x4", "x5"):
        keys = {e.split()[2] for e in seen if e.startswith(f"{label} started")}
        assert len(keys) == 1
        assert keys.pop().endswith(f":each[{label[1]}]/x")
    assert output == {"done": ["x0", "x1", "x2", "x3", "x4", "x5"]}


async def test_a_run_killed_while_compensating_goes_on_with_its_compensations(tmp_path: Path, store: str) -> None:
    async with upstream(tmp_path) as (port, kit):
        text = config(port, store, COMPENSATED)
        await call_and_crash(tmp_path, text, "undo", "K3", kit, lambda seen: any("undo-b started" in e for e in seen))
        async with run_gateway(tmp_path, text) as gateway:
            seen = await until(kit, lambda seen: any("undo-a done" in e for e in seen))
            async with Client(gateway.url) as client:
                result = await client.call_tool("undo", {}, meta={KEY: "K3"})
    labels = [e.split()[0] for e in seen if " started " in e]
    assert labels == ["a", "b", "c", "undo-b", "undo-b", "undo-a"]
    assert result.is_error
    assert "step 'c'" in str(result.content)


async def test_a_crash_loop_never_corrupts_the_journal(tmp_path: Path, store: str) -> None:
    draw = random.Random(10)
    async with upstream(tmp_path) as (port, kit):
        text = config(port, store, CHAIN)
        await call_and_crash(tmp_path, text, "five", "K4", kit, lambda seen: any("s2 started" in e for e in seen))
        for _ in range(3):  # each restart resumes the run; kill it again after a seeded while
            async with run_gateway(tmp_path, text) as gateway:
                await anyio.sleep(draw.uniform(0.1, 0.5))
                gateway.process.process.kill()
                await gateway.process.process.wait()
        async with run_gateway(tmp_path, text) as gateway:
            seen = await until(kit, lambda seen: any("s5 done" in e for e in seen))
            output = await reissue(gateway.url, "five", "K4")
    done = [e.split()[0] for e in seen if " done " in e]
    assert sorted(set(done)) == ["s1", "s2", "s3", "s4", "s5"]
    for label in ("s1", "s2", "s3", "s4", "s5"):  # every try of a step under one key
        assert len({e.split()[2] for e in seen if e.startswith(f"{label} ")}) == 1
    assert output == {"done": ["s1", "s2", "s3", "s4", "s5"]}


async def test_a_run_whose_workflow_changed_is_not_resumed_and_the_reissue_says_why(tmp_path: Path, store: str) -> None:
    async with upstream(tmp_path) as (port, kit):
        await call_and_crash(
            tmp_path, config(port, store, CHAIN), "five", "K5", kit, lambda seen: any("s2 started" in e for e in seen)
        )
        changed = config(port, store, CHAIN.replace("label: s5, seconds: 0.2", "label: s5, seconds: 0.1"))
        async with run_gateway(tmp_path, changed) as gateway, Client(gateway.url) as client:
            result = await client.call_tool("five", {}, meta={KEY: "K5"})
            seen = await events(kit)
    assert result.is_error
    assert "changed since the run started" in str(result.content)
    assert not any(e.startswith(("s3", "s4", "s5")) for e in seen)


async def test_with_resume_manual_an_interrupted_run_waits_for_patchbay_resume(tmp_path: Path, store: str) -> None:
    async with upstream(tmp_path) as (port, kit):
        text = config(port, store, CHAIN).replace("resume: auto", "resume: manual")
        await call_and_crash(tmp_path, text, "five", "K6", kit, lambda seen: any("s2 started" in e for e in seen))
        async with run_gateway(tmp_path, text) as gateway, Client(gateway.url) as client:
            result = await client.call_tool("five", {}, meta={KEY: "K6"})
            await anyio.sleep(0.5)
            seen = await events(kit)
        assert result.is_error
        assert "patchbay resume" in str(result.content)
        assert [e.split()[0] for e in seen] == ["s1", "s1", "s2"]  # s1 done, s2 in flight: nothing since

        listed = await anyio.to_thread.run_sync(patchbay, "runs", str(tmp_path / "gateway.yaml"), "--json")
        [run] = json.loads(listed.stdout)
        assert (run["workflow"], run["status"]) == ("five", "interrupted")
        resumed = await anyio.to_thread.run_sync(patchbay, "resume", str(tmp_path / "gateway.yaml"), run["run"])
        assert resumed.returncode == 0, resumed.stderr
        assert '"s5"' in resumed.stdout
        after = await events(kit)
    assert [e.split()[0] for e in after if " started " in e] == ["s1", "s2", "s2", "s3", "s4", "s5"]
    listed = await anyio.to_thread.run_sync(patchbay, "runs", str(tmp_path / "gateway.yaml"), "--json")
    assert [r["status"] for r in json.loads(listed.stdout)] == ["succeeded"]


async def scripted_model(
    context: ClientRequestContext, params: types.CreateMessageRequestParams
) -> types.CreateMessageResultWithTools:
    """Call kit__step a, then b (5 s, but 50 ms when made again), then answer with what they returned."""
    turn = (len(params.messages) + 1) // 2
    if turn < 3:
        label, seconds = ("a", 0.05) if turn == 1 else ("b", 5.0)
        args = {"label": label, "seconds": seconds, "again": 0.05}
        content: list[Any] = [types.ToolUseContent(type="tool_use", id=f"u{turn}", name="kit__step", input=args)]
    else:
        results = [m.content for m in params.messages if m.role == "user" and isinstance(m.content, list)]
        labels = [json.loads(block.content[0].text)["label"] for blocks in results for block in blocks]  # type: ignore[union-attr]
        content = [types.TextContent(type="text", text=" then ".join(labels))]
    return types.CreateMessageResultWithTools(role="assistant", content=content, model="scripted")


SAMPLING_TOOLS = types.SamplingCapability(tools=types.SamplingToolsCapability())


async def test_an_agent_killed_between_its_tool_calls_resumes_without_repeating_the_first(
    tmp_path: Path, store: str
) -> None:
    async with upstream(tmp_path) as (port, kit):
        text = config(port, store, AGENT)
        async with run_gateway(tmp_path, text) as gateway, anyio.create_task_group() as tg:

            async def call() -> None:
                try:
                    async with Client(
                        gateway.url,
                        mode="legacy",
                        sampling_callback=scripted_model,
                        sampling_capabilities=SAMPLING_TOOLS,
                    ) as client:
                        await client.call_tool("research", {}, meta={KEY: "K7"})
                except Exception:  # the gateway is killed under it
                    return
                pytest.fail("the call finished before the gateway was killed")

            tg.start_soon(call)
            await until(kit, lambda seen: any(e.startswith("b started") for e in seen))
            gateway.process.process.kill()
            await gateway.process.process.wait()
            tg.cancel_scope.cancel()
        async with run_gateway(tmp_path, text) as gateway:
            await until(kit, lambda seen: any(e.startswith("b done") for e in seen))
            # The resumed run's next turn waits for a client: the re-issued call attaches one, which is asked.
            async with Client(
                gateway.url, mode="legacy", sampling_callback=scripted_model, sampling_capabilities=SAMPLING_TOOLS
            ) as client:
                with anyio.fail_after(30):
                    result = await client.call_tool("research", {}, meta={KEY: "K7"})
            seen = await events(kit)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    assert result.structured_content["answer"] == "a then b"
    assert [step["result"]["label"] for step in result.structured_content["steps"]] == ["a", "b"]
    starts = [e for e in seen if " started " in e]
    assert [e.split()[0] for e in starts] == ["a", "b", "b"]  # the first call exactly once; the one in flight again
    [b_key] = {e.split()[2] for e in starts if e.startswith("b ")}
    assert b_key.endswith(":look#call2")
