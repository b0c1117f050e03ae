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

**Replicas.** A state names its holder (this :class:`RoundTrips`: ``<store instance>/<name>/<token>``). A
retry that reaches a replica that does not hold its call is relayed through the shared store
(:meth:`~gateway.store.Store.relay_put`) once its state has been checked there; the holder takes it
(:meth:`RoundTrips.serve_relays`), checks it again (the nonce too, which only it knows), delivers it to its
held call as a local retry would, and writes the outcome back: the result, the next questions, or the reason
the state was refused. Progress and log messages of a relayed retry are not forwarded.
"""

import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from anyio.abc import TaskGroup

from gateway.errors import GatewayError, InvalidRequestState, UpstreamError
from gateway.requeststate import StateSigner
from gateway.store import Relay, Store
from gateway.types import CallContext, ClientChannel, JSONObject, Principal, ToolResult

__all__ = ["ANSWER_TIMEOUT", "RELAY_LINGER", "RELAY_POLL", "ROUND_TRIP_ERA", "RoundTrips", "needs_round_trip"]

logger = logging.getLogger(__name__)

ANSWER_TIMEOUT = 600.0
"""Seconds a call waits for the client to come back with answers, unless the caller says otherwise."""
ROUND_TRIP_ERA = "2026-07-28"
RELAY_POLL = 0.05
"""Seconds between two looks at the store: for retries relayed here, and for the answer to one relayed away."""
RELAY_LINGER = 10.0
"""Seconds the holder keeps taking relayed retries after its last held call ended (a late retry then gets "no
longer waiting" at once rather than when its state expires)."""

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
        store: Store | None = None,
        name: str = "calls",
    ) -> None:
        """``background`` gives the task group held calls run in; ``signer`` mints their states (by default
        with a key of its own); ``answer_timeout`` is how long a call waits for answers, unless ``start`` is
        given another. With a ``store`` (shared by replicas), retries of calls held elsewhere are relayed
        through it, and :meth:`serve_relays` answers those of calls held here; ``name`` tells apart the round
        trips of one process in :attr:`holder`."""
        self._background = background
        self._signer = signer if signer is not None else StateSigner()
        self._answer_timeout = answer_timeout
        self._waiting: dict[str, _Waiting] = {}
        self._store = store
        self.holder: str | None = None
        """This round trips' id in the states it mints: ``<store instance>/<name>/<token>`` (the token tells
        apart gateways sharing one store object, as tests do); None without a store."""
        if store is not None:
            self.holder = f"{store.instance}/{name}/{secrets.token_hex(4)}"
        self._holding = anyio.Event()
        """Set when a call is held (:meth:`serve_relays` sleeps on it while none is)."""

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
        self._holding.set()

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
        if waiting is None and claim.holder not in (None, self.holder) and self._store is not None:
            return await self._relay(self._store, claim.holder, claim.held, claim.expires, context, request)
        if waiting is None:
            return _gone()
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

    # --- Relaying: a retry that reached this replica, for a call held at another. ---

    async def _relay(
        self, store: Store, holder: str, held: str, deadline: float, context: CallContext, request: str
    ) -> ToolResult:
        """Put the retry in the store for ``holder``, and wait for its answer; if nobody took it by ``deadline``
        (the state's expiry), the call is no longer waiting.

        Raises:
            InvalidRequestState: the holder refused the state (``used``, say).
        """
        retry = {
            "principal": {"kind": context.principal.kind, "id": context.principal.id},
            "request": request,
            "requestState": context.request_state,
            "inputResponses": context.input_responses or {},
        }
        relay_id = await store.relay_put(holder, held, retry, deadline)
        if relay_id is None:  # the holder's process is gone, and its held calls with it
            return _gone()
        answered = False
        try:
            while True:
                answer = await store.relay_answer_of(relay_id)
                if answer is not None:
                    answered = True
                    return _outcome(answer)
                if time.time() > deadline and await store.relay_withdraw(relay_id):
                    answered = True  # never taken (or forgotten): nothing to clean up
                    return _gone()
                await anyio.sleep(RELAY_POLL)
        finally:
            if not answered:  # the caller gave up: withdraw the retry if the holder did not take it yet
                with anyio.CancelScope(shield=True), anyio.move_on_after(RELAY_POLL * 20):
                    await store.relay_withdraw(relay_id)

    async def serve_relays(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Answer the retries other replicas relay to the calls held here, until cancelled: the store is looked
        at every :data:`RELAY_POLL` seconds while a call is held, and for :data:`RELAY_LINGER` seconds after."""
        store, holder = self._store, self.holder
        async with anyio.create_task_group() as tasks:
            task_status.started()
            if store is None or holder is None:
                return
            idle_since: float | None = None
            while True:
                if self._waiting:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > RELAY_LINGER:
                    self._holding = anyio.Event()
                    await self._holding.wait()
                    idle_since = None
                    continue
                try:
                    relays = await store.relay_take(holder)
                except GatewayError:  # the store's trouble must not end the serving; the retries wait meanwhile
                    logger.exception("could not look for retries relayed to this gateway's held calls")
                    await anyio.sleep(RELAY_POLL * 20)  # a second: not a log line every poll while it lasts
                    continue
                for relay in relays:
                    tasks.start_soon(self._serve_relay, store, relay)
                await anyio.sleep(RELAY_POLL)

    async def _serve_relay(self, store: Store, relay: Relay) -> None:
        """Deliver a relayed retry to its held call, as a local retry (every check of one included), and write
        back the outcome."""
        retry = relay.retry
        principal = retry.get("principal") or {}
        context = CallContext(
            principal=Principal(str(principal.get("id", "")), str(principal.get("kind", "client"))),
            input_responses=retry.get("inputResponses") or {},
            request_state=str(retry.get("requestState") or ""),
        )
        answer: dict[str, Any]
        try:
            result = await self.resume(context, request=str(retry.get("request", "")))
        except anyio.get_cancelled_exc_class():  # this gateway is stopping: so does the call; say so
            stopped = ToolResult.text("the gateway holding this call stopped", is_error=True)
            with anyio.CancelScope(shield=True), anyio.move_on_after(RELAY_POLL * 20):
                await store.relay_answer(relay.id, {"result": stopped.wire()})
            raise
        except InvalidRequestState as exc:
            answer = {"error": {"reason": exc.reason, "message": str(exc)}}
        except Exception:  # this retry's boundary: its client gets an error, the serving goes on
            logger.exception("a relayed retry of held call %s failed", relay.held)
            answer = {"result": ToolResult.text("the gateway holding this call failed", is_error=True).wire()}
        else:
            if result.input_required is not None:
                answer = {"input_required": dict(result.input_required)}
            else:
                answer = {"result": result.wire()}
        try:
            await store.relay_answer(relay.id, answer)
        except GatewayError:
            logger.exception("could not answer a retry relayed to held call %s", relay.held)

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
                        held=waiting.id,
                        principal=waiting.principal,
                        request=waiting.request,
                        ttl=waiting.timeout,
                        holder=self.holder,
                    )
                    return ToolResult(content=(), input_required=_input_required(asked, state))
                await waiting.changed.wait()
        except anyio.get_cancelled_exc_class():
            waiting.scope.cancel()  # the caller gave up: so does the call (a run compensates, shielded)
            raise
        finally:
            waiting.attached, waiting.progress, waiting.client = False, None, None


def _gone() -> ToolResult:
    return ToolResult.text(
        "This call is no longer waiting for answers (it finished, expired, or the gateway restarted): "
        "call the tool again without requestState to start it anew.",
        is_error=True,
    )


def _outcome(answer: JSONObject) -> ToolResult:
    """The result a relayed retry's answer stands for.

    Raises:
        InvalidRequestState: the holder refused the retry's state.
    """
    error = answer.get("error")
    if isinstance(error, dict):
        raise InvalidRequestState(str(error.get("reason", "")), str(error.get("message", "")))
    required = answer.get("input_required")
    if isinstance(required, dict):
        return ToolResult(content=(), input_required=required)
    result = answer.get("result")
    return ToolResult.from_wire(result if isinstance(result, dict) else {})


def _input_required(questions: dict[str, _Question], state: str) -> dict[str, Any]:
    requests = {key: {"method": q.method, "params": dict(q.params)} for key, q in questions.items()}
    return {"resultType": "input_required", "inputRequests": requests, "requestState": state}
