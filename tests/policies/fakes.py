"""Fakes shared by the policy tests: a clock that moves when told, a scripted upstream, an upstream that holds
calls until released."""

from collections.abc import Sequence

import anyio

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


class Gate:
    """An upstream whose calls wait for ``release``; ``entered`` counts the calls that reached it, ``ended`` the
    calls that reached it or were refused, and ``all_in`` is set once ``expected`` ended."""

    def __init__(self, expected: int) -> None:
        self.release = anyio.Event()
        self.all_in = anyio.Event()
        self.expected = expected
        self.entered = self.ended = 0

    def end(self) -> None:
        self.ended += 1
        if self.ended == self.expected:
            self.all_in.set()

    async def __call__(self, call: ToolCall) -> ToolResult:
        self.entered += 1
        self.end()
        await self.release.wait()
        return ToolResult.text("ok")
