"""jq programs evaluated in a worker process, so that none can crash or freeze the gateway.

libjq cannot be bounded from inside the process that runs it (jq 1.8, binding ``jq`` 1.13):

* it aborts when an allocation fails (``jv_mem_alloc`` calls ``abort()``), so a program whose
  memory grows with its data (``[range(.n)]``, a string doubling in a ``reduce``) kills the process,
  or first takes all the machine's memory;
* a string reaching 2³¹ bytes makes ``jvp_string_append`` return an invalid value, which some callers
  (the JSON dumper behind ``tojson``, ``tostring`` and string interpolation; ``@html``, ``@csv``…)
  append to as if it were a string: an assertion in ``jvp_string_ptr`` aborts;
* the binding converts outputs to Python recursively in C: a value nested ~100 000 deep segfaults;
* the binding holds the GIL while jq runs, so ``last(range(1e12))`` stops every thread, for good.

So programs run, over pipes, in one persistent worker process limited by ``RLIMIT_AS``
(``MEMORY_LIMIT``, far below what that string needs) and ``RLIMIT_CPU``. The caller waits at most
``TIME_LIMIT`` for an answer; a worker that is late is killed, one that died is reaped, and the next
evaluation starts another. Isolation covers libjq's JSON parser too, which reads all of the input
whatever the program. The worker's own code and the protocol are :mod:`gateway.workflows._jqworker`.
Each side polls briefly before it sleeps (``_SPIN``, the worker's ``_WORKER_SPIN``), since two
wake-ups from sleep cost ≈40 µs on a 2-vCPU VM: a round trip, evaluation included, takes ≈14 µs then,
against ≈55 µs sleeping. Starting a worker takes ≈50 ms.

Two ways in: :class:`Evaluator` (``first``), here, blocks its thread while it waits, for config-time
and tests; :class:`~gateway.workflows._jqpool.AsyncEvaluator` (``afirst``) waits on the event loop in a
bounded pool of workers: the workflow runner and the access policy use it. The workflow engine uses
neither (it asks the runner).

Errors: ``JqError`` (the program's own error, or input that is not JSON), with subclasses
``JqTimeout``, ``JqOutOfMemory`` and ``JqAborted`` for an evaluation the worker did not survive.
"""

import atexit
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from typing import Any, Protocol

from gateway.workflows import _jqworker
from gateway.workflows._jqworker import ANSWER, EMPTY, NO_MEMORY, OUTPUT, REQUEST

__all__ = [
    "MEMORY_LIMIT",
    "TIME_LIMIT",
    "Evaluator",
    "JqAborted",
    "JqError",
    "JqOutOfMemory",
    "JqTimeout",
    "first",
]

logger = logging.getLogger(__name__)

TIME_LIMIT = 1.0
"""Seconds an evaluation may take, from sending its input to reading its output."""
MEMORY_LIMIT = 512 * 2**20
"""Bytes of address space the worker may use."""

_STARTUP_LIMIT = 10.0  # seconds for a new worker to import jq and say so
_REAP_LIMIT = 5.0  # seconds for a worker to exit, once told to or killed
_SPIN = 200e-6  # seconds the caller polls for an answer before it sleeps (most come within 20 µs)


class JqError(Exception):
    """The program raised an error (the message is jq's), or its input is not JSON."""


class JqTimeout(JqError):
    """The evaluation took longer than the time limit; the worker was killed."""


class JqOutOfMemory(JqError):
    """The evaluation needed more memory than the worker may use."""


class JqAborted(JqError):
    """The worker died during the evaluation (a libjq assertion, a segfault), or could not start."""


class _Stale(JqAborted):
    """The worker had died before the request reached it: killed from outside, between evaluations."""


class _Late(Exception):
    pass


class _Gone(Exception):
    pass


class Evaluator:
    """Evaluates jq programs in a worker process of its own, one at a time. Thread-safe; ``close()`` when done."""

    def __init__(self, *, time_limit: float = TIME_LIMIT, memory_limit: int = MEMORY_LIMIT) -> None:
        self.time_limit = time_limit
        self.memory_limit = memory_limit
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        _register(self)

    @property
    def pid(self) -> int | None:
        """The worker's process id; None before the first evaluation, after a failed one, and once closed."""
        worker = self._worker
        return worker.pid if worker is not None and worker.alive else None

    def first(self, program: str, data: Any, default: Any = None) -> Any:
        """The first output of ``program`` over ``data``, or ``default`` if it has none.

        ``program`` is jq source known to compile. Raises JqError, or JqTimeout, JqOutOfMemory, JqAborted.
        """
        request = _request(program, data)
        with self._lock:
            status, payload = self._ask(request)
        return _answer(status, payload, default, self.memory_limit)

    def _ask(self, request: bytes) -> tuple[int, bytes]:
        worker = self._running()
        try:
            status, payload = worker.ask(request, self.time_limit)
        except _Stale:  # it died between evaluations, killed from outside: once more, with a new one
            worker = self._running()
            status, payload = worker.ask(request, self.time_limit)
        if status == NO_MEMORY:
            worker.stop()  # a fresh one next time, rather than one that just failed to allocate
        return status, payload

    def _running(self) -> "_Worker":
        if self._worker is None or not self._worker.alive:
            self._worker = _Worker(self.time_limit, self.memory_limit)
        return self._worker

    def close(self) -> None:
        """Stop the worker; the next evaluation starts another."""
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None

    def _after_fork(self) -> None:
        """In a forked child: the worker is the parent's, and the lock may have been held by another thread."""
        self._lock = threading.Lock()
        if self._worker is not None:
            self._worker.forget()
            self._worker = None


class _Worker:
    """A worker process and our ends of its pipes. The Evaluator's lock serialises its use."""

    def __init__(self, time_limit: float, memory_limit: int, *, wait: bool = True) -> None:
        """Start the worker; with ``wait``, block until it is ready, else (``_jqpool``) await its ``ready_async()``."""
        self.alive = False
        self._memory_limit = memory_limit
        self._tail = b""  # the end of what the worker wrote to stderr during the current evaluation
        self._errors_open = True
        cpu_seconds = math.ceil(time_limit) + 1  # its own bound, should the gateway die mid-evaluation
        # -P: the script's directory (gateway/workflows) does not go on sys.path
        command = [sys.executable, "-P", _jqworker.__file__, str(memory_limit), str(cpu_seconds)]
        fds: list[int] = []
        try:
            for _ in range(3):
                fds.extend(os.pipe())
            requests_r, self._requests, self._answers, answers_w, self._errors, errors_w = fds
            # start_new_session: a Ctrl-C at the terminal is for the gateway, which stops the worker itself
            self._process = subprocess.Popen(
                command, stdin=requests_r, stdout=answers_w, stderr=errors_w, start_new_session=True
            )
        except OSError as exc:  # out of file descriptors or processes, no interpreter
            for fd in fds:
                os.close(fd)
            raise JqAborted(f"jq worker did not start: {exc}") from exc
        for fd in (requests_r, answers_w, errors_w):
            os.close(fd)
        self.alive = True
        self.pid = self._process.pid
        os.set_blocking(self._requests, False)
        os.set_blocking(self._errors, False)
        self._readable = select.poll()
        self._readable.register(self._answers, select.POLLIN)
        self._readable.register(self._errors, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(self._requests, select.POLLOUT)
        if wait:
            try:
                self._receive(time.monotonic() + _STARTUP_LIMIT)
            except (_Late, _Gone):
                raise self._not_started() from None

    def _not_started(self) -> JqAborted:
        self.stop()
        said = self._tail.decode(errors="replace").strip().splitlines()
        return JqAborted(f"jq worker did not start: {said[-1] if said else 'no answer'}")

    def ask(self, request: bytes, time_limit: float) -> tuple[int, bytes]:
        """Send a request, and return the answer's status and payload.

        Raises JqTimeout, JqOutOfMemory, JqAborted; the worker is then stopped.
        """
        deadline = time.monotonic() + time_limit
        self._tail = b""
        try:
            self._send(request, deadline)
            return self._receive(deadline)
        except _Late:
            self.stop()
            raise JqTimeout(f"jq evaluation exceeded {time_limit:g} s") from None
        except _Gone:
            self.stop(kill=False)  # it is exiting: its exit status says why
            raise self._death(time_limit) from None
        except _Stale:
            self.stop(kill=False)
            raise
        except BaseException:  # KeyboardInterrupt mid-evaluation: its answer must not become the next one's
            self.stop()
            raise

    def _send(self, request: bytes, deadline: float) -> None:
        view = memoryview(request)
        while view:
            try:
                view = view[os.write(self._requests, view) :]
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._writable.poll(math.ceil(remaining * 1000)):
                    raise _Late from None
            except BrokenPipeError:
                raise (_Stale("jq worker had exited") if len(view) == len(request) else _Gone()) from None

    def _receive(self, deadline: float) -> tuple[int, bytes]:
        answer = bytearray()
        while True:
            if len(answer) >= ANSWER.size:
                status, size = ANSWER.unpack_from(answer)
                if len(answer) >= ANSWER.size + size:
                    return status, bytes(answer[ANSWER.size : ANSWER.size + size])
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                raise _Late
            ready = self._readable.poll(0)
            spin_until = now + _SPIN  # waking from a sleep costs more than the evaluation itself
            while not ready and time.monotonic() < spin_until:
                ready = self._readable.poll(0)
            if not ready:
                ready = self._readable.poll(math.ceil(remaining * 1000))
            for fd, _ in ready:
                if fd == self._errors:
                    self._read_errors()
                    continue
                chunk = os.read(self._answers, 1 << 16)
                if not chunk:
                    raise _Gone
                answer += chunk

    def _read_errors(self) -> bool:
        """Read what the worker wrote to stderr (jq's ``debug``, its last words); False once there is no more."""
        try:
            chunk = os.read(self._errors, 1 << 16)
        except BlockingIOError:
            return False
        if not chunk:
            if self._errors_open:
                self._errors_open = False
                self._readable.unregister(self._errors)
            return False
        self._tail = (self._tail + chunk)[-4096:]
        logger.debug("jq worker: %s", chunk.decode(errors="replace").rstrip())
        return True

    def _death(self, time_limit: float) -> JqError:
        """Why the worker died, from its exit status and its last words."""
        code = self._process.returncode
        if b"cannot allocate memory" in self._tail or b"MemoryError" in self._tail:
            return JqOutOfMemory(_out_of_memory(self._memory_limit))
        if code == -signal.SIGXCPU:
            return JqTimeout(f"jq evaluation exceeded {time_limit:g} s")
        try:
            reason = signal.Signals(-code).name if code is not None and code < 0 else f"exit status {code}"
        except ValueError:
            reason = f"signal {-code}"
        return JqAborted(f"jq aborted ({reason})")

    def stop(self, *, kill: bool = True) -> None:
        """Kill the worker (or let it exit), reap it, and close the pipes."""
        if not self.alive:
            return
        self.alive = False
        if kill:
            self._process.kill()
        try:
            self._process.wait(_REAP_LIMIT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            try:
                self._process.wait(_REAP_LIMIT)
            except subprocess.TimeoutExpired:
                logger.warning("jq worker %d did not exit after SIGKILL", self.pid)
        while self._read_errors():
            pass
        self._close_pipes()

    def close(self) -> None:
        """Ask the worker to exit (its input ends), then reap it."""
        if self.alive:
            os.close(self._requests)
            self._requests = -1
            self.stop(kill=False)

    def forget(self) -> None:
        """In a forked child: close our copies of the pipes, leave the worker alone."""
        if self.alive:
            self.alive = False
            self._close_pipes()
            self._process.poll()  # ECHILD: not ours to reap, and Popen records it as done

    def _close_pipes(self) -> None:
        for fd in (self._requests, self._answers, self._errors):
            if fd >= 0:
                os.close(fd)
        self._requests = self._answers = self._errors = -1


def _out_of_memory(limit: int) -> str:
    return f"jq evaluation ran out of memory (limit {limit // 2**20} MiB)"


def _request(program: str, data: Any) -> bytes:
    try:
        text = json.dumps(data).encode()  # what the binding's input_value would give jq
    except (TypeError, ValueError, RecursionError) as exc:  # not JSON, circular, nested too deep
        raise JqError(str(exc)) from exc
    source = program.encode()
    return b"".join((REQUEST.pack(len(source), len(text)), source, text))


def _answer(status: int, payload: bytes, default: Any, memory_limit: int) -> Any:
    if status == OUTPUT:
        try:
            return json.loads(payload)
        except RecursionError as exc:
            raise JqError("output nested too deeply") from exc
    if status == EMPTY:
        return default
    if status == NO_MEMORY:
        raise JqOutOfMemory(_out_of_memory(memory_limit))
    raise JqError(payload.decode(errors="replace"))


class _Evaluator(Protocol):
    def close(self) -> None: ...

    def _after_fork(self) -> None: ...


_evaluators: "weakref.WeakSet[_Evaluator]" = weakref.WeakSet()


def _register(evaluator: _Evaluator) -> None:
    """Have ``evaluator`` closed at exit, and its workers forgotten in a forked child."""
    _evaluators.add(evaluator)


def _close_all() -> None:
    for evaluator in list(_evaluators):
        evaluator.close()


def _after_fork() -> None:
    for evaluator in list(_evaluators):
        evaluator._after_fork()


atexit.register(_close_all)
os.register_at_fork(after_in_child=_after_fork)

_default = Evaluator()


def first(program: str, data: Any, default: Any = None) -> Any:
    """The first output of ``program`` over ``data`` from the shared worker, or ``default``. See Evaluator.first."""
    return _default.first(program, data, default)
