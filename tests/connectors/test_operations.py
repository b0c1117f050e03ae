"""Hand-declared REST operations: how their arguments split between path, query and body."""

from connectors.operations import Body, Declared, Parameter, annotations_for, declared, path_placeholders, safe_name


def test_arguments_in_the_path_fill_it_and_the_rest_go_to_the_query_of_a_get() -> None:
    schema = {
        "type": "object",
        "properties": {"id": {"type": "string"}, "expand": {"type": "boolean"}},
        "required": ["id"],
    }
    (op,) = declared([Declared("find_customer", "get", "/customers/{id}", schema, "Find one customer.")])
    assert (op.name, op.method, op.path, op.body) == ("find_customer", "GET", "/customers/{id}", None)
    assert op.parameters == (Parameter("id", "path", "id", required=True), Parameter("expand", "query", "expand"))
    assert op.definition == {
        "name": "find_customer",
        "description": "Find one customer.",
        "inputSchema": schema,
        "annotations": {"readOnlyHint": True, "idempotentHint": True},
    }
    assert op.pointer == "operations[0]"


def test_the_rest_of_a_post_is_a_json_body_required_when_any_of_it_is() -> None:
    schema = {
        "type": "object",
        "properties": {"order": {"type": "string"}, "amount": {"type": "number"}, "note": {"type": "string"}},
        "required": ["order", "amount"],
    }
    ops = declared([Declared("refund", "POST", "/orders/{order}/refunds", schema)], where="connectors.crm.operations")
    (op,) = ops
    assert op.parameters == (Parameter("order", "path", "order", required=True),)
    assert op.body == Body("application/json", required=True, properties={"amount": "amount", "note": "note"})
    assert op.definition["description"] == "POST /orders/{order}/refunds"
    assert op.pointer == "connectors.crm.operations[0]"
    (optional,) = declared([Declared("touch", "PATCH", "/x/{id}", {"type": "object", "required": ["id"]})])
    assert optional.body == Body("application/json", required=False, properties={})


def test_annotations_follow_the_method() -> None:
    assert annotations_for("head") == {"readOnlyHint": True, "idempotentHint": True}
    assert annotations_for("DELETE") == {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": True}
    assert annotations_for("PUT") == {"readOnlyHint": False, "destructiveHint": False, "idempotentHint": True}
    assert annotations_for("POST") == annotations_for("PATCH") == {"readOnlyHint": False}


def test_names_and_placeholders() -> None:
    assert safe_name("get /pets/{petId}") == "get_pets_petId"
    assert safe_name("list.Pets-v2") == "list.Pets-v2"
    assert safe_name("{}/") == "operation"
    assert path_placeholders("/a/{x}/b/{y}") == ["x", "y"]
