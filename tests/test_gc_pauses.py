"""musetalk.utils.gc_pauses: collections are timed, and frozen objects are no longer walked by the collector."""

from __future__ import annotations

import gc

from musetalk.utils import gc_pauses


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_every_collection_is_timed_with_its_generation() -> None:
    gc_pauses.install()
    gc_pauses.install()  # idempotent: one callback
    try:
        assert gc.callbacks.count(gc_pauses._callback) == 1
        before = gc_pauses.stats()["collections"]
        gc.disable()  # no automatic collection frees the cycles before the full one below
        try:
            for _ in range(1000):
                _Node()
            gc.collect()
        finally:
            gc.enable()
        stats = gc_pauses.stats()
        assert stats["collections"] > before
        assert stats["full_pause_max_ms"] > 0  # gc.collect() is a collection of the oldest generation
        assert any(gen == 2 and freed >= 1000 for _, _, gen, freed in gc_pauses._pauses)  # it freed the cycles
        assert isinstance(stats["full_pause_max_freed"], int)  # (of the longest full collection in the window)
        assert stats["pause_max_ms"] >= stats["full_pause_max_ms"] and stats["pause_p95_ms"] > 0
    finally:
        gc_pauses.uninstall()
    assert gc_pauses._callback not in gc.callbacks


def test_stats_forget_collections_older_than_the_window() -> None:
    gc_pauses.install()
    try:
        gc.collect()
        assert gc_pauses.stats(window_s=10.0)["collections"] >= 1
        assert gc_pauses.stats(window_s=0.0)["collections"] == 0
    finally:
        gc_pauses.uninstall()


def test_frozen_objects_are_not_walked_until_thawed() -> None:
    kept = [_Node() for _ in range(10)]
    assert gc.get_freeze_count() == 0
    gc_pauses.install()
    try:
        before = gc_pauses.stats()["collections"]
        frozen = gc_pauses.freeze("test")
        assert gc_pauses.stats()["collections"] == before  # its own collection is logged, not a pause
        assert frozen == gc.get_freeze_count() == gc_pauses.stats()["frozen_objects"] >= len(kept)
        tracked = {id(o) for o in gc.get_objects()}  # what collections walk (the permanent generation is not)
        assert not any(id(o) in tracked for o in kept)
    finally:
        gc_pauses.thaw()
        gc_pauses.uninstall()
    assert gc.get_freeze_count() == gc_pauses.stats()["frozen_objects"] == 0
    tracked = {id(o) for o in gc.get_objects()}
    assert all(id(o) in tracked for o in kept)


def test_census_counts_what_a_collection_walks_and_leaves_frozen_objects_out() -> None:
    class Walked:
        pass

    class Frozen:
        pass

    frozen = [Frozen() for _ in range(3000)]
    gc.freeze()
    try:
        walked = [Walked() for _ in range(5000)]
        heap = gc_pauses.census(top=50)
        counts = {name.rsplit(".", 1)[-1]: count for name, count in heap.types}
        assert counts.get("Walked") == 5000
        assert "Frozen" not in counts
        assert heap.objects >= 5000
        assert ("list", 5000) in heap.largest  # the list holding them, walked item by item
    finally:
        gc.unfreeze()
    del frozen, walked
