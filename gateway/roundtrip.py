"""Calls that ask a 2026-07-28 client something: the input-required round trip, holding the call.

A client of the 2026-07-28 revision has no channel for server→client requests. When a call it made
asks the user or the model (a workflow step, or a handshake-era upstream sending ``elicitation/create``
or ``sampling/createMessage`` mid-call), the ``tools/call`` returns an ``InputRequiredResult`` holding
the questions and a ``requestState``; the client answers them and calls the tool again with
``inputResponses`` and that ``requestState``, and the call, held in the background meanwhile, goes on.

Each ``requestState`` is minted by :class:`~gateway.requeststate.StateSigner`: signed, bound to the
principal and the request (tool and arguments), good for one retry, and expiring with the call's wait
for answers. The call is owned by a background task group while no request is attached; a caller
that gives up (its request cancelled while attached) cancels the call, and questions left unanswered
for the call's answer timeout fail (a workflow step then takes its default, or fails).
"""

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from anyio.abc import TaskGroup

from gateway.errors import InvalidRequestState, UpstreamError
from gateway.requeststate import StateSigner
from gateway.types import CallContext, ClientChannel, JSONObject, ToolResult

__all__ = ["ANSWER_TIMEOUT", "ROUND_TRIP_ERA", "RoundTrips", "needs_round_trip"]

logger = logging.getLogger(__name__)

ANSWER_TIMEOUT = 600.0
"""Seconds a call waits for the client to come back with answers, unless the caller says otherwise."""
ROUND_TRIP_ERA = "2026-07-28"

RunFn = Callable[[CallContext], Awaitable[ToolResult]]


def needs_round_trip(context: CallContext) -> bool:
    """Whether the caller is a client that can only be asked through the input-required round trip.

    Not when the caller is itself a held call (a workflow calling a workflow, a held tool call):
    its questions already reach the client that way.
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
    """A call in the background, and what it is waiting for the client to answer."""

    id: str
    principal: str
    request: str
    timeout: float
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    questions: dict[str, _Question] = field(default_factory=dict)
    changed: anyio.Event = field(default_factory=anyio.Event)
    result: ToolResult | None = None
    progress: Any = None
    client: ClientChannel | None = None
    """The channel of the request attached now, if any (log messages go there)."""
    attached: bool = False
    nonce: str | None = None
    """The nonce of the one ``requestState`` a retry may bring now; None: none may."""
    counter: int = 0

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


class _Asking:
    """The client channel a held call sees: its requests become questions for the next result."""

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
            with anyio.fail_after(waiting.timeout):
                await question.answered.wait()
        except TimeoutError:
            raise UpstreamError(f"the client did not answer {method} within {waiting.timeout:g}s") from None
        finally:
            del waiting.questions[key]
        assert question.answer is not None
        return question.answer

    async def log(self, params: JSONObject) -> None:
        client = self._waiting.client
        if client is not None:  # to the request attached now; between requests there is nowhere to send it
            await client.log(params)


class RoundTrips:
    """The held calls of 2026-07-28 clients, by the id their ``requestState`` carries."""

    def __init__(
        self,
        background: Callable[[], TaskGroup | None],
        *,
        signer: StateSigner | None = None,
        answer_timeout: float = ANSWER_TIMEOUT,
    ) -> None:
        """``background`` gives the task group held calls run in; ``signer`` mints their states (by default
        with a key of its own); ``answer_timeout`` is how long a call waits for answers, unless ``start`` is
        given another."""
        self._background = background
        self._signer = signer if signer is not None else StateSigner()
        self._answer_timeout = answer_timeout
        self._waiting: dict[str, _Waiting] = {}

    async def start(
        self,
        run: RunFn,
        context: CallContext,
        *,
        request: str = "",
        group: TaskGroup | None = None,
        answer_timeout: float | None = None,
    ) -> ToolResult:
        """Start a call in the background (in ``group``, else the one ``background`` gives) and wait for its
        result or its first questions. ``request`` identifies the call (see ``request_digest``): a retry must
        name the same; ``answer_timeout`` bounds the wait for answers and the state's lifetime."""
        group = group if group is not None else self._background()
        if group is None or context.client is None:
            return await run(context)
        waiting = _Waiting(
            uuid.uuid4().hex,
            context.principal.id,
            request,
            answer_timeout if answer_timeout is not None else self._answer_timeout,
        )
        self._waiting[waiting.id] = waiting

        async def report(done: float, total: float | None, message: str | None) -> None:
            if waiting.progress is not None:  # the request attached now, if any, asked for progress
                await waiting.progress(done, total, message)

        run_context = replace(context, client=_Asking(context.client, waiting), progress=report)
        group.start_soon(self._drive, waiting, run, run_context)
        return await self._attach(waiting, context)

    async def resume(self, context: CallContext, *, request: str = "") -> ToolResult:
        """Deliver a client's answers to its held call, and wait for the result or the next questions.

        Raises:
            InvalidRequestState: the ``requestState`` is forged or altered, expired, already used, another
                client's, or another request's.
        """
        claim = self._signer.open(context.request_state or "", principal=context.principal.id, request=request)
        waiting = self._waiting.get(claim.held)
        if waiting is None:
            return ToolResult.text(
                "This call is no longer waiting for answers (it finished, expired, or the gateway restarted): "
                "call the tool again without requestState to start it anew.",
                is_error=True,
            )
        if waiting.nonce != claim.nonce:
            raise InvalidRequestState("used", "this requestState was used already: retry with the latest one")
        waiting.nonce = None
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
            waiting.result = ToolResult.text("the call was cancelled", is_error=True)
        waiting.notify()
        if not waiting.attached:  # keep the result for the client's retry, a while
            with anyio.move_on_after(waiting.timeout):
                while waiting.id in self._waiting:
                    await waiting.changed.wait()
            self._waiting.pop(waiting.id, None)

    async def _attach(self, waiting: _Waiting, context: CallContext) -> ToolResult:
        waiting.attached, waiting.progress, waiting.client = True, context.progress, context.client
        try:
            while True:
                if waiting.result is not None:
                    self._waiting.pop(waiting.id, None)
                    waiting.notify()
                    return waiting.result
                fresh = {key: q for key, q in waiting.questions.items() if not q.sent}
                if fresh:
                    for question in fresh.values():
                        question.sent = True
                    asked = {key: q for key, q in waiting.questions.items() if q.answer is None}
                    state, waiting.nonce = self._signer.mint(
                        held=waiting.id, principal=waiting.principal, request=waiting.request, ttl=waiting.timeout
                    )
                    return ToolResult(content=(), input_required=_input_required(asked, state))
                await waiting.changed.wait()
        except anyio.get_cancelled_exc_class():
            waiting.scope.cancel()  # the caller gave up: so does the call (a run compensates, shielded)
            raise
        finally:
            waiting.attached, waiting.progress, waiting.client = False, None, None


def _input_required(questions: dict[str, _Question], state: str) -> dict[str, Any]:
    requests = {key: {"method": q.method, "params": dict(q.params)} for key, q in questions.items()}
    return {"resultType": "input_required", "inputRequests": requests, "requestState": state}
