"""The start-up heap is frozen: what exists once the gateway is open is never scanned again."""

import gc

from gateway.heap import freeze_startup_heap


def test_freezing_exempts_what_is_alive_from_collections_and_later_garbage_is_still_collected() -> None:
    kept = [[n] for n in range(1000)]
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() >= len(kept)
        scanned = {id(obj) for obj in gc.get_objects()}
        assert not any(id(item) in scanned for item in kept)

        gc.collect()
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() == 1  # garbage made after start-up is found as before
    finally:
        gc.unfreeze()
