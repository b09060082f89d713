"""Garbage-collector pauses: every collection is timed; start-up's heap leaves the collector's scans."""

from __future__ import annotations

import gc

from pdserve.common.gc_pauses import GcPauses, freeze_startup_heap


def test_collections_are_timed() -> None:
    pauses = GcPauses(window_s=60).install()
    try:
        garbage = [[] for _ in range(200_000)]
        for item in garbage:  # cycles only the collector can free
            item.append(item)
        del garbage
        gc.collect()
        assert pauses.max_pause_s > 0
    finally:
        pauses.uninstall()
    assert pauses._callback not in gc.callbacks


def test_a_collection_while_a_reader_holds_the_record_does_not_deadlock() -> None:
    """A collection may start at any allocation, on the reading thread too: reading with collections
    forced at every few allocations must return (it deadlocked the router's event loop when the callback
    took the readers' lock). Run in a thread so a regression fails instead of hanging the suite."""
    import threading

    pauses = GcPauses(window_s=60).install()
    threshold = gc.get_threshold()
    done = threading.Event()

    def read_many() -> None:
        for _ in range(2000):
            [[] for _ in range(20)]  # noqa: B018 (allocations that trigger collections)
            assert pauses.max_pause_s >= 0.0
        done.set()

    try:
        gc.set_threshold(1, 1, 1)  # a collection every allocation or two, also inside max_pause_s
        reader = threading.Thread(target=read_many, daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert done.is_set(), "reading the pauses deadlocked against a collection"
        assert pauses.max_pause_s > 0
    finally:
        gc.set_threshold(*threshold)
        pauses.uninstall()


def test_freezing_moves_live_objects_out_of_the_scans() -> None:
    try:
        frozen = freeze_startup_heap()
        assert frozen > 1000 and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
