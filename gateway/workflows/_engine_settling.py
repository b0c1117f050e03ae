"""Settling, for the engine (:mod:`gateway.workflows.engine`): a step's end recorded and passed on.

A settled step is an entry of its frame's ``.steps`` and a :class:`~gateway.workflows.commands.Settled`
note; its dependents, in its frame or the iterations inside it, are woken; whatever contains it (a
container, an iteration, the run) is told. A failure that nothing absorbs fails what contains the step, up
to the run.
"""

from gateway.workflows._engine_base import RunBase
from gateway.workflows._runstate import Frame, StepState
from gateway.workflows.commands import Settled, Status, StepError

__all__ = ["Settling"]


class Settling(RunBase):
    """Settling steps, waking their dependents, and passing a failure up."""

    def _settle_entry(self, state: StepState, status: str) -> None:
        error = state.error.as_json() if state.error is not None else None
        state.frame.entries[state.plan.id] = {"result": state.result, "error": error, "status": status}

    def _settle(self, state: StepState, status: Status, *, notify: bool = True) -> None:
        state.status = status
        self._settle_entry(state, status)
        note = Settled(state.key, state.plan.id, status, state.attempt, state.result, state.error, state.degraded)
        self._out.append(note)
        if not notify:
            return
        if status == "failed" and not state.continued:
            self._propagate_failure(state)
            return
        for dependent in self.plan.dependents[state.plan.id]:
            for frame in self._frames_seeing(state.frame, dependent):
                waiting = frame.states.get(dependent)
                if waiting is not None and waiting.status == "waiting":
                    self._wake.append(waiting)
        self._after_settle(state)

    def _frames_seeing(self, frame: Frame, step_id: str) -> list[Frame]:
        """The frames, ``frame`` or iterations inside it, in which ``step_id`` may wait for a step of ``frame``."""
        region = self.plan.regions[step_id]
        found: list[Frame] = []
        pending = [frame]
        while pending:
            inner = pending.pop()
            if inner.region == region:
                found.append(inner)
            else:
                pending.extend(f for s in inner.states.values() for f in s.iterations.values())
        return found

    def _after_settle(self, state: StepState) -> None:
        """Tell whatever contains ``state`` that it settled."""
        node = state.plan.node
        if node.parent is not None and node.branch != "body":
            parent = state.frame.states.get(node.parent)
            if parent is not None:
                self._check_container(parent)
        elif state.frame.owner is not None:
            self._check_iteration(state.frame)
        else:
            self._unsettled_top -= 1
            self._check_run()

    def _propagate_failure(self, state: StepState) -> None:
        node = state.plan.node
        error = state.error or StepError("error", "failed", state.key)
        if node.parent is not None and node.branch != "body":
            parent = state.frame.states[node.parent]
            if parent.status == "fallback":  # its fallback failed too: there is no second one
                self._cancel_inside(parent)
                parent.error = error
                self._settle(parent, "failed")
            else:
                self._fail(parent, error)
        elif state.frame.owner is not None:
            self._fail(state.frame.owner, error)
        else:
            self._fail_run(error)
