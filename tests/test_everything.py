"""The MCP project's reference server, server-everything, behind ``patchbay serve``: as faithful as no gateway.

Every test runs for a 2026-07-28 client (what the SDK ``Client`` picks by default against the gateway)
and a handshake-era one (``mode="legacy"``), over server-everything as an HTTP upstream and as a
stdio upstream, and holds what the client sees against the same client connected straight to the
same server (which speaks only the handshake era, 2025-11-25). server-everything's server→client
requests reach a 2026-07-28 client through the gateway's input-required round trip, which the SDK
client drives with its callbacks.
"""

import base64
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext

from tests.everything_support import UPSTREAMS, Everything
from tests.support import text

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
