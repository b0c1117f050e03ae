"""Workflow runs as MCP tasks: a run's record in the wire shapes of each protocol era.

A client may ask for a workflow tool's call to run as a task; the call then starts the run detached
and answers at once with the task, which *is* the run (its id is the run id, its state the run's
record), for the client to poll. No SDK here: :class:`TaskMethods` answers the ``tasks/*`` methods in
wire form, and ``gateway.server`` routes them to it.

The two eras shape a task differently:

* **2025-11-25** (the core ``tasks`` utility): ``{taskId, status, statusMessage?, createdAt,
  lastUpdatedAt, ttl, pollInterval}``. A tool call whose result has ``isError`` ends ``failed``;
  ``tasks/result`` gives the call's result, with the task's id in
  ``_meta["io.modelcontextprotocol/related-task"]``.
* **2026-07-28** (the extension ``io.modelcontextprotocol/tasks``, SEP-2663): ``ttlMs`` and
  ``pollIntervalMs`` instead; ``tasks/get`` inlines the ``result`` once ``completed`` (an ``isError``
  result included) or the JSON-RPC ``error`` once ``failed`` (for protocol errors only).
"""

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from gateway.errors import TaskError
from gateway.store import RunRecord
from gateway.types import RELATED_TASK_META_KEY, TASKS_EXTENSION, JSONObject, Principal
from gateway.units import rfc3339

__all__ = [
    "PAGE_SIZE",
    "NOT_FOUND",
    "POLL_INTERVAL_MS",
    "RELATED_TASK_META_KEY",
    "TASKS_EXTENSION",
    "TaskMethods",
    "TaskRuns",
    "detailed_task",
    "extension_task",
    "is_finished",
    "page",
    "task_of",
    "task_result",
]

POLL_INTERVAL_MS = 1000
"""How often a client is asked to poll a task, in milliseconds."""
PAGE_SIZE = 100
"""Tasks per ``tasks/list`` page."""

NOT_FOUND = "Failed to retrieve task: Task not found"
"""The one answer for an unknown task and for another client's."""

_FINISHED = frozenset({"succeeded", "failed", "cancelled"})
_INTERNAL_ERROR = -32603
_T = TypeVar("_T")


class TaskRuns(Protocol):
    """The runs, as tasks need them (``gateway.workflows.runs.Runs``): each one only for its caller."""

    async def get(self, run_id: str, principal: Principal) -> RunRecord | None: ...

    async def wait(self, run_id: str, principal: Principal) -> RunRecord | None: ...

    async def cancel(self, run_id: str, principal: Principal) -> RunRecord | None: ...

    async def list(self, principal: Principal, *, tasks_only: bool = True) -> Sequence[RunRecord]: ...


class TaskMethods:
    """The ``tasks/*`` methods of both eras, in wire form, over the runs of the client asking.

    A task is the client's own: another client's task is not found, exactly as an unknown one is.
    """

    def __init__(self, runs: TaskRuns) -> None:
        self.runs = runs

    async def get(self, task_id: str, principal: Principal, *, modern: bool) -> dict[str, Any]:
        """``tasks/get``: the task now (2026-07-28: with its result or error once it has ended).

        Raises:
            TaskError: not found.
        """
        record = _found(await self.runs.get(task_id, principal))
        return detailed_task(record) if modern else task_of(record)

    async def result(self, task_id: str, principal: Principal) -> dict[str, Any]:
        """2025-11-25 ``tasks/result``: waits for the run to end, then gives what the call would have.

        Raises:
            TaskError: not found; or the run left no result (-32603: the call would have been an error).
        """
        record = _found(await self.runs.wait(task_id, principal))
        result = task_result(record)
        if result is None:
            message = record.error or f"the task ended {record.status} with no result"
            raise TaskError(message, code=_INTERNAL_ERROR)
        return result

    async def list(self, principal: Principal, cursor: str | None, also: Sequence[JSONObject] = ()) -> dict[str, Any]:
        """2025-11-25 ``tasks/list``: the client's tasks, most recent first, a page at a time; ``also``: more of
        its tasks (``Task`` wire form: its upstream tasks), merged in by creation time.

        Raises:
            TaskError: ``cursor`` is not one this method gave.
        """
        tasks: list[JSONObject] = [task_of(record) for record in await self.runs.list(principal)]
        if also:
            tasks = sorted([*tasks, *also], key=lambda task: _instant(task.get("createdAt")), reverse=True)
        try:
            chosen, following = page(tasks, cursor, PAGE_SIZE, key=lambda task: str(task["taskId"]))
        except ValueError as exc:
            raise TaskError(str(exc)) from None
        listed: dict[str, Any] = {"tasks": [dict(task) for task in chosen]}
        if following is not None:
            listed["nextCursor"] = following
        return listed

    async def cancel(self, task_id: str, principal: Principal, *, modern: bool) -> dict[str, Any]:
        """``tasks/cancel``: cancels the run, whose compensations have run when this returns. 2025-11-25
        answers with the task, and refuses one that has ended; 2026-07-28 acknowledges with nothing.

        Raises:
            TaskError: not found, or (2025-11-25) it has ended already.
        """
        record = _found(await self.runs.get(task_id, principal))
        if not is_finished(record):
            record = await self.runs.cancel(task_id, principal) or record
        elif not modern:
            status = task_of(record)["status"]
            raise TaskError(f"Cannot cancel task: already in terminal status {status!r}")
        return {} if modern else task_of(record)

    async def update(self, task_id: str, principal: Principal) -> dict[str, Any]:
        """2026-07-28 ``tasks/update``: acknowledged. A run's task never waits for input (a run asks its
        questions otherwise), so no response answers an outstanding request: each is ignored, as the
        extension says.

        Raises:
            TaskError: not found.
        """
        _found(await self.runs.get(task_id, principal))
        return {}


def _found(record: RunRecord | None) -> RunRecord:
    if record is None:
        raise TaskError(NOT_FOUND)
    return record


def is_finished(record: RunRecord) -> bool:
    """Whether the run has ended: its task is in a terminal status."""
    return record.status in _FINISHED


def task_of(record: RunRecord) -> dict[str, Any]:
    """The run as a 2025-11-25 ``Task`` (also what ``ToolResult.task`` carries): running and interrupted runs
    are ``working``; a finished run is ``completed``, or ``failed`` when its result is an error."""
    if record.status in ("running", "interrupted"):
        status = "working"
    elif record.status == "cancelled":
        status = "cancelled"
    elif record.status == "failed" or _is_error(record):
        status = "failed"
    else:
        status = "completed"
    return _task(record, status)


def task_result(record: RunRecord) -> dict[str, Any] | None:
    """What a 2025-11-25 ``tasks/result`` answers for a finished run: the ``CallToolResult`` it returned, tied to
    its task; None when it left no result (the answer is then a JSON-RPC error)."""
    if record.result is None:
        return None
    result = dict(record.result)
    result["_meta"] = {**(result.get("_meta") or {}), RELATED_TASK_META_KEY: {"taskId": record.run_id}}
    return result


def extension_task(task: JSONObject) -> dict[str, Any]:
    """A 2025-11-25 ``Task`` (:func:`task_of`) in the shape of the 2026-07-28 extension."""
    wire = {key: value for key, value in task.items() if key not in ("ttl", "pollInterval")}
    wire["ttlMs"] = task.get("ttl")
    if task.get("pollInterval") is not None:
        wire["pollIntervalMs"] = task["pollInterval"]
    return wire


def detailed_task(record: RunRecord) -> dict[str, Any]:
    """The run as the 2026-07-28 extension's ``tasks/get`` answers it: a finished run's result inlined
    (``completed``, even when the result is an error), or, if it left none, the error (``failed``)."""
    if record.status in ("running", "interrupted"):
        return extension_task(_task(record, "working"))
    if record.status == "cancelled":
        return extension_task(_task(record, "cancelled"))
    if record.result is not None:
        return {**extension_task(_task(record, "completed")), "result": dict(record.result)}
    error = {"code": _INTERNAL_ERROR, "message": record.error or "the workflow run failed"}
    return {**extension_task(_task(record, "failed")), "error": error}


def page(
    records: Sequence[_T],
    cursor: str | None,
    size: int,
    *,
    key: Callable[[_T], str] = lambda r: str(r.run_id),  # type: ignore[attr-defined]
) -> tuple[Sequence[_T], str | None]:
    """One page of ``records`` (most recent first) and the cursor of the next, if there is more.

    A cursor is the id (``key``) of the last task of the page before, so tasks created meanwhile do not shift
    pages.

    Raises:
        ValueError: ``cursor`` names no task in ``records``.
    """
    start = 0
    if cursor is not None:
        start = next((i + 1 for i, record in enumerate(records) if key(record) == cursor), -1)
        if start < 0:
            raise ValueError(f"unknown cursor: {cursor!r}")
    chosen = records[start : start + size]
    more = start + size < len(records)
    return chosen, (key(chosen[-1]) if more and chosen else None)


def _task(record: RunRecord, status: str) -> dict[str, Any]:
    task: dict[str, Any] = {
        "taskId": record.run_id,
        "status": status,
        "createdAt": rfc3339(record.started_at),
        "lastUpdatedAt": rfc3339(max(record.updated_at, record.finished_at or 0.0, record.started_at)),
        "ttl": _ttl(record),
        "pollInterval": POLL_INTERVAL_MS,
    }
    message = _status_message(record)
    if message is not None:
        task["statusMessage"] = message
    return task


def _ttl(record: RunRecord) -> int | None:
    """The retention the client asked for (the run is kept at least as long as the store keeps runs); None:
    unlimited."""
    ttl = (record.task or {}).get("ttl")
    return ttl if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl >= 0 else None


def _status_message(record: RunRecord) -> str | None:
    if record.status == "interrupted":
        why = f" ({record.note})" if record.note else ""
        return f"interrupted: the gateway running it stopped; it goes on when it is resumed{why}"
    if record.status in ("failed", "cancelled") and record.error:
        return record.error
    return None


def _is_error(record: RunRecord) -> bool:
    return bool(record.result is not None and record.result.get("isError"))


def _instant(iso: object) -> float:
    """An ISO 8601 time as seconds (0 for none or one that cannot be read), to order tasks of any origin."""
    try:
        return datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return 0.0
