"""A workflow's ``input`` defaults: filled into the arguments a call omits, and checked when the config loads.

JSON Schema's ``default`` is only an annotation; a validator never applies it. A workflow's author who
writes ``limit: {type: integer, default: 10}`` expects ``.input.limit`` to be 10 when the caller leaves
it out, so :func:`with_defaults` fills it in before the run starts. It follows ``properties`` (and the
``properties`` of an object property whose value is given or defaulted), not ``$ref`` or combinators
(``allOf``, ``anyOf``…), whose defaults would be ambiguous. :func:`check_defaults` reports a ``default``
that does not satisfy its own property's schema, which would otherwise only show up in a run.
"""

import copy
import json
from collections.abc import Iterator, Mapping
from typing import Any

from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from referencing.exceptions import Unresolvable

from gateway.errors import ConfigProblem
from gateway.types import JSONObject

__all__ = ["check_defaults", "with_defaults"]


def with_defaults(schema: Mapping[str, Any], arguments: JSONObject) -> dict[str, Any]:
    """``arguments`` with the ``default`` of each property they omit; ``arguments`` itself is left unchanged.

    Nested objects are filled too, when given or defaulted; each default is a fresh copy, so no run can
    change what the next one gets.
    """
    return _filled(schema, arguments)


def _filled(schema: Mapping[str, Any], value: Mapping[str, Any]) -> dict[str, Any]:
    filled = dict(value)
    for name, subschema in _properties(schema):
        if name not in filled and "default" in subschema:
            filled[name] = copy.deepcopy(subschema["default"])
        if isinstance(filled.get(name), Mapping) and _properties(subschema):
            filled[name] = _filled(subschema, filled[name])
    return filled


def _properties(schema: Any) -> list[tuple[str, Mapping[str, Any]]]:
    properties = schema.get("properties") if isinstance(schema, Mapping) else None
    if not isinstance(properties, Mapping):
        return []
    return [(name, sub) for name, sub in properties.items() if isinstance(sub, Mapping)]


def check_defaults(schema: Mapping[str, Any], where: str) -> list[ConfigProblem]:
    """A problem for each ``default`` that its own property's schema rejects; ``where`` is the schema's path
    (``workflows.w.input``), the problems' paths go on from it (``…properties.limit.default``). A default under
    a ``$ref`` that does not resolve is not judged."""
    validator: Validator = validator_for(schema)(schema)
    return list(_wrong_defaults(validator, schema, where))


def _wrong_defaults(root: Validator, schema: Mapping[str, Any], where: str) -> Iterator[ConfigProblem]:
    for name, subschema in _properties(schema):
        here = f"{where}.properties.{name}"
        if "default" in subschema:
            try:
                # evolve: a `$ref` in the property still resolves against the whole schema.
                errors = sorted(root.evolve(schema=subschema).iter_errors(subschema["default"]), key=str)
            except Unresolvable:
                errors = []
            if errors:
                shown = json.dumps(subschema["default"])
                reasons = "; ".join(f"{e.json_path}: {e.message}" for e in errors)
                yield ConfigProblem(f"{here}.default", f"the default {shown} does not match its own schema: {reasons}")
        yield from _wrong_defaults(root, subschema, here)
