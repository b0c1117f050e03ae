"""Idempotent calls of upstream tools through the gateway's one call path: a re-issued call with the
same ``io.patchbay/idempotency-key`` reaches the tool once; keys are per caller; errors free the key."""

import anyio
import pytest

from gateway.types import CallContext, JSONObject, Principal, ToolResult
from policies.idempotency import META_KEY
from tests.test_gateway import Toolbox, config_of, gateway_with

pytestmark = pytest.mark.anyio


def keyed(key: str, who: str = "alice", **meta: str) -> CallContext:
    return CallContext(principal=Principal(who), meta={META_KEY: key, **meta})


class Slow(Toolbox):
    """``echo`` waits for ``release``; ``text: fail`` is the tool's own error."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()
        self.entered = anyio.Event()

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        if name == "echo":
            self.calls.append((name, arguments))
            self.entered.set()
            await self.release.wait()
            return ToolResult.text(str(arguments["text"]), is_error=arguments["text"] == "fail")
        return await super().call_tool(name, arguments, context)


async def test_a_reissued_call_reaches_the_tool_once_and_gets_the_first_result() -> None:
    box = Toolbox()
    async with gateway_with(config_of(), box) as gateway:
        first = await gateway.dispatcher.call("box__add", {"a": 1, "b": 2}, keyed("k"))
        again = await gateway.dispatcher.call("box__add", {"a": 1, "b": 2}, keyed("k"))
        other = await gateway.dispatcher.call("box__add", {"a": 1, "b": 2}, keyed("k", who="bob"))
        plain = await gateway.dispatcher.call("box__add", {"a": 1, "b": 2}, CallContext(principal=Principal("alice")))
    assert first == again == other == plain
    assert first.structured_content == {"sum": 3}
    assert len(box.calls) == 3  # alice once with the key, bob's own key, the call without a key


async def test_a_concurrent_duplicate_waits_for_the_first_call() -> None:
    box = Slow()
    results: list[ToolResult] = []

    async def call() -> None:
        results.append(await gateway.dispatcher.call("box__echo", {"text": "hi"}, keyed("k")))

    async with gateway_with(config_of(), box) as gateway, anyio.create_task_group() as tg:
        tg.start_soon(call)
        await box.entered.wait()
        tg.start_soon(call)
        await anyio.sleep(0.1)
        box.release.set()
    assert [r.content[0]["text"] for r in results] == ["hi", "hi"]
    assert box.calls == [("echo", {"text": "hi"})]


async def test_an_error_or_a_cancelled_first_call_frees_the_key() -> None:
    box = Slow()
    async with gateway_with(config_of(), box) as gateway:
        async with anyio.create_task_group() as tg:
            tg.start_soon(gateway.dispatcher.call, "box__echo", {"text": "x"}, keyed("k"))
            await box.entered.wait()
            tg.cancel_scope.cancel()
        box.release.set()
        failed = await gateway.dispatcher.call("box__echo", {"text": "fail"}, keyed("k"))
        retried = await gateway.dispatcher.call("box__echo", {"text": "fail"}, keyed("k"))
        wrong_tool = await gateway.dispatcher.call("box__add", {"a": 1, "b": 1}, keyed("k2"))
        reused = await gateway.dispatcher.call("box__echo", {"text": "y"}, keyed("k2"))
    assert failed.is_error
    assert retried.is_error
    assert [args["text"] for name, args in box.calls if name == "echo"] == ["x", "fail", "fail"]
    assert not wrong_tool.is_error
    assert reused.is_error
    assert "was used for 'box__add'" in reused.content[0]["text"]
