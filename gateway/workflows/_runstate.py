"""A workflow run's state, as the engine (:mod:`gateway.workflows.engine`) keeps it: plain mutable data.

Frames (the run itself, or one iteration of a for_each or a loop), the state of each step placed in a frame,
the evaluation sites where the engine waits for jq outcomes, and the scope expressions see. No
behaviour beyond reading it: the engine alone changes it, one event at a time.
"""

from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.workflows.agent import Conversation
from gateway.workflows.commands import Leaf, StepError
from gateway.workflows.expressions import Outcome
from gateway.workflows.plan import StepPlan

__all__ = ["PARKED", "SETTLED", "Frame", "Site", "SiteKind", "StepState", "live", "scope_of"]

SETTLED = frozenset({"succeeded", "failed", "skipped", "cancelled"})
"""The statuses a step ends in."""


@dataclass(eq=False, slots=True)
class Frame:
    """Where steps run: the run itself, or one iteration of a for_each (with its item bound) or of a loop (with
    ``iteration`` and ``last`` bound)."""

    path: str
    region: str | None
    parent: "Frame | None"
    bindings: dict[str, Any]
    states: dict[str, "StepState"] = field(default_factory=dict)
    entries: dict[str, Any] = field(default_factory=dict)
    """``.steps`` as expressions see it: settled steps of this frame by id."""
    owner: "StepState | None" = None
    index: int = 0
    evaluating: bool = False
    """The iteration is over and its ``output`` waits for jq."""


@dataclass(eq=False, slots=True)
class StepState:
    """One step placed in a frame: where it is, and what its tries gave."""

    plan: StepPlan
    frame: Frame
    key: str
    status: str = "waiting"
    """waiting | evaluating | queued | running | retrying | fallback | degrading (its on_error default is being
    evaluated) | timing (a wait's timer, or a loop's delay before its next iteration, is pending) | one of SETTLED."""
    attempt: int = 0
    refusals: int = 0
    """Tries refused before they reached the tool (not counted against ``retry.attempts``)."""
    waited: float = 0.0
    """Seconds spent waiting to retry those refusals."""
    command: Leaf | None = None
    """The call or question handed out for the current try, while it is in flight."""
    result: Any = None
    error: StepError | None = None
    continued: bool = False
    degraded: bool = False
    """It failed and succeeded with its ``on_error`` default (its ``error`` kept)."""
    branch: str | None = None
    items: list[Any] | None = None
    next_item: int = 0
    """A for_each's next item to start; a loop's iterations started so far."""
    outputs: list[Any] = field(default_factory=list)
    iterations: dict[int, Frame] = field(default_factory=dict)
    """The iterations running, by index (a for_each's item) or number (a loop's, from 1)."""
    last: Any = None
    """A loop's output of its latest finished iteration."""
    agent: Conversation | None = None
    """An ``agent`` step's current try: its conversation and its parts in flight (keyed apart from the step)."""


SiteKind = Literal["step", "success", "output", "run", "compensate", "default"]
"""What waits at a site: a step's start, its success condition, a for_each iteration's output (a loop's: with its
condition), the
run's output, a compensation's arguments, a failed step's ``on_error`` default."""


@dataclass(eq=False, slots=True)
class Site:
    """A place waiting for jq outcomes: what it belongs to, and the outcomes known so far.

    It is evaluated again over the live scope, which is safe: what it reads by name (``.steps.<id>``
    of the steps it depends on, ``.input``, the item) cannot change while it waits, since a step that
    could change them would have cancelled it first; the outcomes it got are by position, whatever
    their input was. Only a program asked for later (a switch's next condition) that reads steps it
    does not name (``.steps | keys``) may see steps that settled meanwhile."""

    prefix: str
    kind: SiteKind
    state: StepState | None
    attempt: int
    frame: Frame | None = None
    result: Any = None
    random: float = 0.5
    known: list[Outcome | None] = field(default_factory=list)
    waiting: int = 0


PARKED: Any = object()
"""What an evaluation gives while it waits for jq outcomes."""


def live(state: StepState, command: Leaf) -> bool:
    """A queued command still to be handed out (not cancelled, not superseded by a later try); an ``agent``'s
    later parts are queued while it runs."""
    running = state.status == "queued" or (state.status == "running" and command.key != state.key)
    return running and state.attempt == command.attempt


def scope_of(arguments: Mapping[str, Any], frame: Frame, run_id: str = "") -> dict[str, Any]:
    """What expressions see in ``frame``: ``{input, run: {id}, steps, <item>, index}``."""
    scope: dict[str, Any] = {"input": arguments, "run": {"id": run_id}}
    chain = []
    walk: Frame | None = frame
    while walk is not None:
        chain.append(walk)
        walk = walk.parent
    for outer in reversed(chain):
        scope.update(outer.bindings)
    scope["steps"] = frame.entries if len(chain) == 1 else ChainMap(*(f.entries for f in chain))
    return scope
