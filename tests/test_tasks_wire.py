"""``gateway.tasks``: a run's record as the task of each era (plain synchronous tests)."""

import pytest

from gateway.store import RunRecord
from gateway.tasks import RELATED_TASK_META_KEY, detailed_task, extension_task, page, task_of, task_result

STARTED = 1_767_225_600.0  # 2026-01-01T00:00:00Z
RESULT = {"content": [{"type": "text", "text": "ok"}], "isError": False, "structuredContent": {"ok": True}}
ERROR_RESULT = {"content": [{"type": "text", "text": "step 'b' failed"}], "isError": True}


def record(status: str = "running", run_id: str = "r1", **fields: object) -> RunRecord:
    values: dict[str, object] = {"updated_at": STARTED + 1.5, "task": {"ttl": 60000}, **fields}
    return RunRecord(run_id, "wf", status, STARTED, **values)  # type: ignore[arg-type]


def test_a_running_run_is_a_working_task_with_its_times_ttl_and_poll_interval() -> None:
    assert task_of(record()) == {
        "taskId": "r1",
        "status": "working",
        "createdAt": "2026-01-01T00:00:00.000Z",
        "lastUpdatedAt": "2026-01-01T00:00:01.500Z",
        "ttl": 60000,
        "pollInterval": 1000,
    }


def test_a_task_asked_without_a_ttl_has_an_unlimited_one() -> None:
    assert task_of(record(task={}))["ttl"] is None


def test_an_interrupted_run_is_working_and_says_why() -> None:
    task = task_of(record("interrupted", note="workflow 'wf' changed"))
    assert task["status"] == "working"
    assert "interrupted" in task["statusMessage"]
    assert "workflow 'wf' changed" in task["statusMessage"]


@pytest.mark.parametrize(
    ("status", "result", "legacy", "modern"),
    [
        ("succeeded", RESULT, "completed", "completed"),
        ("failed", ERROR_RESULT, "failed", "completed"),  # 2026-07-28: `failed` is for protocol errors only
        ("succeeded", ERROR_RESULT, "failed", "completed"),  # 2025-11-25: an isError result fails the task
        ("cancelled", ERROR_RESULT, "cancelled", "cancelled"),
        ("failed", None, "failed", "failed"),
    ],
)
def test_a_finished_run_has_the_status_each_era_gives_it(
    status: str, result: dict[str, object] | None, legacy: str, modern: str
) -> None:
    finished = record(status, result=result, error="boom" if status != "succeeded" else None)
    assert task_of(finished)["status"] == legacy
    assert detailed_task(finished)["status"] == modern


def test_the_2026_task_inlines_the_result_or_the_error() -> None:
    assert detailed_task(record("failed", result=ERROR_RESULT))["result"] == ERROR_RESULT
    failed = detailed_task(record("failed", error="the store went away"))
    assert failed["error"] == {"code": -32603, "message": "the store went away"}
    assert failed["statusMessage"] == "the store went away"
    assert "result" not in detailed_task(record())


def test_the_2026_shape_renames_ttl_and_poll_interval() -> None:
    task = extension_task(task_of(record()))
    assert (task["ttlMs"], task["pollIntervalMs"]) == (60000, 1000)
    assert "ttl" not in task
    assert "pollInterval" not in task


def test_the_task_result_is_the_calls_result_tied_to_its_task() -> None:
    result = task_result(record("succeeded", result={**RESULT, "_meta": {"io.patchbay/run": "r1"}}))
    assert result is not None
    assert result["structuredContent"] == {"ok": True}
    assert result["_meta"] == {"io.patchbay/run": "r1", RELATED_TASK_META_KEY: {"taskId": "r1"}}
    assert task_result(record("failed", error="boom")) is None


def test_pages_follow_the_last_task_of_the_page_before() -> None:
    records = [record(run_id=f"r{i}") for i in range(5)]
    first, cursor = page(records, None, 2)
    assert [r.run_id for r in first] == ["r0", "r1"]
    assert cursor == "r1"
    newer = [record(run_id="new"), *records]
    second, cursor = page(newer, cursor, 2)  # a task created meanwhile shifts nothing
    assert [r.run_id for r in second] == ["r2", "r3"]
    last, cursor = page(newer, cursor, 2)
    assert [r.run_id for r in last] == ["r4"]
    assert cursor is None
    with pytest.raises(ValueError, match="unknown cursor"):
        page(records, "gone", 2)
