"""An ``agent`` step's conversation with the client's model: pure helpers the engine drives it with.

The step is ReAct over MCP sampling with tools (spec 2025-11-25): turn ``n`` asks the model
(:class:`~gateway.workflows.commands.AskAgent`, key ``<step key>#turn<n>``) with the conversation so far as
``SamplingMessage`` JSON, the first message the goal. A reply without ``tool_use`` blocks is the answer:
the step's result is ``{answer: <its text>, steps: [{tool, arguments, result | error}]}``. Each ``tool_use``
is either refused (its name matches none of the step's globs: an error ``tool_result`` goes back, nothing is
called) or called (:class:`~gateway.workflows.commands.CallTool`, key ``<step key>#call<m>``, ``m`` counting the
step's calls); once every call of the turn came back, the next turn carries the model's message and one user
message of ``tool_result`` blocks, one per ``tool_use``, in order (a failed call goes back as ``isError``: the
model sees it, the step goes on). The last turn (``max_steps``) offers tool choice ``none``; a ``tool_use``
then, or a reply that is not a ``CreateMessageResult``, fails the step.

Nothing here does I/O: :class:`Conversation` is plain data the engine changes one event at a time, so a run
restored from its journal reaches the same conversation.
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

from gateway.workflows.commands import AskAgent, CallTool, Leaf, StepError

__all__ = ["AgentReplyError", "Conversation", "allowed", "answer_text", "parse_reply", "tool_uses"]


class AgentReplyError(ValueError):
    """The model's reply is not one an agent step can go on with."""


def allowed(tool: str, globs: Iterable[str]) -> bool:
    """Whether ``tool`` is one the globs let the step call (case-sensitive ``fnmatch``)."""
    return any(fnmatchcase(tool, glob) for glob in globs)


def parse_reply(result: Any) -> list[dict[str, Any]]:
    """The content blocks of a ``CreateMessageResult`` (JSON), as a list.

    Raises:
        AgentReplyError: it is not a model's message with content blocks, or a ``tool_use`` lacks its id,
            name or input object.
    """
    if not isinstance(result, Mapping) or result.get("role", "assistant") != "assistant":
        raise AgentReplyError("the model's reply is not an assistant message")
    content = result.get("content")
    listed = content if isinstance(content, list) else [content]
    blocks: list[Mapping[str, Any]] = [block for block in listed if isinstance(block, Mapping)]
    if not blocks or len(blocks) != len(listed) or not all(isinstance(block.get("type"), str) for block in blocks):
        raise AgentReplyError("the model's reply has no content blocks")
    for block in blocks:
        named = isinstance(block.get("id"), str) and isinstance(block.get("name"), str)
        if block["type"] == "tool_use" and not (named and isinstance(block.get("input"), dict)):
            raise AgentReplyError("a tool_use block of the model's reply lacks its id, name or input object")
    return [dict(block) for block in blocks]


def tool_uses(blocks: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ``tool_use`` blocks, in order."""
    return [block for block in blocks if block["type"] == "tool_use"]


def answer_text(blocks: Sequence[Mapping[str, Any]]) -> str:
    """The text blocks, joined."""
    return "".join(str(block.get("text", "")) for block in blocks if block["type"] == "text")


def _tool_result(use_id: str, value: Any, error: str | None) -> dict[str, Any]:
    text = error if error is not None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    block: dict[str, Any] = {"type": "tool_result", "toolUseId": use_id, "content": [{"type": "text", "text": text}]}
    if error is not None:
        block["isError"] = True
    elif isinstance(value, dict):
        block["structuredContent"] = value
    return block


@dataclass(eq=False, slots=True)
class Conversation:
    """One try of an ``agent`` step: the transcript, what it did, and its parts in flight."""

    key: str
    """The step's key: its parts' keys begin with it."""
    step: str
    attempt: int
    globs: tuple[str, ...]
    max_steps: int
    max_tokens: int
    system: str | None
    idempotency_prefix: str
    """What each call's idempotency key begins with (``<run id>:``)."""
    workflow: str = ""
    """The workflow running the step (never offered to the model)."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    """``{tool, arguments, result}`` or ``{tool, arguments, error}`` per ``tool_use``, in order."""
    turn: int = 0
    calls: int = 0
    results: list[dict[str, Any] | None] = field(default_factory=list)
    """The ``tool_result`` blocks of the current turn, by position; None while its call is in flight."""
    waiting: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Calls in flight by key: (position in ``results``, tool_use id)."""
    in_flight: dict[str, Leaf] = field(default_factory=dict)
    """The parts handed out and not answered (what a restored run makes again)."""

    def begin(self, goal: str) -> AskAgent:
        """The first turn."""
        self.messages.append({"role": "user", "content": {"type": "text", "text": goal}})
        return self._next_turn()

    def _next_turn(self) -> AskAgent:
        self.turn += 1
        choice: Literal["auto", "none"] = "none" if self.turn == self.max_steps else "auto"
        return AskAgent(
            f"{self.key}#turn{self.turn}",
            self.step,
            self.attempt,
            tuple(self.messages),
            self.system,
            self.globs,
            choice,
            self.max_tokens,
            self.workflow,
        )

    def part(self) -> str:
        """What the current turn is, for progress: ``step 2 of at most 8``."""
        return f"step {self.turn} of at most {self.max_steps}"

    def replied(self, result: Any) -> tuple[list[Leaf], Any]:
        """The model answered the current turn: what to do next (the turn's calls, or the next turn when it
        called nothing), or the step's result when it answered.

        Raises:
            AgentReplyError: the reply is malformed, or asks for tools on the last turn.
        """
        blocks = parse_reply(result)
        uses = tool_uses(blocks)
        if not uses:
            return [], {"answer": answer_text(blocks), "steps": self.steps}
        if self.turn >= self.max_steps:
            raise AgentReplyError(f"the model still asked for tools on its last turn (max_steps: {self.max_steps})")
        self.messages.append({"role": "assistant", "content": blocks})
        self.results = []
        commands: list[Leaf] = []
        for use in uses:
            tool, arguments, position = use["name"], use["input"], len(self.results)
            if not allowed(tool, self.globs):
                error = f"tool {tool} is not one this step may call: {', '.join(self.globs)}"
                self.results.append(_tool_result(use["id"], None, error))
                self.steps.append({"tool": tool, "arguments": arguments, "error": error})
                continue
            self.calls += 1
            key = f"{self.key}#call{self.calls}"
            idempotency = f"{self.idempotency_prefix}{key}" + (f"~{self.attempt}" if self.attempt > 1 else "")
            commands.append(CallTool(key, self.step, self.attempt, tool, arguments, None, idempotency))
            self.waiting[key] = (position, use["id"])
            self.results.append(None)
            self.steps.append({"tool": tool, "arguments": arguments})
        if not commands:
            return [self._answered_all()], None
        return commands, None

    def called(self, key: str, result: Any, error: StepError | None) -> AskAgent | None:
        """Call ``key`` came back: the next turn, once it was the turn's last call."""
        position, use_id = self.waiting.pop(key)
        message = f"{error.kind}: {error.message}" if error is not None else None
        self.results[position] = _tool_result(use_id, result, message)
        entry = self.steps[len(self.steps) - len(self.results) + position]
        if message is not None:
            entry["error"] = message
        else:
            entry["result"] = result
        return self._answered_all() if not self.waiting else None

    def _answered_all(self) -> AskAgent:
        self.messages.append({"role": "user", "content": list(self.results)})
        self.results = []
        return self._next_turn()

    def snapshot(self) -> dict[str, Any]:
        """The conversation as plain data (for :meth:`Run.snapshot <gateway.workflows.engine.Run.snapshot>`)."""
        return {
            "turn": self.turn,
            "calls": self.calls,
            "messages": self.messages,
            "steps": self.steps,
            "waiting": sorted(self.waiting),
            "in_flight": sorted(self.in_flight),
        }
