"""Workflow runs that ask a 2026-07-28 client something: the input-required round trip.

A client of the 2026-07-28 revision has no channel for server→client requests. When a step of
its run asks the user or the model, the ``tools/call`` returns an ``InputRequiredResult``
holding the questions and a ``requestState``; the client answers them and calls the tool again
with ``inputResponses`` and the same ``requestState``, and the run, which waited in the
background meanwhile, goes on. The run is owned by the gateway's task group while no request is
attached; a caller that gives up (its request cancelled while attached) cancels the run, and a
run whose questions go unanswered for :data:`ANSWER_TIMEOUT` seconds takes each step's default,
or fails it.
"""

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from anyio.abc import TaskGroup

from gateway.errors import UpstreamError
from gateway.types import CallContext, ClientChannel, JSONObject, ToolResult

__all__ = ["ANSWER_TIMEOUT", "STATE_PREFIX", "RoundTrips", "needs_round_trip"]

logger = logging.getLogger(__name__)

ANSWER_TIMEOUT = 600.0
"""Seconds a run waits for the client to come back with answers."""
STATE_PREFIX = "patchbay-run:"
"""How the ``requestState`` of a waiting workflow run starts."""
ROUND_TRIP_ERA = "2026-07-28"

RunFn = Callable[[CallContext], Awaitable[ToolResult]]


def needs_round_trip(context: CallContext) -> bool:
    """Whether the caller is a client that can only be asked through the input-required round trip.

    Not when the caller is itself a round-trip run (a workflow calling a workflow): its questions
    already reach the client that way.
    """
    client = context.client
    return client is not None and not isinstance(client, _Asking) and client.protocol_version >= ROUND_TRIP_ERA


@dataclass(eq=False)
class _Question:
    method: str
    params: JSONObject
    answered: anyio.Event = field(default_factory=anyio.Event)
    answer: JSONObject | None = None
    sent: bool = False


@dataclass(eq=False)
class _Waiting:
    """A run in the background, and what it is waiting for the client to answer."""

    token: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    questions: dict[str, _Question] = field(default_factory=dict)
    changed: anyio.Event = field(default_factory=anyio.Event)
    result: ToolResult | None = None
    progress: Any = None
    attached: bool = False
    counter: int = 0

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


class _Asking:
    """The client channel a round-trip run sees: its requests become questions for the next result."""

    def __init__(self, client: ClientChannel, waiting: _Waiting) -> None:
        self._client = client
        self._waiting = waiting

    @property
    def capabilities(self) -> JSONObject:
        return self._client.capabilities

    @property
    def protocol_version(self) -> str:
        return self._client.protocol_version

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        waiting = self._waiting
        waiting.counter += 1
        key = f"q{waiting.counter}"
        question = waiting.questions[key] = _Question(method, params)
        waiting.notify()
        try:
            with anyio.fail_after(ANSWER_TIMEOUT):
                await question.answered.wait()
        except TimeoutError:
            raise UpstreamError(f"the client did not answer {method} within {ANSWER_TIMEOUT:g}s") from None
        finally:
            del waiting.questions[key]
        assert question.answer is not None
        return question.answer

    async def log(self, params: JSONObject) -> None:
        return  # no channel to send it on


class RoundTrips:
    """The workflow runs of 2026-07-28 clients, by ``requestState``."""

    def __init__(self, background: Callable[[], TaskGroup | None]) -> None:
        self._background = background
        self._waiting: dict[str, _Waiting] = {}

    async def start(self, run: RunFn, context: CallContext) -> ToolResult:
        """Start a run in the background and wait for its result or its first questions."""
        group = self._background()
        if group is None or context.client is None:
            return await run(context)
        waiting = _Waiting(STATE_PREFIX + uuid.uuid4().hex)
        self._waiting[waiting.token] = waiting

        async def report(done: float, total: float | None, message: str | None) -> None:
            if waiting.progress is not None:  # the request attached now, if any, asked for progress
                await waiting.progress(done, total, message)

        run_context = replace(context, client=_Asking(context.client, waiting), progress=report)
        group.start_soon(self._drive, waiting, run, run_context)
        return await self._attach(waiting, context)

    async def resume(self, context: CallContext) -> ToolResult:
        """Deliver a client's answers to its waiting run, and wait for the result or the next questions."""
        waiting = self._waiting.get(context.request_state or "")
        if waiting is None or waiting.attached:
            return ToolResult.text(
                "This workflow run is no longer waiting for answers (it finished, expired, or the gateway "
                "restarted): call the tool again to start a new run.",
                is_error=True,
            )
        for key, answer in (context.input_responses or {}).items():
            question = waiting.questions.get(key)
            if question is not None and question.answer is None:
                question.answer = answer
                question.answered.set()
        for question in waiting.questions.values():
            question.sent = question.answer is not None  # unanswered ones are asked again
        return await self._attach(waiting, context)

    async def _drive(self, waiting: _Waiting, run: RunFn, context: CallContext) -> None:
        with waiting.scope:
            waiting.result = await run(context)
        if waiting.result is None:
            waiting.result = ToolResult.text("the workflow run was cancelled", is_error=True)
        waiting.notify()
        if not waiting.attached:  # keep the result for the client's retry, a while
            with anyio.move_on_after(ANSWER_TIMEOUT):
                while waiting.token in self._waiting:
                    await waiting.changed.wait()
            self._waiting.pop(waiting.token, None)

    async def _attach(self, waiting: _Waiting, context: CallContext) -> ToolResult:
        waiting.attached, waiting.progress = True, context.progress
        try:
            while True:
                if waiting.result is not None:
                    self._waiting.pop(waiting.token, None)
                    waiting.notify()
                    return waiting.result
                fresh = {key: q for key, q in waiting.questions.items() if not q.sent}
                if fresh:
                    for question in fresh.values():
                        question.sent = True
                    asked = {key: q for key, q in waiting.questions.items() if q.answer is None}
                    return ToolResult(content=(), input_required=_input_required(asked, waiting.token))
                await waiting.changed.wait()
        except anyio.get_cancelled_exc_class():
            waiting.scope.cancel()  # the caller gave up: so does the run (it compensates, shielded)
            raise
        finally:
            waiting.attached, waiting.progress = False, None


def _input_required(questions: dict[str, _Question], token: str) -> dict[str, Any]:
    requests = {key: {"method": q.method, "params": dict(q.params)} for key, q in questions.items()}
    return {"resultType": "input_required", "inputRequests": requests, "requestState": token}
