"""The HTTP surface of ``patchbay serve``: ``/mcp``, ``/healthz``, ``/readyz``."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import Config
from gateway.gateway import open_gateway
from gateway.server import McpFrontend, http_endpoint
from gateway.types import Principal

ANONYMOUS = Principal("anonymous", kind="anonymous")


class _Mcp:
    """``/mcp``: forwards to the session manager's ASGI app once the lifespan has built it."""

    frontend: McpFrontend
    endpoint: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.endpoint(scope, receive, send)


def create_app(config: Config, *, host: str = "127.0.0.1") -> Starlette:
    """The gateway as an ASGI app; upstreams are connected in its lifespan."""
    mcp = _Mcp()

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> JSONResponse:
        gateway = mcp.frontend.gateway
        body = {
            "ready": gateway.ready,
            "upstreams": {s.name: {k: v for k, v in asdict(s).items() if k != "name"} for s in gateway.status()},
            "tools": len(gateway.registry.tools),
            "problems": [str(p) for p in gateway.problems],
        }
        return JSONResponse(body, status_code=200 if gateway.ready else 503)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_gateway(config) as gateway:
            mcp.frontend = McpFrontend(gateway, ANONYMOUS)
            mcp.endpoint, run = http_endpoint(mcp.frontend, host)
            async with run():
                yield

    routes = [
        Route("/mcp", mcp, methods=["GET", "POST", "DELETE"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
