"""Leaves, for the engine (:mod:`gateway.workflows.engine`): the command of a ``call``, ``ask_user``,
``ask_model`` or ``agent`` try, and an ``agent``'s parts as they come back.

An agent (:mod:`gateway.workflows.agent`) keeps its conversation; here its first turn is asked for, and each
turn or call that comes back is a :class:`~gateway.workflows.commands.Settled` note with ``part`` set, then
the next turn or the calls it asked for are queued, or its answer ends the try.
"""

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gateway.workflows._engine_base import RunBase
from gateway.workflows._runstate import StepState
from gateway.workflows.agent import AgentReplyError, Conversation
from gateway.workflows.commands import AskAgent, AskModel, AskUser, CallTool, Leaf, Settled, Status, StepError
from gateway.workflows.expressions import Lookup
from gateway.workflows.model import AgentStep, AskModelStep, AskUserStep, CallStep

__all__ = ["Leaves", "as_text"]


class Leaves(RunBase):
    """The commands of leaf steps, and an agent's parts."""

    def _leaf(self, state: StepState, scope: Mapping[str, Any], lookup: Lookup) -> Leaf | None:
        """The call or question of ``state``'s try; None while ``lookup`` lacks jq outcomes."""
        step, values = state.plan.step, state.plan.values
        if isinstance(step, CallStep):
            key = values["idempotency_key"].evaluate(scope, lookup) if "idempotency_key" in values else None
            arguments = values["with"].evaluate(scope, lookup)
            if lookup.missing:
                return None
            idempotency_key = as_text(key) if key is not None else f"{self.run_id}:{state.key}"
            return CallTool(state.key, step.id, state.attempt, step.call, arguments, step.timeout, idempotency_key)
        if isinstance(step, AskUserStep):
            ask = step.ask_user
            message = as_text(values["message"].evaluate(scope, lookup)) or ""
            if lookup.missing:
                return None
            return AskUser(state.key, step.id, state.attempt, message, ask.requested_schema, ask.default, step.timeout)
        if isinstance(step, AgentStep):
            return self._agent_begin(state, step, scope, lookup)
        assert isinstance(step, AskModelStep)
        model = step.ask_model
        prompt = as_text(values["prompt"].evaluate(scope, lookup)) or ""
        system = as_text(values["system"].evaluate(scope, lookup)) if "system" in values else None
        if lookup.missing:
            return None
        return AskModel(
            state.key, step.id, state.attempt, prompt, system, model.max_tokens, model.default, step.timeout
        )

    def _agent_begin(self, state: StepState, step: AgentStep, scope: Mapping[str, Any], lookup: Lookup) -> Leaf | None:
        """An ``agent`` try's first turn (its conversation starts over); None while ``lookup`` lacks jq outcomes."""
        values, agent = state.plan.values, step.agent
        goal = as_text(values["goal"].evaluate(scope, lookup)) or ""
        system = as_text(values["system"].evaluate(scope, lookup)) if "system" in values else None
        if lookup.missing:
            return None
        globs, prefix = agent.tools, f"{self.run_id}:"
        state.agent = Conversation(
            state.key, step.id, state.attempt, globs, agent.max_steps, agent.max_tokens, system, prefix, self.plan.name
        )
        return state.agent.begin(goal)

    def _agent_part(
        self,
        state: StepState,
        agent: Conversation,
        key: str,
        result: Any,
        error: StepError | None,
        random: float,
    ) -> None:
        """A turn or a call of an ``agent`` step came back (see :mod:`gateway.workflows.agent`)."""
        command = agent.in_flight.pop(key)
        if isinstance(command, AskAgent):
            part = f"{agent.part()}: the model"
            self._out.append(Settled(key, state.plan.id, _status(error), command.attempt, result, error, part=part))
            if error is None:
                try:
                    commands, answer = agent.replied(result)
                except AgentReplyError as exc:
                    error = StepError("error", str(exc), state.key)
                else:
                    self._queue.extend((state, next_command) for next_command in commands)
                    if not commands:
                        self._tried(state, answer, None, random, None)
                    return
            self._fail(state, replace(error, step=error.step or state.key), random)
            return
        assert isinstance(command, CallTool)
        part = f"{agent.part()}: {command.tool}"
        turn = agent.called(key, result, error)
        self._out.append(Settled(key, state.plan.id, _status(error), command.attempt, result, error, part=part))
        if turn is not None:
            self._queue.append((state, turn))


def _status(error: StepError | None) -> Status:
    return "failed" if error is not None else "succeeded"


def as_text(value: Any) -> str | None:
    """A value as the text of a message or a key: a string as it is, anything else as compact JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
