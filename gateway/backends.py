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
from gateway.errors import ConfigError, ConfigProblem
from gateway.workflows.journal import Journal, MemoryJournal
from policies.state import BreakerState, LimitState, MemoryBreakerState, MemoryLimitState

__all__ = ["Backends", "memory_backends", "open_backends"]

_MEMORY = "memory"
_SQLITE = "sqlite:///"


@dataclass(frozen=True, slots=True)
class Backends:
    """Where the gateway's shared state lives."""

    limits: LimitState
    """Rate-limit buckets and concurrency slots."""
    breakers: BreakerState
    """Circuit-breaker state, per server."""
    journal: Journal
    """The workflow run journal."""


def memory_backends() -> Backends:
    """Everything in this process's memory: what ``shared_state: memory`` gives."""
    return Backends(limits=MemoryLimitState(), breakers=MemoryBreakerState(), journal=MemoryJournal())


@asynccontextmanager
async def open_backends(config: Config) -> AsyncIterator[Backends]:
    """Open the backends ``config.gateway`` names, and close them on exit.

    ``store`` is a SQLite URL, but runs are journaled in memory until the durable store lands
    (the next issue): it is accepted and not yet used.

    Raises:
        ConfigError: ``shared_state`` or ``store`` names a backend this gateway does not have.
    """
    settings = config.gateway
    problems: list[ConfigProblem] = []
    if settings.shared_state != _MEMORY:
        problems.append(_unsupported(config, "shared_state", settings.shared_state, "`memory`"))
    if not settings.store.startswith(_SQLITE):
        problems.append(_unsupported(config, "store", settings.store, "a `sqlite:///PATH` URL"))
    if problems:
        raise ConfigError(problems, source=config.source)
    yield memory_backends()


def _unsupported(config: Config, key: str, value: str, supported: str) -> ConfigProblem:
    scheme, sep, _ = value.partition("://")
    shown = f"`{scheme}://…`" if sep else repr(value)  # a URL only by its scheme: the rest may hold a password
    message = f"{shown} is not supported: {key} must be {supported}"
    return ConfigProblem(f"gateway.{key}", message, config.line_of("gateway", key))
