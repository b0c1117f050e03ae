"""Upstream MCP servers (stdio, streamable HTTP, legacy SSE) as providers.

Each ``McpUpstream`` owns one long-lived session to its server, shared by every
call: a supervisor task connects it, keeps its listing fresh (``list_changed``),
notices when it dies (the transport's read stream ends: a stdio child exited,
an HTTP request failed) and reconnects with exponential backoff. While it is
down, calls fail at once with ``UpstreamUnavailable`` and the last known listing
stays in the registry.

Server→client requests (sampling, elicitation) and log messages that the
upstream sends mid-call carry no link to the call that caused them on a shared
handshake-era session, so they go to the client of the one call in flight on
this upstream; when calls of several clients are in flight, a request is
refused rather than risk showing one client's data to another.

An HTTP upstream that speaks 2026-07-28 gets a second, stateless session in
that era, used for the calls of 2026-07-28 clients: each request then carries
that client's capabilities and log level, and an ``InputRequiredResult`` (the
era's way of asking the user or the model mid-call) goes back to the client
unchanged, its answers forwarded on the retry. A stdio upstream keeps one
session: a second would be a second process with state of its own.

A server that declares a capability but answers one of its list methods with
Method not found (``mcp-server-sqlite`` does so for ``resources/templates/list``)
is served with what it has: that kind is empty, and a warning naming the method
is logged once per connection and kept in ``warnings`` for the status.
"""

import itertools
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, cast

import anyio
import anyio.abc
import httpx2
import mcp_types as types
import orjson
from mcp import Client, StdioServerParameters
from mcp.client.session import ClientRequestContext, IncomingMessage
from mcp.client.sse import sse_client
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError, SubscriptionLost
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import MCP_METHOD_HEADER, MCP_NAME_HEADER, X_MCP_HEADER_KEY, encode_header_value
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import TypeAdapter, ValidationError

from connectors._http_call import CallFailed, CallRefused, HttpCaller, ReplyTooLarge, SessionGone, SessionInfo
from connectors._result_limit import event_limit, is_oversize, reply_size
from connectors._stderr import ServerStderr, server_stderr
from connectors._stream_call import StreamCaller, StreamCallFailed, StreamLost
from gateway.config import DEFAULT_MAX_RESULT, HttpServer, ServerConfig, StdioServer
from gateway.errors import (
    ClientRefused,
    ConfigProblem,
    InvalidArguments,
    ResultTooLarge,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.types import (
    TASK_ANSWERS_NOW,
    TASKS_EXTENSION,
    CallContext,
    ClientChannel,
    JSONObject,
    Listing,
    Prompt,
    ProviderEvents,
    ProviderState,
    Resource,
    Tool,
    ToolResult,
    task_poll_seconds,
    task_support,
    tied_to_task,
)

logger = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.5
"""Seconds before the first reconnection attempt; doubles on each failure."""
MAX_BACKOFF = 30.0
MIN_CONNECT_TIMEOUT = 10.0
"""Seconds a connection attempt may take at least, whatever the per-call ``timeout``: starting a
process and the handshake routinely take a second or more, and a tight call timeout must not fail
every start."""
_CLIENT_INFO = types.Implementation(name="patchbay", version="0.1.0")
_CLIENT_INFO_WIRE = _CLIENT_INFO.model_dump(by_alias=True, mode="json", exclude_none=True)
_PAGE_CAP = 100
"""A paginator that never ends cannot hang a refresh."""

# Results are taken as raw JSON and passed on as such: faithful, and one validation less per call.
# `send_request` is typed for models only but takes any TypeAdapter.
_RAW: Any = TypeAdapter(dict[str, Any])

_GONE = frozenset({types.CONNECTION_CLOSED, types.INVALID_REQUEST, types.INTERNAL_ERROR})
"""Errors a ping meets when the connection or the session is gone (the SDK's HTTP transport reports a lost
connection, a session the server no longer knows and an HTTP error status with these codes)."""

_SESSION_TERMINATED = "Session terminated"
"""How the SDK's HTTP transport reports a 404 for the session id (with ``INVALID_REQUEST``)."""


class _Unsent(Exception):
    """The session was gone before the request reached the server: it may be sent again on a new one."""


_CAPABILITY = {"sampling/createMessage": "sampling", "elicitation/create": "elicitation"}
"""The client capability each server→client request needs."""

_LISTS: dict[str, tuple[Any, str, str]] = {
    "tools/list": (types.ListToolsRequest, "tools", "tools"),
    "prompts/list": (types.ListPromptsRequest, "prompts", "prompts"),
    "resources/list": (types.ListResourcesRequest, "resources", "resources"),
    "resources/templates/list": (types.ListResourceTemplatesRequest, "resourceTemplates", "resource templates"),
}
"""Each list method: its request type, the key of its items in the result, what it lists (in warnings)."""


State = ProviderState
"""The name this module used before the state moved to ``gateway.types``."""

_REQUESTS = frozenset(
    {"prompts/get", "resources/read", "resources/subscribe", "resources/unsubscribe", "completion/complete"}
)
"""The requests besides ``tools/call`` that :meth:`McpUpstream.request` forwards."""

_TASK_REQUESTS = frozenset({"tasks/get", "tasks/result", "tasks/list", "tasks/cancel"})
"""The 2025-11-25 ``tasks/*`` requests :meth:`McpUpstream.request` forwards on the handshake session (where the
server's tasks live), unchecked: the SDK knows them as types only."""


async def _ignore(value: str) -> None:
    return None


_UNTOLD = ProviderEvents(changed=_ignore)
"""Where changes go until :meth:`McpUpstream.run` is given its events: nowhere."""


class _WatchedStream:
    """A transport read stream that sets ``closed`` when it ends, so the supervisor sees a dead connection; and
    that hands the responses to a ``StreamCaller``'s requests to it instead of to the session."""

    def __init__(self, inner: Any, closed: anyio.Event, caller: StreamCaller | None = None) -> None:
        self._inner = inner
        self._closed = closed
        self._caller = caller

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # `last_context` and friends

    async def receive(self) -> Any:
        try:
            while True:
                message = await self._inner.receive()
                if self._caller is None or not self._caller.take(message):
                    return message
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._closed.set()
            if self._caller is not None:
                self._caller.lose("the connection to the server closed")
            raise

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._closed.set()
        await self._inner.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


@dataclass
class _Watched:
    """A ``Transport`` wrapping another one with a ``_WatchedStream``; with ``lean``, one whose ``caller`` makes
    requests on the transport's streams beside the session."""

    inner: Any
    closed: anyio.Event
    lean: bool = False
    caller: StreamCaller | None = None

    async def __aenter__(self) -> tuple[Any, Any]:
        read, write = await self.inner.__aenter__()
        if self.lean:
            self.caller = StreamCaller(write)
        return _WatchedStream(read, self.closed, self.caller), write

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self.closed.set()
        result: bool | None = await self.inner.__aexit__(exc_type, exc, tb)
        return result


class McpUpstream:
    """One upstream MCP server: a provider of tools, prompts and resources (``gateway.types.Provider``)."""

    def __init__(self, name: str, config: ServerConfig, *, max_result: int = DEFAULT_MAX_RESULT) -> None:
        self.name = name
        self.config = config
        self.max_result = max_result
        """Bytes a reply may have (``gateway.max_result``); a larger one is that request's error."""
        self.state = ProviderState.CONNECTING
        self.last_error: str | None = None
        self.listing = Listing()
        self.connects = 0
        self._task_required: frozenset[str] = frozenset()
        """The tools whose ``execution.taskSupport`` is ``required``: a plain call of one runs as a task."""
        self._missing: set[str] = set()
        """List methods this connection's server answered with Method not found: not asked again."""
        self._events = _UNTOLD
        self._stop = anyio.CancelScope()
        self._client: Client | None = None
        self._modern: Client | None = None
        self._caller: HttpCaller | None = None
        self._modern_caller: HttpCaller | None = None
        """2026-07-28 calls without the SDK client, when the server speaks that era (``self._modern``)."""
        self._stream_caller: StreamCaller | None = None
        """Calls over stdio without the SDK session's per-request machinery (``connectors._stream_call``)."""
        self._param_headers: dict[str, bool] = {}
        """By tool: whether its input schema maps arguments to ``Mcp-Param-*`` headers (then the SDK sends them)."""
        self._closed = anyio.Event()
        self._refresh_wanted = anyio.Event()
        self._inflight: dict[int, ClientChannel] = {}
        self._ids = itertools.count()
        self._next_attempt = 0.0
        """When the supervisor tries to connect again (``anyio.current_time()``), while it waits to."""
        self._lost = "connection closed by the server"
        """Why the current connection ended, once it has."""
        self._wake = anyio.Event()
        """Set by a call that found the server down: the supervisor tries again now instead of after the backoff."""
        self._attempted = anyio.Event()
        """Set (and replaced) when a connection attempt ends, connected or not: what such a call waits for."""
        self._failed_at = -math.inf
        """When the last connection attempt failed (``anyio.current_time()``)."""
        self._probe = anyio.Event()
        """Set when something hints that the server went away (its listen stream ended): ping it now."""
        self._stderr: ServerStderr | None = None
        """A stdio server's stderr on the last connection (attempted): its last lines tell why it ended."""

    @property
    def connect_timeout(self) -> float:
        return max(self.config.timeout, MIN_CONNECT_TIMEOUT)

    problems: tuple[ConfigProblem, ...] = ()
    """Nothing of a server's is left out for being wrong: what it lacks is in :attr:`warnings`."""

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the server lacks that the gateway works around (list methods it does not answer), for the status."""
        return tuple(_lacking(method) for method in _LISTS if method in self._missing)

    # -- lifetime -----------------------------------------------------------------------------

    async def run(
        self, events: ProviderEvents, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the server connected until cancelled or closed, telling ``events`` of changes. ``started``
        fires after the first attempt, good or bad."""
        self._events = events
        announced = False

        def announce() -> None:
            nonlocal announced
            if not announced:
                announced = True
                task_status.started()

        try:
            with self._stop:
                await self._supervise(announce)
        finally:
            self.state = ProviderState.DOWN
            self._client = self._modern = self._caller = self._modern_caller = self._stream_caller = None
            self._attempted.set()  # no attempt will come: nobody waits for one
        self.last_error = "closed"
        announce()  # closed before the first attempt was over

    async def close(self) -> None:
        """Stop supervising: :meth:`run` returns, and calls fail as unavailable from now on."""
        self._stop.cancel()

    async def _supervise(self, announce: Callable[[], None]) -> None:
        backoff = INITIAL_BACKOFF
        while True:
            self.state = ProviderState.CONNECTING
            self._closed = anyio.Event()
            try:
                async with anyio.create_task_group() as tg:
                    with anyio.fail_after(self.connect_timeout):
                        await tg.start(self._session)
                    backoff = INITIAL_BACKOFF
                    self._attempt_over()
                    announce()
                    await self._events.changed(self.name)
            # The boundary of one connection: whatever broke it (spawn failure, handshake error,
            # refused HTTP, a crash), the gateway keeps serving and tries again.
            except Exception as exc:
                self.last_error = _describe(exc, self.connect_timeout)
            was_up = self.state is ProviderState.UP
            again = "restarting it" if isinstance(self.config, StdioServer) else "reconnecting"
            if was_up:
                logger.warning("upstream %s: lost (%s); %s in %.1fs", self.name, self.last_error, again, backoff)
            else:
                logger.warning("upstream %s: %s; retrying in %.1fs", self.name, self.last_error, backoff)
            if self._stderr is not None:
                self._stderr.report_tail()  # why it ended, in its own words
            self.state = ProviderState.DOWN
            self._next_attempt = anyio.current_time() + backoff
            # however the connection ended
            self._client = self._modern = self._caller = self._modern_caller = self._stream_caller = None
            if not was_up:
                self._failed_at = anyio.current_time()
                self._attempt_over()
            announce()
            if was_up:
                await self._events.changed(self.name)
            with anyio.move_on_after(backoff):
                await self._wake.wait()
                # Woken by a call: still no more than two attempts a second at a server that is really gone.
                await anyio.sleep_until(self._failed_at + INITIAL_BACKOFF)
            self._wake = anyio.Event()
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _attempt_over(self) -> None:
        self._attempted.set()
        self._attempted = anyio.Event()

    async def _session(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """One connection: handshake, listing, then serve refreshes until the transport ends. A stdio server's
        stderr is read and logged meanwhile (``connectors._stderr``), to its last line."""
        self._stderr = None
        if not isinstance(self.config, StdioServer):
            await self._connection(None, task_status=task_status)
            return
        async with server_stderr(self.name) as stderr:
            self._stderr = stderr
            await self._connection(stderr, task_status=task_status)

    async def _connection(self, stderr: ServerStderr | None, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        session = SessionInfo()
        transport, http = self._transport(session, stderr)
        watched = _Watched(transport, self._closed, lean=isinstance(self.config, StdioServer))
        client = Client(
            watched,
            mode="legacy",
            cache=None,
            message_handler=self._on_message,
            logging_callback=self._on_log,
            sampling_callback=self._on_sampling,
            elicitation_callback=self._on_elicitation,
            client_info=_CLIENT_INFO,
        )
        async with client, AsyncExitStack() as stack:
            self._missing = set()
            self.listing = await self._fetch_listing(client)
            self._param_headers = {}
            self._modern = await self._open_modern(stack)
            if http is not None and session.session_id and isinstance(self.config, HttpServer):
                session.protocol_version = client.protocol_version
                self._caller = HttpCaller(http, self.config.url, session, max_result=self.max_result)
                if self._modern is not None:
                    era = SessionInfo(protocol_version=self._modern.protocol_version)  # no session: the era's header
                    url, limit = self.config.url, self.max_result
                    self._modern_caller = HttpCaller(http, url, era, max_result=limit, modern=True)
            self._stream_caller = watched.caller
            self._client = client
            self.state = ProviderState.UP
            self.last_error = None
            self.connects += 1
            self._log_connected(client)
            task_status.started()
            self._lost = "connection closed by the server"
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._refresher, client)
                if self._modern is not None:
                    tg.start_soon(self._listen, self._modern)
                if isinstance(self.config, HttpServer):
                    tg.start_soon(self._heartbeat, client, self.config.heartbeat)
                await self._closed.wait()
                tg.cancel_scope.cancel()
        self.last_error = self._lost

    def _log_connected(self, client: Client) -> None:
        config = self.config
        if isinstance(config, StdioServer):
            how, again = "stdio", "restarted"
        else:
            how, again = "SSE" if config.sse else "streamable HTTP", "reconnected"
        what = "connected" if self.connects == 1 else f"{again} (connection {self.connects})"
        era = f", and {self._modern.protocol_version} for its clients" if self._modern is not None else ""
        logger.info(
            "upstream %s: %s over %s, protocol %s%s; %s",
            self.name,
            what,
            how,
            client.protocol_version,
            era,
            _counts(self.listing),
        )

    async def _open_modern(self, stack: AsyncExitStack) -> Client | None:
        """A 2026-07-28 session beside the handshake one, for HTTP upstreams that speak that era."""
        if not isinstance(self.config, HttpServer) or self.config.sse:
            return None
        modern = Client(
            self._transport()[0], mode="auto", cache=None, client_info=_CLIENT_INFO, logging_callback=self._on_log
        )
        inner = AsyncExitStack()
        try:
            await inner.enter_async_context(modern)
            if modern.protocol_version not in MODERN_PROTOCOL_VERSIONS:
                await inner.aclose()
                return None
            await modern.list_tools()  # the session needs the listing to send Mcp-Param-* headers
        except (MCPError, httpx2.HTTPError, ValidationError, OSError) as exc:
            logger.info("upstream %s: no 2026-07-28 session (%s); its clients use the handshake era", self.name, exc)
            await inner.aclose()
            return None
        _forward_client_capabilities(modern)
        stack.push_async_exit(inner)
        return modern

    def _transport(
        self, session: SessionInfo | None = None, stderr: ServerStderr | None = None
    ) -> tuple[Any, httpx2.AsyncClient | None]:
        """The SDK transport for this server, and for streamable HTTP its HTTP client (which records
        the session id into ``session``, for the lean call path to share the session). A stdio server's
        process writes its stderr to ``stderr``."""
        config = self.config
        if isinstance(config, StdioServer):
            params = StdioServerParameters(
                command=config.command[0], args=list(config.command[1:]), env=dict(config.env) or None, cwd=config.cwd
            )
            if stderr is None:
                return stdio_client(params), None
            return _spawning(stdio_client(params, errlog=stderr.writer), stderr), None
        assert isinstance(config, HttpServer)
        if config.sse:
            return sse_client(config.url, headers=dict(config.headers), timeout=config.timeout), None

        async def remember_session(response: httpx2.Response) -> None:
            if session is not None and (session_id := response.headers.get("mcp-session-id")):
                session.session_id = session_id

        http = httpx2.AsyncClient(
            headers=dict(config.headers),
            timeout=httpx2.Timeout(config.timeout, read=None),
            event_hooks={"response": [remember_session]},
        )
        transport = streamable_http_client(
            config.url, http_client=http, max_sse_event_size=event_limit(self.max_result)
        )
        return _closing(http, transport), http

    async def _listen(self, modern: Client) -> None:
        """Refresh the listing when a 2026-07-28 server announces a change: such a server announces changes
        only on ``subscriptions/listen`` streams, never on its sessions. A lost stream is opened again
        (after a pause that doubles, up to :data:`MAX_BACKOFF`), and the listing refetched, since nothing
        is replayed."""
        backoff = INITIAL_BACKOFF
        while True:
            try:
                changes = modern.listen(tools_list_changed=True, prompts_list_changed=True, resources_list_changed=True)
                async with changes as events:
                    backoff = INITIAL_BACKOFF
                    async for _ in events:
                        self._refresh_wanted.set()
            except ListenNotSupportedError:
                return
            except (SubscriptionLost, MCPError, httpx2.HTTPError, TimeoutError, OSError) as exc:
                logger.info("upstream %s: its listen stream ended (%s); again in %.1fs", self.name, exc, backoff)
                self._probe.set()  # the server may be gone: the heartbeat asks now, not at its next beat
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            self._refresh_wanted.set()

    async def _heartbeat(self, client: Client, every: float | None) -> None:
        """Ping the server every ``every`` seconds, and at once when its listen stream ends: an HTTP server
        that went away while idle ends no stream the SDK watches (its GET stream reconnects on its own), so
        without this only the next call would notice. No answer (in the call timeout), a lost connection or
        an ended session (a restarted server answers 404) closes this connection, and the supervisor
        reconnects. ``every`` None: pings only when the listen stream ends."""
        while True:
            with anyio.move_on_after(math.inf if every is None else every):
                await self._probe.wait()
            self._probe = anyio.Event()
            try:
                with anyio.fail_after(self.config.timeout):
                    await client.session.send_ping()
            except TimeoutError:
                reason = f"no answer to a ping within {self.config.timeout:g}s"
            except MCPError as exc:
                if exc.error.code not in _GONE:
                    return  # it answered, with an error: it is there, and does not do pings (METHOD_NOT_FOUND)
                reason = f"a ping failed: {exc.error.message}"
            else:
                continue
            self._lost = reason  # the supervisor says it was lost, and why
            self._closed.set()
            return

    async def _refresher(self, client: Client) -> None:
        while True:
            await self._refresh_wanted.wait()
            self._refresh_wanted = anyio.Event()
            before = self.listing
            try:
                with anyio.fail_after(self.config.timeout):
                    self.listing = await self._fetch_listing(client)
                    self._param_headers = {}
            except (MCPError, TimeoutError, ValidationError) as exc:
                logger.warning("upstream %s: refreshing the listing failed: %s", self.name, exc)
                continue
            if self.listing != before:
                logger.info("upstream %s: its listing changed: %s", self.name, _counts(self.listing))
            await self._events.changed(self.name)

    async def _fetch_listing(self, client: Client) -> Listing:
        caps = client.server_capabilities
        tools: list[Tool] = []
        prompts: list[Prompt] = []
        resources: list[Resource] = []
        if caps.tools is not None:
            tools.extend(Tool(t["name"], t) for t in await self._list(client, "tools/list"))
        if caps.prompts is not None:
            prompts.extend(Prompt(p["name"], p) for p in await self._list(client, "prompts/list"))
        if caps.resources is not None:
            resources.extend(Resource(r["uri"], r) for r in await self._list(client, "resources/list"))
            templates = await self._list(client, "resources/templates/list")
            resources.extend(Resource(t["uriTemplate"], t, template=True) for t in templates)
        self._task_required = frozenset(t.name for t in tools if task_support(t.definition) == "required")
        return Listing(tuple(tools), tuple(prompts), tuple(resources))

    async def _list(self, client: Client, method: str) -> list[dict[str, Any]]:
        """Every item ``method`` lists; none when the server does not have the method.

        A server that declares a capability may still lack one of its list methods (servers on
        ``mcp`` 1.x often answer ``resources/templates/list`` with Method not found). Reconnecting
        would not make the method appear, so the server is served with what it has, and the method is
        not asked again on this connection (a ``list_changed`` refresh skips it): one warning each.

        Raises:
            MCPError: any other error answer, which fails this connection attempt as before.
        """
        if method in self._missing:
            return []
        try:
            return await _pages(client, method)
        except MCPError as exc:
            if exc.error.code != types.METHOD_NOT_FOUND:
                raise
        self._missing.add(method)
        logger.warning("upstream %s: %s", self.name, _lacking(method))
        return []

    # -- calls --------------------------------------------------------------------------------

    async def list_tools(self) -> Sequence[Tool]:
        return self.listing.tools

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        """Call ``name`` on the server.

        Raises:
            InvalidArguments: the arguments cannot be sent (a string holding a lone surrogate is not UTF-8):
                this call's error, checked before it reaches the shared connection, which a failed
                encoding would take down for every call on it.
            UpstreamError: see :meth:`_send`.
        """
        _check_encodable(name, arguments)
        await self._connected()
        params: dict[str, Any] = {"name": name, "arguments": dict(arguments)}
        meta = dict(context.meta or {})
        if context.task is not None or name in self._task_required:
            if meta:
                params["_meta"] = meta
            return await self._task_call(params, context)
        modern = self._modern_for(context)
        if modern and context.client is not None:
            meta[types.CLIENT_CAPABILITIES_META_KEY] = _without_tasks(context.client.capabilities)
            if context.log_level is not None:
                meta[types.LOG_LEVEL_META_KEY] = context.log_level
            if context.input_responses is not None:
                params["inputResponses"] = dict(context.input_responses)
            if context.request_state is not None:
                params["requestState"] = context.request_state
        if meta:
            params["_meta"] = meta

        raw = await self._on_a_session(lambda: self._call_on_the_session(params, context, modern=modern))
        if raw.get("resultType") == "input_required":
            return ToolResult(content=(), input_required=raw)
        return _result(raw)

    async def _call_on_the_session(
        self, params: dict[str, Any], context: CallContext, *, modern: bool
    ) -> dict[str, Any]:
        """``tools/call`` on the connection there is now, by the leanest way it offers; the raw result."""
        if not modern and self._caller is not None and self._client is not None:
            return await self._lean_call(self._caller, params, context)
        if modern and self._modern_caller is not None and not self._maps_param_headers(params["name"]):
            return await self._lean_modern_call(self._modern_caller, params, context)
        if self._stream_caller is not None and self._client is not None:
            return await self._stream_call(self._stream_caller, params, context)
        request = types.CallToolRequest(params=types.CallToolRequestParams.model_validate(params))
        return await self._send(request, context, modern=modern and self._modern is not None)

    async def _task_call(self, params: dict[str, Any], context: CallContext) -> ToolResult:
        """A call as a task of the server (2025-11-25, on the handshake session, where its tasks live).

        The client asked for a task (``context.task``): the result is the server's task, which the gateway
        gives the client under an id of its own (``gateway.upstream_tasks``). The client did not, and the
        tool requires one: the gateway runs it as a task and waits for its result, so that a client that
        knows nothing of tasks can use the tool too (the spec has the server refuse such a call with -32601;
        a gateway that can bridge it serves the client better). That wait has no bound of its own, as the
        work of a task is long by nature: each request in it has the server's timeout, and cancelling the
        call cancels the task.

        Raises:
            UpstreamError: see :meth:`_send`; the task failed with a JSON-RPC error (``UpstreamRefused``).
        """
        params["task"] = dict(context.task or {})
        request = types.Request[Any, Any].model_validate({"method": "tools/call", "params": params})
        raw = await self._on_a_session(lambda: self._send(request, context, unchecked=True))
        task = raw.get("task")
        if not isinstance(task, dict) or not isinstance(task.get("taskId"), str):
            return _result(raw)  # a server that ignored params.task ran the call as a plain one
        if context.task is not None:
            return ToolResult(content=(), task=task)
        task_id = task["taskId"]
        try:
            while task.get("status") not in TASK_ANSWERS_NOW:
                await anyio.sleep(task_poll_seconds(task))
                task = await self.request("tasks/get", {"taskId": task_id}, context)
            # Less the server's tie to a task the client knows nothing of (a server's task ids are never shown).
            return _result(tied_to_task(await self.request("tasks/result", {"taskId": task_id}, context), None))
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.timeout):
                try:
                    await self.request("tasks/cancel", {"taskId": task_id}, context)
                except UpstreamError as exc:  # it ended meanwhile, or the server is gone: nothing to cancel
                    logger.debug("upstream %s: cancelling task %s: %s", self.name, task_id, exc)
            raise

    async def _lean_call(
        self, caller: HttpCaller, params: dict[str, Any], context: CallContext, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """A call over the lean HTTP path; what the upstream asks mid-call goes to this call's client."""
        channel = context.client
        closed = self._closed  # this connection's: a later one must not be closed by this call's failure

        async def on_request(method: str, request_params: dict[str, Any]) -> dict[str, Any]:
            result = await self._ask_client(channel, method, request_params)
            if isinstance(result, types.ErrorData):
                raise CallRefused(result.code, result.message)
            return dict(result)

        token = self._track(context)
        try:
            # A bare deadline scope, not fail_after: its generator frames were ~8% of the gateway's profile.
            with anyio.CancelScope(deadline=anyio.current_time() + self.config.timeout):
                return await caller.call(
                    "tools/call",
                    params,
                    on_progress=context.progress,
                    on_log=channel.log if channel is not None else None,
                    on_request=on_request,
                    headers=headers,
                )
            raise self._timeout()  # reached only when the deadline cancelled the call
        except ReplyTooLarge as exc:
            raise ResultTooLarge(server=self.name, limit=self.max_result, size=exc.size) from None
        except SessionGone as exc:
            closed.set()
            if exc.unsent:
                raise _Unsent(str(exc)) from None
            raise UpstreamUnavailable(
                f"The connection to server {self.name!r} was lost during the call ({exc}); it is being reconnected.",
                server=self.name,
            ) from None
        except CallFailed as exc:
            raise UpstreamError(f"Server {self.name!r} answered with an error: {exc}", server=self.name) from None
        finally:
            self._inflight.pop(token, None)

    async def _lean_modern_call(
        self, caller: HttpCaller, params: dict[str, Any], context: CallContext
    ) -> dict[str, Any]:
        """A 2026-07-28 call over the lean HTTP path: the envelope and routing headers the SDK client would stamp
        (``_make_modern_stamp``), with the calling client's capabilities, already in ``params``."""
        modern = self._modern
        assert modern is not None
        meta = params["_meta"] = dict(params.get("_meta") or {})
        meta[types.PROTOCOL_VERSION_META_KEY] = modern.protocol_version
        meta[types.CLIENT_INFO_META_KEY] = _CLIENT_INFO_WIRE
        headers = {MCP_METHOD_HEADER: "tools/call", MCP_NAME_HEADER: encode_header_value(params["name"])}
        return await self._lean_call(caller, params, context, headers)

    async def _stream_call(self, caller: StreamCaller, params: dict[str, Any], context: CallContext) -> dict[str, Any]:
        """A call over stdio beside the SDK session; what the server asks or logs meanwhile reaches the session's
        handlers, which route it to the calls in flight."""
        closed = self._closed  # this connection's: a later one must not be closed by this call's failure
        token = self._track(context)
        try:
            with anyio.CancelScope(deadline=anyio.current_time() + self.config.timeout):
                raw = await caller.call("tools/call", params, on_progress=context.progress)
                if (size := reply_size(raw, self.max_result)) is not None:
                    raise ResultTooLarge(server=self.name, limit=self.max_result, size=size)
                return raw
            raise self._timeout()  # reached only when the deadline cancelled the call
        except StreamLost:
            closed.set()
            raise UpstreamUnavailable(
                f"The connection to server {self.name!r} closed during the call; it is being reconnected.",
                server=self.name,
            ) from None
        except StreamCallFailed as exc:
            message = f"Server {self.name!r} answered with an error: {exc}"
            raise UpstreamRefused(message, server=self.name, code=exc.code, data=exc.data) from None
        finally:
            self._inflight.pop(token, None)

    def _maps_param_headers(self, name: str) -> bool:
        found = self._param_headers.get(name)
        if found is None:
            tool = next((tool for tool in self.listing.tools if tool.name == name), None)
            schema = tool.definition.get("inputSchema") if tool is not None else None
            found = self._param_headers[name] = X_MCP_HEADER_KEY in json.dumps(schema)
        return found

    def _timeout(self) -> UpstreamTimeout:
        return UpstreamTimeout(
            f"Server {self.name!r} did not answer within {self.config.timeout:g}s; the request was cancelled.",
            server=self.name,
        )

    def _modern_for(self, context: CallContext) -> bool:
        """Whether this call goes over the 2026-07-28 session: its client speaks that era and so does the server."""
        client = context.client
        return self._modern is not None and client is not None and client.protocol_version in MODERN_PROTOCOL_VERSIONS

    async def request(self, method: str, params: JSONObject, context: CallContext) -> dict[str, Any]:
        """Forward a prompt, resource or completion request (wire form) on the shared session; the raw result.

        Raises:
            UpstreamUnavailable: not connected, or the connection died during the call.
            UpstreamTimeout: no answer in time (the upstream request is cancelled).
            UpstreamError: the server answered with a JSON-RPC error, or ``method`` is not one forwarded.
        """
        if method in _TASK_REQUESTS:
            task_request = types.Request[Any, Any].model_validate({"method": method, "params": dict(params)})
            await self._connected()
            return await self._on_a_session(lambda: self._send(task_request, context, unchecked=True))
        if method not in _REQUESTS:
            raise UpstreamError(f"patchbay does not forward {method} to server {self.name!r}", server=self.name)
        try:
            request = types.client_request_adapter.validate_python({"method": method, "params": dict(params)})
        except ValidationError as exc:
            raise UpstreamError(f"invalid {method} request for server {self.name!r}: {exc}", server=self.name) from None
        await self._connected()
        return await self._on_a_session(lambda: self._send(request, context))

    async def _connected(self) -> None:
        """Before a request: when the server is down, try to connect now rather than after the backoff, and
        wait for that one attempt (a restarted server serves this request instead of failing it). Attempts
        start at least :data:`INITIAL_BACKOFF` apart, so a server that is really gone costs a busy gateway two
        a second at most, and a request to it fails within that and one attempt (bounded by its timeout)."""
        if self.state is not ProviderState.UP:
            await self._connection_after(self.connects)

    async def _on_a_session(self, send: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """``send()``, and once more on a new session when the server no longer knew the one it was sent on.

        A 404 for the session id (a server restarted while idle, before a heartbeat noticed) means the
        request never reached the server, so sending it again cannot run it twice.

        Raises:
            UpstreamUnavailable: no new session within the call timeout, or that one was lost too.
            UpstreamError: as ``send`` raises.
        """
        seen = self.connects
        try:
            return await send()
        except _Unsent as exc:
            logger.info("upstream %s: %s; sending the request again on a new session", self.name, exc)
            gone = exc
        if not await self._connection_after(seen):
            raise UpstreamUnavailable(
                f"Server {self.name!r} no longer knew the session ({gone}) and could not be reconnected"
                f"{f' ({self.last_error})' if self.last_error else ''}; try again shortly.",
                server=self.name,
                retry_after=max(0.0, self._next_attempt - anyio.current_time()),
            )
        try:
            return await send()
        except _Unsent as exc:
            raise UpstreamUnavailable(
                f"Server {self.name!r} lost a new session at once ({exc}); it is being reconnected.", server=self.name
            ) from None

    async def _connection_after(self, seen: int) -> bool:
        """Whether a connection newer than the ``seen``-th is up, asking the supervisor to try now and waiting
        (at most the call timeout) for its attempt."""
        with anyio.move_on_after(self.config.timeout):
            while not (self.state is ProviderState.UP and self.connects > seen):
                attempted = self._attempted
                self._wake.set()
                await attempted.wait()
                if self.state is not ProviderState.UP:
                    return False
            return True
        return False

    async def _send(
        self, request: Any, context: CallContext, *, modern: bool = False, unchecked: bool = False
    ) -> dict[str, Any]:
        """Send one request on the shared session, within the server's timeout; the raw result (``unchecked``:
        not checked against the method's result type, which a task-augmented call's result is not).

        Raises:
            UpstreamUnavailable: not connected, or the connection died during the call.
            UpstreamTimeout: no answer in time (the upstream request is cancelled).
            ResultTooLarge: the reply is larger than ``max_result`` (the session stays up).
            UpstreamRefused: the server answered with a JSON-RPC error.
        """
        client = self._modern if modern else self._client
        closed = self._closed  # this connection's: a later one must not be closed by this call's failure
        if client is None:
            reason = f" ({self.last_error})" if self.last_error else ""
            raise UpstreamUnavailable(
                f"Server {self.name!r} is not connected{reason}; it is being reconnected in the background, "
                "try again shortly.",
                server=self.name,
                retry_after=max(0.0, self._next_attempt - anyio.current_time()),
            )
        # CallContext.progress is ``async (progress, total, message)``, the shape the SDK's ProgressFnT names.
        progress = cast(ProgressFnT | None, context.progress)
        token = self._track(context)
        try:
            with anyio.fail_after(self.config.timeout):
                if unchecked:
                    raw = await _send_unchecked(client, request, progress)
                else:
                    raw = cast(
                        dict[str, Any], await client.session.send_request(request, _RAW, progress_callback=progress)
                    )
        except TimeoutError:
            raise self._timeout() from None
        except MCPError as exc:
            if exc.error.code == types.CONNECTION_CLOSED and is_oversize(exc.error.message):  # the session is fine
                raise ResultTooLarge(server=self.name, limit=self.max_result) from None
            if exc.error.code == types.INVALID_REQUEST and exc.error.message == _SESSION_TERMINATED:
                closed.set()
                raise _Unsent(f"the server no longer knows this session: {exc.error.message}") from None
            if exc.error.code == types.CONNECTION_CLOSED:
                closed.set()
                raise UpstreamUnavailable(
                    f"The connection to server {self.name!r} closed during the call; it is being reconnected.",
                    server=self.name,
                ) from None
            message = f"Server {self.name!r} answered with an error: {exc.error.message}"
            raise UpstreamRefused(message, server=self.name, code=exc.error.code, data=exc.error.data) from exc
        finally:
            self._inflight.pop(token, None)
        # Over stdio, or as one JSON body, the SDK read the whole reply: it is measured now.
        if (size := reply_size(raw, self.max_result)) is not None:
            raise ResultTooLarge(server=self.name, limit=self.max_result, size=size)
        return raw

    def _track(self, context: CallContext) -> int:
        """Note the call's client as in flight, for server→client requests that arrive with no link to a call."""
        token = next(self._ids)
        if context.client is not None:
            self._inflight[token] = context.client
        return token

    # -- traffic from the upstream --------------------------------------------------------------

    async def _on_message(self, message: IncomingMessage) -> None:
        # Never await a request here: this runs on the session's receive loop.
        if not isinstance(message, types.ServerNotification):
            return
        if message.method.endswith("/list_changed"):
            self._refresh_wanted.set()
        elif isinstance(message, types.ResourceUpdatedNotification):
            await self._events.resource_updated(str(message.params.uri))

    def _sole_client(self) -> ClientChannel | None:
        channels = {id(c): c for c in self._inflight.values()}
        return next(iter(channels.values())) if len(channels) == 1 else None

    async def _on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        channel = self._sole_client()
        if channel is not None:
            await channel.log(params.model_dump(by_alias=True, mode="json", exclude_none=True))

    async def _forward(self, method: str, params: Any) -> JSONObject | types.ErrorData:
        """A server→client request on the shared session: to the client of the one call in flight."""
        channel = self._sole_client()
        if channel is None:
            reason = "calls of several clients are in flight" if self._inflight else "no call is in flight"
            return types.ErrorData(
                code=types.INVALID_REQUEST, message=f"patchbay cannot route {method}: {reason} on this server"
            )
        return await self._ask_client(channel, method, params.model_dump(by_alias=True, mode="json", exclude_none=True))

    async def _ask_client(
        self, channel: ClientChannel | None, method: str, params: JSONObject
    ) -> JSONObject | types.ErrorData:
        capability = _CAPABILITY.get(method)
        if channel is None or capability is None or capability not in channel.capabilities:
            return types.ErrorData(
                code=types.INVALID_REQUEST, message=f"the client behind patchbay does not support {method}"
            )
        try:
            return await channel.request(method, params)
        except ClientRefused as exc:  # the upstream gets the client's own error
            return types.ErrorData(code=exc.code, message=exc.reason, data=exc.data)
        except UpstreamError as exc:
            return types.ErrorData(code=types.INTERNAL_ERROR, message=str(exc))

    async def _on_sampling(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult | types.ErrorData:
        result = await self._forward("sampling/createMessage", params)
        return result if isinstance(result, types.ErrorData) else types.CreateMessageResult.model_validate(result)

    async def _on_elicitation(
        self, context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        result = await self._forward("elicitation/create", params)
        return result if isinstance(result, types.ErrorData) else types.ElicitResult.model_validate(result)


def _check_encodable(name: str, arguments: JSONObject) -> None:
    """Raise :class:`InvalidArguments` when ``arguments`` cannot be written as UTF-8 JSON.

    orjson refuses lone surrogates, and is fast enough to ask on every call; what else it refuses (integers
    beyond 64 bits) the transports write, so only a failure to encode as UTF-8 is this call's error."""
    try:
        orjson.dumps(arguments)
    except orjson.JSONEncodeError:
        try:
            json.dumps(arguments, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidArguments(
                f"The arguments of {name!r} cannot be sent: a string in them is not valid Unicode (a lone surrogate"
                " such as \\ud800); send valid UTF-8 text."
            ) from None


def _result(raw: dict[str, Any]) -> ToolResult:
    return ToolResult(
        content=raw.get("content") or (),
        structured_content=raw.get("structuredContent"),
        is_error=bool(raw.get("isError", False)),
        meta=raw.get("_meta"),
    )


def _without_tasks(capabilities: JSONObject) -> dict[str, Any]:
    """A client's capabilities without the tasks extension: a server must not answer it with a task on the
    2026-07-28 session, as the gateway passes tasks through on the handshake one (where the tools that
    require tasks are called as tasks)."""
    extensions = capabilities.get("extensions")
    if not isinstance(extensions, dict) or TASKS_EXTENSION not in extensions:
        return dict(capabilities)
    return {**capabilities, "extensions": {k: v for k, v in extensions.items() if k != TASKS_EXTENSION}}


async def _send_unchecked(client: Client, request: Any, progress: ProgressFnT | None) -> dict[str, Any]:
    """``send_request`` without checking the result against the method's result type: the SDK knows tasks as
    types only, and checks a ``tools/call`` result against ``CallToolResult``, which a ``CreateTaskResult`` is not.
    The session's stamp (protocol version header) is applied as ``send_request`` does."""
    session: Any = client.session
    data = request.model_dump(by_alias=True, mode="json", exclude_none=True)
    opts: dict[str, Any] = {}
    session._stamp(data, opts)
    if progress is not None:
        opts["on_progress"] = progress
    raw: dict[str, Any] = await session._dispatcher.send_raw_request(data["method"], data.get("params"), opts)
    return raw


def _lacking(method: str) -> str:
    return f"answers {method} with 'Method not found': served without {_LISTS[method][2]}"


async def _pages(client: Client, method: str) -> list[dict[str, Any]]:
    request_type, key, _ = _LISTS[method]
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(_PAGE_CAP):
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        raw = await client.session.send_request(request_type(params=params), _RAW)
        items.extend(raw.get(key) or ())
        cursor = raw.get("nextCursor")
        if not cursor:
            break
    return items


def _forward_client_capabilities(client: Client) -> None:
    """Let each request say its own client's capabilities instead of this session's.

    The SDK stamps the session's capabilities into every 2026-07-28 request;
    a gateway speaks for many clients, so a capability map already present in the
    request's ``_meta`` (the calling client's) is put back after the stamp.
    """
    session: Any = client.session
    stamp = session._stamp

    def stamp_keeping_callers(data: dict[str, Any], opts: Any) -> None:
        wanted = ((data.get("params") or {}).get("_meta") or {}).get(types.CLIENT_CAPABILITIES_META_KEY)
        stamp(data, opts)
        if wanted is not None:
            data["params"]["_meta"][types.CLIENT_CAPABILITIES_META_KEY] = wanted

    session._stamp = stamp_keeping_callers


@asynccontextmanager
async def _spawning(transport: Any, stderr: ServerStderr) -> AsyncIterator[tuple[Any, Any]]:
    """A stdio transport whose process writes to ``stderr``'s pipe; the gateway's copy of its write end is
    closed as soon as the process has its own, so the pipe ends when the process does."""
    async with transport as streams:
        stderr.spawned()
        yield streams


def _counts(listing: Listing) -> str:
    """``3 tools, 1 prompt, 0 resources``."""
    kinds = (("tool", listing.tools), ("prompt", listing.prompts), ("resource", listing.resources))
    return ", ".join(f"{len(items)} {kind}{'' if len(items) == 1 else 's'}" for kind, items in kinds)


@asynccontextmanager
async def _closing(http: httpx2.AsyncClient, transport: Any) -> AsyncIterator[tuple[Any, Any]]:
    async with http, transport as streams:
        yield streams


def _describe(exc: BaseException, timeout: float) -> str:
    """A one-line reason for a failed connection, digging through exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, MCPError):
        return f"protocol error: {exc.error.message}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not text.startswith(type(exc).__name__) else text
