"""The MCP project's reference server, server-everything, behind ``patchbay serve``: as faithful as no gateway.

Every test runs for a 2026-07-28 client (what the SDK ``Client`` picks by default against the gateway)
and a handshake-era one (``mode="legacy"``), over server-everything as an HTTP upstream and as a
stdio upstream, and holds what the client sees against the same client connected straight to the
same server (which speaks only the handshake era, 2025-11-25). server-everything's server→client
requests reach a 2026-07-28 client through the gateway's input-required round trip, which the SDK
client drives with its callbacks. Its ``simulate-research-query`` requires tasks (2025-11-25): run as a task by
clients of both eras (the 2026-07-28 one through the tasks extension), and called plainly by clients that know
no tasks, which the gateway serves by running the task for them.
"""

import base64
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from gateway.tasks import RELATED_TASK_META_KEY
from gateway.upstream_tasks import TASK_PREFIX
from policies.auth import new_token
from tests.everything_support import SERVER, UPSTREAMS, Everything, check_ready, stdio_upstream
from tests.support import run_gateway, text
from tests.taskclient import TasksExtension, rpc, start_task

pytestmark = pytest.mark.anyio

WITHIN = 20.0
ERAS = {"auto": "2026-07-28", "legacy": "2025-11-25"}
"""Client mode → the protocol version it ends up with, through the gateway."""
HANDSHAKE_ERA = "2025-11-25"
"""What server-everything speaks, so what every client connected straight to it speaks."""
ANSWER = "forty-two, from the model"
ACCEPT = types.ElicitResult(action="accept", content={"name": "Ada Lovelace", "check": True, "integer": 7})
DECLINE = types.ElicitResult(action="decline")
_BYTES = random.Random(11).randbytes(600 * 1024)  # incompressible: gzip leaves it about as large
CALLS: dict[str, tuple[str, dict[str, Any]]] = {
    "sum": ("get-sum", {"a": 2, "b": 40}),
    "echo": ("echo", {"message": "héllo ✓ \u2028 \U0001f600"}),
    "image": ("get-tiny-image", {}),
    "structured": ("get-structured-content", {"location": "New York"}),
    "annotated": ("get-annotated-message", {"messageType": "error", "includeImage": True}),
    "large resource": (
        "gzip-file-as-resource",
        {
            "name": "blob.gz",
            "data": "data:application/octet-stream;base64," + base64.b64encode(_BYTES).decode(),
            "outputType": "resource",
        },
    ),
}
"""Plain calls, and the rich content server-everything offers (image, embedded resource of ~800 KB base64)."""
SAMPLING = ("trigger-sampling-request", {"prompt": "What is six times seven?", "maxTokens": 12})
ELICITATION: tuple[str, dict[str, Any]] = ("trigger-elicitation-request", {})
PROGRESS = ("trigger-long-running-operation", {"duration": 0.3, "steps": 3})

paths = pytest.mark.parametrize("upstream", UPSTREAMS)
eras = pytest.mark.parametrize("mode", list(ERAS))


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Callbacks:
    """A client's sampling and elicitation callbacks: they answer as told and remember what they were asked."""

    elicit: types.ElicitResult = field(default_factory=lambda: ACCEPT)
    asked: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def sampling(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        self.asked.append(("sampling", params.model_dump(mode="json", exclude_none=True)))
        content = types.TextContent(type="text", text=ANSWER)
        return types.CreateMessageResult(role="assistant", content=content, model="test-model", stop_reason="endTurn")

    async def elicitation(self, context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        self.asked.append(("elicitation", params.model_dump(mode="json", exclude_none=True)))
        return self.elicit


def seen(result: types.CallToolResult) -> dict[str, Any]:
    """What a client sees of a result, less ``_meta`` (a 2026-07-28 server stamps its own serverInfo there)."""
    return result.model_dump(mode="json", exclude={"meta"})


@asynccontextmanager
async def connect(target: Any, mode: str, callbacks: Callbacks, era: str) -> AsyncIterator[Client]:
    client = Client(
        target,
        mode=mode,
        cache=None,
        sampling_callback=callbacks.sampling,
        elicitation_callback=callbacks.elicitation,
    )
    async with client:
        assert client.protocol_version == era
        yield client


def through_gateway(everything: Everything, upstream: str, mode: str, callbacks: Callbacks) -> Any:
    return connect(everything.url(upstream), mode, callbacks, ERAS[mode])


@dataclass
class Direct:
    """What a client connected straight to server-everything saw, over one transport."""

    tools: dict[str, dict[str, Any]]
    results: dict[str, dict[str, Any]]
    asked: dict[str, list[tuple[str, dict[str, Any]]]]
    progress: list[tuple[float, float | None, str | None]]


async def _direct(everything: Everything, upstream: str) -> Direct:
    results: dict[str, dict[str, Any]] = {}
    asked: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    reported: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reported.append((progress, total, message))

    callbacks = Callbacks()
    with anyio.fail_after(WITHIN):
        async with connect(everything.direct(upstream), "legacy", callbacks, HANDSHAKE_ERA) as client:
            tools = {
                tool.name: tool.model_dump(mode="json", exclude={"name"}) for tool in (await client.list_tools()).tools
            }
            for key, (name, arguments) in CALLS.items():
                results[key] = seen(await client.call_tool(name, arguments))
            for key, (name, arguments), answer in (
                ("sampling", SAMPLING, ACCEPT),
                ("accepted", ELICITATION, ACCEPT),
                ("declined", ELICITATION, DECLINE),
            ):
                callbacks.elicit, callbacks.asked = answer, []
                results[key] = seen(await client.call_tool(name, arguments))
                asked[key] = callbacks.asked
            results["progress"] = seen(await client.call_tool(*PROGRESS, progress_callback=on_progress))
    return Direct(tools, results, asked, reported)


@pytest.fixture(scope="module")
async def direct(everything: Everything) -> dict[str, Direct]:
    """What a handshake-era client sees connected straight to server-everything, by transport."""
    return {upstream: await _direct(everything, upstream) for upstream in UPSTREAMS}


@paths
@eras
async def test_the_tools_are_listed_under_the_servers_prefix_with_their_schemas(
    everything: Everything, direct: dict[str, Direct], upstream: str, mode: str
) -> None:
    with anyio.fail_after(WITHIN):
        async with through_gateway(everything, upstream, mode, Callbacks()) as client:
            listed = (await client.list_tools()).tools
    prefix = everything.tool("")
    assert all(tool.name.startswith(prefix) for tool in listed)
    tools = {tool.name.removeprefix(prefix): tool for tool in listed}
    assert {"get-sum", "trigger-sampling-request", "trigger-elicitation-request"} <= tools.keys()
    assert tools.keys() == direct[upstream].tools.keys()
    for name, tool in tools.items():
        expected = direct[upstream].tools[name]
        assert tool.input_schema == expected["input_schema"], name
        assert (tool.title, tool.description) == (expected["title"], expected["description"]), name
        assert tool.model_dump(mode="json")["annotations"] == expected["annotations"], name
        assert tool.output_schema == expected["output_schema"], name
    assert tools["get-sum"].input_schema["required"] == ["a", "b"]


@paths
@eras
async def test_plain_calls_and_rich_content_come_through_as_from_the_server_itself(
    everything: Everything, direct: dict[str, Direct], upstream: str, mode: str
) -> None:
    with anyio.fail_after(WITHIN):
        async with through_gateway(everything, upstream, mode, Callbacks()) as client:
            results = {
                key: seen(await client.call_tool(everything.tool(name), arguments))
                for key, (name, arguments) in CALLS.items()
            }
    expected = {key: direct[upstream].results[key] for key in CALLS}
    assert results == expected
    assert results["sum"]["content"][0]["text"] == "The sum of 2 and 40 is 42."
    blob = results["large resource"]["content"][0]["resource"]["blob"]
    assert len(blob) > 800_000


@paths
@eras
async def test_a_sampling_request_reaches_the_clients_callback_and_its_answer_the_tools_result(
    everything: Everything, direct: dict[str, Direct], upstream: str, mode: str
) -> None:
    callbacks = Callbacks()
    with anyio.fail_after(WITHIN):
        async with through_gateway(everything, upstream, mode, callbacks) as client:
            result = await client.call_tool(everything.tool(SAMPLING[0]), SAMPLING[1])
    assert callbacks.asked == direct[upstream].asked["sampling"]
    [(kind, question)] = callbacks.asked
    assert kind == "sampling"
    assert question["messages"][0]["content"]["text"].endswith("What is six times seven?")
    assert question["max_tokens"] == 12
    assert not result.is_error
    assert f'"text": "{ANSWER}"' in text(result)
    assert seen(result) == direct[upstream].results["sampling"]


@paths
@eras
@pytest.mark.parametrize(("answer", "key"), [(ACCEPT, "accepted"), (DECLINE, "declined")])
async def test_an_elicitation_request_reaches_the_clients_callback_and_its_answer_the_tools_result(
    everything: Everything,
    direct: dict[str, Direct],
    upstream: str,
    mode: str,
    answer: types.ElicitResult,
    key: str,
) -> None:
    callbacks = Callbacks(elicit=answer)
    with anyio.fail_after(WITHIN):
        async with through_gateway(everything, upstream, mode, callbacks) as client:
            result = await client.call_tool(everything.tool(ELICITATION[0]), ELICITATION[1])
    assert callbacks.asked == direct[upstream].asked[key]
    [(kind, question)] = callbacks.asked
    assert kind == "elicitation"
    assert question["requested_schema"]["required"] == ["name"]
    texts = [block.text for block in result.content if isinstance(block, types.TextContent)]
    if answer is ACCEPT:
        assert "- Name: Ada Lovelace\n- Agreed to terms: true\n- Favorite Integer: 7" in texts[1]
    else:
        assert texts[0].startswith("❌ User declined")
    assert seen(result) == direct[upstream].results[key]


@paths
@eras
async def test_progress_of_a_long_running_operation_reaches_the_client(
    everything: Everything, direct: dict[str, Direct], upstream: str, mode: str
) -> None:
    reported: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reported.append((progress, total, message))

    with anyio.fail_after(WITHIN):
        async with through_gateway(everything, upstream, mode, Callbacks()) as client:
            result = await client.call_tool(everything.tool(PROGRESS[0]), PROGRESS[1], progress_callback=on_progress)
    assert reported == direct[upstream].progress == [(1.0, 3.0, None), (2.0, 3.0, None), (3.0, 3.0, None)]
    assert seen(result) == direct[upstream].results["progress"]


@paths
async def test_a_handshake_clients_refusal_reaches_the_server_as_the_client_gave_it(
    everything: Everything, upstream: str
) -> None:
    """The client's JSON-RPC error (code, message) goes to the upstream unchanged. (A 2026-07-28 client cannot
    refuse: its answers have no error form, so the SDK raises at home and leaves the call held.)"""

    async def refuse(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> types.ErrorData:
        return types.ErrorData(code=-1, message="the user said no")

    results = []
    with anyio.fail_after(WITHIN):
        for target, name, era in (
            (everything.direct(upstream), SAMPLING[0], HANDSHAKE_ERA),
            (everything.url(upstream), everything.tool(SAMPLING[0]), ERAS["legacy"]),
        ):
            async with Client(target, mode="legacy", cache=None, sampling_callback=refuse) as client:
                assert client.protocol_version == era
                # Twice: the gateway serves a session's first call and later ones on different paths.
                results += [seen(await client.call_tool(name, SAMPLING[1])) for _ in range(2)]
    direct = results[0]
    assert direct["is_error"]
    assert direct["content"][0]["text"] == "MCP error -1: the user said no"
    assert results == [direct] * 4


# simulate-research-query: a tool that requires tasks (2025-11-25 tasks on server-everything's side).

RESEARCH: tuple[str, dict[str, Any]] = ("simulate-research-query", {"topic": "tides"})
"""Four stages of a second each: every run takes about 4 s, so :func:`research` runs them all at once."""
RESEARCH_TOKENS = {name: new_token() for name in ("alice", "bob")}
"""Two clients of a gateway with ``clients:``: a task is its creator's alone (the shared gateways are anonymous)."""


async def until_ended(client: Client, task_id: str) -> dict[str, Any]:
    """``tasks/get`` until the task has left ``working``: its last answer."""
    while (task := await rpc(client, "tasks/get", taskId=task_id))["status"] == "working":  # noqa: ASYNC110
        await anyio.sleep(0.1)  # polling is how a client learns a task ended
    return task


@asynccontextmanager
async def task_client(target: Any, mode: str, *, tasks: bool = True, token: str | None = None) -> AsyncIterator[Client]:
    """A client of ``target`` (a URL: with a bearer ``token``, if given); in 2026-07-28, declaring the tasks
    extension unless told not to."""
    extensions = [TasksExtension()] if tasks and mode != "legacy" else None
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with httpx2.AsyncClient(headers=headers) as http:
        transport = streamable_http_client(target, http_client=http) if isinstance(target, str) else target
        async with Client(transport, mode=mode, cache=None, extensions=extensions) as client:
            assert client.protocol_version == ERAS[mode]
            yield client


async def _handshake_task(target: Any, name: str) -> dict[str, Any]:
    """A handshake-era client runs the tool as a task: how the tool is listed, the task, and its result."""
    async with task_client(target, "legacy") as client:
        listed = {tool.name: tool for tool in (await client.list_tools()).tools}[name]
        created = await start_task(client, name, RESEARCH[1])
        ended = await until_ended(client, created["taskId"])
        result = await rpc(client, "tasks/result", taskId=created["taskId"])
    return {
        "listed": listed.model_dump(mode="json", by_alias=True),
        "created": created,
        "ended": ended,
        "result": result,
    }


async def _modern_task(url: str, name: str) -> dict[str, Any]:
    """A 2026-07-28 client declaring the tasks extension runs the tool as a task."""
    async with task_client(url, "auto") as client:
        created = await start_task(client, name, RESEARCH[1])
        return {"created": created, "ended": await until_ended(client, created["taskId"])}


async def _plain_call(url: str, name: str, mode: str) -> types.CallToolResult:
    """A client that knows nothing of tasks calls the tool."""
    async with task_client(url, mode, tasks=False) as client:
        await client.list_tools()  # a handshake-era session is established: the lean path would take the call
        return await client.call_tool(name, RESEARCH[1])


async def _cancelled(target: Any, name: str, mode: str, intruder: Any = None) -> dict[str, Any]:
    """A client starts two tasks and cancels the first; ``intruder`` (a client of the same gateway, if given)
    tries to see and cancel it first. The first is looked at again once the second has completed."""
    async with task_client(target, mode, token=RESEARCH_TOKENS["alice"][0] if intruder else None) as client:
        first, second = [await start_task(client, name, RESEARCH[1]) for _ in range(2)]
        refusals = []
        if intruder is not None:
            async with task_client(intruder, mode, token=RESEARCH_TOKENS["bob"][0]) as bob:
                for method in ("tasks/get", "tasks/cancel"):
                    try:
                        await rpc(bob, method, taskId=first["taskId"])
                    except MCPError as exc:
                        refusals.append(exc.error.code)
        answer = await rpc(client, "tasks/cancel", taskId=first["taskId"])
        now = await rpc(client, "tasks/get", taskId=first["taskId"])
        other = await until_ended(client, second["taskId"])
        later = await rpc(client, "tasks/get", taskId=first["taskId"])
    return {"refusals": refusals, "answer": answer, "now": now, "other": other, "later": later}


@pytest.fixture(scope="module")
async def research(everything: Everything, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Any]:
    """What each kind of client saw of simulate-research-query, by (upstream, kind): run all at once, each
    outcome kept (an exception too, raised by the test that looks at it)."""
    outcomes: dict[tuple[str, str], Any] = {}
    tmp_path = tmp_path_factory.mktemp("research")
    clients = "".join(f'  {name}: {{token_sha256: "{sha}"}}\n' for name, (_, sha) in RESEARCH_TOKENS.items())

    async def keep(key: tuple[str, str], run: Any, *args: Any) -> None:
        try:
            outcomes[key] = await run(*args)
        except Exception as exc:  # kept for the test that looks at it
            outcomes[key] = exc

    async def owned(upstream: str) -> None:
        server = json.dumps({"url": everything.http_url}) if upstream == "http" else stdio_upstream(everything.argv)
        config = f"servers:\n  {SERVER}: {server}\nclients:\n{clients}"
        async with run_gateway(tmp_path, config, name=f"gateway-{upstream}-clients") as gateway:
            await check_ready(gateway)
            async with anyio.create_task_group() as tg:
                for mode in ERAS:
                    tg.start_soon(keep, (upstream, f"owned {mode}"), _cancelled, gateway.url, name, mode, gateway.url)

    name = everything.tool(RESEARCH[0])
    with anyio.fail_after(WITHIN):
        async with anyio.create_task_group() as tg:
            for upstream in UPSTREAMS:
                tg.start_soon(keep, (upstream, "direct"), _handshake_task, everything.direct(upstream), RESEARCH[0])
                tg.start_soon(keep, (upstream, "handshake"), _handshake_task, everything.url(upstream), name)
                tg.start_soon(keep, (upstream, "modern"), _modern_task, everything.url(upstream), name)
                for mode in ERAS:
                    tg.start_soon(keep, (upstream, f"plain {mode}"), _plain_call, everything.url(upstream), name, mode)
                tg.start_soon(
                    keep, (upstream, "direct cancelled"), _cancelled, everything.direct(upstream), RESEARCH[0], "legacy"
                )
                tg.start_soon(owned, upstream)
    return outcomes


def outcome(research: dict[tuple[str, str], Any], upstream: str, kind: str) -> Any:
    found = research[(upstream, kind)]
    if isinstance(found, Exception):
        raise found
    return found


def without_id(task: dict[str, Any]) -> dict[str, Any]:
    """A task less what differs between two runs: its id and times."""
    return {key: value for key, value in task.items() if key not in ("taskId", "createdAt", "lastUpdatedAt")}


@paths
async def test_a_task_required_tool_is_listed_as_such_to_a_handshake_client(
    research: dict[tuple[str, str], Any], upstream: str
) -> None:
    listed = outcome(research, upstream, "handshake")["listed"]
    direct = outcome(research, upstream, "direct")["listed"]
    assert listed["execution"] == direct["execution"] == {"taskSupport": "required"}
    assert listed["inputSchema"] == direct["inputSchema"]


@paths
async def test_a_handshake_clients_task_runs_upstream_and_gives_the_research_result(
    research: dict[tuple[str, str], Any], upstream: str
) -> None:
    through = outcome(research, upstream, "handshake")
    direct = outcome(research, upstream, "direct")
    task_id = through["created"]["taskId"]
    assert task_id.startswith(TASK_PREFIX)
    assert through["ended"]["taskId"] == task_id
    assert without_id(through["created"]) == without_id(direct["created"])
    assert without_id(through["ended"]) == without_id(direct["ended"])
    assert through["ended"]["status"] == "completed"
    result = through["result"]
    assert result["content"][0]["text"].startswith("# Research Report: tides\n")
    assert result == {**direct["result"], "_meta": {"io.modelcontextprotocol/related-task": {"taskId": task_id}}}


@paths
async def test_a_2026_client_with_the_tasks_extension_gets_a_task_whose_result_tasks_get_inlines(
    research: dict[tuple[str, str], Any], upstream: str
) -> None:
    through = outcome(research, upstream, "modern")
    direct = outcome(research, upstream, "direct")
    created, ended = through["created"], through["ended"]
    assert created["resultType"] == "task"
    assert created["taskId"].startswith(TASK_PREFIX)
    assert (created["status"], created["ttlMs"], created["pollIntervalMs"]) == ("working", 300000, 1000)
    assert (ended["taskId"], ended["status"]) == (created["taskId"], "completed")
    assert ended["result"] == {key: value for key, value in direct["result"].items() if key != "_meta"}


@paths
@eras
async def test_a_client_that_knows_no_tasks_gets_the_research_result_of_a_plain_call(
    research: dict[tuple[str, str], Any], upstream: str, mode: str
) -> None:
    result: types.CallToolResult = outcome(research, upstream, f"plain {mode}")
    direct = outcome(research, upstream, "direct")["result"]
    assert not result.is_error
    assert result.model_dump(mode="json", by_alias=True, exclude_none=True)["content"] == direct["content"]
    assert RELATED_TASK_META_KEY not in (result.meta or {})  # the task the gateway ran is no task of the client's


@paths
@eras
async def test_a_cancelled_task_ends_cancelled_upstream_and_is_its_creators_alone(
    research: dict[tuple[str, str], Any], upstream: str, mode: str
) -> None:
    through = outcome(research, upstream, f"owned {mode}")
    direct = outcome(research, upstream, "direct cancelled")
    assert through["refusals"] == [types.INVALID_PARAMS] * 2  # "task not found", as for an id that never was
    assert direct["now"]["status"] == direct["later"]["status"] == "cancelled"
    assert through["now"]["status"] == "cancelled"
    assert through["now"]["statusMessage"] == direct["now"]["statusMessage"] == "Client cancelled task execution."
    assert through["other"]["status"] == direct["other"]["status"] == "completed"
    assert through["later"]["status"] == "cancelled"  # the upstream did not finish it after all
    if mode == "legacy":
        assert without_id(through["answer"]) == without_id(direct["answer"])
    else:
        assert {key: value for key, value in through["answer"].items() if key != "_meta"} == {"resultType": "complete"}
