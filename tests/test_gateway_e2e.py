"""The gateway end to end: real upstream processes, ``patchbay serve`` as a process, real MCP clients."""

import json
import os
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.session import ClientRequestContext
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError

from tests.support import PYTHON, ROOT, TESTKIT, free_port, run_gateway, run_http_upstream, stdio_server

pytestmark = pytest.mark.anyio

KB = ROOT / "examples" / "servers" / "kb.py"
ORDERS = ROOT / "examples" / "servers" / "orders.py"
ERAS = ["legacy", "2026-07-28"]


def without_hop_stamp(result: types.CallToolResult) -> dict[str, Any]:
    """The result minus the 2026-07-28 ``serverInfo`` stamp, which names whichever server answered this hop."""
    dumped = result.model_dump()
    meta = {k: v for k, v in (dumped.pop("meta") or {}).items() if k != "io.modelcontextprotocol/serverInfo"}
    return {**dumped, "meta": meta}


def tool_names(result: types.ListToolsResult) -> set[str]:
    return {tool.name for tool in result.tools}


async def until(predicate: Any, within: float = 15.0) -> None:
    """Poll an async predicate until it holds (for state that changes in another process)."""
    with anyio.fail_after(within):
        while not await predicate():  # noqa: ASYNC110 - the state lives in another process
            await anyio.sleep(0.1)


@pytest.fixture
async def kb_port(tmp_path: Path) -> Any:
    port = free_port()
    async with run_http_upstream(tmp_path, KB, port, name="kb"):
        yield port


@pytest.mark.parametrize("mode", ERAS)
async def test_stdio_and_http_upstreams_are_merged_under_their_prefixes(
    tmp_path: Path, kb_port: int, mode: str
) -> None:
    config = f"""
servers:
  orders: {stdio_server(ORDERS)}
  kb: {{url: "http://127.0.0.1:{kb_port}/mcp"}}
"""
    async with run_gateway(tmp_path, config) as gw, Client(gw.url, mode=mode, cache=None) as client:
        names = tool_names(await client.list_tools())
        assert {"orders__get_order", "orders__refund_order", "kb__search", "kb__get_article"} <= names
        result = await client.call_tool("kb__search", {"query": "refund", "limit": 1})
        assert not result.is_error
        assert result.structured_content is not None
        assert result.structured_content["results"][0]["title"] == "Refund policy"
        order = await client.call_tool("orders__get_order", {"order_id": "A-1001"})
        assert order.structured_content is not None
        assert order.structured_content["id"] == "A-1001"


@pytest.mark.parametrize("mode", ERAS)
async def test_results_pass_through_exactly_as_the_upstream_sent_them(tmp_path: Path, kb_port: int, mode: str) -> None:
    config = f'servers:\n  kb: {{url: "http://127.0.0.1:{kb_port}/mcp"}}\n'
    async with (
        run_gateway(tmp_path, config) as gw,
        Client(gw.url, mode=mode, cache=None) as via_gateway,
        Client(f"http://127.0.0.1:{kb_port}/mcp", mode=mode, cache=None) as direct,
    ):
        for name, args in [("search", {"query": "shipping"}), ("get_article", {"article_id": "nope"})]:
            expected = await direct.call_tool(name, args)
            got = await via_gateway.call_tool(f"kb__{name}", args)
            assert without_hop_stamp(got) == without_hop_stamp(expected)
        listed = {t.name: t for t in (await via_gateway.list_tools()).tools}
        for tool in (await direct.list_tools()).tools:
            assert listed[f"kb__{tool.name}"].model_dump(exclude={"name"}) == tool.model_dump(exclude={"name"})


@pytest.mark.parametrize("mode", ERAS)
async def test_stdio_downstream_serves_both_eras(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "stdio.yaml"
    path.write_text(f"servers:\n  kit: {stdio_server(TESTKIT)}\n")
    params = StdioServerParameters(command=PYTHON, args=["-m", "gateway", "serve", str(path), "--stdio"], cwd=ROOT)
    async with Client(params, mode=mode, cache=None) as client:
        assert "kit__echo" in tool_names(await client.list_tools())
        result = await client.call_tool("kit__echo", {"text": "over stdio"})
        assert result.content[0].text == "over stdio"  # type: ignore[union-attr]
        prompt = await client.get_prompt("kit__greet", {"name": "Ada"})
        assert "Hello, Ada!" in str(prompt.messages[0].content)
        resource = await client.read_resource("kit://items/7")
        assert resource.contents[0].text == "item 7"  # type: ignore[union-attr]


async def test_unknown_tool_is_a_json_rpc_invalid_params_error(tmp_path: Path) -> None:
    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        Client(gw.url, mode="legacy", cache=None) as client,
    ):
        with pytest.raises(Exception) as raised:  # noqa: PT011 - the SDK raises MCPError inside an ExceptionGroup
            await client.call_tool("kit__no_such_tool", {})
        error = raised.value
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        assert isinstance(error, MCPError)
        assert error.error.code == types.INVALID_PARAMS


async def test_a_tool_error_from_upstream_is_an_is_error_result(tmp_path: Path) -> None:
    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        Client(gw.url, mode="legacy", cache=None) as client,
    ):
        result = await client.call_tool("kit__fail", {"message": "out of stock"})
        assert result.is_error
        assert "out of stock" in result.content[0].text  # type: ignore[union-attr]


async def test_crashed_stdio_upstream_gives_is_error_then_is_restarted(tmp_path: Path) -> None:
    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        Client(gw.url, mode="legacy", cache=None) as client,
    ):
        first = await client.call_tool("kit__whoami", {})
        assert first.structured_content is not None
        old_pid = first.structured_content["pid"]

        crashed = await client.call_tool("kit__crash", {})
        assert crashed.is_error
        assert "kit" in crashed.content[0].text  # type: ignore[union-attr]

        async def restarted() -> bool:
            result = await client.call_tool("kit__whoami", {})
            return not result.is_error and result.structured_content is not None

        await until(restarted)
        again = await client.call_tool("kit__whoami", {})
        assert again.structured_content is not None
        assert again.structured_content["pid"] != old_pid
        with pytest.raises(ProcessLookupError):
            os.kill(old_pid, 0)  # the crashed child was reaped, not left a zombie


async def test_one_upstream_down_at_start_the_rest_serve_and_it_joins_when_it_comes_up(tmp_path: Path) -> None:
    port = free_port()
    config = f"""
servers:
  kit: {stdio_server(TESTKIT)}
  late: {{url: "http://127.0.0.1:{port}/mcp", timeout: 2s}}
"""
    async with run_gateway(tmp_path, config) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        names = tool_names(await client.list_tools())
        assert "kit__echo" in names
        assert not any(n.startswith("late__") for n in names)
        async with httpx2.AsyncClient() as http:
            ready = await http.get(f"{gw.base}/readyz")
            assert ready.status_code == 503
            body = ready.json()
            assert body["upstreams"]["kit"]["state"] == "up"
            assert body["upstreams"]["late"]["state"] != "up"
            assert body["upstreams"]["late"]["last_error"]

            async with run_http_upstream(tmp_path, TESTKIT, port, name="late"):

                async def joined() -> bool:
                    return (await http.get(f"{gw.base}/readyz")).status_code == 200

                await until(joined, within=30)
                assert "late__echo" in tool_names(await client.list_tools())
                result = await client.call_tool("late__echo", {"text": "hi"})
                assert result.content[0].text == "hi"  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["legacy"])
async def test_upstream_list_changed_refreshes_the_registry_and_reaches_clients(tmp_path: Path, mode: str) -> None:
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ServerNotification) and message.method == "notifications/tools/list_changed":
            changed.set()

    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        Client(gw.url, mode=mode, cache=None, message_handler=on_message) as client,
    ):
        assert "kit__brand_new" not in tool_names(await client.list_tools())
        await client.call_tool("kit__add_tool", {"name": "brand_new"})
        with anyio.fail_after(10):
            await changed.wait()
        assert "kit__brand_new" in tool_names(await client.list_tools())
        result = await client.call_tool("kit__brand_new", {})
        assert result.content[0].text == "I am brand_new"  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ERAS)
async def test_progress_is_forwarded_to_the_caller(tmp_path: Path, mode: str) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        Client(gw.url, mode=mode, cache=None) as client,
    ):
        await client.list_tools()  # the SDK side registers the session: the calls below take the lean path
        result = await client.call_tool("kit__progress", {"steps": 3}, progress_callback=on_progress)
        assert not result.is_error
        assert seen == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]


async def test_log_messages_reach_the_calling_client(tmp_path: Path) -> None:
    logs: list[types.LoggingMessageNotificationParams] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params)

    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        Client(gw.url, mode="legacy", cache=None, logging_callback=on_log) as client,
    ):
        await client.list_tools()  # the SDK side registers the session: the calls below take the lean path
        await client.call_tool("kit__progress", {"steps": 1})
        assert [entry.data for entry in logs] == ["finished 1 steps"]


async def test_log_messages_below_the_clients_level_are_not_forwarded(tmp_path: Path) -> None:
    logs: list[types.LoggingMessageNotificationParams] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params)

    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        Client(gw.url, mode="legacy", cache=None, logging_callback=on_log) as client,
    ):
        await client.list_tools()  # the SDK side registers the session: the calls below take the lean path
        with pytest.warns(MCPDeprecationWarning):
            await client.set_logging_level("warning")
        result = await client.call_tool("kit__progress", {"steps": 1})
        assert not result.is_error
        assert logs == []


async def test_a_2026_client_gets_a_clear_error_when_an_upstream_asks_it_to_sample(tmp_path: Path) -> None:
    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        Client(gw.url, mode="2026-07-28", cache=None) as client,
    ):
        result = await client.call_tool("kit__ask_model", {"prompt": "hello?"})
        assert result.is_error
        assert "sampling" in result.content[0].text  # type: ignore[union-attr]
        still_serving = await client.call_tool("kit__echo", {"text": "ok"})
        assert still_serving.content[0].text == "ok"  # type: ignore[union-attr]


async def test_cancelling_a_call_cancels_it_upstream(tmp_path: Path) -> None:
    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        Client(gw.url, mode="legacy", cache=None) as client,
    ):
        await client.list_tools()  # the SDK side registers the session: the calls below take the lean path

        async def events() -> list[str]:
            result = await client.call_tool("kit__events", {})
            assert result.structured_content is not None
            return list(result.structured_content["result"])

        with anyio.move_on_after(1.0):
            await client.call_tool("kit__slow", {"seconds": 30})

        async def cancelled_upstream() -> bool:
            return "slow cancelled" in await events()

        await until(cancelled_upstream)


async def test_sampling_and_elicitation_reach_the_client_whose_call_asked(tmp_path: Path) -> None:
    async def sampling(
        context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        question = params.messages[0].content.text  # type: ignore[union-attr]
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text=f"model says: {question}"), model="fake"
        )

    async def elicitation(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        return types.ElicitResult(action="accept", content={"answer": "blue"})

    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        Client(
            gw.url, mode="legacy", cache=None, sampling_callback=sampling, elicitation_callback=elicitation
        ) as client,
    ):
        await client.list_tools()  # the SDK side registers the session: the calls below take the lean path
        sampled = await client.call_tool("kit__ask_model", {"prompt": "hello?"})
        assert sampled.content[0].text == "model says: hello?"  # type: ignore[union-attr]
        elicited = await client.call_tool("kit__ask_user", {"question": "favourite colour?"})
        assert elicited.content[0].text == "accept: blue"  # type: ignore[union-attr]


async def test_requests_naming_a_foreign_host_are_refused(tmp_path: Path) -> None:
    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        httpx2.AsyncClient() as http,
    ):
        body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        rebinding = await http.post(gw.url, json=body, headers={"Host": "evil.example:80"})
        assert rebinding.status_code in (403, 421)
        foreign_origin = await http.post(gw.url, json=body, headers={"Origin": "http://evil.example"})
        assert foreign_origin.status_code == 403


@pytest.fixture
async def kit_http(tmp_path: Path) -> Any:
    port = free_port()
    async with run_http_upstream(tmp_path, TESTKIT, port, name="kit"):
        yield f"http://127.0.0.1:{port}/mcp"


async def test_a_2026_client_answers_an_upstreams_input_request_through_the_gateway(
    tmp_path: Path, kit_http: str
) -> None:
    asked: list[str] = []

    async def elicitation(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"ok": True})

    async with (
        run_gateway(tmp_path, f'servers:\n  kit: {{url: "{kit_http}"}}\n') as gw,
        Client(gw.url, mode="2026-07-28", cache=None, elicitation_callback=elicitation) as client,
    ):
        result = await client.call_tool("kit__confirm", {"action": "delete"})
        assert asked == ["Really delete?"]
        assert result.content[0].text == "delete: accept {'ok': True} (state: pending delete)"  # type: ignore[union-attr]


async def test_the_upstream_sees_the_capabilities_of_the_2026_client_calling(tmp_path: Path, kit_http: str) -> None:
    async def elicitation(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        return types.ElicitResult(action="decline")

    async with (
        run_gateway(tmp_path, f'servers:\n  kit: {{url: "{kit_http}"}}\n') as gw,
        Client(gw.url, mode="2026-07-28", cache=None, elicitation_callback=elicitation) as asks_users,
        Client(gw.url, mode="2026-07-28", cache=None) as plain,
    ):
        seen_by_upstream = (await asks_users.call_tool("kit__client_capabilities", {})).structured_content
        assert seen_by_upstream is not None
        assert "elicitation" in seen_by_upstream
        plain_seen = (await plain.call_tool("kit__client_capabilities", {})).structured_content
        assert plain_seen is not None
        assert "elicitation" not in plain_seen
        assert "sampling" not in plain_seen


async def test_progress_and_logs_reach_a_2026_client_over_the_upstreams_2026_session(
    tmp_path: Path, kit_http: str
) -> None:
    seen: list[float] = []
    logs: list[Any] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params.data)

    async with (
        run_gateway(tmp_path, f'servers:\n  kit: {{url: "{kit_http}"}}\n') as gw,
        Client(gw.url, mode="2026-07-28", cache=None, log_level="info", logging_callback=on_log) as client,
    ):
        result = await client.call_tool("kit__progress", {"steps": 2}, progress_callback=on_progress)
        assert not result.is_error
        assert seen == [1, 2]
        assert logs == ["finished 2 steps"]


async def test_concurrent_sampling_requests_of_two_clients_each_reach_their_own_client(
    tmp_path: Path, kit_http: str
) -> None:
    def model(name: str) -> Any:
        async def sampling(
            context: ClientRequestContext, params: types.CreateMessageRequestParams
        ) -> types.CreateMessageResult:
            await anyio.sleep(0.2)  # keep both calls in flight at once
            question = params.messages[0].content.text  # type: ignore[union-attr]
            return types.CreateMessageResult(
                role="assistant", content=types.TextContent(type="text", text=f"{name}: {question}"), model=name
            )

        return sampling

    answers: dict[str, str] = {}
    async with (
        run_gateway(tmp_path, f'servers:\n  kit: {{url: "{kit_http}"}}\n') as gw,
        Client(gw.url, mode="legacy", cache=None, sampling_callback=model("alice")) as alice,
        Client(gw.url, mode="legacy", cache=None, sampling_callback=model("bob")) as bob,
    ):
        await alice.list_tools()  # the SDK side registers each session: their calls take the lean path
        await bob.list_tools()

        async def ask(name: str, client: Client) -> None:
            result = await client.call_tool("kit__ask_model", {"prompt": f"question of {name}"})
            answers[name] = result.content[0].text  # type: ignore[union-attr]

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "alice", alice)
            tg.start_soon(ask, "bob", bob)
    assert answers == {"alice": "alice: question of alice", "bob": "bob: question of bob"}


async def test_a_legacy_sse_upstream_is_served_like_any_other(tmp_path: Path) -> None:
    port = free_port()
    async with (
        run_http_upstream(tmp_path, TESTKIT, port, name="sse", sse=True),
        run_gateway(tmp_path, f'servers:\n  old: {{url: "http://127.0.0.1:{port}/sse", sse: true}}\n') as gw,
        Client(gw.url, mode="legacy", cache=None) as client,
    ):
        assert "old__echo" in tool_names(await client.list_tools())
        result = await client.call_tool("old__echo", {"text": "over sse"})
        assert result.content[0].text == "over sse"  # type: ignore[union-attr]


async def test_cancelling_a_call_to_an_http_upstream_cancels_it_there(tmp_path: Path, kit_http: str) -> None:
    async with (
        run_gateway(tmp_path, f'servers:\n  kit: {{url: "{kit_http}"}}\n') as gw,
        Client(gw.url, mode="legacy", cache=None) as client,
    ):
        await client.list_tools()  # the SDK side registers the session: the calls below take the lean path
        with anyio.move_on_after(1.0):
            await client.call_tool("kit__slow", {"seconds": 30})

        async def cancelled_upstream() -> bool:
            result = await client.call_tool("kit__events", {})
            assert result.structured_content is not None
            return "slow cancelled" in result.structured_content["result"]

        await until(cancelled_upstream)


async def test_a_2026_client_hears_of_new_tools_on_its_listen_stream(tmp_path: Path) -> None:
    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        Client(gw.url, mode="2026-07-28", cache=None) as client,
        client.listen(tools_list_changed=True) as events,
    ):
        await client.call_tool("kit__add_tool", {"name": "announced"})
        with anyio.fail_after(10):
            async for _event in events:
                break
        assert "kit__announced" in tool_names(await client.list_tools())


async def test_the_lean_path_answers_json_and_switches_to_sse_when_a_call_streams(tmp_path: Path) -> None:
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}

    def rpc(method: str, params: dict[str, Any], request_id: int | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
        return message if request_id is None else {**message, "id": request_id}

    init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {stdio_server(TESTKIT)}\n") as gw,
        httpx2.AsyncClient(headers=headers) as http,
    ):
        opened = await http.post(gw.url, json=rpc("initialize", init, 1))
        session = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
        await http.post(gw.url, json=rpc("notifications/initialized", {}), headers=session)
        await http.post(gw.url, json=rpc("tools/list", {}, 2), headers=session)

        plain = await http.post(
            gw.url, json=rpc("tools/call", {"name": "kit__echo", "arguments": {"text": "x"}}, 3), headers=session
        )
        assert plain.headers["content-type"] == "application/json"
        assert plain.json()["result"]["content"] == [{"type": "text", "text": "x"}]

        call = {"name": "kit__progress", "arguments": {"steps": 2}, "_meta": {"progressToken": "p1"}}
        streamed = await http.post(gw.url, json=rpc("tools/call", call, 4), headers=session)
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: ") :]) for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert [e["params"]["progress"] for e in events if e.get("method") == "notifications/progress"] == [1, 2]
        assert events[-1]["id"] == 4
        assert events[-1]["result"]["content"][0]["text"] == "2 steps"

        unknown = await http.post(gw.url, json=rpc("tools/call", {"name": "kit__nope"}, 5), headers=session)
        assert unknown.json()["error"]["code"] == types.INVALID_PARAMS

        await http.delete(gw.url, headers=session)
        gone = await http.post(
            gw.url, json=rpc("tools/call", {"name": "kit__echo", "arguments": {"text": "x"}}, 6), headers=session
        )
        assert gone.status_code == 404


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_call_past_the_servers_timeout_is_an_error_and_is_cancelled_upstream(
    tmp_path: Path, kit_http: str, transport: str
) -> None:
    server = (
        f"{{command: [{PYTHON}, {TESTKIT}], timeout: 1s}}"
        if transport == "stdio"
        else f'{{url: "{kit_http}", timeout: 1s}}'
    )
    async with (
        run_gateway(tmp_path, f"servers:\n  kit: {server}\n") as gw,
        Client(gw.url, mode="legacy", cache=None) as client,
    ):
        await client.list_tools()
        result = await client.call_tool("kit__slow", {"seconds": 5})
        assert result.is_error
        assert "did not answer within 1s" in result.content[0].text  # type: ignore[union-attr]

        async def cancelled_upstream() -> bool:
            events = await client.call_tool("kit__events", {})
            assert events.structured_content is not None
            return "slow cancelled" in events.structured_content["result"]

        await until(cancelled_upstream)


async def test_an_http_upstream_stopped_while_idle_is_seen_down_and_serves_the_next_calls_after_its_restart(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = f"servers:\n  kit: {{url: 'http://127.0.0.1:{port}/mcp', heartbeat: 1s}}\n"

    async def kit_state() -> str:
        async with httpx2.AsyncClient() as http:
            return str((await http.get(f"{gw.base}/readyz")).json()["upstreams"]["kit"]["state"])

    async with run_http_upstream(tmp_path, TESTKIT, port, name="first") as first, run_gateway(tmp_path, config) as gw:

        async def up() -> bool:
            return await kit_state() == "up"

        async def down() -> bool:
            return await kit_state() != "up"

        await until(up)
        first.process.kill()  # no call in flight
        await first.process.wait()
        await until(down, within=5.0)
        async with run_http_upstream(tmp_path, TESTKIT, port, name="second"):
            for mode in ERAS:  # the lean handshake-era path, then a 2026-07-28 client
                async with Client(gw.url, mode=mode, cache=None) as client:
                    for n in range(3):
                        result = await client.call_tool("kit__echo", {"text": f"{mode} {n}"})
                        assert not result.is_error, result.content
                        assert result.structured_content == {"result": f"{mode} {n}"}
