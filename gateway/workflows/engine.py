"""The workflow engine: one run of a :class:`~gateway.workflows.plan.Plan` as a deterministic state machine.

No I/O, no clock, no randomness (DESIGN §6): the runner feeds it events – :meth:`Run.start`, a
step's outcome (:meth:`Run.done`, with the random number for its retry's jitter), a timer firing
(:meth:`Run.fire`), a jq program's outcome (:meth:`Run.evaluated`), a cancellation
(:meth:`Run.cancel`) – and carries out the commands each returns, in order: call a tool, ask the
user or the model, run a jq program, start a timer, cancel a call, question or evaluation, and the
:class:`Settled` and :class:`Finished` notes it journals and reports. The same events in the same
order give the same commands and the same state, which is what lets the run be rebuilt from its
journal (:meth:`Run.restore`) or driven by Temporal.

Expressions: plain paths (``.steps.order.result.id``) are resolved here, at once. Any other jq
program is not run here: where one is needed (a step's arguments, a switch's conditions, a success
condition, a for_each's items or output, the run's output, a compensation's arguments), the engine
emits :class:`Evaluate` with the program and its (narrowed) input, and that place waits – the step
is ``evaluating`` – until the outcomes come back; then it is evaluated again (what it reads is unchanged), the
outcomes now known (:class:`~gateway.workflows.expressions.Lookup`). The programs of one place are
asked for together, except a switch's conditions, which are asked for one at a time, in order.

How steps run:

* A step is ready when every step it depends on has settled; steps that depend only on skipped
  steps are skipped. Ready ``call``, ``ask_user`` and ``ask_model`` steps are started in the
  order they became ready, at most ``max_concurrency`` at a time; ``set``, ``fail``, ``switch``
  and ``for_each`` are decided by the engine itself, at once. A ``wait`` starts a timer (``<key>#wait``:
  its seconds, or, for ``until``, the wall-clock time it is due, which the runner measures: the engine
  has no clock) and succeeds when it fires; an ``until`` that is not an RFC 3339 time fails it (``invalid``).
* An ``agent`` (:mod:`gateway.workflows.agent`) hands out its parts, keyed apart from it: each turn asks the
  model (``<key>#turn<n>``: :class:`AskAgent`), each tool it asks for is a call (``<key>#call<m>``), the calls of a
  turn together; each part that comes back is a :class:`Settled` note with ``part`` set, and the answer settles
  the step. Its ``timeout`` is a timer over all its turns; a failure cancels its parts in flight.
* A ``switch`` runs the steps of the first case whose condition holds (else ``default``); the
  steps of the other branches are skipped. Its result is the result of its branch's last step.
* A ``for_each`` runs its body once per item, ``concurrency`` items at a time, each in its own
  frame (``lines[2]/stock`` is the key of step ``stock`` for item 2); its result is the list of
  each iteration's ``output`` (default: the result of the body's last step).
* A ``loop`` runs its body once per iteration, each in a fresh frame (``poll[2]/status``), until its
  ``until`` condition holds after one (then that iteration's output is its result) or ``max_iterations``
  ran (then it fails, ``error``); between two iterations it waits on a timer (``<key>#delay``) when it has a
  ``delay``. Each iteration's end is an :class:`~gateway.workflows.commands.Iterated` note (see
  :mod:`gateway.workflows._loops`).
* A failed step is retried after ``backoff · 2^(try-1)`` seconds (at most ``max_backoff``,
  varied by ``jitter`` with the random number that comes with the failure) when its kind of
  failure is one ``retry.on`` names. A call refused before it reached the tool (its error carries
  ``retry_after``: rate limited, circuit open, server not connected) is tried again after the wait
  it was told, even without ``retry:``, as long as the waits add up to no more than the step's
  ``timeout`` (:data:`~gateway.workflows.retries.REFUSAL_BUDGET` without one); such tries do not count against
  ``retry.attempts``. After its last try, ``on_error`` decides: ``continue``
  settles it as failed and lets the run go on; fallback steps run in its place (their last result
  becomes its result); ``{default: …}`` settles it as succeeded with that value (evaluated like its
  arguments, its own error readable), marked degraded, its error kept, and never compensated; ``fail``
  fails the step that contains it, and so on up to the run.
* A failed run cancels the steps in flight, then runs the ``compensate`` calls of the steps that
  succeeded, one at a time, in reverse order of completion; then it is finished, failed.
"""

import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Any, Literal

from gateway.workflows._loops import delay_after, iteration_end, iteration_frame
from gateway.workflows._runstate import PARKED, SETTLED, Frame, Site, SiteKind, StepState, live, scope_of
from gateway.workflows._sites import Sites
from gateway.workflows.agent import AgentReplyError, Conversation
from gateway.workflows.commands import (
    AskAgent,
    AskModel,
    AskUser,
    CallTool,
    Cancel,
    Command,
    Finished,
    Iterated,
    Leaf,
    Settled,
    StartTimer,
    Status,
    StepError,
)
from gateway.workflows.expressions import ExpressionError, Lookup, Outcome
from gateway.workflows.journal import JournalEvent
from gateway.workflows.model import (
    AgentStep,
    AskModelStep,
    AskUserStep,
    CallStep,
    FailStep,
    ForEachStep,
    LoopStep,
    OnErrorDefault,
    SetStep,
    SwitchStep,
    WaitStep,
    WaitUntil,
    parse_instant,
)
from gateway.workflows.plan import Plan
from gateway.workflows.replay import replay
from gateway.workflows.retries import retry_wait

__all__ = ["Run"]

_PLAIN = Lookup()  # for values of plain paths only, which never consult it


class Run:
    """One run of a workflow. Feed it events; carry out the commands each returns."""

    def __init__(self, plan: Plan, arguments: Mapping[str, Any], run_id: str = "") -> None:
        """``run_id`` is what expressions read as ``.run.id``, and what each call's default idempotency key
        begins with (``<run id>:<step key>``)."""
        self.plan = plan
        self.arguments = arguments
        self.run_id = run_id
        self.status: Literal["pending", "running", "compensating", "succeeded", "failed"] = "pending"
        self._root = Frame("", None, None, {})
        self._by_key: dict[str, StepState] = {}
        self._queue: deque[tuple[StepState, Leaf]] = deque()
        self._in_flight: dict[str, StepState] = {}
        self._completed: list[StepState] = []
        self._compensating: StepState | None = None
        self._failure: StepError | None = None
        self._compensation_errors: list[StepError] = []
        self._wake: deque[StepState] = deque()
        self._unsettled_top = len(plan.top)
        self._out: list[Command] = []
        self._sites = Sites()
        self._unwanted = False
        """Some evaluation site may be wanted no more: a step failed or was cancelled, or the run ended.
        (Otherwise a site is only ever left by resuming it, all its outcomes in: nothing to drop.)"""
        self._timers: dict[str, StartTimer] = {}
        self._timer_owners: dict[str, tuple[StepState, str]] = {}
        """Each pending timer's step and what it is for: ``retry``, ``timeout<attempt>``, ``wait`` or ``delay``."""
        self._compensation: CallTool | None = None

    # --- Events. ---

    def start(self) -> list[Command]:
        """Begin the run."""
        if self.status != "pending":
            raise RuntimeError("the run has started already")
        self.status = "running"
        self._activate(self._root, self.plan.top)
        return self._flush()

    def done(
        self, key: str, attempt: int, result: Any = None, error: StepError | None = None, *, random: float = 0.5
    ) -> list[Command]:
        """The call or question ``key`` (try ``attempt``) ended: ``result``, or ``error`` when it failed.

        ``random`` in [0, 1) varies the delay before a retry (jitter). Outcomes of cancelled or
        superseded tries are ignored.
        """
        if key.endswith("#compensate"):
            return self._compensated(key, error)
        state = self._in_flight.get(key)
        if state is None or state.attempt != attempt:
            return []
        del self._in_flight[key]
        if state.agent is not None:
            self._agent_part(state, state.agent, key, result, error, random)
            return self._flush()
        state.status, state.command = "running", None
        self._tried(state, result, error, random, None)
        return self._flush()

    def fire(self, key: str) -> list[Command]:
        """Timer ``key`` went off."""
        self._timers.pop(key, None)
        state, what = self._timer_owners.pop(key, (None, ""))
        if state is None or self.status != "running" or self._by_key.get(state.key) is not state:
            return []  # not a timer it started, or its step was replaced since (a container started over)
        if what == "retry" and state.status == "retrying":
            self._restart(state)
        elif what == "wait" and state.status == "timing":
            self._succeed(state, state.result)
        elif what == "delay" and state.status == "timing":
            state.status = "running"
            self._next_round(state)
        elif what == f"timeout{state.attempt}" and state.status in ("running", "fallback", "evaluating", "timing"):
            limit = state.plan.step.timeout
            if limit is None:  # not a timer it started
                return []
            self._fail(state, StepError("timeout", f"did not finish within {limit:g}s", state.key))
        return self._flush()

    def evaluated(self, key: str, value: Any = None, *, error: str | None = None, empty: bool = False) -> list[Command]:
        """The jq program of :class:`Evaluate` ``key`` ran: its first output ``value``, no output
        (``empty``), or jq's ``error`` (a time or memory limit included). Stale outcomes are ignored."""
        if key not in self._sites.pending:
            return []
        site = self._sites.answer(key, Outcome(value, error, empty))
        if site is not None and self._valid(site):
            self._resume(site)
        return self._flush()

    def cancel(self, message: str = "the run was cancelled") -> list[Command]:
        """Stop the run: cancel what is in flight, compensate, finish failed."""
        if self.status in ("running", "pending"):
            self._fail_run(StepError("cancelled", message))
        return self._flush()

    @classmethod
    def restore(
        cls,
        plan: Plan,
        events: Iterable[JournalEvent],
        observe: Callable[[JournalEvent, list[Command]], None] | None = None,
    ) -> tuple["Run", list[Command]]:
        """Rebuild a run from its journal: its inputs replayed into a fresh run, in order.

        Returns the run, in the state the recorded run had reached, and what it was waiting for
        (:meth:`outstanding`), which a resumed run issues again. The journal's other events
        (``step_started``, ``step_settled``, ``run_finished``: the engine's outputs) are skipped.
        Raises ValueError when the events do not begin with ``run_started``, or when that names a
        plan other than ``plan`` (the workflow changed since).
        """
        run = replay(plan, events, cls, observe)
        return run, run.outstanding()

    # --- Reading state. ---

    def outstanding(self) -> list[Command]:
        """What the run waits for: calls and questions handed out and not answered (compensation
        included), evaluations asked for, timers started and not fired (until the run is over)."""
        calls: list[Command] = []
        for key, state in self._in_flight.items():
            command = state.agent.in_flight[key] if state.agent is not None else state.command
            if command is not None:
                calls.append(command)
        if self._compensation is not None:
            calls.append(self._compensation)
        calls.extend(command for _, _, command in self._sites.pending.values())
        calls.extend(self._timers.values())
        return calls

    def snapshot(self) -> dict[str, Any]:
        """The run's state as plain data: equal for two runs in the same state, whatever brought them there."""
        steps = {
            key: {
                "status": state.status,
                "attempt": state.attempt,
                "refusals": state.refusals,
                "waited": state.waited,
                "result": state.result,
                "error": state.error.as_json() if state.error is not None else None,
                "continued": state.continued,
                "degraded": state.degraded,
                "branch": state.branch,
                "items": state.items,
                "outputs": list(state.outputs),  # filled in place as iterations end
                "next_item": state.next_item,
                "iterations": sorted(state.iterations),
                **({"agent": state.agent.snapshot()} if state.agent is not None else {}),
                "last": state.last,
            }
            for key, state in sorted(self._by_key.items())
        }
        sites = {
            key: [known._asdict() if known is not None else None for known in site.known]
            for key, (site, _, _) in self._sites.pending.items()
        }
        return {
            "status": self.status,
            "steps": steps,
            "queued": [state.key for state, command in self._queue if live(state, command)],
            "completed": [state.key for state in self._completed],
            "failure": self._failure.as_json() if self._failure is not None else None,
            "compensation_errors": [error.as_json() for error in self._compensation_errors],
            "outstanding": [{"kind": type(c).__name__, **asdict(c)} for c in self.outstanding()],
            "evaluations": sites,
        }

    def scope(self, frame: Frame | None = None) -> dict[str, Any]:
        """What expressions see: ``{input, steps, <item>, index}``."""
        return scope_of(self.arguments, frame or self._root, self.run_id)

    # --- Internals. ---

    def _flush(self) -> list[Command]:
        """Start what became ready (a loop, not recursion: chains of instant steps can be long)."""
        while self._wake:
            self._start_if_ready(self._wake.popleft())
        self._pump()
        if self._unwanted:  # forget the evaluations nothing waits for any more; cancel those handed out
            self._unwanted = False
            if self._sites.pending:  # checked only then: with many in flight, each check is O(evaluations)
                self._out = self._sites.prune(self._valid, self._out)
        out, self._out = self._out, []
        return out

    def _activate(self, frame: Frame, step_ids: Iterable[str]) -> None:
        """Place steps in ``frame``; each starts once ready (all are placed before any starts)."""
        for step_id in step_ids:
            self._wake.append(self._place(frame, step_id))

    def _place(self, frame: Frame, step_id: str) -> StepState:
        """A new state for ``step_id`` in ``frame``, findable by its key."""
        state = StepState(self.plan.steps[step_id], frame, frame.path + step_id)
        frame.states[step_id] = state
        self._by_key[state.key] = state
        return state

    def _dep_state(self, frame: Frame, dep: str) -> "StepState | None":
        region = self.plan.regions[dep]
        walk: Frame | None = frame
        while walk is not None and walk.region != region:
            walk = walk.parent
        return None if walk is None else walk.states.get(dep)

    def _start_if_ready(self, state: StepState) -> None:
        if state.status != "waiting" or self.status != "running":
            return
        deps = [self._dep_state(state.frame, dep) for dep in state.plan.node.deps]
        if any(d is None or not (d.status in ("succeeded", "skipped") or d.continued) for d in deps):
            return
        if deps and all(d is not None and d.status == "skipped" for d in deps):
            self._settle(state, "skipped")
            return
        self._begin(state)

    def _begin(self, state: StepState) -> None:
        state.attempt += 1
        step = state.plan.step
        if step.timeout is not None and not isinstance(step, CallStep | AskUserStep | AskModelStep):
            self._start_timer(state, f"timeout{state.attempt}", step.timeout)
        self._run_step(state, None)

    def _run_step(self, state: StepState, site: Site | None) -> None:
        scope = self.scope(state.frame)
        try:
            if site is None and not state.plan.starts_with_jq:  # plain paths only: nothing to wait for
                self._step(state, scope, _PLAIN)
                assert not _PLAIN.missing
            else:
                self._at(site, scope, lambda scope, lookup: self._step(state, scope, lookup), "step", state)
        except ExpressionError as exc:
            self._fail(state, StepError("error", exc.detail, state.key))

    def _step(self, state: StepState, scope: Mapping[str, Any], lookup: Lookup) -> None:
        """Start ``state``, unless ``lookup`` lacks jq outcomes: nothing is done until every value is known."""
        step = state.plan.step
        if isinstance(step, CallStep | AskUserStep | AskModelStep | AgentStep):
            command = self._leaf(state, scope, lookup)
            if command is not None:
                self._enqueue(state, command)
        elif isinstance(step, SwitchStep):
            chosen = "default"
            for i, case in enumerate(state.plan.cases):  # one at a time: a case is asked for once those before fail
                holds = case.holds(scope, lookup)
                if lookup.missing:
                    return
                if holds:
                    chosen = f"case {i}"
                    break
            self._open(state, chosen)
        else:
            self._decide(state, scope, lookup)

    def _leaf(self, state: StepState, scope: Mapping[str, Any], lookup: Lookup) -> Leaf | None:
        """The call or question of ``state``'s try; None while ``lookup`` lacks jq outcomes."""
        step, values = state.plan.step, state.plan.values
        if isinstance(step, CallStep):
            key = values["idempotency_key"].evaluate(scope, lookup) if "idempotency_key" in values else None
            arguments = values["with"].evaluate(scope, lookup)
            if lookup.missing:
                return None
            idempotency_key = _text(key) if key is not None else f"{self.run_id}:{state.key}"
            return CallTool(state.key, step.id, state.attempt, step.call, arguments, step.timeout, idempotency_key)
        if isinstance(step, AskUserStep):
            ask = step.ask_user
            message = _text(values["message"].evaluate(scope, lookup)) or ""
            if lookup.missing:
                return None
            return AskUser(state.key, step.id, state.attempt, message, ask.requested_schema, ask.default, step.timeout)
        if isinstance(step, AgentStep):
            return self._agent_begin(state, step, scope, lookup)
        assert isinstance(step, AskModelStep)
        model = step.ask_model
        prompt = _text(values["prompt"].evaluate(scope, lookup)) or ""
        system = _text(values["system"].evaluate(scope, lookup)) if "system" in values else None
        if lookup.missing:
            return None
        return AskModel(
            state.key, step.id, state.attempt, prompt, system, model.max_tokens, model.default, step.timeout
        )

    def _agent_begin(self, state: StepState, step: AgentStep, scope: Mapping[str, Any], lookup: Lookup) -> Leaf | None:
        """An ``agent`` try's first turn (its conversation starts over); None while ``lookup`` lacks jq outcomes."""
        values, agent = state.plan.values, step.agent
        goal = _text(values["goal"].evaluate(scope, lookup)) or ""
        system = _text(values["system"].evaluate(scope, lookup)) if "system" in values else None
        if lookup.missing:
            return None
        globs, prefix = agent.tools, f"{self.run_id}:"
        state.agent = Conversation(
            state.key, step.id, state.attempt, globs, agent.max_steps, agent.max_tokens, system, prefix, self.plan.name
        )
        return state.agent.begin(goal)

    def _agent_part(
        self, state: StepState, agent: Conversation, key: str, result: Any, error: StepError | None, random: float
    ) -> None:
        """A turn or a call of an ``agent`` step came back (see :mod:`gateway.workflows.agent`)."""
        command = agent.in_flight.pop(key)
        if isinstance(command, AskAgent):
            part = f"{agent.part()}: the model"
            self._out.append(Settled(key, state.plan.id, _status(error), command.attempt, result, error, part=part))
            if error is None:
                try:
                    commands, answer = agent.replied(result)
                except AgentReplyError as exc:
                    error = StepError("error", str(exc), state.key)
                else:
                    self._queue.extend((state, next_command) for next_command in commands)
                    if not commands:
                        self._tried(state, answer, None, random, None)
                    return
            self._fail(state, replace(error, step=error.step or state.key), random)
            return
        assert isinstance(command, CallTool)
        part = f"{agent.part()}: {command.tool}"
        turn = agent.called(key, result, error)
        self._out.append(Settled(key, state.plan.id, _status(error), command.attempt, result, error, part=part))
        if turn is not None:
            self._queue.append((state, turn))

    def _decide(self, state: StepState, scope: Mapping[str, Any], lookup: Lookup) -> None:
        """A ``set``, ``fail``, ``wait``, ``for_each`` or ``loop``: what the engine decides by itself, once its values
        are known."""
        step, values = state.plan.step, state.plan.values
        if isinstance(step, SetStep):
            value = values["set"].evaluate(scope, lookup)
            if not lookup.missing:
                self._succeed(state, value)
        elif isinstance(step, FailStep):
            message = _text(values["fail"].evaluate(scope, lookup)) or "the workflow failed"
            if not lookup.missing:
                self._fail(state, StepError("error", message, state.key))
        elif isinstance(step, WaitStep):
            self._wait(state, step, scope, lookup)
        elif isinstance(step, ForEachStep):
            items = values["items"].evaluate(scope, lookup)
            if lookup.missing:
                return
            if not isinstance(items, list):
                kind = "null" if items is None else type(items).__name__
                raise ExpressionError(f"for_each needs a list, got {kind}", source=str(step.for_each), where="")
            state.status, state.items, state.next_item, state.outputs = "running", items, 0, [None] * len(items)
            state.iterations = {}
            self._next_iterations(state)
        elif isinstance(step, LoopStep):
            state.status, state.next_item, state.last, state.iterations = "running", 0, None, {}
            self._next_round(state)

    def _wait(self, state: StepState, step: WaitStep, scope: Mapping[str, Any], lookup: Lookup) -> None:
        """Start a ``wait``'s timer; what it will succeed with is kept as its result meanwhile."""
        if not isinstance(step.wait, WaitUntil):
            state.status, state.result = "timing", {"waited": step.wait}
            self._start_timer(state, "wait", step.wait)
            return
        until = state.plan.values["until"].evaluate(scope, lookup)
        if lookup.missing:
            return
        try:
            due = parse_instant(until)
        except ValueError as exc:
            self._fail(state, StepError("invalid", f"wait until: {exc}", state.key))
            return
        when = datetime.fromtimestamp(due, UTC).isoformat().replace("+00:00", "Z")
        state.status, state.result = "timing", {"waited_until": when}
        self._start_timer(state, "wait", 0.0, due)

    def _open(self, state: StepState, branch: str) -> None:
        """Run the steps of ``branch`` of ``state`` (a switch) and skip the other branches."""
        state.status, state.branch = "running", branch
        chosen = state.plan.children.get(branch, ())
        for other, ids in state.plan.children.items():
            if other not in (branch, "fallback"):
                for step_id in ids:
                    self._skip_tree(state.frame, step_id)
        self._activate(state.frame, chosen)
        if not chosen:
            self._succeed(state, None)

    def _skip_tree(self, frame: Frame, step_id: str) -> None:
        state = self._place(frame, step_id)
        self._settle(state, "skipped", notify=False)
        for branch, ids in state.plan.children.items():
            if branch != "fallback":
                for child in ids:
                    self._skip_tree(frame, child)

    def _next_iterations(self, state: StepState) -> None:
        step = state.plan.step
        assert isinstance(step, ForEachStep)
        assert state.items is not None
        while len(state.iterations) < step.concurrency and state.next_item < len(state.items):
            index = state.next_item
            state.next_item += 1
            frame = Frame(
                f"{state.key}[{index}]/",
                step.id,
                state.frame,
                {step.as_: state.items[index], "index": index},
                owner=state,
                index=index,
            )
            state.iterations[index] = frame
            self._activate(frame, state.plan.children.get("body", ()))
        if not state.iterations and state.status == "running":
            self._succeed(state, state.outputs)

    def _next_round(self, state: StepState) -> None:
        """Start the next iteration of the loop ``state``."""
        state.next_item += 1
        frame = iteration_frame(state, state.next_item)
        state.iterations = {frame.index: frame}
        self._activate(frame, state.plan.children.get("body", ()))

    def _round_ended(self, frame: Frame, site: Site | None) -> None:
        """The steps of the loop iteration ``frame`` have settled (``site``: its output or condition waited for
        jq): succeed, fail after its last iteration, or go on, after its delay."""
        owner = frame.owner
        assert owner is not None
        step = owner.plan.step
        assert isinstance(step, LoopStep)

        def compute(scope: Mapping[str, Any], lookup: Lookup) -> Any:
            return iteration_end(owner, frame, scope, lookup)

        try:
            ended = self._at(site, self.scope(frame), compute, "output", owner, frame=frame)
        except ExpressionError as exc:
            self._fail(owner, StepError("error", exc.detail, owner.key))
            return
        if ended is PARKED:
            return
        (owner.last, held), n, most = ended, frame.index, step.loop.max_iterations
        del owner.iterations[n]
        frame.states = {}  # done: break the frame ↔ state cycles (compensations read entries, not states)
        self._out.append(Iterated(owner.key, step.id, n, most, held))
        if held:
            self._succeed(owner, owner.last)
        elif n >= most:
            message = f"the condition {step.loop.until!r} did not hold after {n} iteration{'s' * (n != 1)}"
            self._fail(owner, StepError("error", message, owner.key))
        elif (seconds := delay_after(step.loop, n)) > 0:
            owner.status = "timing"
            self._start_timer(owner, "delay", seconds)
        else:
            self._next_round(owner)

    def _enqueue(self, state: StepState, command: Leaf) -> None:
        # Handed out by `_pump` when the batch of events is done (`_flush`), not now: something later in
        # the same batch may cancel it, and a call handed out and cancelled at once would still be made.
        state.status = "queued"
        self._queue.append((state, command))

    def _pump(self) -> None:
        limit = self.plan.workflow.max_concurrency
        while self._queue and len(self._in_flight) < limit and self.status == "running":
            state, command = self._queue.popleft()
            if not live(state, command):
                continue
            state.status = "running"
            if state.agent is not None:  # a part of an agent step, keyed apart from it
                state.agent.in_flight[command.key] = command
            else:
                state.command = command
            self._in_flight[command.key] = state
            self._out.append(command)

    def _tried(self, state: StepState, result: Any, error: StepError | None, random: float, site: Site | None) -> None:
        """A try of ``state`` ended: it succeeded if its ``success`` condition holds (which may wait for jq)."""
        condition = state.plan.success
        if error is None and condition is not None:
            scope = self.scope(state.frame)
            scope["result"] = result
            holds: Any
            try:
                if condition.is_path:
                    holds = condition.holds(scope, _PLAIN)
                else:
                    holds = self._at(site, scope, condition.holds, "success", state, result=result, random=random)
            except ExpressionError as exc:
                holds = StepError("error", exc.detail, state.key)
            if holds is PARKED:
                return
            if isinstance(holds, StepError):
                error = holds
            elif not holds:
                message = f"the success condition {state.plan.step.success!r} does not hold"
                error = StepError("error", message, state.key)
        if error is None:
            self._succeed(state, result)
        else:
            self._fail(state, replace(error, step=error.step or state.key), random)  # every other field kept

    # --- Evaluation sites: where jq outcomes are waited for. ---

    def _at(
        self,
        site: Site | None,
        scope: Mapping[str, Any],
        compute: Callable[[Mapping[str, Any], Lookup], Any],
        kind: SiteKind,
        state: StepState | None,
        *,
        frame: Frame | None = None,
        result: Any = None,
        random: float = 0.5,
    ) -> Any:
        """``compute(scope, lookup)`` at an evaluation site: its value, or ``PARKED`` when jq outcomes are
        missing (they are asked for, and the site is resumed once all came back). Raises ExpressionError."""
        lookup = Lookup(site.known) if site is not None else Lookup()
        try:
            value = compute(scope, lookup)
        except ExpressionError:
            if not lookup.missing:  # else a program before the failing one may fail first: its error counts
                raise
        if not lookup.missing:
            return value
        if kind in ("step", "success") and state is not None:
            state.status = "evaluating"
        if frame is not None:
            frame.evaluating = True
        self._sites.ask(site, lookup, kind, state, frame, result, random, self._out)
        return PARKED

    def _valid(self, site: Site) -> bool:
        """Whether ``site`` still waits for its outcomes (the step may have failed, the run been cancelled…)."""
        state = site.state
        if site.kind == "compensate":
            return self.status == "compensating" and self._compensating is state
        if self.status != "running":
            return False
        if state is None:
            return site.kind == "run"
        if site.kind == "output":
            frame = site.frame
            assert frame is not None
            return (
                state.status == "running"
                and state.attempt == site.attempt
                and state.iterations.get(frame.index) is frame
            )
        waiting = "degrading" if site.kind == "default" else "evaluating"
        return state.status == waiting and state.attempt == site.attempt and self._by_key.get(state.key) is state

    def _resume(self, site: Site) -> None:
        """Every outcome ``site`` waited for came back: evaluate it again."""
        state = site.state
        if site.kind == "run":
            self._check_run(site)
            return
        assert state is not None
        if site.kind == "step":
            self._run_step(state, site)
        elif site.kind == "success":
            state.status = "running"
            self._tried(state, site.result, None, site.random, site)
        elif site.kind == "output":
            assert site.frame is not None
            self._check_iteration(site.frame, site)
        elif site.kind == "default":
            self._degrade(state, site)
        else:
            self._compensate_next(site)

    def _start_timer(self, state: StepState, what: str, seconds: float, due: float | None = None) -> None:
        """Start ``state``'s timer ``what`` (``retry``, ``timeout<attempt>``, ``wait``, ``delay``), keyed
        ``<step key>#<what>``; ``due``: the wall-clock time it fires at instead.

        A step that a container's retry replaced keeps its key, and its timers may still be pending:
        the new one's get another key (``~2``…), so a firing always reaches the step that started it."""
        key = base = f"{state.key}#{what}"
        n = 1
        while key in self._timers:
            n += 1
            key = f"{base}~{n}"
        timer = self._timers[key] = StartTimer(key, seconds, due)
        self._timer_owners[key] = (state, what)
        self._out.append(timer)

    def _succeed(self, state: StepState, result: Any) -> None:
        state.result, state.error = result, None
        if state.plan.step.compensate is not None:
            self._completed.append(state)
        self._settle(state, "succeeded")

    def _fail(self, state: StepState, error: StepError, random: float = 0.5) -> None:
        """``state`` failed; ``random`` jitters a retry (0.5: none, for failures that are not a try's outcome)."""
        if state.status in SETTLED:
            return
        self._unwanted = True
        self._cancel_inside(state)
        step = state.plan.step
        delay = retry_wait(state, error, random) if state.status != "fallback" else None
        if delay is not None:
            state.status, state.error = "retrying", error
            self._start_timer(state, "retry", delay)
            return
        state.error = error
        fallback = state.plan.children.get("fallback", ())
        if isinstance(step.on_error, OnErrorDefault):
            self._degrade(state)
        elif step.on_error == "continue":
            state.continued = True
            self._settle(state, "failed")
        elif fallback and state.status != "fallback":
            state.status = "fallback"
            self._settle_entry(state, "failed")  # fallbacks may read the error
            self._activate(state.frame, fallback)
        else:
            self._settle(state, "failed")

    def _degrade(self, state: StepState, site: Site | None = None) -> None:
        """``state`` failed after its retries and its ``on_error`` has a default: it succeeds with that value,
        marked degraded, its error kept (``site``: its default's evaluation came back). The default is evaluated
        over the run's context, where the step's own failure is ``.steps.<id>.error``; one that cannot be
        evaluated fails the step after all."""
        if site is None:
            self._settle_entry(state, "failed")  # so the default may read the step's error
        state.status = "degrading"
        try:
            value = self._at(site, self.scope(state.frame), state.plan.values["default"].evaluate, "default", state)
        except ExpressionError as exc:
            state.error = StepError("error", f"on_error default: {exc.detail}", state.key)
            self._settle(state, "failed")
            return
        if value is PARKED:
            return
        state.result, state.degraded = value, True
        self._settle(state, "succeeded")  # not _succeed: nothing happened that a compensation would undo

    def _restart(self, state: StepState) -> None:
        """Try a step again after a failure: a container starts over, what it held forgotten."""
        for step_id in self.plan.descendants[state.plan.id]:
            old = state.frame.states.pop(step_id, None)
            state.frame.entries.pop(step_id, None)
            if old is not None:
                self._by_key.pop(old.key, None)
        state.status, state.branch = "waiting", None
        self._begin(state)

    def _cancel_inside(self, state: StepState) -> None:
        """Cancel everything in flight or queued inside ``state`` (a container that failed), and forget its loop
        delay (a timer whose firing is then ignored: its key stays taken until then, so no later timer gets it)."""
        self._unwanted = True
        if state.agent is not None:  # its turn or calls in flight
            for key in state.agent.in_flight:
                self._in_flight.pop(key, None)
                self._out.append(Cancel(key))
            state.agent.in_flight.clear()
        for key in [key for key, (owner, what) in self._timer_owners.items() if owner is state and what == "delay"]:
            del self._timer_owners[key]
        inside = self.plan.descendants[state.plan.id]
        if not inside:
            return
        prefix = state.key + "["
        for key, other in list(self._in_flight.items()):
            if other.plan.id in inside and (other.frame is state.frame or key.startswith(prefix)):
                del self._in_flight[key]
                other.status = "cancelled"
                self._out.append(Cancel(key))
        for other, _ in self._queue:
            if other.plan.id in inside and (other.frame is state.frame or other.key.startswith(prefix)):
                other.status = "cancelled"
        for key, other in self._by_key.items():
            if other.status in ("waiting", "retrying", "evaluating", "degrading", "timing") and other.plan.id in inside:
                if other.frame is state.frame or key.startswith(prefix):
                    other.status = "cancelled"

    def _settle_entry(self, state: StepState, status: str) -> None:
        error = state.error.as_json() if state.error is not None else None
        state.frame.entries[state.plan.id] = {"result": state.result, "error": error, "status": status}

    def _settle(self, state: StepState, status: Status, *, notify: bool = True) -> None:
        state.status = status
        self._settle_entry(state, status)
        note = Settled(state.key, state.plan.id, status, state.attempt, state.result, state.error, state.degraded)
        self._out.append(note)
        if not notify:
            return
        if status == "failed" and not state.continued:
            self._propagate_failure(state)
            return
        for dependent in self.plan.dependents[state.plan.id]:
            for frame in self._frames_seeing(state.frame, dependent):
                waiting = frame.states.get(dependent)
                if waiting is not None and waiting.status == "waiting":
                    self._wake.append(waiting)
        self._after_settle(state)

    def _frames_seeing(self, frame: Frame, step_id: str) -> list[Frame]:
        """The frames, ``frame`` or iterations inside it, in which ``step_id`` may wait for a step of ``frame``."""
        region = self.plan.regions[step_id]
        found: list[Frame] = []
        pending = [frame]
        while pending:
            inner = pending.pop()
            if inner.region == region:
                found.append(inner)
            else:
                pending.extend(f for s in inner.states.values() for f in s.iterations.values())
        return found

    def _after_settle(self, state: StepState) -> None:
        """Tell whatever contains ``state`` that it settled."""
        node = state.plan.node
        if node.parent is not None and node.branch != "body":
            parent = state.frame.states.get(node.parent)
            if parent is not None:
                self._check_container(parent)
        elif state.frame.owner is not None:
            self._check_iteration(state.frame)
        else:
            self._unsettled_top -= 1
            self._check_run()

    def _propagate_failure(self, state: StepState) -> None:
        node = state.plan.node
        error = state.error or StepError("error", "failed", state.key)
        if node.parent is not None and node.branch != "body":
            parent = state.frame.states[node.parent]
            if parent.status == "fallback":  # its fallback failed too: there is no second one
                self._cancel_inside(parent)
                parent.error = error
                self._settle(parent, "failed")
            else:
                self._fail(parent, error)
        elif state.frame.owner is not None:
            self._fail(state.frame.owner, error)
        else:
            self._fail_run(error)

    def _check_container(self, state: StepState) -> None:
        if state.status == "fallback":
            ids = state.plan.children.get("fallback", ())
        elif state.status == "running" and state.branch is not None:
            ids = state.plan.children.get(state.branch, ())
        else:
            return
        children = [state.frame.states[step_id] for step_id in ids]
        if all(child.status in SETTLED for child in children):
            last = children[-1].result if children else None
            self._succeed(state, last)

    def _check_iteration(self, frame: Frame, site: Site | None = None) -> None:
        owner = frame.owner
        assert owner is not None
        if site is None:
            if owner.status != "running" or owner.iterations.get(frame.index) is not frame or frame.evaluating:
                return
            if any(s.status not in SETTLED for s in frame.states.values()):
                return
        step = owner.plan.step
        if isinstance(step, LoopStep):
            self._round_ended(frame, site)
            return
        assert isinstance(step, ForEachStep)
        try:
            if "output" in owner.plan.values:
                scope = self.scope(frame)
                output = self._at(site, scope, owner.plan.values["output"].evaluate, "output", owner, frame=frame)
                if output is PARKED:
                    return
            else:
                body = owner.plan.children.get("body", ())
                output = frame.states[body[-1]].result if body else None
        except ExpressionError as exc:
            self._fail(owner, StepError("error", exc.detail, owner.key))
            return
        owner.outputs[frame.index] = output
        del owner.iterations[frame.index]
        frame.states = {}  # done: break the frame ↔ state cycles (compensations read entries, not states)
        self._next_iterations(owner)

    def _check_run(self, site: Site | None = None) -> None:
        if self.status != "running" or self._unsettled_top:
            return
        states = [self._root.states[step_id] for step_id in self.plan.top]
        try:
            if self.plan.output is not None:
                scope = self.scope()
                output = self._at(site, scope, self.plan.output.evaluate, "run", None)
                if output is PARKED:
                    return
            else:
                output = {s.plan.id: s.result for s in states if s.status == "succeeded"}
        except ExpressionError as exc:
            self._fail_run(StepError("error", f"the output: {exc.detail}"))
            return
        self.status = "succeeded"
        self._unwanted = True
        self._out.append(Finished("succeeded", output))
        self._release()

    def _fail_run(self, error: StepError) -> None:
        self.status = "compensating"
        self._unwanted = True
        self._failure = error
        for key, state in self._in_flight.items():
            state.status = "cancelled"
            self._out.append(Cancel(key))
        self._in_flight.clear()
        self._queue.clear()
        self._compensate_next()

    def _compensate_next(self, site: Site | None = None) -> None:
        """Start the next compensation (``site``: the one whose arguments waited for jq), or finish."""
        while site is not None or self._completed:
            state = site.state if site is not None else self._completed.pop()
            assert state is not None
            spec = state.plan.step.compensate
            assert spec is not None
            scope = self.scope(state.frame)
            self._compensating = state
            try:
                arguments = self._at(site, scope, state.plan.values["compensate"].evaluate, "compensate", state)
            except ExpressionError as exc:
                self._compensation_errors.append(StepError("error", exc.detail, state.key))
                site = None
                continue
            if arguments is PARKED:
                return
            key = f"{state.key}#compensate"
            call = CallTool(key, state.plan.id, 1, spec.call, arguments, None, f"{self.run_id}:{key}", True)
            self._compensation = call
            self._out.append(call)
            return
        self._compensating = None
        self.status = "failed"
        self._unwanted = True
        self._out.append(Finished("failed", error=self._failure, compensation_errors=tuple(self._compensation_errors)))
        self._release()

    def _release(self) -> None:
        """The run is over: break its frame ↔ state reference cycles, so its memory goes back at once
        instead of at the next full garbage collection (which walks the whole heap)."""
        self._timers.clear()  # the runner stops its timers when the run is over
        self._timer_owners.clear()
        frames = [self._root]
        while frames:
            frame = frames.pop()
            for state in frame.states.values():
                frames.extend(state.iterations.values())
                state.iterations = {}
            frame.states = {}

    def _compensated(self, key: str, error: StepError | None) -> list[Command]:
        state = self._compensating
        if state is None or key != f"{state.key}#compensate":
            return []
        self._compensation = None
        if error is not None:
            self._compensation_errors.append(StepError(error.kind, f"compensation failed: {error.message}", state.key))
        self._compensate_next()
        return self._flush()


def _status(error: StepError | None) -> Status:
    return "failed" if error is not None else "succeeded"


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
