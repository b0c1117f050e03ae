"""Replicas on Temporal, as processes: two ``patchbay serve`` on one dev server; one is killed (SIGKILL) while it
makes a step's call, the other takes the run over and finishes it. The upstream (testkit over HTTP) records
each call with its idempotency key, so what ran again, and what did not, is seen from outside. The first try of
the step in flight stalls until the kill, however long the second replica takes to start (a loaded host); the
try made again answers at once."""

import contextlib
import uuid
from pathlib import Path

import anyio
import pytest
from mcp import Client

from tests import temporal_server as dev_server
from tests.support import run_gateway
from tests.workflows.test_durable_e2e import KEY, events, reissue, until, upstream

pytestmark = pytest.mark.anyio

temporal_server = dev_server.temporal_server  # the fixture: pytest finds it here


def config(address: str, port: int) -> str:
    queue = f"e2e-{uuid.uuid4().hex[:8]}"
    return f"""
gateway:
  name: e2e
  store: memory
  engine: temporal://{address}
  temporal: {{task_queue: {queue}, takeover_after: 2s}}
servers:
  kit: {{url: 'http://127.0.0.1:{port}/mcp'}}
workflows:
  chain:
    steps:
      - {{id: a, call: kit__step, with: {{label: a}}}}
      - {{id: b, call: kit__step, with: {{label: b, seconds: 60, again: 0.2}}, after: [a]}}
      - {{id: c, call: kit__step, with: {{label: c}}, after: [b]}}
    output: {{last: '${{.steps.c.result.label}}'}}
"""


async def test_a_replica_killed_during_a_step_leaves_the_run_to_another_that_finishes_it(
    tmp_path: Path, temporal_server: dev_server.DevServer
) -> None:
    async with upstream(tmp_path) as (port, kit), contextlib.AsyncExitStack() as stack:
        text = config(temporal_server.address, port)
        async with run_gateway(tmp_path, text, name="first") as first, anyio.create_task_group() as tg:

            async def call() -> None:
                try:
                    async with Client(first.url) as client:
                        early = await client.call_tool("chain", {}, meta={KEY: "K1"})
                except Exception:  # the replica is killed under it
                    return
                pytest.fail(f"the call finished before the replica was killed: {early}")

            tg.start_soon(call)
            await until(kit, lambda seen: any(e.startswith("b started") for e in seen))
            second = await stack.enter_async_context(run_gateway(tmp_path, text, name="second"))
            first.process.process.kill()  # while it makes b's call: only it ran workers until now
            await first.process.process.wait()
            tg.cancel_scope.cancel()
        output = await reissue(second.url, "chain", "K1")  # the same run, wherever it is
        seen = await events(kit)
    assert output == {"last": "c"}
    started = [event.rsplit(" ", 1) for event in seen if " started " in event]
    labels = [label.removesuffix(" started") for label, _ in started]
    assert labels == ["a", "b", "b", "c"]  # a once; b again, as it was in flight; c once
    keys = dict(started)
    assert keys["b started"].endswith(":b")  # the second try of b came with the first's idempotency key
    assert [key for label, key in started if label == "b started"] == [keys["b started"]] * 2
