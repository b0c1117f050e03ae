"""The ``patchbay`` command as a user runs it: real processes, exit codes, what it prints."""

import contextlib
import io
import json
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from gateway.cli import main
from gateway.config import load_config
from gateway.gateway import open_gateway
from gateway.store import open_store
from gateway.types import CallContext, Principal
from gateway.workflows.journal import JournalEvent
from gateway.workflows.runner import RUN_META_KEY
from tests.support import PYTHON, ROOT, TESTKIT, free_port, stdio_server

KIT = stdio_server(TESTKIT)
PARTIAL = stdio_server(ROOT / "tests" / "servers" / "partial.py")


IN_PROCESS = frozenset({"check", "tools", "call"})
"""Commands run by ``main()`` in this process: no interpreter to start (about 2 s of CPU each, under coverage
more); what they print is what a user sees. ``serve`` and the rest run as processes of their own."""


def patchbay(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    if args and args[0] in IN_PROCESS:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
            main(list(args))
        return subprocess.CompletedProcess(list(args), int(exited.value.code or 0), out.getvalue(), err.getvalue())
    return subprocess.run(
        [PYTHON, "-m", "gateway", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "patchbay.yaml"
    path.write_text(text)
    return str(path)


def test_check_passes_a_good_config(tmp_path: Path) -> None:
    done = patchbay("check", write(tmp_path, f"servers:\n  kit: {KIT}\n"))
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout
    assert "connecting to 1 server" in done.stderr


def test_check_lists_every_config_problem_with_its_line_and_exits_1(tmp_path: Path) -> None:
    config = "gateway:\n  nmae: x\nservers:\n  a: {url: 'ftp://nowhere'}\n  b: {command: [x], bogus: 1}\n"
    done = patchbay("check", write(tmp_path, config))
    assert done.returncode == 1
    assert "3 problems" in done.stderr
    assert "gateway.nmae (line 2)" in done.stderr
    assert "servers.a.url (line 4)" in done.stderr
    assert "servers.b.bogus (line 5)" in done.stderr


def test_check_refuses_a_cache_of_tools_that_are_neither_read_only_nor_idempotent(tmp_path: Path) -> None:
    kit = KIT[:-1] + ", tools: {idempotent: [echo]}, cache: {tools: [echo, 'rec*'], ttl: 10m}}"
    done = patchbay("check", write(tmp_path, f"servers:\n  kit: {kit}\n"))
    assert done.returncode == 1
    assert "servers.kit.cache.tools[1] (line 2)" in done.stderr
    assert "'record'" in done.stderr
    assert "'echo'" not in done.stderr  # listed idempotent: it may be cached


def test_check_with_a_temporal_that_cannot_be_reached_exits_1_saying_so(tmp_path: Path) -> None:
    config = f"gateway:\n  shared_state: redis://cache:6379\n  engine: temporal://127.0.0.1:{free_port()}\n"
    done = patchbay("check", write(tmp_path, config))
    assert done.returncode == 1
    assert "cannot reach Temporal at 127.0.0.1" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_config_file_keeps_runs_in_patchbay_db_next_to_it_and_a_newer_schema_there_is_refused(
    tmp_path: Path,
) -> None:
    config = write(tmp_path, f"servers:\n  kit: {KIT}\n")
    assert patchbay("check", config).returncode == 0
    database = tmp_path / "patchbay.db"
    with closing(sqlite3.connect(database)) as con, con:
        con.execute("UPDATE schema_version SET version = 99")

    done = patchbay("check", config)

    assert done.returncode == 1
    assert "schema version 99" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_reports_an_upstream_that_cannot_be_reached(tmp_path: Path) -> None:
    config = f"servers:\n  kit: {KIT}\n  gone: {{url: 'http://127.0.0.1:{free_port()}/mcp', timeout: 2s}}\n"
    done = patchbay("check", write(tmp_path, config))
    assert done.returncode == 1
    assert "servers.gone (line 3): could not connect" in done.stderr


def test_check_lists_an_upstream_that_cannot_start_first_and_the_calls_to_its_tools_as_consequences(
    tmp_path: Path,
) -> None:
    config = (
        "servers:\n"
        f"  kit: {KIT}\n"
        "  crm: {command: [patchbay-no-such-command]}\n"
        "workflows:\n"
        "  w:\n"
        "    steps:\n"
        "      - {id: a, call: kit__ech}\n"
        "      - {id: b, call: crm__get, compensate: {call: crm__undo}}\n"
    )
    done = patchbay("check", write(tmp_path, config))

    assert done.returncode == 1
    listed = [line.removeprefix("  - ") for line in done.stderr.splitlines() if line.startswith("  - ")]
    assert listed[0].startswith("servers.crm (line 3): could not connect: FileNotFoundError")
    assert listed[1:] == [
        "workflows.w.steps[1].call (line 8): step 'b' calls 'crm__get', which is not a tool this gateway serves"
        " (because servers.crm could not connect)",
        "workflows.w.steps[1].compensate.call (line 8): step 'b' calls 'crm__undo', which is not a tool this gateway"
        " serves (because servers.crm could not connect)",
        "workflows.w.steps[0].call (line 7): step 'a' calls 'kit__ech', which is not a tool this gateway serves;"
        " did you mean 'kit__echo'?",
    ]


def test_check_names_both_tools_and_the_rename_that_made_them_collide(tmp_path: Path) -> None:
    config = (
        "servers:\n"
        f"  one: {{command: [{PYTHON}, {TESTKIT}], prefix: x}}\n"
        f"  two:\n    command: [{PYTHON}, {TESTKIT}]\n    prefix: x\n    tools:\n      rename: {{echo: fail}}\n"
    )
    done = patchbay("check", write(tmp_path, config))

    assert done.returncode == 1
    assert (
        "servers.two.tools.rename.echo (line 7): tool 'echo' of server 'two' (renamed to 'fail' by `tools.rename`)"
        " collides: the name 'x__fail' is already taken by tool 'fail' of server 'one'; the rename made them collide"
        in done.stderr
    )


def test_check_passes_an_upstream_lacking_an_optional_list_method_and_says_what_it_lacks(tmp_path: Path) -> None:
    # As mcp-server-sqlite does: it declares resources but answers resources/templates/list with -32601.
    done = patchbay("check", write(tmp_path, f"servers:\n  sqlish: {PARTIAL}\n"))
    assert done.returncode == 0, done.stderr
    assert ["sqlish", "up", "2"] in [line.split()[:3] for line in done.stdout.splitlines()]
    assert "warning: servers.sqlish (line 2): answers resources/templates/list" in done.stderr


def test_call_reaches_a_tool_of_an_upstream_lacking_an_optional_list_method(tmp_path: Path) -> None:
    done = patchbay(
        "call", write(tmp_path, f"servers:\n  sqlish: {PARTIAL}\n"), "sqlish__echo", "--args", '{"text": "hi"}'
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hi"


def test_tools_prints_the_merged_registry_and_upstream_states(tmp_path: Path) -> None:
    done = patchbay("tools", write(tmp_path, f"servers:\n  kit: {KIT}\n"))
    assert done.returncode == 0, done.stderr
    rows = [line.split()[:2] for line in done.stdout.splitlines() if line.startswith("kit__")]
    assert ["kit__echo", "kit"] in rows
    assert any(line.split()[:2] == ["kit", "up"] for line in done.stdout.splitlines())


def test_call_prints_the_result_as_a_workflow_step_sees_it(tmp_path: Path) -> None:
    done = patchbay("call", write(tmp_path, f"servers:\n  kit: {KIT}\n"), "kit__echo", "--args", '{"text": "hello"}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"result": "hello"}  # its structured content: what `.steps.x.result` holds


def test_call_exits_1_on_an_error_result_and_2_on_an_unknown_tool(tmp_path: Path) -> None:
    path = write(tmp_path, f"servers:\n  kit: {KIT}\n")
    failed = patchbay("call", path, "kit__fail", "--args", '{"message": "nope"}')
    assert failed.returncode == 1
    assert "nope" in failed.stdout
    unknown = patchbay("call", path, "kit__missing")
    assert unknown.returncode == 2
    assert "kit__missing" in unknown.stderr
    bad_json = patchbay("call", path, "kit__echo", "--args", "{text")
    assert bad_json.returncode == 2


def test_serve_refuses_to_start_when_names_collide(tmp_path: Path) -> None:
    server = f"{{command: [{PYTHON}, {TESTKIT}], prefix: ''}}"
    config = f"servers:\n  one: {server}\n  two: {server}\n"
    done = patchbay("serve", write(tmp_path, config), "--port", str(free_port()))
    assert done.returncode == 1
    assert "servers.two (line 3)" in done.stderr
    assert "collides" in done.stderr


# --- Run history and resume, through cli.main in this process, over a SQLite store a gateway filled. ---

WORKFLOWS = """\
audit: {redact_keys: [ssn]}
workflows:
  greet:
    input: {type: object, properties: {name: {type: string}, ssn: {type: string}}}
    steps: [{id: hello, set: {text: "hello ${.input.name}", ssn: "${.input.ssn}"}}]
    output: {text: "${.steps.hello.result.text}"}
  broken:
    steps: [{id: refuse, fail: "no, never"}]
"""


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``patchbay ARGS`` in this process: its exit status, stdout and stderr."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    code = exited.value.code
    return code if isinstance(code, int) else 1, out, err


def fill(path: str) -> dict[str, str]:
    """Run each workflow once through a gateway on the config at ``path``; their run ids by workflow."""

    async def calls() -> dict[str, str]:
        context = CallContext(principal=Principal("ada"))
        async with open_gateway(load_config(path, environ={})) as gateway:
            runs = {}
            for name, arguments in (("greet", {"name": "Ada", "ssn": "078-05-1120"}), ("broken", {})):
                result = await gateway.dispatcher.call(name, arguments, context)
                assert result.meta is not None
                runs[name] = result.meta[RUN_META_KEY]
            return runs

    return anyio.run(calls)


def test_runs_lists_the_runs_of_the_store_next_to_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, WORKFLOWS)
    runs = fill(path)

    code, out, _ = run_cli(capsys, "runs", path)

    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["RUN", "WORKFLOW", "STATUS", "CALLER"]
    assert [row.split()[:4] for row in rows] == [
        [runs["broken"], "broken", "failed", "client:ada"],
        [runs["greet"], "greet", "succeeded", "client:ada"],
    ]
    assert rows[0].rstrip().endswith("refuse")  # the failed step


def test_runs_filters_by_workflow_status_and_age(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, WORKFLOWS)
    runs = fill(path)

    async def an_old_run() -> None:  # started two hours ago, as the journal of a run then would say
        then = time.time() - 7200
        async with open_store(f"sqlite:///{tmp_path / 'patchbay.db'}") as store:
            await store.append(JournalEvent("old", 0, then, "run_started", data={"workflow": "greet"}))
            await store.append(JournalEvent("old", 1, then + 1, "run_finished", data={"status": "succeeded"}))

    anyio.run(an_old_run)

    def listed(*options: str) -> list[str]:
        code, out, err = run_cli(capsys, "runs", path, "--json", *options)
        assert code == 0, err
        return [row["run"] for row in json.loads(out)]

    assert listed() == [runs["broken"], runs["greet"], "old"]
    assert listed("--workflow", "greet") == [runs["greet"], "old"]
    assert listed("--status", "failed") == [runs["broken"]]
    assert listed("--since", "1h") == [runs["broken"], runs["greet"]]
    assert listed("--workflow", "greet", "--since", "1h") == [runs["greet"]]
    code, _, err = run_cli(capsys, "runs", path, "--since", "lately")
    assert code == 2
    assert "--since" in err


def test_runs_shows_one_runs_timeline_redacted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, WORKFLOWS)
    runs = fill(path)

    code, out, _ = run_cli(capsys, "runs", path, runs["greet"])
    assert code == 0
    assert f"run {runs['greet']}  workflow greet  succeeded" in out
    assert "  hello  succeeded" in out
    assert "078-05-1120" not in out  # audit.redact_keys applies

    code, out, _ = run_cli(capsys, "runs", path, runs["broken"], "--json")
    assert code == 0
    view = json.loads(out)
    assert (view["status"], view["failed_step"]) == ("failed", "refuse")
    assert [(step["key"], step["status"]) for step in view["steps"]] == [("refuse", "failed")]
    assert "no, never" in view["error"]


def test_runs_of_a_gateway_on_a_temporal_that_cannot_be_reached_exits_1_saying_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, f"gateway: {{engine: 'temporal://127.0.0.1:{free_port()}'}}\n" + WORKFLOWS)
    code, out, err = run_cli(capsys, "runs", path)  # its runs are Temporal's (tests/test_temporal_cli.py)
    assert code == 1
    assert out == ""
    assert "cannot reach Temporal at 127.0.0.1" in err


def test_runs_says_so_and_exits_1_for_an_unknown_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, WORKFLOWS)
    fill(path)
    code, out, err = run_cli(capsys, "runs", path, "nosuchrun")
    assert code == 1
    assert out == ""
    assert "no run 'nosuchrun'" in err


def test_runs_needs_only_the_store_not_the_servers_or_their_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = fill(write(tmp_path, WORKFLOWS))
    other = tmp_path / "serving.yaml"  # the same directory, so the same patchbay.db
    other.write_text('servers:\n  crm: {url: "${PATCHBAY_TEST_UNSET_URL}"}\n')

    code, out, err = run_cli(capsys, "runs", str(other), "--status", "succeeded", "--json")

    assert code == 0, err
    assert [row["run"] for row in json.loads(out)] == [runs["greet"]]


def test_resume_refuses_a_run_that_cannot_be_resumed_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, WORKFLOWS)
    runs = fill(path)

    finished = run_cli(capsys, "resume", path, runs["greet"])
    unknown = run_cli(capsys, "resume", path, "nosuchrun")

    assert finished[0] == unknown[0] == 1
    assert runs["greet"] in finished[2]
    assert "nosuchrun" in unknown[2]


def test_resume_takes_up_an_interrupted_run_and_prints_its_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, WORKFLOWS)
    plan = load_config(path, environ={}).plans["greet"]

    async def crash_after_start() -> None:  # a gateway that journaled the run's start, then died
        async with open_store(f"sqlite:///{tmp_path / 'patchbay.db'}") as store:
            started = {
                "workflow": "greet",
                "arguments": {"name": "Grace", "ssn": "219-09-9999"},
                "caller": {"kind": "client", "id": "ada"},
                "plan": plan.digest,
            }
            await store.append(JournalEvent("cut", 0, time.time(), "run_started", data=started))

    anyio.run(crash_after_start)
    assert run_cli(capsys, "runs", path, "--status", "interrupted", "--json")[1].count('"run": "cut"') == 1

    code, out, err = run_cli(capsys, "resume", path, "cut")

    assert code == 0, err
    assert json.loads(out) == {"text": "hello Grace"}
    code, out, _ = run_cli(capsys, "runs", path, "cut", "--json")
    view = json.loads(out)
    assert (view["status"], view["output"], len(view["resumed"])) == ("succeeded", {"text": "hello Grace"}, 1)
    assert run_cli(capsys, "resume", path, "cut")[0] == 1  # finished now
