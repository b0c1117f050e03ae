"""Starting steps, for the engine (:mod:`gateway.workflows.engine`): from ready to handed out.

A step placed in a frame waits until every step it depends on has settled (or is skipped when those all
were); then its try begins: its timer (``timeout<attempt>``, for a step the runner does not time itself),
its values (plain paths at once, jq programs through an evaluation site), and what it is: a leaf's command
queued (at most ``max_concurrency`` in flight, handed out when the batch of events is done), a switch's
branch opened, or what the engine decides itself (:mod:`~gateway.workflows._engine_containers`). Also
here: starting a timer, keyed ``<step key>#<what>`` (its firing is :meth:`Run.fire
<gateway.workflows.engine.Run.fire>`).
"""

from collections.abc import Iterable, Mapping
from typing import Any

from gateway.workflows._engine_sites import PLAIN, EvaluationSites
from gateway.workflows._runstate import Frame, Site, StepState, live
from gateway.workflows.commands import Command, Leaf, StartTimer, StepError
from gateway.workflows.expressions import ExpressionError, Lookup
from gateway.workflows.model import AgentStep, AskModelStep, AskUserStep, CallStep, SwitchStep

__all__ = ["StartingSteps"]


class StartingSteps(EvaluationSites):
    """Placing steps, starting the ready ones, the queue of leaves and the timers: the batch of commands an
    event returns (:meth:`_flush`)."""

    def _flush(self) -> list[Command]:
        """Start what became ready (a loop, not recursion: chains of instant steps can be long)."""
        while self._wake:
            self._start_if_ready(self._wake.popleft())
        self._pump()
        if self._unwanted:  # forget the evaluations nothing waits for any more; cancel those handed out
            self._unwanted = False
            if self._sites.pending:  # checked only then: with many in flight, each check is O(evaluations)
                self._out = self._sites.prune(self._valid, self._out)
        out, self._out = self._out, []
        return out

    def _activate(self, frame: Frame, step_ids: Iterable[str]) -> None:
        """Place steps in ``frame``; each starts once ready (all are placed before any starts)."""
        for step_id in step_ids:
            self._wake.append(self._place(frame, step_id))

    def _place(self, frame: Frame, step_id: str) -> StepState:
        """A new state for ``step_id`` in ``frame``, findable by its key."""
        state = StepState(self.plan.steps[step_id], frame, frame.path + step_id)
        frame.states[step_id] = state
        self._by_key[state.key] = state
        return state

    def _dep_state(self, frame: Frame, dep: str) -> "StepState | None":
        region = self.plan.regions[dep]
        walk: Frame | None = frame
        while walk is not None and walk.region != region:
            walk = walk.parent
        return None if walk is None else walk.states.get(dep)

    def _start_if_ready(self, state: StepState) -> None:
        if state.status != "waiting" or self.status != "running":
            return
        deps = [self._dep_state(state.frame, dep) for dep in state.plan.node.deps]
        if any(d is None or not (d.status in ("succeeded", "skipped") or d.continued) for d in deps):
            return
        if deps and all(d is not None and d.status == "skipped" for d in deps):
            self._settle(state, "skipped")
            return
        self._begin(state)

    def _begin(self, state: StepState) -> None:
        state.attempt += 1
        step = state.plan.step
        if step.timeout is not None and not isinstance(step, CallStep | AskUserStep | AskModelStep):
            self._start_timer(state, f"timeout{state.attempt}", step.timeout)
        self._run_step(state, None)

    def _run_step(self, state: StepState, site: Site | None) -> None:
        scope = self.scope(state.frame)
        try:
            if site is None and not state.plan.starts_with_jq:  # plain paths only: nothing to wait for
                self._step(state, scope, PLAIN)
                assert not PLAIN.missing
            else:
                self._at(site, scope, lambda scope, lookup: self._step(state, scope, lookup), "step", state)
        except ExpressionError as exc:
            self._fail(state, StepError("error", exc.detail, state.key))

    def _step(self, state: StepState, scope: Mapping[str, Any], lookup: Lookup) -> None:
        """Start ``state``, unless ``lookup`` lacks jq outcomes: nothing is done until every value is known."""
        step = state.plan.step
        if isinstance(step, CallStep | AskUserStep | AskModelStep | AgentStep):
            command = self._leaf(state, scope, lookup)
            if command is not None:
                self._enqueue(state, command)
        elif isinstance(step, SwitchStep):
            chosen = "default"
            for i, case in enumerate(state.plan.cases):  # one at a time: a case is asked for once those before fail
                holds = case.holds(scope, lookup)
                if lookup.missing:
                    return
                if holds:
                    chosen = f"case {i}"
                    break
            self._open(state, chosen)
        else:
            self._decide(state, scope, lookup)

    def _enqueue(self, state: StepState, command: Leaf) -> None:
        # Handed out by `_pump` when the batch of events is done (`_flush`), not now: something later in
        # the same batch may cancel it, and a call handed out and cancelled at once would still be made.
        state.status = "queued"
        self._queue.append((state, command))

    def _pump(self) -> None:
        limit = self.plan.workflow.max_concurrency
        while self._queue and len(self._in_flight) < limit and self.status == "running":
            state, command = self._queue.popleft()
            if not live(state, command):
                continue
            state.status = "running"
            if state.agent is not None:  # a part of an agent step, keyed apart from it
                state.agent.in_flight[command.key] = command
            else:
                state.command = command
            self._in_flight[command.key] = state
            self._out.append(command)

    def _start_timer(self, state: StepState, what: str, seconds: float, due: float | None = None) -> None:
        """Start ``state``'s timer ``what`` (``retry``, ``timeout<attempt>``, ``wait``, ``delay``), keyed
        ``<step key>#<what>``; ``due``: the wall-clock time it fires at instead.

        A step that a container's retry replaced keeps its key, and its timers may still be pending:
        the new one's get another key (``~2``…), so a firing always reaches the step that started it."""
        key = base = f"{state.key}#{what}"
        n = 1
        while key in self._timers:
            n += 1
            key = f"{base}~{n}"
        timer = self._timers[key] = StartTimer(key, seconds, due)
        self._timer_owners[key] = (state, what)
        self._out.append(timer)
