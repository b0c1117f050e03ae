"""Argument validation in isolation: every violation with its JSON path; nothing called when invalid."""

import pytest

from gateway.errors import InvalidArguments
from gateway.types import CallContext, JSONObject, Principal, Tool, ToolCall, ToolResult
from policies.validation import ArgumentValidation

pytestmark = pytest.mark.anyio

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "lines": {
            "type": "array",
            "items": {"type": "object", "properties": {"qty": {"type": "integer", "minimum": 1}}},
        },
    },
    "required": ["id"],
    "additionalProperties": False,
}


class Upstream:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, call: ToolCall) -> ToolResult:
        self.calls += 1
        return ToolResult.text("ok")


def call_of(arguments: JSONObject, schema: JSONObject = SCHEMA, name: str = "crm__order") -> ToolCall:
    tool = Tool(name, {"name": name, "inputSchema": schema})
    return ToolCall(name, "crm", "order", arguments, CallContext(principal=Principal("p")), tool)


async def test_valid_arguments_reach_the_tool() -> None:
    upstream = Upstream()
    result = await ArgumentValidation()(call_of({"id": "A-1", "lines": [{"qty": 2}]}), upstream)
    assert (result.content[0]["text"], upstream.calls) == ("ok", 1)


async def test_every_violation_is_listed_with_its_path_and_nothing_is_called() -> None:
    upstream = Upstream()
    with pytest.raises(InvalidArguments) as refused:
        await ArgumentValidation()(call_of({"lines": [{"qty": 0}, {"qty": "2"}], "extra": 1}), upstream)
    assert upstream.calls == 0
    assert str(refused.value) == (
        "Invalid arguments for crm__order (4 problems): "
        "$: 'id' is a required property; "
        "$: Additional properties are not allowed ('extra' was unexpected); "
        "$.lines[0].qty: 0 is less than the minimum of 1; "
        "$.lines[1].qty: '2' is not of type 'integer'. "
        "Fix them to match the tool's inputSchema."
    )
    assert refused.value.outcome == "invalid"


async def test_a_tool_with_a_broken_schema_is_called_unchecked() -> None:
    upstream = Upstream()
    broken = {"type": "object", "properties": {"id": {"type": "nonsense"}}}
    await ArgumentValidation()(call_of({"id": 5}, broken), upstream)
    assert upstream.calls == 1


async def test_the_validator_is_built_once_per_schema_and_rebuilt_when_the_schema_changes() -> None:
    validation, upstream = ArgumentValidation(), Upstream()
    first = call_of({"id": "A"})
    await validation(first, upstream)
    built = validation._validators["crm__order"][1]
    await validation(call_of({"id": "B"}, first.tool.input_schema if first.tool else SCHEMA), upstream)
    assert len(validation._validators) == 1
    assert validation._validators["crm__order"][1] is built  # not built again for the same schema
    loose = {"type": "object"}
    await validation(call_of({"anything": True}, loose), upstream)  # the same tool, a new schema
    assert validation._validators["crm__order"][1] is not built
    assert upstream.calls == 3
    with pytest.raises(InvalidArguments):
        await validation(call_of({}, SCHEMA), upstream)


async def test_a_schema_of_another_draft_is_honoured() -> None:
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "dependencies": {"a": ["b"]}}
    with pytest.raises(InvalidArguments, match=r"\$: 'b' is a dependency of 'a'"):
        await ArgumentValidation()(call_of({"a": 1}, draft7), Upstream())
