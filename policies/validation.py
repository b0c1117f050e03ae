"""Argument validation: a call's arguments must satisfy its tool's ``inputSchema`` before anything is called.

Validators are built once per tool (jsonschema picks the draft from ``$schema``, 2020-12 by
default, as MCP specifies) and rebuilt only when the tool's schema changes. The refusal lists
every violation with its JSON path, so a model can fix all of them in one retry. A tool whose
own schema is broken is not validated (the upstream answers for it), and that is logged once.
"""

import logging
from collections.abc import Mapping
from typing import Any

from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from gateway.errors import InvalidArguments
from gateway.types import CallNext, JSONObject, ToolCall, ToolResult

__all__ = ["ArgumentValidation", "violations"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 20
"""Violations listed in one message; more are counted."""


class ArgumentValidation:
    """Refuses calls whose arguments do not satisfy the tool's ``inputSchema`` (:class:`InvalidArguments`)."""

    def __init__(self) -> None:
        self._validators: dict[str, tuple[JSONObject, Validator | None]] = {}

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult:
        if call.tool is not None:
            validator = self._validator(call.name, call.tool.input_schema)
            if validator is not None:
                found = violations(validator, call.arguments)
                if found:
                    raise InvalidArguments(_message(call.name, found))
        return await call_next(call)

    def _validator(self, name: str, schema: JSONObject) -> Validator | None:
        cached = self._validators.get(name)
        if cached is not None and cached[0] is schema:
            return cached[1]
        validator: Validator | None
        try:
            cls = validator_for(schema)
            cls.check_schema(dict(schema))
            validator = cls(dict(schema))
        except SchemaError as exc:
            logger.warning("%s has an invalid inputSchema, so its arguments are not checked: %s", name, exc.message)
            validator = None
        self._validators[name] = (schema, validator)
        return validator


def violations(validator: Validator, arguments: Mapping[str, Any]) -> list[str]:
    """Each way ``arguments`` break the schema, as ``"<JSON path>: <message>"``, in path order."""
    errors = sorted(validator.iter_errors(dict(arguments)), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [f"{error.json_path}: {error.message}" for error in errors]


def _message(tool: str, found: list[str]) -> str:
    listed = "; ".join(found[:_MAX_LISTED])
    more = f"; and {len(found) - _MAX_LISTED} more" if len(found) > _MAX_LISTED else ""
    count = f"{len(found)} problem{'s' if len(found) != 1 else ''}"
    return f"Invalid arguments for {tool} ({count}): {listed}{more}. Fix them to match the tool's inputSchema."
