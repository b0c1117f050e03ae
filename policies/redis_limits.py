"""``LimitState`` on Redis (:mod:`policies.redis_state`): token buckets and leased concurrency slots shared by
replicas."""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from policies.redis_script import Job, us
from policies.state import Full, Slot, Take

if TYPE_CHECKING:
    from policies.redis_state import RedisState

__all__ = ["RedisLimitState"]

_CACHE_SIZE = 1024
"""Bucket shapes (rate, burst) whose script arguments are remembered; they come from the config, so few."""


class RedisLimitState:
    """``LimitState`` on Redis: buckets and leased slots shared by every replica using the same prefix."""

    def __init__(self, shared: "RedisState") -> None:
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
            args = self._buckets[rate, burst] = (repr(us(1 / rate)), repr(burst))
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
        job = Job(operation, "enter", keys, args)

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
        await shared.later(Job("release", "release", [zset], [member], after=self._released), merge=True)

    def _released(self, job: Job) -> None:
        """The removal was sent (or Redis did not get it: then the leases run out on their own)."""
        zset = job.keys[0]
        releasing = self._shared.releasing.get(zset)
        if releasing is not None:
            releasing.difference_update(job.args)
            if not releasing:
                del self._shared.releasing[zset]
