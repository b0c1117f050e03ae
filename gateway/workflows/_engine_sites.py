"""Evaluation sites, for the engine (:mod:`gateway.workflows.engine`): where it waits for jq outcomes.

A place that needs jq programs' outcomes (a step's values, a success condition, an iteration's output, an
``on_error`` default, a compensation's arguments, the run's output) computes what it can through
:meth:`~EvaluationSites._at`: missing outcomes are asked for (:class:`~gateway.workflows._sites.Sites`) and
the place is parked; once all came back it is resumed and computed again, if it is still wanted.
"""

from collections.abc import Callable, Mapping
from typing import Any

from gateway.workflows._engine_base import RunBase
from gateway.workflows._runstate import PARKED, Frame, Site, SiteKind, StepState
from gateway.workflows.expressions import ExpressionError, Lookup

__all__ = ["EvaluationSites", "PLAIN"]

PLAIN = Lookup()  # for values of plain paths only, which never consult it
"""The lookup of values that are plain paths only: it is never consulted, so one serves every run."""


class EvaluationSites(RunBase):
    """Computing at evaluation sites, deciding whether one is still wanted, and resuming it."""

    def _at(
        self,
        site: Site | None,
        scope: Mapping[str, Any],
        compute: Callable[[Mapping[str, Any], Lookup], Any],
        kind: SiteKind,
        state: StepState | None,
        *,
        frame: Frame | None = None,
        result: Any = None,
        random: float = 0.5,
    ) -> Any:
        """``compute(scope, lookup)`` at an evaluation site: its value, or ``PARKED`` when jq outcomes are
        missing (they are asked for, and the site is resumed once all came back). Raises ExpressionError."""
        lookup = Lookup(site.known) if site is not None else Lookup()
        try:
            value = compute(scope, lookup)
        except ExpressionError:
            if not lookup.missing:  # else a program before the failing one may fail first: its error counts
                raise
        if not lookup.missing:
            return value
        if kind in ("step", "success") and state is not None:
            state.status = "evaluating"
        if frame is not None:
            frame.evaluating = True
        self._sites.ask(site, lookup, kind, state, frame, result, random, self._out)
        return PARKED

    def _valid(self, site: Site) -> bool:
        """Whether ``site`` still waits for its outcomes (the step may have failed, the run been cancelled…)."""
        state = site.state
        if site.kind == "compensate":
            return self.status == "compensating" and self._compensating is state
        if self.status != "running":
            return False
        if state is None:
            return site.kind == "run"
        if site.kind == "output":
            frame = site.frame
            assert frame is not None
            return (
                state.status == "running"
                and state.attempt == site.attempt
                and state.iterations.get(frame.index) is frame
            )
        waiting = "degrading" if site.kind == "default" else "evaluating"
        return state.status == waiting and state.attempt == site.attempt and self._by_key.get(state.key) is state

    def _resume(self, site: Site) -> None:
        """Every outcome ``site`` waited for came back: evaluate it again."""
        state = site.state
        if site.kind == "run":
            self._check_run(site)
            return
        assert state is not None
        if site.kind == "step":
            self._run_step(state, site)
        elif site.kind == "success":
            state.status = "running"
            self._tried(state, site.result, None, site.random, site)
        elif site.kind == "output":
            assert site.frame is not None
            self._check_iteration(site.frame, site)
        elif site.kind == "default":
            self._degrade(state, site)
        else:
            self._compensate_next(site)
