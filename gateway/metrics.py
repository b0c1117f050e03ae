"""Prometheus metrics: the names and labels of DESIGN §5, behind one small class.

This is the only module that imports ``prometheus_client`` (STYLE practice 14), so
the rest of the gateway speaks to :class:`Metrics` in its own words
(``call_finished``, ``upstream_up``…) and a change of metrics library touches one file.
Each :class:`Metrics` owns its ``CollectorRegistry``: tests build their own and
never see each other's counts, and nothing lands in the library's global registry.

The metric names are a contract (dashboards and alerts depend on them):

=============================================  ============================  =========
name                                           labels                        type
=============================================  ============================  =========
``patchbay_tool_calls_total``                  tool, server, outcome         counter
``patchbay_tool_call_duration_seconds``        tool, server                  histogram
``patchbay_tool_calls_in_flight``              server                        gauge
``patchbay_policy_denials_total``              policy, tool                  counter
``patchbay_rate_limited_total``                tool                          counter
``patchbay_cache_hits_total``                  tool                          counter
``patchbay_upstream_up``                       server                        gauge 0/1
``patchbay_circuit_open``                      server                        gauge 0/1
``patchbay_workflow_runs_total``               workflow, outcome             counter
``patchbay_workflow_runs_in_flight``           workflow                      gauge
``patchbay_workflow_step_duration_seconds``    workflow, step                histogram
``patchbay_audit_dropped_total``               (none)                        counter
``patchbay_shared_state_failures_total``       operation                     counter
=============================================  ============================  =========

Label values stay bounded, because every distinct value is a time series kept
in memory until the process exits:

* ``tool`` is a registry name. A name the registry does not know (a client can
  send anything) is counted as ``<unknown>``, and so is its ``server``; wire
  ``known_tools`` to the registry's membership test for this to apply. Only
  names found known are cached, so unknown names never grow the cache either.
* ``step`` is the step *id* from the workflow config (``stock``), never the
  key of one execution of it (``lines[2]/stock``): a ``for_each`` over a
  thousand lines must not make a thousand series.
* Arguments, results, client ids and tokens never appear in a label.

A call refused before it started (unknown tool, invalid arguments found before
the policy chain) goes through :meth:`Metrics.refused`: it is counted in
``patchbay_tool_calls_total`` but not in the duration histogram, whose
microsecond refusals would drown the latency of real calls. Calls a policy
refuses inside the chain go through :meth:`Metrics.call_finished` like any
other. So the histogram's ``_count`` is ``calls_total`` minus the refused ones.

The labelled children are cached in dicts keyed by their label tuple, since
``.labels(...)`` validates and locks on every call; ``call_finished`` is one
dict lookup and three updates.
"""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import disable_created_metrics as _disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = ["CALL_BUCKETS", "OUTCOMES", "STEP_BUCKETS", "UNKNOWN", "WORKFLOW_OUTCOMES", "Metrics"]

# The ``_created`` timestamp series double the series count of every counter and histogram and no
# dashboard of ours reads them. The switch is process-wide, which is fine: no other module uses the library.
_disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it unannotated

OUTCOMES = ("ok", "error", "invalid", "denied", "rate_limited", "circuit_open", "timeout", "unavailable", "cancelled")
"""The ``outcome`` label of ``patchbay_tool_calls_total`` (DESIGN §5; ``GatewayError.outcome``)."""

WORKFLOW_OUTCOMES = ("succeeded", "failed", "cancelled", "interrupted")
"""How a run ended in this process: ``interrupted`` when the gateway stopped under it (it is resumed later).
``resumed`` (:meth:`Metrics.workflow_resumed`) counts runs taken up again after an interruption."""
"""The ``outcome`` label of ``patchbay_workflow_runs_total``."""

UNKNOWN = "<unknown>"
"""The label value a tool name outside the registry is counted under."""

CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: a cached or in-process tool (1 ms) up to the longest default upstream timeout (60 s)."""

STEP_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""Seconds: steps include retries with backoff and ``ask_user`` questions a person answers, up to an hour."""

_OUTCOME_SET = frozenset(OUTCOMES)
_WORKFLOW_OUTCOME_SET = frozenset(WORKFLOW_OUTCOMES)


class Metrics:
    """The gateway's metrics, in its own registry; rendered for ``GET /metrics`` by :meth:`render`.

    ``known_tools`` answers whether a tool name is in the registry; names it
    rejects are counted as ``<unknown>``. Without it every name is taken as is,
    which is only safe when the caller has already resolved the name.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        known_tools: Callable[[str], bool] | None = None,
    ) -> None:
        if registry is None:
            registry = CollectorRegistry()
            # A registry of our own lacks the process metrics the global one has; operators expect them.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self.known_tools = known_tools
        r = registry
        # prometheus_client appends ``_total`` to counter names itself.
        self._calls = Counter(
            "patchbay_tool_calls", "Tool calls by outcome.", ("tool", "server", "outcome"), registry=r
        )
        self._duration = Histogram(
            "patchbay_tool_call_duration_seconds",
            "Dispatch to result.",
            ("tool", "server"),
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self._in_flight = Gauge("patchbay_tool_calls_in_flight", "Tool calls running.", ("server",), registry=r)
        self._denials = Counter("patchbay_policy_denials", "Calls a policy refused.", ("policy", "tool"), registry=r)
        self._rate_limited = Counter(
            "patchbay_rate_limited", "Calls over a rate or concurrency limit.", ("tool",), registry=r
        )
        self._cache_hits = Counter(
            "patchbay_cache_hits",
            "Calls answered from a server's cache while it was out of reach.",
            ("tool",),
            registry=r,
        )
        self._up = Gauge("patchbay_upstream_up", "1 while the server is connected.", ("server",), registry=r)
        self._circuit = Gauge("patchbay_circuit_open", "1 while the circuit breaker is open.", ("server",), registry=r)
        self._runs = Counter("patchbay_workflow_runs", "Finished runs.", ("workflow", "outcome"), registry=r)
        self._runs_in_flight = Gauge("patchbay_workflow_runs_in_flight", "Runs in progress.", ("workflow",), registry=r)
        self._steps = Histogram(
            "patchbay_workflow_step_duration_seconds",
            "Step time.",
            ("workflow", "step"),
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self._audit_dropped = Counter("patchbay_audit_dropped", "Audit records dropped (sink behind).", registry=r)
        self._audit_dropped_seen = 0
        self._shared_state_failures = Counter(
            "patchbay_shared_state_failures",
            "Operations on the shared state (Redis) that could not reach it.",
            ("operation",),
            registry=r,
        )
        # Caches of labelled children, keyed by the label values the caller passed (known tools only).
        self._finished: dict[tuple[str, str, str], tuple[Counter, Histogram, Gauge]] = {}
        self._started: dict[str, Gauge] = {}
        self._refused: dict[tuple[str, str, str], Counter] = {}
        self._denied: dict[tuple[str, str], Counter] = {}
        self._limited: dict[str, Counter] = {}
        self._step_children: dict[tuple[str, str], Histogram] = {}
        self._open_runs: dict[str, int] = {}

    def tool_label(self, tool: str) -> str:
        """The ``tool`` label ``tool`` is counted under: itself, or ``<unknown>`` outside the registry."""
        known = self.known_tools
        return tool if known is None or known(tool) else UNKNOWN

    # -- tool calls -------------------------------------------------------------------------------

    def call_started(self, tool: str, server: str) -> None:
        """A call entered the dispatch path: one more in flight on ``server``."""
        child = self._started.get(server)
        if child is None:
            child = self._started[server] = self._in_flight.labels(server)
        child.inc()

    def call_finished(self, tool: str, server: str, outcome: str, seconds: float) -> None:
        """A call that :meth:`call_started` reported ended with ``outcome`` after ``seconds``.

        Raises:
            ValueError: ``outcome`` is not one of :data:`OUTCOMES` (a bug in the caller).
        """
        children = self._finished.get((tool, server, outcome))
        if children is None:
            children = self._finished_children(tool, server, outcome)
        calls, duration, in_flight = children
        calls.inc()
        duration.observe(seconds)
        in_flight.dec()

    def _finished_children(self, tool: str, server: str, outcome: str) -> tuple[Counter, Histogram, Gauge]:
        _check(outcome, _OUTCOME_SET)
        label = self.tool_label(tool)
        # The in-flight child is the one call_started used: keyed by the server as passed.
        in_flight = self._started.get(server)
        if in_flight is None:
            in_flight = self._started[server] = self._in_flight.labels(server)
        if label == UNKNOWN:  # not cached: a client's made-up names must not grow the cache
            return self._calls.labels(UNKNOWN, UNKNOWN, outcome), self._duration.labels(UNKNOWN, UNKNOWN), in_flight
        children = (self._calls.labels(tool, server, outcome), self._duration.labels(tool, server), in_flight)
        self._finished[(tool, server, outcome)] = children
        return children

    def refused(self, tool: str, server: str, outcome: str) -> None:
        """A call refused before it started: counted once in ``calls_total``, no duration, never in flight.

        ``server`` may be empty when the tool did not resolve; it is counted as ``<unknown>`` then.

        Raises:
            ValueError: ``outcome`` is not one of :data:`OUTCOMES`.
        """
        child = self._refused.get((tool, server, outcome))
        if child is None:
            _check(outcome, _OUTCOME_SET)
            if self.tool_label(tool) == UNKNOWN or not server:
                self._calls.labels(UNKNOWN, UNKNOWN, outcome).inc()
                return
            child = self._refused[(tool, server, outcome)] = self._calls.labels(tool, server, outcome)
        child.inc()

    def policy_denied(self, policy: str, tool: str) -> None:
        """``policy`` (a configured policy's name, not its message) refused a call of ``tool``."""
        child = self._denied.get((policy, tool))
        if child is None:
            label = self.tool_label(tool)
            child = self._denials.labels(policy, label)
            if label != UNKNOWN:
                self._denied[(policy, tool)] = child
        child.inc()

    def rate_limited(self, tool: str) -> None:
        """A rate or concurrency limit refused a call of ``tool``."""
        child = self._limited.get(tool)
        if child is None:
            label = self.tool_label(tool)
            child = self._rate_limited.labels(label)
            if label != UNKNOWN:
                self._limited[tool] = child
        child.inc()

    def cache_hit(self, tool: str) -> None:
        """A call of ``tool`` that could not reach its server was answered from the server's ``cache:``."""
        self._cache_hits.labels(self.tool_label(tool)).inc()

    # -- upstream state ---------------------------------------------------------------------------

    def upstream_up(self, server: str, up: bool) -> None:
        """Whether ``server`` is connected (for ``/readyz`` dashboards and alerts)."""
        self._up.labels(server).set(1 if up else 0)

    def circuit_open(self, server: str, open: bool) -> None:
        """Whether ``server``'s circuit breaker is open."""
        self._circuit.labels(server).set(1 if open else 0)

    def shared_state_failure(self, operation: str) -> None:
        """An ``operation`` on the shared state (``take``, ``acquire``, ``admit``…) could not reach Redis."""
        self._shared_state_failures.labels(operation).inc()

    # -- workflows --------------------------------------------------------------------------------

    def workflow_started(self, workflow: str) -> None:
        """A run of ``workflow`` started or resumed; :meth:`workflow_run` ends it (in-flight gauge)."""
        self._open_runs[workflow] = self._open_runs.get(workflow, 0) + 1
        self._runs_in_flight.labels(workflow).inc()

    def workflow_run(self, workflow: str, outcome: str) -> None:
        """A run of ``workflow`` finished (``succeeded``, ``failed`` or ``cancelled``).

        Raises:
            ValueError: ``outcome`` is not one of :data:`WORKFLOW_OUTCOMES`.
        """
        _check(outcome, _WORKFLOW_OUTCOME_SET)
        self._runs.labels(workflow, outcome).inc()
        # Guarded so a run that never reported its start (say, one finished from the journal) cannot
        # drive the gauge below zero.
        open_runs = self._open_runs.get(workflow, 0)
        if open_runs > 0:
            self._open_runs[workflow] = open_runs - 1
            self._runs_in_flight.labels(workflow).dec()

    def workflow_resumed(self, workflow: str) -> None:
        """An interrupted run of ``workflow`` was taken up again (it then starts as any run does)."""
        self._runs.labels(workflow, "resumed").inc()

    def workflow_step(self, workflow: str, step: str, seconds: float) -> None:
        """Step ``step`` of ``workflow`` took ``seconds``. Pass the step id, not a ``for_each`` key."""
        child = self._step_children.get((workflow, step))
        if child is None:
            child = self._step_children[(workflow, step)] = self._steps.labels(workflow, step)
        child.observe(seconds)

    # -- audit and exposition ---------------------------------------------------------------------

    def audit_dropped(self, total: int) -> None:
        """The audit sink has dropped ``total`` records since it started (a running total, not a delta).

        A counter only goes up, so a total lower than the last one (a new sink) is added on top
        rather than subtracted: Prometheus' ``rate()`` then stays right.
        """
        seen = self._audit_dropped_seen
        delta = total - seen if total >= seen else total
        if delta > 0:
            self._audit_dropped.inc(delta)
        self._audit_dropped_seen = total

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The body and ``Content-Type`` of ``GET /metrics``.

        ``accept`` is the request's ``Accept`` header: Prometheus text format by default,
        OpenMetrics when the scraper asks for it.
        """
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


def _check(outcome: str, allowed: frozenset[str]) -> None:
    if outcome not in allowed:
        raise ValueError(f"unknown outcome label {outcome!r}; expected one of {sorted(allowed)}")
