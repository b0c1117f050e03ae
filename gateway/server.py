"""The MCP server side: the merged registry served to clients in both protocol eras.

Handlers translate between the SDK's types and the gateway's wire-form values;
everything that decides anything lives behind ``Gateway``. Errors are mapped in
one place: ``ToolNotFound`` and ``ResourceNotFound`` become JSON-RPC invalid-params errors, every other
``GatewayError`` has already become an ``isError`` result in the dispatcher.

Workflow tools also run as MCP tasks (``gateway.tasks``), in both eras: a task-augmented
``tools/call`` takes the one dispatch path like any call, with ``CallContext.task`` set, and
answers with the task its run became; ``tasks/*`` read and cancel the runs of the client asking.
An upstream tool that runs as a task (its ``execution.taskSupport``, listed as the upstream gives it)
does so upstream: its task reaches the client under a gateway id, which routes ``tasks/*`` back to the
upstream (``gateway.upstream_tasks``). The gateway declares tasks (the 2025-11-25 capability, the
2026-07-28 extension) while it has a workflow or such a tool.

A 2026-07-28 client has no channel for server→client requests. Its call of an upstream tool, when it
declares sampling or elicitation, is held (``gateway.roundtrip``): what the upstream asks mid-call
comes back as an ``InputRequiredResult`` with a ``requestState`` the gateway signs, and the client's
retry with ``inputResponses`` delivers the answers to the held upstream request. An upstream's own
``requestState`` (a 2026-07-28 upstream asking the same way) passes through unchanged.
"""

import json
import logging
import math
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from typing import Any, cast

import anyio
import mcp_types as types
from anyio.abc import TaskGroup
from mcp.server import NotificationOptions, Server, ServerRequestContext
from mcp.server.connection import Connection
from mcp.server.context import CallNext, HandlerResult
from mcp.server.models import InitializationOptions
from mcp.server.stdio import stdio_server
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError, NoBackChannelError
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    MCP_PARAM_HEADER_PREFIX,
    X_MCP_HEADER_KEY,
    InboundModernRoute,
    classify_inbound_request,
    find_duplicated_routing_header,
)
from mcp.shared.message import ServerMessageMetadata, SessionMessage
from mcp.shared.subscriptions import PromptsListChanged, ResourcesListChanged, ResourceUpdated, ToolsListChanged
from mcp_types.methods import serialize_server_result
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Scope

from gateway.errors import (
    ClientRefused,
    GatewayError,
    InvalidRequestState,
    ResourceNotFound,
    TaskError,
    ToolNotFound,
    UpstreamError,
)
from gateway.fastpath import MAX_BODY, FastPath, FastSession, ModernCall, no_back_channel
from gateway.gateway import Gateway
from gateway.nesting import NestingLimit, nesting_error
from gateway.registry import Entry
from gateway.requeststate import STATE_PREFIX, request_digest
from gateway.roundtrip import ANSWER_TIMEOUT
from gateway.sessionless import SessionRequired
from gateway.stdin import MessageOut, read_lines
from gateway.tasks import TASKS_EXTENSION, TaskMethods, extension_task, task_of
from gateway.types import LOG_LEVELS, CallContext, JSONObject, Principal, ToolResult, task_support
from gateway.upstream_tasks import UpstreamTasks
from gateway.workflows.provider import WORKFLOW_PROVIDER
from policies.auth import principal_of

logger = logging.getLogger(__name__)

VERSION = "0.1.0"

_CLIENT_REQUESTS: Mapping[str, tuple[Any, Any]] = {
    "sampling/createMessage": (types.CreateMessageRequest, types.CreateMessageResult),
    "elicitation/create": (types.ElicitRequest, types.ElicitResult),
}
"""Server→client requests an upstream may make mid-call, forwarded to the calling client."""


class _Channel:
    """The downstream client of one request, as providers see it (``gateway.types.ClientChannel``)."""

    def __init__(self, ctx: ServerRequestContext[Any], log_level: str | None = "debug") -> None:
        self._ctx = ctx
        self._min_log_level = LOG_LEVELS.index(log_level) if log_level in LOG_LEVELS else len(LOG_LEVELS)

    @property
    def capabilities(self) -> JSONObject:
        caps = self._ctx.session.client_capabilities
        return caps.model_dump(by_alias=True, mode="json", exclude_none=True) if caps else {}

    @property
    def protocol_version(self) -> str:
        return self._ctx.protocol_version

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        request_type, result_type = _CLIENT_REQUESTS[method]
        if method == "sampling/createMessage" and ("tools" in params or "toolChoice" in params):
            result_type = types.CreateMessageResultWithTools  # its content may hold tool_use blocks
        if self._ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            # Only a held tools/call can ask a 2026-07-28 client (gateway.roundtrip); this request is not one.
            raise UpstreamError(no_back_channel(method, self._ctx.protocol_version, self._ctx.method))
        try:
            result = await self._ctx.session.send_request(
                request_type.model_validate({"method": method, "params": params}),
                result_type,
                metadata=ServerMessageMetadata(related_request_id=self._ctx.request_id),
            )
        except NoBackChannelError as exc:  # a stateless or 2026-era request has no back channel
            raise UpstreamError(f"the client could not answer {method}: {exc}") from exc
        except MCPError as exc:  # the client's error response (or the connection to it closed)
            error = exc.error
            raise ClientRefused(method, code=error.code, reason=error.message, data=error.data) from exc
        except ValidationError as exc:
            raise UpstreamError(f"the client could not answer {method}: {exc}") from exc
        dumped: JSONObject = result.model_dump(by_alias=True, mode="json", exclude_none=True)
        return dumped

    async def log(self, params: JSONObject) -> None:
        if LOG_LEVELS.index(params.get("level", "info")) < self._min_log_level:
            return  # below what this client asked for (logging/setLevel; 2026-07-28: the request's opt-in)
        notification = types.LoggingMessageNotification(params=types.LoggingMessageNotificationParams(**params))
        await self._ctx.session.send_notification(notification, related_request_id=self._ctx.request_id)


class _Server(Server[Any]):
    """The SDK server with list_changed advertised on every transport (the HTTP manager passes no options),
    and tasks when it serves them (the SDK derives no ``tasks`` capability)."""

    serves_tasks: Callable[[], bool] = staticmethod(lambda: False)
    """Whether tasks are declared now (the registry has a tool that runs as one)."""
    background: TaskGroup | None = None
    """The task group of the serving now (``_lifespan``; over HTTP there is one), for the lean path's held calls."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        options = notification_options or NotificationOptions(True, True, True)
        return super().create_initialization_options(options, experimental_capabilities, extensions)

    def get_capabilities(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
        *,
        protocol_version: str | None = None,
    ) -> types.ServerCapabilities:
        serves_tasks = self.serves_tasks()
        if serves_tasks:  # 2026-07-28 (a handshake-era result drops it)
            extensions = {**(extensions if extensions is not None else self.extensions), TASKS_EXTENSION: {}}
        capabilities = super().get_capabilities(
            notification_options, experimental_capabilities, extensions, protocol_version=protocol_version
        )
        if not serves_tasks:
            return capabilities
        # 2025-11-25 only (the 2026-07-28 result drops it; there the extension in ``extensions`` says it).
        tasks = types.ServerTasksCapability(
            list=types.TasksListCapability(),
            cancel=types.TasksCancelCapability(),
            requests=types.ServerTasksRequestsCapability(
                tools=types.TasksToolsCapability(call=types.TasksCallCapability())
            ),
        )
        return capabilities.model_copy(update={"tasks": tasks})


@asynccontextmanager
async def _lifespan(server: Server[Any]) -> AsyncIterator[dict[str, Any]]:
    """Entered once per serving (the HTTP manager's run, a stdio or in-memory connection): holds the task
    group of what outlives a request, such as a task's wait for its run to end."""
    async with anyio.create_task_group() as background:
        if isinstance(server, _Server):
            server.background = background
        try:
            yield {"background": background}
        finally:
            background.cancel_scope.cancel()
            if isinstance(server, _Server) and server.background is background:
                server.background = None


class McpFrontend:
    """Serves a ``Gateway`` over MCP and tells connected clients when its registry changes."""

    def __init__(self, gateway: Gateway, principal: Principal) -> None:
        self.gateway = gateway
        self.principal = principal
        self._connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._bus = InMemorySubscriptionBus()
        self._tools: list[tuple[str, types.Tool]] | None = None
        self._task_tools: bool | None = None
        """Whether the registry has a tool that runs as a task (None: not known for this snapshot yet)."""
        self._visible: dict[Principal, list[types.Tool]] = {}
        self._param_headers: dict[str, bool] = {}
        self._log_levels: weakref.WeakKeyDictionary[Connection, str] = weakref.WeakKeyDictionary()
        self._subscribers: dict[str, weakref.WeakSet[Connection]] = {}
        self._held = gateway.held_calls
        """Upstream tool calls of 2026-07-28 clients, held while the client answers what the upstream asked."""
        self.register_http_session: Callable[[str, Callable[[], FastSession]], None] | None = None
        """Set when served over HTTP: records handshake-era sessions for the lean ``tools/call`` path."""
        with warnings.catch_warnings():
            # logging/setLevel is deprecated in 2026-07-28 but handshake-era clients still send it.
            warnings.simplefilter("ignore", MCPDeprecationWarning)
            self.server = _Server(
                gateway.config.gateway.name,
                version=VERSION,
                lifespan=_lifespan,
                on_list_tools=self._list_tools,
                on_call_tool=self._call_tool,
                on_list_prompts=self._list_prompts,
                on_get_prompt=self._get_prompt,
                on_list_resources=self._list_resources,
                on_list_resource_templates=self._list_templates,
                on_read_resource=self._read_resource,
                on_subscribe_resource=self._subscribe,
                on_unsubscribe_resource=self._unsubscribe,
                on_completion=self._complete,
                on_set_logging_level=self._set_logging_level,
                on_subscriptions_listen=ListenHandler(self._bus),
            )
        # The SDK wraps every message in a tracing span even with no tracer installed (~8% of the gateway's
        # CPU per call, measured by py-spy); spans belong to the call path, where they see the policy outcome.
        self.server.middleware = []
        self._serve_tasks()
        gateway.on_change(self._registry_changed)
        gateway.on_resource_updated(self._resource_updated)

    def _seen(self, ctx: ServerRequestContext[Any]) -> None:
        # Remember handshake-era connections to push list_changed to them later (SDK has no public registry).
        connection = ctx.session._connection
        self._connections.add(connection)
        request = ctx.request
        session_id = request.headers.get("mcp-session-id") if isinstance(request, Request) else None
        register = self.register_http_session
        if register is not None and session_id and ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            register(
                session_id,
                lambda: FastSession(
                    capabilities=_Channel(ctx).capabilities,
                    protocol_version=ctx.protocol_version,
                    log_level=lambda: self._log_levels.get(connection, "debug"),
                    forwardable_meta=_forwardable_meta,
                ),
            )

    def param_headers(self, entry: Entry) -> bool:
        """Whether the tool's input schema maps arguments to ``Mcp-Param-*`` headers (``x-mcp-header``), which the
        SDK side checks on a 2026-07-28 call."""
        name = entry.tool.name
        found = self._param_headers.get(name)
        if found is None:
            found = self._param_headers[name] = X_MCP_HEADER_KEY in json.dumps(entry.tool.definition.get("inputSchema"))
        return found

    async def _registry_changed(self) -> None:
        self._tools = None
        self._task_tools = None
        self._visible = {}
        self._param_headers = {}
        for connection in list(self._connections):
            await connection.send_tool_list_changed()
            await connection.send_prompt_list_changed()
            await connection.send_resource_list_changed()
        for event in (ToolsListChanged(), PromptsListChanged(), ResourcesListChanged()):
            await self._bus.publish(event)

    # -- tools ------------------------------------------------------------------------------------

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        self._seen(ctx)
        principal = self._principal(ctx)
        visible = self._visible.get(principal)
        if visible is None:  # converted once per registry snapshot, filtered once per caller
            if self._tools is None:
                self._tools = [(name, _listed(e)) for name, e in self.gateway.registry.tools.items()]
            access = self.gateway.access
            visible = [tool for name, tool in self._tools if access.visible(principal, name)]
            if len(self._visible) > 1024:  # one entry per configured client, in practice: bounded anyway
                self._visible.clear()
            self._visible[principal] = visible
        return types.ListToolsResult(tools=visible)

    def _principal(self, ctx: ServerRequestContext[Any]) -> Principal:
        """Who sent this request: the client the HTTP auth middleware recognised, else this frontend's."""
        request = ctx.request
        found = principal_of(request.scope) if isinstance(request, Request) else None
        return found or self.principal

    async def _call_tool(self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> Any:
        self._seen(ctx)
        context = self._context(ctx)
        if params.input_responses is not None or params.request_state is not None:
            responses = {
                k: v.model_dump(by_alias=True, mode="json", exclude_none=True)
                for k, v in (params.input_responses or {}).items()
            }
            context = replace(context, input_responses=responses, request_state=params.request_state)
        task = self._task_asked(ctx, params)
        if task is not None:
            context = replace(context, task=task)
        try:
            entry = self.gateway.registry.tools.get(params.name)
            if entry is not None and task is None and self._holds(ctx, entry, params):
                result = await self._held_call(ctx, entry, params, context)
            else:
                result = await self.gateway.dispatcher.call(params.name, params.arguments or {}, context)
        except ToolNotFound as exc:
            raise MCPError(types.INVALID_PARAMS, str(exc)) from None
        except InvalidRequestState as exc:
            raise MCPError(types.INVALID_PARAMS, str(exc), {"reason": exc.reason}) from None
        if result.task is not None:
            if entry is not None and entry.provider != WORKFLOW_PROVIDER:
                created = self.upstream_tasks.created(entry.provider, params.name, result.task, context.principal)
                return self._task_created(ctx, created, context.principal, notify=False)
            return self._task_created(ctx, result.task, context.principal)
        if result.input_required is not None:
            return types.InputRequiredResult.model_validate(result.input_required)
        return types.CallToolResult.model_validate(result.wire())

    def _holds(self, ctx: ServerRequestContext[Any], entry: Entry, params: types.CallToolRequestParams) -> bool:
        """Whether this call is one to hold for the client's answers (or the retry of one): an upstream tool's,
        by a 2026-07-28 client that can be asked something. Workflow runs hold themselves (their round trip)."""
        if entry.provider == WORKFLOW_PROVIDER:
            return False
        if params.request_state is not None and params.request_state.startswith(STATE_PREFIX):
            return True
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            return False
        capabilities = ctx.session.client_capabilities
        return capabilities is not None and (capabilities.sampling is not None or capabilities.elicitation is not None)

    async def _held_call(
        self, ctx: ServerRequestContext[Any], entry: Entry, params: types.CallToolRequestParams, context: CallContext
    ) -> ToolResult:
        """Call the tool held in the background, or deliver the answers of its retry.

        Raises:
            InvalidRequestState: the retry's ``requestState`` cannot be used.
        """
        arguments = params.arguments or {}
        if params.request_state is not None and params.request_state.startswith(STATE_PREFIX):
            return await self._held.resume(context, request=request_digest(params.name, arguments))
        background = ctx.lifespan_context.get("background") if isinstance(ctx.lifespan_context, dict) else None
        return await self.hold(entry, params.name, arguments, context, background)

    async def hold(
        self, entry: Entry, name: str, arguments: JSONObject, context: CallContext, background: TaskGroup | None
    ) -> ToolResult:
        """Call an upstream tool held in ``background`` for its 2026-07-28 client's answers (``gateway.roundtrip``):
        its result, or the questions the upstream asked meanwhile as an input-required result."""
        dispatcher = self.gateway.dispatcher

        async def run(held: CallContext) -> ToolResult:
            try:
                return await dispatcher.call(name, arguments, held)
            except GatewayError as exc:  # ToolNotFound: the registry changed since; the background must not fail
                return ToolResult.text(str(exc), is_error=True)

        server = self.gateway.config.upstreams.get(entry.provider)
        return await self._held.start(
            run,
            context,
            request=request_digest(name, arguments),
            group=background,
            answer_timeout=server.timeout if server is not None else ANSWER_TIMEOUT,  # the upstream call's bound
        )

    def _context(self, ctx: ServerRequestContext[Any]) -> CallContext:
        opted = _log_level(ctx.meta)
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            level = opted  # 2026-07-28: the request's own opt-in; no log messages without one
        else:
            level = self._log_levels.get(ctx.session._connection, "debug")
        return CallContext(
            principal=self._principal(ctx),
            progress=ctx.session.report_progress,
            client=_Channel(ctx, level),
            meta=_forwardable_meta(ctx.meta),
            log_level=opted,
        )

    # -- tasks ----------------------------------------------------------------------------------------

    def _serve_tasks(self) -> None:
        self.task_methods = TaskMethods(self.gateway.runs)
        self.upstream_tasks = UpstreamTasks(lambda: self.gateway.providers, self.gateway.state_signer)
        self.server.serves_tasks = self._has_task_tools
        self.server.middleware = [_route_task_calls]
        add = self.server.add_request_handler
        add("tasks/get", types.GetTaskRequestParams, self._get_task)
        add("tasks/result", types.GetTaskPayloadRequestParams, self._task_result)
        add("tasks/list", types.PaginatedRequestParams, self._list_tasks)
        add("tasks/cancel", types.CancelTaskRequestParams, self._cancel_task)
        add("tasks/update", _UpdateTaskParams, self._update_task)  # 2026-07-28
        add(_TASK_CALL, types.CallToolRequestParams, self._call_tool)  # 2025-11-25, see _route_task_calls

    def _has_task_tools(self) -> bool:
        if self._task_tools is None:
            self._task_tools = any(_task_support(e) is not None for e in self.gateway.registry.tools.values())
        return self._task_tools

    def _task_asked(self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> JSONObject | None:
        """The task parameters to run this call with, or None to run it as a plain call.

        2025-11-25: the client asks with ``params.task``; a tool that cannot run as a task is then a -32601
        error (the spec's answer). 2026-07-28: the server decides, and only for a client that declares the
        extension on the request: a workflow tool's call runs as a task, and so does an upstream tool's that
        requires one (an optional one stays a plain call: no polling where none is needed).

        A client that does not ask (or cannot: no extension) for a tool that requires a task still gets its
        result: the upstream connector runs that call as a task and waits for it (``connectors.mcp``).

        Raises:
            MCPError: a task asked of a tool that cannot run as one.
        """
        if not self._has_task_tools():
            return None  # no tasks capability: params.task is ignored, as the spec says
        entry = self.gateway.registry.tools.get(params.name)
        support = _task_support(entry) if entry is not None else None
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            if support not in ("required", "workflow") or not _declares_tasks(ctx):
                return None
        elif params.task is None:
            return None
        elif entry is not None and support is None:
            raise MCPError(types.METHOD_NOT_FOUND, f"Tool {params.name!r} does not support task-augmented calls")
        return params.task.model_dump(by_alias=True, mode="json", exclude_none=True) if params.task else {}

    def _task_created(
        self, ctx: ServerRequestContext[Any], task: JSONObject, principal: Principal, *, notify: bool = True
    ) -> HandlerResult:
        """The answer to a call that created ``task``; ``notify``: tell a handshake-era session when it ends
        (a workflow run's; an upstream's own status notifications are not forwarded: clients poll)."""
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return {"resultType": "task", **extension_task(task)}
        if notify:
            self._notify_when_finished(ctx, str(task["taskId"]), principal)
        return {"task": dict(task)}  # CreateTaskResult

    def _notify_when_finished(self, ctx: ServerRequestContext[Any], task_id: str, principal: Principal) -> None:
        """Send ``notifications/tasks/status`` to this session when the run ends, if it is still connected
        (best effort: the spec makes it optional and clients poll anyway)."""
        background = ctx.lifespan_context.get("background") if isinstance(ctx.lifespan_context, dict) else None
        if background is None:
            return
        connection = weakref.ref(ctx.session._connection)

        async def notify() -> None:
            try:
                record = await self.gateway.runs.wait(task_id, principal)
            except Exception:  # a background job's boundary: a failure here must not end the serving
                logger.exception("waiting for task %s to notify its status failed", task_id)
                return
            live = connection()
            if record is not None and live is not None:
                await live.notify("notifications/tasks/status", task_of(record))  # never raises

        background.start_soon(notify)

    # Each tasks/* request goes to the upstream whose task it names (a gateway id of gateway.upstream_tasks),
    # else to the workflow runs.

    async def _get_task(self, ctx: ServerRequestContext[Any], params: types.GetTaskRequestParams) -> HandlerResult:
        modern = self._tasks_era(ctx)
        if UpstreamTasks.owns(params.task_id):
            return await _answer(self.upstream_tasks.get(params.task_id, self._context(ctx), modern=modern))
        return await _answer(self.task_methods.get(params.task_id, self._principal(ctx), modern=modern))

    async def _task_result(
        self, ctx: ServerRequestContext[Any], params: types.GetTaskPayloadRequestParams
    ) -> HandlerResult:
        self._tasks_era(ctx, modern=False)
        if UpstreamTasks.owns(params.task_id):
            return await _answer(self.upstream_tasks.result(params.task_id, self._context(ctx)))
        return await _answer(self.task_methods.result(params.task_id, self._principal(ctx)))

    async def _list_tasks(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> HandlerResult:
        self._tasks_era(ctx, modern=False)
        upstream = await self.upstream_tasks.listed(self._context(ctx))
        cursor = params.cursor if params else None
        return await _answer(self.task_methods.list(self._principal(ctx), cursor, also=upstream))

    async def _cancel_task(
        self, ctx: ServerRequestContext[Any], params: types.CancelTaskRequestParams
    ) -> HandlerResult:
        modern = self._tasks_era(ctx)
        if UpstreamTasks.owns(params.task_id):
            return await _answer(self.upstream_tasks.cancel(params.task_id, self._context(ctx), modern=modern))
        return await _answer(self.task_methods.cancel(params.task_id, self._principal(ctx), modern=modern))

    async def _update_task(self, ctx: ServerRequestContext[Any], params: "_UpdateTaskParams") -> HandlerResult:
        self._tasks_era(ctx, modern=True)
        if UpstreamTasks.owns(params.task_id):
            return await _answer(self.upstream_tasks.update(params.task_id, self._context(ctx)))
        return await _answer(self.task_methods.update(params.task_id, self._principal(ctx)))

    def _tasks_era(self, ctx: ServerRequestContext[Any], *, modern: bool | None = None) -> bool:
        """Whether the request is of the 2026-07-28 era, checked against the era its method exists in.

        Raises:
            MCPError: the method is not of this era (-32601), or a 2026-07-28 client does not declare the
                extension (-32021).
        """
        is_modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        if modern is not None and modern != is_modern:
            raise MCPError(types.METHOD_NOT_FOUND, "Method not found", data=ctx.method)
        if is_modern and not _declares_tasks(ctx):
            required: JSONObject = {"requiredCapabilities": {"extensions": {TASKS_EXTENSION: {}}}}
            raise MCPError(types.MISSING_REQUIRED_CLIENT_CAPABILITY, "Missing required client capability", required)
        return is_modern

    # -- prompts and resources ----------------------------------------------------------------------

    async def _list_prompts(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        self._seen(ctx)
        prompts = [types.Prompt.model_validate(e.prompt.definition) for e in self.gateway.registry.prompts.values()]
        return types.ListPromptsResult(prompts=prompts)

    async def _get_prompt(
        self, ctx: ServerRequestContext[Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        entry = self.gateway.registry.prompts.get(params.name)
        if entry is None:
            raise MCPError(types.INVALID_PARAMS, f"Unknown prompt: {params.name!r}")
        raw = await self._forward(entry.provider, "prompts/get", _wire(params, name=entry.target), ctx)
        return types.GetPromptResult.model_validate(raw)

    async def _list_resources(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        self._seen(ctx)
        resources = [types.Resource.model_validate(r.definition) for r in self.gateway.registry.resource_list]
        return types.ListResourcesResult(resources=resources)

    async def _list_templates(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        templates = [types.ResourceTemplate.model_validate(r.definition) for r in self.gateway.registry.template_list]
        return types.ListResourceTemplatesResult(resource_templates=templates)

    async def _read_resource(
        self, ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        raw = await self._forward(self._owner(str(params.uri)), "resources/read", _wire(params), ctx)
        return types.ReadResourceResult.model_validate(raw)

    async def _subscribe(
        self, ctx: ServerRequestContext[Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        uri = str(params.uri)
        subscribers = self._subscribers.setdefault(uri, weakref.WeakSet())
        if not subscribers:  # the shared upstream session subscribes once for every client
            await self._forward(self._owner(uri), "resources/subscribe", {"uri": uri}, ctx)
        subscribers.add(ctx.session._connection)
        return types.EmptyResult()

    async def _unsubscribe(
        self, ctx: ServerRequestContext[Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        uri = str(params.uri)
        subscribers = self._subscribers.get(uri)
        if subscribers is not None:
            subscribers.discard(ctx.session._connection)
            if not subscribers:
                del self._subscribers[uri]
                await self._forward(self._owner(uri), "resources/unsubscribe", {"uri": uri}, ctx)
        return types.EmptyResult()

    async def _resource_updated(self, uri: str) -> None:
        for connection in list(self._subscribers.get(uri, ())):
            await connection.send_resource_updated(uri)
        await self._bus.publish(ResourceUpdated(uri))

    async def _complete(
        self, ctx: ServerRequestContext[Any], params: types.CompleteRequestParams
    ) -> types.CompleteResult:
        ref = params.ref
        if isinstance(ref, types.PromptReference):
            entry = self.gateway.registry.prompts.get(ref.name)
            if entry is None:
                raise MCPError(types.INVALID_PARAMS, f"Unknown prompt: {ref.name!r}")
            provider, ref = entry.provider, ref.model_copy(update={"name": entry.target})
        else:
            provider = self._owner(ref.uri)
        wire = _wire(params, ref=ref.model_dump(by_alias=True, mode="json", exclude_none=True))
        raw = await self._forward(provider, "completion/complete", wire, ctx)
        return types.CompleteResult.model_validate(raw)

    async def _set_logging_level(
        self, ctx: ServerRequestContext[Any], params: types.SetLevelRequestParams
    ) -> types.EmptyResult:
        # Upstream sessions are shared, so the level is applied here, to what this client is sent.
        self._log_levels[ctx.session._connection] = params.level
        return types.EmptyResult()

    def _owner(self, uri: str) -> str:
        owner = self.gateway.registry.route_resource(uri)
        if owner is None:
            raise MCPError(types.INVALID_PARAMS, str(ResourceNotFound(uri)))
        return owner

    async def _forward(
        self, provider: str, method: str, params: JSONObject, ctx: ServerRequestContext[Any]
    ) -> JSONObject:
        """Send a non-tool request to its provider; failures become JSON-RPC errors (no isError here)."""
        try:
            return await self.gateway.providers[provider].request(method, params, self._context(ctx))
        except ResourceNotFound as exc:  # one a provider owns the URI of, yet has not (or not for this client)
            raise MCPError(types.INVALID_PARAMS, str(exc)) from None
        except UpstreamError as exc:
            raise MCPError(types.INTERNAL_ERROR, str(exc)) from None


_TASK_CALL = "patchbay/tools/call-as-task"
"""Where a handshake-era task-augmented ``tools/call`` is routed: the SDK checks a ``tools/call`` result
against ``CallToolResult``, which a ``CreateTaskResult`` is not (it knows tasks as types only)."""


async def _route_task_calls(ctx: ServerRequestContext[Any], call_next: CallNext) -> HandlerResult:
    """Server middleware: a handshake-era ``tools/call`` with ``params.task`` goes to :data:`_TASK_CALL`,
    which is not a method clients may call themselves."""
    if ctx.method == "tools/call":
        params = ctx.params
        if isinstance(params, Mapping) and params.get("task") is not None:
            if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
                return await call_next(replace(ctx, method=_TASK_CALL))
    elif ctx.method == _TASK_CALL:
        raise MCPError(types.METHOD_NOT_FOUND, "Method not found", data=_TASK_CALL)
    return await call_next(ctx)


class _UpdateTaskParams(types.RequestParams):
    """``tasks/update`` (2026-07-28 tasks extension): answers to a task's input requests."""

    task_id: str
    input_responses: dict[str, Any] | None = None


def _declares_tasks(ctx: ServerRequestContext[Any]) -> bool:
    """Whether the client declared the tasks extension (2026-07-28: on this very request)."""
    capabilities = ctx.session.client_capabilities
    return capabilities is not None and TASKS_EXTENSION in (capabilities.extensions or {})


async def _answer(answer: Awaitable[dict[str, Any]]) -> HandlerResult:
    """A ``tasks/*`` answer, its ``TaskError`` as the JSON-RPC error it stands for."""
    try:
        return await answer
    except TaskError as exc:
        raise MCPError(exc.code, str(exc), exc.data) from None


def _listed(entry: Entry) -> types.Tool:
    """A registry tool as ``tools/list`` shows it: an upstream tool's ``execution`` included, as its calls (and
    tasks) pass through to it."""
    return types.Tool.model_validate(entry.tool.definition)


def _task_support(entry: Entry) -> str | None:
    """How a tool runs as a task: ``workflow`` (a run is a task), an upstream's ``optional`` or ``required``,
    or None (it does not)."""
    return "workflow" if entry.provider == WORKFLOW_PROVIDER else task_support(entry.tool.definition)


def _wire(params: Any, **update: Any) -> dict[str, Any]:
    """Request ``params`` in wire form, with ``update`` applied and only the caller's part of ``_meta`` kept."""
    wire: dict[str, Any] = params.model_dump(by_alias=True, mode="json", exclude_none=True)
    wire.update(update)
    meta = _forwardable_meta(params.meta)
    if meta:
        wire["_meta"] = meta
    else:
        wire.pop("_meta", None)
    return wire


_ENVELOPE_PREFIX = "io.modelcontextprotocol/"
_MCP_PARAM = MCP_PARAM_HEADER_PREFIX.lower()


def _log_level(meta: Mapping[str, Any] | None) -> str | None:
    level = meta.get(types.LOG_LEVEL_META_KEY) if meta else None
    return level if isinstance(level, str) else None


def _forwardable_meta(meta: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The parts of a request's ``_meta`` that belong to the caller, not to this hop.

    The progress token is this connection's (the upstream call gets its own), and
    ``io.modelcontextprotocol/*`` keys are the 2026-07-28 per-request envelope of
    this hop, which a handshake-era upstream session rejects.
    """
    if not meta:
        return None
    kept = {k: v for k, v in meta.items() if k != "progressToken" and not k.startswith(_ENVELOPE_PREFIX)}
    return kept or None


def _security(host: str) -> TransportSecuritySettings:
    """DNS-rebinding protection: only Host/Origin values naming this gateway are accepted."""
    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    if host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::"):
        hosts.append(f"{host}:*")
    origins = [f"http://{h}" for h in hosts] + [f"https://{h}" for h in hosts]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


def rebinding_check(host: str) -> Callable[[Request], Awaitable[Response | None]]:
    """``/mcp``'s DNS-rebinding check for the gateway's other endpoints: the same allowed Host and
    Origin values, the same refusals (421 for a foreign Host, 403 for a foreign Origin), or None."""
    security = TransportSecurityMiddleware(_security(host))

    async def refusal(request: Request) -> Response | None:
        return await security.validate_request(request)

    return refusal


class _SdkSessions:
    """The SDK session manager's view of its sessions, for the lean path (``gateway.fastpath.SessionHost``).

    The manager has no public session registry, so this reads its session table and mirrors the
    transport's idle bookkeeping (``StreamableHTTPServerTransport.handle_request``): the one place
    that depends on those internals, covered by every end-to-end test that calls a tool over HTTP.
    """

    modern_versions = frozenset(MODERN_PROTOCOL_VERSIONS)

    def __init__(self, manager: StreamableHTTPSessionManager, frontend: McpFrontend, security: Any) -> None:
        self._manager = manager
        self._frontend = frontend
        self._sessions: dict[str, FastSession] = {}
        self._security = TransportSecurityMiddleware(security)
        self._stamp = frontend.server.server_info_stamp
        """The ``serverInfo`` stamped on 2026-07-28 results (shared: responses are serialised, never changed)."""
        frontend.register_http_session = self.register

    def register(self, session_id: str, make: Callable[[], FastSession]) -> None:
        """Record a session the SDK side has seen; forget those the SDK has ended (bounded by its own table)."""
        if session_id in self._sessions:
            return
        live = self._manager._server_instances
        for ended in [sid for sid in self._sessions if sid not in live]:
            del self._sessions[ended]
        self._sessions[session_id] = make()

    def _transport(self, session_id: str) -> Any:
        transport = self._manager._server_instances.get(session_id)
        if transport is None or transport.is_terminated:
            self._sessions.pop(session_id, None)
            return None
        idle = transport.idle_scope
        return None if idle is not None and idle.cancel_called else transport

    def lookup(self, session_id: str) -> FastSession | None:
        return self._sessions.get(session_id) if self._transport(session_id) is not None else None

    @contextmanager
    def activity(self, session_id: str) -> Iterator[None]:
        transport = self._transport(session_id)
        idle = transport.idle_scope if transport is not None else None
        if idle is None or transport._idle_timeout is None:
            yield
            return
        transport._requests_in_flight += 1
        idle.deadline = math.inf
        try:
            yield
        finally:
            transport._requests_in_flight -= 1
            if not transport._requests_in_flight:
                idle.deadline = anyio.current_time() + transport._idle_timeout

    async def refusal(self, scope: Scope) -> ASGIApp | None:
        response = await self._security.validate_request(Request(scope), is_post=True)
        return response

    def modern(self, scope: Scope, message: dict[str, Any]) -> ModernCall | None:
        """The SDK's envelope checks (``handle_modern_request``'s ladder), then what only the SDK side does:
        ``Mcp-Param-*`` headers to validate, a workflow tool (it may run as a task or answer input-required), a
        tool that requires a task called by a client that declares the tasks extension (it runs as one)."""
        raw = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]]
        if find_duplicated_routing_header(raw) is not None:
            return None
        headers = dict(raw)
        if any(name.startswith(_MCP_PARAM) for name in headers):
            return None
        verdict = classify_inbound_request(message, headers=headers)
        if not isinstance(verdict, InboundModernRoute):
            return None
        capabilities = verdict.client_capabilities
        if not isinstance(capabilities, dict):
            return None
        params = message["params"]
        entry = self._frontend.gateway.registry.tools.get(params.get("name"))
        if entry is not None and (entry.provider == WORKFLOW_PROVIDER or self._frontend.param_headers(entry)):
            return None
        if (
            entry is not None
            and _task_support(entry) == "required"
            and TASKS_EXTENSION in (capabilities.get("extensions") or {})
        ):
            return None  # the call runs as a task (McpFrontend._task_asked)
        asks = "sampling" in capabilities or "elicitation" in capabilities  # the call is held (McpFrontend.hold)
        if asks and (entry is None or self._frontend.server.background is None):
            return None
        meta = params["_meta"]
        level = _log_level(meta)
        if level is not None and level not in LOG_LEVELS:
            return None  # the SDK refuses it
        return ModernCall(
            capabilities=capabilities,
            protocol_version=verdict.protocol_version,
            meta=_forwardable_meta(meta),
            log_level=level,
            progress_token=meta.get("progressToken"),
            held=asks,
        )

    async def hold(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        entry = self._frontend.gateway.registry.tools.get(name)
        if entry is None:
            raise ToolNotFound(name)
        return await self._frontend.hold(entry, name, arguments, context, self._frontend.server.background)

    def modern_result(self, result: ToolResult, version: str) -> JSONObject:
        if result.input_required is not None:  # the gateway's own questions, shaped for the era as the SDK does
            wire = serialize_server_result("tools/call", version, result.input_required)
        else:
            wire = result.wire()
            wire["resultType"] = "complete"
        meta = wire.get("_meta")
        if not isinstance(meta, dict) or meta.get(types.SERVER_INFO_META_KEY) is None:
            wire["_meta"] = {**(meta or {}), types.SERVER_INFO_META_KEY: self._stamp}
        return wire

    def error_status(self, code: int) -> int:
        return ERROR_CODE_HTTP_STATUS.get(code, 200)


def http_endpoint(frontend: McpFrontend, host: str) -> tuple[ASGIApp, Any]:
    """The streamable-HTTP ASGI app for ``/mcp`` and the context manager that must run around it."""
    security = _security(host)
    manager = StreamableHTTPSessionManager(app=frontend.server, security_settings=security)
    sessions = _SdkSessions(manager, frontend, security)
    sdk = SessionRequired(StreamableHTTPASGIApp(manager), HANDSHAKE_PROTOCOL_VERSIONS)
    app = FastPath(sdk, sessions, frontend.gateway.dispatcher, frontend.principal)
    return NestingLimit(app, frontend.gateway.config.gateway.max_depth, max_body=MAX_BODY), manager.run


class _CheckedStdin:
    """This process's stdin, line by line, with each line that nests deeper than ``gateway.max_depth`` answered
    with its JSON-RPC error on ``write`` instead of being handed to the SDK (which would drop one it cannot
    parse, leaving its caller waiting). Read without a blocking thread (``gateway.stdin``), so SIGTERM can stop
    ``serve --stdio`` while the client keeps stdin open; the SDK only iterates it."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._write: Any = None
        self._ready = anyio.Event()

    def answer_on(self, write: Any) -> None:
        self._write = write
        self._ready.set()

    async def __aiter__(self) -> AsyncIterator[str]:
        await self._ready.wait()
        async for raw in read_lines(0):
            line = raw.decode("utf-8", errors="replace")  # as the SDK decodes stdin
            error = nesting_error(line, self._limit)
            if error is None:
                yield line
            else:
                await self._write.send(SessionMessage(types.JSONRPCError.model_validate(error)))


async def serve_stdio(frontend: McpFrontend) -> None:
    """Serve one client over this process's stdin/stdout until it disconnects."""
    server = frontend.server
    stdin = _CheckedStdin(frontend.gateway.config.gateway.max_depth)
    with MessageOut() as out:
        streams = stdio_server(stdin=cast("anyio.AsyncFile[str]", stdin), stdout=cast("anyio.AsyncFile[str]", out))
        async with streams as (read, write):
            stdin.answer_on(write)
            await server.run(read, write, server.create_initialization_options())
