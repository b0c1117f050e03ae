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
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio

from gateway.config import ServerRetry
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.types import CallNext, ToolCall, ToolResult
from policies._globs import matcher

__all__ = ["RetryPolicy", "hinted_idempotent", "safe_to_repeat"]


class RetryPolicy:
    """Retries idempotent calls to configured servers; calls to other servers pass straight through.

    ``retries`` is each server's ``retry:``; ``idempotent`` its ``tools.idempotent`` globs (on the
    upstream's own tool names, ``call.target``).
    """

    def __init__(
        self,
        retries: Mapping[str, ServerRetry],
        idempotent: Mapping[str, Sequence[str]],
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._settings = {
            server: (retry, matcher(idempotent.get(server, ())))
            for server, retry in retries.items()
            if retry.attempts > 1
        }
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
        retry, idempotent = entry
        if not safe_to_repeat(call, idempotent):
            return await call_next(call)
        attempt = 1
        while True:
            try:
                return await call_next(call)
            except (UpstreamUnavailable, UpstreamTimeout) as exc:
                if attempt >= retry.attempts:
                    # Same error, same type and attributes: only the message learns it was retried.
                    exc.args = (f"{exc} (gave up after {attempt} attempts)",)
                    raise
            await self._sleep(retry.delay(attempt, self._random()))
            attempt += 1


def safe_to_repeat(call: ToolCall, idempotent: re.Pattern[str]) -> bool:
    """The call's tool may run twice (or be answered twice): its upstream name matches the server's
    ``tools.idempotent`` (``idempotent``, a :func:`~policies._globs.matcher`), or the upstream hints so."""
    return idempotent.fullmatch(call.target) is not None or (
        call.tool is not None and hinted_idempotent(call.tool.definition)
    )


def hinted_idempotent(definition: Mapping[str, Any]) -> bool:
    """The upstream says calling the tool ``definition`` describes twice is harmless: it is idempotent, or only
    reads."""
    annotations = definition.get("annotations")
    if not isinstance(annotations, Mapping):
        return False
    return annotations.get("idempotentHint") is True or annotations.get("readOnlyHint") is True
