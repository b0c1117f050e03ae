"""Billing: a small REST service (no MCP) that refunds ACME orders, described by examples/billing.openapi.yaml.

Patchbay serves its operations as tools through a `connectors:` entry (examples/quickstart.yaml). Refunds are
kept in memory; an order has at most one refund, and refunding it again answers that refund (200) rather than
refunding twice, so a retried call is harmless.

    python examples/servers/billing.py              # HTTP on 127.0.0.1:9102 (the default)
    python examples/servers/billing.py --port 9202  # another port
"""

import argparse
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

DEFAULT_PORT = 9102
HOST = "127.0.0.1"
SPEC = Path(__file__).resolve().parent.parent / "billing.openapi.yaml"
ORDER_ID = re.compile(r"[A-Z]-[0-9]{4}")


class Billing:
    """The refunds, by order id, and the API's handlers."""

    def __init__(self) -> None:
        self.refunds: dict[str, dict[str, Any]] = {}

    async def health(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def spec(self, request: Request) -> Response:
        return Response(SPEC.read_bytes(), media_type="application/yaml")

    async def list_refunds(self, request: Request) -> Response:
        status = request.query_params.get("status")
        try:
            limit = int(request.query_params.get("limit", "20"))
        except ValueError:
            return _error(400, "limit must be an integer")
        refunds = [r for r in reversed(self.refunds.values()) if status in (None, r["status"])][:limit]
        return JSONResponse({"refunds": refunds, "count": len(refunds)})

    async def get_refund(self, request: Request) -> Response:
        refund = self.refunds.get(request.path_params["order_id"])
        return JSONResponse(refund) if refund else _error(404, "this order has no refund")

    async def refund_order(self, request: Request) -> Response:
        order_id = request.path_params["order_id"]
        if not ORDER_ID.fullmatch(order_id):
            return _error(400, f"not an order id: {order_id!r}")
        try:
            body = await request.json()
            amount, reason = float(body["amount"]), str(body["reason"])
        except (ValueError, KeyError, TypeError):
            return _error(400, "the body must be a JSON object with `amount` (a number) and `reason`")
        if amount <= 0:
            return _error(400, "amount must be positive")
        existing = self.refunds.get(order_id)
        if existing is not None and existing["status"] == "refunded":
            return JSONResponse(existing)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        refund = {"refund_id": f"RF-{order_id}", "order_id": order_id, "amount": amount, "reason": reason}
        self.refunds[order_id] = refund = {**refund, "status": "refunded", "created_at": created}
        return JSONResponse(refund, status_code=201)

    async def cancel_refund(self, request: Request) -> Response:
        refund = self.refunds.get(request.path_params["order_id"])
        if refund is None or refund["status"] != "refunded":
            return _error(404, "this order has no active refund to cancel")
        refund["status"] = "cancelled"
        return JSONResponse(refund)


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def build_app(billing: Billing | None = None) -> Starlette:
    billing = billing or Billing()
    return Starlette(
        routes=[
            Route("/healthz", billing.health),
            Route("/openapi.yaml", billing.spec),
            Route("/refunds", billing.list_refunds),
            Route("/orders/{order_id}/refund", billing.get_refund, methods=["GET"]),
            Route("/orders/{order_id}/refund", billing.refund_order, methods=["POST"]),
            Route("/orders/{order_id}/refund", billing.cancel_refund, methods=["DELETE"]),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    args = parser.parse_args(argv)
    print(f"billing: serving REST on http://{HOST}:{args.port} (its OpenAPI document: /openapi.yaml)", file=sys.stderr)
    uvicorn.run(build_app(), host=HOST, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
