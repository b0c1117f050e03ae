"""The evaluations a workflow run asked for and waits on: the bookkeeping of its evaluation sites.

Where the engine (:mod:`gateway.workflows.engine`) needs a jq program's outcome, the place that
needs it – a :class:`~gateway.workflows._runstate.Site` – asks for every program it is missing,
each as an :class:`~gateway.workflows.commands.Evaluate` keyed ``<where>#eval<n>.<position>``
(``n`` counts the run's sites, so no key is ever used twice), and waits; each outcome is filed by
its key, and the site is resumed once all of its came back. The engine decides which sites are
still wanted; this drops the others and says which of their evaluations to cancel.
"""

from collections.abc import Callable
from typing import Any

from gateway.workflows._runstate import Frame, Site, SiteKind, StepState
from gateway.workflows.commands import Cancel, Command, Evaluate
from gateway.workflows.expressions import Lookup, Outcome

__all__ = ["Sites"]


class Sites:
    """A run's evaluation sites: the evaluations asked for and not answered, by key."""

    __slots__ = ("_count", "pending")

    def __init__(self) -> None:
        self.pending: dict[str, tuple[Site, int, Evaluate]] = {}
        """Each evaluation asked for: its site, its position there, and the command."""
        self._count = 0

    def ask(
        self,
        site: Site | None,
        lookup: Lookup,
        kind: SiteKind,
        state: StepState | None,
        frame: Frame | None,
        result: Any,
        random: float,
        out: list[Command],
    ) -> None:
        """Ask for what ``lookup`` is missing (appending the commands to ``out``), at ``site`` or a new one."""
        if site is None:
            self._count += 1
            attempt = state.attempt if state is not None else 0
            where = frame.path if frame is not None else state.key if state is not None else ""
            site = Site(f"{where}#eval{self._count}", kind, state, attempt, frame, result, random)
        for request in lookup.missing:
            key = f"{site.prefix}.{request.position}"
            site.known.extend([None] * (request.position + 1 - len(site.known)))
            site.waiting += 1
            command = Evaluate(key, request.source, request.data)
            self.pending[key] = (site, request.position, command)
            out.append(command)

    def answer(self, key: str, outcome: Outcome) -> Site | None:
        """File the outcome of evaluation ``key``: its site, once it has every outcome it waited for."""
        entry = self.pending.pop(key, None)
        if entry is None:  # stale: its site was dropped
            return None
        site, index, _ = entry
        site.known[index] = outcome
        site.waiting -= 1
        return site if site.waiting == 0 else None

    def prune(self, wanted: Callable[[Site], bool], out: list[Command]) -> list[Command]:
        """Drop the evaluations of sites no longer ``wanted``: ``out`` without those not handed out yet,
        and a ``Cancel`` for each of the others."""
        dropped = {key for key, (site, _, _) in self.pending.items() if not wanted(site)}
        if not dropped:
            return out
        for key in dropped:
            del self.pending[key]
        batch = {c.key for c in out if isinstance(c, Evaluate)}
        kept = [c for c in out if not (isinstance(c, Evaluate) and c.key in dropped)]
        kept.extend(Cancel(key) for key in sorted(dropped - batch))
        return kept
