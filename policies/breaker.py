"""Circuit breaker per upstream server: stop calling a server that keeps failing.

A failing server costs every caller a timeout; once it has failed often enough
the breaker *opens* and calls fail at once with ``CircuitOpen`` (which the
fallback policy, outside it, may answer instead). After ``reset_after`` seconds
it turns *half-open* and lets a few probe calls through: one success closes it,
a failure opens it again.

Only ``UpstreamError`` is a failure. A tool's own ``isError`` result is an
answer – the server is up and talking – so it counts as a success, like any
other result. Other errors (a policy further in refusing, cancellation) say
nothing about the server's health and are not counted at all.

The state machine lives in a ``BreakerState`` (``policies.state``): in memory
for one process, shared by replicas later. ``BreakerPolicy`` asks it before
each call to a configured server and tells it how the call ended.
"""

import math
from collections.abc import Callable, Mapping

from gateway.config import CircuitBreakerConfig
from gateway.errors import CircuitOpen, UpstreamError
from gateway.types import CallNext, ToolCall, ToolResult
from policies.state import CLOSED, OPEN, BreakerState, Refusal

__all__ = ["BreakerPolicy"]


class BreakerPolicy:
    """One circuit per configured server, kept in ``state``; calls to other servers pass straight through.

    ``on_change(server, state)`` is told every transition this policy's calls
    make (for the ``patchbay_circuit_open`` gauge). Open → half-open is due to
    time alone and is noticed, and told, on the next call to that server.
    """

    def __init__(
        self,
        configs: Mapping[str, CircuitBreakerConfig],
        state: BreakerState,
        *,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self._configs = dict(configs)
        self._state = state
        self._on_change = on_change

    @property
    def servers(self) -> tuple[str, ...]:
        """The servers with a circuit."""
        return tuple(self._configs)

    async def state(self, server: str) -> str:
        """The circuit state of ``server`` (``closed`` for a server without a breaker)."""
        config = self._configs.get(server)
        return CLOSED if config is None else await self._state.state(server, config)

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult:
        """Call through the server's breaker.

        Raises:
            CircuitOpen: the server's circuit is open (``call_next`` is not called).
            UpstreamError: the call failed (and was counted).
        """
        server = call.provider
        config = self._configs.get(server)
        if config is None:
            return await call_next(call)
        state = self._state
        admission = await state.admit(server, config)
        if isinstance(admission, Refusal):
            raise _refused(server, admission)
        if admission.entered is not None:
            self._changed(server, admission.entered)
        try:
            result = await call_next(call)
        except UpstreamError as exc:
            self._changed(server, await state.failed(server, config, admission, str(exc)))
            raise
        except BaseException:
            await state.abandoned(server, admission)
            raise
        self._changed(server, await state.succeeded(server, config, admission))
        return result

    def _changed(self, server: str, entered: str | None) -> None:
        if entered is not None and self._on_change is not None:
            self._on_change(server, entered)


def _refused(server: str, refusal: Refusal) -> CircuitOpen:
    if refusal.state == OPEN:
        return CircuitOpen(
            f"Server {server!r} is failing, so calls to it are refused for now (circuit open after "
            f"{refusal.reason}). Retry after {max(1, math.ceil(refusal.retry_after))} s.",
            policy="circuit_breaker",
            retry_after=max(refusal.retry_after, 0.0),
        )
    return CircuitOpen(
        f"Server {server!r} is recovering from {refusal.reason}: {refusal.probes} probe call(s) are "
        "testing it and no more are admitted until they end. Retry after 1 s.",
        policy="circuit_breaker",
    )
