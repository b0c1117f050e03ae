"""The runs of this gateway's workflows: started, attached to, resumed, cancelled and looked up.

A call of a workflow tool runs in the caller's request, as before, unless it must outlive it:

* a call carrying ``_meta["io.patchbay/idempotency-key"]`` starts its run *detached*, in this object's
  task group: a 2026-07-28 client whose stream broke re-issues the call with the same key and gets the
  same run (waiting while it runs, its recorded result once it has finished), not a second one; so
  does any client within ``gateway.idempotency_ttl``. Keys are scoped to the caller.
* a task-augmented call (an MCP task) starts its run detached and returns at once (:meth:`Runs.start`).

Every run is journaled in the store (:mod:`gateway.store`). A run whose gateway died is ``interrupted``;
:meth:`Runs.resume` takes it up again (claimed in the store, so one gateway does), and so does
:meth:`Runs.run` with ``resume`` (``gateway.resume: auto``), at start and then every
:data:`RESCAN` seconds. A run whose workflow changed since it started is not resumed: it is marked
with the reason, which :meth:`Runs.resume` gives. While the gateway shuts down, its runs are left as
they are, to be resumed, not cancelled and compensated.

With ``engine: temporal://…`` (``temporal``) the runs are Temporal's, not journaled here: calls, tasks,
look-ups and resume go to :class:`~gateway.workflows.on_temporal.TemporalRuns`, at any replica.
"""

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.abc import TaskGroup

from gateway.errors import GatewayError, InvalidArguments, UpstreamError
from gateway.metrics import Metrics
from gateway.store import RunQuery, RunRecord, Store
from gateway.types import CallContext, ClientChannel, JSONObject, Principal, ToolResult
from gateway.workflows.journal import JournalEvent
from gateway.workflows.plan import Plan
from gateway.workflows.runner import COMPENSATION_LIMIT, IDEMPOTENCY_META_KEY, Runner

if TYPE_CHECKING:
    from gateway.workflows.on_temporal import TemporalRuns

__all__ = ["DEFAULT_IDEMPOTENCY_TTL", "RESCAN", "AttachedClient", "RunNotResumable", "Runs", "caller_scope"]

logger = logging.getLogger(__name__)

DEFAULT_IDEMPOTENCY_TTL = 24 * 3600.0
"""Seconds a client's idempotency key is remembered (``gateway.idempotency_ttl``)."""
RESCAN = 5.0
"""Seconds between looks for runs that another gateway left interrupted (``resume: auto``)."""
CANCEL_POLL = 0.5
"""Seconds between looks for cancellations other gateways asked of this one's runs (while it runs any)."""
CANCEL_WAIT = COMPENSATION_LIMIT + 10.0
"""Seconds a cancellation asked of another gateway is waited for (its compensations included)."""
POLL = 0.05
"""Seconds between looks at the store for a run another gateway is running."""
FINISHED = frozenset({"succeeded", "failed", "cancelled"})


class RunNotResumable(GatewayError):
    """A run cannot be resumed; the message says why."""


def caller_scope(principal: Principal) -> str:
    """Whose idempotency keys these are: ``<kind>:<id>``."""
    return f"{principal.kind}:{principal.id}"


class AttachedClient:
    """The client of a detached run: whichever caller attached to it last (the call that started it, a
    re-issue with its idempotency key). A question asked while none is attached, or after the one
    attached went away, waits for the next (a resumed run asks again whoever re-issues the call)."""

    def __init__(self, client: ClientChannel | None) -> None:
        self._client = client
        self._arrived = anyio.Event()

    def attach(self, client: ClientChannel | None) -> None:
        if client is not None:
            self._client = client
            self._arrived.set()
            self._arrived = anyio.Event()

    @property
    def capabilities(self) -> JSONObject:
        if self._client is None:  # the client to come is asked; one that cannot answer says so then
            return {"elicitation": {}, "sampling": {"tools": {}}}
        return self._client.capabilities

    @property
    def protocol_version(self) -> str:
        return self._client.protocol_version if self._client is not None else ""

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        while True:
            client = self._client
            if client is None:
                await self._arrived.wait()
                continue
            wanted = "elicitation" if method.startswith("elicitation/") else "sampling"
            if wanted not in client.capabilities:
                raise UpstreamError(f"the client attached to the run cannot answer {method} (no {wanted} capability)")
            if "tools" in params and "tools" not in (client.capabilities.get("sampling") or {}):
                raise UpstreamError("the client attached to the run cannot let its model use tools (no sampling.tools)")
            try:
                return await client.request(method, params)
            except UpstreamError:
                raise  # the client's answer: it declined, or failed it
            except Exception:  # its request is over (the stream broke): wait for the next caller
                logger.debug("the client attached to a run went away mid-question", exc_info=True)
                if self._client is client:
                    self._client = None

    async def log(self, params: JSONObject) -> None:
        client = self._client
        if client is not None:
            try:
                await client.log(params)
            except Exception:
                logger.debug("a log message for a detached run not delivered", exc_info=True)


@dataclass
class _Live:
    """A run this process is running detached."""

    client: AttachedClient
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)


class Runs:
    """Starts, attaches to, resumes and cancels workflow runs, journaled in ``store``."""

    def __init__(
        self,
        runner: Runner,
        store: Store,
        plans: Mapping[str, Plan],
        *,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
        keep_age: float | None = None,
        keep_count: int | None = None,
        metrics: Metrics | None = None,
        temporal: "TemporalRuns | None" = None,
    ) -> None:
        """``temporal``: workflow calls run on Temporal (``engine: temporal://…``) instead of ``runner``."""
        self.runner = runner
        self.temporal = temporal
        self.store = store
        self.plans = plans
        self._ttl = idempotency_ttl
        self._keep_age = keep_age
        self._keep_count = keep_count
        self._metrics = metrics
        self._tasks: TaskGroup | None = None
        self._resuming = False
        """Whether interrupted runs are taken up (``resume: auto``), so waiting for one is worth it."""
        self._live: dict[str, _Live] = {}
        self._stopped = anyio.Event()

    # --- Lifetime. ---

    async def run(
        self, *, resume: bool = False, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the task group of detached runs until cancelled or closed; with ``resume``, take up the
        interrupted runs now and every :data:`RESCAN` seconds. Finished runs beyond ``keep_runs`` are
        forgotten now and then."""
        async with anyio.create_task_group() as tasks:
            self._tasks, self._resuming = tasks, resume
            tasks.start_soon(self._watch_cancels)
            task_status.started()
            try:
                rounds = 0
                while True:
                    if rounds % 720 == 0 and (self._keep_age is not None or self._keep_count is not None):
                        await self._prune()
                    await self._heartbeat()
                    if resume:
                        await self.resume_interrupted()
                    rounds += 1
                    await anyio.sleep(RESCAN)
            finally:
                self._tasks = None
        self._stopped.set()

    async def close(self) -> None:
        """Stop: the runs in flight are left as they are (interrupted, to be resumed), not compensated.
        Returns once they have stopped (their calls unwound before the connections they use close)."""
        self.runner.stopping = True
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()
            await self._stopped.wait()

    async def _heartbeat(self) -> None:
        """Keep this instance's claim on its runs alive (PostgreSQL takes its liveness lock again if the
        connection holding it was lost); the store's trouble must not stop the runs."""
        try:
            await self.store.heartbeat()
        except Exception:
            logger.exception("could not renew this gateway's hold on its runs")

    async def _watch_cancels(self) -> None:
        """Cancel the runs here whose cancellation another gateway was asked for (``tasks/cancel`` reached a
        replica that does not run the task): it is recorded in the store, and seen here within a poll."""
        while True:
            await anyio.sleep(CANCEL_POLL)
            if not self._live:
                continue
            try:
                requests = await self.store.cancel_requests()
            except Exception:  # the store's trouble must not stop the runs
                logger.exception("could not look for cancellations asked of this gateway's runs")
                continue
            for run_id, message in requests:
                live = self._live.get(run_id)
                if live is not None:
                    logger.info("cancelling run %s, as another gateway was asked: %s", run_id, message)
                    live.scope.cancel()

    async def _prune(self) -> None:
        try:
            forgotten = await self.store.prune(age=self._keep_age, count=self._keep_count)
        except Exception:  # the store's trouble must not stop the runs
            logger.exception("could not prune the finished runs")
            return
        if forgotten:
            logger.info("forgot %d finished runs (keep_runs)", forgotten)

    # --- Calls. ---

    async def call(self, plan: Plan, arguments: Mapping[str, Any], context: CallContext) -> ToolResult:
        """A call of workflow ``plan``: run in the caller's request, or, with an idempotency key, the run
        that key names (started detached by the first call that carried it)."""
        if self.temporal is not None:
            return await self.temporal.call(plan, arguments, context, uuid.uuid4().hex)
        key = (context.meta or {}).get(IDEMPOTENCY_META_KEY)
        if not isinstance(key, str) or not key:
            return await self.runner.run(plan, arguments, context)
        scope = caller_scope(context.principal)
        while True:
            entry = await self.store.idempotency_claim(scope, key, plan.name, self._ttl)
            if entry is None:
                break  # the first call with this key: this one
            if entry.tool != plan.name:
                message = f"idempotency key {key!r} was used for {entry.tool!r}: use a new key for another tool"
                return ToolResult.text(message, is_error=True)
            if entry.result is not None:
                return ToolResult.from_wire(entry.result)
            if entry.run_id is not None:
                return await self._result_of(entry.run_id, context.client)
            await anyio.sleep(POLL)  # the first call is starting its run
        run_id = uuid.uuid4().hex
        try:
            await self.store.idempotency_bind(scope, key, run_id)
            await self.start(plan, arguments, context, run_id=run_id, details={"idempotency_key": key})
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.store.idempotency_release(scope, key)
            raise
        return await self._result_of(run_id, context.client)

    async def start_task(
        self, plan: Plan, arguments: Mapping[str, Any], context: CallContext, task: JSONObject
    ) -> RunRecord:
        """Start a run as an MCP task (detached; the client polls for its result). A task-augmented call
        with an idempotency key this caller already used gets the run that key started, not a new one.

        Raises:
            InvalidArguments: the key was used for another tool.
        """
        if self.temporal is not None:  # the run is Temporal's, and so its task
            started = await self.temporal.start_task(plan, arguments, context, task)
            if self._tasks is not None and started.status == "running":  # its questions come here: ask its caller
                self._tasks.start_soon(self.temporal.attend, plan.name, started.run_id, context.client)
            return started
        key = (context.meta or {}).get(IDEMPOTENCY_META_KEY)
        if not isinstance(key, str) or not key:
            return await self.start(plan, arguments, context, task=task)
        scope = caller_scope(context.principal)
        while (entry := await self.store.idempotency_claim(scope, key, plan.name, self._ttl)) is not None:
            if entry.tool != plan.name:
                raise InvalidArguments(f"idempotency key {key!r} was used for {entry.tool!r}: use a new key")
            record = await self.store.run(entry.run_id) if entry.run_id is not None else None
            if record is not None:
                return record
            await anyio.sleep(POLL)  # the first call is starting its run
        run_id = uuid.uuid4().hex
        try:
            await self.store.idempotency_bind(scope, key, run_id)
            return await self.start(
                plan, arguments, context, task=task, run_id=run_id, details={"idempotency_key": key}
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.store.idempotency_release(scope, key)
            raise

    async def start(
        self,
        plan: Plan,
        arguments: Mapping[str, Any],
        context: CallContext,
        *,
        task: JSONObject | None = None,
        run_id: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> RunRecord:
        """Start a run detached from the caller's request; return once its start is durable.

        Raises:
            GatewayError: the gateway is not running (no task group to run it in).
        """
        if self._tasks is None:
            raise GatewayError("the gateway is not running workflows in the background")
        run_id = run_id or uuid.uuid4().hex
        details = {**(details or {}), **({"task": dict(task)} if task is not None else {})}
        client = AttachedClient(context.client)
        detached = replace(
            context, progress=_best_effort(context), client=client, input_responses=None, request_state=None
        )
        await self._tasks.start(self._detached, plan, arguments, detached, run_id, details, client)
        record = await self.store.run(run_id)
        assert record is not None  # its start was committed
        return record

    async def _detached(
        self,
        plan: Plan,
        arguments: Mapping[str, Any],
        context: CallContext,
        run_id: str,
        details: Mapping[str, Any],
        client: AttachedClient,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        live = self._live[run_id] = _Live(client)
        try:
            with live.scope:
                result = await self.runner.run(
                    plan, arguments, context, run_id=run_id, details=details, on_started=lambda _: task_status.started()
                )
                await self._finish_key(context.principal, details.get("idempotency_key"), result)
        finally:
            live.done.set()
            del self._live[run_id]

    async def _finish_key(self, principal: Principal, key: Any, result: ToolResult) -> None:
        if isinstance(key, str) and key:
            await self.store.idempotency_finish(caller_scope(principal), key, result.wire())

    async def _result_of(self, run_id: str, client: ClientChannel | None = None) -> ToolResult:
        """The result of run ``run_id``, once it has one (it may be running here, or in another gateway);
        while it runs here, its questions go to ``client`` (the caller waiting for it)."""
        while True:
            record = await self.store.run(run_id)
            if record is not None and record.result is not None:
                return ToolResult.from_wire(record.result)
            if record is not None and record.status == "interrupted" and (record.note or not self._resuming):
                why = record.note or f"resume it with `patchbay resume CONFIG {run_id}`"
                return ToolResult.text(f"run {run_id} was interrupted and is not resumed: {why}", is_error=True)
            if self.runner.stopping:
                message = f"the gateway is stopping; run {run_id} goes on after its restart: re-issue the call then"
                return ToolResult.text(message, is_error=True)
            live = self._live.get(run_id)
            if live is not None:
                live.client.attach(client)
                await live.done.wait()
            else:
                await anyio.sleep(POLL)

    # --- Looking runs up (tasks, resources). ---

    async def get(self, run_id: str, principal: Principal) -> RunRecord | None:
        """The record of run ``run_id`` if ``principal`` started it; None otherwise, as for an unknown run."""
        if self.temporal is not None:
            return await self.temporal.get(run_id, principal)
        record = await self.store.run(run_id)
        if record is None or (record.caller_kind, record.caller_id) != (principal.kind, principal.id):
            return None
        return record

    async def wait(self, run_id: str, principal: Principal) -> RunRecord | None:
        """The record of ``principal``'s run ``run_id`` once it has finished (None: no such run of theirs)."""
        if self.temporal is not None:
            return await self.temporal.wait(run_id, principal)
        if await self.get(run_id, principal) is None:
            return None
        await self._result_of(run_id)
        return await self.store.run(run_id)

    async def cancel(self, run_id: str, principal: Principal) -> RunRecord | None:
        """Cancel ``principal``'s run ``run_id``: here if it runs here; by the gateway that runs it otherwise
        (asked through the store, and waited for up to :data:`CANCEL_WAIT`); or, if it is interrupted, by
        taking it up to be cancelled (its compensations run). Its record after."""
        if self.temporal is not None:
            return await self.temporal.cancel(run_id, principal)
        record = await self.get(run_id, principal)
        if record is None:
            return None
        if record.status == "interrupted" and run_id not in self._live:
            try:
                await self._take_up(run_id, cancel="the caller cancelled the run")
            except RunNotResumable as exc:
                logger.warning("run %s cannot be taken up to be cancelled: %s", run_id, exc)
        live = self._live.get(run_id)
        if live is not None:
            live.scope.cancel()
            await live.done.wait()
        elif record.status == "running":  # another live gateway runs it
            await self.store.request_cancel(run_id, "the caller cancelled the run")
            with anyio.move_on_after(CANCEL_WAIT):
                while (current := await self.store.run(run_id)) is not None and current.status == "running":  # noqa: ASYNC110  (the state is in the store)
                    await anyio.sleep(POLL)
        return await self.store.run(run_id)

    async def list(self, principal: Principal, *, tasks_only: bool = True) -> Sequence[RunRecord]:
        """``principal``'s runs (those started as tasks, with ``tasks_only``), most recent first."""
        if self.temporal is not None:
            return await self.temporal.list(principal, tasks_only=tasks_only)
        records = await self.store.runs(RunQuery(caller=(principal.kind, principal.id)))
        return [record for record in records if record.task is not None or not tasks_only]

    async def events(self, run_id: str) -> Sequence[JournalEvent]:
        """Run ``run_id``'s journal (on Temporal: its history, read as journal events), for its timeline."""
        if self.temporal is not None:
            return await self.temporal.events(run_id)
        return await self.store.events(run_id)

    # --- Resuming. ---

    async def resume_interrupted(self) -> Sequence[str]:
        """Take up every interrupted run that can be; the ids of those taken up."""
        taken: list[str] = []
        try:
            interrupted = await self.store.runs(RunQuery(status="interrupted"))
        except Exception:
            logger.exception("could not look for interrupted runs")
            return taken
        for record in interrupted:
            if record.note is not None:
                continue  # refused before, for a reason that has not gone away
            try:
                await self._take_up(record.run_id)
            except RunNotResumable as exc:
                logger.warning("run %s of %s is not resumed: %s", record.run_id, record.workflow, exc)
                continue
            taken.append(record.run_id)
        return taken

    async def resume(self, run_id: str) -> ToolResult:
        """Resume interrupted run ``run_id`` and return its result once it finishes.

        Raises:
            RunNotResumable: no such run, it is not interrupted, its workflow changed or is gone since it
                started, or another gateway took it up first. On Temporal: no such run, or it has finished
                (one that runs is never interrupted: its result is awaited).
        """
        if self.temporal is not None:
            return await self.temporal.resume(run_id)
        await self._take_up(run_id)
        return await self._result_of(run_id)

    async def _take_up(self, run_id: str, *, cancel: str | None = None) -> None:
        """Claim interrupted run ``run_id`` and go on with it in the background (with ``cancel``: cancel it,
        so that only its compensations run)."""
        if self._tasks is None:
            raise GatewayError("the gateway is not running workflows in the background")
        record = await self.store.run(run_id)
        if record is None:
            raise RunNotResumable(f"no run {run_id} is recorded")
        if record.status == "running":
            raise RunNotResumable(f"run {run_id} is running in a live gateway ({record.owner})")
        if record.status != "interrupted":
            raise RunNotResumable(f"run {run_id} has finished: {record.status}")
        plan = self.plans.get(record.workflow)
        note = None
        if plan is None:
            note = f"workflow {record.workflow!r} is no longer configured"
        elif plan.digest != record.plan:
            note = (
                f"workflow {record.workflow!r} changed since the run started (definition {record.plan} then, "
                f"{plan.digest} now): a run is resumed only with the definition it started with"
            )
        if note is not None or plan is None:
            await self.store.mark(run_id, note)
            raise RunNotResumable(note or "")
        if not await self.store.claim(run_id):
            raise RunNotResumable(f"run {run_id} was taken up by another gateway")
        events = await self.store.events(run_id)
        client = AttachedClient(None)  # its questions wait for its caller to re-issue the call
        context = CallContext(principal=Principal(record.caller_id, record.caller_kind), client=client)
        if self._metrics is not None:
            self._metrics.workflow_resumed(plan.name)
        logger.info("resuming run %s of %s", run_id, plan.name)
        await self._tasks.start(self._resumed, plan, events, context, record, cancel)

    async def _resumed(
        self,
        plan: Plan,
        events: Sequence[Any],
        context: CallContext,
        record: RunRecord,
        cancel: str | None,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        assert isinstance(context.client, AttachedClient)
        live = self._live[record.run_id] = _Live(context.client)
        try:
            with live.scope:
                started = task_status.started
                result = await self.runner.resume(plan, events, context, on_started=lambda _: started(), cancel=cancel)
                await self._finish_key(context.principal, record.idempotency_key, result)
        finally:
            live.done.set()
            del self._live[record.run_id]


def _best_effort(context: CallContext) -> Any:
    """The caller's progress callback, made harmless once the caller is gone (a detached run outlives it)."""
    progress = context.progress
    if progress is None:
        return None

    async def report(done: float, total: float | None, message: str | None) -> None:
        try:
            await progress(done, total, message)
        except Exception:  # the request it reported to has ended
            logger.debug("progress for a detached run not delivered", exc_info=True)

    return report
