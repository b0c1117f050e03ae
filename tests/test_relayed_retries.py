"""A 2026-07-28 client's retry that reaches another replica is relayed through the shared store to the one
holding its call (``gateway.roundtrip``): replicas of one gateway, in one process, sharing a durable store and
the state key."""

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from gateway.config import parse_config
from gateway.errors import InvalidRequestState, UpstreamError
from gateway.gateway import Gateway, open_gateway
from gateway.requeststate import StateSigner
from gateway.roundtrip import RoundTrips
from gateway.server import McpFrontend
from gateway.store.memory import MemoryStore
from gateway.types import CallContext, JSONObject, Principal, ToolResult
from tests.support import TESTKIT, stdio_server, text

pytestmark = pytest.mark.anyio

WITHIN = 20.0

WORKFLOWS = """
workflows:
  greet:
    input: {type: object, properties: {name: {type: string}}, required: [name]}
    steps:
      - {id: ok, ask_user: {message: "Greet ${.input.name}?"}}
    output: {ok: "${.steps.ok.result.ok}"}
  twice:
    steps:
      - {id: first, ask_user: {message: "First?"}}
      - {id: second, ask_user: {message: "Second?"}, after: [first]}
    output: {first: "${.steps.first.result.ok}", second: "${.steps.second.result.ok}"}
"""


def config(url: str, extra: str = WORKFLOWS) -> str:
    return f'gateway:\n  store: "{url}"\n  state_key: 0123456789abcdef-secret\n{extra}'


@asynccontextmanager
async def replica(url: str, extra: str = WORKFLOWS) -> AsyncIterator[Gateway]:
    async with open_gateway(parse_config(config(url, extra), environ={})) as gateway:
        yield gateway


def client_of(gateway: Gateway, who: str = "ada") -> Client:
    """A 2026-07-28 client that declares elicitation (answered through the round trip, never as a request)."""
    return Client(
        McpFrontend(gateway, Principal(who)).server, mode="2026-07-28", cache=None, elicitation_callback=_never
    )


async def call(client: Client, name: str, arguments: dict[str, Any], **retry: Any) -> Any:
    return await client.session.call_tool(name, arguments, allow_input_required=True, **retry)


def answer(asked: types.InputRequiredResult, ok: bool = True) -> dict[str, Any]:
    assert asked.input_requests is not None
    (key,) = asked.input_requests
    return {"input_responses": {key: types.ElicitResult(action="accept", content={"ok": ok})}}


def refusal(raised: pytest.ExceptionInfo[MCPError]) -> str:
    assert raised.value.error.code == types.INVALID_PARAMS
    data = raised.value.error.data
    assert isinstance(data, dict)
    return str(data["reason"])


async def test_a_retry_at_another_replica_completes_the_workflow_held_at_the_first(durable_url: str) -> None:
    with anyio.fail_after(WITHIN):
        async with replica(durable_url) as a, replica(durable_url) as b, client_of(a) as at_a, client_of(b) as at_b:
            asked = await call(at_a, "greet", {"name": "ada"})
            assert isinstance(asked, types.InputRequiredResult)
            done = await call(at_b, "greet", {"name": "ada"}, request_state=asked.request_state, **answer(asked))
    assert isinstance(done, types.CallToolResult)
    assert not done.is_error, text(done)
    assert done.structured_content == {"ok": True}


async def test_two_questions_are_answered_at_one_replica_then_the_other(durable_url: str) -> None:
    with anyio.fail_after(WITHIN):
        async with replica(durable_url) as a, replica(durable_url) as b, client_of(a) as at_a, client_of(b) as at_b:
            first = await call(at_a, "twice", {})
            assert isinstance(first, types.InputRequiredResult)
            second = await call(at_b, "twice", {}, request_state=first.request_state, **answer(first, True))
            assert isinstance(second, types.InputRequiredResult)  # the next question, relayed back with a fresh state
            assert second.request_state != first.request_state
            assert second.input_requests is not None
            [asked] = second.input_requests.values()
            assert asked.params.message == "Second?"  # type: ignore[union-attr]
            done = await call(at_a, "twice", {}, request_state=second.request_state, **answer(second, False))
    assert isinstance(done, types.CallToolResult)
    assert done.structured_content == {"first": True, "second": False}


async def test_a_relayed_retry_with_a_used_or_another_clients_state_is_refused_as_a_local_one(
    durable_url: str,
) -> None:
    with anyio.fail_after(WITHIN):
        async with (
            replica(durable_url) as a,
            replica(durable_url) as b,
            client_of(a) as at_a,
            client_of(b) as at_b,
            client_of(a, "bob") as bob_at_a,
            client_of(b, "bob") as bob_at_b,
        ):
            first = await call(at_a, "twice", {})
            assert isinstance(first, types.InputRequiredResult)
            second = await call(at_b, "twice", {}, request_state=first.request_state, **answer(first))
            assert isinstance(second, types.InputRequiredResult)
            reasons = []
            for client, state in ((at_b, first), (at_a, first), (bob_at_b, second), (bob_at_a, second)):
                with pytest.raises(MCPError) as raised:
                    await call(client, "twice", {}, request_state=state.request_state, **answer(state))
                reasons.append(refusal(raised))
            done = await call(at_b, "twice", {}, request_state=second.request_state, **answer(second))  # still held
    assert reasons == ["used", "used", "other_client", "other_client"]
    assert isinstance(done, types.CallToolResult)
    assert done.structured_content == {"first": True, "second": True}


async def test_a_retry_of_a_call_that_ended_or_whose_holder_is_gone_is_no_longer_waiting(durable_url: str) -> None:
    with anyio.fail_after(WITHIN):
        async with replica(durable_url) as b, client_of(b) as at_b:
            async with replica(durable_url) as a, client_of(a) as at_a:
                asked = await call(at_a, "greet", {"name": "ada"})
                assert isinstance(asked, types.InputRequiredResult)
                done = await call(at_b, "greet", {"name": "ada"}, request_state=asked.request_state, **answer(asked))
                assert isinstance(done, types.CallToolResult)
                ended = await call(at_b, "greet", {"name": "ada"}, request_state=asked.request_state, **answer(asked))
                held = await call(at_a, "greet", {"name": "bob"})
                assert isinstance(held, types.InputRequiredResult)
            started = time.monotonic()
            gone = await call(at_b, "greet", {"name": "bob"}, request_state=held.request_state, **answer(held))
            took = time.monotonic() - started
    assert isinstance(ended, types.CallToolResult)
    assert ended.is_error
    assert "no longer waiting" in text(ended)
    assert isinstance(gone, types.CallToolResult)
    assert gone.is_error
    assert "no longer waiting" in text(gone)
    assert took < 2.0  # the holder's instance is known to be gone: no wait for the state to expire


# -- an upstream's question mid-call (a held upstream tool call) --------------------------------------------------


async def test_a_held_upstream_call_is_answered_through_another_replica(tmp_path: Path) -> None:
    # One store kind is enough here (the workflow tests cover both); each replica starts its own stdio upstream.
    durable_url = f"sqlite:///{tmp_path / 'patchbay.db'}"
    kit = f"servers:\n  kit: {stdio_server(TESTKIT)}\n"
    question = {"question": "colour?"}
    with anyio.fail_after(WITHIN):
        async with replica(durable_url, kit) as a, replica(durable_url, kit) as b:
            async with client_of(a) as at_a, client_of(b) as at_b:
                asked = await call(at_a, "kit__ask_user", question)
                assert isinstance(asked, types.InputRequiredResult)
                assert asked.input_requests is not None
                (key,) = asked.input_requests
                red = {key: types.ElicitResult(action="accept", content={"answer": "red"})}
                done = await call(
                    at_b, "kit__ask_user", question, request_state=asked.request_state, input_responses=red
                )
    assert isinstance(done, types.CallToolResult)
    assert text(done) == "accept: red"


async def _never(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
    raise AssertionError("a 2026-07-28 client is asked through the round trip, not with a request")


# -- the round trips alone, on one memory store -------------------------------------------------------------------


class _Client:
    """A 2026-07-28 client's channel: what a held call needs to know it may ask."""

    capabilities: JSONObject = {"elicitation": {}}
    protocol_version = "2026-07-28"

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        raise AssertionError("held calls ask through their result")

    async def log(self, params: JSONObject) -> None:
        return None


async def _asks(context: CallContext) -> ToolResult:
    assert context.client is not None
    try:
        answered = await context.client.request("elicitation/create", {"message": "ok?"})
    except UpstreamError as exc:  # not answered in time
        return ToolResult.text(str(exc), is_error=True)
    return ToolResult.text(f"answered {answered}")


async def test_a_retry_nobody_takes_is_no_longer_waiting_once_its_state_expires() -> None:
    store, signer = MemoryStore(), StateSigner(b"k" * 32)
    holder = RoundTrips(lambda: None, signer=signer, store=store, name="workflows", answer_timeout=0.3)
    other = RoundTrips(lambda: None, signer=signer, store=store, name="workflows")
    ada = CallContext(Principal("ada"), client=_Client())
    with anyio.fail_after(WITHIN):
        async with anyio.create_task_group() as background:
            asked = await holder.start(_asks, ada, request="r", group=background)  # the holder serves no relays
            assert asked.input_required is not None
            state = asked.input_required["requestState"]
            retry = CallContext(Principal("ada"), input_responses={"q1": {"action": "accept"}}, request_state=state)
            started = time.monotonic()
            gone = await other.resume(retry, request="r")
            took = time.monotonic() - started
            background.cancel_scope.cancel()
    assert gone.is_error
    assert "no longer waiting" in str(gone.content[0]["text"])
    assert 0.1 < took < 2.0
    assert await store.relay_take(str(holder.holder)) == []  # withdrawn


async def test_a_relayed_retry_is_checked_by_the_holder_and_its_refusal_raised_where_it_arrived() -> None:
    store, signer = MemoryStore(), StateSigner(b"k" * 32)
    holder = RoundTrips(lambda: None, signer=signer, store=store, name="workflows")
    other = RoundTrips(lambda: None, signer=signer, store=store, name="workflows")
    ada = CallContext(Principal("ada"), client=_Client())
    with anyio.fail_after(WITHIN):
        async with anyio.create_task_group() as background:
            await background.start(holder.serve_relays)
            asked = await holder.start(_asks, ada, request="r", group=background)
            assert asked.input_required is not None
            state = asked.input_required["requestState"]
            unanswered = CallContext(Principal("ada"), input_responses={}, request_state=state)
            again = await other.resume(unanswered, request="r")  # relayed: asked again, with a fresh state
            assert again.input_required is not None
            with pytest.raises(InvalidRequestState) as raised:
                await other.resume(unanswered, request="r")  # the holder knows it was used
            answered = {"q1": {"action": "accept"}}
            fresh = CallContext(
                Principal("ada"), input_responses=answered, request_state=again.input_required["requestState"]
            )
            done = await other.resume(fresh, request="r")
            background.cancel_scope.cancel()
    assert raised.value.reason == "used"
    assert done.content[0]["text"] == "answered {'action': 'accept'}"
