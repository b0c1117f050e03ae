"""The registry as pure logic: naming, filters, renames, collisions, routing."""

import pytest

from gateway.errors import ToolNotFound
from gateway.registry import (
    MAX_NAME_LENGTH,
    Listing,
    Naming,
    build_registry,
    exposed_name,
    owner_by_prefix,
    prefix_head,
)
from gateway.types import Prompt, Resource, Tool


def tool(name: str, description: str = "") -> Tool:
    return Tool(name, {"name": name, "description": description, "inputSchema": {"type": "object"}})


def test_names_are_prefixed_with_the_separator() -> None:
    assert exposed_name("crm", "__", "get_order") == "crm__get_order"


def test_an_empty_prefix_passes_names_through() -> None:
    assert exposed_name("", "__", "test_simple_text") == "test_simple_text"


def test_characters_outside_the_safe_set_are_replaced() -> None:
    assert exposed_name("my server", "__", "get-sum/v2") == "my_server__get-sum_v2"


def test_long_names_are_shortened_with_a_stable_distinct_hash() -> None:
    long_a = "a" * 80
    long_b = "a" * 79 + "b"
    first = exposed_name("svc", "__", long_a)
    assert len(first) == MAX_NAME_LENGTH
    assert first == exposed_name("svc", "__", long_a)
    assert first != exposed_name("svc", "__", long_b)
    assert first.startswith("svc__aaaa")


def test_include_exclude_rename_and_descriptions_apply() -> None:
    listing = Listing(tools=(tool("get_order"), tool("get_secret"), tool("delete_all"), tool("get_user", "old")))
    naming = Naming(
        prefix="crm",
        include=("get_*",),
        exclude=("get_secret",),
        rename={"get_order": "order"},
        descriptions={"get_user": "Look up a user."},
    )
    registry, problems = build_registry({"crm": listing}, {"crm": naming})
    assert problems == []
    assert set(registry.tools) == {"crm__order", "crm__get_user"}
    assert registry.resolve("crm__order").target == "get_order"
    assert registry.tools["crm__order"].tool.definition["name"] == "crm__order"
    assert registry.tools["crm__get_user"].tool.description == "Look up a user."


def test_resolving_an_unknown_name_raises_tool_not_found() -> None:
    registry, _ = build_registry({}, {})
    with pytest.raises(ToolNotFound):
        registry.resolve("nope")


def test_a_tool_name_collision_is_reported_and_never_overwrites_the_first_owner() -> None:
    listings = {"a": Listing(tools=(tool("x", "from a"),)), "b": Listing(tools=(tool("x", "from b"),))}
    naming = {"a": Naming(prefix=""), "b": Naming(prefix="")}
    registry, problems = build_registry(listings, naming)
    assert registry.tools["x"].provider == "a"
    assert [p.path for p in problems] == ["servers.b"]
    assert "'x'" in problems[0].message


def test_a_name_reserved_for_a_workflow_collides_with_a_tool() -> None:
    registry, problems = build_registry(
        {"a": Listing(tools=(tool("reply"),))}, {"a": Naming(prefix="")}, reserved=["reply"]
    )
    assert "reply" not in registry.tools
    assert len(problems) == 1


def test_prompts_are_namespaced_like_tools() -> None:
    listing = Listing(prompts=(Prompt("greet", {"name": "greet"}),))
    registry, _ = build_registry({"kit": listing}, {"kit": Naming(prefix="kit")})
    assert registry.prompts["kit__greet"].target == "greet"
    assert registry.prompts["kit__greet"].prompt.definition["name"] == "kit__greet"


def test_resources_route_by_uri_and_templates_by_pattern() -> None:
    listings = {
        "files": Listing(resources=(Resource("file:///readme", {"uri": "file:///readme", "name": "readme"}),)),
        "orders": Listing(
            resources=(Resource("orders://{id}", {"uriTemplate": "orders://{id}", "name": "order"}, template=True),)
        ),
    }
    naming = {"files": Naming(prefix="files"), "orders": Naming(prefix="orders")}
    registry, problems = build_registry(listings, naming)
    assert problems == []
    assert registry.route_resource("file:///readme") == "files"
    assert registry.route_resource("orders://A-1") == "orders"
    assert registry.route_resource("orders://A-1/extra") is None
    assert registry.route_resource("unknown://x") is None


def test_a_uri_claimed_by_two_servers_is_a_collision() -> None:
    resource = Resource("shared://x", {"uri": "shared://x", "name": "x"})
    listings = {"a": Listing(resources=(resource,)), "b": Listing(resources=(resource,))}
    registry, problems = build_registry(listings, {"a": Naming(prefix="a"), "b": Naming(prefix="b")})
    assert registry.route_resource("shared://x") == "a"
    assert [p.path for p in problems] == ["servers.b"]


def test_a_collision_a_rename_made_names_both_tools_and_the_rename() -> None:
    listings = {"one": Listing(tools=(tool("b"),)), "two": Listing(tools=(tool("a"),))}
    naming = {"one": Naming(prefix="x"), "two": Naming(prefix="x", rename={"a": "b"})}

    registry, [problem] = build_registry(listings, naming)

    assert registry.tools["x__b"].provider == "one"
    assert problem.path == "servers.two.tools.rename.a"
    assert problem.message == (
        "tool 'a' of server 'two' (renamed to 'b' by `tools.rename`) collides: the name 'x__b' is already taken by "
        "tool 'b' of server 'one'; the rename made them collide: rename to another name, or set a different `prefix:`"
    )


def test_a_collision_with_a_renamed_tool_names_the_first_owners_rename() -> None:
    listings = {"one": Listing(tools=(tool("a"),)), "two": Listing(tools=(tool("b"),))}
    naming = {"one": Naming(prefix="x", rename={"a": "b"}), "two": Naming(prefix="x")}

    _, [problem] = build_registry(listings, naming)

    assert problem.path == "servers.two"
    assert "tool 'b' of server 'two' collides" in problem.message
    assert "taken by tool 'a' of server 'one' (renamed to 'b' by `tools.rename`)" in problem.message
    assert "the rename made them collide" in problem.message


def test_a_collision_without_a_rename_suggests_a_prefix_or_a_rename() -> None:
    listings = {"a": Listing(tools=(tool("x"),)), "b": Listing(tools=(tool("x"),))}
    _, [problem] = build_registry(listings, {"a": Naming(prefix=""), "b": Naming(prefix="")})
    assert problem.message == (
        "tool 'x' of server 'b' collides: the name 'x' is already taken by tool 'x' of server 'a'; "
        "set a different `prefix:` or `tools.rename` for one of them"
    )


def test_a_name_belongs_to_the_provider_with_the_longest_prefix_it_starts_with() -> None:
    heads = {"crm": prefix_head("crm", "__"), "crm_eu": prefix_head("crm__eu", "__"), "flat": prefix_head("", "__")}
    assert heads == {"crm": "crm__", "crm_eu": "crm__eu__", "flat": ""}
    assert owner_by_prefix(heads, "crm__get") == "crm"
    assert owner_by_prefix(heads, "crm__eu__get") == "crm_eu"
    assert owner_by_prefix(heads, "get") is None  # only a provider without a prefix could serve it
    assert prefix_head("my crm", "__") == "my_crm__"  # as the names are made
