"""MCP tasks of workflows that run on Temporal, in both eras: two replicas on one dev server, a task started at
one and read, awaited and cancelled at the other, as a client behind a load balancer would (the SDK's client,
in-process, against each replica's frontend). The workflow holds in the upstream's ``hold`` until the test
releases it, so a task is seen working without racing the clock."""

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client

from gateway.config import parse_config
from gateway.gateway import Gateway, open_gateway
from gateway.server import McpFrontend
from gateway.tasks import RELATED_TASK_META_KEY
from gateway.types import CallContext, JSONObject, Principal, Tool, ToolResult
from gateway.workflows.runner import IDEMPOTENCY_META_KEY
from tests import temporal_server as dev_server
from tests.taskclient import client, rpc, rpc_error, start_task
from tests.test_gateway import TEXT, Toolbox

pytestmark = pytest.mark.anyio

temporal_server = dev_server.temporal_server  # the fixture: pytest finds it here

ERAS = ["legacy", "2026-07-28"]
ALICE = Principal("alice")
BOB = Principal("bob")
WITHIN = 30.0
"""Seconds any one exchange may take (a cancellation reaches a step at its next heartbeat, each second)."""
WORKFLOWS = """
workflows:
  held:
    steps:
      - {id: one, call: box__echo, with: {text: did one}, compensate: {call: box__echo, with: {text: undid one}}}
      - {id: hold, call: box__hold, with: {text: held}, after: [one]}
    output: {held: '${.steps.hold.result}'}
"""


class Holding(Toolbox):
    """The upstream of every replica (one process): ``echo`` and ``add``, and ``hold``, which waits for
    :attr:`release`. What is called is recorded in one list, whichever replica calls it."""

    record: list[str] = []
    waiting = anyio.Event()
    release = anyio.Event()

    def __init__(self) -> None:
        super().__init__()
        hold = Tool("hold", {"name": "hold", "inputSchema": TEXT})
        self.listing = type(self.listing)(tools=(*self.listing.tools, hold), prompts=self.listing.prompts)

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        Holding.record.append(str(arguments.get("text")))
        if name == "hold":
            Holding.waiting.set()
            await Holding.release.wait()
            return ToolResult.text("released")
        return await super().call_tool(name, arguments, context)


@contextlib.asynccontextmanager
async def replicas(address: str) -> AsyncIterator[tuple[Gateway, Gateway]]:
    queue = f"patchbay-test-{uuid.uuid4().hex[:8]}"
    text = f"gateway: {{name: t, engine: 'temporal://{address}', temporal: {{task_queue: {queue}}}}}\n{WORKFLOWS}"
    config = parse_config(text, environ={})
    Holding.record, Holding.waiting, Holding.release = [], anyio.Event(), anyio.Event()
    with anyio.fail_after(WITHIN * 2):
        async with open_gateway(config, providers=[Holding()]) as a, open_gateway(config, providers=[Holding()]) as b:
            try:
                yield a, b
            finally:
                Holding.release.set()  # runs still held end (not left running in Temporal)


@contextlib.asynccontextmanager
async def clients(a: Gateway, b: Gateway, mode: str, who: Principal = ALICE) -> AsyncIterator[tuple[Client, Client]]:
    """``who``'s client of each replica."""
    async with client(McpFrontend(a, who), mode) as at_a, client(McpFrontend(b, who), mode) as at_b:
        yield at_a, at_b


async def until_held() -> None:
    with anyio.fail_after(WITHIN):
        await Holding.waiting.wait()


async def until_ended(at: Client, task_id: str) -> dict[str, Any]:
    with anyio.fail_after(WITHIN):
        while (task := await rpc(at, "tasks/get", taskId=task_id))["status"] == "working":  # noqa: ASYNC110
            await anyio.sleep(0.05)  # polling is how a client learns a task ended
    return task


@pytest.mark.parametrize("mode", ERAS)
async def test_a_task_started_at_one_replica_is_read_and_its_result_fetched_at_the_other(
    temporal_server: dev_server.DevServer, mode: str
) -> None:
    async with replicas(temporal_server.address) as (a, b), clients(a, b, mode) as (at_a, at_b):
        task = await start_task(at_a, "held", {}, ttl=60000)
        assert task["status"] == "working"
        await until_held()
        polled = await rpc(at_b, "tasks/get", taskId=task["taskId"])
        assert (polled["status"], polled["createdAt"]) == ("working", task["createdAt"])
        Holding.release.set()
        if mode == "legacy":
            result = await rpc(at_b, "tasks/result", taskId=task["taskId"])  # waits for the run's end
            assert result["_meta"][RELATED_TASK_META_KEY] == {"taskId": task["taskId"]}
            assert (await rpc(at_b, "tasks/get", taskId=task["taskId"]))["status"] == "completed"
        else:
            ended = await until_ended(at_b, task["taskId"])
            assert ended["status"] == "completed"
            result = ended["result"]  # the extension inlines it
        assert result["structuredContent"] == {"held": "released"}
        assert not result["isError"]
        assert Holding.record == ["did one", "held"]
        with anyio.fail_after(WITHIN):  # counted at the replica that started it, as a call's run is
            while (ended := ran(a, "held", "succeeded")) == 0:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert (ended, ran(b, "held", "succeeded")) == (1, 0)


def ran(gateway: Gateway, workflow: str, status: str) -> float:
    """How many runs of ``workflow`` ``gateway`` counted as ended in ``status``."""
    value = gateway.metrics.registry.get_sample_value(
        "patchbay_workflow_runs_total", {"workflow": workflow, "outcome": status}
    )
    return value or 0


@pytest.mark.parametrize("mode", ERAS)
async def test_a_task_cancelled_at_the_other_replica_ends_cancelled_after_its_compensations(
    temporal_server: dev_server.DevServer, mode: str
) -> None:
    async with replicas(temporal_server.address) as (a, b), clients(a, b, mode) as (at_a, at_b):
        task = await start_task(at_a, "held", {})
        await until_held()
        with anyio.fail_after(WITHIN):
            answer = await rpc(at_b, "tasks/cancel", taskId=task["taskId"])
        if mode == "legacy":
            assert answer["status"] == "cancelled"
        else:
            assert answer == {"resultType": "complete", "_meta": answer["_meta"]}  # an acknowledgement
        assert Holding.record == ["did one", "held", "undid one"]  # compensated before the answer
        assert (await rpc(at_a, "tasks/get", taskId=task["taskId"]))["status"] == "cancelled"
        if mode == "legacy":
            with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, maybe in an ExceptionGroup
                await rpc(at_a, "tasks/cancel", taskId=task["taskId"])
            assert rpc_error(raised).code == types.INVALID_PARAMS  # it has ended


@pytest.mark.parametrize("mode", ERAS)
async def test_another_clients_task_is_not_found_at_any_replica_like_an_unknown_one(
    temporal_server: dev_server.DevServer, mode: str
) -> None:
    methods = ["tasks/get", "tasks/cancel"] + (["tasks/result"] if mode == "legacy" else [])
    async with (
        replicas(temporal_server.address) as (a, b),
        clients(a, b, mode) as (at_a, _),
        clients(a, b, mode, BOB) as (bob_at_a, bob_at_b),
    ):
        task = await start_task(at_a, "held", {})
        await until_held()
        for bob in (bob_at_a, bob_at_b):
            for method in methods:
                errors = []
                for task_id in (task["taskId"], "no-such-task"):
                    with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, maybe in an ExceptionGroup
                        await rpc(bob, method, taskId=task_id)
                    errors.append(rpc_error(raised))
                assert errors[0] == errors[1]
                assert errors[0].code == types.INVALID_PARAMS
        assert (await rpc(at_a, "tasks/get", taskId=task["taskId"]))["status"] == "working"  # bob cancelled nothing


async def test_tasks_list_at_either_replica_shows_the_callers_tasks_only(temporal_server: dev_server.DevServer) -> None:
    async with (
        replicas(temporal_server.address) as (a, b),
        clients(a, b, "legacy") as (at_a, at_b),
        clients(a, b, "legacy", BOB) as (_, bob_at_b),
    ):
        Holding.release.set()
        first = await start_task(at_a, "held", {})
        second = await start_task(at_b, "held", {})
        bobs = await start_task(bob_at_b, "held", {})
        plain = await a.dispatcher.call("held", {}, CallContext(principal=ALICE))  # a run, not a task
        assert plain.structured_content == {"held": "released"}
        mine = [second["taskId"], first["taskId"]]
        with anyio.fail_after(WITHIN):  # Temporal's visibility lists a run shortly after it started
            while [t["taskId"] for t in (await rpc(at_a, "tasks/list"))["tasks"]] != mine:  # noqa: ASYNC110  (the state is in Temporal)
                await anyio.sleep(0.05)
        assert [t["taskId"] for t in (await rpc(at_b, "tasks/list"))["tasks"]] == mine
        assert [t["taskId"] for t in (await rpc(bob_at_b, "tasks/list"))["tasks"]] == [bobs["taskId"]]


async def test_a_keyed_task_reissued_at_the_other_replica_is_the_same_run(
    temporal_server: dev_server.DevServer,
) -> None:
    async with replicas(temporal_server.address) as (a, b):
        keyed = CallContext(principal=ALICE, meta={IDEMPOTENCY_META_KEY: "k-1"}, task={"ttl": 60000})
        first = await a.dispatcher.call("held", {}, keyed)
        await until_held()
        again = await b.dispatcher.call("held", {}, keyed)
        other = await b.dispatcher.call("held", {}, CallContext(principal=BOB, meta=keyed.meta, task={}))
        assert first.task is not None
        assert again.task is not None
        assert other.task is not None
        assert again.task["taskId"] == first.task["taskId"]
        assert other.task["taskId"] != first.task["taskId"]  # keys are the caller's own
        Holding.release.set()
        ended = await b.runs.wait(first.task["taskId"], ALICE)
        assert ended is not None
        assert ended.status == "succeeded"
        assert ended.idempotency_key == "k-1"
        assert Holding.record.count("did one") == 2  # alice's run and bob's, not a third


async def test_workflows_on_temporal_are_offered_as_tasks(temporal_server: dev_server.DevServer) -> None:
    async with replicas(temporal_server.address) as (a, _), client(McpFrontend(a, ALICE), "legacy") as alice:
        tools = {tool.name: tool for tool in (await alice.list_tools()).tools}
        assert tools["held"].execution is not None
        assert tools["held"].execution.task_support == "optional"


async def test_a_runs_resource_at_the_other_replica_shows_its_steps_from_temporal(
    temporal_server: dev_server.DevServer,
) -> None:
    async with replicas(temporal_server.address) as (a, b), clients(a, b, "legacy") as (at_a, at_b):
        Holding.release.set()
        task = await start_task(at_a, "held", {})
        await rpc(at_b, "tasks/result", taskId=task["taskId"])
        read = await at_b.read_resource(f"patchbay://runs/{task['taskId']}")
        [content] = read.contents
        assert isinstance(content, types.TextResourceContents)
        view = json.loads(content.text)
        assert (view["status"], view["caller"], view["output"]) == ("succeeded", "client:alice", {"held": "released"})
        assert [(step["key"], step["tool"], step["status"]) for step in view["steps"]] == [
            ("one", "box__echo", "succeeded"),
            ("hold", "box__hold", "succeeded"),
        ]
        assert view["note"] is None  # its steps' ends the engine's own: the history replayed with b's plan
