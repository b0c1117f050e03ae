"""Limits and circuit breakers shared by replicas on Redis (``gateway.shared_state: redis://…``, DESIGN §6).

The same ``LimitState`` and ``BreakerState`` as :mod:`policies.state`, each operation one Lua script,
so every check-and-update is atomic across replicas:

* **token buckets** in the same GCRA form as in memory: one key per bucket holding the time it is full
  again, expiring when it is (memory stays bounded without pruning);
* **concurrency slots** as a sorted set per key: each slot is a member whose score is its lease's end.
  Taking one first drops expired leases, then counts. The replica holding slots renews their leases
  (every third of ``lease``); a replica that dies holding slots loses them within ``lease``;
* **a call's buckets and slots** in one script (``enter``), all or nothing: admitting a call is one round
  trip however many rules apply;
* **circuits** as a hash (state, generation, consecutive failures, when and why it opened), a
  failure-rate window of 20 counters, and the half-open probes as a leased sorted set like the slots,
  so a probe held by a dead replica cannot keep the circuit half-open for ever.

Time is Redis's own (``TIME`` inside the script): replicas' clocks never meet. Tests may pass a
``clock`` whose value goes to the scripts instead.

When Redis cannot be reached, ``failure`` decides: ``allow`` lets the call through unlimited (Envoy's
choice: the limits protect, they must not become the outage), ``deny`` refuses it with
``SharedStateUnavailable``. Every failure is counted (``on_failure(operation)``). After a failure the
state does not try Redis again for ``retry_interval`` seconds (a dead Redis costs each call nothing,
a black-holed one no timeout), then tries again: recovery needs no restart.

Operations that change what a caller holds (taking slots, ``release``, the breaker's verdicts, a probe's
release) are shielded from cancellation, as ``policies.state`` asks. A cancelled read cannot leave its
reply for another caller: ``redis.asyncio`` drops a connection whose command was interrupted.
"""

import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from gateway.config import CircuitBreakerConfig
from gateway.errors import SharedStateUnavailable
from policies.state import CLOSED, HALF_OPEN, OPEN, Admission, Full, Refusal, Slot, Take

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

_NOW = """
local function now_us()
  local given = tonumber(ARGV[1])
  if given >= 0 then return given end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
"""

_ENTER = (
    _NOW
    + """
local now = now_us()
local takes = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local a = 4
local full = {}
local refused, longest = 0, 0
for k = 1, takes do
  local interval, burst = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local full_at = full[KEYS[k]] or tonumber(redis.call('GET', KEYS[k]) or '0')
  if full_at < now then full_at = now end
  local wait = (full_at - now) - (burst - 1) * interval
  if wait > 1 and wait > longest then refused, longest = k, wait end
  full[KEYS[k]] = full_at + interval
end
if refused > 0 then return {1, refused - 1, math.ceil(longest)} end
local counted = {}
for k = takes + 1, #KEYS do
  local limit, released = tonumber(ARGV[a]), tonumber(ARGV[a + 2])
  for j = 1, released do redis.call('ZREM', KEYS[k], ARGV[a + 2 + j]) end
  a = a + 3 + released
  if not counted[KEYS[k]] then
    redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now)
    counted[KEYS[k]] = redis.call('ZCARD', KEYS[k])
  end
  if counted[KEYS[k]] >= limit then return {2, k - takes - 1, 0} end
  counted[KEYS[k]] = counted[KEYS[k]] + 1
end
for k = 1, takes do
  local full_at = full[KEYS[k]]
  if full_at then
    redis.call('SET', KEYS[k], string.format('%.17g', full_at), 'PX', math.max(1, math.ceil((full_at - now) / 1000)))
    full[KEYS[k]] = nil
  end
end
a = 4 + 2 * takes
for k = takes + 1, #KEYS do
  redis.call('ZADD', KEYS[k], now + lease, ARGV[a + 1])
  redis.call('PEXPIRE', KEYS[k], math.ceil(lease / 1000) * 2)
  a = a + 3 + tonumber(ARGV[a + 2])
end
return {0}
"""
)
"""A call's limits, all or nothing: a token from each bucket, then a slot under each sorted set.
KEYS: the buckets, then the slots' sorted sets. ARGV: now, the number of buckets, the slots' lease µs; per bucket
µs per token and burst; per slot its limit, its new member, and the members this replica released there whose
removal may not have reached Redis yet (a count, then the members; removed first).
Returns {0} when all were taken; {1, bucket index, µs until its token}, the bucket whose token comes last, when
one has none (a take 1 µs early succeeds: ``SLACK``); else {2, slot index, 0} for the first full slot."""

_RENEW = (
    _NOW
    + """
local now = now_us()
local lease = tonumber(ARGV[2])
local i = 3
local lost = {}
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  i = i + 1
  for j = 1, n do
    if redis.call('ZSCORE', KEYS[k], ARGV[i]) then
      redis.call('ZADD', KEYS[k], now + lease, ARGV[i])
    else
      table.insert(lost, ARGV[i])
    end
    i = i + 1
  end
  redis.call('PEXPIRE', KEYS[k], math.ceil(lease / 1000) * 2)
end
return lost
"""
)
"""Extend the leases of the members listed per key (ARGV: now, lease µs, then per key a count and its members);
returns the members no longer held (their lease ran out and another took the slot, or their circuit changed)."""

_CIRCUIT = (
    _NOW
    + """
local function transition(state)
  redis.call('HINCRBY', KEYS[1], 'gen', 1)
  redis.call('HSET', KEYS[1], 'state', state, 'consec', 0)
  redis.call('DEL', KEYS[2], KEYS[3])
  return state
end
local function open(now, reason)
  redis.call('HSET', KEYS[1], 'opened_at', string.format('%.17g', now), 'reason', reason)
  return transition('open')
end
local function count(now, window, failed)
  local index = math.floor(now / (window / 20))
  redis.call('HINCRBY', KEYS[3], 'c' .. index, 1)
  redis.call('HINCRBY', KEYS[3], 'f' .. index, failed)
  local all = redis.call('HGETALL', KEYS[3])
  local calls, fails = 0, 0
  for i = 1, #all, 2 do
    local field = all[i]
    if tonumber(string.sub(field, 2)) <= index - 20 then
      redis.call('HDEL', KEYS[3], field)
    elseif string.sub(field, 1, 1) == 'c' then
      calls = calls + tonumber(all[i + 1])
    else
      fails = fails + tonumber(all[i + 1])
    end
  end
  redis.call('PEXPIRE', KEYS[3], math.ceil(window / 1000) * 2)
  return calls, fails
end
local function generation()
  return tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
end
local now = now_us()
"""
)
"""What the circuit scripts share. KEYS: the circuit's hash, its probes' sorted set, its failure-rate window."""

_ADMIT = (
    _CIRCUIT
    + """
local s = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'reason')
local state = s[1] or 'closed'
if state == 'closed' then return {1, generation(), 0, ''} end
local reason = s[3] or ''
local entered = ''
if state == 'open' then
  local left = tonumber(s[2]) + tonumber(ARGV[2]) - now
  if left > 0 then return {0, 'open', reason, math.ceil(left), redis.call('ZCARD', KEYS[2])} end
  entered = transition('half_open')
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local probes = redis.call('ZCARD', KEYS[2])
if probes >= tonumber(ARGV[3]) then return {0, 'half_open', reason, 0, probes} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4])
return {1, generation(), 1, entered}
"""
)
"""ARGV: now, reset_after µs, half_open_probes, the probe's member, lease µs.
Returns {1, generation, probe 0/1, state entered or ''} or {0, state, reason, µs left, probes}."""

_SUCCEEDED = (
    _CIRCUIT
    + """
if generation() ~= tonumber(ARGV[2]) then return '' end
if ARGV[3] == '1' then return transition('closed') end
redis.call('HSET', KEYS[1], 'consec', 0)
if ARGV[4] == '1' then count(now, tonumber(ARGV[5]), 0) end
return ''
"""
)
"""ARGV: now, generation, probe 0/1, failure rate counted 0/1, window µs. Returns the state entered, or ''."""

_FAILED = (
    _CIRCUIT
    + """
if generation() ~= tonumber(ARGV[2]) then return '' end
local err = ARGV[4]
if ARGV[3] == '1' then return open(now, 'a failed probe call (' .. err .. ')') end
local consec = redis.call('HINCRBY', KEYS[1], 'consec', 1)
local failures = tonumber(ARGV[5])
if failures > 0 and consec >= failures then
  return open(now, consec .. ' consecutive failures, the last: ' .. err)
end
local rate = tonumber(ARGV[6])
if rate > 0 then
  local calls, fails = count(now, tonumber(ARGV[8]), 1)
  if calls >= tonumber(ARGV[7]) and fails / calls >= rate then
    return open(now, fails .. ' failures in ' .. calls .. ' calls within ' .. ARGV[9] .. ', the last: ' .. err)
  end
end
return ''
"""
)
"""ARGV: now, generation, probe 0/1, error, failures (0: none), failure rate (0: none), min_calls, window µs,
the window as text. Returns the state entered, or ''."""

_ABANDONED = (
    _CIRCUIT
    + """
if generation() == tonumber(ARGV[2]) then redis.call('ZREM', KEYS[2], ARGV[3]) end
return ''
"""
)
"""ARGV: now, generation, the probe's member."""

_STATE = (
    _CIRCUIT
    + """
local s = redis.call('HMGET', KEYS[1], 'state', 'opened_at')
if not s[1] then return 'closed' end
if s[1] == 'open' and now >= tonumber(s[2]) + tonumber(ARGV[2]) then return 'half_open' end
return s[1]
"""
)
"""ARGV: now, reset_after µs."""


@dataclass(eq=False, slots=True)
class _Job:
    """One operation for the background queue: a script (by name) or, without one, ``ZREM keys[0] *args``."""

    operation: str
    script: str | None
    keys: list[str]
    args: list[Any]
    after: Callable[[], None] | None = None
    """Called once it was sent (or could not be)."""
    done: anyio.Event | None = None
    """Set once it was sent, for a job whose answer is awaited."""
    answer: Any = None
    failed: bool = False


def _us(seconds: float) -> float:
    return seconds * 1_000_000


class RedisState:
    """One Redis connection pool behind a ``RedisLimitState`` and a ``RedisBreakerState``, and the leases they hold.

    ``prefix`` begins every key: replicas of one gateway share it (``patchbay:<gateway name>:``), other
    gateways on the same Redis do not. Run :meth:`renew` in a task for as long as the state is used
    (``open_redis_state`` does).

    What a call does after its answer (release its slots, report a success to its circuit) need not hold
    up the answer: with :meth:`send_later` running, those operations are queued and sent in order in the
    background, and a report that must be awaited (a failure, a probe's verdict) waits its turn in the
    same queue, so one replica's reports reach Redis in the order they were made. An awaited script (a call's
    limits, an admission through a circuit) takes what is queued along, ahead of it in its own round trip,
    when no batch is on its way: a replica making one call after another sends one round trip per call. A
    slot released but not yet removed in Redis is removed first by this replica's next ``enter`` of that
    key, so a caller that waits for its call to end never finds its own slot still taken. Without
    :meth:`send_later` running, every operation is awaited where it is made.
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
        self._pending: deque[_Job] = deque()
        """Operations queued for :meth:`send_later`, in the order they were made."""
        self._wake = anyio.Event()
        self._turn = anyio.Lock()
        """Held while a batch of queued operations is on its way: batches reach Redis in the order they were taken."""
        self._sending = False
        self.drained = anyio.Event()
        """Set once :meth:`send_later` has sent everything queued before :meth:`stop_sending`."""
        self.limits = RedisLimitState(self)
        self.breakers = RedisBreakerState(self)
        register = client.register_script
        self.scripts = {
            name: register(source)
            for name, source in (
                ("enter", _ENTER),
                ("renew", _RENEW),
                ("admit", _ADMIT),
                ("succeeded", _SUCCEEDED),
                ("failed", _FAILED),
                ("abandoned", _ABANDONED),
                ("state", _STATE),
            )
        }

    def now(self) -> str:
        """The ``now`` argument of every script: the test clock's µs, or -1 for Redis's own clock."""
        return "-1" if self._clock is None else repr(_us(self._clock()))

    def member(self) -> str:
        """A new lease's member, unique across replicas."""
        self._serial += 1
        return f"{self._instance}:{self._serial}"

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self.scripts[name](keys=keys, args=[self.now(), *args])

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
        has queued up meanwhile goes in one pipeline (one round trip), in the order it was queued."""
        self._sending = True
        try:
            while self._pending or self._sending:
                if not self._pending:
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    continue
                async with self._turn:
                    batch = list(self._pending)
                    self._pending.clear()
                    if batch:  # (an awaited script may have taken them while this waited its turn)
                        await self._send(batch)
            self.drained.set()
        finally:
            self._sending = False

    def stop_sending(self) -> None:
        """No more queueing: what is queued is still sent; what comes later is awaited where it is made."""
        self._sending = False
        self._wake.set()

    def _queue(self, job: "_Job") -> None:
        self._pending.append(job)
        self._wake.set()

    async def script_with_queued(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """``script(name, keys, args)``, awaited, with what is queued for the background sent ahead of it in the
        same round trip: a replica calling one after another sends one round trip per call, not two. When
        nothing is queued, or a batch is on its way (the queued must not overtake it), just the script.

        Raises:
            RedisError, OSError: Redis cannot be reached, or the script failed (``attempt`` handles both).
        """
        if not self._pending or self._turn.locked():
            return await self.script(name, keys, args)
        job = _Job(name, name, keys, args, done=anyio.Event())
        self._turn.acquire_nowait()
        try:
            with anyio.CancelScope(shield=True):  # the queued operations' effects and waiters must not be lost
                batch = [*self._pending, job]
                self._pending.clear()
                await self._send(batch)
        finally:
            self._turn.release()
        if job.failed:
            raise job.answer if isinstance(job.answer, RedisError) else RedisError(f"{name}: Redis cannot be reached")
        return job.answer

    async def _send(self, batch: list["_Job"]) -> None:
        answers: list[Any] | None = None
        if time.monotonic() >= self._down_until:
            pipe = self.client.pipeline(transaction=False)
            for job in batch:
                if job.script is None:
                    pipe.zrem(job.keys[0], *job.args)
                else:  # evalsha itself: a Script on a pipeline asks SCRIPT EXISTS first, a round trip per batch
                    pipe.evalsha(self.scripts[job.script].sha, len(job.keys), *job.keys, self.now(), *job.args)
            try:
                answers = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                self._went_down(exc)
            else:
                self._reached()
        for index, job in enumerate(batch):
            answer = answers[index] if answers is not None else None
            if isinstance(answer, NoScriptError) and job.script is not None:  # Redis restarted: load, then again
                with contextlib.suppress(RedisError, OSError):
                    answer = await self.script(job.script, job.keys, job.args)
            if answers is None or isinstance(answer, Exception):
                job.failed = True
                job.answer = answer
                if job.done is None and self.on_failure is not None:
                    self.on_failure(job.operation)  # an awaited job is counted where it is awaited
            else:
                job.answer = answer
            if job.after is not None:
                job.after()
            if job.done is not None:
                job.done.set()

    async def later(self, job: "_Job") -> None:
        """Send ``job`` in the background, after what is queued (awaited here without :meth:`send_later`)."""
        if self._sending:
            self._queue(job)
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.attempt(job.operation, lambda: self._run(job), lambda: None, refuse=False)
            finally:
                if job.after is not None:
                    job.after()

    async def in_turn(self, job: "_Job", fallback: Callable[[], T], read: Callable[[Any], T]) -> T:
        """``job``'s answer, ``read``, after what is queued, awaited (shielded); ``fallback()`` when Redis cannot
        be reached, whatever ``failure`` says: these are reports of calls that happened (a verdict, a probe
        given up), whose outcome a refusal must not replace."""
        with anyio.CancelScope(shield=True):
            if not self._sending:

                async def direct() -> T:
                    return read(await self._run(job))

                return await self.attempt(job.operation, direct, fallback, refuse=False)
            job.done = anyio.Event()
            self._queue(job)
            await job.done.wait()
        if job.failed:
            return self._fail(job.operation, fallback, refuse=False)
        return read(job.answer)

    async def _run(self, job: "_Job") -> Any:
        if job.script is None:
            return await self.client.zrem(job.keys[0], *job.args)
        return await self.script(job.script, job.keys, job.args)

    async def renew(self) -> None:
        """Renew the leases this process holds, every third of ``lease``, until cancelled."""
        while True:
            await anyio.sleep(self.lease / 3)
            await self.renew_once()

    async def renew_once(self) -> None:
        held = {key: list(members) for key, members in self.leases.items() if members}
        if not held:
            return
        args: list[Any] = [_us(self.lease)]
        for members in held.values():
            args += [len(members), *members]

        async def renew() -> list[bytes]:
            lost: list[bytes] = await self.script("renew", list(held), args)
            return lost

        no_answer: list[bytes] = []
        lost = {member.decode() for member in await self.attempt("renew", renew, lambda: no_answer)}
        if lost:
            logger.warning("shared state: %d lease(s) ran out before they were renewed", len(lost))
            for key, members in held.items():
                for member in members:
                    if member in lost:
                        self.drop(key, member)


class RedisLimitState:
    """``LimitState`` on Redis: buckets and leased slots shared by every replica using the same prefix."""

    def __init__(self, shared: RedisState) -> None:
        self._shared = shared
        self._phantoms: dict[str, int] = {}
        """Slots counted as held while Redis could not be reached (``allow``): released without Redis."""

    async def take(self, key: str, rate: float, burst: float) -> float:
        refused = await self.enter((Take(key, rate, burst),), ())
        return 0.0 if refused is None else refused.wait

    async def acquire(self, key: str, limit: int) -> bool:
        return await self.enter((), (Slot(key, limit),)) is None

    async def enter(self, takes: Sequence[Take], slots: Sequence[Slot]) -> Full | None:
        # One script whatever it holds; a failure is counted as what it did (`take`, `acquire`, or both: `enter`).
        operation = "enter" if takes and slots else "take" if takes else "acquire"
        shared = self._shared
        prefix = shared.prefix
        zsets = [prefix + slot.key for slot in slots]
        members = [shared.member() for _ in slots]

        async def enter() -> Full | None:
            args: list[Any] = [len(takes), _us(shared.lease)]
            for take in takes:
                args += [repr(_us(1 / take.rate)), repr(take.burst)]
            for slot, zset, member in zip(slots, zsets, members, strict=True):
                released = list(shared.releasing.get(zset, ()))
                args += [slot.limit, member, len(released), *released]
            keys = [*(prefix + take.key for take in takes), *zsets]
            answer: list[int] = await shared.script_with_queued("enter", keys, args)
            if answer[0] == 0:
                for zset, member in zip(zsets, members, strict=True):
                    shared.hold(zset, member)
                return None
            return Full(bucket=answer[0] == 1, index=answer[1], wait=answer[2] / 1_000_000)

        def unlimited() -> None:  # Redis away under `allow`: every slot counted here, released without Redis
            for slot in slots:
                self._phantoms[slot.key] = self._phantoms.get(slot.key, 0) + 1

        if not slots:  # nothing held comes of it: a cancelled take at worst spends a token
            return await shared.attempt(operation, enter, unlimited)
        with anyio.CancelScope(shield=True):
            refused = await shared.attempt(operation, enter, unlimited)
        return refused

    async def release(self, key: str) -> None:
        phantoms = self._phantoms.get(key, 0)
        if phantoms:
            if phantoms == 1:
                del self._phantoms[key]
            else:
                self._phantoms[key] = phantoms - 1
            return
        shared = self._shared
        zset = shared.prefix + key
        members = shared.leases.get(zset)
        if not members:
            return  # its lease ran out while Redis could not be reached
        member = members[-1]
        shared.drop(zset, member)
        releasing = shared.releasing.setdefault(zset, set())
        releasing.add(member)

        def released() -> None:  # done, or Redis did not get it: then its lease runs out on its own
            releasing.discard(member)
            if not releasing and shared.releasing.get(zset) is releasing:
                del shared.releasing[zset]

        await shared.later(_Job("release", None, [zset], [member], after=released))


class RedisBreakerState:
    """``BreakerState`` on Redis: one circuit per server, the same for every replica using the same prefix.

    A closed circuit is the common case and asks nothing of Redis to admit a call: having seen it closed,
    this replica admits calls for ``shared.closed_for`` seconds (half a second) without asking again, so a
    circuit another replica opens refuses calls here within that time. What this replica sees fail asks
    Redis again at once (a failure forgets what it saw), so its own failures open the circuit as promptly as
    in memory, and every verdict still reaches Redis.
    """

    def __init__(self, shared: RedisState) -> None:
        self._shared = shared
        self._closed: dict[str, tuple[int, float]] = {}
        """Circuit → the generation it was seen closed in, and until when (monotonic) that sight holds."""

    def _keys(self, key: str) -> list[str]:
        base = f"{self._shared.prefix}circuit:{key}"
        return [base, base + ":probes", base + ":window"]

    async def admit(self, key: str, config: CircuitBreakerConfig) -> Admission | Refusal:
        shared = self._shared
        seen = self._closed.get(key)
        if seen is not None and time.monotonic() < seen[1]:
            return Admission(seen[0], probe=False)
        keys = self._keys(key)
        member = shared.member()

        async def admit() -> Admission | Refusal:
            args = [_us(config.reset_after), config.half_open_probes, member, _us(shared.lease)]
            answer = await shared.script_with_queued("admit", keys, args)
            if answer[0] == 0:
                state, reason, left, probes = (_text(answer[1]), _text(answer[2]), answer[3], answer[4])
                return Refusal(state, reason, left / 1_000_000, probes)
            probe = answer[2] == 1
            if probe:
                shared.hold(keys[1], member)
            elif shared.closed_for > 0:  # admitted without a probe: the circuit is closed
                self._closed[key] = (answer[1], time.monotonic() + shared.closed_for)
            return Admission(answer[1], probe=probe, entered=_text(answer[3]) or None, token=member if probe else "")

        # Unlimited while Redis is away: an admission no verdict is reported for (generation -1).
        return await shared.attempt("admit", admit, lambda: Admission(-1, probe=False))

    async def succeeded(self, key: str, config: CircuitBreakerConfig, admission: Admission) -> str | None:
        window = [int(config.failure_rate is not None), _us(config.window)]
        if admission.probe or admission.generation < 0:
            return await self._verdict("succeeded", key, admission, window)
        # A success that is not a probe's changes no state (it ends a failure streak): sent in the background.
        await self._shared.later(_Job("succeeded", "succeeded", self._keys(key), [admission.generation, 0, *window]))
        return None

    async def failed(self, key: str, config: CircuitBreakerConfig, admission: Admission, error: str) -> str | None:
        self._closed.pop(key, None)  # it may open now: the next call asks Redis
        args = [
            error,
            config.failures or 0,
            repr(config.failure_rate or 0),
            config.min_calls,
            _us(config.window),
            f"{config.window:g} s",
        ]
        return await self._verdict("failed", key, admission, args)

    async def _verdict(self, name: str, key: str, admission: Admission, args: list[Any]) -> str | None:
        if admission.generation < 0:
            return None
        shared = self._shared
        keys = self._keys(key)
        if admission.probe:
            shared.drop(keys[1], admission.token)

        job = _Job(name, name, keys, [admission.generation, int(admission.probe), *args])
        return await shared.in_turn(job, lambda: None, lambda entered: _text(entered) or None)

    async def abandoned(self, key: str, admission: Admission) -> None:
        if admission.generation < 0 or not admission.probe:
            return
        shared = self._shared
        keys = self._keys(key)
        shared.drop(keys[1], admission.token)

        job = _Job("abandoned", "abandoned", keys, [admission.generation, admission.token])
        await shared.in_turn(job, lambda: None, lambda answer: None)

    async def state(self, key: str, config: CircuitBreakerConfig) -> str:
        shared = self._shared

        async def state() -> str:
            return _text(await shared.script("state", self._keys(key), [_us(config.reset_after)]))

        return await shared.attempt("state", state, lambda: CLOSED)


def _text(value: bytes | str | int) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


assert {CLOSED, OPEN, HALF_OPEN} == {"closed", "open", "half_open"}  # the scripts' spelling of the states


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
