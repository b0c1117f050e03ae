"""OpenAPI connectors end to end: the example billing service behind the gateway, the CLI's view of a connector,
and a document with problems (each named by its JSON pointer and the config line that references it)."""

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from examples.servers.billing import Billing, build_app
from gateway.config import parse_config
from gateway.gateway import open_gateway
from gateway.types import CallContext, Principal
from tests.inprocess import serve_asgi
from tests.support import ROOT, free_port, patchbay, run_process
from tests.test_cli import patchbay as patchbay_here

pytestmark = pytest.mark.anyio

CALLER = CallContext(principal=Principal("alice"))
SPEC = ROOT / "examples" / "billing.openapi.yaml"


@asynccontextmanager
async def billing() -> AsyncIterator[tuple[str, Billing]]:
    state = Billing()
    async with serve_asgi(build_app(state), lifespan="off") as url:
        yield url, state


async def test_the_billing_document_becomes_tools_that_call_the_service() -> None:
    async with billing() as (url, state):
        text = f"connectors:\n  billing:\n    openapi: {SPEC}\n    base_url: {url}\n    health: /healthz\n"
        async with open_gateway(parse_config(text, environ={})) as gateway:
            tools = {name: entry.tool.definition for name, entry in gateway.registry.tools.items()}
            assert set(tools) == {
                "billing__health",
                "billing__list_refunds",
                "billing__get_refund",
                "billing__refund_order",
                "billing__cancel_refund",
            }
            refund = tools["billing__refund_order"]
            assert refund["inputSchema"]["required"] == ["order_id", "amount", "reason"]
            assert refund["annotations"] == {"readOnlyHint": False}
            status = {"type": "string", "enum": ["refunded", "cancelled"]}
            assert refund["outputSchema"]["properties"]["status"] == status
            assert tools["billing__cancel_refund"]["annotations"]["destructiveHint"] is True

            args = {"order_id": "A-1003", "amount": 189.0, "reason": "failed", "Idempotency-Key": "k1"}
            result = await gateway.dispatcher.call("billing__refund_order", args, CALLER)
            assert result.structured_content is not None, result
            assert result.structured_content["refund_id"] == "RF-A-1003"
            assert state.refunds["A-1003"]["status"] == "refunded"
            listed = await gateway.dispatcher.call("billing__list_refunds", {"status": "refunded"}, CALLER)
            assert listed.structured_content is not None
            assert listed.structured_content["count"] == 1
            cancelled = await gateway.dispatcher.call("billing__cancel_refund", {"order_id": "A-1003"}, CALLER)
            assert cancelled.structured_content is not None
            assert cancelled.structured_content["status"] == "cancelled"
            again = await gateway.dispatcher.call("billing__cancel_refund", {"order_id": "A-1003"}, CALLER)
            assert again.is_error
            assert "HTTP 404 Not Found from DELETE /orders/{order_id}/refund" in str(again.content[0]["text"])
            invalid = await gateway.dispatcher.invoke("billing__get_refund", {"order_id": "nope"}, CALLER)
            assert invalid.outcome == "invalid"  # the document's pattern, checked before any request


async def test_tags_filter_and_the_document_from_a_url() -> None:
    async with billing() as (url, _):
        text = (
            f"connectors:\n  billing:\n    openapi: {url}/openapi.yaml\n    base_url: {url}\n"
            "    tools: {include: ['tag:refunds'], exclude: ['cancel_*'], rename: {refund_order: refund}}\n"
        )
        async with open_gateway(parse_config(text, environ={})) as gateway:
            assert set(gateway.registry.tools) == {"billing__list_refunds", "billing__get_refund", "billing__refund"}


BROKEN = """\
openapi: 3.0.3
info: {title: broken, version: "1"}
paths:
  /things/{id}:
    get:
      operationId: get_thing
      parameters:
        - {name: id, in: path, required: true, schema: {$ref: "#/components/schemas/Missing"}}
      responses:
        "200": {description: ok}
  /others:
    get:
      operationId: list_others
      responses:
        "200":
          content: {application/json: {schema: {type: object}}}
"""


def test_check_names_each_problem_of_a_document_by_pointer_and_config_line(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text(BROKEN)
    config = tmp_path / "patchbay.yaml"
    config.write_text(f"connectors:\n  shop:\n    openapi: broken.yaml\n    base_url: http://127.0.0.1:{free_port()}\n")
    done = patchbay_here("check", str(config))
    assert done.returncode == 1, done.stdout
    spec = tmp_path / "broken.yaml"
    assert f"connectors.shop.openapi (line 3): {spec}#/paths/~1others/get/responses/200:" in done.stderr
    assert "description" in done.stderr
    assert f"{spec}#/paths/~1things~1{{id}}/get/parameters/0/schema/$ref:" in done.stderr
    assert "#/components/schemas/Missing" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_and_tools_of_a_swagger_2_document(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text(json.dumps({"swagger": "2.0", "info": {"title": "x", "version": "1"}}))
    config = tmp_path / "patchbay.yaml"
    config.write_text("servers: {}\nconnectors:\n  old: {openapi: old.json, base_url: 'http://127.0.0.1:1'}\n")
    done = patchbay_here("check", str(config))
    assert done.returncode == 1
    assert "connectors.old.openapi (line 3)" in done.stderr
    assert "Swagger 2.0" in done.stderr
    tools = patchbay_here("tools", str(config))
    assert tools.returncode == 0, tools.stderr
    row = next(line.split() for line in tools.stdout.splitlines() if line.startswith("old "))
    assert row[:3] == ["old", "down", "0"]


async def test_the_quick_start_refunds_through_billing_and_lists_its_tools(tmp_path: Path) -> None:
    kb_port, billing_port = free_port(), free_port()
    env = dict(os.environ, KB_PORT=str(kb_port), BILLING_PORT=str(billing_port), PYTHON=sys.executable)
    python = sys.executable
    async with (
        run_process(
            [python, "examples/servers/kb.py", "--port", str(kb_port)],
            tmp_path / "kb.log",
            ready_url=f"http://127.0.0.1:{kb_port}/mcp",
        ),
        run_process(
            [python, "examples/servers/billing.py", "--port", str(billing_port)],
            tmp_path / "billing.log",
            ready_url=f"http://127.0.0.1:{billing_port}/healthz",
        ),
    ):
        quickstart = "examples/quickstart.yaml"
        tools = patchbay("tools", quickstart, env=env)
        assert tools.returncode == 0, tools.stderr
        assert "billing__refund_order" in tools.stdout
        assert ["billing", "up", "4"] in [line.split()[:3] for line in tools.stdout.splitlines()]
        args = json.dumps({"order_id": "A-1003", "question": "refund?"})
        done = patchbay("call", quickstart, "support_reply", "--args", args, env=env)
        assert done.returncode == 0, done.stderr
        output = json.loads(done.stdout)
        assert output["refund"] == "RF-A-1003"
        assert "we refunded 189.0 USD" in output["reply"]
