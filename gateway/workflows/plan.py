"""A workflow compiled for running: every expression compiled, every step placed in its graph.

:func:`compile_workflow` is what loading a config does with each workflow: it compiles the
step's ``${…}`` values and conditions once, builds the dependency graph, and reports every
problem with its path (``workflows.<name>.steps[2].with.id``). :func:`check_calls` adds the
checks that need more than one workflow: a workflow that calls itself, directly or through others.
The engine runs a :class:`Plan`; nothing here does I/O.
"""

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gateway.errors import ConfigProblem, did_you_mean
from gateway.workflows.agent import allowed
from gateway.workflows.checks import check_arguments
from gateway.workflows.defaults import check_defaults
from gateway.workflows.expressions import Condition, ExpressionError, Value, compile_condition, compile_value
from gateway.workflows.graph import Graph, Node, build_graph
from gateway.workflows.model import (
    AgentStep,
    AskModelStep,
    AskUserStep,
    CallSpec,
    CallStep,
    FailStep,
    ForEachStep,
    LoopStep,
    OnErrorDefault,
    SetStep,
    Step,
    SwitchStep,
    WaitStep,
    WaitUntil,
    Workflow,
    iter_steps,
)

__all__ = ["Plan", "StepPlan", "check_calls", "check_tools", "compile_workflow", "unserved"]


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step, ready to run: its node in the graph, its model, its compiled expressions."""

    node: Node
    step: Step
    values: Mapping[str, Value]
    """Compiled values by role: ``with``, ``idempotency_key``, ``set``, ``fail``, ``items``, ``output``,
    ``message``, ``prompt``, ``goal``, ``system``, ``until``, ``compensate``, ``default``
    (``on_error: {default: …}``)."""
    cases: tuple[Condition, ...] = ()
    """A switch's conditions, in order."""
    success: Condition | None = None
    children: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """The directly nested step ids by branch: ``case 0``…, ``default``, ``body``, ``fallback``."""
    starts_with_jq: bool = True
    """Starting the step may run a jq program (a value or a case that is not a plain path); False: it never does."""
    until: Condition | None = None
    """A loop's condition, checked after each iteration."""

    @property
    def id(self) -> str:
        return self.node.id


@dataclass(frozen=True, slots=True)
class Plan:
    """One workflow, compiled."""

    name: str
    workflow: Workflow
    graph: Graph
    steps: Mapping[str, StepPlan]
    top: tuple[str, ...]
    """The top-level step ids, in the order they are written."""
    output: Value | None
    calls: frozenset[str]
    """Every tool the workflow calls, compensations included."""
    regions: Mapping[str, str | None]
    """For each step, the for_each or loop whose body (at any depth) it runs in, once per item or iteration; None:
    once per run."""
    dependents: Mapping[str, tuple[str, ...]]
    """For each step, the steps that depend on it."""
    descendants: Mapping[str, frozenset[str]]
    """For each step, every step nested in it, at any depth."""

    total_steps: int | None
    """How many steps a run settles (each once, run or skipped), if known before it runs: progress's total."""
    digest: str = ""
    """SHA-256 of the workflow's canonical JSON (its model, defaults filled in): which plan a journaled run ran."""


_OWN_SITES = frozenset({"compensate", "output", "default"})
"""Values evaluated when the step has finished (or failed), not when it starts."""


def _total_steps(steps: Mapping[str, StepPlan], descendants: Mapping[str, frozenset[str]]) -> int | None:
    """Unknown when a for_each runs its body once per item, a loop until its condition holds, a fallback may run,
    or a container may be retried (its steps then settle again)."""
    for step_plan in steps.values():
        node, step = step_plan.node, step_plan.step
        if node.kind in ("for_each", "loop") or node.branch == "fallback" or (step.retry and descendants[node.id]):
            return None
    return len(steps)


def _own_expressions(step: Step) -> Iterator[tuple[str, str, Any]]:
    """(role, relative path, raw value or condition) of the step's own expressions, nested steps excluded."""
    yield from _kind_expressions(step)
    if step.success is not None:
        yield "success", "success", step.success
    if step.compensate is not None:
        yield "compensate", "compensate.with", step.compensate.with_
    if isinstance(step.on_error, OnErrorDefault):
        yield "default", "on_error.default", step.on_error.default


def _kind_expressions(step: Step) -> Iterator[tuple[str, str, Any]]:
    if isinstance(step, CallStep):
        yield "with", "with", step.with_
        if step.idempotency_key is not None:
            yield "idempotency_key", "idempotency_key", step.idempotency_key
    elif isinstance(step, SwitchStep):
        for index, case in enumerate(step.switch):
            yield f"case {index}", f"switch[{index}].when", case.when
    elif isinstance(step, ForEachStep):
        yield "items", "for_each", step.for_each
        if step.output is not None:
            yield "output", "output", step.output
    elif isinstance(step, LoopStep):
        yield "loop until", "loop.until", step.loop.until
        if step.loop.output is not None:
            yield "output", "loop.output", step.loop.output
    elif isinstance(step, SetStep | FailStep):
        yield step.kind, step.kind, step.set if isinstance(step, SetStep) else step.fail
    elif isinstance(step, WaitStep):
        if isinstance(step.wait, WaitUntil):
            yield "until", "wait.until", step.wait.until
    else:
        yield from _ask_expressions(step)


def _ask_expressions(step: Step) -> Iterator[tuple[str, str, Any]]:
    if isinstance(step, AskUserStep):
        yield "message", "ask_user.message", step.ask_user.message
    elif isinstance(step, AskModelStep):
        yield "prompt", "ask_model.prompt", step.ask_model.prompt
        if step.ask_model.system is not None:
            yield "system", "ask_model.system", step.ask_model.system
    elif isinstance(step, AgentStep):
        yield "goal", "agent.goal", step.agent.goal
        if step.agent.system is not None:
            yield "system", "agent.system", step.agent.system


def _is_condition(role: str) -> bool:
    return role in ("success", "loop until") or role.startswith("case ")


def _compile(step: Step, where: str) -> tuple[dict[str, Value], dict[str, Condition], list[ConfigProblem]]:
    values: dict[str, Value] = {}
    conditions: dict[str, Condition] = {}
    problems: list[ConfigProblem] = []
    for role, path, raw in _own_expressions(step):
        try:
            if _is_condition(role):
                conditions[role] = compile_condition(raw, where=f"{where}.{path}")
            else:
                values[role] = compile_value(raw, where=f"{where}.{path}")
        except ExpressionError as exc:
            problems.append(ConfigProblem(exc.where, exc.detail))
    return values, conditions, problems


def compile_workflow(name: str, workflow: Workflow) -> tuple[Plan, list[ConfigProblem]]:
    """The plan of workflow ``name`` and every problem in it (paths start ``workflows.<name>.``, no lines)."""
    compiled: dict[str, tuple[dict[str, Value], dict[str, Condition], list[ConfigProblem]]] = {}
    by_id: dict[str, Step] = {}
    for path, step in iter_steps(workflow.steps):
        if step.id not in compiled:  # a duplicate id is reported by the graph
            compiled[step.id] = _compile(step, f"workflows.{name}.{path}")
            by_id[step.id] = step

    def references(step: Step) -> frozenset[str]:
        values, conditions, _ = compiled[step.id]
        # A compensation runs once the run has failed and every step has settled: it waits for nothing.
        found = [value.references for role, value in values.items() if role not in ("compensate", "default")]
        found += [condition.references for condition in conditions.values()]
        if "default" in values:  # it may read the step's own error, which is known by then: not a dependency
            found.append(values["default"].references - {step.id})
        return frozenset().union(*found)

    graph, problems = build_graph(name, workflow, references)
    problems.extend(check_defaults(workflow.input, f"workflows.{name}.input"))
    children: dict[str, dict[str, list[str]]] = {step_id: {} for step_id in graph.nodes}
    for node in graph.nodes.values():
        if node.parent is not None and node.branch is not None:
            children[node.parent].setdefault(node.branch, []).append(node.id)
    steps: dict[str, StepPlan] = {}
    for step_id, node in graph.nodes.items():
        step = by_id[step_id]
        values, conditions, found = compiled[step_id]
        problems.extend(found)
        cases = tuple(condition for role, condition in conditions.items() if role.startswith("case "))
        kids = MappingProxyType({branch: tuple(ids) for branch, ids in children[step_id].items()})
        at_start = [value.runs_jq for role, value in values.items() if role not in _OWN_SITES]
        jq = any(at_start) or any(not case.is_path for case in cases)
        until = conditions.get("loop until")
        steps[step_id] = StepPlan(
            node, step, MappingProxyType(values), cases, conditions.get("success"), kids, jq, until=until
        )
    output = _compile_output(name, workflow, compiled, graph, problems)
    calls = frozenset(
        tool
        for step in by_id.values()
        for tool in (
            step.call if isinstance(step, CallStep) else None,
            step.compensate.call if step.compensate else None,
        )
        if tool is not None
    )
    top = tuple(step.id for step in workflow.steps)
    regions, dependents, descendants = _relations(graph)
    total = _total_steps(steps, descendants)
    plan = Plan(
        name,
        workflow,
        graph,
        MappingProxyType(steps),
        top,
        output,
        calls,
        regions,
        dependents,
        descendants,
        total,
        _digest(workflow),
    )
    return plan, problems


def _digest(workflow: Workflow) -> str:
    canonical = json.dumps(workflow.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _compile_output(
    name: str, workflow: Workflow, compiled: Mapping[str, tuple[Any, ...]], graph: Graph, problems: list[ConfigProblem]
) -> Value | None:
    """The workflow's compiled ``output``; adds the problems with it, and with compensations' references."""
    for step_id, (values, _, _) in compiled.items():
        if "compensate" in values:  # not a dependency, so the graph did not check it
            where = f"{graph.nodes[step_id].path}.compensate.with" if step_id in graph.nodes else "steps"
            problems.extend(_unknown_references(name, where, values["compensate"], graph))
    if workflow.output is None:
        return None
    try:
        output = compile_value(workflow.output, where=f"workflows.{name}.output")
    except ExpressionError as exc:
        problems.append(ConfigProblem(exc.where, exc.detail))
        return None
    problems.extend(_unknown_references(name, "output", output, graph))
    return output


def _relations(
    graph: Graph,
) -> tuple[Mapping[str, str | None], Mapping[str, tuple[str, ...]], Mapping[str, frozenset[str]]]:
    nodes = graph.nodes
    regions: dict[str, str | None] = {}
    for node in nodes.values():  # containers come before what they hold
        regions[node.id] = (
            None if node.parent is None else node.parent if node.branch == "body" else regions[node.parent]
        )
    order = {step_id: index for index, step_id in enumerate(nodes)}
    dependents: dict[str, list[str]] = {step_id: [] for step_id in nodes}
    for node in nodes.values():
        for dep in sorted(node.deps, key=order.__getitem__):
            dependents[dep].append(node.id)
    descendants: dict[str, set[str]] = {step_id: set() for step_id in nodes}
    for node in reversed(list(nodes.values())):  # what a step holds is written after it
        if node.parent is not None:
            descendants[node.parent] |= {node.id} | descendants[node.id]
    return (
        MappingProxyType(regions),
        MappingProxyType({step_id: tuple(ids) for step_id, ids in dependents.items()}),
        MappingProxyType({step_id: frozenset(ids) for step_id, ids in descendants.items()}),
    )


def _unknown_references(name: str, path: str, value: Value, graph: Graph) -> Iterator[ConfigProblem]:
    for ref in sorted(value.references - graph.nodes.keys()):
        yield ConfigProblem(
            f"workflows.{name}.{path}", f"refers to unknown step {ref!r}{did_you_mean(ref, graph.nodes)}"
        )


def check_calls(plans: Mapping[str, Plan]) -> list[ConfigProblem]:
    """A problem for each workflow that calls itself, directly or through other workflows."""
    problems: list[ConfigProblem] = []
    for name, plan in plans.items():
        path = _path_back(name, plans)
        if path is not None:
            cycle = " → ".join((name, *path))
            where = _call_site(plan, path[0])
            problems.append(ConfigProblem(f"workflows.{name}.{where}", f"workflow calls itself: {cycle}"))
    return problems


def _path_back(start: str, plans: Mapping[str, Plan]) -> tuple[str, ...] | None:
    """The shortest chain of workflow calls from ``start`` back to itself, or None."""
    frontier: list[tuple[str, ...]] = [(callee,) for callee in sorted(plans[start].calls) if callee in plans]
    seen: set[str] = set()
    while frontier:
        chain = frontier.pop(0)
        if chain[-1] == start:
            return chain
        if chain[-1] in seen:
            continue
        seen.add(chain[-1])
        frontier.extend((*chain, callee) for callee in sorted(plans[chain[-1]].calls) if callee in plans)
    return None


def _call_site(plan: Plan, tool: str) -> str:
    for step_plan in plan.steps.values():
        step = step_plan.step
        if isinstance(step, CallStep) and step.call == tool:
            return f"{step_plan.node.path}.call"
        if step.compensate is not None and step.compensate.call == tool:
            return f"{step_plan.node.path}.compensate.call"
    return "steps"


def check_tools(
    plans: Mapping[str, Plan],
    tools: Mapping[str, Mapping[str, Any]],
    unreachable: Callable[[str], str | None] = lambda tool: None,
) -> list[ConfigProblem]:
    """Problems with what the workflows call, given the tools served and their ``inputSchema``.

    A call to a tool that is not served, and ``with:`` arguments that cannot satisfy the tool's
    input schema (as far as can be known before the run: see :mod:`gateway.workflows.checks`); an
    ``agent``'s tool glob that matches no served tool but the workflow itself.
    ``unreachable(tool)`` is the path of the upstream that would serve ``tool`` and could not connect
    (``servers.crm``), else None: a call to a tool not served names that as its cause, or else the
    served tool whose name is closest.
    """
    problems: list[ConfigProblem] = []
    for name, plan in plans.items():
        for step_plan in plan.steps.values():
            step, path = step_plan.step, f"workflows.{name}.{step_plan.node.path}"
            if isinstance(step, AgentStep):
                problems.extend(_unmatched_globs(name, path, step, tools))
            specs: list[tuple[str, CallSpec]] = [(path, step)] if isinstance(step, CallStep) else []
            if step.compensate is not None:
                specs.append((f"{path}.compensate", step.compensate))
            for where, spec in specs:
                if spec.call not in tools:
                    message = f"step {step.id!r} calls {spec.call!r}, which is not a tool this gateway serves"
                    problems.append(unserved(f"{where}.call", message, spec.call, tools, unreachable))
                    continue
                for at, message in check_arguments(spec.with_, tools[spec.call]):
                    where_arg = f"{where}.with{'.' + at if at and not at.startswith('[') else at}"
                    problems.append(ConfigProblem(where_arg, f"step {step.id!r} calls {spec.call}: {message}"))
    return problems


def _unmatched_globs(name: str, path: str, step: AgentStep, tools: Iterable[str]) -> Iterator[ConfigProblem]:
    served = [tool for tool in tools if tool != name]
    for index, glob in enumerate(step.agent.tools):
        if not any(allowed(tool, (glob,)) for tool in served):
            message = f"step {step.id!r} may call tools {glob!r}, which matches no tool this gateway serves"
            yield ConfigProblem(f"{path}.agent.tools[{index}]", message + did_you_mean(glob, served))


def unserved(
    path: str, message: str, tool: str, tools: Iterable[str], unreachable: Callable[[str], str | None]
) -> ConfigProblem:
    """The problem at ``path`` that ``message`` states about ``tool``, which is not served, saying why: the
    upstream that would serve it could not connect (then it is a consequence of that), or else maybe a typo."""
    cause = unreachable(tool)
    if cause is not None:
        return ConfigProblem(path, f"{message} (because {cause} could not connect)", cause=cause)
    return ConfigProblem(path, message + did_you_mean(tool, tools))
