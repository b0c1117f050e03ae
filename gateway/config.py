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
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
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
    SecretStr,
    Tag,
    ValidationError,
    model_validator,
)

from gateway._yamlfile import Loc, Tree, dotted, in_file_order, interpolate, syntax_problem
from gateway.errors import ConfigError, ConfigProblem, did_you_mean
from gateway.policy_config import (
    AccessRule,
    AuditConfig,
    CircuitBreakerConfig,
    ClientConfig,
    LimitRule,
    Per,
    PolicyRule,
    Rate,
    ServerCache,
    ServerRetry,
)
from gateway.units import Duration, Size, retry_delay, rfc3339
from gateway.workflows.model import Step, Workflows, strip_tags
from gateway.workflows.plan import Plan, check_calls, compile_workflow

__all__ = [
    "AccessRule",
    "AuditConfig",
    "CircuitBreakerConfig",
    "ApiKeyAuth",
    "BasicAuth",
    "ClientConfig",
    "Config",
    "ConnectorAuth",
    "ConnectorConfig",
    "DeclaredOperation",
    "OAuth2ClientCredentials",
    "GatewaySettings",
    "HttpServer",
    "KeepRuns",
    "LimitRule",
    "Per",
    "PolicyRule",
    "Rate",
    "ServerCache",
    "ServerConfig",
    "ServerRetry",
    "StdioServer",
    "ToolFilter",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "retry_delay",
    "rfc3339",
]

DEFAULT_NAME = "patchbay"
DEFAULT_SEPARATOR = "__"
DEFAULT_STORE = "memory"
"""The store of a config built without a file (tests, code); a config file's is :data:`DEFAULT_STORE_FILE`."""
DEFAULT_STORE_FILE = "patchbay.db"
"""The SQLite file, next to the config file, that a config loaded from a file keeps its runs in by default."""
DEFAULT_KEEP_AGE = 30 * 86400.0
"""Seconds a finished run is kept."""
DEFAULT_KEEP_COUNT = 100_000
"""Finished runs kept, the most recent ones."""
DEFAULT_IDEMPOTENCY_TTL = 86400.0
"""Seconds a client's idempotency key is remembered."""
DEFAULT_ENGINE = "local"
DEFAULT_SHARED_STATE = "memory"
DEFAULT_TIMEOUT = 30.0
"""Seconds an upstream call may take."""
DEFAULT_HEARTBEAT = 5.0
"""Seconds between pings to an HTTP upstream, to notice one that went away while idle."""
DEFAULT_MAX_BODY = 4 * 2**20
"""Bytes an HTTP request body to the gateway may have."""
DEFAULT_MAX_RESULT = 16 * 2**20
"""Bytes an upstream's reply to one request may have."""
DEFAULT_HEALTH_INTERVAL = 10.0
"""Seconds between two checks of a connector's ``health`` path."""
DEFAULT_RECEIVE_TIMEOUT = 30.0
"""Seconds an HTTP client may take to send a whole request, headers and body."""
MIN_STATE_KEY = 16
"""The fewest characters ``gateway.state_key`` may have."""
DEFAULT_MAX_DEPTH = 64
"""Levels a request may nest (its own object is 1, a tool's ``arguments`` 3): tool arguments are shallow JSON,
and upstreams' parsers stop near 200 (pydantic-core, the MCP SDK's) or 255 (orjson, writing)."""
MAX_MAX_DEPTH = 128
"""The highest ``gateway.max_depth`` allowed: deeper requests would fail at upstreams built on the MCP SDK."""


# Numbers are coerced to strings so `env: {PORT: 8080}` and `command: [serve, 8080]` just work.
_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)
# Workflow strings are jq programs such as `${.input.order_id}`; the engine evaluates them later.
_NOT_INTERPOLATED = frozenset({"workflows"})


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


def _shown(value: str) -> str:
    """``value`` for an error message: a URL only by its scheme, since the rest may hold a password."""
    scheme, sep, _ = value.partition("://")
    return f"`{scheme}://…`" if sep else repr(value)


def _works_today(
    key: str, must: str, works: Callable[[str], bool], planned: tuple[str, ...], note: str
) -> AfterValidator:
    """The check of a setting that accepts only what works today: ``works(value)``, else an error saying
    what ``key`` ``must`` be; for a value whose scheme is one of ``planned``, that it is not supported *yet*
    (``note``: what is planned)."""

    def check(value: str) -> str:
        if works(value):
            return value
        if value.startswith(planned):
            raise ValueError(f"{_shown(value)} is not supported yet: {key} must be {must} ({note})")
        raise ValueError(f"{_shown(value)} is not supported: {key} must be {must}")

    return AfterValidator(check)


def _check_store(url: str) -> str:
    if url == "memory" or url.startswith(("postgresql://", "postgres://")):
        return url
    if url.startswith("sqlite:///") and url not in ("sqlite:///", "sqlite:///:memory:"):
        return url
    raise ValueError(f"{_shown(url)} is not supported: store must be `memory`, `sqlite:///PATH` or `postgresql://…`")


def _check_engine(engine: str) -> str:
    if engine == DEFAULT_ENGINE:
        return engine
    parts = urlsplit(engine)
    if parts.scheme == "temporal":
        try:
            port = parts.port  # raises ValueError on a malformed port
        except ValueError:
            raise ValueError(f"{_shown(engine)} has a malformed port") from None
        if parts.hostname and port and parts.path in ("", "/") and not parts.query and not parts.username:
            return engine
        raise ValueError(f"{_shown(engine)} is not a Temporal address: temporal://HOST:PORT (its frontend, 7233)")
    raise ValueError(f"{_shown(engine)} is not supported: engine must be `local` or `temporal://HOST:PORT`")


def _check_shared_state(where: str) -> str:
    if where == DEFAULT_SHARED_STATE:
        return where
    parts = urlsplit(where)
    if parts.scheme in ("redis", "rediss"):
        try:
            _ = parts.port  # raises ValueError on a malformed port
        except ValueError:
            raise ValueError(f"{_shown(where)} has a malformed port") from None
        database = parts.path.strip("/")
        if parts.hostname and (not database or database.isdigit()) and not any(c.isspace() for c in where):
            return where
        raise ValueError(f"{_shown(where)} is not a Redis URL: redis://[USER:PASSWORD@]HOST[:PORT][/DB]")
    raise ValueError(f"{_shown(where)} is not supported: shared_state must be `memory` or `redis://HOST:PORT/DB`")


def _check_server_name(name: str) -> str:
    if not name:
        raise ValueError("a server name must not be empty")
    return name


def _check_operation_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ValueError(f"an operation's name is 1 to 64 of A-Z a-z 0-9 _ . - : {name!r}")
    return name


def _check_operation_path(path: str) -> str:
    if not path.startswith("/") or any(c.isspace() for c in path) or "?" in path or "#" in path:
        raise ValueError(f"an operation's path starts with / and has no spaces, query or fragment: {path!r}")
    return path


class KeepRuns(BaseModel):
    """Which finished runs the store keeps: those younger than ``age`` and among the ``count`` most recent."""

    model_config = _MODEL_CONFIG

    age: Duration | None = DEFAULT_KEEP_AGE
    """Finished runs older than this are pruned (``30d``); ``null``: kept whatever their age."""
    count: int | None = Field(DEFAULT_KEEP_COUNT, ge=0)
    """Finished runs beyond this many, the most recent kept, are pruned; ``null``: no limit."""


class TemporalSettings(BaseModel):
    """Where in a Temporal cluster the gateway's workflow runs live."""

    model_config = _MODEL_CONFIG

    namespace: str = Field("default", min_length=1)
    """The Temporal namespace (``default``, which the dev server has)."""
    task_queue: str | None = Field(None, min_length=1)
    """The stem of the task queues of this gateway's runs: each workflow definition's runs and their steps go to
    ``<task_queue>.<its digest's first 16 hex digits>``; default: ``patchbay.<gateway name>``. Replicas of one
    gateway share it."""
    takeover_after: Duration = Field(30.0, ge=2.0)
    """How long a replica may be silent (killed, cut off) before another takes over what it was doing: the
    call of a step in flight is made again (under the same idempotency key), and its cached runs move on
    (``30s``; at least 2 s, as steps heartbeat every second)."""


class GatewaySettings(BaseModel):
    """The ``gateway:`` section: how this gateway names its tools and where it keeps state."""

    model_config = _MODEL_CONFIG

    name: str = DEFAULT_NAME
    """The server name this gateway reports to its clients."""
    separator: str = DEFAULT_SEPARATOR
    """Joins a server's prefix and a tool name: ``crm__get_order``."""
    store: Annotated[str, AfterValidator(_check_store)] = DEFAULT_STORE
    """Where workflow runs, their history and idempotency keys are kept: ``sqlite:///PATH`` (relative to the config
    file; by default ``patchbay.db`` next to it), ``postgresql://USER@HOST:PORT/DB``, or ``memory`` (lost on exit)."""
    durability: Literal["process", "machine"] = "process"
    """Which crash a committed run event survives: ``process`` (the gateway killed) or ``machine`` (an OS crash or a
    power loss too, at an fsync per commit in SQLite); ``gateway.store``'s modules say exactly what each costs."""
    resume: Literal["auto", "manual"] = "auto"
    """Interrupted runs resume when ``serve`` starts (``auto``), or wait for ``patchbay resume`` (``manual``)."""
    keep_runs: KeepRuns = KeepRuns()
    """Which finished runs are kept; older ones are pruned."""
    idempotency_ttl: Duration = DEFAULT_IDEMPOTENCY_TTL
    """How long a client's ``io.patchbay/idempotency-key`` is remembered with the call's result (``24h``)."""
    engine: Annotated[str, AfterValidator(_check_engine)] = DEFAULT_ENGINE
    """Where workflows run: ``local`` (in this process, journaled in ``store``), or ``temporal://HOST:PORT`` (a
    Temporal cluster: any replica's worker runs any run's steps; ``temporal:`` says where in the cluster)."""
    temporal: "TemporalSettings | None" = None
    """With ``engine: temporal://…``: the namespace and task queue of this gateway's runs."""
    shared_state: Annotated[str, AfterValidator(_check_shared_state)] = DEFAULT_SHARED_STATE
    """Where rate limits, concurrency slots and circuit-breaker state live: ``memory`` (this process's own), or
    ``redis://HOST:PORT/DB`` (``rediss://`` for TLS), shared by every replica of the gateway with the same ``name``."""
    shared_state_failure: Literal["allow", "deny"] = "allow"
    """What calls get while Redis cannot be reached: ``allow`` lets them through unlimited, ``deny`` refuses them
    (``unavailable``, retry after 1 s); either way each failure is counted and Redis is used again once it is back."""
    max_body: Size = DEFAULT_MAX_BODY
    """The largest HTTP request body accepted (``4MiB``); a larger one gets 413."""
    max_result: Size = DEFAULT_MAX_RESULT
    """The largest reply an upstream may send to one request (``16MiB``), measured as its JSON-RPC message; a
    larger one is that call's ``isError`` result naming the limit, and the upstream's session stays up."""
    max_depth: int = Field(DEFAULT_MAX_DEPTH, ge=16, le=MAX_MAX_DEPTH)
    """The deepest nesting of a request's JSON (the request object is level 1, a tool's arguments object level 3);
    a deeper request is answered at once with a JSON-RPC error naming this limit, on every path."""
    rate_limit: Rate | None = None
    """Requests the whole gateway accepts on average (``200/s``); beyond it, HTTP 429 with Retry-After."""
    burst: float | None = Field(None, ge=1)
    """Requests accepted at once above ``rate_limit``; default: one second's worth."""
    receive_timeout: Duration = DEFAULT_RECEIVE_TIMEOUT
    """How long an HTTP client may take to send a whole request, headers and body (``30s``), counted from the
    connection opening or the previous response ending; a connection that is slower, silent or idle is closed."""
    state_key: SecretStr | None = Field(None, min_length=MIN_STATE_KEY)
    """The secret that signs the ``requestState`` the gateway gives 2026-07-28 clients it asks something mid-call
    (at least 16 characters; ``${ENV}`` keeps it out of the file); unset: a random key made at start, so replicas
    behind one address, or a restart, do not accept each other's states."""

    @model_validator(mode="after")
    def _temporal_needs_temporal(self) -> "GatewaySettings":
        if self.temporal is not None and not self.engine.startswith("temporal://"):
            raise ValueError("the `temporal` settings need `engine: temporal://HOST:PORT` (workflows run locally)")
        return self

    @model_validator(mode="after")
    def _failure_needs_redis(self) -> "GatewaySettings":
        if "shared_state_failure" in self.model_fields_set and self.shared_state == DEFAULT_SHARED_STATE:
            raise ValueError(
                "shared_state_failure says what happens while Redis cannot be reached; it needs "
                "`shared_state: redis://…` (the shared state is in memory)"
            )
        return self


class ToolFilter(BaseModel):
    """Which of an upstream's tools are served, and under which names and descriptions."""

    model_config = _MODEL_CONFIG

    include: list[str] = ["*"]
    """Glob patterns (fnmatch) of upstream tool names to serve; for a connector also ``tag:<glob>``, matching the
    OpenAPI tags of its operations."""
    exclude: list[str] = []
    """Glob patterns of tool names to hide, even when included."""
    rename: dict[str, str] = {}
    """Upstream tool name → the name served (before the server prefix is added)."""
    descriptions: dict[str, str] = {}
    """Upstream tool name → a description that replaces the upstream's."""
    idempotent: list[str] = []
    """Glob patterns of upstream tool names safe to call twice: only these (and tools the upstream marks
    ``idempotentHint``) are retried after a connection failure or timeout."""


class _ServerBase(BaseModel):
    model_config = _MODEL_CONFIG

    prefix: str | None = None
    """Prepended to tool names with the separator; None: the server's key; ``""``: names pass through."""
    timeout: Duration = DEFAULT_TIMEOUT
    """Seconds a call to this server may take before it is cancelled."""
    tools: ToolFilter = ToolFilter()
    """Which tools to serve and how to name them."""
    retry: ServerRetry | None = None
    """Retries after connection failures and timeouts, for idempotent tools only."""
    circuit_breaker: CircuitBreakerConfig | None = None
    """Stop calling the server for a while after it failed too often."""
    fallback: dict[str, str] = {}
    """Upstream tool name (glob) → the tool (its gateway name) to call instead when a call fails to get an answer."""
    cache: ServerCache | None = None
    """Keep the last good results of some read-only tools, to answer (marked stale) while a call cannot reach the
    server."""


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
    heartbeat: Duration | None = DEFAULT_HEARTBEAT
    """Seconds between pings that check the server is still there while no call tells (an HTTP server that
    went away ends no stream the gateway watches); ``null``: no pings, a failed call is the first sign."""


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


def _check_base_url(url: str) -> str:
    url = _check_url(url)
    parts = urlsplit(url)
    if parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"a base URL has no query, fragment or user info: {_shown(url)}")
    return url.rstrip("/")


class BasicAuth(BaseModel):
    """HTTP basic authentication."""

    model_config = _MODEL_CONFIG

    username: str
    password: SecretStr


class ApiKeyAuth(BaseModel):
    """An API key sent in a header or in the query, on every request."""

    model_config = _MODEL_CONFIG

    header: str | None = None
    """The header that carries it (``X-Api-Key``)."""
    query: str | None = None
    """Or the query parameter that carries it (``key``)."""
    value: SecretStr

    @model_validator(mode="after")
    def _one_place(self) -> "ApiKeyAuth":
        if (self.header is None) == (self.query is None):
            raise ValueError("an API key goes in exactly one place: set `header` or `query`")
        return self


class OAuth2ClientCredentials(BaseModel):
    """OAuth 2 client credentials (RFC 6749 §4.4): a token fetched from ``token_url``, cached until it expires."""

    model_config = _MODEL_CONFIG

    token_url: Annotated[str, AfterValidator(_check_url)]
    client_id: str
    client_secret: SecretStr
    scope: str | None = None
    """Space-separated scopes to ask for; unset: the server's default."""


class ConnectorAuth(BaseModel):
    """How a connector authenticates to its system: exactly one of these."""

    model_config = _MODEL_CONFIG

    bearer: SecretStr | None = None
    """A static bearer token (``Authorization: Bearer …``)."""
    basic: BasicAuth | None = None
    api_key: ApiKeyAuth | None = None
    oauth2_client_credentials: OAuth2ClientCredentials | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ConnectorAuth":
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            names = ", ".join(f"`{name}`" for name in type(self).model_fields)
            raise ValueError(f"set exactly one of {names} (got {len(given)})")
        return self


class DeclaredOperation(BaseModel):
    """A REST operation declared by hand, for a system without an OpenAPI document."""

    model_config = _MODEL_CONFIG

    name: Annotated[str, AfterValidator(_check_operation_name)]
    """The tool's name (before the connector's prefix)."""
    method: Literal["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    path: Annotated[str, AfterValidator(_check_operation_path)]
    """The path below ``base_url``; ``{name}`` placeholders are filled by the arguments of those names."""
    input: dict[str, Any] = {"type": "object"}
    """JSON Schema of the arguments (an object)."""
    description: str = ""


class ConnectorConfig(_ServerBase):
    """A company system reached over REST: an OpenAPI document's operations, or operations declared by hand."""

    kind: Literal["rest"] = "rest"
    openapi: str | None = None
    """The OpenAPI 3.0/3.1 document (YAML or JSON): a file (relative to the config file) or an http(s) URL."""
    operations: list[DeclaredOperation] | None = None
    """Operations declared by hand, instead of ``openapi``."""
    base_url: Annotated[str, AfterValidator(_check_base_url)] | None = None
    """Where the system is (``http://127.0.0.1:9002/api``); every request goes there and nowhere else. Unset: the
    OpenAPI document's first ``servers`` URL, when it is absolute."""
    headers: dict[str, str] = {}
    """Sent with every request (``${VAR}`` keeps a secret out of the file)."""
    auth: ConnectorAuth | None = None
    health: str | None = None
    """A path below ``base_url`` that answers 2xx while the system is up (``/healthz``), checked at start and every
    ``health_interval``; unset: the connector is up once its operations are known."""
    health_interval: Duration = DEFAULT_HEALTH_INTERVAL
    allow_link_local: bool = False
    """True: requests may go to link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254),
    which are refused by default."""

    @model_validator(mode="after")
    def _one_source(self) -> "ConnectorConfig":
        if (self.openapi is None) == (self.operations is None):
            raise ValueError("a connector needs either `openapi` (a document) or `operations` (declared by hand)")
        if self.operations is not None and self.base_url is None:
            raise ValueError("a connector with declared `operations` needs `base_url`")
        if self.health is not None and not self.health.startswith("/"):
            raise ValueError(f"`health` is a path below base_url, starting with /: {self.health!r}")
        return self


UpstreamConfig = StdioServer | HttpServer | ConnectorConfig
"""A ``servers:`` or ``connectors:`` entry: anything whose tools are served under its name."""


class Config(BaseModel):
    """The whole config file."""

    model_config = _MODEL_CONFIG

    gateway: GatewaySettings = GatewaySettings()
    """Settings of the gateway itself."""
    servers: dict[Annotated[str, AfterValidator(_check_server_name)], ServerConfig] = {}
    """Upstream MCP servers by name; the name is the default tool-name prefix."""
    connectors: dict[Annotated[str, AfterValidator(_check_server_name)], ConnectorConfig] = {}
    """Company systems reached over REST, by name; named like servers (one namespace with them)."""
    workflows: Workflows = {}
    """Workflow tools by name (DESIGN §3)."""
    clients: dict[str, ClientConfig] = {}
    """Who may connect over HTTP, by name; with none, only anonymous clients on loopback."""
    policies: tuple[PolicyRule, ...] = ()
    """Access rules and limits, applied to every call (DESIGN §1)."""
    audit: AuditConfig = AuditConfig()
    """The audit trail."""

    _source: str = PrivateAttr(default="config")
    _lines: dict[Loc, int] = PrivateAttr(default_factory=dict)
    _plans: dict[str, Plan] = PrivateAttr(default_factory=dict)

    @property
    def plans(self) -> Mapping[str, Plan]:
        """The workflows compiled: expressions, dependency graphs (checked when the config loaded)."""
        if len(self._plans) != len(self.workflows):  # a config built in code, not by parse_config
            self._plans = {name: compile_workflow(name, wf)[0] for name, wf in self.workflows.items()}
        return self._plans

    @property
    def upstreams(self) -> dict[str, UpstreamConfig]:
        """The servers and the connectors by name (one namespace: a name is never both)."""
        return {**self.servers, **self.connectors}

    def section_of(self, name: str) -> str:
        """``connectors`` for a connector's name, else ``servers`` (where problems about it are reported)."""
        return "connectors" if name in self.connectors else "servers"

    @property
    def source(self) -> str:
        """Where the config came from: the file name, or ``"config"``."""
        return self._source

    def line_at(self, path: str) -> int | None:
        """The line of a dotted path as problems name it (``workflows.w.steps[2].with.id``), else None."""
        return self.line_of(*_loc_of(path, self.workflows))

    def line_of(self, *path: str | int) -> int | None:
        """The 1-based line of ``path`` (or of its nearest ancestor that has one), else None."""
        for end in range(len(path), -1, -1):
            line = self._lines.get(path[:end])
            if line is not None:
                return line
        return None


def load_config(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *, sections: Iterable[str] | None = None
) -> Config:
    """Read and check the config file at ``path``; relative paths (``cwd``, the audit log, the store) are resolved
    against its directory, and the store is ``patchbay.db`` there unless the file names one. ``sections``: see
    :func:`parse_config`.

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
    return parse_config(text, source=str(file), environ=env, base_dir=file.absolute().parent, sections=sections)


def parse_config(
    text: str,
    *,
    source: str = "config",
    environ: Mapping[str, str],
    base_dir: Path | None = None,
    sections: Iterable[str] | None = None,
) -> Config:
    """Check config ``text``; ``source`` names it in errors, ``base_dir`` (the config file's directory) anchors
    relative paths and puts the default store there (without it, the store defaults to ``memory``). With
    ``sections`` (top-level keys), only those are read and checked; the rest take their defaults, so a command
    that needs only the store (``patchbay runs``) does not need the servers' environment variables.

    Raises:
        ConfigError: lists every problem found.
    """
    problems: list[ConfigProblem] = []
    tree = Tree(text, problems)
    try:
        data = tree.load()
    except yaml.YAMLError as exc:
        raise ConfigError([syntax_problem(exc, text)], source=source) from None
    if data is None:  # an empty file: every default
        data = {}
    if not isinstance(data, dict):
        problems.append(ConfigProblem("<document>", "the config must be a mapping of keys to values", tree.line(())))
        raise ConfigError(problems, source=source)
    if sections is not None:
        wanted = set(sections)
        data = {key: value for key, value in data.items() if key in wanted}
    data = {
        key: value if key in _NOT_INTERPOLATED else interpolate(value, (key,), environ, tree)
        for key, value in data.items()
    }
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        already = {p.path for p in problems}  # an unset variable also makes its value invalid: say it once
        problems.extend(p for p in _validation_problems(exc, tree) if p.path not in already)
        raise ConfigError(in_file_order(problems), source=source) from None
    plans: dict[str, Plan] = {}
    for name, workflow in config.workflows.items():
        plans[name], found = compile_workflow(name, workflow)
        problems.extend(_located(found, tree, config.workflows))
    problems.extend(_located(check_calls(plans), tree, config.workflows))
    problems.extend(_unknown_clients(config, tree))
    problems.extend(_names_taken_twice(config, tree))
    problems.extend(_duplicate_ids(config, tree))
    if problems:
        raise ConfigError(in_file_order(problems), source=source)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    config._source = source
    config._lines = tree.lines
    config._plans = plans
    return config


_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _loc_of(path: str, workflows: Iterable[str]) -> Loc:
    """``workflows.<name>.steps[2].with.id`` back into a key path (a workflow's name may hold dots)."""
    for name in sorted(workflows, key=len, reverse=True):
        head = f"workflows.{name}"
        if path == head or path.startswith((head + ".", head + "[")):
            tail = path[len(head) :]
            return ("workflows", name, *(m[1] if m[1] is not None else int(m[2]) for m in _PATH_PART.finditer(tail)))
    return tuple(path.split("."))


def _located(problems: list[ConfigProblem], tree: Tree, workflows: Iterable[str]) -> list[ConfigProblem]:
    return [ConfigProblem(p.path, p.message, p.line or tree.line(_loc_of(p.path, workflows))) for p in problems]


def _validation_problems(exc: ValidationError, tree: Tree) -> Iterator[ConfigProblem]:
    for error in exc.errors(include_url=False):
        raw: Loc = tuple(error["loc"])
        loc = _strip_tags(raw)
        if error["type"] == "extra_forbidden":
            keys = _allowed_keys(raw[:-1])
            message = f"unknown key {raw[-1]!r} (allowed: {', '.join(keys)}){did_you_mean(str(raw[-1]), keys)}"
        else:
            message = error["msg"].removeprefix("Value error, ")
        yield ConfigProblem(dotted(loc), message, tree.line(loc))
        union = _KIND_UNIONS.get(error["type"])
        if union is not None and isinstance(error["input"], Mapping):
            yield from _unknown_keys(error["input"], union, loc, tree)


_KIND_UNIONS: dict[str, Any] = {"server_kind": ServerConfig, "step_kind": Step}
"""The tagged unions by the error type of an entry whose kind cannot be told. Pydantic checks an entry's keys only
once it knows its kind, so the key that would have told it (``comand:``) would go unnamed: it is checked here
against the keys of every member."""


def _unknown_keys(entry: Mapping[Any, Any], union: Any, loc: Loc, tree: Tree) -> Iterator[ConfigProblem]:
    members = [_unwrap(member) for member in get_args(_unwrap(union))]
    keys = sorted({f.alias or name for m in members for name, f in m.model_fields.items() if name != "kind"})
    for key in entry:
        if key not in keys:
            where = (*loc, key)
            message = f"unknown key {key!r} (allowed: {', '.join(keys)}){did_you_mean(str(key), keys)}"
            yield ConfigProblem(dotted(where), message, tree.line(where))


def _strip_tags(loc: Loc) -> Loc:
    # The discriminated unions add the member's tag after the server's key (and inside workflow
    # steps), and pydantic appends "[key]" when a mapping key itself is bad; none is a key in the file.
    if len(loc) > 2 and loc[0] == "servers" and loc[2] in ("stdio", "http"):
        loc = (*loc[:2], *loc[3:])
    elif len(loc) > 2 and loc[0] == "policies" and loc[2] in ("access", "limits"):
        loc = (*loc[:2], *loc[3:])
    elif loc and loc[0] == "workflows":
        loc = strip_tags(loc)
    return tuple(part for part in loc if part != "[key]")


def _allowed_keys(loc: Loc) -> list[str]:
    """Keys of the model at pydantic error location ``loc`` (tags included) as written in the file, minus ``kind``."""
    annotation: Any = Config
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = next(f.annotation for name, f in annotation.model_fields.items() if part in (name, f.alias))
        elif get_origin(annotation) in (dict, list, tuple):
            annotation = get_args(annotation)[0 if get_origin(annotation) is tuple else -1]
        else:  # a tagged union: `part` is a member's tag
            annotation = next(m for m in get_args(annotation) if Tag(str(part)) in get_args(m)[1:])
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return sorted(f.alias or name for name, f in annotation.model_fields.items() if name != "kind")
    return []


def _unwrap(annotation: Any) -> Any:
    """``annotation`` without ``Annotated`` and without ``| None``."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation):
            members = [m for m in get_args(annotation) if m is not type(None)]
            annotation = members[0] if len(members) == 1 else Union[tuple(members)]  # noqa: UP007
        else:
            return annotation


def _unknown_clients(config: Config, tree: Tree) -> Iterator[ConfigProblem]:
    """A rule naming a client that is not configured would never apply: a typo, most likely."""
    for index, rule in enumerate(config.policies):
        for name in rule.clients or ():
            if not any(c in name for c in "*?[") and name not in config.clients:
                known = ", ".join(sorted(config.clients)) or "none are configured"
                message = f"no client {name!r} in `clients:` ({known})"
                yield ConfigProblem(f"policies[{index}].clients", message, tree.line(("policies", index, "clients")))


def _names_taken_twice(config: Config, tree: Tree) -> Iterator[ConfigProblem]:
    """Servers and connectors share one namespace: their names are their tools' prefixes and their metric labels."""
    for name in config.connectors:
        if name in config.servers:
            message = f"the name {name!r} is taken by the server on line {tree.line(('servers', name))}; rename one"
            yield ConfigProblem(f"connectors.{name}", message, tree.line(("connectors", name)))


def _duplicate_ids(config: Config, tree: Tree) -> Iterator[ConfigProblem]:
    """Two rules under one id would share their limits' state and be told apart nowhere."""
    first: dict[str, int] = {}
    for index, rule in enumerate(config.policies):
        earlier = first.setdefault(rule.id, index)
        if earlier == index:
            continue
        where = f"policies[{earlier}] (line {tree.line(('policies', earlier))})"
        if "id" in rule.model_fields_set:
            loc: tuple[str | int, ...] = ("policies", index, "id")
            message = f"the id {rule.id!r} is taken by {where}; every rule needs its own"
        else:
            loc = ("policies", index)
            message = (
                f"does the same as {where}, so both get the id {rule.id!r} (derived from what a rule does): "
                "remove one, or give it an `id:`"
            )
        yield ConfigProblem(dotted(loc), message, tree.line(loc))


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    """``config`` with its relative paths (``cwd``, the audit log, the SQLite store) anchored at ``base_dir``, and
    the store, when it is not set, the SQLite file :data:`DEFAULT_STORE_FILE` there."""
    servers: dict[str, StdioServer | HttpServer] = {
        name: server.model_copy(update={"cwd": str(base_dir / server.cwd)})
        if isinstance(server, StdioServer) and server.cwd is not None
        else server
        for name, server in config.servers.items()
    }
    connectors = {
        name: connector.model_copy(update={"openapi": str(base_dir / connector.openapi)})
        if connector.openapi is not None and not connector.openapi.startswith(("http://", "https://"))
        else connector
        for name, connector in config.connectors.items()
    }
    update: dict[str, Any] = {"servers": servers, "connectors": connectors}
    store = config.gateway.store
    if "store" not in config.gateway.model_fields_set:
        store = f"sqlite:///{base_dir / DEFAULT_STORE_FILE}"
    elif store.startswith("sqlite:///"):
        store = f"sqlite:///{base_dir / store.removeprefix('sqlite:///')}"  # an absolute path stays as it is
    update["gateway"] = config.gateway.model_copy(update={"store": store})
    if config.audit.path is not None:
        update["audit"] = config.audit.model_copy(update={"path": str(base_dir / config.audit.path)})
    return config.model_copy(update=update)
