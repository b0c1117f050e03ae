"""Replaying a run's journal into an engine: how :meth:`gateway.workflows.engine.Run.restore` rebuilds a run.

The journal's inputs (``run_started``, ``step_done``, ``timer_fired``, ``evaluated``,
``run_cancelled``: :data:`~gateway.workflows.journal.INPUTS`) are fed, in order, to a fresh engine
made for the plan; its outputs (``step_started``, ``step_settled``, ``run_finished``) are skipped.
The engine is deterministic given its inputs, so it reaches the state the recorded run had.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

from gateway.workflows.commands import Command, StepError
from gateway.workflows.journal import INPUTS, JournalEvent
from gateway.workflows.plan import Plan

__all__ = ["Engine", "replay"]


class Engine(Protocol):
    """The events an engine takes: what a journal's inputs are fed to."""

    def start(self) -> list[Command]: ...

    def done(
        self, key: str, attempt: int, result: Any = None, error: StepError | None = None, *, random: float = 0.5
    ) -> list[Command]: ...

    def fire(self, key: str) -> list[Command]: ...

    def evaluated(
        self, key: str, value: Any = None, *, error: str | None = None, empty: bool = False
    ) -> list[Command]: ...

    def cancel(self, message: str = ...) -> list[Command]: ...


E = TypeVar("E", bound=Engine)


def replay(
    plan: Plan,
    events: Iterable[JournalEvent],
    new: Callable[[Plan, Mapping[str, Any], str], E],
    observe: Callable[[JournalEvent, list[Command]], None] | None = None,
) -> E:
    """The engine ``new(plan, arguments, run_id)`` makes, fed the inputs among ``events``, in order.

    ``observe(event, commands)``, if given, sees what the engine did with each input (a resumed run
    learns from it when each of its pending timers was started).

    Raises ValueError when the events do not begin with ``run_started``, or when that names a plan
    other than ``plan`` (the workflow changed since).
    """
    run: E | None = None
    for event in events:
        data = event.data
        if event.kind == "run_started":
            digest = data.get("plan")
            if digest is not None and digest != plan.digest:
                raise ValueError(f"the run was started with another version of workflow {plan.name!r}")
            run = new(plan, data["arguments"], event.run_id)
            commands = run.start()
        elif event.kind not in INPUTS:
            continue
        elif run is None:
            raise ValueError("a run's journal begins with run_started")
        elif event.kind == "step_done":
            error = data.get("error")  # every field of the StepError
            step_error = StepError(**error) if error is not None else None
            random = data.get("random", 0.5)
            commands = run.done(str(event.key), event.attempt, data.get("result"), step_error, random=random)
        elif event.kind == "timer_fired":
            commands = run.fire(str(event.key))
        elif event.kind == "evaluated":
            value, error, empty = data.get("value"), data.get("error"), data.get("empty", False)
            commands = run.evaluated(str(event.key), value, error=error, empty=empty)
        elif event.kind == "run_cancelled":
            commands = run.cancel(data["message"])
        else:
            continue
        if observe is not None:
            observe(event, commands)
    if run is None:
        raise ValueError("a run's journal begins with run_started")
    return run
