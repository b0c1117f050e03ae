"""A run as an MCP resource, ``patchbay://runs/<id>``: its caller reads it, no other client can."""

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import mcp_types as types
import pytest

from gateway.config import parse_config
from gateway.gateway import Gateway, open_gateway
from gateway.server import McpFrontend
from gateway.types import Principal
from gateway.workflows.runner import RUN_META_KEY
from policies.redaction import REDACTED
from tests.inprocess import WITHIN, frontend_client
from tests.taskclient import rpc_error

pytestmark = pytest.mark.anyio

ERAS = ["legacy", "2026-07-28"]
CONFIG = """
workflows:
  login:
    input: {type: object, properties: {user: {type: string}, password: {type: string}}}
    steps:
      - {id: check, set: {user: "${.input.user}", password: "${.input.password}"}}
    output: {user: "${.steps.check.result.user}"}
"""


@asynccontextmanager
async def gateway() -> AsyncIterator[Gateway]:
    with anyio.fail_after(WITHIN):
        async with open_gateway(parse_config(CONFIG, environ={})) as gw:
            yield gw


async def read_error(client: object, uri: str) -> types.ErrorData:
    with pytest.raises(Exception) as raised:  # noqa: PT011 - MCPError, sometimes inside an ExceptionGroup
        await client.read_resource(uri)  # type: ignore[attr-defined]
    return rpc_error(raised)


@pytest.mark.parametrize("mode", ERAS)
async def test_the_runs_template_is_listed(mode: str) -> None:
    async with gateway() as gw, frontend_client(McpFrontend(gw, Principal("ada")), mode) as client:
        templates = (await client.list_resource_templates()).resource_templates
    [runs] = [t for t in templates if t.uri_template == "patchbay://runs/{run_id}"]
    assert runs.mime_type == "application/json"
    assert runs.name
    assert runs.description


@pytest.mark.parametrize("mode", ERAS)
async def test_the_client_that_started_a_run_reads_its_timeline_redacted(mode: str) -> None:
    async with gateway() as gw, frontend_client(McpFrontend(gw, Principal("ada")), mode) as ada:
        result = await ada.call_tool("login", {"user": "ada", "password": "hunter2"})
        assert not result.is_error
        assert result.meta is not None
        uri = f"patchbay://runs/{result.meta[RUN_META_KEY]}"

        read = await ada.read_resource(uri)

    [content] = read.contents
    assert isinstance(content, types.TextResourceContents)
    assert (str(content.uri), content.mime_type) == (uri, "application/json")
    view = json.loads(content.text)
    assert (view["run"], view["workflow"], view["status"], view["caller"]) == (
        result.meta[RUN_META_KEY],
        "login",
        "succeeded",
        "client:ada",
    )
    assert [(s["key"], s["status"]) for s in view["steps"]] == [("check", "succeeded")]
    assert view["arguments"] == {"user": "ada", "password": REDACTED}
    assert "hunter2" not in content.text


@pytest.mark.parametrize("mode", ERAS)
async def test_another_client_gets_the_same_error_as_for_a_run_that_does_not_exist(mode: str) -> None:
    async with (
        gateway() as gw,
        frontend_client(McpFrontend(gw, Principal("ada")), mode) as ada,
        frontend_client(McpFrontend(gw, Principal("bob")), mode) as bob,
    ):
        result = await ada.call_tool("login", {"user": "ada", "password": "hunter2"})
        assert result.meta is not None
        run_id = result.meta[RUN_META_KEY]

        theirs = await read_error(bob, f"patchbay://runs/{run_id}")
        missing = await read_error(bob, "patchbay://runs/0123456789abcdef")
        unrouted = await read_error(bob, "nobody://owns/this")

    assert theirs.code == missing.code == unrouted.code == types.INVALID_PARAMS
    assert theirs.message == f"Unknown resource: patchbay://runs/{run_id}"
    assert missing.message == "Unknown resource: patchbay://runs/0123456789abcdef"
    assert theirs.data == missing.data
