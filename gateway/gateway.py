"""The composition root: builds everything from a config and owns its lifetime.

The only module that knows every package: it opens the upstream connections,
keeps the registry current as they come and go, and builds the dispatcher.
"""

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import anyio
from anyio.abc import TaskGroup

from connectors.mcp import McpUpstream, State
from gateway.audit import JsonlAuditSink
from gateway.chain import build_chain
from gateway.config import Config
from gateway.dispatch import Audit, Dispatcher
from gateway.errors import ConfigError, ConfigProblem
from gateway.metrics import Metrics
from gateway.registry import Entry, Naming, Registry, build_registry
from gateway.types import Provider
from gateway.workflows.journal import MemoryJournal
from gateway.workflows.plan import check_tools
from gateway.workflows.provider import WORKFLOW_PROVIDER, WorkflowProvider
from gateway.workflows.runner import Runner
from policies.redaction import DEFAULT_KEYS, Redactor
from policies.state import MemoryBreakerState, MemoryLimitState

logger = logging.getLogger(__name__)

ChangeListener = Callable[[], Awaitable[None]]
UpdateListener = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    name: str
    state: str
    tools: int
    last_error: str | None
    warnings: tuple[str, ...] = ()
    """What the server lacks that is worked around, e.g. a list method it does not answer."""


class Gateway:
    """A running gateway: upstreams, the current registry, the dispatcher."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.upstreams: dict[str, McpUpstream] = {
            name: McpUpstream(name, server, on_change=self._upstream_changed, on_updated=self._resource_updated)
            for name, server in config.servers.items()
        }
        self._naming = {
            name: Naming(
                prefix=name if server.prefix is None else server.prefix,
                separator=config.gateway.separator,
                include=tuple(server.tools.include),
                exclude=tuple(server.tools.exclude),
                rename=server.tools.rename,
                descriptions=server.tools.descriptions,
            )
            for name, server in config.servers.items()
        }
        self.registry = Registry()
        self.problems: list[ConfigProblem] = []
        """What makes the gateway unfit to serve: name collisions, workflows calling what is not there."""
        self.pending_problems: list[ConfigProblem] = []
        """Workflow problems that may go away once every upstream is up (their tools are not known yet)."""
        self._listeners: list[ChangeListener] = []
        self._update_listeners: list[UpdateListener] = []
        self._started = False
        providers: dict[str, Provider] = dict(self.upstreams)
        self.metrics = Metrics(known_tools=lambda name: name in self.registry.tools)
        self.audit_sink: JsonlAuditSink | None = None
        audit: Audit | None = None
        if config.audit.path is not None:
            self.audit_sink = JsonlAuditSink(
                config.audit.path, buffer=config.audit.buffer, on_drop=self.metrics.audit_dropped
            )
            redactor = Redactor((*DEFAULT_KEYS, *config.audit.redact_keys), config.audit.redact_patterns)
            audit = Audit(self.audit_sink, redactor)
        self.dispatcher = Dispatcher(lambda: self.registry, providers, metrics=self.metrics, audit=audit)
        chain = build_chain(
            config,
            limits=MemoryLimitState(),
            breakers=MemoryBreakerState(),
            call_tool=self.dispatcher.call_or_raise,
            on_circuit_change=lambda server, state: self.metrics.circuit_open(server, state == "open"),
        )
        self.dispatcher.use(chain.policies)
        self.access = chain.access
        """Which tools each caller may see (``tools/list``)."""
        self.journal = MemoryJournal()
        self._background: TaskGroup | None = None
        runner = Runner(self.dispatcher.invoke, self.journal, metrics=self.metrics)
        self.workflows = WorkflowProvider(config.plans, runner, background=lambda: self._background)
        providers[WORKFLOW_PROVIDER] = self.workflows

    def on_change(self, listener: ChangeListener) -> None:
        """Call ``listener`` whenever the registry changes (to tell connected clients)."""
        self._listeners.append(listener)

    def on_resource_updated(self, listener: UpdateListener) -> None:
        """Call ``listener(uri)`` when an upstream reports that a subscribed resource changed."""
        self._update_listeners.append(listener)

    async def _resource_updated(self, uri: str) -> None:
        for listener in self._update_listeners:
            await listener(uri)

    def status(self) -> list[UpstreamStatus]:
        counts: dict[str, int] = {}
        for entry in self.registry.tools.values():
            counts[entry.provider] = counts.get(entry.provider, 0) + 1
        return [
            UpstreamStatus(name, up.state.value, counts.get(name, 0), up.last_error, up.warnings)
            for name, up in self.upstreams.items()
        ]

    @property
    def ready(self) -> bool:
        return all(up.state is State.UP for up in self.upstreams.values())

    def _rebuild(self) -> list[ConfigProblem]:
        for name, upstream in self.upstreams.items():
            self.metrics.upstream_up(name, upstream.state is State.UP)
        listings = {name: up.listing for name, up in self.upstreams.items()}
        registry, problems = build_registry(listings, self._naming, reserved=self.config.plans)
        workflow_tools = {tool.name: Entry(WORKFLOW_PROVIDER, tool.name, tool) for tool in self.workflows.tools}
        self.registry = replace(registry, tools={**registry.tools, **workflow_tools})
        schemas = {name: entry.tool.input_schema for name, entry in self.registry.tools.items()}
        calls = check_tools(self.config.plans, schemas) + self._unknown_fallbacks()
        if self.ready:
            problems += calls
            self.pending_problems = []
        else:
            self.pending_problems = [self._located(p) for p in calls]
        located = [self._located(problem) for problem in problems]
        self.problems.extend(located)
        return located

    def _unknown_fallbacks(self) -> list[ConfigProblem]:
        """Fallback routes to tools that are not served (checked like a workflow's calls)."""
        return [
            ConfigProblem(f"servers.{server}.fallback.{glob}", f"no tool {target!r} is served to fall back to")
            for server, settings in self.config.servers.items()
            for glob, target in settings.fallback.items()
            if target not in self.registry.tools
        ]

    def _located(self, problem: ConfigProblem) -> ConfigProblem:
        return ConfigProblem(problem.path, problem.message, self.config.line_at(problem.path))

    async def _upstream_changed(self, name: str) -> None:
        if not self._started:
            return  # the first registry is built once every upstream has had its first try
        self.problems = []
        for problem in self._rebuild():
            logger.error("%s", problem)
        for problem in self.pending_problems:
            logger.warning("%s (until every server is up)", problem)
        for listener in self._listeners:
            await listener()


@asynccontextmanager
async def open_gateway(config: Config, *, strict: bool = True) -> AsyncIterator[Gateway]:
    """Connect every upstream concurrently (each within its timeout) and yield the running gateway.

    Upstreams that fail to start are reported and retried in the background.

    Raises:
        ConfigError: the merged registry has collisions (with ``strict``), so the gateway must not start.
    """
    gateway = Gateway(config)
    async with anyio.create_task_group() as tg:
        try:
            if gateway.audit_sink is not None:
                try:
                    await tg.start(gateway.audit_sink.run)
                except OSError as exc:
                    problem = ConfigProblem("audit.path", f"cannot write the audit log: {exc}", config.line_of("audit"))
                    raise ConfigError([problem], source=config.source) from exc
            async with anyio.create_task_group() as starters:
                for upstream in gateway.upstreams.values():
                    starters.start_soon(_start, tg, upstream)
            gateway._rebuild()
            if strict and gateway.problems:
                raise ConfigError(gateway.problems, source=config.source)
            gateway._started = True
            gateway._background = tg
            yield gateway
        finally:
            tg.cancel_scope.cancel()


async def _start(tg: Any, upstream: McpUpstream) -> None:
    await tg.start(upstream.run)
