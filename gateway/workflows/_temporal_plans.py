"""The plans this process's Temporal workers hold, by digest: where a run of the generic workflow finds its plan.

A module of its own because Temporal's sandbox imports a workflow's module afresh for every run, so
that module's globals are not the ones its worker filled in; :mod:`gateway.workflows.temporal`
imports this one passed through the sandbox, so every run sees the same (process-wide) table.
Several engines in one process may hold the same plan: each holds it until it releases it.
"""

from collections.abc import Iterable

from gateway.workflows.plan import Plan

__all__ = ["find", "hold", "release"]

_held: dict[str, tuple[Plan, int]] = {}
"""Each held plan by digest, with how many holders it has."""


def hold(plans: Iterable[Plan]) -> None:
    """Make ``plans`` findable until :func:`release` is called with them."""
    for plan in plans:
        held = _held.get(plan.digest)
        _held[plan.digest] = (held[0] if held is not None else plan, (held[1] if held is not None else 0) + 1)


def release(plans: Iterable[Plan]) -> None:
    """Undo one :func:`hold` of ``plans``."""
    for plan in plans:
        held = _held.get(plan.digest)
        if held is None:
            continue
        if held[1] > 1:
            _held[plan.digest] = (held[0], held[1] - 1)
        else:
            del _held[plan.digest]


def find(name: str, digest: str) -> Plan | None:
    """The held plan of workflow ``name`` whose digest is ``digest``, or None."""
    held = _held.get(digest)
    return held[0] if held is not None and held[0].name == name else None
