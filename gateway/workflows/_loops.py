"""The pure parts of a ``loop`` step, for the engine (:mod:`gateway.workflows.engine`): no I/O, no clock.

A loop runs its body in a fresh frame per iteration (``poll[2]/status`` is the key of step ``status`` in
iteration 2), with ``.iteration`` (from 1) and ``.last`` (the previous iteration's output, null in the
first) bound. When an iteration's steps have settled, its output is evaluated and then the loop's
``until`` condition, over the iteration's steps with ``.last`` the output just made; when it does not
hold and iterations are left, the next one starts after :func:`delay_after` seconds (a timer), or at once.
"""

from typing import Any

from gateway.workflows._runstate import Frame, StepState
from gateway.workflows.expressions import Lookup, Scope
from gateway.workflows.model import Loop, LoopStep

__all__ = ["delay_after", "iteration_frame", "iteration_end"]


def delay_after(loop: Loop, iteration: int) -> float:
    """Seconds to wait between iteration ``iteration`` (from 1) and the next: ``delay · backoff^(iteration-1)``,
    at most ``max_delay``; 0: none."""
    if loop.delay is None:
        return 0.0
    try:
        seconds = loop.delay * loop.backoff ** (iteration - 1)
    except OverflowError:  # a large backoff over many iterations: the cap, or as long as a float goes
        seconds = float("inf")
    if loop.max_delay is not None:
        seconds = min(seconds, loop.max_delay)
    return min(seconds, 1e9)  # a timer of ~31 years: a loop with no cap still gets a finite timer


def iteration_frame(state: StepState, iteration: int) -> Frame:
    """The frame of iteration ``iteration`` of the loop ``state``, its names bound (``.last``: ``state.last``)."""
    step = state.plan.step
    assert isinstance(step, LoopStep)
    bindings = {"iteration": iteration, "last": state.last}
    return Frame(f"{state.key}[{iteration}]/", step.id, state.frame, bindings, owner=state, index=iteration)


def iteration_end(state: StepState, frame: Frame, scope: Scope, lookup: Lookup) -> tuple[Any, bool]:
    """The output of the iteration ``frame`` of the loop ``state`` (whose steps have all settled), and whether
    the loop's condition holds after it. Raises ExpressionError; see :class:`Lookup` for ``lookup``: the
    condition is asked for only once the output is known, since it reads it as ``.last``."""
    plan = state.plan
    if "output" in plan.values:
        output = plan.values["output"].evaluate(scope, lookup)
        if lookup.missing:
            return None, False
    else:
        body = plan.children.get("body", ())
        output = frame.states[body[-1]].result if body else None
    assert plan.until is not None
    return output, plan.until.holds({**scope, "last": output}, lookup)
