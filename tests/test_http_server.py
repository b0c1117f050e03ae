"""Slow clients against the HTTP protocol of ``patchbay serve`` (``gateway.http_server``), over raw sockets.

Each test measures when the server closes a connection, so the bound is short and the margins wide.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from mcp import Client
from starlette.types import Receive, Scope, Send

from gateway.http_server import receive_bounded
from tests.inprocess import serve_asgi
from tests.support import TESTKIT, run_gateway, stdio_server, text

pytestmark = pytest.mark.anyio

BOUND = 0.5
"""``receive_timeout`` of the in-process server, in seconds."""
SLACK = 4.0
"""Seconds past the bound a closing may take on a loaded machine."""
GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the body and answers with its size; ``/stream`` answers for twice the bound."""
    assert scope["type"] == "http"
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] == "/stream":
        for _ in range(4):
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await anyio.sleep(BOUND / 2)
    await send({"type": "http.response.body", "body": f"{size} bytes".encode()})


@asynccontextmanager
async def server() -> AsyncIterator[int]:
    """The app under the bounded protocol; uvicorn's own keep-alive bound is set far beyond ours."""
    async with serve_asgi(app, lifespan="off", http=receive_bounded(BOUND), timeout_keep_alive=60) as base:
        yield int(base.rsplit(":", 1)[1])


async def until_closed(sock: anyio.abc.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    try:
        while True:
            received += await sock.receive()
    except (anyio.EndOfStream, *BROKEN):
        return received


async def dribble(sock: anyio.abc.SocketStream, data: bytes) -> None:
    """Send ``data`` a byte at a time, ten bytes per bound, until the server hangs up."""
    try:
        for byte in data:
            await sock.send(bytes([byte]))
            await anyio.sleep(BOUND / 10)
    except BROKEN:
        return


async def closed_in(sock: anyio.abc.SocketStream, sending: bytes = b"") -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` while ``sending`` is dribbled to it, and what it answered."""
    start = anyio.current_time()
    with anyio.fail_after(BOUND + SLACK):
        async with anyio.create_task_group() as tg:
            tg.start_soon(dribble, sock, sending)
            received = await until_closed(sock)
            tg.cancel_scope.cancel()
    return anyio.current_time() - start, received


async def test_a_connection_that_sends_nothing_is_closed_after_the_bound() -> None:
    async with server() as port, await anyio.connect_tcp("127.0.0.1", port) as sock:
        waited, received = await closed_in(sock)
    assert waited >= BOUND * 0.8
    assert received == b""


@pytest.mark.parametrize(
    "request_bytes",
    [GET * 3, b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n" + b"x" * 100],
    ids=["headers", "body"],
)
async def test_a_request_sent_a_byte_at_a_time_is_cut_off_after_the_bound(request_bytes: bytes) -> None:
    async with server() as port, await anyio.connect_tcp("127.0.0.1", port) as sock:
        waited, received = await closed_in(sock, request_bytes)
    assert waited >= BOUND * 0.8
    assert received == b""  # the request never got in, so nothing answered it


@pytest.mark.parametrize("then_sending", [b"", GET], ids=["idle", "dribbling"])
async def test_after_a_response_the_next_request_has_the_same_bound(then_sending: bytes) -> None:
    async with server() as port, await anyio.connect_tcp("127.0.0.1", port) as sock:
        await sock.send(GET)
        with anyio.fail_after(SLACK):
            answered = b""
            while not answered.endswith(b"0 bytes\r\n0\r\n\r\n"):  # the chunked answer, to its last chunk
                answered += await sock.receive()
        waited, received = await closed_in(sock, then_sending)
    assert waited >= BOUND * 0.8
    assert received == b""  # uvicorn's keep-alive bound alone ends at the first byte of the next request


async def test_pipelined_requests_are_all_answered_and_only_then_does_the_bound_run_again() -> None:
    streamed = b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    async with server() as port, await anyio.connect_tcp("127.0.0.1", port) as sock:
        await sock.send(streamed + streamed)  # the second is in before the first's answer (2 bounds) ends
        waited, received = await closed_in(sock)
    assert received.count(b"tick") == 8  # both answered: the second was not cut off while it waited its turn
    assert waited >= BOUND * 4 + BOUND * 0.8


async def test_a_request_that_arrived_in_time_is_answered_however_long_the_answer_takes() -> None:
    async with server() as port, await anyio.connect_tcp("127.0.0.1", port) as sock:
        await sock.send(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        waited, received = await closed_in(sock)
    assert received.count(b"tick") == 4
    assert b"0 bytes" in received
    assert waited >= BOUND * 2 + BOUND * 0.8  # the answer streamed for 2 bounds; the idle connection then had one


async def test_patchbay_serve_closes_silent_and_dribbling_connections_while_serving_a_call(tmp_path: Path) -> None:
    config = f"gateway: {{receive_timeout: 1s}}\nservers:\n  kit: {stdio_server(TESTKIT)}\n"
    async with run_gateway(tmp_path, config) as gw, Client(gw.url, mode="legacy", cache=None) as client:
        port = int(gw.base.rsplit(":", 1)[1])
        with anyio.fail_after(1 + SLACK * 2):
            async with anyio.create_task_group() as tg:
                socks = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(20)]
                waits: list[float] = []

                async def hang_up(sock: anyio.abc.SocketStream, sending: bytes) -> None:
                    async with sock:
                        waits.append((await closed_in(sock, sending))[0])

                for number, sock in enumerate(socks):
                    tg.start_soon(hang_up, sock, GET if number % 2 else b"")
                slow = await client.call_tool("kit__slow", {"seconds": 2})  # twice the bound, on its own connection
    assert (slow.is_error, text(slow)) == (False, "done")
    assert len(waits) == 20
    assert min(waits) >= 0.8
