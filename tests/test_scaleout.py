"""Replicas of one gateway sharing limits and circuits on Redis (``gateway.shared_state: redis://…``): built
from config, through the one dispatch path, as ``serve`` builds them; the metrics each replica shows."""

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx2
import pytest

from gateway.app import serving
from gateway.config import UpstreamConfig, parse_config
from gateway.errors import UpstreamUnavailable
from gateway.gateway import Gateway, open_gateway
from gateway.types import CallContext, JSONObject, Principal, Provider, ToolResult
from policies.sessions import NOT_HERE
from tests.inprocess import serve_asgi
from tests.redis_support import REDIS, forget, private_redis, require_redis
from tests.test_app import BOTH, INITIALIZE
from tests.test_gateway import Toolbox

pytestmark = pytest.mark.anyio

CALLER = CallContext(principal=Principal("alice"))


class Failing(Toolbox):
    """The one upstream both replicas call; ``failing`` makes its calls fail as a dead server's would."""

    failing = False

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        if Failing.failing:
            raise UpstreamUnavailable("connection refused", server=self.name)
        return await super().call_tool(name, arguments, context)


def config_text(name: str, url: str = REDIS, extra: str = "") -> str:
    return f"""
gateway: {{name: {name}, shared_state: '{url}'{extra}}}
servers:
  crm:
    command: [unused]
    circuit_breaker: {{failures: 2, reset_after: 60s}}
policies:
  - {{id: add-rate, tools: "crm__add", rate_limit: 4/h, burst: 4, per: global}}
"""


@contextlib.asynccontextmanager
async def replicas(text: str, count: int = 2) -> AsyncIterator[list[Gateway]]:
    config = parse_config(text, environ={})

    def factory(name: str, entry: UpstreamConfig) -> Provider:
        return Failing(name)

    kinds = dict.fromkeys(("stdio", "http", "rest"), factory)
    async with contextlib.AsyncExitStack() as stack:
        # (no fail_after around the opening: the gateways' task groups must not outlive a scope they began in)
        yield [await stack.enter_async_context(open_gateway(config, kinds=kinds)) for _ in range(count)]


@pytest.fixture
async def name() -> AsyncIterator[str]:
    require_redis()
    name = f"scaleout-{uuid.uuid4().hex[:8]}"
    Failing.failing = False
    yield name
    Failing.failing = False
    await forget(f"patchbay:{name}:")


async def outcomes(gateway: Gateway, tool: str, times: int) -> list[str]:
    arguments: JSONObject = {"a": 1, "b": 2} if tool == "crm__add" else {"text": "hi"}
    return [(await gateway.dispatcher.invoke(tool, arguments, CALLER)).outcome for _ in range(times)]


async def test_a_rate_limit_is_exact_across_replicas(name: str) -> None:
    async with replicas(config_text(name)) as (first, second):
        seen = [*await outcomes(first, "crm__add", 3), *await outcomes(second, "crm__add", 3)]
    assert seen == ["ok"] * 4 + ["rate_limited"] * 2


async def test_a_circuit_opened_through_one_replica_is_open_on_the_other_and_in_both_metrics(name: str) -> None:
    async with replicas(config_text(name)) as (first, second):
        Failing.failing = True
        assert await outcomes(first, "crm__echo", 2) == ["unavailable", "unavailable"]
        Failing.failing = False
        refused = await second.dispatcher.invoke("crm__echo", {"text": "hi"}, CALLER)
        for gateway in (first, second):
            await gateway.refresh_circuits()  # what /metrics does before it answers
        gauges = [
            gateway.metrics.registry.get_sample_value("patchbay_circuit_open", {"server": "crm"})
            for gateway in (first, second)
        ]
    assert refused.outcome == "circuit_open"
    assert "2 consecutive failures, the last: connection refused" in str(refused.result.content)
    assert gauges == [1.0, 1.0]


@pytest.mark.parametrize("failure", ["allow", "deny"])
async def test_redis_stopping_and_coming_back_under_each_failure_setting(
    name: str, tmp_path: Path, failure: str
) -> None:
    with private_redis(tmp_path) as server:
        text = config_text(name, server.url, f", shared_state_failure: {failure}")
        async with replicas(text, count=1) as (gateway,):
            before = await outcomes(gateway, "crm__add", 5)
            server.stop()
            away = await outcomes(gateway, "crm__add", 3)
            server.start()
            await anyio.sleep(0.6)  # past the half second Redis is left alone after a failure
            back = await outcomes(gateway, "crm__add", 5)
            failures = gateway.metrics.registry.get_sample_value(
                "patchbay_shared_state_failures_total", {"operation": "take"}
            )
    assert before == ["ok"] * 4 + ["rate_limited"]
    assert away == (["ok"] * 3 if failure == "allow" else ["unavailable"] * 3)
    assert back == ["ok"] * 4 + ["rate_limited"]  # the new Redis kept nothing: a full bucket, limited again
    assert failures == 3


async def test_a_session_used_at_another_replica_gets_a_clear_404_and_stays_usable_where_it_lives() -> None:
    config = parse_config("gateway: {name: sticky}", environ={})
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for _ in range(2):
            app = await stack.enter_async_context(serving(config, providers=[Toolbox()]))
            urls.append(f"{await stack.enter_async_context(serve_asgi(app, lifespan='off'))}/mcp")
        http = await stack.enter_async_context(httpx2.AsyncClient(headers=BOTH))
        opened = await http.post(urls[0], json=INITIALIZE)
        session = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
        await http.post(urls[0], json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        elsewhere = await http.post(urls[1], json=ping, headers=session)
        at_home = await http.post(urls[0], json=ping, headers=session)
    assert elsewhere.status_code == 404
    assert elsewhere.json()["error"]["message"] == NOT_HERE
    assert "another replica" in NOT_HERE
    assert "mcp-session-id" not in elsewhere.headers  # no session of the other replica's is handed out
    assert at_home.status_code == 200
