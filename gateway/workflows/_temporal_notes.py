"""The ``Settled`` notes of a run on Temporal, recovered by replaying its history: how ``patchbay runs RUN_ID``
shows each of its steps as a local run's journal does (:mod:`gateway.workflows.history`).

A local run journals its engine's notes (``step_settled``: skipped, degraded and all). The Temporal workflow
(:class:`~gateway.workflows.temporal.PatchbayRun`) records them nowhere durable (its ``progress`` query keeps
the last few, without times), and they need not be: its history holds every input it fed its engine (each
try's outcome as it mapped its activity's, a question's default when nobody could be asked, the jq outcomes
of its local activities, timer firings, the retry jitter its seeded random drew, a cancellation, the journal a
continued execution was carried), and the engine is deterministic. So the history is replayed through the
workflow's own code (Temporal's :class:`~temporalio.worker.Replayer`, as a worker replays a run it did not
cache), by :class:`_Rereading`: the workflow, collecting each note with the workflow time of the workflow task
that made it, and each try's outcome as the engine was given it (an activity's failure as the workflow read it:
``unavailable`` for a replica that died, ``timeout``...). Recording the notes instead would cost the history an
event per workflow task and grow it with the run (toward Temporal's limits, and a continue-as-new sooner);
replaying costs a read (a few milliseconds a run), and whatever the engine settles (new step kinds included)
shows with no change here.

The replay needs the run's plan (that workflow at that digest): without it (the workflow changed since, or is
gone), or should the replay fail, there is nothing (None), and the reader falls back to what the activities
show.
"""

import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from temporalio import workflow
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

import gateway.workflows._temporal_plans as _temporal_plans
from gateway.workflows.commands import Command, Iterated, Settled, StepError
from gateway.workflows.engine import Run
from gateway.workflows.plan import Plan
from gateway.workflows.temporal import PatchbayRun, _Event
from gateway.workflows.temporal_types import WORKFLOW_TYPE, RunInput, RunResult

__all__ = ["Note", "Replayed", "replay_history"]

logger = logging.getLogger(__name__)

Note = tuple[float, Settled]
"""A step's settling, and when (the workflow task's time, seconds since the epoch)."""


@dataclass
class Replayed:
    """What a replay of a run's history gave."""

    notes: list[Note] = field(default_factory=list)
    """The steps' ends, in the order they were made."""
    outcomes: dict[tuple[str, int], tuple[Any, StepError | None]] = field(default_factory=dict)
    """Each try's outcome (result, error) as the engine was given it, by key and attempt."""


_replays: dict[str, Replayed] = {}
"""What each replay gave so far, by the workflow id it replays under (one of its own: replays may overlap)."""


@workflow.defn(name=WORKFLOW_TYPE, sandboxed=False)
class _Rereading(PatchbayRun):
    """The run's workflow, replayed: each ``Settled`` note collected too."""

    @workflow.run
    async def run(self, start: RunInput) -> RunResult:
        return await super().run(start)

    def _settled(self, note: Settled | Iterated) -> None:
        super()._settled(note)
        if isinstance(note, Settled):  # a loop's iterations are progress only, as in a local run's journal
            _replays[workflow.info().workflow_id].notes.append((workflow.now().timestamp(), note))

    def _feed(self, engine: Run, event: _Event) -> list[Command]:
        kind, key, attempt, result, error = event
        if kind == "done":
            _replays[workflow.info().workflow_id].outcomes[key, attempt] = (result, error)
        return super()._feed(engine, event)


async def replay_history(client: Client, plan: Plan, executions: Sequence[Sequence[HistoryEvent]]) -> Replayed | None:
    """The notes and tries' outcomes of the run of ``plan`` whose executions' histories are ``executions`` (the
    first execution's first); None when the replay failed (the history is not what ``plan`` does)."""
    token = uuid.uuid4().hex
    ids = [f"{token}.{index}" for index in range(len(executions))]
    for workflow_id in ids:
        _replays[workflow_id] = Replayed()

    async def histories() -> AsyncIterator[WorkflowHistory]:
        for workflow_id, events in zip(ids, executions, strict=True):
            yield WorkflowHistory(workflow_id, list(events))

    executor = ThreadPoolExecutor(max_workers=1)  # the replayer's own would never be shut down
    replayer = Replayer(
        workflows=[_Rereading],
        workflow_task_executor=executor,
        workflow_runner=UnsandboxedWorkflowRunner(),
        data_converter=client.data_converter,
    )
    _temporal_plans.hold([plan])
    try:
        async with replayer.workflow_replay_iterator(histories()) as replayed:
            async for result in replayed:
                if result.replay_failure is not None:
                    logger.info("a run of %r did not replay: %s", plan.name, result.replay_failure)
                    return None
        replays = [_replays[workflow_id] for workflow_id in ids]
        outcomes = {tried: outcome for replay in replays for tried, outcome in replay.outcomes.items()}
        return Replayed([note for replay in replays for note in replay.notes], outcomes)
    finally:
        executor.shutdown(wait=False)
        _temporal_plans.release([plan])
        for workflow_id in ids:
            _replays.pop(workflow_id, None)
