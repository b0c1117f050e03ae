"""The ``requestState`` values the gateway mints for the 2026-07-28 input-required round trip.

A client echoes the state back on its retry, so what comes back is the client's input: it is signed
(HMAC-SHA256 with the gateway's key: ``gateway.state_key``, or a random key made at start), carries
the principal it was given to, a digest of the request it answers (tool and arguments), the call it
resumes and who holds it (a gateway replica's round trips: a retry that reaches another replica is relayed
there through the store), a nonce (the round trip keeps the one state it expects next: each state is good
once) and an expiry. ``open`` checks all but the nonce, which only the holder of the call knows::

    patchbay-state:<base64url(payload JSON)>.<base64url(HMAC of that payload)>

A state some other party minted (an upstream's own) does not start with the prefix and passes the
gateway unchanged.
"""

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import InvalidRequestState
from gateway.types import JSONObject

__all__ = ["STATE_PREFIX", "Claim", "StateSigner", "request_digest"]

STATE_PREFIX = "patchbay-state:"
"""How every ``requestState`` the gateway mints starts."""
KEY_BYTES = 32
"""The size of a key made at start."""


def request_digest(tool: str, arguments: JSONObject) -> str:
    """What binds a state to its request: the tool's name and its arguments, hashed."""
    canonical = json.dumps([tool, arguments], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Claim:
    """What a checked state says: the held call it resumes, the nonce it was minted with, who holds the call
    and when the state expires."""

    held: str
    nonce: str
    holder: str | None = None
    """The :class:`~gateway.roundtrip.RoundTrips` holding the call (its ``holder`` id); None in a state minted
    before states named their holder (taken as held by whoever opens it)."""
    expires: float = 0.0
    """Wall-clock seconds since the epoch."""


class StateSigner:
    """Mints and checks gateway ``requestState`` values with one key."""

    def __init__(self, key: bytes | None = None, *, clock: Callable[[], float] = time.time) -> None:
        """``key``: the HMAC key (``gateway.state_key``); None makes a random one (states then die with the
        process, as the calls they resume do)."""
        self._key = key if key is not None else secrets.token_bytes(KEY_BYTES)
        self._clock = clock

    def mint(
        self, *, held: str, principal: str, request: str, ttl: float, holder: str | None = None
    ) -> tuple[str, str]:
        """A fresh state for the held call ``held`` (held by ``holder``), and the nonce in it (the one the holder
        accepts next)."""
        nonce = secrets.token_urlsafe(12)
        payload: dict[str, object] = {"h": held, "n": nonce, "p": principal, "r": request}
        if holder is not None:
            payload["i"] = holder
        payload["e"] = round(self._clock() + ttl, 3)
        body = _b64(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))
        return f"{STATE_PREFIX}{body}.{_b64(self._mac(body))}", nonce

    def open(self, state: str, *, principal: str, request: str) -> Claim:
        """Check ``state`` for ``principal``'s retry of ``request``.

        Raises:
            InvalidRequestState: it was not minted with this key or was altered (``forged``), has expired
                (``expired``), was given to another client (``other_client``) or for another request
                (``other_request``).
        """
        body, _, mac = state.removeprefix(STATE_PREFIX).partition(".")
        try:
            valid = hmac.compare_digest(self._mac(body), base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4)))
            payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) if valid else None
        except (binascii.Error, ValueError):
            payload = None
        if not isinstance(payload, dict) or not state.startswith(STATE_PREFIX):
            raise InvalidRequestState("forged", "this requestState was not issued by this gateway, or was altered")
        if self._clock() > float(payload["e"]):
            raise InvalidRequestState("expired", "this requestState has expired: call the tool again without it")
        if payload["p"] != principal:
            raise InvalidRequestState("other_client", "this requestState was issued to another client")
        if payload["r"] != request:
            raise InvalidRequestState(
                "other_request", "this requestState belongs to another call (another tool, or other arguments)"
            )
        holder = payload.get("i")
        return Claim(
            held=str(payload["h"]),
            nonce=str(payload["n"]),
            holder=str(holder) if holder is not None else None,
            expires=float(payload["e"]),
        )

    def seal(self, prefix: str, payload: JSONObject) -> str:
        """``payload`` as a token that starts with ``prefix`` and that only this key can have made (the MAC covers
        the prefix too, so a token of one kind is never taken for one of another): readable, not secret."""
        body = _b64(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))
        return f"{prefix}{body}.{_b64(self._mac(prefix + body))}"

    def unseal(self, token: str, prefix: str) -> dict[str, object] | None:
        """The payload :meth:`seal` put in ``token`` with ``prefix``; None if it was not sealed so with this key."""
        if not token.startswith(prefix):
            return None
        body, _, mac = token.removeprefix(prefix).partition(".")
        try:
            if not hmac.compare_digest(self._mac(prefix + body), base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))):
                return None
            payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (binascii.Error, ValueError):
            return None
        return payload if isinstance(payload, dict) else None

    def _mac(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
