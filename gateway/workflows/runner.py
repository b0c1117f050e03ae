"""Runs workflows: carries out the engine's commands with real calls, timers and cancellation.

The engine decides; the runner awaits. Each call, question or jq evaluation runs in its own task of
the run's task group, under its own cancel scope (so the engine can cancel one) and its step's
timeout; its outcome goes back to the engine as an event, and so do timers. A lone call or
evaluation, with nothing else in flight, is awaited in the run's own task instead (a chain's steps
cost no task). jq runs in the bounded worker pool, awaited without blocking the event loop. The
runner is also where time and randomness come from, and where everything is journaled – each
input to the engine before what it leads to is carried out – and reported as progress.
An ``agent`` step's turn is asked of the run's client offering the tools of the ``catalog`` its globs
match; its tool calls are calls like any other, and its parts are journaled and reported, not counted as steps.
Compensations run one at a time, in the run's own task, and also when the caller cancels the
run (shielded, within :data:`COMPENSATION_LIMIT`).
"""

import json
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from gateway.dispatch import Invocation
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.store import Store
from gateway.tracing import step_span
from gateway.types import RUN_META_KEY, CallContext, JSONObject, ToolResult
from gateway.workflows.asking import ToolCatalog, ask, offered
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
    Settled,
    StartTimer,
    StepError,
    started_data,
)
from gateway.workflows.engine import Run
from gateway.workflows.expressions import Outcome, run_program
from gateway.workflows.journal import EventKind, JournalEvent
from gateway.workflows.plan import Plan

__all__ = ["COMPENSATION_LIMIT", "CallFn", "Runner", "result_value"]

logger = logging.getLogger(__name__)

COMPENSATION_LIMIT = 30.0
"""Seconds the compensations of a cancelled run may take in all."""
IDEMPOTENCY_META_KEY = "io.patchbay/idempotency-key"
"""The ``_meta`` key a step's ``idempotency_key`` is sent under."""

CallFn = Callable[[str, JSONObject, CallContext], Awaitable[Invocation]]
"""``Dispatcher.invoke``: a call through the gateway's one dispatch path, with its outcome label."""

_Event = tuple[str, str, int, Any, StepError | None]
"""``("done", key, attempt, result, error)``, ``("fire", key, 0, None, None)`` or
``("evaluated", key, 0, Outcome, None)``."""
_Leaf = CallTool | AskUser | AskModel | AskAgent
_Work = CallTool | AskUser | AskModel | AskAgent | Evaluate


_JSON_STARTS = frozenset('{["-0123456789tfn')


def result_value(result: ToolResult) -> Any:
    """What ``.steps.<id>.result`` holds for a call's result: its structured content, or its text (as JSON if it is)."""
    if result.structured_content is not None:
        return result.structured_content
    texts = [str(item.get("text", "")) for item in result.content if item.get("type") == "text"]
    if len(texts) != len(result.content):
        return [dict(item) for item in result.content]
    text = "".join(texts)
    if text.lstrip()[:1] not in _JSON_STARTS:  # plain text: spare json.loads building an exception
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def error_text(result: ToolResult) -> str:
    """The text of an ``isError`` result, for the step's error message."""
    texts = [str(item.get("text", "")) for item in result.content if item.get("type") == "text"]
    return " ".join(texts).strip() or "the tool reported an error"


@dataclass
class _Execution:
    """One run in progress: what the runner keeps besides the engine."""

    run_id: str
    plan: Plan
    engine: Run
    context: CallContext
    send: MemoryObjectSendStream[_Event]
    scopes: dict[str, anyio.CancelScope] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    seq: int = 0
    settled: int = 0
    """Progress notes sent so far: steps settled and loop iterations ended."""
    active: int = 0
    """Calls, questions, evaluations and timers started and not yet reported."""
    reported: int = 0
    """Outcomes sent to the run's loop and not received yet (cheaper to count than to ask the stream)."""
    ready: list[_Work] = field(default_factory=list)
    """Steps journaled as started, and evaluations, not launched yet."""
    dirty: bool = False
    """Events recorded and not yet committed."""
    timers: dict[str, float] = field(default_factory=dict)
    """A resumed run's pending timers: when each was started (wall clock), so it fires when it would have."""
    spent: dict[str, float] = field(default_factory=dict)
    """A resumed run's calls in flight at the crash: seconds their try had taken (of its timeout)."""


class Runner:
    """Runs workflow plans; every step's call goes through ``call`` (the dispatch path)."""

    def __init__(
        self,
        call: CallFn,
        journal: Store,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
        catalog: ToolCatalog | None = None,
    ) -> None:
        """``catalog``: the tools each caller may call, which an ``agent`` step's turn offers the model (None: none)."""
        self._call = call
        self._catalog = catalog
        self._metrics = metrics
        self._journal = journal
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng
        self.stopping = False
        """Set while the gateway shuts down: a run cancelled then is left as it is, to be resumed, not
        compensated as a run its caller cancelled."""

    async def run(
        self,
        plan: Plan,
        arguments: Mapping[str, Any],
        context: CallContext,
        *,
        run_id: str | None = None,
        details: Mapping[str, Any] | None = None,
        on_started: Callable[[str], None] | None = None,
    ) -> ToolResult:
        """Run ``plan`` with (already validated) ``arguments``; the result, or an ``isError`` naming the failed step.

        ``details`` go into the ``run_started`` event beside what the runner puts there (``task``,
        ``idempotency_key``); ``on_started(run_id)`` is called once that event is committed.
        """
        run_id = run_id or uuid.uuid4().hex
        send, receive = anyio.create_memory_object_stream[_Event](math.inf)
        run = _Execution(run_id, plan, Run(plan, arguments, run_id), context, send)
        principal = context.principal
        started_data = {
            "workflow": plan.name,
            "arguments": arguments,
            "caller": {"kind": principal.kind, "id": principal.id},
            "plan": plan.digest,
            **(details or {}),
        }
        self._record(run, "run_started", data=started_data)
        await self._commit(run)
        if on_started is not None:
            on_started(run_id)
        with send, receive:
            return await self._drive(run, receive, run.engine.start, self._clock())

    async def resume(
        self,
        plan: Plan,
        events: Sequence[JournalEvent],
        context: CallContext,
        *,
        on_started: Callable[[str], None] | None = None,
        cancel: str | None = None,
    ) -> ToolResult:
        """Go on with an interrupted run from its journal ``events``: what completed is not done again; the
        calls, questions, evaluations and compensation in flight at the crash are made again (the calls
        under the same idempotency keys); pending timers fire when they would have; a call's timeout
        counts the time its try had already taken. With ``cancel`` (a message), the run is cancelled
        instead of going on: nothing in flight is made again, its compensations run.

        Raises:
            ValueError: the events are not a run of ``plan`` (its definition changed since it started).
        """
        timers: dict[str, float] = {}
        finished: list[Finished] = []
        iterated: list[Iterated] = []  # progress notes too: the count goes on from where it was

        def observe(event: JournalEvent, commands: list[Command]) -> None:
            for command in commands:
                if isinstance(command, StartTimer):
                    timers[command.key] = event.at
                elif isinstance(command, Finished):
                    finished.append(command)
                elif isinstance(command, Iterated):
                    iterated.append(command)

        engine, outstanding = Run.restore(plan, events, observe)
        first, now = events[0], self._wall_clock()
        send, receive = anyio.create_memory_object_stream[_Event](math.inf)
        run = _Execution(first.run_id, plan, engine, context, send, seq=max(e.seq for e in events) + 1)
        pending = {str(getattr(command, "key", "")) for command in outstanding}
        run.timers = {key: at for key, at in timers.items() if key in pending}
        for event in events:
            if event.kind == "step_started" and event.key is not None and event.key in pending:
                run.spent[event.key] = max(0.0, now - event.at)
        run.settled = sum(event.kind == "step_settled" and "part" not in event.data for event in events) + len(iterated)
        self._record(run, "run_resumed", data={"outstanding": sorted(pending)})
        await self._commit(run)
        if on_started is not None:
            on_started(run.run_id)
        started = self._clock() - max(0.0, now - first.at)  # its duration counts from its first start
        with send, receive:
            if finished:  # it had finished; only its last words were lost
                return await self._finish(run, finished[-1], started)
            if cancel is not None:
                cancelled = await self._cancel(run, cancel)
                return await self._drive(run, receive, lambda: cancelled, started, cancelled=True)
            return await self._drive(run, receive, lambda: outstanding, started)

    async def _drive(
        self,
        run: _Execution,
        receive: MemoryObjectReceiveStream[_Event],
        begin: Callable[[], list[Command]],
        started: float,
        *,
        cancelled: bool = False,
    ) -> ToolResult:
        """Carry the run through to its end: the engine's commands from ``begin``, then each outcome's."""
        plan = run.plan
        if self._metrics is not None:
            self._metrics.workflow_started(plan.name)
        finished: Finished | None = None
        try:
            async with anyio.create_task_group() as tg:
                finished = await self._apply(run, begin(), tg)
                while finished is None:
                    idle = run.active == 0 and not run.reported
                    event = await self._launch(run, tg, inline=idle)
                    if event is None:
                        if idle and not run.active:
                            # Nothing in flight, nothing to wait for: an engine bug must not hang the caller.
                            logger.error("workflow %s run %s stalled; cancelling it", plan.name, run.run_id)
                            stalled = await self._cancel(run, "internal error: the run stalled")
                            finished = await self._apply(run, stalled, tg)
                            continue
                        event = await receive.receive()
                        run.reported -= 1
                    finished = await self._apply(run, await self._feed(run, event), tg)
                    while finished is None and run.reported:  # outcomes that came together: one commit for all
                        event = receive.receive_nowait()
                        run.reported -= 1
                        finished = await self._apply(run, await self._feed(run, event), tg)
                    await self._commit(run)  # a finished step is durable now, whatever starts next
                tg.cancel_scope.cancel()  # timers still pending
        except anyio.get_cancelled_exc_class():
            if self.stopping:  # the gateway is going down: the run stays as it is, and is resumed later
                if self._metrics is not None:
                    self._metrics.workflow_run(plan.name, "interrupted")
                raise
            with anyio.CancelScope(shield=True), anyio.move_on_after(COMPENSATION_LIMIT):
                commands = await self._cancel(run, "the caller cancelled the run")
                finished = await self._apply(run, commands, None)
                await self._finish(run, finished, started, cancelled=True)
            raise
        assert finished is not None
        return await self._finish(run, finished, started, cancelled=cancelled)

    async def _feed(self, run: _Execution, event: _Event) -> list[Command]:
        """Journal an outcome or a timer firing (an input of the engine), then hand it to the engine."""
        kind, key, attempt, result, error = event
        if kind == "fire":
            self._record(run, "timer_fired", key)
            return run.engine.fire(key)
        if kind == "evaluated":
            outcome: Outcome = result
            self._record(run, "evaluated", key, data=_outcome_data(outcome))
            return run.engine.evaluated(key, outcome.value, error=outcome.error, empty=outcome.empty)
        return await self._done(run, key, attempt, result, error, self._rng())

    async def _done(
        self, run: _Execution, key: str, attempt: int, result: Any, error: StepError | None, draw: float
    ) -> list[Command]:
        # Every field of the error (not only what expressions see): the replayed run must get the same one.
        data = {"result": result, "error": asdict(error) if error is not None else None, "random": draw}
        self._record(run, "step_done", key, attempt, data)
        return run.engine.done(key, attempt, result, error, random=draw)

    async def _cancel(self, run: _Execution, message: str) -> list[Command]:
        self._record(run, "run_cancelled", data={"message": message})
        return run.engine.cancel(message)

    async def _apply(self, run: _Execution, commands: list[Command], tg: TaskGroup | None) -> Finished | None:
        """Carry out ``commands`` (and what compensations lead to); the ``Finished`` note, once there is one."""
        pending = deque(commands)
        finished: Finished | None = None
        while pending:
            command = pending.popleft()
            if isinstance(command, Settled | Iterated):
                await self._settled(run, command)
            elif isinstance(command, Finished):
                finished = command
            elif isinstance(command, Cancel):
                scope = run.scopes.pop(command.key, None)
                if scope is not None:
                    scope.cancel()
            elif isinstance(command, StartTimer):
                if tg is not None:
                    run.active += 1
                    tg.start_soon(self._timer, run, command)
            elif isinstance(command, CallTool) and command.compensation:
                started = {"step": command.step, "tool": command.tool, "arguments": command.arguments}
                self._record(run, "step_started", command.key, 1, started)
                await self._commit(run)  # what led to it is durable before the upstream sees the call
                result, error = await self._perform(run, command)
                status = "failed" if error else "succeeded"
                settled = {"status": status, "error": error.as_json() if error else None}
                self._record(run, "step_settled", command.key, 1, settled)
                pending.extend(await self._done(run, command.key, 1, result, error, 0.5))
            elif isinstance(command, Evaluate):
                if tg is not None:
                    run.ready.append(command)
                else:  # compensating a cancelled run, in its own task: one thing at a time
                    pending.extend(await self._feed(run, await self._work(run, command)))
            elif tg is not None:
                self._started(run, command)
                self._record(run, "step_started", command.key, command.attempt, started_data(command))
                run.ready.append(command)
        return finished

    def _started(self, run: _Execution, command: _Leaf) -> None:
        run.started[command.key] = self._clock() - run.spent.get(command.key, 0.0)
        if isinstance(command, AskAgent):  # the agent step's own duration counts from its first turn
            run.started.setdefault(command.key.rpartition("#")[0], run.started[command.key])

    async def _launch(self, run: _Execution, tg: TaskGroup, *, inline: bool) -> _Event | None:
        """Start the steps and evaluations made ready; when ``inline`` (nothing else in flight or
        queued) and there is only one, await it here instead and return its outcome: a chain step
        then costs no task, no cancel scope and no stream hop, and nothing could cancel it but the
        caller anyway."""
        ready, run.ready = run.ready, []
        if ready:
            await self._commit(run)  # every input that led to them is durable before any of them starts
        if inline and len(ready) == 1:
            return await self._work(run, ready[0])
        for command in ready:
            scope = run.scopes[command.key] = anyio.CancelScope()
            run.active += 1
            tg.start_soon(self._task, run, command, scope)
        return None

    async def _timer(self, run: _Execution, command: StartTimer) -> None:
        seconds = command.seconds
        started = run.timers.pop(command.key, None)
        if command.due is not None:  # a wall-clock time (`wait: {until: …}`): the same after a restart
            seconds = max(0.0, command.due - self._wall_clock())
        elif started is not None:  # a resumed run's timer: it fires when it would have
            seconds = max(0.0, started + seconds - self._wall_clock())
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            run.active -= 1
            raise
        _report(run, ("fire", command.key, 0, None, None))

    async def _task(self, run: _Execution, command: _Work, scope: anyio.CancelScope) -> None:
        """A step in its own task, under the scope the engine cancels it by; its outcome goes to the run's loop."""
        with scope:
            try:
                event = await self._work(run, command)
            except anyio.get_cancelled_exc_class():
                run.active -= 1
                raise
            run.scopes.pop(command.key, None)
            _report(run, event)

    async def _work(self, run: _Execution, command: _Work) -> _Event:
        if isinstance(command, Evaluate):  # bounded by the worker's time limit; a cancelled one kills its worker
            return ("evaluated", command.key, 0, await run_program(command.source, command.data), None)
        return await self._leaf(run, command)

    async def _leaf(self, run: _Execution, command: _Leaf) -> _Event:
        limit = command.timeout
        spent = run.spent.pop(command.key, 0.0)
        if limit is not None:  # a resumed try's timeout counts the time it took before the crash
            limit = max(0.0, limit - spent)
        tool = command.tool if isinstance(command, CallTool) else None
        started = time.perf_counter()
        with step_span(run.plan.name, command.key, tool, run=run.run_id, attempt=command.attempt) as span:
            try:
                with anyio.fail_after(limit) if limit is not None else nullcontext():
                    result, error = await self._perform(run, command)
            except TimeoutError:
                result, error = None, StepError("timeout", f"no answer within the step's timeout of {limit:g}s")
            outcome = "ok" if error is None else error.kind
            span.set_outcome(outcome)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "workflow %s run %s: step %s attempt %d: %s in %.1fms",
                run.plan.name,
                run.run_id,
                command.key,
                command.attempt,
                outcome,
                (time.perf_counter() - started) * 1000,
            )
        return ("done", command.key, command.attempt, result, error)

    async def _perform(self, run: _Execution, command: _Leaf) -> tuple[Any, StepError | None]:
        """Make the call or ask the question: its result, or the error that failed it. Raises only cancellation."""
        try:
            if isinstance(command, CallTool):
                return await self._call_tool(run, command)
            if isinstance(command, AskAgent):  # the tools offered are resolved now: they may have changed
                tools = offered(self._catalog, run.context.principal, command)
                return await ask(run.context.client, command, tools)
            return await ask(run.context.client, command)
        except GatewayError as exc:  # ToolNotFound: the tool went away since the config was checked
            return None, StepError(exc.outcome, str(exc))
        except Exception as exc:  # the step boundary: one step's bug fails the step, not the gateway
            logger.exception("workflow %s run %s: step %s raised", run.plan.name, run.run_id, command.key)
            return None, StepError("error", f"internal error: {exc!r}")

    async def _call_tool(self, run: _Execution, command: CallTool) -> tuple[Any, StepError | None]:
        meta = {IDEMPOTENCY_META_KEY: command.idempotency_key} if command.idempotency_key else None
        context = CallContext(
            principal=run.context.principal,
            client=run.context.client,
            log_level=run.context.log_level,
            meta=meta,
            workflow_run=run.run_id,
            workflow_step=command.key,
        )
        result, outcome, retry_after = await self._call(command.tool, command.arguments, context)
        if result.input_required is not None:  # a 2026-07-28 upstream asking the client mid-call
            return None, StepError("unavailable", f"{command.tool} asked for input, which a workflow step cannot give")
        if result.is_error:
            return None, StepError(outcome, error_text(result), retry_after=retry_after)
        return result_value(result), None

    async def _settled(self, run: _Execution, note: Settled | Iterated) -> None:
        """Journal a step's end and report it as progress; a loop's iteration is only reported (its steps have
        their own notes, and a restored run counts its iterations again)."""
        if isinstance(note, Iterated):
            await self._progress(run, note.describe())
            return
        started = run.started.pop(note.key, None)
        duration = round((self._clock() - started) * 1000, 3) if started is not None else None
        self._record(run, "step_settled", note.key, note.attempts, note.journaled(duration))
        if note.part is not None:  # an agent's turn or call: reported, not counted as a step
            await self._progress(run, note.describe(duration), count=False)
            return
        if self._metrics is not None and duration is not None:  # the step's id: a bounded label, unlike its key
            self._metrics.workflow_step(run.plan.name, note.step, duration / 1000)
        await self._progress(run, note.describe(duration))

    @staticmethod
    async def _progress(run: _Execution, message: str, *, count: bool = True) -> None:
        """A progress note for the run's caller: a step settled, or a loop's iteration ended (counted), or an
        agent's turn or call (not counted)."""
        run.settled += count
        if run.context.progress is not None:
            await run.context.progress(run.settled, run.plan.total_steps, message)

    async def _finish(
        self, run: _Execution, finished: Finished | None, started: float, *, cancelled: bool = False
    ) -> ToolResult:
        duration = round((self._clock() - started) * 1000, 3)
        meta = {RUN_META_KEY: run.run_id}
        succeeded = finished is not None and finished.status == "succeeded"
        if self._metrics is not None:
            outcome = "cancelled" if cancelled else "succeeded" if succeeded else "failed"
            self._metrics.workflow_run(run.plan.name, outcome)
        if finished is not None and succeeded:
            output = finished.output
            text = output if isinstance(output, str) else json.dumps(output, indent=2, ensure_ascii=False)
            structured = output if isinstance(output, Mapping) else None
            result = ToolResult(({"type": "text", "text": text},), structured_content=structured, meta=meta)
            data = {"status": "succeeded", "duration_ms": duration, "result": result.wire()}
            self._record(run, "run_finished", data=data)
            await self._commit(run)  # durable before the caller sees it
            return result
        error = finished.error if finished is not None else None
        message = f"workflow {run.plan.name!r} failed: {error.describe() if error else 'compensation did not finish'}"
        if finished is not None and finished.compensation_errors:
            message += "; " + "; ".join(e.describe() for e in finished.compensation_errors)
        message += f" (run {run.run_id})"
        result = ToolResult(({"type": "text", "text": message},), is_error=True, meta=meta)
        status = "cancelled" if cancelled else "failed"
        data = {"status": status, "error": message, "duration_ms": duration, "result": result.wire()}
        self._record(run, "run_finished", data=data)
        await self._commit(run)
        return result

    def _record(
        self, run: _Execution, kind: EventKind, key: str | None = None, attempt: int = 0, data: Any = None
    ) -> None:
        """Journal an event (buffered: :meth:`_commit` makes it durable)."""
        event = JournalEvent(run.run_id, run.seq, self._wall_clock(), kind, key, attempt, data or {})
        run.seq += 1
        run.dirty = True
        self._journal.record(event)

    async def _commit(self, run: _Execution) -> None:
        """Make what the run recorded durable (one commit, shared with whatever else was recorded meanwhile)."""
        if run.dirty:
            run.dirty = False
            await self._journal.commit()


def _report(run: _Execution, event: _Event) -> None:
    """Hand an outcome to the run's loop: no checkpoint between the count and the send, so the loop
    never sees nothing active and nothing queued while an outcome is on its way."""
    run.active -= 1
    run.reported += 1
    run.send.send_nowait(event)


def _outcome_data(outcome: Outcome) -> dict[str, Any]:
    if outcome.error is not None:
        return {"error": outcome.error}
    return {"empty": True} if outcome.empty else {"value": outcome.value}
