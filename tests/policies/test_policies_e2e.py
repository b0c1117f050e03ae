"""The policy chain end to end: ``patchbay serve`` as a process, the testkit upstream counting what reaches it."""

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from prometheus_client.parser import text_string_to_metric_families

from policies.auth import new_token, token_hash
from policies.sessions import NOT_HERE
from tests.support import (
    TESTKIT,
    free_port,
    patchbay,
    run_gateway,
    run_http_upstream,
    stdio_server,
    text,
    upstream_events,
)

pytestmark = pytest.mark.anyio

CANARY = "CANARY-7f3a9c"


@asynccontextmanager
async def client_of(url: str, token: str | None = None, mode: str = "legacy") -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode, cache=None) as client:
            yield client


@asynccontextmanager
async def gateway_with(tmp_path: Path, sections: str, kit: str = "") -> AsyncIterator[tuple[str, Client]]:
    """``patchbay serve`` with the testkit as ``kit`` (plus ``kit`` settings) and ``sections``; a client on it."""
    server = stdio_server(TESTKIT)[:-1] + (f", {kit}" if kit else "") + "}"
    config = f"servers:\n  kit: {server}\n{sections}"
    async with run_gateway(tmp_path, config) as gw, client_of(gw.url) as client:
        yield gw.base, client


async def test_a_denied_tool_is_hidden_and_calling_it_is_refused_before_the_upstream(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    sections = (
        'policies:\n  - {id: no-recording, deny: "kit__record", reason: "recording is off today"}\n'
        f"audit: {{path: {audit}}}\n"
    )
    async with gateway_with(tmp_path, sections) as (_, client):
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert "kit__echo" in names
        assert "kit__record" not in names
        result = await client.call_tool("kit__record", {"label": "denied"})
        assert result.is_error
        assert text(result) == "kit__record is not allowed (no-recording): recording is off today."
        assert "denied" not in await upstream_events(client)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["decisions"] for r in records if r["tool"] == "kit__record"] == [["refused by no-recording (denied)"]]


async def test_invalid_arguments_list_every_violation_and_never_reach_the_upstream(tmp_path: Path) -> None:
    async with gateway_with(tmp_path, "") as (_, client):
        result = await client.call_tool("kit__record", {"seconds": "soon", "extra": 1})
        assert result.is_error
        assert text(result).startswith("Invalid arguments for kit__record (2 problems): $: 'label' is a required")
        assert "$.seconds: 'soon' is not of type 'number'" in text(result)
        assert await upstream_events(client) == []


async def test_exactly_n_of_m_rapid_calls_pass_a_limit_of_n(tmp_path: Path) -> None:
    sections = 'policies:\n  - {tools: "kit__record", rate_limit: "5/min", burst: 5}\n'
    async with gateway_with(tmp_path, sections) as (_, client):
        results: list[types.CallToolResult] = []

        async def call(n: int) -> None:
            results.append(await client.call_tool("kit__record", {"label": f"r{n}"}))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for n in range(8):
                    tg.start_soon(call, n)
        refused = [text(r) for r in results if r.is_error]
        assert len(refused) == 3
        reached = "rate limit 5/min in total (rate-kit__record-aa583d24) reached for kit__record: retry after"
        assert all(reached in r for r in refused)
        assert len([e for e in await upstream_events(client) if e.startswith("r")]) == 5


async def test_calls_over_max_concurrency_are_refused_at_once_not_queued(tmp_path: Path) -> None:
    sections = 'policies:\n  - {tools: "kit__record", max_concurrency: 2}\n'
    async with gateway_with(tmp_path, sections) as (_, client):
        results: list[tuple[float, types.CallToolResult]] = []

        async def call(n: int) -> None:
            started = anyio.current_time()
            result = await client.call_tool("kit__record", {"label": f"c{n}", "seconds": 1.0})
            results.append((anyio.current_time() - started, result))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for n in range(4):
                    tg.start_soon(call, n)
        refused = [(took, r) for took, r in results if r.is_error]
        assert len(refused) == 2
        assert all(took < 0.9 for took, _ in refused)  # refused, not queued behind the 1 s calls
        assert all("retry when one of them finishes" in text(r) for _, r in refused)


async def test_an_open_circuit_fails_fast_and_recovers_through_half_open(tmp_path: Path) -> None:
    kit = "timeout: 300ms, circuit_breaker: {failures: 2, reset_after: 1s}"
    async with gateway_with(tmp_path, "", kit) as (base, client):
        for _ in range(2):
            timed_out = await client.call_tool("kit__slow", {"seconds": 5})
            assert timed_out.is_error
        started = anyio.current_time()
        refused = await client.call_tool("kit__record", {"label": "while open"})
        assert anyio.current_time() - started < 0.25
        assert refused.is_error
        assert "circuit" in text(refused).lower()
        assert await gauge(base, "patchbay_circuit_open", server="kit") == 1
        await anyio.sleep(1.1)  # reset_after: the next call is a probe
        probe = await client.call_tool("kit__record", {"label": "probe"})
        assert not probe.is_error
        assert await gauge(base, "patchbay_circuit_open", server="kit") == 0
        assert "while open" not in await upstream_events(client)


async def test_retries_happen_only_for_idempotent_tools_and_only_for_failures_to_answer(tmp_path: Path) -> None:
    kit = 'timeout: 300ms, retry: {attempts: 3, backoff: 10ms}, tools: {idempotent: ["slow", "flaky"]}'
    async with gateway_with(tmp_path, "", kit) as (_, client):
        assert text(await client.call_tool("kit__slow", {"seconds": 5})).endswith("(gave up after 3 attempts)")
        assert (await client.call_tool("kit__record", {"label": "once", "seconds": 5})).is_error  # not idempotent
        assert (await client.call_tool("kit__flaky", {"key": "f", "failures": 1})).is_error  # its own error: answered
        events = await upstream_events(client)
        assert events.count("slow started") == 3
        assert events.count("f attempt 1") == 1
        assert "f attempt 2" not in events
        # A retry would have been made (and cancelled at its timeout) before the call returned; only the
        # cancellation of the one try may still be on its way to the upstream.
        with anyio.fail_after(5):
            while "once cancelled" not in events:
                events = await upstream_events(client)
        assert events.count("once cancelled") == 1


async def test_a_fallback_answers_when_the_server_fails(tmp_path: Path) -> None:
    kit = 'timeout: 300ms, fallback: {"slow": "spare_slow"}'
    spare = """
workflows:
  spare_slow:
    input: {type: object, properties: {seconds: {type: number}}}
    steps: [{id: answer, set: {from: spare}}]
    output: {result: "${.steps.answer.result.from}"}  # the shape of kit__slow's outputSchema
"""
    async with gateway_with(tmp_path, spare, kit) as (_, client):
        result = await client.call_tool("kit__slow", {"seconds": 5})
        assert not result.is_error
        assert result.structured_content == {"result": "spare"}
        assert result.meta is not None
        assert result.meta["io.patchbay/fallback"]["to"] == "spare_slow"
        assert "did not answer within 0.3s" in result.meta["io.patchbay/fallback"]["reason"]


async def gauge(base: str, name: str, **labels: str) -> float:
    families = await scrape(base)
    return sum(value for metric, found, value in families if metric == name and labels.items() <= found.items())


async def scrape(base: str) -> list[tuple[str, dict[str, str], float]]:
    async with httpx2.AsyncClient() as http:
        response = await http.get(f"{base}/metrics")
    assert response.status_code == 200
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]


async def test_metrics_count_every_call_once_under_its_outcome(tmp_path: Path) -> None:
    sections = 'policies:\n  - {deny: "kit__fail"}\n  - {id: whoami-rate, tools: "kit__whoami", rate_limit: "1/min"}\n'
    async with gateway_with(tmp_path, sections) as (base, client):
        for _ in range(3):
            await client.call_tool("kit__echo", {"text": "hi"})
        await client.call_tool("kit__echo", {})
        await client.call_tool("kit__fail", {"message": "x"})
        await client.call_tool("kit__whoami", {})
        await client.call_tool("kit__whoami", {})
        await client.call_tool("kit__flaky", {"key": "m", "failures": 1})
        samples = await scrape(base)

    def count(tool: str, outcome: str) -> float:
        wanted = {"tool": tool, "server": "kit", "outcome": outcome}
        return sum(v for n, labels, v in samples if n == "patchbay_tool_calls_total" and labels == wanted)

    assert count("kit__echo", "ok") == 3
    assert count("kit__echo", "invalid") == 1
    assert count("kit__fail", "denied") == 1
    assert (count("kit__whoami", "ok"), count("kit__whoami", "rate_limited")) == (1, 1)
    assert count("kit__flaky", "error") == 1
    denials = {
        (labels["policy"], labels["tool"]): v for n, labels, v in samples if n == "patchbay_policy_denials_total"
    }
    assert denials == {("deny-kit__fail-c22552be", "kit__fail"): 1, ("whoami-rate", "kit__whoami"): 1}
    limited = {labels["tool"]: v for n, labels, v in samples if n == "patchbay_rate_limited_total"}
    assert limited == {"kit__whoami": 1}
    durations = {labels["tool"]: v for n, labels, v in samples if n == "patchbay_tool_call_duration_seconds_count"}
    assert durations["kit__echo"] == 4
    assert ("patchbay_upstream_up", {"server": "kit"}, 1.0) in samples


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_clients_need_their_token_and_see_only_their_tools(tmp_path: Path, mode: str) -> None:
    token, digest = new_token()
    other, other_digest = new_token()
    sections = (
        f'clients:\n  bot: {{token_sha256: "{digest}", tools: ["kit__echo"]}}\n'
        f'  ops: {{token_sha256: "{other_digest}"}}\n'
    )
    async with run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n{sections}") as gw:
        async with httpx2.AsyncClient() as http:
            body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
            missing = await http.post(gw.url, json=body)
            wrong = await http.post(gw.url, json=body, headers={"Authorization": "Bearer pb_wrong"})
            in_query = await http.post(f"{gw.url}?access_token={token}", json=body)
        assert (missing.status_code, missing.headers["www-authenticate"]) == (401, 'Bearer realm="patchbay"')
        assert wrong.status_code == 401
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        assert in_query.status_code == 401
        async with client_of(gw.url, token, mode) as bot, client_of(gw.url, other, mode) as ops:
            assert [tool.name for tool in (await bot.list_tools()).tools] == ["kit__echo"]
            assert len((await ops.list_tools()).tools) > 1
            refused = await bot.call_tool("kit__whoami", {})
            assert refused.is_error
            assert "client 'bot' may only call kit__echo" in text(refused)
            assert text(await bot.call_tool("kit__echo", {"text": "hi"})) == "hi"


async def test_the_clients_token_is_never_forwarded_upstream(tmp_path: Path) -> None:
    token, digest = new_token()
    port = free_port()
    config = (
        f"servers:\n  kit: {{url: http://127.0.0.1:{port}/mcp, headers: {{X-Upstream-Key: kit-only}}}}\n"
        f'clients:\n  bot: {{token_sha256: "{digest}"}}\n'
    )
    async with (
        run_http_upstream(tmp_path, TESTKIT, port),
        run_gateway(tmp_path, config) as gw,
        client_of(gw.url, token) as client,
    ):
        result = await client.call_tool("kit__request_headers", {})
    assert result.structured_content is not None
    seen = {name.lower(): value for name, value in result.structured_content.items()}
    assert seen["x-upstream-key"] == "kit-only"  # the server's own configured header
    assert token not in json.dumps(seen)
    assert "authorization" not in seen


async def test_audit_records_every_call_and_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = new_token()[0] + CANARY  # a token is any string: this one carries the canary
    monkeypatch.setenv("KIT_API_KEY", CANARY)  # the environment: the gateway sends it upstream as a header
    port = free_port()
    audit = tmp_path / "audit.jsonl"
    config = (
        f"servers:\n  kit: {{url: http://127.0.0.1:{port}/mcp, headers: {{X-Api-Key: '${{KIT_API_KEY}}'}}}}\n"
        f'clients:\n  bot: {{token_sha256: "{token_hash(token)}"}}\n'
        f"audit: {{path: {audit}}}\n"
    )
    async with (
        run_http_upstream(tmp_path, TESTKIT, port),
        run_gateway(tmp_path, config) as gw,
        client_of(gw.url, token) as client,
    ):
        assert text(await client.call_tool("kit__echo", {"text": f"password={CANARY}"})) == f"password={CANARY}"
        await client.call_tool("kit__echo", {"text": f"Authorization: Bearer {CANARY}"})
        await client.call_tool("kit__record", {"label": "x", "password": CANARY})
        await client.call_tool("kit__record", {"label": 5, "token": CANARY})  # invalid: audited all the same
        seen = await client.call_tool("kit__request_headers", {})  # a result holding the env's secret
        assert seen.structured_content is not None
        assert CANARY in json.dumps(seen.structured_content)
        result = await client.call_tool("kit__echo", {"text": "plain"})
        assert not result.is_error
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert CANARY not in audit.read_text()
    assert [(r["tool"], r["outcome"], r["client"]) for r in records] == [
        ("kit__echo", "ok", "bot"),
        ("kit__echo", "ok", "bot"),
        ("kit__record", "ok", "bot"),
        ("kit__record", "invalid", "bot"),
        ("kit__request_headers", "ok", "bot"),
        ("kit__echo", "ok", "bot"),
    ]
    assert records[-1]["arguments"] == {"text": "plain"}
    assert records[-1]["result"] == {"result": "plain"}
    assert all(r["upstream"] == "kit" and r["duration_ms"] >= 0 for r in records)


def test_check_reports_a_fallback_to_a_tool_that_is_not_served(tmp_path: Path) -> None:
    path = tmp_path / "fallback.yaml"
    path.write_text(f'servers:\n  kit: {stdio_server(TESTKIT)[:-1]}, fallback: {{"slow": kit__sloth}}}}\n')
    done = patchbay("check", str(path))
    assert done.returncode == 1
    assert "servers.kit.fallback.slow (line 2): no tool 'kit__sloth' is served to fall back to" in done.stderr


def test_serve_refuses_to_listen_beyond_loopback_without_clients(tmp_path: Path) -> None:
    path = tmp_path / "open.yaml"
    path.write_text("servers: {}\n")
    done = patchbay("serve", str(path), "--host", "0.0.0.0", "--port", "1")
    assert done.returncode == 1
    assert "refusing to listen on '0.0.0.0': there is no `clients:` section" in done.stderr


def test_token_prints_a_token_and_the_hash_the_config_keeps() -> None:
    done = patchbay("token")
    assert done.returncode == 0
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines()[:2])
    token, digest = lines["token"].strip(), lines["token_sha256"].strip()
    assert token.startswith("pb_")
    assert digest == token_hash(token)


async def test_oversized_bodies_get_413_and_a_gateway_over_its_limit_429(tmp_path: Path) -> None:
    config = f"gateway: {{max_body: 1KiB, rate_limit: 2/min, burst: 2}}\nservers:\n  kit: {stdio_server(TESTKIT)}\n"
    small = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with run_gateway(tmp_path, config) as gw, httpx2.AsyncClient() as http:
        big = await http.post(gw.url, content=b"x" * 2048, headers={"content-type": "application/json"})
        second = await http.post(gw.url, json=small)
        third = await http.post(gw.url, json=small)
        health = await http.get(f"{gw.base}/healthz")
    assert big.status_code == 413
    assert second.status_code not in (413, 429)
    assert third.status_code == 429
    assert int(third.headers["retry-after"]) >= 1
    assert health.status_code == 200  # the limit covers /mcp only


async def test_workflow_runs_and_steps_are_counted(tmp_path: Path) -> None:
    workflow = """
workflows:
  twice:
    steps:
      - {id: first, call: kit__echo, with: {text: a}}
      - {id: second, call: kit__echo, with: {text: "${.steps.first.result.result}"}}
"""
    async with gateway_with(tmp_path, workflow) as (base, client):
        assert not (await client.call_tool("twice", {})).is_error
        samples = await scrape(base)
    runs = {(found["workflow"], found["outcome"]): v for n, found, v in samples if n == "patchbay_workflow_runs_total"}
    assert runs == {("twice", "succeeded"): 1}
    steps = {labels["step"]: v for n, labels, v in samples if n == "patchbay_workflow_step_duration_seconds_count"}
    assert steps == {"first": 1, "second": 1}
    calls = {(labels["tool"], labels["outcome"]): v for n, labels, v in samples if n == "patchbay_tool_calls_total"}
    assert calls[("kit__echo", "ok")] == 2  # the steps' calls pass the dispatcher too
    assert calls[("twice", "ok")] == 1


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
STREAMS = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-11-25"}


async def test_a_session_belongs_to_the_client_that_opened_it(tmp_path: Path) -> None:
    (bot, bot_digest), (ops, ops_digest) = new_token(), new_token()
    clients = f'clients:\n  bot: {{token_sha256: "{bot_digest}"}}\n  ops: {{token_sha256: "{ops_digest}"}}\n'
    async with run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n{clients}") as gw:
        async with httpx2.AsyncClient(headers=STREAMS) as http:
            opened = await http.post(gw.url, json=INITIALIZE, headers={"authorization": f"Bearer {bot}"})
            session = opened.headers["mcp-session-id"]
            ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
            as_ops = await http.post(
                gw.url, json=ping, headers={"authorization": f"Bearer {ops}", "mcp-session-id": session}
            )
            as_bot = await http.post(
                gw.url, json=ping, headers={"authorization": f"Bearer {bot}", "mcp-session-id": session}
            )
    assert as_ops.status_code == 404
    assert as_ops.json()["error"]["message"] == NOT_HERE  # as for a session that does not exist
    assert as_bot.status_code == 200


async def gauge_becomes(base: str, name: str, value: float, seconds: float, **labels: str) -> None:
    """Poll ``/metrics`` until the gauge reads ``value`` (the gateway notices a change on its own schedule)."""
    with anyio.fail_after(seconds):
        for _ in itertools.count():
            if await gauge(base, name, **labels) == value:
                return
            await anyio.sleep(0.1)


async def test_the_upstream_up_gauge_follows_the_connection(tmp_path: Path) -> None:
    port = free_port()
    config = f"servers:\n  kit: {{url: http://127.0.0.1:{port}/mcp}}\n"
    async with run_http_upstream(tmp_path, TESTKIT, port, name="first") as upstream:
        async with run_gateway(tmp_path, config) as gw, client_of(gw.url) as client:
            assert await gauge(gw.base, "patchbay_upstream_up", server="kit") == 1
            upstream.process.terminate()
            await upstream.process.wait()
            # An HTTP upstream is seen to be gone when a call to it fails (there is no heartbeat).
            assert (await client.call_tool("kit__echo", {"text": "anyone?"})).is_error
            await gauge_becomes(gw.base, "patchbay_upstream_up", 0, 10, server="kit")
            async with run_http_upstream(tmp_path, TESTKIT, port, name="second"):
                await gauge_becomes(gw.base, "patchbay_upstream_up", 1, 40, server="kit")  # backoff: 0.5 s doubling


async def test_a_cached_tool_is_answered_stale_while_its_server_is_down_and_fresh_once_it_is_back(
    tmp_path: Path,
) -> None:
    port = free_port()
    kit = f"url: http://127.0.0.1:{port}/mcp, tools: {{idempotent: [echo]}}, cache: {{tools: [echo], ttl: 10m}}"
    config = f"servers:\n  kit: {{{kit}}}\n"
    async with run_http_upstream(tmp_path, TESTKIT, port, name="first") as upstream:
        async with run_gateway(tmp_path, config) as gw, client_of(gw.url) as client:
            fresh = await client.call_tool("kit__echo", {"text": "hello"})
            assert (fresh.is_error, text(fresh), fresh.meta) == (False, "hello", None)
            upstream.process.terminate()
            await upstream.process.wait()

            stale = await client.call_tool("kit__echo", {"text": "hello"})
            assert (stale.is_error, text(stale)) == (False, "hello")
            assert stale.meta is not None
            assert 0 <= stale.meta["io.patchbay/stale"]["age"] < 30
            assert (await client.call_tool("kit__echo", {"text": "never kept"})).is_error
            assert await gauge(gw.base, "patchbay_cache_hits_total", tool="kit__echo") == 1

            async with run_http_upstream(tmp_path, TESTKIT, port, name="second"):
                await gauge_becomes(gw.base, "patchbay_upstream_up", 1, 40, server="kit")  # backoff: 0.5 s doubling
                again = await client.call_tool("kit__echo", {"text": "hello"})
                assert (again.is_error, text(again), again.meta) == (False, "hello", None)
            assert await gauge(gw.base, "patchbay_cache_hits_total", tool="kit__echo") == 1
