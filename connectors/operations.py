"""REST operations: what one tool of a REST connector sends, and how its arguments map onto the request. Pure.

An :class:`Operation` comes from an OpenAPI document (``connectors.openapi``) or is declared by hand in the
config (:func:`declared`); ``connectors.rest`` turns a call's arguments into one HTTP request by it. Every
argument of the tool's ``inputSchema`` is carried by exactly one :class:`Parameter` or by the :class:`Body`.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "DECLARED_QUERY_METHODS",
    "METHODS",
    "Body",
    "Declared",
    "Location",
    "Operation",
    "Parameter",
    "annotations_for",
    "declared",
    "path_placeholders",
    "safe_name",
]

Location = Literal["path", "query", "header", "cookie"]
METHODS = ("GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE")
"""The HTTP methods an operation may have (OpenAPI's, upper case)."""
DECLARED_QUERY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
"""Methods whose declared operations send their arguments (those not in the path) as the query, not a body."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_PLACEHOLDER = re.compile(r"\{([^{}/]+)\}")


@dataclass(frozen=True, slots=True)
class Parameter:
    """One HTTP parameter of an operation, and the tool argument that carries it."""

    name: str
    """The parameter's name on the wire (``petId``, ``X-Request-Id``)."""
    location: Location
    argument: str
    """The tool argument whose value it takes (the name, unless that clashes with another argument)."""
    required: bool = False
    explode: bool = True
    """For an array in the query: one ``name=value`` per item (True, OpenAPI's default) or one comma-joined value."""


@dataclass(frozen=True, slots=True)
class Body:
    """The request body of an operation, and the tool arguments that carry it."""

    media_type: str
    """``application/json`` (or another ``+json`` type), ``application/x-www-form-urlencoded``, or any other type,
    whose body is one string argument sent as it is."""
    required: bool = False
    argument: str | None = None
    """The one argument holding the whole body; None: the body is a JSON object built from :attr:`properties`
    and from any argument that no parameter carries (the schema decides, through validation, which are allowed)."""
    properties: Mapping[str, str] = field(default_factory=dict)
    """Argument name → the body property it fills (when :attr:`argument` is None)."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One REST operation, served as one tool."""

    name: str
    """The tool's name in its connector (before ``prefix``/``rename``), made of ``[A-Za-z0-9_.-]``."""
    method: str
    """Upper case: ``GET``, ``POST``…"""
    path: str
    """The path template, relative to the connector's ``base_url``: ``/pets/{petId}``."""
    definition: Mapping[str, Any]
    """The MCP tool definition in wire form: ``name``, ``description``, ``inputSchema``, ``annotations`` and, when
    the operation answers with a JSON object, ``outputSchema``."""
    parameters: tuple[Parameter, ...] = ()
    body: Body | None = None
    tags: tuple[str, ...] = ()
    """The OpenAPI tags, for ``tools.include``/``exclude`` globs written ``tag:<glob>``."""
    pointer: str = ""
    """Where it is defined: a JSON pointer into the OpenAPI document (``/paths/~1pets/get``), or a config path."""


def safe_name(text: str) -> str:
    """``text`` as a tool name: runs of characters outside ``[A-Za-z0-9_.-]`` become one ``_``, and the ends are
    trimmed of ``_``; empty text gives ``operation``."""
    return _UNSAFE.sub("_", text).strip("_") or "operation"


def path_placeholders(path: str) -> list[str]:
    """The ``{name}`` placeholders of a path template, in order."""
    return _PLACEHOLDER.findall(path)


def annotations_for(method: str) -> dict[str, bool]:
    """MCP tool annotations implied by an HTTP method: GET/HEAD/OPTIONS read only (and idempotent), PUT and DELETE
    idempotent, DELETE destructive; POST and PATCH neither read only nor known to be idempotent."""
    method = method.upper()
    if method in ("GET", "HEAD", "OPTIONS"):
        return {"readOnlyHint": True, "idempotentHint": True}
    if method == "DELETE":
        return {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": True}
    if method == "PUT":
        return {"readOnlyHint": False, "destructiveHint": False, "idempotentHint": True}
    return {"readOnlyHint": False}


@dataclass(frozen=True, slots=True)
class Declared:
    """An operation declared by hand in the config (``connectors.<name>.operations``)."""

    name: str
    method: str
    path: str
    input: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})
    description: str = ""


def declared(entries: Iterable[Declared], where: str = "operations") -> list[Operation]:
    """The operations declared by hand: arguments named in the path fill it; the rest go to the query (GET, HEAD,
    DELETE, OPTIONS) or are the properties of a JSON body (the other methods). ``where`` is their config path."""
    operations = []
    for index, entry in enumerate(entries):
        method = entry.method.upper()
        schema = dict(entry.input)
        properties = schema.get("properties")
        names = list(properties) if isinstance(properties, Mapping) else []
        required = set(schema.get("required") or ())
        in_path = set(path_placeholders(entry.path))
        parameters = [Parameter(name, "path", name, required=True) for name in path_placeholders(entry.path)]
        rest = [name for name in names if name not in in_path]
        body = None
        if method in DECLARED_QUERY_METHODS:
            parameters += [Parameter(name, "query", name, required=name in required) for name in rest]
        else:
            body = Body("application/json", required=bool(required - in_path), properties={n: n for n in rest})
        definition: dict[str, Any] = {
            "name": entry.name,
            "description": entry.description or f"{method} {entry.path}",
            "inputSchema": schema,
            "annotations": annotations_for(method),
        }
        operations.append(
            Operation(
                name=entry.name,
                method=method,
                path=entry.path,
                definition=definition,
                parameters=tuple(parameters),
                body=body,
                pointer=f"{where}[{index}]",
            )
        )
    return operations
