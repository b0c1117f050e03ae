"""The ``patchbay`` command as a user runs it: real processes, exit codes, what it prints."""

import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

from tests.support import PYTHON, ROOT, TESTKIT, free_port, stdio_server

KIT = stdio_server(TESTKIT)
PARTIAL = stdio_server(ROOT / "tests" / "servers" / "partial.py")


def patchbay(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
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


def test_check_refuses_settings_that_are_not_implemented_yet(tmp_path: Path) -> None:
    config = "gateway:\n  shared_state: redis://cache:6379\n  engine: temporal://127.0.0.1:7233\n"
    done = patchbay("check", write(tmp_path, config))
    assert done.returncode == 1
    assert "2 problems" in done.stderr
    assert "gateway.shared_state (line 2): `redis://…` is not supported yet" in done.stderr
    assert "gateway.engine (line 3): `temporal://…` is not supported yet" in done.stderr


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


def test_call_prints_the_result(tmp_path: Path) -> None:
    done = patchbay("call", write(tmp_path, f"servers:\n  kit: {KIT}\n"), "kit__echo", "--args", '{"text": "hello"}')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello"


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
