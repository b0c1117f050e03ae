"""What the SQL stores share: group commit, the owner stamp on a run's record, and a record's JSON form."""

import dataclasses
import hashlib
import queue
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import orjson

from gateway.errors import StoreError
from gateway.store import RunRecord, fold
from gateway.workflows.journal import JournalEvent

__all__ = [
    "FINISHED",
    "RUN_COLUMNS",
    "UPSERT_RUN",
    "GroupCommit",
    "Worker",
    "check_version",
    "fold_owned",
    "instance_key",
    "record_from_json",
    "record_from_row",
    "record_json",
    "run_row",
]

FINISHED = ("succeeded", "failed", "cancelled")
"""The statuses of a run that ended."""

T = TypeVar("T")
R = TypeVar("R")

_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(RunRecord))


def fold_owned(record: RunRecord | None, event: JournalEvent, instance: str) -> RunRecord | None:
    """:func:`~gateway.store.fold`, with a run started here owned by ``instance`` (as :class:`MemoryStore` does)."""
    folded = fold(record, event)
    if folded is not None and event.kind == "run_started" and folded.owner is None:
        folded = dataclasses.replace(folded, owner=instance)
    return folded


def record_json(record: RunRecord) -> bytes:
    """Every field of ``record`` as a JSON object."""
    return orjson.dumps({name: getattr(record, name) for name in _RECORD_FIELDS})


def record_from_json(data: str | bytes, **columns: Any) -> RunRecord:
    """The record :func:`record_json` wrote, with ``columns`` (owner, status, note: what SQL updates) over it."""
    fields = orjson.loads(data)
    fields.update(columns)
    return RunRecord(**{name: fields[name] for name in _RECORD_FIELDS if name in fields})


def check_version(found: int, known: int, where: str) -> None:
    """Refuse a schema newer than this Patchbay's.

    Raises:
        StoreError: ``found`` is newer than ``known``.
    """
    if found > known:
        raise StoreError(
            f"the store {where} has schema version {found}, newer than version {known}, the newest this Patchbay "
            "knows: it was written by a newer Patchbay; upgrade Patchbay to use it"
        )


def run_row(record: RunRecord) -> tuple[Any, ...]:
    """``record`` as a row of the ``runs`` table, its columns in order."""
    return (
        record.run_id,
        record.workflow,
        record.status,
        record.started_at,
        record.caller_kind,
        record.caller_id,
        record.owner,
        record.finished_at,
        record.note,
        record_json(record).decode(),
    )


UPSERT_RUN = (
    "INSERT INTO runs VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (run_id) DO UPDATE SET "
    "workflow = excluded.workflow, status = excluded.status, started_at = excluded.started_at, "
    "caller_kind = excluded.caller_kind, caller_id = excluded.caller_id, finished_at = excluded.finished_at, "
    "record = excluded.record"
)
"""Insert or update a :func:`run_row`; the owner and the note are set on insert only (claim and mark change them)."""

RUN_COLUMNS = "record, owner, status, note"
"""What :func:`record_from_row` reads."""


def record_from_row(row: Sequence[Any]) -> RunRecord:
    """The record in a row of :data:`RUN_COLUMNS`."""
    return record_from_json(row[0], owner=row[1], status=row[2], note=row[3])


def instance_key(instance: str) -> int:
    """A signed 64-bit number for ``instance``: its PostgreSQL advisory lock key."""
    return int.from_bytes(hashlib.blake2b(instance.encode(), digest_size=8).digest(), "big", signed=True)


@dataclass(eq=False)
class _Round:
    done: anyio.Event = field(default_factory=anyio.Event)
    error: StoreError | None = None


class GroupCommit(Generic[T]):
    """Events (of type ``T``) buffered by :meth:`record` and written by :meth:`commit` in rounds of one
    transaction each.

    While a round is being written, more events are recorded; the commits waiting for it then write all
    of them in the next round, so any number of concurrent commits cost one or two transactions. A round
    that fails puts its events back (nothing recorded is dropped), and the commits that waited for it
    raise its :class:`~gateway.errors.StoreError`; the next commit tries them again.
    """

    def __init__(self, write: Callable[[Sequence[T]], Awaitable[None]]) -> None:
        self._write = write
        self._buffer: list[T] = []
        self._recorded = 0
        self._committed = 0
        self._round: _Round | None = None
        self.transactions = 0
        """Rounds written: what the group-commit tests count."""

    @property
    def pending(self) -> int:
        """Events recorded and not committed yet."""
        return self._recorded - self._committed

    def record(self, event: T) -> None:
        self._buffer.append(event)
        self._recorded += 1

    async def commit(self) -> None:
        """Return once every event recorded before the call is committed.

        Raises:
            StoreError: the round that was to commit them failed.
        """
        target = self._recorded
        while self._committed < target:
            current = self._round
            if current is None:
                await self._write_round()
                continue
            await current.done.wait()
            if current.error is not None:
                raise current.error

    async def _write_round(self) -> None:
        current = self._round = _Round()
        batch, self._buffer = self._buffer, []
        end = self._recorded
        try:
            # Shielded: a round is written whole, whoever of its waiters is cancelled meanwhile.
            with anyio.CancelScope(shield=True):
                await self._write(batch)
        except StoreError as exc:
            self._buffer[:0] = batch
            current.error = exc
            raise
        else:
            self._committed = end
            self.transactions += 1
        finally:
            self._round = None
            current.done.set()


Pending = tuple[JournalEvent, str]
"""An event recorded and not yet committed, with its data as JSON text."""


class Journaled:
    """The journal part of a store whose commits are :class:`GroupCommit` rounds of :data:`Pending` events."""

    _group: "GroupCommit[Pending]"

    def record(self, event: JournalEvent) -> None:
        """Buffer ``event``.

        Raises:
            TypeError: its data is not JSON.
        """
        self._group.record((event, orjson.dumps(event.data).decode()))

    async def commit(self) -> None:
        await self._group.commit()

    async def append(self, event: JournalEvent) -> None:
        self.record(event)
        await self._group.commit()


class Worker:
    """One thread that runs a store's blocking calls, one at a time, in the order they come.

    Cheaper than ``anyio.to_thread.run_sync`` with a limiter of one (measured: ≈40 against ≈50–75 µs a
    call here), and every call runs on the same thread, as a SQLite connection prefers.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], _Call] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """``fn(*args)`` on the thread. A caller cancelled meanwhile still waits for it to finish, as
        ``anyio.to_thread.run_sync`` does, so nothing it started is left half done behind its back."""
        call = _Call(anyio.Event(), anyio.lowlevel.current_token())
        self._calls.put((lambda: fn(*args), call))
        with anyio.CancelScope(shield=True):
            await call.done.wait()
        await anyio.lowlevel.checkpoint_if_cancelled()
        if call.error is not None:
            raise call.error
        result: R = call.result
        return result

    def stop(self) -> None:
        """End the thread once the calls queued before have run."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, call = item
            try:
                call.result = fn()
            except BaseException as exc:  # handed to the caller, on the event loop
                call.error = exc
            try:
                anyio.from_thread.run_sync(call.done.set, token=call.token)
            except RuntimeError:  # the event loop is gone: nobody waits any more
                pass


@dataclass(eq=False)
class _Call:
    done: anyio.Event
    token: Any
    result: Any = None
    error: BaseException | None = None
