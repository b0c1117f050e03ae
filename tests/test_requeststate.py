"""``StateSigner``: what it mints it accepts, for the same principal and request, until it expires."""

import pytest

from gateway.errors import InvalidRequestState
from gateway.requeststate import STATE_PREFIX, StateSigner, request_digest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reason(signer: StateSigner, state: str, principal: str = "ada", request: str = "r") -> str:
    with pytest.raises(InvalidRequestState) as raised:
        signer.open(state, principal=principal, request=request)
    return raised.value.reason


def test_a_minted_state_opens_for_its_principal_and_request() -> None:
    signer = StateSigner(b"k" * 32)
    state, nonce = signer.mint(held="h1", principal="ada", request="r", ttl=60)
    assert state.startswith(STATE_PREFIX)
    claim = signer.open(state, principal="ada", request="r")
    assert (claim.held, claim.nonce) == ("h1", nonce)


def test_a_state_names_its_holder_and_one_minted_before_holders_opens_as_held_here() -> None:
    clock = Clock()
    signer = StateSigner(b"k" * 32, clock=clock)
    state, _ = signer.mint(held="h1", principal="ada", request="r", ttl=60, holder="i1/workflows/x")
    claim = signer.open(state, principal="ada", request="r")
    assert (claim.holder, claim.expires) == ("i1/workflows/x", 1060.0)
    # Without a holder the payload is what a gateway minted before states named their holder (no "i").
    old, nonce = signer.mint(held="h1", principal="ada", request="r", ttl=60)
    claim = signer.open(old, principal="ada", request="r")
    assert (claim.held, claim.nonce, claim.holder) == ("h1", nonce, None)


def test_a_state_is_refused_once_expired() -> None:
    clock = Clock()
    signer = StateSigner(b"k" * 32, clock=clock)
    state, _ = signer.mint(held="h1", principal="ada", request="r", ttl=60)
    clock.now += 61
    assert reason(signer, state) == "expired"


def test_states_of_other_keys_other_clients_and_other_requests_are_refused() -> None:
    signer = StateSigner(b"k" * 32)
    state, _ = signer.mint(held="h1", principal="ada", request="r", ttl=60)
    assert reason(StateSigner(b"x" * 32), state) == "forged"
    assert reason(StateSigner(), state) == "forged"
    assert reason(signer, state, principal="bob") == "other_client"
    assert reason(signer, state, request="other") == "other_request"
    for garbage in (STATE_PREFIX, STATE_PREFIX + "x.y", state + "x", state.replace(STATE_PREFIX, "other:"), ""):
        assert reason(signer, garbage) == "forged"


def test_the_request_digest_depends_on_the_tool_and_the_arguments() -> None:
    assert request_digest("t", {"a": 1, "b": 2}) == request_digest("t", {"b": 2, "a": 1})
    assert request_digest("t", {"a": 1}) != request_digest("t", {"a": 2})
    assert request_digest("t", {"a": 1}) != request_digest("u", {"a": 1})
