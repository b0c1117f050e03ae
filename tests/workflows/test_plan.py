"""Compiling workflows: a table of invalid ones and what loading the config says about each."""

from textwrap import dedent

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.workflows.plan import check_tools

INVALID = {
    "jq that does not compile": (
        "w:\n  steps: [{id: a, set: {x: '${.input | nosuch}'}}]",
        [("workflows.w.steps[0].set.x", 2, "nosuch/0 is not defined")],
    ),
    "an unclosed template": (
        "w:\n  steps: [{id: a, call: t, with: {x: '${.input'}}]",
        [("workflows.w.steps[0].with.x", 2, "without a matching")],
    ),
    "a condition that does not compile": (
        "w:\n  steps:\n    - {id: s, switch: [{when: '.a ==', steps: [{id: x, set: {}}]}]}",
        [("workflows.w.steps[0].switch[0].when", 3, "invalid jq")],
    ),
    "a cycle": (
        "w:\n  steps:\n    - {id: a, set: {x: '${.steps.b.result}'}}\n    - {id: b, set: {x: '${.steps.a.result}'}}",
        [("workflows.w.steps[0]", 3, "steps form a cycle: a → b → a")],
    ),
    "an unknown step in after": (
        "w:\n  steps:\n    - {id: a, set: {}, after: [ghost]}",
        [("workflows.w.steps[0].after[0]", 3, "unknown step 'ghost'")],
    ),
    "a duplicate id": (
        "w:\n  steps:\n    - {id: a, set: {}}\n    - {id: a, set: {}}",
        [("workflows.w.steps[1].id", 4, "duplicate step id 'a'")],
    ),
    "an output naming an unknown step": (
        "w:\n  steps: [{id: a, set: {}}]\n  output: '${.steps.b.result}'",
        [("workflows.w.output", 3, "unknown step 'b'")],
    ),
    "a compensation naming an unknown step": (
        "w:\n  steps: [{id: a, call: t, compensate: {call: u, with: {x: '${.steps.zz.result}'}}}]",
        [("workflows.w.steps[0].compensate.with", 2, "unknown step 'zz'")],
    ),
    "a compensated step that is not a call": (
        "w:\n  steps: [{id: a, set: {}, compensate: {call: u}}]",
        [("workflows.w.steps[0].compensate", 2, "only call steps can be compensated")],
    ),
    "a workflow calling itself through another": (
        "w:\n  steps: [{id: a, call: v}]\nv:\n  steps: [{id: b, call: w}]",
        [
            ("workflows.w.steps[0].call", 2, "workflow calls itself: w → v → w"),
            ("workflows.v.steps[0].call", 4, "workflow calls itself: v → w → v"),
        ],
    ),
    "a workflow calling itself in its compensation": (
        "w:\n  steps: [{id: a, call: t, compensate: {call: w}}]",
        [("workflows.w.steps[0].compensate.call", 2, "workflow calls itself: w → w")],
    ),
    "a reference into a loop body": (
        "w:\n  steps:\n    - {id: l, for_each: '${[1]}', steps: [{id: x, set: {}}]}\n"
        "    - {id: y, set: {v: '${.steps.x.result}'}}",
        [("workflows.w.steps[1]", 4, "refer to 'l', the list of its iterations' outputs, instead")],
    ),
    "a loop condition that does not compile": (
        "w:\n  steps:\n    - id: p\n      loop: {steps: [{id: x, set: {}}], until: '.x ==', max_iterations: 2}",
        [("workflows.w.steps[0].loop.until", 4, "invalid jq")],
    ),
    "a loop output naming an unknown step": (
        "w:\n  steps:\n    - id: p\n      loop: {steps: [{id: x, set: {}}], until: .x, max_iterations: 2, "
        "output: '${.steps.y.result}'}",
        [("workflows.w.steps[0]", 3, "unknown step 'y'")],
    ),
    "a reference into a loop's body": (
        "w:\n  steps:\n    - {id: p, loop: {steps: [{id: x, set: {}}], until: .x, max_iterations: 2}}\n"
        "    - {id: y, set: {v: '${.steps.x.result}'}}",
        [("workflows.w.steps[1]", 4, "refer to 'p', its last iteration's output, instead")],
    ),
    "a name with dots is located too": (
        "acme.reply:\n  steps: [{id: a, set: {x: '${.input | nosuch}'}}]",
        [("workflows.acme.reply.steps[0].set.x", 2, "nosuch/0")],
    ),
}


@pytest.mark.parametrize(("workflows", "expected"), INVALID.values(), ids=INVALID.keys())
def test_an_invalid_workflow_is_reported_where_it_is_wrong(
    workflows: str, expected: list[tuple[str, int, str]]
) -> None:
    text = "workflows:\n" + "\n".join("  " + line for line in dedent(workflows).splitlines()) + "\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={})
    # Lines are counted in the snippet; the file has `workflows:` above it.
    found = [(p.path, (p.line or 0) - 1, p.message) for p in caught.value.problems]
    assert [(path, line) for path, line, _ in found] == [(path, line) for path, line, _ in expected]
    for (_, _, message), (_, _, fragment) in zip(found, expected, strict=True):
        assert fragment in message


def test_calls_are_checked_against_the_tools_served() -> None:
    config = parse_config(
        "workflows:\n  w:\n    steps:\n      - {id: a, call: crm__order, with: {id: 7}}\n"
        "      - {id: b, call: crm__gone, compensate: {call: crm__undo}}\n",
        environ={},
    )
    schemas = {"crm__order": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}
    problems = check_tools(config.plans, schemas)
    assert [(p.path, p.message.split(":")[0]) for p in problems] == [
        ("workflows.w.steps[0].with.id", "step 'a' calls crm__order"),
        ("workflows.w.steps[1].call", "step 'b' calls 'crm__gone', which is not a tool this gateway serves"),
        ("workflows.w.steps[1].compensate.call", "step 'b' calls 'crm__undo', which is not a tool this gateway serves"),
    ]


def test_calls_inside_a_loop_body_are_checked_against_the_tools_served_at_their_location() -> None:
    config = parse_config(
        "workflows:\n  w:\n    steps:\n      - id: poll\n        loop:\n          steps:\n"
        "            - {id: a, call: crm__order, with: {id: 7}}\n            - {id: b, call: crm__gone}\n"
        "          until: .steps.a.result\n          max_iterations: 2\n",
        environ={},
    )
    schemas = {"crm__order": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}
    problems = check_tools(config.plans, schemas)
    assert [(p.path, p.line, p.message.split(":")[0]) for p in problems] == [
        ("workflows.w.steps[0].loop.steps[0].with.id", None, "step 'a' calls crm__order"),
        (
            "workflows.w.steps[0].loop.steps[1].call",
            None,
            "step 'b' calls 'crm__gone', which is not a tool this gateway serves",
        ),
    ]


def test_a_call_to_a_tool_not_served_suggests_the_closest_served_name() -> None:
    config = parse_config(
        "workflows:\n  w:\n    steps:\n      - {id: a, call: clock__get_curent_time}\n"
        "      - {id: b, call: clock__set_alarm}\n",
        environ={},
    )
    tools = {"clock__get_current_time": {"type": "object"}, "kb__search": {"type": "object"}}
    assert [(p.path, p.message, p.cause) for p in check_tools(config.plans, tools)] == [
        (
            "workflows.w.steps[0].call",
            "step 'a' calls 'clock__get_curent_time', which is not a tool this gateway serves;"
            " did you mean 'clock__get_current_time'?",
            None,
        ),
        (
            "workflows.w.steps[1].call",
            "step 'b' calls 'clock__set_alarm', which is not a tool this gateway serves",
            None,
        ),
    ]


def test_a_call_to_a_tool_of_an_upstream_that_could_not_connect_names_that_as_its_cause() -> None:
    config = parse_config(
        "workflows:\n  w:\n    steps:\n      - {id: a, call: crm__get, compensate: {call: crm__undo}}\n"
        "      - {id: b, call: kb__serch}\n",
        environ={},
    )
    tools = {"crm_get": {"type": "object"}, "kb__search": {"type": "object"}}

    problems = check_tools(config.plans, tools, lambda tool: "servers.crm" if tool.startswith("crm__") else None)

    assert [(p.path, p.message, p.cause) for p in problems] == [
        (
            "workflows.w.steps[0].call",
            "step 'a' calls 'crm__get', which is not a tool this gateway serves"
            " (because servers.crm could not connect)",
            "servers.crm",
        ),
        (
            "workflows.w.steps[0].compensate.call",
            "step 'a' calls 'crm__undo', which is not a tool this gateway serves"
            " (because servers.crm could not connect)",
            "servers.crm",
        ),
        (
            "workflows.w.steps[1].call",
            "step 'b' calls 'kb__serch', which is not a tool this gateway serves; did you mean 'kb__search'?",
            None,
        ),
    ]
