"""A workflow's steps as a dependency graph: its static checks (DESIGN §3) and its Mermaid picture.

A step depends on the steps its expressions refer to (``.steps.<id>``, found by the caller's
``references``) and on those its ``after`` names. Steps nested in a ``switch`` branch, a
``for_each`` or ``loop`` body or an ``on_error`` fallback start only once their container has started, and the
container finishes only once they have. A reference that crosses scopes is resolved like this:

* into a switch branch or a fallback from outside: it means "after the enclosing step that is
  visible from the referrer" (``.steps.refund`` then reads the result if the branch ran, else null);
* into a for_each or loop body from outside: an error, since a body step has one result per iteration
  (refer to the for_each step, whose result is the list of iteration outputs, or the loop, whose result
  is its last iteration's output);
* from a for_each's or a loop's expressions to its own body: allowed, no dependency (``output`` picks a
  result, a loop's ``until`` reads the iteration's steps);
* from a nested step to a step that contains it: an error, the container finishes only after it;
  except from a fallback to the step it stands in for, whose ``error`` it may read (no dependency);
* from any other container (or a for_each's ``after``) to its own nested steps: an error, they
  start only after it has;
* into another branch of a switch the referrer is in: an error, the branches exclude each other.

Cycles are reported once per group of steps that wait on each other (a strongly connected
component), naming its shortest cycle through its first-declared step, in the order the steps
would have to run: ``a → b → c → a`` reads "b after a, c after b, a after c".
"""

import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gateway.errors import ConfigProblem, did_you_mean
from gateway.workflows.model import (
    AgentStep,
    CallStep,
    ForEachStep,
    LoopStep,
    OnErrorDefault,
    Step,
    SwitchStep,
    WaitStep,
    Workflow,
)

__all__ = ["Graph", "Node", "build_graph", "mermaid"]

# Mermaid's lexer takes reserved words for keywords even at the end of an id after a digit or
# _ (`order_end`, `step1TB`); an id like that, or one with `-`, gets a synthetic id instead.
_MERMAID_UNSAFE = re.compile(
    r"(?i)(?:.*[^a-z])?(?:end|graph|flowchart|subgraph|style|class|classdef|click|call|href|linkstyle|direction"
    r"|default|interpolate|tb|td|bt|rl|lr)|.*[^A-Za-z0-9_].*"
)


@dataclass(frozen=True, slots=True)
class Node:
    """One step of a workflow, nested or not."""

    id: str
    """The step's id, unique in its workflow."""
    kind: str
    """The step's kind key: ``call``, ``switch``, ``for_each``, ``loop``, ``set``, ``fail``, ``wait``, ``ask_user``,
    ``ask_model``, ``agent``."""
    deps: frozenset[str]
    """Steps that must finish before this one starts, besides its container's (see the module docstring)."""
    parent: str | None
    """The step this one is nested in (a switch, a for_each, a loop, or the step it is a fallback of); None at top
    level."""
    branch: str | None
    """Where in ``parent`` it is: ``case 0``, ``default``, ``body`` or ``fallback``; None at top level."""
    label: str
    """What diagrams show: ``order: call crm__order``."""
    path: str
    """Where the step is in the workflow: ``steps[2].switch[0].steps[1]``."""


@dataclass(frozen=True, slots=True)
class Graph:
    """The steps of one workflow and the order they can run in."""

    workflow: str
    """The workflow's name."""
    nodes: Mapping[str, Node]
    """Every step by id, in the order they are written (a container before its nested steps)."""
    order: tuple[str, ...]
    """A topological order: each step after its deps (and their nested steps) and after its container."""


@dataclass(frozen=True, slots=True)
class _Walked:
    step: Step
    path: str
    parent: str | None
    branch: str | None


def build_graph(
    name: str, workflow: Workflow, references: Callable[[Step], frozenset[str]]
) -> tuple[Graph, list[ConfigProblem]]:
    """The dependency graph of workflow ``name`` and every problem found in it.

    ``references(step)`` returns the step ids the step's own expressions refer to; it is given
    containers with their nested steps removed. Problems have paths like
    ``workflows.<name>.steps[2].after[0]`` and no line. With problems, the graph is best effort:
    duplicate ids keep their first step, bad references are left out, steps in cycles come last.
    """
    prefix = f"workflows.{name}."
    problems: list[ConfigProblem] = []
    walked: dict[str, _Walked] = {}
    for entry in _walk(workflow.steps, "steps", None, None):
        step = entry.step
        if step.id in walked:
            message = f"duplicate step id {step.id!r} (first at {walked[step.id].path})"
            problems.append(ConfigProblem(f"{prefix}{entry.path}.id", message))
            continue
        walked[step.id] = entry
        if step.compensate is not None and not isinstance(step, CallStep):
            message = f"step {step.id!r} is a {step.kind} step: only call steps can be compensated"
            problems.append(ConfigProblem(f"{prefix}{entry.path}.compensate", message))

    waits: dict[str, dict[str, str]] = {step_id: {} for step_id in walked}  # node → waited-for node → origin path
    deps: dict[str, set[str]] = {step_id: set() for step_id in walked}
    for step_id, entry in walked.items():
        explicit = [(ref, f"{entry.path}.after[{index}]") for index, ref in enumerate(entry.step.after)]
        inferred = [(ref, entry.path) for ref in sorted(references(_shallow(entry.step)))]
        seen: set[str] = set()
        for ref, where in explicit + inferred:
            if ref in seen:
                continue
            seen.add(ref)
            target, wrong = _resolve(step_id, ref, walked, explicit=where != entry.path)
            if wrong is not None:
                problems.append(ConfigProblem(prefix + where, wrong))
            elif target is not None:
                deps[step_id].add(target)
                waits[step_id].setdefault(target, where)
        if entry.parent is not None:
            waits[entry.parent].setdefault(step_id, entry.path)  # a container waits for what it holds

    problems.extend(ConfigProblem(prefix + where, message) for where, message in _cycles(waits))
    nodes = {
        step_id: Node(step_id, e.step.kind, frozenset(deps[step_id]), e.parent, e.branch, _label(e.step), e.path)
        for step_id, e in walked.items()
    }
    return Graph(name, MappingProxyType(nodes), _order(nodes)), problems


def _walk(steps: Iterable[Step], location: str, parent: str | None, branch: str | None) -> Iterator[_Walked]:
    for index, step in enumerate(steps):
        here = f"{location}[{index}]"
        yield _Walked(step, here, parent, branch)
        if isinstance(step, SwitchStep):
            for number, case in enumerate(step.switch):
                yield from _walk(case.steps, f"{here}.switch[{number}].steps", step.id, f"case {number}")
            yield from _walk(step.default, f"{here}.default", step.id, "default")
        elif isinstance(step, ForEachStep):
            yield from _walk(step.steps, f"{here}.steps", step.id, "body")
        elif isinstance(step, LoopStep):
            yield from _walk(step.loop.steps, f"{here}.loop.steps", step.id, "body")
        if isinstance(step.on_error, tuple):
            yield from _walk(step.on_error, f"{here}.on_error", step.id, "fallback")


def _shallow(step: Step) -> Step:
    """``step`` without its nested steps, so ``references`` sees only the step's own expressions."""
    update: dict[str, object] = {"on_error": "fail"} if isinstance(step.on_error, tuple) else {}
    if isinstance(step, SwitchStep):
        update |= {"switch": tuple(case.model_copy(update={"steps": ()}) for case in step.switch), "default": ()}
    elif isinstance(step, ForEachStep):
        update["steps"] = ()
    elif isinstance(step, LoopStep):
        update["loop"] = step.loop.model_copy(update={"steps": ()})
    return step.model_copy(update=update) if update else step


def _resolve(step_id: str, ref: str, walked: Mapping[str, _Walked], *, explicit: bool) -> tuple[str | None, str | None]:
    """(the step ``step_id`` waits for when it refers to ``ref``, None) or (None, what is wrong)."""
    if ref not in walked:
        return None, f"step {step_id!r} refers to unknown step {ref!r}{did_you_mean(ref, walked)}"
    if ref == step_id:
        return None, f"steps form a cycle: {step_id} → {step_id}"
    mine, theirs = _chain(step_id, walked), _chain(ref, walked)
    if ref in mine:
        if walked[mine[mine.index(ref) - 1]].branch == "fallback" and not explicit:
            return None, None  # a fallback reads the error of the step it stands in for
        return None, f"step {step_id!r} is inside {ref!r} and cannot refer to it: {ref!r} finishes after it"
    if step_id in theirs:
        inner = theirs[theirs.index(step_id) - 1]
        if not explicit and isinstance(walked[step_id].step, ForEachStep | LoopStep) and walked[inner].branch == "body":
            return None, None  # the for_each's `output` picks an iteration's result, a loop's `until` reads it
        return None, f"step {step_id!r} cannot refer to {ref!r}, which runs inside it"
    scopes = {(walked[s].parent, walked[s].branch) for s in mine}
    for outer in theirs:
        entry = walked[outer]
        if (entry.parent, entry.branch) in scopes:
            break
        if entry.branch == "body" and entry.parent is not None:
            container = walked[entry.parent].step
            result = (
                "its last iteration's output" if container.kind == "loop" else "the list of its iterations' outputs"
            )
            return None, (
                f"step {step_id!r} refers to {ref!r} inside {container.kind} {entry.parent!r}: "
                f"refer to {entry.parent!r}, {result}, instead"
            )
    if outer in mine:
        return None, f"step {step_id!r} refers to {ref!r} in another branch of {outer!r}"
    return outer, None


def _chain(step_id: str, walked: Mapping[str, _Walked]) -> list[str]:
    """``step_id`` and the steps it is nested in, innermost first."""
    chain = [step_id]
    while (parent := walked[chain[-1]].parent) is not None:
        chain.append(parent)
    return chain


def _cycles(waits: Mapping[str, Mapping[str, str]]) -> Iterator[tuple[str, str]]:
    """(path, message) for each group of steps that wait on each other, in the order they are written."""
    reach = {step_id: _reachable(waits, step_id) for step_id in waits}  # workflows are small: O(n·(n+e))
    reported: set[str] = set()
    for start in waits:
        if start in reported or start not in reach[start]:
            continue
        group = {step_id for step_id in reach[start] if start in reach[step_id]}
        reported |= group
        came_from: dict[str, str] = {}
        queue = deque([start])
        while start not in came_from:  # `start` is on a cycle within `group`: this ends
            node = queue.popleft()
            for nxt in waits[node]:
                if nxt in group and nxt not in came_from:
                    came_from[nxt] = node
                    queue.append(nxt)
        cycle = [start]  # walk back from `start`; the reverse of waiting is the order of running
        while len(cycle) == 1 or cycle[-1] != start:
            cycle.append(came_from[cycle[-1]])
        yield waits[start][cycle[-2]], "steps form a cycle: " + " → ".join(cycle)


def _reachable(graph: Mapping[str, Iterable[str]], start: str) -> set[str]:
    """The nodes reachable from ``start`` over one edge or more."""
    seen: set[str] = set()
    pending = list(graph[start])
    while pending:
        node = pending.pop()
        if node not in seen:
            seen.add(node)
            pending.extend(graph[node])
    return seen


def _order(nodes: Mapping[str, Node]) -> tuple[str, ...]:
    """Each time the first-written step whose predecessors are placed; steps left in cycles come last."""
    children: dict[str, list[str]] = {step_id: [] for step_id in nodes}
    for node in nodes.values():
        if node.parent is not None:
            children[node.parent].append(node.id)
    before = {  # the container, and each dep with its nested steps (a container finishes with them)
        node.id: {dep for dep in (node.parent,) if dep is not None}
        | {done for dep in node.deps for done in {dep} | _reachable(children, dep)}
        for node in nodes.values()
    }
    order: dict[str, None] = {}  # an ordered set
    while (ready := next((s for s, earlier in before.items() if earlier <= order.keys()), None)) is not None:
        order[ready] = None
        del before[ready]
    return (*order, *before)


def _label(step: Step) -> str:
    if isinstance(step, CallStep):
        label = f"{step.id}: call {step.call}"
    elif isinstance(step, WaitStep):
        label = f"{step.id}: wait {f'{step.wait:g}s' if isinstance(step.wait, float) else 'until'}"
    elif isinstance(step, AgentStep):  # its tool set: what it may call, which no edge shows
        label = f"{step.id}: agent {', '.join(step.agent.tools)} (at most {step.agent.max_steps} steps)"
    elif isinstance(step, LoopStep):
        label = f"{step.id}: loop until {step.loop.until}, at most {step.loop.max_iterations} times"
    else:
        label = f"{step.id}: {step.kind}"
    # A default is a value, not steps: no node of its own (fallback steps get one, on an on_error edge).
    return label + ", on_error: default" if isinstance(step.on_error, OnErrorDefault) else label


def mermaid(graph: Graph) -> str:
    """The graph as a Mermaid ``flowchart TD``: for_each and loop bodies are subgraphs (a loop's labelled with its
    condition and bound), switch branches labelled edges."""
    ids = _mermaid_ids(graph.nodes)
    rank = {step_id: index for index, step_id in enumerate(graph.nodes)}
    lines = ["flowchart TD"]

    def region(node: Node) -> str | None:  # the for_each or loop whose body (at any depth) holds the node
        while node.parent is not None:
            if node.branch == "body":
                return node.parent
            node = graph.nodes[node.parent]
        return None

    def declare(container: str | None, indent: str) -> None:
        for node in graph.nodes.values():
            if region(node) != container:
                continue
            label = _quote(node.label)
            if node.kind in ("for_each", "loop"):
                lines.append(f"{indent}subgraph {ids[node.id]} [{label}]")
                declare(node.id, indent + "    ")
                lines.append(f"{indent}end")
            else:
                lines.append(
                    f"{indent}{ids[node.id]}{{{label}}}"
                    if node.kind == "switch"
                    else f"{indent}{ids[node.id]}[{label}]"
                )

    declare(None, "    ")
    for node in graph.nodes.values():
        siblings = {
            d for d in node.deps if (graph.nodes[d].parent, graph.nodes[d].branch) == (node.parent, node.branch)
        }
        if node.parent is not None and node.branch != "body" and not siblings:
            arrow, text = ("-.->", "on_error") if node.branch == "fallback" else ("-->", str(node.branch))
            lines.append(f"    {ids[node.parent]} {arrow}|{_quote(text)}| {ids[node.id]}")
        lines.extend(f"    {ids[dep]} --> {ids[node.id]}" for dep in sorted(node.deps, key=rank.__getitem__))
    return "\n".join(lines) + "\n"


def _mermaid_ids(nodes: Mapping[str, Node]) -> dict[str, str]:
    """A distinct, valid Mermaid id per step: the step id itself unless Mermaid could misread it."""
    ids = {step_id: step_id for step_id in nodes if not _MERMAID_UNSAFE.fullmatch(step_id)}
    used = set(ids)
    for index, step_id in enumerate(nodes):
        if step_id not in ids:
            candidate = f"step{index}"
            while candidate in used:
                candidate += "_"
            ids[step_id] = candidate
            used.add(candidate)
    return {step_id: ids[step_id] for step_id in nodes}


def _quote(text: str) -> str:
    escaped = text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
    return f'"{escaped}"'
