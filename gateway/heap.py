"""Garbage collection in a long-running gateway: what start-up built is never scanned again.

A full collection walks every tracked object, and a loaded gateway holds about 100,000 of them
(the SDK, pydantic, jsonschema, compiled workflows), which takes 50–70 ms on a small machine:
a pause that lands on whatever calls are in flight, every few workflow runs. Start-up objects
live as long as the process, so :func:`freeze_startup_heap` moves them out of the collector's
sight once the gateway is open, as ``gc.freeze`` is meant to be used; what calls allocate later
is collected as before.
"""

import gc

__all__ = ["freeze_startup_heap"]


def freeze_startup_heap() -> int:
    """Collect once, then exempt every object alive now from later collections; how many were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
