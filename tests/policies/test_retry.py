"""Retries: a scripted upstream and a sleep that only records how long it was asked to wait."""

import anyio
import pytest
from pydantic import ValidationError

from gateway.config import ServerRetry
from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.types import CallContext, JSONObject, Principal, Tool, ToolCall, ToolResult
from policies.retry import RetryPolicy
from tests.policies.fakes import OK, Upstream, down

pytestmark = pytest.mark.anyio


class Sleeps:
    """Records each requested delay and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def call_to(target: str = "get_order", server: str = "crm", annotations: JSONObject | None = None) -> ToolCall:
    definition: dict[str, object] = {"name": target, "inputSchema": {"type": "object"}}
    if annotations is not None:
        definition["annotations"] = annotations
    name = f"{server}__{target}"
    return ToolCall(name, server, target, {"id": 1}, CallContext(principal=Principal("t")), Tool(name, definition))


def policy_with(sleeps: Sleeps, random: float = 0.5, **settings: object) -> RetryPolicy:
    config = ServerRetry(**settings)  # type: ignore[arg-type]
    return RetryPolicy({"crm": config}, {"crm": ["get_*"]}, sleep=sleeps, random=lambda: random)


async def test_an_idempotent_call_is_retried_until_it_succeeds() -> None:
    sleeps = Sleeps()
    upstream = Upstream([down(), UpstreamTimeout("no answer", server="crm"), OK])
    assert await policy_with(sleeps, attempts=3)(call_to(), upstream) is OK
    assert upstream.calls == 3
    assert len(sleeps.delays) == 2


@pytest.mark.parametrize("hint", ["idempotentHint", "readOnlyHint"])
async def test_a_tool_marked_idempotent_or_read_only_by_its_annotations_is_retried(hint: str) -> None:
    upstream = Upstream([down(), OK])
    call = call_to("create_ticket", annotations={hint: True})
    assert await policy_with(Sleeps())(call, upstream) is OK
    assert upstream.calls == 2


async def test_a_tool_not_marked_idempotent_is_called_once() -> None:
    for call in (call_to("create_ticket"), call_to("create_ticket", annotations={"idempotentHint": False})):
        upstream = Upstream([down(), OK])
        with pytest.raises(UpstreamUnavailable):
            await policy_with(Sleeps())(call, upstream)
        assert upstream.calls == 1


async def test_only_unavailable_and_timeout_errors_are_retried() -> None:
    upstream = Upstream([UpstreamError("protocol error", server="crm"), OK])
    with pytest.raises(UpstreamError):
        await policy_with(Sleeps())(call_to(), upstream)
    assert upstream.calls == 1


async def test_a_tool_error_result_is_an_answer_and_not_retried() -> None:
    error = ToolResult.text("no such order", is_error=True)
    upstream = Upstream([error, OK])
    assert await policy_with(Sleeps())(call_to(), upstream) is error
    assert upstream.calls == 1


async def test_servers_without_settings_pass_straight_through() -> None:
    upstream = Upstream([down(), OK])
    with pytest.raises(UpstreamUnavailable):
        await policy_with(Sleeps())(call_to(server="files"), upstream)
    assert upstream.calls == 1


async def test_exhausted_attempts_reraise_the_last_error_saying_how_many_were_made() -> None:
    last = UpstreamTimeout("crm did not answer within 20 s", server="crm")
    upstream = Upstream([down(), down(), down(), last])
    with pytest.raises(UpstreamTimeout) as caught:
        await policy_with(Sleeps(), attempts=4)(call_to(), upstream)
    assert caught.value is last
    assert caught.value.server == "crm"
    assert "4 attempts" in str(caught.value)
    assert upstream.calls == 4


async def test_backoff_doubles_up_to_the_cap_without_jitter() -> None:
    sleeps = Sleeps()
    upstream = Upstream([down()] * 6)
    with pytest.raises(UpstreamUnavailable):
        await policy_with(sleeps, attempts=6, backoff=0.5, max_backoff=3.0, jitter=0.0)(call_to(), upstream)
    assert sleeps.delays == [0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize(("random", "factor"), [(0.0, 0.8), (0.5, 1.0), (0.999999, 1.2)])
async def test_jitter_spreads_each_delay_within_its_bounds(random: float, factor: float) -> None:
    sleeps = Sleeps()
    upstream = Upstream([down()] * 3)
    with pytest.raises(UpstreamUnavailable):
        await policy_with(sleeps, random, attempts=3, backoff=1.0, max_backoff=10.0, jitter=0.2)(call_to(), upstream)
    assert sleeps.delays == pytest.approx([1.0 * factor, 2.0 * factor], abs=1e-5)


def test_every_delay_stays_within_the_jitter_bounds() -> None:
    settings = ServerRetry(backoff=0.2, max_backoff=5.0, jitter=0.2)
    for retry in range(1, 12):
        base = min(5.0, 0.2 * 2 ** (retry - 1))
        for r in (0.0, 0.1, 0.5, 0.9, 0.99999):
            assert base * 0.8 <= settings.delay(retry, r) <= base * 1.2
    assert settings.delay(10_000, 0.5) == 5.0


async def test_cancellation_during_the_backoff_sleep_propagates() -> None:
    upstream = Upstream([down(), OK])

    with anyio.fail_after(5), anyio.CancelScope() as scope:

        async def sleep(seconds: float) -> None:
            scope.cancel()
            await anyio.sleep_forever()

        await RetryPolicy({"crm": ServerRetry()}, {"crm": ["*"]}, sleep=sleep)(call_to(), upstream)
    assert scope.cancelled_caught
    assert upstream.calls == 1


def test_settings_that_can_never_work_are_refused() -> None:
    for bad in ({"attempts": 0}, {"backoff": -1}, {"jitter": 2}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            ServerRetry(**bad)  # type: ignore[arg-type]
