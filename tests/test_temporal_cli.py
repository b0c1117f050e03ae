"""``patchbay runs`` / ``runs RUN_ID`` / ``resume`` of a gateway whose workflows run on Temporal: they read and act
on the runs there (a dev server), through ``cli.main`` in this process, as ``tests/test_cli.py`` drives the
local ones. The runs are made by a gateway opened on the same config file, as a replica would make them."""

import gc
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.cli import main
from gateway.config import load_config
from gateway.gateway import open_gateway
from gateway.types import RUN_META_KEY, CallContext, JSONObject, Principal, Tool, ToolResult
from tests import temporal_server as dev_server
from tests.support import PYTHON, ROOT
from tests.test_gateway import TEXT, Toolbox

temporal_server = dev_server.temporal_server  # the fixture: pytest finds it here

ADA = CallContext(principal=Principal("ada"))
WITHIN = 30.0
WORKFLOWS = """\
audit: {redact_keys: [ssn]}
workflows:
  total:
    input: {type: object, properties: {ssn: {type: string}}}
    steps:
      - {id: one, call: box__add, with: {a: 1, b: 2}}
      - {id: two, call: box__add, with: {a: '${.steps.one.result.sum}', b: 10}}
    output: {total: '${.steps.two.result.sum}', ssn: '${.input.ssn}'}
  broken:
    steps:
      - {id: one, call: box__add, with: {a: 1, b: 2}, compensate: {call: box__echo, with: {text: undo one}}}
      - {id: refuse, fail: "no, never", after: [one]}
  held:
    steps: [{id: hold, call: box__hold, with: {text: held}}]
    output: {held: '${.steps.hold.result}'}
"""


class Gate(Toolbox):
    """``add`` and ``echo``, and ``hold``, which never answers while :attr:`shut` (it sets :attr:`held` then)."""

    shut = True
    held: anyio.Event | None = None

    def __init__(self) -> None:
        super().__init__()
        hold = Tool("hold", {"name": "hold", "inputSchema": TEXT})
        self.listing = type(self.listing)(tools=(*self.listing.tools, hold), prompts=self.listing.prompts)

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        if name != "hold":
            return await super().call_tool(name, arguments, context)
        if Gate.shut:
            assert Gate.held is not None
            Gate.held.set()
            await anyio.sleep_forever()
        return ToolResult.text("released")


@pytest.fixture
def config(tmp_path: Path, temporal_server: dev_server.DevServer) -> Iterator[str]:
    """A config file whose workflows run on the dev server, in task queues of their own."""
    queue = f"patchbay-test-{uuid.uuid4().hex[:8]}"
    engine = f"temporal://{temporal_server.address}"
    path = tmp_path / "patchbay.yaml"
    path.write_text(
        f"gateway: {{engine: '{engine}', temporal: {{task_queue: {queue}, takeover_after: 2s}}}}\n{WORKFLOWS}"
    )
    yield str(path)
    gc.collect()  # the clients the commands connected, closed in this test


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``patchbay ARGS`` in this process, with the ``box`` upstream: its exit status, stdout and stderr."""
    with pytest.raises(SystemExit) as exited:
        main(list(args), providers=[Gate()])
    out, err = capsys.readouterr()
    code = exited.value.code
    return code if isinstance(code, int) else 1, out, err


def fill(path: str) -> dict[str, str]:
    """Run ``total`` and ``broken`` once each through a gateway on ``path``; their run ids by workflow."""

    async def calls() -> dict[str, str]:
        async with open_gateway(load_config(path, environ={}), providers=[Gate()]) as gateway:
            runs = {}
            for name, arguments in (("total", {"ssn": "078-05-1120"}), ("broken", {})):
                result = await gateway.dispatcher.call(name, arguments, ADA)
                assert result.meta is not None
                runs[name] = result.meta[RUN_META_KEY]
            return runs

    return anyio.run(calls)


def listed(capsys: pytest.CaptureFixture[str], path: str, *options: str) -> list[dict[str, Any]]:
    code, out, err = cli(capsys, "runs", path, "--json", *options)
    assert code == 0, err
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


def test_runs_lists_the_runs_in_temporal_with_the_local_listings_columns_and_filters(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = fill(config)
    deadline = time.monotonic() + WITHIN
    while len(listed(capsys, config)) < 2:  # Temporal's visibility lists a run shortly after it ended
        assert time.monotonic() < deadline, "the runs were never listed"
        time.sleep(0.1)

    rows = listed(capsys, config)
    assert [(r["run"], r["workflow"], r["status"], r["caller"]) for r in rows] == [
        (runs["broken"], "broken", "failed", "client:ada"),
        (runs["total"], "total", "succeeded", "client:ada"),
    ]
    assert rows[0]["failed_step"] == "refuse"
    assert rows[1]["duration_ms"] > 0
    assert [r["run"] for r in listed(capsys, config, "--status", "failed")] == [runs["broken"]]
    assert [r["run"] for r in listed(capsys, config, "--workflow", "total")] == [runs["total"]]
    assert [r["run"] for r in listed(capsys, config, "--since", "1h", "--status", "succeeded")] == [runs["total"]]
    assert listed(capsys, config, "--status", "interrupted") == []  # never, on Temporal
    code, out, err = cli(capsys, "runs", config)
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split()[:4] == ["RUN", "WORKFLOW", "STATUS", "CALLER"]
    assert lines[0].split()[:3] == [runs["broken"], "broken", "failed"]
    assert lines[0].rstrip().endswith("refuse")


def test_runs_of_one_run_shows_its_steps_from_temporals_history_redacted(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = fill(config)

    code, out, err = cli(capsys, "runs", config, runs["total"], "--json")
    assert code == 0, err
    view = json.loads(out)
    assert (view["run"], view["workflow"], view["status"], view["caller"]) == (
        runs["total"],
        "total",
        "succeeded",
        "client:ada",
    )
    assert [(s["key"], s["tool"], s["status"], len(s["attempts"])) for s in view["steps"]] == [
        ("one", "box__add", "succeeded", 1),
        ("two", "box__add", "succeeded", 1),
    ]
    assert view["steps"][1]["attempts"][0]["arguments"] == {"a": 3, "b": 10}
    assert view["steps"][1]["result"] == {"sum": 13}
    assert view["steps"][0]["duration_ms"] is not None
    assert view["output"]["total"] == 13
    assert "078-05-1120" not in out  # audit.redact_keys applies, as to local runs

    code, out, err = cli(capsys, "runs", config, runs["broken"], "--json")
    assert code == 0, err
    view = json.loads(out)
    assert (view["status"], view["failed_step"]) == ("failed", "refuse")
    # The fail step (no call of its own) shows as on a local run: its history replayed with the config's plan.
    assert [(s["key"], s["status"]) for s in view["steps"]] == [("one", "succeeded"), ("refuse", "failed")]
    assert view["steps"][1]["error"]["message"] == "no, never"
    assert view["note"] is None
    assert [(c["key"], c["tool"]) for c in view["compensations"]] == [("one#compensate", "box__echo")]
    assert "no, never" in view["error"]

    code, out, _ = cli(capsys, "runs", config, runs["total"])
    assert f"run {runs['total']}  workflow total  succeeded" in out
    assert [line.split()[:3] for line in out.splitlines() if line.startswith("  two ")] == [
        ["two", "box__add", "succeeded"]
    ]
    code, out, err = cli(capsys, "runs", config, "nosuchrun")
    assert (code, out) == (1, "")
    assert "no run 'nosuchrun'" in err


def test_resume_waits_for_a_running_run_carrying_it_on_and_refuses_a_finished_or_unknown_one(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def start_then_stop() -> str:  # a replica that started a run and stopped in its step
        Gate.shut, Gate.held = True, anyio.Event()
        async with open_gateway(load_config(config, environ={}), providers=[Gate()]) as gateway:
            started = await gateway.dispatcher.call("held", {}, CallContext(principal=ADA.principal, task={}))
            assert started.task is not None
            with anyio.fail_after(WITHIN):
                await Gate.held.wait()
            return str(started.task["taskId"])

    run_id = anyio.run(start_then_stop)
    Gate.shut = False

    code, out, err = cli(capsys, "resume", config, run_id)  # this process's workers carry it on

    assert code == 0, err
    assert json.loads(out) == {"held": "released"}
    assert "never interrupted" in err
    finished = cli(capsys, "resume", config, run_id)
    unknown = cli(capsys, "resume", config, "nosuchrun")
    assert finished[0] == unknown[0] == 1
    assert "has finished: succeeded" in finished[2]
    assert "nosuchrun" in unknown[2]
    code, out, _ = cli(capsys, "runs", config, run_id, "--json")
    view = json.loads(out)
    assert view["status"] == "succeeded"
    assert [attempt["status"] for attempt in view["steps"][0]["attempts"]] == ["failed", "succeeded"]


def test_the_cli_exits_cleanly_after_using_temporal(temporal_server: dev_server.DevServer, tmp_path: Path) -> None:
    """A Temporal client left to the interpreter's finalization may abort it (temporalio/sdk-python#300): one
    ``patchbay runs --json`` in five did, one after another, exit -6 with "PyGILState_Release" on stderr,
    before the CLI freed it. (Run at once, the processes did not show it.)"""
    config = tmp_path / "gateway.yaml"
    queue = f"cli-{uuid.uuid4().hex[:8]}"
    config.write_text(
        f"gateway: {{name: t, engine: 'temporal://{temporal_server.address}', temporal: {{task_queue: {queue}}}}}\n"
    )
    command = [PYTHON, "-m", "gateway", "runs", str(config), "--json"]
    for _ in range(16):
        ended = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert (ended.returncode, json.loads(ended.stdout), ended.stderr) == (0, [], "")
