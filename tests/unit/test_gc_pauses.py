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


def test_freezing_moves_live_objects_out_of_the_scans() -> None:
    try:
        frozen = freeze_startup_heap()
        assert frozen > 1000 and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
