import re
from typing import Any

import pytest

from gateway.errors import ConfigProblem
from gateway.workflows.graph import Graph, Node, build_graph, mermaid
from gateway.workflows.model import Step, SwitchStep, Workflow

_STEP_REFERENCE = re.compile(r"\.steps\.([A-Za-z_][A-Za-z0-9_-]*)")


def references(step: Step) -> frozenset[str]:
    """A stand-in for the expressions module: every `.steps.<id>` anywhere in the step."""
    return frozenset(_STEP_REFERENCE.findall(step.model_dump_json(by_alias=True)))


def graph_of(*steps: dict[str, Any]) -> tuple[Graph, list[ConfigProblem]]:
    return build_graph("w", Workflow.model_validate({"steps": steps}), references)


def valid_graph(*steps: dict[str, Any]) -> Graph:
    graph, problems = graph_of(*steps)
    assert problems == []
    return graph


def deps(graph: Graph) -> dict[str, set[str]]:
    return {step_id: set(node.deps) for step_id, node in graph.nodes.items()}


def call(step_id: str, *refs: str, **options: Any) -> dict[str, Any]:
    """A call step whose arguments refer to ``refs``."""
    return {
        "id": step_id,
        "call": f"t__{step_id}",
        "with": {ref: f"${{.steps.{ref}.result}}" for ref in refs},
        **options,
    }


def test_steps_that_refer_to_no_step_are_independent() -> None:
    graph = valid_graph(call("order"), call("docs"), call("reply", "order", "docs"))

    assert deps(graph) == {"order": set(), "docs": set(), "reply": {"order", "docs"}}


def test_after_adds_dependencies_to_the_inferred_ones() -> None:
    graph = valid_graph(call("a"), call("b"), call("c", "a", after=["b"]))

    assert deps(graph)["c"] == {"a", "b"}


def test_nodes_describe_each_step() -> None:
    graph = valid_graph(call("order"), {"id": "total", "set": {"x": "${.steps.order.result.total}"}})

    assert graph.workflow == "w"
    assert graph.nodes["order"] == Node("order", "call", frozenset(), None, None, "order: call t__order", "steps[0]")
    assert graph.nodes["total"] == Node("total", "set", frozenset({"order"}), None, None, "total: set", "steps[1]")


def test_nested_steps_record_their_container_and_branch() -> None:
    graph = valid_graph(
        call("order"),
        {
            "id": "route",
            "switch": [{"when": ".steps.order.result.failed", "steps": [call("refund"), call("notify", "refund")]}],
            "default": [call("log")],
        },
        {"id": "lines", "for_each": "${.steps.order.result.items}", "steps": [call("stock")]},
        call("risky", on_error=[call("fallback")]),
    )

    assert {n.id: (n.parent, n.branch) for n in graph.nodes.values() if n.parent} == {
        "refund": ("route", "case 0"),
        "notify": ("route", "case 0"),
        "log": ("route", "default"),
        "stock": ("lines", "body"),
        "fallback": ("risky", "fallback"),
    }
    # Nested steps wait for their container implicitly: that is not a dependency of their own.
    assert deps(graph) == {
        "order": set(),
        "route": {"order"},
        "refund": set(),
        "notify": {"refund"},
        "log": set(),
        "lines": {"order"},
        "stock": set(),
        "risky": set(),
        "fallback": set(),
    }
    assert graph.nodes["notify"].path == "steps[1].switch[0].steps[1]"


def test_a_container_depends_only_on_its_own_expressions() -> None:
    graph = valid_graph(
        call("order"),
        call("docs"),
        {"id": "route", "switch": [{"when": ".steps.order.ok", "steps": [call("refund", "docs")]}]},
    )

    assert deps(graph)["route"] == {"order"}
    assert deps(graph)["refund"] == {"docs"}


def test_a_reference_into_a_switch_branch_or_fallback_waits_for_the_enclosing_step() -> None:
    graph = valid_graph(
        {"id": "route", "switch": [{"when": ".x", "steps": [call("refund")]}]},
        call("risky", on_error=[call("fallback")]),
        call("reply", "refund", "fallback"),
    )

    assert deps(graph)["reply"] == {"route", "risky"}


def test_a_for_each_may_pick_its_output_from_its_body() -> None:
    graph = valid_graph(
        {"id": "lines", "for_each": "${.input.items}", "steps": [call("stock")], "output": "${.steps.stock.result}"}
    )

    assert deps(graph)["lines"] == set()


def test_steps_in_one_branch_may_refer_to_each_other_and_outward() -> None:
    graph = valid_graph(
        call("order"),
        {
            "id": "lines",
            "for_each": "${.steps.order.result.items}",
            "steps": [call("stock"), call("reserve", "stock", "order")],
        },
    )

    assert deps(graph)["reserve"] == {"stock", "order"}


def test_the_order_puts_every_step_after_its_dependencies_and_container() -> None:
    graph = valid_graph(
        call("reply", "route", "docs"),  # written first, runs last
        {"id": "route", "switch": [{"when": ".steps.order.ok", "steps": [call("refund"), call("notify", "refund")]}]},
        call("docs"),
        call("order"),
        {"id": "lines", "for_each": "${.steps.order.items}", "steps": [call("stock")], "after": ["route"]},
    )
    position = {step_id: index for index, step_id in enumerate(graph.order)}

    assert sorted(graph.order) == sorted(graph.nodes)
    for node in graph.nodes.values():
        assert all(position[dep] < position[node.id] for dep in node.deps)
        assert node.parent is None or position[node.parent] < position[node.id]
    # A step after a container comes after the container's nested steps too.
    assert position["notify"] < position["reply"]
    assert position["notify"] < position["stock"]
    assert graph.order == ("docs", "order", "route", "refund", "notify", "reply", "lines", "stock")


INVALID = [
    pytest.param(
        [call("a"), {"id": "s", "switch": [{"when": ".x", "steps": [call("a")]}]}],
        [("steps[1].switch[0].steps[0].id", "duplicate step id 'a' (first at steps[0])")],
        id="duplicate-id",
    ),
    pytest.param(
        [call("a", after=["ghost"])],
        [("steps[0].after[0]", "step 'a' refers to unknown step 'ghost'")],
        id="unknown-after",
    ),
    pytest.param(
        [call("a", "ghost")],
        [("steps[0]", "step 'a' refers to unknown step 'ghost'")],
        id="unknown-reference",
    ),
    pytest.param(
        [call("a", "b"), call("b", after=["a"])],
        [("steps[0]", "steps form a cycle: a → b → a")],
        id="2-cycle",
    ),
    pytest.param(
        [call("a", after=["c"]), call("b", after=["a"]), call("c", after=["b"])],
        [("steps[0].after[0]", "steps form a cycle: a → b → c → a")],
        id="3-cycle",
    ),
    pytest.param(
        [call("a", "c"), call("b", "a"), call("c", "b"), call("x", "y"), call("y", "x")],
        [("steps[0]", "steps form a cycle: a → b → c → a"), ("steps[3]", "steps form a cycle: x → y → x")],
        id="two-cycles",
    ),
    pytest.param(
        [call("a", "a")],
        [("steps[0]", "steps form a cycle: a → a")],
        id="self-reference",
    ),
    pytest.param(
        [call("a", after=["a"])],
        [("steps[0].after[0]", "steps form a cycle: a → a")],
        id="self-after",
    ),
    pytest.param(
        [{"id": "s", "switch": [{"when": ".x", "steps": [call("a", "b")]}]}, call("b", "s")],
        [("steps[0].switch[0].steps[0]", "steps form a cycle: s → b → a → s")],
        id="cycle-through-a-container",
    ),
    pytest.param(
        [{"id": "lines", "for_each": ".x", "steps": [call("a", "lines")]}],
        [("steps[0].steps[0]", "step 'a' is inside 'lines' and cannot refer to it")],
        id="body-refers-to-its-for_each",
    ),
    pytest.param(
        [{"id": "lines", "for_each": ".x", "steps": [call("a")]}, call("b", "a")],
        [("steps[1]", "step 'b' refers to 'a' inside for_each 'lines': refer to 'lines'")],
        id="reference-into-a-for_each-body",
    ),
    pytest.param(
        [{"id": "poll", "loop": {"steps": [call("a")], "until": ".x", "max_iterations": 2}}, call("b", "a")],
        [("steps[1]", "step 'b' refers to 'a' inside loop 'poll': refer to 'poll', its last iteration's output")],
        id="reference-into-a-loop-body",
    ),
    pytest.param(
        [{"id": "poll", "loop": {"steps": [call("a", "poll")], "until": ".x", "max_iterations": 2}}],
        [("steps[0].loop.steps[0]", "step 'a' is inside 'poll' and cannot refer to it")],
        id="body-refers-to-its-loop",
    ),
    pytest.param(
        [{"id": "s", "switch": [{"when": ".x", "steps": [call("a")]}], "default": [call("b", "a")]}],
        [("steps[0].default[0]", "step 'b' refers to 'a' in another branch of 's'")],
        id="reference-across-branches",
    ),
    pytest.param(
        [{"id": "s", "switch": [{"when": ".steps.a.ok", "steps": [call("a")]}]}],
        [("steps[0]", "step 's' cannot refer to 'a', which runs inside it")],
        id="switch-refers-to-its-branch",
    ),
    pytest.param(
        [{"id": "lines", "for_each": ".x", "steps": [call("a")], "after": ["a"]}],
        [("steps[0].after[0]", "step 'lines' cannot refer to 'a', which runs inside it")],
        id="for_each-after-its-body",
    ),
    pytest.param(
        [call("a", "ghost", after=["ghost"])],
        [("steps[0].after[0]", "step 'a' refers to unknown step 'ghost'")],
        id="one-problem-per-reference",
    ),
    pytest.param(
        [{"id": "a", "set": {"x": 1}, "compensate": {"call": "t__undo"}}],
        [("steps[0].compensate", "step 'a' is a set step: only call steps can be compensated")],
        id="compensate-a-set-step",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), INVALID)
def test_problems_name_the_step_and_what_is_wrong(steps: list[dict[str, Any]], expected: list[tuple[str, str]]) -> None:
    _, problems = graph_of(*steps)

    assert [(p.path.removeprefix("workflows.w."), p.line) for p in problems] == [(path, None) for path, _ in expected]
    for problem, (_, fragment) in zip(problems, expected, strict=True):
        assert fragment in problem.message


def test_a_graph_with_a_cycle_still_orders_every_step() -> None:
    graph, problems = graph_of(call("a", "b"), call("b", "a"), call("c"))

    assert len(problems) == 1
    assert graph.order == ("c", "a", "b")


def test_references_see_containers_without_their_nested_steps() -> None:
    seen: list[Step] = []

    def recording(step: Step) -> frozenset[str]:
        seen.append(step)
        return references(step)

    workflow = Workflow.model_validate(
        {"steps": [{"id": "s", "switch": [{"when": ".x", "steps": [call("a")]}], "on_error": [call("b")]}]}
    )
    build_graph("w", workflow, recording)

    switch = seen[0]
    assert isinstance(switch, SwitchStep)
    assert (switch.switch[0].when, switch.switch[0].steps, switch.on_error) == (".x", (), "fail")
    assert [step.id for step in seen] == ["s", "a", "b"]


def test_mermaid_draws_branches_as_labelled_edges_and_bodies_as_subgraphs() -> None:
    graph = valid_graph(
        call("order"),
        {
            "id": "route",
            "switch": [{"when": ".steps.order.failed", "steps": [call("refund"), call("notify", "refund")]}],
            "default": [{"id": "done", "set": {"ok": True}}],
        },
        {"id": "lines", "for_each": "${.steps.order.items}", "steps": [call("stock")], "on_error": "continue"},
        call("reply", "route", "lines", on_error=[{"id": "sorry", "fail": "no reply"}]),
    )

    assert mermaid(graph) == (
        "flowchart TD\n"
        '    order["order: call t__order"]\n'
        '    route{"route: switch"}\n'
        '    refund["refund: call t__refund"]\n'
        '    notify["notify: call t__notify"]\n'
        '    done["done: set"]\n'
        '    subgraph lines ["lines: for_each"]\n'
        '        stock["stock: call t__stock"]\n'
        "    end\n"
        '    reply["reply: call t__reply"]\n'
        '    sorry["sorry: fail"]\n'
        "    order --> route\n"
        '    route -->|"case 0"| refund\n'
        "    refund --> notify\n"
        '    route -->|"default"| done\n'
        "    order --> lines\n"
        "    route --> reply\n"
        "    lines --> reply\n"
        '    reply -.->|"on_error"| sorry\n'
    )


def test_mermaid_renames_ids_mermaid_would_misread() -> None:
    graph = valid_graph(call("end"), call("a-b", "end"), call("check_style"), call("step1"))

    assert mermaid(graph).splitlines()[1:] == [
        '    step0["end: call t__end"]',
        '    step1_["a-b: call t__a-b"]',
        '    step2["check_style: call t__check_style"]',
        '    step1["step1: call t__step1"]',
        "    step0 --> step1_",
    ]


def test_mermaid_marks_a_step_with_an_on_error_default_in_its_label() -> None:
    graph = valid_graph(call("order", on_error={"default": {"status": "unknown"}}), call("reply", "order"))

    assert mermaid(graph).splitlines()[1:] == [
        '    order["order: call t__order, on_error: default"]',
        '    reply["reply: call t__reply"]',
        "    order --> reply",
    ]


def test_mermaid_draws_a_wait_with_its_duration_or_until() -> None:
    graph = valid_graph(
        {"id": "pause", "wait": "2m"}, {"id": "then", "wait": {"until": "${.input.at}"}, "after": ["pause"]}
    )

    assert mermaid(graph).splitlines()[1:] == [
        '    pause["pause: wait 120s"]',
        '    then["then: wait until"]',
        "    pause --> then",
    ]


def test_mermaid_draws_an_agent_with_its_tool_set() -> None:
    agent = {"goal": "why", "tools": ["kb__*", "orders__get_*"], "max_steps": 8}
    graph = valid_graph({"id": "research", "agent": agent}, call("reply", "research"))

    assert mermaid(graph).splitlines()[1:] == [
        '    research["research: agent kb__*, orders__get_* (at most 8 steps)"]',
        '    reply["reply: call t__reply"]',
        "    research --> reply",
    ]


def test_a_loops_condition_reads_its_body_without_depending_on_it_and_its_body_reads_outer_steps() -> None:
    graph = valid_graph(
        call("start"),
        {
            "id": "poll",
            "loop": {"steps": [call("status", "start")], "until": ".steps.status.result.done", "max_iterations": 3},
        },
        call("after", "poll"),
    )

    assert deps(graph) == {"start": set(), "poll": set(), "status": {"start"}, "after": {"poll"}}
    assert (graph.nodes["status"].parent, graph.nodes["status"].branch) == ("poll", "body")
    assert graph.nodes["status"].path == "steps[1].loop.steps[0]"


def test_mermaid_draws_a_loop_as_a_subgraph_labelled_with_its_condition_and_bound() -> None:
    graph = valid_graph(
        call("start"),
        {
            "id": "poll",
            "loop": {
                "steps": [call("status", "start")],
                "until": '.steps.status.result.status == "done"',
                "max_iterations": 20,
                "delay": "2s",
            },
        },
        call("report", "poll"),
    )

    assert mermaid(graph).splitlines()[1:] == [
        '    start["start: call t__start"]',
        '    subgraph poll ["poll: loop until .steps.status.result.status == #quot;done#quot;, at most 20 times"]',
        '        status["status: call t__status"]',
        "    end",
        '    report["report: call t__report"]',
        "    start --> status",
        "    poll --> report",
    ]
