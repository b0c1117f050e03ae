"""Workflow runs on Temporal (DESIGN §6): one generic Temporal workflow drives the same pure engine.

:class:`PatchbayRun` (workflow type ``patchbay.run``) runs any Patchbay workflow: its input names the
workflow and its plan's digest, and carries the arguments, the caller and the run id. It feeds a
:class:`~gateway.workflows.engine.Run` its events and carries out the commands it returns, as the
local runner does, with Temporal's means:

* ``CallTool``: an activity (``patchbay.step``) on the run's own task queue
  (:func:`~gateway.workflows.temporal_engine.workflow_queue`), so whichever replica holding the plan polls it
  makes the call (:mod:`gateway.workflows.temporal_activities`). The step's ``timeout`` is the activity's
  start-to-close timeout. Temporal's own retries are off: the engine retries, with a timer between tries.
  A try whose replica stopped or died before it answered (its worker shut down; no heartbeat for
  :data:`~gateway.workflows.temporal_types.HEARTBEAT_TIMEOUT`) is made again under the same idempotency key,
  as a resumed local run makes the calls in flight at a crash again: it fails as a refusal does
  (``unavailable``, with ``retry_after`` 0), which the engine tries again within the step's timeout even
  without ``retry:``.
* ``AskUser``, ``AskModel``, ``AskAgent`` (an ``agent`` step's turn; its tool calls are ``CallTool``): an
  activity (``patchbay.ask``) on the queue of the replica holding the client's request
  (:attr:`RunInput.asker <gateway.workflows.temporal_types.RunInput.asker>`), heartbeating and within the
  step's timeout as a call. The ``attach`` signal names another replica's queue when the
  client's call (keyed) is re-issued there: later questions go there, and one being asked is withdrawn and
  asked there. A question no worker takes within the run's silence (the replica is gone), or whose replica
  dies while asking, is not asked again: the step takes its ``default``, or fails ``unavailable``.
* ``Evaluate``: a local activity (``patchbay.evaluate``): jq is native code and never runs in workflow
  code, and its outcome is recorded in the history, so a replay does not run it again.
* ``StartTimer``: a durable timer (:func:`temporalio.workflow.sleep`). ``Cancel``: the activity, local
  activity or timer of that key is cancelled. A retry's jitter draws from :func:`temporalio.workflow.random`.
* A cancellation of the Temporal workflow is :meth:`Run.cancel <gateway.workflows.engine.Run.cancel>`:
  the steps in flight are cancelled and the compensations run (the engine's ``CallTool`` with
  ``compensation=True``, activities like any other).
* ``Finished`` ends the workflow with a :class:`~gateway.workflows.temporal_types.RunResult` (what
  ``Finished`` carries). Temporal's status tells the truth about the run: a succeeded run completes with it;
  a failed one fails with an ``ApplicationError`` of type :data:`~gateway.workflows.temporal_types.RUN_FAILED`
  whose details are the result; a cancelled one (compensated) ends cancelled, which carries no details (its
  compensations' errors are logged and are in the history).
  :func:`~gateway.workflows.temporal_engine.result_of` reads all three back as a result.

Temporal owns durability and history: nothing is journaled in the store. ``Settled`` notes (and a loop's
``Iterated``) become the run's progress notes (the message a local run reports, :meth:`Settled.describe
<gateway.workflows.commands.Settled.describe>`), the last :data:`PROGRESS_KEPT` of them kept in the
workflow's state and read by the ``progress`` query (a query is not recorded in the history): the
replica awaiting the run polls it for a caller that asked for progress. ``patchbay runs RUN_ID`` recovers every
note, and each try's outcome as the engine was fed it, by replaying the history through this workflow
(:mod:`gateway.workflows._temporal_notes`, whose subclass hooks :meth:`PatchbayRun._settled` and
:meth:`PatchbayRun._feed`). Step metrics come later.

Long runs continue as new. Temporal stops a run whose history reaches 50 000 events (or 50 MB), and a
step costs about six (its activity's three, a workflow task's three). When the server suggests it
(``is_continue_as_new_suggested``) or the history reaches ``history_limit`` events
(:data:`~gateway.workflows.temporal_types.HISTORY_LIMIT`), the run continues as new: a fresh execution of
the same workflow id, so ``handle.result()`` (which follows the chain) and a cancellation (which goes to the
latest execution) still reach it. It carries a
:class:`~gateway.workflows._temporal_carry.Carried`: the inputs its engine was fed, from which the next
execution rebuilds the engine (:meth:`Run.restore <gateway.workflows.engine.Run.restore>`), and when each
pending timer is due (workflow time), so a timer fires when it would have, not from scratch. An activity in
flight would be abandoned by continuing (its outcome lost, and its call made a second time), so it waits
instead: once continuing is wanted, new calls, questions and evaluations are held, not started; those in
flight finish and their outcomes are fed to the engine (which may ask for more: held too); once none is in
flight it continues, and the next execution starts what was held (to the restored engine they are in
flight: :meth:`~gateway.workflows.engine.Run.outstanding`). So each call is made once, and a run that always
has something in flight (a for_each with concurrency) continues too, after at most its in-flight steps'
time. A run asked to cancel ends in the execution asked (its compensations run there). What bounds the
carried journal is in :mod:`gateway.workflows._temporal_carry`: one entry per input, results included; over
:data:`~gateway.workflows._temporal_carry.JOURNAL_LIMIT` it is not carried, and the run goes on where it is.

Which plan a run runs, and which workers take it: :mod:`gateway.workflows.temporal_engine` (a worker that
does not hold the run's plan fails the workflow task: :class:`PlanNotHeld`).

The sandbox: the workflow runs under Temporal's default ``SandboxedWorkflowRunner``. The engine and
what it imports are pure, so they are passed through (imported once, not per run); so are the types the
workflow and its activities exchange (:mod:`gateway.workflows.temporal_types`), and the table of held plans
(:mod:`gateway.workflows._temporal_plans`), which is how a run inside the sandbox finds the plans its worker
was given. The activities and :class:`~gateway.workflows.temporal_engine.TemporalEngine` do I/O: workflow
code never imports them. Workflow code must use Temporal's deterministic asyncio loop, hence ``asyncio``
here, and only here (its ruff ban is lifted for this module).

Future work: a change to the engine's own code changes what a replay does (of a history, or of the
journal a continued run carries), which the plan digest does not see: gateway upgrades with runs in flight
need Temporal's worker versioning or patching.
"""

import asyncio
from collections import deque
from collections.abc import Coroutine
from dataclasses import asdict, fields, replace
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutType
from temporalio.exceptions import CancelledError as TemporalCancelled
from temporalio.exceptions import TimeoutError as TemporalTimeout

with workflow.unsafe.imports_passed_through():
    # `import a.b as b`, not `from a import b`: the sandbox passes modules through by their full name,
    # and `gateway.workflows` itself is imported in the sandbox (it holds this module).
    import gateway.workflows._temporal_plans as _temporal_plans
    from gateway.workflows._jqsafe import TIME_LIMIT
    from gateway.workflows._temporal_carry import JOURNAL_LIMIT, Carried, Journal
    from gateway.workflows.asking import default_or
    from gateway.workflows.commands import (
        AskAgent,
        AskModel,
        AskUser,
        CallTool,
        Cancel,
        Command,
        Evaluate,
        Finished,
        Iterated,
        Leaf,
        Settled,
        StartTimer,
        StepError,
    )
    from gateway.workflows.engine import Run
    from gateway.workflows.expressions import Outcome
    from gateway.workflows.temporal_types import (
        ASK_ACTIVITY,
        ATTACH_SIGNAL,
        EVALUATE_ACTIVITY,
        KINDS,
        RUN_FAILED,
        STEP_ACTIVITY,
        WORKFLOW_TYPE,
        Evaluated,
        Evaluation,
        ProgressNote,
        RunInput,
        RunResult,
        StepOutcome,
        StepTask,
    )

__all__ = ["PROGRESS_KEPT", "PatchbayRun", "PlanNotHeld"]

NO_TIMEOUT = timedelta(days=365)
"""The start-to-close timeout of a step without ``timeout`` (Temporal needs one; heartbeats catch dead workers)."""
EVALUATION_TIMEOUT = timedelta(seconds=TIME_LIMIT + 10)
"""A backstop: the worker pool stops a program at its own time limit."""
_ONCE = RetryPolicy(maximum_attempts=1)
"""Temporal does not retry a step: the engine does, as the workflow says."""
_WORKER_SHUTDOWN = "WorkerShutdown"
"""The type of the error a step's activity fails with when its worker stops before it finished."""
_TOO_LARGE = "PayloadsTooLarge"
"""The type of the error a step's activity fails with when its result is over Temporal's payload limit (2 MiB)."""
_SHORTEST_TIMER = 0.001
"""Seconds: Temporal timers must be longer than nothing."""
PROGRESS_KEPT = 256
"""Progress notes a run keeps for its caller to read (:meth:`PatchbayRun.progress`); older ones are forgotten."""

_Event = tuple[str, str, int, Any, StepError | None]
"""``("done", key, attempt, result, error)``, ``("fire", key, 0, None, None)``,
``("evaluated", key, 0, Outcome, None)``, or ``("wake", "", 0, None, None)`` (nothing in flight any more:
the run may continue as new)."""


class PlanNotHeld(RuntimeError):
    """A run reached a worker that does not hold its plan (that workflow, that digest). Not a Temporal
    failure: the workflow task fails and is tried again, the run goes on where the plan is held."""


@workflow.defn(name=WORKFLOW_TYPE)
class PatchbayRun:
    """Any Patchbay workflow's run: the engine's commands carried out by activities and timers."""

    def __init__(self) -> None:
        self._events: asyncio.Queue[_Event] = asyncio.Queue()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        """What is in flight, by the key the engine cancels it by."""
        self._input: RunInput | None = None
        self._journal = Journal(None)
        self._working: set[asyncio.Task[None]] = set()
        """The tasks of activities and local activities (not timers): in flight until done (a task is done
        once it queued its outcome, or ended cancelled)."""
        self._held: dict[str, CallTool | AskUser | AskModel | AskAgent | Evaluate] = {}
        """The calls, questions and evaluations not started because the run is about to continue as new."""
        self._draining = False
        """The run continues as new once nothing is in flight: start nothing more meanwhile."""
        self._due: dict[str, float] = {}
        """Each pending timer's due time (workflow time, seconds since the epoch), by key."""
        self._stays = False
        """The journal is too large to carry: the run goes on in this execution (said once)."""
        self._total: int | None = None
        self._asker: str | None = None
        """Where the run's questions go now: the replica that last attached its caller."""
        self._progress: deque[ProgressNote] = deque(maxlen=PROGRESS_KEPT)
        self._count = 0
        """Progress notes so far (steps settled, loop iterations ended), in this execution and those it continues."""
        self._began: dict[str, float] = {}
        """When each call or question in flight began (workflow time), for its progress message."""

    @workflow.signal(name=ATTACH_SIGNAL)
    def attach(self, asker: str) -> None:
        """The run's caller is now at the replica of queue ``asker``: later questions go there, and one being
        asked elsewhere moves there."""
        self._asker = asker

    @workflow.query
    def progress(self, after: int) -> list[ProgressNote]:
        """The steps' ends after the ``after``-th (the last :data:`PROGRESS_KEPT` at most)."""
        return [note for note in self._progress if note.settled > after]

    @workflow.run
    async def run(self, start: RunInput) -> RunResult:
        """Drive the run to its end.

        Raises:
            PlanNotHeld: this worker does not hold the plan (fails the workflow task, not the run).
            ApplicationError: the run failed (type :data:`RUN_FAILED`, details: the :class:`RunResult`).
            asyncio.CancelledError: the run was cancelled, and compensated.
        """
        plan = _temporal_plans.find(start.workflow, start.digest)
        if plan is None:
            raise PlanNotHeld(f"this worker does not hold workflow {start.workflow!r} at digest {start.digest[:16]}")
        self._input = start
        if self._asker is None:  # a signal-with-start's attach is handled first
            self._asker = start.asker
        self._total = plan.total_steps
        self._journal = Journal(start.carried)
        if start.carried is not None:
            self._due = dict(start.carried.due)
            self._count = start.carried.settled
        engine, commands = self._journal.restore(plan, start.arguments, start.run_id)
        finished = self._apply(commands)
        cancelled = asked_to_cancel = False
        while finished is None:
            if self._draining and self._quiet():
                self._continue(start)
            try:
                event = await self._events.get()
            except asyncio.CancelledError:  # the workflow was cancelled (a second request changes nothing)
                cancelled = cancelled or engine.status == "running"  # a run failing already ends failed
                asked_to_cancel = True  # the cancellation was asked of this execution: it ends here
                self._journal.cancelled("the run was cancelled")
                finished = self._apply(engine.cancel("the run was cancelled"))
                self._release_held()
                continue
            commands = self._feed(engine, event)
            if not asked_to_cancel and not self._draining:  # decided before what the event led to starts
                self._draining = self._continue_wanted(start)
            finished = self._apply(commands)
        for task in self._tasks.values():  # timers still pending
            task.cancel()
        return self._end(start.run_id, finished, cancelled)

    def _end(self, run_id: str, finished: Finished, cancelled: bool) -> RunResult:
        error = asdict(finished.error) if finished.error is not None else None
        undone = [asdict(e) for e in finished.compensation_errors]
        if finished.status == "succeeded":
            return RunResult(run_id, "succeeded", finished.output)
        if cancelled:
            for problem in finished.compensation_errors:
                workflow.logger.warning("run %s cancelled: %s", run_id, problem.describe())
            raise asyncio.CancelledError("the run was cancelled")
        result = RunResult(run_id, "failed", None, error, undone)
        message = finished.error.describe() if finished.error is not None else "the run failed"
        raise ApplicationError(message, asdict(result), type=RUN_FAILED, non_retryable=True)

    def _feed(self, engine: Run, event: _Event) -> list[Command]:
        """Journal an input of the engine (what a continued execution restores it from), and feed it."""
        kind, key, attempt, value, error = event
        if kind == "wake":  # not an input: nothing for the engine
            return []
        if kind == "fire":
            self._journal.fired(key)
            return engine.fire(key)
        if kind == "evaluated":
            outcome: Outcome = value
            self._journal.evaluated(key, outcome)
            return engine.evaluated(key, outcome.value, error=outcome.error, empty=outcome.empty)
        draw = workflow.random().random()
        self._journal.done(key, attempt, value, error, draw)
        return engine.done(key, attempt, value, error, random=draw)

    # --- Continuing as new. ---

    def _continue_wanted(self, start: RunInput) -> bool:
        """Whether the run should continue as new: Temporal suggests it, or the history reached
        ``history_limit`` (and the journal is small enough to carry). From then on, nothing more starts
        (:meth:`_apply` holds it) until it continues, so a run that always has something in flight (a
        for_each with concurrency) gets there too."""
        info = workflow.info()
        if not (info.is_continue_as_new_suggested() or info.get_current_history_length() >= start.history_limit):
            return False
        if self._journal.size > JOURNAL_LIMIT:
            if not self._stays:
                self._stays = True
                workflow.logger.warning(
                    "run %s: its journal (%d bytes) is too large to carry into a new execution; it goes on here",
                    start.run_id,
                    self._journal.size,
                )
            return False
        return True

    def _quiet(self) -> bool:
        """Whether it is safe to continue as new: no activity in flight, no outcome queued (only timers
        pending, and the next execution starts those again, due when they were)."""
        return all(task.done() for task in self._working) and self._events.empty()

    def _continue(self, start: RunInput) -> None:
        """Continue as new: the same run (workflow id), its engine restored from the journal in the next
        execution, its pending timers due when they were, what was held started there. Raises (that is
        how Temporal's SDK continues as new)."""
        executions = start.carried.executions + 1 if start.carried is not None else 1
        due = {key: self._due[key] for key in self._tasks if key in self._due}  # the timers still pending
        carried = Carried(self._journal.inputs, due, executions, settled=self._count)
        workflow.logger.info(
            "run %s continues as new (execution %d: %d events; journal: %d inputs, %d bytes)",
            start.run_id,
            executions + 1,
            workflow.info().get_current_history_length(),
            len(self._journal.inputs),
            self._journal.size,
        )
        workflow.continue_as_new(replace(start, carried=carried, asker=self._asker))  # questions go where they went

    def _release_held(self) -> None:
        """Start what was held for a continue-as-new that will not happen (the run was cancelled)."""
        self._draining = False
        held, self._held = self._held, {}
        self._apply(list(held.values()))

    def _apply(self, commands: list[Command]) -> Finished | None:
        """Carry out ``commands``: start activities and timers, cancel them; the ``Finished`` note, if any."""
        finished: Finished | None = None
        for command in commands:
            if isinstance(command, Finished):
                finished = command
            elif isinstance(command, Cancel):
                self._held.pop(command.key, None)
                self._due.pop(command.key, None)
                task = self._tasks.pop(command.key, None)
                if task is not None:
                    task.cancel()
            elif isinstance(command, StartTimer):  # due when it was, if a continued execution restored it
                due = command.due if command.due is not None else workflow.now().timestamp() + command.seconds
                self._due.setdefault(command.key, due)
                self._spawn(command.key, self._timer(command))
            elif self._draining and isinstance(command, CallTool | AskUser | AskModel | AskAgent | Evaluate):
                self._held[command.key] = command  # made in the next execution (restored as outstanding)
            elif isinstance(command, Evaluate):
                self._working.add(self._spawn(command.key, self._evaluate(command)))
            elif isinstance(command, CallTool | AskUser | AskModel | AskAgent):
                self._began[command.key] = workflow.time()
                self._working.add(self._spawn(command.key, self._step(command)))
            elif isinstance(command, Settled | Iterated):  # for the caller's progress (the history has the rest)
                self._settled(command)
        return finished

    def _settled(self, note: Settled | Iterated) -> None:
        if isinstance(note, Iterated):  # a loop's iteration ended
            self._count += 1
            self._progress.append(ProgressNote(self._count, self._total, note.describe()))
            return
        began = self._began.pop(note.key, None)
        duration = round((workflow.time() - began) * 1000, 3) if began is not None else None
        if note.part is None:  # an agent's turn or call is reported, not counted as a step
            self._count += 1
        self._progress.append(ProgressNote(self._count, self._total, note.describe(duration)))

    def _spawn(self, key: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._tasks[key] = task

        def forget(done: "asyncio.Task[None]") -> None:
            if self._tasks.get(key) is done:
                del self._tasks[key]
            self._working.discard(done)
            if done.cancelled() and self._draining:  # it queued no outcome: the run's loop must look again
                self._events.put_nowait(("wake", "", 0, None, None))

        task.add_done_callback(forget)
        return task

    async def _step(self, command: Leaf) -> None:
        start = self._input
        assert start is not None
        task = StepTask(
            start.run_id,
            start.caller,
            KINDS[type(command)],
            {f.name: getattr(command, f.name) for f in fields(command)},
        )
        question = isinstance(command, AskUser | AskModel | AskAgent)
        try:
            if question and self._asker is not None:
                outcome = await self._ask(task, command)
            else:
                outcome = await workflow.execute_activity(STEP_ACTIVITY, task, **self._options(command))
            result, error = outcome.result, StepError(**outcome.error) if outcome.error is not None else None
        except ActivityError as exc:  # the activity itself failed: timed out, its worker died or raised
            result, error = None, _activity_failure(exc, command.timeout)
            if question and error.kind == "unavailable":
                # The replica holding the client's request is gone: nobody can be asked (not even on a retry).
                default = command.default if isinstance(command, AskUser | AskModel) else None
                result, error = default_or(default, f"the client could not be asked: {error.message}")
        self._events.put_nowait(("done", command.key, command.attempt, result, error))

    def _options(self, command: Leaf, queue: str | None = None) -> dict[str, Any]:
        """The options of the activity of ``command``: on ``queue`` (by default the plan's), within its timeout."""
        start = self._input
        assert start is not None
        return {
            "task_queue": queue or start.task_queue,
            "result_type": StepOutcome,
            "start_to_close_timeout": timedelta(seconds=command.timeout) if command.timeout is not None else NO_TIMEOUT,
            "heartbeat_timeout": timedelta(seconds=start.silence),
            "retry_policy": _ONCE,
            "summary": f"{command.key} (try {command.attempt})",
        }

    async def _ask(self, task: StepTask, command: Leaf) -> StepOutcome:
        """Ask the question at the replica holding the client's request; if the client is attached elsewhere
        meanwhile, withdraw it there and ask again where the client is now.

        Raises:
            ActivityError: the question's activity failed (nobody took it within the silence allowed: the
                replica holding the request is gone).
        """
        start = self._input
        assert start is not None
        while True:
            asker = self._asker
            assert asker is not None
            asking = workflow.start_activity(
                ASK_ACTIVITY,
                task,
                schedule_to_start_timeout=timedelta(seconds=start.silence),
                **self._options(command, asker),
            )
            try:
                await workflow.wait_condition(lambda: asking.done() or self._asker != asker)  # noqa: B023  (awaited here)
            except asyncio.CancelledError:
                asking.cancel()
                raise
            if asking.done():
                outcome: StepOutcome = asking.result()
                return outcome
            asking.cancel()  # its outcome, if one still comes, is ignored
            asking.add_done_callback(_ignored)

    async def _evaluate(self, command: Evaluate) -> None:
        try:
            done = await workflow.execute_local_activity(
                EVALUATE_ACTIVITY,
                Evaluation(command.source, command.data),
                result_type=Evaluated,
                start_to_close_timeout=EVALUATION_TIMEOUT,
                retry_policy=_ONCE,
            )
            outcome = Outcome(done.value, done.error, done.empty)
        except ActivityError as exc:
            outcome = Outcome(error=f"the evaluation failed: {exc.cause or exc}")
        self._events.put_nowait(("evaluated", command.key, 0, outcome, None))

    async def _timer(self, command: StartTimer) -> None:
        """Fire when the timer is due: ``seconds`` from now, or, restored in a continued execution, when it
        was due in the one before (workflow time is deterministic)."""
        due = self._due[command.key]
        await workflow.sleep(max(due - workflow.now().timestamp(), _SHORTEST_TIMER), summary=command.key)
        self._due.pop(command.key, None)
        self._events.put_nowait(("fire", command.key, 0, None, None))


def _ignored(task: "asyncio.Future[Any]") -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so that it is not reported as never retrieved


def _activity_failure(exc: ActivityError, timeout: float | None) -> StepError:
    cause = exc.cause
    if isinstance(cause, TemporalTimeout) and cause.type == TimeoutType.SCHEDULE_TO_START:  # only questions have one
        return StepError("unavailable", "the replica holding the client's request did not take the question")
    if (isinstance(cause, TemporalTimeout) and cause.type == TimeoutType.HEARTBEAT) or (
        isinstance(cause, ApplicationError) and cause.type == _WORKER_SHUTDOWN
    ):  # its replica stopped or died: made again, as a resumed local run makes the calls in flight at a crash
        return StepError("unavailable", "the replica making the call stopped before it answered", retry_after=0.0)
    if isinstance(cause, TemporalTimeout):
        limit = f"{timeout:g}s" if timeout is not None else "the longest a step may take"
        return StepError("timeout", f"no answer within the step's timeout of {limit}")
    if isinstance(cause, ApplicationError) and cause.type == _TOO_LARGE:
        return StepError("error", f"the result is larger than Temporal keeps in a run's history: {cause.message}")
    if isinstance(cause, TemporalCancelled):  # not by the engine (that outcome is ignored): its worker stopped
        return StepError("unavailable", "the call was cancelled by the worker making it")
    return StepError("error", f"internal error: {cause or exc}")
