"""Workflow calls on the Temporal engine (``gateway.engine: temporal://…``), through whole gateways built from
config: two replicas on one dev server, each running workers; the calls go through each replica's dispatch."""

import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.config import parse_config
from gateway.errors import EngineUnavailable
from gateway.gateway import Gateway, open_gateway
from gateway.types import RUN_META_KEY, CallContext, JSONObject, Principal, ToolResult
from gateway.workflows.runner import IDEMPOTENCY_META_KEY
from tests import temporal_server as dev_server
from tests.support import free_port
from tests.test_gateway import Toolbox

pytestmark = pytest.mark.anyio

temporal_server = dev_server.temporal_server  # the fixture: pytest finds it here

CALLER = CallContext(principal=Principal("alice"))
WORKFLOWS = """
workflows:
  total:
    steps:
      - {id: one, call: box__add, with: {a: 1, b: 2}, compensate: {call: box__echo, with: {text: undo one}}}
      - {id: two, call: box__add, with: {a: '${.steps.one.result.sum}', b: 10}}
      - id: check
        switch:
          - when: .input.fail == true
            steps: [{id: stop, fail: "asked to fail"}]
        after: [two]
    input: {type: object, properties: {fail: {type: boolean}}}
    output: {total: '${.steps.two.result.sum}'}
"""


class Shared(Toolbox):
    """The one upstream every replica calls: its calls are recorded in one list."""

    record: list[tuple[str, JSONObject]] = []

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        Shared.record.append((name, dict(arguments)))
        return await super().call_tool(name, arguments, context)


def config_text(address: str, queue: str, extra: str = "") -> str:
    return (
        f"gateway: {{name: t, engine: 'temporal://{address}', temporal: {{task_queue: {queue}}}}}\n{extra}{WORKFLOWS}"
    )


@contextlib.asynccontextmanager
async def replicas(text: str, count: int = 2) -> AsyncIterator[list[Gateway]]:
    config = parse_config(text, environ={})
    Shared.record = []
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_gateway(config, providers=[Shared()])) for _ in range(count)]


@pytest.fixture
def queue() -> str:
    return f"patchbay-test-{uuid.uuid4().hex[:8]}"


def keyed(key: str) -> CallContext:
    return CallContext(principal=CALLER.principal, meta={IDEMPOTENCY_META_KEY: key})


async def test_a_workflow_call_on_temporal_gives_what_the_local_engine_gives(
    temporal_server: dev_server.DevServer, queue: str
) -> None:
    async with replicas(config_text(temporal_server.address, queue)) as (first, second):
        on_temporal = await first.dispatcher.call("total", {}, CALLER)
        calls = list(Shared.record)
    async with replicas(f"gateway: {{name: t}}\n{WORKFLOWS}", count=1) as (local,):
        locally = await local.dispatcher.call("total", {}, CALLER)
    assert on_temporal.structured_content == locally.structured_content == {"total": 13}
    assert calls == Shared.record == [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 10})]
    assert (on_temporal.meta or {})[RUN_META_KEY]


async def test_a_keyed_call_reissued_at_another_replica_gets_the_same_run_and_result(
    temporal_server: dev_server.DevServer, queue: str
) -> None:
    async with replicas(config_text(temporal_server.address, queue)) as (first, second):
        at_first = await first.dispatcher.call("total", {}, keyed("k-1"))
        at_second = await second.dispatcher.call("total", {}, keyed("k-1"))
        other_key = await second.dispatcher.call("total", {}, keyed("k-2"))
    run = (at_first.meta or {})[RUN_META_KEY]
    assert (at_second.meta or {})[RUN_META_KEY] == run
    assert (other_key.meta or {})[RUN_META_KEY] != run
    assert at_second.structured_content == at_first.structured_content == {"total": 13}
    assert len(Shared.record) == 4  # two runs, not three


async def test_a_failed_run_on_temporal_is_compensated_and_says_which_step_failed(
    temporal_server: dev_server.DevServer, queue: str
) -> None:
    async with replicas(config_text(temporal_server.address, queue)) as (first, _):
        failed = await first.dispatcher.call("total", {"fail": True}, CALLER)
    assert failed.is_error
    text = failed.content[0]["text"]
    assert "workflow 'total' failed" in text
    assert "asked to fail" in text
    assert Shared.record[-1] == ("echo", {"text": "undo one"})


async def test_steps_on_temporal_pass_the_policy_chain_of_the_replica_making_them(
    temporal_server: dev_server.DevServer, queue: str
) -> None:
    deny = 'policies:\n  - {id: no-adding, deny: "box__add", reason: "no sums today"}\n'
    async with replicas(config_text(temporal_server.address, queue, deny)) as replicas_:
        refused = await replicas_[0].dispatcher.call("total", {}, CALLER)
        denials = sum(
            gateway.metrics.registry.get_sample_value(
                "patchbay_policy_denials_total", {"policy": "no-adding", "tool": "box__add"}
            )
            or 0
            for gateway in replicas_
        )
    assert refused.is_error
    assert "no sums today" in refused.content[0]["text"]
    assert Shared.record == []
    assert denials == 1


async def test_a_temporal_that_cannot_be_reached_stops_the_gateway_from_starting(queue: str) -> None:
    config = parse_config(config_text(f"127.0.0.1:{free_port()}", queue), environ={})
    with pytest.raises(EngineUnavailable, match="cannot reach Temporal at 127.0.0.1"):
        async with open_gateway(config):
            pytest.fail("the gateway started")
