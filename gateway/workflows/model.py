"""The ``workflows:`` section of the config as typed, frozen models (DESIGN §3).

A workflow is a tool whose body is a list of steps. A step's kind follows from which one of the
kind keys it has (``call``, ``switch``, ``for_each``, ``loop``, ``set``, ``fail``, ``wait``,
``ask_user``, ``ask_model``, ``agent``); every step may also carry ``after``, ``retry``, ``timeout``, ``success``,
``on_error`` and ``compensate``. Values that hold expressions (``with``, ``set``, ``output``,
messages, conditions) stay raw JSON here, ``${…}`` unparsed: :mod:`gateway.workflows.expressions`
compiles them, :mod:`gateway.workflows.graph` checks how steps refer to each other.
"""

import copy
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gateway.units import Duration

__all__ = [
    "STEP_KINDS",
    "Agent",
    "AgentStep",
    "AskModel",
    "AskModelStep",
    "AskUser",
    "AskUserStep",
    "CallSpec",
    "CallStep",
    "Case",
    "ErrorKind",
    "FailStep",
    "ForEachStep",
    "Loop",
    "LoopStep",
    "Retry",
    "SetStep",
    "OnErrorDefault",
    "Step",
    "SwitchStep",
    "WaitStep",
    "WaitUntil",
    "Workflow",
    "Workflows",
    "iter_steps",
    "parse_instant",
    "strip_tags",
]

STEP_KINDS = ("call", "switch", "for_each", "set", "fail", "wait", "ask_user", "ask_model", "agent", "loop")
"""The keys that decide a step's kind; a step has exactly one of them."""

DEFAULT_MAX_CONCURRENCY = 2000
"""A safety cap, not a throttle: every ready step of an ordinary run starts at once (Temporal allows 2,000
pending activities per run). Upstreams are protected by the ``max_concurrency`` policies."""
DEFAULT_FOR_EACH_CONCURRENCY = 1
DEFAULT_ITEM_NAME = "item"
DEFAULT_RETRY_ATTEMPTS = 3
DEFAULT_BACKOFF = 0.2
"""Seconds before the first retry; each further retry doubles it, up to ``max_backoff``."""
DEFAULT_MAX_BACKOFF = 5.0
DEFAULT_JITTER = 0.1
DEFAULT_RETRY_ON: tuple["ErrorKind", ...] = ("error", "rate_limited", "circuit_open", "timeout", "unavailable")
"""Every kind of failure but ``denied`` and ``invalid``, which the same call would meet again (as in Step
Functions and Temporal, where every failure is retried unless excluded)."""
DEFAULT_MAX_TOKENS = 1024
DEFAULT_INPUT_SCHEMA: dict[str, JsonValue] = {"type": "object"}
CONFIRM_SCHEMA: dict[str, JsonValue] = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
"""What ``ask_user`` requests when it names no ``schema``: a yes/no confirmation."""

ErrorKind = Literal["error", "invalid", "denied", "rate_limited", "circuit_open", "timeout", "unavailable"]
"""How a step failed: the ``outcome`` labels of DESIGN §5. A ``success`` condition that does not hold is ``error``."""

_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
# The expression context is {input, run, steps, item, index} (and a loop's iteration, last): a for_each's
# variable must not hide the others.
_RESERVED_NAMES = frozenset({"input", "run", "steps", "index", "iteration", "last"})
_STEP_LISTS = frozenset({"steps", "default", "fallback"})


def _matching(pattern: str, rule: str, reserved: frozenset[str] = frozenset()) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"{value!r} {rule}")
        if value in reserved:
            raise ValueError(f"{value!r} would hide .{value} in expressions: choose another name")
        return value

    return AfterValidator(check)


def _at_least_one(what: str) -> AfterValidator:
    # Not Field(min_length=1): that also reports "too short" when an item is merely invalid.
    def check(items: tuple[Any, ...]) -> tuple[Any, ...]:
        if not items:
            raise ValueError(f"needs at least one {what}")
        return items

    return AfterValidator(check)


def _check_object_schema(schema: dict[str, JsonValue]) -> dict[str, JsonValue]:
    if schema.get("type") != "object":
        raise ValueError("must be a JSON Schema of an object (type: object)")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
    return schema


_NAME_RULE = "must start with a letter or _ and hold only letters, digits, _"
StepId = Annotated[str, _matching(r"[A-Za-z_][A-Za-z0-9_-]*", f"is not a step id: it {_NAME_RULE} and -")]
ToolName = Annotated[str, _matching(r"[A-Za-z0-9_.-]{1,64}", "is not a tool name: 1 to 64 letters, digits, _, . and -")]
Variable = Annotated[
    str, _matching(r"[A-Za-z_][A-Za-z0-9_]*", f"is not a variable name: it {_NAME_RULE}", _RESERVED_NAMES)
]
Steps = Annotated[tuple["Step", ...], _at_least_one("step")]
ObjectSchema = Annotated[dict[str, JsonValue], AfterValidator(_check_object_schema)]


class Retry(BaseModel):
    """How often, and after which failures, a step is tried again."""

    model_config = _MODEL_CONFIG

    attempts: int = Field(DEFAULT_RETRY_ATTEMPTS, ge=1)
    """Tries in all, the first included: 1 means no retry."""
    backoff: Duration = DEFAULT_BACKOFF
    """Seconds before the first retry; doubled before each further one."""
    max_backoff: Duration = DEFAULT_MAX_BACKOFF
    """The longest wait between two tries."""
    jitter: float = Field(DEFAULT_JITTER, ge=0, le=1)
    """Each wait varies randomly by up to this fraction of itself, so retries do not arrive in lockstep."""
    on: Annotated[tuple[ErrorKind, ...], _at_least_one("kind of failure")] = DEFAULT_RETRY_ON
    """The kinds of failure that are retried; any other fails the step at once."""

    @model_validator(mode="after")
    def _backoff_within_max(self) -> "Retry":
        if self.backoff > self.max_backoff:
            raise ValueError(f"backoff ({self.backoff:g}s) is longer than max_backoff ({self.max_backoff:g}s)")
        return self


class CallSpec(BaseModel):
    """One tool call: what ``compensate`` runs to undo a step."""

    model_config = _MODEL_CONFIG

    call: ToolName
    """The tool, by the name this gateway serves it under."""
    with_: dict[str, JsonValue] = Field(default_factory=dict, alias="with")
    """The arguments; strings may hold ``${…}`` expressions."""


class _StepBase(BaseModel):
    model_config = _MODEL_CONFIG

    kind: ClassVar[str]
    """Which kind key the step has; not a key users write."""

    id: StepId
    """Names the step within its workflow: ``.steps.<id>`` in expressions, ``after``, the journal."""
    after: tuple[StepId, ...] = ()
    """Steps that must finish first, besides those the step's expressions refer to."""
    retry: Retry | None = None
    """Try the step again after transient failures; None: one try."""
    timeout: Duration | None = None
    """Seconds one try may take; None: the called tool's own timeout."""
    success: str | None = None
    """A jq condition on ``.result`` that must hold, else the step failed."""
    on_error: "OnError" = "fail"
    """When the step failed after its retries: ``fail`` the run, ``continue`` without it, run these steps, or
    succeed with a ``{default: …}`` value."""
    compensate: CallSpec | None = None
    """A call that undoes the step, run when the workflow fails after the step completed."""


class CallStep(_StepBase, CallSpec):
    """Calls a tool (an upstream's, a connector's or another workflow) with ``call`` and ``with``."""

    kind: ClassVar[str] = "call"

    idempotency_key: str | None = None
    """Sent with the call so an upstream can recognise a retry after a crash; may hold ``${…}``."""


class Case(BaseModel):
    """One branch of a ``switch``."""

    model_config = _MODEL_CONFIG

    when: str = Field(min_length=1)
    """A jq condition over the run's context; the first case whose condition holds runs."""
    steps: "Steps"
    """The steps of this branch."""


class SwitchStep(_StepBase):
    """Runs the steps of the first case whose condition holds."""

    kind: ClassVar[str] = "switch"

    switch: Annotated[tuple[Case, ...], _at_least_one("case")]
    """The cases, tried in order."""
    default: tuple["Step", ...] = ()
    """Runs when no case matched; empty: nothing runs."""


class ForEachStep(_StepBase):
    """Runs its steps once per item of a list; its result is the list of each iteration's output."""

    kind: ClassVar[str] = "for_each"

    for_each: str | list[JsonValue]
    """The list to map over, usually one ``${…}`` expression."""
    as_: Variable = Field(DEFAULT_ITEM_NAME, alias="as")
    """The name of the current item in expressions (``.item``); ``.index`` is its position."""
    concurrency: int = Field(DEFAULT_FOR_EACH_CONCURRENCY, ge=1)
    """Iterations that may run at once."""
    steps: "Steps"
    """The body, run for each item."""
    output: JsonValue = None
    """Each iteration's output; None: the result of the body's last step."""


class Loop(BaseModel):
    """What a ``loop`` step repeats, and until when."""

    model_config = _MODEL_CONFIG

    steps: "Steps"
    """The body, run once per iteration; ``.iteration`` (from 1) and ``.last`` (the previous iteration's output,
    null in the first) are readable in its expressions."""
    until: str = Field(min_length=1)
    """A jq condition, checked after each iteration over its steps, ``.iteration`` and ``.last`` (the output of
    the iteration just finished): once it holds, the loop succeeds with that output."""
    max_iterations: int = Field(ge=1)
    """Iterations at most: when the condition still does not hold after the last, the step fails (``error``)."""
    delay: Duration | None = None
    """Seconds to wait between two iterations; None: the next one starts at once."""
    backoff: float = Field(1.0, ge=1, allow_inf_nan=False)
    """Each further delay is the one before times this."""
    max_delay: Duration | None = None
    """The longest delay; None: no cap."""
    output: JsonValue = None
    """Each iteration's output; None: the result of the body's last step."""


class LoopStep(_StepBase):
    """Runs its steps again and again, each time in a fresh frame, until a condition holds (a poll); its result is
    the output of the iteration after which the condition held."""

    kind: ClassVar[str] = "loop"

    loop: Loop
    """The body, the condition, the bound and the delays."""


class SetStep(_StepBase):
    """Computes values without calling anything; its result is the mapping, evaluated."""

    kind: ClassVar[str] = "set"

    set: dict[str, JsonValue]
    """Names and values; strings may hold ``${…}`` expressions."""


class FailStep(_StepBase):
    """Ends the run as failed with a message."""

    kind: ClassVar[str] = "fail"

    fail: str = Field(min_length=1)
    """The error message; may hold ``${…}``."""


def parse_instant(value: Any) -> float:
    """An RFC 3339 time (``2026-05-01T09:00:00Z``, ``…+02:00``) as POSIX seconds. Pure: no clock.

    Raises:
        ValueError: ``value`` is not a string of an RFC 3339 time with its UTC offset.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected an RFC 3339 time such as 2026-05-01T09:00:00Z, got {_json_kind(value)}")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not an RFC 3339 time such as 2026-05-01T09:00:00Z") from None
    if parsed.tzinfo is None:  # a local time would depend on where the gateway runs
        raise ValueError(f"{value!r} has no UTC offset (Z or +02:00)")
    return parsed.timestamp()


def _json_kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _literal_instant(value: str) -> str:
    if "${" not in value:  # no expression: checked when the config loads
        parse_instant(value)
    return value


class WaitUntil(BaseModel):
    """``wait: {until: …}``: wait until a wall-clock time."""

    model_config = _MODEL_CONFIG

    until: Annotated[str, Field(min_length=1), AfterValidator(_literal_instant)]
    """An RFC 3339 time with its offset, usually one ``${…}``; a time past fires at once."""


def _wait_kind(value: Any) -> str | None:
    if isinstance(value, Mapping | WaitUntil):
        return "until"
    return "duration" if isinstance(value, str | int | float) else None


Wait = Annotated[
    Annotated[Duration, Tag("duration")] | Annotated[WaitUntil, Tag("until")],
    Discriminator(
        _wait_kind, custom_error_type="wait", custom_error_message="wait is a duration (30s) or {until: <time>}"
    ),
]
"""How long a ``wait`` waits: seconds, or ``{until: …}``."""


class WaitStep(_StepBase):
    """Waits (a durable timer): for a duration, or until a time. Its result is ``{waited: seconds}`` or
    ``{waited_until: <the time, RFC 3339 in UTC>}``."""

    kind: ClassVar[str] = "wait"

    wait: Wait
    """How long (``30s``, ``2h``), or ``{until: <RFC 3339 time>}``."""


class AskUser(BaseModel):
    """What an ``ask_user`` step asks the client's user (MCP elicitation)."""

    model_config = _MODEL_CONFIG

    message: str = Field(min_length=1)
    """Shown to the user; may hold ``${…}``."""
    requested_schema: ObjectSchema = Field(default_factory=lambda: copy.deepcopy(CONFIRM_SCHEMA), alias="schema")
    """JSON Schema of the answer (an object of plain values)."""
    default: dict[str, JsonValue] | None = None
    """The answer when the client cannot ask or the user declines; None: the step fails then."""


class AskUserStep(_StepBase):
    """Asks the client's user to confirm or supply values; the answer is its result."""

    kind: ClassVar[str] = "ask_user"

    ask_user: AskUser
    """The question."""


class AskModel(BaseModel):
    """What an ``ask_model`` step asks the client's model (MCP sampling)."""

    model_config = _MODEL_CONFIG

    prompt: str = Field(min_length=1)
    """The user message; may hold ``${…}``."""
    system: str | None = None
    """The system prompt; may hold ``${…}``."""
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    """The most tokens the model may answer with."""
    default: str | None = None
    """The answer when the client cannot sample; None: the step fails then."""


class AskModelStep(_StepBase):
    """Asks the client's model to classify or draft text; the text is its result."""

    kind: ClassVar[str] = "ask_model"

    ask_model: AskModel
    """The request."""


class Agent(BaseModel):
    """What an ``agent`` step asks the client's model to do, calling tools on the way (MCP sampling with tools)."""

    model_config = _MODEL_CONFIG

    goal: str = Field(min_length=1)
    """The first user message; may hold ``${…}``."""
    tools: Annotated[tuple[Annotated[str, Field(min_length=1)], ...], _at_least_one("tool glob")]
    """Globs (``kb__*``) over the names this gateway serves tools under: the tools the model may call."""
    max_steps: int = Field(ge=1)
    """The most turns of the model (sampling requests); the last one must answer, not call a tool."""
    system: str | None = None
    """The system prompt; may hold ``${…}``."""
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    """The most tokens the model may answer with, per turn."""


class AgentStep(_StepBase):
    """Lets the client's model reach a goal in turns, calling the tools its globs allow; the result is
    ``{answer, steps: [{tool, arguments, result | error}]}``."""

    kind: ClassVar[str] = "agent"

    agent: Agent
    """The goal, the tools and the bounds."""


_ONE_KIND = f"a step needs exactly one of {', '.join(STEP_KINDS)}"


def _one_kind(value: Any) -> Any:
    if isinstance(value, Mapping):
        if len(kinds := [kind for kind in STEP_KINDS if kind in value]) != 1:
            # Its own error type: the config names the keys a step cannot have, which pydantic checks only once
            # it knows the kind.
            detail = f"{_ONE_KIND}; it has {' and '.join(kinds) or 'none'}"
            raise PydanticCustomError("step_kind", "{detail}", {"detail": detail})
    elif not isinstance(value, _StepBase):
        raise ValueError(f"a step is a mapping with an id and one of {', '.join(STEP_KINDS)}")
    return value


def _step_kind(value: Any) -> str | None:
    if isinstance(value, Mapping):
        kinds = [kind for kind in STEP_KINDS if kind in value]
        return kinds[0] if len(kinds) == 1 else None
    return getattr(value, "kind", None)


Step = Annotated[
    Annotated[CallStep, Tag("call")]
    | Annotated[SwitchStep, Tag("switch")]
    | Annotated[ForEachStep, Tag("for_each")]
    | Annotated[SetStep, Tag("set")]
    | Annotated[FailStep, Tag("fail")]
    | Annotated[WaitStep, Tag("wait")]
    | Annotated[AskUserStep, Tag("ask_user")]
    | Annotated[AskModelStep, Tag("ask_model")]
    | Annotated[AgentStep, Tag("agent")]
    | Annotated[LoopStep, Tag("loop")],
    Discriminator(_step_kind, custom_error_type="step_kind", custom_error_message=_ONE_KIND),
    BeforeValidator(_one_kind),
]
"""One step; its kind follows from which kind key it has."""


class OnErrorDefault(BaseModel):
    """``on_error: {default: …}``: a step that failed after its retries succeeds with this value, marked degraded."""

    model_config = _MODEL_CONFIG

    default: JsonValue
    """The step's result instead of its failure; may hold ``${…}``, evaluated over the run's context (where
    ``.steps.<this step>.error`` is the failure)."""


def _on_error_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "policy"
    if isinstance(value, Mapping | OnErrorDefault):
        return "default"
    return "fallback" if isinstance(value, list | tuple) else None


OnError = Annotated[
    Annotated[Literal["fail", "continue"], Tag("policy")]
    | Annotated[tuple[Step, ...], Tag("fallback")]
    | Annotated[OnErrorDefault, Tag("default")],
    Discriminator(
        _on_error_kind,
        custom_error_type="on_error",
        custom_error_message="on_error is fail, continue, a list of fallback steps or {default: value}",
    ),
]
"""``fail``, ``continue``, fallback steps or ``{default: value}``."""

for _model in (
    _StepBase,
    CallStep,
    Case,
    SwitchStep,
    ForEachStep,
    SetStep,
    FailStep,
    WaitStep,
    AskUserStep,
    AskModelStep,
    AgentStep,
    Loop,
    LoopStep,
):
    _model.model_rebuild()


class Workflow(BaseModel):
    """One workflow, served as a tool named by its key."""

    model_config = _MODEL_CONFIG

    description: str | None = None
    """The tool's description, shown to the assistant."""
    input: ObjectSchema = Field(default_factory=lambda: copy.deepcopy(DEFAULT_INPUT_SCHEMA))
    """JSON Schema of the arguments: the tool's ``inputSchema``, reached as ``.input`` in expressions."""
    max_concurrency: int = Field(DEFAULT_MAX_CONCURRENCY, ge=1)
    """Ready steps that may run at once in one run."""
    steps: Steps
    """The steps; they run as soon as the steps they depend on have finished."""
    output: JsonValue = None
    """The tool's result, may hold ``${…}``; None: ``{id: result}`` of the top-level steps that completed."""
    output_schema: ObjectSchema | None = None
    """JSON Schema of the result: the tool's ``outputSchema``."""


Workflows = dict[ToolName, Workflow]
"""The ``workflows:`` section: workflows by tool name."""


def iter_steps(steps: Iterable[Step], location: str = "steps") -> Iterator[tuple[str, Step]]:
    """Every step, nested ones included, each before its nested steps, with its location.

    Locations read like ``steps[2].switch[0].steps[1]``, ``steps[2].default[0]``,
    ``steps[3].steps[0]`` (a for_each body), ``steps[2].loop.steps[0]`` (a loop body) and
    ``steps[0].on_error[1]`` (a fallback).
    """
    for index, step in enumerate(steps):
        here = f"{location}[{index}]"
        yield here, step
        if isinstance(step, SwitchStep):
            for number, case in enumerate(step.switch):
                yield from iter_steps(case.steps, f"{here}.switch[{number}].steps")
            yield from iter_steps(step.default, f"{here}.default")
        elif isinstance(step, ForEachStep):
            yield from iter_steps(step.steps, f"{here}.steps")
        elif isinstance(step, LoopStep):
            yield from iter_steps(step.loop.steps, f"{here}.loop.steps")
        if isinstance(step.on_error, tuple):
            yield from iter_steps(step.on_error, f"{here}.on_error")


def strip_tags(loc: Sequence[str | int]) -> tuple[str | int, ...]:
    """A pydantic error location without the union tags it adds (a step's kind, ``fallback``, ``policy``,
    ``default``, a wait's ``duration`` or ``until``).

    ``("steps", 0, "call", "retry", "attempts")`` becomes ``("steps", 0, "retry", "attempts")``.
    """
    parts = tuple(loc)
    return tuple(
        part
        for index, part in enumerate(parts)
        if not (index >= 1 and parts[index - 1] == "on_error" and part in ("fallback", "policy", "default"))
        and not (index >= 1 and parts[index - 1] == "wait" and part in ("duration", "until"))
        and not (
            index >= 2 and isinstance(parts[index - 1], int) and parts[index - 2] in _STEP_LISTS and part in STEP_KINDS
        )
    )
