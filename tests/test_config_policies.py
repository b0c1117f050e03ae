"""The config's clients:, policies:, audit: sections and a server's resilience settings."""

from pathlib import Path
from textwrap import dedent

import pytest

from gateway.config import AccessRule, LimitRule, load_config, parse_config
from gateway.errors import ConfigError

HASH = "ab" * 32

FULL = f"""\
gateway: {{max_body: 1MiB, rate_limit: 100/min, burst: 5}}
clients:
  bot: {{token_sha256: "{HASH.upper()}", tools: ["crm__*", support_reply]}}
  ops: {{token_sha256: "{"cd" * 32}"}}
policies:
  - {{deny: "files__delete_*", reason: "deletion is not allowed"}}
  - {{allow: "crm__*", clients: bot, if: ".arguments.id | startswith(\\"A\\")"}}
  - {{tools: "crm__*", rate_limit: "10/s", burst: 20, per: client}}
  - {{tools: ["a*", "b*"], max_concurrency: 4, per: tool}}
  - {{rate_limit: 5/2s}}
servers:
  crm:
    url: http://127.0.0.1:9001/mcp
    retry: {{attempts: 2, backoff: 100ms}}
    circuit_breaker: {{failures: 3, reset_after: 10s, failure_rate: 0.5}}
    fallback: {{"get_*": cache__get}}
    tools: {{idempotent: ["get_*"]}}
audit: {{path: logs/audit.jsonl, redact_keys: [ssn], redact_patterns: ["sk-[a-z0-9]+"]}}
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(dedent(text), environ={})
    return [str(problem) for problem in caught.value.problems]


def test_every_section_reads_into_typed_settings(tmp_path: Path) -> None:
    path = tmp_path / "patchbay.yaml"
    path.write_text(FULL)
    config = load_config(path, {})
    assert (config.gateway.max_body, config.gateway.rate_limit, config.gateway.burst) == (
        2**20,
        ("100/min", 100 / 60),
        5,
    )
    assert config.clients["bot"].token_sha256 == HASH  # lower-cased
    assert config.clients["bot"].tools == ("crm__*", "support_reply")
    assert config.clients["ops"].tools is None
    deny, allow, rate, concurrency, slow = config.policies
    assert isinstance(deny, AccessRule)
    assert deny.tools == ("files__delete_*",)
    assert deny.condition is None
    assert isinstance(allow, AccessRule)
    assert allow.clients == ("bot",)
    assert allow.condition is not None
    assert allow.condition.holds({"arguments": {"id": "A-1"}})
    assert not allow.condition.holds({"arguments": {"id": "B-1"}})
    assert isinstance(rate, LimitRule)
    assert (rate.rate_limit, rate.bucket, rate.per) == (("10/s", 10.0), 20, "client")
    assert isinstance(concurrency, LimitRule)
    assert (concurrency.max_concurrency, concurrency.per) == (4, "tool")
    assert isinstance(slow, LimitRule)
    assert slow.rate_limit == ("5/2s", 2.5)
    assert slow.bucket == 2.5
    assert (slow.tools, slow.per) == (("*",), "global")
    crm = config.servers["crm"]
    assert crm.retry is not None
    assert (crm.retry.attempts, crm.retry.backoff) == (2, 0.1)
    assert crm.circuit_breaker is not None
    assert crm.circuit_breaker.failure_rate == 0.5
    assert (crm.fallback, crm.tools.idempotent) == ({"get_*": "cache__get"}, ["get_*"])
    assert config.audit.path == str(tmp_path / "logs" / "audit.jsonl")  # relative to the config file
    assert (config.audit.redact_keys, config.audit.redact_patterns) == (("ssn",), ("sk-[a-z0-9]+",))


def test_without_the_sections_nothing_is_limited_and_nobody_is_a_client() -> None:
    config = parse_config("", environ={})
    assert (config.clients, config.policies, config.audit.path, config.gateway.rate_limit) == ({}, (), None, None)


def test_every_bad_rule_is_reported_with_its_location() -> None:
    assert problems_of("""\
        policies:
          - {allow: "x", deny: "y"}
          - {tools: "x"}
          - {rate_limit: "fast"}
          - {deny: "z", if: ".x | bogus("}
          - {deny: "z", colour: red}
          - {tools: "x", max_concurrency: 0}
          - {deny: []}
          - {tools: "x", max_concurrency: 1, burst: 2}
        """) == [
        "policies[0] (line 2): an access rule has exactly one of `deny` and `allow`",
        "policies[1] (line 3): a policy needs `deny`, `allow`, `rate_limit` or `max_concurrency`",
        "policies[2].rate_limit (line 4): expected a rate like 10/s, 100/min or 5/2s, got 'fast'",
        "policies[3].if (line 5): invalid jq in '.x | bogus(': jq: error: syntax error, unexpected end of file"
        " at <top-level>, line 1, column 11",
        "policies[4].colour (line 6): unknown key 'colour' (allowed: allow, clients, deny, id, if, reason)",
        "policies[5].max_concurrency (line 7): Input should be greater than or equal to 1",
        "policies[6].deny (line 8): needs at least one name or glob, and none may be empty",
        "policies[7] (line 9): `burst` needs a `rate_limit`",
    ]


def test_a_rule_naming_a_client_that_is_not_configured_is_a_problem_but_a_glob_is_not() -> None:
    assert problems_of(f"""\
        clients: {{bot: {{token_sha256: "{HASH}"}}}}
        policies: [{{deny: "z", clients: [bot, bto, "b*"]}}]
        """) == ["policies[0].clients (line 2): no client 'bto' in `clients:` (bot)"]


def test_a_token_is_stored_only_as_its_sha256() -> None:
    assert problems_of("clients: {bot: {token_sha256: pb_plaintext_token}}") == [
        "clients.bot.token_sha256 (line 1): must be the SHA-256 of the client's token, 64 hex digits"
        " (`patchbay token` prints one)"
    ]


def test_bad_sizes_rates_and_patterns_are_located() -> None:
    assert problems_of("""\
        gateway: {max_body: lots, rate_limit: 0/s, burst: 0}
        audit: {redact_patterns: ["("]}
        servers: {s: {url: "http://127.0.0.1:1/mcp", retry: {attempts: 0}, circuit_breaker: {failure_rate: 2}}}
        """) == [
        "gateway.max_body (line 1): expected a size like 4MiB or 512KB, got 'lots'",
        "gateway.rate_limit (line 1): expected a rate like 10/s, 100/min or 5/2s, got '0/s'",
        "gateway.burst (line 1): Input should be greater than or equal to 1",
        "audit.redact_patterns (line 2): '(' is not a regular expression: missing ), unterminated subpattern"
        " at position 0",
        "servers.s.retry.attempts (line 3): Input should be greater than or equal to 1",
        "servers.s.circuit_breaker.failure_rate (line 3): Input should be less than or equal to 1",
    ]


def ids_of(text: str) -> list[str]:
    return [rule.id for rule in parse_config(dedent(text), environ={}).policies]


def test_a_rule_without_an_id_is_known_by_one_derived_from_what_it_does() -> None:
    assert ids_of("""\
        policies:
          - {deny: "files__delete_*", reason: "deletion is not allowed"}
          - {tools: "crm__*", rate_limit: 10/s, per: client}
          - {max_concurrency: 4}
          - {tools: "kb:?", rate_limit: 1/s, max_concurrency: 1}
        """) == [
        "deny-files__delete_all-e557dab2",
        "rate-crm__all-246913d8",
        "concurrency-all-959c87db",
        "limit-kb_-bb85f1c8",
    ]


def test_a_derived_id_ignores_position_spelling_and_reason_but_not_what_the_rule_does() -> None:
    clients = f'clients: {{x: {{token_sha256: "{HASH}"}}, y: {{token_sha256: "{HASH}"}}}}'
    [written] = ids_of(f"""\
        {clients}
        policies: [{{tools: ["b*", "a*"], rate_limit: 10/s, per: client, clients: [y, x]}}]
        """)
    [deny, respelled] = ids_of(f"""\
        {clients}
        policies:
          - {{deny: "files__delete_*", reason: "deletion is not allowed"}}
          - {{per: client, clients: [x, y, x], rate_limit: "600 / min", burst: 10, tools: ["a*", "b*"]}}
        """)
    assert respelled == written
    assert ids_of('policies: [{deny: "files__delete_*", reason: "not today"}]') == [deny]
    [per_tool, for_x, slower, burstier, denied, denied_if] = ids_of(f"""\
        {clients}
        policies:
          - {{tools: ["a*", "b*"], rate_limit: 10/s, per: tool, clients: [x, y]}}
          - {{tools: ["a*", "b*"], rate_limit: 10/s, per: client, clients: [x]}}
          - {{tools: ["a*", "b*"], rate_limit: 5/s, per: client, clients: [x, y]}}
          - {{tools: ["a*", "b*"], rate_limit: 10/s, burst: 20, per: client, clients: [x, y]}}
          - {{deny: ["a*", "b*"], clients: [x, y]}}
          - {{deny: ["a*", "b*"], clients: [x, y], if: ".arguments.force"}}
        """)
    assert len({written, per_tool, for_x, slower, burstier, denied, denied_if}) == 7


def test_a_given_id_is_used_as_is() -> None:
    assert ids_of("""\
        policies:
          - {id: no-deletes, deny: "files__delete_*"}
          - {id: crm.rate_v2, tools: "crm__*", rate_limit: 10/s}
        """) == ["no-deletes", "crm.rate_v2"]


def test_an_id_unsafe_in_a_metric_label_or_a_limit_key_is_refused() -> None:
    assert problems_of("""\
        policies:
          - {id: "crm:rate", tools: "crm__*", rate_limit: 10/s}
          - {id: "no deletes", deny: "x"}
          - {id: "", deny: "y"}
        """) == [
        "policies[0].id (line 2): 'crm:rate' is not an id: 1 to 64 letters, digits, `_`, `.` or `-`, starting with"
        " a letter or digit",
        "policies[1].id (line 3): 'no deletes' is not an id: 1 to 64 letters, digits, `_`, `.` or `-`, starting with"
        " a letter or digit",
        "policies[2].id (line 4): '' is not an id: 1 to 64 letters, digits, `_`, `.` or `-`, starting with"
        " a letter or digit",
    ]


def test_two_rules_with_one_id_are_refused_at_the_later_one() -> None:
    assert problems_of("""\
        policies:
          - {deny: "files__delete_*", reason: "deletion is not allowed"}
          - {id: crm, tools: "crm__*", rate_limit: 10/s}
          - {deny: "files__delete_*", reason: "really not"}
          - {id: crm, tools: "crm__*", max_concurrency: 2}
        """) == [
        "policies[2] (line 4): does the same as policies[0] (line 2), so both get the id"
        " 'deny-files__delete_all-e557dab2' (derived from what a rule does): remove one, or give it an `id:`",
        "policies[3].id (line 5): the id 'crm' is taken by policies[1] (line 3); every rule needs its own",
    ]
