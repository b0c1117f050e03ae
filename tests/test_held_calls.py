"""Questions a handshake-era upstream asks mid-call reach a 2026-07-28 client as an input-required round trip.

The testkit's ``ask_user`` (elicitation) and ``ask_model`` (sampling) send server→client requests; behind the
gateway, a 2026-07-28 ``Client`` answers them with its callbacks, the SDK driving the retries.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.shared.exceptions import MCPError

from gateway.config import parse_config
from gateway.gateway import Gateway, open_gateway
from gateway.server import McpFrontend
from gateway.types import Principal
from tests.support import TESTKIT, free_port, run_gateway, run_http_upstream, stdio_server, text

pytestmark = pytest.mark.anyio

WITHIN = 20.0


async def sampling(
    context: ClientRequestContext, params: types.CreateMessageRequestParams
) -> types.CreateMessageResult:
    question = params.messages[0].content
    assert isinstance(question, types.TextContent)
    return types.CreateMessageResult(
        role="assistant", content=types.TextContent(type="text", text=f"model says: {question.text}"), model="m"
    )


async def elicitation(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"answer": f"blue ({params.message})"})


def answering_client(url: str) -> Client:
    return Client(url, mode="2026-07-28", cache=None, sampling_callback=sampling, elicitation_callback=elicitation)


async def check_questions_are_answered(url: str) -> None:
    with anyio.fail_after(WITHIN):
        async with answering_client(url) as client:
            assert client.protocol_version == "2026-07-28"
            elicited = await client.call_tool("kit__ask_user", {"question": "colour?"})
            assert text(elicited) == "accept: blue (colour?)"
            sampled = await client.call_tool("kit__ask_model", {"prompt": "hello?"})
            assert text(sampled) == "model says: hello?"
            assert text(await client.call_tool("kit__echo", {"text": "after"})) == "after"


async def test_a_2026_client_answers_a_stdio_upstreams_questions(tmp_path: Path) -> None:
    async with run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw:
        await check_questions_are_answered(gw.url)


async def test_a_2026_client_answers_an_sse_upstreams_questions(tmp_path: Path) -> None:
    port = free_port()
    async with run_http_upstream(tmp_path, TESTKIT, port, name="kit", sse=True):
        config = f'servers:\n  kit: {{url: "http://127.0.0.1:{port}/sse", sse: true}}\n'
        async with run_gateway(tmp_path, config) as gw:
            await check_questions_are_answered(gw.url)


# -- the requestState the gateway mints, in-process over a stdio upstream ---------------------------------------


@asynccontextmanager
async def gateway_with_kit(extra: str = "") -> AsyncIterator[Gateway]:
    config = f"servers:\n  kit: {stdio_server(TESTKIT)}\n{extra}"
    with anyio.fail_after(WITHIN):
        async with open_gateway(parse_config(config, environ={})) as gateway:
            yield gateway


def client_of(frontend: McpFrontend) -> Client:
    return Client(frontend.server, mode="2026-07-28", cache=None, elicitation_callback=elicitation)


async def ask(client: Client, **retry: Any) -> types.CallToolResult | types.InputRequiredResult:
    return await client.session.call_tool("kit__ask_user", {"question": "colour?"}, allow_input_required=True, **retry)


ANSWER = {"q1": types.ElicitResult(action="accept", content={"answer": "red"})}


def refusal(raised: pytest.ExceptionInfo[MCPError]) -> str:
    assert raised.value.error.code == types.INVALID_PARAMS
    data = raised.value.error.data
    assert isinstance(data, dict)
    return str(data["reason"])


async def test_the_answer_to_an_input_request_completes_the_held_upstream_call() -> None:
    async with gateway_with_kit() as gateway, client_of(McpFrontend(gateway, Principal("ada"))) as client:
        asked = await ask(client)
        assert isinstance(asked, types.InputRequiredResult)
        assert asked.request_state is not None
        assert asked.input_requests is not None
        assert [r.method for r in asked.input_requests.values()] == ["elicitation/create"]
        done = await ask(client, input_responses=ANSWER, request_state=asked.request_state)
        assert isinstance(done, types.CallToolResult)
        assert text(done) == "accept: red"


async def test_a_forged_request_state_is_refused() -> None:
    async with gateway_with_kit() as gateway, client_of(McpFrontend(gateway, Principal("ada"))) as client:
        asked = await ask(client)
        assert isinstance(asked, types.InputRequiredResult)
        state = asked.request_state
        assert state is not None
        body, _, mac = state.partition(".")
        tampered = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + mac
        with pytest.raises(MCPError) as raised:
            await ask(client, input_responses=ANSWER, request_state=tampered)
        assert refusal(raised) == "forged"
        done = await ask(client, input_responses=ANSWER, request_state=state)  # the call is still held
        assert isinstance(done, types.CallToolResult)


async def test_a_request_state_is_good_for_one_retry() -> None:
    async with gateway_with_kit() as gateway, client_of(McpFrontend(gateway, Principal("ada"))) as client:
        first = await ask(client)
        assert isinstance(first, types.InputRequiredResult)
        again = await ask(client, input_responses={}, request_state=first.request_state)  # unanswered: asked again
        assert isinstance(again, types.InputRequiredResult)
        assert again.request_state != first.request_state
        with pytest.raises(MCPError) as raised:
            await ask(client, input_responses=ANSWER, request_state=first.request_state)
        assert refusal(raised) == "used"
        done = await ask(client, input_responses=ANSWER, request_state=again.request_state)
        assert isinstance(done, types.CallToolResult)
        replayed = await ask(client, input_responses=ANSWER, request_state=again.request_state)
        assert isinstance(replayed, types.CallToolResult)
        assert replayed.is_error  # the call is over: nothing to resume


async def test_another_clients_request_state_is_refused() -> None:
    async with (
        gateway_with_kit() as gateway,
        client_of(McpFrontend(gateway, Principal("ada"))) as ada,
        client_of(McpFrontend(gateway, Principal("bob"))) as bob,
    ):
        asked = await ask(ada)
        assert isinstance(asked, types.InputRequiredResult)
        with pytest.raises(MCPError) as raised:
            await ask(bob, input_responses=ANSWER, request_state=asked.request_state)
        assert refusal(raised) == "other_client"


async def test_a_request_state_for_other_arguments_is_refused() -> None:
    async with gateway_with_kit() as gateway, client_of(McpFrontend(gateway, Principal("ada"))) as client:
        asked = await ask(client)
        assert isinstance(asked, types.InputRequiredResult)
        with pytest.raises(MCPError) as raised:
            await client.session.call_tool(
                "kit__ask_user",
                {"question": "something else?"},
                input_responses=ANSWER,
                request_state=asked.request_state,
                allow_input_required=True,
            )
        assert refusal(raised) == "other_request"


async def test_a_state_signed_with_the_configured_key_is_accepted_by_another_gateway_with_it() -> None:
    extra = "gateway:\n  state_key: 0123456789abcdef-secret\n"
    async with (
        gateway_with_kit(extra) as first,
        gateway_with_kit(extra) as second,
        gateway_with_kit() as random_key,
        client_of(McpFrontend(first, Principal("ada"))) as client,
        client_of(McpFrontend(second, Principal("ada"))) as same_key,
        client_of(McpFrontend(random_key, Principal("ada"))) as other_key,
    ):
        asked = await ask(client)
        assert isinstance(asked, types.InputRequiredResult)
        gone = await ask(same_key, input_responses=ANSWER, request_state=asked.request_state)
        assert isinstance(gone, types.CallToolResult)
        assert gone.is_error  # signature accepted; that gateway holds no such call
        with pytest.raises(MCPError) as raised:
            await ask(other_key, input_responses=ANSWER, request_state=asked.request_state)
        assert refusal(raised) == "forged"


# -- the lean path (gateway.fastpath) holds a 2026-07-28 call as the SDK side does --------------------------------


async def test_the_lean_path_asks_a_held_calls_questions_as_the_sdk_side_does(tmp_path: Path) -> None:
    envelope = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}},
    }
    message = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "kit__ask_user", "arguments": {"question": "colour?"}, "_meta": envelope},
    }
    headers = {
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "kit__ask_user",
    }
    sdk_side = {"mcp-param-unused": "x"}  # a header only the SDK side reads: the lean path leaves the call to it
    async with run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw:
        async with httpx2.AsyncClient(timeout=WITHIN) as http:
            # One at a time: the stdio upstream's questions carry no link to their call, so the gateway routes one
            # only while a single call is in flight there.
            lean = await http.post(gw.url, json=message, headers=headers)
            asked = lean.json()["result"]
            assert asked["resultType"] == "input_required"
            (key,) = asked["inputRequests"]
            assert asked["inputRequests"][key]["method"] == "elicitation/create"
            # The retry (the SDK side's) delivers the answer to the call the lean path holds.
            answer = {key: {"action": "accept", "content": {"answer": "green"}}}
            retry = {**message, "id": 2, "params": {**message["params"], "inputResponses": answer}}
            retry["params"]["requestState"] = lean_state = asked.pop("requestState")
            done = await http.post(gw.url, json=retry, headers=headers)
            assert done.json()["result"]["content"][0]["text"] == "accept: green"
            sdk = await http.post(gw.url, json=message, headers={**headers, **sdk_side})
            asked_too = sdk.json()["result"]
            retry["params"]["requestState"] = sdk_state = asked_too.pop("requestState")
            assert asked == asked_too
            # The same answer, states aside, but not the same bytes: two writers (the SDK's JSON is compact).
            stateless = [r.content.replace(state.encode(), b"") for r, state in ((lean, lean_state), (sdk, sdk_state))]
            assert stateless[0] != stateless[1]
            done = await http.post(gw.url, json=retry, headers=headers)
            assert done.json()["result"]["content"][0]["text"] == "accept: green"
