"""jq evaluations awaited on the event loop, in a bounded pool of worker processes.

The async side of :mod:`gateway.workflows._jqsafe`, with the same workers, limits and errors:
:class:`AsyncEvaluator` (``first``) waits for a worker's answer with ``anyio.wait_readable``, a
new worker's readiness too, so a program that runs for the whole time limit holds up nothing else;
it keeps up to :data:`POOL_SIZE` workers, so one slow program does not queue the others behind it.
A cancelled or late evaluation kills its worker (its answer would otherwise be read as the next
one's) and reaps it. The workflow runner and the access policy use it, through :func:`afirst` and
the expressions; the workflow engine uses neither (it asks the runner).
"""

import os
import time
from collections import deque
from typing import Any

import anyio

from gateway.workflows._jqsafe import (
    _STARTUP_LIMIT,
    MEMORY_LIMIT,
    TIME_LIMIT,
    JqTimeout,
    _answer,
    _Gone,
    _register,
    _request,
    _Stale,
    _Worker,
)
from gateway.workflows._jqworker import ANSWER, NO_MEMORY

__all__ = ["POOL_SIZE", "AsyncEvaluator", "afirst"]

POOL_SIZE = 2
"""Workers an :class:`AsyncEvaluator` runs at most: evaluations beyond that many wait for one."""

_ASYNC_SPIN = 30e-6  # seconds polled for an answer before waiting on the loop: polling holds up everything else


class AsyncEvaluator:
    """Evaluates jq programs for tasks on an event loop, in up to ``size`` workers; ``close()`` when done.

    Waiting never blocks the loop: a worker's answer is awaited with ``anyio.wait_readable``, a
    new worker's readiness too. A worker serves one evaluation at a time; an evaluation that finds
    every worker busy waits for one. A cancelled evaluation kills its worker (its answer would
    otherwise be read as the next one's). Used from event loops in one thread at a time.
    """

    def __init__(
        self, *, size: int = POOL_SIZE, time_limit: float = TIME_LIMIT, memory_limit: int = MEMORY_LIMIT
    ) -> None:
        self.size = size
        self.time_limit = time_limit
        self.memory_limit = memory_limit
        self._idle: list[_AsyncWorker] = []
        self._busy = 0
        self._waiters: deque[anyio.Event] = deque()
        _register(self)

    @property
    def pids(self) -> list[int]:
        """The process ids of the idle workers that are alive."""
        return [worker.pid for worker in self._idle if worker.alive]

    async def first(self, program: str, data: Any, default: Any = None) -> Any:
        """The first output of ``program`` over ``data``, or ``default`` if it has none.

        ``program`` is jq source known to compile. Raises JqError, or JqTimeout, JqOutOfMemory, JqAborted.
        """
        request = _request(program, data)
        worker = self._idle_worker() or await self._acquire()
        try:
            try:
                status, payload = await worker.ask_async(request, self.time_limit)
            except _Stale:  # it died between evaluations, killed from outside: once more, with a new one
                worker = await self._start()
                status, payload = await worker.ask_async(request, self.time_limit)
            if status == NO_MEMORY:
                worker.stop()  # a fresh one next time, rather than one that just failed to allocate
        finally:
            self._release(worker)
        return _answer(status, payload, default, self.memory_limit)

    def _idle_worker(self) -> "_AsyncWorker | None":
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                self._busy += 1
                return worker
        return None

    async def _acquire(self) -> "_AsyncWorker":
        while True:
            worker = self._idle_worker()
            if worker is not None:
                return worker
            if self._busy < self.size:
                self._busy += 1
                try:
                    return await self._start()
                except BaseException:
                    self._busy -= 1
                    self._wake()
                    raise
            waiter = anyio.Event()  # created here, so it belongs to this caller's event loop
            self._waiters.append(waiter)
            try:
                await waiter.wait()
            except BaseException:
                if waiter.is_set():  # woken, then cancelled before it took its turn: the next waiter's now
                    self._wake()
                else:
                    self._waiters.remove(waiter)
                raise

    async def _start(self) -> "_AsyncWorker":
        worker = _AsyncWorker(self.time_limit, self.memory_limit, wait=False)
        await worker.ready_async()
        return worker

    def _release(self, worker: "_AsyncWorker") -> None:
        self._busy -= 1
        if worker.alive:
            self._idle.append(worker)
        self._wake()

    def _wake(self) -> None:
        """A worker was freed (or a place to start one): let the longest waiter look again. One only:
        waking them all would cost O(waiters) per evaluation, O(n²) for a wide fan-out of jq steps."""
        if self._waiters:
            self._waiters.popleft().set()

    def close(self) -> None:
        """Stop the idle workers; the next evaluation starts others."""
        idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()

    def _after_fork(self) -> None:
        for worker in self._idle:
            worker.forget()
        self._idle, self._busy, self._waiters = [], 0, deque()


class _AsyncWorker(_Worker):
    """A worker whose readiness and answers are awaited on the event loop."""

    async def ready_async(self) -> None:
        """Wait on the event loop for the new worker to say it is ready. Raises JqAborted."""
        try:
            with anyio.fail_after(_STARTUP_LIMIT):
                await self._receive_async()
        except (TimeoutError, _Gone):
            raise self._not_started() from None
        except BaseException:
            self.stop()
            raise

    async def ask_async(self, request: bytes, time_limit: float) -> tuple[int, bytes]:
        """``ask``, waiting on the event loop instead of blocking it.

        Most answers come within microseconds: the request is written and the answer polled for
        ``_ASYNC_SPIN`` first, without a cancel scope or the event loop (each costs more than the
        evaluation); only then does it wait on the loop, within what is left of the time limit.
        """
        self._tail = b""
        started = time.monotonic()
        answer = bytearray()
        try:
            view = self._write(memoryview(request), len(request))
            if not view and (done := self._take(answer, _ASYNC_SPIN)) is not None:
                return done
            with anyio.fail_after(max(started + time_limit - time.monotonic(), 0)):
                while view:
                    await anyio.wait_writable(self._requests)
                    view = self._write(view, len(request))
                return await self._receive_async(answer)
        except TimeoutError:
            self.stop()
            raise JqTimeout(f"jq evaluation exceeded {time_limit:g} s") from None
        except _Gone:
            self.stop(kill=False)
            raise self._death(time_limit) from None
        except _Stale:
            self.stop(kill=False)
            raise
        except BaseException:  # cancelled mid-evaluation: its answer must not become the next one's
            self.stop()
            raise

    def _write(self, view: memoryview, size: int) -> memoryview:
        """Write what the pipe takes now; the rest. Raises _Stale (nothing of ``size`` bytes sent) or _Gone."""
        while view:
            try:
                view = view[os.write(self._requests, view) :]
            except BlockingIOError:
                break
            except BrokenPipeError:
                raise (_Stale("jq worker had exited") if len(view) == size else _Gone()) from None
        return view

    async def _receive_async(self, answer: bytearray | None = None) -> tuple[int, bytes]:
        answer = bytearray() if answer is None else answer
        while (done := self._take(answer, 0.0)) is None:
            await anyio.wait_readable(self._answers)  # stderr is read on the way (the worker never waits on it)
        return done

    def _take(self, answer: bytearray, spin: float) -> tuple[int, bytes] | None:
        """Read what has come, polling for up to ``spin`` seconds: the whole answer, or None. Raises _Gone."""
        spin_until = time.monotonic() + spin if spin else 0.0
        while True:
            if len(answer) >= ANSWER.size:
                status, size = ANSWER.unpack_from(answer)
                if len(answer) >= ANSWER.size + size:
                    return status, bytes(answer[ANSWER.size : ANSWER.size + size])
            ready = self._readable.poll(0)
            if not ready:
                if spin_until and time.monotonic() < spin_until:
                    continue
                return None
            for fd, _ in ready:
                if fd == self._errors:
                    self._read_errors()
                    continue
                chunk = os.read(self._answers, 1 << 16)
                if not chunk:
                    raise _Gone
                answer += chunk


_pool = AsyncEvaluator()


async def afirst(program: str, data: Any, default: Any = None) -> Any:
    """The first output of ``program`` over ``data`` from the shared pool, or ``default``. See AsyncEvaluator.first."""
    return await _pool.first(program, data, default)
