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

Every operation is a function of ONE script (``_BATCH``), which runs a list of operations in order and
answers each: whatever a replica sends at once (a call's limits with the releases and success reports
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

Operations that change what a caller holds (taking slots, ``release``, the breaker's verdicts, a probe's
release) are shielded from cancellation, as ``policies.state`` asks. A cancelled read cannot leave its
reply for another caller: ``redis.asyncio`` drops a connection whose command was interrupted.
"""

import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio
from hiredis import pack_command
from redis.asyncio import Connection, Redis
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

_BATCH = """
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function enter(K, A)
  local takes, lease = tonumber(A[1]), tonumber(A[2])
  local a = 3
  local full = {}
  local refused, longest = 0, 0
  for k = 1, takes do
    local interval, burst = tonumber(A[a]), tonumber(A[a + 1])
    a = a + 2
    local full_at = full[K[k]] or tonumber(redis.call('GET', K[k]) or '0')
    if full_at < now then full_at = now end
    local wait = (full_at - now) - (burst - 1) * interval
    if wait > 1 and wait > longest then refused, longest = k, wait end
    full[K[k]] = full_at + interval
  end
  if refused > 0 then return {1, refused - 1, math.ceil(longest)} end
  local counted = {}
  for k = takes + 1, #K do
    local limit, released = tonumber(A[a]), tonumber(A[a + 2])
    for j = 1, released do redis.call('ZREM', K[k], A[a + 2 + j]) end
    a = a + 3 + released
    if not counted[K[k]] then
      redis.call('ZREMRANGEBYSCORE', K[k], '-inf', now)
      counted[K[k]] = redis.call('ZCARD', K[k])
    end
    if counted[K[k]] >= limit then return {2, k - takes - 1, 0} end
    counted[K[k]] = counted[K[k]] + 1
  end
  for k = 1, takes do
    local full_at = full[K[k]]
    if full_at then
      redis.call('SET', K[k], string.format('%.17g', full_at), 'PX', math.max(1, math.ceil((full_at - now) / 1000)))
      full[K[k]] = nil
    end
  end
  a = 3 + 2 * takes
  for k = takes + 1, #K do
    redis.call('ZADD', K[k], now + lease, A[a + 1])
    redis.call('PEXPIRE', K[k], math.ceil(lease / 1000) * 2)
    a = a + 3 + tonumber(A[a + 2])
  end
  return {0}
end

local function release(K, A)
  for j = 1, #A do redis.call('ZREM', K[1], A[j]) end
  return #A
end

local function renew(K, A)
  local lease = tonumber(A[1])
  local i = 2
  local lost = {}
  for k = 1, #K do
    local n = tonumber(A[i])
    i = i + 1
    for j = 1, n do
      if redis.call('ZSCORE', K[k], A[i]) then
        redis.call('ZADD', K[k], now + lease, A[i])
      else
        table.insert(lost, A[i])
      end
      i = i + 1
    end
    redis.call('PEXPIRE', K[k], math.ceil(lease / 1000) * 2)
  end
  return lost
end

local function transition(K, state)
  redis.call('HINCRBY', K[1], 'gen', 1)
  redis.call('HSET', K[1], 'state', state, 'consec', 0)
  redis.call('DEL', K[2], K[3])
  return state
end

local function open(K, reason)
  redis.call('HSET', K[1], 'opened_at', string.format('%.17g', now), 'reason', reason)
  return transition(K, 'open')
end

local function count(K, window, calls, failed)
  local index = math.floor(now / (window / 20))
  redis.call('HINCRBY', K[3], 'c' .. index, calls)
  redis.call('HINCRBY', K[3], 'f' .. index, failed)
  local all = redis.call('HGETALL', K[3])
  local total, fails = 0, 0
  for i = 1, #all, 2 do
    local field = all[i]
    if tonumber(string.sub(field, 2)) <= index - 20 then
      redis.call('HDEL', K[3], field)
    elseif string.sub(field, 1, 1) == 'c' then
      total = total + tonumber(all[i + 1])
    else
      fails = fails + tonumber(all[i + 1])
    end
  end
  redis.call('PEXPIRE', K[3], math.ceil(window / 1000) * 2)
  return total, fails
end

local function generation(K)
  return tonumber(redis.call('HGET', K[1], 'gen') or '0')
end

local function admit(K, A)
  local s = redis.call('HMGET', K[1], 'state', 'opened_at', 'reason')
  local state = s[1] or 'closed'
  if state == 'closed' then return {1, generation(K), 0, ''} end
  local reason = s[3] or ''
  local entered = ''
  if state == 'open' then
    local left = tonumber(s[2]) + tonumber(A[1]) - now
    if left > 0 then return {0, 'open', reason, math.ceil(left), redis.call('ZCARD', K[2])} end
    entered = transition(K, 'half_open')
  end
  redis.call('ZREMRANGEBYSCORE', K[2], '-inf', now)
  local probes = redis.call('ZCARD', K[2])
  if probes >= tonumber(A[2]) then return {0, 'half_open', reason, 0, probes} end
  redis.call('ZADD', K[2], now + tonumber(A[4]), A[3])
  return {1, generation(K), 1, entered}
end

local function succeeded(K, A)
  if generation(K) ~= tonumber(A[1]) then return '' end
  if A[2] == '1' then return transition(K, 'closed') end
  redis.call('HSET', K[1], 'consec', 0)
  if A[3] == '1' then count(K, tonumber(A[4]), tonumber(A[5]), 0) end
  return ''
end

local function failed(K, A)
  if generation(K) ~= tonumber(A[1]) then return '' end
  local err = A[7]
  if A[2] == '1' then return open(K, 'a failed probe call (' .. err .. ')') end
  local consec = redis.call('HINCRBY', K[1], 'consec', 1)
  local failures = tonumber(A[3])
  if failures > 0 and consec >= failures then
    return open(K, consec .. ' consecutive failures, the last: ' .. err)
  end
  local rate = tonumber(A[4])
  if rate > 0 then
    local calls, fails = count(K, tonumber(A[6]), 1, 1)
    if calls >= tonumber(A[5]) and fails / calls >= rate then
      return open(K, fails .. ' failures in ' .. calls .. ' calls within ' .. A[8] .. ', the last: ' .. err)
    end
  end
  return ''
end

local function abandoned(K, A)
  if generation(K) == tonumber(A[1]) then redis.call('ZREM', K[2], A[2]) end
  return ''
end

local function state(K, A)
  local s = redis.call('HMGET', K[1], 'state', 'opened_at')
  if not s[1] then return 'closed' end
  if s[1] == 'open' and now >= tonumber(s[2]) + tonumber(A[1]) then return 'half_open' end
  return s[1]
end

local operations = {
  enter = enter, release = release, renew = renew, admit = admit, succeeded = succeeded, failed = failed,
  abandoned = abandoned, state = state,
}
local answers = {}
local k, a = 0, 2
while a <= #ARGV do
  local name, nkeys, texts, rest = string.match(ARGV[a], '^(%S+) (%d+) (%d+) ?(.*)$')
  local K, A, n = {}, {}, 0
  for j = 1, tonumber(nkeys) do K[j] = KEYS[k + j] end
  for word in string.gmatch(rest, '%S+') do
    n = n + 1
    A[n] = word
  end
  for j = 1, tonumber(texts) do A[n + j] = ARGV[a + j] end
  local ok, answer = pcall(operations[name], K, A)
  if ok then
    answers[#answers + 1] = answer
  else  -- the operation's error is its answer alone; what it wrote stays, as in a script of its own
    answers[#answers + 1] = {err = tostring(type(answer) == 'table' and answer.err or answer)}
  end
  k, a = k + tonumber(nkeys), a + 1 + tonumber(texts)
end
return answers
"""
"""The one script. ARGV: ``now`` (the test clock's µs, or -1 for Redis's ``TIME``), then per operation one
argument, ``<function> <its keys> <its texts> <argument> <argument> …`` (numbers and members, space-separated:
redis-py spends about a microsecond on each argument it sends, so a call's operations are three arguments,
not thirty), followed by its texts, the arguments that may hold a space, one each. KEYS holds every
operation's keys, in the same order. Returns each operation's answer, in order (an error reply for one that
failed). The functions, their keys (K) and arguments (A, the texts last):

* ``enter``: a call's limits, all or nothing: a token from each bucket, then a slot under each sorted set.
  K: the buckets, then the slots' sorted sets. A: the number of buckets, the slots' lease µs; per bucket µs per
  token and burst; per slot its limit, its new member, and the members this replica released there whose
  removal may not have reached Redis yet (a count, then the members; removed first). Answers {0} when all were
  taken; {1, bucket index, µs until its token}, the bucket whose token comes last, when one has none (a take
  1 µs early succeeds: ``SLACK``); else {2, slot index, 0} for the first full slot.
* ``release``: K: a sorted set; A: the members to remove. Answers how many were named.
* ``renew``: extend the leases of the members listed per key (A: lease µs, then per key a count and its
  members); answers the members no longer held (their lease ran out and another took the slot, or their
  circuit changed).
* The circuit's functions, K: its hash, its probes' sorted set, its failure-rate window.
  ``admit`` (A: reset_after µs, half_open_probes, the probe's member, lease µs) answers {1, generation,
  probe 0/1, state entered or ''} or {0, state, reason, µs left, probes}. ``succeeded`` (A: generation,
  probe 0/1, failure rate counted 0/1, window µs, how many successes) and ``failed`` (A: generation, probe 0/1,
  failures (0: none), failure rate (0: none), min_calls, window µs; texts: the error, the window as text) answer
  the state entered, or ''. ``abandoned`` (A: generation, the probe's member) answers ''. ``state`` (A: reset_after µs)
  answers the state, changing nothing.
"""

_SHA = hashlib.sha1(_BATCH.encode(), usedforsecurity=False).hexdigest()
"""What Redis names the script (its SHA-1): sent without loading it first; loaded when Redis says it lacks it."""


@dataclass(eq=False, slots=True)
class _Job:
    """One operation of the script: its function ``name`` there, its keys and arguments."""

    operation: str
    """What a failure to reach Redis is counted as (``take``, say, for an ``enter`` of buckets alone)."""
    name: str
    keys: list[str]
    args: list[Any]
    """Numbers and members: written into the operation's one argument, space-separated (none holds a space)."""
    texts: tuple[str, ...] = ()
    """Arguments that may hold anything (an error's text), each an argument of its own, after ``args``."""
    after: Callable[["_Job"], None] | None = None
    """Called with the job once it was sent (or could not be)."""
    done: anyio.Event | None = None
    """Set once it was sent, for a queued job whose answer is awaited."""
    awaited: bool = False
    """Its answer is awaited: a failure is counted where it is awaited, not by the sender."""
    reports: int = 1
    """The calls it reports on (more once others merged into it): a failure to send it counts each."""
    answer: Any = None
    failed: bool = False


def _merge(queued: _Job, job: _Job) -> bool:
    """Take ``job`` into ``queued``, the same function on the same key and still queued: a release's members
    join the removal; a success of the same generation adds one to the count (the script counts them at one
    time, as it would have counted them one by one in the same batch). False when it cannot."""
    if queued.name != job.name:
        return False
    if job.name == "release":
        queued.args += job.args
    elif queued.args[0] == job.args[0]:
        queued.args[-1] += 1
    else:  # a success of another generation: the script judges it apart
        return False
    queued.reports += 1
    return True


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
        self.lease_us = _us(lease)
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
        self._merging: dict[str, _Job] = {}
        """First key → the queued job that later ones on that key merge into (``_merge``), until it is sent or
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
        return "-1" if self._clock is None else repr(_us(self._clock()))

    def member(self) -> str:
        """A new lease's member, unique across replicas."""
        self._serial += 1
        return f"{self._instance}:{self._serial}"

    async def _call(self, batch: Sequence[_Job]) -> list[Any]:
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
        command = pack_command(("EVALSHA", _SHA, len(keys), *keys, *args))  # type: ignore[arg-type]  # (a 1-tuple, says its stub)
        try:
            answers: list[Any] = await self._command(command)
        except NoScriptError:  # a Redis that never had it, or restarted: load it and send again (nothing ran)
            await self.client.script_load(_BATCH)
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

    async def run(self, job: _Job) -> Any:
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

    def _queue(self, job: _Job, *, merge: bool = False) -> None:
        key = job.keys[0]
        if merge:
            queued = self._merging.get(key)
            if queued is not None and _merge(queued, job):
                return
            self._merging[key] = job
        else:  # what is queued on its key after it must come after it in Redis too
            self._merging.pop(key, None)
        self._pending.append(job)
        self._wake.set()

    def _take(self) -> list[_Job]:
        """What is queued, in order, for one batch (nothing merges into it any more)."""
        batch = list(self._pending)
        self._pending.clear()
        self._merging.clear()
        return batch

    async def ask(self, job: _Job) -> Any:
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

    async def _send(self, batch: list[_Job]) -> None:
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

    async def later(self, job: _Job, *, merge: bool = False) -> None:
        """Send ``job`` in the background, after what is queued (awaited here without :meth:`send_later`); with
        ``merge``, into the same function's job on the same key if one is still queued (``_merge``)."""
        if self._sending:
            self._queue(job, merge=merge)
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.attempt(job.operation, lambda: self.run(job), lambda: None, refuse=False)
            finally:
                if job.after is not None:
                    job.after(job)

    async def in_turn(self, job: _Job, fallback: Callable[[], T], read: Callable[[Any], T]) -> T:
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
            lost: list[bytes] = await self.run(_Job("renew", "renew", list(held), args))
            return lost

        no_answer: list[bytes] = []
        lost = {member.decode() for member in await self.attempt("renew", renew, lambda: no_answer)}
        if lost:
            logger.warning("shared state: %d lease(s) ran out before they were renewed", len(lost))
            for key, members in held.items():
                for member in members:
                    if member in lost:
                        self.drop(key, member)


_CACHE_SIZE = 1024
"""Bucket shapes (rate, burst) whose script arguments are remembered; they come from the config, so few."""


class RedisLimitState:
    """``LimitState`` on Redis: buckets and leased slots shared by every replica using the same prefix."""

    def __init__(self, shared: RedisState) -> None:
        self._shared = shared
        self._phantoms: dict[str, int] = {}
        """Slots counted as held while Redis could not be reached (``allow``): released without Redis."""
        self._buckets: dict[tuple[float, float], tuple[str, str]] = {}
        """(rate, burst) → the script's arguments for such a bucket: µs per token and burst, as text."""

    async def take(self, key: str, rate: float, burst: float) -> float:
        refused = await self.enter((Take(key, rate, burst),), ())
        return 0.0 if refused is None else refused.wait

    async def acquire(self, key: str, limit: int) -> bool:
        return await self.enter((), (Slot(key, limit),)) is None

    def _bucket(self, rate: float, burst: float) -> tuple[str, str]:
        args = self._buckets.get((rate, burst))
        if args is None:
            if len(self._buckets) >= _CACHE_SIZE:
                self._buckets.clear()
            args = self._buckets[rate, burst] = (repr(_us(1 / rate)), repr(burst))
        return args

    async def enter(self, takes: Sequence[Take], slots: Sequence[Slot]) -> Full | None:
        # One operation whatever it holds; a failure is counted as what it did (`take`, `acquire`, or both: `enter`).
        operation = "enter" if takes and slots else "take" if takes else "acquire"
        shared = self._shared
        prefix = shared.prefix
        keys = [prefix + take.key for take in takes]
        args: list[Any] = [len(takes), shared.lease_us]
        for take in takes:
            args += self._bucket(take.rate, take.burst)
        held: list[tuple[str, str]] = []  # (sorted set, member) per slot
        for slot in slots:
            zset = prefix + slot.key
            member = shared.member()
            held.append((zset, member))
            keys.append(zset)
            released = shared.releasing.get(zset)
            if released:
                args += (slot.limit, member, len(released), *released)
            else:
                args += (slot.limit, member, 0)
        job = _Job(operation, "enter", keys, args)

        async def enter() -> Full | None:
            answer: list[int] = await shared.ask(job)
            if answer[0] == 0:
                for zset, member in held:
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
        member = members.pop()
        if not members:
            del shared.leases[zset]
        shared.releasing.setdefault(zset, set()).add(member)
        await shared.later(_Job("release", "release", [zset], [member], after=self._released), merge=True)

    def _released(self, job: _Job) -> None:
        """The removal was sent (or Redis did not get it: then the leases run out on their own)."""
        zset = job.keys[0]
        releasing = self._shared.releasing.get(zset)
        if releasing is not None:
            releasing.difference_update(job.args)
            if not releasing:
                del self._shared.releasing[zset]


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
        self._circuit_keys: dict[str, list[str]] = {}

    def _keys(self, key: str) -> list[str]:
        keys = self._circuit_keys.get(key)
        if keys is None:
            base = f"{self._shared.prefix}circuit:{key}"
            keys = self._circuit_keys[key] = [base, base + ":probes", base + ":window"]
        return keys

    async def admit(self, key: str, config: CircuitBreakerConfig) -> Admission | Refusal:
        shared = self._shared
        seen = self._closed.get(key)
        if seen is not None and time.monotonic() < seen[1]:
            return Admission(seen[0], probe=False)
        keys = self._keys(key)
        member = shared.member()

        async def admit() -> Admission | Refusal:
            args = [_us(config.reset_after), config.half_open_probes, member, shared.lease_us]
            answer = await shared.ask(_Job("admit", "admit", keys, args))
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
        window = [int(config.failure_rate is not None), _us(config.window), 1]
        if admission.probe or admission.generation < 0:
            return await self._verdict("succeeded", key, admission, window)
        # A success that is not a probe's changes no state (it ends a failure streak): sent in the background,
        # counted with the circuit's other successes still queued.
        job = _Job("succeeded", "succeeded", self._keys(key), [admission.generation, 0, *window])
        await self._shared.later(job, merge=True)
        return None

    async def failed(self, key: str, config: CircuitBreakerConfig, admission: Admission, error: str) -> str | None:
        self._closed.pop(key, None)  # it may open now: the next call asks Redis
        args = [config.failures or 0, config.failure_rate or 0, config.min_calls, _us(config.window)]
        return await self._verdict("failed", key, admission, args, (error, f"{config.window:g} s"))

    async def _verdict(
        self, name: str, key: str, admission: Admission, args: list[Any], texts: tuple[str, ...] = ()
    ) -> str | None:
        if admission.generation < 0:
            return None
        shared = self._shared
        keys = self._keys(key)
        if admission.probe:
            shared.drop(keys[1], admission.token)

        job = _Job(name, name, keys, [admission.generation, int(admission.probe), *args], texts)
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
            return _text(await shared.run(_Job("state", "state", self._keys(key), [_us(config.reset_after)])))

        return await shared.attempt("state", state, lambda: CLOSED)


def _text(value: bytes | str | int) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


assert {CLOSED, OPEN, HALF_OPEN} == {"closed", "open", "half_open"}  # the script's spelling of the states


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
