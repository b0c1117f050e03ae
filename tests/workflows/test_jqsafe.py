"""The jq worker: no program or input can crash or freeze the caller, and the answers are jq's own."""

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import jq
import pytest
from anyio import wait_all_tasks_blocked

from gateway.workflows import _jqpool, _jqsafe
from gateway.workflows._jqpool import AsyncEvaluator
from gateway.workflows._jqsafe import Evaluator, JqAborted, JqError, JqOutOfMemory, JqTimeout
from gateway.workflows.expressions import ExpressionError, compile_condition, compile_value

WHERE = "workflows.w.steps.s.with.x"
LIMIT = 0.5
# The string doubles each round. In-process it takes all the memory it can, then libjq aborts the process.
DOUBLING = 'reduce range(.input.rounds) as $v (null; "\\({"q": .})")'
MISSING = object()


@pytest.fixture
def evaluator() -> Iterator[Evaluator]:
    evaluator = Evaluator(time_limit=LIMIT, memory_limit=128 * 2**20)
    yield evaluator
    evaluator.close()


def wait_for_exit(pid: int) -> None:
    """Until ``pid`` has exited, without reaping it (that is the evaluator's job)."""
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], 10)[0], f"process {pid} still running"
    finally:
        os.close(fd)


def assert_reaped(pid: int) -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# --- The gateway survives ---


def test_the_string_doubling_program_fails_its_step_and_the_process_survives() -> None:
    value = compile_value("${" + DOUBLING + "}", where=WHERE)

    with pytest.raises(ExpressionError) as caught:
        value.evaluate({"input": {"rounds": 60}})

    assert isinstance(caught.value.__cause__, JqTimeout)
    assert (caught.value.where, caught.value.source) == (WHERE, DOUBLING)
    assert compile_value("${.input.rounds + 1}", where=WHERE).evaluate({"input": {"rounds": 60}}) == 61


def test_the_string_doubling_program_runs_out_of_memory_when_given_the_time(evaluator: Evaluator) -> None:
    evaluator.time_limit = 30

    with pytest.raises(JqOutOfMemory):
        evaluator.first(DOUBLING, {"input": {"rounds": 60}})


@pytest.mark.parametrize(
    ("program", "data"),
    [
        pytest.param(".s * .n", {"s": "x", "n": 1e9}, id="libjq-allocation"),
        pytest.param(".s * .n", {"s": "x", "n": 4e7}, id="converting-the-output"),
    ],
)
def test_memory_sized_by_the_data_is_bounded(evaluator: Evaluator, program: str, data: Any) -> None:
    with pytest.raises(JqOutOfMemory):
        evaluator.first(program, data)

    assert evaluator.first(". + 1", 1) == 2


@pytest.mark.parametrize("program", ["def f: f; f", "last(range(1e12))", "until(false; .)"])
def test_an_endless_program_is_stopped_at_the_time_limit(evaluator: Evaluator, program: str) -> None:
    started = time.monotonic()

    with pytest.raises(JqTimeout):
        evaluator.first(program, None)

    assert time.monotonic() - started < LIMIT + 2


def test_an_endless_condition_fails_with_an_expression_error() -> None:
    condition = compile_condition("last(range(.input.n)) > 0", where=WHERE)

    with pytest.raises(ExpressionError) as caught:
        condition.holds({"input": {"n": 1e12}})

    assert isinstance(caught.value.__cause__, JqTimeout)


def test_a_crash_is_an_error_and_the_next_evaluation_gets_a_new_worker(evaluator: Evaluator) -> None:
    evaluator.first(".", None)
    crashed = evaluator.pid
    assert crashed is not None

    with pytest.raises(JqAborted):  # the binding's conversion of the output overflows the C stack
        evaluator.first("reduce range(.n) as $i (null; [.])", {"n": 100_000})

    assert evaluator.pid is None
    assert_reaped(crashed)
    assert evaluator.first(". + 1", 1) == 2
    assert evaluator.pid not in (None, crashed)


def test_a_late_worker_is_killed_and_reaped(evaluator: Evaluator) -> None:
    evaluator.first(".", None)
    late = evaluator.pid
    assert late is not None

    with pytest.raises(JqTimeout):
        evaluator.first("last(range(1e12))", None)

    assert_reaped(late)


def test_a_worker_killed_between_evaluations_is_replaced_without_failing_the_next(evaluator: Evaluator) -> None:
    evaluator.first(".", None)
    killed = evaluator.pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    wait_for_exit(killed)

    assert evaluator.first(". + 1", 1) == 2
    assert_reaped(killed)


def test_close_reaps_the_worker_and_the_next_evaluation_starts_another(evaluator: Evaluator) -> None:
    evaluator.first(".", None)
    closed = evaluator.pid
    assert closed is not None

    evaluator.close()

    assert evaluator.pid is None
    assert_reaped(closed)
    assert evaluator.first(". + 1", 1) == 2


# Python 3.12+ warns about fork() when other tests have left threads behind; this child only evaluates and exits.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_starts_its_own_worker(evaluator: Evaluator) -> None:
    evaluator.first(".", None)
    ours = evaluator.pid
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, which reports by its exit status
        code = 1
        try:
            code = 0 if evaluator.first(". + 1", 1) == 2 and evaluator.pid != ours else 1
            evaluator.close()
        finally:
            os._exit(code)
    wait_for_exit(child)

    assert os.waitpid(child, 0)[1] == 0
    assert evaluator.pid == ours
    assert evaluator.first(". + 2", 1) == 3


@pytest.mark.parametrize("interpreter", ["/bin/false", "/nonexistent/python"])
def test_a_worker_that_cannot_start_is_an_error(
    evaluator: Evaluator, monkeypatch: pytest.MonkeyPatch, interpreter: str
) -> None:
    monkeypatch.setattr(_jqsafe.sys, "executable", interpreter)

    with pytest.raises(JqAborted):
        evaluator.first(".", None)

    assert evaluator.pid is None


def test_lots_of_debug_output_does_not_stall_the_worker(evaluator: Evaluator) -> None:
    assert evaluator.first("[range(.n) | debug | stderr] | length", {"n": 100_000}) == 100_000


# --- Answers are jq's ---

DATA: dict[str, Any] = {
    "input": {"n": 3, "f": 1.5, "big": 12345678901234567890, "s": "hé ✓ 🎉", "tags": ["x", "y"], "none": None},
    "steps": {"a": {"result": {"items": [{"sku": "s1", "qty": 2}, {"sku": "s2", "qty": 1}]}, "error": None}},
}


@pytest.mark.parametrize(
    "program",
    [
        ".",
        ".input.n + 1",
        ".input.n / 2",
        ".input.f * 2",
        ".input.big",
        ".input.big + 1",
        "1e300",
        "-0",
        "infinite",
        "-infinite",
        "[.input.n, 1.0, 2.5e-8]",
        ".input.s",
        ".input.s | length",
        ".input.s | explode",
        '.input.tags | join("-")',
        ".input.none",
        ".missing.deeper",
        "empty",
        "false",
        "[.steps.a.result.items[] | .qty] | add",
        ".steps.a.result.items | map({(.sku): .qty}) | add",
        "{b: 1, a: 2} | keys_unsorted",
        ".input | to_entries | map(.key)",
        "[paths] | length",
        "tojson",
        ".input | @base64",
        '.input.s | test("✓")',
        "[limit(3; repeat(1))]",
        "first(range(10; 0; -3))",
        "$__loc__",
        ".input.s | ascii_downcase",
        'error("boom")',
        'error({"code": 7})',
        "error(null)",
        ".input.n | .[0]",
        ".input.tags + 1",
        "input",
        "halt",
        "halt_error",
        '"x" * 1e10',
        "[1] | .[1e9] = 1",
        "now | type",
    ],
)
def test_answers_are_those_of_jq_in_process(evaluator: Evaluator, program: str) -> None:
    got = answer(lambda: evaluator.first(program, DATA, MISSING))
    expected = answer(lambda: jq.compile(program).input_value(DATA).first())

    assert got == expected
    assert repr(got) == repr(expected)  # the same types too: int or float, the order of keys


def test_input_jq_cannot_parse_is_the_same_error(evaluator: Evaluator) -> None:
    data = {"odd": "\ud800"}  # a lone surrogate: JSON to Python, not to jq
    got = answer(lambda: evaluator.first(".", data))
    expected = answer(lambda: jq.compile(".").input_value(data).first())

    assert got == expected
    assert got[0] == "error"


def answer(evaluate: Callable[[], Any]) -> Any:
    """The output, MISSING for none, or the error's message."""
    try:
        return evaluate()
    except StopIteration:  # in-process jq's "no output"
        return MISSING
    except ValueError as exc:  # JqError is not one: the same message, through the worker
        return ("error", str(exc))
    except JqError as exc:
        return ("error", str(exc)) if type(exc) is JqError else exc


def test_input_that_is_not_json_is_a_jq_error(evaluator: Evaluator) -> None:
    with pytest.raises(JqError):
        evaluator.first(".", {"x": object()})


def test_the_shared_evaluator_serves_the_module_functions() -> None:
    assert _jqsafe.first(".a", {"a": [1]}) == [1]
    assert _jqsafe.first("empty", None, MISSING) is MISSING


# --- Threads ---


def test_threads_get_their_own_answers(evaluator: Evaluator) -> None:
    def evaluate(n: int) -> Any:
        try:
            return evaluator.first('if .n % 7 == 0 then error("seven") else {n: .n, twice: (.n * 2)} end', {"n": n})
        except JqError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(evaluate, n) for n in range(400)]
        answers = [future.result(timeout=30) for future in futures]

    assert answers == ["seven" if n % 7 == 0 else {"n": n, "twice": n * 2} for n in range(400)]


def test_threads_carry_on_past_a_timeout_and_a_crash(evaluator: Evaluator) -> None:
    programs = ["last(range(1e12))", "reduce range(.n) as $i (null; [.])", ". + 1"] * 3
    data = [None, {"n": 100_000}, 1] * 3

    def evaluate(program: str, data: Any) -> Any:
        try:
            return evaluator.first(program, data)
        except JqError as exc:
            return type(exc)

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(evaluate, program, item) for program, item in zip(programs, data, strict=True)]
        answers = [future.result(timeout=45) for future in futures]

    assert answers == [JqTimeout, JqAborted, 2] * 3


# --- The async path: the same bounds, awaited on the event loop. ---


@pytest.fixture
def pool() -> Iterator[AsyncEvaluator]:
    pool = AsyncEvaluator(time_limit=LIMIT, memory_limit=128 * 2**20)
    yield pool
    pool.close()


@pytest.mark.anyio
@pytest.mark.parametrize("program", [".a + 1", ".a | empty", "[.a, .a] | add", ".missing.x"])
async def test_async_answers_are_the_synchronous_ones(pool: AsyncEvaluator, evaluator: Evaluator, program: str) -> None:
    assert await pool.first(program, {"a": 1}, MISSING) == evaluator.first(program, {"a": 1}, MISSING)


@pytest.mark.anyio
async def test_an_async_evaluation_past_the_limit_kills_and_reaps_its_worker_and_the_next_gets_another(
    pool: AsyncEvaluator,
) -> None:
    await pool.first(".", None)
    [late] = pool.pids

    with pytest.raises(JqTimeout):
        await pool.first("last(range(1e12))", None)

    assert_reaped(late)
    assert pool.pids == []
    assert await pool.first(". + 1", 1) == 2
    assert pool.pids not in ([], [late])


@pytest.mark.anyio
async def test_an_async_crash_is_an_error_and_the_worker_is_reaped(pool: AsyncEvaluator) -> None:
    await pool.first(".", None)
    [crashed] = pool.pids

    with pytest.raises(JqAborted):
        await pool.first("reduce range(.n) as $i (null; [.])", {"n": 100_000})

    assert_reaped(crashed)
    assert await pool.first(". + 1", 1) == 2


@pytest.mark.anyio
async def test_a_cancelled_async_evaluation_kills_its_worker_and_the_loop_was_free_meanwhile(
    pool: AsyncEvaluator,
) -> None:
    await pool.first(".", None)
    [busy] = pool.pids
    ran: list[str] = []
    async with anyio.create_task_group() as tg:

        async def endless() -> None:
            await pool.first("last(range(1e12))", None)

        tg.start_soon(endless)
        await wait_all_tasks_blocked()  # it waits for its answer on the loop, not in a blocking read
        ran.append("the loop is free")
        tg.cancel_scope.cancel()

    assert ran == ["the loop is free"]
    assert_reaped(busy)
    assert await pool.first(". + 1", 1) == 2


@pytest.mark.anyio
async def test_two_slow_programs_run_at_once_and_a_third_waits_for_a_worker(pool: AsyncEvaluator) -> None:
    finished: list[str] = []

    async def evaluate(name: str, program: str) -> None:
        with pytest.raises(JqTimeout) if program.startswith("last") else contextlib.nullcontext():
            await pool.first(program, None)
        finished.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(evaluate, "slow 1", "last(range(1e12))")
        tg.start_soon(evaluate, "slow 2", "last(range(1e12))")
        await wait_all_tasks_blocked()
        tg.start_soon(evaluate, "quick", "1")
        await wait_all_tasks_blocked()
        assert finished == []  # the third waits: both workers are busy

    assert finished[0] != "quick"  # it got a worker once a slow one was stopped
    assert sorted(finished) == ["quick", "slow 1", "slow 2"]


def children() -> set[int]:
    """This process's child processes, zombies included (a worker killed and not reaped is one)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:  # it exited meanwhile
                continue
            if int(fields[1]) == os.getpid():
                found.add(int(entry))
    return found


@pytest.mark.anyio
async def test_an_evaluation_cancelled_while_its_worker_starts_leaves_no_process_and_frees_its_place() -> None:
    pool = AsyncEvaluator(size=1, time_limit=LIMIT)
    before = children()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.first, ". + 1", 1)
            await wait_all_tasks_blocked()  # its new worker is starting: ≈50 ms
            assert len(children() - before) == 1
            tg.cancel_scope.cancel()

        assert children() - before == set()  # killed and reaped
        with anyio.fail_after(10):  # its place in the pool of one is free again
            assert await pool.first(". + 1", 1) == 2
    finally:
        pool.close()


@pytest.mark.anyio
async def test_evaluations_waiting_for_a_worker_are_woken_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """100 evaluations queued on one worker: each freed worker wakes one waiter, not all (O(n²) wake-ups)."""
    waits = 0

    class Counted(anyio.Event):
        def __new__(cls) -> "Counted":
            nonlocal waits
            waits += 1
            return super().__new__(cls)  # type: ignore[return-value]

    pool = AsyncEvaluator(size=1, time_limit=LIMIT)
    try:
        await pool.first(".", None)
        monkeypatch.setattr(_jqpool.anyio, "Event", Counted)
        answers: list[int] = []

        async def evaluate(n: int) -> None:
            answers.append(await pool.first("reduce range(3000) as $i (.; . + 0) | . + 1", n))  # ≈1 ms

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for n in range(100):
                    tg.start_soon(evaluate, n)
        assert sorted(answers) == list(range(1, 101))
        assert waits <= 2 * 100
    finally:
        pool.close()


@pytest.mark.anyio
async def test_a_waiter_cancelled_before_its_turn_leaves_it_to_the_next() -> None:
    pool = AsyncEvaluator(size=1, time_limit=LIMIT)
    try:
        await pool.first(".", None)
        done: list[str] = []

        async def evaluate(name: str, program: str) -> None:
            with pytest.raises(JqTimeout) if program.startswith("last") else contextlib.nullcontext():
                await pool.first(program, None)
            done.append(name)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(evaluate, "slow", "last(range(1e12))")  # holds the one worker until the limit
                await wait_all_tasks_blocked()
                doomed = anyio.CancelScope()

                async def cancelled() -> None:
                    with doomed:
                        await evaluate("cancelled", "1")

                tg.start_soon(cancelled)
                await wait_all_tasks_blocked()
                tg.start_soon(evaluate, "next", "2")
                await wait_all_tasks_blocked()
                doomed.cancel()  # before its turn came: the turn goes to the next
        assert done == ["slow", "next"]
    finally:
        pool.close()
