"""The store on PostgreSQL (``gateway.store: postgresql://USER@HOST:PORT/DB``): shared by several gateways.

asyncpg, a connection pool. Events are group-committed (:class:`~gateway.store._common.GroupCommit`):
each commit round is one transaction, the events in one ``executemany`` batch and the
:class:`RunRecord` s they update (their rows locked while they are folded) in another. The schema is
created and migrated at open under an advisory lock, so gateways starting together take turns.
Query parameters of the URL that asyncpg does not know are server settings (``?search_path=patchbay``).

**Durability** (``gateway.durability``):

* ``process`` (the default): ``synchronous_commit = off``. A commit has reached the server when
  :meth:`commit` returns, so it survives the gateway being killed; a crash of the PostgreSQL server
  (or its machine) may lose the last few hundred milliseconds of commits (the database stays
  consistent).
* ``machine``: ``synchronous_commit = on``. The server has flushed each commit to its disk (and to
  synchronous standbys, if it has any) before :meth:`commit` returns.

**Ownership.** Each open store is an *instance* and holds a session-level advisory lock
(``pg_advisory_lock`` on a 64-bit hash of its id) on a connection of its own for as long as it is
open. The server releases it the moment that connection ends, which it does when the process dies,
however it dies; so an owner is alive exactly while its lock is held (``pg_try_advisory_lock`` on it
fails), and a run whose owner was killed reads as ``interrupted`` at once, with no lease to expire.
:meth:`heartbeat` checks that the lock's connection is still open, and reconnects and locks again
if it is not (while it was lost, other instances saw this one as dead and may have claimed its runs).
"""

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import anyio
import asyncpg
import orjson

from gateway.errors import StoreError
from gateway.store import CacheEntry, Durability, IdempotencyEntry, Relay, RunQuery, RunRecord
from gateway.store._common import (
    FINISHED,
    RUN_COLUMNS,
    UPSERT_RUN,
    GroupCommit,
    Journaled,
    Pending,
    check_version,
    fold_owned,
    instance_key,
    record_from_row,
    run_row,
)
from gateway.workflows.journal import JournalEvent

__all__ = ["MIGRATIONS", "PostgresStore"]

logger = logging.getLogger(__name__)

"""An event recorded and not committed yet, and its data as JSON."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: the journal, the runs' records, idempotency keys
        """CREATE TABLE events (
            run_id TEXT NOT NULL, seq INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL,
            key TEXT, attempt INTEGER NOT NULL, data JSONB NOT NULL,
            PRIMARY KEY (run_id, seq))""",
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, status TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL, caller_kind TEXT NOT NULL, caller_id TEXT NOT NULL, owner TEXT,
            finished_at DOUBLE PRECISION, note TEXT, record JSONB NOT NULL)""",
        "CREATE INDEX runs_by_start ON runs (started_at)",
        "CREATE INDEX runs_by_workflow ON runs (workflow, started_at)",
        "CREATE INDEX runs_by_status ON runs (status, started_at)",
        """CREATE TABLE idempotency (
            scope TEXT NOT NULL, key TEXT NOT NULL, tool TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL, run_id TEXT, result JSONB, owner TEXT,
            PRIMARY KEY (scope, key))""",
    ),
    (  # 2: cancellations asked of the instance that runs a run
        "CREATE TABLE cancel_requests (run_id TEXT PRIMARY KEY, message TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)",
    ),
    (  # 3: retries of held calls relayed to the replica holding the call
        """CREATE TABLE relays (
            id TEXT PRIMARY KEY, holder TEXT NOT NULL, held TEXT NOT NULL, retry JSONB NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, deadline DOUBLE PRECISION NOT NULL, taken_at DOUBLE PRECISION,
            answer JSONB)""",
        "CREATE INDEX relays_by_holder ON relays (holder, taken_at)",
    ),
    (  # 4: the last good results of the tools a server's `cache:` names
        """CREATE TABLE cache (
            scope TEXT NOT NULL, key TEXT NOT NULL, result JSONB NOT NULL, cached_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (scope, key))""",
        "CREATE INDEX cache_by_age ON cache (scope, cached_at)",
    ),
)
"""The schema, one entry per version (forward only): version N is after ``MIGRATIONS[N - 1]`` ran."""

MIGRATION_LOCK = instance_key("patchbay:migrate")
"""The advisory lock gateways take turns under to create and migrate the schema."""
CACHE_LOCK = 0x63616368  # "cach"
"""The first key of the advisory locks a cache scope's writers take turns under (the two-key form: a key space
apart from the one-key locks above)."""
POOL_SIZE = 10
CONNECT_TIMEOUT = 10.0

_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
UPSERT_RUN_JSONB = UPSERT_RUN.replace("$10)", "$10::jsonb)")


class PostgresStore(Journaled):
    """A :class:`~gateway.store.Store` on PostgreSQL; open it with :meth:`open`."""

    durable = True

    def __init__(
        self,
        url: str,
        *,
        durability: Durability = "process",
        instance: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.durability = durability
        self.instance = instance or uuid.uuid4().hex
        self._clock = wall_clock
        self._settings = {"synchronous_commit": "on" if durability == "machine" else "off"}
        self._pool: Any = None
        self._lock_con: Any = None
        self._group = GroupCommit[Pending](self._write)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        durability: Durability = "process",
        instance: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> "PostgresStore":
        """Connect, create or migrate the schema, and lock this instance's liveness lock.

        Raises:
            StoreError: the server cannot be reached, or its schema is newer than this Patchbay knows.
        """
        store = cls(url, durability=durability, instance=instance, wall_clock=wall_clock)
        try:
            store._pool = await asyncpg.create_pool(
                url, min_size=1, max_size=POOL_SIZE, timeout=CONNECT_TIMEOUT, server_settings=store._settings
            )
            async with store._pool.acquire() as con:
                await _migrate(con)
            await store._lock()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await store._disconnect()
            if isinstance(exc, _DB_ERRORS):
                raise StoreError(f"cannot open the store {_shown(url)}: {exc}") from exc
            raise
        return store

    @property
    def transactions(self) -> int:
        """Journal commit rounds written so far."""
        return self._group.transactions

    async def _lock(self) -> None:
        self._lock_con = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT)
        await self._lock_con.execute("SELECT pg_advisory_lock($1)", instance_key(self.instance))

    async def _disconnect(self) -> None:
        if self._lock_con is not None:
            await self._lock_con.close()
            self._lock_con = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                if self._pool is not None:
                    await self._group.commit()
            finally:
                await self._disconnect()

    # --- The journal. ---

    async def _write(self, batch: Sequence[Pending]) -> None:
        try:
            rows = [(e.run_id, e.seq, e.at, e.kind, e.key, e.attempt, data) for e, data in batch]
            async with self._connection() as con, con.transaction():
                await con.executemany("INSERT INTO events VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)", rows)
                started = {e.run_id for e, _ in batch if e.kind == "run_started"}
                stored = await con.fetch(
                    f"SELECT run_id, {RUN_COLUMNS} FROM runs WHERE run_id = ANY($1::text[]) FOR UPDATE",
                    list({e.run_id for e, _ in batch} - started),
                )
                records: dict[str, RunRecord | None] = {row[0]: record_from_row(row[1:]) for row in stored}
                for event, _ in batch:
                    records[event.run_id] = fold_owned(records.get(event.run_id), event, self.instance)
                await con.executemany(UPSERT_RUN_JSONB, [run_row(r) for r in records.values() if r is not None])
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot commit to the store {_shown(self.url)}: {exc}") from exc

    def _connection(self) -> Any:
        if self._pool is None:
            raise StoreError(f"the store {_shown(self.url)} is closed")
        return self._pool.acquire()

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            async with self._connection() as con:
                return list(await con.fetch(sql, *args))
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot read the store {_shown(self.url)}: {exc}") from exc

    async def _execute(self, sql: str, *args: Any) -> str:
        try:
            async with self._connection() as con:
                return str(await con.execute(sql, *args))
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot write to the store {_shown(self.url)}: {exc}") from exc

    async def events(self, run_id: str) -> Sequence[JournalEvent]:
        rows = await self._fetch(
            "SELECT run_id, seq, at, kind, key, attempt, data FROM events WHERE run_id = $1 ORDER BY seq", run_id
        )
        return tuple(JournalEvent(r[0], r[1], r[2], r[3], r[4], r[5], orjson.loads(r[6])) for r in rows)

    # --- Run history. ---

    async def run(self, run_id: str) -> RunRecord | None:
        rows = await self._fetch(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = $1", run_id)
        if not rows:
            return None
        [record] = await self._live([record_from_row(rows[0])])
        return record

    async def runs(self, query: RunQuery | None = None) -> Sequence[RunRecord]:
        query = query or RunQuery()
        where, args = ["TRUE"], list[Any]()

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if query.workflow is not None:
            where.append(f"workflow = {arg(query.workflow)}")
        if query.status in ("running", "interrupted"):
            where.append("status = 'running'")  # which of the two is known only from the owner's liveness
        elif query.status is not None:
            where.append(f"status = {arg(query.status)}")
        if query.since is not None:
            where.append(f"started_at >= {arg(query.since)}")
        if query.caller is not None:
            where.append(f"caller_kind = {arg(query.caller[0])} AND caller_id = {arg(query.caller[1])}")
        sql = f"SELECT {RUN_COLUMNS} FROM runs WHERE {' AND '.join(where)} ORDER BY started_at DESC, run_id DESC"
        exact = query.status not in ("running", "interrupted")
        if query.limit is not None and exact:
            sql += f" LIMIT {arg(query.limit)}"
        chosen = await self._live([record_from_row(row) for row in await self._fetch(sql, *args)])
        if not exact:
            chosen = [record for record in chosen if record.status == query.status][: query.limit]
        return chosen

    async def _live(self, records: list[RunRecord]) -> list[RunRecord]:
        """``records``, those running under a dead owner ``interrupted`` (each owner checked once)."""
        owners = {r.owner for r in records if r.status == "running"}
        if not owners:
            return records
        try:
            async with self._connection() as con:
                alive = {owner: await self._owner_alive(con, owner) for owner in owners}
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot read the store {_shown(self.url)}: {exc}") from exc
        return [r if r.status != "running" or alive[r.owner] else replace(r, status="interrupted") for r in records]

    async def _owner_alive(self, con: Any, owner: str | None) -> bool:
        if owner == self.instance:
            return True
        if not owner:
            return False
        key = instance_key(owner)
        if not await con.fetchval("SELECT pg_try_advisory_lock($1)", key):
            return True
        await con.execute("SELECT pg_advisory_unlock($1)", key)  # dead: we only looked
        return False

    async def prune(self, *, age: float | None = None, count: int | None = None) -> int:
        now = self._clock()
        finished = f"status IN ({', '.join(repr(s) for s in FINISHED)})"
        try:
            async with self._connection() as con, con.transaction():
                doomed: list[str] = []
                if age is not None:
                    sql = f"SELECT run_id FROM runs WHERE {finished} AND finished_at < $1"
                    doomed.extend(row[0] for row in await con.fetch(sql, now - age))
                if count is not None:
                    sql = f"SELECT run_id FROM runs WHERE {finished} ORDER BY started_at DESC, run_id DESC OFFSET $1"
                    doomed.extend(row[0] for row in await con.fetch(sql, count))
                unique = list(dict.fromkeys(doomed))
                await con.execute("DELETE FROM events WHERE run_id = ANY($1::text[])", unique)
                await con.execute("DELETE FROM runs WHERE run_id = ANY($1::text[])", unique)
                await con.execute("DELETE FROM idempotency WHERE expires_at <= $1", now)
                await con.execute("DELETE FROM relays WHERE deadline < $1", now)
                await con.execute("DELETE FROM cache WHERE expires_at <= $1", now)
                # Asked of a run that ended before its owner saw the request (or is forgotten).
                await con.execute(
                    "DELETE FROM cancel_requests WHERE run_id NOT IN (SELECT run_id FROM runs WHERE status = 'running')"
                )
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot write to the store {_shown(self.url)}: {exc}") from exc
        return len(unique)

    # --- Ownership of runs. ---

    async def heartbeat(self) -> None:
        if self._lock_con is not None and not self._lock_con.is_closed():
            return
        logger.warning("the store's liveness lock was lost (its connection closed): locking it again")
        try:
            await self._lock()
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot lock this instance in the store {_shown(self.url)}: {exc}") from exc

    async def claim(self, run_id: str) -> bool:
        try:
            async with self._connection() as con:
                row = await con.fetchrow("SELECT owner, status FROM runs WHERE run_id = $1", run_id)
                if row is None or row[1] != "running" or await self._owner_alive(con, row[0]):
                    return False
                # Only the first of the instances that found the owner dead still sees it as the owner.
                status = await con.execute(
                    "UPDATE runs SET owner = $1 WHERE run_id = $2 AND owner IS NOT DISTINCT FROM $3 "
                    "AND status = 'running'",
                    self.instance,
                    run_id,
                    row[0],
                )
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot write to the store {_shown(self.url)}: {exc}") from exc
        return bool(status == "UPDATE 1")

    async def request_cancel(self, run_id: str, message: str) -> None:
        await self._execute(
            "INSERT INTO cancel_requests (run_id, message, at) VALUES ($1, $2, $3) "
            "ON CONFLICT (run_id) DO UPDATE SET message = excluded.message, at = excluded.at",
            run_id,
            message,
            self._clock(),
        )

    async def cancel_requests(self) -> Sequence[tuple[str, str]]:
        rows = await self._fetch(
            "DELETE FROM cancel_requests WHERE run_id IN (SELECT run_id FROM runs WHERE owner = $1) "
            "RETURNING run_id, message",
            self.instance,
        )
        return [(row[0], row[1]) for row in rows]

    async def mark(self, run_id: str, note: str | None) -> None:
        await self._execute("UPDATE runs SET note = $1 WHERE run_id = $2", note, run_id)

    # --- Retries relayed to the replica holding their call. ---

    async def relay_put(self, holder: str, held: str, retry: Mapping[str, Any], deadline: float) -> str | None:
        relay_id = uuid.uuid4().hex
        try:
            async with self._connection() as con:
                if not await self._owner_alive(con, holder.partition("/")[0]):
                    return None
                await con.execute(
                    "INSERT INTO relays (id, holder, held, retry, created_at, deadline) "
                    "VALUES ($1, $2, $3, $4::jsonb, $5, $6)",
                    relay_id,
                    holder,
                    held,
                    orjson.dumps(retry).decode(),
                    self._clock(),
                    deadline,
                )
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot write to the store {_shown(self.url)}: {exc}") from exc
        return relay_id

    async def relay_take(self, holder: str) -> Sequence[Relay]:
        now = self._clock()
        # Row locks skipped, not waited for: two takers never get the same retry, and neither blocks.
        rows = await self._fetch(
            "UPDATE relays SET taken_at = $1 WHERE id IN (SELECT id FROM relays WHERE holder = $2 AND taken_at IS NULL "
            "AND deadline > $1 FOR UPDATE SKIP LOCKED) RETURNING id, holder, held, retry, created_at, deadline",
            now,
            holder,
        )
        return [Relay(r[0], r[1], r[2], orjson.loads(r[3]), r[4], r[5]) for r in rows]

    async def relay_answer(self, relay_id: str, answer: Mapping[str, Any]) -> None:
        await self._execute(
            "UPDATE relays SET answer = $1::jsonb WHERE id = $2", orjson.dumps(answer).decode(), relay_id
        )

    async def relay_answer_of(self, relay_id: str) -> Mapping[str, Any] | None:
        rows = await self._fetch("DELETE FROM relays WHERE id = $1 AND answer IS NOT NULL RETURNING answer", relay_id)
        if not rows:
            return None
        answer: Mapping[str, Any] = orjson.loads(rows[0][0])
        return answer

    async def relay_withdraw(self, relay_id: str) -> bool:
        rows = await self._fetch(
            "WITH gone AS (DELETE FROM relays WHERE id = $1 AND taken_at IS NULL RETURNING id) "
            "SELECT EXISTS (SELECT 1 FROM relays WHERE id = $1 AND id NOT IN (SELECT id FROM gone))",
            relay_id,
        )
        return not rows[0][0]

    # --- Cached results. ---

    async def cache_put(self, scope: str, key: str, result: Mapping[str, Any], ttl: float, max_entries: int) -> None:
        now = self._clock()
        try:
            async with self._connection() as con, con.transaction():
                # One writer of a scope at a time: two replicas inserting and evicting its rows at once could
                # each lock rows the other deletes (a deadlock, which would cost one of them its save).
                await con.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", CACHE_LOCK, scope)
                await con.execute(
                    "INSERT INTO cache VALUES ($1, $2, $3::jsonb, $4, $5) ON CONFLICT (scope, key) DO UPDATE SET "
                    "result = excluded.result, cached_at = excluded.cached_at, expires_at = excluded.expires_at",
                    scope,
                    key,
                    orjson.dumps(result).decode(),
                    now,
                    now + ttl,
                )
                await con.execute(
                    "DELETE FROM cache WHERE scope = $1 AND key IN "
                    "(SELECT key FROM cache WHERE scope = $1 ORDER BY cached_at DESC, key DESC OFFSET $2)",
                    scope,
                    max_entries,
                )
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot write to the store {_shown(self.url)}: {exc}") from exc

    async def cache_get(self, scope: str, key: str) -> CacheEntry | None:
        rows = await self._fetch(
            "SELECT result, cached_at FROM cache WHERE scope = $1 AND key = $2 AND expires_at > $3",
            scope,
            key,
            self._clock(),
        )
        return CacheEntry(orjson.loads(rows[0][0]), rows[0][1]) if rows else None

    # --- Idempotency keys. ---

    async def idempotency_claim(self, scope: str, key: str, tool: str, ttl: float) -> IdempotencyEntry | None:
        now = self._clock()
        try:
            async with self._connection() as con, con.transaction():
                await con.execute(
                    "DELETE FROM idempotency WHERE scope = $1 AND key = $2 AND expires_at <= $3", scope, key, now
                )
                status = await con.execute(
                    "INSERT INTO idempotency (scope, key, tool, created_at, expires_at, owner) "
                    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    scope,
                    key,
                    tool,
                    now,
                    now + ttl,
                    self.instance,
                )
                if status == "INSERT 0 1":
                    return None
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot write to the store {_shown(self.url)}: {exc}") from exc
        return await self.idempotency_get(scope, key)

    async def idempotency_bind(self, scope: str, key: str, run_id: str) -> None:
        await self._execute("UPDATE idempotency SET run_id = $1 WHERE scope = $2 AND key = $3", run_id, scope, key)

    async def idempotency_finish(self, scope: str, key: str, result: Mapping[str, Any]) -> None:
        await self._execute(
            "UPDATE idempotency SET result = $1::jsonb WHERE scope = $2 AND key = $3",
            orjson.dumps(result).decode(),
            scope,
            key,
        )

    async def idempotency_release(self, scope: str, key: str) -> None:
        await self._execute("DELETE FROM idempotency WHERE scope = $1 AND key = $2", scope, key)

    async def idempotency_get(self, scope: str, key: str) -> IdempotencyEntry | None:
        rows = await self._fetch(
            "SELECT scope, key, tool, created_at, expires_at, run_id, result, owner FROM idempotency "
            "WHERE scope = $1 AND key = $2 AND expires_at > $3",
            scope,
            key,
            self._clock(),
        )
        if not rows:
            return None
        row = rows[0]
        result = None if row[6] is None else orjson.loads(row[6])
        return IdempotencyEntry(row[0], row[1], row[2], row[3], row[4], row[5], result, row[7])


async def _migrate(con: Any) -> None:
    """Bring the schema to the newest version, in one transaction, under :data:`MIGRATION_LOCK`.

    Raises:
        StoreError: the schema is newer than :data:`MIGRATIONS` knows.
    """
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        found = await con.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
        schema = await con.fetchval("SELECT current_schema()")
        check_version(found, len(MIGRATIONS), f"in schema {schema!r}")
        for script in MIGRATIONS[found:]:
            for statement in script:
                await con.execute(statement)
        if found < len(MIGRATIONS):
            await con.execute("DELETE FROM schema_version")
            await con.execute("INSERT INTO schema_version VALUES ($1)", len(MIGRATIONS))


def _shown(url: str) -> str:
    """``url`` for a message: without its password."""
    scheme, _, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}://{userinfo.partition(':')[0]}@{host}" if at else url
