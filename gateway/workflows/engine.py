"""The workflow engine: one run of a :class:`~gateway.workflows.plan.Plan` as a deterministic state machine.

No I/O, no clock, no randomness (DESIGN §6): the runner feeds it events – :meth:`Run.start`, a
step's outcome (:meth:`Run.done`), a timer firing (:meth:`Run.fire`), a cancellation
(:meth:`Run.cancel`) – and carries out the commands each returns, in order: call a tool, ask the
user or the model, start or cancel a timer, cancel a step, and the :class:`Settled` and
:class:`Finished` notes it journals and reports. The same events in the same order give the same
commands, which is what lets the run be replayed (resume) or driven by Temporal.

How steps run:

* A step is ready when every step it depends on has settled; steps that depend only on skipped
  steps are skipped. Ready ``call``, ``ask_user`` and ``ask_model`` steps are started in the
  order they became ready, at most ``max_concurrency`` at a time; ``set``, ``fail``, ``switch``
  and ``for_each`` are decided by the engine itself, at once.
* A ``switch`` runs the steps of the first case whose condition holds (else ``default``); the
  steps of the other branches are skipped. Its result is the result of its branch's last step.
* A ``for_each`` runs its body once per item, ``concurrency`` items at a time, each in its own
  frame (``lines[2]/stock`` is the key of step ``stock`` for item 2); its result is the list of
  each iteration's ``output`` (default: the result of the body's last step).
* A failed step is retried after ``backoff · 2^(try-1)`` seconds (at most ``max_backoff``,
  varied by ``jitter`` with the random number that comes with the failure) when its kind of
  failure is one ``retry.on`` names. A call refused before it reached the tool (its error carries
  ``retry_after``: rate limited, circuit open, server not connected) is tried again after the wait
  it was told, even without ``retry:``, as long as the waits add up to no more than the step's
  ``timeout`` (:data:`REFUSAL_BUDGET` without one); such tries do not count against
  ``retry.attempts``. After its last try, ``on_error`` decides: ``continue``
  settles it as failed and lets the run go on; fallback steps run in its place (their last result
  becomes its result); ``fail`` fails the step that contains it, and so on up to the run.
* A failed run cancels the steps in flight, then runs the ``compensate`` calls of the steps that
  succeeded, one at a time, in reverse order of completion; then it is finished, failed.
"""

import json
from collections import ChainMap, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.workflows.commands import (
    AskModel,
    AskUser,
    CallTool,
    Cancel,
    Command,
    Finished,
    Leaf,
    Settled,
    StartTimer,
    Status,
    StepError,
    retry_delay,
)
from gateway.workflows.expressions import ExpressionError
from gateway.workflows.model import AskModelStep, AskUserStep, CallStep, FailStep, ForEachStep, SetStep, SwitchStep
from gateway.workflows.plan import Plan, StepPlan

__all__ = ["REFUSAL_BUDGET", "Run"]

REFUSAL_BUDGET = 30.0
"""Seconds a step without a ``timeout`` may spend waiting to retry calls refused before they reached the tool."""
_REFUSAL_FLOOR = 0.05
"""Seconds before the first retry of a refusal that hints no wait (a concurrency limit); doubled per refusal."""
_REFUSAL_CEILING = 2.0
"""The longest of those floors: a refusal's own hint may be longer."""
_REFUSAL_JITTER = 0.1
"""Refusal waits are stretched by up to this fraction, so steps refused together do not return in lockstep."""

# --- State. ---

_SETTLED = frozenset({"succeeded", "failed", "skipped", "cancelled"})


@dataclass(eq=False, slots=True)
class _Frame:
    """Where steps run: the run itself, or one iteration of a for_each (with its item bound)."""

    path: str
    region: str | None
    parent: "_Frame | None"
    bindings: dict[str, Any]
    states: dict[str, "_State"] = field(default_factory=dict)
    entries: dict[str, Any] = field(default_factory=dict)
    """``.steps`` as expressions see it: settled steps of this frame by id."""
    owner: "_State | None" = None
    index: int = 0


@dataclass(eq=False, slots=True)
class _State:
    plan: StepPlan
    frame: _Frame
    key: str
    status: str = "waiting"  # waiting | queued | running | retrying | fallback | + _SETTLED
    attempt: int = 0
    refusals: int = 0
    """Tries refused before they reached the tool (not counted against ``retry.attempts``)."""
    waited: float = 0.0
    """Seconds spent waiting to retry those refusals."""
    result: Any = None
    error: StepError | None = None
    continued: bool = False
    branch: str | None = None
    items: list[Any] | None = None
    next_item: int = 0
    outputs: list[Any] = field(default_factory=list)
    iterations: dict[int, _Frame] = field(default_factory=dict)


class Run:
    """One run of a workflow. Feed it events; carry out the commands each returns."""

    def __init__(self, plan: Plan, arguments: Mapping[str, Any]) -> None:
        self.plan = plan
        self.arguments = arguments
        self.status: Literal["pending", "running", "compensating", "succeeded", "failed"] = "pending"
        self._root = _Frame("", None, None, {})
        self._by_key: dict[str, _State] = {}
        self._queue: deque[tuple[_State, Leaf]] = deque()
        self._in_flight: dict[str, _State] = {}
        self._completed: list[_State] = []
        self._compensating: _State | None = None
        self._failure: StepError | None = None
        self._compensation_errors: list[StepError] = []
        self._wake: deque[_State] = deque()
        self._unsettled_top = len(plan.top)
        self._out: list[Command] = []

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
        state.status = "running"
        if error is None and state.plan.success is not None:
            error = self._check_success(state, result)
        if error is None:
            self._succeed(state, result)
        else:
            self._fail(state, StepError(error.kind, error.message, error.step or key, error.retry_after), random)
        return self._flush()

    def fire(self, key: str) -> list[Command]:
        """Timer ``key`` went off."""
        name, _, what = key.partition("#")
        state = self._by_key.get(name)
        if state is None or self.status != "running":
            return []
        if what == "retry" and state.status == "retrying":
            self._restart(state)
        elif what == f"timeout{state.attempt}" and state.status in ("running", "fallback"):
            limit = state.plan.step.timeout
            self._fail(state, StepError("timeout", f"did not finish within {limit:g}s", state.key))
        return self._flush()

    def cancel(self, message: str = "the run was cancelled") -> list[Command]:
        """Stop the run: cancel what is in flight, compensate, finish failed."""
        if self.status in ("running", "pending"):
            self._fail_run(StepError("cancelled", message))
        return self._flush()

    # --- Reading state. ---

    def scope(self, frame: _Frame | None = None) -> dict[str, Any]:
        """What expressions see: ``{input, steps, <item>, index}``."""
        frame = frame or self._root
        scope: dict[str, Any] = {"input": self.arguments}
        chain = []
        walk: _Frame | None = frame
        while walk is not None:
            chain.append(walk)
            walk = walk.parent
        for outer in reversed(chain):
            scope.update(outer.bindings)
        scope["steps"] = frame.entries if len(chain) == 1 else ChainMap(*(f.entries for f in chain))
        return scope

    # --- Internals. ---

    def _flush(self) -> list[Command]:
        """Start what became ready (a loop, not recursion: chains of instant steps can be long)."""
        while self._wake:
            self._start_if_ready(self._wake.popleft())
        self._pump()
        out, self._out = self._out, []
        return out

    def _activate(self, frame: _Frame, step_ids: Iterable[str]) -> None:
        """Place steps in ``frame``; each starts once ready (all are placed before any starts)."""
        for step_id in step_ids:
            self._wake.append(self._place(frame, step_id))

    def _place(self, frame: _Frame, step_id: str) -> _State:
        """A new state for ``step_id`` in ``frame``, findable by its key."""
        state = _State(self.plan.steps[step_id], frame, frame.path + step_id)
        frame.states[step_id] = state
        self._by_key[state.key] = state
        return state

    def _dep_state(self, frame: _Frame, dep: str) -> "_State | None":
        region = self.plan.regions[dep]
        walk: _Frame | None = frame
        while walk is not None and walk.region != region:
            walk = walk.parent
        return None if walk is None else walk.states.get(dep)

    def _start_if_ready(self, state: _State) -> None:
        if state.status != "waiting" or self.status != "running":
            return
        deps = [self._dep_state(state.frame, dep) for dep in state.plan.node.deps]
        if any(d is None or not (d.status in ("succeeded", "skipped") or d.continued) for d in deps):
            return
        if deps and all(d is not None and d.status == "skipped" for d in deps):
            self._settle(state, "skipped")
            return
        self._begin(state)

    def _begin(self, state: _State) -> None:
        state.attempt += 1
        step = state.plan.step
        if step.timeout is not None and not isinstance(step, CallStep | AskUserStep | AskModelStep):
            self._out.append(StartTimer(f"{state.key}#timeout{state.attempt}", step.timeout))
        try:
            self._run_step(state)
        except ExpressionError as exc:
            self._fail(state, StepError("error", exc.detail, state.key))

    def _run_step(self, state: _State) -> None:
        step, values = state.plan.step, state.plan.values
        scope = self.scope(state.frame)
        if isinstance(step, CallStep):
            key = values["idempotency_key"].evaluate(scope) if "idempotency_key" in values else None
            arguments = values["with"].evaluate(scope)
            self._enqueue(
                state,
                CallTool(state.key, step.id, state.attempt, step.call, arguments, step.timeout, _text(key)),
            )
        elif isinstance(step, AskUserStep):
            ask = step.ask_user
            message = _text(values["message"].evaluate(scope)) or ""
            command = AskUser(
                state.key, step.id, state.attempt, message, ask.requested_schema, ask.default, step.timeout
            )
            self._enqueue(state, command)
        elif isinstance(step, AskModelStep):
            model = step.ask_model
            prompt = _text(values["prompt"].evaluate(scope)) or ""
            system = _text(values["system"].evaluate(scope)) if "system" in values else None
            self._enqueue(
                state,
                AskModel(
                    state.key, step.id, state.attempt, prompt, system, model.max_tokens, model.default, step.timeout
                ),
            )
        elif isinstance(step, SetStep):
            self._succeed(state, values["set"].evaluate(scope))
        elif isinstance(step, FailStep):
            message = _text(values["fail"].evaluate(scope)) or "the workflow failed"
            self._fail(state, StepError("error", message, state.key))
        elif isinstance(step, SwitchStep):
            chosen = next((f"case {i}" for i, case in enumerate(state.plan.cases) if case.holds(scope)), "default")
            self._open(state, chosen)
        elif isinstance(step, ForEachStep):
            items = values["items"].evaluate(scope)
            if not isinstance(items, list):
                kind = "null" if items is None else type(items).__name__
                raise ExpressionError(f"for_each needs a list, got {kind}", source=str(step.for_each), where="")
            state.status, state.items, state.next_item, state.outputs = "running", items, 0, [None] * len(items)
            state.iterations = {}
            self._next_iterations(state)

    def _open(self, state: _State, branch: str) -> None:
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

    def _skip_tree(self, frame: _Frame, step_id: str) -> None:
        state = self._place(frame, step_id)
        self._settle(state, "skipped", notify=False)
        for branch, ids in state.plan.children.items():
            if branch != "fallback":
                for child in ids:
                    self._skip_tree(frame, child)

    def _next_iterations(self, state: _State) -> None:
        step = state.plan.step
        assert isinstance(step, ForEachStep)
        assert state.items is not None
        while len(state.iterations) < step.concurrency and state.next_item < len(state.items):
            index = state.next_item
            state.next_item += 1
            frame = _Frame(
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

    def _enqueue(self, state: _State, command: Leaf) -> None:
        # Handed out by `_pump` when the batch of events is done (`_flush`), not now: something later in
        # the same batch may cancel it, and a call handed out and cancelled at once would still be made.
        state.status = "queued"
        self._queue.append((state, command))

    def _pump(self) -> None:
        limit = self.plan.workflow.max_concurrency
        while self._queue and len(self._in_flight) < limit and self.status == "running":
            state, command = self._queue.popleft()
            if state.status != "queued" or state.attempt != command.attempt:
                continue
            state.status = "running"
            self._in_flight[state.key] = state
            self._out.append(command)

    def _check_success(self, state: _State, result: Any) -> StepError | None:
        assert state.plan.success is not None
        scope = self.scope(state.frame)
        scope["result"] = result
        try:
            if state.plan.success.holds(scope):
                return None
        except ExpressionError as exc:
            return StepError("error", exc.detail, state.key)
        return StepError("error", f"the success condition {state.plan.step.success!r} does not hold", state.key)

    def _succeed(self, state: _State, result: Any) -> None:
        state.result, state.error = result, None
        if state.plan.step.compensate is not None:
            self._completed.append(state)
        self._settle(state, "succeeded")

    def _fail(self, state: _State, error: StepError, random: float = 0.5) -> None:
        """``state`` failed; ``random`` jitters a retry (0.5: none, for failures that are not a try's outcome)."""
        if state.status in _SETTLED:
            return
        self._cancel_inside(state)
        step = state.plan.step
        delay = self._retry_wait(state, error, random) if state.status != "fallback" else None
        if delay is not None:
            state.status, state.error = "retrying", error
            self._out.append(StartTimer(f"{state.key}#retry", delay))
            return
        state.error = error
        fallback = state.plan.children.get("fallback", ())
        if step.on_error == "continue":
            state.continued = True
            self._settle(state, "failed")
        elif fallback and state.status != "fallback":
            state.status = "fallback"
            self._settle_entry(state, "failed")  # fallbacks may read the error
            self._activate(state.frame, fallback)
        else:
            self._settle(state, "failed")

    def _retry_wait(self, state: _State, error: StepError, random: float) -> float | None:
        """Seconds to wait before trying ``state`` again after ``error``, or None: no more tries."""
        step = state.plan.step
        if error.retry_after is not None:  # refused before it reached the tool: nothing happened, so try again
            floor = min(_REFUSAL_FLOOR * 2.0**state.refusals, _REFUSAL_CEILING)
            wait = max(error.retry_after, floor) * (1 + _REFUSAL_JITTER * random)
            budget = step.timeout if step.timeout is not None else REFUSAL_BUDGET
            if state.waited + wait <= budget:
                state.refusals += 1
                state.waited += wait
                return wait
        retry = step.retry
        tries = state.attempt - state.refusals
        if retry is None or error.kind not in retry.on or tries >= retry.attempts:
            return None
        delay: float = retry_delay(tries, retry.backoff, retry.max_backoff, retry.jitter, random)
        return max(delay, error.retry_after or 0.0)

    def _restart(self, state: _State) -> None:
        """Try a step again after a failure: a container starts over, what it held forgotten."""
        for step_id in self.plan.descendants[state.plan.id]:
            old = state.frame.states.pop(step_id, None)
            state.frame.entries.pop(step_id, None)
            if old is not None:
                self._by_key.pop(old.key, None)
        state.status, state.branch = "waiting", None
        self._begin(state)

    def _cancel_inside(self, state: _State) -> None:
        """Cancel everything in flight or queued inside ``state`` (a container that failed)."""
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
            if other.status in ("waiting", "retrying") and other.plan.id in inside:
                if other.frame is state.frame or key.startswith(prefix):
                    other.status = "cancelled"

    def _settle_entry(self, state: _State, status: str) -> None:
        error = state.error.as_json() if state.error is not None else None
        state.frame.entries[state.plan.id] = {"result": state.result, "error": error, "status": status}

    def _settle(self, state: _State, status: Status, *, notify: bool = True) -> None:
        state.status = status
        self._settle_entry(state, status)
        self._out.append(Settled(state.key, state.plan.id, status, state.attempt, state.result, state.error))
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

    def _frames_seeing(self, frame: _Frame, step_id: str) -> list[_Frame]:
        """The frames, ``frame`` or iterations inside it, in which ``step_id`` may wait for a step of ``frame``."""
        region = self.plan.regions[step_id]
        found: list[_Frame] = []
        pending = [frame]
        while pending:
            inner = pending.pop()
            if inner.region == region:
                found.append(inner)
            else:
                pending.extend(f for s in inner.states.values() for f in s.iterations.values())
        return found

    def _after_settle(self, state: _State) -> None:
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

    def _propagate_failure(self, state: _State) -> None:
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

    def _check_container(self, state: _State) -> None:
        if state.status == "fallback":
            ids = state.plan.children.get("fallback", ())
        elif state.status == "running" and state.branch is not None:
            ids = state.plan.children.get(state.branch, ())
        else:
            return
        children = [state.frame.states[step_id] for step_id in ids]
        if all(child.status in _SETTLED for child in children):
            last = children[-1].result if children else None
            self._succeed(state, last)

    def _check_iteration(self, frame: _Frame) -> None:
        owner = frame.owner
        assert owner is not None
        if owner.status != "running" or owner.iterations.get(frame.index) is not frame:
            return
        if any(s.status not in _SETTLED for s in frame.states.values()):
            return
        step = owner.plan.step
        assert isinstance(step, ForEachStep)
        try:
            if "output" in owner.plan.values:
                output = owner.plan.values["output"].evaluate(self.scope(frame))
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

    def _check_run(self) -> None:
        if self.status != "running" or self._unsettled_top:
            return
        states = [self._root.states[step_id] for step_id in self.plan.top]
        try:
            if self.plan.output is not None:
                output = self.plan.output.evaluate(self.scope())
            else:
                output = {s.plan.id: s.result for s in states if s.status == "succeeded"}
        except ExpressionError as exc:
            self._fail_run(StepError("error", f"the output: {exc.detail}"))
            return
        self.status = "succeeded"
        self._out.append(Finished("succeeded", output))
        self._release()

    def _fail_run(self, error: StepError) -> None:
        self.status = "compensating"
        self._failure = error
        for key, state in self._in_flight.items():
            state.status = "cancelled"
            self._out.append(Cancel(key))
        self._in_flight.clear()
        self._queue.clear()
        self._compensate_next()

    def _compensate_next(self) -> None:
        while self._completed:
            state = self._completed.pop()
            spec = state.plan.step.compensate
            assert spec is not None
            try:
                arguments = state.plan.values["compensate"].evaluate(self.scope(state.frame))
            except ExpressionError as exc:
                self._compensation_errors.append(StepError("error", exc.detail, state.key))
                continue
            self._compensating = state
            self._out.append(
                CallTool(f"{state.key}#compensate", state.plan.id, 1, spec.call, arguments, None, None, True)
            )
            return
        self._compensating = None
        self.status = "failed"
        self._out.append(Finished("failed", error=self._failure, compensation_errors=tuple(self._compensation_errors)))
        self._release()

    def _release(self) -> None:
        """The run is over: break its frame ↔ state reference cycles, so its memory goes back at once
        instead of at the next full garbage collection (which walks the whole heap)."""
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
        if error is not None:
            self._compensation_errors.append(StepError(error.kind, f"compensation failed: {error.message}", state.key))
        self._compensate_next()
        return self._flush()


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
