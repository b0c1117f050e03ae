"""What passes through Temporal for a workflow run (DESIGN §6): the names and the data types the generic
workflow (:mod:`gateway.workflows.temporal`), its activities (:mod:`gateway.workflows.temporal_activities`)
and the gateway (:mod:`gateway.workflows.temporal_engine`, :mod:`gateway.workflows.temporal_records`) share.

The workflow's input (:class:`RunInput`) and result (:class:`RunResult`), its progress notes
(:class:`ProgressNote`), the step activities' input and result (:class:`StepTask`, :class:`StepOutcome`), and
the evaluation activity's (:class:`Evaluation`, :class:`Evaluated`): frozen dataclasses, which Temporal's
data converter turns into JSON and back. Pure (no I/O, clock or randomness): the workflow imports this module
passed through Temporal's sandbox, so a run inside the sandbox and the gateway outside it use the same classes.
"""

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from gateway.workflows._temporal_carry import Carried
from gateway.workflows.commands import AskAgent, AskModel, AskUser, CallTool

__all__ = [
    "ASK_ACTIVITY",
    "ATTACH_SIGNAL",
    "EVALUATE_ACTIVITY",
    "HEARTBEAT_TIMEOUT",
    "HISTORY_LIMIT",
    "KINDS",
    "LEAVES",
    "MEMO",
    "RUN_FAILED",
    "STEP_ACTIVITY",
    "WORKFLOW_TYPE",
    "Evaluated",
    "Evaluation",
    "ProgressNote",
    "RunInput",
    "RunResult",
    "StepKind",
    "StepOutcome",
    "StepTask",
]

WORKFLOW_TYPE = "patchbay.run"
STEP_ACTIVITY = "patchbay.step"
EVALUATE_ACTIVITY = "patchbay.evaluate"
ASK_ACTIVITY = "patchbay.ask"
"""The activity asking a run's client (``ask_user``, ``ask_model``), on the queue of the replica holding its request."""
ATTACH_SIGNAL = "attach"
"""The signal moving a run's questions to the replica of the queue it names: its caller re-issued the call there."""
RUN_FAILED = "PatchbayRunFailed"
"""The type of the ``ApplicationError`` a failed run ends with; its details are the :class:`RunResult`."""
MEMO = "patchbay"
"""The memo field of a run's record (:meth:`~gateway.workflows.temporal_engine.TemporalEngine.start`): what
``patchbay runs`` and tasks read back (:mod:`gateway.workflows.temporal_records`); a memo, as custom search
attributes need registering."""

HEARTBEAT_TIMEOUT = timedelta(seconds=30)
"""A step's worker that has not heartbeat for this long is taken for dead: the try fails (``unavailable``)."""
HISTORY_LIMIT = 10_000
"""Events: a run whose history is this long continues as new even if Temporal has not suggested it yet
(Temporal stops a run at 50 000)."""

StepKind = Literal["call_tool", "ask_user", "ask_model", "ask_agent"]
KINDS: dict[type, StepKind] = {CallTool: "call_tool", AskUser: "ask_user", AskModel: "ask_model", AskAgent: "ask_agent"}
"""The kind of each command a step activity carries out, as :attr:`StepTask.kind` names it."""
LEAVES: dict[str, type[CallTool] | type[AskUser] | type[AskModel] | type[AskAgent]] = {
    kind: cls for cls, kind in KINDS.items()
}
"""The command of each :attr:`StepTask.kind`."""


@dataclass(frozen=True)
class RunInput:
    """The generic workflow's input: which plan to run, on what, for whom."""

    workflow: str
    digest: str
    """The plan's :attr:`~gateway.workflows.plan.Plan.digest`: a worker runs only this version of the workflow."""
    arguments: dict[str, Any]
    caller: dict[str, str]
    """The principal who started the run: ``{kind, id}``."""
    run_id: str
    """What expressions read as ``.run.id``, and what idempotency keys begin with; also the workflow id."""
    task_queue: str
    """Where the steps' activities go: the run's own queue
    (:func:`~gateway.workflows.temporal_engine.workflow_queue`)."""
    silence: float = HEARTBEAT_TIMEOUT.total_seconds()
    """Seconds a step's replica may go without a heartbeat before the try is taken for lost (and made again)."""
    history_limit: int = HISTORY_LIMIT
    """Events: an execution whose history is this long continues as new (as it does when Temporal suggests it)."""
    carried: Carried | None = None
    """Set when the run continued as new: its engine's journal and its pending timers (not set at the start)."""
    asker: str | None = None
    """The queue of the replica holding the client's request
    (:attr:`~gateway.workflows.temporal_engine.TemporalEngine.asker`): the run's questions go there. None: the
    run has no client to ask, and its questions go to the steps' queue (whose ``execute`` answers)."""


@dataclass(frozen=True)
class ProgressNote:
    """A step's end, for the caller's progress notifications: the ``settled``-th of ``total`` steps."""

    settled: int
    total: int | None
    """None: not known beforehand (a ``for_each`` over a list the run computes)."""
    message: str


@dataclass(frozen=True)
class RunResult:
    """How a run ended: what the engine's ``Finished`` carries, plus ``cancelled`` and the run id."""

    run_id: str
    status: Literal["succeeded", "failed", "cancelled"]
    output: Any = None
    error: dict[str, Any] | None = None
    """The :class:`~gateway.workflows.commands.StepError` that failed the run, as its fields."""
    compensation_errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class StepTask:
    """The input of the step activity: a ``CallTool``, ``AskUser``, ``AskModel`` or ``AskAgent`` command, and for
    whom."""

    run_id: str
    caller: dict[str, str]
    kind: StepKind
    command: dict[str, Any]
    """The command's fields (a call's ``idempotency_key`` included)."""


@dataclass(frozen=True)
class StepOutcome:
    """The step activity's result: the step's result, or the error (its fields) that failed it."""

    result: Any = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class Evaluation:
    """The input of the evaluation (local) activity: a jq program and its narrowed input."""

    source: str
    data: Any


@dataclass(frozen=True)
class Evaluated:
    """What a jq program gave: its first output, no output (``empty``), or jq's ``error``."""

    value: Any = None
    error: str | None = None
    empty: bool = False
