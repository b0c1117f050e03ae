"""HTTP-level protection: bearer tokens, anonymous loopback mode, body limits, the gateway-wide rate limit.

Most tests run the middlewares under uvicorn on 127.0.0.1 and call them with a
real HTTP client; where the peer must be off loopback (or the scope is not
HTTP), the ASGI app is called in-process with a crafted scope.
"""

import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.types import Principal
from policies.auth import PRINCIPAL_KEY, BearerAuth, check_bind, new_token, principal_of, token_hash
from policies.http_limits import BodyLimit, GlobalRateLimit
from policies.state import MemoryLimitState
from tests.policies.fakes import FakeClock
from tests.redis_support import redis_states
from tests.support import free_port

pytestmark = pytest.mark.anyio

TOKEN, TOKEN_SHA256 = new_token()
OTHER_TOKEN, OTHER_SHA256 = new_token()
CLIENTS = {"support-bot": TOKEN_SHA256, "ops": OTHER_SHA256}


async def echo(request: Request) -> JSONResponse:
    """What the code behind the middlewares sees: principal, Authorization header, body size."""
    principal = principal_of(request.scope)
    body = b"".join([chunk async for chunk in request.stream()])
    return JSONResponse(
        {
            "principal": None if principal is None else {"id": principal.id, "kind": principal.kind},
            "authorization": request.headers.get("authorization"),
            "body_bytes": len(body),
        }
    )


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


INNER = Starlette(routes=[Route("/mcp", echo, methods=["GET", "POST"]), Route("/healthz", healthz)])


class _Server(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # leave the test runner's signal handlers alone


@contextlib.asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[httpx2.AsyncClient]:
    """``app`` under uvicorn on a pre-bound 127.0.0.1 socket: connections queue until it accepts, so no waiting."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = _Server(uvicorn.Config(app, lifespan="off", log_level="critical", ws="none"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            try:
                async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    with anyio.fail_after(5):
                        yield http
            finally:
                server.should_exit = True


async def call_asgi(app: ASGIApp, scope: dict[str, Any], body: bytes = b"") -> list[Message]:
    """Call ``app`` in-process with a crafted scope; return every message it sent."""
    sent: list[Message] = []
    requests = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return requests.pop(0) if requests else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await app(scope, receive, send)
    return sent


def http_scope(path: str = "/mcp", *, client: tuple[str, int] | None = ("127.0.0.1", 50000), **extra: Any) -> Scope:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"gateway")],
        "client": client,
        "server": ("127.0.0.1", 8000),
    }
    return {**scope, **extra}


def status_of(messages: list[Message]) -> int:
    return int(next(m["status"] for m in messages if m["type"].endswith("http.response.start")))


def body_of(messages: list[Message]) -> Any:
    return json.loads(b"".join(m.get("body", b"") for m in messages if m["type"].endswith("http.response.body")))


# --- bearer tokens -----------------------------------------------------------------------------------------


def test_new_token_is_prefixed_random_and_its_hash_is_sha256_hex() -> None:
    token, digest = new_token()
    assert token.startswith("pb_")
    assert len(token) > 40
    assert token != new_token()[0]
    assert digest == token_hash(token)
    assert len(digest) == 64
    assert digest == digest.lower()


async def test_request_without_token_gets_401_with_bearer_challenge() -> None:
    async with serve(BearerAuth(INNER, CLIENTS)) as http:
        response = await http.post("/mcp", content=b"{}")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="patchbay"'
    assert response.json()["error"] == "unauthorized"
    assert response.json()["error_description"]


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {TOKEN}x", "Bearer", "Bearer pb_not-a-token"],
    ids=["a-token-with-one-more-character", "no-token", "not-a-token"],  # the same ids in every process
)
async def test_wrong_token_gets_401_with_invalid_token_error(authorization: str) -> None:
    async with serve(BearerAuth(INNER, CLIENTS)) as http:
        response = await http.post("/mcp", content=b"{}", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="patchbay", error="invalid_token"'
    assert response.json()["error"] == "unauthorized"


async def test_other_authorization_scheme_gets_a_plain_bearer_challenge() -> None:
    async with serve(BearerAuth(INNER, CLIENTS)) as http:
        response = await http.post("/mcp", content=b"{}", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="patchbay"'


@pytest.mark.parametrize("param", ["access_token", "token"])
async def test_token_in_query_string_is_refused_even_when_valid(param: str) -> None:
    async with serve(BearerAuth(INNER, CLIENTS)) as http:
        alone = await http.post("/mcp", params={param: TOKEN}, content=b"{}")
        with_header = await http.post(
            "/mcp", params={param: TOKEN}, content=b"{}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    for response in (alone, with_header):
        assert response.status_code == 401
        assert 'error="invalid_request"' in response.headers["www-authenticate"]
        assert "Authorization" in response.json()["error_description"]


async def test_valid_token_sets_principal_and_strips_authorization_header() -> None:
    async with serve(BearerAuth(INNER, CLIENTS)) as http:
        first = await http.post("/mcp", content=b"{}", headers={"Authorization": f"Bearer {TOKEN}"})
        second = await http.get("/mcp", headers={"Authorization": f"bearer {OTHER_TOKEN}"})
    assert first.status_code == 200
    assert first.json() == {
        "principal": {"id": "support-bot", "kind": "client"},
        "authorization": None,
        "body_bytes": 2,
    }
    assert second.json()["principal"] == {"id": "ops", "kind": "client"}


async def test_two_authorization_headers_are_refused() -> None:
    scope = http_scope(headers=[(b"authorization", f"Bearer {TOKEN}".encode())] * 2)
    messages = await call_asgi(BearerAuth(INNER, CLIENTS), scope)
    assert status_of(messages) == 401


async def test_principal_is_added_to_existing_state() -> None:
    seen: list[Scope] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        await PlainTextResponse("ok")(scope, receive, send)

    state = {"from_lifespan": 1}
    scope = http_scope(headers=[(b"authorization", f"Bearer {TOKEN}".encode())], state=state)
    await call_asgi(BearerAuth(inner, CLIENTS), scope)
    assert seen[0]["state"] == {"from_lifespan": 1, PRINCIPAL_KEY: Principal("support-bot", kind="client")}
    assert principal_of(seen[0]) == Principal("support-bot", kind="client")
    assert principal_of(http_scope()) is None


async def test_health_endpoints_stay_open_without_token() -> None:
    async with serve(BearerAuth(INNER, CLIENTS)) as http:
        response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.text == "ok"


@pytest.mark.parametrize("path", ["/mcp", "/mcp/", "/mcp/sub"])
async def test_protected_paths_cover_subpaths(path: str) -> None:
    messages = await call_asgi(BearerAuth(INNER, CLIENTS), http_scope(path))
    assert status_of(messages) == 401


async def test_protected_paths_are_configurable() -> None:
    app = BearerAuth(INNER, CLIENTS, protected=("/mcp", "/healthz"))
    assert status_of(await call_asgi(app, http_scope("/healthz"))) == 401
    assert status_of(await call_asgi(app, http_scope("/mcpx"))) == 404  # not under /mcp: reaches the router


@pytest.mark.parametrize(
    "clients",
    [{"a": "not-hex"}, {"a": "ab" * 31}, {"a": TOKEN_SHA256, "b": TOKEN_SHA256.upper()}],
    ids=["not-hex", "short", "shared-token"],
)
def test_unusable_client_hashes_are_refused_at_start_up(clients: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="clients"):
        BearerAuth(INNER, clients)


async def test_lifespan_passes_through_untouched() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    await call_asgi(BearerAuth(inner, CLIENTS), {"type": "lifespan", "asgi": {"version": "3.0"}})
    assert seen == ["lifespan"]


@pytest.mark.parametrize("denial_extension", [True, False])
async def test_websocket_without_token_is_refused_before_the_app(denial_extension: bool) -> None:
    extensions = {"websocket.http.response": {}} if denial_extension else {}
    scope = http_scope(type="websocket", scheme="ws", extensions=extensions)
    messages = await call_asgi(BearerAuth(INNER, CLIENTS), scope)
    if denial_extension:
        assert messages[0]["type"] == "websocket.http.response.start"
        assert messages[0]["status"] == 401
    else:
        assert messages == [{"type": "websocket.close", "code": 1008, "reason": "refused by gateway auth"}]


# --- anonymous mode ----------------------------------------------------------------------------------------


async def test_anonymous_mode_serves_loopback_clients_and_strips_authorization() -> None:
    async with serve(BearerAuth(INNER, {})) as http:
        response = await http.post("/mcp", content=b"{}", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 200
    assert response.json()["principal"] == {"id": "anonymous", "kind": "anonymous"}
    assert response.json()["authorization"] is None


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
async def test_anonymous_mode_accepts_every_loopback_address(peer: str) -> None:
    messages = await call_asgi(BearerAuth(INNER, {}), http_scope(client=(peer, 50000)))
    assert status_of(messages) == 200
    assert body_of(messages)["principal"]["kind"] == "anonymous"


@pytest.mark.parametrize("peer", ["192.168.1.20", "10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", None])
async def test_anonymous_mode_refuses_other_peers_with_403(peer: str | None) -> None:
    client = None if peer is None else (peer, 50000)
    messages = await call_asgi(BearerAuth(INNER, {}), http_scope(client=client))
    assert status_of(messages) == 403
    assert body_of(messages)["error"] == "forbidden"
    assert "clients:" in body_of(messages)["error_description"]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "localhost", "LOCALHOST", "::1", "[::1]"])
def test_check_bind_allows_loopback_without_clients(host: str) -> None:
    assert check_bind(host, {}) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "gateway.example.com", ""])
def test_check_bind_refuses_other_addresses_without_clients(host: str) -> None:
    message = check_bind(host, {})
    assert message is not None
    assert "clients:" in message


def test_check_bind_allows_any_address_with_clients() -> None:
    assert check_bind("0.0.0.0", CLIENTS) is None


# --- body limit --------------------------------------------------------------------------------------------


async def chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size


async def test_body_within_limit_passes_declared_or_streamed() -> None:
    async with serve(BodyLimit(INNER, 1000)) as http:
        declared = await http.post("/mcp", content=b"x" * 1000)
        streamed = await http.post("/mcp", content=chunks(4, 250))
    assert declared.json()["body_bytes"] == 1000
    assert streamed.json()["body_bytes"] == 1000


async def test_body_over_content_length_gets_413_without_reaching_the_app() -> None:
    reached: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["path"])
        await INNER(scope, receive, send)

    async with serve(BodyLimit(inner, 1000)) as http:
        response = await http.post("/mcp", content=b"x" * 1001)
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert reached == []


async def test_chunked_body_over_limit_gets_413_while_streaming() -> None:
    async with serve(BodyLimit(INNER, 1000)) as http:
        response = await http.post("/mcp", content=chunks(5, 250))
        assert "content-length" not in response.request.headers  # really chunked
        after = await http.post("/mcp", content=b"{}")  # the gateway still serves
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert after.status_code == 200


async def test_body_over_limit_after_response_started_aborts_the_connection() -> None:
    async def responds_first(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.body", "body": b"done"})

    async with serve(BodyLimit(responds_first, 1000)) as http:
        with pytest.raises(httpx2.TransportError):  # reset or cut short, depending on timing
            await http.post("/mcp", content=chunks(5, 250))


# --- gateway-wide rate limit -------------------------------------------------------------------------------


async def test_requests_over_the_burst_get_429_with_retry_after_then_recover() -> None:
    clock = FakeClock()
    async with serve(GlobalRateLimit(INNER, rate=0.5, burst=2, state=MemoryLimitState(clock))) as http:
        allowed = [await http.post("/mcp", content=b"{}") for _ in range(2)]
        refused = await http.post("/mcp", content=b"{}")
        health = await http.get("/healthz")  # not a limited path
        clock.now += 2.0
        recovered = await http.post("/mcp", content=b"{}")
        again = await http.post("/mcp", content=b"{}")
    assert [r.status_code for r in allowed] == [200, 200]
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "2"
    assert refused.json()["error"] == "rate_limited"
    assert refused.json()["retry_after"] == 2
    assert health.status_code == 200
    assert recovered.status_code == 200
    assert again.status_code == 429


@pytest.mark.parametrize(("rate", "expected"), [(10.0, "1"), (0.4, "3"), (0.01, "100")])
async def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(rate: float, expected: str) -> None:
    app = GlobalRateLimit(INNER, rate=rate, burst=1, state=MemoryLimitState(FakeClock()))
    assert status_of(await call_asgi(app, http_scope(method="GET"))) == 200
    refused = await call_asgi(app, http_scope(method="GET"))
    start = next(m for m in refused if m["type"] == "http.response.start")
    assert start["status"] == 429
    assert (b"retry-after", expected.encode()) in start["headers"]


async def test_replicas_on_one_redis_share_the_gateway_wide_bucket() -> None:
    async with redis_states() as states:
        clock = FakeClock()
        replicas = [GlobalRateLimit(INNER, rate=1.0, burst=3, state=states.new(clock).limits) for _ in range(2)]
        statuses = [status_of(await call_asgi(replicas[i % 2], http_scope(method="GET"))) for i in range(6)]
        clock.now += 1.0
        after_a_second = [status_of(await call_asgi(replica, http_scope(method="GET"))) for replica in replicas]
    assert statuses == [200, 200, 200, 429, 429, 429]
    assert after_a_second == [200, 429]


async def test_without_redis_under_deny_requests_get_503_with_retry_after() -> None:
    async with redis_states(f"redis://127.0.0.1:{free_port()}/0", require=False) as states:  # nothing listens
        app = GlobalRateLimit(INNER, rate=1.0, burst=3, state=states.new(failure="deny").limits)
        refused = await call_asgi(app, http_scope(method="GET"))
    start = next(m for m in refused if m["type"] == "http.response.start")
    assert start["status"] == 503
    assert (b"retry-after", b"1") in start["headers"]
    body = json.loads(b"".join(m.get("body", b"") for m in refused if m["type"] == "http.response.body"))
    assert body["error"] == "unavailable"
    assert "shared_state_failure: deny" in body["error_description"]


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0.5)])
def test_rate_limit_needs_a_positive_rate_and_a_burst_of_one(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        GlobalRateLimit(INNER, rate=rate, burst=burst)
