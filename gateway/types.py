"""Shared vocabulary: the frozen values and Protocols every package speaks.

Nothing here imports the MCP SDK. Tool definitions and results are carried in
their wire form (camelCase JSON objects), so whatever an upstream sends –
icons, annotations, ``_meta``, content types this code has never heard of –
passes through the gateway unchanged.
"""

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

import anyio.abc

if TYPE_CHECKING:
    from gateway.errors import ConfigProblem

JSONObject = Mapping[str, Any]
"""A JSON object in wire form (camelCase keys, JSON-compatible values)."""

RUN_META_KEY = "io.patchbay/run"
"""The ``_meta`` key of a workflow result that holds the run's id."""

LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
"""MCP log levels, least severe first."""

# MCP tasks, as the workflow tasks (``gateway.tasks``), the upstream tasks (``gateway.upstream_tasks``) and the
# connector that runs a task for a client that asked for none (``connectors.mcp``) all speak them.

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
"""The 2026-07-28 tasks extension's identifier (in ``capabilities.extensions``)."""
RELATED_TASK_META_KEY = "io.modelcontextprotocol/related-task"
"""The ``_meta`` key that ties a 2025-11-25 message to its task."""
TASK_ANSWERS_NOW = frozenset({"completed", "failed", "cancelled", "input_required"})
"""2025-11-25 task statuses in which ``tasks/result`` answers at once (or asks for the input the task needs)."""
TASK_POLL_BOUNDS = (0.01, 5.0)
"""The least and the most seconds between two ``tasks/get`` of a task waited for."""


def task_support(definition: JSONObject) -> str | None:
    """A tool's ``execution.taskSupport`` when it runs as a task (``optional``, ``required``), else None."""
    execution = definition.get("execution")
    support = execution.get("taskSupport") if isinstance(execution, Mapping) else None
    return support if support in ("optional", "required") else None


def task_poll_seconds(task: JSONObject) -> float:
    """How long to wait before asking about ``task`` again: its ``pollInterval``, within :data:`TASK_POLL_BOUNDS`."""
    interval = task.get("pollInterval")
    seconds = interval / 1000 if isinstance(interval, int | float) and not isinstance(interval, bool) else 1.0
    return min(max(seconds, TASK_POLL_BOUNDS[0]), TASK_POLL_BOUNDS[1])


def tied_to_task(result: JSONObject, task_id: str | None) -> dict[str, Any]:
    """A task's result with its related-task ``_meta`` naming ``task_id``, or with none (``task_id`` None)."""
    meta = dict(result.get("_meta") or {})
    if task_id is not None:
        meta[RELATED_TASK_META_KEY] = {"taskId": task_id}
    else:
        meta.pop(RELATED_TASK_META_KEY, None)
    tied = {key: value for key, value in result.items() if key != "_meta"}
    if meta:
        tied["_meta"] = meta
    return tied


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool as its provider lists it.

    ``definition`` is the full wire form (``inputSchema``, ``outputSchema``,
    ``annotations``, ``_meta``, …); the registry only ever changes its name
    and, when configured, its description.
    """

    name: str
    definition: JSONObject

    @property
    def description(self) -> str:
        return str(self.definition.get("description") or "")

    @property
    def input_schema(self) -> JSONObject:
        schema = self.definition.get("inputSchema")
        return schema if isinstance(schema, Mapping) else {"type": "object"}

    @property
    def output_schema(self) -> JSONObject | None:
        schema = self.definition.get("outputSchema")
        return schema if isinstance(schema, Mapping) else None


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt as its provider lists it (wire form in ``definition``)."""

    name: str
    definition: JSONObject


@dataclass(frozen=True, slots=True)
class Resource:
    """A resource or resource template as its provider lists it.

    ``uri`` is the resource URI, or the URI template for a template.
    """

    uri: str
    definition: JSONObject
    template: bool = False


@dataclass(frozen=True, slots=True)
class Listing:
    """Everything one provider offers: its tools, prompts, resources and resource templates."""

    tools: Sequence[Tool] = ()
    prompts: Sequence[Prompt] = ()
    resources: Sequence[Resource] = ()


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The outcome of a tool call, in wire form.

    ``is_error`` is the tool's own verdict (or the gateway's, for a call it
    refused); errors of the protocol itself are raised as ``GatewayError``.
    """

    content: Sequence[JSONObject]
    structured_content: JSONObject | None = None
    is_error: bool = False
    meta: JSONObject | None = None
    input_required: JSONObject | None = None
    """A 2026-07-28 ``InputRequiredResult`` (wire form) for the client to answer and retry; no content then."""
    task: JSONObject | None = None
    """The MCP task a task-augmented call created (``gateway.tasks.task_of``: the 2025-11-25 ``Task`` wire form),
    for the client to poll; no content then."""

    @classmethod
    def text(cls, text: str, *, is_error: bool = False) -> "ToolResult":
        return cls(content=({"type": "text", "text": text},), is_error=is_error)

    @classmethod
    def from_wire(cls, wire: JSONObject) -> "ToolResult":
        """The result a ``CallToolResult`` in wire form (as :meth:`wire` gives) stands for."""
        content = wire.get("content")
        structured = wire.get("structuredContent")
        meta = wire.get("_meta")
        return cls(
            content=tuple(content) if isinstance(content, list | tuple) else (),
            structured_content=structured if isinstance(structured, Mapping) else None,
            is_error=bool(wire.get("isError", False)),
            meta=meta if isinstance(meta, Mapping) else None,
        )

    def wire(self) -> dict[str, Any]:
        """The ``CallToolResult`` as it goes on the wire (not for an ``input_required`` or ``task`` result)."""
        wire: dict[str, Any] = {"content": list(self.content), "isError": self.is_error}
        if self.structured_content is not None:
            wire["structuredContent"] = self.structured_content
        if self.meta is not None:
            wire["_meta"] = self.meta
        return wire


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a configured client, the local stdio user, or an anonymous loopback client."""

    id: str
    kind: str = "client"  # "client" | "stdio" | "anonymous" | "workflow"

    @classmethod
    def of_caller(cls, caller: Mapping[str, str]) -> "Principal":
        """The principal a run's recorded caller (``{kind, id}``) names."""
        return cls(caller.get("id", ""), caller.get("kind", "client"))


ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]
"""``async (progress, total, message)``: forwards a progress update to whoever asked for it."""


class ClientChannel(Protocol):
    """The downstream client behind a call: what an upstream may ask of it mid-call.

    Implemented by the server side for each request; providers use it to route
    server→client traffic (sampling, elicitation, log messages) to the client
    whose call caused it.
    """

    @property
    def capabilities(self) -> JSONObject:
        """The client's declared capabilities (wire form)."""
        ...

    @property
    def protocol_version(self) -> str: ...

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        """Send a server→client request (``sampling/createMessage``, ``elicitation/create``…).

        Raises:
            UpstreamError: the client refused or failed the request.
        """
        ...

    async def log(self, params: JSONObject) -> None:
        """Forward a ``notifications/message`` to the client."""
        ...


@dataclass(frozen=True, slots=True)
class CallContext:
    """What travels with a call besides its arguments."""

    principal: Principal
    progress: ProgressFn | None = None
    client: ClientChannel | None = None
    meta: JSONObject | None = None
    """The request's ``_meta`` minus the progress token and this hop's envelope (forwarded upstream)."""
    log_level: str | None = None
    """The 2026-07-28 per-request log opt-in of the client, if it sent one."""
    input_responses: JSONObject | None = None
    """A 2026-07-28 client's answers to an ``InputRequiredResult`` (wire form), on its retry."""
    request_state: str | None = None
    """The opaque state the client echoes with ``input_responses``."""
    workflow_run: str | None = None
    """The id of the workflow run whose step makes this call, if one does."""
    workflow_step: str | None = None
    """The key of that step (``lines[2]/stock``)."""
    task: JSONObject | None = None
    """The client asked for the call to run as an MCP task: its task parameters (wire form, e.g. ``{"ttl": 60000}``;
    empty when it gave none). A provider that can, starts the work detached and returns a ``ToolResult.task``."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call on its way through the dispatch path.

    ``name`` is the registry name the caller used; ``provider`` and ``target``
    are where it resolves to.
    """

    name: str
    provider: str
    target: str
    arguments: JSONObject
    context: CallContext
    tool: Tool | None = field(default=None, compare=False)


class ProviderState(StrEnum):
    """Where a provider is: trying to connect, serving, or down (and being retried)."""

    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"


async def _ignore(value: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class ProviderEvents:
    """What a running provider tells the gateway."""

    changed: Callable[[str], Awaitable[None]]
    """``async (provider_name)``: its listing or its state changed (it came up, went down, has new tools)."""
    resource_updated: Callable[[str], Awaitable[None]] = _ignore
    """``async (uri)``: a resource a client subscribed to changed."""


class Provider(Protocol):
    """Anything that offers tools (and maybe prompts and resources): an upstream MCP server, a REST
    system, the workflow engine. The registry, the dispatcher, the server and the CLI know nothing else
    about a provider; the composition root starts each one with :meth:`run` and reads the rest."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> ProviderState:
        """Whether it is serving now."""
        ...

    @property
    def last_error(self) -> str | None:
        """Why it is not serving (or last failed to), for ``/readyz`` and ``patchbay tools``."""
        ...

    @property
    def warnings(self) -> tuple[str, ...]:
        """What it lacks that is worked around (a list method an upstream does not answer), for the status."""
        ...

    @property
    def problems(self) -> tuple["ConfigProblem", ...]:
        """What is wrong in what it was configured with and is left out (an operation of an OpenAPI document it
        cannot serve), each at its config path: errors for ``patchbay check``, warnings for ``serve``."""
        ...

    @property
    def listing(self) -> Listing:
        """What it offers now: the last known listing while it is down."""
        ...

    async def run(
        self, events: ProviderEvents, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled or closed, telling ``events`` what changes.

        ``task_status.started()`` fires once the first attempt to come up is over, good or bad; a
        provider that failed keeps retrying here, and raises nothing for a failure of its own.
        """
        ...

    async def list_tools(self) -> Sequence[Tool]: ...

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        """Call ``name`` (the provider's own name for it).

        Raises:
            UpstreamError: the provider could not be reached or did not answer in time.
        """
        ...

    async def request(self, method: str, params: JSONObject, context: CallContext) -> JSONObject:
        """A request about its prompts or resources (``prompts/get``, ``resources/read``,
        ``resources/subscribe``, ``resources/unsubscribe``, ``completion/complete``), in wire form;
        names in ``params`` are the provider's own. Returns the result's wire form.

        Raises:
            UpstreamError: it failed, could not be reached, or offers no such thing.
        """
        ...

    async def close(self) -> None:
        """Stop serving: ``run`` returns soon after, and calls fail as unavailable. Does not block."""
        ...


CallNext = Callable[[ToolCall], Awaitable[ToolResult]]
"""The rest of the dispatch chain, as seen by a policy."""


class Policy(Protocol):
    """An interceptor: ``await policy(call, next)``; refuse by raising ``PolicyDenied``."""

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult: ...
