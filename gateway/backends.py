"""The state the gateway keeps beside its providers, chosen from the ``gateway:`` section (DESIGN §6).

Rate-limit buckets and concurrency slots (``shared_state``), circuit-breaker state (``shared_state``
too) and the workflow run journal (``store``) are objects the gateway holds and hands to what uses
them: the composition root opens them first, in one place, and everything built after it is built
against their protocols. One process keeps them in memory; the implementations that let replicas
share them (Redis, SQLite, PostgreSQL) come in behind the same protocols, chosen here.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from gateway.config import Config
from gateway.store import Store
from gateway.store.memory import MemoryStore
from policies.state import BreakerState, LimitState, MemoryBreakerState, MemoryLimitState

__all__ = ["Backends", "memory_backends", "open_backends"]


@dataclass(frozen=True, slots=True)
class Backends:
    """Where the gateway's shared state lives."""

    limits: LimitState
    """Rate-limit buckets and concurrency slots."""
    breakers: BreakerState
    """Circuit-breaker state, per server."""
    store: Store
    """Workflow run journals, tasks, idempotency keys."""


def memory_backends() -> Backends:
    """Everything in this process's memory: what ``shared_state: memory`` gives."""
    return Backends(limits=MemoryLimitState(), breakers=MemoryBreakerState(), store=MemoryStore())


@asynccontextmanager
async def open_backends(config: Config) -> AsyncIterator[Backends]:
    """Open the backends ``config.gateway`` names, and close them on exit.

    The config accepts only what works today (``shared_state: memory``, a ``sqlite:///PATH`` store:
    :class:`~gateway.config.GatewaySettings`), so this is memory for now: runs are journaled in memory
    until the durable store lands (the next issue), and ``store`` is not yet used.
    """
    yield memory_backends()
