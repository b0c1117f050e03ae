"""Workflow runs on Temporal (DESIGN §6): one generic Temporal workflow drives the same pure engine.

:class:`PatchbayRun` (workflow type ``patchbay.run``) runs any Patchbay workflow: its input names the
workflow and its plan's digest, and carries the arguments, the caller and the run id. It feeds a
:class:`~gateway.workflows.engine.Run` its events and carries out the commands it returns, as the
local runner does, with Temporal's means:

* ``CallTool``: an activity (``patchbay.step``) on the run's own task
  queue (below), so whichever replica holding the plan polls it makes the call, through the
  ``execute`` callable its engine was given (in the gateway, the dispatch path). The step's
  ``timeout`` is the activity's start-to-close timeout (and the activity enforces it itself too, so
  the call is stopped, not only given up on). Temporal's own retries are off: the engine retries,
  with a timer between tries.
  The activity heartbeats, which is how a cancellation reaches it and how a dead worker is noticed.
  A try whose replica stopped or died before it answered (its worker shut down; no heartbeat for
  :data:`HEARTBEAT_TIMEOUT`) is made again under the same idempotency key, as a resumed local run
  makes the calls in flight at a crash again: it fails as a refusal does (``unavailable``, with
  ``retry_after`` 0), which the engine tries again within the step's timeout even without ``retry:``.
* ``AskUser``, ``AskModel``: an activity (``patchbay.ask``) on the queue of the replica holding the
  client's request (:attr:`RunInput.asker`, :attr:`TemporalEngine.asker`), which asks the client
  through that request (:mod:`gateway.workflows.callers`), heartbeating and within the step's timeout
  as a call. The ``attach`` signal names another replica's queue when the client's call (keyed) is
  re-issued there: later questions go there, and one being asked is withdrawn and asked there. A
  question no worker takes within the run's silence (the replica is gone), or whose replica dies
  while asking, is not asked again: the step takes its ``default``, or fails ``unavailable``.
* ``Evaluate``: a local activity (``patchbay.evaluate``) running the jq program in the bounded worker
  pool (:func:`~gateway.workflows.expressions.run_program`): jq is native code and never runs in
  workflow code, and its outcome is recorded in the history, so a replay does not run it again.
* ``StartTimer``: a durable timer (:func:`temporalio.workflow.sleep`). ``Cancel``: the activity, local
  activity or timer of that key is cancelled. A retry's jitter draws from :func:`temporalio.workflow.random`.
* A cancellation of the Temporal workflow is :meth:`Run.cancel <gateway.workflows.engine.Run.cancel>`:
  the steps in flight are cancelled and the compensations run (the engine's ``CallTool`` with
  ``compensation=True``, activities like any other).
* ``Finished`` ends the workflow with a :class:`RunResult` (what ``Finished`` carries). Temporal's
  status tells the truth about the run: a succeeded run completes with it; a failed one fails with an
  ``ApplicationError`` of type :data:`RUN_FAILED` whose details are the result; a cancelled one
  (compensated) ends cancelled, which carries no details (its compensations' errors are logged and
  are in the history). :meth:`TemporalEngine.result` reads all three back as a result.

Temporal owns durability and history: nothing is journaled in the store. ``Settled`` notes become the
run's progress notes (the message a local run reports, :meth:`Settled.describe
<gateway.workflows.commands.Settled.describe>`), the last :data:`PROGRESS_KEPT` of them kept in the
workflow's state and read by the ``progress`` query (a query is not recorded in the history): the
replica awaiting the run polls it for a caller that asked for progress. Step metrics come later.

Long runs continue as new. Temporal stops a run whose history reaches 50 000 events (or 50 MB), and a
step costs about six (its activity's three, a workflow task's three). When the server suggests it
(``is_continue_as_new_suggested``) or the history reaches ``history_limit`` events (:data:`HISTORY_LIMIT`),
the run continues as new: a fresh execution of the same workflow id, so ``handle.result()`` (which follows
the chain) and a cancellation (which goes to the latest execution) still reach it. It carries a
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

Which plan: the workflow's input names it by workflow name and digest, and a worker runs only runs of
plans it holds with that very digest (a workflow changed since the run began is not the same plan:
replaying it could not give the same commands). A run is started on a task queue of its plan's own,
``<task_queue>.<first 16 hex digits of the digest>``, that only workers holding the plan poll, so a
replica whose config has another version of the workflow never takes it: the run waits for one that
has it (during a rolling deploy, the old replicas finish the old runs). Should a run still reach a
worker without its plan, the workflow task fails (:class:`PlanNotHeld`) and Temporal tries it again,
later or elsewhere; the run itself is not failed. The steps' activities go to the same queue: any
replica holding the plan may make a call, and the SDK hands an activity scheduled by a workflow task
straight to the worker that ran it (eager dispatch) when it has room, which halves a step's latency
here (``bench/RESULTS.md``, "Issue 14"). (Temporal's worker versioning would do the routing too, but
needs a deployment name and build id per config; a queue per digest needs nothing.) A replica
that stops leaves its cached runs on its sticky queue: Temporal hands them to another replica after
the worker's sticky timeout (10 s).

The sandbox: the workflow runs under Temporal's default ``SandboxedWorkflowRunner``. The engine and
what it imports are pure, so they are passed through (imported once, not per run); so is the table
of held plans (:mod:`gateway.workflows._temporal_plans`), which is how a run inside the sandbox finds
the plans its worker was given. Workflow code must use Temporal's deterministic asyncio loop, hence
``asyncio`` here, and only here (its ruff ban is lifted for this module).

Future work: a change to the engine's own code changes what a replay does (of a history, or of the
journal a continued run carries), which the plan digest does not see: gateway upgrades with runs in flight
need Temporal's worker versioning or patching.
"""

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from typing import Any, Literal

from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import RetryPolicy, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutType, WorkflowAlreadyStartedError
from temporalio.exceptions import CancelledError as TemporalCancelled
from temporalio.exceptions import TimeoutError as TemporalTimeout
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    import anyio

    # `import a.b as b`, not `from a import b`: the sandbox passes modules through by their full name,
    # and `gateway.workflows` itself is imported in the sandbox (it holds this module).
    import gateway.workflows._temporal_plans as _temporal_plans
    from gateway.errors import GatewayError, ToolNotFound
    from gateway.types import ClientChannel
    from gateway.workflows._jqsafe import TIME_LIMIT
    from gateway.workflows._temporal_carry import JOURNAL_LIMIT, Carried, Journal
    from gateway.workflows.asking import default_or
    from gateway.workflows.callers import Callers
    from gateway.workflows.commands import (
        AskModel,
        AskUser,
        CallTool,
        Cancel,
        Command,
        Evaluate,
        Finished,
        Leaf,
        Settled,
        StartTimer,
        StepError,
    )
    from gateway.workflows.engine import Run
    from gateway.workflows.expressions import Outcome, run_program
    from gateway.workflows.plan import Plan

__all__ = [
    "ASK_ACTIVITY",
    "ATTACH_SIGNAL",
    "EVALUATE_ACTIVITY",
    "HISTORY_LIMIT",
    "MEMO",
    "RUN_FAILED",
    "STEP_ACTIVITY",
    "WORKFLOW_TYPE",
    "Carried",
    "Evaluation",
    "Execute",
    "PatchbayRun",
    "PlanNotHeld",
    "ProgressNote",
    "RunInput",
    "RunResult",
    "Evaluated",
    "StepKind",
    "StepOutcome",
    "StepTask",
    "TemporalEngine",
    "evaluate",
    "result_of",
    "workflow_queue",
]

logger = logging.getLogger(__name__)

WORKFLOW_TYPE = "patchbay.run"
STEP_ACTIVITY = "patchbay.step"
EVALUATE_ACTIVITY = "patchbay.evaluate"
ASK_ACTIVITY = "patchbay.ask"
"""The activity asking a run's client (``ask_user``, ``ask_model``), on the queue of the replica holding its request."""
ATTACH_SIGNAL = "attach"
"""The signal moving a run's questions to the replica of the queue it names: its caller re-issued the call there."""
RUN_FAILED = "PatchbayRunFailed"
"""The type of the ``ApplicationError`` a failed run ends with; its details are the :class:`RunResult`."""
MEMO = "patchbay"
"""The memo field of a run's record (:meth:`TemporalEngine.start`): what ``patchbay runs`` and tasks read
back (:mod:`gateway.workflows.temporal_records`); a memo, as custom search attributes need registering."""

HEARTBEAT_TIMEOUT = timedelta(seconds=30)
"""A step's worker that has not heartbeat for this long is taken for dead: the try fails (``unavailable``)."""
STICKY_TIMEOUT = 10.0
"""Seconds a run cached by a replica waits for it (its sticky queue) before any replica may take it (SDK default)."""
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
HISTORY_LIMIT = 10_000
"""Events: a run whose history is this long continues as new even if Temporal has not suggested it yet
(Temporal stops a run at 50 000)."""
PROGRESS_KEPT = 256
"""Progress notes a run keeps for its caller to read (:meth:`PatchbayRun.progress`); older ones are forgotten."""

Execute = Callable[[Leaf, str, dict[str, str]], Awaitable[tuple[Any, StepError | None]]]
"""``async (command, run_id, caller) -> (result, error)``: make a step's call or ask its question (the
gateway's dispatch path); ``caller`` is ``{kind, id}``. Cancelled when the engine cancels the step."""

_Event = tuple[str, str, int, Any, StepError | None]
"""``("done", key, attempt, result, error)``, ``("fire", key, 0, None, None)``,
``("evaluated", key, 0, Outcome, None)``, or ``("wake", "", 0, None, None)`` (nothing in flight any more:
the run may continue as new)."""
StepKind = Literal["call_tool", "ask_user", "ask_model"]
_KINDS: dict[type, StepKind] = {CallTool: "call_tool", AskUser: "ask_user", AskModel: "ask_model"}
_LEAVES: dict[str, type[CallTool] | type[AskUser] | type[AskModel]] = {kind: cls for cls, kind in _KINDS.items()}


class PlanNotHeld(RuntimeError):
    """A run reached a worker that does not hold its plan (that workflow, that digest). Not a Temporal
    failure: the workflow task fails and is tried again, the run goes on where the plan is held."""


@dataclass(frozen=True)
class RunInput:
    """The generic workflow's input: which plan to run, on what, for whom."""

    workflow: str
    digest: str
    """The plan's :attr:`~gateway.workflows.plan.Plan.digest`: a worker runs only this version of the workflow."""
    arguments: dict[str, Any]
    caller: dict[str, str]
    """The principal who started the run: ``{kind, id}``."""
    run_id: str
    """What expressions read as ``.run.id``, and what idempotency keys begin with; also the workflow id."""
    task_queue: str
    """Where the steps' activities go: the run's own queue (:func:`workflow_queue`)."""
    silence: float = HEARTBEAT_TIMEOUT.total_seconds()
    """Seconds a step's replica may go without a heartbeat before the try is taken for lost (and made again)."""
    history_limit: int = HISTORY_LIMIT
    """Events: an execution whose history is this long continues as new (as it does when Temporal suggests it)."""
    carried: Carried | None = None
    """Set when the run continued as new: its engine's journal and its pending timers (not set at the start)."""
    asker: str | None = None
    """The queue of the replica holding the client's request (:attr:`TemporalEngine.asker`): the run's questions go
    there. None: the run has no client to ask, and its questions go to the steps' queue (whose ``execute`` answers)."""


@dataclass(frozen=True)
class ProgressNote:
    """A step's end, for the caller's progress notifications: the ``settled``-th of ``total`` steps."""

    settled: int
    total: int | None
    """None: not known beforehand (a ``for_each`` over a list the run computes)."""
    message: str


@dataclass(frozen=True)
class RunResult:
    """How a run ended: what the engine's ``Finished`` carries, plus ``cancelled`` and the run id."""

    run_id: str
    status: Literal["succeeded", "failed", "cancelled"]
    output: Any = None
    error: dict[str, Any] | None = None
    """The :class:`~gateway.workflows.commands.StepError` that failed the run, as its fields."""
    compensation_errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class StepTask:
    """The input of the step activity: a ``CallTool``, ``AskUser`` or ``AskModel`` command, and for whom."""

    run_id: str
    caller: dict[str, str]
    kind: StepKind
    command: dict[str, Any]
    """The command's fields (a call's ``idempotency_key`` included)."""


@dataclass(frozen=True)
class StepOutcome:
    """The step activity's result: the step's result, or the error (its fields) that failed it."""

    result: Any = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class Evaluation:
    """The input of the evaluation (local) activity: a jq program and its narrowed input."""

    source: str
    data: Any


@dataclass(frozen=True)
class Evaluated:
    """What a jq program gave: its first output, no output (``empty``), or jq's ``error``."""

    value: Any = None
    error: str | None = None
    empty: bool = False


def workflow_queue(task_queue: str, plan: Plan) -> str:
    """The task queue of ``plan``'s runs: only workers holding that digest poll it."""
    return f"{task_queue}.{plan.digest[:16]}"


# --- The workflow. ---


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
        self._held: dict[str, CallTool | AskUser | AskModel | Evaluate] = {}
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
        """The steps settled so far, in this execution and those it continues."""
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
                self._due.setdefault(command.key, workflow.now().timestamp() + command.seconds)
                self._spawn(command.key, self._timer(command))
            elif self._draining and isinstance(command, CallTool | AskUser | AskModel | Evaluate):
                self._held[command.key] = command  # made in the next execution (restored as outstanding)
            elif isinstance(command, Evaluate):
                self._working.add(self._spawn(command.key, self._evaluate(command)))
            elif isinstance(command, CallTool | AskUser | AskModel):
                self._began[command.key] = workflow.time()
                self._working.add(self._spawn(command.key, self._step(command)))
            elif isinstance(command, Settled):  # for the caller's progress (the history has the rest)
                self._settled(command)
        return finished

    def _settled(self, note: Settled) -> None:
        began = self._began.pop(note.key, None)
        duration = round((workflow.time() - began) * 1000, 3) if began is not None else None
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
            _KINDS[type(command)],
            {f.name: getattr(command, f.name) for f in fields(command)},
        )
        question = isinstance(command, AskUser | AskModel)
        try:
            if question and self._asker is not None:
                outcome = await self._ask(task, command)
            else:
                outcome = await workflow.execute_activity(STEP_ACTIVITY, task, **self._options(command))
            result, error = outcome.result, StepError(**outcome.error) if outcome.error is not None else None
        except ActivityError as exc:  # the activity itself failed: timed out, its worker died or raised
            result, error = None, _activity_failure(exc, command.timeout)
            if isinstance(command, AskUser | AskModel) and error.kind == "unavailable":
                # The replica holding the client's request is gone: nobody can be asked (not even on a retry).
                result, error = default_or(command.default, f"the client could not be asked: {error.message}")
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


# --- The activities. ---


class _Steps:
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
        command = _LEAVES[task.kind](**task.command)
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


# --- What the gateway calls. ---


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
        self._steps = _Steps(execute, self.callers.ask, heartbeat)
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
