"""The config file as typed, frozen models: read once, every problem reported with its location.

:func:`load_config` reads a YAML file (DESIGN §3); :func:`parse_config` does the same from text.
Both raise :class:`~gateway.errors.ConfigError` listing *every* problem found – YAML syntax,
duplicate keys, unset environment variables, unknown keys, bad values – each with its key path
(``servers.crm.timeout``) and line, so one run of ``patchbay check`` shows all of them.

Strings may hold ``${NAME}`` or ``${NAME:-default}`` (the default is used when ``NAME`` is unset
or empty, as in a shell); ``$${`` is a literal ``${``, and anything else inside ``${…}`` is left
alone. Mapping keys are names: they are always the text as written (``on:`` is ``"on"``, not
``True``) and are never interpolated.
"""

import os
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
)

from gateway.errors import ConfigError, ConfigProblem

__all__ = [
    "Config",
    "GatewaySettings",
    "HttpServer",
    "ServerConfig",
    "StdioServer",
    "ToolFilter",
    "load_config",
    "parse_config",
]

DEFAULT_NAME = "patchbay"
DEFAULT_SEPARATOR = "__"
DEFAULT_STORE = "sqlite:///patchbay.db"
DEFAULT_ENGINE = "local"
DEFAULT_SHARED_STATE = "memory"
DEFAULT_TIMEOUT = 30.0
"""Seconds an upstream call may take."""

Loc = tuple[str | int, ...]
"""A key path into the config: mapping keys are ``str``, list indexes ``int``."""

# Numbers are coerced to strings so `env: {PORT: 8080}` and `command: [serve, 8080]` just work.
_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)
_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_VARIABLE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Workflow strings are jq programs such as `${.input.order_id}`; the engine evaluates them later.
_NOT_INTERPOLATED = frozenset({"workflows"})
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _parse_duration(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 20s or 200ms, got {value!r}")
    if not isinstance(value, str):
        return value  # a number of seconds; pydantic checks it is one
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"expected a duration like 20s or 200ms, got {value!r}")
    return float(match[1]) * _UNIT_SECONDS[match[2] or "s"]


def _split_command(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return shlex.split(value)
    except ValueError as exc:  # unbalanced quotes
        raise ValueError(f"cannot split command {value!r}: {exc}") from None


def _check_command(command: list[str]) -> list[str]:
    if not command or not command[0]:
        raise ValueError("the command is empty")
    return command


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    try:
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        raise ValueError(f"not an http(s) URL: {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise ValueError(f"not an http(s) URL: {url!r}")
    return url


def _check_server_name(name: str) -> str:
    if not name:
        raise ValueError("a server name must not be empty")
    return name


Duration = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0, allow_inf_nan=False)]
"""Seconds, written as a number or as ``20s``, ``200ms``, ``1.5s``, ``2m``."""


class GatewaySettings(BaseModel):
    """The ``gateway:`` section: how this gateway names its tools and where it keeps state."""

    model_config = _MODEL_CONFIG

    name: str = DEFAULT_NAME
    """The server name this gateway reports to its clients."""
    separator: str = DEFAULT_SEPARATOR
    """Joins a server's prefix and a tool name: ``crm__get_order``."""
    store: str = DEFAULT_STORE
    """Database URL of the run journal, pins and audit log."""
    engine: str = DEFAULT_ENGINE
    """Where workflows run: ``local`` (in-process) or ``temporal://HOST:PORT``."""
    shared_state: str = DEFAULT_SHARED_STATE
    """Where rate limits and breaker state live: ``memory`` or ``redis://…``."""


class ToolFilter(BaseModel):
    """Which of an upstream's tools are served, and under which names and descriptions."""

    model_config = _MODEL_CONFIG

    include: list[str] = ["*"]
    """Glob patterns (fnmatch) of upstream tool names to serve."""
    exclude: list[str] = []
    """Glob patterns of tool names to hide, even when included."""
    rename: dict[str, str] = {}
    """Upstream tool name → the name served (before the server prefix is added)."""
    descriptions: dict[str, str] = {}
    """Upstream tool name → a description that replaces the upstream's."""


class _ServerBase(BaseModel):
    model_config = _MODEL_CONFIG

    prefix: str | None = None
    """Prepended to tool names with the separator; None: the server's key; ``""``: names pass through."""
    timeout: Duration = DEFAULT_TIMEOUT
    """Seconds a call to this server may take before it is cancelled."""
    tools: ToolFilter = ToolFilter()
    """Which tools to serve and how to name them."""


class StdioServer(_ServerBase):
    """An upstream MCP server run as a subprocess, spoken to over stdin/stdout."""

    kind: Literal["stdio"] = "stdio"
    """Set from the entry's shape (it has ``command``); users do not write it."""
    command: Annotated[list[str], BeforeValidator(_split_command), AfterValidator(_check_command)]
    """Program and arguments; a string is split like a shell would."""
    env: dict[str, str] = {}
    """Extra environment variables for the subprocess."""
    cwd: str | None = None
    """Working directory of the subprocess; relative paths are relative to the config file."""


class HttpServer(_ServerBase):
    """An upstream MCP server reached over streamable HTTP (or legacy SSE)."""

    kind: Literal["http"] = "http"
    """Set from the entry's shape (it has ``url``); users do not write it."""
    url: Annotated[str, AfterValidator(_check_url)]
    """Absolute ``http://`` or ``https://`` URL of the MCP endpoint."""
    headers: dict[str, str] = {}
    """Sent with every request, e.g. ``Authorization``."""
    sse: bool = False
    """True: the legacy HTTP+SSE transport instead of streamable HTTP."""


def _server_kind(value: Any) -> str | None:
    if isinstance(value, Mapping):
        has_command, has_url = "command" in value, "url" in value
        if has_command != has_url:
            return "stdio" if has_command else "http"
        return None
    return getattr(value, "kind", None)


ServerConfig = Annotated[
    Annotated[StdioServer, Tag("stdio")] | Annotated[HttpServer, Tag("http")],
    Discriminator(
        _server_kind,
        custom_error_type="server_kind",
        custom_error_message="a server needs either `command` (stdio) or `url` (HTTP)",
    ),
]
"""One upstream server; its kind follows from whether it has ``command`` or ``url``."""


class Config(BaseModel):
    """The whole config file."""

    model_config = _MODEL_CONFIG

    gateway: GatewaySettings = GatewaySettings()
    """Settings of the gateway itself."""
    servers: dict[Annotated[str, AfterValidator(_check_server_name)], ServerConfig] = {}
    """Upstream MCP servers by name; the name is the default tool-name prefix."""

    _source: str = PrivateAttr(default="config")
    _lines: dict[Loc, int] = PrivateAttr(default_factory=dict)

    @property
    def source(self) -> str:
        """Where the config came from: the file name, or ``"config"``."""
        return self._source

    def line_of(self, *path: str | int) -> int | None:
        """The 1-based line of ``path`` (or of its nearest ancestor that has one), else None."""
        for end in range(len(path), -1, -1):
            line = self._lines.get(path[:end])
            if line is not None:
                return line
        return None


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and check the config file at ``path``; relative ``cwd`` paths are resolved against its directory.

    Raises:
        ConfigError: the file cannot be read, or lists every problem found in it.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ConfigError([ConfigProblem("<file>", f"cannot read {file}: {reason}")], source=str(file)) from exc
    env = os.environ if environ is None else environ
    return parse_config(text, source=str(file), environ=env, base_dir=file.absolute().parent)


def parse_config(
    text: str, *, source: str = "config", environ: Mapping[str, str], base_dir: Path | None = None
) -> Config:
    """Check config ``text``; ``source`` names it in errors, ``base_dir`` anchors relative ``cwd`` paths.

    Raises:
        ConfigError: lists every problem found.
    """
    problems: list[ConfigProblem] = []
    tree = _Tree(text, problems)
    try:
        data = tree.load()
    except yaml.YAMLError as exc:
        raise ConfigError([_syntax_problem(exc, text)], source=source) from None
    if data is None:  # an empty file: every default
        data = {}
    if not isinstance(data, dict):
        problems.append(ConfigProblem("<document>", "the config must be a mapping of keys to values", tree.line(())))
        raise ConfigError(problems, source=source)
    data = {key: _interpolate(value, (key,), environ, tree) for key, value in data.items()}
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        already = {p.path for p in problems}  # an unset variable also makes its value invalid: say it once
        problems.extend(p for p in _validation_problems(exc, tree) if p.path not in already)
        raise ConfigError(_in_file_order(problems), source=source) from None
    if problems:
        raise ConfigError(_in_file_order(problems), source=source)
    if base_dir is not None:
        config = _resolve_cwds(config, base_dir)
    config._source = source
    config._lines = tree.lines
    return config


class _Tree:
    """Builds plain data from the YAML node tree, recording each key's line and reporting duplicates."""

    def __init__(self, text: str, problems: list[ConfigProblem]) -> None:
        self.lines: dict[Loc, int] = {}
        self._problems = problems
        self._open: set[int] = set()  # nodes being built: an alias back into one would recurse forever
        self._loader = yaml.SafeLoader(text)

    def load(self) -> Any:
        try:
            node = self._loader.get_single_node()
            if node is None:
                return None
            self.lines[()] = node.start_mark.line + 1
            return self._build(node, ())
        finally:
            self._loader.dispose()

    def line(self, loc: Loc) -> int | None:
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return None

    def problem(self, loc: Loc, message: str, line: int | None = None) -> None:
        self._problems.append(ConfigProblem(_dotted(loc), message, line or self.line(loc)))

    def _build(self, node: yaml.Node, loc: Loc) -> Any:
        if id(node) in self._open:
            self.problem(loc, "an alias refers to a node that contains it")
            return None
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, loc)
            if isinstance(node, yaml.SequenceNode):
                return [self._item(item, (*loc, index)) for index, item in enumerate(node.value)]
            try:
                return self._loader.construct_object(node, deep=True)
            except yaml.constructor.ConstructorError as exc:
                self.problem(loc, exc.problem or str(exc), node.start_mark.line + 1)
                return None
        finally:
            self._open.discard(id(node))

    def _item(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        return self._build(node, loc)

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                merged.extend(value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node])
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(loc, "a key must be a name, not a list or mapping", line)
                continue
            key = str(key_node.value)
            if key in first_line:
                self.problem((*loc, key), f"duplicate key {key!r} (first on line {first_line[key]})", line)
            first_line.setdefault(key, line)
            self.lines[(*loc, key)] = first_line[key]
            result[key] = self._build(value_node, (*loc, key))
        # `<<: *defaults` fills in keys not written explicitly, as YAML merge keys do.
        for source in merged:
            extra = self._build(source, loc)
            if isinstance(extra, dict):
                for key, value in extra.items():
                    result.setdefault(key, value)
            else:
                self.problem(loc, "`<<` can only merge mappings", source.start_mark.line + 1)
        return result


def _interpolate(value: Any, loc: Loc, environ: Mapping[str, str], tree: _Tree) -> Any:
    if loc[0] in _NOT_INTERPOLATED:
        return value
    if isinstance(value, dict):
        return {key: _interpolate(item, (*loc, key), environ, tree) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, (*loc, index), environ, tree) for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match[1], match[2]
        if name is None:
            return "${"
        found = environ.get(name)
        if default is not None and not found:
            return default
        if found is None:
            tree.problem(loc, f"environment variable {name} is not set")
            return match[0]
        return found

    return _VARIABLE.sub(substitute, value)


def _in_file_order(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    return sorted(problems, key=lambda problem: problem.line or 0)


def _syntax_problem(exc: yaml.YAMLError, text: str) -> ConfigProblem:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        return ConfigProblem("<document>", exc.problem or str(exc), mark.line + 1 if mark else None)
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        return ConfigProblem("<document>", f"{exc.reason} (#x{exc.character:04x})", line)
    return ConfigProblem("<document>", str(exc))


def _validation_problems(exc: ValidationError, tree: _Tree) -> Iterator[ConfigProblem]:
    for error in exc.errors(include_url=False):
        raw: Loc = tuple(error["loc"])
        loc = _strip_tags(raw)
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(raw[:-1]))
            message = f"unknown key {raw[-1]!r} (allowed: {allowed})"
        else:
            message = error["msg"].removeprefix("Value error, ")
        yield ConfigProblem(_dotted(loc), message, tree.line(loc))


def _strip_tags(loc: Loc) -> Loc:
    # The discriminated union adds the member's tag after the server's key, and pydantic appends
    # "[key]" when a mapping key itself is bad; neither is a key in the file.
    if len(loc) > 2 and loc[0] == "servers" and loc[2] in ("stdio", "http"):
        loc = (*loc[:2], *loc[3:])
    return tuple(part for part in loc if part != "[key]")


def _allowed_keys(loc: Loc) -> list[str]:
    """Field names of the model at pydantic error location ``loc`` (tags included), minus ``kind``."""
    annotation: Any = Config
    for part in loc:
        while get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = annotation.model_fields[str(part)].annotation
        elif get_origin(annotation) in (dict, list):
            annotation = get_args(annotation)[-1]
        else:  # a tagged union: `part` is a member's tag
            annotation = next(m for m in get_args(annotation) if Tag(str(part)) in get_args(m)[1:])
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return sorted(name for name in annotation.model_fields if name != "kind")
    return []


def _dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + (part if part else '""')
    return text or "<document>"


def _resolve_cwds(config: Config, base_dir: Path) -> Config:
    servers: dict[str, StdioServer | HttpServer] = {
        name: server.model_copy(update={"cwd": str(base_dir / server.cwd)})
        if isinstance(server, StdioServer) and server.cwd is not None
        else server
        for name, server in config.servers.items()
    }
    return config.model_copy(update={"servers": servers})
