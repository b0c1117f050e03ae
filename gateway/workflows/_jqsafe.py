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
whatever the program. Each side polls briefly before it sleeps (``_SPIN``, ``_WORKER_SPIN``), since two
wake-ups from sleep cost ≈40 µs on a 2-vCPU VM: a round trip, evaluation included, takes ≈14 µs then,
against ≈55 µs sleeping. Starting a worker takes ≈50 ms.

Two ways in: :class:`Evaluator` (``first``) blocks its thread while it waits, for config-time
and tests; :class:`AsyncEvaluator` (``afirst``) waits on the event loop (``anyio.wait_readable``),
so a program that runs for the whole time limit holds up nothing else, and keeps a small pool of
workers, so one slow program does not queue the others behind it. The workflow runner and the
access policy use the async one; the workflow engine uses neither (it asks the runner).

Errors: ``JqError`` (the program's own error, or input that is not JSON), with subclasses
``JqTimeout``, ``JqOutOfMemory`` and ``JqAborted`` for an evaluation the worker did not survive.
"""

import atexit
import json
import logging
import math
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from typing import Any

import anyio
import jq

__all__ = [
    "MEMORY_LIMIT",
    "POOL_SIZE",
    "TIME_LIMIT",
    "AsyncEvaluator",
    "Evaluator",
    "JqAborted",
    "JqError",
    "JqOutOfMemory",
    "JqTimeout",
    "afirst",
    "first",
]

logger = logging.getLogger(__name__)

TIME_LIMIT = 1.0
"""Seconds an evaluation may take, from sending its input to reading its output."""
MEMORY_LIMIT = 512 * 2**20
"""Bytes of address space the worker may use."""
POOL_SIZE = 2
"""Workers an :class:`AsyncEvaluator` runs at most: evaluations beyond that many wait for one."""

_STARTUP_LIMIT = 10.0  # seconds for a new worker to import jq and say so
_REAP_LIMIT = 5.0  # seconds for a worker to exit, once told to or killed
_STACK_LIMIT = 8 * 2**20  # the worker's C stack: converting an output nested ~100 000 deep overflows it
_SPIN = 200e-6  # seconds the caller polls for an answer before it sleeps (most come within 20 µs)
_ASYNC_SPIN = 30e-6  # the same, on the event loop: polling holds up everything else on it, so less
_WORKER_SPIN = 50e-6  # seconds the worker polls for the next request before it sleeps (steps of a chain)
_CACHE_SIZE = 4096  # compiled programs a worker keeps (≈4 KiB each; compiling one takes ≈1.5 ms)
_REQUEST = struct.Struct("<II")  # program and input lengths; then both, UTF-8
_ANSWER = struct.Struct("<BI")  # status and payload length; then the payload
_READY, _OUTPUT, _EMPTY, _ERROR, _NO_MEMORY = range(5)


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
        _evaluators.add(self)

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
        if status == _NO_MEMORY:
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
        self._idle: list[_Worker] = []
        self._busy = 0
        self._waiters: deque[anyio.Event] = deque()
        _evaluators.add(self)

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
            if status == _NO_MEMORY:
                worker.stop()  # a fresh one next time, rather than one that just failed to allocate
        finally:
            self._release(worker)
        return _answer(status, payload, default, self.memory_limit)

    def _idle_worker(self) -> "_Worker | None":
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                self._busy += 1
                return worker
        return None

    async def _acquire(self) -> "_Worker":
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
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _start(self) -> "_Worker":
        worker = _Worker(self.time_limit, self.memory_limit, wait=False)
        await worker.ready_async()
        return worker

    def _release(self, worker: "_Worker") -> None:
        self._busy -= 1
        if worker.alive:
            self._idle.append(worker)
        self._wake()

    def _wake(self) -> None:
        """Let every waiter look again (one that was cancelled meanwhile must not swallow the turn)."""
        while self._waiters:
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


class _Worker:
    """A worker process and our ends of its pipes. The Evaluator's lock serialises its use."""

    def __init__(self, time_limit: float, memory_limit: int, *, wait: bool = True) -> None:
        """Start the worker; with ``wait``, block until it is ready, else ``await ready_async()``."""
        self.alive = False
        self._memory_limit = memory_limit
        self._tail = b""  # the end of what the worker wrote to stderr during the current evaluation
        self._errors_open = True
        cpu_seconds = math.ceil(time_limit) + 1  # its own bound, should the gateway die mid-evaluation
        # -P: the script's directory (gateway/workflows) does not go on sys.path
        command = [sys.executable, "-P", __file__, str(memory_limit), str(cpu_seconds)]
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
            if len(answer) >= _ANSWER.size:
                status, size = _ANSWER.unpack_from(answer)
                if len(answer) >= _ANSWER.size + size:
                    return status, bytes(answer[_ANSWER.size : _ANSWER.size + size])
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
            if len(answer) >= _ANSWER.size:
                status, size = _ANSWER.unpack_from(answer)
                if len(answer) >= _ANSWER.size + size:
                    return status, bytes(answer[_ANSWER.size : _ANSWER.size + size])
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
    return b"".join((_REQUEST.pack(len(source), len(text)), source, text))


def _answer(status: int, payload: bytes, default: Any, memory_limit: int) -> Any:
    if status == _OUTPUT:
        try:
            return json.loads(payload)
        except RecursionError as exc:
            raise JqError("output nested too deeply") from exc
    if status == _EMPTY:
        return default
    if status == _NO_MEMORY:
        raise JqOutOfMemory(_out_of_memory(memory_limit))
    raise JqError(payload.decode(errors="replace"))


_evaluators: "weakref.WeakSet[Evaluator | AsyncEvaluator]" = weakref.WeakSet()


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


_pool = AsyncEvaluator()


async def afirst(program: str, data: Any, default: Any = None) -> Any:
    """``first`` from the shared pool, awaited without blocking the event loop. See AsyncEvaluator.first."""
    return await _pool.first(program, data, default)


# --- The worker process: ``python -P _jqsafe.py MEMORY_LIMIT CPU_SECONDS``. ---


def _serve(memory_limit: int, cpu_seconds: int) -> None:
    """Answer requests from stdin on stdout until stdin ends."""
    _limit(resource.RLIMIT_CORE, 0)  # an abort leaves no core file behind
    _limit(resource.RLIMIT_AS, memory_limit)
    _limit(resource.RLIMIT_STACK, _STACK_LIMIT)  # deep recursion in C crashes alike everywhere
    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)  # the protocol's pipes are not jq's stdin and stdout
    os.dup2(null, 1)
    os.set_blocking(2, False)  # `debug` output the gateway has not read yet is dropped, never waited on
    programs: OrderedDict[bytes, Any] = OrderedDict()
    answers.write(_ANSWER.pack(_READY, 0))
    answers.flush()
    incoming = select.poll()
    incoming.register(requests.fileno(), select.POLLIN)
    while True:
        # One request at a time (the caller waits for each answer), so none sits in the read buffer
        # unseen by poll; a request that follows at once is caught without sleeping.
        spin_until = time.monotonic() + _WORKER_SPIN
        while not incoming.poll(0) and time.monotonic() < spin_until:
            pass
        if len(header := requests.read(_REQUEST.size)) != _REQUEST.size:
            break
        program_size, input_size = _REQUEST.unpack(header)
        source, text = requests.read(program_size), requests.read(input_size)
        _limit(resource.RLIMIT_CPU, int(time.process_time()) + cpu_seconds)
        status, payload = _evaluate(programs, source, text)
        answers.write(_ANSWER.pack(status, len(payload)) + payload)
        answers.flush()


def _limit(kind: int, value: int) -> None:
    """Lower the soft limit ``kind`` to ``value``, or to the hard limit if that is lower."""
    hard = resource.getrlimit(kind)[1]
    resource.setrlimit(kind, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))


def _evaluate(programs: OrderedDict[bytes, Any], source: bytes, text: bytes) -> tuple[int, bytes]:
    try:
        program = programs.get(source)
        if program is None:
            program = programs[source] = jq.compile(source.decode())
            if len(programs) > _CACHE_SIZE:
                programs.popitem(last=False)
        else:
            programs.move_to_end(source)
        output = program.input_text(text.decode()).first()
        return _OUTPUT, json.dumps(output).encode()
    except StopIteration:
        return _EMPTY, b""
    except ValueError as exc:  # jq's errors, at run time (or compile time: the gateway compiled it first)
        return _ERROR, str(exc).encode()
    except RecursionError:
        return _ERROR, b"output nested too deeply"
    except MemoryError:
        return _NO_MEMORY, b""


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
