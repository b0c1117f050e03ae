"""Orders: a small order-management MCP server with deterministic, in-memory data.

Eight seeded orders for four customers, with refunds kept in memory for the life of
the process (refunding an order twice is an error until the refund is cancelled), and
export jobs: `start_export` queues one, and each `get_export` of it moves it a stage on
(queued, running, done), so a caller polls it until it is done. Nothing is random,
nothing depends on the clock and nothing is written to disk, so demos and tests see the
same data every run.

    python examples/servers/orders.py                    # stdio (the default)
    python examples/servers/orders.py --http --port 9100 # streamable HTTP on 127.0.0.1

Over stdio the standard output is the protocol, so this program logs only to stderr.
"""

import argparse
import logging
import sys
import warnings
from typing import Annotated, Literal

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

DEFAULT_PORT = 9100
HOST = "127.0.0.1"

OrderStatus = Literal["processing", "shipped", "delivered", "failed"]
OrderId = Annotated[str, Field(description="Order id, for example 'A-1001'.")]


class LineItem(BaseModel):
    """One product line of an order."""

    sku: str = Field(description="Stock-keeping unit.")
    name: str = Field(description="Product name.")
    qty: int = Field(description="Quantity ordered.")
    price: float = Field(description="Unit price in USD.")


class Order(BaseModel):
    """An order as the order system stores it."""

    id: str = Field(description="Order id, for example 'A-1001'.")
    customer: str = Field(description="Customer name.")
    status: OrderStatus = Field(description="Fulfilment status.")
    items: list[LineItem] = Field(description="Products ordered.")
    total: float = Field(description="Order total in USD (sum of qty * price).")
    placed_at: str = Field(description="When the order was placed (ISO 8601, UTC).")
    refunded: bool = Field(default=False, description="Whether an active refund exists for this order.")


class OrderList(BaseModel):
    """The orders matching a query, oldest first."""

    orders: list[Order]
    count: int = Field(description="Number of orders returned.")


class Refund(BaseModel):
    """A refund record."""

    refund_id: str = Field(description="Refund id, derived from the order id.")
    order_id: str
    amount: float = Field(description="Amount refunded in USD (the order total).")
    reason: str
    status: Literal["refunded", "cancelled"]


class ExportResult(BaseModel):
    """The outcome of an export batch."""

    exported: int = Field(description="Number of orders exported.")
    order_ids: list[str] = Field(description="Ids of the exported orders, in export order.")


class ExportJob(BaseModel):
    """An export job as its last poll saw it."""

    job_id: str = Field(description="The job's id, for get_export.")
    status: Literal["queued", "running", "done"] = Field(description="Where the job is.")
    exported: int | None = Field(default=None, description="Number of orders exported, once it is done.")


EXPORT_STAGES: tuple[Literal["queued", "running", "done"], ...] = ("queued", "running", "done")
"""What an export job's polls see, one stage per poll: the third poll and every later one see it done."""


def _item(sku: str, name: str, qty: int, price: float) -> LineItem:
    return LineItem(sku=sku, name=name, qty=qty, price=price)


def _order(order_id: str, customer: str, status: OrderStatus, placed_at: str, *items: LineItem) -> Order:
    total = round(sum(item.qty * item.price for item in items), 2)
    return Order(id=order_id, customer=customer, status=status, items=list(items), total=total, placed_at=placed_at)


def seed_orders() -> dict[str, Order]:
    """Return a fresh copy of the seeded orders, keyed by id."""
    kettle, mug = _item("KT-01", "Electric kettle", 1, 49.0), _item("MG-02", "Stoneware mug", 2, 12.5)
    lamp, bulb = _item("LP-10", "Desk lamp", 1, 35.0), _item("BL-11", "LED bulb", 4, 4.25)
    chair, desk = _item("CH-20", "Office chair", 1, 189.0), _item("DK-21", "Standing desk", 1, 420.0)
    orders = [
        _order("A-1001", "alice", "delivered", "2025-03-01T09:15:00Z", kettle, mug),
        _order("A-1002", "bob", "shipped", "2025-03-02T11:30:00Z", lamp, bulb),
        _order("A-1003", "carol", "failed", "2025-03-03T14:05:00Z", chair),
        _order("A-1004", "alice", "processing", "2025-03-04T08:45:00Z", desk),
        _order("A-1005", "dave", "delivered", "2025-03-05T16:20:00Z", mug, bulb),
        _order("A-1006", "bob", "failed", "2025-03-06T10:10:00Z", kettle),
        _order("A-1007", "carol", "shipped", "2025-03-07T13:55:00Z", lamp, chair),
        _order("A-1008", "dave", "processing", "2025-03-08T17:40:00Z", desk, mug),
    ]
    return {order.id: order for order in orders}


class OrderStore:
    """The in-memory order book and its refunds."""

    def __init__(self) -> None:
        self.orders = seed_orders()
        self.refunds: dict[str, Refund] = {}
        self.exports: dict[str, tuple[int, int]] = {}
        """Each export job's batch size and how many times it was polled."""

    def get(self, order_id: str) -> Order:
        """Return the order, or raise `ToolError` naming the unknown id."""
        order = self.orders.get(order_id)
        if order is None:
            raise ToolError(f"Order {order_id!r} not found")
        active = order_id in self.refunds and self.refunds[order_id].status == "refunded"
        return order.model_copy(update={"refunded": active})

    def refund(self, order_id: str, reason: str) -> Refund:
        """Refund an order in full; raise `ToolError` if it is unknown or already refunded."""
        order = self.get(order_id)
        if order.refunded:
            raise ToolError(f"Order {order_id!r} has already been refunded")
        refund = Refund(
            refund_id=f"R-{order_id}", order_id=order_id, amount=order.total, reason=reason, status="refunded"
        )
        self.refunds[order_id] = refund
        return refund

    def cancel_refund(self, order_id: str) -> Refund:
        """Cancel an order's active refund; raise `ToolError` if there is none."""
        self.get(order_id)
        refund = self.refunds.get(order_id)
        if refund is None or refund.status != "refunded":
            raise ToolError(f"Order {order_id!r} has no active refund to cancel")
        self.refunds[order_id] = cancelled = refund.model_copy(update={"status": "cancelled"})
        return cancelled

    def start_export(self, batch: int) -> ExportJob:
        """Queue an export of the ``batch`` oldest orders; nothing happens until it is polled."""
        job_id = f"E-{len(self.exports) + 1}"
        self.exports[job_id] = (min(batch, len(self.orders)), 0)
        return ExportJob(job_id=job_id, status="queued")

    def poll_export(self, job_id: str) -> ExportJob:
        """Where the job is: one stage further than at the last poll, until it is done."""
        if job_id not in self.exports:
            raise ToolError(f"Export job {job_id!r} not found")
        batch, polls = self.exports[job_id]
        self.exports[job_id] = (batch, polls + 1)
        status = EXPORT_STAGES[min(polls, len(EXPORT_STAGES) - 1)]
        return ExportJob(job_id=job_id, status=status, exported=batch if status == "done" else None)


async def _log_info(ctx: Context, message: str) -> None:
    """Send an info log notification to the client.

    MCP logging is deprecated as of 2026-07-28 (the SDK warns on every call), but
    handshake-era clients still show these messages, so the warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        await ctx.info(message)


def build_server(store: OrderStore | None = None) -> MCPServer:
    """Build the orders server over `store` (a freshly seeded one by default)."""
    store = store or OrderStore()
    mcp = MCPServer(
        "orders",
        version="1.0.0",
        instructions="Look up, list, refund and export customer orders.",
        log_level="WARNING",
    )

    @mcp.tool()
    def get_order(order_id: OrderId) -> Order:
        """Fetch one order by id: customer, status, line items, total and placement date."""
        return store.get(order_id)

    @mcp.tool()
    def list_orders(
        customer: Annotated[str | None, Field(description="Only this customer's orders, e.g. 'alice'.")] = None,
        status: Annotated[OrderStatus | None, Field(description="Only orders with this status.")] = None,
    ) -> OrderList:
        """List orders, optionally filtered by customer and/or status, oldest first."""
        matches = [
            store.get(order.id)
            for order in store.orders.values()
            if (customer is None or order.customer == customer) and (status is None or order.status == status)
        ]
        return OrderList(orders=matches, count=len(matches))

    @mcp.tool()
    def refund_order(
        order_id: OrderId, reason: Annotated[str, Field(description="Why the refund is issued.")]
    ) -> Refund:
        """Refund an order in full. Fails if the order is unknown or already refunded."""
        return store.refund(order_id, reason)

    @mcp.tool()
    def cancel_refund(order_id: OrderId) -> Refund:
        """Cancel the active refund of an order (undoes refund_order). Fails if there is none."""
        return store.cancel_refund(order_id)

    @mcp.tool()
    async def export_orders(
        ctx: Context,
        batch: Annotated[int, Field(ge=1, le=100, description="How many orders to export, oldest first.")] = 5,
    ) -> ExportResult:
        """Export a batch of orders to the (simulated) warehouse, reporting progress per order."""
        selected = list(store.orders)[:batch]
        for done, order_id in enumerate(selected, start=1):
            await anyio.sleep(0.01)  # stands in for the per-order I/O of a real export
            await _log_info(ctx, f"exported order {order_id}")
            await ctx.report_progress(done, len(selected), f"exported {order_id}")
        return ExportResult(exported=len(selected), order_ids=selected)

    _add_export_jobs(mcp, store)

    @mcp.prompt()
    def summarize_order(order_id: str) -> str:
        """Ask the model for a short customer-facing summary of one order."""
        order = store.orders.get(order_id)
        if order is None:
            raise ValueError(f"Order {order_id!r} not found")
        return (
            "Summarize this order for the customer in two sentences, "
            f"mentioning its status and total:\n\n{store.get(order_id).model_dump_json(indent=2)}"
        )

    @mcp.resource("orders://{order_id}", name="order", mime_type="application/json")
    def order_resource(order_id: str) -> str:
        """One order as JSON."""
        if order_id not in store.orders:
            raise ResourceNotFoundError(f"Order {order_id!r} not found")
        return store.get(order_id).model_dump_json(indent=2)

    return mcp


def _add_export_jobs(mcp: MCPServer, store: OrderStore) -> None:
    """The export-job pair: start one, poll it."""

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=False))
    def start_export(
        batch: Annotated[int, Field(ge=1, le=100, description="How many orders to export, oldest first.")] = 5,
    ) -> ExportJob:
        """Start exporting a batch of orders in the background; poll get_export with the job id until it is done."""
        return store.start_export(batch)

    @mcp.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    def get_export(
        job_id: Annotated[str, Field(description="The job id start_export returned, e.g. 'E-1'.")],
    ) -> ExportJob:
        """The status of an export job: queued, running or done (with the number of orders exported)."""
        return store.poll_export(job_id)


def main(argv: list[str] | None = None) -> None:
    """Serve over stdio, or over streamable HTTP on 127.0.0.1 with `--http`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    mcp = build_server()
    if args.http:
        print(f"orders: serving streamable HTTP on http://{HOST}:{args.port}/mcp", file=sys.stderr, flush=True)
        mcp.run("streamable-http", host=HOST, port=args.port)
    else:
        mcp.run("stdio")


if __name__ == "__main__":
    main()
