"""Containers and what the engine decides by itself, for the engine (:mod:`gateway.workflows.engine`).

``set``, ``fail`` and ``wait`` are decided at once (a wait's timer started); a ``switch`` opens the branch
whose condition held and skips the others; a ``for_each`` runs its body in a frame per item, ``concurrency``
at a time, and a ``loop`` one iteration after another (:mod:`gateway.workflows._loops`), each ending with its
output evaluated. A container succeeds when the steps of its branch (or fallback) have settled.
"""

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from gateway.workflows._engine_leaves import as_text
from gateway.workflows._engine_sites import EvaluationSites
from gateway.workflows._loops import delay_after, iteration_end, iteration_frame
from gateway.workflows._runstate import PARKED, SETTLED, Frame, Site, StepState
from gateway.workflows.commands import Iterated, StepError
from gateway.workflows.expressions import ExpressionError, Lookup
from gateway.workflows.model import FailStep, ForEachStep, LoopStep, SetStep, WaitStep, WaitUntil, parse_instant

__all__ = ["Containers"]


class Containers(EvaluationSites):
    """``set``, ``fail``, ``wait``, ``switch``, ``for_each`` and ``loop``: their decisions, branches and
    iterations."""

    def _decide(self, state: StepState, scope: Mapping[str, Any], lookup: Lookup) -> None:
        """A ``set``, ``fail``, ``wait``, ``for_each`` or ``loop``: what the engine decides by itself, once its values
        are known."""
        step, values = state.plan.step, state.plan.values
        if isinstance(step, SetStep):
            value = values["set"].evaluate(scope, lookup)
            if not lookup.missing:
                self._succeed(state, value)
        elif isinstance(step, FailStep):
            message = as_text(values["fail"].evaluate(scope, lookup)) or "the workflow failed"
            if not lookup.missing:
                self._fail(state, StepError("error", message, state.key))
        elif isinstance(step, WaitStep):
            self._wait(state, step, scope, lookup)
        elif isinstance(step, ForEachStep):
            items = values["items"].evaluate(scope, lookup)
            if lookup.missing:
                return
            if not isinstance(items, list):
                kind = "null" if items is None else type(items).__name__
                raise ExpressionError(f"for_each needs a list, got {kind}", source=str(step.for_each), where="")
            state.status, state.items, state.next_item, state.outputs = "running", items, 0, [None] * len(items)
            state.iterations = {}
            self._next_iterations(state)
        elif isinstance(step, LoopStep):
            state.status, state.next_item, state.last, state.iterations = "running", 0, None, {}
            self._next_round(state)

    def _wait(self, state: StepState, step: WaitStep, scope: Mapping[str, Any], lookup: Lookup) -> None:
        """Start a ``wait``'s timer; what it will succeed with is kept as its result meanwhile."""
        if not isinstance(step.wait, WaitUntil):
            state.status, state.result = "timing", {"waited": step.wait}
            self._start_timer(state, "wait", step.wait)
            return
        until = state.plan.values["until"].evaluate(scope, lookup)
        if lookup.missing:
            return
        try:
            due = parse_instant(until)
        except ValueError as exc:
            self._fail(state, StepError("invalid", f"wait until: {exc}", state.key))
            return
        when = datetime.fromtimestamp(due, UTC).isoformat().replace("+00:00", "Z")
        state.status, state.result = "timing", {"waited_until": when}
        self._start_timer(state, "wait", 0.0, due)

    def _open(self, state: StepState, branch: str) -> None:
        """Run the steps of ``branch`` of ``state`` (a switch) and skip the other branches."""
        state.status, state.branch = "running", branch
        chosen = state.plan.children.get(branch, ())
        for other, ids in state.plan.children.items():
            if other not in (branch, "fallback"):
                for step_id in ids:
                    self._skip_tree(state.frame, step_id)
        self._activate(state.frame, chosen)
        if not chosen:
            self._succeed(state, None)

    def _skip_tree(self, frame: Frame, step_id: str) -> None:
        state = self._place(frame, step_id)
        self._settle(state, "skipped", notify=False)
        for branch, ids in state.plan.children.items():
            if branch != "fallback":
                for child in ids:
                    self._skip_tree(frame, child)

    def _next_iterations(self, state: StepState) -> None:
        step = state.plan.step
        assert isinstance(step, ForEachStep)
        assert state.items is not None
        while len(state.iterations) < step.concurrency and state.next_item < len(state.items):
            index = state.next_item
            state.next_item += 1
            frame = Frame(
                f"{state.key}[{index}]/",
                step.id,
                state.frame,
                {step.as_: state.items[index], "index": index},
                owner=state,
                index=index,
            )
            state.iterations[index] = frame
            self._activate(frame, state.plan.children.get("body", ()))
        if not state.iterations and state.status == "running":
            self._succeed(state, state.outputs)

    def _next_round(self, state: StepState) -> None:
        """Start the next iteration of the loop ``state``."""
        state.next_item += 1
        frame = iteration_frame(state, state.next_item)
        state.iterations = {frame.index: frame}
        self._activate(frame, state.plan.children.get("body", ()))

    def _round_ended(self, frame: Frame, site: Site | None) -> None:
        """The steps of the loop iteration ``frame`` have settled (``site``: its output or condition waited for
        jq): succeed, fail after its last iteration, or go on, after its delay."""
        owner = frame.owner
        assert owner is not None
        step = owner.plan.step
        assert isinstance(step, LoopStep)

        def compute(scope: Mapping[str, Any], lookup: Lookup) -> Any:
            return iteration_end(owner, frame, scope, lookup)

        try:
            ended = self._at(site, self.scope(frame), compute, "output", owner, frame=frame)
        except ExpressionError as exc:
            self._fail(owner, StepError("error", exc.detail, owner.key))
            return
        if ended is PARKED:
            return
        (owner.last, held), n, most = ended, frame.index, step.loop.max_iterations
        del owner.iterations[n]
        frame.states = {}  # done: break the frame ↔ state cycles (compensations read entries, not states)
        self._out.append(Iterated(owner.key, step.id, n, most, held))
        if held:
            self._succeed(owner, owner.last)
        elif n >= most:
            message = f"the condition {step.loop.until!r} did not hold after {n} iteration{'s' * (n != 1)}"
            self._fail(owner, StepError("error", message, owner.key))
        elif (seconds := delay_after(step.loop, n)) > 0:
            owner.status = "timing"
            self._start_timer(owner, "delay", seconds)
        else:
            self._next_round(owner)

    def _check_container(self, state: StepState) -> None:
        if state.status == "fallback":
            ids = state.plan.children.get("fallback", ())
        elif state.status == "running" and state.branch is not None:
            ids = state.plan.children.get(state.branch, ())
        else:
            return
        children = [state.frame.states[step_id] for step_id in ids]
        if all(child.status in SETTLED for child in children):
            last = children[-1].result if children else None
            self._succeed(state, last)

    def _check_iteration(self, frame: Frame, site: Site | None = None) -> None:
        owner = frame.owner
        assert owner is not None
        if site is None:
            if owner.status != "running" or owner.iterations.get(frame.index) is not frame or frame.evaluating:
                return
            if any(s.status not in SETTLED for s in frame.states.values()):
                return
        step = owner.plan.step
        if isinstance(step, LoopStep):
            self._round_ended(frame, site)
            return
        assert isinstance(step, ForEachStep)
        try:
            if "output" in owner.plan.values:
                scope = self.scope(frame)
                output = self._at(site, scope, owner.plan.values["output"].evaluate, "output", owner, frame=frame)
                if output is PARKED:
                    return
            else:
                body = owner.plan.children.get("body", ())
                output = frame.states[body[-1]].result if body else None
        except ExpressionError as exc:
            self._fail(owner, StepError("error", exc.detail, owner.key))
            return
        owner.outputs[frame.index] = output
        del owner.iterations[frame.index]
        frame.states = {}  # done: break the frame ↔ state cycles (compensations read entries, not states)
        self._next_iterations(owner)
