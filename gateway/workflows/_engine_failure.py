"""Tries and failures, for the engine (:mod:`gateway.workflows.engine`).

A try's outcome is checked against the step's ``success`` condition; a success is recorded (for
compensation, when the step has one); a failure cancels what the step holds inside, then is retried (a
timer, :func:`~gateway.workflows.retries.retry_wait`), or its ``on_error`` decides: ``continue``, the
fallback steps, ``{default: …}`` (the step degraded), or ``fail`` up to what contains it
(:mod:`~gateway.workflows._engine_settling`). A retried container starts over, what it held forgotten.
"""

from dataclasses import replace
from typing import Any

from gateway.workflows._engine_sites import PLAIN, EvaluationSites
from gateway.workflows._runstate import PARKED, SETTLED, Site, StepState
from gateway.workflows.commands import Cancel, StepError
from gateway.workflows.expressions import ExpressionError
from gateway.workflows.model import OnErrorDefault
from gateway.workflows.retries import retry_wait

__all__ = ["Failures"]


class Failures(EvaluationSites):
    """A try's end, success and failure: retries, ``on_error`` (continue, fallback, default) and cancelling
    what a failed step holds."""

    def _tried(self, state: StepState, result: Any, error: StepError | None, random: float, site: Site | None) -> None:
        """A try of ``state`` ended: it succeeded if its ``success`` condition holds (which may wait for jq)."""
        condition = state.plan.success
        if error is None and condition is not None:
            scope = self.scope(state.frame)
            scope["result"] = result
            holds: Any
            try:
                if condition.is_path:
                    holds = condition.holds(scope, PLAIN)
                else:
                    holds = self._at(site, scope, condition.holds, "success", state, result=result, random=random)
            except ExpressionError as exc:
                holds = StepError("error", exc.detail, state.key)
            if holds is PARKED:
                return
            if isinstance(holds, StepError):
                error = holds
            elif not holds:
                message = f"the success condition {state.plan.step.success!r} does not hold"
                error = StepError("error", message, state.key)
        if error is None:
            self._succeed(state, result)
        else:
            self._fail(state, replace(error, step=error.step or state.key), random)  # every other field kept

    def _succeed(self, state: StepState, result: Any) -> None:
        state.result, state.error = result, None
        if state.plan.step.compensate is not None:
            self._completed.append(state)
        self._settle(state, "succeeded")

    def _fail(self, state: StepState, error: StepError, random: float = 0.5) -> None:
        """``state`` failed; ``random`` jitters a retry (0.5: none, for failures that are not a try's outcome)."""
        if state.status in SETTLED:
            return
        self._unwanted = True
        self._cancel_inside(state)
        step = state.plan.step
        delay = retry_wait(state, error, random) if state.status != "fallback" else None
        if delay is not None:
            state.status, state.error = "retrying", error
            self._start_timer(state, "retry", delay)
            return
        state.error = error
        fallback = state.plan.children.get("fallback", ())
        if isinstance(step.on_error, OnErrorDefault):
            self._degrade(state)
        elif step.on_error == "continue":
            state.continued = True
            self._settle(state, "failed")
        elif fallback and state.status != "fallback":
            state.status = "fallback"
            self._settle_entry(state, "failed")  # fallbacks may read the error
            self._activate(state.frame, fallback)
        else:
            self._settle(state, "failed")

    def _degrade(self, state: StepState, site: Site | None = None) -> None:
        """``state`` failed after its retries and its ``on_error`` has a default: it succeeds with that value,
        marked degraded, its error kept (``site``: its default's evaluation came back). The default is evaluated
        over the run's context, where the step's own failure is ``.steps.<id>.error``; one that cannot be
        evaluated fails the step after all."""
        if site is None:
            self._settle_entry(state, "failed")  # so the default may read the step's error
        state.status = "degrading"
        try:
            value = self._at(site, self.scope(state.frame), state.plan.values["default"].evaluate, "default", state)
        except ExpressionError as exc:
            state.error = StepError("error", f"on_error default: {exc.detail}", state.key)
            self._settle(state, "failed")
            return
        if value is PARKED:
            return
        state.result, state.degraded = value, True
        self._settle(state, "succeeded")  # not _succeed: nothing happened that a compensation would undo

    def _restart(self, state: StepState) -> None:
        """Try a step again after a failure: a container starts over, what it held forgotten."""
        for step_id in self.plan.descendants[state.plan.id]:
            old = state.frame.states.pop(step_id, None)
            state.frame.entries.pop(step_id, None)
            if old is not None:
                self._by_key.pop(old.key, None)
        state.status, state.branch = "waiting", None
        self._begin(state)

    def _cancel_inside(self, state: StepState) -> None:
        """Cancel everything in flight or queued inside ``state`` (a container that failed), and forget its loop
        delay (a timer whose firing is then ignored: its key stays taken until then, so no later timer gets it)."""
        self._unwanted = True
        if state.agent is not None:  # its turn or calls in flight
            for key in state.agent.in_flight:
                self._in_flight.pop(key, None)
                self._out.append(Cancel(key))
            state.agent.in_flight.clear()
        for key in [key for key, (owner, what) in self._timer_owners.items() if owner is state and what == "delay"]:
            del self._timer_owners[key]
        inside = self.plan.descendants[state.plan.id]
        if not inside:
            return
        prefix = state.key + "["
        for key, other in list(self._in_flight.items()):
            if other.plan.id in inside and (other.frame is state.frame or key.startswith(prefix)):
                del self._in_flight[key]
                other.status = "cancelled"
                self._out.append(Cancel(key))
        for other, _ in self._queue:
            if other.plan.id in inside and (other.frame is state.frame or other.key.startswith(prefix)):
                other.status = "cancelled"
        for key, other in self._by_key.items():
            if other.status in ("waiting", "retrying", "evaluating", "degrading", "timing") and other.plan.id in inside:
                if other.frame is state.frame or key.startswith(prefix):
                    other.status = "cancelled"
