"""Python's garbage collector in long-running serving processes: keep start-up's heap out of its scans,
and measure its pauses.

A full (generation 2) collection walks every tracked container object of the process. A router or
worker process holds millions of them after start-up (torch, Ray, gRPC, the model's modules), so a full
collection stalls every thread of the process for 100 ms or more -- the router's event loop relaying
tokens, a worker's engine thread between steps. :func:`freeze_startup_heap`, called once start-up is
done, moves everything alive then into the collector's permanent generation (``gc.freeze``; vLLM does
the same after start-up), so later collections scan only what serving allocates; :func:`thaw_heap` when
serving stops.

:class:`GcPauses` records how long each collection took (``gc.callbacks``): the largest pause of the
last ``window_s``, for status and metrics. Install one per process
(``install()``/``uninstall()``); reads from any thread.

A collection runs on whichever thread allocates, at any allocation -- also inside a reader of these
figures. So the callback takes no lock and touches nothing a reader iterates: it appends to a mailbox
(``deque.append`` is atomic), and readers move the mailbox into their own record under their own lock.
(The first version appended under the readers' lock: a collection that started while a router thread held
it, in ``ClusterStatus``, deadlocked the router's event loop for good -- every request hung.)
"""

from __future__ import annotations

import collections
import gc
import threading
import time
from typing import Any


def thaw_heap() -> None:
    """Undo :func:`freeze_startup_heap` when the process stops serving (objects frozen and unreachable by
    then are collected again, before interpreter exit)."""
    gc.unfreeze()


def freeze_startup_heap() -> int:
    """Collect once, then exclude every object alive now from later collections; returns how many objects
    were frozen. Objects frozen stay alive only as long as something references them (refcounting still
    frees them); only the cyclic collector stops looking at them."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._ended: collections.deque[tuple[float, float]] = collections.deque()  # the callback's mailbox
        self._recent: collections.deque[tuple[float, float]] = collections.deque()  # (ended at, seconds): readers'
        self._started: float | None = None
        self._lock = threading.Lock()  # readers only: the callback never takes it

    def install(self) -> GcPauses:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    @property
    def max_pause_s(self) -> float:
        """The longest collection that ended in the last ``window_s`` (0 if none)."""
        cutoff = time.perf_counter() - self.window_s
        with self._lock:
            while self._ended:  # collections during this loop land in the mailbox, not in _recent
                self._recent.append(self._ended.popleft())
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.popleft()
            return max((seconds for _, seconds in self._recent), default=0.0)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        """Runs inside a collection, on the thread that triggered it: no lock, nothing a reader iterates."""
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        if self._started is None:
            return
        seconds, self._started = now - self._started, None
        self._ended.append((now, seconds))
