"""What ``McpUpstream`` logs: a stdio server's stderr as lines of its own, and each connect, loss, restart and
listing change once."""

import logging

import anyio
import pytest

from connectors._stderr import MAX_LINE, TAIL_LINES, server_stderr
from connectors.mcp import McpUpstream, State
from gateway.errors import UpstreamUnavailable
from tests.connectors.test_mcp import connected
from tests.inprocess import UPSTREAM_DEPRECATIONS, WITHIN, make_upstream, serve_upstream
from tests.support import PYTHON, TESTKIT

pytestmark = [pytest.mark.anyio, *UPSTREAM_DEPRECATIONS]

KIT = f"{{command: [{PYTHON}, {TESTKIT}]}}"
UPSTREAM_LOGGER = "patchbay.upstream.kit"


def up_again(upstream: McpUpstream) -> bool:
    """Up on its second connection: the server was restarted."""
    return upstream.connects == 2 and upstream.state is State.UP


def messages(caplog: pytest.LogCaptureFixture, logger: str, level: int | None = None) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and (level is None or r.levelno == level)]


async def test_each_stderr_line_of_a_stdio_server_is_logged_at_info_prefixed_with_its_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with connected(KIT) as conn:
        said = await conn.call("say", {"text": "first line\nsecond line"})
        assert said.structured_content == {"result": "said"}
    # The connection's end read the pipe to its end: what the server printed is all there.
    infos = messages(caplog, UPSTREAM_LOGGER, logging.INFO)
    assert infos[:2] == ["kit | first line", "kit | second line"]
    assert not messages(caplog, UPSTREAM_LOGGER, logging.WARNING)  # nothing went wrong: nothing above INFO


async def test_a_stdio_server_that_crashes_is_reported_lost_with_its_last_stderr_lines_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="patchbay.upstream")  # as at the default level: lines not shown
    caplog.set_level(logging.INFO, logger="connectors.mcp")  # (last: the capturing handler's level is this one)
    async with connected(KIT) as conn:
        for n in range(TAIL_LINES + 5):
            await conn.call("say", {"text": f"line {n}"})
        await conn.call("say", {"text": "Traceback (most recent call last):\nRuntimeError: out of memory"})
        with pytest.raises(UpstreamUnavailable):
            await conn.call("crash", {})
        await conn.until(up_again)
    assert not messages(caplog, UPSTREAM_LOGGER, logging.INFO)
    tail = messages(caplog, UPSTREAM_LOGGER, logging.WARNING)
    assert len(tail) == TAIL_LINES  # the last ones only
    assert tail[-2:] == ["kit | Traceback (most recent call last):", "kit | RuntimeError: out of memory"]
    assert tail[0] == "kit | line 7"
    mcp = messages(caplog, "connectors.mcp")
    (lost,) = [m for m in mcp if "lost" in m]
    assert lost.startswith("upstream kit: lost (connection closed by the server); restarting it in")
    assert [m.split(";")[0] for m in mcp if "over stdio" in m] == [
        "upstream kit: connected over stdio, protocol 2025-11-25",
        "upstream kit: restarted (connection 2) over stdio, protocol 2025-11-25",
    ]


async def test_the_last_lines_are_not_repeated_as_a_warning_when_they_were_logged_as_they_came(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with connected(KIT) as conn:
        await conn.call("say", {"text": "about to fall over"})
        with pytest.raises(UpstreamUnavailable):
            await conn.call("crash", {})
        await conn.until(up_again)
    assert messages(caplog, UPSTREAM_LOGGER, logging.INFO).count("kit | about to fall over") == 1
    assert not messages(caplog, UPSTREAM_LOGGER, logging.WARNING)


async def test_a_stdio_server_that_exits_at_start_is_reported_with_what_it_printed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    env = "env: {TESTKIT_STDERR: \"Traceback (most recent call last):|KeyError: 'DATABASE_URL'\", TESTKIT_CRASH: '2'}"
    async with connected(f"{{command: [{PYTHON}, {TESTKIT}], {env}}}") as conn:
        assert conn.upstream.state is not State.UP
    (failed, *_) = messages(caplog, "connectors.mcp", logging.WARNING)
    assert failed.startswith("upstream kit: ")
    assert "; retrying in " in failed
    assert messages(caplog, UPSTREAM_LOGGER, logging.WARNING)[:2] == [
        "kit | Traceback (most recent call last):",
        "kit | KeyError: 'DATABASE_URL'",
    ]


async def test_an_http_upstream_logs_its_connect_with_both_eras_and_a_listing_change_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="connectors.mcp")
    async with serve_upstream(make_upstream()) as url, connected(f'{{url: "{url}"}}') as conn:
        tools = len(conn.upstream.listing.tools)
        await conn.call("add_tool", {"tool_name": "fresh"})
        with anyio.fail_after(WITHIN):
            while "fresh" not in {tool.name for tool in conn.upstream.listing.tools}:
                await conn.changes.receive()
    mcp = messages(caplog, "connectors.mcp", logging.INFO)
    (connect,) = [m for m in mcp if "connected" in m]
    assert connect.startswith(
        "upstream kit: connected over streamable HTTP, protocol 2025-11-25, and 2026-07-28 for its clients; "
        f"{tools} tools, 1 prompt, 2 resources"
    )
    assert [m for m in mcp if "listing" in m] == [
        f"upstream kit: its listing changed: {tools + 1} tools, 1 prompt, 2 resources"
    ]


async def test_long_and_unfinished_lines_are_logged_in_pieces_and_the_pipe_is_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with server_stderr("kit") as stderr:
        stderr.writer.write("é" * (MAX_LINE + 10) + "\nno newline at the end")
        stderr.writer.flush()
        stderr.spawned()  # no other writer: the pipe ends
        with anyio.fail_after(WITHIN):
            await stderr.ended.wait()
    assert messages(caplog, UPSTREAM_LOGGER) == [
        "kit | " + "é" * MAX_LINE,
        "kit | " + "é" * 10,
        "kit | no newline at the end",
    ]
    assert stderr.writer.closed
