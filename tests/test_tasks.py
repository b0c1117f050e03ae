"""Workflow runs as MCP tasks, in both eras: the SDK's client against the gateway served in-process.

2025-11-25: the client asks with ``params.task`` and reads the task with ``tasks/get``, ``tasks/result``,
``tasks/list`` and ``tasks/cancel``. 2026-07-28: a client declaring the ``io.modelcontextprotocol/tasks``
extension gets a task (``resultType: "task"``) for a workflow call, and reads it with ``tasks/get`` and
``tasks/cancel``. The workflow holds in the upstream's ``wait`` tool until the test releases it, so a
task is seen ``working`` without racing the clock.
"""

import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.extension import ClientExtension, NotificationBinding
from mcp.client.streamable_http import streamable_http_client
from pydantic import TypeAdapter

from gateway.app import serving
from gateway.config import Config, parse_config
from gateway.gateway import Gateway, open_gateway
from gateway.server import McpFrontend
from gateway.tasks import RELATED_TASK_META_KEY, TASKS_EXTENSION
from gateway.types import Principal
from policies.auth import new_token
from tests.inprocess import (
    UPSTREAM_DEPRECATIONS,
    WITHIN,
    Upstream,
    gateway_over,
    make_upstream,
    serve_asgi,
    serve_upstream,
)
from tests.taskclient import TasksExtension, client, rpc, rpc_error, start_task

pytestmark = [pytest.mark.anyio, *UPSTREAM_DEPRECATIONS]

ERAS = ["legacy", "2026-07-28"]
ALICE = Principal("alice")
BOB = Principal("bob")

WORKFLOWS = """
workflows:
  held:
    description: Notes the label, then waits until the test releases it (undoing the note if it fails).
    input: {type: object, properties: {label: {type: string}}, required: [label]}
    steps:
      - id: first
        call: kit__note
        with: {label: "did ${.input.label}"}
        compensate: {call: kit__note, with: {label: "undid ${.input.label}"}}
      - {id: hold, call: kit__wait, with: {label: "${.input.label}"}, after: [first]}
    output: {held: "${.steps.hold.result.result}"}
"""

_WIRE = TypeAdapter(dict[str, Any])


def noting_upstream() -> Upstream:
    """The in-process upstream with a ``note`` tool that records its label in ``events``."""
    up = make_upstream()

    @up.server.tool()
    def note(label: str) -> str:
        """Record ``label``."""
        up.events.append(label)
        return label

    return up


@dataclass
class Served:
    """A gateway over the noting upstream, and a frontend of it for each of two clients."""

    gateway: Gateway
    upstream: Upstream
    alice: McpFrontend
    bob: McpFrontend


@asynccontextmanager
async def served() -> AsyncIterator[Served]:
    up = noting_upstream()
    with anyio.fail_after(WITHIN):
        async with serve_upstream(up) as url, gateway_over(url, WORKFLOWS) as gateway:
            yield Served(gateway, up, McpFrontend(gateway, ALICE), McpFrontend(gateway, BOB))
            await finish_runs(gateway, up)


async def finish_runs(gateway: Gateway, up: Upstream) -> None:
    """Let every task's run end before the gateway stops (one stopped mid-call is left to resume)."""
    up.release.set()
    for principal in (ALICE, BOB):
        for record in await gateway.runs.list(principal):
            await gateway.runs.wait(record.run_id, principal)


async def until_waiting(up: Upstream) -> None:
    with anyio.fail_after(WITHIN):
        await up.waiting.wait()


# --- Creating a task ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ERAS)
async def test_a_task_augmented_call_returns_a_working_task_before_the_workflow_ends(mode: str) -> None:
    async with served() as s, client(s.alice, mode) as alice:
        task = await start_task(alice, "held", {"label": "x"}, ttl=60000)
        assert task["status"] == "working"
        assert task["taskId"]
        assert not s.upstream.release.is_set()  # the run cannot have ended: it waits for this
        await until_waiting(s.upstream)
        polled = await rpc(alice, "tasks/get", taskId=task["taskId"])
        assert polled["status"] == "working"
        assert polled["createdAt"] == task["createdAt"]
        ttl = "ttlMs" if mode != "legacy" else "ttl"
        assert task.get(ttl) == (60000 if mode == "legacy" else None)  # 2026-07-28 has no ttl to ask for


@pytest.mark.parametrize("mode", ERAS)
async def test_a_polled_task_completes_with_the_workflows_result(mode: str) -> None:
    async with served() as s, client(s.alice, mode) as alice:
        task = await start_task(alice, "held", {"label": "x"})
        await until_waiting(s.upstream)
        s.upstream.release.set()
        with anyio.fail_after(WITHIN):
            while (polled := await rpc(alice, "tasks/get", taskId=task["taskId"]))["status"] == "working":  # noqa: ASYNC110
                await anyio.sleep(0.01)  # polling is how a client learns a task ended
        assert polled["status"] == "completed"
        if mode == "legacy":
            result = await rpc(alice, "tasks/result", taskId=task["taskId"])
        else:
            result = polled["result"]  # the extension inlines it
        assert result["structuredContent"] == {"held": "x released"}
        assert not result["isError"]
        assert s.upstream.events == ["did x", "x started"]


async def test_tasks_result_waits_for_the_run_and_names_its_task() -> None:
    async with served() as s, client(s.alice, "legacy") as alice:
        task = await start_task(alice, "held", {"label": "x"})
        await until_waiting(s.upstream)
        async with anyio.create_task_group() as tg:
            results: list[dict[str, Any]] = []

            async def fetch() -> None:
                results.append(await rpc(alice, "tasks/result", taskId=task["taskId"]))

            tg.start_soon(fetch)
            assert (await rpc(alice, "tasks/get", taskId=task["taskId"]))["status"] == "working"
            assert results == []  # it waits: the run goes on
            s.upstream.release.set()
        (result,) = results
        assert result["structuredContent"] == {"held": "x released"}
        assert result["_meta"][RELATED_TASK_META_KEY] == {"taskId": task["taskId"]}


async def test_a_2026_client_with_the_extension_gets_the_result_through_call_tool() -> None:
    async with served() as s, client(s.alice, "2026-07-28") as alice:
        s.upstream.release.set()
        result = await alice.call_tool("held", {"label": "x"})  # the extension's resolver polls the task
        assert result.structured_content == {"held": "x released"}


async def test_a_2026_client_without_the_extension_gets_a_plain_result_and_no_task_methods() -> None:
    async with served() as s, client(s.alice, "2026-07-28", tasks=False) as alice:
        s.upstream.release.set()
        result = await alice.call_tool("held", {"label": "x"})
        assert result.structured_content == {"held": "x released"}
        with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, sometimes inside an ExceptionGroup
            await rpc(alice, "tasks/get", taskId="anything")
        error = rpc_error(raised)
        assert error.code == types.MISSING_REQUIRED_CLIENT_CAPABILITY
        assert error.data == {"requiredCapabilities": {"extensions": {TASKS_EXTENSION: {}}}}


async def test_a_task_asked_of_an_upstream_tool_is_method_not_found() -> None:
    async with served() as s, client(s.alice, "legacy") as alice:
        with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, sometimes inside an ExceptionGroup
            await start_task(alice, "kit__echo", {"text": "hi"})
        assert rpc_error(raised).code == types.METHOD_NOT_FOUND


async def test_the_route_of_task_augmented_calls_is_not_a_method_of_its_own() -> None:
    async with served() as s, client(s.alice, "legacy") as alice:
        with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, sometimes inside an ExceptionGroup
            await rpc(alice, "patchbay/tools/call-as-task", name="held", arguments={"label": "x"}, task={})
        assert rpc_error(raised).code == types.METHOD_NOT_FOUND


async def test_a_2026_call_of_an_upstream_tool_stays_a_plain_call() -> None:
    async with served() as s, client(s.alice, "2026-07-28") as alice:
        result = await alice.session.call_tool("kit__echo", {"text": "hi"}, allow_claimed=True)
        assert isinstance(result, types.CallToolResult)
        assert result.structured_content == {"result": "hi"}


# --- Ownership -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ERAS)
async def test_another_clients_task_is_not_found_like_an_unknown_one(mode: str) -> None:
    methods = ["tasks/get", "tasks/cancel"] + (["tasks/result"] if mode == "legacy" else [])
    async with served() as s, client(s.alice, mode) as alice, client(s.bob, mode) as bob:
        task = await start_task(alice, "held", {"label": "x"})
        for method in methods:
            errors = []
            for task_id in (task["taskId"], "no-such-task"):
                with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, maybe in an ExceptionGroup
                    await rpc(bob, method, taskId=task_id)
                errors.append(rpc_error(raised))
            assert errors[0] == errors[1]
            assert errors[0].code == types.INVALID_PARAMS
        assert (await rpc(alice, "tasks/get", taskId=task["taskId"]))["status"] == "working"  # bob cancelled nothing


async def test_tasks_are_listed_for_their_creator_only() -> None:
    async with served() as s, client(s.alice, "legacy") as alice, client(s.bob, "legacy") as bob:
        first = await start_task(alice, "held", {"label": "x"})
        second = await start_task(alice, "held", {"label": "y"})
        listed = await rpc(alice, "tasks/list")
        assert [t["taskId"] for t in listed["tasks"]] == [second["taskId"], first["taskId"]]
        assert "nextCursor" not in listed
        assert (await rpc(bob, "tasks/list"))["tasks"] == []


async def test_an_unknown_list_cursor_is_invalid_params() -> None:
    async with served() as s, client(s.alice, "legacy") as alice:
        with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, sometimes inside an ExceptionGroup
            await rpc(alice, "tasks/list", cursor="nowhere")
        assert rpc_error(raised).code == types.INVALID_PARAMS


# --- Cancelling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ERAS)
async def test_cancelling_a_task_cancels_its_run_and_runs_the_compensations(mode: str) -> None:
    async with served() as s, client(s.alice, mode) as alice:
        task = await start_task(alice, "held", {"label": "x"})
        await until_waiting(s.upstream)
        answer = await rpc(alice, "tasks/cancel", taskId=task["taskId"])
        if mode == "legacy":
            assert answer["status"] == "cancelled"
        else:
            assert answer == {"resultType": "complete", "_meta": answer["_meta"]}  # an acknowledgement
        assert s.upstream.events == ["did x", "x started", "x cancelled", "undid x"]
        assert (await rpc(alice, "tasks/get", taskId=task["taskId"]))["status"] == "cancelled"


async def test_cancelling_a_finished_task_is_invalid_params() -> None:
    async with served() as s, client(s.alice, "legacy") as alice:
        s.upstream.release.set()
        task = await start_task(alice, "held", {"label": "x"})
        await rpc(alice, "tasks/result", taskId=task["taskId"])
        with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, sometimes inside an ExceptionGroup
            await rpc(alice, "tasks/cancel", taskId=task["taskId"])
        assert rpc_error(raised).code == types.INVALID_PARAMS


# --- Over HTTP, with bearer tokens -------------------------------------------------------------------


@asynccontextmanager
async def over_http() -> AsyncIterator[tuple[Upstream, Callable[[str, str], Client]]]:
    """``patchbay serve``'s app on 127.0.0.1 with two clients, alice and bob, each with a token; yields the
    upstream and ``connect(name, mode)``, an SDK client over streamable HTTP with that client's token."""
    tokens = {name: new_token() for name in ("alice", "bob")}
    clients = "".join(f'  {name}: {{token_sha256: "{sha}"}}\n' for name, (_, sha) in tokens.items())
    up = noting_upstream()
    with anyio.fail_after(WITHIN):
        async with serve_upstream(up) as url:
            config = parse_config(f'servers:\n  kit: {{url: "{url}"}}\nclients:\n{clients}{WORKFLOWS}', environ={})
            async with serving(config) as app, serve_asgi(app, lifespan="off") as base, AsyncExitStack() as stack:

                def connect(name: str, mode: str) -> Client:
                    headers = {"Authorization": f"Bearer {tokens[name][0]}"}
                    http = httpx2.AsyncClient(headers=headers)
                    stack.push_async_callback(http.aclose)
                    transport = streamable_http_client(f"{base}/mcp", http_client=http)
                    extensions = [TasksExtension()] if mode != "legacy" else None
                    return Client(transport, mode=mode, cache=None, extensions=extensions)

                yield up, connect
                up.release.set()


@pytest.mark.parametrize("mode", ERAS)
async def test_over_http_a_task_is_its_creators_and_is_not_taken_by_the_lean_path(mode: str) -> None:
    async with over_http() as (up, connect), connect("alice", mode) as alice, connect("bob", mode) as bob:
        await alice.list_tools()  # the session is established: the lean path would take a plain call now
        task = await start_task(alice, "held", {"label": "x"})
        assert task["status"] == "working"
        await until_waiting(up)
        with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, sometimes inside an ExceptionGroup
            await rpc(bob, "tasks/get", taskId=task["taskId"])
        assert rpc_error(raised).code == types.INVALID_PARAMS
        up.release.set()
        if mode == "legacy":
            result = await rpc(alice, "tasks/result", taskId=task["taskId"])
        else:
            with anyio.fail_after(WITHIN):
                while (result := await rpc(alice, "tasks/get", taskId=task["taskId"]))["status"] == "working":  # noqa: ASYNC110
                    await anyio.sleep(0.01)  # polling is how a client learns a task ended
            result = result["result"]
        assert result["structuredContent"] == {"held": "x released"}


# --- Across a restart -------------------------------------------------------------------------------


@pytest.fixture
def store(durable_url: str) -> str:
    """Where the runs are kept: each store that outlives a gateway."""
    return durable_url


def durable(url: str, store: str) -> Config:
    """The workflows over ``url``, their runs kept in ``store``."""
    return parse_config(f'gateway: {{store: "{store}"}}\nservers:\n  kit: {{url: "{url}"}}\n{WORKFLOWS}', environ={})


async def until_ended(client: Client, task_id: str) -> dict[str, Any]:
    """The task once it has ended (polled)."""
    with anyio.fail_after(WITHIN):
        while (task := await rpc(client, "tasks/get", taskId=task_id))["status"] == "working":  # noqa: ASYNC110
            await anyio.sleep(0.01)  # polling is how a client learns a task ended
    return task


@pytest.mark.parametrize("mode", ERAS)
async def test_a_task_created_before_a_restart_is_fetched_after_it_from_a_new_session(mode: str, store: str) -> None:
    up = noting_upstream()
    up.release.set()
    with anyio.fail_after(WITHIN):
        async with serve_upstream(up) as url:
            async with (
                open_gateway(durable(url, store)) as before,
                client(McpFrontend(before, ALICE), mode) as alice,
            ):
                task = await start_task(alice, "held", {"label": "x"})
                await until_ended(alice, task["taskId"])
            async with (
                open_gateway(durable(url, store)) as after,
                client(McpFrontend(after, ALICE), mode) as alice,
                client(McpFrontend(after, BOB), mode) as bob,
            ):
                polled = await rpc(alice, "tasks/get", taskId=task["taskId"])
                assert (polled["status"], polled["createdAt"]) == ("completed", task["createdAt"])
                if mode == "legacy":
                    result = await rpc(alice, "tasks/result", taskId=task["taskId"])
                    assert [t["taskId"] for t in (await rpc(alice, "tasks/list"))["tasks"]] == [task["taskId"]]
                else:
                    result = polled["result"]
                assert result["structuredContent"] == {"held": "x released"}
                with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, maybe in an ExceptionGroup
                    await rpc(bob, "tasks/get", taskId=task["taskId"])
                assert rpc_error(raised).code == types.INVALID_PARAMS


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_task_whose_run_a_restart_interrupts_goes_on_and_ends_after_it(mode: str, store: str) -> None:
    up = noting_upstream()
    with anyio.fail_after(WITHIN):
        async with serve_upstream(up) as url:
            async with (
                open_gateway(durable(url, store)) as before,
                client(McpFrontend(before, ALICE), mode) as alice,
            ):
                task = await start_task(alice, "held", {"label": "x"})
                await until_waiting(up)
            # That gateway stopped with the run in its last step: the next one takes the run up again.
            up.waiting = anyio.Event()
            async with (
                open_gateway(durable(url, store), resume=True) as after,
                client(McpFrontend(after, ALICE), mode) as alice,
            ):
                polled = await rpc(alice, "tasks/get", taskId=task["taskId"])
                assert (polled["status"], polled["createdAt"]) == ("working", task["createdAt"])
                await up.waiting.wait()  # the step in flight at the stop runs again
                up.release.set()
                if mode == "legacy":
                    result = await rpc(alice, "tasks/result", taskId=task["taskId"])
                else:
                    result = (await until_ended(alice, task["taskId"]))["result"]
                assert result["structuredContent"] == {"held": "x released"}
                assert up.events.count("did x") == 1  # the completed step was not done again
    gc.collect()  # the leak, if any, is this test's


# --- Advertising -----------------------------------------------------------------------------------


async def test_workflow_tools_advertise_task_support_and_the_server_the_tasks_capability() -> None:
    async with served() as s, client(s.alice, "legacy") as alice:
        tools = {tool.name: tool for tool in (await alice.list_tools()).tools}
        assert tools["held"].execution is not None
        assert tools["held"].execution.task_support == "optional"
        assert tools["kit__echo"].execution is None
        tasks = alice.server_capabilities.tasks
        assert tasks is not None
        assert tasks.list is not None
        assert tasks.cancel is not None
        assert tasks.requests is not None
        assert tasks.requests.tools is not None
        assert tasks.requests.tools.call is not None


async def test_a_2026_client_discovers_the_tasks_extension() -> None:
    async with served() as s, client(s.alice, "2026-07-28") as alice:
        discovered = await alice.session.send_request(types.DiscoverRequest(params=types.RequestParams()), _WIRE)
        assert TASKS_EXTENSION in discovered["capabilities"]["extensions"]


async def test_a_legacy_session_is_told_when_its_task_ends() -> None:
    statuses: list[types.TaskStatusNotificationParams] = []
    arrived = anyio.Event()

    async def on_status(params: types.TaskStatusNotificationParams) -> None:
        statuses.append(params)
        arrived.set()

    watcher = _StatusWatcher(on_status)
    async with served() as s, Client(s.alice.server, mode="legacy", cache=None, extensions=[watcher]) as alice:
        task = await start_task(alice, "held", {"label": "x"})
        await until_waiting(s.upstream)
        assert statuses == []
        s.upstream.release.set()
        with anyio.fail_after(WITHIN):
            await arrived.wait()
        (status,) = statuses
        assert (status.task_id, status.status) == (task["taskId"], "completed")


class _StatusWatcher(ClientExtension):
    """Hands ``notifications/tasks/status`` to a callback (the SDK's session drops what it has no binding for)."""

    identifier = "dev.patchbay-tests/task-status"

    def __init__(self, on_status: Callable[[types.TaskStatusNotificationParams], Awaitable[None]]) -> None:
        self._on_status = on_status

    def notifications(self) -> list[NotificationBinding[Any]]:
        return [
            NotificationBinding(
                method="notifications/tasks/status",
                params_type=types.TaskStatusNotificationParams,
                handler=self._on_status,
            )
        ]
