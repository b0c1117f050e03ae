"""The one error tree, and how each error reaches the client.

::

    GatewayError
     ├── ConfigError                 the config cannot be used (lists every problem)      → CLI exit 1
     ├── ToolNotFound                no such tool in the registry                        → JSON-RPC invalid params
     ├── ResourceNotFound            no such resource (or not this client's to read)     → JSON-RPC invalid params
     ├── InvalidArguments            arguments do not satisfy the tool's inputSchema     → isError result
     ├── InvalidRequestState         a ``requestState`` the gateway refuses (its ``reason``) → JSON-RPC invalid params
     ├── PolicyDenied                a policy refused the call                           → isError result
     │    ├── Unauthenticated
     │    ├── Forbidden
     │    ├── RateLimited            carries ``retry_after`` seconds
     │    │    └── ConcurrencyLimited  too many calls in flight: refused at once, not queued
     │    ├── CircuitOpen
     │    └── SharedStateUnavailable  limits cannot be checked (Redis away, ``shared_state_failure: deny``)
     ├── UpstreamError               the provider failed to answer                       → isError result
     │    ├── UpstreamUnavailable    not connected (starting, crashed, reconnecting)
     │    ├── UpstreamTimeout        no answer within the server's timeout
     │    ├── UpstreamRefused        the server answered with a JSON-RPC error (its ``code``)
     │    ├── ResultTooLarge         the reply is larger than ``gateway.max_result``
     │    └── ClientRefused          the client answered a server→client request with an error (its ``code``)
     ├── WorkflowError               a workflow run failed                               → isError result
     ├── StoreError                  the store cannot be opened, migrated or written     → CLI exit 1 / isError result
     │    └── EngineUnavailable      the Temporal cluster of ``gateway.engine`` cannot be reached → CLI exit 1
     └── TaskError                   a ``tasks/*`` request cannot be served              → JSON-RPC error (its ``code``)

``ToolNotFound`` and ``ResourceNotFound`` are protocol errors (the client asked for something that does
not exist); everything that happens while executing a call is a tool result
with ``isError: true`` so the model sees it and can act on it (DESIGN §4).
Each class carries the metrics ``outcome`` label it is counted under.
"""

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class GatewayError(Exception):
    """Root of every error Patchbay raises on purpose."""

    outcome = "error"
    """The ``outcome`` label of ``patchbay_tool_calls_total`` for a call that ended with this error."""

    as_tool_result = True
    """True: the client sees an ``isError`` tool result; False: a JSON-RPC error."""

    retry_after: float | None = None
    """Set when the call was refused before it reached the tool (a limit, an open circuit, a server not
    connected): seconds after which the same call may succeed. None: the call may have had effects."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a config file: where (key path, line) and what."""

    path: str
    message: str
    line: int | None = None
    column: int | None = None
    """The 1-based column, for a problem that has one (a YAML syntax error)."""
    cause: str | None = None
    """The path of the problem this one follows from (``servers.crm``, which could not connect), to be listed
    after it; None: a problem of its own."""

    def __str__(self) -> str:
        column = f", column {self.column}" if self.column is not None else ""
        where = f"{self.path} (line {self.line}{column})" if self.line is not None else self.path
        return f"{where}: {self.message}"


SIMILAR = 0.75
"""How alike (difflib's ratio, 0 to 1) a known name must be to an unknown one to be suggested for it: `comand` is
0.92 like `command`, `wiht` 0.75 like `with`; a shared prefix alone (`crm__gone`, `crm__order`: 0.74) is not enough."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` naming the ``known`` name closest to ``name``, when one is close; else ``""``."""
    close = difflib.get_close_matches(name, [k for k in known if k != name], n=1, cutoff=SIMILAR)
    return f"; did you mean {close[0]!r}?" if close else ""


class ConfigError(GatewayError):
    """The configuration cannot be used. ``problems`` lists every problem found, not just the first."""

    as_tool_result = False

    def __init__(self, problems: Sequence[ConfigProblem], source: str = "config") -> None:
        self.problems = tuple(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"{source}: {count} problem{'s' if count != 1 else ''}\n{lines}")


class ToolNotFound(GatewayError):
    """No tool of that name in the registry."""

    outcome = "invalid"
    as_tool_result = False

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"Unknown tool: {name!r}. Call tools/list to see the tools this gateway serves.")


class ResourceNotFound(GatewayError):
    """No resource at that URI, or none this client may read: a client cannot tell the two apart."""

    outcome = "invalid"
    as_tool_result = False

    def __init__(self, uri: str) -> None:
        self.uri = uri
        super().__init__(f"Unknown resource: {uri}")


class InvalidArguments(GatewayError):
    """The arguments do not satisfy the tool's input schema."""

    outcome = "invalid"


class InvalidRequestState(GatewayError):
    """A retry's ``requestState`` that the gateway minted cannot be used: ``reason`` is ``forged`` (not this
    gateway's, or altered), ``expired``, ``used`` (each state is good once), ``other_client`` or ``other_request``."""

    outcome = "invalid"
    as_tool_result = False

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class PolicyDenied(GatewayError):
    """A policy refused the call. ``policy`` names it."""

    outcome = "denied"

    def __init__(self, message: str, *, policy: str = "policy") -> None:
        self.policy = policy
        super().__init__(message)


class Unauthenticated(PolicyDenied):
    """The caller did not prove who it is."""


class Forbidden(PolicyDenied):
    """The caller may not use this tool."""


class RateLimited(PolicyDenied):
    """Over a rate limit; ``retry_after`` says when a retry can succeed."""

    outcome = "rate_limited"

    def __init__(self, message: str, *, policy: str = "rate_limit", retry_after: float = 0.0) -> None:
        self.retry_after = retry_after
        super().__init__(message, policy=policy)


class ConcurrencyLimited(RateLimited):
    """Too many calls in flight under a ``max_concurrency`` limit: refused at once, never queued."""

    def __init__(self, message: str, *, policy: str = "max_concurrency") -> None:
        super().__init__(message, policy=policy, retry_after=0.0)


class CircuitOpen(PolicyDenied):
    """The server's circuit breaker is open: calls fail fast until it half-opens."""

    outcome = "circuit_open"

    def __init__(self, message: str, *, policy: str = "circuit_breaker", retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message, policy=policy)


class SharedStateUnavailable(PolicyDenied):
    """The limits or circuit state shared on Redis cannot be reached and ``shared_state_failure`` is ``deny``:
    the gateway refuses what it cannot check. Counted as ``unavailable``; ``retry_after`` is set."""

    outcome = "unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message, policy="shared_state")


class UpstreamError(GatewayError):
    """The provider failed to answer the call."""

    outcome = "unavailable"

    def __init__(self, message: str, *, server: str = "") -> None:
        self.server = server
        super().__init__(message)


class UpstreamUnavailable(UpstreamError):
    """The provider is not connected right now (starting, crashed, reconnecting), or the connection was
    lost during the call. ``retry_after`` is set only in the first case: the call was never sent."""

    def __init__(self, message: str, *, server: str = "", retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message, server=server)


class UpstreamTimeout(UpstreamError):
    """The provider did not answer within its timeout; the upstream request was cancelled."""

    outcome = "timeout"


class UpstreamRefused(UpstreamError):
    """The provider answered the request with a JSON-RPC error: ``code`` and ``data`` are the upstream's (a
    ``tasks/*`` request passed through answers with them)."""

    def __init__(self, message: str, *, server: str = "", code: int, data: object = None) -> None:
        self.code = code
        self.data = data
        super().__init__(message, server=server)


class ResultTooLarge(UpstreamError):
    """The provider's reply is larger than ``gateway.max_result``: dropped, the provider's session kept."""

    outcome = "error"

    def __init__(self, *, server: str, limit: int, size: int | None = None) -> None:
        self.limit = limit
        self.size = size
        """The reply's size in bytes; None when it was cut off at the limit."""
        got = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        super().__init__(
            f"Server {server!r} returned a result of {got}, larger than gateway.max_result "
            f"({limit / 2**20:.4g} MiB); the result was dropped.",
            server=server,
        )


class ClientRefused(UpstreamError):
    """The client answered a server→client request (sampling, elicitation) with a JSON-RPC error.

    ``code``, ``reason`` and ``data`` are the client's own, so an upstream that asked gets the error just as
    the client gave it; the message says which request was refused, for a workflow step's error."""

    def __init__(self, method: str, *, code: int, reason: str, data: object = None) -> None:
        self.code = code
        self.reason = reason
        self.data = data
        super().__init__(f"the client refused {method}: {reason}")


class WorkflowError(GatewayError):
    """A workflow run failed; the message names the failed step and its error."""


class StoreError(GatewayError):
    """The store (``gateway.store``) cannot be opened, migrated or written: a bad URL, a schema newer than
    this Patchbay knows, a database that fails. What was being recorded is not durable."""


class EngineUnavailable(StoreError):
    """The workflow engine ``gateway.engine`` names (a Temporal cluster) cannot be reached at start: like a store
    that cannot be opened, the gateway does not start without it."""


class TaskError(GatewayError):
    """A ``tasks/*`` request cannot be served: no such task of the caller's (the one answer for an unknown task
    and for another client's), or not in that state. ``code`` is the JSON-RPC error code the spec gives."""

    outcome = "invalid"
    as_tool_result = False

    def __init__(self, message: str, *, code: int = -32602, data: object = None) -> None:
        self.code = code
        self.data = data
        super().__init__(message)
