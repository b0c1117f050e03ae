"""The HTTP surface of ``patchbay serve``: ``/mcp``, ``/metrics``, ``/healthz``, ``/readyz``.

``/metrics`` and ``/readyz`` name upstreams, their states and errors, so they refuse a request naming
a foreign Host or Origin exactly as ``/mcp`` does (DNS rebinding); ``/healthz`` says only "ok" and
answers whatever the Host, as liveness probes that address the machine directly expect.

Requests to ``/mcp`` pass, outermost first: bearer-token authentication (or, with no ``clients:``,
loopback only), the gateway-wide request limit (429), and the body size limit (413). An
unauthenticated request is refused before it uses up anyone's budget; a session opened by one
client is not found for another.
"""

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import asdict

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import Config
from gateway.gateway import Gateway, open_gateway
from gateway.policy_config import bucket_size
from gateway.server import McpFrontend, http_endpoint, rebinding_check
from gateway.types import Principal, Provider
from policies.auth import BearerAuth
from policies.http_limits import BodyLimit, GlobalRateLimit
from policies.sessions import SessionOwnership

ANONYMOUS = Principal("anonymous", kind="anonymous")


class _Endpoint:
    """Mounts an ASGI app on a route (Starlette treats plain functions as request/response handlers)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def readiness(gateway: Gateway) -> tuple[dict[str, object], int]:
    """The ``/readyz`` body and status: 200 when every provider is up, else 503 naming what is not."""
    body = {
        "ready": gateway.ready,
        "upstreams": {s.name: {k: v for k, v in asdict(s).items() if k != "name"} for s in gateway.status()},
        "tools": len(gateway.registry.tools),
        "problems": [str(p) for p in gateway.problems],
    }
    return body, 200 if gateway.ready else 503


@asynccontextmanager
async def serving(
    config: Config, *, host: str = "127.0.0.1", providers: Iterable[Provider] = ()
) -> AsyncIterator[ASGIApp]:
    """Start the providers (those of ``config`` and ``providers``), then yield the ASGI app serving them;
    everything is closed on exit.

    Raises:
        ConfigError: the merged registry is unusable (before anything is served).
    """
    async with open_gateway(config, providers=providers, resume=config.gateway.resume == "auto") as gateway:
        endpoint, run = http_endpoint(McpFrontend(gateway, ANONYMOUS), host)
        refusal = rebinding_check(host)

        async def healthz(request: Request) -> PlainTextResponse:
            return PlainTextResponse("ok")

        async def readyz(request: Request) -> Response:
            if (refused := await refusal(request)) is not None:
                return refused
            body, status = readiness(gateway)
            return JSONResponse(body, status_code=status)

        async def metrics(request: Request) -> Response:
            if (refused := await refusal(request)) is not None:
                return refused
            await gateway.refresh_circuits()
            body, content_type = gateway.metrics.render(request.headers.get("accept"))
            return Response(body, headers={"Content-Type": content_type})

        routes = [
            Route("/mcp", _Endpoint(endpoint), methods=["GET", "POST", "DELETE"]),
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ]
        settings = config.gateway
        app: ASGIApp = BodyLimit(SessionOwnership(Starlette(routes=routes)), settings.max_body)
        if settings.rate_limit is not None:
            rate = settings.rate_limit[1]
            app = GlobalRateLimit(app, rate, bucket_size(rate, settings.burst), gateway.backends.limits)
        app = BearerAuth(app, {name: client.token_sha256 for name, client in config.clients.items()})
        async with run():
            yield app
