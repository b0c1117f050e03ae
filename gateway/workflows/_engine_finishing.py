"""Compensating and finishing, for the engine (:mod:`gateway.workflows.engine`).

A run succeeds when its top-level steps have settled, with its output (which may wait for jq); a failed or
cancelled run cancels what is in flight, runs the ``compensate`` calls of the steps that succeeded, one at
a time, in reverse order of completion, and finishes failed. A run that is over lets go of its frames.
"""

from gateway.workflows._engine_sites import EvaluationSites
from gateway.workflows._runstate import PARKED, Site
from gateway.workflows.commands import CallTool, Cancel, Command, Finished, StepError
from gateway.workflows.expressions import ExpressionError

__all__ = ["Finishing"]


class Finishing(EvaluationSites):
    """The run's end: its output, compensation, :class:`~gateway.workflows.commands.Finished`."""

    def _check_run(self, site: Site | None = None) -> None:
        if self.status != "running" or self._unsettled_top:
            return
        states = [self._root.states[step_id] for step_id in self.plan.top]
        try:
            if self.plan.output is not None:
                scope = self.scope()
                output = self._at(site, scope, self.plan.output.evaluate, "run", None)
                if output is PARKED:
                    return
            else:
                output = {s.plan.id: s.result for s in states if s.status == "succeeded"}
        except ExpressionError as exc:
            self._fail_run(StepError("error", f"the output: {exc.detail}"))
            return
        self.status = "succeeded"
        self._unwanted = True
        self._out.append(Finished("succeeded", output))
        self._release()

    def _fail_run(self, error: StepError) -> None:
        self.status = "compensating"
        self._unwanted = True
        self._failure = error
        for key, state in self._in_flight.items():
            state.status = "cancelled"
            self._out.append(Cancel(key))
        self._in_flight.clear()
        self._queue.clear()
        self._compensate_next()

    def _compensate_next(self, site: Site | None = None) -> None:
        """Start the next compensation (``site``: the one whose arguments waited for jq), or finish."""
        while site is not None or self._completed:
            state = site.state if site is not None else self._completed.pop()
            assert state is not None
            spec = state.plan.step.compensate
            assert spec is not None
            scope = self.scope(state.frame)
            self._compensating = state
            try:
                arguments = self._at(site, scope, state.plan.values["compensate"].evaluate, "compensate", state)
            except ExpressionError as exc:
                self._compensation_errors.append(StepError("error", exc.detail, state.key))
                site = None
                continue
            if arguments is PARKED:
                return
            key = f"{state.key}#compensate"
            call = CallTool(key, state.plan.id, 1, spec.call, arguments, None, f"{self.run_id}:{key}", True)
            self._compensation = call
            self._out.append(call)
            return
        self._compensating = None
        self.status = "failed"
        self._unwanted = True
        self._out.append(Finished("failed", error=self._failure, compensation_errors=tuple(self._compensation_errors)))
        self._release()

    def _release(self) -> None:
        """The run is over: break its frame ↔ state reference cycles, so its memory goes back at once
        instead of at the next full garbage collection (which walks the whole heap)."""
        self._timers.clear()  # the runner stops its timers when the run is over
        self._timer_owners.clear()
        frames = [self._root]
        while frames:
            frame = frames.pop()
            for state in frame.states.values():
                frames.extend(state.iterations.values())
                state.iterations = {}
            frame.states = {}

    def _compensated(self, key: str, error: StepError | None) -> list[Command]:
        state = self._compensating
        if state is None or key != f"{state.key}#compensate":
            return []
        self._compensation = None
        if error is not None:
            self._compensation_errors.append(StepError(error.kind, f"compensation failed: {error.message}", state.key))
        self._compensate_next()
        return self._flush()
