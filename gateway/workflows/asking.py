"""Asking a run's client: an ``ask_user`` step's elicitation, an ``ask_model`` step's sampling.

The local runner asks the client of the call it runs; on Temporal, the replica holding that call asks
it for the run (:mod:`gateway.workflows.on_temporal`). Both ask here, so the client sees the same
requests from either engine, and a step gets the same result or error from its answer. The client may
be a handshake-era client (a server→client request), or a 2026-07-28 one whose call is held for its
answers (:mod:`gateway.roundtrip`): the channel hides which.
"""

from collections.abc import Mapping
from typing import Any

from gateway.errors import UpstreamError
from gateway.types import ClientChannel
from gateway.workflows.commands import AskModel, AskUser, StepError

__all__ = ["STEP_META_KEY", "ask", "default_or"]

STEP_META_KEY = "io.patchbay/step"
"""The ``_meta`` key of a workflow's question (elicitation, sampling) that names the step asking it."""


async def ask(client: ClientChannel | None, command: AskUser | AskModel) -> tuple[Any, StepError | None]:
    """Ask ``client`` the question of ``command``: the step's result, or the error that failed it (its
    ``default`` instead, when it has one). Raises only what the channel raises besides ``UpstreamError``."""
    if isinstance(command, AskUser):
        return await _ask_user(client, command)
    return await _ask_model(client, command)


def default_or(default: Any, reason: str, kind: str = "unavailable") -> tuple[Any, StepError | None]:
    """A question's outcome when the client gave no answer: its ``default``, else the error ``reason``."""
    if default is not None:
        return default, None
    return None, StepError(kind, reason)


def _asked_by(command: AskUser | AskModel) -> dict[str, str]:
    return {STEP_META_KEY: command.key}


async def _ask_user(client: ClientChannel | None, command: AskUser) -> tuple[Any, StepError | None]:
    if client is None or "elicitation" not in client.capabilities:
        return default_or(command.default, "the client cannot ask its user (it has no elicitation capability)")
    params = {"message": command.message, "requestedSchema": dict(command.schema), "_meta": _asked_by(command)}
    try:
        answer = await client.request("elicitation/create", params)
    except UpstreamError as exc:
        return default_or(command.default, str(exc))
    if answer.get("action") != "accept":
        return default_or(command.default, f"the user did not accept (action: {answer.get('action')})", "denied")
    return answer.get("content") or {}, None


async def _ask_model(client: ClientChannel | None, command: AskModel) -> tuple[Any, StepError | None]:
    if client is None or "sampling" not in client.capabilities:
        return default_or(command.default, "the client cannot ask its model (it has no sampling capability)")
    params: dict[str, Any] = {
        "messages": [{"role": "user", "content": {"type": "text", "text": command.prompt}}],
        "maxTokens": command.max_tokens,
        "_meta": _asked_by(command),
    }
    if command.system is not None:
        params["systemPrompt"] = command.system
    try:
        answer = await client.request("sampling/createMessage", params)
    except UpstreamError as exc:
        return default_or(command.default, str(exc))
    content = answer.get("content")
    blocks = content if isinstance(content, list) else [content]
    text = "".join(str(b.get("text", "")) for b in blocks if isinstance(b, Mapping) and b.get("type") == "text")
    return text, None
