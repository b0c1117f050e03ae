"""Redaction: canary secrets planted under secret keys or in text never survive; the input is never changed."""

import copy
import json
from typing import Any

import pytest

from policies.redaction import DEFAULT_KEYS, MAX_DEPTH, REDACTED, Redactor

CANARY = "CANARY-7f3a9"


def dumped(value: Any) -> str:
    return json.dumps(value)


@pytest.mark.parametrize(
    "key",
    ["password", "token", "Authorization", "X-Api-Key", "refresh_token", "AUTHORIZATION", "api-key", "privateKey"],
)
def test_a_value_under_a_secret_key_is_replaced_whatever_the_key_spelling(key: str) -> None:
    assert Redactor().redact({key: CANARY, "user": "bob"}) == {key: REDACTED, "user": "bob"}


def test_canaries_nested_in_dicts_and_lists_are_all_replaced() -> None:
    arguments = {
        "password": CANARY,
        "auth": {"token": CANARY, "headers": [{"Authorization": f"Basic {CANARY}"}, {"X-Api-Key": CANARY}]},
        "items": [[{"deep": {"client_secret": CANARY}}], "plain"],
    }
    redacted = Redactor().redact(arguments)
    assert CANARY not in dumped(redacted)
    assert redacted["items"][1] == "plain"


def test_a_secret_key_hides_its_whole_value_whatever_its_type() -> None:
    redacted = Redactor().redact({"token": {"value": CANARY, "n": 1}, "cookie": [CANARY], "passwd": 42})
    assert redacted == {"token": REDACTED, "cookie": REDACTED, "passwd": REDACTED}


def test_keys_that_merely_resemble_secret_ones_are_kept() -> None:
    arguments = {"author": "ann", "user": "bob", "limit": 10, "query": "orders", "keyboard": "us"}
    assert Redactor().redact(arguments) == arguments


def test_configured_keys_replace_the_defaults() -> None:
    redactor = Redactor(keys=("ssn",))
    assert redactor.redact({"SSN": CANARY, "password": "kept"}) == {"SSN": REDACTED, "password": "kept"}


def test_a_configured_pattern_is_replaced_in_every_string_anywhere() -> None:
    redactor = Redactor(patterns=[r"CANARY-[0-9a-f]{5}"])
    value = {"note": f"see {CANARY} here", "list": [CANARY, {"deep": [f"x{CANARY}y"]}], "n": 3}
    redacted = redactor.redact(value)
    assert CANARY not in dumped(redacted)
    assert redacted["note"] == f"see {REDACTED} here"
    assert redacted["n"] == 3


def test_only_the_secret_group_of_a_pattern_is_replaced() -> None:
    redactor = Redactor(patterns=[r"pin (?P<secret>\d+)"])
    assert redactor.redact_text("card pin 1234 ok") == f"card pin {REDACTED} ok"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"curl -H 'Authorization: Bearer {CANARY}.abc' x", "curl -H 'Authorization: [REDACTED]' x"),
        (f"use bearer {CANARY} now", "use bearer [REDACTED] now"),
        (f"Authorization: Basic {CANARY}", "Authorization: [REDACTED]"),
        (f'{{"password": "my {CANARY} pass", "user": "bob"}}', '{"password": "[REDACTED]", "user": "bob"}'),
        (f"{{'api_key': '{CANARY}'}}", "{'api_key': '[REDACTED]'}"),
        (f"API_KEY={CANARY}\nHOME=/root", "API_KEY=[REDACTED]\nHOME=/root"),
        (f"https://x/cb?access_token={CANARY}&page=2", "https://x/cb?access_token=[REDACTED]&page=2"),
        (f"postgresql://bob:{CANARY}@db:5432/app", "postgresql://bob:[REDACTED]@db:5432/app"),
        ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl end", "token [REDACTED] end"),
    ],
)
def test_builtin_patterns_hide_credentials_in_free_text(text: str, expected: str) -> None:
    assert Redactor().redact_text(text) == expected


def test_ordinary_text_is_left_alone() -> None:
    text = "The author asked: where is order A-12345? See https://shop.example/orders?page=2 at 10:30."
    assert Redactor().redact_text(text) == text


# Fake credentials of each well-known shape, assembled here so no scanner takes the source for a leak.
PEM = "\n".join(
    ["-----BEGIN RSA PRIVATE KEY-----", "MIIEowIBAAKCAQEA" + "q8Zx" * 16, "Zx9=", "-----END RSA PRIVATE KEY-----"]
)
CREDENTIALS = {
    "openai": "sk-" + "T3BlbkFJ" + "a1B2c3D4" * 4,
    "openai-project": "sk-proj-" + "a1B2c3D4e5" * 5,
    "anthropic": "sk-ant-api03-" + "a1B2c3D4e5_-" * 8 + "AA",
    "stripe": "sk_live_" + "51Hx" * 6,
    "github-classic": "ghp_" + "a1B2c3D4e5F6" * 3,
    "github-oauth": "gho_" + "a1B2c3D4e5F6" * 3,
    "github-server": "ghs_" + "a1B2c3D4e5F6" * 3,
    "github-fine-grained": "github_pat_" + "11ABCDEFG0" + "a1B2c3D4e5_" * 6,
    "slack-bot": "xoxb-" + "1234567890-1234567890123-" + "a1B2c3D4e5F6" * 2,
    "slack-user": "xoxp-" + "1234567890-" + "a1B2c3D4e5F6" * 2,
    "aws-access-key": "AKIA" + "IOSFODNN7EXAMPLE",
    "aws-session-key": "ASIA" + "Y34FZKBOKMUTVV7A",
    "google-api-key": "AIza" + "SyA-" + "a1B2c3D4e5F6" * 2 + "a1B2c3D",
    "pem-private-key": PEM,
    "pem-openssh-key": PEM.replace("RSA", "OPENSSH"),
}


@pytest.mark.parametrize("credential", CREDENTIALS.values(), ids=CREDENTIALS.keys())
def test_well_known_credential_shapes_are_redacted_by_default_wherever_they_sit(credential: str) -> None:
    arguments = {
        "query": f"deploy with {credential} please",
        "env": [{"name": "CONFIG", "value": credential}],
        "lines": ["first", f"key:{credential},next"],
    }
    redacted = Redactor(keys=["ssn"], patterns=[r"CANARY-\d+"]).redact(arguments)
    assert credential not in dumped(redacted)
    assert redacted["query"] == f"deploy with {REDACTED} please"
    assert redacted["env"] == [{"name": "CONFIG", "value": REDACTED}]
    assert redacted["lines"] == ["first", f"key:{REDACTED},next"]


def test_a_private_key_cut_before_its_end_line_is_redacted_to_the_end() -> None:
    cut = PEM[:60]
    assert Redactor().redact_text(f"key: {cut}") == f"key: {REDACTED}"


@pytest.mark.parametrize(
    "text",
    [
        "pip install scikit-learn sk-learn; the task-force risk-assessment-2024-v2 is due",
        "sk-12 and sk-short-name and sk-this-is-a-long-kebab-case-identifier-without-digits",
        "ghost_protocol high_priority_queue ghp_short gh_pages github_pages night_shift",
        "the customer_test_account and is_live_stream flags; sk_live_ alone; rk_test_123",
        "xoxo, hugs; xox-1 and xoxz-1234567890",
        "Asia/Tokyo, ASIAN markets, AKIA alone, AKIAL, AIza alone; THE AKIANAMEISNOTAKEYATALL",
        "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----",
        "-----BEGIN CERTIFICATE----- and private keys are discussed here in prose",
        "order 7f9c2ba4-e88f-4b6a-9d1e-0c1f2a3b4c5d",
        "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855, SESSION_ID_ABC123",
    ],
)
def test_ordinary_words_and_ids_are_not_taken_for_credentials(text: str) -> None:
    assert Redactor().redact_text(text) == text


def test_builtin_patterns_can_be_turned_off() -> None:
    text = f"Authorization: Bearer {CANARY}"
    assert Redactor(builtins=False).redact_text(text) == text
    assert Redactor(builtins=False).redact({"token": CANARY}) == {"token": REDACTED}


def test_the_original_value_is_not_mutated() -> None:
    original = {"password": CANARY, "nested": [{"token": CANARY, "text": f"Bearer {CANARY}"}], "t": (1, CANARY)}
    before = copy.deepcopy(original)
    redacted = Redactor().redact(original)
    assert original == before
    assert redacted is not original
    assert redacted["nested"] is not original["nested"]


def test_nesting_deeper_than_the_cap_is_replaced_without_recursion_errors() -> None:
    value: Any = CANARY
    for _ in range(10_000):
        value = [{"a": value}]
    text = dumped(Redactor(patterns=["nothing"]).redact(value))
    assert CANARY not in text
    assert "nested too deep" in text
    assert text.count("[") <= 2 * MAX_DEPTH + 2


def test_a_reference_cycle_is_cut() -> None:
    loop: dict[str, Any] = {"note": "x"}
    loop["self"] = loop
    redacted = Redactor().redact(loop)
    assert redacted["note"] == "x"
    assert isinstance(redacted["self"], str)


def test_values_that_are_not_json_come_out_as_json_and_redacted() -> None:
    class Opaque:
        def __str__(self) -> str:
            return f"Opaque(Bearer {CANARY})"

    value = {
        1: "int key",
        "blob": CANARY.encode(),
        "tags": {"only"},
        "pair": (1, 2),
        "obj": Opaque(),
        "nan": float("nan"),
        "ok": 1.5,
        "flag": True,
        "none": None,
    }
    redacted = Redactor().redact(value)
    text = json.dumps(redacted, allow_nan=False)
    assert CANARY not in text
    assert redacted["1"] == "int key"
    assert redacted["tags"] == ["only"]
    assert redacted["pair"] == [1, 2]
    assert redacted["blob"] == f"[{len(CANARY)} bytes]"
    assert redacted["obj"] == f"Opaque(Bearer {REDACTED})"
    assert (redacted["ok"], redacted["flag"], redacted["none"]) == (1.5, True, None)


def test_a_bad_pattern_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"\(unclosed"):
        Redactor(patterns=["fine", "(unclosed"])


def test_a_pattern_matching_the_empty_string_is_refused() -> None:
    with pytest.raises(ValueError, match=r"x\*"):
        Redactor(patterns=["x*"])


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(ValueError, match="_-"):
        Redactor(keys=[*DEFAULT_KEYS, "_-"])
