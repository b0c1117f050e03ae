"""A workflow's ``input`` defaults: filled into omitted arguments before the run, checked when the config loads."""

import copy
import json
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest
import yaml

from gateway.config import parse_config
from gateway.dispatch import Invocation
from gateway.errors import ConfigError
from gateway.store.memory import MemoryStore
from gateway.types import CallContext, JSONObject, Principal, ToolResult
from gateway.workflows.defaults import check_defaults, with_defaults
from gateway.workflows.model import Workflow
from gateway.workflows.plan import compile_workflow
from gateway.workflows.provider import WorkflowProvider
from gateway.workflows.runner import Runner
from tests.support import TESTKIT, patchbay, stdio_server

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "query": {"type": "string"},
        "limit": {"type": "integer", "default": 10},
        "tags": {"type": "array", "default": ["new"]},
        "paging": {
            "type": "object",
            "default": {},
            "properties": {"size": {"type": "integer", "default": 20}, "page": {"type": "integer", "default": 1}},
        },
        "filter": {"type": "object", "properties": {"status": {"type": "string", "default": "open"}}},
    },
}


def test_omitted_arguments_take_their_defaults_and_given_ones_are_kept() -> None:
    filled = with_defaults(SCHEMA, {"query": "refund", "limit": 3})

    assert filled == {"query": "refund", "limit": 3, "tags": ["new"], "paging": {"size": 20, "page": 1}}


def test_an_explicit_null_is_an_argument_not_an_omission() -> None:
    assert with_defaults(SCHEMA, {"limit": None})["limit"] is None


def test_nested_defaults_fill_an_object_that_is_given_or_defaulted_but_never_create_one() -> None:
    filled = with_defaults(SCHEMA, {"paging": {"page": 4}, "filter": {}})

    assert filled["paging"] == {"size": 20, "page": 4}
    assert filled["filter"] == {"status": "open"}
    assert "filter" not in with_defaults(SCHEMA, {})


def test_the_callers_arguments_and_the_schema_are_never_changed() -> None:
    schema = copy.deepcopy(SCHEMA)
    arguments = {"paging": {"page": 2}}

    filled = with_defaults(schema, arguments)
    filled["tags"].append("mine")
    filled["paging"]["size"] = 0

    assert arguments == {"paging": {"page": 2}}
    assert schema == SCHEMA
    assert with_defaults(schema, {})["tags"] == ["new"]


def test_a_default_its_own_schema_rejects_is_a_problem_at_its_path() -> None:
    schema = {
        "type": "object",
        "$defs": {"size": {"type": "integer", "minimum": 1}},
        "properties": {
            "limit": {"type": "integer", "default": "ten"},
            "ok": {"type": "string", "default": "fine"},
            "paging": {"type": "object", "properties": {"size": {"$ref": "#/$defs/size", "default": 0}}},
        },
    }

    problems = check_defaults(schema, "workflows.w.input")

    assert [p.path for p in problems] == [
        "workflows.w.input.properties.limit.default",
        "workflows.w.input.properties.paging.properties.size.default",
    ]
    assert "'ten' is not of type 'integer'" in problems[0].message
    assert "minimum" in problems[1].message  # the $ref resolved against the whole schema


def test_loading_a_config_reports_a_bad_default_with_its_line() -> None:
    text = """\
        workflows:
          w:
            input:
              type: object
              properties:
                limit: {type: integer, minimum: 1, default: 0}
            steps: [{id: a, set: {n: "${.input.limit}"}}]
        """
    with pytest.raises(ConfigError) as caught:
        parse_config(dedent(text), environ={})

    (problem,) = caught.value.problems
    assert (problem.path, problem.line) == ("workflows.w.input.properties.limit.default", 6)


class Recorder:
    """The call function behind the runner: records each call's arguments, answers with them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, tool: str, arguments: JSONObject, context: CallContext) -> Invocation:
        self.calls.append((tool, dict(arguments)))
        return Invocation(ToolResult.text(json.dumps(dict(arguments))), "ok")


WORKFLOW = """
input:
  type: object
  properties:
    query: {type: string}
    limit: {type: integer, default: 10}
    paging: {type: object, default: {}, properties: {size: {type: integer, default: 20}}}
  required: [query]
steps:
  - id: search
    call: kb__search
    with: {query: "${.input.query}", limit: "${.input.limit}", size: "${.input.paging.size}"}
"""


@pytest.mark.anyio
async def test_an_omitted_argument_reaches_the_steps_call_with_its_default() -> None:
    plan, problems = compile_workflow("w", Workflow.model_validate(yaml.safe_load(WORKFLOW)))
    assert problems == []
    tools = Recorder()
    provider = WorkflowProvider({"w": plan}, Runner(tools, MemoryStore()))
    arguments = {"query": "refund"}

    result = await provider.call_tool("w", arguments, CallContext(principal=Principal("tester")))

    assert not result.is_error, result.content
    assert tools.calls == [("kb__search", {"query": "refund", "limit": 10, "size": 20})]
    assert arguments == {"query": "refund"}
    [tool] = await provider.list_tools()
    assert "default" in tool.input_schema["properties"]["limit"]  # clients see the defaults too


def test_patchbay_call_applies_the_default_end_to_end(tmp_path: Path) -> None:
    config = tmp_path / "patchbay.yaml"
    config.write_text(
        f"servers:\n  kit: {stdio_server(TESTKIT)}\n"
        "workflows:\n"
        "  greet:\n"
        "    input: {type: object, properties: {greeting: {type: string, default: hello}}}\n"
        '    steps: [{id: say, call: kit__echo, with: {text: "${.input.greeting}, world"}}]\n'
        '    output: {said: "${.steps.say.result.result}"}\n'
    )

    done = patchbay("call", str(config), "greet")

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"said": "hello, world"}
