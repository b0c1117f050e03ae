"""Fakes shared by the policy tests: a clock that moves when told, a scripted upstream."""

from collections.abc import Sequence

from gateway.errors import UpstreamUnavailable
from gateway.types import ToolCall, ToolResult

OK = ToolResult.text("ok")


class FakeClock:
    """A monotonic clock that only moves when a test says so (``advance``, or by setting ``now``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Upstream:
    """The rest of the chain (or one server): counts calls, plays a script of results and errors, then answers
    ``answer``."""

    def __init__(self, script: Sequence[ToolResult | BaseException] = (), answer: ToolResult = OK) -> None:
        self.script = list(script)
        self.answer = answer
        self.calls = 0

    async def __call__(self, call: ToolCall) -> ToolResult:
        self.calls += 1
        outcome = self.script.pop(0) if self.script else self.answer
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def down(server: str = "crm") -> UpstreamUnavailable:
    return UpstreamUnavailable(f"{server} is not connected", server=server)
