"""Retry per upstream server: call again, with backoff, when a server could not be reached or timed out.

Only a tool that is safe to run twice is retried: one whose name matches a
glob the config marks idempotent, or whose definition says
``annotations.idempotentHint: true``. A timed-out call may have run upstream
all the same, so retrying anything else could, say, send an e-mail twice.

Only ``UpstreamUnavailable`` and ``UpstreamTimeout`` are retried: they are
what a restart or a slow moment looks like. A tool's own ``isError`` result
is an answer and is returned as it is; other errors would fail the same way
again.
"""

import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio

from gateway.config import retry_delay
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.types import CallNext, ToolCall, ToolResult
from policies._globs import matcher

__all__ = ["RetryPolicy", "RetrySettings"]


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """How often and how patiently calls to one server are retried."""

    attempts: int = 3
    """Calls in all, the first included (1: no retry)."""
    backoff: float = 0.2
    """Seconds before the first retry; doubled for each retry after it."""
    max_backoff: float = 5.0
    """The longest wait before a retry, before jitter."""
    jitter: float = 0.2
    """Each wait is spread by ± this fraction, so that callers that failed together do not retry together."""
    idempotent: tuple[str, ...] = ()
    """Globs on the upstream's own tool names (``call.target``) that are safe to call twice."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("backoff and max_backoff must not be negative, jitter must be in [0, 1]")

    def delay(self, retry: int, random: float) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), given a uniform ``random`` in [0, 1)."""
        return retry_delay(retry, self.backoff, self.max_backoff, self.jitter, random)


class RetryPolicy:
    """Retries idempotent calls to configured servers; calls to other servers pass straight through."""

    def __init__(
        self,
        settings: Mapping[str, RetrySettings],
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._settings = {server: (s, matcher(s.idempotent)) for server, s in settings.items() if s.attempts > 1}
        self._sleep = sleep
        self._random = random

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult:
        """Call, retrying an idempotent tool while its server is unavailable or times out.

        Raises:
            UpstreamUnavailable, UpstreamTimeout: the last attempt's error, its message saying how many were made.
            UpstreamError: any other upstream failure, at once.
        """
        entry = self._settings.get(call.provider)
        if entry is None:
            return await call_next(call)
        settings, idempotent = entry
        if not (idempotent.fullmatch(call.target) or _hinted_idempotent(call)):
            return await call_next(call)
        attempt = 1
        while True:
            try:
                return await call_next(call)
            except (UpstreamUnavailable, UpstreamTimeout) as exc:
                if attempt >= settings.attempts:
                    # Same error, same type and attributes: only the message learns it was retried.
                    exc.args = (f"{exc} (gave up after {attempt} attempts)",)
                    raise
            await self._sleep(settings.delay(attempt, self._random()))
            attempt += 1


def _hinted_idempotent(call: ToolCall) -> bool:
    """The upstream says calling twice is harmless: the tool is idempotent, or only reads."""
    annotations = call.tool.definition.get("annotations") if call.tool is not None else None
    if not isinstance(annotations, Mapping):
        return False
    return annotations.get("idempotentHint") is True or annotations.get("readOnlyHint") is True
