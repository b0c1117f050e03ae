"""The ``loop`` step in the engine: iterations until a condition holds, delays as timers, failure, cancellation,
compensation and restore. Pure: events in, commands out (the jq programs run by the Driver, as the runner does)."""

from typing import Any

import pytest

from gateway.workflows.commands import CallTool, Finished, Iterated, StartTimer, StepError
from tests.workflows.test_engine import Driver, no_jq_here

__all__ = ["no_jq_here"]  # the autouse fixture: no jq runs in the engine here either

POLL = """
steps:
  - {id: start, call: t__start}
  - id: poll
    loop:
      steps:
        - {id: status, call: t__status, with: {job: "${.steps.start.result.job}", n: "${.iteration}", last: "${.last}"}}
      until: .steps.status.result.state == "done"
      max_iterations: 4
  - {id: after, call: t__after, with: {final: "${.steps.poll.result}"}}
"""


def iterated(d: Driver) -> list[str]:
    return [c.describe() for c in d.log if isinstance(c, Iterated)]


def test_a_loop_runs_its_body_until_the_condition_holds_and_succeeds_with_that_iterations_output() -> None:
    d = Driver(POLL)
    d.ok("start", {"job": "J"})
    assert d.in_flight["poll[1]/status"].arguments == {"job": "J", "n": 1, "last": None}  # type: ignore[union-attr]
    d.ok("poll[1]/status", {"state": "queued"})
    assert d.timers == {}  # no delay: the next iteration starts at once
    assert d.in_flight["poll[2]/status"].arguments == {  # type: ignore[union-attr]
        "job": "J",
        "n": 2,
        "last": {"state": "queued"},
    }
    d.ok("poll[2]/status", {"state": "done", "rows": 3})
    assert d.settled["poll"] == "succeeded"
    assert d.in_flight["after"].arguments == {"final": {"state": "done", "rows": 3}}  # type: ignore[union-attr]
    assert iterated(d) == [
        "poll: iteration 1 of at most 4, the condition does not hold yet",
        "poll: iteration 2 of at most 4, the condition holds",
    ]
    assert d.run.plan.total_steps is None  # how many steps settle is not known beforehand


def test_iteration_and_last_are_readable_in_the_body_the_condition_and_the_output() -> None:
    d = Driver("""
steps:
  - id: count
    loop:
      steps: [{id: step, set: {n: "${.iteration}", before: "${.last}"}}]
      until: .last.total >= 6 and .iteration == 3
      max_iterations: 5
      output: {total: "${(.last.total // 0) + .steps.step.result.n}", at: "${.iteration}"}
""")
    assert d.finished == Finished("succeeded", {"count": {"total": 6, "at": 3}})
    assert [c.result for c in d.log if getattr(c, "step", None) == "step" and hasattr(c, "status")] == [
        {"n": 1, "before": None},
        {"n": 2, "before": {"total": 1, "at": 1}},
        {"n": 3, "before": {"total": 3, "at": 2}},
    ]


def test_a_loop_whose_condition_never_holds_fails_after_max_iterations() -> None:
    d = Driver("""
steps:
  - id: poll
    loop: {steps: [{id: s, call: t}], until: .steps.s.result == "done", max_iterations: 2}
""")
    d.ok("poll[1]/s", "no")
    d.ok("poll[2]/s", "no")
    message = "the condition '.steps.s.result == \"done\"' did not hold after 2 iterations"
    assert d.finished == Finished("failed", error=StepError("error", message, "poll"))
    assert iterated(d)[-1] == "poll: iteration 2 of at most 2, the condition does not hold"


@pytest.mark.parametrize(
    ("on_error", "output"),
    [({"default": "gave up"}, {"poll": "gave up", "next": 1}), ("continue", {"next": 1})],
)
def test_a_loop_that_ran_out_of_iterations_is_handled_by_its_on_error(on_error: Any, output: Any) -> None:
    d = Driver(
        f"""
steps:
  - id: poll
    loop: {{steps: [{{id: s, call: t}}], until: .steps.s.result == "done", max_iterations: 1}}
    on_error: {on_error!r}
  - {{id: next, call: t, after: [poll]}}
""".replace("'", '"')
    )
    d.ok("poll[1]/s", "no")
    d.ok("next", 1)
    assert d.finished == Finished("succeeded", output)


def test_a_loop_with_retry_starts_over_from_the_first_iteration() -> None:
    d = Driver("""
steps:
  - id: poll
    loop: {steps: [{id: s, call: t, with: {n: "${.iteration}"}}], until: .steps.s.result == "done", max_iterations: 2}
    retry: {attempts: 2, backoff: 1s, jitter: 0}
""")
    d.ok("poll[1]/s", "no")
    d.ok("poll[2]/s", "no")
    assert d.timers == {"poll#retry": 1.0}
    d.fire("poll#retry")
    assert d.in_flight["poll[1]/s"].arguments == {"n": 1}  # type: ignore[union-attr]
    d.ok("poll[1]/s", "done")
    assert d.finished == Finished("succeeded", {"poll": "done"})


def test_the_delay_between_iterations_is_a_timer_growing_by_the_backoff_up_to_max_delay() -> None:
    d = Driver("""
steps:
  - id: poll
    loop:
      steps: [{id: s, call: t}]
      until: .steps.s.result == "done"
      max_iterations: 5
      delay: 2s
      backoff: 3
      max_delay: 10s
""")
    seconds = []
    for n in range(1, 5):
        d.ok(f"poll[{n}]/s", "no")
        [timer] = [c for c in d.log if isinstance(c, StartTimer)][n - 1 :]
        assert timer.key == "poll#delay"
        seconds.append(timer.seconds)
        assert f"poll[{n + 1}]/s" not in d.in_flight  # not before the timer fires
        d.fire("poll#delay")
    assert seconds == [2.0, 6.0, 10.0, 10.0]
    d.ok("poll[5]/s", "done")
    assert d.finished == Finished("succeeded", {"poll": "done"})


def test_a_loop_whose_condition_holds_at_once_starts_no_timer() -> None:
    d = Driver(
        "steps: [{id: poll, loop: {steps: [{id: s, set: {v: 1}}], until: .steps.s.result.v == 1, "
        "max_iterations: 3, delay: 1h}}]"
    )
    assert [c for c in d.log if isinstance(c, StartTimer)] == []
    assert d.finished == Finished("succeeded", {"poll": {"v": 1}})


def test_cancelling_a_run_during_the_delay_finishes_it_at_once_and_compensates_each_iteration() -> None:
    d = Driver("""
steps:
  - id: poll
    loop:
      steps:
        - id: s
          call: t
          with: {n: "${.iteration}"}
          compensate: {call: undo, with: {n: "${.iteration}", r: "${.steps.s.result}"}}
      until: .steps.s.result == "done"
      max_iterations: 5
      delay: 1h
""")
    d.ok("poll[1]/s", "r1")
    d.fire("poll#delay")
    d.ok("poll[2]/s", "r2")
    assert d.timers == {"poll#delay": 3600.0}
    d.take(d.run.cancel("stop"))
    assert d.run.fire("poll#delay") == []  # dropped
    undo = [c for c in d.in_flight.values() if isinstance(c, CallTool) and c.compensation]
    assert [(c.key, c.arguments) for c in undo] == [("poll[2]/s#compensate", {"n": 2, "r": "r2"})]
    d.ok("poll[2]/s#compensate")
    assert d.in_flight["poll[1]/s#compensate"].arguments == {"n": 1, "r": "r1"}  # type: ignore[union-attr]
    d.ok("poll[1]/s#compensate")
    assert d.finished == Finished("failed", error=StepError("cancelled", "stop"))
    assert d.run.outstanding() == []


def test_cancelling_a_run_mid_iteration_cancels_the_body_call() -> None:
    d = Driver("steps: [{id: poll, loop: {steps: [{id: s, call: t}], until: .steps.s.result, max_iterations: 3}}]")
    d.take(d.run.cancel("stop"))
    assert d.in_flight == {}
    assert d.finished == Finished("failed", error=StepError("cancelled", "stop"))


def test_a_failed_body_step_fails_the_loop_unless_its_own_on_error_handles_it() -> None:
    d = Driver("steps: [{id: poll, loop: {steps: [{id: s, call: t}], until: .steps.s.result, max_iterations: 3}}]")
    d.fail("poll[1]/s", "unavailable", "down")
    assert d.finished == Finished("failed", error=StepError("unavailable", "down", "poll[1]/s"))

    d = Driver("""
steps:
  - id: poll
    loop:
      steps: [{id: s, call: t, on_error: {default: "late"}}]
      until: .steps.s.result == "done"
      max_iterations: 3
""")
    d.fail("poll[1]/s", "unavailable", "down")
    d.ok("poll[2]/s", "done")
    assert d.finished == Finished("succeeded", {"poll": "done"})


def test_a_loop_timeout_bounds_the_whole_loop_delays_included() -> None:
    d = Driver("""
steps:
  - id: poll
    loop: {steps: [{id: s, call: t}], until: .steps.s.result == "done", max_iterations: 9, delay: 10s}
    timeout: 25s
""")
    d.ok("poll[1]/s", "no")
    assert d.timers == {"poll#timeout1": 25.0, "poll#delay": 10.0}
    d.fire("poll#timeout1")
    assert d.finished == Finished("failed", error=StepError("timeout", "did not finish within 25s", "poll"))
    assert d.run.fire("poll#delay") == []


def test_a_stale_delay_of_a_loop_started_over_does_not_start_its_next_iteration_early() -> None:
    d = Driver("""
steps:
  - id: poll
    loop: {steps: [{id: s, call: t}], until: .steps.s.result == "done", max_iterations: 9, delay: 10s}
    timeout: 25s
    retry: {attempts: 2, backoff: 1s, jitter: 0, "on": [timeout]}
""")
    d.ok("poll[1]/s", "no")
    d.fire("poll#timeout1")
    d.fire("poll#retry")
    d.ok("poll[1]/s", "no")
    assert set(d.timers) == {"poll#delay", "poll#delay~2", "poll#timeout2"}
    d.fire("poll#delay")  # the first attempt's
    assert "poll[2]/s" not in d.in_flight
    d.fire("poll#delay~2")
    assert "poll[2]/s" in d.in_flight


def test_a_loop_iteration_with_jq_in_its_output_and_condition_waits_for_both_in_turn() -> None:
    d = Driver(
        """
steps:
  - id: poll
    loop:
      steps: [{id: s, call: t}]
      until: .last[1] + 0 == 3
      max_iterations: 3
      output: "${[.steps.s.result, .iteration]}"
""",
        evaluate=False,
    )
    d.ok("poll[1]/s", "x")
    [first] = d.evaluations.values()
    assert first.source == "[.steps.s.result, .iteration]"
    d.evaluated(first.key)
    [second] = d.evaluations.values()  # the condition reads the output: asked for once it is known
    assert second.source == ".last[1] + 0 == 3"
    assert second.data["last"] == ["x", 1]
    d.evaluated(second.key)
    d.ok("poll[2]/s", "y")
    while d.evaluations:
        d.evaluated(next(iter(d.evaluations)))
    d.ok("poll[3]/s", "z")
    while d.evaluations:
        d.evaluated(next(iter(d.evaluations)))
    assert d.finished == Finished("succeeded", {"poll": ["z", 3]})


def test_a_loop_inside_a_for_each_keys_its_iterations_inside_the_items() -> None:
    d = Driver("""
steps:
  - id: each
    for_each: [a, b]
    concurrency: 2
    steps:
      - id: poll
        loop: {steps: [{id: s, call: t, with: {item: "${.item}"}}], until: .steps.s.result == "done", max_iterations: 2}
""")
    assert set(d.in_flight) == {"each[0]/poll[1]/s", "each[1]/poll[1]/s"}
    d.ok("each[0]/poll[1]/s", "done")
    d.ok("each[1]/poll[1]/s", "no")
    d.ok("each[1]/poll[2]/s", "done")
    assert d.finished == Finished("succeeded", {"each": ["done", "done"]})
