"""What the engine tells the runner to do, and the failures it reports: plain frozen values.

The runner carries out :class:`CallTool`, :class:`AskUser`, :class:`AskModel`, :class:`AskAgent`,
:class:`Evaluate`, :class:`StartTimer` and :class:`Cancel`, journals and reports
:class:`Settled` and :class:`Finished`, and reports :class:`Iterated` as progress. They hold JSON-like data
only, so a run's commands can be recorded, compared and replayed.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gateway.units import retry_delay

__all__ = [
    "AskAgent",
    "AskModel",
    "AskUser",
    "CallTool",
    "Cancel",
    "Command",
    "Evaluate",
    "Finished",
    "Iterated",
    "Leaf",
    "Settled",
    "StartTimer",
    "Status",
    "StepError",
    "retry_delay",
    "started_data",
]

Status = Literal["succeeded", "failed", "skipped", "cancelled"]
"""How a step ended."""


@dataclass(frozen=True, slots=True)
class StepError:
    """Why a step failed: its kind (an ``outcome`` label of DESIGN §5) and what happened."""

    kind: str
    message: str
    step: str = ""
    """The key of the step the failure began at (a container fails with its nested step's error)."""
    retry_after: float | None = None
    """Set when the call was refused before it reached the tool (rate limited, circuit open, server not
    connected): the seconds after which trying again may succeed. Such a step is tried again even without
    ``retry:``, within its timeout."""

    def as_json(self) -> dict[str, str]:
        """What expressions see as ``.steps.<id>.error``."""
        return {"kind": self.kind, "message": self.message, "step": self.step}

    def describe(self) -> str:
        return f"step {self.step!r} failed ({self.kind}): {self.message}" if self.step else self.message


@dataclass(frozen=True, slots=True)
class CallTool:
    """Call ``tool`` through the dispatch path; report with ``done(key, attempt, …)``."""

    key: str
    step: str
    attempt: int
    tool: str
    arguments: Mapping[str, Any]
    timeout: float | None = None
    idempotency_key: str | None = None
    compensation: bool = False
    """True: the call undoes step ``step`` (``key`` ends with ``#compensate``)."""


@dataclass(frozen=True, slots=True)
class AskUser:
    """Ask the client's user (elicitation); the answer (an object) is the result."""

    key: str
    step: str
    attempt: int
    message: str
    schema: Mapping[str, Any]
    default: Mapping[str, Any] | None
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class AskModel:
    """Ask the client's model (sampling); the answer's text is the result."""

    key: str
    step: str
    attempt: int
    prompt: str
    system: str | None
    max_tokens: int
    default: str | None
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class AskAgent:
    """One turn of an ``agent`` step: ask the client's model (sampling with tools) to go on with ``messages``
    (``SamplingMessage`` JSON), offering the served tools that ``tools`` (globs) match; the result is the
    ``CreateMessageResult`` as JSON. ``tool_choice``: ``auto``, or ``none`` on the last turn."""

    key: str
    step: str
    attempt: int
    messages: tuple[Mapping[str, Any], ...]
    system: str | None
    tools: tuple[str, ...]
    tool_choice: Literal["auto", "none"]
    max_tokens: int
    workflow: str = ""
    """The workflow running the step: never offered to its own model."""
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Evaluate:
    """Run the jq program ``source`` over ``data`` (its narrowed input: all it reads), bounded in time
    and memory, off the event loop; report with ``evaluated(key, …)``. The engine never runs one itself."""

    key: str
    source: str
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Call ``fire(key)`` after ``seconds``, or at ``due`` when it is set."""

    key: str
    seconds: float
    due: float | None = None
    """The wall-clock time (POSIX seconds) it fires at, whenever it was started: a ``wait: {until: …}``. One
    already past fires at once."""


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel the call, question or evaluation ``key``; its outcome, if one still comes, is ignored."""

    key: str


@dataclass(frozen=True, slots=True)
class Settled:
    """Step ``key`` reached its final state (for the journal and progress)."""

    key: str
    step: str
    status: Status
    attempts: int
    result: Any = None
    error: StepError | None = None
    degraded: bool = False
    """The step failed and succeeded with its ``on_error`` default: ``error`` is the failure, ``result`` the default."""
    part: str | None = None
    """Set when ``key`` is a part of step ``step`` (an ``agent``'s turn or tool call, ``research#call2``): what it
    was (``step 2 of at most 8: orders__get_order``). A part does not count as a step settled."""

    def journaled(self, duration_ms: float | None) -> dict[str, Any]:
        """The note as the journal's ``step_settled`` data, which a run's timeline is read from (either engine's)."""
        data: dict[str, Any] = {
            "step": self.step,
            "status": self.status,
            "result": self.result,
            "error": self.error.as_json() if self.error is not None else None,
            "duration_ms": duration_ms,
        }
        if self.degraded:  # succeeded with its on_error default: `error` is the failure it stands in for
            data["degraded"] = True
        if self.part is not None:  # an agent's turn or call, not a step of its own
            data["part"] = self.part
        return data

    def describe(self, duration_ms: float | None = None) -> str:
        """The progress message of the step's end (``b: succeeded in 12 ms``, ``b: succeeded (degraded) in 12 ms
        (unavailable: down)``), as either engine reports it."""
        took = f" in {duration_ms:.0f} ms" if duration_ms is not None else ""
        why = f" ({self.error.kind}: {self.error.message})" if self.error is not None else ""
        status = f"{self.status} (degraded)" if self.degraded else self.status
        if self.part is not None:  # research#call2: research: step 2 of at most 8: orders__get_order succeeded
            return f"{self.key.rpartition('#')[0]}: {self.part} {status}{took}{why}"
        return f"{self.key}: {status}{took}{why}"


@dataclass(frozen=True, slots=True)
class Iterated:
    """Iteration ``iteration`` of loop step ``key`` ended (for progress; its steps settle on their own)."""

    key: str
    step: str
    iteration: int
    max_iterations: int
    held: bool
    """The loop's condition held after it: the loop succeeds."""

    def describe(self) -> str:
        """The progress message (``poll: iteration 2 of at most 20, the condition does not hold yet``)."""
        if self.held:
            how = "the condition holds"
        elif self.iteration < self.max_iterations:
            how = "the condition does not hold yet"
        else:
            how = "the condition does not hold"
        return f"{self.key}: iteration {self.iteration} of at most {self.max_iterations}, {how}"


@dataclass(frozen=True, slots=True)
class Finished:
    """The run is over: ``output`` when it succeeded, ``error`` when it failed."""

    status: Literal["succeeded", "failed"]
    output: Any = None
    error: StepError | None = None
    compensation_errors: tuple[StepError, ...] = ()


Command = CallTool | AskUser | AskModel | AskAgent | Evaluate | StartTimer | Cancel | Settled | Finished | Iterated
Leaf = CallTool | AskUser | AskModel | AskAgent
"""The commands that start a call or a question: what counts against ``max_concurrency``."""


def started_data(command: Leaf) -> dict[str, Any]:
    """A try's start as the journal's ``step_started`` data, which a run's timeline is read from (either engine's):
    a call's tool and arguments, or what kind of question it is."""
    if isinstance(command, CallTool):
        return {"step": command.step, "tool": command.tool, "arguments": command.arguments}
    kind = "ask_user" if isinstance(command, AskUser) else "agent" if isinstance(command, AskAgent) else "ask_model"
    return {"step": command.step, "kind": kind}
