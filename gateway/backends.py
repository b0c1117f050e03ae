"""The state the gateway keeps beside its providers, chosen from the ``gateway:`` section (DESIGN §6).

Rate-limit buckets and concurrency slots (``shared_state``), circuit-breaker state (``shared_state``
too) and the store of workflow runs and idempotency keys (``store``) are objects the gateway holds and
hands to what uses them: the composition root opens them first, in one place, and everything built
after it is built against their protocols. One process keeps limits in memory; replicas share them on
Redis (``policies.redis_state``), behind the same protocols, chosen here.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from gateway.config import Config, GatewaySettings, TemporalSettings
from gateway.errors import EngineUnavailable
from gateway.store import Store, open_store
from gateway.store.memory import MemoryStore
from policies.redis_state import RedisState, open_redis_state
from policies.state import BreakerState, LimitState, MemoryBreakerState, MemoryLimitState

if TYPE_CHECKING:
    from temporalio.client import Client

__all__ = ["Backends", "connect_temporal", "memory_backends", "open_backends", "temporal_queue"]


@dataclass(frozen=True, slots=True)
class Backends:
    """Where the gateway's shared state lives."""

    limits: LimitState
    """Rate-limit buckets and concurrency slots."""
    breakers: BreakerState
    """Circuit-breaker state, per server."""
    store: Store
    """Workflow runs (their journals and records) and idempotency keys."""
    shared: RedisState | None = None
    """The Redis behind ``limits`` and ``breakers``, when they are shared; None: they are in memory."""
    temporal: "Client | None" = None
    """The Temporal client of ``engine: temporal://…`` (connected to its namespace); None: runs are local."""


def memory_backends() -> Backends:
    """Everything in this process's memory: what ``shared_state: memory`` and ``store: memory`` give."""
    return Backends(limits=MemoryLimitState(), breakers=MemoryBreakerState(), store=MemoryStore())


@asynccontextmanager
async def open_backends(config: Config) -> AsyncIterator[Backends]:
    """Open the backends ``config.gateway`` names, and close them on exit (the store commits what it holds).

    Limits and breakers are in memory, or on the Redis ``shared_state`` names (nothing is sent to it
    here: a Redis that is down at start is handled as ``shared_state_failure`` says, call by call); the
    store is the one ``gateway.store`` names, created and migrated as it opens.

    With ``engine: temporal://…``, a client of that Temporal cluster.

    Raises:
        StoreError: the store cannot be opened, or its schema is newer than this Patchbay knows.
        EngineUnavailable: the Temporal cluster cannot be reached.
    """
    settings = config.gateway
    temporal = await connect_temporal(settings)
    async with open_store(settings.store, durability=settings.durability) as store:
        if settings.shared_state == "memory":
            yield Backends(limits=MemoryLimitState(), breakers=MemoryBreakerState(), store=store, temporal=temporal)
            return
        prefix, failure = f"patchbay:{settings.name}:", settings.shared_state_failure
        async with open_redis_state(settings.shared_state, prefix=prefix, failure=failure) as redis:
            limits, breakers = redis.limits, redis.breakers
            yield Backends(limits=limits, breakers=breakers, store=store, shared=redis, temporal=temporal)


def temporal_queue(settings: GatewaySettings) -> str:
    """The stem of the task queues of this gateway's runs on Temporal (``temporal.task_queue``; by default
    ``patchbay.<gateway name>``): what its replicas share, and what tells its runs from other gateways'."""
    temporal = settings.temporal if settings.temporal is not None else TemporalSettings()
    return temporal.task_queue or f"patchbay.{settings.name}"


async def connect_temporal(settings: GatewaySettings) -> "Client | None":
    """A client of the Temporal cluster ``settings.engine`` names, in its namespace; None for the local engine.

    Raises:
        EngineUnavailable: the cluster cannot be reached (or has no such namespace).
    """
    if not settings.engine.startswith("temporal://"):
        return None
    from temporalio.client import Client  # imported here: a local gateway never loads the Temporal SDK

    target = urlsplit(settings.engine).netloc
    namespace = settings.temporal.namespace if settings.temporal is not None else "default"
    try:
        return await Client.connect(target, namespace=namespace)
    except Exception as exc:  # the SDK raises RuntimeError for an unreachable server, RPCError for the rest
        raise EngineUnavailable(f"cannot reach Temporal at {target} (namespace {namespace!r}): {exc}") from exc
