"""The state of a workflow run in the engine (:mod:`gateway.workflows.engine`): what every part of it reads.

:class:`~gateway.workflows.engine.Run` is made of parts, one concept a module, each a class it inherits:
starting steps (:mod:`~gateway.workflows._engine_steps`), leaves and an agent's parts
(:mod:`~gateway.workflows._engine_leaves`), containers (:mod:`~gateway.workflows._engine_containers`),
tries and failures (:mod:`~gateway.workflows._engine_failure`), evaluation sites
(:mod:`~gateway.workflows._engine_sites`), settling (:mod:`~gateway.workflows._engine_settling`), and
compensating and finishing (:mod:`~gateway.workflows._engine_finishing`). :class:`RunBase` holds the state
they share, set once in ``__init__``, and declares (for the type checker only) what they call in one another;
the parts that compute values build on :class:`~gateway.workflows._engine_sites.EvaluationSites`, where the
engine waits for jq outcomes.
"""

from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from gateway.workflows._runstate import Frame, Site, StepState
from gateway.workflows._sites import Sites
from gateway.workflows.commands import CallTool, Command, Leaf, StartTimer, Status, StepError
from gateway.workflows.expressions import Lookup
from gateway.workflows.plan import Plan

__all__ = ["RunBase"]


class RunBase:
    """A run's state: its plan and arguments, its steps' states, what is queued, in flight, timed, compensated."""

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

    if TYPE_CHECKING:  # what the parts of the engine call in one another (each defines its own)

        def scope(self, frame: Frame | None = None) -> dict[str, Any]: ...
        def _flush(self) -> list[Command]: ...
        def _activate(self, frame: Frame, step_ids: Iterable[str]) -> None: ...
        def _place(self, frame: Frame, step_id: str) -> StepState: ...
        def _begin(self, state: StepState) -> None: ...
        def _run_step(self, state: StepState, site: Site | None) -> None: ...
        def _start_timer(self, state: StepState, what: str, seconds: float, due: float | None = None) -> None: ...
        def _leaf(self, state: StepState, scope: Mapping[str, Any], lookup: Lookup) -> Leaf | None: ...
        def _decide(self, state: StepState, scope: Mapping[str, Any], lookup: Lookup) -> None: ...
        def _open(self, state: StepState, branch: str) -> None: ...
        def _check_container(self, state: StepState) -> None: ...
        def _check_iteration(self, frame: Frame, site: Site | None = None) -> None: ...
        def _tried(
            self, state: StepState, result: Any, error: StepError | None, random: float, site: Site | None
        ) -> None: ...
        def _succeed(self, state: StepState, result: Any) -> None: ...
        def _fail(self, state: StepState, error: StepError, random: float = 0.5) -> None: ...
        def _degrade(self, state: StepState, site: Site | None = None) -> None: ...
        def _cancel_inside(self, state: StepState) -> None: ...
        def _settle_entry(self, state: StepState, status: str) -> None: ...
        def _settle(self, state: StepState, status: Status, *, notify: bool = True) -> None: ...
        def _check_run(self, site: Site | None = None) -> None: ...
        def _fail_run(self, error: StepError) -> None: ...
        def _compensate_next(self, site: Site | None = None) -> None: ...
