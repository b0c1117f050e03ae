"""The store in this process's memory (``gateway.store: memory``): nothing outlives the process.

It keeps the most recent runs, at most ``kept_runs`` of them and ``kept_events`` events in all:
whole finished runs are forgotten, oldest first, and runs still going are kept. Every run is this
instance's, so none is ever ``interrupted``. Gateways sharing one :class:`MemoryStore` (in one process, as
tests do) relay each other held calls' retries through it.
"""

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gateway.store import FOLDED_KINDS, CacheEntry, IdempotencyEntry, Relay, RunQuery, RunRecord, fold
from gateway.workflows.journal import JournalEvent

__all__ = ["DEFAULT_KEPT_EVENTS", "DEFAULT_KEPT_RUNS", "MemoryStore"]

DEFAULT_KEPT_RUNS = 1000
"""Runs a :class:`MemoryStore` keeps; older ones are forgotten first."""
DEFAULT_KEPT_EVENTS = 100_000
"""Events a :class:`MemoryStore` keeps across its runs (a 1,000-step run has about 3,000, more with jq): memory
stays bounded however large the workflows are. Runs still going are kept whole."""


class MemoryStore:
    """A :class:`~gateway.store.Store` in memory."""

    durable = False

    def __init__(
        self,
        kept_runs: int = DEFAULT_KEPT_RUNS,
        kept_events: int = DEFAULT_KEPT_EVENTS,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.instance = uuid.uuid4().hex
        self._kept_runs = kept_runs
        self._kept_events = kept_events
        self._clock = wall_clock
        self._events: OrderedDict[str, list[JournalEvent]] = OrderedDict()
        self._records: dict[str, RunRecord] = {}
        self._touched: dict[str, float] = {}
        """When a run's latest event that changed nothing else came: its record's ``updated_at``, set when the
        record is next read (a new record per event cost the journal ~15 µs a step: ``dataclasses.replace``)."""
        self._count = 0
        self._keys: dict[tuple[str, str], IdempotencyEntry] = {}
        self._cancels: dict[str, str] = {}
        self._relays: dict[str, _Relayed] = {}
        self._cache: dict[str, OrderedDict[str, tuple[CacheEntry, float]]] = {}
        """Each scope's cached results with their expiry, the most recently kept last."""

    # --- The journal. ---

    def record(self, event: JournalEvent) -> None:
        events = self._events.get(event.run_id)
        if events is None:
            events = self._events[event.run_id] = []
        events.append(event)
        self._count += 1
        record = self._records.get(event.run_id)
        if record is not None and event.kind not in FOLDED_KINDS:  # only its updated_at changes: set when read
            self._touched[event.run_id] = event.at
            self._forget()
            return
        self._touched.pop(event.run_id, None)
        record = fold(record, event)
        if record is not None:
            if event.kind == "run_started" and record.owner is None:
                record = replace(record, owner=self.instance)
            self._records[event.run_id] = record
        self._forget()

    async def commit(self) -> None:
        return None  # nothing to make durable

    async def append(self, event: JournalEvent) -> None:
        self.record(event)

    async def events(self, run_id: str) -> Sequence[JournalEvent]:
        return tuple(self._events.get(run_id, ()))

    def _forget(self) -> None:
        while len(self._events) > self._kept_runs or self._count > self._kept_events:
            finished = next((run for run, kept in self._events.items() if kept[-1].kind == "run_finished"), None)
            if finished is None:  # runs still going are kept whole
                break
            self._drop(finished)

    def _drop(self, run_id: str) -> None:
        self._count -= len(self._events.pop(run_id, ()))
        self._records.pop(run_id, None)
        self._touched.pop(run_id, None)

    def _record(self, run_id: str) -> RunRecord | None:
        """The run's record, its ``updated_at`` brought up to date."""
        record = self._records.get(run_id)
        touched = self._touched.pop(run_id, None)
        if record is not None and touched is not None:
            record = self._records[run_id] = replace(record, updated_at=touched)
        return record

    # --- Run history. ---

    async def run(self, run_id: str) -> RunRecord | None:
        return self._record(run_id)

    async def runs(self, query: RunQuery | None = None) -> Sequence[RunRecord]:
        query = query or RunQuery()
        chosen = []
        for run_id in reversed(self._events):
            record = self._record(run_id)
            if record is None or not _matches(record, query):
                continue
            chosen.append(record)
            if query.limit is not None and len(chosen) >= query.limit:
                break
        return chosen

    async def prune(self, *, age: float | None = None, count: int | None = None) -> int:
        now = self._clock()
        finished = [r for r in self._events if (rec := self._records.get(r)) is not None and rec.finished_at]
        doomed = set(finished[: max(0, len(finished) - count)] if count is not None else ())
        if age is not None:
            doomed.update(r for r in finished if (self._records[r].finished_at or now) < now - age)
        for run_id in doomed:
            self._drop(run_id)
        for scope_key, entry in list(self._keys.items()):
            if entry.expires_at <= now:
                del self._keys[scope_key]
        for relay_id, relayed in list(self._relays.items()):
            if relayed.relay.deadline < now:
                del self._relays[relay_id]
        for entries in self._cache.values():
            for key in [key for key, (_, expires_at) in entries.items() if expires_at <= now]:
                del entries[key]
        return len(doomed)

    # --- Ownership: every run is this instance's. ---

    async def heartbeat(self) -> None:
        return None

    async def claim(self, run_id: str) -> bool:
        return False  # no run is ever interrupted

    async def request_cancel(self, run_id: str, message: str) -> None:
        self._cancels[run_id] = message

    async def cancel_requests(self) -> Sequence[tuple[str, str]]:
        requests, self._cancels = list(self._cancels.items()), {}
        return requests

    async def mark(self, run_id: str, note: str | None) -> None:
        record = self._record(run_id)
        if record is not None:
            self._records[run_id] = replace(record, note=note)

    # --- Retries relayed to the replica holding their call. ---

    async def relay_put(self, holder: str, held: str, retry: Mapping[str, Any], deadline: float) -> str | None:
        if holder.partition("/")[0] != self.instance:
            return None  # another process's memory: gone with it, or never shared with this one
        relay = Relay(uuid.uuid4().hex, holder, held, retry, self._clock(), deadline)
        self._relays[relay.id] = _Relayed(relay)
        return relay.id

    async def relay_take(self, holder: str) -> Sequence[Relay]:
        now = self._clock()
        taken = [
            relayed
            for relayed in self._relays.values()
            if relayed.relay.holder == holder and not relayed.taken and relayed.relay.deadline > now
        ]
        for relayed in taken:
            relayed.taken = True
        return [relayed.relay for relayed in taken]

    async def relay_answer(self, relay_id: str, answer: Mapping[str, Any]) -> None:
        relayed = self._relays.get(relay_id)
        if relayed is not None:
            relayed.answer = answer

    async def relay_answer_of(self, relay_id: str) -> Mapping[str, Any] | None:
        relayed = self._relays.get(relay_id)
        if relayed is None or relayed.answer is None:
            return None
        del self._relays[relay_id]
        return relayed.answer

    async def relay_withdraw(self, relay_id: str) -> bool:
        relayed = self._relays.get(relay_id)
        if relayed is not None and relayed.taken:
            return False
        self._relays.pop(relay_id, None)
        return True

    # --- Idempotency keys. ---

    async def idempotency_claim(self, scope: str, key: str, tool: str, ttl: float) -> IdempotencyEntry | None:
        entry = await self.idempotency_get(scope, key)
        if entry is not None:
            return entry
        now = self._clock()
        self._keys[scope, key] = IdempotencyEntry(scope, key, tool, now, now + ttl, owner=self.instance)
        return None

    async def idempotency_bind(self, scope: str, key: str, run_id: str) -> None:
        self._update(scope, key, run_id=run_id)

    async def idempotency_finish(self, scope: str, key: str, result: Mapping[str, Any]) -> None:
        self._update(scope, key, result=result)

    async def idempotency_release(self, scope: str, key: str) -> None:
        self._keys.pop((scope, key), None)

    async def idempotency_get(self, scope: str, key: str) -> IdempotencyEntry | None:
        entry = self._keys.get((scope, key))
        if entry is None or entry.expires_at <= self._clock():
            return None
        return entry

    def _update(self, scope: str, key: str, **changes: Any) -> None:
        entry = self._keys.get((scope, key))
        if entry is not None:
            self._keys[scope, key] = replace(entry, **changes)

    # --- Cached results. ---

    async def cache_put(self, scope: str, key: str, result: Mapping[str, Any], ttl: float, max_entries: int) -> None:
        now = self._clock()
        entries = self._cache.setdefault(scope, OrderedDict())
        entries.pop(key, None)
        entries[key] = (CacheEntry(result, now), now + ttl)
        while len(entries) > max_entries:
            entries.popitem(last=False)

    async def cache_get(self, scope: str, key: str) -> CacheEntry | None:
        entries = self._cache.get(scope)
        kept = entries.get(key) if entries is not None else None
        if kept is None or kept[1] <= self._clock():
            return None
        return kept[0]

    async def close(self) -> None:
        return None


@dataclass(eq=False)
class _Relayed:
    relay: Relay
    taken: bool = False
    answer: Mapping[str, Any] | None = None


def _matches(record: RunRecord, query: RunQuery) -> bool:
    return (
        (query.workflow is None or record.workflow == query.workflow)
        and (query.status is None or record.status == query.status)
        and (query.since is None or record.started_at >= query.since)
        and (query.caller is None or (record.caller_kind, record.caller_id) == query.caller)
    )
