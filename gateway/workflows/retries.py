"""When a failed try of a workflow step is tried again, and after how long (DESIGN §3, ``retry``).

A call refused before it reached the tool (its error carries ``retry_after``: rate limited, circuit
open, server not connected) is tried again after the wait it was told, even without ``retry:``, as
long as the waits add up to no more than the step's ``timeout`` (:data:`REFUSAL_BUDGET` without
one); such tries do not count against ``retry.attempts``. Other failures are retried when
``retry.on`` names their kind, after ``backoff · 2^(try-1)`` seconds (at most ``max_backoff``,
varied by ``jitter`` with the random number that came with the failure). Pure: the engine's.
"""

from gateway.workflows._runstate import StepState
from gateway.workflows.commands import StepError, retry_delay

__all__ = ["REFUSAL_BUDGET", "retry_wait"]

REFUSAL_BUDGET = 30.0
"""Seconds a step without a ``timeout`` may spend waiting to retry calls refused before they reached the tool."""
_REFUSAL_FLOOR = 0.05
"""Seconds before the first retry of a refusal that hints no wait (a concurrency limit); doubled per refusal."""
_REFUSAL_CEILING = 2.0
"""The longest of those floors: a refusal's own hint may be longer."""
_REFUSAL_JITTER = 0.1
"""Refusal waits are stretched by up to this fraction, so steps refused together do not return in lockstep."""


def retry_wait(state: StepState, error: StepError, random: float) -> float | None:
    """Seconds to wait before trying ``state`` again after ``error``, or None: no more tries.

    A refusal tried again is counted in ``state.refusals`` and its wait in ``state.waited``."""
    step = state.plan.step
    if error.retry_after is not None:  # refused before it reached the tool: nothing happened, so try again
        floor = min(_REFUSAL_FLOOR * 2.0**state.refusals, _REFUSAL_CEILING)
        wait = max(error.retry_after, floor) * (1 + _REFUSAL_JITTER * random)
        budget = step.timeout if step.timeout is not None else REFUSAL_BUDGET
        if state.waited + wait <= budget:
            state.refusals += 1
            state.waited += wait
            return wait
    retry = step.retry
    tries = state.attempt - state.refusals
    if retry is None or error.kind not in retry.on or tries >= retry.attempts:
        return None
    delay: float = retry_delay(tries, retry.backoff, retry.max_backoff, retry.jitter, random)
    return max(delay, error.retry_after or 0.0)
