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
        self._recent: collections.deque[tuple[float, float]] = collections.deque()  # (ended at, seconds)
        self._started: float | None = None
        self._lock = threading.Lock()

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
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.popleft()
            return max((seconds for _, seconds in self._recent), default=0.0)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        if self._started is None:
            return
        seconds, self._started = now - self._started, None
        with self._lock:
            self._recent.append((now, seconds))
