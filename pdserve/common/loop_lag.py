"""How late an asyncio event loop runs its callbacks: the sign of a loop that has more work than time.

A :class:`LoopLagMonitor` task sleeps ``interval_s`` over and over and records how much later than asked
it woke up; :attr:`LoopLagMonitor.lag_s` is the largest lateness of the last ``window_s``. A loop that
keeps up reads near zero (timer resolution); a router relaying more tokens than it can write, or a
worker whose loop thread waits for the GIL behind its engine thread, reads in milliseconds and more,
and every request it serves waits that long at each hop through it.

Lifecycle: ``run()`` is a task for the loop's lifetime (cancel it to stop); ``lag_s`` may be read from
any thread (a float; a read may see the previous window's value).
"""

from __future__ import annotations

import asyncio
import collections
import time


class LoopLagMonitor:
    def __init__(self, interval_s: float = 0.05, window_s: float = 2.0) -> None:
        if interval_s <= 0 or window_s < interval_s:
            raise ValueError(f"need 0 < interval_s <= window_s, got interval_s={interval_s}, window_s={window_s}")
        self.interval_s = interval_s
        self._samples: collections.deque[float] = collections.deque(maxlen=max(1, round(window_s / interval_s)))
        self.lag_s = 0.0

    def record(self, lateness_s: float) -> None:
        """Add one wake-up's lateness (``run`` does; tests may too)."""
        self._samples.append(max(0.0, lateness_s))
        self.lag_s = max(self._samples)

    async def run(self) -> None:
        """Forever: sleep, measure the lateness, keep the window's maximum. Never raises but ``CancelledError``."""
        while True:
            asked = time.perf_counter() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.record(time.perf_counter() - asked)
