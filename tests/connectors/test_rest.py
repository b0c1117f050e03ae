"""REST connectors end to end: a real REST service on 127.0.0.1, the gateway in front of it, calls through dispatch."""

import base64
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from connectors.operations import Body, Operation, Parameter
from connectors.rest import EXCERPT, build_request, forbidden_address
from gateway.config import parse_config
from gateway.errors import InvalidArguments
from gateway.gateway import Gateway, open_gateway
from gateway.types import CallContext, Principal, ToolResult
from tests.inprocess import serve_asgi
from tests.servers.rest_service import API_KEY, BASIC, BEARER, CLIENT, PNG, Seen, rest_service
from tests.support import free_port

pytestmark = pytest.mark.anyio

CALLER = CallContext(principal=Principal("alice"))

OPERATIONS = """
      - {name: get_echo, method: GET, path: "/echo/{name}",
         input: {type: object, properties: {name: {type: string}, q: {type: string}, n: {type: integer}},
                 required: [name]}}
      - {name: post_echo, method: POST, path: "/echo/{name}",
         input: {type: object, properties: {name: {type: string}, amount: {type: number}, note: {type: string}},
                 required: [name, amount]}}
      - {name: delete_echo, method: DELETE, path: "/echo/{name}",
         input: {type: object, properties: {name: {type: string}}, required: [name]}}
      - {name: listing, method: GET, path: "/list/{name}",
         input: {type: object, properties: {name: {type: string}}, required: [name]}}
      - {name: status, method: GET, path: "/status/{code}",
         input: {type: object, properties: {code: {type: integer}, say: {type: string}}, required: [code]}}
      - {name: slow, method: GET, path: /slow, input: {type: object, properties: {seconds: {type: number}}}}
      - {name: big, method: GET, path: /big,
         input: {type: object, properties: {bytes: {type: integer}, declare: {type: string}}}}
      - {name: away, method: GET, path: /redirect/away}
      - {name: home, method: GET, path: /redirect/home}
      - {name: text, method: GET, path: /text}
      - {name: binary, method: GET, path: /binary}
      - {name: empty, method: DELETE, path: /empty}
      - {name: secure, method: GET, path: "/secure/{what}",
         input: {type: object, properties: {what: {type: string}}, required: [what]}}
"""


@asynccontextmanager
async def service() -> AsyncIterator[tuple[str, Seen]]:
    app, seen = rest_service()
    async with serve_asgi(app, lifespan="off") as url:
        yield url, seen


def config(url: str, extra: str = "", *, top: str = "") -> str:
    return f"{top}connectors:\n  svc:\n    base_url: {url}\n{extra}    operations:{OPERATIONS}"


@asynccontextmanager
async def gateway_for(text: str, environ: dict[str, str] | None = None) -> AsyncIterator[Gateway]:
    async with open_gateway(parse_config(text, environ=environ or {})) as gateway:
        yield gateway


def text_of(result: ToolResult) -> str:
    return "".join(str(c.get("text", "")) for c in result.content)


async def test_declared_operations_are_tools_with_annotations_from_their_method() -> None:
    async with service() as (url, _), gateway_for(config(url)) as gateway:
        tools = {name: entry.tool.definition for name, entry in gateway.registry.tools.items()}
        assert {"svc__get_echo", "svc__post_echo", "svc__delete_echo", "svc__secure"} <= set(tools)
        assert tools["svc__get_echo"]["annotations"] == {"readOnlyHint": True, "idempotentHint": True}
        assert tools["svc__delete_echo"]["annotations"]["destructiveHint"] is True
        assert tools["svc__post_echo"]["inputSchema"]["required"] == ["name", "amount"]
        assert [s.state for s in gateway.status() if s.name == "svc"] == ["up"]


async def test_arguments_fill_the_path_the_query_and_a_json_body() -> None:
    async with service() as (url, seen), gateway_for(config(url)) as gateway:
        result = await gateway.dispatcher.call("svc__get_echo", {"name": "a b", "q": "x&y=z", "n": 3}, CALLER)
        assert not result.is_error, text_of(result)
        assert result.structured_content is not None
        assert result.structured_content["path"] == "/echo/a%20b"
        assert result.structured_content["query"] == [["q", "x&y=z"], ["n", "3"]]
        assert json.loads(text_of(result)) == result.structured_content
        result = await gateway.dispatcher.call("svc__post_echo", {"name": "o1", "amount": 12.5, "note": "é"}, CALLER)
        assert not result.is_error, text_of(result)
        sent = seen.requests[-1]
        assert (sent["method"], sent["path"], sent["query"]) == ("POST", "/echo/o1", [])
        assert json.loads(sent["body"]) == {"amount": 12.5, "note": "é"}
        assert sent["headers"]["content-type"] == "application/json"


async def test_a_path_argument_cannot_climb_or_add_segments() -> None:
    async with service() as (url, seen), gateway_for(config(url)) as gateway:
        for name, raw in (("../secure/x", "/echo/..%2Fsecure%2Fx"), ("..", "/echo/%2E%2E"), (".", "/echo/%2E")):
            result = await gateway.dispatcher.call("svc__get_echo", {"name": name}, CALLER)
            assert not result.is_error, text_of(result)
            assert seen.requests[-1]["path"] == raw
        assert not any(r["path"].startswith("/secure") for r in seen.requests)


async def test_error_statuses_are_error_results_with_a_bounded_excerpt() -> None:
    async with service() as (url, _), gateway_for(config(url)) as gateway:
        statuses = ((400, "Bad Request"), (404, "Not Found"), (409, "Conflict"), (500, "Internal Server Error"))
        for code, reason in statuses:
            result = await gateway.dispatcher.call("svc__status", {"code": code, "say": "nope"}, CALLER)
            assert result.is_error
            assert text_of(result) == f"HTTP {code} {reason} from GET /status/{{code}}: nope"
        long = "y" * (EXCERPT + 500)
        result = await gateway.dispatcher.call("svc__status", {"code": 502, "say": long}, CALLER)
        assert result.is_error
        assert text_of(result).endswith("y" * 10 + " … (500 more characters)")
        assert len(text_of(result)) < EXCERPT + 100


async def test_text_binary_empty_and_a_json_array() -> None:
    async with service() as (url, _), gateway_for(config(url)) as gateway:
        result = await gateway.dispatcher.call("svc__text", {}, CALLER)
        assert (result.is_error, text_of(result), result.structured_content) == (False, "plain words", None)
        result = await gateway.dispatcher.call("svc__binary", {}, CALLER)
        (content,) = result.content
        assert content["type"] == "resource"
        assert content["resource"]["mimeType"] == "image/png"
        assert content["resource"]["uri"] == f"{url}/binary"
        assert base64.b64decode(content["resource"]["blob"]) == PNG
        result = await gateway.dispatcher.call("svc__empty", {}, CALLER)
        assert (result.is_error, text_of(result)) == (False, "HTTP 204 No Content from DELETE /empty, with no body")
        result = await gateway.dispatcher.call("svc__listing", {"name": "z"}, CALLER)
        assert result.structured_content is None  # an array is not an object: text only
        assert json.loads(text_of(result)) == ["/list/z", []]


async def test_a_slow_system_times_out_and_the_next_call_works() -> None:
    async with service() as (url, _), gateway_for(config(url, "    timeout: 300ms\n")) as gateway:
        invocation = await gateway.dispatcher.invoke("svc__slow", {"seconds": 5}, CALLER)
        assert invocation.outcome == "timeout"
        assert "did not answer GET /slow within 0.3s" in text_of(invocation.result)
        result = await gateway.dispatcher.call("svc__slow", {"seconds": 0}, CALLER)
        assert result.structured_content == {"slept": True}


@pytest.mark.parametrize("declare", ["yes", "no"])
async def test_a_body_over_max_result_is_that_calls_error(declare: str) -> None:
    top = "gateway: {max_result: 64KiB}\n"
    async with service() as (url, _), gateway_for(config(url, top=top)) as gateway:
        result = await gateway.dispatcher.call("svc__big", {"bytes": 200_000, "declare": declare}, CALLER)
        assert result.is_error
        assert "larger than gateway.max_result" in text_of(result)
        result = await gateway.dispatcher.call("svc__big", {"bytes": 60_000, "declare": declare}, CALLER)
        assert (result.is_error, len(text_of(result))) == (False, 60_000)


async def test_a_redirect_to_another_origin_is_refused_and_one_home_is_followed() -> None:
    async with service() as (url, seen), gateway_for(config(url)) as gateway:
        seen.other_origin = url.replace("127.0.0.1", "localhost")
        result = await gateway.dispatcher.call("svc__away", {}, CALLER)
        assert result.is_error
        assert "redirected to another origin" in text_of(result)
        assert not any(r["path"] == "/stolen" for r in seen.requests)
        result = await gateway.dispatcher.call("svc__home", {}, CALLER)
        assert not result.is_error, text_of(result)
        assert result.structured_content is not None
        assert result.structured_content["path"] == "/echo/home"


async def test_link_local_and_metadata_addresses_are_refused_unless_allowed() -> None:
    text = config("http://169.254.169.254", "    timeout: 300ms\n")
    async with gateway_for(text) as gateway:
        result = await gateway.dispatcher.call("svc__text", {}, CALLER)
        assert result.is_error
        assert "GET /text was not sent: 169.254.169.254 is a link-local or cloud metadata address" in text_of(result)
    allowed = config("http://169.254.169.254", "    timeout: 300ms\n    allow_link_local: true\n")
    async with gateway_for(allowed) as gateway:
        invocation = await gateway.dispatcher.invoke("svc__text", {}, CALLER)
        assert "was not sent" not in text_of(invocation.result)  # tried: whatever the network here answers
        assert invocation.outcome in ("timeout", "unavailable", "error")


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("169.254.169.254", True),
        ("169.254.0.1", True),
        ("fe80::1", True),
        ("fd00:ec2::254", True),
        ("::ffff:169.254.169.254", True),
        ("100.100.100.200", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("::1", False),
        ("8.8.8.8", False),
    ],
)
def test_forbidden_addresses(address: str, forbidden: bool) -> None:
    assert forbidden_address(address) is forbidden


AUTHS = {
    "bearer": "    auth: {bearer: '${SECRET}'}\n",
    "basic": "    auth: {basic: {username: patchbay, password: '${SECRET}'}}\n",
    "api_key_header": "    auth: {api_key: {header: X-Api-Key, value: '${SECRET}'}}\n",
    "api_key_query": "    auth: {api_key: {query: key, value: '${SECRET}'}}\n",
}
SECRETS = {"bearer": BEARER, "basic": BASIC[1], "api_key_header": API_KEY, "api_key_query": API_KEY}


@pytest.mark.parametrize("kind", sorted(AUTHS))
async def test_each_static_auth_kind(kind: str) -> None:
    async with service() as (url, seen):
        async with gateway_for(config(url, AUTHS[kind]), {"SECRET": SECRETS[kind]}) as gateway:
            result = await gateway.dispatcher.call("svc__secure", {"what": "x"}, CALLER)
            assert result.structured_content is not None, text_of(result)
            assert result.structured_content["ok"] is True
        async with gateway_for(config(url, AUTHS[kind]), {"SECRET": "wrong-secret"}) as gateway:
            result = await gateway.dispatcher.call("svc__secure", {"what": "x"}, CALLER)
            assert result.is_error
            assert text_of(result).startswith("HTTP 401 Unauthorized from GET /secure/{what}")


OAUTH = (
    "    auth:\n      oauth2_client_credentials:\n"
    "        {{token_url: '{url}/token', client_id: patchbay-client, client_secret: '${{SECRET}}', scope: billing}}\n"
)


async def test_oauth_client_credentials_fetches_caches_and_renews_its_token() -> None:
    async with service() as (url, seen):
        text = config(url, OAUTH.format(url=url))
        async with gateway_for(text, {"SECRET": CLIENT[1]}) as gateway:
            for _ in range(3):
                result = await gateway.dispatcher.call("svc__secure", {"what": "x"}, CALLER)
                assert result.structured_content is not None, text_of(result)
            assert len(seen.tokens_issued) == 1  # cached
            seen.revoked.add(seen.tokens_issued[0])  # the system forgets it: a 401, a new token, the call again
            result = await gateway.dispatcher.call("svc__secure", {"what": "x"}, CALLER)
            assert result.structured_content is not None, text_of(result)
            assert len(seen.tokens_issued) == 2
        seen.token_lifetime = 0  # expires at once: every call fetches one
        async with gateway_for(text, {"SECRET": CLIENT[1]}) as gateway:
            for _ in range(2):
                await gateway.dispatcher.call("svc__secure", {"what": "x"}, CALLER)
            assert len(seen.tokens_issued) == 4
        async with gateway_for(text, {"SECRET": "wrong"}) as gateway:
            result = await gateway.dispatcher.call("svc__secure", {"what": "x"}, CALLER)
            assert result.is_error
            assert "the OAuth token endpoint answered HTTP 401 without an access token" in text_of(result)


async def test_secrets_appear_in_no_result_error_log_metric_or_audit_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # As `patchbay` runs: httpx2's one INFO line per request, URL and all, is not logged (gateway/cli.py).
    caplog.set_level(logging.WARNING, logger="httpx2")
    audit = tmp_path / "audit.jsonl"
    top = f"audit: {{path: {audit}}}\n"
    texts: list[str] = []
    async with service() as (url, seen):
        seen.other_origin = url.replace("127.0.0.1", "localhost")
        cases = [(AUTHS[kind], SECRETS[kind]) for kind in AUTHS] + [(OAUTH.format(url=url), CLIENT[1])]
        for auth, secret in cases:
            headers = "    headers: {X-Tenant: '${SECRET}-tenant'}\n"
            for environ in ({"SECRET": secret}, {"SECRET": "wrong-" + secret}):
                async with gateway_for(config(url, auth + headers + "    timeout: 300ms\n", top=top), environ) as gw:
                    for tool, args in (("secure", {"what": "x"}), ("away", {}), ("slow", {"seconds": 1})):
                        result = await gw.dispatcher.call(f"svc__{tool}", args, CALLER)
                        texts.append(json.dumps(result.wire()))
                    texts.append(gw.metrics.render()[0].decode())
                    texts.append(json.dumps([s.last_error for s in gw.status()]))
    texts.append(audit.read_text())
    texts.append(caplog.text)
    everything = "\n".join(texts)
    assert "svc__secure" in audit.read_text()
    sent = json.dumps(seen.requests)
    assert all(secret in sent for secret in (BEARER, API_KEY, *seen.tokens_issued))  # they were used, and shown nowhere
    for secret in (*SECRETS.values(), CLIENT[1], *seen.tokens_issued):
        assert secret not in everything
        assert base64.b64encode(f"{BASIC[0]}:{secret}".encode()).decode() not in everything


async def test_the_health_path_sets_the_state_and_a_down_connector_refuses_fast() -> None:
    extra = "    health: /healthz\n    health_interval: 100ms\n"
    async with service() as (url, seen), gateway_for(config(url, extra)) as gateway:
        assert [s.state for s in gateway.status() if s.name == "svc"] == ["up"]
        changed = anyio.Event()

        async def on_change() -> None:
            changed.set()

        gateway.on_change(on_change)
        seen.healthy = False
        with anyio.fail_after(5):
            await changed.wait()
        assert gateway.providers["svc"].state.value == "down"
        (status,) = [s for s in gateway.status() if s.name == "svc"]
        assert status.last_error == "the health check GET /healthz answered HTTP 503 Service Unavailable"
        invocation = await gateway.dispatcher.invoke("svc__text", {}, CALLER)
        assert invocation.outcome == "unavailable"
        changed = anyio.Event()
        seen.healthy = True
        with anyio.fail_after(5):
            await changed.wait()
        assert gateway.providers["svc"].state.value == "up"
        assert text_of(await gateway.dispatcher.call("svc__text", {}, CALLER)) == "plain words"


async def test_a_connector_that_cannot_load_is_down_and_the_rest_serve(tmp_path: Path) -> None:
    text = (
        f"connectors:\n  gone:\n    openapi: {tmp_path}/missing.yaml\n    base_url: http://127.0.0.1:1\n"
        "workflows:\n  w: {steps: [{id: s, set: {a: 1}}], output: {a: '${.steps.s.result.a}'}}\n"
    )
    async with gateway_for(text) as gateway:
        (status,) = [s for s in gateway.status() if s.name == "gone"]
        assert status.state == "down"
        assert status.last_error is not None
        assert status.last_error.startswith(f"cannot read the OpenAPI document {tmp_path}/missing.yaml")
        assert (await gateway.dispatcher.call("w", {}, CALLER)).structured_content == {"a": 1}


async def test_connector_tools_behind_policies_and_in_a_workflow_with_compensation() -> None:
    async with service() as (url, seen):
        text = config(url) + (
            "policies:\n  - {id: no-deletes, deny: 'svc__delete_*', reason: deleting is not allowed here}\n"
            "workflows:\n"
            "  refund:\n"
            "    input: {type: object, properties: {order: {type: string}}, required: [order]}\n"
            "    steps:\n"
            "      - id: pay\n"
            "        call: svc__post_echo\n"
            "        with: {name: '${.input.order}', amount: 5}\n"
            "        compensate: {call: svc__post_echo, with: {name: undo, amount: -5}}\n"
            "      - id: check\n"
            "        call: svc__status\n"
            "        with: {code: 409}\n"
            "        after: [pay]\n"
        )
        async with gateway_for(text) as gateway:
            denied = await gateway.dispatcher.invoke("svc__delete_echo", {"name": "x"}, CALLER)
            assert (denied.outcome, denied.result.is_error) == ("denied", True)
            assert "deleting is not allowed here" in text_of(denied.result)
            assert not any(r["method"] == "DELETE" for r in seen.requests)
            invalid = await gateway.dispatcher.invoke("svc__post_echo", {"name": "x"}, CALLER)
            assert invalid.outcome == "invalid"
            run = await gateway.dispatcher.call("refund", {"order": "o7"}, CALLER)
            assert run.is_error
            assert "HTTP 409 Conflict" in text_of(run)
            posts = [(r["path"], json.loads(r["body"])) for r in seen.requests if r["method"] == "POST"]
            assert posts == [("/echo/o7", {"amount": 5}), ("/echo/undo", {"amount": -5})]


def test_build_request_puts_each_parameter_where_it_belongs() -> None:
    op = Operation(
        name="op",
        method="PUT",
        path="/things/{id}/parts/{part}",
        definition={},
        parameters=(
            Parameter("id", "path", "id", required=True),
            Parameter("part", "path", "part_arg", required=True),
            Parameter("tags", "query", "tags"),
            Parameter("ids", "query", "ids", explode=False),
            Parameter("flag", "query", "flag"),
            Parameter("X-Trace", "header", "X-Trace"),
            Parameter("session", "cookie", "session"),
            Parameter("id", "query", "query_id"),
        ),
        body=Body("application/json", required=True, properties={"body_id": "id", "size": "size"}),
    )
    arguments = {
        "id": "a/b",
        "part_arg": 7,
        "tags": ["x", "y"],
        "ids": [1, 2],
        "flag": True,
        "X-Trace": "t-1",
        "session": "s 1",
        "query_id": "q",
        "body_id": "in-body",
        "size": 3,
    }
    request = build_request(op, arguments, "http://h:1/api")
    assert request.method == "PUT"
    assert request.url == "http://h:1/api/things/a%2Fb/parts/7"
    assert request.query == (("tags", "x"), ("tags", "y"), ("ids", "1,2"), ("flag", "true"), ("id", "q"))
    assert request.headers == (("X-Trace", "t-1"), ("Cookie", "session=s%201"), ("Content-Type", "application/json"))
    assert request.body is not None
    assert json.loads(request.body) == {"id": "in-body", "size": 3}


@pytest.mark.parametrize(
    ("body", "arguments", "sent", "media_type"),
    [
        (Body("application/json", argument="body"), {"body": [1, 2]}, b"[1, 2]", "application/json"),
        (Body("text/plain", argument="body"), {"body": "hi"}, b"hi", "text/plain"),
        (Body("application/x-www-form-urlencoded", properties={"a": "a"}), {"a": "1 2"}, b"a=1+2", None),
        (Body("application/json"), {}, None, None),
    ],
)
def test_build_request_bodies(
    body: Body, arguments: dict[str, Any], sent: bytes | None, media_type: str | None
) -> None:
    op = Operation(name="op", method="POST", path="/x", definition={}, body=body)
    request = build_request(op, arguments, "http://h:1")
    assert request.body == sent
    assert dict(request.headers).get("Content-Type") == (media_type or (body.media_type if sent else None))


def test_build_request_refuses_what_cannot_be_sent() -> None:
    op = Operation(
        name="op",
        method="GET",
        path="/x/{id}",
        definition={},
        parameters=(Parameter("id", "path", "id", required=True), Parameter("H", "header", "h")),
    )
    with pytest.raises(InvalidArguments, match="'id' is required"):
        build_request(op, {}, "http://h:1")
    with pytest.raises(InvalidArguments, match="cannot hold a line break"):
        build_request(op, {"id": "1", "h": "a\r\nX-Evil: 1"}, "http://h:1")
    with pytest.raises(InvalidArguments, match="ASCII text only"):
        build_request(op, {"id": "1", "h": "café"}, "http://h:1")
    for arguments in ({"id": "\ud800"}, {"id": "1", "h": ["\udfff"]}):
        with pytest.raises(InvalidArguments, match="lone surrogate"):
            build_request(op, arguments, "http://h:1")
    body = Operation(name="op", method="POST", path="/x", definition={}, body=Body("application/json"))
    with pytest.raises(InvalidArguments, match="lone surrogate"):
        build_request(body, {"text": "a\ud800"}, "http://h:1")


SHOP = """\
openapi: 3.1.0
info: {title: shop, version: "1"}
paths:
  /echo/{name}:
    parameters:
      - {name: name, in: path, required: true, schema: {type: string}}
    put:
      operationId: put_thing
      parameters:
        - {name: tags, in: query, schema: {type: array, items: {type: string}}}
        - {name: X-Trace, in: header, schema: {type: string}}
        - {name: session, in: cookie, schema: {type: string}}
        - {name: name, in: query, schema: {type: string}}
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Thing"}
      responses:
        "200": {description: ok, content: {application/json: {schema: {type: object}}}}
components:
  schemas:
    Thing:
      type: object
      properties:
        name: {type: string}
        size: {type: integer}
        parent: {$ref: "#/components/schemas/Thing"}
      required: [size]
"""


async def test_an_openapi_operation_sends_every_parameter_location_and_its_body(tmp_path: Path) -> None:
    (tmp_path / "shop.yaml").write_text(SHOP)
    async with service() as (url, seen):
        text = f"connectors:\n  shop: {{openapi: {tmp_path}/shop.yaml, base_url: {url}}}\n"
        async with gateway_for(text) as gateway:
            tool = gateway.registry.tools["shop__put_thing"].tool.definition
            assert set(tool["inputSchema"]["properties"]) == {
                "name",
                "tags",
                "X-Trace",
                "session",
                "query_name",
                "body_name",
                "size",
                "parent",
            }
            arguments = {
                "name": "n/1",
                "query_name": "q",
                "tags": ["a", "b"],
                "X-Trace": "t-9",
                "session": "s1",
                "body_name": "in body",
                "size": 2,
                "parent": {"size": 1},
            }
            result = await gateway.dispatcher.call("shop__put_thing", arguments, CALLER)
            assert not result.is_error, text_of(result)
    (sent,) = seen.requests
    assert (sent["method"], sent["path"]) == ("PUT", "/echo/n%2F1")
    assert sent["query"] == [("tags", "a"), ("tags", "b"), ("name", "q")]
    assert (sent["headers"]["x-trace"], sent["cookies"]) == ("t-9", {"session": "s1"})
    assert json.loads(sent["body"]) == {"name": "in body", "size": 2, "parent": {"size": 1}}


async def test_metrics_retries_a_circuit_breaker_and_a_fallback_apply_to_a_connector() -> None:
    gone = f"http://127.0.0.1:{free_port()}"
    text = (
        f"connectors:\n  svc:\n    base_url: {gone}\n"
        "    circuit_breaker: {failures: 2, reset_after: 30s}\n"
        "    fallback: {text: backup__text}\n"
        f"    operations:{OPERATIONS}"
    )
    async with service() as (url, _):
        text += f"  backup:\n    base_url: {url}\n    operations:\n      - {{name: text, method: GET, path: /text}}\n"
        async with gateway_for(text) as gateway:
            for _ in range(3):  # the first two fail over to the backup; then the circuit is open, and that too
                result = await gateway.dispatcher.call("svc__text", {}, CALLER)
                assert text_of(result) == "plain words"
            refused = await gateway.dispatcher.invoke("svc__get_echo", {"name": "x"}, CALLER)
            assert refused.outcome == "circuit_open"
            metrics = gateway.metrics.render()[0].decode()
    assert 'patchbay_tool_calls_total{outcome="ok",server="backup",tool="backup__text"} 3.0' in metrics
    assert 'patchbay_circuit_open{server="svc"} 1.0' in metrics


async def test_a_health_answer_over_max_result_marks_the_connector_down_and_the_gateway_serves_on() -> None:
    top = "gateway: {max_result: 64KiB}\n"
    async with service() as (url, _):
        text = config(url, "    health: /big?bytes=200000\n", top=top)
        async with gateway_for(text) as gateway:
            (status,) = [s for s in gateway.status() if s.name == "svc"]
            assert status.state == "down"
            assert status.last_error is not None
            assert "larger than gateway.max_result" in status.last_error


async def test_a_health_path_keeps_its_query_beside_an_api_key_in_the_query() -> None:
    extra = "    health: /secure/up?probe=1\n" + AUTHS["api_key_query"]
    async with service() as (url, seen), gateway_for(config(url, extra), {"SECRET": API_KEY}) as gateway:
        assert [s.state for s in gateway.status() if s.name == "svc"] == ["up"]
        assert seen.requests[0]["query"] == [("probe", "1"), ("key", API_KEY)]
