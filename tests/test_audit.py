"""The audit trail: redacted records, one JSON line each, written off the call path and never waited for."""

import errno
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.audit import MAX_TEXT, AuditRecord, JsonlAuditSink, NullAuditSink, audit_redactor, build_record, cut_line
from gateway.policy_config import AuditConfig
from gateway.types import RUN_META_KEY, CallContext, Principal, ToolResult
from policies.redaction import Redactor

pytestmark = pytest.mark.anyio

CANARY = "CANARY-7f3a9"
REDACTOR = Redactor(patterns=[r"CANARY-[0-9a-f]{5}"])
CONTEXT = CallContext(principal=Principal("support-bot"), workflow_run="run-1", workflow_step="lines[2]/stock")
ALL_FIELDS = {
    "time",
    "client",
    "client_kind",
    "tool",
    "upstream",
    "outcome",
    "duration_ms",
    "decisions",
    "workflow_run",
    "workflow_step",
    "arguments",
    "result",
}
SECRET_ARGUMENTS = {
    "password": CANARY,
    "query": f"orders of {CANARY}",
    "nested": [{"token": CANARY}, {"headers": {"Authorization": CANARY, "X-Api-Key": CANARY}}],
    "note": f"sent with Authorization: Bearer {CANARY}",
}


def record(n: int = 0, **changes: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "time": 1.0,
        "client": "c",
        "client_kind": "client",
        "tool": f"tool{n}",
        "upstream": "up",
        "outcome": "ok",
        "duration_ms": 1.0,
        "decisions": (),
        "workflow_run": None,
        "workflow_step": None,
        "arguments": {"n": n},
        "result": None,
    } | changes
    return AuditRecord(**fields)


def secret_record(result: ToolResult | None = None, error_text: str | None = None) -> AuditRecord:
    return build_record(
        "crm__order", "crm", CONTEXT, "ok", 0.25, ["access: allowed"], SECRET_ARGUMENTS, result, error_text, REDACTOR
    )


class Drops:
    """An ``on_drop`` callback that tests can wait on."""

    def __init__(self) -> None:
        self.totals: list[int] = []
        self._changed = anyio.Event()

    def __call__(self, total: int) -> None:
        self.totals.append(total)
        self._changed.set()
        self._changed = anyio.Event()

    async def reach(self, total: int) -> None:
        with anyio.fail_after(5):
            while not self.totals or self.totals[-1] < total:
                await self._changed.wait()


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_build_record_fills_every_field_from_the_call() -> None:
    result = ToolResult((), structured_content={"status": "shipped"})
    before = time.time()
    rec = build_record("crm__order", "crm", CONTEXT, "ok", 2.0, ["a", "b"], {"id": "7"}, result, None, REDACTOR)
    assert (rec.client, rec.client_kind, rec.tool, rec.upstream, rec.outcome) == (
        "support-bot",
        "client",
        "crm__order",
        "crm",
        "ok",
    )
    assert rec.duration_ms == 2000.0
    assert rec.decisions == ("a", "b")
    assert (rec.workflow_run, rec.workflow_step) == ("run-1", "lines[2]/stock")
    assert (rec.arguments, rec.result) == ({"id": "7"}, {"status": "shipped"})
    assert before - 2.0 <= rec.time <= time.time() - 2.0  # the call's start, on the wall clock


async def test_the_call_of_a_workflow_tool_is_audited_with_its_run_id() -> None:
    caller = CallContext(principal=Principal("support-bot"))
    result = ToolResult.text("done")
    ran = ToolResult((), structured_content={"ok": True}, meta={RUN_META_KEY: "run-9"})
    plain = build_record("w", "@workflows", caller, "ok", 0.1, (), {}, result, None, REDACTOR)
    workflow = build_record("w", "@workflows", caller, "ok", 0.1, (), {}, ran, None, REDACTOR)
    assert (plain.workflow_run, workflow.workflow_run, workflow.workflow_step) == (None, "run-9", None)


async def test_an_unresolved_call_has_an_empty_upstream() -> None:
    rec = build_record("nope", None, CONTEXT, "invalid", 0.0, (), {}, None, "Unknown tool", REDACTOR)
    assert (rec.upstream, rec.result) == ("", "Unknown tool")


@pytest.mark.parametrize(
    "result",
    [
        ToolResult((), structured_content={"user": {"password": CANARY}, "note": f"code {CANARY}"}),
        ToolResult.text(json.dumps({"session": {"token": CANARY}, "items": [{"api_key": CANARY}]})),
        ToolResult.text(f"logged in; Authorization: Bearer {CANARY}; bye"),
        ToolResult.text(f"PASSWORD={CANARY}\nUSER=bob"),
        ToolResult(({"type": "text", "text": f"see {CANARY}"}, {"type": "image", "data": CANARY})),
    ],
)
async def test_no_canary_planted_in_arguments_or_results_reaches_the_record(result: ToolResult) -> None:
    line = secret_record(result).json()
    assert CANARY not in line
    assert "\n" not in line
    assert set(json.loads(line)) == ALL_FIELDS


async def test_no_canary_in_an_error_message_reaches_the_record() -> None:
    rec = secret_record(ToolResult.text("ignored", is_error=True), f"upstream said: token={CANARY}")
    assert CANARY not in rec.json()
    assert rec.result == "upstream said: token=[REDACTED]"


async def test_a_json_text_result_is_recorded_parsed_and_non_text_content_only_named() -> None:
    rec = secret_record(ToolResult(({"type": "text", "text": '{"a": 1}'}, {"type": "image", "data": "AAAA"})))
    assert rec.result == {"text": {"a": 1}, "other_content": ["image"]}


async def test_a_huge_text_result_is_cut() -> None:
    rec = secret_record(ToolResult.text("x" * (MAX_TEXT + 10)))
    assert isinstance(rec.result, str)
    assert rec.result.startswith("x" * MAX_TEXT)
    assert len(rec.result) < MAX_TEXT + 100


async def test_records_are_written_one_json_line_each_with_no_canary(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path)
    async with anyio.create_task_group() as tg:
        await tg.start(sink.run)
        sink.record(secret_record(ToolResult.text(f"Bearer {CANARY}")))
        sink.record(record(1))
        sink.record(record(2, result="multi\nline"))
        tg.cancel_scope.cancel()
    assert CANARY not in path.read_text()
    lines = lines_of(path)
    assert [line["tool"] for line in lines] == ["crm__order", "tool1", "tool2"]
    assert all(set(line) == ALL_FIELDS for line in lines)
    assert lines[2]["result"] == "multi\nline"
    assert sink.dropped == 0


async def test_the_file_is_created_owner_only_and_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for n in range(2):
        sink = JsonlAuditSink(path)
        async with anyio.create_task_group() as tg:
            await tg.start(sink.run)
            sink.record(record(n))
            tg.cancel_scope.cancel()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [line["tool"] for line in lines_of(path)] == ["tool0", "tool1"]


async def test_records_queued_at_shutdown_are_drained_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path)
    for n in range(2_500):  # queued before the writer runs: more than one batch
        sink.record(record(n))
    async with anyio.create_task_group() as tg:
        await tg.start(sink.run)
        tg.cancel_scope.cancel()
    assert [line["tool"] for line in lines_of(path)] == [f"tool{n}" for n in range(2_500)]
    sink.record(record(9))  # after shutdown: counted, not raised
    assert sink.dropped == 1


async def test_a_stuck_writer_never_blocks_record_and_overflow_is_dropped_and_counted(tmp_path: Path) -> None:
    entered, release = threading.Event(), threading.Event()
    written: list[str] = []

    def stuck_write(text: str) -> None:
        entered.set()
        release.wait(5)
        written.append(text)

    drops = Drops()
    sink = JsonlAuditSink(tmp_path / "unused", buffer=2, on_drop=drops, write=stuck_write)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(sink.run)
            sink.record(record(0))
            with anyio.fail_after(5):
                assert await anyio.to_thread.run_sync(entered.wait, 5)
            for n in range(1, 6):  # the writer is stuck: two fit the buffer, three are dropped
                sink.record(record(n))
            assert sink.dropped == 3
            assert drops.totals == [1, 2, 3]
            release.set()
            tg.cancel_scope.cancel()
    finally:
        release.set()
    tools = [json.loads(line)["tool"] for text in written for line in text.splitlines()]
    assert tools == ["tool0", "tool1", "tool2"]


async def test_shutdown_with_a_dead_disk_is_bounded_and_counts_what_was_not_written(tmp_path: Path) -> None:
    entered, release = threading.Event(), threading.Event()

    def dead_write(text: str) -> None:
        entered.set()
        release.wait(5)

    sink = JsonlAuditSink(tmp_path / "unused", write=dead_write, drain_timeout=0.01)
    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                await tg.start(sink.run)
                sink.record(record(0))
                assert await anyio.to_thread.run_sync(entered.wait, 5)
                sink.record(record(1))
                sink.record(record(2))
                tg.cancel_scope.cancel()
    finally:
        release.set()
    assert sink.dropped == 3  # the two queued and the one stuck in the write: it may never reach the disk


async def test_write_errors_are_counted_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def full_disk(text: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    drops = Drops()
    sink = JsonlAuditSink(tmp_path / "unused", on_drop=drops, write=full_disk)
    with caplog.at_level(logging.DEBUG, logger="gateway.audit"):
        async with anyio.create_task_group() as tg:
            await tg.start(sink.run)
            sink.record(record(0))
            await drops.reach(1)
            sink.record(record(1))
            sink.record(record(2))
            await drops.reach(3)
            tg.cancel_scope.cancel()
    assert sink.dropped == 3
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


async def test_an_unopenable_file_fails_at_start(tmp_path: Path) -> None:
    sink = JsonlAuditSink(tmp_path / "missing-dir" / "audit.jsonl")
    async with anyio.create_task_group() as tg:
        with pytest.raises(FileNotFoundError):
            await tg.start(sink.run)
    sink.record(record())
    assert sink.dropped == 1


async def test_a_buffer_of_zero_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="buffer"):
        JsonlAuditSink(tmp_path / "a", buffer=0)


async def test_the_null_sink_takes_records_and_keeps_nothing() -> None:
    sink = NullAuditSink()
    sink.record(record())
    assert vars(sink) == {}


def test_a_record_with_an_integer_beyond_64_bits_is_still_written_whole() -> None:
    record = build_record(
        "t", "s", CallContext(principal=Principal("p")), "ok", 0.0, (), {"n": 2**70}, None, None, Redactor()
    )
    assert json.loads(record.json())["arguments"] == {"n": 2**70}


async def write(sink: JsonlAuditSink, records: list[AuditRecord]) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(sink.run)
        for rec in records:
            sink.record(rec)
        tg.cancel_scope.cancel()


async def test_a_two_megabyte_argument_is_cut_to_the_record_cap_and_the_cut_marked(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    blob = "é" + "x" * (2 * 2**20)
    await write(JsonlAuditSink(path, max_record=64 * 2**10), [record(arguments={"blob": blob}, result={"ok": True})])
    raw = path.read_bytes()
    assert len(raw) <= 64 * 2**10 + 1  # the line and its newline
    (line,) = lines_of(path)
    full = len(json.dumps({"blob": blob}, ensure_ascii=False, separators=(",", ":")).encode())
    assert line["cut"] == {"arguments": full}
    assert line["arguments"].startswith('{"blob":"éxxx')
    assert line["arguments"].endswith(f" of {full} bytes]")
    assert "…[cut: " in line["arguments"]
    assert line["result"] == {"ok": True}  # the small field is kept whole
    assert line["tool"] == "tool0"


async def test_both_fields_are_cut_when_both_are_large() -> None:
    rec = record(arguments=["a" * 100_000], result={"rows": ["b" * 10] * 20_000})
    line = cut_line(rec, 4096)
    assert len(line.encode()) <= 4096
    values = json.loads(line)
    assert set(values["cut"]) == {"arguments", "result"}
    assert values["arguments"].startswith('["aaa')
    assert values["result"].startswith('{"rows":["bbbbbbbbbb"')


async def test_a_record_within_the_cap_is_written_unchanged() -> None:
    rec = record(arguments={"q": "x" * 1000})
    assert cut_line(rec, 2048) == rec.json()


async def test_the_file_is_rotated_by_size_keeping_the_configured_number_of_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = [record(n) for n in range(100, 160)]  # numbers of one length: every line the same size
    size = len(records[0].json()) + 1
    sink = JsonlAuditSink(path, rotate_size=10 * size, keep=3)
    await write(sink, records)
    rotated = sorted(os.listdir(tmp_path))
    assert rotated == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    # Each rotated file holds whole records, exactly rotate_size bytes; the newest records are in the live file.
    assert [line["tool"] for line in lines_of(path)] == []  # the last rotation happened right after record 159
    assert [line["tool"] for line in lines_of(tmp_path / "audit.jsonl.1")] == [f"tool{n}" for n in range(150, 160)]
    assert [line["tool"] for line in lines_of(tmp_path / "audit.jsonl.3")] == [f"tool{n}" for n in range(130, 140)]
    for name in rotated:
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    assert sink.dropped == 0


async def test_rotation_counts_what_the_file_held_before_it_was_opened(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    size = len(record(100).json()) + 1
    await write(JsonlAuditSink(path, rotate_size=4 * size), [record(n) for n in range(100, 103)])
    assert not (tmp_path / "audit.jsonl.1").exists()
    await write(JsonlAuditSink(path, rotate_size=4 * size), [record(n) for n in range(103, 106)])
    assert [line["tool"] for line in lines_of(tmp_path / "audit.jsonl.1")] == [f"tool{n}" for n in range(100, 104)]
    assert [line["tool"] for line in lines_of(path)] == ["tool104", "tool105"]


async def test_the_audit_config_caps_and_rotates_by_default() -> None:
    config = AuditConfig.model_validate({"path": "a.jsonl"})
    assert (config.max_record, config.rotate_size, config.keep) == (64 * 2**10, 100 * 2**20, 5)
    config = AuditConfig.model_validate({"max_record": "8KiB", "rotate_size": "1MB", "keep": 2})
    assert (config.max_record, config.rotate_size, config.keep) == (8192, 1_000_000, 2)
    assert AuditConfig.model_validate({"rotate_size": None}).rotate_size is None


@pytest.mark.parametrize("settings", [{"max_record": "100B"}, {"keep": 0}, {"rotate_size": "0"}])
async def test_audit_bounds_that_cannot_work_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="audit|max_record|keep|rotate_size|greater"):
        AuditConfig.model_validate(settings)


CREDENTIALS = {
    "openai": "sk-proj-" + "a1B2c3D4e5" * 5,
    "anthropic": "sk-ant-api03-" + "a1B2c3D4e5_-" * 8,
    "github": "ghp_" + "a1B2c3D4e5F6" * 3,
    "slack": "xoxb-" + "1234567890-" + "a1B2c3D4e5F6" * 2,
    "aws": "AKIA" + "IOSFODNN7EXAMPLE",
    "pem": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg" + "kqhkiG9w0B" * 8 + "\n-----END PRIVATE KEY-----",
}


@pytest.mark.parametrize("credential", CREDENTIALS.values(), ids=CREDENTIALS.keys())
async def test_credential_shapes_are_redacted_from_records_whatever_the_config(credential: str) -> None:
    # The audit redactor is also what ``patchbay runs`` and a run's resource show recorded values through.
    redactor = audit_redactor(AuditConfig(redact_keys=("ssn",), redact_patterns=(r"CANARY-\d+",)))
    arguments = {"deploy": {"steps": [{"env": f"KEY {credential}"}]}, "id": "ord-7f3a9"}
    result = ToolResult((), structured_content={"out": [{"log": f"using {credential}"}], "id": "ord-7f3a9"})
    rec = build_record("t", "up", CONTEXT, "ok", 0.1, (), arguments, result, None, redactor)
    assert credential not in rec.json()
    assert rec.arguments == {"deploy": {"steps": [{"env": "KEY [REDACTED]"}]}, "id": "ord-7f3a9"}
    assert rec.result == {"out": [{"log": "using [REDACTED]"}], "id": "ord-7f3a9"}
