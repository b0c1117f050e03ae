"""``BreakerState`` on Redis (:mod:`policies.redis_state`): circuits shared by replicas."""

import time
from typing import TYPE_CHECKING, Any

from gateway.config import CircuitBreakerConfig
from policies.redis_script import Job, text, us
from policies.state import CLOSED, Admission, Refusal

if TYPE_CHECKING:
    from policies.redis_state import RedisState

__all__ = ["RedisBreakerState"]


class RedisBreakerState:
    """``BreakerState`` on Redis: one circuit per server, the same for every replica using the same prefix.

    A closed circuit is the common case and asks nothing of Redis to admit a call: having seen it closed,
    this replica admits calls for ``shared.closed_for`` seconds (half a second) without asking again, so a
    circuit another replica opens refuses calls here within that time. What this replica sees fail asks
    Redis again at once (a failure forgets what it saw), so its own failures open the circuit as promptly as
    in memory, and every verdict still reaches Redis.
    """

    def __init__(self, shared: "RedisState") -> None:
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
            args = [us(config.reset_after), config.half_open_probes, member, shared.lease_us]
            answer = await shared.ask(Job("admit", "admit", keys, args))
            if answer[0] == 0:
                state, reason, left, probes = (text(answer[1]), text(answer[2]), answer[3], answer[4])
                return Refusal(state, reason, left / 1_000_000, probes)
            probe = answer[2] == 1
            if probe:
                shared.hold(keys[1], member)
            elif shared.closed_for > 0:  # admitted without a probe: the circuit is closed
                self._closed[key] = (answer[1], time.monotonic() + shared.closed_for)
            return Admission(answer[1], probe=probe, entered=text(answer[3]) or None, token=member if probe else "")

        # Unlimited while Redis is away: an admission no verdict is reported for (generation -1).
        return await shared.attempt("admit", admit, lambda: Admission(-1, probe=False))

    async def succeeded(self, key: str, config: CircuitBreakerConfig, admission: Admission) -> str | None:
        window = [int(config.failure_rate is not None), us(config.window), 1]
        if admission.probe or admission.generation < 0:
            return await self._verdict("succeeded", key, admission, window)
        # A success that is not a probe's changes no state (it ends a failure streak): sent in the background,
        # counted with the circuit's other successes still queued.
        job = Job("succeeded", "succeeded", self._keys(key), [admission.generation, 0, *window])
        await self._shared.later(job, merge=True)
        return None

    async def failed(self, key: str, config: CircuitBreakerConfig, admission: Admission, error: str) -> str | None:
        self._closed.pop(key, None)  # it may open now: the next call asks Redis
        args = [config.failures or 0, config.failure_rate or 0, config.min_calls, us(config.window)]
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

        job = Job(name, name, keys, [admission.generation, int(admission.probe), *args], texts)
        return await shared.in_turn(job, lambda: None, lambda entered: text(entered) or None)

    async def abandoned(self, key: str, admission: Admission) -> None:
        if admission.generation < 0 or not admission.probe:
            return
        shared = self._shared
        keys = self._keys(key)
        shared.drop(keys[1], admission.token)

        job = Job("abandoned", "abandoned", keys, [admission.generation, admission.token])
        await shared.in_turn(job, lambda: None, lambda answer: None)

    async def state(self, key: str, config: CircuitBreakerConfig) -> str:
        shared = self._shared

        async def state() -> str:
            return text(await shared.run(Job("state", "state", self._keys(key), [us(config.reset_after)])))

        return await shared.attempt("state", state, lambda: CLOSED)
