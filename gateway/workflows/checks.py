"""Static checks of a call step's ``with:`` arguments against the tool's ``inputSchema`` (DESIGN §3). Pure: no I/O.

Only what holds whatever the templates yield is reported. A value that is exactly one ``${…}`` may be anything;
text around a ``${…}`` is a string of unknown content; a dict or list with templates inside is checked as far as
its literal parts go (its kind, required and unknown keys, literal leaves). A schema that cannot be read (invalid,
a ``$ref`` that does not resolve, a nested ``$id``) yields no problems: upstream schemas can be sloppy, and a false
alarm would refuse a good config.
"""

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import (
    Draft3Validator,
    Draft4Validator,
    Draft6Validator,
    Draft7Validator,
    Draft202012Validator,
    validator_for,
)
from referencing import Registry
from referencing.exceptions import Unresolvable

from gateway.workflows.expressions import ExpressionError, compile_value

__all__ = ["check_arguments"]

Problem = tuple[str, str]

# Before draft 2019-09 a `$ref` replaced its sibling keywords; since then it applies alongside them.
_REF_REPLACES_SIBLINGS = (Draft3Validator, Draft4Validator, Draft6Validator, Draft7Validator)
# Below the root these change what a `$ref` means, which a subschema checked on its own would not know.
_RESCOPING = ("$id", "$dynamicRef", "$recursiveRef")
# The JSON kinds a value with templates inside is known to have, and how a message names them.
_KINDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "string": (str, "a string (text around ${…})"),
    "object": (Mapping, "an object"),
    "array": (list, "an array"),
}


def check_arguments(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> list[Problem]:
    """Problems with the ``with:`` arguments of a call to a tool whose ``inputSchema`` is ``schema``.

    Each problem is ``(path, message)``: the path is relative to ``with`` (``id``, ``customer.name``,
    ``items[0]``) and the message names the argument, reading well after "step 'order' calls crm__order: ".
    Reported, as far as can be known before the run: missing required arguments; unknown argument names under
    ``additionalProperties: false`` (not at a level with ``anyOf``/``oneOf``); literal values the argument's
    subschema (as a whole) rejects; text with ``${…}`` interpolated, or a dict or list with templates inside,
    where the subschema accepts no value of that kind. Values whose jq does not compile are skipped (reported
    elsewhere). A schema that is not an object schema, invalid, or unresolvable yields ``[]``. Never raises.
    """
    if not isinstance(schema, Mapping) or any(_has_key(node, _RESCOPING) for node in schema.values()):
        return []
    try:
        cls = validator_for(schema, default=Draft202012Validator)
        cls.check_schema(dict(schema))
        checker = _Checker(schema, cls(schema, registry=Registry()), issubclass(cls, _REF_REPLACES_SIBLINGS))
        if checker.excludes(schema, "object"):
            return []
        return list(dict.fromkeys(checker.object(schema, arguments, "")))
    except (SchemaError, Unresolvable, RecursionError, re.error):  # a schema the tool's own validator chokes on
        return []


def _has_key(node: Any, keys: Sequence[str]) -> bool:
    if isinstance(node, Mapping):
        return any(isinstance(node.get(key), str) for key in keys) or any(_has_key(v, keys) for v in node.values())
    return isinstance(node, list) and any(_has_key(item, keys) for item in node)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


@dataclass(frozen=True)
class _Checker:
    root: Mapping[str, Any]
    validator: Validator  # of the root schema: resolves `$ref`s in the subschemas it is evolved to
    ref_replaces_siblings: bool

    def check(self, schema: Any, value: Any, path: str) -> Iterator[Problem]:
        """Problems with ``value`` (at ``path``) under ``schema``, an argument's subschema."""
        try:
            compiled = compile_value(value, where=path)
        except ExpressionError:  # bad jq: reported elsewhere; a dict or list around it is still checked
            if isinstance(value, str):
                return
            compiled = None
        if compiled is not None and compiled.is_constant:
            for error in self.validator.evolve(schema=schema).iter_errors(compiled.evaluate({})):
                where = _join_all(path, error.absolute_path)
                yield where, f"argument {where!r} is invalid: {error.message}"
            return
        # A string from `${` to `}` may be one template, of any type (so `${.a}${.b}` goes unchecked).
        kind = "object" if isinstance(value, Mapping) else "array" if isinstance(value, list) else "string"
        if kind == "string" and value.startswith("${") and value.endswith("}"):
            return
        if self.excludes(schema, kind):
            yield path, f"argument {path!r} is {_KINDS[kind][1]}, which its schema does not accept"
        elif kind == "object":
            yield from self.object(schema, value, path)
        elif kind == "array":
            facets = [f for f in self.facets(schema) if isinstance(f, Mapping) and "prefixItems" not in f]
            items = [f["items"] for f in facets if isinstance(f.get("items"), (Mapping, bool))]  # not the tuple form
            for index, item in enumerate(value):
                for sub in items:
                    yield from self.check(sub, item, _join(path, index))

    def object(self, schema: Any, value: Mapping[str, Any], path: str) -> Iterator[Problem]:
        """Problems with an object ``value`` whose keys are all literal: its keys, then each entry."""
        facets = [f for f in self.facets(schema) if isinstance(f, Mapping)]
        if not any("anyOf" in f or "oneOf" in f for f in facets):  # which branch applies is anyone's guess
            for facet in facets:
                yield from self._names(facet, value, path)
        for key, item in value.items():
            for facet in facets:
                for sub in _subschemas(facet, key):
                    yield from self.check(sub, item, _join(path, key))

    def _names(self, facet: Mapping[str, Any], value: Mapping[str, Any], path: str) -> Iterator[Problem]:
        required = facet.get("required")
        for name in required if isinstance(required, list) else ():
            if name not in value:
                what = f"key {name!r} in argument {path!r}" if path else f"argument {name!r} of the tool's inputSchema"
                yield _join(path, name), f"missing required {what}"
        if facet.get("additionalProperties") is not False:
            return
        patterns = list(facet.get("patternProperties", {}))
        for key in value:
            if key not in facet.get("properties", {}) and not any(re.search(p, key) for p in patterns):
                accepted = ", ".join(map(repr, facet.get("properties", {}))) or "no names"
                accepted += "".join(f" or names matching {p!r}" for p in patterns)
                what = f"argument {key!r}" if not path else f"key {key!r} in argument {path!r}"
                yield _join(path, key), f"unknown {what}; accepted: {accepted}"

    def facets(self, schema: Any, seen: frozenset[str] = frozenset()) -> list[Any]:
        """``schema`` and the subschemas that all apply with it: its ``$ref`` target and ``allOf``, recursively."""
        if not isinstance(schema, Mapping):
            return [schema]
        ref = schema.get("$ref")
        target = self._resolve(ref) if isinstance(ref, str) and ref not in seen else None
        behind = self.facets(target, seen | {ref}) if isinstance(ref, str) and target is not None else []
        if isinstance(ref, str) and self.ref_replaces_siblings:
            return behind  # an unresolved target: nothing known
        members = schema.get("allOf", [])
        return [schema, *behind, *(f for member in members for f in self.facets(member, seen))]

    def excludes(self, schema: Any, kind: str) -> bool:
        """Whether no value of ``kind`` (a key of ``_KINDS``) satisfies ``schema``; False when unsure."""
        return any(self._facet_excludes(facet, kind) for facet in self.facets(schema))

    def _facet_excludes(self, facet: Any, kind: str) -> bool:
        if not isinstance(facet, Mapping):
            return facet is False
        types = facet.get("type")
        types = [types] if isinstance(types, str) else types
        if isinstance(types, list) and all(isinstance(t, str) for t in types) and kind not in types + ["any"]:
            return True
        python_type = _KINDS[kind][0]
        if "const" in facet and not isinstance(facet["const"], python_type):
            return True
        if isinstance(facet.get("enum"), list) and not any(isinstance(v, python_type) for v in facet["enum"]):
            return True
        branches = [facet[k] for k in ("anyOf", "oneOf") if isinstance(facet.get(k), list)]
        return any(all(self.excludes(member, kind) for member in branch) for branch in branches)

    def _resolve(self, ref: str) -> Any:
        """The target of a ``$ref`` that is a JSON pointer into the root (``#/$defs/A``), else None."""
        if ref != "#" and not ref.startswith("#/"):
            return None  # an anchor or another document: only the validator follows those
        node: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else ():
            key = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return None
        return node if isinstance(node, (Mapping, bool)) else None


def _subschemas(facet: Mapping[str, Any], key: str) -> list[Any]:
    """The subschemas of ``facet`` that apply to the entry ``key`` (``additionalProperties: false`` excepted)."""
    properties, patterns = facet.get("properties", {}), facet.get("patternProperties", {})
    found = [properties[key]] if key in properties else []
    found += [sub for pattern, sub in patterns.items() if re.search(pattern, key)]
    additional = facet.get("additionalProperties")
    return found or ([additional] if isinstance(additional, Mapping) else [])


def _join_all(path: str, keys: Sequence[str | int]) -> str:
    for key in keys:
        path = _join(path, key)
    return path
