"""Workflow tools end to end: ``patchbay serve`` as a process, the testkit upstream, real MCP clients."""

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import anyio
import mcp_types as types
import pytest
import yaml
from mcp import Client
from mcp.client.session import ClientRequestContext

from tests.support import PYTHON, ROOT, TESTKIT, patchbay, run_gateway, stdio_server, text, upstream_events

pytestmark = pytest.mark.anyio

ERAS = ["legacy", "2026-07-28"]


def config(workflows: str) -> str:
    return f"servers:\n  kit: {stdio_server(TESTKIT)}\nworkflows:\n{workflows}"


EVERY_KIND = """
  every_kind:
    description: Uses every kind of step.
    input:
      type: object
      properties: {name: {type: string}, items: {type: array, items: {type: integer}}}
      required: [name, items]
    steps:
      - {id: hello, call: kit__echo, with: {text: "hello ${.input.name}"}}
      - id: squares
        for_each: "${.input.items}"
        as: n
        concurrency: 2
        steps: [{id: square, set: {value: "${.n * .n}"}}]
        output: "${.steps.square.result.value}"
      - id: size
        switch:
          - {when: '(.steps.squares.result | add) > 10', steps: [{id: big, set: {size: big}}]}
        default: [{id: small, set: {size: small}}]
      - {id: confirm, ask_user: {message: "Greet ${.input.name}?"}, after: [hello]}
      - {id: guess, ask_model: {prompt: "Name a colour for ${.input.name}", max_tokens: 10}}
      - id: check
        switch:
          - when: .steps.confirm.result.ok | not
            steps: [{id: refuse, fail: "the user said no"}]
    output:
      greeting: "${.steps.hello.result.result}"  # a plain str return is wrapped by the SDK
      squares: "${.steps.squares.result}"
      size: "${.steps.size.result.size}"
      colour: "${.steps.guess.result}"
"""


async def _sampling(
    context: ClientRequestContext, params: types.CreateMessageRequestParams
) -> types.CreateMessageResult:
    asked = params.messages[0].content.text  # type: ignore[union-attr]
    return types.CreateMessageResult(
        role="assistant", content=types.TextContent(type="text", text=f"blue ({asked})"), model="fake"
    )


async def _yes(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"ok": True})


async def _no(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"ok": False})


async def test_a_workflow_is_listed_beside_the_upstream_tools_with_its_input_schema(tmp_path: Path) -> None:
    async with run_gateway(tmp_path, config(EVERY_KIND)) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert "kit__echo" in tools
        workflow = tools["every_kind"]
        assert workflow.description == "Uses every kind of step."
        assert workflow.input_schema["required"] == ["name", "items"]


async def test_invalid_arguments_are_an_error_and_nothing_is_called(tmp_path: Path) -> None:
    async with run_gateway(tmp_path, config(EVERY_KIND)) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        result = await client.call_tool("every_kind", {"name": 5})
        assert result.is_error
        assert "'items' is a required property" in text(result)
        assert "$.name" in text(result)
        assert await upstream_events(client) == []


@pytest.mark.parametrize("mode", ERAS)
async def test_every_kind_of_step_runs_and_the_output_is_the_structured_result(tmp_path: Path, mode: str) -> None:
    async with (
        run_gateway(tmp_path, config(EVERY_KIND)) as gw,
        Client(gw.url, mode=mode, cache=None, sampling_callback=_sampling, elicitation_callback=_yes) as client,
    ):
        # A 2026-07-28 client is asked through the input-required round trip; the SDK answers and retries.
        result = await client.call_tool("every_kind", {"name": "ada", "items": [1, 2, 3]})
        assert not result.is_error, text(result)
        expected = {
            "greeting": "hello ada",
            "squares": [1, 4, 9],
            "size": "big",
            "colour": "blue (Name a colour for ada)",
        }
        assert result.structured_content == expected
        assert json.loads(text(result)) == expected


@pytest.mark.parametrize("mode", ERAS)
async def test_a_fail_step_fails_the_run_with_its_message(tmp_path: Path, mode: str) -> None:
    async with (
        run_gateway(tmp_path, config(EVERY_KIND)) as gw,
        Client(gw.url, mode=mode, cache=None, sampling_callback=_sampling, elicitation_callback=_no) as client,
    ):
        result = await client.call_tool("every_kind", {"name": "ada", "items": []})
        assert result.is_error
        assert "step 'refuse' failed" in text(result)
        assert "the user said no" in text(result)


async def test_ask_steps_use_their_defaults_when_the_client_cannot_answer(tmp_path: Path) -> None:
    workflow = """
  ask:
    steps:
      - {id: ok, ask_user: {message: "Go?", default: {ok: true}}}
      - {id: draft, ask_model: {prompt: "Write", default: "a default draft"}}
    output: {ok: "${.steps.ok.result.ok}", draft: "${.steps.draft.result}"}
"""
    async with run_gateway(tmp_path, config(workflow)) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        result = await client.call_tool("ask", {})
        assert result.structured_content == {"ok": True, "draft": "a default draft"}


async def test_independent_steps_run_in_parallel(tmp_path: Path) -> None:
    four = ", ".join(f"{{id: p{i}, call: kit__record, with: {{label: p{i}, seconds: 0.4}}}}" for i in range(4))
    after = ["", *(f", after: [s{i}]" for i in range(3))]
    chain = ", ".join(
        f"{{id: s{i}, call: kit__record, with: {{label: s{i}, seconds: 0.4}}{after[i]}}}" for i in range(4)
    )
    workflows = f"  parallel:\n    steps: [{four}]\n  sequential:\n    steps: [{chain}]\n"
    async with run_gateway(tmp_path, config(workflows)) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        started = time.perf_counter()
        assert not (await client.call_tool("parallel", {})).is_error
        parallel = time.perf_counter() - started
        started = time.perf_counter()
        assert not (await client.call_tool("sequential", {})).is_error
        sequential = time.perf_counter() - started
        assert parallel < sequential / 2, (parallel, sequential)
        assert (await upstream_events(client))[-4:] == ["s0", "s1", "s2", "s3"]


async def test_a_failing_step_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    workflow = """
  retrying:
    steps:
      - id: f
        call: kit__flaky
        with: {key: f, failures: 2}
        retry: {attempts: 3, backoff: 10ms, "on": [error]}
"""
    async with run_gateway(tmp_path, config(workflow)) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        result = await client.call_tool("retrying", {})
        assert result.structured_content == {"f": {"key": "f", "attempt": 3}}
        assert await upstream_events(client) == ["f attempt 1", "f attempt 2", "f attempt 3"]


async def test_a_steps_retry_covers_the_tools_own_errors_by_default(tmp_path: Path) -> None:
    workflow = """
  retrying:
    steps: [{id: f, call: kit__flaky, with: {key: f, failures: 1}, retry: {attempts: 2, backoff: 10ms}}]
"""
    async with run_gateway(tmp_path, config(workflow)) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        result = await client.call_tool("retrying", {})
        assert result.structured_content == {"f": {"key": "f", "attempt": 2}}


async def test_a_step_refused_by_a_rate_limit_waits_as_told_and_runs_without_retry(tmp_path: Path) -> None:
    workflow = """
  twice:
    steps:
      - {id: a, call: kit__record, with: {label: a}}
      - {id: b, call: kit__record, with: {label: b}}
policies:
  - {tools: kit__record, rate_limit: 4/s, burst: 1}
"""
    async with run_gateway(tmp_path, config(workflow)) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        result = await client.call_tool("twice", {})
        assert not result.is_error, text(result)
        assert sorted((await upstream_events(client))[-2:]) == ["a", "b"]


async def test_a_fallback_stands_in_for_a_failed_step(tmp_path: Path) -> None:
    workflow = """
  falling_back:
    steps:
      - id: primary
        call: kit__fail
        with: {message: primary is down}
        on_error: [{id: backup, call: kit__record, with: {label: "backup after: ${.steps.primary.error.message}"}}]
    output: "${.steps.primary.result.label}"
"""
    async with run_gateway(tmp_path, config(workflow)) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        result = await client.call_tool("falling_back", {})
        assert not result.is_error, text(result)
        assert text(result) == "backup after: Error executing tool fail: primary is down"


async def test_a_step_failing_with_an_on_error_default_succeeds_degraded_and_a_wait_waits(tmp_path: Path) -> None:
    workflow = """
  degrading:
    steps:
      - id: primary
        call: kit__fail
        with: {message: primary is down}
        on_error: {default: {label: "cached, because ${.steps.primary.error.kind}"}}
      - {id: pause, wait: 100ms, after: [primary]}
    output: {label: "${.steps.primary.result.label}", pause: "${.steps.pause.result}"}
"""
    seen: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message)

    async with run_gateway(tmp_path, config(workflow)) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        began = time.monotonic()
        result = await client.call_tool("degrading", {}, progress_callback=on_progress)
        assert not result.is_error, text(result)
        assert time.monotonic() - began >= 0.1
        assert result.structured_content == {"label": "cached, because error", "pause": {"waited": 0.1}}
    assert seen[0] is not None
    assert seen[0].startswith("primary: succeeded (degraded) in ")
    assert "(error: " in seen[0]
    assert seen[1] is not None
    assert seen[1].startswith("pause: succeeded")


async def test_a_failed_run_compensates_completed_steps_in_reverse_order(tmp_path: Path) -> None:
    workflow = """
  compensating:
    steps:
      - {id: a, call: kit__record, with: {label: a}, compensate: {call: kit__record, with: {label: "undo a"}}}
      - {id: b, call: kit__record, with: {label: b}, after: [a],
         compensate: {call: kit__record, with: {label: "undo ${.steps.b.result.label}"}}}
      - {id: c, call: kit__record, with: {label: c, fail: true}, after: [b]}
"""
    async with run_gateway(tmp_path, config(workflow)) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        result = await client.call_tool("compensating", {})
        assert result.is_error
        assert "step 'c' failed" in text(result)
        assert "c failed as asked" in text(result)
        assert await upstream_events(client) == ["a", "b", "c failed", "undo b", "undo a"]


async def test_cancelling_the_call_cancels_in_flight_steps_and_compensates(tmp_path: Path) -> None:
    workflow = """
  long:
    steps:
      - {id: a, call: kit__record, with: {label: a}, compensate: {call: kit__record, with: {label: "undo a"}}}
      - {id: slow, call: kit__record, with: {label: slow, seconds: 30}, after: [a]}
"""
    async with run_gateway(tmp_path, config(workflow)) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        await client.list_tools()
        with anyio.move_on_after(1.5):
            await client.call_tool("long", {})
        with anyio.fail_after(15):
            while "undo a" not in (seen := await upstream_events(client)):  # noqa: ASYNC110 - the state is in another process
                await anyio.sleep(0.1)
        assert seen == ["a", "slow cancelled", "undo a"]


async def test_progress_is_reported_per_settled_step(tmp_path: Path) -> None:
    workflow = """
  two:
    steps: [{id: a, call: kit__echo, with: {text: x}}, {id: b, set: {y: 1}, after: [a]}]
"""
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async with run_gateway(tmp_path, config(workflow)) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        await client.list_tools()
        result = await client.call_tool("two", {}, progress_callback=on_progress)
        assert not result.is_error
        assert [p for p, _ in seen] == [1, 2]
        assert seen[0][1] is not None
        assert seen[0][1].startswith("a: succeeded")


async def test_a_workflow_can_call_another_workflow(tmp_path: Path) -> None:
    workflows = """
  inner:
    input: {type: object, properties: {x: {type: integer}}, required: [x]}
    steps: [{id: double, set: {v: "${.input.x * 2}"}}]
    output: "${.steps.double.result}"
  outer:
    steps: [{id: call_inner, call: inner, with: {x: 21}}]
    output: "${.steps.call_inner.result.v}"
"""
    async with run_gateway(tmp_path, config(workflows)) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        result = await client.call_tool("outer", {})
        assert text(result) == "42"


def test_check_reports_calls_that_cannot_work_against_the_live_schemas(tmp_path: Path) -> None:
    workflow = """
  broken:
    steps:
      - {id: a, call: kit__nope}
      - {id: b, call: kit__echo, with: {txt: hi}}
      - {id: c, call: kit__record, with: {label: x, seconds: "soon"}}
"""
    path = tmp_path / "broken.yaml"
    path.write_text(config(workflow))
    done = patchbay("check", str(path))
    assert done.returncode == 1
    assert "workflows.broken.steps[0].call (line 7)" in done.stderr
    assert "'kit__nope', which is not a tool this gateway serves" in done.stderr
    assert "workflows.broken.steps[1].with" in done.stderr
    assert "missing required argument 'text'" in done.stderr
    assert "workflows.broken.steps[2].with.seconds (line 9)" in done.stderr


CLASH = "workflows:\n  echo:\n    steps: [{id: a, set: {x: 1}}]\n"


def test_check_refuses_a_workflow_named_like_a_tool(tmp_path: Path) -> None:
    path = tmp_path / "clash.yaml"
    other = f"{{command: [{PYTHON}, {TESTKIT}], prefix: ''}}"
    path.write_text(f"servers:\n  kit: {stdio_server(TESTKIT)}\n  other: {other}\n" + CLASH)
    done = patchbay("check", str(path))
    assert done.returncode == 1
    assert "'echo' is already taken by a workflow" in done.stderr


def test_graph_prints_the_workflow_as_mermaid() -> None:
    done = patchbay("graph", "examples/quickstart.yaml", "support_reply")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "flowchart TD"
    assert '    route -->|"case 0"| refund' in lines
    unknown = patchbay("graph", "examples/quickstart.yaml", "nope")
    assert unknown.returncode == 2
    assert "support_reply" in unknown.stderr


def test_the_quickstart_export_workflow_polls_the_orders_server_until_the_job_is_done() -> None:
    # Exactly the workflow of examples/quickstart.yaml, whose steps the README shows, against the real orders server.
    readme = (ROOT / "README.md").read_text().split("* **`loop`**", 1)[1]
    snippet = textwrap.dedent(readme.split("```yaml\n", 1)[1].split("```", 1)[0])
    quickstart = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    assert yaml.safe_load(snippet)["steps"] == quickstart["workflows"]["export_batch"]["steps"]
    env = dict(os.environ, PYTHON=sys.executable)
    done = patchbay("call", "examples/quickstart.yaml", "export_batch", "--args", '{"batch": 3}', env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"job_id": "E-1", "exported": 3, "polls": 3}  # queued, running, done
    assert "poll: iteration 2 of at most 10, the condition does not hold yet" in done.stderr
    assert "poll: iteration 3 of at most 10, the condition holds" in done.stderr
    assert "poll[3]/status: succeeded" in done.stderr
