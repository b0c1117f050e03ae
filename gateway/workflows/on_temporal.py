"""Workflow calls on the Temporal engine (``gateway.engine: temporal://…``): what :class:`~gateway.workflows.runs.Runs`
does with a call when runs live in Temporal, and how this replica's workers make the steps' calls.

A workflow call starts a run of the generic Temporal workflow (:mod:`gateway.workflows.temporal`) and awaits
its end; the result is what the local runner gives (the output as text and structured content, or an error
naming the failed step, ``_meta["io.patchbay/run"]`` the run id). A call with an idempotency key is the run
that key names, at any replica: the run's id is derived from the caller and the key, and Temporal starts a
workflow id once, so a re-issued call (after a replica died under it, say) gets the first call's run and
result. A caller that gives up does not cancel the run, as with a keyed local run.

A call may also start its run as an MCP task (:meth:`TemporalRuns.start_task`): the run is started and the task
answered at once. Tasks are read, awaited and cancelled in Temporal (:mod:`gateway.workflows.temporal_records`),
so ``tasks/*`` work at any replica, whichever replica's workers carry the run; a keyed task is the run its key
names, like a keyed call.

Each step's call is an activity that any replica's worker makes through its own dispatch path (``invoke``),
so policies, limits, metrics and audit apply as for a local run, under the run's caller and with the step's
idempotency key.

What needs the client that made the call reaches it at the replica holding its request, wherever the steps
run. ``ask_user`` and ``ask_model`` questions come to this replica's own queue while it awaits the run, and
are asked through the request's client channel, as the local runner asks (a 2026-07-28 client through the
input-required round trip: its call is held here). A keyed call re-issued here moves the questions of its
run here (a signal), as a re-issue attaches to a detached local run. Progress: while it awaits a run whose
caller asked for progress, this replica reads the run's ended steps (a workflow query, every
:data:`PROGRESS_POLL` seconds) and notifies each as the local runner does; the messages are the same, each
late by up to a poll. Cancellation: an unkeyed call whose caller cancels it cancels its run, whose steps in
flight (on any replica) are cancelled and whose compensations run.
"""

import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from temporalio.client import WorkflowQueryFailedError
from temporalio.service import RPCError, RPCStatusCode

from gateway.dispatch import Invocation
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.store import RunRecord
from gateway.types import CallContext, ClientChannel, JSONObject, Principal, ProgressFn, ToolResult
from gateway.workflows.commands import AskAgent, AskModel, AskUser, CallTool, Leaf, StepError
from gateway.workflows.journal import JournalEvent
from gateway.workflows.plan import Plan
from gateway.workflows.runner import IDEMPOTENCY_META_KEY, error_text, result_value
from gateway.workflows.runs import CANCEL_WAIT, FINISHED, RunNotResumable, caller_scope
from gateway.workflows.temporal_activities import Execute
from gateway.workflows.temporal_engine import TemporalEngine
from gateway.workflows.temporal_records import TemporalRecords, wire_result

__all__ = ["TemporalRuns", "run_id_for", "step_executor"]

logger = logging.getLogger(__name__)

InvokeFn = Callable[[str, JSONObject, CallContext], Awaitable[Invocation]]

CANCEL_LIMIT = 10.0
"""Seconds asking Temporal to cancel a run may take (the run's compensations go on there after)."""
PROGRESS_POLL = 0.5
"""Seconds between two reads of the progress of a run whose caller asked for it."""
PROGRESS_LIMIT = 5.0
"""Seconds the last read of a finished run's progress may take (Temporal replays the run to answer it)."""
NOT_CARRIED = "the run has no client to ask (it was started without one)"


def run_id_for(principal: Principal, workflow: str, key: str) -> str:
    """The run id (Temporal's workflow id) of ``principal``'s call of ``workflow`` with idempotency ``key``."""
    digest = hashlib.sha256(json.dumps([caller_scope(principal), workflow, key]).encode()).hexdigest()
    return f"key-{digest[:32]}"


def step_executor(invoke: InvokeFn) -> Execute:
    """The ``execute`` of this replica's Temporal workers: a step's call through the dispatch path ``invoke``."""

    async def execute(command: Leaf, run_id: str, caller: dict[str, str]) -> tuple[Any, StepError | None]:
        if isinstance(command, AskAgent):  # a run without a client to ask
            return None, StepError("unavailable", NOT_CARRIED)
        if isinstance(command, AskUser | AskModel):  # a run without a client to ask (its questions come here)
            if command.default is not None:
                return command.default, None
            return None, StepError("unavailable", NOT_CARRIED)
        assert isinstance(command, CallTool)
        context = CallContext(
            principal=Principal.of_caller(caller),
            meta={IDEMPOTENCY_META_KEY: command.idempotency_key} if command.idempotency_key else None,
            workflow_run=run_id,
            workflow_step=command.key,
        )
        result, outcome, retry_after = await invoke(command.tool, command.arguments, context)
        if result.input_required is not None:
            return None, StepError("unavailable", f"{command.tool} asked for input, which a workflow step cannot give")
        if result.is_error:
            return None, StepError(outcome, error_text(result), retry_after=retry_after)
        return result_value(result), None

    return execute


class TemporalRuns:
    """Workflow calls as runs on Temporal, through ``engine``."""

    def __init__(
        self, engine: TemporalEngine, *, metrics: Metrics | None = None, stopping: Callable[[], bool] = lambda: False
    ) -> None:
        """``stopping()`` tells whether this gateway is going down: a call cancelled then leaves its run to go on
        (another replica's workers carry it on); a call its caller cancelled cancels its run (unless keyed)."""
        self.engine = engine
        self.records = TemporalRecords(engine.client, engine.task_queue, engine.plans)
        """The runs' records, as Temporal has them."""
        self._metrics = metrics
        self._stopping = stopping

    async def call(self, plan: Plan, arguments: Mapping[str, Any], context: CallContext, run_id: str) -> ToolResult:
        """Run ``plan`` as run ``run_id`` (or the run of that id started before) and return its result."""
        principal = context.principal
        key = (context.meta or {}).get(IDEMPOTENCY_META_KEY)
        if isinstance(key, str) and key:
            run_id = run_id_for(principal, plan.name, key)
        caller = {"kind": principal.kind, "id": principal.id}
        if self._metrics is not None:
            self._metrics.workflow_started(plan.name)
        keyed = isinstance(key, str) and bool(key)
        try:
            # A keyed call may be a re-issue of a call made at another replica: its questions come here now.
            running = self.engine.run(plan.name, arguments, caller, run_id, client=context.client, attach=keyed)
            ended = (
                await running
                if context.progress is None
                else await _reported(self.engine, run_id, context.progress, running)
            )
        except anyio.get_cancelled_exc_class():
            # As a local run: an unkeyed call's run ends with its caller (compensated); a keyed one goes on.
            if not keyed and not self._stopping():
                with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_LIMIT):
                    await self.engine.cancel(run_id)
            raise
        self._ended(plan.name, ended)
        return _result(plan, run_id, ended)

    def _ended(self, workflow: str, ended: Mapping[str, Any]) -> None:
        status = str(ended.get("status"))
        if self._metrics is not None:
            self._metrics.workflow_run(workflow, status if status in ("succeeded", "cancelled") else "failed")

    # --- Tasks, and the runs as records (Temporal's). ---

    async def start_task(
        self, plan: Plan, arguments: Mapping[str, Any], context: CallContext, task: JSONObject
    ) -> RunRecord:
        """Start a run of ``plan`` as an MCP task and return its record at once (its steps go on at any replica).
        A call with an idempotency key gets the run that key names (the first call's, if it was made before)."""
        principal = context.principal
        key = (context.meta or {}).get(IDEMPOTENCY_META_KEY)
        keyed = isinstance(key, str) and bool(key)
        run_id = run_id_for(principal, plan.name, str(key)) if keyed else uuid.uuid4().hex
        details = {"task": dict(task), **({"idempotency_key": key} if keyed else {})}
        if self._metrics is not None:
            self._metrics.workflow_started(plan.name)
        caller = {"kind": principal.kind, "id": principal.id}
        await self.engine.start(plan.name, arguments, caller, run_id, details=details)
        record = await self.records.record(run_id)
        if record is None:  # Temporal has just started it
            raise GatewayError(f"run {run_id} was started but Temporal does not describe it")
        return record

    async def attend(self, workflow: str, run_id: str, client: ClientChannel | None) -> None:
        """Until run ``run_id`` of ``workflow`` ends, ask its questions of ``client`` (a task's caller, which polls
        the task meanwhile), as a detached local run asks the client that started it; then count how it ended
        (``patchbay_workflow_runs_total``), as a call does. Run in the background."""
        try:
            with self.engine.callers.attend(run_id, client):
                ended = await self.engine.result(run_id)
        except Exception:  # Temporal's trouble: the task is read there all the same; its questions wait here
            logger.warning("stopped asking the questions of run %s here", run_id, exc_info=True)
            return
        self._ended(workflow, ended)

    async def get(self, run_id: str, principal: Principal) -> RunRecord | None:
        """The record of run ``run_id`` if ``principal`` started it; None otherwise, as for an unknown run."""
        record = await self.records.record(run_id)
        if record is None or (record.caller_kind, record.caller_id) != (principal.kind, principal.id):
            return None
        return record

    async def wait(self, run_id: str, principal: Principal) -> RunRecord | None:
        """The record of ``principal``'s run ``run_id`` once it has ended (None: no such run of theirs)."""
        if await self.get(run_id, principal) is None:
            return None
        await self.engine.result(run_id)
        return await self.records.record(run_id)

    async def cancel(self, run_id: str, principal: Principal) -> RunRecord | None:
        """Cancel ``principal``'s run ``run_id`` (whichever replicas carry it) and wait, up to :data:`CANCEL_WAIT`,
        for it to end (its compensations run first); its record after."""
        record = await self.get(run_id, principal)
        if record is None:
            return None
        if record.status not in FINISHED:
            try:
                await self.engine.cancel(run_id)
            except RPCError as exc:  # it ended meanwhile
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
            with anyio.move_on_after(CANCEL_WAIT):
                await self.engine.result(run_id)
        return await self.records.record(run_id)

    async def list(self, principal: Principal, *, tasks_only: bool = True) -> Sequence[RunRecord]:
        """``principal``'s runs (those started as tasks, with ``tasks_only``), most recent first."""
        return await self.records.records(caller=(principal.kind, principal.id), tasks_only=tasks_only)

    async def events(self, run_id: str) -> Sequence[JournalEvent]:
        """Run ``run_id``'s history as journal events (for its timeline)."""
        return await self.records.events(run_id)

    async def resume(self, run_id: str) -> ToolResult:
        """``patchbay resume`` of a run on Temporal: never interrupted (replicas carry it on, this one's workers
        too while it serves), so its result once it ends.

        Raises:
            RunNotResumable: Temporal knows no such run of this gateway, or it has ended.
        """
        record = await self.records.record(run_id)
        if record is None:
            raise RunNotResumable(f"no run {run_id} of this gateway in Temporal")
        if record.status in FINISHED:
            raise RunNotResumable(f"run {run_id} has finished: {record.status} (`patchbay runs CONFIG {run_id}`)")
        return wire_result(record.workflow, run_id, await self.engine.result(run_id))


async def _reported(
    engine: TemporalEngine, run_id: str, progress: ProgressFn, running: Awaitable[dict[str, Any]]
) -> dict[str, Any]:
    """Await ``running`` (run ``run_id``'s end), meanwhile notifying ``progress`` of each of its steps that ends:
    read every :data:`PROGRESS_POLL` seconds, and once more at the end."""
    reporter = _Reporter(engine, run_id, progress)
    ended: dict[str, Any] | None = None
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(reporter.poll)
        try:
            ended = await running
        except Exception as exc:  # raised as itself, not inside the task group's exception group
            failure = exc
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    assert ended is not None
    with anyio.move_on_after(PROGRESS_LIMIT):  # the steps that ended since the last read
        await reporter.read()
    return ended


@dataclass
class _Reporter:
    """Reads a run's progress and notifies its caller of what it has not seen yet."""

    engine: TemporalEngine
    run_id: str
    progress: ProgressFn
    seen: int = 0
    """The steps that ended and were notified."""

    async def poll(self) -> None:
        while True:
            await self.read()
            await anyio.sleep(PROGRESS_POLL)

    async def read(self) -> None:
        """Notify the steps that ended since the last read; a read Temporal cannot answer is left to the next."""
        try:
            notes = await self.engine.progress(self.run_id, self.seen)
        except (WorkflowQueryFailedError, RPCError) as exc:  # no worker has taken the run yet, say
            logger.debug("the progress of run %s could not be read: %s", self.run_id, exc)
            return
        for note in notes:
            self.seen = note.settled
            try:
                await self.progress(note.settled, note.total, note.message)
            except Exception:  # the request it reports to has ended: the run's end is what matters now
                logger.debug("progress of run %s not delivered", self.run_id, exc_info=True)


def _result(plan: Plan, run_id: str, ended: Mapping[str, Any]) -> ToolResult:
    return wire_result(plan.name, run_id, ended)
