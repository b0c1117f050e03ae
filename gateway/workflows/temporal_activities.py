"""The activities of a workflow run on Temporal (DESIGN §6): what the generic workflow
(:mod:`gateway.workflows.temporal`) has this replica's workers do outside the workflow, where I/O is allowed.

* ``patchbay.step``: a step's call (``CallTool``), on the run's own task queue, through the ``execute``
  callable the engine was given (in the gateway, the dispatch path); a question of a run without a client
  to ask goes there too, and ``execute`` answers it.
* ``patchbay.ask``: a question (``AskUser``, ``AskModel``, an agent's turn ``AskAgent``) of the run's client,
  on the queue of the replica holding the client's request, asked through that request
  (:mod:`gateway.workflows.callers`).
* ``patchbay.evaluate``: a jq program, run in the bounded worker pool
  (:func:`~gateway.workflows.expressions.run_program`) as a local activity of the workflow's own worker.

A step or a question heartbeats while it runs (which is how a cancellation reaches it and how a dead worker
is noticed), and it enforces the step's timeout itself, so the call is stopped, not only given up on. It
never raises but for cancellation: an error becomes the step's outcome (:class:`StepOutcome`). The workflow
never imports this module (its code does I/O): it names the activities (:mod:`gateway.workflows.temporal_types`).
"""

import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import anyio
from temporalio import activity

from gateway.errors import GatewayError
from gateway.workflows.commands import Leaf, StepError
from gateway.workflows.expressions import run_program
from gateway.workflows.temporal_types import (
    ASK_ACTIVITY,
    EVALUATE_ACTIVITY,
    LEAVES,
    STEP_ACTIVITY,
    Evaluated,
    Evaluation,
    StepOutcome,
    StepTask,
)

__all__ = ["Execute", "Steps", "evaluate"]

logger = logging.getLogger(__name__)

Execute = Callable[[Leaf, str, dict[str, str]], Awaitable[tuple[Any, StepError | None]]]
"""``async (command, run_id, caller) -> (result, error)``: make a step's call or ask its question (the
gateway's dispatch path); ``caller`` is ``{kind, id}``. Cancelled when the engine cancels the step."""


class Steps:
    """The step and question activities, bound to the ``execute`` and ``ask`` of the engine whose workers run them."""

    def __init__(self, execute: Execute, ask: Execute, heartbeat: float) -> None:
        self._execute = execute
        self._ask = ask
        self._heartbeat = heartbeat

    @activity.defn(name=STEP_ACTIVITY)
    async def step(self, task: StepTask) -> StepOutcome:
        """Make the call (or, for a run without a client, answer the question), heartbeating meanwhile
        (cancellation comes as a heartbeat's answer)."""
        return await self._run(self._execute, task)

    @activity.defn(name=ASK_ACTIVITY)
    async def ask(self, task: StepTask) -> StepOutcome:
        """Ask the client of the run, whose request this replica holds, heartbeating meanwhile."""
        return await self._run(self._ask, task)

    async def _run(self, execute: Execute, task: StepTask) -> StepOutcome:
        command = LEAVES[task.kind](**task.command)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._beat)
            result, error = await self._perform(execute, command, task)
            tg.cancel_scope.cancel()
        return StepOutcome(result, asdict(error) if error is not None else None)

    async def _beat(self) -> None:
        while True:
            activity.heartbeat()
            await anyio.sleep(self._heartbeat)

    async def _perform(self, execute: Execute, command: Leaf, task: StepTask) -> tuple[Any, StepError | None]:
        """The outcome, within the step's timeout. Raises only cancellation."""
        with anyio.move_on_after(command.timeout):
            try:
                return await execute(command, task.run_id, task.caller)
            except GatewayError as exc:
                return None, StepError(exc.outcome, str(exc), retry_after=exc.retry_after)
            except Exception as exc:  # the step boundary: one step's bug fails the step, not the worker
                logger.exception("run %s: step %s raised", task.run_id, command.key)
                return None, StepError("error", f"internal error: {exc!r}")
        return None, StepError("timeout", f"no answer within the step's timeout of {command.timeout:g}s")


@activity.defn(name=EVALUATE_ACTIVITY)
async def evaluate(task: Evaluation) -> Evaluated:
    """Run a jq program in the bounded worker pool (a local activity: on the workflow's own worker)."""
    outcome = await run_program(task.source, task.data)
    return Evaluated(outcome.value, outcome.error, outcome.empty)
