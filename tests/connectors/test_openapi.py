"""OpenAPI documents as REST operations: parsing, checking (every problem with its JSON pointer), and the tools
they give (arguments by location, bodies, references, cycles, the 3.0 dialect)."""

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors import openapi
from connectors.openapi import SpecError, SpecProblem, check_spec, operations_of, parse_spec
from connectors.operations import Body, Operation, Parameter

FIXTURES = Path(__file__).parent / "fixtures"
READ = {"readOnlyHint": True, "idempotentHint": True}

# --- the official Petstore ------------------------------------------------------------------------------------------

PET = {
    "type": "object",
    "required": ["id", "name"],
    "properties": {
        "id": {"type": "integer", "format": "int64"},
        "name": {"type": "string"},
        "tag": {"type": "string"},
    },
}


def petstore() -> dict[str, Any]:
    return parse_spec((FIXTURES / "petstore.yaml").read_text())


def test_the_petstore_is_valid_and_gives_its_three_tools() -> None:
    spec = petstore()
    assert check_spec(spec) == []
    operations, problems = operations_of(spec)
    assert problems == []
    assert [op.name for op in operations] == ["listPets", "createPets", "showPetById"]
    list_pets, create_pets, show_pet = operations

    assert (list_pets.method, list_pets.path, list_pets.tags, list_pets.pointer) == (
        "GET",
        "/pets",
        ("pets",),
        "/paths/~1pets/get",
    )
    assert list_pets.parameters == (Parameter("limit", "query", "limit", required=False, explode=True),)
    assert list_pets.body is None
    assert list_pets.definition == {
        "name": "listPets",
        "description": "List all pets",
        "title": "List all pets",
        "inputSchema": {
            "type": "object",
            "properties": {
                "limit": {
                    "type": "integer",
                    "maximum": 100,
                    "format": "int32",
                    "description": "How many items to return at one time (max 100)",
                }
            },
        },
        "annotations": READ,  # its 200 answers an array: no outputSchema (MCP wants an object)
    }

    assert (create_pets.method, create_pets.pointer) == ("POST", "/paths/~1pets/post")
    assert create_pets.parameters == ()
    assert create_pets.body == Body(
        "application/json", required=True, argument=None, properties={"id": "id", "name": "name", "tag": "tag"}
    )
    assert create_pets.definition == {
        "name": "createPets",
        "description": "Create a pet",
        "title": "Create a pet",
        "inputSchema": {
            "type": "object",
            "properties": PET["properties"],
            "required": ["id", "name"],
        },
        "annotations": {"readOnlyHint": False},  # its 201 has no content: no outputSchema
    }

    assert (show_pet.method, show_pet.path, show_pet.pointer) == ("GET", "/pets/{petId}", "/paths/~1pets~1{petId}/get")
    assert show_pet.parameters == (Parameter("petId", "path", "petId", required=True, explode=False),)
    assert show_pet.definition == {
        "name": "showPetById",
        "description": "Info for a specific pet",
        "title": "Info for a specific pet",
        "inputSchema": {
            "type": "object",
            "properties": {"petId": {"type": "string", "description": "The id of the pet to retrieve"}},
            "required": ["petId"],
        },
        "outputSchema": PET,
        "annotations": READ,
    }
    json.dumps([op.definition for op in operations])  # plain data


# --- a 3.1 document of our own ----------------------------------------------------------------------------------------

SHOP = """
openapi: 3.1.0
info: {title: Shop, version: "1"}
paths:
  /stores/{storeId}/items/{id}:
    parameters:
      - $ref: '#/components/parameters/StoreId'
      - {name: id, in: path, required: true, schema: {type: integer}}
      - {name: X-Request-Id, in: header, schema: {type: string}}
    get:
      operationId: getItem
      summary: One item
      description: Looks one item up.
      tags: [items]
      parameters:
        - {name: id, in: path, required: true, description: The item, schema: {type: integer}}
        - {name: id, in: query, description: The other id, schema: {type: string}}
        - {name: "filter[name]", in: query, schema: {type: string}}
        - {name: session, in: cookie, schema: {type: string}}
        - {name: tags, in: query, explode: false, schema: {type: array, items: {type: string}}}
        - {name: Accept, in: header, schema: {type: string}}
        - {name: X-Request-Id, in: header, required: true, description: Traced, schema: {type: string}}
      responses:
        "404": {description: missing}
        "2XX": {description: any, content: {application/json: {schema: {type: object}}}}
        "200":
          description: the item
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Item'}
    put:
      operationId: putItem
      requestBody: {$ref: '#/components/requestBodies/ItemBody'}
      responses: {"204": {description: done}}
  /items:
    post:
      summary: Create an item
      parameters:
        - {name: name, in: query, schema: {type: string}}
      requestBody:
        required: true
        content:
          text/plain: {schema: {type: string}}
          application/vnd.shop+json:
            schema:
              type: object
              required: [name, price]
              properties:
                name: {type: string}
                price: {type: number}
                id: {type: integer, readOnly: true}
      responses:
        "201":
          description: created
          content:
            application/problem+json: {schema: {type: object, properties: {title: {type: string}}}}
            application/json: {schema: {$ref: '#/components/schemas/Item'}}
  /items/bulk:
    post:
      operationId: bulkItems
      requestBody:
        content:
          application/json:
            schema: {type: array, items: {$ref: '#/components/schemas/Item'}}
      responses:
        "200": {description: ok, content: {application/json: {schema: {type: array}}}}
  /login:
    post:
      operationId: login
      requestBody:
        required: true
        content:
          application/x-www-form-urlencoded:
            schema:
              type: object
              required: [user]
              properties: {user: {type: string}, password: {type: string, writeOnly: true}}
      responses: {"204": {description: ok}}
  /notes:
    post:
      operationId: addNote
      requestBody:
        description: The note's text.
        content: {text/plain: {schema: {type: string}}}
      responses: {"204": {description: ok}}
  /trees:
    put:
      operationId: putTree
      requestBody:
        content: {application/json: {schema: {$ref: '#/components/schemas/Node'}}}
      responses:
        "200":
          description: the tree
          content: {application/json: {schema: {$ref: '#/components/schemas/Node'}}}
  /again:
    get:
      operationId: getItem
      responses: {"200": {description: ok}}
  /external:
    get:
      operationId: external
      responses:
        "200": {description: ok, content: {application/json: {schema: {$ref: 'other.yaml#/Thing'}}}}
  /dangling:
    get:
      operationId: dangling
      parameters: [{name: q, in: query, schema: {$ref: '#/components/schemas/Nope'}}]
      responses: {"200": {description: ok}}
components:
  parameters:
    StoreId: {name: storeId, in: path, required: true, schema: {type: string}}
  requestBodies:
    ItemBody:
      required: true
      content:
        application/json:
          schema: {$ref: '#/components/schemas/Item'}
  schemas:
    Item:
      type: object
      required: [id, name, storeId]
      discriminator: {propertyName: name}
      example: {id: 1}
      x-internal: true
      properties:
        id: {type: integer, readOnly: true}
        name: {type: string, examples: [pen]}
        storeId: {type: string}
        secret: {type: string, writeOnly: true}
        note: {type: [string, "null"]}
    Node:
      type: object
      properties:
        value: {type: string}
        children: {type: array, items: {$ref: '#/components/schemas/Node'}}
"""

NODE = {
    "type": "object",
    "properties": {
        "value": {"type": "string"},
        "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
    },
}


@pytest.fixture(scope="module")
def shop() -> tuple[dict[str, Operation], list[SpecProblem]]:
    operations, problems = operations_of(parse_spec(SHOP))
    return {op.name: op for op in operations}, problems


def test_the_shop_serves_every_operation_but_the_broken_ones_in_document_order(
    shop: tuple[dict[str, Operation], list[SpecProblem]],
) -> None:
    operations, problems = shop
    assert list(operations) == ["getItem", "putItem", "post_items", "bulkItems", "login", "addNote", "putTree"]
    assert [p.pointer for p in problems] == [
        "/paths/~1again/get",
        "/paths/~1external/get/responses/200/content/application~1json/schema/$ref",
        "/paths/~1dangling/get/parameters/0/schema/$ref",
    ]
    duplicate, external, dangling = (p.message for p in problems)
    assert "'getItem'" in duplicate
    assert "/paths/~1stores~1{storeId}~1items~1{id}/get" in duplicate
    assert "other.yaml#/Thing" in external
    assert "external" in external
    assert "external (GET /external) is left out" in external
    assert "'#/components/schemas/Nope' points nowhere" in dangling
    assert "dangling" in dangling


def test_every_parameter_location_with_path_level_parameters_and_renamed_clashes(
    shop: tuple[dict[str, Operation], list[SpecProblem]],
) -> None:
    op = shop[0]["getItem"]
    assert (op.method, op.path, op.tags) == ("GET", "/stores/{storeId}/items/{id}", ("items",))
    assert op.parameters == (
        Parameter("storeId", "path", "storeId", required=True, explode=False),  # from components, path level
        Parameter("id", "path", "id", required=True, explode=False),  # the operation's wins
        Parameter("X-Request-Id", "header", "X-Request-Id", required=True, explode=False),  # the operation's too
        Parameter("id", "query", "query_id"),  # the path's `id` keeps the name
        Parameter("filter[name]", "query", "filter_name"),  # made safe, the wire name kept
        Parameter("session", "cookie", "session"),
        Parameter("tags", "query", "tags", explode=False),
    )  # Accept is left out: OpenAPI says such headers are ignored
    assert op.body is None
    schema = op.definition["inputSchema"]
    assert schema == {
        "type": "object",
        "properties": {
            "storeId": {"type": "string"},
            "id": {"type": "integer", "description": "The item"},
            "X-Request-Id": {"type": "string", "description": "Traced"},
            "query_id": {"type": "string", "description": "The other id"},
            "filter_name": {"type": "string"},
            "session": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["storeId", "id", "X-Request-Id"],
    }
    assert op.definition["description"] == "One item\n\nLooks one item up."
    assert op.definition["title"] == "One item"
    # "200" before "2XX"; the response drops writeOnly properties and OpenAPI-only keys
    assert op.definition["outputSchema"] == {
        "type": "object",
        "required": ["id", "name", "storeId"],
        "properties": {
            "id": {"type": "integer", "readOnly": True},
            "name": {"type": "string", "examples": ["pen"]},
            "storeId": {"type": "string"},
            "note": {"type": ["string", "null"]},
        },
    }


def test_a_body_from_components_is_flattened_and_a_property_clashing_with_a_parameter_is_renamed(
    shop: tuple[dict[str, Operation], list[SpecProblem]],
) -> None:
    op = shop[0]["putItem"]
    assert op.definition["annotations"] == {"readOnlyHint": False, "destructiveHint": False, "idempotentHint": True}
    assert [p.argument for p in op.parameters] == ["storeId", "id", "X-Request-Id"]
    assert op.body == Body(
        "application/json",
        required=True,
        properties={"name": "name", "body_storeId": "storeId", "secret": "secret", "note": "note"},
    )  # id is readOnly: not sent
    schema = op.definition["inputSchema"]
    assert list(schema["properties"]) == ["storeId", "id", "X-Request-Id", "name", "body_storeId", "secret", "note"]
    assert schema["properties"]["secret"] == {"type": "string", "writeOnly": True}
    assert schema["required"] == ["storeId", "id", "name", "body_storeId"]
    assert "outputSchema" not in op.definition
    assert op.definition["description"] == "PUT /stores/{storeId}/items/{id}"


def test_without_operation_id_the_name_is_method_and_path_and_a_json_suffix_type_is_preferred(
    shop: tuple[dict[str, Operation], list[SpecProblem]],
) -> None:
    op = shop[0]["post_items"]
    assert op.body == Body(
        "application/vnd.shop+json", required=True, properties={"body_name": "name", "price": "price"}
    )
    assert op.definition["inputSchema"] == {
        "type": "object",
        "properties": {"name": {"type": "string"}, "body_name": {"type": "string"}, "price": {"type": "number"}},
        "required": ["body_name", "price"],
    }
    assert op.definition["outputSchema"]["required"] == ["id", "name", "storeId"]  # application/json first


def test_an_array_body_is_one_argument_and_optional_when_the_body_is(
    shop: tuple[dict[str, Operation], list[SpecProblem]],
) -> None:
    op = shop[0]["bulkItems"]
    assert op.body == Body("application/json", required=False, argument="body")
    items = op.definition["inputSchema"]["properties"]["body"]["items"]
    assert "id" not in items["properties"]
    assert items["required"] == ["name", "storeId"]
    assert "required" not in op.definition["inputSchema"]
    assert "outputSchema" not in op.definition  # an array


def test_a_form_body_is_flattened_and_a_text_body_is_one_string(
    shop: tuple[dict[str, Operation], list[SpecProblem]],
) -> None:
    login = shop[0]["login"]
    assert login.body == Body(
        "application/x-www-form-urlencoded", required=True, properties={"user": "user", "password": "password"}
    )
    assert login.definition["inputSchema"]["required"] == ["user"]
    note = shop[0]["addNote"]
    assert note.body == Body("text/plain", required=False, argument="body")
    assert note.definition["inputSchema"] == {
        "type": "object",
        "properties": {"body": {"type": "string", "description": "The note's text."}},
    }


def test_a_cyclic_schema_is_kept_once_under_defs(shop: tuple[dict[str, Operation], list[SpecProblem]]) -> None:
    op = shop[0]["putTree"]
    assert op.body == Body("application/json", properties={"value": "value", "children": "children"})
    assert op.definition["inputSchema"] == {
        "type": "object",
        "properties": NODE["properties"],
        "$defs": {"Node": NODE},
    }
    assert op.definition["outputSchema"] == {**NODE, "$defs": {"Node": NODE}}


def test_the_30_dialect_becomes_json_schema() -> None:
    spec = {
        "openapi": "3.0.3",
        "info": {"title": "t", "version": "1"},
        "paths": {
            "/things": {
                "post": {
                    "operationId": "addThing",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "ok",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}},
                        }
                    },
                }
            }
        },
        "components": {
            "schemas": {
                "Thing": {
                    "type": "object",
                    "required": ["id", "password"],
                    "properties": {
                        "id": {"type": "string", "readOnly": True},
                        "password": {"type": "string", "writeOnly": True},
                        "label": {"type": "string", "nullable": True, "xml": {"name": "l"}},
                        "color": {"enum": ["red", "blue"], "nullable": True, "description": "Its color"},
                        "size": {"type": "number", "maximum": 10, "exclusiveMaximum": True, "example": 3},
                    },
                }
            }
        },
    }
    assert check_spec(spec) == []
    (op,), problems = operations_of(spec)
    assert problems == []
    assert op.definition["inputSchema"] == {
        "type": "object",
        "properties": {
            "password": {"type": "string", "writeOnly": True},
            "label": {"type": ["string", "null"]},
            "color": {"enum": ["red", "blue", None], "description": "Its color"},
            "size": {"type": "number", "exclusiveMaximum": 10},
        },
        "required": ["password"],
    }
    assert op.definition["outputSchema"]["required"] == ["id"]
    assert list(op.definition["outputSchema"]["properties"]) == ["id", "label", "color", "size"]


# --- malformed documents --------------------------------------------------------------------------------------------

HEAD = 'openapi: 3.0.3\ninfo: {title: t, version: "1"}\n'
HEAD31 = 'openapi: 3.1.0\ninfo: {title: t, version: "1"}\n'
OK = '{"200": {description: ok}}'

MALFORMED = [
    ("not YAML", "openapi: [3.0\n", "", "not valid YAML or JSON (line 2"),
    ("empty", "", "", "empty"),
    ("a list", "- openapi: 3.0.3\n", "", "must be a mapping (an OpenAPI object), not a list"),
    ("Swagger 2.0", 'swagger: "2.0"\ninfo: {title: t, version: "1"}\npaths: {}\n', "/swagger", "swagger2openapi"),
    ("OpenAPI 4", "openapi: 4.0.0\n", "/openapi", "OpenAPI 4.0.0 is not supported: only 3.0.x and 3.1.x"),
    ("unquoted version", "openapi: 3.0\n", "/openapi", "must be a string"),
    ("no openapi field", "info: {title: t}\n", "", "no `openapi` field"),
    ("no info", "openapi: 3.0.3\npaths: {}\n", "", "'info' is a required property"),
    ("unknown top-level key", HEAD + "paths: {}\nfoo: 1\n", "", "'foo' does not match"),
    (
        "in: body",
        HEAD + f"paths:\n  /a:\n    parameters: [{{name: x, in: body}}]\n    get: {{responses: {OK}}}\n",
        "/paths/~1a/parameters/0/in",
        "'body' is not one of 'path', 'query', 'header', 'cookie'",
    ),
    (
        "in: body, 3.1",
        HEAD31 + f"paths:\n  /a:\n    parameters: [{{name: x, in: body}}]\n    get: {{responses: {OK}}}\n",
        "/paths/~1a/parameters/0/in",
        "'body' is not one of",
    ),
    (
        "a response without description",
        HEAD + 'paths:\n  /a:\n    get: {responses: {"200": {}}}\n',
        "/paths/~1a/get/responses/200",
        "'description' is a required property",
    ),
    (
        "an undeclared path parameter",
        HEAD + f"paths:\n  /a/{{id}}:\n    get: {{responses: {OK}}}\n",
        "/paths/~1a~1{id}/get",
        "Path parameter 'id'",
    ),
    (
        "a duplicate operationId",
        HEAD + f"paths:\n  /a:\n    get: {{operationId: x, responses: {OK}}}\n"
        f"  /b:\n    get: {{operationId: x, responses: {OK}}}\n",
        "/paths/~1b/get",
        "Operation ID 'x'",
    ),
    (
        "a misspelt type",
        HEAD + f"paths:\n  /a:\n    get:\n      parameters: [{{name: q, in: query, schema: {{type: strin}}}}]\n"
        f"      responses: {OK}\n",
        "/paths/~1a/get/parameters/0/schema/type",
        "'strin' is not one of",
    ),
    (
        "a default of the wrong type",
        HEAD
        + "paths:\n  /a:\n    get:\n      parameters: [{name: q, in: query, schema: {type: integer, default: x}}]\n"
        f"      responses: {OK}\n",
        "/paths/~1a/get/parameters/0/schema/default",
        "'x' is not of type 'integer'",
    ),
    (
        "a dangling $ref",
        HEAD + "paths:\n  /a:\n    get:\n      parameters: [{name: q, in: query, schema: {$ref: '#/x/N'}}]\n"
        f"      responses: {OK}\n",
        "/paths/~1a/get/parameters/0/schema/$ref",
        "'#/x/N' points nowhere",
    ),
    (
        "an external $ref",
        HEAD + f"paths:\n  /a:\n    get:\n      parameters: [{{$ref: 'common.yaml#/P'}}]\n      responses: {OK}\n",
        "/paths/~1a/get/parameters/0/$ref",
        "external reference 'common.yaml#/P'",
    ),
    (
        "a loop of references",
        HEAD + f"paths:\n  /a:\n    get:\n      parameters: [{{$ref: '#/components/parameters/A'}}]\n"
        f"      responses: {OK}\ncomponents:\n  parameters:\n    A: {{$ref: '#/components/parameters/A'}}\n",
        "/components/parameters/A/$ref",
        "the references loop",
    ),
    ("a YAML alias cycle", "openapi: 3.0.3\ninfo: &i {title: t, again: *i}\n", "/info/again", "alias"),
    ("nested too deeply", "openapi: 3.0.3\nx-deep: " + "[" * 150 + "]" * 150 + "\n", "/x-deep/0/0", "100 levels"),
    ("nested far too deeply", "openapi: 3.0.3\nx: " + "[" * 50000 + "]" * 50000 + "\n", "", "100 levels"),
]


@pytest.mark.parametrize(
    ("text", "pointer", "message"), [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_a_malformed_document_is_named_by_pointer_and_message(text: str, pointer: str, message: str) -> None:
    try:
        problems = check_spec(parse_spec(text))
    except SpecError as exc:
        problems = list(exc.problems)
        shown = str(exc)
    else:
        shown = pointer or "(document): "
    assert shown.startswith(pointer or "(document): ")
    assert any(p.pointer.startswith(pointer) and message in p.message for p in problems), problems
    assert all(len(p.message) <= 300 for p in problems)


def test_long_instances_are_cut_in_messages() -> None:
    big = {f"key{i}": "x" * 100 for i in range(50)}
    spec = {"openapi": "3.0.3", "info": {"title": "t", "version": "1"}, "paths": {"/a": {"get": big}}}
    problems = check_spec(spec)
    assert problems
    assert all(len(p.message) <= 300 for p in problems)


def test_operations_of_refuses_what_parse_spec_refuses() -> None:
    operations, (problem,) = operations_of({"swagger": "2.0"})
    assert operations == []
    assert problem.pointer == "/swagger"
    assert "swagger2openapi" in problem.message
    assert operations_of({"openapi": "3.1.0", "info": {"title": "t", "version": "1"}}) == ([], [])
    _, (problem,) = operations_of({"openapi": "3.1.0", "paths": []})
    assert problem.pointer == "/paths"


# --- hostile documents ------------------------------------------------------------------------------------------------


def chain(count: int, fan: int) -> dict[str, Any]:
    """Schemas S0..S<count>, each referring ``fan`` times to the next (fan 2: exponential when inlined), the
    last back to the first (a cycle through all of them)."""
    schemas = {
        f"S{i}": {
            "type": "object",
            "properties": {f"p{j}": {"$ref": f"#/components/schemas/S{(i + 1) % count}"} for j in range(fan)},
        }
        for i in range(count)
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {
            "/x": {
                "post": {
                    "operationId": "x",
                    "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/S0"}}}},
                    "responses": {
                        "200": {
                            "description": "ok",
                            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/S{1 % count}"}}},
                        }
                    },
                }
            }
        },
        "components": {"schemas": schemas},
    }


@pytest.mark.parametrize(("count", "fan"), [(1, 1), (2, 2), (40, 2), (1000, 1), (500, 3)])
def test_huge_cycles_and_exponential_reuse_stay_bounded(count: int, fan: int) -> None:
    started = time.monotonic()
    (op,), problems = operations_of(chain(count, fan))
    assert problems == []
    size = len(json.dumps(op.definition))
    assert size < 200 * count + 250_000
    assert op.definition["outputSchema"]["type"] == "object"
    assert time.monotonic() - started < 20
    check_spec(chain(count, fan))


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depth=st.integers(0, 40),
    refs=st.lists(st.integers(0, 9), max_size=10),
    extra=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.sampled_from(["$ref", "type", "items", "properties", "allOf", "a"]), inner, max_size=3)
        ),
        max_leaves=30,
    ),
)
def test_any_nesting_and_any_references_terminate(depth: int, refs: list[int], extra: Any) -> None:
    schemas: dict[str, Any] = {f"R{i}": {"$ref": f"#/components/schemas/R{target}"} for i, target in enumerate(refs)}
    schemas["Deep"] = nested(depth)
    schemas["Extra"] = extra
    schemas["Mixed"] = {
        "allOf": [{"$ref": f"#/components/schemas/R{i}"} for i in range(len(refs))]
        + [{"$ref": "#/components/schemas/Extra"}]
    }
    spec = chain(3, 2)
    spec["components"]["schemas"].update(schemas)
    spec["paths"]["/y"] = {
        "get": {
            "parameters": [
                {"name": name, "in": "query", "schema": {"$ref": f"#/components/schemas/{name}"}} for name in schemas
            ],
            "responses": {"200": {"description": "ok"}},
        }
    }
    operations, problems = operations_of(spec)
    assert "x" in [op.name for op in operations]
    assert all(p.pointer.startswith("/") for p in problems)
    check_spec(spec)
    json.dumps([op.definition for op in operations])


def test_a_yaml_alias_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bomb holds 387 million values, past any limit: a lower one is found sooner.
    monkeypatch.setattr(openapi, "MAX_NODES", 100_000)
    lines = ["openapi: 3.0.3", 'a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    with pytest.raises(SpecError, match="too large \\(over 100000 values\\)"):
        parse_spec("\n".join(lines))


def test_the_fixture_is_yaml_with_integer_like_codes_kept_as_strings() -> None:
    spec = parse_spec(HEAD + "paths:\n  /a:\n    get:\n      responses:\n        200: {description: ok}\n")
    assert list(spec["paths"]["/a"]["get"]["responses"]) == ["200"]
    assert check_spec(spec) == []
    assert yaml.safe_load("a: 1") == {"a": 1}
