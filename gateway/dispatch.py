"""The one call path: resolve → policy chain → provider, with every outcome turned into a result.

Every call – from an assistant, from ``patchbay call``, from a workflow step –
comes through ``Dispatcher.call``, so whatever a policy, a metric or the audit
trail does applies to all of them alike.
"""

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from functools import reduce

from gateway.errors import GatewayError
from gateway.registry import Registry
from gateway.types import CallContext, CallNext, JSONObject, Policy, Provider, ToolCall, ToolResult

logger = logging.getLogger(__name__)


def compose(policies: Sequence[Policy], terminal: CallNext) -> CallNext:
    """Wrap ``terminal`` in ``policies``, the first policy outermost (like ASGI middleware)."""

    def wrap(inner: CallNext, policy: Policy) -> CallNext:
        async def call(c: ToolCall) -> ToolResult:
            return await policy(c, inner)

        return call

    return reduce(wrap, reversed(policies), terminal)


class Dispatcher:
    """Routes calls by name through the policy chain to their provider."""

    def __init__(
        self,
        registry: Callable[[], Registry],
        providers: Mapping[str, Provider],
        policies: Sequence[Policy] = (),
    ) -> None:
        self._registry = registry
        self._providers = providers
        self._chain = compose(policies, self._invoke)

    async def call(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        """Call a tool by its registry name.

        Raises:
            ToolNotFound: no such tool (a protocol error, not a tool result).
        """
        result, _ = await self.invoke(name, arguments, context)
        return result

    async def invoke(self, name: str, arguments: JSONObject, context: CallContext) -> tuple[ToolResult, str]:
        """Like ``call``, with the call's ``outcome`` label (``ok``, ``error``, ``timeout``…, DESIGN §5).

        Raises:
            ToolNotFound: no such tool (a protocol error, not a tool result).
        """
        entry = self._registry().resolve(name)
        call = ToolCall(name, entry.provider, entry.target, arguments, context, entry.tool)
        started = time.perf_counter()
        try:
            result = await self._chain(call)
            outcome = "error" if result.is_error else "ok"
        except GatewayError as exc:
            if not exc.as_tool_result:
                raise
            result = ToolResult.text(str(exc), is_error=True)
            outcome = exc.outcome
        if logger.isEnabledFor(logging.DEBUG):  # the timing is for this log line only: keep it off the hot path
            logger.debug("%s → %s/%s: %s in %.1fms", name, call.provider, call.target, outcome, _ms(started))
        return result, outcome

    async def _invoke(self, call: ToolCall) -> ToolResult:
        return await self._providers[call.provider].call_tool(call.target, call.arguments, call.context)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
