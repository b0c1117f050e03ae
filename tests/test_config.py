from pathlib import Path
from textwrap import dedent

import pydantic
import pytest

from gateway.config import (
    DEFAULT_TIMEOUT,
    Config,
    GatewaySettings,
    HttpServer,
    StdioServer,
    ToolFilter,
    load_config,
    parse_config,
)
from gateway.errors import ConfigError

FULL = """\
gateway:
  name: acme-tools
  separator: "."
servers:
  files:
    command: [python, examples/servers/files.py, 8080]
    env: {ROOT: /srv/data}
    cwd: work
    prefix: ""
  crm:
    url: http://127.0.0.1:9001/mcp
    headers: {Authorization: "Bearer ${CRM_TOKEN}"}
    timeout: 20s
    tools:
      include: ["get_*"]
      exclude: [get_secret]
      rename: {get_order: order}
      descriptions: {get_order: Look up one order.}
  legacy:
    url: https://legacy.example.com/sse
    sse: true
    timeout: 200ms
"""


def parse(text: str, **environ: str) -> Config:
    return parse_config(dedent(text), source="patchbay.yaml", environ=environ)


def problems_of(text: str, **environ: str) -> list[tuple[str, int | None]]:
    with pytest.raises(ConfigError) as caught:
        parse(text, **environ)
    assert caught.value.source == "patchbay.yaml"
    return [(problem.path, problem.line) for problem in caught.value.problems]


def test_full_config_parses_to_typed_models() -> None:
    config = parse(FULL, CRM_TOKEN="s3cret")

    assert config.gateway == GatewaySettings(name="acme-tools", separator=".")
    assert config.servers == {
        "files": StdioServer(
            kind="stdio",
            command=["python", "examples/servers/files.py", "8080"],
            env={"ROOT": "/srv/data"},
            cwd="work",
            prefix="",
        ),
        "crm": HttpServer(
            kind="http",
            url="http://127.0.0.1:9001/mcp",
            headers={"Authorization": "Bearer s3cret"},
            timeout=20.0,
            tools=ToolFilter(
                include=["get_*"],
                exclude=["get_secret"],
                rename={"get_order": "order"},
                descriptions={"get_order": "Look up one order."},
            ),
        ),
        "legacy": HttpServer(kind="http", url="https://legacy.example.com/sse", sse=True, timeout=0.2),
    }
    assert config.source == "patchbay.yaml"


def test_defaults_apply_to_an_empty_file() -> None:
    config = parse("")

    assert config.gateway == GatewaySettings()
    assert config.servers == {}


def test_server_defaults() -> None:
    server = parse("servers: {a: {command: x}}").servers["a"]

    assert isinstance(server, StdioServer)
    assert server.prefix is None
    assert server.timeout == DEFAULT_TIMEOUT
    assert server.tools == ToolFilter(include=["*"], exclude=[], rename={}, descriptions={})


def test_line_of_finds_keys_and_falls_back_to_the_nearest_ancestor() -> None:
    config = parse(FULL, CRM_TOKEN="x")

    assert config.line_of("servers") == 4
    assert config.line_of("servers", "crm", "timeout") == 13
    assert config.line_of("servers", "crm", "tools", "rename", "get_order") == 17
    assert config.line_of("servers", "crm", "tools", "include", 0) == 15
    assert config.line_of("servers", "crm", "tools", "rename", "no_such_tool") == 17
    assert config.line_of("servers", "legacy", "headers") == 19


def test_config_is_frozen() -> None:
    config = parse(FULL, CRM_TOKEN="x")

    with pytest.raises(pydantic.ValidationError):
        config.gateway = GatewaySettings()  # type: ignore[misc]


def test_command_string_is_split_like_a_shell() -> None:
    server = parse("""servers: {a: {command: "python -m 'my server' --port 80"}}""").servers["a"]

    assert isinstance(server, StdioServer)
    assert server.command == ["python", "-m", "my server", "--port", "80"]


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("20s", 20.0), ("200ms", 0.2), ("1.5s", 1.5), ("2m", 120.0), ("1h", 3600.0), ("7", 7.0), ("2.5", 2.5)],
)
def test_durations_are_seconds(written: str, seconds: float) -> None:
    server = parse(f"servers: {{a: {{command: x, timeout: {written}}}}}").servers["a"]

    assert server.timeout == pytest.approx(seconds)


def test_environment_variables_defaults_and_escapes() -> None:
    config = parse(
        """\
        gateway:
          name: ${NAME}
          store: ${STORE:-sqlite:///default.db}
          engine: ${EMPTY:-local}
        servers:
          a:
            command: [run, "${HOME}/bin", "$${NOT_A_VAR}", "${.input.x}", "${not valid}", "$$5"]
            timeout: ${TIMEOUT}
        """,
        NAME="acme",
        HOME="/home/me",
        EMPTY="",
        TIMEOUT="12",
    )

    assert config.gateway.name == "acme"
    assert config.gateway.store == "sqlite:///default.db"
    assert config.gateway.engine == "local"
    server = config.servers["a"]
    assert isinstance(server, StdioServer)
    assert server.command == ["run", "/home/me/bin", "${NOT_A_VAR}", "${.input.x}", "${not valid}", "$$5"]
    assert server.timeout == 12.0


def test_keys_are_names_and_never_interpolated() -> None:
    server = parse("servers: {a: {command: x, env: {on: v, '${K}': v, 8080: 1}}}", K="nope").servers["a"]

    assert isinstance(server, StdioServer)
    assert server.env == {"on": "v", "${K}": "v", "8080": "1"}


def test_workflows_strings_are_not_interpolated() -> None:
    config = parse("workflows: {w: {steps: [{id: a, set: {id: '${.input.order_id}', x: '$${literal}'}}]}}")

    # `${…}` in a workflow is jq for the run to evaluate, never an environment variable.
    step = config.workflows["w"].steps[0]
    assert step.set == {"id": "${.input.order_id}", "x": "$${literal}"}  # type: ignore[union-attr]


def test_merge_keys_fill_in_what_is_not_written() -> None:
    config = parse(
        """\
        servers:
          a: &base {command: x, timeout: 5s, env: {A: "1"}}
          b: {<<: *base, timeout: 2m}
        """
    )

    assert config.servers["b"].timeout == 120.0
    assert config.servers["b"] == config.servers["a"].model_copy(update={"timeout": 120.0})


def test_relative_cwd_is_resolved_against_base_dir(tmp_path: Path) -> None:
    text = "servers: {rel: {command: x, cwd: sub/dir}, abs: {command: x, cwd: /opt}, none: {command: x}}"

    config = parse_config(text, environ={}, base_dir=tmp_path)

    assert [getattr(server, "cwd", None) for server in config.servers.values()] == [
        str(tmp_path / "sub/dir"),
        "/opt",
        None,
    ]
    assert config.line_of("servers", "abs", "cwd") == 1


def test_load_config_reads_the_file_relative_to_its_directory(tmp_path: Path) -> None:
    file = tmp_path / "patchbay.yaml"
    file.write_text("servers:\n  a:\n    command: x\n    cwd: .\n    env: {T: '${T}'}\n")

    config = load_config(file, environ={"T": "v"})

    assert config.source == str(file)
    server = config.servers["a"]
    assert isinstance(server, StdioServer)
    assert server.env == {"T": "v"}
    assert server.cwd == str(tmp_path / ".")
    assert config.line_of("servers", "a", "cwd") == 4


def test_load_config_reports_problems_with_the_file_name(tmp_path: Path) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text("servers:\n  a: {command: x, tmeout: 1}\n")

    with pytest.raises(ConfigError) as caught:
        load_config(file, environ={})

    assert caught.value.source == str(file)
    assert [(p.path, p.line) for p in caught.value.problems] == [("servers.a.tmeout", 2)]


def test_load_config_on_a_missing_file_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "missing.yaml", environ={})

    assert [problem.path for problem in caught.value.problems] == ["<file>"]


def test_unknown_key_lists_the_allowed_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("servers: {a: {command: x, tool: {}}, b: {url: 'http://h', tools: {renames: {}}}}")

    stdio, tools = caught.value.problems
    assert stdio.path == "servers.a.tool"
    assert all(key in stdio.message for key in ("command", "cwd", "env", "prefix", "timeout", "tools"))
    assert "url" not in stdio.message
    assert tools.path == "servers.b.tools.renames"
    assert all(key in tools.message for key in ("include", "exclude", "rename", "descriptions"))


def test_messages_strip_pydantic_prefixes_and_name_the_bad_value() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("servers: {a: {url: 'ftp://x', timeout: fast}}")

    assert all(not p.message.startswith("Value error") for p in caught.value.problems)
    assert any("ftp://x" in p.message for p in caught.value.problems)
    assert any("fast" in p.message for p in caught.value.problems)


BROKEN = {
    "unknown top-level key": ("gateway: {}\nclient: {}\n", [("client", 2)]),
    "unknown gateway key": ("gateway:\n  nmae: x\n", [("gateway.nmae", 2)]),
    "unknown server key": ("servers:\n  a:\n    command: x\n    tool: {}\n", [("servers.a.tool", 4)]),
    "missing env var": ("servers:\n  a:\n    command: x\n    env: {T: '${TOKEN}'}\n", [("servers.a.env.T", 4)]),
    "every missing env var": (
        "servers:\n  a: {url: '${URL}'}\n  b: {command: '${CMD} ${ARG}'}\n",
        [("servers.a.url", 2), ("servers.b.command", 3), ("servers.b.command", 3)],
    ),
    "bad URL": ("servers:\n  a:\n    url: ftp://x\n", [("servers.a.url", 3)]),
    "URL without host": ("servers:\n  a:\n    url: 'http:///mcp'\n", [("servers.a.url", 3)]),
    "relative URL": ("servers:\n  a:\n    url: /mcp\n", [("servers.a.url", 3)]),
    "both command and url": ("servers:\n  a:\n    command: x\n    url: http://h\n", [("servers.a", 2)]),
    "neither command nor url": ("servers:\n  a:\n    env: {}\n", [("servers.a", 2)]),
    "server not a mapping": ("servers:\n  a: python\n", [("servers.a", 2)]),
    "empty command": ("servers:\n  a:\n    command: []\n", [("servers.a.command", 3)]),
    "empty command string": ("servers:\n  a:\n    command: ''\n", [("servers.a.command", 3)]),
    "unbalanced quote in command": ("servers:\n  a:\n    command: 'run \"x'\n", [("servers.a.command", 3)]),
    "bad duration": ("servers:\n  a:\n    command: x\n    timeout: fast\n", [("servers.a.timeout", 4)]),
    "boolean duration": ("servers:\n  a:\n    command: x\n    timeout: true\n", [("servers.a.timeout", 4)]),
    "negative timeout": ("servers:\n  a:\n    command: x\n    timeout: -5\n", [("servers.a.timeout", 4)]),
    "zero timeout": ("servers:\n  a:\n    command: x\n    timeout: 0s\n", [("servers.a.timeout", 4)]),
    "bad list item": (
        "servers:\n  a:\n    command: x\n    tools:\n      include: [a, {b: c}]\n",
        [("servers.a.tools.include[1]", 5)],
    ),
    "empty server name": ("servers:\n  '':\n    command: x\n", [('servers.""', 2)]),
    "duplicate key": ("servers:\n  a:\n    command: x\n    command: y\n", [("servers.a.command", 4)]),
    "duplicate server": ("servers:\n  a: {command: x}\n  a: {command: y}\n", [("servers.a", 3)]),
    "YAML syntax error": ("servers:\n  a: {command: [x\n", [("<document>", 3)]),
    "bad indentation": ("servers:\n  a:\n    command: x\n   url: y\n", [("<document>", 4)]),
    "two documents": ("gateway: {}\n---\nservers: {}\n", [("<document>", 2)]),
    "unknown tag": ("gateway:\n  name: !secret x\n", [("gateway.name", 2)]),
    "document is a list": ("- servers\n", [("<document>", 1)]),
    "document is a scalar": ("just text\n", [("<document>", 1)]),
    "a workflow without steps": ("workflows:\n  w: {steps: []}\n", [("workflows.w.steps", 2)]),
    "a workflow's unknown key": (
        "workflows:\n  w:\n    stepz: []\n",
        [("workflows.w.steps", 2), ("workflows.w.stepz", 3)],
    ),
    "three independent problems": (
        "gateway:\n  separator: [x]\nservers:\n  a:\n    url: http://h\n    timeout: soon\n  b:\n    command: x\n"
        "    env: {T: '${UNSET}'}\n",
        [("gateway.separator", 2), ("servers.a.timeout", 6), ("servers.b.env.T", 9)],
    ),
}


@pytest.mark.parametrize(("text", "expected"), BROKEN.values(), ids=BROKEN.keys())
def test_broken_config_reports_each_problem_where_it_is(text: str, expected: list[tuple[str, int]]) -> None:
    assert problems_of(text) == expected


def test_duplicate_key_names_both_lines() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("servers:\n  a:\n    command: x\n    command: y\n")

    (problem,) = caught.value.problems
    assert problem.line == 4
    assert "3" in problem.message


def test_an_unset_variable_is_reported_once_even_when_its_value_is_then_invalid() -> None:
    # The literal "${URL}" left in place is not a URL; saying so too would only repeat the cause.
    assert problems_of("servers:\n  a: {url: '${URL}'}\n") == [("servers.a.url", 2)]


def test_recursive_alias_is_a_problem_not_a_crash() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("servers:\n  a: &loop {command: x, env: *loop}\n")

    assert "servers.a.env" in [problem.path for problem in caught.value.problems]


NOT_YET = {
    "Redis without a host": ("shared_state", "redis://:pw@:6379/0", ["`redis://…`", "not a Redis URL", "HOST"]),
    "Redis database by name": ("shared_state", "redis://:pw@cache/zero", ["`redis://…`", "/DB"]),
    "Redis port not a number": ("shared_state", "redis://:pw@cache:port", ["`redis://…`", "malformed port"]),
    "misspelt shared state": ("shared_state", "memroy", ["'memroy'", "`memory`", "redis://"]),
    "Memcached shared state": ("shared_state", "memcached://:pw@cache", ["`memcached://…`", "`memory`"]),
    "Temporal without a port": ("engine", "temporal://pw@cluster", ["`temporal://…`", "HOST:PORT"]),
    "Temporal with a path": ("engine", "temporal://cluster:7233/ns", ["`temporal://…`", "HOST:PORT"]),
    "Temporal port not a number": ("engine", "temporal://cluster:pw", ["`temporal://…`", "malformed port"]),
    "unknown engine": ("engine", "celery", ["'celery'", "`local`", "temporal://"]),
    "MySQL store": ("store", "mysql://u:pw@db/patchbay", ["`mysql://…`", "sqlite:///", "postgresql://", "memory"]),
    "a path, not a URL": ("store", "patchbay.db", ["'patchbay.db'", "sqlite:///"]),
    "SQLite without a path": ("store", "sqlite:///", ["sqlite:///"]),
    "SQLite in memory": ("store", "sqlite:///:memory:", ["sqlite:///", "`memory`"]),
}


@pytest.mark.parametrize(("key", "value", "said"), NOT_YET.values(), ids=NOT_YET.keys())
def test_a_setting_that_would_do_nothing_is_an_error_saying_what_is_supported(
    key: str, value: str, said: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f"gateway:\n  name: x\n  {key}: '{value}'\n")

    (problem,) = caught.value.problems
    assert (problem.path, problem.line) == (f"gateway.{key}", 3)
    assert all(part in problem.message for part in said), problem.message
    assert "pw" not in problem.message  # a URL's credentials are never echoed


@pytest.mark.parametrize(
    "store",
    [
        "sqlite:///patchbay.db",
        "sqlite:////var/lib/patchbay/runs.db",
        "memory",
        "postgresql://patchbay@db:5432/patchbay",
        "postgres://db/patchbay",
    ],
)
def test_every_store_and_the_working_engine_and_shared_state_are_accepted(store: str) -> None:
    settings = parse(f"gateway: {{store: '{store}', engine: local, shared_state: memory}}").gateway

    assert (settings.store, settings.engine, settings.shared_state) == (store, "local", "memory")


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "redis://:secret@cache", "rediss://user:pw@cache.internal:6380/2"]
)
@pytest.mark.parametrize("failure", ["allow", "deny"])
def test_redis_shared_state_is_accepted_with_either_failure_setting(url: str, failure: str) -> None:
    settings = parse(f"gateway: {{shared_state: '{url}', shared_state_failure: {failure}}}").gateway

    assert (settings.shared_state, settings.shared_state_failure) == (url, failure)


def test_the_temporal_engine_is_accepted_with_its_namespace_and_task_queue() -> None:
    settings = parse(
        "gateway: {name: acme, engine: 'temporal://10.0.0.5:7233',"
        " temporal: {namespace: prod, task_queue: acme, takeover_after: 10s}}"
    ).gateway
    assert settings.engine == "temporal://10.0.0.5:7233"
    assert settings.temporal is not None
    assert (settings.temporal.namespace, settings.temporal.task_queue) == ("prod", "acme")
    assert settings.temporal.takeover_after == 10.0


def test_a_takeover_shorter_than_two_heartbeats_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("gateway:\n  engine: 'temporal://t:7233'\n  temporal: {takeover_after: 1s}\n")
    (problem,) = caught.value.problems
    assert problem.path == "gateway.temporal.takeover_after"


def test_temporal_settings_without_the_temporal_engine_are_an_error_as_they_would_do_nothing() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("gateway:\n  temporal: {namespace: prod}\n")

    (problem,) = caught.value.problems
    assert problem.path == "gateway"
    assert "need `engine: temporal://HOST:PORT`" in problem.message


def test_shared_state_failure_lets_calls_through_by_default() -> None:
    assert parse("gateway: {shared_state: 'redis://cache'}").gateway.shared_state_failure == "allow"


def test_shared_state_failure_without_redis_is_an_error_as_it_would_do_nothing() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("gateway:\n  shared_state_failure: deny\n")

    (problem,) = caught.value.problems
    assert problem.path == "gateway"
    assert "needs `shared_state: redis://…`" in problem.message


def test_a_shared_state_failure_setting_outside_allow_and_deny_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("gateway:\n  shared_state: 'redis://cache'\n  shared_state_failure: open\n")

    (problem,) = caught.value.problems
    assert (problem.path, problem.line) == ("gateway.shared_state_failure", 3)
    assert "'allow'" in problem.message
    assert "'deny'" in problem.message


def test_the_store_settings_default_to_memory_without_a_config_file() -> None:
    settings = parse("gateway: {name: x}").gateway

    assert settings.store == "memory"
    assert (settings.durability, settings.resume, settings.idempotency_ttl) == ("process", "auto", 86400.0)
    assert (settings.keep_runs.age, settings.keep_runs.count) == (30 * 86400.0, 100_000)


def test_a_config_file_keeps_its_runs_in_patchbay_db_next_to_it(tmp_path: Path) -> None:
    file = tmp_path / "patchbay.yaml"
    file.write_text("gateway: {name: x}\n")

    assert load_config(file, environ={}).gateway.store == f"sqlite:///{tmp_path / 'patchbay.db'}"


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("sqlite:///runs/p.db", "sqlite:///{dir}/runs/p.db"),
        ("sqlite:////var/lib/p.db", "sqlite:////var/lib/p.db"),
        ("memory", "memory"),
        ("postgresql://db/p", "postgresql://db/p"),
    ],
)
def test_a_relative_sqlite_store_is_relative_to_the_config_file(tmp_path: Path, written: str, expected: str) -> None:
    file = tmp_path / "patchbay.yaml"
    file.write_text(f"gateway: {{store: '{written}'}}\n")

    assert load_config(file, environ={}).gateway.store == expected.format(dir=tmp_path)


def test_the_store_settings_as_written() -> None:
    settings = parse(
        """\
        gateway:
          durability: machine
          resume: manual
          keep_runs: {age: 7d, count: 50}
          idempotency_ttl: 2h
        """
    ).gateway

    assert (settings.durability, settings.resume, settings.idempotency_ttl) == ("machine", "manual", 7200.0)
    assert (settings.keep_runs.age, settings.keep_runs.count) == (7 * 86400.0, 50)
    only_count = parse("gateway: {keep_runs: {count: 10}}").gateway.keep_runs
    assert (only_count.age, only_count.count) == (30 * 86400.0, 10)
    unbounded = parse("gateway: {keep_runs: {age: null, count: null}}").gateway.keep_runs
    assert (unbounded.age, unbounded.count) == (None, None)


def test_bad_store_settings_are_each_a_problem_at_its_key() -> None:
    assert problems_of(
        """\
        gateway:
          durability: disk
          resume: sometimes
          keep_runs: {age: forever, count: -1, size: 3}
          idempotency_ttl: 0s
        """
    ) == [
        ("gateway.durability", 2),
        ("gateway.resume", 3),
        ("gateway.keep_runs.age", 4),
        ("gateway.keep_runs.count", 4),
        ("gateway.keep_runs.size", 4),
        ("gateway.idempotency_ttl", 5),
    ]


def test_the_time_a_client_may_take_to_send_a_request_is_a_duration() -> None:
    assert parse("gateway: {name: x}").gateway.receive_timeout == 30.0
    assert parse("gateway: {receive_timeout: 1500ms}").gateway.receive_timeout == 1.5
    assert problems_of("gateway: {receive_timeout: 0s}") == [("gateway.receive_timeout", 1)]
    assert problems_of("gateway: {receive_timeout: forever}") == [("gateway.receive_timeout", 1)]


def test_reading_only_some_sections_skips_the_others_and_their_environment_variables() -> None:
    text = dedent("""\
        gateway: {name: "${NAME:-acme}"}
        servers:
          crm: {url: "${CRM_URL}", headers: {Authorization: "Bearer ${CRM_TOKEN}"}}
        audit: {redact_keys: [ssn]}
        workflows: {w: {steps: [{id: a, call: nowhere}]}}
        """)
    with pytest.raises(ConfigError) as raised:
        parse_config(text, environ={})
    assert "CRM_URL" in str(raised.value)

    config = parse_config(text, environ={}, sections=("gateway", "audit"))

    assert config.gateway.name == "acme"
    assert config.audit.redact_keys == ("ssn",)
    assert config.servers == {}
    assert config.workflows == {}


def messages_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return [str(problem) for problem in caught.value.problems]


@pytest.mark.parametrize(
    ("text", "path", "suggested"),
    [
        ("conectors: {}\n", "conectors", "connectors"),
        ("gateway:\n  separater: '.'\n", "gateway.separater", "separator"),
        ("servers:\n  a: {url: 'http://h', timout: 3s}\n", "servers.a.timout", "timeout"),
        ("workflows:\n  w:\n    steps:\n      - {id: a, call: t, wiht: {}}\n", "workflows.w.steps[0].wiht", "with"),
    ],
    ids=["top-level", "gateway", "server", "step"],
)
def test_an_unknown_key_close_to_an_allowed_one_is_suggested(text: str, path: str, suggested: str) -> None:
    (message,) = [m for m in messages_of(text) if m.startswith(path + " ")]
    assert message.endswith(f"; did you mean {suggested!r}?")


def test_an_unknown_key_like_no_allowed_one_gets_no_suggestion() -> None:
    (message,) = messages_of("gateway:\n  colour: blue\n")
    assert "did you mean" not in message


def test_a_server_entry_whose_kind_cannot_be_told_names_its_unknown_keys_too() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("servers:\n  a:\n    comand: [x]\n    timout: 3s\n    env: {}\n")

    kind, command, timeout = caught.value.problems
    assert (kind.path, kind.line) == ("servers.a", 2)
    assert "either `command` (stdio) or `url` (HTTP)" in kind.message
    assert (command.path, command.line) == ("servers.a.comand", 3)
    assert command.message.endswith("did you mean 'command'?")
    assert (timeout.path, timeout.line) == ("servers.a.timout", 4)
    assert timeout.message.endswith("did you mean 'timeout'?")


def test_a_step_whose_kind_cannot_be_told_names_its_unknown_keys_too() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("workflows:\n  w:\n    steps:\n      - id: a\n        cal: t\n")

    kind, key = caught.value.problems
    assert kind.path == "workflows.w.steps[0]"
    assert "exactly one of call" in kind.message
    assert (key.path, key.line) == ("workflows.w.steps[0].cal", 5)
    assert key.message.endswith("did you mean 'call'?")


def test_a_connector_names_its_unknown_key_with_a_suggestion() -> None:
    (message,) = messages_of("connectors:\n  b: {opnapi: x.yaml, base_url: 'http://127.0.0.1:1'}\n")
    assert message.startswith("connectors.b.opnapi (line 2): unknown key 'opnapi'")
    assert message.endswith("did you mean 'openapi'?")


def test_an_unknown_step_in_after_or_an_expression_suggests_the_closest_id() -> None:
    text = (
        "workflows:\n  w:\n    steps:\n      - {id: order, set: {}}\n"
        "      - {id: b, set: {}, after: [ordr]}\n"
        "      - {id: c, set: {x: '${.steps.oder.result}'}}\n"
    )
    assert messages_of(text) == [
        "workflows.w.steps[1].after[0] (line 5): step 'b' refers to unknown step 'ordr'; did you mean 'order'?",
        "workflows.w.steps[2] (line 6): step 'c' refers to unknown step 'oder'; did you mean 'order'?",
    ]


SYNTAX = {
    "indented less than its mapping": (
        "servers:\n  a:\n    command: [x]\n   url: y\n",
        (4, 4),
        "bad indentation: a key in column 4, but the mapping it belongs to (line 2) has its keys in column 3"
        ": indent it like the lines it belongs with, with spaces",
    ),
    "indented more than its mapping": (
        "servers:\n  a:\n    command: [x]\n      url: y\n",
        (4, 7),
        "bad indentation: a key in column 7, but the mapping it belongs to (line 3) has its keys in column 5"
        ": indent it like the lines it belongs with, with spaces",
    ),
    "an unclosed double quote": (
        'gateway:\n  name: "acme\nservers: {}\n',
        (2, 9),
        'a quoted value is never closed: the " here has no closing "',
    ),
    "an unclosed single quote": (
        "gateway:\n  name: 'acme\nservers: {}\n",
        (2, 9),
        "a quoted value is never closed: the ' here has no closing '",
    ),
    "an unclosed bracket": (
        "servers:\n  a:\n    command: [x, y\n  b: {url: z}\n",
        (4, 4),
        "the list opened with '[' on line 3, column 14 is not closed: expected ',' or ']' here, found ':'",
    ),
    "an unclosed brace at the end": (
        "servers:\n  a: {command: x\n",
        (3, 1),
        "the mapping opened with '{' on line 2, column 6 is not closed: expected ',' or '}' here, found the end of "
        "the file",
    ),
    "a tab indenting": (
        "servers:\n  a:\n  \tcommand: x\n",
        (3, 3),
        "a tab indents this line: YAML indents with spaces only",
    ),
    "': ' in a plain value": (
        "gateway:\n  name: a: b\n",
        (2, 10),
        "a second ': ' on this line: a value holding ': ' must be quoted",
    ),
    "a key among list items": (
        "servers:\n  - a\n  b: 1\n",
        (3, 3),
        "a key among the items of the list on line 2: a list holds `- ` items only",
    ),
}


@pytest.mark.parametrize(("text", "where", "message"), SYNTAX.values(), ids=SYNTAX.keys())
def test_a_yaml_syntax_error_says_where_and_what_was_expected_in_plain_words(
    text: str, where: tuple[int, int], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)

    (problem,) = caught.value.problems
    assert (problem.path, problem.line, problem.column) == ("<document>", *where)
    assert problem.message == message
    assert str(problem) == f"<document> (line {where[0]}, column {where[1]}): {message}"
    assert "<block" not in str(caught.value)


def test_a_duplicate_key_is_still_reported_as_one() -> None:
    assert messages_of("servers:\n  a: {command: x}\n  a: {command: y}\n") == [
        "servers.a (line 3): duplicate key 'a' (first on line 2)"
    ]


def test_the_scale_out_example_shares_limits_on_redis_and_runs_on_postgresql() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "scale-out.yaml"
    environ = {"PATCHBAY_STORE": "postgresql://postgres@db:5432/patchbay", "PATCHBAY_STATE_KEY": "k" * 32}
    settings = load_config(example, environ=environ).gateway

    assert (settings.shared_state, settings.shared_state_failure) == ("redis://127.0.0.1:6379/0", "allow")
    assert settings.store == environ["PATCHBAY_STORE"]
    assert settings.state_key is not None
    assert settings.engine == "temporal://127.0.0.1:7233"
    with pytest.raises(ConfigError) as caught:  # without the state key, replicas could not share states
        load_config(example, environ={"PATCHBAY_STORE": environ["PATCHBAY_STORE"]})
    assert "PATCHBAY_STATE_KEY" in str(caught.value)
