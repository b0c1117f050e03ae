"""The metrics of DESIGN §5 as a scraper sees them: exact names, labels and values of ``render()``."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import CALL_BUCKETS, OUTCOMES, UNKNOWN, Metrics

KNOWN = {"files__read", "db__query"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics, prefix: str = "patchbay_") -> Samples:
    body, _ = metrics.render()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name.startswith(prefix)
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(known_tools=KNOWN.__contains__)


def test_every_outcome_is_counted_once_with_its_duration(metrics: Metrics) -> None:
    for outcome in OUTCOMES:
        metrics.call_started("files__read", "files")
        metrics.call_finished("files__read", "files", outcome, 0.02)

    samples = scrape(metrics)
    for outcome in OUTCOMES:
        assert samples[key("patchbay_tool_calls_total", tool="files__read", server="files", outcome=outcome)] == 1
    hist = {"tool": "files__read", "server": "files"}
    assert samples[key("patchbay_tool_call_duration_seconds_count", **hist)] == len(OUTCOMES)
    assert samples[key("patchbay_tool_call_duration_seconds_sum", **hist)] == pytest.approx(0.02 * len(OUTCOMES))
    assert samples[key("patchbay_tool_call_duration_seconds_bucket", le="0.01", **hist)] == 0
    assert samples[key("patchbay_tool_call_duration_seconds_bucket", le="0.025", **hist)] == len(OUTCOMES)
    assert samples[key("patchbay_tool_calls_in_flight", server="files")] == 0


def test_duration_buckets_span_a_millisecond_to_a_minute(metrics: Metrics) -> None:
    metrics.call_started("db__query", "db")
    metrics.call_finished("db__query", "db", "ok", 0.0005)

    bounds = {
        dict(labels)["le"] for name, labels in scrape(metrics) if name == "patchbay_tool_call_duration_seconds_bucket"
    }
    assert bounds == {str(b) for b in CALL_BUCKETS} | {"+Inf"}
    assert min(CALL_BUCKETS) == 0.001
    assert max(CALL_BUCKETS) == 60.0


def test_in_flight_goes_up_per_started_call_and_down_per_finished_one(metrics: Metrics) -> None:
    metrics.call_started("files__read", "files")
    metrics.call_started("files__read", "files")
    metrics.call_started("db__query", "db")
    assert scrape(metrics)[key("patchbay_tool_calls_in_flight", server="files")] == 2
    assert scrape(metrics)[key("patchbay_tool_calls_in_flight", server="db")] == 1

    metrics.call_finished("files__read", "files", "ok", 0.1)
    metrics.call_finished("db__query", "db", "timeout", 30.0)
    samples = scrape(metrics)
    assert samples[key("patchbay_tool_calls_in_flight", server="files")] == 1
    assert samples[key("patchbay_tool_calls_in_flight", server="db")] == 0


def test_a_refused_call_is_counted_once_without_duration_or_in_flight(metrics: Metrics) -> None:
    metrics.refused("files__read", "files", "invalid")

    samples = scrape(metrics)
    assert samples[key("patchbay_tool_calls_total", tool="files__read", server="files", outcome="invalid")] == 1
    assert not any(name.startswith("patchbay_tool_call_duration_seconds") for name, _ in samples)
    assert not any(name == "patchbay_tool_calls_in_flight" for name, _ in samples)


def test_unknown_tool_names_from_clients_share_one_label(metrics: Metrics) -> None:
    for name in ("nope", "'; DROP TABLE", "x" * 500):
        metrics.refused(name, "", "invalid")
    metrics.call_started("made_up", "files")
    metrics.call_finished("made_up", "files", "unavailable", 0.01)
    metrics.policy_denied("allowlist", "ghost")
    metrics.rate_limited("ghost")
    metrics.cache_hit("ghost")

    samples = scrape(metrics)
    calls = {labels for name, labels in samples if name == "patchbay_tool_calls_total"}
    assert calls == {
        frozenset({("tool", UNKNOWN), ("server", UNKNOWN), ("outcome", "invalid")}),
        frozenset({("tool", UNKNOWN), ("server", UNKNOWN), ("outcome", "unavailable")}),
    }
    assert samples[key("patchbay_tool_calls_total", tool=UNKNOWN, server=UNKNOWN, outcome="invalid")] == 3
    assert samples[key("patchbay_policy_denials_total", policy="allowlist", tool=UNKNOWN)] == 1
    assert samples[key("patchbay_rate_limited_total", tool=UNKNOWN)] == 1
    assert samples[key("patchbay_cache_hits_total", tool=UNKNOWN)] == 1
    assert samples[key("patchbay_tool_calls_in_flight", server="files")] == 0


def test_without_a_membership_test_every_name_is_taken_as_is() -> None:
    metrics = Metrics()
    metrics.refused("anything", "svc", "invalid")
    assert metrics.tool_label("anything") == "anything"
    assert scrape(metrics)[key("patchbay_tool_calls_total", tool="anything", server="svc", outcome="invalid")] == 1


@pytest.mark.parametrize("outcome", ["OK", "canceled", "denied_by_policy", ""])
def test_an_outcome_outside_the_contract_is_a_bug(metrics: Metrics, outcome: str) -> None:
    metrics.call_started("files__read", "files")
    with pytest.raises(ValueError, match="outcome"):
        metrics.call_finished("files__read", "files", outcome, 0.1)
    with pytest.raises(ValueError, match="outcome"):
        metrics.refused("files__read", "files", outcome)


def test_policy_denials_and_rate_limits_are_counted_by_policy_and_tool(metrics: Metrics) -> None:
    metrics.policy_denied("allowlist", "db__query")
    metrics.policy_denied("allowlist", "db__query")
    metrics.policy_denied("auth", "files__read")
    metrics.rate_limited("db__query")

    samples = scrape(metrics)
    assert samples[key("patchbay_policy_denials_total", policy="allowlist", tool="db__query")] == 2
    assert samples[key("patchbay_policy_denials_total", policy="auth", tool="files__read")] == 1
    assert samples[key("patchbay_rate_limited_total", tool="db__query")] == 1


def test_upstream_and_circuit_gauges_follow_the_latest_state(metrics: Metrics) -> None:
    metrics.upstream_up("files", True)
    metrics.upstream_up("db", True)
    metrics.upstream_up("db", False)
    metrics.circuit_open("db", True)
    metrics.circuit_open("db", False)
    metrics.circuit_open("files", True)

    samples = scrape(metrics)
    assert samples[key("patchbay_upstream_up", server="files")] == 1
    assert samples[key("patchbay_upstream_up", server="db")] == 0
    assert samples[key("patchbay_circuit_open", server="db")] == 0
    assert samples[key("patchbay_circuit_open", server="files")] == 1


def test_workflow_runs_are_counted_by_outcome_and_tracked_in_flight(metrics: Metrics) -> None:
    for _ in range(3):
        metrics.workflow_started("restock")
    metrics.workflow_run("restock", "succeeded")
    metrics.workflow_run("restock", "failed")

    samples = scrape(metrics)
    assert samples[key("patchbay_workflow_runs_total", workflow="restock", outcome="succeeded")] == 1
    assert samples[key("patchbay_workflow_runs_total", workflow="restock", outcome="failed")] == 1
    assert samples[key("patchbay_workflow_runs_in_flight", workflow="restock")] == 1

    with pytest.raises(ValueError, match="outcome"):
        metrics.workflow_run("restock", "ok")


def test_a_run_finished_without_a_start_never_drives_in_flight_negative(metrics: Metrics) -> None:
    metrics.workflow_run("restock", "cancelled")
    metrics.workflow_run("restock", "cancelled")

    samples = scrape(metrics)
    assert samples[key("patchbay_workflow_runs_total", workflow="restock", outcome="cancelled")] == 2
    assert samples.get(key("patchbay_workflow_runs_in_flight", workflow="restock"), 0) == 0


def test_workflow_step_durations_are_kept_per_step_id(metrics: Metrics) -> None:
    metrics.workflow_step("restock", "stock", 0.2)
    metrics.workflow_step("restock", "stock", 0.3)
    metrics.workflow_step("restock", "approve", 120.0)

    samples = scrape(metrics)
    assert samples[key("patchbay_workflow_step_duration_seconds_count", workflow="restock", step="stock")] == 2
    assert samples[key("patchbay_workflow_step_duration_seconds_sum", workflow="restock", step="stock")] == 0.5
    approve = {"workflow": "restock", "step": "approve"}
    assert samples[key("patchbay_workflow_step_duration_seconds_bucket", le="60.0", **approve)] == 0
    assert samples[key("patchbay_workflow_step_duration_seconds_bucket", le="300.0", **approve)] == 1


def test_audit_drops_follow_the_sinks_running_total(metrics: Metrics) -> None:
    assert scrape(metrics)[key("patchbay_audit_dropped_total")] == 0
    metrics.audit_dropped(3)
    metrics.audit_dropped(5)
    metrics.audit_dropped(5)
    assert scrape(metrics)[key("patchbay_audit_dropped_total")] == 5
    metrics.audit_dropped(2)  # a new sink counts from zero: the counter still only goes up
    assert scrape(metrics)[key("patchbay_audit_dropped_total")] == 7


def test_only_the_contract_names_are_exposed_and_no_created_series(metrics: Metrics) -> None:
    metrics.call_started("files__read", "files")
    metrics.call_finished("files__read", "files", "ok", 0.1)
    metrics.refused("files__read", "files", "denied")
    metrics.policy_denied("allowlist", "files__read")
    metrics.rate_limited("files__read")
    metrics.cache_hit("files__read")
    metrics.upstream_up("files", True)
    metrics.circuit_open("files", False)
    metrics.workflow_started("restock")
    metrics.workflow_run("restock", "succeeded")
    metrics.workflow_step("restock", "stock", 0.1)
    metrics.audit_dropped(1)

    body, _ = metrics.render()
    families = {f.name: f.type for f in text_string_to_metric_families(body.decode()) if f.name.startswith("patchbay")}
    assert families == {
        "patchbay_tool_calls": "counter",
        "patchbay_tool_call_duration_seconds": "histogram",
        "patchbay_tool_calls_in_flight": "gauge",
        "patchbay_policy_denials": "counter",
        "patchbay_rate_limited": "counter",
        "patchbay_cache_hits": "counter",
        "patchbay_upstream_up": "gauge",
        "patchbay_circuit_open": "gauge",
        "patchbay_workflow_runs": "counter",
        "patchbay_workflow_runs_in_flight": "gauge",
        "patchbay_workflow_step_duration_seconds": "histogram",
        "patchbay_audit_dropped": "counter",
        "patchbay_shared_state_failures": "counter",
    }
    assert b"_created" not in body
    for name, _ in scrape(metrics):
        if name.endswith("_total"):
            assert name.removesuffix("_total") in families


def test_render_speaks_prometheus_text_and_openmetrics_on_request(metrics: Metrics) -> None:
    _, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")

    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_each_instance_has_its_own_registry_with_process_metrics() -> None:
    first, second = Metrics(), Metrics()
    first.rate_limited("files__read")

    assert scrape(first)[key("patchbay_rate_limited_total", tool="files__read")] == 1
    assert key("patchbay_rate_limited_total", tool="files__read") not in scrape(second)
    assert any(name == "python_info" for name, _ in scrape(second, prefix="python_"))
