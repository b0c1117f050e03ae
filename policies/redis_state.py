"""Limits and circuit breakers shared by replicas on Redis (``gateway.shared_state: redis://…``, DESIGN §6).

The same ``LimitState`` and ``BreakerState`` as :mod:`policies.state`, each operation one Lua function run
atomically in Redis, so every check-and-update is atomic across replicas:

* **token buckets** in the same GCRA form as in memory: one key per bucket holding the time it is full
  again, expiring when it is (memory stays bounded without pruning);
* **concurrency slots** as a sorted set per key: each slot is a member whose score is its lease's end.
  Taking one first drops expired leases, then counts. The replica holding slots renews their leases
  (every third of ``lease``); a replica that dies holding slots loses them within ``lease``;
* **a call's buckets and slots** in one operation (``enter``), all or nothing: admitting a call is one
  round trip however many rules apply;
* **circuits** as a hash (state, generation, consecutive failures, when and why it opened), a
  failure-rate window of 20 counters, and the half-open probes as a leased sorted set like the slots,
  so a probe held by a dead replica cannot keep the circuit half-open for ever.

Every operation is a function of ONE script (:mod:`policies.redis_script`), which runs a list of operations
in order and answers each: whatever a replica sends at once (a call's limits with the releases and success reports
queued before it, say) is one ``EVALSHA``, one command on the wire. redis-py spends about twice a
``PING`` on a pipeline of three commands and little more than one on a single command, so the batch is
what keeps a call at one round trip's cost. An operation that fails in Redis answers with its error
alone; the others in the batch still run.

Time is Redis's own (``TIME``, read once per batch): replicas' clocks never meet. Tests may pass a
``clock`` whose value goes to the script instead.

When Redis cannot be reached, ``failure`` decides: ``allow`` lets the call through unlimited (Envoy's
choice: the limits protect, they must not become the outage), ``deny`` refuses it with
``SharedStateUnavailable``. Every failure is counted (``on_failure(operation)``). After a failure the
state does not try Redis again for ``retry_interval`` seconds (a dead Redis costs each call nothing,
a black-holed one no timeout), then tries again: recovery needs no restart.

This module holds the connection, the background queue and the leases (``RedisState``); the limits are in
:mod:`policies.redis_limits`, the circuits in :mod:`policies.redis_breakers`.

Operations that change what a caller holds (taking slots, ``release``, the breaker's verdicts, a probe's
release) are shielded from cancellation, as ``policies.state`` asks. A cancelled read cannot leave its
reply for another caller: ``redis.asyncio`` drops a connection whose command was interrupted.
"""

import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

import anyio
from hiredis import pack_command
from redis.asyncio import Connection, Redis
from redis.exceptions import NoScriptError, RedisError

from gateway.errors import SharedStateUnavailable
from policies.redis_breakers import RedisBreakerState
from policies.redis_limits import RedisLimitState
from policies.redis_script import SCRIPT, SHA, Job, merge_into, us

__all__ = ["DEFAULT_LEASE", "RedisBreakerState", "RedisLimitState", "RedisState", "open_redis_state"]

logger = logging.getLogger(__name__)

DEFAULT_LEASE = 10.0
"""Seconds a concurrency slot or a probe slot is held without its holder renewing it."""
RETRY_INTERVAL = 0.5
"""Seconds after a failure during which Redis is not tried again."""
CLOSED_FOR = 0.5
"""Seconds a replica admits calls through a circuit it saw closed without asking Redis again: a circuit opened
elsewhere refuses calls here within this (the issue's bound is 1 s)."""
DRAIN = 2.0
"""Seconds the queued operations may take to reach Redis when the state closes."""
TIMEOUT = 1.0
"""Seconds a connection attempt or one command may take before Redis counts as unreachable."""

Failure = Literal["allow", "deny"]
T = TypeVar("T")


class RedisState:
    """One Redis connection pool behind a ``RedisLimitState`` and a ``RedisBreakerState``, and the leases they hold.

    ``prefix`` begins every key: replicas of one gateway share it (``patchbay:<gateway name>:``), other
    gateways on the same Redis do not. Run :meth:`renew` in a task for as long as the state is used
    (``open_redis_state`` does).

    What a call does after its answer (release its slots, report a success to its circuit) need not hold
    up the answer: with :meth:`send_later` running, those operations are queued and sent in order in the
    background, and a report that must be awaited (a failure, a probe's verdict) waits its turn in the
    same queue, so one replica's reports reach Redis in the order they were made. Releases from one sorted
    set, and successes of one circuit not parted by a verdict of it, are merged while they wait: one
    operation each, however many calls ended. An awaited operation (a call's limits, an admission through a
    circuit) takes what is queued along, ahead of it in the same script, when no batch is on its way: a
    replica making one call after another sends one command per call. A slot released but not yet removed
    in Redis is removed first by this replica's next ``enter`` of that key, so a caller that waits for its
    call to end never finds its own slot still taken. Without :meth:`send_later` running, every operation
    is awaited where it is made.
    """

    def __init__(
        self,
        client: "Redis",
        *,
        prefix: str,
        failure: Failure = "allow",
        lease: float = DEFAULT_LEASE,
        clock: Callable[[], float] | None = None,
        on_failure: Callable[[str], None] | None = None,
        retry_interval: float = RETRY_INTERVAL,
        closed_for: float = CLOSED_FOR,
    ) -> None:
        self.closed_for = closed_for
        """Seconds a circuit seen closed admits calls here without asking Redis (0: always ask)."""
        self.client = client
        self.prefix = prefix
        self.failure = failure
        self.lease = lease
        self.lease_us = us(lease)
        self._clock = clock
        self.on_failure = on_failure
        """Told the operation each time Redis could not be reached (the gateway counts them in a metric)."""
        self._retry_interval = retry_interval
        self._down_until = 0.0
        self._down = False
        self._instance = uuid.uuid4().hex[:12]
        self._serial = 0
        self.leases: dict[str, list[str]] = {}
        """Sorted-set key → the members this process holds there and renews."""
        self.releasing: dict[str, set[str]] = {}
        """Sorted-set key → members released here whose removal is queued, not yet done in Redis."""
        self._pending: deque[Job] = deque()
        """Operations queued for :meth:`send_later`, in the order they were made."""
        self._merging: dict[str, Job] = {}
        """First key → the queued job that later ones on that key merge into (``merge_into``), until it is sent or
        an operation on that key that cannot merge is queued after it."""
        self._wake = anyio.Event()
        self._turn = anyio.Lock()
        """Held while a batch of queued operations is on its way: batches reach Redis in the order they were taken."""
        self._sending = False
        self.drained = anyio.Event()
        """Set once :meth:`send_later` has sent everything queued before :meth:`stop_sending`."""
        self.limits = RedisLimitState(self)
        self.breakers = RedisBreakerState(self)

    def now(self) -> str:
        """The script's ``now`` argument: the test clock's µs, or -1 for Redis's own clock."""
        return "-1" if self._clock is None else repr(us(self._clock()))

    def member(self) -> str:
        """A new lease's member, unique across replicas."""
        self._serial += 1
        return f"{self._instance}:{self._serial}"

    async def _call(self, batch: Sequence[Job]) -> list[Any]:
        """The answers of ``batch``'s operations, run in order by one ``EVALSHA`` (an operation's error is its
        answer).

        Raises:
            RedisError, OSError: Redis cannot be reached, or the script as a whole failed.
        """
        keys: list[str] = []
        args: list[str] = [self.now()]
        for job in batch:
            keys += job.keys
            args.append(" ".join([job.name, str(len(job.keys)), str(len(job.texts)), *map(str, job.args)]))
            args += job.texts
        # hiredis packs the command in C (its stub types the tuple as of one element).
        command = pack_command(("EVALSHA", SHA, len(keys), *keys, *args))  # type: ignore[arg-type]
        try:
            answers: list[Any] = await self._command(command)
        except NoScriptError:  # a Redis that never had it, or restarted: load it and send again (nothing ran)
            await self.client.script_load(SCRIPT)
            answers = await self._command(command)
        return answers

    async def _command(self, command: bytes) -> Any:
        """The reply to ``command``, packed, on a connection of the client's pool, retried as the client retries.

        What ``Redis.execute_command`` does, less what this state never needs (its own argument encoding, a
        command name's reply callback, timings for OpenTelemetry): about a third of a round trip's cost. The
        connection disconnects itself when a send or read is interrupted (cancelled, timed out), so no reply is
        ever left on it for the next command.

        Raises:
            RedisError, OSError: Redis cannot be reached, or it answered with an error.
        """
        pool = self.client.connection_pool
        connection: Connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # (unannotated)

        async def send() -> Any:
            await connection.send_packed_command(command)
            return await connection.read_response()

        async def disconnect(error: Exception) -> None:  # before a retry, as the client does
            await connection.disconnect()

        try:
            return await connection.retry.call_with_retry(send, disconnect)
        finally:
            await pool.release(connection)

    async def run(self, job: Job) -> Any:
        """``job`` alone, awaited: its answer.

        Raises:
            RedisError, OSError: Redis cannot be reached, or the operation failed there.
        """
        answer = (await self._call((job,)))[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def hold(self, key: str, member: str) -> None:
        self.leases.setdefault(key, []).append(member)

    def drop(self, key: str, member: str) -> None:
        members = self.leases.get(key)
        if members is not None and member in members:
            members.remove(member)
            if not members:
                del self.leases[key]

    async def attempt(
        self, operation: str, action: Callable[[], Awaitable[T]], fallback: Callable[[], T], *, refuse: bool = True
    ) -> T:
        """``action()``, or, when Redis cannot be reached, ``fallback()`` under ``allow`` and
        ``SharedStateUnavailable`` under ``deny`` (with ``refuse``; without, ``fallback()`` either way: what
        reports a call that already happened must not turn its outcome into a refusal).

        Raises:
            SharedStateUnavailable: Redis cannot be reached, ``failure`` is ``deny`` and ``refuse`` is set.
        """
        if time.monotonic() < self._down_until:
            return self._fail(operation, fallback, refuse)
        try:
            result = await action()
        except (RedisError, OSError) as exc:
            self._went_down(exc)
            return self._fail(operation, fallback, refuse)
        self._reached()
        return result

    def _went_down(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self._retry_interval
        if not self._down:
            self._down = True
            what = "let through" if self.failure == "allow" else "refuse"
            logger.warning("shared state: Redis cannot be reached (%s); limits %s calls until it is back", exc, what)

    def _reached(self) -> None:
        if self._down:
            self._down = False
            logger.warning("shared state: Redis is reachable again")

    def _fail(self, operation: str, fallback: Callable[[], T], refuse: bool = True) -> T:
        if self.on_failure is not None:
            self.on_failure(operation)
        if self.failure == "deny" and refuse:
            raise SharedStateUnavailable(
                "The gateway's shared state (Redis) cannot be reached, so its limits cannot be checked and "
                "calls are refused (shared_state_failure: deny). Retry after 1 s.",
                retry_after=1.0,
            )
        return fallback()

    async def send_later(self) -> None:
        """Send the queued operations until :meth:`stop_sending` (then those still queued) or cancelled: what
        has queued up meanwhile goes in one script (one command), in the order it was queued."""
        self._sending = True
        try:
            while self._pending or self._sending:
                if not self._pending:
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    continue
                async with self._turn:
                    batch = self._take()
                    if batch:  # (an awaited operation may have taken them while this waited its turn)
                        await self._send(batch)
            self.drained.set()
        finally:
            self._sending = False

    def stop_sending(self) -> None:
        """No more queueing: what is queued is still sent; what comes later is awaited where it is made."""
        self._sending = False
        self._wake.set()

    def _queue(self, job: Job, *, merge: bool = False) -> None:
        key = job.keys[0]
        if merge:
            queued = self._merging.get(key)
            if queued is not None and merge_into(queued, job):
                return
            self._merging[key] = job
        else:  # what is queued on its key after it must come after it in Redis too
            self._merging.pop(key, None)
        self._pending.append(job)
        self._wake.set()

    def _take(self) -> list[Job]:
        """What is queued, in order, for one batch (nothing merges into it any more)."""
        batch = list(self._pending)
        self._pending.clear()
        self._merging.clear()
        return batch

    async def ask(self, job: Job) -> Any:
        """``job``'s answer, awaited, with what is queued for the background sent ahead of it in the same script:
        a replica calling one after another sends one command per call, not two. When nothing is queued, or a
        batch is on its way (the queued must not overtake it), ``job`` alone.

        Raises:
            RedisError, OSError: Redis cannot be reached, or the operation failed (``attempt`` handles both).
        """
        if not self._pending or self._turn.locked():
            return await self.run(job)
        job.awaited = True
        self._turn.acquire_nowait()
        try:
            with anyio.CancelScope(shield=True):  # the queued operations' effects and waiters must not be lost
                batch = self._take()
                batch.append(job)
                await self._send(batch)
        finally:
            self._turn.release()
        if job.failed:
            answer = job.answer
            raise answer if isinstance(answer, RedisError) else RedisError(f"{job.name}: Redis cannot be reached")
        return job.answer

    async def _send(self, batch: list[Job]) -> None:
        answers: list[Any] | None = None
        if time.monotonic() >= self._down_until:
            try:
                answers = await self._call(batch)
            except (RedisError, OSError) as exc:
                self._went_down(exc)
            else:
                self._reached()
        for index, job in enumerate(batch):
            answer = None if answers is None else answers[index]
            if answers is None or isinstance(answer, Exception):
                job.failed = True
                if not job.awaited and self.on_failure is not None:  # (an awaited one is counted where awaited)
                    for _ in range(job.reports):
                        self.on_failure(job.operation)
            job.answer = answer
            if job.after is not None:
                job.after(job)
            if job.done is not None:
                job.done.set()

    async def later(self, job: Job, *, merge: bool = False) -> None:
        """Send ``job`` in the background, after what is queued (awaited here without :meth:`send_later`); with
        ``merge``, into the same function's job on the same key if one is still queued (``merge_into``)."""
        if self._sending:
            self._queue(job, merge=merge)
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.attempt(job.operation, lambda: self.run(job), lambda: None, refuse=False)
            finally:
                if job.after is not None:
                    job.after(job)

    async def in_turn(self, job: Job, fallback: Callable[[], T], read: Callable[[Any], T]) -> T:
        """``job``'s answer, ``read``, after what is queued, awaited (shielded); ``fallback()`` when Redis cannot
        be reached, whatever ``failure`` says: these are reports of calls that happened (a verdict, a probe
        given up), whose outcome a refusal must not replace."""
        with anyio.CancelScope(shield=True):
            if not self._sending:

                async def direct() -> T:
                    return read(await self.run(job))

                return await self.attempt(job.operation, direct, fallback, refuse=False)
            job.done = anyio.Event()
            job.awaited = True
            self._queue(job)
            await job.done.wait()
        if job.failed:
            return self._fail(job.operation, fallback, refuse=False)
        return read(job.answer)

    async def renew(self) -> None:
        """Renew the leases this process holds, every third of ``lease``, until cancelled."""
        while True:
            await anyio.sleep(self.lease / 3)
            await self.renew_once()

    async def renew_once(self) -> None:
        held = {key: list(members) for key, members in self.leases.items() if members}
        if not held:
            return
        args: list[Any] = [self.lease_us]
        for members in held.values():
            args += [len(members), *members]

        async def renew() -> list[bytes]:
            lost: list[bytes] = await self.run(Job("renew", "renew", list(held), args))
            return lost

        no_answer: list[bytes] = []
        lost = {member.decode() for member in await self.attempt("renew", renew, lambda: no_answer)}
        if lost:
            logger.warning("shared state: %d lease(s) ran out before they were renewed", len(lost))
            for key, members in held.items():
                for member in members:
                    if member in lost:
                        self.drop(key, member)


@asynccontextmanager
async def open_redis_state(
    url: str,
    *,
    prefix: str,
    failure: Failure = "allow",
    lease: float = DEFAULT_LEASE,
    clock: Callable[[], float] | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> AsyncIterator[RedisState]:
    """A ``RedisState`` on ``url``, its leases renewed in the background until the block ends.

    Nothing is sent to Redis here: a Redis that is down at start is a failure of the first calls (under
    ``failure``), and is used once it is up.
    """
    client = Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, health_check_interval=30)
    state = RedisState(client, prefix=prefix, failure=failure, lease=lease, clock=clock, on_failure=on_failure)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(state.renew)
            tg.start_soon(state.send_later)
            try:
                yield state
            finally:
                state.stop_sending()
                with anyio.move_on_after(DRAIN, shield=True):
                    await state.drained.wait()  # releases still queued reach Redis before the connection closes
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()
