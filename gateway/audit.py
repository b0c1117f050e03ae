"""The audit trail: one redacted, structured record per call, written off the call path.

``build_record`` makes an :class:`AuditRecord` whose arguments and result are
already redacted. :class:`JsonlAuditSink` appends records to a JSON-lines file
from a writer task; ``record()`` only appends to a bounded queue, so a slow
disk never delays a call: a full queue drops and counts (``on_drop``, for a
metric), and a failed write is logged once per distinct error, its records
counted as dropped. The gateway keeps serving either way.

Two bounds keep the file's size in hand. A record whose line would pass
``max_record`` bytes has its largest parts cut to fit (``cut_line``): each cut
field (``arguments``, ``result``) becomes a string, the start of its JSON text
followed by ``…[cut: <kept> of <size> bytes]``, and the record gains
``"cut": {"<field>": <size>}``, the full size of each field cut. And once the
file reaches ``rotate_size`` bytes, the writer thread renames it ``<path>.1``
(shifting ``.1`` to ``.2`` and so on, the one past ``keep`` deleted) and opens a
new one, between two records: a record is never split or lost by rotation.

The queue is a deque woken by an ``anyio.Event``, not a memory object stream:
a stream hands an item straight to a waiting receiver and loses it if that
receiver is cancelled before it resumes (a shutdown right after a call).
"""

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import anyio
import orjson
from anyio.abc import TaskStatus

from gateway.policy_config import DEFAULT_AUDIT_KEEP, DEFAULT_AUDIT_MAX_RECORD, AuditConfig
from gateway.types import RUN_META_KEY, CallContext, ToolResult
from policies.redaction import DEFAULT_KEYS, Redactor

__all__ = [
    "AuditRecord",
    "AuditSink",
    "JsonlAuditSink",
    "NullAuditSink",
    "audit_redactor",
    "build_record",
    "cut_line",
]

logger = logging.getLogger(__name__)

DEFAULT_BUFFER = 10_000
DEFAULT_DRAIN_TIMEOUT = 5.0  # seconds a shutdown waits for buffered records to reach the disk
MAX_TEXT = 65_536  # text results and error messages are cut here: redaction scans all of it, on the call path
_MAX_BATCH = 1_000


def audit_redactor(config: AuditConfig) -> Redactor:
    """The redactor of the audit trail: the built-in keys and patterns and the configured ones. What shows
    recorded arguments and results elsewhere (``patchbay runs``, a run's resource) redacts with it too."""
    return Redactor((*DEFAULT_KEYS, *config.redact_keys), config.redact_patterns)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """What happened on one call. ``arguments`` and ``result`` are already redacted."""

    time: float
    """Wall clock when the call started, epoch seconds."""
    client: str
    """The principal's id."""
    client_kind: str
    tool: str
    """The registry name the caller used."""
    upstream: str
    """The provider it resolved to; "" when it did not resolve."""
    outcome: str
    """ok | error | invalid | denied | rate_limited | circuit_open | timeout | unavailable (as in the metrics)."""
    duration_ms: float
    decisions: tuple[str, ...]
    """Policy decisions in the order they were taken, e.g. ``refused by no-deletes (denied)`` (a rule's id)."""
    workflow_run: str | None
    workflow_step: str | None
    arguments: Any
    result: Any
    """structuredContent, else the text content (parsed when it is JSON), else the error message."""

    def json(self) -> str:
        """The record as one line of JSON (newlines inside strings are escaped)."""
        return _dumps({name: getattr(self, name) for name in _FIELDS})


_FIELDS = tuple(f.name for f in fields(AuditRecord))
_CUTTABLE = ("arguments", "result")


def _dumps(value: Any) -> str:
    # orjson: a record per call, and the stdlib takes ~5 µs for a typical one (mostly float repr), orjson ~0.5.
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # what orjson refuses and the stdlib writes: integers beyond 64 bits
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _size(text: str) -> int:
    """Bytes ``text`` takes in the file (as the writer encodes it)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", errors="backslashreplace"))


def cut_line(record: AuditRecord, limit: int) -> str:
    """The record's JSON line, its arguments and result cut so that it takes at most ``limit`` bytes.

    A record within the limit is serialized once and written as it is. Otherwise the larger field is cut first
    (the smaller one kept whole when it fits in half the room left), each cut field replaced by the start of its
    JSON text and the marker ``…[cut: <kept> of <size> bytes]``, and ``"cut"`` names each cut field's full size.
    The other fields are never cut: a record whose metadata alone passes the limit is written whole.
    """
    line = record.json()
    total = _size(line)
    if total <= limit:
        return line
    texts = {name: _dumps(getattr(record, name)) for name in _CUTTABLE}
    sizes = {name: _size(text) for name, text in texts.items()}
    room = max(0, limit - (total - sum(sizes.values())) - _CUT_OVERHEAD)
    small, large = sorted(_CUTTABLE, key=sizes.__getitem__)
    # Characters of JSON text kept per field, None: kept whole. Bytes ≥ characters, so this is an upper bound.
    keep: dict[str, int | None] = {small: None, large: room - sizes[small]}
    if sizes[small] > room // 2:
        keep = {small: room // 2, large: room - room // 2}
    keep = {name: None if kept is None else min(kept, len(texts[name])) for name, kept in keep.items()}
    values: dict[str, Any] = {name: getattr(record, name) for name in _FIELDS}
    for _ in range(8):  # each pass removes at least the excess (a character is at least a byte, escaped or not)
        cut: dict[str, int] = {}
        for name in _CUTTABLE:
            kept = keep[name]
            if kept is None:
                values[name] = getattr(record, name)
                continue
            start = texts[name][: max(0, kept)]
            values[name] = f"{start}…[cut: {_size(start)} of {sizes[name]} bytes]"
            cut[name] = sizes[name]
        values["cut"] = cut
        line = _dumps(values)
        excess = _size(line) - limit
        if excess <= 0:
            break
        # Take the excess from the field with the most text kept (a field kept whole is cut from now on).
        name = max(_CUTTABLE, key=lambda n: sizes[n] if keep[n] is None else keep[n] or 0)
        current = keep[name]
        keep[name] = max(0, min(len(texts[name]), len(texts[name]) if current is None else current) - excess)
        if all(keep[n] == 0 for n in _CUTTABLE):
            break
    return line


_CUT_OVERHEAD = 128  # bytes for the markers and the "cut" field, so that the first try usually fits


class AuditSink(Protocol):
    """Where records go. ``record`` is called on the call path, on the event loop thread."""

    def record(self, record: AuditRecord) -> None:
        """Take the record; never block, never raise."""
        ...


class NullAuditSink:
    """The sink when auditing is off."""

    def record(self, record: AuditRecord) -> None:
        pass


class JsonlAuditSink:
    """Appends records to a JSON-lines file from a writer task (``await tg.start(sink.run)``).

    ``write``, when given, replaces the file: it is called in a worker thread
    with a batch of complete lines (tests inject a slow or failing one); there is
    no rotation then. ``max_record`` (bytes, None: no cap) bounds each line,
    ``rotate_size`` (bytes, None: never) the file before it is rotated, keeping
    ``keep`` rotated files.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        buffer: int = DEFAULT_BUFFER,
        on_drop: Callable[[int], None] | None = None,
        write: Callable[[str], None] | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        max_record: int | None = DEFAULT_AUDIT_MAX_RECORD,
        rotate_size: int | None = None,
        keep: int = DEFAULT_AUDIT_KEEP,
    ) -> None:
        if buffer < 1:
            raise ValueError("the audit buffer must hold at least one record")
        if keep < 1:
            raise ValueError("rotation must keep at least one file")
        self.path = os.fspath(path)
        self.dropped = 0
        """Records lost so far: queue full, write failed, or sent after shutdown."""
        self._buffer = buffer
        self._on_drop = on_drop
        self._fd: int | None = None
        self._own_file = write is None
        self._write = write if write is not None else self._write_file
        self._drain_timeout = drain_timeout
        self._queue: deque[AuditRecord] = deque()
        self._wakeup: anyio.Event | None = None
        self._inflight: _Batch | None = None
        self._closed = False
        self._reported: set[str] = set()
        self._max_record = max_record
        self._rotate_size = rotate_size
        self._keep = keep
        self._size = 0  # bytes in the open file (its size at opening, plus what was written since)

    def record(self, record: AuditRecord) -> None:
        """Queue the record for the writer; when the queue is full or the sink closed, drop and count it."""
        if self._closed or len(self._queue) >= self._buffer:
            self._drop(1)
            return
        self._queue.append(record)
        if self._wakeup is not None:
            self._wakeup.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write queued records until cancelled, then drain the queue (shielded, bounded) and close the file.

        Raises:
            OSError: the file cannot be opened (reported at start-up, before ``started``).
        """
        if self._own_file:
            try:
                await anyio.to_thread.run_sync(self._open)
            except OSError:
                self._closed = True
                raise
        try:
            task_status.started()
            while True:
                if not self._queue:
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                await self._flush(self._take())
        finally:
            self._closed = True
            with anyio.CancelScope(shield=True, deadline=anyio.current_time() + self._drain_timeout) as scope:
                await self._drain()
            if scope.cancelled_caught:
                lost = len(self._queue) + (len(self._inflight.records) if self._inflight is not None else 0)
                self._queue.clear()
                logger.warning("audit log %s: shutdown drain timed out; %d records not written", self.path, lost)
                self._drop(lost)

    async def _drain(self) -> None:
        """Write everything still queued, in order, then close the file (inside the shutdown's shielded scope)."""
        pending = self._inflight
        if pending is not None:  # the batch the cancelled writer was handing to a thread
            if pending.claim():  # no thread took it: write it again with the rest
                self._queue.extendleft(reversed(pending.records))
            else:  # a thread is writing it: wait, so the file is not closed under it and nothing is written twice
                await anyio.to_thread.run_sync(pending.done.wait, abandon_on_cancel=True)
                self._settle(pending)
            self._inflight = None
        while self._queue:
            await self._flush(self._take())
        if self._fd is not None:
            # Reached only once no thread writes (every batch settled): closing cannot pull the descriptor from
            # under a write, whose reused number would send audit lines into some other file.
            await anyio.to_thread.run_sync(os.close, self._fd, abandon_on_cancel=True)
            self._fd = None

    async def _flush(self, records: Sequence[AuditRecord]) -> None:
        # abandon_on_cancel: a write stuck on a dead disk must not hold up shutdown; ``_inflight`` lets the drain
        # find the abandoned batch and either take it back or wait for it.
        batch = self._inflight = _Batch(records)
        await anyio.to_thread.run_sync(self._write_in_thread, batch, abandon_on_cancel=True)
        self._inflight = None
        self._settle(batch)

    def _write_in_thread(self, batch: "_Batch") -> None:
        """Serialize and write a batch, in a worker thread; failures are settled on the event loop."""
        if not batch.claim():  # the drain took the batch back before this thread started
            return
        try:
            limit = self._max_record
            lines = [(record.json() if limit is None else cut_line(record, limit)) + "\n" for record in batch.records]
            if self._own_file:
                self._write_lines(lines)
            else:
                self._write("".join(lines))
        # OSError: disk full, permissions. TypeError, ValueError: a hand-built record json cannot hold (a cycle).
        except (OSError, TypeError, ValueError) as exc:
            batch.error = exc
        finally:
            batch.done.set()

    def _settle(self, batch: "_Batch") -> None:
        """Count a finished batch's losses (on the event loop thread, where the counter lives)."""
        if batch.error is not None:
            self._report(batch.error, len(batch.records))
            self._drop(len(batch.records))

    def _take(self) -> list[AuditRecord]:
        return [self._queue.popleft() for _ in range(min(_MAX_BATCH, len(self._queue)))]

    def _open(self) -> None:
        # Owner-only: audit records hold sensitive data. Appending: earlier records are kept.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, flags, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _write_lines(self, lines: list[str]) -> None:
        """Write whole lines to the file, rotating it between two lines whenever it reaches ``rotate_size``."""
        data = "".join(lines).encode("utf-8", errors="backslashreplace")
        if self._rotate_size is None or self._size + len(data) < self._rotate_size:
            self._write_file(data)
            return
        chunk: list[bytes] = []
        for line in lines:
            chunk.append(line.encode("utf-8", errors="backslashreplace"))
            if self._size + sum(map(len, chunk)) >= self._rotate_size:
                self._write_file(b"".join(chunk))
                chunk.clear()
                self._rotate()
        if chunk:
            self._write_file(b"".join(chunk))

    def _write_file(self, data: bytes | str) -> None:
        # Straight to the descriptor: no user-space buffer, so each batch is flushed as it is written.
        assert self._fd is not None, "run() opens the file before any write"
        view = memoryview(data.encode("utf-8", errors="backslashreplace") if isinstance(data, str) else data)
        while view:
            written = os.write(self._fd, view)
            self._size += written
            view = view[written:]

    def _rotate(self) -> None:
        """``path`` → ``path.1`` → … → ``path.<keep>`` (the one there before is deleted), then a new ``path``.

        A failure is logged and the current file written on: the records matter more than the file's size.
        The new file is opened before the old descriptor is closed, so a failed open leaves one to write to.
        """
        try:
            for n in range(self._keep - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
            old = self._fd
            self._open()
        except OSError as exc:
            self._size = 0  # try again only after another ``rotate_size`` bytes, not on every record
            logger.error(
                "audit log %s: cannot rotate (%s: %s); writing on to the current file",
                self.path,
                type(exc).__name__,
                exc,
            )
            return
        if old is not None:
            os.close(old)

    def _report(self, exc: Exception, count: int) -> None:
        key = f"{type(exc).__name__}: {exc}"
        if key not in self._reported:  # once per distinct error: a full disk fails every batch
            self._reported.add(key)
            logger.error("audit log %s: %s; %d records dropped, and more until writes succeed", self.path, key, count)

    def _drop(self, count: int) -> None:
        self.dropped += count
        if count and self._on_drop is not None:
            self._on_drop(self.dropped)


class _Batch:
    """Records handed to a worker thread; exactly one of the thread and the shutdown drain ``claim``s them."""

    __slots__ = ("_token", "done", "error", "records")

    def __init__(self, records: Sequence[AuditRecord]) -> None:
        self.records = records
        self.done = threading.Event()
        self.error: Exception | None = None
        self._token = threading.Lock()  # acquired once, never released

    def claim(self) -> bool:
        return self._token.acquire(blocking=False)


def build_record(
    call_name: str,
    provider: str | None,
    context: CallContext,
    outcome: str,
    duration_s: float,
    decisions: Iterable[str],
    arguments: Any,
    result: ToolResult | None,
    error_text: str | None,
    redactor: Redactor,
) -> AuditRecord:
    """The audit record of a finished call, its arguments and result redacted.

    ``error_text``, when given, is what the record keeps as the result (the
    gateway's own account of a refused or failed call); otherwise the result's
    ``structuredContent``, else its text content (parsed when it is JSON, so
    keys such as ``password`` are found inside it).
    """
    return AuditRecord(
        time=time.time() - duration_s,
        client=context.principal.id,
        client_kind=context.principal.kind,
        tool=call_name,
        upstream=provider or "",
        outcome=outcome,
        duration_ms=duration_s * 1000,
        decisions=tuple(decisions),
        workflow_run=context.workflow_run or _run_of(result),
        workflow_step=context.workflow_step,
        arguments=redactor.redact(arguments),
        result=redactor.redact(_result_value(result, error_text)),
    )


def _run_of(result: ToolResult | None) -> str | None:
    """The run a workflow call's result names (the call of a workflow tool is audited with its run's id)."""
    run = result.meta.get(RUN_META_KEY) if result is not None and result.meta else None
    return run if isinstance(run, str) else None


def _result_value(result: ToolResult | None, error_text: str | None) -> Any:
    if error_text is not None or result is None:
        return None if error_text is None else _cut(error_text)
    if result.structured_content is not None:
        return result.structured_content
    if result.input_required is not None:
        return {"inputRequired": result.input_required}
    texts = [str(item.get("text", "")) for item in result.content if item.get("type") == "text"]
    others = [item.get("type", "?") for item in result.content if item.get("type") != "text"]
    text = _cut("\n".join(texts))
    parsed: Any = text
    if text.lstrip()[:1] in ("{", "["):
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
    # Images, audio and embedded resources are named, not copied: their payloads are large and opaque.
    return {"text": parsed, "other_content": others} if others else parsed


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else f"{text[:MAX_TEXT]}…[{len(text) - MAX_TEXT} more characters]"
