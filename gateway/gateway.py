"""The composition root: builds everything from a config and owns its lifetime.

The only module that knows every package: it opens the upstream connections,
keeps the registry current as they come and go, and builds the dispatcher.
"""

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from connectors.mcp import McpUpstream, State
from gateway.config import Config
from gateway.dispatch import Dispatcher
from gateway.errors import ConfigError, ConfigProblem
from gateway.registry import Naming, Registry, build_registry
from gateway.types import Provider

logger = logging.getLogger(__name__)

ChangeListener = Callable[[], Awaitable[None]]
UpdateListener = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    name: str
    state: str
    tools: int
    last_error: str | None


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
        self._listeners: list[ChangeListener] = []
        self._update_listeners: list[UpdateListener] = []
        self._started = False
        providers: dict[str, Provider] = dict(self.upstreams)
        self.dispatcher = Dispatcher(lambda: self.registry, providers)

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
            UpstreamStatus(name, up.state.value, counts.get(name, 0), up.last_error)
            for name, up in self.upstreams.items()
        ]

    @property
    def ready(self) -> bool:
        return all(up.state is State.UP for up in self.upstreams.values())

    def _rebuild(self) -> list[ConfigProblem]:
        listings = {name: up.listing for name, up in self.upstreams.items()}
        self.registry, problems = build_registry(listings, self._naming)
        for problem in problems:
            line = self.config.line_of(*problem.path.split("."))
            self.problems.append(ConfigProblem(problem.path, problem.message, line))
        return problems

    async def _upstream_changed(self, name: str) -> None:
        if not self._started:
            return  # the first registry is built once every upstream has had its first try
        self.problems = []
        for problem in self._rebuild():
            logger.error("%s", problem)
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
            async with anyio.create_task_group() as starters:
                for upstream in gateway.upstreams.values():
                    starters.start_soon(_start, tg, upstream)
            gateway._rebuild()
            if strict and gateway.problems:
                raise ConfigError(gateway.problems, source=config.source)
            gateway._started = True
            yield gateway
        finally:
            tg.cancel_scope.cancel()


async def _start(tg: Any, upstream: McpUpstream) -> None:
    await tg.start(upstream.run)
