"""Access rules in isolation: deny wins, client lists, allow rules, conditions, listings, workflow steps."""

from pathlib import Path
from textwrap import dedent, indent

import anyio
import pytest

from gateway.config import AccessRule, parse_config
from gateway.errors import Forbidden
from gateway.types import CallContext, Principal, ToolCall, ToolResult
from policies.access import AccessPolicy

pytestmark = pytest.mark.anyio

BOT = Principal("bot")
OPS = Principal("ops")
LOCAL = Principal("local", kind="stdio")
HASH = "ab" * 32


def policy(rules: str, clients: str = "{}", *, named: bool = True) -> AccessPolicy:
    """The access policy of ``rules``; ``named``: each rule gets the id ``rule<its index>``, to tell them apart."""
    listed = rules if "\n" not in rules else "\n" + indent(dedent(rules).strip("\n"), "  ")
    config = parse_config(f"clients: {clients}\npolicies: {listed}\n", environ={})
    access = [r for r in config.policies if isinstance(r, AccessRule)]
    if named:
        access = [AccessRule.model_validate({**r.model_dump(), "id": f"rule{i}"}) for i, r in enumerate(access)]
    return AccessPolicy(access, config.clients)


async def reached(call: ToolCall) -> ToolResult:
    return ToolResult.text(f"called {call.name}")


async def outcome(
    access: AccessPolicy, principal: Principal, tool: str, step: bool = False, **arguments: object
) -> str:
    context = CallContext(principal=principal, workflow_run="run-1" if step else None)
    try:
        result = await access(ToolCall(tool, "s", tool, arguments, context), reached)
    except Forbidden as exc:
        return f"refused by {exc.policy}: {exc}"
    return str(result.content[0]["text"])


CLIENTS = f'{{bot: {{token_sha256: "{HASH}", tools: ["crm__*", "kb__*"]}}, ops: {{token_sha256: "{"cd" * 32}"}}}}'


async def test_a_deny_rule_refuses_every_caller_with_its_reason() -> None:
    access = policy('[{deny: "files__delete_*", reason: "deletion is not allowed through the gateway"}]')
    assert await outcome(access, LOCAL, "files__delete_all") == (
        "refused by rule0: files__delete_all is not allowed (rule0): deletion is not allowed through the gateway."
    )
    assert await outcome(access, LOCAL, "files__read") == "called files__read"


async def test_a_refusal_names_the_rule_by_its_given_or_derived_id() -> None:
    access = policy('[{deny: "files__delete_*", id: no-deletes}, {deny: "crm__delete"}]', named=False)
    assert (await outcome(access, LOCAL, "files__delete_all")).startswith(
        "refused by no-deletes: files__delete_all is not allowed (no-deletes)"
    )
    assert (await outcome(access, LOCAL, "crm__delete")).startswith(
        "refused by deny-crm__delete-fa7849ad: crm__delete is not allowed (deny-crm__delete-fa7849ad)"
    )


async def test_deny_wins_over_allow_whatever_their_order() -> None:
    access = policy('[{allow: "crm__*"}, {deny: "crm__delete"}]')
    assert (await outcome(access, LOCAL, "crm__delete")).startswith("refused by rule1")
    assert await outcome(access, LOCAL, "crm__get") == "called crm__get"


async def test_once_an_allow_rule_applies_only_allowed_tools_pass() -> None:
    access = policy('[{allow: ["crm__get_*", "kb__search"]}]')
    assert await outcome(access, LOCAL, "kb__search") == "called kb__search"
    refused = await outcome(access, LOCAL, "crm__update")
    assert refused == (
        "refused by rule0: crm__update is not allowed for 'local': no allow rule permits this call (rule0)."
    )


async def test_rules_for_some_clients_leave_the_others_alone() -> None:
    access = policy('[{deny: "kb__*", clients: [bot]}, {allow: "crm__get", clients: "o*"}]', CLIENTS)
    assert (await outcome(access, BOT, "kb__search")).startswith("refused by rule0")
    assert (await outcome(access, OPS, "kb__search")).startswith("refused by rule1")  # ops may only crm__get
    assert await outcome(access, OPS, "crm__get") == "called crm__get"
    assert await outcome(access, LOCAL, "kb__search") == "called kb__search"  # the stdio user is no client


async def test_a_clients_own_tool_list_limits_what_it_calls_directly() -> None:
    access = policy("[]", CLIENTS)
    assert await outcome(access, BOT, "crm__get") == "called crm__get"
    assert await outcome(access, BOT, "files__read") == (
        "refused by clients.bot.tools: client 'bot' may only call crm__*, kb__*; files__read is not among them."
    )
    assert await outcome(access, OPS, "files__read") == "called files__read"


async def test_workflow_steps_are_judged_only_by_rules_for_every_caller() -> None:
    access = policy('[{deny: "kb__*", clients: bot}, {deny: "files__delete"}]', CLIENTS)
    assert await outcome(access, BOT, "files__read", step=True) == "called files__read"  # not in bot's list
    assert await outcome(access, BOT, "kb__search", step=True) == "called kb__search"
    assert (await outcome(access, BOT, "files__delete", step=True)).startswith("refused by rule1")


async def test_conditions_look_at_the_arguments_and_fail_closed() -> None:
    access = policy("""
      - {deny: "files__read", if: '.arguments.path | startswith("/etc")', reason: "system files are off limits"}
      - {allow: "files__*", if: '.arguments.path | length < 20'}
    """)
    assert await outcome(access, LOCAL, "files__read", path="/home/a") == "called files__read"
    assert (await outcome(access, LOCAL, "files__read", path="/etc/passwd")).startswith("refused by rule0")
    assert (await outcome(access, LOCAL, "files__read", path="/home/" + "a" * 30)).startswith("refused by rule1")
    # `startswith` on a number is a jq error: the deny applies (and the allow would not)
    assert (await outcome(access, LOCAL, "files__read", path=5)).startswith("refused by rule0")
    allowing = policy("""
      - {allow: "files__*", if: '.arguments.path | startswith("/home")'}
    """)
    assert await outcome(allowing, LOCAL, "files__read", path="/home/a") == "called files__read"
    assert (await outcome(allowing, LOCAL, "files__read", path=5)).startswith("refused by rule0")  # not allowed


def test_listings_hide_what_is_certain_to_be_refused_and_show_what_some_arguments_may_pass() -> None:
    access = policy(
        """
      - {deny: "files__delete"}
      - {deny: "files__read", if: '.arguments.path | startswith("/etc")'}
      - {allow: "crm__*", clients: bot, if: ".arguments.id != null"}
    """,
        CLIENTS,
    )
    tools = ["files__delete", "files__read", "crm__get", "kb__search", "other"]
    assert [t for t in tools if access.visible(LOCAL, t)] == ["files__read", "crm__get", "kb__search", "other"]
    assert [t for t in tools if access.visible(BOT, t)] == ["crm__get"]  # its list, and its allow rule
    assert [t for t in tools if access.visible(OPS, t)] == ["files__read", "crm__get", "kb__search", "other"]


def test_without_rules_or_client_lists_the_policy_is_not_needed() -> None:
    assert not policy("[]").active
    assert policy('[{deny: "x"}]').active
    assert policy("[]", CLIENTS).active


async def test_a_slow_condition_does_not_hold_up_other_calls_and_fails_closed() -> None:
    access = policy("""
      - {deny: "files__*", if: "last(range(1e12)) > 0", reason: "r"}
      - {allow: "*", if: ".tool | length > 0"}
    """)  # the allow's condition runs in the pool's other worker meanwhile
    finished: list[str] = []

    async def slow() -> None:
        finished.append(await outcome(access, LOCAL, "files__read"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow)
        await anyio.wait_all_tasks_blocked()  # its condition runs in the jq worker; the loop is free
        finished.append(await outcome(access, LOCAL, "crm__get"))

    assert finished[0] == "called crm__get"
    assert finished[1].startswith("refused by")  # the condition timed out: the deny applies


async def test_each_rules_condition_is_its_own_even_where_two_rules_share_an_id() -> None:
    """A config refuses two rules under one id; a program building the policy itself may not: no fail-open."""
    shared = [
        AccessRule.model_validate({"deny": "crm__*", "if": ".arguments.a", "id": "same"}),
        AccessRule.model_validate({"deny": "crm__*", "if": ".arguments.b", "id": "same"}),
    ]
    access = AccessPolicy(shared, {})
    assert (await outcome(access, LOCAL, "crm__x", b=True)).startswith("refused by same")
    assert await outcome(access, LOCAL, "crm__x", a=False, b=False) == "called crm__x"


def test_the_readmes_path_rule_normalises_the_path_before_it_judges_it() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index('  - deny: "files__read"')
    rule = readme[start : readme.index('reason: "system files are off limits"', start)] + 'reason: "off limits"'
    access = policy("\n" + dedent(rule))

    async def judged(path: str) -> str:
        return await outcome(access, LOCAL, "files__read", path=path)

    async def main() -> None:
        for path in (
            "/etc/passwd",
            "/srv/../etc/passwd",
            "//etc//passwd",
            "/srv/./../etc",
            "/../etc/x",
            "etc/x",
            "/etc",
        ):
            assert (await judged(path)).startswith("refused by rule0"), path
        for path in ("/srv/data/etc", "/etcetera/x", "/srv/data/../files/x", "/home/a"):
            assert await judged(path) == "called files__read", path

    anyio.run(main)
