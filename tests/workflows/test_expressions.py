"""Workflow expressions: templates, conditions, references, and the two fast paths (plain paths, narrowing)."""

from typing import Any

import jq
import pytest

from gateway.workflows.expressions import (
    ExpressionError,
    compile_condition,
    compile_value,
    references_in,
)

WHERE = "workflows.w.steps.s.with.id"

SCOPE: dict[str, Any] = {
    "input": {"order_id": "A1", "n": 3, "tags": ["x", "y"], "q": "hé", "nothing": None, "flag": True},
    "steps": {
        "order": {
            "result": {"status": "failed", "total": 42, "items": [{"sku": "s1", "qty": 2}, {"sku": "s2", "qty": 1}]},
            "error": None,
        },
        "docs": {"result": "some text", "error": None},
        "b-c": {"result": [1, 2, 3], "error": None},
        "broken": {"result": None, "error": {"message": "boom"}},
    },
    "item": {"sku": "s1", "n": 0},
    "index": 2,
    "line": {"sku": "L9"},
    "x": 1,
    "y": {"k": "v"},
}


def evaluate(text: Any, scope: dict[str, Any] = SCOPE) -> Any:
    return compile_value(text, where=WHERE).evaluate(scope)


def jq_first(program: str, data: Any) -> Any:
    """What jq itself answers over ``data``: the first output, None for none, or the ValueError it raises."""
    try:
        return next(iter(jq.compile(program).input_value(data)), None)
    except ValueError as exc:
        return exc


# --- Templates keep or lose their type ---


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${.input.n}", 3),
        ("${.steps.order.result.items[1]}", {"sku": "s2", "qty": 1}),
        ("${.input.tags}", ["x", "y"]),
        ("${.input.nothing}", None),
        ("${.input.flag}", True),
        ("${.input.order_id}", "A1"),
        ("${.input.n * 2}", 6),
        ("${ {a: .input.n} }", {"a": 3}),
        ("${[.input.tags[] | ascii_upcase]}", ["X", "Y"]),
    ],
)
def test_a_string_that_is_exactly_one_template_keeps_the_json_type(template: str, expected: Any) -> None:
    assert evaluate(template) == expected
    assert type(evaluate(template)) is type(expected)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("order ${.input.order_id} is ${.steps.order.result.status}", "order A1 is failed"),
        ("n=${.input.n}", "n=3"),
        ("${.input.n}!", "3!"),
        (" ${.input.n}", " 3"),
        ("[${.input.nothing}]", "[]"),
        ("flag: ${.input.flag}", "flag: true"),
        ("tags: ${.input.tags}", 'tags: ["x","y"]'),
        ("obj: ${.steps.order.result.items[0]}", 'obj: {"sku":"s1","qty":2}'),
        ("q=${.input.q}", "q=hé"),
        ("${.input.n}${.input.n}", "33"),
        ("total ${.steps.order.result.total + 0.5}", "total 42.5"),
    ],
)
def test_templates_inside_text_are_interpolated_as_text(template: str, expected: str) -> None:
    assert evaluate(template) == expected


def test_a_program_with_no_output_gives_null_and_with_several_the_first() -> None:
    assert evaluate("${empty}") is None
    assert evaluate("<${empty}>") == "<>"
    assert evaluate("${.input.tags[]}") == "x"


# --- Escapes, braces and strings inside programs ---


def test_a_doubled_dollar_is_a_literal_template_opening() -> None:
    value = compile_value("cost: $${.input.n} and ${.input.n}", where=WHERE)
    assert value.evaluate(SCOPE) == "cost: ${.input.n} and 3"
    assert compile_value("$${x}", where=WHERE).evaluate({}) == "${x}"


def test_a_lone_dollar_or_brace_is_plain_text() -> None:
    assert evaluate("$5 {not a template} $") == "$5 {not a template} $"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${ {a: .input.order_id} }", {"a": "A1"}),
        ("${ {a: {b: .input.n}} }", {"a": {"b": 3}}),
        ('${"a}b"}', "a}b"),
        ('${"}"} and ${"{"}', "} and {"),
        ('${"x\\"}"}', 'x"}'),
        ('${"n=\\(.input.n + 1)}"}', "n=4}"),
        ('${"\\({a: "}"} | .a)"}', "}"),
        ("${.input.n # a comment }\n}", 3),
        ("${.input.n # a comment \\\n continued } \n}", 3),
    ],
)
def test_braces_and_strings_inside_a_program_do_not_end_it(template: str, expected: Any) -> None:
    assert evaluate(template) == expected


@pytest.mark.parametrize("template", ["${.input.n", 'x ${"a}', "${ {a: 1}", '${"\\(.a"}'])
def test_an_unterminated_template_is_a_compile_error(template: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_value(template, where=WHERE)
    assert caught.value.where == WHERE


# --- Nested values and constants ---


def test_templates_are_found_in_nested_dicts_and_lists() -> None:
    value = compile_value(
        {"id": "${.input.order_id}", "lines": ["${.item.sku}", {"n": "${.index}", "k": "fixed"}], "limit": 5},
        where=WHERE,
    )
    assert not value.is_constant
    assert value.evaluate(SCOPE) == {"id": "A1", "lines": ["s1", {"n": 2, "k": "fixed"}], "limit": 5}
    assert value.uses == {"input", "item", "index"}


@pytest.mark.parametrize("literal", [{"a": [1, "two", None, True]}, [], "plain text", 7, None, 2.5, False])
def test_a_value_without_templates_is_constant(literal: Any) -> None:
    value = compile_value(literal, where=WHERE)
    assert value.is_constant
    assert value.evaluate({}) == literal
    assert value.references == frozenset()
    assert value.uses == frozenset()


def test_an_escaped_template_is_constant_and_unescaped() -> None:
    value = compile_value({"note": "use $${.x}"}, where=WHERE)
    assert value.is_constant
    assert value.evaluate({}) == {"note": "use ${.x}"}


# --- References and uses ---


@pytest.mark.parametrize(
    ("program", "steps"),
    [
        (".steps.order.result.status", {"order"}),
        ('.steps["order"].result', {"order"}),
        ('.steps."b-c".result', {"b-c"}),
        ('.steps.["docs"]', {"docs"}),
        (".steps.order.result.total > 10 and .steps.docs.error == null", {"order", "docs"}),
        ("[.steps.a.result[] | .x] | length", {"a"}),
        ('"\\(.steps.a.result)-\\(.steps.b.result)"', {"a", "b"}),
        ("if .steps.a.result then .steps.b.result else .steps.c.result end", {"a", "b", "c"}),
        (".steps.a.result as $r | .steps.b.result + $r", {"a", "b"}),
        (".input.steps.x", set()),
        (".steps.a.result | .steps.b", {"a"}),
        (".input.order_id", set()),
        ('"steps.x"', set()),
        ("1 + 2", set()),
    ],
)
def test_references_in_finds_the_steps_a_program_names(program: str, steps: set[str]) -> None:
    assert references_in(program) == steps


@pytest.mark.parametrize("program", [".steps[$__loc__.file]", ".steps | keys", ".", ".steps[]", "{steps}"])
def test_steps_read_without_a_static_key_make_references_dynamic(program: str) -> None:
    value = compile_value("${" + program + "}", where=WHERE)
    assert value.dynamic_references
    assert not compile_value("${.steps.a}", where=WHERE).dynamic_references


def test_value_references_are_the_union_over_its_templates() -> None:
    value = compile_value({"a": "${.steps.order.result}", "b": ["x ${.steps.docs.result}"]}, where=WHERE)
    assert value.references == {"order", "docs"}
    assert value.uses == {"steps"}


@pytest.mark.parametrize(
    ("program", "uses"),
    [
        (".line.sku", {"line"}),
        (".input.order_id + (.index | tostring)", {"input", "index"}),
        (".steps.order.result.items | map(.sku)", {"steps"}),
        ("{a: .item.sku, b: .line}", {"item", "line"}),
        ("{index}", {"index"}),
        ("1", set()),
    ],
)
def test_uses_lists_the_top_level_names_a_program_reads(program: str, uses: set[str]) -> None:
    assert compile_value("${" + program + "}", where=WHERE).uses == uses
    assert compile_condition(program, where=WHERE).uses == uses


def test_a_for_each_variable_named_with_as_is_passed_through() -> None:
    assert evaluate("${.line.sku}") == "L9"
    assert evaluate('${.line.sku + "-" + (.index | tostring)}') == "L9-2"


# --- Conditions ---


@pytest.mark.parametrize(
    ("program", "holds"),
    [
        ('.steps.order.result.status == "failed"', True),
        ('.steps.order.result.status == "ok"', False),
        ("false", False),
        ("null", False),
        ("empty", False),
        (".input.missing", False),
        ("0", True),
        ('""', True),
        ("[]", True),
        ("{}", True),
        (".input.flag", True),
        ("(false, true)", False),
        (".steps.broken.error", True),
    ],
)
def test_conditions_follow_jq_truthiness(program: str, holds: bool) -> None:
    condition = compile_condition(program, where="workflows.w.steps.route.switch[0].when")
    assert condition.holds(SCOPE) is holds


def test_a_condition_may_be_wrapped_whole_in_a_template() -> None:
    condition = compile_condition('${.steps.order.result.status == "failed"}', where=WHERE)
    assert condition.holds(SCOPE)
    assert condition.references == {"order"}


def test_a_condition_with_text_around_a_template_is_rejected() -> None:
    with pytest.raises(ExpressionError):
        compile_condition("${.input.n} > 1", where=WHERE)


# --- Plain paths resolved in Python agree with jq ---

PATHS = [
    ".x",
    ".y",
    ".y.k",
    ".y.missing",
    ".y.k.deeper",
    ".missing",
    ".missing.deeper",
    ".missing[0]",
    ".input.tags[0]",
    ".input.tags[1]",
    ".input.tags[2]",
    ".input.tags[-1]",
    ".input.tags[-3]",
    ".input.tags.x",
    ".input.n.x",
    ".input.n[0]",
    ".input.q[0]",
    ".input.flag.x",
    ".input.nothing.x[3].y",
    '.steps."b-c".result[2]',
    '.steps["b-c"]["result"]',
    ".steps.order.result.items[1].sku",
    ".steps.order.result.items.[0]",
    ".steps.order.result[0]",
    ".steps.order.result.items.sku",
]
SCOPES = [SCOPE, {"x": None, "y": [1, 2]}, {"input": {"tags": {"0": 1}, "n": "str", "q": None}}, {}]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("path", PATHS)
def test_plain_paths_answer_what_jq_answers(path: str, scope: dict[str, Any]) -> None:
    expected = jq_first(path, scope)
    value = compile_value("${" + path + "}", where=WHERE)
    if isinstance(expected, ValueError):
        with pytest.raises(ExpressionError) as caught:
            value.evaluate(scope)
        assert str(expected) in str(caught.value)  # the same words as jq's own error
    else:
        assert value.evaluate(scope) == expected


def test_plain_paths_never_serialise_the_scope() -> None:
    scope = {"input": {"a": 1, "not_json": {1, 2}}, "steps": {}}
    assert compile_value("${.input.a}", where=WHERE).evaluate(scope) == 1


# --- Narrowing: a program sees only what it reads, with the same answer ---

PROGRAMS = [
    ".steps.order.result.total + 1",
    ".steps.order.result | .status",
    '.steps["order"].result.items | map(.sku) | join(",")',
    '.steps."b-c".result | add',
    ".steps.order.result.items[] | select(.qty > 1) | .sku",
    "[.steps.docs.result, .input.q, .index]",
    "{id: .input.order_id, n: .line}",
    "{input, index}",
    ".steps.order.result as $o | .steps.docs.result | length + $o.total",
    "if .steps.order.error then .x else .y end",
    "if .index > 1 then .steps.order.result.status | ascii_upcase else .line end",
    "reduce .steps.order.result.items[] as $i (0; . + $i.qty)",
    "first(.steps.order.result.items[] | .sku)",
    '"\\(.input.order_id)/\\(.steps.order.result.status)"',
    ".steps.order.result.total // .x",
    "try (.steps.docs.result | error) catch .",
    "label $out | .x",
    ".input | keys",
    ".steps | keys",
    ".steps[.input.order_id]",
    "keys",
    ".",
    "to_entries | length",
    "select(.x == 1) | .index",
    "def f: .x; f",
    ".x = 5 | .x",
    "[paths] | length",
    "[..] | length",
    "{y} | .y.k",
    ".y as {k: $k} | $k + .line.sku",
    ".steps.order.result.items | map(.sku, .qty)",
    "{a: .x | tostring, b: .index}",
    "@base64",
    '@base64 "\\(.input.q)"',
    "length",
    "range(.index)",
    ".steps.order.result.total / 0",
]


@pytest.mark.parametrize("program", PROGRAMS)
def test_narrowed_evaluation_answers_what_the_whole_scope_answers(program: str) -> None:
    expected = jq_first(program, SCOPE)
    value = compile_value("${" + program + "}", where=WHERE)
    if isinstance(expected, ValueError):
        with pytest.raises(ExpressionError):
            value.evaluate(SCOPE)
    else:
        assert value.evaluate(SCOPE) == expected


def test_a_program_is_not_given_steps_it_does_not_read() -> None:
    # jq cannot encode `object()`: the program succeeds only because it never sees step b.
    scope = {"input": {}, "steps": {"a": {"result": {"x": 2}}, "b": {"result": object()}}}
    assert compile_value("${.steps.a.result.x + 1}", where=WHERE).evaluate(scope) == 3
    assert compile_condition(".steps.a.result.x > 1", where=WHERE).holds(scope)
    with pytest.raises(ExpressionError):
        compile_value("${.steps | keys}", where=WHERE).evaluate(scope)


# --- Errors carry where and the source ---


@pytest.mark.parametrize("bad", ["${.input.}", "${.a +}", "x ${$undefined}", "${}", "${  }", "${.a ) }"])
def test_a_program_that_does_not_compile_is_reported_with_where_and_source(bad: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_value({"id": bad}, where="workflows.w.steps.s.with")
    assert caught.value.where == "workflows.w.steps.s.with.id"
    assert caught.value.source in bad
    assert str(caught.value).startswith("workflows.w.steps.s.with.id: ")


def test_a_bad_condition_is_a_compile_error() -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_condition(".a ==", where="workflows.w.steps.route.switch[0].when")
    assert caught.value.source == ".a =="
    assert caught.value.where == "workflows.w.steps.route.switch[0].when"


def test_a_runtime_jq_error_names_the_program_and_where() -> None:
    value = compile_value({"lines": ["${.steps.order.result.total / 0}"]}, where="workflows.w.steps.s.with")
    with pytest.raises(ExpressionError) as caught:
        value.evaluate(SCOPE)
    assert caught.value.where == "workflows.w.steps.s.with.lines[0]"
    assert caught.value.source == ".steps.order.result.total / 0"
    assert "jq error in '.steps.order.result.total / 0'" in str(caught.value)


def test_indexing_a_number_on_the_plain_path_is_a_runtime_error() -> None:
    value = compile_value("${.input.n.x}", where=WHERE)
    with pytest.raises(ExpressionError) as caught:
        value.evaluate(SCOPE)
    assert (caught.value.where, caught.value.source) == (WHERE, ".input.n.x")


def test_a_runtime_error_in_a_condition_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError):
        compile_condition('error("no")', where=WHERE).holds(SCOPE)


def test_a_value_that_is_not_json_is_an_expression_error_not_a_crash() -> None:
    scope = {"input": {"a": object()}}
    with pytest.raises(ExpressionError):
        compile_value("a=${.input.a}", where=WHERE).evaluate(scope)
    with pytest.raises(ExpressionError):
        compile_value("${.input.a | type}", where=WHERE).evaluate(scope)
