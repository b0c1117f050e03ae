"""Reading the config file's YAML: plain data, each key's line, duplicate keys, ``${VAR}`` interpolation.

The schema knows nothing of lines; this module records where every key and item is (so each problem
can name its line) and reports what YAML itself gets wrong, every problem at once.
"""

import re
from collections.abc import Mapping
from typing import Any

import yaml

from gateway.errors import ConfigProblem

__all__ = ["Loc", "Tree", "dotted", "in_file_order", "interpolate", "syntax_problem"]

Loc = tuple[str | int, ...]
"""A key path into the config: mapping keys are ``str``, list indexes ``int``."""

_VARIABLE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class Tree:
    """Builds plain data from the YAML node tree, recording each key's line and reporting duplicates."""

    def __init__(self, text: str, problems: list[ConfigProblem]) -> None:
        self.lines: dict[Loc, int] = {}
        self._problems = problems
        self._open: set[int] = set()  # nodes being built: an alias back into one would recurse forever
        self._loader = yaml.SafeLoader(text)

    def load(self) -> Any:
        try:
            node = self._loader.get_single_node()
            if node is None:
                return None
            self.lines[()] = node.start_mark.line + 1
            return self._build(node, ())
        finally:
            self._loader.dispose()

    def line(self, loc: Loc) -> int | None:
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return None

    def problem(self, loc: Loc, message: str, line: int | None = None) -> None:
        self._problems.append(ConfigProblem(dotted(loc), message, line or self.line(loc)))

    def _build(self, node: yaml.Node, loc: Loc) -> Any:
        if id(node) in self._open:
            self.problem(loc, "an alias refers to a node that contains it")
            return None
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, loc)
            if isinstance(node, yaml.SequenceNode):
                return [self._item(item, (*loc, index)) for index, item in enumerate(node.value)]
            try:
                return self._loader.construct_object(node, deep=True)
            except yaml.constructor.ConstructorError as exc:
                self.problem(loc, exc.problem or str(exc), node.start_mark.line + 1)
                return None
        finally:
            self._open.discard(id(node))

    def _item(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        return self._build(node, loc)

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                merged.extend(value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node])
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(loc, "a key must be a name, not a list or mapping", line)
                continue
            key = str(key_node.value)
            if key in first_line:
                self.problem((*loc, key), f"duplicate key {key!r} (first on line {first_line[key]})", line)
            first_line.setdefault(key, line)
            self.lines[(*loc, key)] = first_line[key]
            result[key] = self._build(value_node, (*loc, key))
        # `<<: *defaults` fills in keys not written explicitly, as YAML merge keys do.
        for source in merged:
            extra = self._build(source, loc)
            if isinstance(extra, dict):
                for key, value in extra.items():
                    result.setdefault(key, value)
            else:
                self.problem(loc, "`<<` can only merge mappings", source.start_mark.line + 1)
        return result


def interpolate(value: Any, loc: Loc, environ: Mapping[str, str], tree: Tree) -> Any:
    """``value`` with every ``${NAME}`` (``${NAME:-default}``) replaced from ``environ``; an unset one is a problem."""
    if isinstance(value, dict):
        return {key: interpolate(item, (*loc, key), environ, tree) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, (*loc, index), environ, tree) for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match[1], match[2]
        if name is None:
            return "${"
        found = environ.get(name)
        if default is not None and not found:
            return default
        if found is None:
            tree.problem(loc, f"environment variable {name} is not set")
            return match[0]
        return found

    return _VARIABLE.sub(substitute, value)


def in_file_order(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    return sorted(problems, key=lambda problem: problem.line or 0)


def syntax_problem(exc: yaml.YAMLError, text: str) -> ConfigProblem:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        return ConfigProblem("<document>", exc.problem or str(exc), mark.line + 1 if mark else None)
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        return ConfigProblem("<document>", f"{exc.reason} (#x{exc.character:04x})", line)
    return ConfigProblem("<document>", str(exc))


def dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + (part if part else '""')
    return text or "<document>"
