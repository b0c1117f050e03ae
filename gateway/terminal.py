"""``patchbay call``'s client: answers what a call asks (a workflow's ``ask_user``/``ask_model``, an upstream's
elicitation or sampling request) on a terminal, or from an answers file.

On a terminal (:attr:`TerminalChannel.interactive`), elicitation prompts for each field of the requested schema
(its title or name, type, default and choices) and sampling shows the prompt and reads one line of reply. An
answers file (``--answers FILE``, YAML or JSON) gives them by step id instead: ``{draft: "Refunded.", confirm:
{ok: true}}``, an object of field values for an ``ask_user`` step, text for an ``ask_model`` one. Without
either, a question fails with a message naming its step and how to answer it.
"""

import json
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import anyio

from gateway.errors import ClientRefused
from gateway.types import JSONObject
from gateway.workflows.asking import STEP_META_KEY

__all__ = ["AnswerError", "TerminalChannel", "convert"]
_ELICIT, _SAMPLE = "elicitation/create", "sampling/createMessage"
_INVALID, _UNKNOWN = -32600, -32601


class AnswerError(ValueError):
    """A typed answer does not fit the field: the message says what would."""


class TerminalChannel:
    """A :class:`~gateway.types.ClientChannel` for the command line."""

    protocol_version = "2025-11-25"

    def __init__(
        self,
        answers: Mapping[str, Any] | None,
        *,
        interactive: bool,
        read: Callable[[str], str] = input,
        out: TextIO | None = None,
    ) -> None:
        self.answers = dict(answers or {})
        self.interactive = interactive
        self._read = read
        self._out = out
        self._one_at_a_time = anyio.Lock()
        """Steps that run in parallel may ask at once: the terminal asks one question, then the next."""

    @property
    def capabilities(self) -> JSONObject:
        """It can be asked (and answers, or says how to) whatever the call asks."""
        return {"elicitation": {"form": {}}, "sampling": {}}

    async def log(self, params: JSONObject) -> None:
        data = params.get("data")
        self._say(f"[{params.get('level', 'info')}] {data if isinstance(data, str) else json.dumps(data)}")

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        """The answer to a question, from the answers file, else the terminal.

        Raises:
            ClientRefused: neither has it (the message says how to give it), or the method is not a question.
        """
        meta = params.get("_meta")
        step = meta.get(STEP_META_KEY) if isinstance(meta, Mapping) else None
        given = self._given(step)
        if method == _ELICIT:
            if given is not None:
                if not isinstance(given, Mapping):
                    reason = f"the answer to step {step!r} must be an object of field values"
                    raise ClientRefused(method, code=_INVALID, reason=reason)
                return {"action": "accept", "content": dict(given)}
            if self.interactive:
                async with self._one_at_a_time:
                    return await anyio.to_thread.run_sync(self._elicit, params)
        elif method == _SAMPLE:
            if given is not None:
                return _sampled(str(given))
            if self.interactive:
                async with self._one_at_a_time:
                    return _sampled(await anyio.to_thread.run_sync(self._sample, params))
        else:
            raise ClientRefused(method, code=_UNKNOWN, reason="patchbay call cannot answer it")
        what = "the user" if method == _ELICIT else "the model"
        where = f"step {step!r}" if step else "the tool"
        shape = "{field: value, …}" if method == _ELICIT else "text"
        reason = (
            f"{where} asks {what} and there is no terminal to ask on: run it on a terminal, or give the answer with "
            f"--answers FILE ({step or '<step id>'}: {shape})"
        )
        raise ClientRefused(method, code=_INVALID, reason=reason)

    def _given(self, step: Any) -> Any:
        if not isinstance(step, str):
            return None
        if step in self.answers:
            return self.answers[step]
        last = step.rsplit("/", 1)[-1]  # lines[2]/stock: also by the step's own id
        return self.answers.get(last)

    def _say(self, text: str) -> None:
        print(text, file=self._out, flush=True)

    def _elicit(self, params: JSONObject) -> dict[str, Any]:
        self._say(f"\n{params.get('message', 'The call asks for input.')}")
        schema = params.get("requestedSchema")
        properties = schema.get("properties") if isinstance(schema, Mapping) else None
        required = set(schema.get("required") or ()) if isinstance(schema, Mapping) else set()
        content: dict[str, Any] = {}
        try:
            for name, field in (properties or {}).items():
                value = self._field(name, field if isinstance(field, Mapping) else {}, name in required)
                if value is not None:
                    content[name] = value
        except EOFError:
            self._say("(cancelled)")
            return {"action": "cancel"}
        return {"action": "accept", "content": content}

    def _field(self, name: str, field: Mapping[str, Any], required: bool) -> Any:
        kind = str(field.get("type", "string"))
        choices = field.get("enum")
        label = str(field.get("title") or name)
        hints = [kind]
        if isinstance(choices, list):
            hints = [" / ".join(map(str, choices))]
        if "default" in field:
            hints.append(f"default {json.dumps(field['default'])}")
        if not required:
            hints.append("optional")
        if field.get("description"):
            self._say(f"  {field['description']}")
        while True:
            text = self._read(f"{label} ({', '.join(hints)}): ").strip()
            if not text:
                if "default" in field:
                    return field["default"]
                if not required:
                    return None
                self._say("  an answer is required")
                continue
            try:
                return convert(text, field)
            except AnswerError as exc:
                self._say(f"  {exc}")

    def _sample(self, params: JSONObject) -> str:
        if params.get("systemPrompt"):
            self._say(f"\n[system] {params['systemPrompt']}")
        for message in params.get("messages") or ():
            content = message.get("content") if isinstance(message, Mapping) else None
            blocks = content if isinstance(content, list) else [content]
            text = " ".join(str(b.get("text", "")) for b in blocks if isinstance(b, Mapping))
            self._say(f"[{message.get('role', 'user') if isinstance(message, Mapping) else 'user'}] {text}")
        return self._read("reply (as the model): ")


def convert(text: str, field: Mapping[str, Any]) -> Any:
    """A typed answer as the field's type.

    Raises:
        AnswerError: it is not one (the message says what is expected).
    """
    kind = field.get("type", "string")
    choices = field.get("enum")
    value: Any = text
    if kind == "boolean":
        lowered = text.lower()
        if lowered not in ("y", "yes", "true", "n", "no", "false"):
            raise AnswerError("answer yes or no")
        value = lowered in ("y", "yes", "true")
    elif kind in ("integer", "number"):
        try:
            value = int(text) if kind == "integer" else float(text)
        except ValueError:
            raise AnswerError(f"expected {'an integer' if kind == 'integer' else 'a number'}") from None
    if isinstance(choices, list) and value not in choices:
        raise AnswerError(f"choose one of: {', '.join(map(str, choices))}")
    return value


def _sampled(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": {"type": "text", "text": text}, "model": "patchbay-call"}
