"""Runs on Temporal read back as the store's records (``gateway.engine: temporal://…``).

Temporal is the record of the runs it carries: nothing about them is kept in the store as well. A run's
:class:`~gateway.store.RunRecord`, which tasks (``gateway.tasks``), ``patchbay runs`` and the
``patchbay://runs/{run_id}`` resource read, is built from what Temporal says of its workflow execution:

* its status (Running: ``running``; Completed: ``succeeded``; Failed, Terminated, TimedOut: ``failed``;
  Canceled: ``cancelled``; a run is never ``interrupted`` there, as another replica carries it on), its
  start and close times;
* its memo (:data:`~gateway.workflows.temporal_types.MEMO`, written when it started): this gateway's task queue,
  the workflow and its digest, the caller, and for a task its parameters and idempotency key. A memo is
  not searchable (a custom search attribute would be, but needs registering in the namespace), so runs
  are chosen by caller, workflow and gateway here, after Temporal's own filters (type, status, start time);
* once it has ended, its result (the ``CallToolResult`` the call returns: :func:`wire_result`).

:meth:`TemporalRecords.events` turns the execution's history into journal events, so that a run's timeline
(``gateway.workflows.history``) reads the same on both engines. What the run's history is replayed to through
the workflow (:mod:`gateway.workflows._temporal_notes`, with the records' ``plans``: the run's workflow at the
digest it ran) gives what a local journal has: each try of a step is its activity (a call's or a question's;
scheduled: ``step_started``; completed, failed or timed out: ``step_done``, with the outcome as the engine was
fed it), and each step's end (``step_settled``: succeeded, degraded, failed, skipped, cancelled; ``set``,
``wait``, ``switch``, ``for_each`` and ``fail`` steps included) is the engine's own ``Settled`` note, at the
time of the workflow task that made it. A compensation settles with its call, as locally. Without the plan
(the workflow changed since, or is gone) or should the replay fail, each try's outcome is its activity's, a step
whose last try has ended settles with that try's outcome once the run has ended (while it runs, a failed try
may be tried again), the steps without tries are not shown, and the timeline's note says so
(``run_noted``). Evaluations and timers are not shown, as locally.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from gateway.store import RunRecord, RunStatus
from gateway.types import RUN_META_KEY, ToolResult
from gateway.workflows._temporal_notes import Replayed, replay_history
from gateway.workflows.commands import StepError, started_data
from gateway.workflows.history import COMPENSATE
from gateway.workflows.journal import JournalEvent
from gateway.workflows.plan import Plan
from gateway.workflows.temporal_engine import result_of
from gateway.workflows.temporal_types import (
    ASK_ACTIVITY,
    LEAVES,
    MEMO,
    STEP_ACTIVITY,
    WORKFLOW_TYPE,
    RunInput,
    StepOutcome,
    StepTask,
)

__all__ = ["TemporalRecords", "wire_result"]

_STATUSES: dict[WorkflowExecutionStatus, RunStatus] = {
    WorkflowExecutionStatus.RUNNING: "running",
    WorkflowExecutionStatus.COMPLETED: "succeeded",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.TERMINATED: "failed",
    WorkflowExecutionStatus.TIMED_OUT: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
}
"""A continued-as-new execution is none of these: its run goes on in the next execution of the same id."""
_QUERIES: dict[RunStatus, str] = {
    "running": "ExecutionStatus = 'Running'",
    "succeeded": "ExecutionStatus = 'Completed'",
    "failed": "ExecutionStatus IN ('Failed', 'Terminated', 'TimedOut')",
    "cancelled": "ExecutionStatus = 'Canceled'",
}


def wire_result(workflow: str, run_id: str, ended: Mapping[str, Any]) -> ToolResult:
    """What a call of ``workflow`` returns once its run ended as ``ended`` (a
    :class:`~gateway.workflows.temporal_types.RunResult`'s fields): the output as text and structured content, or
    an error naming the failed step and the compensations that failed; ``_meta`` names the run."""
    meta = {RUN_META_KEY: run_id}
    if ended.get("status") == "succeeded":
        output = ended.get("output")
        text = output if isinstance(output, str) else json.dumps(output, indent=2, ensure_ascii=False)
        structured = output if isinstance(output, Mapping) else None
        return ToolResult(({"type": "text", "text": text},), structured_content=structured, meta=meta)
    message = f"workflow {workflow!r} failed: {_error_text(ended)}"
    compensations = [StepError(**e).describe() for e in ended.get("compensation_errors") or ()]
    if compensations:
        message += "; " + "; ".join(compensations)
    message += f" (run {run_id})"
    return ToolResult(({"type": "text", "text": message},), is_error=True, meta=meta)


def _error_text(ended: Mapping[str, Any]) -> str:
    error = ended.get("error")
    return StepError(**error).describe() if isinstance(error, Mapping) else "compensation did not finish"


class TemporalRecords:
    """The runs of the gateway whose task queue stem is ``task_queue``, as Temporal has them, through
    ``client`` (connected to their namespace); ``plans``, the gateway's workflows by name, are what a run's
    history is replayed with for its steps' ends (:meth:`events`)."""

    def __init__(self, client: Client, task_queue: str, plans: Mapping[str, Plan] | None = None) -> None:
        self.client = client
        self.task_queue = task_queue
        self.plans: Mapping[str, Plan] = plans or {}

    async def record(self, run_id: str) -> RunRecord | None:
        """Run ``run_id``'s record (with its result, once it has ended); None when Temporal knows no such run of
        this gateway."""
        try:
            execution = await self.client.get_workflow_handle(run_id).describe()
        except RPCError as exc:
            if exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
                return None
            raise
        return await self._record(execution, result=True)

    async def records(
        self,
        *,
        workflow: str | None = None,
        status: RunStatus | None = None,
        since: float | None = None,
        caller: tuple[str, str] | None = None,
        tasks_only: bool = False,
    ) -> list[RunRecord]:
        """This gateway's runs, most recent first: of ``workflow``, in ``status``, started at or after ``since``
        (wall-clock seconds), by ``caller`` (``(kind, id)``), started as tasks (``tasks_only``). A failed run's
        record carries its error and failed step (one more request each); the others' have no result."""
        if status == "interrupted":
            return []  # never, on Temporal
        query = [f"WorkflowType = '{WORKFLOW_TYPE}'"]
        if status is not None:
            query.append(_QUERIES[status])
        if since is not None:
            query.append(f"StartTime >= '{datetime.fromtimestamp(since, UTC).isoformat()}'")
        found: list[RunRecord] = []
        async for execution in self.client.list_workflows(" AND ".join(query)):
            memo = await self._memo(execution)
            if memo is None or (workflow is not None and memo.get("workflow") != workflow):
                continue
            if caller is not None and _caller(memo) != caller:
                continue
            if tasks_only and memo.get("task") is None:
                continue
            record = await self._record(execution, result=execution.status == WorkflowExecutionStatus.FAILED)
            if record is not None:
                found.append(record)
        return sorted(found, key=lambda record: record.started_at, reverse=True)

    async def _memo(self, execution: WorkflowExecution) -> dict[str, Any] | None:
        """The run's memo, if it is a run of this gateway's."""
        memo = (await execution.memo()).get(MEMO)
        return memo if isinstance(memo, dict) and memo.get("queue") == self.task_queue else None

    async def _record(self, execution: WorkflowExecution, *, result: bool) -> RunRecord | None:
        status = _STATUSES.get(execution.status) if execution.status is not None else None
        memo = await self._memo(execution)
        if status is None or memo is None:
            return None
        started = float(memo.get("started") or execution.start_time.timestamp())  # the latest execution's start
        finished = execution.close_time.timestamp() if execution.close_time is not None else None
        ended = await result_of(self.client, execution.id) if result and status != "running" else None
        error = ended.get("error") if ended is not None else None
        kind, caller = _caller(memo)
        return RunRecord(
            run_id=execution.id,
            workflow=str(memo.get("workflow", "")),
            status=status,
            started_at=started,
            caller_kind=kind,
            caller_id=caller,
            plan=memo.get("plan"),
            failed_step=(error.get("step") or None) if isinstance(error, Mapping) else None,
            finished_at=finished,
            duration_ms=round((finished - started) * 1000, 3) if finished is not None else None,
            error=_error_text(ended) if ended is not None and ended.get("status") != "succeeded" else None,
            result=wire_result(str(memo.get("workflow")), execution.id, ended).wire() if ended is not None else None,
            task=memo.get("task"),
            idempotency_key=memo.get("idempotency_key"),
            updated_at=finished if finished is not None else started,
        )

    async def events(self, run_id: str) -> list[JournalEvent]:
        """Run ``run_id``'s history as journal events (see the module's docstring), every execution of it (a
        run that continued as new has several: read from the latest back); none for an unknown run."""
        try:
            history = await self.client.get_workflow_handle(run_id).fetch_history()
        except RPCError as exc:
            if exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
                return []
            raise
        executions = [history.events]
        while previous := _continued_from(executions[-1]):
            older = await self.client.get_workflow_handle(run_id, run_id=previous).fetch_history()
            executions.append(older.events)
        executions.reverse()
        reader = _Reader(self.client, run_id)
        start = reader.start(executions[0])
        if start is None:
            return []
        plan = self.plans.get(start.workflow)
        if plan is None or plan.digest != start.digest:
            why = f"this gateway does not hold workflow {start.workflow!r} as the run ran it"
            return reader.read(executions, None, why)
        replayed = await replay_history(self.client, plan, executions)
        return reader.read(executions, replayed, "its history did not replay")


class _Reader:
    """One run's history, read into journal events."""

    def __init__(self, client: Client, run_id: str) -> None:
        self._convert = client.data_converter.payload_converter
        self._run_id = run_id
        self._events: list[JournalEvent] = []
        self._tries: dict[int, tuple[str, int, str]] = {}
        """The step activities by the id of their scheduling event: (key, attempt, step)."""
        self._asked: set[tuple[str, int]] = set()
        """The tries begun: a question withdrawn and asked at another replica is one try."""
        self._last: dict[str, JournalEvent] = {}
        """Each step's last try's outcome."""
        self._began: dict[str, float] = {}
        """When each step's last try was scheduled: its duration counts from there, as a local run's does."""
        self._outcomes: Mapping[tuple[str, int], tuple[Any, StepError | None]] = {}
        """Each try's outcome as the engine had it, when the history was replayed."""

    def start(self, history: Sequence[HistoryEvent]) -> RunInput | None:
        """The run's input, from its first execution's history (None if that does not begin with it)."""
        if not history or history[0].event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            return None
        payloads = history[0].workflow_execution_started_event_attributes.input.payloads
        start: RunInput = self._convert.from_payloads(payloads, [RunInput])[0]
        return start

    def read(
        self, executions: Sequence[Sequence[HistoryEvent]], replayed: Replayed | None, why: str
    ) -> list[JournalEvent]:
        """The journal events of a run's executions' histories (the first execution's first), in time order, with
        what ``replayed`` them gave (each try's outcome as the engine had it, each step's end); without it (``why``),
        each try's outcome as its activity's, each step's end as its last try's once the run ended."""
        self._outcomes = replayed.outcomes if replayed is not None else {}
        ended = False
        for execution in executions:
            self._tries = {}  # event ids count from 1 in each execution
            ended = self._read(execution, first=not self._events)
        for key, done in self._last.items():
            if key.endswith(COMPENSATE) or (replayed is None and ended):  # what tries next is known once the run ended
                failure = done.data.get("error")
                status = "failed" if failure else "succeeded"
                data = {"status": status, "result": done.data.get("result"), "error": failure}
                self._add(done.at, "step_settled", key, done.attempt, {**data, "duration_ms": self._took(key, done.at)})
        if replayed is None and self._events:
            message = f"{_GUESSED} ({why})"
            self._add(self._events[0].at, "run_noted", None, 0, {"message": message})
        for at, note in replayed.notes if replayed is not None else ():
            took = self._took(note.key, at) if note.key in self._began else None  # a step with tries of its own
            self._add(at, "step_settled", note.key, note.attempts, note.journaled(took))
        ordered = sorted(self._events, key=lambda event: event.at)  # stable: the order read, within a time
        return [replace(event, seq=seq) for seq, event in enumerate(ordered)]

    def _took(self, key: str, at: float) -> float:
        return round((at - self._began.get(key, at)) * 1000, 3)

    def _read(self, history: Sequence[HistoryEvent], *, first: bool) -> bool:
        """Read one execution's events (``first``: the run's first); whether the run ended in it."""
        ended = False
        for event in history:
            at = event.event_time.ToDatetime(tzinfo=UTC).timestamp()
            kind = event.event_type
            if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
                if not first:  # a continued execution: the same run goes on
                    continue
                payloads = event.workflow_execution_started_event_attributes.input.payloads
                start = self._convert.from_payloads(payloads, [RunInput])[0]
                data = {"workflow": start.workflow, "arguments": start.arguments, "caller": start.caller}
                self._add(at, "run_started", None, 0, data)
            elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED:
                self._add(at, "run_cancelled", None, 0, {"message": "the run was cancelled"})
            elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                self._scheduled(event, at)
            elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                attributes = event.activity_task_completed_event_attributes
                outcome = self._convert.from_payloads(attributes.result.payloads, [StepOutcome])[0]
                self._done(attributes.scheduled_event_id, at, outcome.result, outcome.error)
            elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
                failed = event.activity_task_failed_event_attributes
                self._done(failed.scheduled_event_id, at, None, {"kind": "error", "message": failed.failure.message})
            elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
                timed_out = event.activity_task_timed_out_event_attributes
                timeout = {"kind": "timeout", "message": timed_out.failure.message}
                self._done(timed_out.scheduled_event_id, at, None, timeout)
            elif kind in _ENDINGS:
                ended = True
        return ended

    def _scheduled(self, event: HistoryEvent, at: float) -> None:
        attributes = event.activity_task_scheduled_event_attributes
        if attributes.activity_type.name not in (STEP_ACTIVITY, ASK_ACTIVITY):
            return
        task = self._convert.from_payloads(attributes.input.payloads, [StepTask])[0]
        command = task.command
        key, attempt, step = str(command.get("key")), int(command.get("attempt", 1)), str(command.get("step"))
        self._tries[event.event_id] = (key, attempt, step)
        if (key, attempt) in self._asked:  # the question moved to the replica its caller is at now: the same try
            return
        self._asked.add((key, attempt))
        self._began[key] = at
        self._add(at, "step_started", key, attempt, started_data(LEAVES[task.kind](**command)))

    def _done(self, scheduled: int, at: float, result: Any, error: Mapping[str, Any] | None) -> None:
        tried = self._tries.get(scheduled)
        if tried is None:
            return
        key, attempt, _ = tried
        data = {"result": result, "error": dict(error) if error else None}
        fed = self._outcomes.get((key, attempt))
        if fed is not None:  # what the engine was given (a dead replica's try: unavailable, not the activity's error)
            data = {"result": fed[0], "error": asdict(fed[1]) if fed[1] is not None else None}
        self._last[key] = self._add(at, "step_done", key, attempt, data)

    def _add(self, at: float, kind: Any, key: str | None, attempt: int, data: Mapping[str, Any]) -> JournalEvent:
        event = JournalEvent(self._run_id, len(self._events), at, kind, key, attempt, data)
        self._events.append(event)
        return event


_GUESSED = (
    "the steps' ends are read from their calls: steps with no call of their own (set, wait, switch, for_each, fail,"
    " skipped ones) are not shown, nor whether a failed step took its on_error default"
)
"""The timeline's note when a run's history could not be replayed (:class:`_Reader`)."""

_ENDINGS = frozenset(
    {
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
    }
)


def _continued_from(history: Sequence[HistoryEvent]) -> str:
    """The execution an execution's history continues (its run id), or "" for a run's first."""
    if not history or history[0].event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
        return ""
    return history[0].workflow_execution_started_event_attributes.continued_execution_run_id


def _caller(memo: Mapping[str, Any]) -> tuple[str, str]:
    caller = memo.get("caller") or {}
    return str(caller.get("kind", "")), str(caller.get("id", ""))
