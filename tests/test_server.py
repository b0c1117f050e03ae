"""``McpFrontend`` in-process: the SDK's in-memory client in both eras, a gateway over an in-process upstream."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.client.session import ClientRequestContext
from mcp.shared.exceptions import MCPDeprecationWarning

from gateway.server import McpFrontend
from gateway.types import Principal
from tests.inprocess import (
    LOCAL,
    UPSTREAM_DEPRECATIONS,
    WITHIN,
    Upstream,
    frontend_client,
    gateway_over,
    make_upstream,
    serve_upstream,
    tool_names,
)
from tests.support import text
from tests.taskclient import rpc_error

pytestmark = [pytest.mark.anyio, *UPSTREAM_DEPRECATIONS]

ERAS = ["legacy", "2026-07-28"]


@asynccontextmanager
async def frontend(upstream: Upstream, extra: str = "", principal: Principal = LOCAL) -> AsyncIterator[McpFrontend]:
    """A frontend for a gateway whose one server, ``kit``, is ``upstream`` served over HTTP."""
    with anyio.fail_after(WITHIN):
        async with serve_upstream(upstream) as url, gateway_over(url, extra) as gateway:
            yield McpFrontend(gateway, principal)


@pytest.mark.parametrize("mode", ERAS)
async def test_tools_are_listed_under_their_prefix_and_called_in_both_eras(mode: str) -> None:
    async with frontend(make_upstream()) as fe, frontend_client(fe, mode) as client:
        assert {"kit__echo", "kit__progress", "kit__wait"} <= tool_names(await client.list_tools())
        result = await client.call_tool("kit__echo", {"text": "hello"})
        assert not result.is_error
        assert text(result) == "hello"
        assert result.structured_content == {"result": "hello"}


async def test_list_changed_is_advertised_to_handshake_era_clients() -> None:
    async with frontend(make_upstream()) as fe, frontend_client(fe, "legacy") as client:
        capabilities = client.server_capabilities
        assert capabilities.tools is not None
        assert capabilities.tools.list_changed
        assert capabilities.prompts is not None
        assert capabilities.prompts.list_changed
        assert capabilities.resources is not None
        assert capabilities.resources.list_changed


@pytest.mark.parametrize("mode", ERAS)
async def test_an_unknown_tool_is_a_json_rpc_invalid_params_error(mode: str) -> None:
    async with frontend(make_upstream()) as fe, frontend_client(fe, mode) as client:
        with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, sometimes inside an ExceptionGroup
            await client.call_tool("kit__no_such_tool", {})
        error = rpc_error(raised)
        assert error.code == types.INVALID_PARAMS
        assert "kit__no_such_tool" in error.message


@pytest.mark.parametrize("mode", ERAS)
async def test_a_call_a_policy_refuses_is_an_is_error_result_that_says_why(mode: str) -> None:
    policy = 'policies:\n  - {deny: "kit__echo", reason: "echoes are not allowed here"}\n'
    async with frontend(make_upstream(), policy) as fe, frontend_client(fe, mode) as client:
        result = await client.call_tool("kit__echo", {"text": "hello"})
        assert result.is_error
        assert "echoes are not allowed here" in text(result)


@pytest.mark.parametrize("mode", ERAS)
async def test_an_upstream_tool_error_is_passed_through_as_an_is_error_result(mode: str) -> None:
    async with frontend(make_upstream()) as fe, frontend_client(fe, mode) as client:
        result = await client.call_tool("kit__fail", {"message": "out of stock"})
        assert result.is_error
        assert "out of stock" in text(result)


async def test_a_client_sees_only_the_tools_it_may_call() -> None:
    clients = 'clients:\n  bot: {token_sha256: "' + "0" * 64 + '", tools: ["kit__echo"]}\n'
    async with (
        frontend(make_upstream(), clients, principal=Principal("bot")) as fe,
        frontend_client(fe, "legacy") as client,
    ):
        assert tool_names(await client.list_tools()) == {"kit__echo"}
        refused = await client.call_tool("kit__progress", {"steps": 1})
        assert refused.is_error


@pytest.mark.parametrize("mode", ERAS)
async def test_progress_and_log_messages_reach_the_calling_client(mode: str) -> None:
    progress: list[tuple[float, float | None, str | None]] = []
    logs: list[tuple[str, Any]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append((params.level, params.data))

    async with (
        frontend(make_upstream()) as fe,
        frontend_client(fe, mode, logging_callback=on_log, log_level="debug") as client,
    ):
        result = await client.call_tool("kit__progress", {"steps": 2}, progress_callback=on_progress)
        assert text(result) == "2 steps"
    assert progress == [(1, 2, "step 1"), (2, 2, "step 2")]
    assert logs == [("debug", "debug detail"), ("warning", "finished 2 steps")]


async def test_each_client_gets_only_the_log_messages_at_or_above_the_level_it_set() -> None:
    quiet_logs: list[Any] = []
    chatty_logs: list[Any] = []

    async def quiet_log(params: types.LoggingMessageNotificationParams) -> None:
        quiet_logs.append(params.data)

    async def chatty_log(params: types.LoggingMessageNotificationParams) -> None:
        chatty_logs.append(params.data)

    async with (
        frontend(make_upstream()) as fe,
        frontend_client(fe, "legacy", logging_callback=quiet_log) as quiet,
        frontend_client(fe, "legacy", logging_callback=chatty_log) as chatty,
    ):
        with pytest.warns(MCPDeprecationWarning):
            await quiet.set_logging_level("warning")
        await quiet.call_tool("kit__progress", {"steps": 1})
        await chatty.call_tool("kit__progress", {"steps": 1})
    assert quiet_logs == ["finished 1 steps"]
    assert chatty_logs == ["debug detail", "finished 1 steps"]


async def test_a_2026_client_gets_log_messages_at_the_level_its_requests_ask_for() -> None:
    logs: list[Any] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params.data)

    async with (
        frontend(make_upstream()) as fe,
        frontend_client(fe, "2026-07-28", logging_callback=on_log, log_level="warning") as client,
    ):
        await client.call_tool("kit__progress", {"steps": 1})
    assert logs == ["finished 1 steps"]


async def test_a_connected_handshake_era_client_is_told_when_the_registry_changes() -> None:
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ServerNotification) and message.method == "notifications/tools/list_changed":
            changed.set()

    async with frontend(make_upstream()) as fe, frontend_client(fe, "legacy", message_handler=on_message) as client:
        assert "kit__brand_new" not in tool_names(await client.list_tools())
        await client.call_tool("kit__add_tool", {"tool_name": "brand_new"})
        with anyio.fail_after(WITHIN):
            await changed.wait()
        assert "kit__brand_new" in tool_names(await client.list_tools())
        assert text(await client.call_tool("kit__brand_new", {})) == "I am brand_new"


async def test_a_2026_client_hears_of_registry_changes_on_its_listen_stream() -> None:
    async with (
        frontend(make_upstream()) as fe,
        frontend_client(fe, "2026-07-28") as client,
        client.listen(tools_list_changed=True) as events,
        frontend_client(fe, "legacy") as other,
    ):
        await other.call_tool("kit__add_tool", {"tool_name": "announced"})
        with anyio.fail_after(WITHIN):
            async for _event in events:
                break
        assert "kit__announced" in tool_names(await client.list_tools())


@pytest.mark.parametrize("mode", ERAS)
async def test_prompts_are_listed_under_their_prefix_and_fetched_from_their_owner(mode: str) -> None:
    async with frontend(make_upstream()) as fe, frontend_client(fe, mode) as client:
        assert [p.name for p in (await client.list_prompts()).prompts] == ["kit__greet"]
        prompt = await client.get_prompt("kit__greet", {"person": "Ada"})
        content = prompt.messages[0].content
        assert isinstance(content, types.TextContent)
        assert content.text == "Hello, Ada!"
        with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, sometimes inside an ExceptionGroup
            await client.get_prompt("kit__nope", {})
        assert rpc_error(raised).code == types.INVALID_PARAMS


@pytest.mark.parametrize("mode", ERAS)
async def test_a_prompt_request_carries_the_callers_own_meta_entries_and_nothing_of_this_hop(mode: str) -> None:
    upstream = make_upstream()
    async with frontend(upstream) as fe, frontend_client(fe, mode) as client:
        meta = {"example.com/trace": "t-1", "progressToken": 7}
        await client.get_prompt("kit__greet", {"person": "Ada"}, meta=meta)
    [seen] = upstream.prompt_meta
    assert seen["example.com/trace"] == "t-1"
    assert seen.get("progress_token") != 7  # the client's token is this connection's; the upstream call has its own
    assert [key for key in seen if key.startswith("io.modelcontextprotocol/")] == []  # a 2026 client's envelope


@pytest.mark.parametrize("mode", ERAS)
async def test_resources_and_templates_are_listed_and_read_from_their_owner(mode: str) -> None:
    async with frontend(make_upstream()) as fe, frontend_client(fe, mode) as client:
        assert [str(r.uri) for r in (await client.list_resources()).resources] == ["kit://static"]
        templates = (await client.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["kit://items/{item_id}"]
        read = await client.read_resource("kit://items/7")
        content = read.contents[0]
        assert isinstance(content, types.TextResourceContents)
        assert content.text == "item 7"
        with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, sometimes inside an ExceptionGroup
            await client.read_resource("nobody://owns/this")
        assert rpc_error(raised).code == types.INVALID_PARAMS


@pytest.mark.parametrize("mode", ERAS)
async def test_completions_are_asked_of_the_owner_of_the_prompt_or_template(mode: str) -> None:
    upstream = make_upstream()
    async with frontend(upstream) as fe, frontend_client(fe, mode) as client:
        prompt = await client.complete(types.PromptReference(name="kit__greet"), {"name": "person", "value": "A"})
        assert prompt.completion.values == ["Ada", "Alan"]
        template = types.ResourceTemplateReference(uri="kit://items/{item_id}")
        item = await client.complete(template, {"name": "item_id", "value": "2"})
        assert item.completion.values == ["2"]
    # The owner is asked under its own name for the prompt, not the gateway's.
    assert upstream.events == ["completed person of greet", "completed item_id of kit://items/{item_id}"]


async def test_sampling_asked_by_an_upstream_mid_call_reaches_the_calling_client() -> None:
    async def sampling(
        context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        question = params.messages[0].content
        assert isinstance(question, types.TextContent)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text=f"model says: {question.text}"), model="m"
        )

    async with (
        frontend(make_upstream()) as fe,
        frontend_client(fe, "legacy", sampling_callback=sampling) as client,
    ):
        result = await client.call_tool("kit__ask_model", {"prompt": "hello?"})
        assert text(result) == "model says: hello?"


async def test_sampling_is_refused_upstream_when_the_calling_client_cannot_sample() -> None:
    async with frontend(make_upstream()) as fe, frontend_client(fe, "legacy") as client:
        result = await client.call_tool("kit__ask_model", {"prompt": "hello?"})
        assert text(result) == "refused: the client behind patchbay does not support sampling/createMessage"
        assert text(await client.call_tool("kit__echo", {"text": "still serving"})) == "still serving"


# Handshake-era clients still subscribe; the SDK client warns that 2026-07-28 removed it.
@pytest.mark.filterwarnings("ignore:resources/.*subscribe is removed:mcp.shared.exceptions.MCPDeprecationWarning")
async def test_resource_subscriptions_are_shared_upstream_and_updates_reach_each_subscriber() -> None:
    upstream = make_upstream()
    updated: dict[str, list[str]] = {"ada": [], "bob": []}
    heard = {"ada": anyio.Event(), "bob": anyio.Event()}

    def on_message(name: str) -> Any:
        async def record(message: Any) -> None:
            if isinstance(message, types.ResourceUpdatedNotification):
                updated[name].append(str(message.params.uri))
                heard[name].set()

        return record

    async with (
        frontend(upstream) as fe,
        frontend_client(fe, "legacy", message_handler=on_message("ada")) as ada,
        frontend_client(fe, "legacy", message_handler=on_message("bob")) as bob,
    ):
        await ada.session.subscribe_resource("kit://static")
        await bob.session.subscribe_resource("kit://static")
        assert upstream.events == ["subscribed kit://static"]  # once, for every client
        await ada.call_tool("kit__touch", {"uri": "kit://static"})
        with anyio.fail_after(WITHIN):
            await heard["ada"].wait()
            await heard["bob"].wait()
        await ada.session.unsubscribe_resource("kit://static")
        assert upstream.events == ["subscribed kit://static"]  # bob still listens
        await bob.session.unsubscribe_resource("kit://static")
        assert upstream.events == ["subscribed kit://static", "unsubscribed kit://static"]
    assert updated == {"ada": ["kit://static"], "bob": ["kit://static"]}


async def test_a_client_that_fails_a_sampling_request_makes_the_upstream_hear_why_in_its_own_words() -> None:
    async def sampling(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> types.ErrorData:
        return types.ErrorData(code=types.INVALID_REQUEST, message="the user said no")

    async with (
        frontend(make_upstream()) as fe,
        frontend_client(fe, "legacy", sampling_callback=sampling) as client,
    ):
        result = await client.call_tool("kit__ask_model", {"prompt": "hello?"})
        assert text(result) == "refused: the user said no"


async def test_a_2026_client_answers_an_upstreams_input_request_through_the_gateway() -> None:
    asked: list[str] = []

    async def elicitation(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"ok": True})

    async with (
        frontend(make_upstream()) as fe,
        frontend_client(fe, "2026-07-28", elicitation_callback=elicitation) as client,
    ):
        result = await client.call_tool("kit__confirm", {"action": "delete"})
    assert asked == ["Really delete?"]
    assert text(result) == "delete: accept {'ok': True} (state: pending delete)"


@pytest.mark.parametrize("mode", ERAS)
async def test_the_callers_own_meta_entries_reach_the_upstream(mode: str) -> None:
    async with frontend(make_upstream()) as fe, frontend_client(fe, mode) as client:
        result = await client.call_tool("kit__request_meta", {}, meta={"example.com/trace": "t-1"})
    seen = result.structured_content
    assert seen is not None
    assert seen["example.com/trace"] == "t-1"
