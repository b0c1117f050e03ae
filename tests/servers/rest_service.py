"""A REST service for the connector's tests (Starlette, served on 127.0.0.1 by ``tests.inprocess.serve_asgi``).

It answers what it was sent (``/echo/...``), any status (``/status/{code}``), slowly, hugely, with redirects,
text, binary, and behind each kind of auth, with an OAuth 2 client-credentials token endpoint of its own. What it
saw is kept in :class:`Seen`, so a test can assert exactly what the connector sent.
"""

import base64
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

BEARER = "static-bearer-token-0123456789"
BASIC = ("patchbay", "basic-password-0123456789")
API_KEY = "api-key-0123456789abcdef"
CLIENT = ("patchbay-client", "client-secret-0123456789")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


@dataclass
class Seen:
    """What the service was sent, and its switches."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    token_lifetime: int = 3600
    revoked: set[str] = field(default_factory=set)
    healthy: bool = True
    other_origin: str = "http://localhost:1"
    """Where ``/redirect/away`` sends a client (another origin than the service's)."""


class RestService:
    """The service's handlers; :func:`rest_service` routes to them."""

    def __init__(self) -> None:
        self.seen = Seen()

    async def record(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        entry = {
            "method": request.method,
            "path": request.scope["raw_path"].decode(),
            "query": list(request.query_params.multi_items()),
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "cookies": dict(request.cookies),
            "body": body.decode("utf-8", errors="replace"),
        }
        self.seen.requests.append(entry)
        return entry

    async def echo(self, request: Request) -> Response:
        return JSONResponse(await self.record(request))

    async def echo_list(self, request: Request) -> Response:
        entry = await self.record(request)
        return JSONResponse([entry["path"], entry["query"]])

    async def status(self, request: Request) -> Response:
        await self.record(request)
        code = int(request.path_params["code"])
        return PlainTextResponse(request.query_params.get("say", f"status {code}"), status_code=code)

    async def slow(self, request: Request) -> Response:
        await anyio.sleep(float(request.query_params.get("seconds", "5")))
        return JSONResponse({"slept": True})

    async def big(self, request: Request) -> Response:
        """``bytes`` of ``x``, with a Content-Length (``declare=yes``) or streamed without one."""
        size = int(request.query_params["bytes"])
        if request.query_params.get("declare", "yes") == "yes":
            return Response(b"x" * size, media_type="text/plain")

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, size, 65536):
                yield b"x" * min(65536, size - start)

        return StreamingResponse(chunks(), media_type="text/plain")

    async def redirect_away(self, request: Request) -> Response:
        return RedirectResponse(f"{self.seen.other_origin}/stolen", status_code=302)

    async def redirect_home(self, request: Request) -> Response:
        return RedirectResponse("/echo/home", status_code=307)

    async def text(self, request: Request) -> Response:
        return PlainTextResponse("plain words")

    async def binary(self, request: Request) -> Response:
        return Response(PNG, media_type="image/png")

    async def empty(self, request: Request) -> Response:
        return Response(status_code=204)

    async def health(self, request: Request) -> Response:
        healthy = self.seen.healthy
        return PlainTextResponse("ok" if healthy else "down", status_code=200 if healthy else 503)

    def authorised(self, request: Request) -> bool:
        given = request.headers.get("authorization", "")
        basic = "Basic " + base64.b64encode(f"{BASIC[0]}:{BASIC[1]}".encode()).decode()
        if given in (f"Bearer {BEARER}", basic):
            return True
        if API_KEY in (request.headers.get("x-api-key"), request.query_params.get("key")):
            return True
        token = given.removeprefix("Bearer ")
        return token in self.seen.tokens_issued and token not in self.seen.revoked

    async def secure(self, request: Request) -> Response:
        await self.record(request)
        if not self.authorised(request):
            return JSONResponse({"error": "unauthorised"}, status_code=401)
        return JSONResponse({"ok": True})

    async def token(self, request: Request) -> Response:
        """OAuth 2 client credentials (RFC 6749 §4.4), the client authenticated with HTTP basic."""
        form = await request.form()
        pair = base64.b64encode(f"{CLIENT[0]}:{CLIENT[1]}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {pair}" or form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        issued = secrets.token_urlsafe(16)
        self.seen.tokens_issued.append(issued)
        body = {"access_token": issued, "token_type": "Bearer", "expires_in": self.seen.token_lifetime}
        return JSONResponse(body)


def rest_service() -> tuple[Starlette, Seen]:
    """The app, and what it sees."""
    service = RestService()
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    routes = [
        Route("/echo/{rest:path}", service.echo, methods=methods),
        Route("/list/{rest:path}", service.echo_list, methods=methods),
        Route("/status/{code:int}", service.status, methods=methods),
        Route("/slow", service.slow),
        Route("/big", service.big),
        Route("/redirect/away", service.redirect_away),
        Route("/redirect/home", service.redirect_home),
        Route("/text", service.text),
        Route("/binary", service.binary),
        Route("/empty", service.empty, methods=methods),
        Route("/healthz", service.health),
        Route("/secure/{rest:path}", service.secure, methods=methods),
        Route("/token", service.token, methods=["POST"]),
    ]
    return Starlette(routes=routes), service.seen
