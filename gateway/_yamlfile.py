"""Reading the config file's YAML: plain data, each key's line, duplicate keys, ``${VAR}`` interpolation.

The schema knows nothing of lines; this module records where every key and item is (so each problem
can name its line) and reports what YAML itself gets wrong, every problem at once.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
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
    """What YAML could not read, in plain words, where it is (the line and column of what to fix)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return _marked(exc, exc.problem_mark, text)
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        return ConfigProblem("<document>", f"{exc.reason} (#x{exc.character:04x})", line, column)
    return ConfigProblem("<document>", str(exc))


_TOKENS = {
    "<stream end>": "the end of the file",
    "<block end>": "the end of an indented block",
    "<block mapping start>": "a key",
    "<block sequence start>": "a list item",
    "?": "a key",
    "-": "a list item",
    "<scalar>": "a value",
}
_FLOW_EXPECTED = re.compile(r"expected ',' or '([\]}])', but got '(.*)'")
_CANNOT_START = re.compile(r"found character '(.*)' that cannot start any token")


@dataclass(frozen=True, slots=True)
class _Error:
    """A PyYAML error's parts: its ``problem`` at ``at``, and its ``context``, what it was reading since ``start``."""

    problem: str
    context: str
    at: yaml.Mark
    start: yaml.Mark | None
    text: str

    def here(self, message: str) -> ConfigProblem:
        return ConfigProblem("<document>", message, self.at.line + 1, self.at.column + 1)

    def line_before(self) -> str:
        """The text of the problem's line before it."""
        return self.text[self.text.rfind("\n", 0, self.at.index) + 1 : self.at.index]


def _marked(exc: yaml.MarkedYAMLError, at: yaml.Mark, text: str) -> ConfigProblem:
    """PyYAML's ``problem`` (at ``at``) and ``context`` (where what it was reading began) as plain words."""
    error = _Error(exc.problem or "", exc.context or "", at, exc.context_mark, text)
    for plain in (_indentation, _unclosed_quote, _unclosed_flow, _bad_character, _colon, _message):
        found = plain(error)
        if found is not None:
            return found
    if error.start is not None and error.context:
        where = f"line {error.start.line + 1}, column {error.start.column + 1}"
        return error.here(f"{error.problem} ({error.context} on {where})")
    return error.here(error.problem)


def _indentation(error: _Error) -> ConfigProblem | None:
    start = error.start
    if not error.problem.startswith("expected <block end>, but found") or start is None:
        return None
    found = _TOKENS.get(error.problem.rpartition("found ")[2].strip("'"), "something")
    what = "list" if "collection" in error.context or "sequence" in error.context else "mapping"
    if what == "mapping" and found == "a list item":
        return error.here(
            f"a list item among the keys of the mapping on line {start.line + 1}: a mapping holds keys only"
        )
    if what == "list" and found == "a key":
        return error.here(f"a key among the items of the list on line {start.line + 1}: a list holds `- ` items only")
    return error.here(
        f"bad indentation: {found} in column {error.at.column + 1}, but the {what} it belongs to (line "
        f"{start.line + 1}) has its {'keys' if what == 'mapping' else 'items'} in column {start.column + 1}: "
        "indent it like the lines it belongs with, with spaces"
    )


def _unclosed_quote(error: _Error) -> ConfigProblem | None:
    start = error.start
    if "quoted scalar" not in error.context or "end of stream" not in error.problem or start is None:
        return None
    quote = error.text[start.index] if start.index < len(error.text) else '"'
    message = f"a quoted value is never closed: the {quote} here has no closing {quote}"
    return ConfigProblem("<document>", message, start.line + 1, start.column + 1)


def _unclosed_flow(error: _Error) -> ConfigProblem | None:
    flow = _FLOW_EXPECTED.fullmatch(error.problem)
    if flow is None or error.start is None:
        return None
    closer, got = flow[1], flow[2]
    opener, kind = ("[", "list") if closer == "]" else ("{", "mapping")
    return error.here(
        f"the {kind} opened with {opener!r} on line {error.start.line + 1}, column {error.start.column + 1} is not "
        f"closed: expected ',' or {closer!r} here, found {_TOKENS.get(got, repr(got))}"
    )


def _bad_character(error: _Error) -> ConfigProblem | None:
    bad = _CANNOT_START.fullmatch(error.problem)
    if bad is None:
        return None
    if bad[1] != "\\t":
        return error.here(f"a value cannot start with {bad[1]!r}: quote it")
    if not error.line_before().strip(" "):
        return error.here("a tab indents this line: YAML indents with spaces only")
    return error.here("a tab here: YAML separates with spaces only")


def _colon(error: _Error) -> ConfigProblem | None:
    if error.problem != "mapping values are not allowed here":
        return None
    if ": " in error.line_before():
        return error.here("a second ': ' on this line: a value holding ': ' must be quoted")
    return error.here("unexpected ':': the line before may lack its ':' (every line of a mapping is `key: value`)")


def _message(error: _Error) -> ConfigProblem | None:
    """The problems that need only their own words changed."""
    problem = error.problem
    last = problem.rpartition(" ")[2].strip("'")
    if problem.startswith("found unknown escape character"):
        return error.here(
            f"an unknown escape \\{last} in a double-quoted value: single-quote the value, or write \\\\ for a "
            "backslash"
        )
    if problem == "but found another document":
        return error.here("a second document (after `---`): the config is one document")
    if problem.startswith("expected the node content, but found"):
        return error.here(f"a value was expected here, found {_TOKENS.get(last, repr(last))}")
    if problem.startswith("found undefined alias"):
        return error.here(f"the alias *{last} refers to no anchor &{last} defined before it")
    return None


def dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + (part if part else '""')
    return text or "<document>"
