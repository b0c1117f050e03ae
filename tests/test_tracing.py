"""Spans per call and per workflow step, recorded by an in-process tracer built on the OpenTelemetry API.

The OpenTelemetry SDK is not a dependency, so a small recording tracer stands in for it: it
implements the API's ``Tracer`` and ``Span`` and makes spans current with the API's own ``use_span``,
which is all the SDK adds that these tests look at (parenting, attributes, status, end).
"""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from gateway import tracing
from gateway.metrics import OUTCOMES
from gateway.tracing import Tracing

CLIENT_TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CARRIER = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


class RecordedSpan(trace.Span):
    def __init__(self, name: str, kind: SpanKind, attributes: Mapping[str, Any], parent: SpanContext | None) -> None:
        self.name = name
        self.kind = kind
        self.attributes = dict(attributes)
        self.parent = parent
        self.status = Status(StatusCode.UNSET)
        self.ended = False
        self.events: list[str] = []
        trace_id = parent.trace_id if parent is not None else 1
        self._context = SpanContext(trace_id, id(self) & 0xFFFFFFFFFFFFFFFF, False, TraceFlags(1))

    def end(self, end_time: int | None = None) -> None:
        self.ended = True

    def get_span_context(self) -> SpanContext:
        return self._context

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.attributes.update(attributes)

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        self.events.append(name)

    def update_name(self, name: str) -> None:
        self.name = name

    def is_recording(self) -> bool:
        return not self.ended

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        self.status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self, exception: BaseException, attributes: Any = None, timestamp: Any = None, escaped: bool = False
    ) -> None:
        self.events.append("exception")


class RecordingTracer(trace.Tracer):
    def __init__(self) -> None:
        self.spans: list[RecordedSpan] = []

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> RecordedSpan:
        parent = trace.get_current_span(context).get_span_context()
        span = RecordedSpan(name, kind, attributes or {}, parent if parent.is_valid else None)
        self.spans.append(span)
        return span

    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes)
        with trace.use_span(span, end_on_exit, record_exception, set_status_on_exception) as current:
            yield current


@pytest.fixture
def recorder() -> RecordingTracer:
    return RecordingTracer()


@pytest.fixture
def spans(recorder: RecordingTracer) -> Tracing:
    return Tracing(recorder)


def test_without_a_tracer_provider_spans_are_a_shared_no_op() -> None:
    assert not tracing.Tracing().active
    first = tracing.call_span("files__read", "files", "alice")
    second = tracing.step_span("restock", "lines[2]/stock", "db__query", run="r1")
    assert first is second
    for outcome in (*OUTCOMES, "succeeded", "failed", "skipped", "cancelled"):
        with first as span:
            span.set_outcome(outcome)


def test_the_no_op_span_lets_exceptions_through() -> None:
    with pytest.raises(KeyError), tracing.call_span("files__read", "files", "alice"):
        raise KeyError("boom")


def test_refresh_asks_again_and_still_finds_no_provider() -> None:
    spans = Tracing()
    assert not spans.active
    spans.refresh()
    assert not spans.active


def test_a_client_call_is_a_server_span_named_after_the_tool(spans: Tracing, recorder: RecordingTracer) -> None:
    with spans.call_span("files__read", "files", "alice") as span:
        span.set_outcome("ok")

    (recorded,) = recorder.spans
    assert recorded.name == "tools/call files__read"
    assert recorded.kind is SpanKind.SERVER
    assert recorded.ended
    assert recorded.status.status_code is StatusCode.UNSET
    assert recorded.attributes == {
        "mcp.method.name": "tools/call",
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "files__read",
        "patchbay.server": "files",
        "patchbay.client": "alice",
        "patchbay.outcome": "ok",
    }


@pytest.mark.parametrize(
    ("outcome", "error_type"),
    [(o, "tool_error" if o == "error" else o) for o in OUTCOMES if o not in ("ok", "cancelled")],
)
def test_every_outcome_but_ok_and_cancelled_marks_the_span_as_an_error(
    spans: Tracing, recorder: RecordingTracer, outcome: str, error_type: str
) -> None:
    with spans.call_span("files__read", "files", "alice") as span:
        span.set_outcome(outcome)

    (recorded,) = recorder.spans
    assert recorded.status.status_code is StatusCode.ERROR
    assert recorded.attributes["error.type"] == error_type
    assert recorded.attributes["patchbay.outcome"] == outcome


def test_a_client_call_continues_the_clients_trace(spans: Tracing, recorder: RecordingTracer) -> None:
    with spans.call_span("files__read", "files", "alice", carrier={**CARRIER, "other": "x"}):
        pass

    (recorded,) = recorder.spans
    assert recorded.parent is not None
    assert recorded.parent.trace_id == CLIENT_TRACE_ID
    assert recorded.parent.is_remote


@pytest.mark.parametrize("carrier", [None, {}, {"traceparent": "not a traceparent"}, {"traceparent": 42}])
def test_a_missing_or_malformed_trace_context_parents_on_the_ambient_span(
    spans: Tracing, recorder: RecordingTracer, carrier: Mapping[str, Any] | None
) -> None:
    with spans.step_span("restock", "stock"), spans.call_span("files__read", "files", "alice", carrier=carrier):
        pass

    step, call = recorder.spans
    assert call.parent == step.get_span_context()


def test_a_step_call_nests_under_its_step_span(spans: Tracing, recorder: RecordingTracer) -> None:
    with spans.step_span("restock", "lines[2]/stock", "db__query", run="r1", attempt=2) as step:
        with spans.call_span("db__query", "db", "workflow", workflow_run="r1", workflow_step="lines[2]/stock") as call:
            call.set_outcome("ok")
        step.set_outcome("succeeded")

    step_span, call_span = recorder.spans
    assert step_span.name == "workflow.step restock"
    assert step_span.kind is SpanKind.INTERNAL
    assert step_span.status.status_code is StatusCode.UNSET
    assert step_span.attributes == {
        "patchbay.workflow.name": "restock",
        "patchbay.workflow.step": "lines[2]/stock",
        "patchbay.workflow.attempt": 2,
        "gen_ai.tool.name": "db__query",
        "patchbay.workflow.run": "r1",
        "patchbay.outcome": "succeeded",
    }
    assert call_span.kind is SpanKind.INTERNAL
    assert call_span.parent == step_span.get_span_context()
    assert call_span.attributes["patchbay.workflow.run"] == "r1"
    assert call_span.attributes["patchbay.workflow.step"] == "lines[2]/stock"


def test_a_step_call_ignores_a_carrier_and_keeps_its_step_parent(spans: Tracing, recorder: RecordingTracer) -> None:
    with spans.step_span("restock", "stock"):
        with spans.call_span("db__query", "db", "workflow", workflow_run="r1", carrier=CARRIER):
            pass

    step, call = recorder.spans
    assert call.parent == step.get_span_context()


@pytest.mark.parametrize(("status", "is_error"), [("failed", True), ("skipped", False), ("cancelled", False)])
def test_only_a_failed_step_is_an_error(spans: Tracing, recorder: RecordingTracer, status: str, is_error: bool) -> None:
    with spans.step_span("restock", "stock") as step:
        step.set_outcome(status)

    (recorded,) = recorder.spans
    assert (recorded.status.status_code is StatusCode.ERROR) is is_error


def test_an_escaping_exception_is_recorded_by_type_not_message(spans: Tracing, recorder: RecordingTracer) -> None:
    with pytest.raises(KeyError), spans.call_span("files__read", "files", "alice"):
        raise KeyError("secret-argument-value")

    (recorded,) = recorder.spans
    assert recorded.ended
    assert recorded.status.status_code is StatusCode.ERROR
    assert not recorded.status.description
    assert recorded.attributes["error.type"] == "KeyError"
    assert recorded.events == []
    assert "secret-argument-value" not in repr(recorded.attributes)


def test_the_span_is_current_inside_the_block_and_not_after(spans: Tracing, recorder: RecordingTracer) -> None:
    with spans.call_span("files__read", "files", "alice"):
        inside = trace.get_current_span()
    assert inside is recorder.spans[0]
    assert trace.get_current_span() is not inside
