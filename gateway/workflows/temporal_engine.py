"""What the gateway calls to run workflows on Temporal (DESIGN §6): :class:`TemporalEngine` starts runs of the
generic workflow (:class:`~gateway.workflows.temporal.PatchbayRun`), awaits, reads and cancels them, and runs
this replica's workers (the workflow, its activities: :mod:`gateway.workflows.temporal_activities`).

Which plan: the workflow's input names it by workflow name and digest, and a worker runs only runs of
plans it holds with that very digest (a workflow changed since the run began is not the same plan:
replaying it could not give the same commands). A run is started on a task queue of its plan's own,
``<task_queue>.<first 16 hex digits of the digest>`` (:func:`workflow_queue`), that only workers holding the
plan poll, so a replica whose config has another version of the workflow never takes it: the run waits for one
that has it (during a rolling deploy, the old replicas finish the old runs). Should a run still reach a
worker without its plan, the workflow task fails (:class:`~gateway.workflows.temporal.PlanNotHeld`) and
Temporal tries it again, later or elsewhere; the run itself is not failed. The steps' activities go to the same
queue: any replica holding the plan may make a call, and the SDK hands an activity scheduled by a workflow task
straight to the worker that ran it (eager dispatch) when it has room, which halves a step's latency
here (``bench/RESULTS.md``, "Issue 14"). (Temporal's worker versioning would do the routing too, but
needs a deployment name and build id per config; a queue per digest needs nothing.) A replica
that stops leaves its cached runs on its sticky queue: Temporal hands them to another replica after
the worker's sticky timeout (10 s).
"""

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import anyio
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.exceptions import CancelledError as TemporalCancelled
from temporalio.worker import Worker

import gateway.workflows._temporal_plans as _temporal_plans
from gateway.errors import ToolNotFound
from gateway.types import ClientChannel
from gateway.workflows.callers import Callers
from gateway.workflows.commands import StepError
from gateway.workflows.plan import Plan
from gateway.workflows.temporal import PatchbayRun
from gateway.workflows.temporal_activities import Execute, Steps, evaluate
from gateway.workflows.temporal_types import (
    ATTACH_SIGNAL,
    HEARTBEAT_TIMEOUT,
    HISTORY_LIMIT,
    MEMO,
    RUN_FAILED,
    ProgressNote,
    RunInput,
    RunResult,
)

__all__ = ["TemporalEngine", "result_of", "workflow_queue"]

STICKY_TIMEOUT = 10.0
"""Seconds a run cached by a replica waits for it (its sticky queue) before any replica may take it (SDK default)."""


def workflow_queue(task_queue: str, plan: Plan) -> str:
    """The task queue of ``plan``'s runs: only workers holding that digest poll it."""
    return f"{task_queue}.{plan.digest[:16]}"


class TemporalEngine:
    """Workflow runs on Temporal: start them, await or cancel them, and run this replica's workers.

    ``client`` is connected to the namespace the runs live in; ``task_queue`` names the queues (each
    plan's runs and their steps go to :func:`workflow_queue`); ``plans`` are the workflows this
    replica runs, by name; ``execute`` makes the steps' calls. ``heartbeat`` (seconds) is how often a
    running step heartbeats (a request to the server each time), hence about how long its
    cancellation takes to reach it. ``history_limit`` (events) is how long a run's history may grow
    before it continues as new, if Temporal has not suggested it earlier.

    The runs this replica starts ask their questions here, where their caller's request is: on a queue
    of this replica's own, :attr:`asker`, whose worker asks the client registered for the run in
    :attr:`callers` (:meth:`run` registers it while it awaits the run). A question that no worker
    takes within ``silence`` (this replica is gone) takes its default, or fails ``unavailable``.
    """

    def __init__(
        self,
        client: Client,
        task_queue: str,
        plans: Mapping[str, Plan],
        execute: Execute,
        *,
        heartbeat: float = 1.0,
        silence: float = HEARTBEAT_TIMEOUT.total_seconds(),
        history_limit: int = HISTORY_LIMIT,
    ) -> None:
        self.history_limit = history_limit
        self.silence = silence
        """Seconds after which a replica gone silent (killed, cut off) loses what it was doing: a step's try
        (its heartbeat timeout) and the runs cached in its workers (their sticky queue's timeout, at most 10 s)."""
        self.client = client
        self.task_queue = task_queue
        self.plans = plans
        self.callers = Callers()
        """The clients of the runs awaited here: their questions are asked through them."""
        self.asker = f"{task_queue}.caller.{uuid.uuid4().hex[:12]}"
        """This replica's own queue, where the runs it starts send their questions."""
        self._steps = Steps(execute, self.callers.ask, heartbeat)
        self._heartbeat = timedelta(seconds=heartbeat)

    async def start(
        self,
        workflow_name: str,
        arguments: Mapping[str, Any],
        caller: Mapping[str, str],
        run_id: str,
        *,
        details: Mapping[str, Any] | None = None,
        attach: bool = False,
    ) -> WorkflowHandle[Any, Any]:
        """Start a run of ``workflow_name`` (workflow id ``run_id``); a run of that id started before is
        the run (an idempotent re-issue gets the first run, not a second one). Its questions come here;
        with ``attach``, those of a run of that id started before (at another replica) come here from now on.

        The run's memo (:data:`MEMO`) records this gateway's task queue, the workflow, its digest and the
        caller, and ``details`` (``task``: the MCP task's parameters, ``idempotency_key``): what its
        :class:`~gateway.store.RunRecord` is read back from.

        Raises:
            ToolNotFound: this engine has no workflow of that name.
        """
        plan = self.plans.get(workflow_name)
        if plan is None:
            raise ToolNotFound(workflow_name)
        start = RunInput(
            plan.name,
            plan.digest,
            dict(arguments),
            dict(caller),
            run_id,
            workflow_queue(self.task_queue, plan),
            silence=self.silence,
            history_limit=self.history_limit,
            asker=self.asker,
        )
        try:
            return await self.client.start_workflow(
                PatchbayRun.run,
                start,
                id=run_id,
                task_queue=workflow_queue(self.task_queue, plan),
                memo={MEMO: {**(details or {}), **_memo(self.task_queue, plan, caller)}},
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                # A signal-with-start: delivered to the run of that id if there is one, else with the start.
                start_signal=ATTACH_SIGNAL if attach else None,
                start_signal_args=[self.asker] if attach else [],
            )
        except WorkflowAlreadyStartedError:  # it has finished: its result is the answer
            return self.client.get_workflow_handle(run_id)

    async def run(
        self,
        workflow_name: str,
        arguments: Mapping[str, Any],
        caller: Mapping[str, str],
        run_id: str,
        *,
        client: ClientChannel | None = None,
        attach: bool = False,
    ) -> dict[str, Any]:
        """Start a run and await its end: the :class:`RunResult`'s fields. Meanwhile its questions are
        asked of ``client`` (with ``attach``, those of a run of that id started before too).

        Cancelling the caller does not cancel the run (it goes on in Temporal, as it does when this
        replica stops): call :meth:`cancel` for that. Raises ToolNotFound (see :meth:`start`).
        """
        with self.callers.attend(run_id, client):
            await self.start(workflow_name, arguments, caller, run_id, attach=attach)
            return await self.result(run_id)

    async def progress(self, run_id: str, after: int) -> list[ProgressNote]:
        """The steps of run ``run_id`` that ended after the ``after``-th (a workflow query: nothing is recorded).

        Raises:
            temporalio.client.WorkflowQueryFailedError, temporalio.service.RPCError: Temporal could not
                answer (no worker has taken the run yet, say).
        """
        handle = self.client.get_workflow_handle(run_id)
        return await handle.query(PatchbayRun.progress, after)

    async def result(self, run_id: str) -> dict[str, Any]:
        """Await the end of run ``run_id``: the :class:`RunResult`'s fields, whether it succeeded,
        failed, was cancelled, or was ended from outside (terminated, timed out: ``failed``)."""
        return await result_of(self.client, run_id)

    async def cancel(self, run_id: str) -> None:
        """Ask run ``run_id`` to stop: its steps in flight are cancelled, its compensations run, and
        then it ends cancelled (:meth:`result` tells when). A run that has ended is left as it is.

        Raises:
            temporalio.service.RPCError: Temporal knows no run ``run_id`` (status ``NOT_FOUND``).
        """
        await self.client.get_workflow_handle(run_id).cancel()

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[None]:
        """Run this replica's workers while the block runs: one per plan, polling that plan's queue (the
        workflow, its steps' activities, and its evaluations as local activities), and one asking the
        questions of the runs awaited here (on :attr:`asker`). Leaving the block stops them (steps in
        flight are cancelled; their runs go on elsewhere).

        One engine per client and task queue may serve at a time in a process (Temporal refuses a
        second worker of the same queue on one client)."""
        plans = list({plan.digest: plan for plan in self.plans.values()}.values())
        asks = Worker(  # the questions of the runs awaited here
            self.client,
            task_queue=self.asker,
            activities=[self._steps.ask],
            max_heartbeat_throttle_interval=self._heartbeat,
            default_heartbeat_throttle_interval=self._heartbeat,
        )
        workers = [*self._plan_workers(plans), asks]
        _temporal_plans.hold(plans)
        try:
            async with anyio.create_task_group() as tg:
                for worker in workers:
                    tg.start_soon(_run_worker, worker)
                try:
                    yield
                finally:
                    with anyio.CancelScope(shield=True):
                        await _shut_down(workers)  # the calls in flight are made again elsewhere
        finally:
            _temporal_plans.release(plans)

    def _plan_workers(self, plans: list[Plan]) -> list[Worker]:
        """The workers running ``plans``' runs and steps (a test's replica that must not run any has none)."""
        return [
            Worker(
                self.client,
                task_queue=workflow_queue(self.task_queue, plan),
                workflows=[PatchbayRun],
                activities=[evaluate, self._steps.step],
                max_heartbeat_throttle_interval=self._heartbeat,
                default_heartbeat_throttle_interval=self._heartbeat,
                sticky_queue_schedule_to_start_timeout=timedelta(seconds=min(self.silence, STICKY_TIMEOUT)),
            )
            for plan in plans
        ]


async def result_of(client: Client, run_id: str) -> dict[str, Any]:
    """Await the end of run ``run_id`` (:meth:`TemporalEngine.result`, for those holding only a client)."""
    handle = client.get_workflow_handle(run_id, result_type=RunResult)
    try:
        return asdict(await handle.result())
    except WorkflowFailureError as exc:
        cause = exc.cause
        if isinstance(cause, ApplicationError) and cause.type == RUN_FAILED and cause.details:
            details: dict[str, Any] = cause.details[0]
            return details
        if isinstance(cause, TemporalCancelled):
            error = StepError("cancelled", "the run was cancelled")
            return asdict(RunResult(run_id, "cancelled", error=asdict(error)))
        error = StepError("error", f"the run ended in Temporal: {cause or exc}")
        return asdict(RunResult(run_id, "failed", error=asdict(error)))


def _memo(task_queue: str, plan: Plan, caller: Mapping[str, str]) -> dict[str, Any]:
    """A run's memo: it is kept as it is when the run continues as new, so ``started`` is when the run began."""
    return {
        "queue": task_queue,
        "workflow": plan.name,
        "plan": plan.digest,
        "caller": dict(caller),
        "started": time.time(),
    }


async def _shut_down(workers: list[Worker]) -> None:
    async with anyio.create_task_group() as tg:
        for worker in workers:
            tg.start_soon(worker.shutdown)


async def _run_worker(worker: Worker) -> None:
    """Run ``worker`` until its :meth:`~temporalio.worker.Worker.shutdown`, and only that stops it: it shuts down
    on cancellation too, but awaits as it does, which a cancelled anyio scope would cancel again and again."""
    with anyio.CancelScope(shield=True):
        await worker.run()
