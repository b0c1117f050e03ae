"""The namespaced catalog: naming, filters, renames, collisions, resolution. Pure, no I/O.

A ``Registry`` is an immutable snapshot built from every provider's listing.
When a provider's listing changes the gateway builds a new snapshot and swaps
it in, so a call never sees a half-updated catalog.
"""

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from gateway.errors import ConfigProblem, ToolNotFound
from gateway.types import Listing, Prompt, Resource, Tool

MAX_NAME_LENGTH = 64
"""The tool-name limit many clients enforce; longer names are shortened with a stable hash."""

_HASH_LENGTH = 8
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def exposed_name(prefix: str, separator: str, name: str) -> str:
    """The name a client sees for ``name`` of a provider with ``prefix``.

    Characters outside ``[A-Za-z0-9_.-]`` become ``_``; a name over 64
    characters keeps its head and gets a hash of the full name, so it is
    stable across restarts and distinct for distinct originals.
    """
    full = f"{prefix}{separator}{name}" if prefix else name
    safe = _UNSAFE.sub("_", full)
    if len(safe) <= MAX_NAME_LENGTH:
        return safe
    digest = hashlib.sha256(full.encode()).hexdigest()[:_HASH_LENGTH]
    return f"{safe[: MAX_NAME_LENGTH - _HASH_LENGTH - 1]}_{digest}"


def prefix_head(prefix: str, separator: str) -> str:
    """How the names of a provider with ``prefix`` begin (``crm__``); empty for no prefix."""
    return exposed_name(prefix, separator, "") if prefix else ""


def owner_by_prefix(heads: Mapping[str, str], name: str) -> str | None:
    """Of providers by the head of their names (:func:`prefix_head`), the one ``name`` is under: the longest head
    it starts with; None when no non-empty head fits."""
    fitting = [(len(head), provider) for provider, head in heads.items() if head and name.startswith(head)]
    return max(fitting)[1] if fitting else None


@dataclass(frozen=True, slots=True)
class Naming:
    """How one provider's names appear in the registry."""

    prefix: str
    separator: str = "__"
    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    rename: Mapping[str, str] = field(default_factory=dict)
    descriptions: Mapping[str, str] = field(default_factory=dict)
    owner: str | None = None
    """How a collision names this provider; None: ``server '<name>'``."""

    def admits(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.include) and not any(fnmatchcase(name, p) for p in self.exclude)


@dataclass(frozen=True, slots=True)
class Entry:
    """A registry tool: what the client sees (``tool``) and where it goes (``provider``, ``target``)."""

    provider: str
    target: str
    tool: Tool


@dataclass(frozen=True, slots=True)
class PromptEntry:
    provider: str
    target: str
    prompt: Prompt


@dataclass(frozen=True, slots=True)
class _Template:
    provider: str
    pattern: re.Pattern[str]


def _template_pattern(template: str) -> re.Pattern[str]:
    """A regex for an RFC 6570 level-1/2 URI template: ``{x}`` is one segment, ``{+x}`` anything."""
    parts: list[str] = []
    for literal, expr in re.findall(r"([^{]*)(\{[^}]*\})?", template):
        parts.append(re.escape(literal))
        if expr:
            parts.append(".+" if expr.startswith(("{+", "{#")) else "[^/?#]+")
    return re.compile("".join(parts) + r"\Z")


@dataclass(frozen=True)
class Registry:
    """One immutable snapshot of the merged catalog."""

    tools: Mapping[str, Entry] = field(default_factory=dict)
    prompts: Mapping[str, PromptEntry] = field(default_factory=dict)
    resources: Mapping[str, str] = field(default_factory=dict)
    """URI → provider."""
    resource_list: Sequence[Resource] = ()
    template_list: Sequence[Resource] = ()
    _templates: Sequence[_Template] = ()

    def resolve(self, name: str) -> Entry:
        """The entry for a tool name.

        Raises:
            ToolNotFound: no such tool.
        """
        entry = self.tools.get(name)
        if entry is None:
            raise ToolNotFound(name)
        return entry

    def route_resource(self, uri: str) -> str | None:
        """The provider that owns ``uri``: a listed resource, else the first matching template."""
        owner = self.resources.get(uri)
        if owner is not None:
            return owner
        for template in self._templates:
            if template.pattern.match(uri):
                return template.provider
        return None


def build_registry(
    listings: Mapping[str, Listing], naming: Mapping[str, Naming], *, reserved: Iterable[str] = ()
) -> tuple[Registry, list[ConfigProblem]]:
    """Merge provider listings into one registry.

    Returns the registry and every collision found. A colliding name is left
    with its first owner (providers in ``listings`` order) and reported, never
    silently overwritten; the caller decides whether that is fatal (at start) or
    a reported degradation (when a provider's listing changes later).
    ``reserved`` are names taken by something outside the listings (workflows).
    """
    problems: list[ConfigProblem] = []
    tools: dict[str, Entry] = {}
    owners: dict[str, _Owner] = {name: _Owner("a workflow", name, None, whole=True) for name in reserved}
    prompts: dict[str, PromptEntry] = {}
    resources: dict[str, str] = {}
    resource_list: list[Resource] = []
    template_list: list[Resource] = []
    templates: list[_Template] = []
    template_owner: dict[str, str] = {}

    for provider, listing in listings.items():
        rules = naming[provider]
        for tool in listing.tools:
            if not rules.admits(tool.name):
                continue
            renamed = rules.rename.get(tool.name)
            name = exposed_name(rules.prefix, rules.separator, tool.name if renamed is None else renamed)
            if name in owners:
                mine = _Owner(f"server {provider!r}", tool.name, renamed)
                problems.append(_tool_collision(provider, mine, name, owners[name]))
                continue
            owners[name] = _Owner(rules.owner or f"server {provider!r}", tool.name, renamed, rules.owner is not None)
            definition = dict(tool.definition, name=name)
            if tool.name in rules.descriptions:
                definition["description"] = rules.descriptions[tool.name]
            tools[name] = Entry(provider, tool.name, Tool(name, definition))
        for prompt in listing.prompts:
            name = exposed_name(rules.prefix, rules.separator, prompt.name)
            if name in prompts:
                problems.append(
                    _collision(provider, "prompts", prompt.name, name, f"server {prompts[name].provider!r}")
                )
                continue
            prompts[name] = PromptEntry(provider, prompt.name, Prompt(name, dict(prompt.definition, name=name)))
        for resource in listing.resources:
            claimed = template_owner if resource.template else resources
            if resource.uri in claimed:
                problems.append(
                    _collision(provider, "resources", resource.uri, resource.uri, f"server {claimed[resource.uri]!r}")
                )
                continue
            claimed[resource.uri] = provider
            if resource.template:
                template_list.append(resource)
                templates.append(_Template(provider, _template_pattern(resource.uri)))
            else:
                resource_list.append(resource)
    registry = Registry(tools, prompts, resources, tuple(resource_list), tuple(template_list), tuple(templates))
    return registry, problems


@dataclass(frozen=True, slots=True)
class _Owner:
    """Who has taken a tool name: ``label`` (``server 'crm'``, ``a workflow``), the tool's own name there,
    what ``tools.rename`` renamed it to (None: not renamed)."""

    label: str
    original: str
    renamed: str | None
    whole: bool = False
    """The label names the tool itself (``a workflow``), not the provider it is one of."""

    def __str__(self) -> str:
        what = self.label if self.whole else f"tool {self.original!r} of {self.label}"
        return what if self.renamed is None else f"{what} (renamed to {self.renamed!r} by `tools.rename`)"


def _tool_collision(provider: str, mine: _Owner, name: str, theirs: _Owner) -> ConfigProblem:
    """Both tools by their own names; when a rename made the names meet, the path is that rename's and the
    message says so."""
    path = f"servers.{provider}"
    if mine.renamed is not None:
        path = f"{path}.tools.rename.{mine.original}"
    if mine.renamed is None and theirs.renamed is None:
        fix = "set a different `prefix:` or `tools.rename` for one of them"
    else:
        fix = "the rename made them collide: rename to another name, or set a different `prefix:`"
    message = f"{mine} collides: the name {name!r} is already taken by {theirs}; {fix}"
    return ConfigProblem(path=path, message=message)


def _collision(provider: str, kind: str, original: str, name: str, owner: str) -> ConfigProblem:
    what = "URI" if kind == "resources" else "name"
    return ConfigProblem(
        path=f"servers.{provider}",
        message=(
            f"{kind[:-1]} {original!r} of server {provider!r} collides: the {what} {name!r} is already "
            f"taken by {owner}; "
            "set a different `prefix:` or `tools.rename` for one of them"
        ),
    )
