"""The run journal: what happened in each workflow run, as append-only events.

Events are keyed by ``run_id`` and, for steps, by the step's key (``order``, ``lines[2]/stock``)
and try. They are of two sorts:

* **inputs**, everything that went into the engine, in the order it went in: ``run_started``,
  ``step_done``, ``timer_fired``, ``evaluated``, ``run_cancelled``. The engine is deterministic
  given them, so replaying them rebuilds the run's state exactly
  (:meth:`gateway.workflows.engine.Run.restore`), and says what it was waiting for. The runner
  appends each before it acts on what the engine does with it.
* **outputs**, for people and tools that look at runs (``patchbay runs``, metrics): ``step_started``,
  ``step_settled`` and ``run_finished``, with durations. Replay skips them.

``data`` is plain JSON, values unredacted (a resumed run needs them): whatever shows it redacts.
Where events are kept is a :class:`~gateway.store.Store` (memory, SQLite, PostgreSQL), ``data`` as JSON.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["INPUTS", "EventKind", "JournalEvent"]

EventKind = Literal[
    "run_started",
    "step_done",
    "timer_fired",
    "evaluated",
    "run_cancelled",
    "step_started",
    "step_settled",
    "run_finished",
    "run_resumed",
    "run_noted",
]
INPUTS: frozenset[EventKind] = frozenset({"run_started", "step_done", "timer_fired", "evaluated", "run_cancelled"})
"""The kinds of event that went into the engine: what a replay feeds it."""


@dataclass(frozen=True, slots=True)
class JournalEvent:
    """One thing that happened in a run.

    ``data`` by kind. Inputs: ``run_started`` {workflow, arguments, caller: {kind, id}, plan: the
    plan's digest}; ``step_done`` {result, error: the StepError's fields or null, random} (a try's
    outcome, ``key`` and ``attempt`` set; a compensation's key ends ``#compensate``);
    ``timer_fired`` {} (``key``: the timer's); ``evaluated`` {value} or {empty: true} or {error}
    (``key``: the evaluation's); ``run_cancelled`` {message}. Outputs: ``step_started`` {step, tool,
    arguments} (or {step, kind}); ``step_settled`` {step, status, result, error, duration_ms} (and ``part`` for an
    ``agent``'s turn or tool call, keyed ``<step key>#turn<n>`` or ``#call<m>``: not a step of its own);
    ``run_finished`` {status, error, duration_ms, result: the ``CallToolResult`` returned};
    ``run_resumed`` {outstanding: the keys of what was in flight}; ``run_noted`` {message: what the
    timeline should say of itself (a run on Temporal read without replaying it), never journaled}.
    """

    run_id: str
    seq: int
    """Position in the run, from 0."""
    at: float
    """Wall-clock time, seconds since the epoch."""
    kind: EventKind
    key: str | None = None
    """The step's key, for step events."""
    attempt: int = 0
    data: Mapping[str, Any] = field(default_factory=dict)
