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
A store that keeps the events (SQLite, PostgreSQL) can keep ``data`` as a JSON column.
:class:`MemoryJournal` keeps the most recent runs in memory.
"""

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "DEFAULT_KEPT_EVENTS",
    "DEFAULT_KEPT_RUNS",
    "INPUTS",
    "EventKind",
    "Journal",
    "JournalEvent",
    "MemoryJournal",
    "RunJournal",
    "RunSummary",
]

DEFAULT_KEPT_RUNS = 1000
"""Runs a :class:`MemoryJournal` keeps; older ones are forgotten first."""
DEFAULT_KEPT_EVENTS = 100_000
"""Events a :class:`MemoryJournal` keeps across its runs (a 1,000-step run has about 3,000, more with jq): memory
stays bounded however large the workflows are. Runs still going are kept whole."""

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
    arguments} (or {step, kind}); ``step_settled`` {step, status, result, error, duration_ms};
    ``run_finished`` {status, error, duration_ms, result: the ``CallToolResult`` returned};
    ``run_resumed`` {outstanding: the keys of what was in flight}.
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


@dataclass(frozen=True, slots=True)
class RunSummary:
    """A run at a glance."""

    run_id: str
    workflow: str
    status: str
    """``running``, ``succeeded`` or ``failed``."""
    started_at: float
    steps: int
    """Steps settled so far."""


class RunJournal(Protocol):
    """What the runner writes to: events buffered in order, made durable by :meth:`commit`."""

    def record(self, event: JournalEvent) -> None:
        """Buffer ``event`` (not durable until :meth:`commit`)."""
        ...

    async def commit(self) -> None:
        """Return once every event recorded before the call is durable."""
        ...


class Journal(RunJournal, Protocol):
    """Where runs are recorded. Appends must not be reordered within a run."""

    async def append(self, event: JournalEvent) -> None: ...

    async def events(self, run_id: str) -> Sequence[JournalEvent]:
        """Every event of the run, in order; empty for an unknown run."""
        ...

    async def runs(self) -> Sequence[RunSummary]:
        """The runs recorded, most recent first."""
        ...


class MemoryJournal:
    """A journal in memory: the most recent runs, at most ``kept_runs`` of them and ``kept_events``
    events in all: whole finished runs are forgotten, oldest first, and runs still going are kept."""

    def __init__(self, kept_runs: int = DEFAULT_KEPT_RUNS, kept_events: int = DEFAULT_KEPT_EVENTS) -> None:
        self._kept_runs = kept_runs
        self._kept_events = kept_events
        self._runs: OrderedDict[str, list[JournalEvent]] = OrderedDict()
        self._events = 0

    def record(self, event: JournalEvent) -> None:
        events = self._runs.get(event.run_id)
        if events is None:
            events = self._runs[event.run_id] = []
        events.append(event)
        self._events += 1
        while len(self._runs) > self._kept_runs or self._events > self._kept_events:
            finished = next((run for run, kept in self._runs.items() if kept[-1].kind == "run_finished"), None)
            if finished is None:  # runs still going are kept whole
                break
            self._events -= len(self._runs.pop(finished))

    async def commit(self) -> None:
        return None  # nothing to make durable

    async def append(self, event: JournalEvent) -> None:
        self.record(event)

    async def events(self, run_id: str) -> Sequence[JournalEvent]:
        return tuple(self._runs.get(run_id, ()))

    async def runs(self) -> Sequence[RunSummary]:
        return [_summary(events) for events in reversed(self._runs.values())]


def _summary(events: Sequence[JournalEvent]) -> RunSummary:
    first, last = events[0], events[-1]
    status = str(last.data.get("status")) if last.kind == "run_finished" else "running"
    settled = sum(event.kind == "step_settled" for event in events)
    return RunSummary(first.run_id, str(first.data.get("workflow", "")), status, first.at, settled)
