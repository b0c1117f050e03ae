"""The one Lua script of the Redis shared state (:mod:`policies.redis_state`), and its operations as Python sends them.

Every operation of ``RedisLimitState`` and ``RedisBreakerState`` is a function of ``SCRIPT``. What a replica sends
at once is one ``EVALSHA`` that runs a batch of operations (each a ``Job``) in order, so a call costs one command
however many operations ride along; queued operations of one kind on one key merge (``merge_into``).
"""

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from policies.state import CLOSED, HALF_OPEN, OPEN

__all__ = ["SCRIPT", "SHA", "Job", "merge_into", "text", "us"]

SCRIPT = """
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

SHA = hashlib.sha1(SCRIPT.encode(), usedforsecurity=False).hexdigest()
"""What Redis names the script (its SHA-1): sent without loading it first; loaded when Redis says it lacks it."""


@dataclass(eq=False, slots=True)
class Job:
    """One operation of the script: its function ``name`` there, its keys and arguments."""

    operation: str
    """What a failure to reach Redis is counted as (``take``, say, for an ``enter`` of buckets alone)."""
    name: str
    keys: list[str]
    args: list[Any]
    """Numbers and members: written into the operation's one argument, space-separated (none holds a space)."""
    texts: tuple[str, ...] = ()
    """Arguments that may hold anything (an error's text), each an argument of its own, after ``args``."""
    after: Callable[["Job"], None] | None = None
    """Called with the job once it was sent (or could not be)."""
    done: anyio.Event | None = None
    """Set once it was sent, for a queued job whose answer is awaited."""
    awaited: bool = False
    """Its answer is awaited: a failure is counted where it is awaited, not by the sender."""
    reports: int = 1
    """The calls it reports on (more once others merged into it): a failure to send it counts each."""
    answer: Any = None
    failed: bool = False


def merge_into(queued: Job, job: Job) -> bool:
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


def us(seconds: float) -> float:
    return seconds * 1_000_000


def text(value: bytes | str | int) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


assert {CLOSED, OPEN, HALF_OPEN} == {"closed", "open", "half_open"}  # the script's spelling of the states
