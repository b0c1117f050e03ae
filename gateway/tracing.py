"""OpenTelemetry spans: one per tool call, one per workflow step.

Patchbay uses the OpenTelemetry *API* only (``opentelemetry-api``, which the
MCP SDK already depends on) and never imports the SDK. With the API alone every
span is a no-op, so nothing is exported unless the user installs an SDK: which
backend, if any, stays their choice.

Exporting, honestly:

* The ``OTEL_*`` environment variables (``OTEL_TRACES_EXPORTER``,
  ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``…) are read by the
  SDK's auto-configuration, not by the API, so setting them alone does nothing.
* What works without code: ``pip install opentelemetry-distro[otlp]`` (the SDK,
  the OTLP exporter and ``opentelemetry-instrument``), then
  ``OTEL_SERVICE_NAME=patchbay OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318
  opentelemetry-instrument patchbay serve patchbay.yaml``. The distro sets the
  global tracer provider (batching, OTLP by default, or ``OTEL_TRACES_EXPORTER=console``)
  before Patchbay starts, and these spans go out through it.
* ``OTEL_PYTHON_TRACER_PROVIDER=sdk_tracer_provider`` alone loads the SDK's
  provider with no span processor: spans are recorded, then dropped.
* Embedding Patchbay: call ``opentelemetry.trace.set_tracer_provider(...)``
  before the first call (see :class:`Tracing` on when the check happens).

Spans follow the OpenTelemetry semantic conventions for MCP (Development status):
a call's span is named ``tools/call {tool}`` with ``mcp.method.name``,
``gen_ai.operation.name = execute_tool``, ``gen_ai.tool.name`` and, on failure,
``error.type`` (``tool_error`` for the tool's own ``isError``, else the outcome
label) and status ERROR. The gateway-specific parts have no convention and use
``patchbay.*``: ``patchbay.server``, ``patchbay.client``, ``patchbay.outcome``,
``patchbay.workflow.{name,run,step}``. Arguments, results and tokens are never
recorded: a trace backend is rarely cleared for the data that passes through tools.

The gateway removes the MCP SDK's own server middleware (its per-message span
cost ~8% of the CPU per call), so a client's call span is this module's SERVER span,
parented on the ``traceparent`` the client sent in ``_meta`` when there is one.
"""

from collections.abc import Mapping
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, StatusCode

__all__ = ["Span", "Tracing", "call_span", "refresh", "step_span", "tracer"]

tracer = trace.get_tracer("patchbay")
"""Patchbay's tracer: a proxy that starts delegating once a tracer provider is set."""

_NOT_ERRORS = frozenset({"ok", "succeeded", "skipped", "cancelled"})
"""Outcomes that leave the span's status unset: a call that succeeded, a step that did not fail."""


class Span:
    """What a ``with call_span(...)`` / ``with step_span(...)`` block gets: set the outcome once known.

    This base class is the no-op one, shared by every span while tracing is off.
    """

    __slots__ = ()

    def set_outcome(self, outcome: str) -> None:
        """Record how the call or step ended (an ``outcome`` label, or a step status)."""

    def __enter__(self) -> "Span":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


_NOOP = Span()


class _LiveSpan(Span):
    """A span of a real tracer: started on entry, made current, ended on exit."""

    __slots__ = ("_attributes", "_cm", "_context", "_kind", "_name", "_span", "_tracer")

    def __init__(
        self, tracer: trace.Tracer, name: str, kind: SpanKind, attributes: dict[str, Any], context: Context | None
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._kind = kind
        self._attributes = attributes
        self._context = context

    def __enter__(self) -> "_LiveSpan":
        self._cm = self._tracer.start_as_current_span(
            self._name,
            context=self._context,
            kind=self._kind,
            attributes=self._attributes,
            record_exception=False,  # see __exit__
            set_status_on_exception=False,
        )
        self._span = self._cm.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # An escaping exception is recorded by its type only: its message and traceback may quote
        # arguments. Cancellation (a BaseException) is not an error of the call.
        if isinstance(exc, Exception):
            self._span.set_attribute("error.type", type(exc).__qualname__)
            self._span.set_status(StatusCode.ERROR)
        self._cm.__exit__(exc_type, exc, tb)

    def set_outcome(self, outcome: str) -> None:
        span = self._span
        span.set_attribute("patchbay.outcome", outcome)
        if outcome not in _NOT_ERRORS:
            span.set_attribute("error.type", "tool_error" if outcome == "error" else outcome)
            span.set_status(StatusCode.ERROR)


class Tracing:
    """Starts Patchbay's spans on ``tracer``, or hands out a shared no-op while no provider is set.

    The API's no-op path still costs ~3.7 µs a span (a context attach and detach),
    and asking ``trace.get_tracer_provider()`` costs ~0.6 µs (it reads the
    environment each time), so with no ``tracer`` given the question is asked once,
    at the first span, and the answer kept. ``opentelemetry-instrument`` sets the
    provider before Patchbay starts; code that sets it later calls :meth:`refresh`.
    A ``tracer`` passed in (tests) is always used.
    """

    def __init__(self, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer
        self._active: bool | None = None if tracer is None else True

    @property
    def active(self) -> bool:
        """Whether spans are recorded by a real tracer provider."""
        if self._active is None:
            provider = trace.get_tracer_provider()
            self._active = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
        return self._active

    def refresh(self) -> None:
        """Ask again at the next span whether a tracer provider is set."""
        if self._tracer is None:
            self._active = None

    def call_span(
        self,
        tool: str,
        server: str,
        client: str,
        workflow_run: str | None = None,
        workflow_step: str | None = None,
        *,
        carrier: Mapping[str, Any] | None = None,
    ) -> Span:
        """A span around one tool call through the dispatch path.

        ``tool`` is the registry name (``<unknown>`` for a name outside it: span names must stay
        low-cardinality), ``client`` the principal's configured id, never a token. A call made by a
        workflow step names its run and step key and is an INTERNAL span under the step's; a
        client's call is a SERVER span, parented on the W3C trace context in ``carrier`` (the
        request's ``_meta``) when it has one.
        """
        if not self.active:
            return _NOOP
        attributes: dict[str, Any] = {
            "mcp.method.name": "tools/call",
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": tool,
            "patchbay.server": server,
            "patchbay.client": client,
        }
        kind = SpanKind.SERVER
        if workflow_run is not None:
            attributes["patchbay.workflow.run"] = workflow_run
            kind = SpanKind.INTERNAL
        if workflow_step is not None:
            attributes["patchbay.workflow.step"] = workflow_step
        context = _remote_parent(carrier) if kind is SpanKind.SERVER else None
        return _LiveSpan(self._tracer or tracer, f"tools/call {tool}", kind, attributes, context)

    def step_span(
        self, workflow: str, step_key: str, tool: str | None = None, *, run: str | None = None, attempt: int = 1
    ) -> Span:
        """A span around one attempt at one workflow step; its tool calls nest under it.

        ``step_key`` is the execution's key (``lines[2]/stock``): an attribute, so one ``for_each``
        item can be found, while the span name carries only the workflow name.
        """
        if not self.active:
            return _NOOP
        attributes: dict[str, Any] = {
            "patchbay.workflow.name": workflow,
            "patchbay.workflow.step": step_key,
            "patchbay.workflow.attempt": attempt,
        }
        if tool is not None:
            attributes["gen_ai.tool.name"] = tool
        if run is not None:
            attributes["patchbay.workflow.run"] = run
        return _LiveSpan(self._tracer or tracer, f"workflow.step {workflow}", SpanKind.INTERNAL, attributes, None)


def _remote_parent(carrier: Mapping[str, Any] | None) -> Context | None:
    """The client's trace context from ``_meta`` (SEP-414), or None to parent on the ambient span."""
    if not carrier or "traceparent" not in carrier:
        return None
    try:
        context = extract(carrier)
    except (TypeError, ValueError):  # a malformed carrier is the client's problem, not the call's
        return None
    # An explicit context without a valid span would orphan the span rather than nest it.
    return context if trace.get_current_span(context).get_span_context().is_valid else None


_default = Tracing()
call_span = _default.call_span
step_span = _default.step_span
refresh = _default.refresh
