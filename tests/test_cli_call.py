"""``patchbay call`` and ``patchbay tools TOOL`` as a user runs them: what workflows see, questions answered on a
terminal (a pseudo-terminal here) or from a file, and only the upstreams a tool needs started."""

import io
import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from gateway.cli import main
from gateway.config import parse_config
from gateway.needs import for_tool, upstreams_for
from gateway.terminal import AnswerError, TerminalChannel, convert
from tests.support import PYTHON, ROOT, TESTKIT, stdio_server
from tests.test_cli import write

KIT = stdio_server(TESTKIT)
BROKEN = "{command: [/nonexistent/server], timeout: 2s}"

ASKING = f"""\
servers:
  kit: {KIT}
workflows:
  survey:
    input: {{type: object, properties: {{name: {{type: string}}}}}}
    steps:
      - id: confirm
        ask_user:
          message: "Refund ${{.input.name}}?"
          schema:
            type: object
            properties:
              ok: {{type: boolean, title: Go ahead}}
              count: {{type: integer, default: 2}}
              color: {{type: string, enum: [red, green]}}
            required: [ok, color]
      - id: draft
        ask_model: {{prompt: "Write one word for ${{.input.name}}"}}
        after: [confirm]
      - id: echo
        call: kit__echo
        with: {{text: "${{.steps.draft.result}}"}}
    output: {{answer: "${{.steps.confirm.result}}", word: "${{.steps.echo.result.result}}"}}
"""


class Run:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def patchbay(capsys: pytest.CaptureFixture[str], *args: str) -> Run:
    """``patchbay ARGS`` in this process (no interpreter to start: these tests are many); not on a terminal."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return Run(int(exited.value.code or 0), out, err)


def test_call_prints_what_a_workflow_step_sees_and_json_prints_the_whole_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, f"servers:\n  kit: {KIT}\n")
    done = patchbay(capsys, "call", path, "kit__whoami")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert isinstance(seen, dict)
    assert "pid" in seen  # the structured content itself, as `.steps.<id>.result` holds it
    whole = patchbay(capsys, "call", path, "kit__whoami", "--json")
    assert whole.returncode == 0, whole.stderr
    result = json.loads(whole.stdout)
    assert set(result["structuredContent"]) == set(seen)  # another process, another pid: the same shape
    assert result["isError"] is False
    assert result["content"][0]["type"] == "text"


def test_tools_tool_shows_one_tool_in_full(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, f"servers:\n  kit: {KIT}\n")
    done = patchbay(capsys, "tools", path, "kit__record")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("kit__record  (server kit, its name there: record)")
    assert '"label"' in done.stdout
    assert "input schema:" in done.stdout
    assert "output schema:" in done.stdout
    unknown = patchbay(capsys, "tools", path, "kit__nope")
    assert unknown.returncode == 2
    assert "Unknown tool: 'kit__nope'" in unknown.stderr


def test_call_starts_only_the_upstreams_the_tool_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = f"servers:\n  kit: {KIT}\n  broken: {BROKEN}\n" + ASKING.split("\n", 2)[2].replace("servers:\n", "")
    path = write(tmp_path, config)
    done = patchbay(capsys, "call", path, "kit__echo", "--args", '{"text": "hi"}')
    assert done.returncode == 0, done.stderr
    assert "connecting to 1 server: kit" in done.stderr
    assert "broken" not in done.stderr
    run = patchbay(capsys, "call", path, "survey", "--args", '{"name": "ann"}')
    assert "connecting to 1 server: kit" in run.stderr  # the workflow calls kit's tools only
    down = patchbay(capsys, "call", path, "broken__thing")
    assert down.returncode == 2
    assert "connecting to 1 server: broken" in down.stderr
    assert "broken is down:" in down.stderr


def test_graph_needs_no_upstream_and_none_of_their_variables(tmp_path: Path) -> None:
    config = "servers:\n  crm: {url: '${CRM_URL}'}\nworkflows:\n  w: {steps: [{id: a, call: crm__get}]}\n"
    env = {k: v for k, v in os.environ.items() if k != "CRM_URL"}
    done = subprocess.run(
        [PYTHON, "-m", "gateway", "graph", write(tmp_path, config), "w"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert 'a["a: call crm__get"]' in done.stdout


def test_answers_come_from_a_file_by_step_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, ASKING)
    answers = tmp_path / "answers.yaml"
    answers.write_text("confirm: {ok: true, color: green}\ndraft: Splendid\n")
    done = patchbay(capsys, "call", path, "survey", "--args", '{"name": "ann"}', "--answers", str(answers))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"answer": {"ok": True, "color": "green"}, "word": "Splendid"}


def test_without_a_terminal_a_question_names_its_step_and_how_to_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    done = patchbay(capsys, "call", write(tmp_path, ASKING), "survey", "--args", '{"name": "ann"}')
    assert done.returncode == 1
    assert "step 'confirm' asks the user and there is no terminal to ask on" in done.stdout
    assert "--answers FILE (confirm: {field: value, …})" in done.stdout
    bad = patchbay(capsys, "call", write(tmp_path, ASKING), "survey", "--answers", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2
    assert "--answers: cannot read" in bad.stderr


class Terminal:
    """A process on a pseudo-terminal: what it wrote so far, and lines typed into it."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.output = ""

    def expect(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"never saw {text!r}; the terminal shows:\n{self.output}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.output += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the process ended: its side of the terminal is closed
                    continue

    def type(self, line: str) -> None:
        os.write(self.master, f"{line}\n".encode())

    def close(self) -> int:
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            os.close(self.master)


def test_on_a_terminal_each_field_is_asked_with_its_type_default_and_choices(tmp_path: Path) -> None:
    terminal = Terminal(
        [PYTHON, "-m", "gateway", "call", write(tmp_path, ASKING), "survey", "--args", '{"name": "ann"}']
    )
    try:
        terminal.expect("Refund ann?")
        terminal.expect("Go ahead (boolean): ")
        terminal.type("maybe")
        terminal.expect("answer yes or no")
        terminal.type("yes")
        terminal.expect("count (integer, default 2, optional): ")
        terminal.type("")
        terminal.expect("color (red / green): ")
        terminal.type("blue")
        terminal.expect("choose one of: red, green")
        terminal.type("red")
        terminal.expect("[user] Write one word for ann")
        terminal.expect("reply (as the model): ")
        terminal.type("Bravo")
        terminal.expect('"word": "Bravo"')
    finally:
        returncode = terminal.close()
    assert returncode == 0, terminal.output
    assert '"answer": {\r\n    "ok": true,\r\n    "count": 2,\r\n    "color": "red"\r\n  }' in terminal.output


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("y", {"type": "boolean"}, True),
        ("No", {"type": "boolean"}, False),
        ("7", {"type": "integer"}, 7),
        ("2.5", {"type": "number"}, 2.5),
        ("green", {"type": "string", "enum": ["red", "green"]}, "green"),
        ("free text", {"type": "string"}, "free text"),
    ],
)
def test_a_typed_answer_becomes_the_fields_type(text: str, field: dict[str, object], value: object) -> None:
    assert convert(text, field) == value


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("2.5", {"type": "integer"}, "expected an integer"),
        ("x", {"type": "number"}, "expected a number"),
        ("blue", {"type": "string", "enum": ["red"]}, "choose one of: red"),
        ("sure", {"type": "boolean"}, "answer yes or no"),
    ],
)
def test_an_answer_of_the_wrong_type_says_what_is_expected(text: str, field: dict[str, object], message: str) -> None:
    with pytest.raises(AnswerError, match=message):
        convert(text, field)


@pytest.mark.anyio
async def test_questions_asked_at_once_are_put_one_after_the_other() -> None:
    typed: list[str] = []

    def read(prompt: str) -> str:
        typed.append(prompt)
        time.sleep(0.01)  # a slow typist: the other question would slip in between
        return "7" if "n (" in prompt else "yes"

    channel = TerminalChannel(None, interactive=True, read=read, out=io.StringIO())
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "n": {"type": "integer"}}}
    answers: list[object] = []

    async def ask(step: str) -> None:
        params = {"message": step, "requestedSchema": schema, "_meta": {"io.patchbay/step": step}}
        answers.append(await channel.request("elicitation/create", params))

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "one")
        tg.start_soon(ask, "two")
    assert typed == ["a (boolean, optional): ", "n (integer, optional): "] * 2
    assert answers == [{"action": "accept", "content": {"a": True, "n": 7}}] * 2


def test_the_upstreams_a_tool_needs_follow_prefixes_workflows_and_fallbacks() -> None:
    text = (
        "servers:\n  crm: {command: [x]}\n  crm_eu: {command: [x], prefix: crm__eu, fallback: {get: cache__get}}\n"
        "  cache: {command: [x]}\n  other: {command: [x]}\n"
        "workflows:\n  w: {steps: [{id: a, call: crm__eu__get}, {id: b, call: v}]}\n"
        "  v: {steps: [{id: c, call: crm__x}]}\n"
    )
    config = parse_config(text, environ={})
    assert upstreams_for(config, "crm__x") == {"crm"}
    assert upstreams_for(config, "crm__eu__get") == {"crm_eu", "cache"}  # and its fallback's server
    assert upstreams_for(config, "w") == {"crm_eu", "cache", "crm"}  # through the workflow it calls
    assert upstreams_for(config, "nobody__x") is None  # no upstream's name: start them all
    flat = parse_config(text.replace("{command: [x]}\n  other", "{command: [x], prefix: ''}\n  other"), environ={})
    assert upstreams_for(flat, "crm__x") is None  # an unprefixed upstream could serve any name
    assert set(for_tool(config, "crm__x").servers) == {"crm"}
