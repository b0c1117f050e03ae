"""Durable records: workflow run journals, run history, tasks and idempotency keys (DESIGN §4, §6).

One interface, :class:`Store`, and its implementations, chosen by ``gateway.store``:

* ``memory`` (:class:`~gateway.store.memory.MemoryStore`): this process's memory, lost with it;
* ``sqlite:///PATH`` (:mod:`gateway.store.sqlite`): one file, WAL mode, written from a worker thread;
* ``postgresql://…`` (:mod:`gateway.store.postgres`): a database server that several replicas share.

The journal part is what :class:`~gateway.workflows.runner.Runner` writes: :meth:`Store.record`
buffers an event (in order), :meth:`Store.commit` makes everything recorded so far durable, and the
commits of concurrent callers share one transaction (group commit). Each run also has a
:class:`RunRecord`, kept up to date from its events by :func:`fold` in the same transaction, which is
what ``patchbay runs``, tasks and resume read. A run is owned by the gateway instance that writes
it (that recorded its ``run_started``, or claimed it since); a ``running`` run whose owner is gone
reads as ``interrupted`` until another instance :meth:`Store.claim` s it. How an owner is known to
be gone is each store's (a lock the process holds while it lives, in SQLite and PostgreSQL), and
:meth:`Store.heartbeat` renews whatever a store needs renewed.

Replicas also pass each other the retries of held calls (:class:`Relay`, ``gateway.roundtrip``): the
replica a 2026-07-28 client's retry reaches puts it in the store (:meth:`Store.relay_put`), the one
holding the call takes it (:meth:`Store.relay_take`) and answers it (:meth:`Store.relay_answer`), and
the first reads the answer (:meth:`Store.relay_answer_of`).

A server's ``cache:`` keeps its tools' last good results here (:meth:`Store.cache_put`,
:meth:`Store.cache_get`), so that every replica sharing the store can answer from them.

:func:`open_store` opens the store a URL names, creating and migrating its schema.
"""

import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from gateway.errors import StoreError
from gateway.workflows.journal import JournalEvent

__all__ = [
    "FOLDED_KINDS",
    "CacheEntry",
    "Durability",
    "IdempotencyEntry",
    "Relay",
    "RunQuery",
    "RunRecord",
    "RunStatus",
    "Store",
    "StoreError",
    "fold",
    "open_store",
]

Durability = Literal["process", "machine"]
"""Which crash a commit survives: the gateway process being killed, or the machine being lost (an OS
crash, a power loss). Each SQL store's module says what each costs there."""

RunStatus = Literal["running", "succeeded", "failed", "cancelled", "interrupted"]


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run at a glance: what its events say so far."""

    run_id: str
    workflow: str
    status: RunStatus
    """``running`` while its owner lives; ``interrupted`` when the owner is gone mid-run (read, never stored)."""
    started_at: float
    """Wall-clock seconds since the epoch."""
    caller_kind: str = ""
    caller_id: str = ""
    plan: str | None = None
    """The digest of the plan it was started with."""
    steps: int = 0
    """Steps settled so far."""
    failed_step: str | None = None
    """The key of the first step that settled ``failed``."""
    finished_at: float | None = None
    duration_ms: float | None = None
    error: str | None = None
    """The run's error message, once failed or cancelled."""
    result: Mapping[str, Any] | None = None
    """The ``CallToolResult`` (wire form) the run returned, once finished."""
    task: Mapping[str, Any] | None = None
    """When the run was started as an MCP task: the task's parameters (``ttl``…), else None."""
    idempotency_key: str | None = None
    """The caller's ``io.patchbay/idempotency-key``, if the call carried one."""
    owner: str | None = None
    """The gateway instance that runs it (:attr:`Store.instance`)."""
    note: str | None = None
    """Why an interrupted run is not resumed (its workflow changed since), if it is not."""
    updated_at: float = 0.0
    """When its last event was recorded."""


@dataclass(frozen=True, slots=True)
class RunQuery:
    """Which runs :meth:`Store.runs` returns, most recent first."""

    workflow: str | None = None
    status: RunStatus | None = None
    since: float | None = None
    """Runs started at or after this wall-clock time."""
    caller: tuple[str, str] | None = None
    """``(kind, id)`` of the caller whose runs to list."""
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class IdempotencyEntry:
    """A client's idempotency key, as the store holds it."""

    scope: str
    """Whose key it is: the caller, as ``<kind>:<id>``."""
    key: str
    tool: str
    """The tool the first call with this key called."""
    created_at: float
    expires_at: float
    run_id: str | None = None
    """The workflow run the first call started, if it called a workflow."""
    result: Mapping[str, Any] | None = None
    """The first call's ``CallToolResult`` (wire form), once it has one; None while it is under way."""
    owner: str | None = None
    """The instance that is making the first call."""


@dataclass(frozen=True, slots=True)
class Relay:
    """A client's retry of a held call, relayed to the replica that holds the call."""

    id: str
    holder: str
    """The round trips holding the call: ``<instance>/<name>``, ``instance`` being the holder's
    :attr:`Store.instance`."""
    held: str
    """The held call's id (what its ``requestState`` names)."""
    retry: Mapping[str, Any]
    """The retry, as JSON: the principal (``kind``, ``id``), the ``request`` digest, the ``requestState`` and
    the ``inputResponses``."""
    created_at: float
    deadline: float
    """Wall-clock time after which nobody takes it (its ``requestState`` has expired by then)."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A tool's result kept by a server's ``cache:``."""

    result: Mapping[str, Any]
    """The ``CallToolResult`` (wire form)."""
    cached_at: float
    """Wall-clock time it was kept."""


FOLDED_KINDS = frozenset({"run_started", "step_settled", "run_finished"})
"""The kinds of journal event that change a :class:`RunRecord` beyond its ``updated_at`` (see :func:`fold`)."""


def fold(record: RunRecord | None, event: JournalEvent) -> RunRecord | None:
    """``record`` updated with ``event`` (None before a run's ``run_started``). Pure: every store keeps
    its :class:`RunRecord` s this way, in the transaction that appends the event. An event of a kind
    outside :data:`FOLDED_KINDS` changes only ``updated_at``."""
    data = event.data
    if event.kind == "run_started":
        caller = data.get("caller") or {}
        return RunRecord(
            run_id=event.run_id,
            workflow=str(data.get("workflow", "")),
            status="running",
            started_at=event.at,
            caller_kind=str(caller.get("kind", "")),
            caller_id=str(caller.get("id", "")),
            plan=data.get("plan"),
            task=data.get("task"),
            idempotency_key=data.get("idempotency_key"),
            owner=data.get("owner"),
            updated_at=event.at,
        )
    if record is None:
        return None
    if event.kind == "step_settled" and "part" not in data:  # an agent's turn or call is a part of its step
        failed = record.failed_step
        if failed is None and data.get("status") == "failed":
            failed = event.key
        return replace(record, steps=record.steps + 1, failed_step=failed, updated_at=event.at)
    if event.kind == "run_finished":
        status = data.get("status", "failed")
        return replace(
            record,
            status=status if status in ("succeeded", "failed", "cancelled") else "failed",
            finished_at=event.at,
            duration_ms=data.get("duration_ms"),
            error=data.get("error"),
            result=data.get("result"),
            updated_at=event.at,
        )
    return replace(record, updated_at=event.at)


class Store(Protocol):
    """Where the gateway keeps what must outlive its process. Every method is safe to call
    concurrently; none blocks the event loop."""

    instance: str
    """This gateway process's id: the owner of the runs it starts or claims."""
    durable: bool
    """Whether what is committed outlives the process (False for ``memory``)."""

    # --- The journal. ---

    def record(self, event: JournalEvent) -> None:
        """Buffer ``event``; events of one run must be recorded in order (``seq``). Not durable until
        :meth:`commit`."""
        ...

    async def commit(self) -> None:
        """Return once every event recorded before the call is durable, with the :class:`RunRecord` s
        they update. Concurrent callers share one transaction (group commit)."""
        ...

    async def append(self, event: JournalEvent) -> None:
        """:meth:`record` then :meth:`commit`."""
        ...

    async def events(self, run_id: str) -> Sequence[JournalEvent]:
        """Every event of the run, in order; empty for an unknown run."""
        ...

    # --- Run history. ---

    async def run(self, run_id: str) -> RunRecord | None:
        """The run's record (``interrupted`` if its owner is gone), or None. Reads what is committed."""
        ...

    async def runs(self, query: RunQuery | None = None) -> Sequence[RunRecord]:
        """The runs ``query`` selects, most recent first."""
        ...

    async def prune(self, *, age: float | None = None, count: int | None = None) -> int:
        """Forget finished runs (with their events) older than ``age`` seconds, and beyond the ``count``
        most recent finished ones; and expired idempotency keys, relayed retries past their deadline and expired
        cached results.
        Returns the runs forgotten."""
        ...

    # --- Ownership of runs. ---

    async def heartbeat(self) -> None:
        """Renew whatever tells other instances this one is alive (nothing to do where that is a lock
        the process holds while it lives; PostgreSQL checks the lock's connection)."""
        ...

    async def claim(self, run_id: str) -> bool:
        """Take over an ``interrupted`` run (atomically: one instance wins). True if it is now this
        instance's; False if it is finished, owned by a live instance, or another claimed it first."""
        ...

    async def mark(self, run_id: str, note: str | None) -> None:
        """Set or clear why an interrupted run is not resumed."""
        ...

    async def request_cancel(self, run_id: str, message: str) -> None:
        """Ask the instance that runs ``run_id`` (another replica, say) to cancel it, saying ``message``."""
        ...

    async def cancel_requests(self) -> Sequence[tuple[str, str]]:
        """The runs this instance owns whose cancellation was asked for, each with its message; each request
        is given once (and forgotten)."""
        ...

    # --- Retries relayed to the replica holding their call. ---

    async def relay_put(self, holder: str, held: str, retry: Mapping[str, Any], deadline: float) -> str | None:
        """Relay ``retry`` of the call ``held`` to ``holder`` (``<instance>/<name>``), to be taken before
        ``deadline``: its id, or None (nothing stored) when the holder's instance is known to be gone."""
        ...

    async def relay_take(self, holder: str) -> Sequence[Relay]:
        """The retries relayed to ``holder`` that nobody took yet and whose deadline has not passed; each is given
        once (it is taken now)."""
        ...

    async def relay_answer(self, relay_id: str, answer: Mapping[str, Any]) -> None:
        """Record the answer to a taken retry (nothing happens if it was forgotten meanwhile)."""
        ...

    async def relay_answer_of(self, relay_id: str) -> Mapping[str, Any] | None:
        """The answer to the retry, once given (the retry is forgotten then: an answer is read once); None
        while it has none, or when the retry is unknown."""
        ...

    async def relay_withdraw(self, relay_id: str) -> bool:
        """Forget the retry unless its holder took it: True when it is gone now (withdrawn, or unknown), False
        when the holder took it and its answer is still to come."""
        ...

    # --- Idempotency keys. ---

    async def idempotency_claim(self, scope: str, key: str, tool: str, ttl: float) -> IdempotencyEntry | None:
        """Claim ``key`` for a first call: None if this call now holds it (it must :meth:`idempotency_finish`
        or :meth:`idempotency_release` it), else the entry of the call that holds it or finished with it.
        An expired entry counts as absent."""
        ...

    async def idempotency_bind(self, scope: str, key: str, run_id: str) -> None:
        """Record the workflow run that the call holding ``key`` started."""
        ...

    async def idempotency_finish(self, scope: str, key: str, result: Mapping[str, Any]) -> None:
        """Record the result of the call that held ``key``."""
        ...

    async def idempotency_release(self, scope: str, key: str) -> None:
        """Forget ``key``: the call that held it ended without a result to give again (it was cancelled)."""
        ...

    async def idempotency_get(self, scope: str, key: str) -> IdempotencyEntry | None:
        """The unexpired entry of ``key``, or None."""
        ...

    # --- Cached results (a server's ``cache:``). ---

    async def cache_put(self, scope: str, key: str, result: Mapping[str, Any], ttl: float, max_entries: int) -> None:
        """Keep ``result`` as ``key``'s in ``scope`` (a server) for ``ttl`` seconds, replacing the one kept before,
        and forget the oldest results of ``scope`` beyond its ``max_entries`` most recently kept."""
        ...

    async def cache_get(self, scope: str, key: str) -> CacheEntry | None:
        """The unexpired result kept as ``key``'s in ``scope``, or None."""
        ...

    async def close(self) -> None:
        """Commit what is recorded and release the connection(s)."""
        ...


@asynccontextmanager
async def open_store(
    url: str,
    *,
    durability: Durability = "process",
    instance: str | None = None,
    wall_clock: Callable[[], float] | None = None,
) -> AsyncIterator[Store]:
    """Open the store ``url`` names (``memory``, ``sqlite:///PATH``, ``postgresql://…`` or ``postgres://…``),
    creating and migrating its schema; close it (committing what is recorded) on exit.

    ``sqlite:///relative/path`` is relative to the working directory, ``sqlite:////abs/path`` absolute.

    Raises:
        StoreError: the URL names no store, or the store cannot be opened, or its schema is newer than
            this Patchbay knows.
    """
    clock = wall_clock or time.time
    store: Store
    # Imported here: each implementation imports this module's types, and PostgreSQL needs asyncpg.
    if url == "memory":
        from gateway.store.memory import MemoryStore

        store = MemoryStore(wall_clock=clock)
    elif url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path or path == ":memory:" or "?" in path:
            raise StoreError(f"{url!r} names no SQLite file: write `sqlite:///PATH` (or `memory` for no file)")
        from gateway.store.sqlite import SqliteStore

        store = await SqliteStore.open(path, durability=durability, instance=instance, wall_clock=clock)
    elif url.startswith(("postgresql://", "postgres://")):
        from gateway.store.postgres import PostgresStore

        store = await PostgresStore.open(url, durability=durability, instance=instance, wall_clock=clock)
    else:
        scheme, sep, _ = url.partition("://")
        shown = f"`{scheme}://…`" if sep else repr(url)  # the rest of a URL may hold a password
        raise StoreError(f"{shown} is not a store: use `memory`, `sqlite:///PATH` or `postgresql://…`")
    try:
        yield store
    finally:
        await store.close()
