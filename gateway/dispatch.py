"""The one call path: resolve → policy chain → provider, with every outcome turned into a result.

Every call – from an assistant, from ``patchbay call``, from a workflow step –
comes through the :class:`Dispatcher`, so whatever a policy, a metric, a span
or the audit trail does applies to all of them alike. Each call is counted once
(refusals included) under its ``outcome`` (DESIGN §5), plus ``cancelled`` for a
call its caller gave up on, which none of the others describes.
"""

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial, reduce
from typing import Any, NamedTuple

import anyio

from gateway.audit import AuditSink, build_record
from gateway.errors import GatewayError, PolicyDenied, RateLimited, ToolNotFound, UpstreamUnavailable
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.tracing import call_span
from gateway.types import CallContext, CallNext, JSONObject, Policy, Provider, ToolCall, ToolResult
from policies.cache import META_KEY as STALE_META_KEY
from policies.fallback import META_KEY as FALLBACK_META_KEY
from policies.redaction import Redactor

logger = logging.getLogger(__name__)


def compose(policies: Sequence[Policy], terminal: CallNext) -> CallNext:
    """Wrap ``terminal`` in ``policies``, the first policy outermost (like ASGI middleware).

    Each layer is ``partial(policy, call_next=inner)``: calling it starts the policy's own coroutine,
    with no wrapper coroutine in between (about 0.5 µs a layer).
    """

    def wrap(inner: CallNext, policy: Policy) -> CallNext:
        return partial(policy, call_next=inner)

    return reduce(wrap, reversed(policies), terminal)


class Invocation(NamedTuple):
    """A call's result as :meth:`Dispatcher.invoke` reports it to a workflow step."""

    result: ToolResult
    outcome: str
    """The call's ``outcome`` label (``ok``, ``error``, ``timeout``…, DESIGN §5)."""
    retry_after: float | None = None
    """Set when the call was refused before it reached the tool: when the same call may succeed."""


@dataclass(frozen=True, slots=True)
class Audit:
    """Where audit records go, and what is redacted from them first."""

    sink: AuditSink
    redactor: Redactor


class Dispatcher:
    """Routes calls by name through the policy chain to their provider; measures, traces and audits each."""

    def __init__(
        self,
        registry: Callable[[], Registry],
        providers: Mapping[str, Provider],
        policies: Sequence[Policy] = (),
        *,
        metrics: Metrics | None = None,
        audit: Audit | None = None,
    ) -> None:
        self._registry = registry
        self._providers = providers
        self._chain = compose(policies, self._invoke)
        self._metrics = metrics
        self._audit = audit

    async def call(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        """Call a tool by its registry name; refusals and failures come back as ``isError`` results.

        Raises:
            ToolNotFound: no such tool (a protocol error, not a tool result).
        """
        result, _, _ = await self._dispatch(name, arguments, context)
        return result

    async def invoke(self, name: str, arguments: JSONObject, context: CallContext) -> Invocation:
        """Like ``call``, with the call's ``outcome`` label and, for a refusal, when to try again.

        Raises:
            ToolNotFound: no such tool (a protocol error, not a tool result).
        """
        result, outcome, error = await self._dispatch(name, arguments, context)
        return Invocation(result, outcome, error.retry_after if error is not None else None)

    async def call_or_raise(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        """Like ``call``, but a refusal or failure is raised as the gateway error it is (for a fallback).

        Raises:
            GatewayError: the call was refused or failed (ToolNotFound included).
        """
        result, _, error = await self._dispatch(name, arguments, context)
        if error is not None:
            raise error
        return result

    async def _dispatch(
        self, name: str, arguments: JSONObject, context: CallContext
    ) -> tuple[ToolResult, str, GatewayError | None]:
        try:
            entry = self._registry().resolve(name)
        except ToolNotFound as exc:
            logger.debug("call %s: no such tool", name)
            if self._metrics is not None:
                self._metrics.refused(name, "", "invalid")
            self._record(name, "", context, "invalid", 0.0, arguments, None, exc)
            raise
        call = ToolCall(name, entry.provider, entry.target, arguments, context, entry.tool)
        metrics = self._metrics
        if metrics is not None:
            metrics.call_started(name, call.provider)
        started = time.perf_counter()
        error: GatewayError | None = None
        outcome = "cancelled"
        result: ToolResult | None = None
        principal = context.principal
        with call_span(
            name, call.provider, principal.id, context.workflow_run, context.workflow_step, carrier=context.meta
        ) as span:
            try:
                result = await self._chain(call)
                outcome = "error" if result.is_error else "ok"
            except GatewayError as exc:
                if not exc.as_tool_result:
                    outcome = exc.outcome
                    raise
                self._with_last_error(exc, call.provider)
                result = ToolResult.text(str(exc), is_error=True)
                outcome, error = exc.outcome, exc
            except BaseException as exc:
                outcome = "cancelled" if isinstance(exc, anyio.get_cancelled_exc_class()) else "error"
                raise
            finally:
                seconds = time.perf_counter() - started
                span.set_outcome(outcome)
                if logger.isEnabledFor(logging.DEBUG):  # every call, refused, failed and cancelled ones too
                    logger.debug(
                        "call %s → %s/%s: %s in %.1fms", name, call.provider, call.target, outcome, seconds * 1000
                    )
                if metrics is not None:
                    metrics.call_finished(name, call.provider, outcome, seconds)
                    if isinstance(error, PolicyDenied):
                        metrics.policy_denied(error.policy, name)
                        if isinstance(error, RateLimited):
                            metrics.rate_limited(name)
                if result is None:  # cancelled, or a bug below raised: no result, but still a record
                    self._record(name, call.provider, context, outcome, seconds, arguments, None, None)
        self._record(name, call.provider, context, outcome, seconds, arguments, result, error)
        assert result is not None
        return result, outcome, error

    def _with_last_error(self, exc: GatewayError, provider_name: str) -> None:
        """Give an ``UpstreamUnavailable`` its provider's last error, unless it says it already: the reason a call
        gets is then the one ``/readyz`` and ``patchbay tools`` show for the same provider."""
        if not isinstance(exc, UpstreamUnavailable):
            return
        # All the dispatcher otherwise needs of a provider is call_tool: one without a last_error still works.
        last_error = getattr(self._providers.get(exc.server or provider_name), "last_error", None)
        if last_error and last_error not in str(exc):
            exc.args = (f"{exc} (last error: {last_error})",)  # same error, type and attributes: only the words

    def _record(
        self,
        name: str,
        provider: str,
        context: CallContext,
        outcome: str,
        seconds: float,
        arguments: JSONObject,
        result: ToolResult | None,
        error: GatewayError | None,
    ) -> None:
        audit = self._audit
        if audit is None:
            return
        decisions = _decisions(result, error)
        error_text = str(error) if error is not None else None
        record = build_record(
            name, provider, context, outcome, seconds, decisions, arguments, result, error_text, audit.redactor
        )
        audit.sink.record(record)

    async def _invoke(self, call: ToolCall) -> ToolResult:
        return await self._providers[call.provider].call_tool(call.target, call.arguments, call.context)


class CallPath:
    """The dispatch path, for calls made from inside a call: a fallback's, a workflow step's.

    Those callers are parts of the chain and of the providers the dispatcher is built from, so
    they cannot be handed the dispatcher itself: they are built against this instead, and the
    composition root binds it to the dispatcher once, right after building it, before any call.
    A call is recursive by nature (a workflow step is a call through the whole path); this is the
    one place the knot is tied.
    """

    def __init__(self) -> None:
        self._dispatcher: Dispatcher | None = None

    def bind(self, dispatcher: "Dispatcher") -> None:
        """Route every call to ``dispatcher`` from now on.

        Raises:
            RuntimeError: already bound.
        """
        if self._dispatcher is not None:
            raise RuntimeError("the call path is bound already")
        self._dispatcher = dispatcher

    def _bound(self) -> "Dispatcher":
        if self._dispatcher is None:
            raise RuntimeError("a call was made before the gateway was assembled")
        return self._dispatcher

    async def invoke(self, name: str, arguments: JSONObject, context: CallContext) -> Invocation:
        """``Dispatcher.invoke`` (a workflow step's call).

        Raises:
            ToolNotFound: no such tool.
        """
        return await self._bound().invoke(name, arguments, context)

    async def call_or_raise(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        """``Dispatcher.call_or_raise`` (a fallback's call).

        Raises:
            GatewayError: the call was refused or failed.
        """
        return await self._bound().call_or_raise(name, arguments, context)


def _decisions(result: ToolResult | None, error: GatewayError | None) -> tuple[str, ...]:
    """What the policies decided, for the audit record: who refused, or which fallback or cached result answered."""
    if isinstance(error, PolicyDenied):
        return (f"refused by {error.policy} ({error.outcome})",)
    meta = result.meta if result is not None and result.meta else {}
    fallback: Any = meta.get(FALLBACK_META_KEY)
    if isinstance(fallback, Mapping):
        return (f"fallback {fallback.get('from')} → {fallback.get('to')}: {fallback.get('reason')}",)
    stale: Any = meta.get(STALE_META_KEY)
    if isinstance(stale, Mapping):
        return (f"answered from cache (kept {stale.get('cached_at')}, {stale.get('age')}s old): {stale.get('reason')}",)
    return ()
