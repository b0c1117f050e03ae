"""Asking a run's client: an ``ask_user`` step's elicitation, an ``ask_model`` step's sampling, an ``agent``
step's turn (sampling with tools).

The local runner asks the client of the call it runs; on Temporal, the replica holding that call asks
it for the run (:mod:`gateway.workflows.on_temporal`). Both ask here, so the client sees the same
requests from either engine, and a step gets the same result or error from its answer. The client may
be a handshake-era client (a server→client request), or a 2026-07-28 one whose call is held for its
answers (:mod:`gateway.roundtrip`): the channel hides which.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gateway.errors import UpstreamError
from gateway.types import ClientChannel, Principal
from gateway.workflows.agent import allowed
from gateway.workflows.commands import AskAgent, AskModel, AskUser, StepError

__all__ = ["STEP_META_KEY", "ToolCatalog", "ask", "default_or", "offered"]

ToolCatalog = Callable[[Principal], Iterable[Mapping[str, Any]]]
"""The tools a caller may call, as ``tools/list`` shows them to it (definitions: name, description,
inputSchema…): what an ``agent`` step's globs choose among."""
REPLY_FIELDS = ("role", "content", "model", "stopReason")

STEP_META_KEY = "io.patchbay/step"
"""The ``_meta`` key of a workflow's question (elicitation, sampling) that names the step asking it."""


async def ask(
    client: ClientChannel | None, command: AskUser | AskModel | AskAgent, tools: Iterable[Mapping[str, Any]] = ()
) -> tuple[Any, StepError | None]:
    """Ask ``client`` the question of ``command``: the step's result, or the error that failed it (its
    ``default`` instead, when it has one); an agent's turn offers ``tools`` (:func:`offered`). Raises only
    what the channel raises besides ``UpstreamError``."""
    if isinstance(command, AskUser):
        return await _ask_user(client, command)
    if isinstance(command, AskAgent):
        return await _ask_agent(client, command, tools)
    return await _ask_model(client, command)


def offered(catalog: ToolCatalog | None, principal: Principal, command: AskAgent) -> list[dict[str, Any]]:
    """The tools an agent's turn offers the model: those ``principal`` may call that the step's globs match, as
    MCP ``Tool`` objects (name, description, inputSchema), never the workflow running the step."""
    tools = []
    for tool in catalog(principal) if catalog is not None else ():
        name = str(tool.get("name", ""))
        if name != command.workflow and allowed(name, command.tools):
            shown = {"name": name, "inputSchema": tool.get("inputSchema") or {"type": "object"}}
            if tool.get("description"):
                shown["description"] = tool["description"]
            tools.append(shown)
    return tools


def default_or(default: Any, reason: str, kind: str = "unavailable") -> tuple[Any, StepError | None]:
    """A question's outcome when the client gave no answer: its ``default``, else the error ``reason``."""
    if default is not None:
        return default, None
    return None, StepError(kind, reason)


def _asked_by(command: AskUser | AskModel | AskAgent) -> dict[str, str]:
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


def _sampling(command: AskModel | AskAgent, messages: list[Any]) -> dict[str, Any]:
    """A ``sampling/createMessage`` request's params: the messages, the step's system prompt and token limit."""
    params: dict[str, Any] = {"messages": messages, "maxTokens": command.max_tokens, "_meta": _asked_by(command)}
    if command.system is not None:
        params["systemPrompt"] = command.system
    return params


async def _ask_model(client: ClientChannel | None, command: AskModel) -> tuple[Any, StepError | None]:
    if client is None or "sampling" not in client.capabilities:
        return default_or(command.default, "the client cannot ask its model (it has no sampling capability)")
    params = _sampling(command, [{"role": "user", "content": {"type": "text", "text": command.prompt}}])
    try:
        answer = await client.request("sampling/createMessage", params)
    except UpstreamError as exc:
        return default_or(command.default, str(exc))
    content = answer.get("content")
    blocks = content if isinstance(content, list) else [content]
    text = "".join(str(b.get("text", "")) for b in blocks if isinstance(b, Mapping) and b.get("type") == "text")
    return text, None


async def _ask_agent(
    client: ClientChannel | None, command: AskAgent, tools: Iterable[Mapping[str, Any]]
) -> tuple[Any, StepError | None]:
    sampling = client.capabilities.get("sampling") if client is not None else None
    if client is None or not isinstance(sampling, Mapping) or "tools" not in sampling:
        return None, StepError(
            "unavailable", "the client cannot let its model call tools (it has no sampling.tools capability)"
        )
    params = _sampling(command, list(command.messages))
    params.update(tools=list(tools), toolChoice={"mode": command.tool_choice})
    try:
        answer = await client.request("sampling/createMessage", params)
    except UpstreamError as exc:
        return None, StepError("unavailable", str(exc))
    return {name: answer[name] for name in REPLY_FIELDS if name in answer}, None
