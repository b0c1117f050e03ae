"""Run history for people: a run's timeline and the list of runs, as JSON and as text (``patchbay runs``).

Pure: it reads a :class:`~gateway.store.RunRecord` and the run's journal events, and returns plain
data that ``--json`` prints as it is, the ``patchbay://runs/<id>`` resource serves, and the text
renderers lay out. The journal keeps values unredacted (a resumed run needs them); everything here
that came from a call (the run's arguments, each step's arguments and result, errors, the output)
goes through ``redact`` first.

A step's story in the journal: ``step_started`` for each try (its tool and arguments), ``step_done``
when the try ended (its result or error), ``step_settled`` once the step reached its final state (``degraded``
when it succeeded with its ``on_error`` default: then it has both the default as its result and the failure).
A container or ``set`` step has no tries: only its ``step_settled``. An ``agent`` step's turns and tool calls are
its parts, each a step of its own in the timeline (``research#turn1``, ``research#call1``: their ``step_settled``
has ``part``), placed after it. Compensations are the steps whose
key ends ``#compensate``. A try in flight when the gateway stopped shows as ``interrupted`` once the run
resumed (``run_resumed``), and is followed by the try made again under the same number. A ``run_noted`` event
(a run on Temporal read without replaying it: :mod:`gateway.workflows.temporal_records`) adds to the timeline's note.
"""

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from gateway.store import RunRecord
from gateway.workflows.journal import JournalEvent

__all__ = ["Redact", "duration_text", "local_time", "render_rows", "render_timeline", "summary_rows", "timeline"]

Redact = Callable[[Any], Any]
"""A redacted, JSON-compatible copy of a value (:meth:`policies.redaction.Redactor.redact`)."""

COMPENSATE = "#compensate"
"""The suffix of a compensation's step key."""
SHOWN_CHARS = 300
"""Arguments, results and outputs longer than this (as JSON) are cut in the text timeline; ``--json`` has them whole."""


def local_time(at: float | None) -> str | None:
    """Wall-clock seconds as local ISO 8601 with the offset and milliseconds: ``2025-06-01T12:00:00.123+02:00``."""
    if at is None:
        return None
    return datetime.fromtimestamp(at).astimezone().isoformat(timespec="milliseconds")


def duration_text(ms: float | None) -> str:
    """A duration as people read it: ``4.2 ms``, ``340 ms``, ``1.2 s``, ``2 min 5 s``, ``1 h 2 min``; ``-``: unknown."""
    if ms is None:
        return "-"
    if ms < 10:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def _caller(record: RunRecord) -> str:
    return f"{record.caller_kind}:{record.caller_id}" if record.caller_kind else record.caller_id


def summary_rows(records: Iterable[RunRecord]) -> list[dict[str, Any]]:
    """One row per run, for ``patchbay runs``: id, workflow, status, caller, start, duration, the failed step."""
    return [
        {
            "run": record.run_id,
            "workflow": record.workflow,
            "status": record.status,
            "caller": _caller(record),
            "started": local_time(record.started_at),
            "duration_ms": record.duration_ms,
            "failed_step": record.failed_step,
        }
        for record in records
    ]


def timeline(record: RunRecord, events: Sequence[JournalEvent], redact: Redact) -> dict[str, Any]:
    """What happened in the run, step by step, in the order the steps started (redacted with ``redact``).

    ``steps`` holds each step key once, with its tries (``attempts``); ``compensations`` the calls that
    undid completed steps, in the order they ran; ``output`` the run's output once it succeeded,
    ``error`` its error once it failed.
    """
    steps: dict[str, dict[str, Any]] = {}
    compensations: dict[str, dict[str, Any]] = {}
    arguments: Any = None
    cancelled: str | None = None
    resumed: list[str | None] = []
    notes = [record.note] if record.note else []
    for event in events:
        if event.kind == "run_started":
            arguments = redact(event.data.get("arguments"))
        elif event.kind == "run_cancelled":
            cancelled = redact(event.data.get("message"))
        elif event.kind == "run_noted":
            notes.append(str(event.data.get("message")))
        elif event.kind == "run_resumed":
            resumed.append(local_time(event.at))
            for known in [*steps.values(), *compensations.values()]:
                for tried in known["attempts"]:
                    tried["status"] = tried["status"] or "interrupted"
        elif event.key is not None and event.kind in ("step_started", "step_done", "step_settled"):
            into = compensations if event.key.endswith(COMPENSATE) else steps
            entry = into.get(event.key)
            if entry is None:
                entry = into[event.key] = _step(event)
            _apply(entry, event, redact)
    for entry in [*steps.values(), *compensations.values()]:
        _close(entry, record)
    output, error = _ending(record, redact)
    ordered = _containers_first(list(steps.values()))
    return {
        "run": record.run_id,
        "workflow": record.workflow,
        "status": record.status,
        "caller": _caller(record),
        "started": local_time(record.started_at),
        "finished": local_time(record.finished_at),
        "duration_ms": record.duration_ms,
        "failed_step": record.failed_step,
        "note": "; ".join(notes) or None,
        "cancelled": cancelled,
        "resumed": resumed,
        "arguments": arguments,
        "steps": ordered,
        "compensations": [_compensation(entry) for entry in compensations.values()],
        "output": output,
        "error": error,
    }


def _containers_first(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``entries`` (in the order they first appeared) with each container (``for_each``, ``switch``: a key
    that prefixes others, ``each`` of ``each[0]/up``; an ``agent``, ``research`` of its turns and calls
    ``research#turn1``, ``research#call1``) moved before what it holds, and started when it did."""
    position: dict[str, float] = {entry["key"]: index for index, entry in enumerate(entries)}
    for entry in entries:
        heads = (entry["key"] + "[", entry["key"] + "/", entry["key"] + "#")
        inside = [other for other in entries if other["key"].startswith(heads)]
        if inside:
            position[entry["key"]] = min(position[other["key"]] for other in inside) - 0.5
            starts = [other["started"] for other in inside if other["started"] is not None]
            if starts and not entry["attempts"]:
                entry["started"] = min(starts)  # ISO times of one zone sort as they read
    return sorted(entries, key=lambda entry: (position[entry["key"]], entry["key"].count("/")))


def _step(event: JournalEvent) -> dict[str, Any]:
    data = event.data
    entry: dict[str, Any] = {"key": event.key, "step": data.get("step")}
    if "tool" in data:
        entry["tool"] = data["tool"]
    elif "kind" in data:
        entry["kind"] = data["kind"]
    entry.update(status=None, started=None, finished=None, duration_ms=None, attempts=[], result=None, error=None)
    entry["_at"] = {}  # each try's start, in seconds: removed by _close
    return entry


def _apply(entry: dict[str, Any], event: JournalEvent, redact: Redact) -> None:
    data = event.data
    if event.kind == "step_started":
        entry["step"] = entry["step"] or data.get("step")
        if entry.get("tool") is None and entry.get("kind") is None and "tool" in data:
            entry["tool"] = data["tool"]
        attempt: dict[str, Any] = {
            "attempt": event.attempt,
            "started": local_time(event.at),
            "finished": None,
            "duration_ms": None,
            "status": None,
            "error": None,
        }
        if "tool" in data:
            attempt["tool"] = data["tool"]
        if "arguments" in data:
            attempt["arguments"] = redact(data["arguments"])
        attempt["result"] = None
        entry["attempts"].append(attempt)
        entry["_at"][event.attempt] = event.at
        if entry["started"] is None:
            entry["started"] = local_time(event.at)
    elif event.kind == "step_done":
        tried = next((a for a in reversed(entry["attempts"]) if a["attempt"] == event.attempt), None)
        if tried is None:
            return
        error = data.get("error")
        tried["finished"] = local_time(event.at)
        began = entry["_at"].get(event.attempt)
        tried["duration_ms"] = round((event.at - began) * 1000, 3) if began is not None else None
        tried["status"] = "failed" if error else "succeeded"
        tried["error"] = _error(error, redact)
        tried["result"] = redact(data.get("result")) if not error else None
    else:  # step_settled
        entry["status"] = data.get("status")
        entry["finished"] = local_time(event.at)
        entry["duration_ms"] = data.get("duration_ms")
        entry["result"] = redact(data.get("result"))
        entry["error"] = _error(data.get("error"), redact)
        if data.get("degraded"):
            entry["degraded"] = True
        if entry["started"] is None:  # a step with no tries of its own: a container, a set, a skipped one
            entry["started"] = entry["finished"]


def _close(entry: dict[str, Any], record: RunRecord) -> None:
    """Tries with no outcome: cancelled once the step settled or the run finished, else still in flight
    (``interrupted`` when the run was)."""
    del entry["_at"]
    unfinished = "interrupted" if record.status == "interrupted" else "running"
    ended = entry["status"] is not None or record.finished_at is not None
    for attempt in entry["attempts"]:
        if attempt["status"] is None:
            attempt["status"] = "cancelled" if ended else unfinished
    if entry["status"] is None:
        entry["status"] = "cancelled" if record.finished_at is not None else unfinished


def _compensation(entry: dict[str, Any]) -> dict[str, Any]:
    """A compensation is one call: its try's outcome, flattened."""
    tries = entry.pop("attempts")
    last = tries[-1] if tries else {}
    entry["duration_ms"] = entry["duration_ms"] if entry["duration_ms"] is not None else last.get("duration_ms")
    entry["finished"] = last.get("finished") or entry["finished"]
    if "arguments" in last:
        entry["arguments"] = last["arguments"]
    entry["result"] = last.get("result") if entry["result"] is None else entry["result"]
    entry["error"] = entry["error"] or last.get("error")
    return entry


def _error(error: Any, redact: Redact) -> dict[str, Any] | None:
    if not isinstance(error, Mapping):
        return None
    shown = {"kind": error.get("kind"), "message": redact(error.get("message"))}
    if error.get("step"):
        shown["step"] = error["step"]
    return shown


def _ending(record: RunRecord, redact: Redact) -> tuple[Any, Any]:
    """The run's output (from its recorded result) and error."""
    if record.status == "failed" or record.status == "cancelled":
        return None, redact(record.error or _text(record.result))
    if record.status != "succeeded" or record.result is None:
        return None, None
    structured = record.result.get("structuredContent")
    if structured is not None:
        return redact(structured), None
    text = _text(record.result) or ""
    try:
        return redact(json.loads(text)), None
    except ValueError:
        return redact(text), None


def _text(result: Mapping[str, Any] | None) -> str | None:
    if result is None:
        return None
    content = result.get("content") or []
    return "".join(str(item.get("text", "")) for item in content if isinstance(item, Mapping)) or None


# --- Text. ---

_COLUMNS = (
    ("RUN", "run"),
    ("WORKFLOW", "workflow"),
    ("STATUS", "status"),
    ("CALLER", "caller"),
    ("STARTED", "started"),
    ("DURATION", "duration_ms"),
    ("FAILED STEP", "failed_step"),
)


def render_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """The runs as aligned columns (a header line, then one line per run); ``no runs`` when there are none."""
    if not rows:
        return "no runs\n"
    table = [[header for header, _ in _COLUMNS]]
    for row in rows:
        cells = []
        for _, field in _COLUMNS:
            value = row.get(field)
            if field == "duration_ms":
                cells.append(duration_text(value))
            elif field == "started":
                cells.append(_short_time(value))
            else:
                cells.append("-" if value is None or value == "" else str(value))
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n" for line in table)


def render_timeline(view: Mapping[str, Any]) -> str:
    """The timeline as text: the run, then each step with its tries, the compensations, and the output or error."""
    lines = [f"run {view['run']}  workflow {view['workflow']}  {view['status']}  caller {view['caller'] or '-'}"]
    lines.append(
        f"started {_short_time(view['started'])}"
        + (f", finished {_short_time(view['finished'])}" if view["finished"] else "")
        + f", took {duration_text(view['duration_ms'])}"
    )
    if view.get("failed_step"):
        lines.append(f"failed step: {view['failed_step']}")
    if view.get("note"):
        lines.append(f"note: {view['note']}")
    if view.get("cancelled"):
        lines.append(f"cancelled: {view['cancelled']}")
    lines.extend(f"resumed {_short_time(at)}" for at in view.get("resumed") or ())
    if view.get("arguments") is not None:
        lines.append(f"arguments: {_shown(view['arguments'])}")
    lines.append("")
    lines.append("steps:" if view["steps"] else "steps: none")
    widths = _head_widths([*view["steps"], *view["compensations"]])
    for step in view["steps"]:
        lines.extend(_step_lines(step, widths))
    if view["compensations"]:
        lines.append("compensations:")
        for compensation in view["compensations"]:
            lines.extend(_step_lines(compensation, widths))
    lines.append("")
    if view.get("error") is not None:
        lines.append(f"error: {_shown(view['error'])}")
    elif view.get("output") is not None:
        lines.append(f"output: {_shown(view['output'])}")
    return "\n".join(lines) + "\n"


def _head(step: Mapping[str, Any]) -> list[str]:
    """A step's line as columns: key, tool (or kind), status, start → end, duration, tries if several."""
    tries = step.get("attempts") or []
    return [
        str(step["key"]),
        str(step.get("tool") or step.get("kind") or ""),
        f"{step['status']} (degraded)" if step.get("degraded") else str(step["status"]),
        f"{_clock(step['started'])} → {_clock(step['finished'])}",
        duration_text(step["duration_ms"]),
        f"{len(tries)} attempts" if len(tries) > 1 else "",
    ]


def _head_widths(steps: Sequence[Mapping[str, Any]]) -> list[int]:
    heads = [_head(step) for step in steps]
    return [max((len(head[i]) for head in heads), default=0) for i in range(6)]


def _step_lines(step: Mapping[str, Any], widths: Sequence[int]) -> list[str]:
    tries = step.get("attempts") or []
    head = "  ".join(cell.ljust(width) for cell, width in zip(_head(step), widths, strict=True) if width)
    lines = ["  " + head.rstrip()]
    if len(tries) > 1:
        for tried in tries:
            why = f"  {_error_text(tried['error'])}" if tried.get("error") else ""
            lines.append(
                f"      attempt {tried['attempt']}  {_clock(tried['started'])} → {_clock(tried['finished'])}"
                f"  {duration_text(tried['duration_ms'])}  {tried['status']}{why}"
            )
    arguments = step["arguments"] if "arguments" in step else tries[-1].get("arguments") if tries else None
    if arguments is not None:
        lines.append(f"      arguments: {_shown(arguments)}")
    if step.get("error"):
        lines.append(f"      error: {_error_text(step['error'])}")
    if (step.get("degraded") or not step.get("error")) and step.get("result") is not None:
        lines.append(f"      result: {_shown(step['result'])}")
    return lines


def _error_text(error: Mapping[str, Any]) -> str:
    return f"{error.get('kind')}: {error.get('message')}"


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=False)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def _short_time(iso: str | None) -> str:
    """Local ISO time to the second, without the offset: ``2025-06-01 12:00:00``."""
    return iso[:19].replace("T", " ") if iso else "-"


def _clock(iso: str | None) -> str:
    """The time of day to the millisecond: ``12:00:00.123``."""
    return iso[11:23] if iso else "…"
