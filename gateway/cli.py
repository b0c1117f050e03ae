"""The ``patchbay`` command: the only reader of argv and the environment."""

import argparse
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import anyio
import anyio.abc
import yaml
from pydantic import TypeAdapter, ValidationError

from gateway.audit import audit_redactor
from gateway.config import Config, load_config
from gateway.errors import ConfigError, ConfigProblem, StoreError, ToolNotFound
from gateway.heap import freeze_startup_heap
from gateway.needs import for_tool
from gateway.store import RunQuery, RunStatus, open_store
from gateway.terminal import TerminalChannel
from gateway.types import CallContext, Principal, Provider, ToolResult
from gateway.units import Duration
from gateway.workflows.graph import mermaid
from gateway.workflows.history import Redact, render_rows, render_timeline, summary_rows, timeline
from gateway.workflows.runner import result_value
from gateway.workflows.runs import RunNotResumable
from policies.auth import check_bind, new_token

# The gateway, its server side and uvicorn import the MCP SDK (a second of CPU): only the commands that run a
# gateway import them, so `runs`, `graph` and `token` start at once.
if TYPE_CHECKING:
    from gateway.gateway import Gateway

logger = logging.getLogger("patchbay")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LOCAL_USER = Principal("local", kind="stdio")
_LOOP = {"use_uvloop": True}
"""uvloop for serving: a faster event loop under the same asyncio semantics (anyio falls back without it)."""
_WORKFLOW_SECTIONS = ("gateway", "workflows")
"""What ``patchbay graph`` reads of the config: no upstream, so none of their environment variables."""
_STORE_SECTIONS = ("gateway", "audit", "workflows")
"""What ``patchbay runs`` reads of the config: where the store is, what to redact, and the workflows (a run on
Temporal is replayed with its plan to show its steps). Not the servers, so the environment variables only they
use need not be set."""


def main(argv: Sequence[str] | None = None, *, providers: Sequence[Provider] = ()) -> None:
    """Entry point of ``patchbay`` and ``python -m gateway``; exits with the command's status.

    ``providers`` are served beside the configured servers (a program embedding patchbay with a
    provider kind of its own).
    """
    args = _parser().parse_args(argv)
    args.providers = tuple(providers)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLogger().level))  # one line per request
    try:
        sections = getattr(args, "sections", None)
        config = load_config(args.config, os.environ, sections=sections) if args.config is not None else None
        status: int = args.run(config, args)
    except (ConfigError, StoreError) as exc:  # a store that cannot be used: say why, no traceback
        print(exc, file=sys.stderr)
        status = 1
    except BaseExceptionGroup as group:  # a ConfigError raised inside the gateway's task group
        found = _config_error(group)
        if found is None:
            raise
        print(found, file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 130
    # A Temporal client (engine: temporal://…) left to the interpreter's finalization may abort it
    # (temporalio/sdk-python#300, "PyGILState_Release: thread state must be current"): free it now.
    gc.collect()
    sys.exit(status)


def _config_error(group: BaseExceptionGroup[BaseException]) -> ConfigError | None:
    """The ConfigError ``group`` holds, when that is all it holds (nested groups included)."""
    errors: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            errors.append(exc)
    return errors[0] if len(errors) == 1 and isinstance(errors[0], ConfigError) else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchbay", description="MCP tool-orchestration gateway.")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway (streamable HTTP on /mcp, or stdio)")
    serve.add_argument("config", metavar="CONFIG")
    serve.add_argument("--stdio", action="store_true", help="serve one client over stdin/stdout")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate the config and connect to every upstream")
    check.add_argument("config", metavar="CONFIG")
    check.set_defaults(run=_check)

    tools = commands.add_parser(
        "tools",
        help="print the merged tool registry and each upstream's state, or one tool",
        description="Without TOOL: every tool (name, server, description) and each upstream's state. With TOOL: that"
        " tool's description, annotations, input and output schema (only its own upstream is started).",
    )
    tools.add_argument("config", metavar="CONFIG")
    tools.add_argument("tool", metavar="TOOL", nargs="?", help="show this tool only")
    tools.set_defaults(run=_tools)

    call = commands.add_parser(
        "call",
        help="call one tool through the full call path and print the result",
        description="Prints the result as a workflow step sees it (`.steps.<id>.result`): the structured content"
        " when there is one, else the text (parsed as JSON when it is JSON); --json prints the whole result. Only the"
        " upstreams the tool needs are started (for a workflow: those its steps call, and their fallbacks). What the"
        " call asks (ask_user, ask_model, an upstream's elicitation or sampling) is asked on the terminal, or"
        " answered from --answers.",
    )
    call.add_argument("config", metavar="CONFIG")
    call.add_argument("tool", metavar="TOOL")
    call.add_argument("--args", default="{}", help="the arguments as a JSON object")
    call.add_argument("--json", action="store_true", help="print the whole result (content, structuredContent, …)")
    call.add_argument(
        "--answers",
        metavar="FILE",
        help="answers to what the call asks, by step id (YAML or JSON: {confirm: {ok: true}, draft: 'text'})",
    )
    call.set_defaults(run=_call)

    token = commands.add_parser("token", help="print a fresh client token and the SHA-256 the config stores")
    token.set_defaults(run=_token, config=None)

    graph = commands.add_parser("graph", help="print a workflow's steps and their dependencies as Mermaid")
    graph.add_argument("config", metavar="CONFIG")
    graph.add_argument("workflow", metavar="WORKFLOW")
    graph.set_defaults(run=_graph, sections=_WORKFLOW_SECTIONS)

    runs = commands.add_parser(
        "runs",
        help="list the journaled workflow runs, or show one run's timeline",
        description="Without RUN_ID: the runs in the store (with engine: temporal://…, in Temporal), most recent"
        " first (id, workflow, status, caller, start, duration, failed step). With RUN_ID: that run's timeline:"
        " each step's tries with their start, end,"
        " duration, outcome, arguments and result, the compensations, and the output or error. Arguments,"
        " results and errors are redacted as the audit trail is (audit.redact_keys, audit.redact_patterns).",
    )
    runs.add_argument("config", metavar="CONFIG")
    runs.add_argument("run_id", metavar="RUN_ID", nargs="?", help="the run to show (its id is in the result's _meta)")
    runs.add_argument("--workflow", metavar="W", help="only runs of workflow W")
    runs.add_argument("--status", metavar="S", choices=get_args(RunStatus), help="only runs in status S (%(choices)s)")
    runs.add_argument("--since", metavar="DURATION", help="only runs started within DURATION (30m, 2h, 90s)")
    runs.add_argument("--json", action="store_true", help="print JSON instead of text")
    runs.set_defaults(run=_runs, sections=_STORE_SECTIONS)

    resume = commands.add_parser(
        "resume",
        help="resume an interrupted workflow run from its journal and print its result (on Temporal: wait for it)",
    )
    resume.add_argument("config", metavar="CONFIG")
    resume.add_argument("run_id", metavar="RUN_ID")
    resume.set_defaults(run=_resume)
    return parser


def _serve(config: Config, args: argparse.Namespace) -> int:
    if args.stdio:
        anyio.run(_serve_stdio, config, args.providers, backend_options=_LOOP)
        return 0
    return anyio.run(_serve_http, config, args, backend_options=_LOOP)


GRACEFUL_SHUTDOWN = 10
"""Seconds ``serve`` waits on SIGTERM for requests in flight (an open event stream would hold it forever)."""


async def _serve_http(config: Config, args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import serving
    from gateway.http_server import receive_bounded

    refusal = check_bind(args.host, config.clients)
    if refusal is not None:
        print(f"patchbay: {refusal}", file=sys.stderr)
        return 1
    _connect_note(config, args.providers)
    server: uvicorn.Server | None = None
    terminated = False

    def stop() -> None:
        nonlocal terminated
        terminated = True
        if server is not None:
            server.should_exit = True  # uvicorn stops gracefully; the upstreams close after it
        else:
            starting.cancel()

    async with anyio.create_task_group() as watch:
        await watch.start(_on_sigterm, stop)
        with anyio.CancelScope() as starting:
            async with serving(config, host=args.host, providers=args.providers) as app:
                protocol = receive_bounded(config.gateway.receive_timeout)
                settings = uvicorn.Config(
                    app,
                    host=args.host,
                    port=args.port,
                    log_level=args.log_level,
                    lifespan="off",
                    http=protocol,
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
                )
                server = uvicorn.Server(settings)
                freeze_startup_heap()
                print(f"patchbay serving MCP on http://{args.host}:{args.port}/mcp", file=sys.stderr)
                await server.serve()
        watch.cancel_scope.cancel()
    return 0 if terminated or (server is not None and server.started) else 1


async def _serve_stdio(config: Config, providers: Sequence[Provider]) -> None:
    """Serve until the client closes stdin, or until SIGTERM (stdin may still be open: the wait for it is
    cancellable); either way the upstreams close before this returns."""
    from gateway.gateway import open_gateway
    from gateway.server import McpFrontend, serve_stdio

    stopping = anyio.CancelScope()
    async with anyio.create_task_group() as watch:
        await watch.start(_on_sigterm, stopping.cancel)
        with stopping:
            async with open_gateway(config, providers=providers, resume=config.gateway.resume == "auto") as gateway:
                freeze_startup_heap()
                await serve_stdio(McpFrontend(gateway, LOCAL_USER))
        watch.cancel_scope.cancel()


async def _on_sigterm(stop: Callable[[], None], *, task_status: anyio.abc.TaskStatus[None]) -> None:
    """Call ``stop`` on SIGTERM, for ``serve`` to wind down rather than die: the process must not exit before its
    stdio upstreams have closed (stdin EOF, then SIGTERM, then SIGKILL, each bounded; the SDK's transport does
    that) and been reaped, or they would live on reparented to init. While this runs, SIGTERM cannot kill the
    process (uvicorn, which sees the signal too, raises it again once it has stopped)."""
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            stop()


def _token(config: Config | None, args: argparse.Namespace) -> int:
    token, digest = new_token()
    print(f"token:        {token}")
    print(f"token_sha256: {digest}")
    print("Give the token to the client (it sends `Authorization: Bearer <token>`); put only the hash in the config:")
    print(f'  clients:\n    <name>: {{token_sha256: "{digest}"}}')
    return 0


def _connect_note(config: Config, providers: Sequence[Provider]) -> None:
    names = [*config.upstreams, *(provider.name for provider in providers)]
    count = len(names)
    print(f"connecting to {count} server{'s' if count != 1 else ''}: {', '.join(names)} …", file=sys.stderr)


def _check(config: Config, args: argparse.Namespace) -> int:
    _connect_note(config, args.providers)

    async def run() -> list[ConfigProblem]:
        from gateway.gateway import open_gateway

        async with open_gateway(config, strict=False, providers=args.providers) as gateway:
            _print_upstreams(gateway, problems=False)
            problems = [*gateway.problems, *gateway.pending_problems]
            roots: list[ConfigProblem] = []
            for status in gateway.status():
                section = config.section_of(status.name)
                problems.extend(ConfigProblem(p.path, p.message, config.line_at(p.path)) for p in status.problems)
                if status.state != "up":
                    line = config.line_of(section, status.name)
                    roots.append(
                        ConfigProblem(f"{section}.{status.name}", f"could not connect: {status.last_error}", line)
                    )
            return _causes_first(roots, problems)

    problems = anyio.run(run)
    if problems:
        print(ConfigError(problems, source=config.source), file=sys.stderr)
        return 1
    print(f"{config.source}: ok")
    return 0


def _causes_first(roots: Sequence[ConfigProblem], problems: Sequence[ConfigProblem]) -> list[ConfigProblem]:
    """The upstreams that could not connect first, each followed by what follows from it (a workflow calling its
    tools), then every other problem: a user fixes the cause, not its consequences."""
    ordered: list[ConfigProblem] = []
    for root in roots:
        ordered += [root, *(p for p in problems if p.cause == root.path)]
    causes = {root.path for root in roots}
    return ordered + [p for p in problems if p.cause not in causes]


def _tools(config: Config, args: argparse.Namespace) -> int:
    if args.tool is not None:
        return _tool(config, args)
    _connect_note(config, args.providers)

    async def run() -> None:
        from gateway.gateway import open_gateway

        async with open_gateway(config, strict=False, providers=args.providers) as gateway:
            rows = [(name, e.provider, _first_line(e.tool.description)) for name, e in gateway.registry.tools.items()]
            _print_table(("TOOL", "SERVER", "DESCRIPTION"), rows)
            print()
            _print_upstreams(gateway)
            for problem in [*gateway.problems, *gateway.pending_problems]:
                print(f"problem: {problem}", file=sys.stderr)

    anyio.run(run)
    return 0


def _tool(config: Config, args: argparse.Namespace) -> int:
    """``tools CONFIG TOOL``: one tool, in full; exit 2 when there is no such tool."""
    config = for_tool(config, args.tool)
    _connect_note(config, args.providers)

    async def run() -> int:
        from gateway.gateway import open_gateway

        async with open_gateway(config, strict=False, providers=args.providers) as gateway:
            entry = gateway.registry.tools.get(args.tool)
            if entry is None:
                print(ToolNotFound(args.tool), file=sys.stderr)
                _say_who_is_down(gateway)
                return 2
            definition = entry.tool.definition
            print(f"{args.tool}  (server {entry.provider}, its name there: {entry.target})")
            if definition.get("title"):
                print(f"title: {definition['title']}")
            print(f"\n{entry.tool.description or '(no description)'}\n")
            for label, key in (("annotations", "annotations"), ("input schema", "inputSchema")):
                print(f"{label}: {json.dumps(definition.get(key) or {}, indent=2)}")
            output = definition.get("outputSchema")
            print(f"output schema: {json.dumps(output, indent=2) if output else '(none: results are text)'}")
            return 0

    return anyio.run(run)


def _call(config: Config, args: argparse.Namespace) -> int:
    try:
        arguments = json.loads(args.args)
    except json.JSONDecodeError as exc:
        print(f"--args is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(arguments, dict):
        print("--args must be a JSON object", file=sys.stderr)
        return 2

    try:
        answers = _answers(args.answers)
    except ValueError as exc:
        print(f"--answers: {exc}", file=sys.stderr)
        return 2
    config = for_tool(config, args.tool)
    _connect_note(config, args.providers)
    channel = TerminalChannel(answers, interactive=sys.stdin.isatty() and sys.stdout.isatty(), out=sys.stderr)

    async def run() -> int:
        from gateway.gateway import open_gateway

        async with open_gateway(config, strict=False, providers=args.providers) as gateway:
            started = time.perf_counter()
            context = CallContext(principal=LOCAL_USER, progress=_show_progress, client=channel)
            try:
                result = await gateway.dispatcher.call(args.tool, arguments, context)
            except ToolNotFound as exc:
                print(exc, file=sys.stderr)
                _say_who_is_down(gateway)
                return 2
            return _print_result(result, started, whole=args.json)

    return anyio.run(run)


def _say_who_is_down(gateway: "Gateway") -> None:
    """After an unknown tool: the upstreams that are not up, whose tools are unknown for that reason."""
    for status in gateway.status():
        if status.state != "up":
            print(f"  {status.name} is {status.state}: {status.last_error}", file=sys.stderr)


def _answers(path: str | None) -> dict[str, Any]:
    """The answers file (YAML or JSON): a mapping of step ids to answers.

    Raises:
        ValueError: it cannot be read, or is not such a mapping.
    """
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must map step ids to answers ({{confirm: {{ok: true}}, draft: text}})")
    return {str(key): value for key, value in loaded.items()}


def _print_result(result: ToolResult, started: float, *, whole: bool = False) -> int:
    """Print a call's result as a workflow step sees it (``whole``: the whole result, as JSON), and how long it
    took on stderr; the exit status."""
    if whole:
        print(json.dumps(result.wire(), indent=2, ensure_ascii=False))
    elif result.is_error:
        for item in result.content:
            print(item.get("text") if item.get("type") == "text" else json.dumps(item, indent=2), flush=True)
    else:
        value = result_value(result)
        print(value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False), flush=True)
    elapsed = (time.perf_counter() - started) * 1000
    print(f"{'error' if result.is_error else 'ok'} in {elapsed:.1f} ms", file=sys.stderr)
    return 1 if result.is_error else 0


async def _show_progress(progress: float, total: float | None, message: str | None) -> None:
    """A workflow's steps as they settle, on stderr: ``  [3] order: succeeded in 4 ms``."""
    of = f"/{total:g}" if total is not None else ""
    print(f"  [{progress:g}{of}] {message or ''}", file=sys.stderr, flush=True)


def _graph(config: Config, args: argparse.Namespace) -> int:
    plan = config.plans.get(args.workflow)
    if plan is None:
        known = ", ".join(config.plans) or "none"
        print(f"no workflow {args.workflow!r} in {config.source} (workflows: {known})", file=sys.stderr)
        return 2
    print(mermaid(plan.graph), end="")
    return 0


def _runs(config: Config, args: argparse.Namespace) -> int:
    if args.run_id is not None and (args.workflow or args.status or args.since):
        print("--workflow, --status and --since choose runs to list; they do not apply to one RUN_ID", file=sys.stderr)
        return 2
    since: float | None = None
    if args.since is not None:
        try:
            since = time.time() - TypeAdapter(Duration).validate_python(args.since)
        except ValidationError:
            print(f"--since: expected a duration like 30m, 2h or 90s, got {args.since!r}", file=sys.stderr)
            return 2
    redact = audit_redactor(config.audit).redact

    async def run() -> int:
        if config.gateway.engine != "local":  # its runs are Temporal's
            return await _runs_on_temporal(config, args, since, redact)
        async with open_store(config.gateway.store, durability=config.gateway.durability) as store:
            if args.run_id is None:
                query = RunQuery(workflow=args.workflow, status=args.status, since=since)
                rows = summary_rows(await store.runs(query))
                print(_json(rows) if args.json else render_rows(rows), end="")
                return 0
            record = await store.run(args.run_id)
            if record is None:
                print(
                    f"no run {args.run_id!r} in the store (`patchbay runs {args.config}` lists them)", file=sys.stderr
                )
                return 1
            view = timeline(record, await store.events(record.run_id), redact)
            print(_json(view) if args.json else render_timeline(view), end="")
            return 0

    return anyio.run(run)


async def _runs_on_temporal(config: Config, args: argparse.Namespace, since: float | None, redact: Redact) -> int:
    """``patchbay runs`` of a gateway whose runs are Temporal's: read there, as its replicas do (one of them need
    not be running); the same rows and timeline as from the store."""
    from gateway.backends import connect_temporal, temporal_queue  # Redis's and Temporal's SDKs only where used
    from gateway.workflows.temporal_records import TemporalRecords

    client = await connect_temporal(config.gateway)
    assert client is not None  # engine: temporal://…
    records = TemporalRecords(client, temporal_queue(config.gateway), config.plans)
    if args.run_id is None:
        found = await records.records(workflow=args.workflow, status=args.status, since=since)
        rows = summary_rows(found)
        print(_json(rows) if args.json else render_rows(rows), end="")
        return 0
    record = await records.record(args.run_id)
    if record is None:
        print(f"no run {args.run_id!r} in Temporal (`patchbay runs {args.config}` lists them)", file=sys.stderr)
        return 1
    view = timeline(record, await records.events(record.run_id), redact)
    print(_json(view) if args.json else render_timeline(view), end="")
    return 0


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _resume(config: Config, args: argparse.Namespace) -> int:
    _connect_note(config, args.providers)
    if config.gateway.engine != "local":
        print(TEMPORAL_RESUME, file=sys.stderr)

    async def run() -> int:
        from gateway.gateway import open_gateway

        async with open_gateway(config, strict=False, providers=args.providers) as gateway:
            started = time.perf_counter()
            try:
                result = await gateway.runs.resume(args.run_id)
            except RunNotResumable as exc:
                print(exc, file=sys.stderr)
                return 1
            return _print_result(result, started)

    return anyio.run(run)


TEMPORAL_RESUME = (
    "workflows run on Temporal here (gateway.engine), where a run is never interrupted: any replica carries it on "
    "(this one too, while it waits). A run still running is waited for, and its result printed."
)


def _print_upstreams(gateway: "Gateway", *, problems: bool = True) -> None:
    """The providers' states, and what they lack or left out as warnings (``problems``: those of their config
    too, which ``check`` lists as errors instead)."""
    rows = [(s.name, s.state, str(s.tools), s.last_error or "") for s in gateway.status()]
    _print_table(("SERVER", "STATE", "TOOLS", "LAST ERROR"), rows)
    for status in gateway.status():
        for problem in status.problems if problems else ():
            where = ConfigProblem(problem.path, problem.message, gateway.config.line_at(problem.path))
            print(f"warning: {where}", file=sys.stderr)
        for warning in status.warnings:
            section = gateway.config.section_of(status.name)
            where = ConfigProblem(f"{section}.{status.name}", warning, gateway.config.line_of(section, status.name))
            print(f"warning: {where}", file=sys.stderr)


def _print_table(header: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _first_line(text: str, limit: int = 80) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"
