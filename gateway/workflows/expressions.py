"""Workflow expressions: ``${…}`` templates and conditions, both jq (DESIGN §3).

Everything is compiled once, when the config loads. A jq program that is not a plain path runs in
a worker process with time and memory limits (:mod:`gateway.workflows._jqsafe`, awaited in
:mod:`gateway.workflows._jqpool`: libjq can abort
or hang the process that runs it), which costs ≈200 µs per evaluation; and the ``jq`` binding
serialises its whole input to JSON on every run. So:

* a plain path (``.steps.order.result.status``, ``."x-y"``, ``.items[0]``) is resolved in Python,
  with jq's semantics (≈1.5 µs), and never reaches jq;
* any other program runs over only what it reads: the top-level names it mentions and, under
  ``steps``, the step ids it names. A scan of its tokens decides this, and gives the whole scope
  (or every step) whenever it cannot be sure: ``.``, ``keys``, ``select(…)``, ``.steps[$id]``.

Results share structure with the scope and the config: treat them as read-only.

Three ways to run a program that is not a plain path:

* ``evaluate(scope)``/``holds(scope)`` block on the worker: for config-time checks and tests;
* ``holds_async(scope)`` and :func:`run_program` await it without blocking the event loop: the
  access policy and the workflow runner;
* ``evaluate(scope, lookup)``/``holds(scope, lookup)`` never run jq: a :class:`Lookup` gives the
  results already known and collects the programs still to run (with their narrowed input).
  That is how the workflow engine evaluates (it must not do I/O): it asks the runner for what is
  missing, and evaluates again once the answers came back.
"""

import json
import re
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jq

from gateway.workflows import _jqpool, _jqsafe

__all__ = [
    "Condition",
    "ExpressionError",
    "Lookup",
    "Outcome",
    "Request",
    "Value",
    "compile_condition",
    "compile_value",
    "references_in",
    "run_program",
]

Scope = Mapping[str, Any]


class ExpressionError(Exception):
    """A jq program that does not compile, or fails at run time; ``where`` is its config path."""

    def __init__(self, detail: str, *, source: str, where: str) -> None:
        self.detail = detail
        self.source = source
        self.where = where
        super().__init__(f"{where}: {detail}")


# --- Tokens. Shared by the template splitter (which `}` ends a `${`?) and the reader scan. ---

_LEX = re.compile(
    r"""(?P<ws>\s+|\#(?:[^\\\n]|\\[\s\S])*)
    |(?P<num>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
    |\.(?P<field>[A-Za-z_][A-Za-z_0-9]*)
    |(?P<var>\$[A-Za-z_][A-Za-z_0-9]*(?:::[A-Za-z_][A-Za-z_0-9]*)*)
    |(?P<ident>[A-Za-z_][A-Za-z_0-9]*(?:::[A-Za-z_][A-Za-z_0-9]*)*)
    |(?P<format>@[A-Za-z0-9_]+)
    |(?P<op>\?//|//=|[|+\-*/%=!<>]=|//|\.\.|[.\[\](){}|,;:?=<>+\-*/%])
    |(?P<str>")
    |(?P<other>.)""",
    re.VERBOSE,
)


class _Token(NamedTuple):
    kind: str  # a group name of _LEX; a field's text is its name, a string's value its decoded text
    text: str
    start: int
    end: int
    value: str | None = None  # a string literal without interpolation


class _Unlexable(Exception):
    """An unterminated string or string interpolation."""


def _lex(text: str, pos: int = 0, *, interpolation: bool = False) -> Generator[_Token, None, None]:
    """jq tokens from ``pos``; lazily, so text after a template's closing brace is never read.

    A string yields its own token, then each ``\\(…)`` as ``(`` tokens ``)``, so braces inside
    strings never count and the code inside interpolations is scanned like any other.
    """
    depth = 0
    while pos < len(text):
        match = _LEX.match(text, pos)
        if match is None:  # `other` matches any character but a newline, which `ws` takes
            raise _Unlexable("unexpected character")
        kind, end = match.lastgroup or "other", match.end()
        if kind == "str":
            pos = yield from _lex_string(text, pos)
            continue
        if kind != "ws":
            token = _Token(kind, match.group(kind), pos, end)
            if interpolation and kind == "op" and token.text in ("(", ")"):
                depth += 1 if token.text == "(" else -1
                if depth < 0:
                    yield token
                    return
            yield token
        pos = end
    if interpolation:
        raise _Unlexable("unterminated \\( in a string")


def _lex_string(text: str, start: int) -> Generator[_Token, None, int]:
    """The string literal at ``start`` (its token, then its interpolations' tokens); returns the index after it."""
    inner: list[_Token] = []
    i = start + 1
    while i < len(text):
        if text[i] == '"':
            literal = text[start : i + 1]
            yield _Token("str", literal, start, i + 1, None if inner else _decode(literal))
            yield from inner
            return i + 1
        if text.startswith("\\(", i):
            inner.append(_Token("op", "(", i + 1, i + 2))
            inner.extend(_lex(text, i + 2, interpolation=True))
            i = inner[-1].end
        else:
            i += 2 if text[i] == "\\" else 1
    raise _Unlexable("unterminated string")


def _decode(literal: str) -> str | None:
    try:
        value: str = json.loads(literal)  # jq's escapes are JSON's
    except ValueError:
        return None  # jq refuses it too, at compile time
    return value


def _is(tokens: list[_Token], i: int, op: str) -> bool:
    return i < len(tokens) and tokens[i].kind == "op" and tokens[i].text == op


def _key_at(tokens: list[_Token], i: int, after_term: bool) -> tuple[str | None, int]:
    """A static key access at ``i`` (``.a``, ``."a"``, ``.["a"]``, or ``["a"]`` after a term) and the index after it."""
    if i < len(tokens) and tokens[i].kind == "field":
        return tokens[i].text, i + 1
    j = i + 1 if _is(tokens, i, ".") else i
    if j < len(tokens) and j > i and tokens[j].kind == "str" and tokens[j].value is not None:
        return tokens[j].value, j + 1
    if (j > i or after_term) and _is(tokens, j, "[") and _is(tokens, j + 2, "]"):
        key = tokens[j + 1]
        if key.kind == "str" and key.value is not None:
            return key.value, j + 3
    return None, i


def _index_at(tokens: list[_Token], i: int) -> tuple[int | None, int]:
    """A literal integer index at ``i`` (``[0]``, ``.[-1]``) and the index after it."""
    j = i + 1 if _is(tokens, i, ".") else i
    if not _is(tokens, j, "["):
        return None, i
    sign = -1 if _is(tokens, j + 1, "-") else 1
    j += 2 if sign < 0 else 1
    if j < len(tokens) and tokens[j].kind == "num" and tokens[j].text.isdigit() and _is(tokens, j + 1, "]"):
        return sign * int(tokens[j].text), j + 2
    return None, i


def _plain_path(tokens: list[_Token]) -> tuple[str | int, ...] | None:
    """The keys and indexes of a program that is only a path (``.a."b-c"[0]``), else None."""
    path: list[str | int] = []
    i = 0
    while i < len(tokens):
        key, j = _key_at(tokens, i, after_term=i > 0)
        index, k = _index_at(tokens, i) if key is None and i > 0 else (None, i)
        step = key if key is not None else index
        if step is None:
            return None
        path.append(step)
        i = max(j, k)
    if path == ["steps"]:  # the engine's live mapping of settled steps: jq gets (and returns) a copy
        return None
    return tuple(path) or None


# --- The reader scan: which top-level names and step ids a program reads. ---

_KEYWORDS = frozenset(
    "and or as def if then elif else end reduce foreach try catch label break import include module __loc__".split()
)
# Builtins that ignore their input (their arguments still see it, and are scanned like any code).
_INPUT_FREE = frozenset("true false null empty now env builtins input inputs input_filename input_line_number".split())
_INPUT_FREE_CALLS = frozenset("range error first last limit isempty".split())  # only with arguments
_ASSIGNMENTS = frozenset({"=", "|=", "+=", "-=", "*=", "/=", "%=", "//="})
_OPENERS = {"(": ")", "[": "]", "{": "}"}


def _ends_term(token: _Token) -> bool:
    """Whether ``token`` ends a term, so that a following ``.a`` indexes it rather than the input."""
    if token.kind == "ident":
        return token.text == "end" or token.text not in _KEYWORDS
    if token.kind == "op":
        return token.text in (")", "]", "}", "?")
    return token.kind in ("field", "var", "num", "str")


@dataclass(slots=True)
class _Level:
    """A nesting level: parentheses, brackets, braces, or ``if … end``."""

    closer: str
    initial: bool  # may the input at the level's start be the root?
    root: bool = field(init=False)  # may the current input be the root? (True when unsure)
    fold_body: bool = False  # the `(init; update)` of reduce/foreach: after `;` the input is the accumulator
    fold: str = ""  # "source", then "pattern" while reading `reduce SOURCE as PATTERN`
    binding: bool = False  # after `as $x` or `label $x`: the next `|` keeps the input

    def __post_init__(self) -> None:
        self.root = self.initial


class _Reads:
    """What a program reads from the root. Errs towards more: ``whole`` gives it everything.

    Per level it tracks whether the input may still be the root: ``|`` moves off it (unless it
    ends ``… as $x``), while ``;``, ``then``, ``else``, ``catch`` and ``,`` between object entries
    go back to the level's own input. Observing the root itself (``.``, ``..``, a builtin applied
    to it, an assignment) sets ``whole``; ``steps`` read other than by a static key sets ``all_steps``.
    """

    def __init__(self, program: str) -> None:
        self.names: set[str] = set()
        self.steps: set[str] = set()
        self.whole = self.all_steps = False
        try:
            self.tokens = list(_lex(program))
        except _Unlexable:
            self.tokens, self.whole, self.all_steps = [], True, True
        levels = [_Level("", initial=True)]
        i = 0
        while i < len(self.tokens):  # on to the end after `whole`, so `names` lists every name mentioned
            i = self._scan(i, levels)
        self.whole = self.whole or len(levels) != 1
        self.all_steps = self.all_steps or self.whole

    def _scan(self, i: int, levels: list[_Level]) -> int:
        tokens, token, level = self.tokens, self.tokens[i], levels[-1]
        after_term = i > 0 and _ends_term(tokens[i - 1])
        key, j = _key_at(tokens, i, after_term)
        if key is not None:
            if not after_term and level.root:
                self.names.add(key)
                if key == "steps":  # which steps? only a static key right after says
                    step, k = _key_at(tokens, j, after_term=True)
                    self.all_steps = self.all_steps or step is None
                    self.steps.update([step] if step is not None else [])
                    j = max(j, k)
            return j
        if token.kind == "op":
            self._op(token.text, after_term, levels)
        elif token.kind == "ident":
            return self._ident(i, levels)
        elif token.kind == "format" and level.root and not (i + 1 < len(tokens) and tokens[i + 1].kind == "str"):
            self.whole = True  # `@base64` alone formats its input; `@base64 "…"` only the interpolations
        return i + 1

    def _op(self, op: str, after_term: bool, levels: list[_Level]) -> None:
        level = levels[-1]
        if op in _OPENERS:
            fold_body = op == "(" and level.fold == "pattern"
            level.fold = "" if fold_body else level.fold
            levels.append(_Level(_OPENERS[op], initial=level.root, fold_body=fold_body))
        elif op in (")", "]", "}"):
            self.whole = self.whole or level.closer != op
            if level.closer == op:
                levels.pop()
        elif op == "|":
            level.root = level.root and level.binding  # `A | B`: B's input is A's output, not the root
            level.binding = False
        elif op == ";":
            level.root = level.initial and not level.fold_body
        elif op == "," and level.closer == "}":
            level.root = level.initial
        elif level.root and (op in _ASSIGNMENTS or op == ".." or (op == "." and not after_term)):
            self.whole = True

    def _ident(self, i: int, levels: list[_Level]) -> int:
        name, level = self.tokens[i].text, levels[-1]
        following = self.tokens[i + 1].text if i + 1 < len(self.tokens) else ""
        if level.closer == "}" and (_is(self.tokens, i - 1, "{") or _is(self.tokens, i - 1, ",")):
            if following != ":" and level.root:  # `{a}` is `{a: .a}`; in `{a: …}` it is only a key
                self.names.add(name)
                self.all_steps = self.all_steps or name == "steps"
            return i + 1
        if name == "if":
            levels.append(_Level("end", initial=level.root))
        elif name in ("then", "elif", "else", "end"):
            self.whole = self.whole or level.closer != "end"
            level.root = level.initial
            if name == "end" and level.closer == "end":
                levels.pop()
        elif name == "catch":
            level.root = level.initial
        elif name in ("reduce", "foreach"):
            level.fold = "source"
        elif name in ("as", "label"):
            level.binding = level.fold != "source"
            level.fold = "pattern" if level.fold == "source" else level.fold
        elif name == "def":  # skip the header `def f(a; $b):`, whose names are not calls
            return next((k + 1 for k in range(i, len(self.tokens)) if _is(self.tokens, k, ":")), len(self.tokens))
        elif name not in _KEYWORDS and name not in _INPUT_FREE and not (name in _INPUT_FREE_CALLS and following == "("):
            self.whole = self.whole or level.root  # a builtin (or a def) applied to the root
        return i + 1


# --- Compiled programs. ---

_NOTHING: Any = object()  # a program that yielded no output


def _jq_type(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return "null" if value is None else "boolean"
    kinds = ((str, "string"), ((int, float), "number"), ((list, tuple), "array"), (Mapping, "object"))
    return next((name for types, name in kinds if isinstance(value, types)), type(value).__name__)


@dataclass(frozen=True, slots=True)
class _Program:
    source: str
    where: str
    path: tuple[str | int, ...] | None  # a plain path: resolved without jq
    names: frozenset[str] | None  # top-level names read; None: the whole scope
    steps: frozenset[str] | None  # step ids read; None: every step

    def first(self, scope: Scope, lookup: "Lookup | None" = None) -> Any:
        """The first output over ``scope``, or ``_NOTHING``; from ``lookup`` if given. Raises ExpressionError."""
        if self.path is not None:
            return self._resolve(scope)
        if lookup is not None:
            return lookup.first(self, scope)
        try:  # in a worker process: libjq aborts (out of memory, a 2 GiB string), and loops holding the GIL
            return _jqsafe.first(self.source, self._narrow(scope), _NOTHING)
        except _jqsafe.JqError as exc:  # jq's errors, a scope value that is not JSON, a time or memory limit
            raise self._error(str(exc)) from exc

    async def first_async(self, scope: Scope) -> Any:
        """``first``, awaiting the worker without blocking the event loop."""
        if self.path is not None:
            return self._resolve(scope)
        try:
            return await _jqpool.afirst(self.source, self._narrow(scope), _NOTHING)
        except _jqsafe.JqError as exc:
            raise self._error(str(exc)) from exc

    def _error(self, detail: str) -> ExpressionError:
        return ExpressionError(f"jq error in {self.source!r}: {detail}", source=self.source, where=self.where)

    def _narrow(self, scope: Scope) -> dict[str, Any]:
        data = dict(scope) if self.names is None else {name: scope[name] for name in self.names if name in scope}
        steps = data.get("steps")  # a ChainMap inside a loop body: not JSON until copied
        if isinstance(steps, Mapping):
            data["steps"] = dict(steps) if self.steps is None else {s: steps[s] for s in self.steps if s in steps}
        return data

    def _resolve(self, value: Any) -> Any:
        assert self.path is not None
        for key in self.path:  # jq's rules: null indexes to null, a missing key or index is null
            if value is None:
                continue
            if isinstance(key, str) and isinstance(value, Mapping):
                value = value.get(key)
            elif isinstance(key, int) and isinstance(value, (list, tuple)):
                value = value[key] if -len(value) <= key < len(value) else None
            else:
                what = f"string ({json.dumps(key, ensure_ascii=False)})" if isinstance(key, str) else f"number ({key})"
                raise self._error(f"Cannot index {_jq_type(value)} with {what}")
        return value


def _compile_program(source: str, where: str) -> tuple[_Program, _Reads]:
    if not source.strip():
        raise ExpressionError("empty expression", source=source, where=where)
    try:
        reads: _Reads | None = _Reads(source)
    except _Unlexable:
        reads = None  # not jq either: the compiler says what is wrong
    path = _plain_path(reads.tokens) if reads is not None else None
    if path is None:  # a plain path is valid jq by construction: skip the compiler's ≈1.5 ms
        try:
            jq.compile(source)  # in-process: only the config's text reaches the compiler
        except ValueError as exc:  # jq's compile errors: the first line names the problem and its column
            detail = f"invalid jq in {source!r}: {str(exc).splitlines()[0].rstrip(':')}"
            raise ExpressionError(detail, source=source, where=where) from exc
    if reads is None:
        raise ExpressionError(f"cannot read the jq program {source!r}", source=source, where=where)
    names = None if reads.whole else frozenset(reads.names)
    steps = None if reads.all_steps else frozenset(reads.steps)
    return _Program(source, where, path, names, steps), reads


def references_in(program: str) -> frozenset[str]:
    """The step ids ``program`` names: ``.steps.a``, ``.steps["a"]``, ``.steps."a"``, anywhere in it."""
    return frozenset(_Reads(program).steps)


# --- Evaluation as data: what the engine asks for and is told. ---


class Outcome(NamedTuple):
    """What running a jq program gave: its first output, no output (``empty``), or jq's ``error``."""

    value: Any = None
    error: str | None = None
    empty: bool = False


class Request(NamedTuple):
    """A program a :class:`Lookup` had no result for: the ``position``-th met, its source and its (narrowed) input."""

    position: int
    source: str
    data: Mapping[str, Any]


class Lookup:
    """The jq results one evaluation already has, in the order its programs are met; and what it lacks.

    A program whose outcome is known gets it (an error raises its ExpressionError, as if jq had
    run). One whose outcome is not known yet is added to ``missing`` and reads as no output, so the
    evaluation goes on and collects every program it can reach in one pass; its value is then
    meaningless. Evaluating the same thing over the same scope meets the same programs in the same
    order, so the ``position`` of a request is where its outcome goes the next time.
    """

    __slots__ = ("_known", "_next", "missing")

    def __init__(self, known: Sequence[Outcome | None] = ()) -> None:
        self._known = known
        self._next = 0
        self.missing: list[Request] = []

    def first(self, program: _Program, scope: Scope) -> Any:
        index = self._next
        self._next += 1
        outcome = self._known[index] if index < len(self._known) else None
        if outcome is None:
            self.missing.append(Request(index, program.source, program._narrow(scope)))
            return _NOTHING
        if outcome.error is not None:
            raise program._error(outcome.error)
        return _NOTHING if outcome.empty else outcome.value


async def run_program(source: str, data: Any) -> Outcome:
    """Run ``source`` (compiled at load time) over ``data`` in the bounded worker, without blocking the event loop."""
    try:
        value = await _jqpool.afirst(source, data, _NOTHING)
    except _jqsafe.JqError as exc:  # jq's errors, input that is not JSON, a time or memory limit
        return Outcome(error=str(exc))
    return Outcome(empty=True) if value is _NOTHING else Outcome(value)


# --- Templates and values. ---


def _split(text: str, where: str) -> tuple[list[str], list[str]]:
    """``text`` as literals around ``${…}`` programs (one more literal than programs); ``$${`` is a literal ``${``."""
    literals: list[str] = []
    programs: list[str] = []
    pending: list[str] = []
    i = 0
    while (j := text.find("${", i)) != -1:
        if j > i and text[j - 1] == "$":
            pending.append(text[i : j - 1] + "${")
            i = j + 2
            continue
        pending.append(text[i:j])
        end = _closing_brace(text, j + 2, where)
        literals.append("".join(pending))
        programs.append(text[j + 2 : end])
        pending, i = [], end + 1
    literals.append("".join(pending) + text[i:])
    return literals, programs


def _closing_brace(text: str, start: int, where: str) -> int:
    """The index of the ``}`` that ends the ``${`` before ``start``: braces in jq strings and nested objects skipped."""
    depth = 0
    try:
        for token in _lex(text, start):
            if token.kind == "op" and token.text in ("{", "}"):
                depth += 1 if token.text == "{" else -1
                if depth < 0:
                    return token.start
    except _Unlexable as exc:
        raise ExpressionError(f"{exc} in {text!r}", source=text, where=where) from exc
    raise ExpressionError(f"'${{' without a matching '}}' in {text!r}", source=text, where=where)


def _as_text(value: Any, program: _Program) -> str:
    if isinstance(value, str):
        return value
    if value is None or value is _NOTHING:
        return ""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:  # a scope value that is not JSON, reached by a plain path
        raise program._error(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class _Constant:
    value: Any


_Node = Callable[[Scope, Lookup | None], Any] | _Constant


def _build(value: Any, where: str, programs: list[_Reads]) -> _Node:
    """A function computing ``value`` from a scope, or the constant it is; appends each program's reads."""
    if isinstance(value, str):
        literals, sources = _split(value, where)
        compiled = []
        for source in sources:
            program, reads = _compile_program(source, where)
            compiled.append(program)
            programs.append(reads)
        if not compiled:
            return _Constant(literals[0])
        if literals == ["", ""]:  # exactly one `${…}`: the value keeps its JSON type
            only = compiled[0]
            return lambda scope, lookup: None if (out := only.first(scope, lookup)) is _NOTHING else out
        pairs = list(zip(compiled, literals[1:], strict=True))
        return lambda scope, lookup: (
            literals[0] + "".join(_as_text(p.first(scope, lookup), p) + after for p, after in pairs)
        )
    if isinstance(value, Mapping):
        items = [(key, _build(item, f"{where}.{key}", programs)) for key, item in value.items()]
        constants = {key: node.value for key, node in items if isinstance(node, _Constant)}
        if len(constants) == len(items):
            return _Constant(constants)
        return lambda scope, lookup: {key: _evaluate(node, scope, lookup) for key, node in items}
    if isinstance(value, (list, tuple)):
        nodes = [_build(item, f"{where}[{i}]", programs) for i, item in enumerate(value)]
        values = [node.value for node in nodes if isinstance(node, _Constant)]
        if len(values) == len(nodes):
            return _Constant(values)
        return lambda scope, lookup: [_evaluate(node, scope, lookup) for node in nodes]
    return _Constant(value)


def _evaluate(node: _Node, scope: Scope, lookup: Lookup | None) -> Any:
    return node.value if isinstance(node, _Constant) else node(scope, lookup)


@dataclass(frozen=True)
class Value:
    """A config value with ``${…}`` templates anywhere inside, compiled."""

    references: frozenset[str]
    """The step ids read anywhere (``.steps.<id>``)."""
    uses: frozenset[str]
    """The top-level scope names read: ``input``, ``steps``, ``item``, ``index``, a for_each's ``as`` name…"""
    dynamic_references: bool
    """Some program reads steps it does not name (``.steps[$id]``, ``.steps | keys``), or the whole scope (``.``)."""
    is_constant: bool
    """No ``${…}`` inside: ``evaluate`` returns the value itself (``$${`` unescaped)."""
    _node: _Node = field(repr=False, compare=False)
    runs_jq: bool = False
    """Some program is not a plain path: evaluating it runs jq (or, with a ``Lookup``, asks for it)."""

    def evaluate(self, scope: Scope, lookup: Lookup | None = None) -> Any:
        """The value over ``scope`` (``{input, steps: {id: {result, error}}, item, index}``). Raises ExpressionError.

        With ``lookup``, jq programs are not run: see :class:`Lookup`.
        """
        return _evaluate(self._node, scope, lookup)


@dataclass(frozen=True)
class Condition:
    """A jq program evaluated for truthiness: its first output, false and null falsy; no output is falsy."""

    references: frozenset[str]
    uses: frozenset[str]
    dynamic_references: bool
    _program: _Program = field(repr=False, compare=False)

    @property
    def is_path(self) -> bool:
        """The program is a plain path: ``holds`` resolves it in Python, at once."""
        return self._program.path is not None

    def holds(self, scope: Scope, lookup: Lookup | None = None) -> bool:
        """Whether the condition holds over ``scope``. Raises ExpressionError. With ``lookup``: see :class:`Lookup`."""
        out = self._program.first(scope, lookup)
        return out is not _NOTHING and out is not None and out is not False

    async def holds_async(self, scope: Scope) -> bool:
        """``holds``, awaiting jq without blocking the event loop. Raises ExpressionError."""
        out = await self._program.first_async(scope)
        return out is not _NOTHING and out is not None and out is not False


def compile_value(value: Any, *, where: str) -> Value:
    """Compile every ``${…}`` in ``value`` (dict values, list items, strings). Raises ExpressionError."""
    reads: list[_Reads] = []
    node = _build(value, where, reads)
    return Value(
        references=frozenset().union(*(r.steps for r in reads)),
        uses=frozenset().union(*(r.names for r in reads)),
        dynamic_references=any(r.all_steps for r in reads),
        is_constant=isinstance(node, _Constant),
        _node=node,
        runs_jq=any(_plain_path(r.tokens) is None for r in reads),
    )


def compile_condition(source: str, *, where: str) -> Condition:
    """Compile a condition: a bare jq program, or one wrapped whole in ``${…}``. Raises ExpressionError."""
    if source.lstrip().startswith("${"):  # never jq, so a template was meant
        literals, sources = _split(source.strip(), where)
        if literals != ["", ""]:
            raise ExpressionError(f"a condition is one jq program, not text: {source!r}", source=source, where=where)
        source = sources[0]
    program, reads = _compile_program(source, where)
    return Condition(frozenset(reads.steps), frozenset(reads.names), reads.all_steps, program)
