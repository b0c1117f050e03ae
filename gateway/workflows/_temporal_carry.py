"""What a run on Temporal carries from one execution into the next when it continues as new.

A run's Temporal history grows with every step (about six events a try: the activity's three, the
workflow task's three); Temporal stops a run at 50 000 events or 50 MB, and suggests continuing as
new well before. A continued run is a new execution of the same workflow id, with a fresh history,
whose input is the old one's plus a :class:`Carried`: the inputs its engine was fed (its journal,
the same events a local run journals: :mod:`gateway.workflows.journal`), from which
:meth:`Run.restore <gateway.workflows.engine.Run.restore>` rebuilds the engine exactly (it is
deterministic given its inputs), and when each of its pending timers is due, so that a timer fires
when it would have, not from scratch.

What bounds the journal: one entry per input (a try's outcome, a timer firing, a jq outcome), not
the half-dozen history events each one cost, so each execution begins with a fraction of the history
it replaced; but it grows with the run, results included, and an execution's input must stay under
Temporal's payload limit (2 MB by default). The engine's :meth:`~gateway.workflows.engine.Run.snapshot`
is for comparing states, not for restoring one, so there is nothing smaller to carry yet. A journal
over :data:`JOURNAL_LIMIT` is not carried: the run goes on in its execution (toward Temporal's limits).

Pure (no I/O, clock or randomness): the workflow imports it passed through Temporal's sandbox.
"""

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.workflows.commands import Command, StepError
from gateway.workflows.engine import Run
from gateway.workflows.expressions import Outcome
from gateway.workflows.journal import EventKind, JournalEvent
from gateway.workflows.plan import Plan

__all__ = ["JOURNAL_LIMIT", "Carried", "Journal"]

JOURNAL_LIMIT = 1_000_000
"""Bytes (as JSON): a journal larger than this is not carried into a new execution (Temporal refuses
an input over 2 MB, and warns from 512 KB)."""


@dataclass(frozen=True)
class Carried:
    """What an execution hands the next one of its run."""

    inputs: list[dict[str, Any]]
    """The inputs the engine was fed after it started, in order: each a journal event's ``kind``,
    ``key``, ``attempt`` and ``data`` (:class:`~gateway.workflows.journal.JournalEvent`)."""
    due: dict[str, float] = field(default_factory=dict)
    """Each pending timer's due time, by key: workflow time (``workflow.now()``), seconds since the epoch."""
    executions: int = 1
    """How many executions of the run came before the one it is given to."""
    settled: int = 0
    """How many steps had settled: the count the run's progress notes go on from."""


class Journal:
    """The inputs an execution fed its engine: those it was given, then its own, with their size."""

    def __init__(self, carried: Carried | None) -> None:
        self.inputs: list[dict[str, Any]] = list(carried.inputs) if carried is not None else []
        self.size = sum(_size(entry) for entry in self.inputs)
        """The journal's size as JSON, in bytes."""

    def restore(self, plan: Plan, arguments: dict[str, Any], run_id: str) -> tuple[Run, list[Command]]:
        """The engine the journal's inputs rebuild, and what it waits for
        (:meth:`~gateway.workflows.engine.Run.outstanding`): ``start()``'s commands for an empty journal."""
        if not self.inputs:
            run = Run(plan, arguments, run_id)
            return run, run.start()
        started = JournalEvent(run_id, 0, 0.0, "run_started", data={"arguments": arguments, "plan": plan.digest})
        events = [started]
        for seq, entry in enumerate(self.inputs, 1):
            kind: EventKind = entry["kind"]
            key, attempt = entry.get("key"), entry.get("attempt", 0)
            events.append(JournalEvent(run_id, seq, 0.0, kind, key, attempt, entry["data"]))
        return Run.restore(plan, events)

    def done(self, key: str, attempt: int, result: Any, error: StepError | None, random: float) -> None:
        """A try ended (``random``: what varies its retry's wait)."""
        data = {"result": result, "error": asdict(error) if error is not None else None, "random": random}
        self._add({"kind": "step_done", "key": key, "attempt": attempt, "data": data})

    def fired(self, key: str) -> None:
        """Timer ``key`` went off."""
        self._add({"kind": "timer_fired", "key": key, "data": {}})

    def evaluated(self, key: str, outcome: Outcome) -> None:
        """A jq program's outcome came back."""
        data = {"value": outcome.value, "error": outcome.error, "empty": outcome.empty}
        self._add({"kind": "evaluated", "key": key, "data": data})

    def cancelled(self, message: str) -> None:
        """The run was cancelled."""
        self._add({"kind": "run_cancelled", "data": {"message": message}})

    def _add(self, entry: dict[str, Any]) -> None:
        self.inputs.append(entry)
        self.size += _size(entry)


def _size(entry: dict[str, Any]) -> int:
    return len(json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode())
