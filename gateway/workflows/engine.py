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

The code, one concept a module: :class:`Run` here takes the events and reads out its state; it inherits
its state (:mod:`~gateway.workflows._engine_base`) and the parts that act on it: starting steps, the queue
and timers (:mod:`~gateway.workflows._engine_steps`), leaves and an agent's parts
(:mod:`~gateway.workflows._engine_leaves`), containers and the steps the engine decides itself
(:mod:`~gateway.workflows._engine_containers`), tries, retries and ``on_error``
(:mod:`~gateway.workflows._engine_failure`), evaluation sites (:mod:`~gateway.workflows._engine_sites`),
settling and a failure's propagation (:mod:`~gateway.workflows._engine_settling`), and compensating and
finishing (:mod:`~gateway.workflows._engine_finishing`).
"""

from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

from gateway.workflows._engine_containers import Containers
from gateway.workflows._engine_failure import Failures
from gateway.workflows._engine_finishing import Finishing
from gateway.workflows._engine_leaves import Leaves
from gateway.workflows._engine_settling import Settling
from gateway.workflows._engine_sites import EvaluationSites
from gateway.workflows._engine_steps import StartingSteps
from gateway.workflows._runstate import Frame, live, scope_of
from gateway.workflows.commands import Command, StepError
from gateway.workflows.expressions import Outcome
from gateway.workflows.journal import JournalEvent
from gateway.workflows.plan import Plan
from gateway.workflows.replay import replay

__all__ = ["Run"]


class Run(StartingSteps, Leaves, Containers, Failures, Settling, Finishing, EvaluationSites):
    """One run of a workflow. Feed it events; carry out the commands each returns.

    ``Run(plan, arguments, run_id="")``: ``run_id`` is what expressions read as ``.run.id``, and what each
    call's default idempotency key begins with (``<run id>:<step key>``)."""

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
