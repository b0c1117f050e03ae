import datetime
from textwrap import dedent
from typing import Any

import pydantic
import pytest
import yaml

from gateway.workflows.model import (
    CONFIRM_SCHEMA,
    DEFAULT_BACKOFF,
    DEFAULT_JITTER,
    DEFAULT_MAX_BACKOFF,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_TOKENS,
    DEFAULT_RETRY_ATTEMPTS,
    DEFAULT_RETRY_ON,
    AskModel,
    AskModelStep,
    AskUserStep,
    CallSpec,
    CallStep,
    FailStep,
    ForEachStep,
    Retry,
    SetStep,
    SwitchStep,
    Workflow,
    Workflows,
    iter_steps,
    strip_tags,
)

WORKFLOWS = pydantic.TypeAdapter(Workflows)

# DESIGN §3's example, plus one step of each remaining kind and every step option. ("on" is quoted
# because plain PyYAML reads the key as True; the config loader keeps keys as written.)
EXAMPLE = """\
support_reply:
  description: Answer a customer question about an order.
  input:
    type: object
    properties: {order_id: {type: string}, question: {type: string}}
    required: [order_id, question]
  max_concurrency: 4
  steps:
    - id: order
      call: crm__order
      with: {id: "${.input.order_id}"}
      retry: {attempts: 3, backoff: 200ms, max_backoff: 5s, jitter: 0.2, "on": [timeout, unavailable]}
      timeout: 10s
      success: '.result.status != "unknown"'
      on_error: continue
      idempotency_key: "${.input.order_id}"
    - id: docs
      call: kb__search
      with: {query: "${.input.question}"}
      after: [order]
    - id: route
      switch:
        - when: '.steps.order.result.status == "failed"'
          steps: [{id: refund, call: billing__refund, with: {order: "${.input.order_id}"},
                   compensate: {call: billing__cancel_refund, with: {order: "${.input.order_id}"}}}]
      default: [{id: stop, fail: "order ${.input.order_id} cannot be refunded"}]
    - id: lines
      for_each: "${.steps.order.result.items}"
      as: line
      concurrency: 4
      steps: [{id: stock, call: inventory__check, with: {sku: "${.line.sku}"}}]
      output: "${.steps.stock.result}"
    - {id: compute, set: {total: "${.steps.order.result.total * 2}"}}
    - id: confirm
      ask_user: {message: "Refund ${.input.order_id}?", default: {ok: false},
                 schema: {type: object, properties: {ok: {type: boolean}}, required: [ok]}}
    - id: classify
      ask_model: {prompt: "Classify: ${.input.question}", system: Be brief., max_tokens: 200, default: other}
      on_error: [{id: guess, set: {label: other}}]
  output: {status: "${.steps.order.result.status}", answer: "${.steps.docs.result}"}
  output_schema: {type: object}
"""


def parse(text: str) -> dict[str, Workflow]:
    return WORKFLOWS.validate_python(yaml.safe_load(dedent(text)))


def workflow_with(step: Any) -> dict[str, Any]:
    return {"w": {"steps": [step]}}


def test_the_example_parses_into_steps_of_each_kind() -> None:
    workflow = parse(EXAMPLE)["support_reply"]

    assert [type(step) for step in workflow.steps] == [
        CallStep,
        CallStep,
        SwitchStep,
        ForEachStep,
        SetStep,
        AskUserStep,
        AskModelStep,
    ]
    assert [step.kind for step in workflow.steps] == [
        "call",
        "call",
        "switch",
        "for_each",
        "set",
        "ask_user",
        "ask_model",
    ]
    assert workflow.description == "Answer a customer question about an order."
    assert workflow.input["required"] == ["order_id", "question"]
    assert workflow.max_concurrency == 4
    assert workflow.output == {"status": "${.steps.order.result.status}", "answer": "${.steps.docs.result}"}
    assert workflow.output_schema == {"type": "object"}


def test_a_call_step_keeps_its_arguments_raw_and_parses_its_options() -> None:
    order = parse(EXAMPLE)["support_reply"].steps[0]

    assert order == CallStep(
        id="order",
        call="crm__order",
        with_={"id": "${.input.order_id}"},
        retry=Retry(attempts=3, backoff=0.2, max_backoff=5.0, jitter=0.2, on=("timeout", "unavailable")),
        timeout=10.0,
        success='.result.status != "unknown"',
        on_error="continue",
        idempotency_key="${.input.order_id}",
    )
    assert order.model_dump(by_alias=True)["with"] == {"id": "${.input.order_id}"}


def test_nested_steps_parse_in_switch_branches_for_each_bodies_and_fallbacks() -> None:
    steps = parse(EXAMPLE)["support_reply"].steps
    route, lines, classify = steps[2], steps[3], steps[6]

    assert isinstance(route, SwitchStep)
    assert route.switch[0].when == '.steps.order.result.status == "failed"'
    assert route.switch[0].steps[0].compensate == CallSpec(
        call="billing__cancel_refund", with_={"order": "${.input.order_id}"}
    )
    assert route.default == (FailStep(id="stop", fail="order ${.input.order_id} cannot be refunded"),)
    assert isinstance(lines, ForEachStep)
    assert (lines.for_each, lines.as_, lines.concurrency) == ("${.steps.order.result.items}", "line", 4)
    assert lines.output == "${.steps.stock.result}"
    assert classify.on_error == (SetStep(id="guess", set={"label": "other"}),)


def test_ask_steps_parse_their_requests() -> None:
    steps = parse(EXAMPLE)["support_reply"].steps
    confirm, classify = steps[5], steps[6]

    assert isinstance(confirm, AskUserStep)
    assert confirm.ask_user.message == "Refund ${.input.order_id}?"
    assert confirm.ask_user.requested_schema == CONFIRM_SCHEMA
    assert confirm.ask_user.default == {"ok": False}
    assert isinstance(classify, AskModelStep)
    assert classify.ask_model == AskModel(
        prompt="Classify: ${.input.question}", system="Be brief.", max_tokens=200, default="other"
    )


def test_omitted_options_take_their_defaults() -> None:
    workflow = parse(
        """\
        w:
          steps:
            - {id: a, call: t, retry: {}}
            - {id: b, for_each: [1, 2], steps: [{id: c, set: {x: 1}}]}
            - {id: d, ask_user: {message: "Sure?"}}
            - {id: e, ask_model: {prompt: Hi}}
        """
    )["w"]
    a, b, d, e = workflow.steps

    assert workflow.max_concurrency == DEFAULT_MAX_CONCURRENCY
    assert workflow.input == {"type": "object"}
    assert (workflow.description, workflow.output, workflow.output_schema) == (None, None, None)
    assert isinstance(a, CallStep)
    assert (a.with_, a.after, a.timeout, a.success, a.on_error, a.compensate) == ({}, (), None, None, "fail", None)
    assert a.retry == Retry(
        attempts=DEFAULT_RETRY_ATTEMPTS,
        backoff=DEFAULT_BACKOFF,
        max_backoff=DEFAULT_MAX_BACKOFF,
        jitter=DEFAULT_JITTER,
        on=DEFAULT_RETRY_ON,
    )
    assert isinstance(b, ForEachStep)
    assert (b.for_each, b.as_, b.concurrency, b.output) == ([1, 2], "item", 1, None)
    assert isinstance(d, AskUserStep)
    assert (d.ask_user.requested_schema, d.ask_user.default) == (CONFIRM_SCHEMA, None)
    assert isinstance(e, AskModelStep)
    assert (e.ask_model.system, e.ask_model.max_tokens, e.ask_model.default) == (None, DEFAULT_MAX_TOKENS, None)


def test_durations_accept_numbers_and_units() -> None:
    retry = Retry.model_validate({"backoff": "1.5s", "max_backoff": "2m"})
    step = CallStep.model_validate({"id": "a", "call": "t", "timeout": 3})

    assert (retry.backoff, retry.max_backoff, step.timeout) == (1.5, 120.0, 3.0)


def test_keyword_fields_are_populated_by_name_or_by_alias() -> None:
    by_name = ForEachStep(id="l", for_each="${.x}", as_="row", steps=(SetStep(id="s", set={}),))
    by_alias = ForEachStep.model_validate(
        {"id": "l", "for_each": "${.x}", "as": "row", "steps": [{"id": "s", "set": {}}]}
    )

    assert by_name == by_alias
    assert by_alias.model_dump(by_alias=True)["as"] == "row"


def test_iter_steps_walks_nested_steps_with_their_locations() -> None:
    steps = parse(EXAMPLE)["support_reply"].steps

    assert [(location, step.id) for location, step in iter_steps(steps)] == [
        ("steps[0]", "order"),
        ("steps[1]", "docs"),
        ("steps[2]", "route"),
        ("steps[2].switch[0].steps[0]", "refund"),
        ("steps[2].default[0]", "stop"),
        ("steps[3]", "lines"),
        ("steps[3].steps[0]", "stock"),
        ("steps[4]", "compute"),
        ("steps[5]", "confirm"),
        ("steps[6]", "classify"),
        ("steps[6].on_error[0]", "guess"),
    ]


LOOP = {"steps": [{"id": "b", "set": {}}], "until": ".x", "max_iterations": 3}

INVALID_STEPS = [
    pytest.param({"id": "a"}, (0,), "step_kind", "exactly one of call, switch", id="no-kind"),
    pytest.param({"id": "a", "call": "t", "set": {}}, (0,), "step_kind", "it has call and set", id="two-kinds"),
    pytest.param("a", (0,), "value_error", "a step is a mapping", id="not-a-mapping"),
    pytest.param({"id": "1a", "call": "t"}, (0, "id"), "value_error", "not a step id", id="bad-id"),
    pytest.param({"id": "a b", "call": "t"}, (0, "id"), "value_error", "not a step id", id="id-with-space"),
    pytest.param({"call": "t"}, (0, "id"), "missing", "Field required", id="no-id"),
    pytest.param({"id": "a", "call": "t", "wiht": {}}, (0, "wiht"), "extra_forbidden", "", id="unknown-key"),
    pytest.param({"id": "a", "call": "t", "kind": "call"}, (0, "kind"), "extra_forbidden", "", id="kind-key"),
    pytest.param({"id": "a", "call": "a b"}, (0, "call"), "value_error", "not a tool name", id="bad-tool"),
    pytest.param(
        {"id": "a", "call": "t", "retry": {"attempts": 0}},
        (0, "retry", "attempts"),
        "greater_than_equal",
        "",
        id="retry-attempts-0",
    ),
    pytest.param(
        {"id": "a", "call": "t", "retry": {"on": ["boom"]}}, (0, "retry", "on", 0), "literal_error", "", id="retry-on"
    ),
    pytest.param(
        {"id": "a", "call": "t", "retry": {"backoff": "10s", "max_backoff": "1s"}},
        (0, "retry"),
        "value_error",
        "longer than max_backoff",
        id="backoff-over-max",
    ),
    pytest.param({"id": "a", "call": "t", "timeout": "soon"}, (0, "timeout"), "value_error", "duration", id="timeout"),
    pytest.param(
        {"id": "a", "call": "t", "on_error": "ignore"}, (0, "on_error"), "literal_error", "'fail' or", id="on-error"
    ),
    pytest.param({"id": "a", "call": "t", "on_error": 1}, (0, "on_error"), "on_error", "fallback", id="on-error-int"),
    pytest.param({"id": "a", "wait": "soon"}, (0, "wait"), "value_error", "duration", id="wait-duration"),
    pytest.param({"id": "a", "wait": "-5s"}, (0, "wait"), "greater_than", "greater than 0", id="wait-negative"),
    pytest.param({"id": "a", "wait": [1]}, (0, "wait"), "wait", "a duration", id="wait-list"),
    pytest.param(
        {"id": "a", "wait": {"until": "next monday"}},
        (0, "wait", "until"),
        "value_error",
        "RFC 3339",
        id="wait-until-literal",
    ),
    pytest.param(
        {"id": "a", "wait": {"until": "2026-05-01T09:00:00"}},
        (0, "wait", "until"),
        "value_error",
        "UTC offset",
        id="wait-until-no-offset",
    ),
    pytest.param(
        {"id": "a", "call": "t", "on_error": {"default": 1, "value": 2}},
        (0, "on_error", "value"),
        "extra_forbidden",
        "Extra inputs",
        id="on-error-default-extra-key",
    ),
    pytest.param(
        {"id": "a", "call": "t", "on_error": {}},
        (0, "on_error", "default"),
        "missing",
        "required",
        id="on-error-default-missing",
    ),
    pytest.param(
        {"id": "a", "call": "t", "on_error": [{"id": "b"}]},
        (0, "on_error", 0),
        "step_kind",
        "exactly one of",
        id="fallback-without-kind",
    ),
    pytest.param({"id": "a", "switch": []}, (0, "switch"), "value_error", "at least one case", id="empty-switch"),
    pytest.param(
        {"id": "a", "switch": [{"when": ".x", "steps": [{"id": "b", "call": "t", "bad": 1}]}]},
        (0, "switch", 0, "steps", 0, "bad"),
        "extra_forbidden",
        "",
        id="nested-unknown-key",
    ),
    pytest.param(
        {"id": "a", "for_each": ".x", "as": "steps", "steps": [{"id": "b", "set": {}}]},
        (0, "as"),
        "value_error",
        "would hide .steps",
        id="loop-variable-hides-steps",
    ),
    pytest.param(
        {"id": "a", "for_each": ".x", "concurrency": 0, "steps": [{"id": "b", "set": {}}]},
        (0, "concurrency"),
        "greater_than_equal",
        "",
        id="concurrency-0",
    ),
    pytest.param(
        {"id": "a", "for_each": ".x", "steps": []}, (0, "steps"), "value_error", "at least one step", id="no-body"
    ),
    pytest.param(
        {"id": "a", "call": "t", "with": {"on": datetime.date(2024, 1, 1)}},
        (0, "with", "on"),
        "invalid-json-value",
        "",
        id="non-json-argument",
    ),
    pytest.param(
        {"id": "a", "ask_user": {"message": "m", "schema": {"type": "string"}}},
        (0, "ask_user", "schema"),
        "value_error",
        "type: object",
        id="ask-user-schema-not-object",
    ),
    pytest.param(
        {"id": "a", "loop": {"steps": [{"id": "b", "set": {}}], "until": ".x"}},
        (0, "loop", "max_iterations"),
        "missing",
        "Field required",
        id="loop-without-max-iterations",
    ),
    pytest.param(
        {"id": "a", "loop": {**LOOP, "max_iterations": 0}},
        (0, "loop", "max_iterations"),
        "greater_than_equal",
        "",
        id="loop-max-iterations-0",
    ),
    pytest.param(
        {"id": "a", "loop": {**LOOP, "backoff": 0.5}},
        (0, "loop", "backoff"),
        "greater_than_equal",
        "greater than or equal to 1",
        id="loop-backoff-below-1",
    ),
    pytest.param(
        {"id": "a", "loop": {**LOOP, "delay": "soon"}}, (0, "loop", "delay"), "value_error", "duration", id="loop-delay"
    ),
    pytest.param(
        {"id": "a", "loop": {**LOOP, "steps": []}},
        (0, "loop", "steps"),
        "value_error",
        "at least one step",
        id="loop-no-body",
    ),
    pytest.param(
        {"id": "a", "loop": {**LOOP, "steps": [{"id": "b", "call": "t", "bad": 1}]}},
        (0, "loop", "steps", 0, "bad"),
        "extra_forbidden",
        "",
        id="loop-body-unknown-key",
    ),
    pytest.param(
        {"id": "a", "for_each": ".x", "as": "last", "steps": [{"id": "b", "set": {}}]},
        (0, "as"),
        "value_error",
        "would hide .last",
        id="for-each-variable-hides-a-loops-last",
    ),
    pytest.param(
        {"id": "a", "ask_model": {"prompt": "p", "max_tokens": 0}},
        (0, "ask_model", "max_tokens"),
        "greater_than_equal",
        "",
        id="max-tokens-0",
    ),
]


@pytest.mark.parametrize(("step", "loc", "error_type", "fragment"), INVALID_STEPS)
def test_an_invalid_step_is_reported_at_its_location(
    step: Any, loc: tuple[Any, ...], error_type: str, fragment: str
) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        WORKFLOWS.validate_python(workflow_with(step))

    errors = caught.value.errors(include_url=False)
    assert [(strip_tags(error["loc"]), error["type"]) for error in errors] == [(("w", "steps", *loc), error_type)]
    assert fragment in errors[0]["msg"]


@pytest.mark.parametrize(
    ("workflows", "loc", "fragment"),
    [
        pytest.param({"w": {}}, ("w", "steps"), "Field required", id="no-steps"),
        pytest.param({"w": {"steps": []}}, ("w", "steps"), "at least one step", id="empty-steps"),
        pytest.param(
            {"bad name": {"steps": [{"id": "a", "set": {}}]}}, ("bad name", "[key]"), "not a tool name", id="name"
        ),
        pytest.param(
            {"x" * 65: {"steps": [{"id": "a", "set": {}}]}}, ("x" * 65, "[key]"), "not a tool name", id="long"
        ),
        pytest.param(
            {"w": {"input": {"type": "object", "required": "a"}, "steps": [{"id": "a", "set": {}}]}},
            ("w", "input"),
            "not a valid JSON Schema",
            id="bad-input-schema",
        ),
        pytest.param(
            {"w": {"max_concurrency": 0, "steps": [{"id": "a", "set": {}}]}},
            ("w", "max_concurrency"),
            "greater than or equal to 1",
            id="max-concurrency-0",
        ),
    ],
)
def test_an_invalid_workflow_is_reported_at_its_location(
    workflows: dict[str, Any], loc: tuple[Any, ...], fragment: str
) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        WORKFLOWS.validate_python(workflows)

    errors = caught.value.errors(include_url=False)
    assert [error["loc"] for error in errors] == [loc]
    assert fragment in errors[0]["msg"]


def test_models_are_frozen() -> None:
    step = CallStep(id="a", call="t")

    with pytest.raises(pydantic.ValidationError):
        step.call = "u"


def test_strip_tags_removes_only_union_tags() -> None:
    assert strip_tags(
        ("w", "steps", 0, "call", "on_error", "fallback", 1, "switch", "switch", 0, "steps", 2, "set")
    ) == (
        "w",
        "steps",
        0,
        "on_error",
        1,
        "switch",
        0,
        "steps",
        2,
    )
    assert strip_tags(("w", "steps", 0, "ask_user", "ask_user", "default")) == ("w", "steps", 0, "ask_user", "default")
