"""The event-loop lag monitor: a loop blocked for a while reads about that long late, until the window
moves past it."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.common.loop_lag import LoopLagMonitor


def test_a_blocked_loop_reads_late_and_the_window_forgets_it() -> None:
    async def main() -> tuple[float, float, float]:
        monitor = LoopLagMonitor(interval_s=0.01, window_s=0.1)
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.05)
        before = monitor.lag_s
        time.sleep(0.2)  # the loop can run nothing meanwhile
        await asyncio.sleep(0.03)
        blocked = monitor.lag_s
        await asyncio.sleep(0.3)  # more than a window of prompt wake-ups
        after = monitor.lag_s
        task.cancel()
        return before, blocked, after

    before, blocked, after = asyncio.run(main())
    assert blocked >= 0.15  # the 0.2 s the loop was blocked (less the wake-up that was due later)
    assert before < blocked and after < blocked  # before it, and once the window has moved past it


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        LoopLagMonitor(interval_s=0.0)
    with pytest.raises(ValueError, match="window_s"):
        LoopLagMonitor(interval_s=1.0, window_s=0.5)
