"""Static checks of a call step's ``with:`` against the tool's inputSchema: what is reported, and what never is."""

from typing import Any

import pytest

from gateway.workflows.checks import check_arguments

ORDER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "count": {"type": "integer", "minimum": 1},
        "status": {"enum": ["open", "closed"]},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "verbose": {"type": "boolean"},
        "customer": {"$ref": "#/$defs/Customer"},
        "lines": {"type": "array", "items": {"$ref": "#/$defs/Line"}},
        "tags": {"type": ["array", "null"], "items": {"type": "string"}},
        "mode": {"anyOf": [{"type": "integer"}, {"enum": ["fast", "slow"]}]},
        "note": {"oneOf": [{"type": "string"}, {"type": "null"}]},
        "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "anything": {},
    },
    "patternProperties": {"^x-": {"type": "string"}},
    "required": ["id"],
    "additionalProperties": False,
    "$defs": {
        "Customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
            "required": ["name"],
            "additionalProperties": False,
        },
        "Line": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}}},
    },
}

DRAFT7 = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {"a": {"$ref": "#/definitions/A", "type": "integer"}},  # draft 7: `type` beside `$ref` is ignored
    "definitions": {"A": {"type": "string"}},
}

ROOT_ANY_OF = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
    "anyOf": [{"required": ["a"]}, {"required": ["b"]}],
    "required": ["c"],
    "additionalProperties": False,
}

REFS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "never": False,
        "level": {"enum": [1, 2, 3]},
        "kind": {"const": "fixed"},
        "by_anchor": {"$ref": "#Count"},  # followed by the validator only
        "by_index": {"$ref": "#/$defs/Choice/anyOf/0"},
        "by_escape": {"$ref": "#/$defs/a~1b"},
        "off_the_end": {"$ref": "#/$defs/Choice/anyOf/9"},
    },
    "$defs": {
        "Count": {"$anchor": "Count", "type": "integer"},
        "Choice": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "a/b": {"type": "boolean"},
    },
}

ROOT_REF = {"$ref": "#/$defs/Args", "$defs": {"Args": {"type": "object", "required": ["q"], "properties": {}}}}


def problems(arguments: dict[str, Any], schema: Any = ORDER) -> list[tuple[str, str]]:
    return check_arguments(arguments, schema)


# --- What is reported: one problem, at its path, naming the argument and the violation ---


@pytest.mark.parametrize(
    ("schema", "arguments", "path", "facts"),
    [
        pytest.param(ORDER, {}, "id", ["'id'", "missing"], id="a missing required argument"),
        pytest.param(ROOT_REF, {}, "q", ["'q'", "missing"], id="a required argument behind a root $ref"),
        pytest.param({"$ref": "#", "required": ["a"]}, {}, "a", ["'a'"], id="a required argument beside a $ref cycle"),
        pytest.param(ORDER, {"id": 1}, "id", ["'id'", "type"], id="a literal of the wrong type"),
        pytest.param(ORDER, {"id": "a", "count": 0}, "count", ["'count'", "minimum"], id="a literal under its minimum"),
        pytest.param(
            ORDER, {"id": "a", "status": "gone"}, "status", ["'status'", "'gone'"], id="a literal not in enum"
        ),
        pytest.param(ORDER, {"id": "a", "code": "abc"}, "code", ["'code'", "match"], id="a literal against a pattern"),
        pytest.param(
            ORDER, {"id": "a", "x-trace": 5}, "x-trace", ["'x-trace'"], id="a literal under patternProperties"
        ),
        pytest.param(
            ORDER, {"id": "$${x}", "count": "$${n}"}, "count", ["'count'"], id="an escaped template is literal"
        ),
        pytest.param(ORDER, {"id": "a", "mode": "medium"}, "mode", ["'mode'"], id="a literal no anyOf branch accepts"),
        pytest.param(ORDER, {"id": "a", "note": 3}, "note", ["'note'"], id="a literal no oneOf branch accepts"),
        pytest.param(DRAFT7, {"a": 1}, "a", ["'a'", "type"], id="a draft 7 $ref replaces its siblings"),
        pytest.param(DRAFT7, {"a": {"b": "${.b}"}}, "a", ["'a'", "object"], id="a draft 7 $ref target's type"),
        pytest.param(REFS, {"never": "${.x}!"}, "never", ["'never'"], id="text under a false schema"),
        pytest.param(REFS, {"never": None}, "never", ["'never'"], id="a literal under a false schema"),
        pytest.param(REFS, {"level": "L${.x}"}, "level", ["'level'"], id="text where enum holds no string"),
        pytest.param(REFS, {"kind": {"k": "${.x}"}}, "kind", ["'kind'"], id="a templated object where const is text"),
        pytest.param(REFS, {"by_anchor": "x"}, "by_anchor", ["'by_anchor'"], id="a literal behind an anchor $ref"),
        pytest.param(REFS, {"by_index": "n=${.n}"}, "by_index", ["'by_index'"], id="text behind a $ref into a list"),
        pytest.param(REFS, {"by_escape": "${.a}?"}, "by_escape", ["'by_escape'"], id="text behind an escaped $ref"),
        pytest.param(
            ORDER,
            {"id": "a", "customer": {"name": "Ann", "age": -1}},
            "customer.age",
            ["'customer.age'", "minimum"],
            id="a literal inside a literal object, through $ref",
        ),
        pytest.param(
            ORDER,
            {"id": "a", "customer": {"age": 3}},
            "customer",
            ["'customer'", "'name'"],
            id="a literal object missing a required key",
        ),
        pytest.param(
            ORDER,
            {"id": "a", "count": "n=${.input.n}"},
            "count",
            ["'count'", "string"],
            id="interpolated text where no string fits",
        ),
        pytest.param(
            ORDER,
            {"id": "a", "limit": "${.a} and ${.b}!"},
            "limit",
            ["'limit'", "string"],
            id="interpolated text where no anyOf branch takes a string",
        ),
        pytest.param(
            ORDER,
            {"id": "a", "count": {"n": "${.input.n}"}},
            "count",
            ["'count'", "object"],
            id="a templated object where no object fits",
        ),
        pytest.param(
            ORDER,
            {"id": "a", "verbose": ["${.input.v}"]},
            "verbose",
            ["'verbose'", "array"],
            id="a templated array where no array fits",
        ),
        pytest.param(
            ORDER,
            {"id": "a", "customer": {"age": "${.input.age}"}},
            "customer.name",
            ["'name'", "'customer'"],
            id="a required key missing from a templated object",
        ),
        pytest.param(
            ORDER,
            {"id": "a", "customer": {"name": "${.input.n}", "age": "old"}},
            "customer.age",
            ["'customer.age'"],
            id="a literal leaf of a templated object",
        ),
        pytest.param(
            ORDER,
            {"id": "a", "lines": [{"sku": "${.item.sku}", "qty": "two"}]},
            "lines[0].qty",
            ["'lines[0].qty'"],
            id="a literal leaf of a templated array item, through $ref",
        ),
        pytest.param(
            ORDER,
            {"id": "a", "tags": ["${.input.tag}", 7]},
            "tags[1]",
            ["'tags[1]'"],
            id="a literal item of a templated array",
        ),
        pytest.param(
            ORDER,
            {"id": "a", "colour": "red"},
            "colour",
            ["'colour'", "'id'", "'count'", "'^x-'"],
            id="an unknown argument, listing the accepted names and patterns",
        ),
        pytest.param(
            ORDER,
            {"id": "a", "customer": {"name": "${.n}", "nick": "${.k}"}},
            "customer.nick",
            ["'nick'", "'name'"],
            id="an unknown key in a templated object",
        ),
    ],
)
def test_a_problem_known_before_the_run_is_reported_at_its_path(
    schema: Any, arguments: dict[str, Any], path: str, facts: list[str]
) -> None:
    found = problems(arguments, schema)
    assert [where for where, _ in found] == [path]
    message = found[0][1]
    assert all(fact in message for fact in facts), message


def test_every_problem_is_reported_once_in_argument_order() -> None:
    found = problems({"count": 0, "colour": "red", "customer": {"nick": "${.k}"}})
    assert [where for where, _ in found] == ["id", "colour", "count", "customer.name", "customer.nick"]


# --- What is never reported: whatever may still hold at run time ---


@pytest.mark.parametrize(
    ("schema", "arguments"),
    [
        pytest.param(ORDER, {"id": "${.input.order_id}", "count": "${.input.n}"}, id="a value that is one template"),
        pytest.param(ORDER, {"id": "a", "customer": "${.steps.c.result}"}, id="an object that is one template"),
        pytest.param(ORDER, {"id": "a", "count": "${.a}${.b}"}, id="two adjacent templates, which may be one"),
        pytest.param(ORDER, {"id": "order ${.input.n}"}, id="interpolated text where a string fits"),
        pytest.param(ORDER, {"id": "a", "code": "X${.input.c}"}, id="interpolated text whose content is unknown"),
        pytest.param(ORDER, {"id": "a", "mode": "${.m} mode"}, id="interpolated text one anyOf branch may take"),
        pytest.param(ORDER, {"id": "a", "tags": None}, id="a literal one of several types takes"),
        pytest.param(ORDER, {"id": "a", "mode": 3, "note": None}, id="literals one branch accepts"),
        pytest.param(ORDER, {"id": "$${not a template}"}, id="an escaped template"),
        pytest.param(ORDER, {"id": "${.input | ("}, id="bad jq, reported elsewhere"),
        pytest.param(ORDER, {"id": "a", "customer": {"name": "${.input | ("}}, id="bad jq inside an object"),
        pytest.param(
            ORDER, {"id": "a", "x-trace": "t", "anything": {"x": [1]}}, id="names a pattern or property takes"
        ),
        pytest.param(ORDER, {"id": "a", "lines": [{"sku": "${.s}", "note": 1}]}, id="keys an open object allows"),
        pytest.param(ORDER, {"id": "a", "anything": ["${.a}", 1]}, id="items of an array without an items schema"),
        pytest.param(ROOT_ANY_OF, {"d": 1}, id="required or unknown names beside a root anyOf"),
        pytest.param(DRAFT7, {"a": "x"}, id="a literal against a draft 7 sibling of $ref"),
        pytest.param(DRAFT7, {"a": "${.x}!"}, id="text against a draft 7 sibling of $ref"),
        pytest.param(REFS, {"by_anchor": "n=${.n}"}, id="text behind an anchor $ref, not followed"),
        pytest.param(REFS, {"off_the_end": "n=${.n}"}, id="text behind a $ref off the end of a list"),
        pytest.param(
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, {"a": 1}, id="a $ref that is missing"
        ),
        pytest.param(
            {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}},
            {"a": 1},
            id="a remote $ref, never fetched",
        ),
        pytest.param(
            {"type": "object", "properties": {"a": {"$id": "https://example.com/a", "$ref": "#/x", "x": {}}}},
            {"a": 1},
            id="a nested $id, which rescopes refs",
        ),
        pytest.param(
            {"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#/properties/a"}]}}},
            {"a": "x ${.y}"},
            id="a $ref cycle",
        ),
        pytest.param({"type": "string"}, {"a": 1}, id="a schema that is not of an object"),
        pytest.param({"type": "object", "properties": {"a": {"type": "nope"}}}, {"a": 1}, id="an invalid schema"),
        pytest.param({"type": "object", "properties": {"a": {"pattern": "("}}}, {"a": "x"}, id="an invalid pattern"),
        pytest.param(
            {"$schema": "https://example.com/unknown", "type": "object", "required": []},
            {"a": 1},
            id="an unknown $schema, without a warning",
        ),
        pytest.param(True, {"a": 1}, id="a boolean schema"),
        pytest.param({"type": "object", "required": "a"}, {}, id="required that is not a list"),
    ],
)
def test_nothing_is_reported_when_the_arguments_may_still_fit(schema: Any, arguments: dict[str, Any]) -> None:
    assert problems(arguments, schema) == []
