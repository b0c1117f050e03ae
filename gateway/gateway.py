"""The composition root: builds everything from a config and owns its lifetime.

The only module that knows every package. It builds, in this order and each against its protocol:

1. the **state backends** (limit counters, breaker state, run journal: ``gateway.backends``);
2. the **providers**: one per ``servers:`` and ``connectors:`` entry, from the factory of the entry's kind
   (:data:`PROVIDER_KINDS`), any extra ones it is given, and the workflow provider with its runner;
3. the **registry**, rebuilt from the providers' listings whenever one changes;
4. the **policy chain** (``gateway.chain``), against the backends;
5. the **dispatcher**, from the registry, the providers and the chain.

Fallbacks and workflow steps call back into the dispatcher that is built from them: they are built
against a :class:`~gateway.dispatch.CallPath`, bound to the dispatcher once it exists (the one
place the knot is tied). Metrics and audit come first of all: everything reports to them.
"""

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from connectors.mcp import McpUpstream
from connectors.rest import RestConnector
from gateway.audit import JsonlAuditSink, audit_redactor
from gateway.backends import Backends, memory_backends, open_backends, temporal_queue
from gateway.chain import build_chain
from gateway.config import DEFAULT_MAX_RESULT, Config, ConnectorConfig, TemporalSettings, UpstreamConfig
from gateway.dispatch import Audit, CallPath, Dispatcher
from gateway.errors import ConfigError, ConfigProblem, GatewayError
from gateway.metrics import Metrics
from gateway.registry import Naming, Registry, build_registry, owner_by_prefix, prefix_head
from gateway.requeststate import StateSigner
from gateway.roundtrip import RoundTrips
from gateway.types import Principal, Provider, ProviderEvents, ProviderState
from gateway.workflows.plan import check_tools, unserved
from gateway.workflows.provider import WORKFLOW_PROVIDER, WorkflowProvider
from gateway.workflows.runner import Runner
from gateway.workflows.runs import Runs
from policies.retry import hinted_idempotent

if TYPE_CHECKING:
    from gateway.workflows.on_temporal import TemporalRuns
    from gateway.workflows.temporal_engine import TemporalEngine

__all__ = ["PROVIDER_KINDS", "Gateway", "ProviderFactory", "ProviderStatus", "open_gateway"]

logger = logging.getLogger(__name__)

ChangeListener = Callable[[], Awaitable[None]]
UpdateListener = Callable[[str], Awaitable[None]]

ProviderFactory = Callable[[str, UpstreamConfig], Provider]
"""Builds the provider of one ``servers:`` or ``connectors:`` entry: ``(name, entry) -> Provider``."""


def _built_in(name: str, entry: UpstreamConfig, *, max_result: int = DEFAULT_MAX_RESULT) -> Provider:
    if isinstance(entry, ConnectorConfig):
        return RestConnector(name, entry, max_result=max_result)
    return McpUpstream(name, entry, max_result=max_result)


PROVIDER_KINDS: Mapping[str, ProviderFactory] = dict.fromkeys(("stdio", "http", "rest"), _built_in)
"""The provider factory of each kind of entry (its ``kind``): MCP servers and REST connectors."""


def _built_in_kinds(max_result: int) -> Mapping[str, ProviderFactory]:
    return dict.fromkeys(PROVIDER_KINDS, partial(_built_in, max_result=max_result))


CLOSE_TIMEOUT = 5.0
"""Seconds the providers may take, all together, to close when the gateway stops."""


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    name: str
    state: str
    tools: int
    last_error: str | None
    warnings: tuple[str, ...] = ()
    """What the server lacks that is worked around, e.g. a list method it does not answer."""
    problems: tuple[ConfigProblem, ...] = ()
    """What is wrong in what it was configured with and left out (``Provider.problems``)."""


class Gateway:
    """A running gateway: its state backends, providers, current registry, policy chain and dispatcher."""

    def __init__(
        self,
        config: Config,
        *,
        backends: Backends | None = None,
        kinds: Mapping[str, ProviderFactory] = PROVIDER_KINDS,
        providers: Iterable[Provider] = (),
    ) -> None:
        """Assemble the gateway (nothing runs until :func:`open_gateway` starts the providers).

        ``providers`` are served beside the configured servers, named by their ``name`` (also their prefix).

        Raises:
            ConfigError: a server's kind has no factory in ``kinds``, or two providers share a name.
        """
        self.config = config
        if kinds is PROVIDER_KINDS:  # the built-in upstreams are held to the gateway's result limit
            kinds = _built_in_kinds(config.gateway.max_result)
        # 1. The state backends.
        self.backends = backends if backends is not None else memory_backends()
        # What everything below reports to, and the call path for calls made from inside calls.
        self.metrics = Metrics(known_tools=lambda name: name in self.registry.tools)
        self.audit_sink, audit = _audit(config, self.metrics)
        calls = CallPath()

        # 2. The providers.
        runner = Runner(calls.invoke, self.backends.store, metrics=self.metrics, catalog=self.tools_for)
        settings = config.gateway
        self.temporal = _temporal_engine(config, self.backends, calls)
        """With ``engine: temporal://…``: the engine workflow calls run on, whose workers this replica runs."""
        self.runs = Runs(
            runner,
            self.backends.store,
            config.plans,
            idempotency_ttl=settings.idempotency_ttl,
            keep_age=settings.keep_runs.age,
            keep_count=settings.keep_runs.count,
            metrics=self.metrics,
            temporal=_temporal_runs(self.temporal, self.metrics, runner),
        )
        """The workflow runs: started, attached to, resumed, looked up (tasks, ``patchbay runs``)."""
        redact = audit_redactor(config.audit).redact  # what a run's resource shows, redacted as the audit trail
        key = settings.state_key
        self.state_signer = StateSigner(key.get_secret_value().encode() if key is not None else None)
        """Mints and checks the ``requestState`` of calls held for a 2026-07-28 client's answers."""
        self.held_calls = RoundTrips(lambda: None, signer=self.state_signer, store=self.backends.store, name="server")
        """Upstream tool calls of 2026-07-28 clients held for their answers (the MCP frontends hold them here).
        Its retries, and the workflow runs', reaching another replica are relayed here (:meth:`start`)."""
        self.workflows = WorkflowProvider(
            config.plans, runner, runs=self.runs, redact=redact, signer=self.state_signer, store=self.backends.store
        )
        self.providers: Mapping[str, Provider] = _providers(config, kinds, providers, self.workflows)
        """Every provider by name: the workflows first (their names are taken before any server's), then the
        configured servers, then the extra providers."""

        # 3. The registry.
        self._naming = _naming(config, self.providers)
        self.registry = Registry()
        """The current snapshot: empty until every provider has had its first try, then rebuilt on each change."""
        self.problems: list[ConfigProblem] = []
        """What makes the gateway unfit to serve: name collisions, workflows calling what is not there."""
        self.pending_problems: list[ConfigProblem] = []
        """Workflow problems that may go away once every provider is up (their tools are not known yet)."""

        # 4. The policy chain.
        chain = build_chain(
            config,
            limits=self.backends.limits,
            breakers=self.backends.breakers,
            call_tool=calls.call_or_raise,
            on_circuit_change=lambda server, state: self.metrics.circuit_open(server, state == "open"),
            keys=self.backends.store,
            idempotency_ttl=settings.idempotency_ttl,
            own_idempotency=frozenset({WORKFLOW_PROVIDER}),
            cache=self.backends.store,
            max_result=settings.max_result,
            on_cache_hit=self.metrics.cache_hit,
        )
        self.access = chain.access
        if self.temporal is not None:
            self.temporal.callers.catalog = self.tools_for
        self.breakers = chain.breakers
        """The circuit breakers, whose states :meth:`refresh_circuits` reports."""
        if self.backends.shared is not None:
            self.backends.shared.on_failure = self.metrics.shared_state_failure
        """Which tools each caller may see (``tools/list``)."""

        # 5. The dispatcher; from now on, calls made from inside calls reach it.
        self.dispatcher = Dispatcher(
            lambda: self.registry, self.providers, chain.policies, metrics=self.metrics, audit=audit
        )
        calls.bind(self.dispatcher)

        self.events = ProviderEvents(changed=self._provider_changed, resource_updated=self._resource_updated)
        """What the providers tell this gateway while they run."""
        self._listeners: list[ChangeListener] = []
        self._update_listeners: list[UpdateListener] = []
        self._started = False

    def tools_for(self, principal: Principal) -> list[Mapping[str, Any]]:
        """The tools ``tools/list`` shows ``principal`` (their definitions): what an ``agent`` step may offer."""
        access = self.access
        return [entry.tool.definition for name, entry in self.registry.tools.items() if access.visible(principal, name)]

    def on_change(self, listener: ChangeListener) -> None:
        """Call ``listener`` whenever the registry changes (to tell connected clients)."""
        self._listeners.append(listener)

    def on_resource_updated(self, listener: UpdateListener) -> None:
        """Call ``listener(uri)`` when an upstream reports that a subscribed resource changed."""
        self._update_listeners.append(listener)

    async def _resource_updated(self, uri: str) -> None:
        for listener in self._update_listeners:
            await listener(uri)

    def status(self) -> list[ProviderStatus]:
        """Each provider's state, tool count and last error, in provider order."""
        counts: dict[str, int] = {}
        for entry in self.registry.tools.values():
            counts[entry.provider] = counts.get(entry.provider, 0) + 1
        return [
            ProviderStatus(
                name,
                provider.state.value,
                counts.get(name, 0),
                provider.last_error,
                provider.warnings,
                provider.problems,
            )
            for name, provider in self.providers.items()
        ]

    @property
    def ready(self) -> bool:
        """Whether every provider is up."""
        return all(provider.state is ProviderState.UP for provider in self.providers.values())

    async def start(self, tg: TaskGroup, *, strict: bool = True, resume: bool = False) -> None:
        """Start the audit writer and every provider (concurrently, in ``tg``), then build the first registry,
        then the workflow runs' background work (with ``resume``, interrupted runs are taken up).

        Returns once every provider has had its first try; those that failed keep retrying in ``tg``.

        Raises:
            ConfigError: the audit log cannot be written, or (with ``strict``) the registry has collisions
                or workflow problems.
        """
        if self.audit_sink is not None:
            try:
                await tg.start(self.audit_sink.run)
            except OSError as exc:
                line = self.config.line_of("audit")
                problem = ConfigProblem("audit.path", f"cannot write the audit log: {exc}", line)
                raise ConfigError([problem], source=self.config.source) from exc
        async with anyio.create_task_group() as starters:
            for provider in self.providers.values():
                starters.start_soon(_start, tg, provider, self.events)
        self._rebuild()
        if strict and self.problems:
            raise ConfigError(self.problems, source=self.config.source)
        await tg.start(partial(self.runs.run, resume=resume))
        # Retries of the calls held here that reach another replica come back through the store (gateway.roundtrip).
        for held in (self.held_calls, self.workflows.round_trips):
            await tg.start(held.serve_relays)
        self._started = True

    async def refresh_circuits(self) -> None:
        """Set ``patchbay_circuit_open`` from the circuits' states as they are now, wherever they changed: on
        another replica sharing them, or open → half-open by time alone. A state that cannot be read (Redis
        away under ``shared_state_failure: deny``) keeps its last value."""
        for server in self.breakers.servers:
            try:
                state = await self.breakers.state(server)
            except GatewayError:
                continue
            self.metrics.circuit_open(server, state == "open")

    async def close(self) -> None:
        """Close every provider (each returns at once; bounded by :data:`CLOSE_TIMEOUT` all the same)."""
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await self.runs.close()  # first: its runs are left to resume, not compensated as cancelled
            for provider in self.providers.values():
                await provider.close()

    def _rebuild(self) -> list[ConfigProblem]:
        for name, provider in self.providers.items():
            self.metrics.upstream_up(name, provider.state is ProviderState.UP)
        listings = {name: provider.listing for name, provider in self.providers.items()}
        self.registry, problems = build_registry(listings, self._naming)
        problems += self._uncacheable()
        schemas = {name: entry.tool.input_schema for name, entry in self.registry.tools.items()}
        calls = check_tools(self.config.plans, schemas, self._unreachable) + self._unknown_fallbacks()
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
            unserved(
                f"{self.config.section_of(server)}.{server}.fallback.{glob}",
                f"no tool {target!r} is served to fall back to",
                target,
                self.registry.tools,
                self._unreachable,
            )
            for server, settings in self.config.upstreams.items()
            for glob, target in settings.fallback.items()
            if target not in self.registry.tools
        ]

    def _uncacheable(self) -> list[ConfigProblem]:
        """Served tools that a server's ``cache:`` names and that are neither read-only nor idempotent: a kept result
        of such a tool would answer for an effect that did not happen (known once the server lists its tools)."""
        problems = []
        for name, entry in self.registry.tools.items():
            settings = self.config.upstreams.get(entry.provider)
            if settings is None or settings.cache is None:
                continue
            globs = [i for i, glob in enumerate(settings.cache.tools) if fnmatchcase(entry.target, glob)]
            idempotent = any(fnmatchcase(entry.target, glob) for glob in settings.tools.idempotent)
            if not globs or idempotent or hinted_idempotent(entry.tool.definition):
                continue
            where = f"{self.config.section_of(entry.provider)}.{entry.provider}.cache.tools[{globs[0]}]"
            message = (
                f"the cache would keep the results of {entry.target!r} (served as {name!r}), which is neither "
                "read-only nor idempotent: only tools with readOnlyHint or idempotentHint, or listed in "
                "tools.idempotent, may be cached"
            )
            problems.append(ConfigProblem(where, message))
        return problems

    def _unreachable(self, tool: str) -> str | None:
        """Where the provider that would serve ``tool`` is configured (``servers.crm``), when it is not up: the
        one whose prefix the name starts with (the longest), else one without a prefix; None when it is up."""
        heads = {name: prefix_head(naming.prefix, naming.separator) for name, naming in self._naming.items()}
        owner = owner_by_prefix(heads, tool)
        candidates = [owner] if owner is not None else [name for name, head in heads.items() if not head]
        for name in candidates:
            if self.providers[name].state is not ProviderState.UP:
                return f"{self.config.section_of(name)}.{name}"
        return None

    def _located(self, problem: ConfigProblem) -> ConfigProblem:
        return replace(problem, line=self.config.line_at(problem.path))

    async def _provider_changed(self, name: str) -> None:
        if not self._started:
            return  # the first registry is built once every provider has had its first try
        self.problems = []
        for problem in self._rebuild():
            logger.error("%s", problem)
        for problem in self.pending_problems:
            logger.warning("%s (until every server is up)", problem)
        for listener in self._listeners:
            await listener()


@asynccontextmanager
async def open_gateway(
    config: Config,
    *,
    strict: bool = True,
    kinds: Mapping[str, ProviderFactory] = PROVIDER_KINDS,
    providers: Iterable[Provider] = (),
    resume: bool = False,
) -> AsyncIterator[Gateway]:
    """Open the state backends, start every provider concurrently (each within its timeout) and yield
    the running gateway; ``kinds`` and ``providers`` are :class:`Gateway`'s. With ``resume`` (what
    ``serve`` passes for ``gateway.resume: auto``), interrupted workflow runs are taken up.

    Providers that fail to start are reported and retried in the background.

    Raises:
        ConfigError: a provider kind is unknown, or the merged registry has collisions (with ``strict``),
            so the gateway must not start.
    """
    failure: ConfigError | None = None
    async with open_backends(config) as backends:
        gateway = Gateway(config, backends=backends, kinds=kinds, providers=providers)
        async with anyio.create_task_group() as tg:
            try:
                try:
                    await gateway.start(tg, strict=strict, resume=resume)
                except ConfigError as exc:
                    failure = exc  # raised below, as itself rather than inside the task group's exception group
                else:
                    # This replica's Temporal workers run while it serves; they stop first on the way out
                    # (their steps in flight are made again by another replica's workers).
                    async with gateway.temporal.serve() if gateway.temporal is not None else nullcontext():
                        yield gateway
            finally:
                await gateway.close()
                tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _start(tg: TaskGroup, provider: Provider, events: ProviderEvents) -> None:
    await tg.start(provider.run, events)


def _temporal_engine(config: Config, backends: Backends, calls: CallPath) -> "TemporalEngine | None":
    """The Temporal engine of ``engine: temporal://…`` (its steps' calls through ``calls``), else None."""
    if backends.temporal is None:
        return None
    from gateway.workflows.on_temporal import step_executor  # the Temporal SDK only where it is used
    from gateway.workflows.temporal_engine import TemporalEngine

    settings = config.gateway
    temporal = settings.temporal if settings.temporal is not None else TemporalSettings()
    execute = step_executor(calls.invoke)
    queue = temporal_queue(settings)
    return TemporalEngine(backends.temporal, queue, config.plans, execute, silence=temporal.takeover_after)


def _temporal_runs(engine: "TemporalEngine | None", metrics: Metrics, runner: Runner) -> "TemporalRuns | None":
    if engine is None:
        return None
    from gateway.workflows.on_temporal import TemporalRuns

    return TemporalRuns(engine, metrics=metrics, stopping=lambda: runner.stopping)


def _audit(config: Config, metrics: Metrics) -> tuple[JsonlAuditSink | None, Audit | None]:
    """The audit writer the config asks for (not yet running), and the dispatcher's view of it."""
    audit = config.audit
    if audit.path is None:
        return None, None
    sink = JsonlAuditSink(
        audit.path,
        buffer=audit.buffer,
        on_drop=metrics.audit_dropped,
        max_record=audit.max_record,
        rotate_size=audit.rotate_size,
        keep=audit.keep,
    )
    return sink, Audit(sink, audit_redactor(audit))


def _providers(
    config: Config, kinds: Mapping[str, ProviderFactory], extra: Iterable[Provider], workflows: Provider
) -> dict[str, Provider]:
    """Every provider by name: the workflows, one per ``servers:`` and ``connectors:`` entry (built by its kind's
    factory), the extra ones.

    Raises:
        ConfigError: an entry's kind has no factory, or a name is taken twice.
    """
    providers: dict[str, Provider] = {workflows.name: workflows}
    problems: list[ConfigProblem] = []
    for name, entry in config.upstreams.items():
        factory = kinds.get(entry.kind)
        if factory is None:
            section = config.section_of(name)
            message = f"no provider for {section} of kind {entry.kind!r} (known: {', '.join(sorted(kinds))})"
            problems.append(ConfigProblem(f"{section}.{name}", message, config.line_of(section, name)))
            continue
        providers[name] = factory(name, entry)
    for provider in extra:
        if provider.name in providers:
            message = f"a provider named {provider.name!r} is served already"
            problems.append(
                ConfigProblem(f"servers.{provider.name}", message, config.line_of("servers", provider.name))
            )
            continue
        providers[provider.name] = provider
    if problems:
        raise ConfigError(problems, source=config.source)
    return providers


def _naming(config: Config, providers: Iterable[str]) -> dict[str, Naming]:
    """How each provider's names appear: a server's as configured, the workflows' unchanged, others under their name."""
    separator = config.gateway.separator
    naming: dict[str, Naming] = {}
    for name in providers:
        server = config.upstreams.get(name)
        if name == WORKFLOW_PROVIDER:
            naming[name] = Naming(prefix="", separator=separator, owner="a workflow")
        elif server is None:
            naming[name] = Naming(prefix=name, separator=separator)
        else:
            naming[name] = Naming(
                prefix=name if server.prefix is None else server.prefix,
                separator=separator,
                # A connector applies its own filter, which may name tags (``tag:billing``).
                include=("*",) if isinstance(server, ConnectorConfig) else tuple(server.tools.include),
                exclude=() if isinstance(server, ConnectorConfig) else tuple(server.tools.exclude),
                rename=server.tools.rename,
                descriptions=server.tools.descriptions,
            )
    return naming
