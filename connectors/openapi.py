"""OpenAPI 3.0/3.1 documents as REST operations, one MCP tool each. Pure: the caller reads the file or URL.

:func:`parse_spec` turns the text into the document, :func:`check_spec` lists what openapi-spec-validator finds
wrong with it, and :func:`operations_of` turns each operation of ``paths`` into an
:class:`~connectors.operations.Operation` whose tool schemas are self-contained JSON Schema (2020-12): local
``$ref`` are inlined, cyclic ones kept once under ``$defs``. Every problem carries the JSON pointer of its place.

The validator's keyword checks (path parameters, operationIds, schemas, defaults) report no place of their own;
the subclasses below (``_SchemaAt`` … ``_Validator31``) add it, which ties this module to openapi-spec-validator's
0.9 line (pinned in ``pyproject.toml``; ``tests/connectors/test_openapi.py`` checks the places).

Hostile documents stay bounded: the document is copied once into plain data with a depth and a size limit
(YAML alias cycles refused), ``$ref`` chains and cycles are cut, and a schema reused past a size budget, or nested
past a depth, goes to ``$defs`` instead of being inlined again.
"""

import copy
import re
import reprlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple
from urllib.parse import unquote

import yaml
from jsonschema.exceptions import ValidationError
from jsonschema_path.paths import SchemaPath
from openapi_spec_validator import OpenAPIV30SpecValidator, OpenAPIV31SpecValidator
from openapi_spec_validator.validation import keywords
from openapi_spec_validator.validation.validators import SpecValidator
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable

from connectors.operations import Body, Location, Operation, Parameter, annotations_for, path_placeholders, safe_name

__all__ = ["SpecError", "SpecProblem", "check_spec", "operations_of", "parse_spec"]

MAX_DEPTH = 100
"""How deep the document's mappings and lists may nest."""
MAX_NODES = 2_000_000
"""How many values the document may hold (what a YAML alias names counts each time it is used)."""
INLINE_BUDGET = 2_000
"""Schema nodes one tool schema may hold before a schema used again goes to ``$defs`` instead of being inlined."""
INLINE_DEPTH = 24
"""Schema nesting past which a referenced schema goes to ``$defs`` instead of being inlined."""
WORK_BUDGET = 20_000_000
"""Schema nodes converted for all the operations of one document, past which the rest are left out."""
REF_HOPS = 32
"""How many references in a row (a reference to a reference…) are followed."""

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_LOCATIONS: tuple[Location, ...] = ("path", "query", "header", "cookie")
_IGNORED_HEADERS = frozenset({"accept", "content-type", "authorization"})
_SAFE_ARGUMENT = re.compile(r"[A-Za-z0-9_.-]+")
_VERSION = re.compile(r"3\.([01])\.\d+(-[0-9A-Za-z.-]+)?")
_DROPPED = frozenset({"discriminator", "xml", "externalDocs", "example", "nullable"})
"""OpenAPI-only schema keys that are not JSON Schema (besides ``x-`` extensions)."""
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_ONE = frozenset(
    {
        "items",
        "additionalProperties",
        "not",
        "if",
        "then",
        "else",
        "contains",
        "propertyNames",
        "unevaluatedItems",
        "unevaluatedProperties",
        "additionalItems",
        "contentSchema",
    }
)
_ANNOTATIONS = frozenset({"description", "title", "default", "examples", "deprecated", "readOnly", "writeOnly"})
_DATA_KEYS = frozenset({"example", "default", "enum", "const"})
"""Keys whose values are data, where a ``$ref`` key means nothing."""
_EXAMPLE_KEYS = frozenset({"summary", "description", "value", "externalValue"})


class SpecProblem(NamedTuple):
    """One thing wrong with an OpenAPI document."""

    pointer: str
    """JSON pointer (RFC 6901) of where it is: ``/paths/~1pets~1{petId}/get/parameters/0``; "" = the document."""
    message: str
    """What is wrong and, where it helps, what to do."""


class SpecError(Exception):
    """The text is not an OpenAPI 3.0/3.1 document; :attr:`problems` says why."""

    def __init__(self, problems: Iterable[SpecProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(f"{p.pointer or '(document)'}: {p.message}" for p in self.problems))


def parse_spec(text: str) -> dict[str, Any]:
    """YAML or JSON text (YAML is a superset) -> the document, as plain data (keys are strings).

    Raises :class:`SpecError`: a syntax error (with its line), not a mapping, Swagger 2.0, no ``openapi`` field, an
    ``openapi`` version that is not 3.0.x or 3.1.x, or a document nested too deeply or too large."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise SpecError([SpecProblem("", f"not valid YAML or JSON{where}: {exc.problem or exc.context}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([SpecProblem("", f"not valid YAML or JSON: {exc}")]) from None
    except RecursionError:
        raise SpecError([SpecProblem("", f"the document nests more than {MAX_DEPTH} levels deep")]) from None
    document = _document(loaded)
    _, problem = _version(document)
    if problem is not None:
        raise SpecError([problem])
    return document


def check_spec(spec: Mapping[str, Any]) -> list[SpecProblem]:
    """Every problem openapi-spec-validator finds with the document (by its 3.0 or 3.1 rules), plus each ``$ref``
    that is external, points nowhere or loops; each with its pointer and a readable message. Empty when valid."""
    try:
        document = _document(spec)
    except SpecError as exc:
        return list(exc.problems)
    version, problem = _version(document)
    if problem is not None:
        return [problem]
    validator = _Validator30 if version == "3.0" else _Validator31
    problems = _structure_problems(validator, document)
    references = _reference_problems(document)
    problems += references
    if not references:  # the validator's own walk resolves every reference: it would stop at the first bad one
        places = {p.pointer for p in problems}
        problems += [p for p in _keyword_problems(validator, document, quiet=bool(problems)) if p.pointer not in places]
    return list(dict.fromkeys(problems))


def operations_of(spec: Mapping[str, Any]) -> tuple[list[Operation], list[SpecProblem]]:
    """One :class:`Operation` per operation of ``paths``, in document order, and the problems that prevent one
    (each such operation is left out, the rest are served)."""
    try:
        document = _document(spec)
    except SpecError as exc:
        return [], list(exc.problems)
    version, problem = _version(document)
    if problem is not None:
        return [], [problem]
    paths = document.get("paths")
    if paths is None:
        return [], []
    if not isinstance(paths, dict):
        return [], [SpecProblem("/paths", "`paths` must be a mapping of path templates to path items")]
    return _Operations(document, version).of(paths)


# --- the document as plain data ---------------------------------------------------------------------------------


def _escape(key: object) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _pointer(parts: Iterable[object]) -> str:
    return "".join(f"/{_escape(part)}" for part in parts)


def _key(key: object) -> str:
    if isinstance(key, bool) or key is None:
        return "true" if key is True else "false" if key is False else "null"
    return str(key)


class _Plain:
    """Copies loaded YAML (or any mapping) into plain JSON-like data, within :data:`MAX_DEPTH`/:data:`MAX_NODES`.

    Where a value is (``at``) is a chain of ``(parent, key)`` pairs, turned into a pointer only for a problem."""

    def __init__(self) -> None:
        self.nodes = 0
        self.open: set[int] = set()

    def copy(self, value: Any, at: tuple[Any, str] | None = None, depth: int = 0) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Fail(SpecProblem("", f"the document is too large (over {MAX_NODES} values)"))
        if value is None or isinstance(value, bool | int | float | str):
            return value
        is_map = isinstance(value, Mapping)
        if not is_map and not isinstance(value, list | tuple):
            return str(value)  # dates, timestamps, binary: as text
        if depth >= MAX_DEPTH:
            raise _Fail(SpecProblem(_pointer(_parts(at)), f"the document nests more than {MAX_DEPTH} levels deep here"))
        if id(value) in self.open:
            raise _Fail(SpecProblem(_pointer(_parts(at)), "a YAML alias refers to a node that contains it"))
        self.open.add(id(value))
        try:
            if is_map:
                return {_key(k): self.copy(v, (at, _key(k)), depth + 1) for k, v in value.items()}
            return [self.copy(v, (at, str(i)), depth + 1) for i, v in enumerate(value)]
        finally:
            self.open.discard(id(value))


def _parts(at: tuple[Any, str] | None) -> list[str]:
    parts: list[str] = []
    while at is not None:
        at, key = at
        parts.append(key)
    return parts[::-1]


def _document(loaded: Any) -> dict[str, Any]:
    if loaded is None:
        raise SpecError([SpecProblem("", "the document is empty")])
    if not isinstance(loaded, Mapping):
        kind = "a list" if isinstance(loaded, list | tuple) else f"a {type(loaded).__name__}"
        raise SpecError([SpecProblem("", f"the document must be a mapping (an OpenAPI object), not {kind}")])
    try:
        document: dict[str, Any] = _Plain().copy(loaded)
    except _Fail as fail:
        raise SpecError([fail.problem]) from None
    return document


def _version(document: Mapping[str, Any]) -> tuple[str, SpecProblem | None]:
    """``"3.0"`` or ``"3.1"``, or the problem with the document's version."""
    if "swagger" in document:
        return "", SpecProblem(
            "/swagger",
            f"Swagger {document['swagger']} documents are not supported, only OpenAPI 3.0 and 3.1: convert it "
            "first, e.g. with swagger2openapi (npx swagger2openapi swagger.yaml -o openapi.yaml)",
        )
    if "openapi" not in document:
        return "", SpecProblem("", "no `openapi` field: not an OpenAPI document (it starts with e.g. openapi: 3.1.0)")
    version = document["openapi"]
    if not isinstance(version, str):
        return "", SpecProblem("/openapi", f'`openapi` must be a string such as "3.1.0", not {version!r}: quote it')
    match = _VERSION.fullmatch(version)
    if match is None:
        return "", SpecProblem("/openapi", f"OpenAPI {version} is not supported: only 3.0.x and 3.1.x are")
    return f"3.{match.group(1)}", None


# --- checking ---------------------------------------------------------------------------------------------------

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 40, 40
_MESSAGE_LIMIT = 300


def _message(error: ValidationError) -> str:
    message = error.message
    if len(message) > 80:
        long = repr(error.instance)
        if len(long) > 60:
            message = message.replace(long, _SHORT.repr(error.instance))
    return message if len(message) <= _MESSAGE_LIMIT else message[: _MESSAGE_LIMIT - 1] + "…"


def _leaves(error: ValidationError, depth: int = 0) -> Iterator[ValidationError]:
    if error.context and depth < 8:
        for inner in error.context:
            yield from _leaves(inner, depth + 1)
    else:
        yield error


def _problem_of(error: ValidationError) -> SpecProblem:
    """The problem for one validator error: for "not valid under any of the given schemas", the deepest reason
    among its alternatives (leaving out "is a $ref" alternatives), with that reason's pointer."""
    pointer, message = _pointer(error.absolute_path), _message(error)
    if not error.context:
        return SpecProblem(pointer, message)
    leaves = [leaf for leaf in _leaves(error) if leaf.message != "'$ref' is a required property"]
    if not leaves:
        return SpecProblem(pointer, message)
    deepest = max(len(leaf.absolute_path) for leaf in leaves)
    reasons = [leaf for leaf in leaves if len(leaf.absolute_path) == deepest]
    first = reasons[0]
    if all(leaf.validator == "enum" and leaf.absolute_path == first.absolute_path for leaf in reasons):
        allowed = [repr(v) for leaf in reasons if isinstance(leaf.validator_value, list) for v in leaf.validator_value]
        reason = f"{_SHORT.repr(first.instance)} is not one of {', '.join(dict.fromkeys(allowed))}"
    else:
        reason = _message(first)
    return SpecProblem(_pointer(first.absolute_path), reason)


def _structure_problems(validator: type[SpecValidator], document: dict[str, Any]) -> list[SpecProblem]:
    try:
        return [_problem_of(error) for error in validator.schema_validator.iter_errors(document)]
    except RecursionError:
        return [SpecProblem("", "the document nests too deeply to be checked")]


def _keyword_problems(validator: type[SpecValidator], document: dict[str, Any], quiet: bool) -> list[SpecProblem]:
    """The validator's checks beyond the OpenAPI JSON Schema (path parameters, operationIds, schemas, defaults),
    each placed by the keyword validators below. ``quiet``: the document is already known to be malformed, so a
    check that breaks on it says nothing more."""
    problems: list[SpecProblem] = []
    try:
        checker = validator(document)
        problems += (_problem_of(error) for error in checker.root_validator(checker.schema_path))
    except (Exception, RecursionError) as exc:  # the checks assume a well-formed document
        if not quiet:
            problems.append(SpecProblem("", f"the document could not be checked fully: {_SHORT.repr(exc)}"))
    return problems


def _located(errors: Iterable[ValidationError], parts: Sequence[Any]) -> Iterator[ValidationError]:
    """The errors of a keyword validator given a place in the document, with that place before their path."""
    for error in errors:
        if not getattr(error, "_patchbay_located", False):
            error.path.extendleft(reversed(parts))
            error._patchbay_located = True  # type: ignore[attr-defined]
        yield error


class _SchemaAt(keywords.SchemaValidator):
    def __call__(
        self, schema: SchemaPath, require_properties: bool = True, meta_checked: bool = False
    ) -> Iterator[ValidationError]:
        return _located(super().__call__(schema, require_properties, meta_checked), schema.parts)


class _ValueAt(keywords.ValueValidator):
    def __call__(self, schema: SchemaPath, value: Any) -> Iterator[ValidationError]:
        return _located(super().__call__(schema, value), [*schema.parts, "default"])


class _Schema30(_SchemaAt, keywords.OpenAPIV30SchemaValidator):
    pass


class _Schema31(_SchemaAt, keywords.OpenAPIV31SchemaValidator):
    pass


class _Value30(_ValueAt, keywords.OpenAPIV30ValueValidator):
    pass


class _Value31(_ValueAt, keywords.OpenAPIV31ValueValidator):
    pass


class _Parameters(keywords.ParametersValidator):
    def __call__(self, parameters: SchemaPath) -> Iterator[ValidationError]:
        return _located(super().__call__(parameters), parameters.parts)


class _Operation(keywords.OperationValidator):
    def __call__(
        self, url: str, name: str, operation: SchemaPath, path_parameters: SchemaPath | None
    ) -> Iterator[ValidationError]:
        return _located(super().__call__(url, name, operation, path_parameters), operation.parts)


class _Tags(keywords.TagsValidator):
    def __call__(self, tags: SchemaPath) -> Iterator[ValidationError]:
        return _located(super().__call__(tags), tags.parts)


_LOCATED = {"parameters": _Parameters, "operation": _Operation, "tags": _Tags}


class _Validator30(OpenAPIV30SpecValidator):
    resolver_handlers = {}  # no reference is fetched: no file, no network
    keyword_validators = {**OpenAPIV30SpecValidator.keyword_validators, **_LOCATED, "schema": _Schema30}
    keyword_validators["default"] = _Value30


class _Validator31(OpenAPIV31SpecValidator):
    resolver_handlers = {}
    keyword_validators = {**OpenAPIV31SpecValidator.keyword_validators, **_LOCATED, "schema": _Schema31}
    keyword_validators["default"] = _Value31


def _reference_problems(document: dict[str, Any]) -> list[SpecProblem]:
    """Each ``$ref`` of the document that is external, points nowhere, or starts a loop of references."""
    refs = _Refs(document)
    problems = []
    stack: list[tuple[Any, str]] = [(document, "")]
    while stack:
        node, at = stack.pop()
        if isinstance(node, list):
            stack += ((item, f"{at}/{i}") for i, item in reversed(list(enumerate(node))))
            continue
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("$ref"), str):
            try:
                refs.follow(node, at)
            except _Fail as fail:
                problems.append(fail.problem)
        example = "value" in node and node.keys() <= _EXAMPLE_KEYS
        stack += (
            (value, f"{at}/{_escape(key)}")
            for key, value in reversed(node.items())
            if key not in _DATA_KEYS and not key.startswith("x-") and not (example and key == "value")
        )
    return list(dict.fromkeys(problems))


# --- references -------------------------------------------------------------------------------------------------


class _Fail(Exception):
    def __init__(self, problem: SpecProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class _TooMuch(Exception):
    message = (
        f"the document's schemas add up to over {WORK_BUDGET} nodes across its operations: "
        "this operation and the ones after it are left out"
    )


class _Budget:
    def __init__(self) -> None:
        self.used = 0


class _Refs:
    """Local ``$ref`` lookup in the document, by :mod:`referencing`."""

    def __init__(self, document: dict[str, Any]) -> None:
        self._resolver = Registry().with_resource("", Resource.opaque(document)).resolver()

    def target(self, ref: str, at: str) -> tuple[Any, str]:
        """What ``ref`` (found at ``at``, the pointer of its ``$ref``) points to, and where that is."""
        if not ref.startswith("#"):
            raise _Fail(
                SpecProblem(
                    at,
                    f"external reference {ref!r}: only references inside the document (#/...) are supported; "
                    "bundle the document into one first (e.g. with redocly bundle)",
                )
            )
        if ref != "#" and not ref.startswith("#/"):
            raise _Fail(SpecProblem(at, f"reference {ref!r}: only JSON-pointer references (#/...) are supported"))
        try:
            contents = self._resolver.lookup(ref).contents
        except (Unresolvable, LookupError, ValueError, TypeError):
            raise _Fail(SpecProblem(at, f"{ref!r} points nowhere: the document has nothing there")) from None
        return contents, unquote(ref[1:])

    def follow(self, node: Any, at: str) -> tuple[Any, str]:
        """``node``, or what its chain of ``$ref`` ends at, and where that is."""
        seen: list[str] = []
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if ref in seen or len(seen) >= REF_HOPS:
                raise _Fail(SpecProblem(f"{at}/$ref", f"the references loop: {' -> '.join([*seen, ref])}"))
            seen.append(ref)
            node, at = self.target(ref, f"{at}/$ref")
        return node, at

    def quietly(self, node: Any) -> Any:
        """``node`` followed through its references, or None when one of them fails."""
        try:
            return self.follow(node, "")[0]
        except _Fail:
            return None


# --- schemas ----------------------------------------------------------------------------------------------------


class _Schemas:
    """Turns the OpenAPI schemas of one tool schema (its inputSchema or its outputSchema) into JSON Schema,
    inlining local references; cyclic ones, and those reused past the budget, go to :attr:`defs`."""

    def __init__(
        self, refs: _Refs, version: str, direction: Literal["in", "out"], budget: _Budget, problems: list[SpecProblem]
    ) -> None:
        self.refs, self.version, self.budget, self.problems = refs, version, budget, problems
        self.hidden = "readOnly" if direction == "in" else "writeOnly"
        self.defs: dict[str, Any] = {}
        self.def_names: dict[str, str] = {}
        self.stack: list[str] = []
        self.memo: dict[str, tuple[Any, int]] = {}
        self.pending: list[tuple[str, Any, str]] = []
        self.size = 0

    def schema(self, node: Any, at: str, depth: int = 0) -> Any:
        self.size += 1
        self.budget.used += 1
        if self.budget.used > WORK_BUDGET:
            raise _TooMuch
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            self.problems.append(SpecProblem(at, "a schema must be a mapping"))
            return {}
        if isinstance(node.get("$ref"), str):
            return self._reference(node, at, depth)
        converted = self._keywords(node, at, depth)
        return _from_30(node, converted) if self.version == "3.0" else converted

    def finish(self, root: Any) -> Any:
        """``root`` once every deferred schema is converted; a root that is only a reference into ``$defs``
        becomes that schema (so a root of type object stays one)."""
        while self.pending:
            ref, contents, at = self.pending.pop()
            self.defs[self.def_names[ref]] = self.schema(contents, at)
        if isinstance(root, dict) and isinstance(root.get("$ref"), str) and root["$ref"].startswith("#/$defs/"):
            target = self.defs.get(root["$ref"][len("#/$defs/") :])
            if isinstance(target, dict):
                root = {**copy.deepcopy(target), **{k: v for k, v in root.items() if k != "$ref"}}
        return root

    def property_schema(self, node: Any, at: str) -> dict[str, Any]:
        """A schema as the schema of one tool argument (always a mapping)."""
        converted = self.schema(node, at)
        if converted is True:
            return {}
        if converted is False:
            return {"not": {}}
        return dict(converted)

    def hides(self, node: Any) -> bool:
        """Whether a property's schema keeps it out of this direction (readOnly in a request, writeOnly in a
        response)."""
        target = self.refs.quietly(node)
        return isinstance(target, dict) and target.get(self.hidden) is True

    def _keywords(self, node: dict[str, Any], at: str, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        hidden: set[str] = set()
        for key, value in node.items():
            if key in _DROPPED or key.startswith("x-") or (key == "examples" and not isinstance(value, list)):
                continue
            where = f"{at}/{_escape(key)}"
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                out[key] = self._schema_map(key, value, where, depth, hidden)
            elif key in _SCHEMA_LISTS and isinstance(value, list):
                out[key] = [self.schema(item, f"{where}/{i}", depth + 1) for i, item in enumerate(value)]
            elif key in _SCHEMA_ONE and isinstance(value, dict | bool):
                out[key] = self.schema(value, where, depth + 1)
            elif key == "items" and isinstance(value, list):
                out["prefixItems"] = [self.schema(item, f"{where}/{i}", depth + 1) for i, item in enumerate(value)]
            else:
                out[key] = copy.deepcopy(value)
        if hidden and isinstance(out.get("required"), list):
            out["required"] = [name for name in out["required"] if name not in hidden]
            if not out["required"]:
                del out["required"]
        return out

    def _schema_map(self, key: str, value: dict[str, Any], at: str, depth: int, hidden: set[str]) -> Any:
        """A mapping of names to schemas; the properties this direction hides are left out, their names added
        to ``hidden``."""
        result = {}
        for name, sub in value.items():
            if key == "properties" and self.hides(sub):
                hidden.add(name)
                continue
            result[name] = self.schema(sub, f"{at}/{_escape(name)}", depth + 1)
        return result

    def _reference(self, node: dict[str, Any], at: str, depth: int) -> Any:
        ref: str = node["$ref"]
        if ref in self.def_names:
            return self._siblings(self._to_def(ref), node, at, depth)
        if ref in self.stack:  # a cycle: the schema goes to $defs once its conversion completes
            return self._siblings(self._to_def(ref), node, at, depth)
        try:
            contents, target_at = self.refs.target(ref, f"{at}/$ref")
        except _Fail as fail:
            self.problems.append(fail.problem)
            return {}
        size = self.memo[ref][1] if ref in self.memo else 0
        if depth >= INLINE_DEPTH or self.size + size > INLINE_BUDGET:
            # converted again at the top, where (the budget spent) every reference in it goes to $defs too
            self._name(ref)
            self.pending.append((ref, contents, target_at))
            return self._siblings(self._to_def(ref), node, at, depth)
        if ref in self.memo:
            self.size += size
            return self._siblings(copy.deepcopy(self.memo[ref][0]), node, at, depth)
        before = self.size
        self.stack.append(ref)
        try:
            value = self.schema(contents, target_at, depth + 1)
        finally:
            self.stack.pop()
        if ref in self.def_names:
            self.defs[self.def_names[ref]] = value
            return self._siblings(self._to_def(ref), node, at, depth)
        self.memo[ref] = (value, self.size - before)
        return self._siblings(value, node, at, depth)

    def _to_def(self, ref: str) -> dict[str, Any]:
        return {"$ref": f"#/$defs/{self._name(ref)}"}

    def _name(self, ref: str) -> str:
        """The name of ``ref``'s schema under ``$defs`` (given on first use)."""
        if ref in self.def_names:
            return self.def_names[ref]
        last = ref.rsplit("/", 1)[-1]
        base = safe_name(unquote(last).replace("~1", "/").replace("~0", "~"))
        name = _unique(base, set(self.def_names.values()))
        self.def_names[ref] = name
        return name

    def _siblings(self, value: Any, node: dict[str, Any], at: str, depth: int) -> Any:
        """A referenced schema with the keys written beside its ``$ref`` (3.1 only: 3.0 ignores them)."""
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        if self.version == "3.0" or not siblings:
            return value
        extra = self._keywords(siblings, at, depth)
        if not extra:
            return value
        if isinstance(value, dict) and extra.keys() <= _ANNOTATIONS:
            return {**value, **extra}
        return {"allOf": [value], **extra}


def _from_30(node: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI 3.0's schema dialect as JSON Schema: ``nullable`` and boolean ``exclusiveMaximum``/``Minimum``."""
    for flag, limit in (("exclusiveMaximum", "maximum"), ("exclusiveMinimum", "minimum")):
        if out.get(flag) is True and limit in out:
            out[flag] = out.pop(limit)
        elif isinstance(out.get(flag), bool):
            del out[flag]
    if node.get("nullable") is not True:
        return out
    kind = out.get("type")
    if isinstance(out.get("enum"), list) and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    if isinstance(kind, str):
        out["type"] = [kind, "null"]
    elif isinstance(kind, list):
        out["type"] = kind if "null" in kind else [*kind, "null"]
    elif out and "enum" not in out:
        notes: dict[str, Any] = {k: out.pop(k) for k in ("title", "description") if k in out}
        out = {"anyOf": [out, {"type": "null"}], **notes} if out else {**notes}
    return out


def _unique(base: str, taken: set[str]) -> str:
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


# --- operations -------------------------------------------------------------------------------------------------


def _media_kind(media_type: str) -> Literal["json", "form", "other"]:
    essence = media_type.split(";", 1)[0].strip().lower()
    if essence == "application/json" or essence.endswith("+json"):
        return "json"
    if essence == "application/x-www-form-urlencoded":
        return "form"
    return "other"


def _request_media(content: dict[str, Any]) -> str:
    """The media type a request body is sent as: JSON, then any ``+json``, then a form, then the first listed."""

    def rank(media_type: str) -> int:
        essence = media_type.split(";", 1)[0].strip().lower()
        if essence == "application/json":
            return 0
        if essence.endswith("+json"):
            return 1
        return 2 if essence == "application/x-www-form-urlencoded" else 3

    return min(content, key=rank)  # the first of the best rank


def _response_media(content: dict[str, Any]) -> str | None:
    """The JSON media type of a response: ``application/json``, then any ``+json``; None when it has none."""
    json_types = [media_type for media_type in content if _media_kind(media_type) == "json"]
    exact = [m for m in json_types if m.split(";", 1)[0].strip().lower() == "application/json"]
    return next(iter(exact or json_types), None)


def _success(responses: dict[str, Any]) -> str | None:
    """The first success response: "200", then "201".."299", then "2XX"."""
    codes = sorted(code for code in responses if len(code) == 3 and code.isdigit() and code.startswith("2"))
    if "200" in codes:
        return "200"
    if codes:
        return codes[0]
    return next((code for code in responses if code.upper() == "2XX"), None)


def _flattens(schema: Any) -> bool:
    """Whether a body schema is an object whose properties can be tool arguments of their own."""
    return (
        isinstance(schema, dict)
        and schema.get("type", "object") == "object"
        and isinstance(schema.get("properties"), dict)
        and bool(schema["properties"])
        and not any(key in schema for key in ("allOf", "anyOf", "oneOf"))
    )


class _Operations:
    """The operations of a document's ``paths``, their names kept unique."""

    def __init__(self, document: dict[str, Any], version: str) -> None:
        self.refs, self.version, self.budget = _Refs(document), version, _Budget()
        self.operations: list[Operation] = []
        self.problems: list[SpecProblem] = []
        self.names: dict[str, str] = {}

    def of(self, paths: dict[str, Any]) -> tuple[list[Operation], list[SpecProblem]]:
        try:
            for path, raw_item in paths.items():
                self._path(path, raw_item)
        except _TooMuch as exc:
            self.problems.append(SpecProblem(str(exc), _TooMuch.message))
        return self.operations, self.problems

    def _path(self, path: str, raw_item: Any) -> None:
        pointer = f"/paths/{_escape(path)}"
        try:
            item, item_at = self.refs.follow(raw_item, pointer)
        except _Fail as fail:
            self.problems.append(fail.problem._replace(message=f"{fail.problem.message}; the path {path} is left out"))
            return
        if not isinstance(item, dict):
            self.problems.append(SpecProblem(pointer, "a path item must be a mapping"))
            return
        for method, raw in item.items():
            if method in _METHODS:
                at = f"{pointer}/{_escape(method)}"
                built = _OperationBuilder(self.refs, self.version, self.budget, path, method, item, item_at, raw)
                self._add(built, at)

    def _add(self, built: "_OperationBuilder", at: str) -> None:
        if built.name in self.names:
            message = (
                f"a second operation is named {built.name!r} (the first is at {self.names[built.name]}): "
                "give one of them another operationId; this one is left out"
            )
            self.problems.append(SpecProblem(at, message))
            return
        self.names[built.name] = at
        try:
            operation = built.build(at)
        except _TooMuch:
            raise _TooMuch(at) from None
        if operation is None:
            self.problems += built.problems
        else:
            self.operations.append(operation)


class _Argument(NamedTuple):
    name: str
    location: Location
    raw: dict[str, Any]
    at: str


class _OperationBuilder:
    """One operation of ``paths`` as an :class:`Operation`, or the problems that prevent it."""

    def __init__(
        self,
        refs: _Refs,
        version: str,
        budget: _Budget,
        path: str,
        method: str,
        item: dict[str, Any],
        item_at: str,
        raw: Any,
    ) -> None:
        at = f"{item_at}/{_escape(method)}"
        self.refs, self.path, self.method, self.item, self.item_at, self.at = refs, path, method, item, item_at, at
        self.op: dict[str, Any] = raw if isinstance(raw, dict) else {}
        self.problems: list[SpecProblem] = []
        self.inputs = _Schemas(refs, version, "in", budget, self.problems)
        self.outputs = _Schemas(refs, version, "out", budget, self.problems)
        operation_id = self.op.get("operationId")
        self.name = safe_name(operation_id if isinstance(operation_id, str) else f"{method} {path}")
        if not isinstance(raw, dict):
            self.problems.append(SpecProblem(at, "an operation must be a mapping"))

    def build(self, pointer: str) -> Operation | None:
        parameters = self._parameters()
        taken = {parameter.argument for parameter, _ in parameters}
        properties = {parameter.argument: schema for parameter, schema in parameters}
        required = [parameter.argument for parameter, _ in parameters if parameter.required]
        body, body_properties, body_required, extra = self._body(taken)
        properties.update(body_properties)
        input_schema: dict[str, Any] = {"type": "object", "properties": properties}
        if required + body_required:
            input_schema["required"] = required + body_required
        input_schema.update(extra)
        input_schema = self.inputs.finish(input_schema)
        if self.inputs.defs:
            input_schema["$defs"] = self.inputs.defs
        output_schema = self._output()
        if self.problems:
            left_out = f"; {self.name} ({self.method.upper()} {self.path}) is left out"
            self.problems[:] = [p._replace(message=p.message + left_out) for p in dict.fromkeys(self.problems)]
            return None
        return Operation(
            name=self.name,
            method=self.method.upper(),
            path=self.path,
            definition=self._definition(input_schema, output_schema),
            parameters=tuple(parameter for parameter, _ in parameters),
            body=body,
            tags=tuple(tag for tag in self.op.get("tags") or () if isinstance(tag, str)),
            pointer=pointer,
        )

    def _definition(self, input_schema: dict[str, Any], output_schema: dict[str, Any] | None) -> dict[str, Any]:
        summary, description = self.op.get("summary"), self.op.get("description")
        texts = [text for text in (summary, description) if isinstance(text, str) and text.strip()]
        definition: dict[str, Any] = {
            "name": self.name,
            "description": "\n\n".join(texts) or f"{self.method.upper()} {self.path}",
        }
        if isinstance(summary, str) and summary.strip():
            definition["title"] = summary
        definition["inputSchema"] = input_schema
        if output_schema is not None:
            definition["outputSchema"] = output_schema
        definition["annotations"] = annotations_for(self.method)
        return definition

    # parameters

    def _declared(self) -> list[_Argument]:
        """The path item's parameters merged with the operation's (which win on the same name and location)."""
        merged: dict[tuple[str, str], _Argument] = {}
        for owner, owner_at in ((self.item, self.item_at), (self.op, self.at)):
            raw_list = owner.get("parameters")
            if raw_list is None:
                continue
            if not isinstance(raw_list, list):
                self.problems.append(SpecProblem(f"{owner_at}/parameters", "`parameters` must be a list"))
                continue
            for index, raw in enumerate(raw_list):
                argument = self._parameter(raw, f"{owner_at}/parameters/{index}")
                if argument is not None:
                    merged[(argument.name, argument.location)] = argument
        return list(merged.values())

    def _parameter(self, raw: Any, at: str) -> _Argument | None:
        try:
            parameter, parameter_at = self.refs.follow(raw, at)
        except _Fail as fail:
            self.problems.append(fail.problem)
            return None
        name, location = (parameter.get("name"), parameter.get("in")) if isinstance(parameter, dict) else (None, None)
        if not isinstance(name, str) or not name:
            self.problems.append(SpecProblem(parameter_at, "a parameter needs a `name`"))
            return None
        if location not in _LOCATIONS:
            hint = (
                " (Swagger 2.0's body parameter: OpenAPI 3 has `requestBody`)"
                if location in ("body", "formData")
                else ""
            )
            self.problems.append(
                SpecProblem(f"{parameter_at}/in", f"`in` is {location!r}, not path, query, header or cookie{hint}")
            )
            return None
        if location == "header" and name.lower() in _IGNORED_HEADERS:
            return None
        assert isinstance(parameter, dict)
        return _Argument(name, location, parameter, parameter_at)

    def _parameters(self) -> list[tuple[Parameter, dict[str, Any]]]:
        declared = self._declared()
        in_path = {argument.name for argument in declared if argument.location == "path"}
        for placeholder in path_placeholders(self.path):
            if placeholder not in in_path:
                self.problems.append(
                    SpecProblem(self.at, f"the path has {{{placeholder}}} but no path parameter {placeholder!r}")
                )
        # the path's parameters keep their names first, then the query's, the headers', the cookies'
        ranked = sorted(range(len(declared)), key=lambda i: _LOCATIONS.index(declared[i].location))
        names: dict[int, str] = {}
        for i in ranked:
            name, location = declared[i].name, declared[i].location
            base = name if _SAFE_ARGUMENT.fullmatch(name) else safe_name(name)
            names[i] = base if base not in names.values() else _unique(f"{location}_{base}", set(names.values()))
        return [self._parameter_of(argument, names[i]) for i, argument in enumerate(declared)]

    def _parameter_of(self, argument: _Argument, name: str) -> tuple[Parameter, dict[str, Any]]:
        raw, at = argument.raw, argument.at
        if "schema" in raw:
            schema = self.inputs.property_schema(raw["schema"], f"{at}/schema")
        elif isinstance(raw.get("content"), dict) and raw["content"]:
            media_type, media = next(iter(raw["content"].items()))
            media_schema = media.get("schema", {}) if isinstance(media, dict) else {}
            schema = self.inputs.property_schema(media_schema, f"{at}/content/{_escape(media_type)}/schema")
        else:
            schema = {}
        if isinstance(raw.get("description"), str) and "description" not in schema:
            schema["description"] = raw["description"]
        explode = raw.get("explode")
        if not isinstance(explode, bool):
            style = raw.get("style") or ("form" if argument.location in ("query", "cookie") else "simple")
            explode = style == "form"
        required = argument.location == "path" or raw.get("required") is True
        return Parameter(argument.name, argument.location, name, required=required, explode=explode), schema

    # the request body

    def _body(self, taken: set[str]) -> tuple[Body | None, dict[str, Any], list[str], dict[str, Any]]:
        """The body, the tool arguments carrying it, the required ones, and more keys of the inputSchema."""
        if self.op.get("requestBody") is None:
            return None, {}, [], {}
        try:
            body, at = self.refs.follow(self.op["requestBody"], f"{self.at}/requestBody")
        except _Fail as fail:
            self.problems.append(fail.problem)
            return None, {}, [], {}
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, dict) or not content:
            self.problems.append(SpecProblem(at, "a request body needs a `content` mapping of media types"))
            return None, {}, [], {}
        media_type = _request_media(content)
        media = content[media_type] if isinstance(content[media_type], dict) else {}
        schema_at = f"{at}/content/{_escape(media_type)}/schema"
        required = body.get("required") is True
        kind = _media_kind(media_type)
        try:
            resolved, resolved_at = self.refs.follow(media.get("schema"), schema_at)
        except _Fail as fail:
            self.problems.append(fail.problem)
            return None, {}, [], {}
        if kind != "other" and _flattens(resolved):
            return self._flat_body(media_type, required, resolved, resolved_at, taken)
        if kind == "other":
            schema: dict[str, Any] = {"type": "string"}
        elif "schema" in media:
            schema = self.inputs.property_schema(media["schema"], schema_at)
        else:
            schema = {} if kind == "json" else {"type": "object"}
        if isinstance(body.get("description"), str) and "description" not in schema:
            schema["description"] = body["description"]
        argument = _unique("body", taken)
        return Body(media_type, required, argument), {argument: schema}, [argument] if required else [], {}

    def _flat_body(
        self, media_type: str, required: bool, schema: dict[str, Any], at: str, taken: set[str]
    ) -> tuple[Body, dict[str, Any], list[str], dict[str, Any]]:
        wanted = set(schema.get("required") or ()) if required else set()
        arguments: dict[str, str] = {}
        properties: dict[str, Any] = {}
        required_arguments = []
        used = set(taken)
        for name, raw in schema["properties"].items():
            if self.inputs.hides(raw):
                continue
            base = name if _SAFE_ARGUMENT.fullmatch(name) else safe_name(name)
            argument = base if base not in used else _unique(f"body_{base}", used)
            used.add(argument)
            arguments[argument] = name
            properties[argument] = self.inputs.property_schema(raw, f"{at}/properties/{_escape(name)}")
            if name in wanted:
                required_arguments.append(argument)
        extra = {}
        if "additionalProperties" in schema:
            extra["additionalProperties"] = self.inputs.schema(
                schema["additionalProperties"], f"{at}/additionalProperties"
            )
        return Body(media_type, required, None, arguments), properties, required_arguments, extra

    # the response

    def _output(self) -> dict[str, Any] | None:
        """The outputSchema: the JSON object schema of the first success response, if it has one."""
        responses = self.op.get("responses")
        if not isinstance(responses, dict):
            return None
        code = _success(responses)
        if code is None:
            return None
        try:
            response, at = self.refs.follow(responses[code], f"{self.at}/responses/{_escape(code)}")
        except _Fail as fail:
            self.problems.append(fail.problem)
            return None
        content = response.get("content") if isinstance(response, dict) else None
        media_type = _response_media(content) if isinstance(content, dict) else None
        if media_type is None or not isinstance(content, dict) or not isinstance(content[media_type], dict):
            return None
        raw = content[media_type].get("schema")
        schema_at = f"{at}/content/{_escape(media_type)}/schema"
        try:
            resolved, _ = self.refs.follow(raw, schema_at)
        except _Fail as fail:
            self.problems.append(fail.problem)
            return None
        if not isinstance(resolved, dict) or resolved.get("type") != "object":
            return None
        schema = self.outputs.finish(self.outputs.schema(raw, schema_at))
        if not isinstance(schema, dict):
            return None
        if self.outputs.defs:
            schema["$defs"] = self.outputs.defs
        return schema
