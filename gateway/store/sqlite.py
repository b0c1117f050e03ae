"""The store in one SQLite file (``gateway.store: sqlite:///PATH``): nothing to install, one machine.

The file is created with mode 0600 (its WAL and shared-memory files take the same mode) and runs in
WAL mode. Every statement runs on one thread of its own (:class:`~gateway.store._common.Worker`),
never on the event loop. Events are group-committed (:class:`~gateway.store._common.GroupCommit`): each commit
round is one transaction holding every event recorded meanwhile and the :class:`RunRecord` s they
update.

**Durability** (``gateway.durability``):

* ``process`` (the default): ``synchronous=NORMAL``. A commit is in the WAL file, handed to the
  operating system, before :meth:`commit` returns: it survives the gateway being killed (``kill -9``,
  a crash), but not an operating-system crash or a power loss, which may lose the last commits (the
  database stays consistent).
* ``machine``: ``synchronous=FULL``. Every commit is fsynced: it survives an OS crash and a power loss
  too, at the cost of one fsync per commit round.

**Ownership.** Each open store is an *instance* and holds an exclusive ``flock`` on
``<PATH>.instances/<instance>.lock`` for as long as it is open; the kernel releases it the moment the
process ends, however it ends. An owner is alive exactly while its lock file is locked, so a run whose
owner was killed reads as ``interrupted`` at once, with no lease to expire, and :meth:`heartbeat` has
nothing to do. (A process that forks without exec shares the lock with its child.)
"""

import fcntl
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import anyio
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
    Worker,
    check_version,
    fold_owned,
    record_from_row,
    run_row,
)
from gateway.workflows.journal import JournalEvent

__all__ = ["MIGRATIONS", "SqliteStore"]

T = TypeVar("T")
_UPSERT_RUN = re.sub(r"\$\d+", "?", UPSERT_RUN)

KEPT_RECORDS = 10_000
"""Records of unfinished runs an instance keeps in memory to fold events into."""
"""An event recorded and not committed yet, and its data as JSON."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: the journal, the runs' records, idempotency keys
        """CREATE TABLE events (
            run_id TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL,
            key TEXT, attempt INTEGER NOT NULL, data TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)) WITHOUT ROWID""",
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, status TEXT NOT NULL, started_at REAL NOT NULL,
            caller_kind TEXT NOT NULL, caller_id TEXT NOT NULL, owner TEXT, finished_at REAL, note TEXT,
            record TEXT NOT NULL)""",
        "CREATE INDEX runs_by_start ON runs (started_at)",
        "CREATE INDEX runs_by_workflow ON runs (workflow, started_at)",
        "CREATE INDEX runs_by_status ON runs (status, started_at)",
        """CREATE TABLE idempotency (
            scope TEXT NOT NULL, key TEXT NOT NULL, tool TEXT NOT NULL, created_at REAL NOT NULL,
            expires_at REAL NOT NULL, run_id TEXT, result TEXT, owner TEXT,
            PRIMARY KEY (scope, key)) WITHOUT ROWID""",
    ),
    (  # 2: cancellations asked of the instance that runs a run
        "CREATE TABLE cancel_requests (run_id TEXT PRIMARY KEY, message TEXT NOT NULL, at REAL NOT NULL)",
    ),
    (  # 3: retries of held calls relayed to the replica holding the call
        """CREATE TABLE relays (
            id TEXT PRIMARY KEY, holder TEXT NOT NULL, held TEXT NOT NULL, retry TEXT NOT NULL,
            created_at REAL NOT NULL, deadline REAL NOT NULL, taken_at REAL, answer TEXT)""",
        "CREATE INDEX relays_by_holder ON relays (holder, taken_at)",
    ),
    (  # 4: the last good results of the tools a server's `cache:` names
        """CREATE TABLE cache (
            scope TEXT NOT NULL, key TEXT NOT NULL, result TEXT NOT NULL, cached_at REAL NOT NULL,
            expires_at REAL NOT NULL, PRIMARY KEY (scope, key)) WITHOUT ROWID""",
        "CREATE INDEX cache_by_age ON cache (scope, cached_at)",
    ),
)
"""The schema, one entry per version (forward only): version N is after ``MIGRATIONS[N - 1]`` ran."""

_EVICT = (
    "DELETE FROM cache WHERE scope = ? AND key IN "
    "(SELECT key FROM cache WHERE scope = ? ORDER BY cached_at DESC, key DESC LIMIT -1 OFFSET ?)"
)
"""Forget a scope's cached results beyond its N most recently kept."""

BUSY_TIMEOUT_MS = 30_000
"""How long a statement waits for another connection's write lock (another gateway, ``patchbay resume``)."""


class SqliteStore(Journaled):
    """A :class:`~gateway.store.Store` in a SQLite file; open it with :meth:`open`."""

    durable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "process",
        instance: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.durability = durability
        self.instance = instance or uuid.uuid4().hex
        self._clock = wall_clock
        self._worker: Worker | None = None
        self._con: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._instances = Path(f"{self.path}.instances")
        self._group = GroupCommit[Pending](self._write)
        self._records: dict[str, RunRecord] = {}
        """The records of the runs this instance writes, as last committed (only the worker thread touches it):
        folding an event needs no read. Their ``owner`` and ``note`` may be stale: those columns are not
        written from here."""

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "process",
        instance: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> "SqliteStore":
        """Open (creating and migrating) the store at ``path``.

        Raises:
            StoreError: the file cannot be opened, or its schema is newer than this Patchbay knows.
        """
        store = cls(path, durability=durability, instance=instance, wall_clock=wall_clock)
        try:
            await store._run(store._open)
        except BaseException:
            store._stop_worker()
            raise
        return store

    @property
    def transactions(self) -> int:
        """Journal commit rounds written so far."""
        return self._group.transactions

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._worker is None:
            self._worker = Worker(f"patchbay-store-{self.path.name}")
        return await self._worker.run(fn, *args)

    # --- Opening and closing (on the worker thread). ---

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            os.close(fd)
            con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
        try:
            con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            con.execute("PRAGMA journal_mode = WAL")
            con.execute(f"PRAGMA synchronous = {'FULL' if self.durability == 'machine' else 'NORMAL'}")
            _migrate(con, self.path)
            self._lock_instance()
        except BaseException as exc:
            con.close()
            if isinstance(exc, sqlite3.Error | OSError):
                raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
            raise
        self._con = con

    def _lock_instance(self) -> None:
        # Locked before it is renamed into place, so no other instance ever finds it unlocked while we live.
        self._instances.mkdir(mode=0o700, exist_ok=True)
        temporary = self._instances / f".{self.instance}.new"
        fd = os.open(temporary, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(temporary, self._instances / f"{self.instance}.lock")
        self._lock_fd = fd

    def _close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._lock_fd is not None:
            (self._instances / f"{self.instance}.lock").unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    async def close(self) -> None:
        try:
            with anyio.CancelScope(shield=True):
                if self._con is not None:
                    await self._group.commit()
        finally:
            with anyio.CancelScope(shield=True):
                await self._run(self._close)
            self._stop_worker()

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    @property
    def _db(self) -> sqlite3.Connection:
        if self._con is None:
            raise StoreError(f"the store {self.path} is closed")
        return self._con

    # --- The journal. ---

    async def _write(self, batch: Sequence[Pending]) -> None:
        await self._run(self._write_batch, batch)

    def _write_batch(self, batch: Sequence[Pending]) -> None:
        con = self._db
        try:
            rows = [(e.run_id, e.seq, e.at, e.kind, e.key, e.attempt, data) for e, data in batch]
            with _transaction(con):
                con.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                records: dict[str, RunRecord | None] = {}
                for event, _ in batch:
                    if event.run_id in records:
                        record = records[event.run_id]
                    elif event.kind == "run_started":
                        record = None
                    else:
                        record = self._records.get(event.run_id) or self._load(event.run_id)
                    records[event.run_id] = fold_owned(record, event, self.instance)
                con.executemany(_UPSERT_RUN, [run_row(record) for record in records.values() if record is not None])
        except sqlite3.Error as exc:
            raise StoreError(f"cannot commit to the store {self.path}: {exc}") from exc
        for run_id, record in records.items():
            if record is None or record.status in FINISHED:
                self._records.pop(run_id, None)
            else:
                self._records[run_id] = record
        while len(self._records) > KEPT_RECORDS:  # runs that never finish here (the process is closing)
            del self._records[next(iter(self._records))]

    def _load(self, run_id: str) -> RunRecord | None:
        row = self._db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else record_from_row(row)

    async def events(self, run_id: str) -> Sequence[JournalEvent]:
        return await self._run(self._events, run_id)

    def _events(self, run_id: str) -> tuple[JournalEvent, ...]:
        rows = self._db.execute(
            "SELECT run_id, seq, at, kind, key, attempt, data FROM events WHERE run_id = ? ORDER BY seq", (run_id,)
        ).fetchall()
        return tuple(JournalEvent(r[0], r[1], r[2], r[3], r[4], r[5], orjson.loads(r[6])) for r in rows)

    # --- Run history. ---

    async def run(self, run_id: str) -> RunRecord | None:
        return await self._run(self._run_record, run_id)

    def _run_record(self, run_id: str) -> RunRecord | None:
        record = self._load(run_id)
        return None if record is None else self._live(record, {})

    async def runs(self, query: RunQuery | None = None) -> Sequence[RunRecord]:
        return await self._run(self._runs, query or RunQuery())

    def _runs(self, query: RunQuery) -> list[RunRecord]:
        where, args = ["1"], list[Any]()
        if query.workflow is not None:
            where.append("workflow = ?")
            args.append(query.workflow)
        if query.status in ("running", "interrupted"):
            where.append("status = 'running'")  # which of the two is known only from the owner's liveness
        elif query.status is not None:
            where.append("status = ?")
            args.append(query.status)
        if query.since is not None:
            where.append("started_at >= ?")
            args.append(query.since)
        if query.caller is not None:
            where.append("caller_kind = ? AND caller_id = ?")
            args.extend(query.caller)
        sql = f"SELECT {RUN_COLUMNS} FROM runs WHERE {' AND '.join(where)} ORDER BY started_at DESC, run_id DESC"
        exact = query.status not in ("running", "interrupted")
        if query.limit is not None and exact:
            sql += f" LIMIT {int(query.limit)}"
        alive: dict[str | None, bool] = {}
        chosen = [self._live(record_from_row(row), alive) for row in self._db.execute(sql, args)]
        if not exact:
            chosen = [record for record in chosen if record.status == query.status][: query.limit]
        return chosen

    def _live(self, record: RunRecord, alive: dict[str | None, bool]) -> RunRecord:
        """``record``, ``interrupted`` if it is running and its owner is dead (``alive`` caches liveness)."""
        if record.status != "running":
            return record
        if record.owner not in alive:
            alive[record.owner] = self._owner_alive(record.owner)
        return record if alive[record.owner] else replace(record, status="interrupted")

    def _owner_alive(self, owner: str | None) -> bool:
        if owner == self.instance:
            return True
        if not owner:
            return False
        path = self._instances / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Locked: alive, unless another instance found it dead and is deleting it right now.
                return os.fstat(fd).st_nlink > 0
            path.unlink(missing_ok=True)  # dead: nobody locks it again
            return False
        finally:
            os.close(fd)

    async def prune(self, *, age: float | None = None, count: int | None = None) -> int:
        return await self._run(self._prune, age, count)

    def _prune(self, age: float | None, count: int | None) -> int:
        now = self._clock()
        doomed: list[str] = []
        con = self._db
        with _transaction(con):
            finished = f"status IN {FINISHED!r}"
            if age is not None:
                sql = f"SELECT run_id FROM runs WHERE {finished} AND finished_at < ?"
                doomed.extend(row[0] for row in con.execute(sql, (now - age,)))
            if count is not None:
                sql = (
                    f"SELECT run_id FROM runs WHERE {finished} ORDER BY started_at DESC, run_id DESC LIMIT -1 OFFSET ?"
                )
                doomed.extend(row[0] for row in con.execute(sql, (count,)))
            unique = [(run_id,) for run_id in dict.fromkeys(doomed)]
            con.executemany("DELETE FROM events WHERE run_id = ?", unique)
            con.executemany("DELETE FROM runs WHERE run_id = ?", unique)
            con.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))
            con.execute("DELETE FROM relays WHERE deadline < ?", (now,))
            con.execute("DELETE FROM cache WHERE expires_at <= ?", (now,))
            # Asked of a run that ended before its owner saw the request (or is forgotten).
            con.execute(
                "DELETE FROM cancel_requests WHERE run_id NOT IN (SELECT run_id FROM runs WHERE status = 'running')"
            )
        return len(unique)

    # --- Ownership of runs. ---

    async def heartbeat(self) -> None:
        return None  # liveness is the instance's flock, which the kernel holds while the process lives

    async def claim(self, run_id: str) -> bool:
        return await self._run(self._claim, run_id)

    def _claim(self, run_id: str) -> bool:
        record = self._load(run_id)
        if record is None or record.status != "running" or self._owner_alive(record.owner):
            return False
        con = self._db
        with _transaction(con):
            # Only the first of the instances that found the owner dead still sees it as the owner.
            cursor = con.execute(
                "UPDATE runs SET owner = ? WHERE run_id = ? AND owner IS ? AND status = 'running'",
                (self.instance, run_id, record.owner),
            )
            return cursor.rowcount == 1

    async def mark(self, run_id: str, note: str | None) -> None:
        await self._run(self._execute, "UPDATE runs SET note = ? WHERE run_id = ?", (note, run_id))

    async def request_cancel(self, run_id: str, message: str) -> None:
        sql = "INSERT OR REPLACE INTO cancel_requests (run_id, message, at) VALUES (?, ?, ?)"
        await self._run(self._execute, sql, (run_id, message, self._clock()))

    async def cancel_requests(self) -> Sequence[tuple[str, str]]:
        return await self._run(self._cancel_requests)

    def _cancel_requests(self) -> list[tuple[str, str]]:
        con = self._db
        with _transaction(con):
            rows = con.execute(
                "DELETE FROM cancel_requests WHERE run_id IN (SELECT run_id FROM runs WHERE owner = ?) "
                "RETURNING run_id, message",
                (self.instance,),
            ).fetchall()
        return [(row[0], row[1]) for row in rows]

    # --- Retries relayed to the replica holding their call. ---

    async def relay_put(self, holder: str, held: str, retry: Mapping[str, Any], deadline: float) -> str | None:
        return await self._run(self._relay_put, holder, held, orjson.dumps(retry).decode(), deadline)

    def _relay_put(self, holder: str, held: str, retry: str, deadline: float) -> str | None:
        if not self._owner_alive(holder.partition("/")[0]):
            return None
        relay_id = uuid.uuid4().hex
        sql = "INSERT INTO relays (id, holder, held, retry, created_at, deadline) VALUES (?, ?, ?, ?, ?, ?)"
        self._execute(sql, (relay_id, holder, held, retry, self._clock(), deadline))
        return relay_id

    async def relay_take(self, holder: str) -> Sequence[Relay]:
        return await self._run(self._relay_take, holder)

    def _relay_take(self, holder: str) -> list[Relay]:
        con, now = self._db, self._clock()
        waiting = "holder = ? AND taken_at IS NULL AND deadline > ?"
        if con.execute(f"SELECT 1 FROM relays WHERE {waiting} LIMIT 1", (holder, now)).fetchone() is None:
            return []  # the usual answer, read without taking the write lock
        with _transaction(con):
            returning = "RETURNING id, holder, held, retry, created_at, deadline"
            sql = f"UPDATE relays SET taken_at = ? WHERE {waiting} {returning}"
            rows = con.execute(sql, (now, holder, now)).fetchall()
        return [Relay(r[0], r[1], r[2], orjson.loads(r[3]), r[4], r[5]) for r in rows]

    async def relay_answer(self, relay_id: str, answer: Mapping[str, Any]) -> None:
        sql = "UPDATE relays SET answer = ? WHERE id = ?"
        await self._run(self._execute, sql, (orjson.dumps(answer).decode(), relay_id))

    async def relay_answer_of(self, relay_id: str) -> Mapping[str, Any] | None:
        return await self._run(self._relay_answer_of, relay_id)

    def _relay_answer_of(self, relay_id: str) -> Mapping[str, Any] | None:
        con = self._db
        row = con.execute("SELECT answer FROM relays WHERE id = ?", (relay_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        self._execute("DELETE FROM relays WHERE id = ?", (relay_id,))
        answer: Mapping[str, Any] = orjson.loads(row[0])
        return answer

    async def relay_withdraw(self, relay_id: str) -> bool:
        return await self._run(self._relay_withdraw, relay_id)

    def _relay_withdraw(self, relay_id: str) -> bool:
        con = self._db
        with _transaction(con):
            con.execute("DELETE FROM relays WHERE id = ? AND taken_at IS NULL", (relay_id,))
            return con.execute("SELECT 1 FROM relays WHERE id = ?", (relay_id,)).fetchone() is None

    # --- Cached results. ---

    async def cache_put(self, scope: str, key: str, result: Mapping[str, Any], ttl: float, max_entries: int) -> None:
        await self._run(self._cache_put, scope, key, orjson.dumps(result).decode(), ttl, max_entries)

    def _cache_put(self, scope: str, key: str, result: str, ttl: float, max_entries: int) -> None:
        con, now = self._db, self._clock()
        with _transaction(con):
            con.execute(
                "INSERT INTO cache VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, key) DO UPDATE SET "
                "result = excluded.result, cached_at = excluded.cached_at, expires_at = excluded.expires_at",
                (scope, key, result, now, now + ttl),
            )
            con.execute(_EVICT, (scope, scope, max_entries))

    async def cache_get(self, scope: str, key: str) -> CacheEntry | None:
        return await self._run(self._cache_get, scope, key)

    def _cache_get(self, scope: str, key: str) -> CacheEntry | None:
        sql = "SELECT result, cached_at FROM cache WHERE scope = ? AND key = ? AND expires_at > ?"
        row = self._db.execute(sql, (scope, key, self._clock())).fetchone()
        return None if row is None else CacheEntry(orjson.loads(row[0]), row[1])

    def _execute(self, sql: str, args: Sequence[Any]) -> None:
        con = self._db
        with _transaction(con):
            con.execute(sql, args)

    # --- Idempotency keys. ---

    async def idempotency_claim(self, scope: str, key: str, tool: str, ttl: float) -> IdempotencyEntry | None:
        return await self._run(self._idempotency_claim, scope, key, tool, ttl)

    def _idempotency_claim(self, scope: str, key: str, tool: str, ttl: float) -> IdempotencyEntry | None:
        now = self._clock()
        con = self._db
        with _transaction(con):
            con.execute("DELETE FROM idempotency WHERE scope = ? AND key = ? AND expires_at <= ?", (scope, key, now))
            cursor = con.execute(
                "INSERT INTO idempotency (scope, key, tool, created_at, expires_at, owner) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (scope, key, tool, now, now + ttl, self.instance),
            )
            if cursor.rowcount == 1:
                return None
            return self._idempotency_get(scope, key)

    async def idempotency_bind(self, scope: str, key: str, run_id: str) -> None:
        await self._run(
            self._execute, "UPDATE idempotency SET run_id = ? WHERE scope = ? AND key = ?", (run_id, scope, key)
        )

    async def idempotency_finish(self, scope: str, key: str, result: Mapping[str, Any]) -> None:
        await self._run(
            self._execute,
            "UPDATE idempotency SET result = ? WHERE scope = ? AND key = ?",
            (orjson.dumps(result).decode(), scope, key),
        )

    async def idempotency_release(self, scope: str, key: str) -> None:
        await self._run(self._execute, "DELETE FROM idempotency WHERE scope = ? AND key = ?", (scope, key))

    async def idempotency_get(self, scope: str, key: str) -> IdempotencyEntry | None:
        return await self._run(self._idempotency_get, scope, key)

    def _idempotency_get(self, scope: str, key: str) -> IdempotencyEntry | None:
        row = self._db.execute(
            "SELECT scope, key, tool, created_at, expires_at, run_id, result, owner FROM idempotency "
            "WHERE scope = ? AND key = ? AND expires_at > ?",
            (scope, key, self._clock()),
        ).fetchone()
        if row is None:
            return None
        result = None if row[6] is None else orjson.loads(row[6])
        return IdempotencyEntry(row[0], row[1], row[2], row[3], row[4], row[5], result, row[7])


class _transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on an error (the connection is in autocommit mode)."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self._con = con

    def __enter__(self) -> None:
        self._con.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._con.execute("COMMIT" if kind is None else "ROLLBACK")


def _migrate(con: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to the newest version, in one transaction (another gateway opening it waits).

    Raises:
        StoreError: the schema is newer than :data:`MIGRATIONS` knows.
    """
    with _transaction(con):
        con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        found = con.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
        check_version(found, len(MIGRATIONS), str(path))
        for script in MIGRATIONS[found:]:
            for statement in script:
                con.execute(statement)
        if found < len(MIGRATIONS):
            con.execute("DELETE FROM schema_version")
            con.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS),))
