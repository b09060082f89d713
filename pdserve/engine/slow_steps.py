"""Stall reports: a step whose launch (host work) or whose wait for the device takes longer than
``SLOW_STEP_S`` (``PDSERVE_SLOW_STEP_MS`` milliseconds when set: a diagnostic) is logged with what it carried and where the launch's host time went, and with
``PDSERVE_PROFILE_SLOW_STEPS=1`` (a diagnostic: it slows every launch) the Python calls it went to.
Stalls of this kind (a kernel compiled or an attention plan built on first use of a shape) stop every
stream of a worker at once; the log names them so they can be moved to start-up.

A launch that returns while the step before it is still running on the device is not reported however
long it took: the device had work all along. An eager step of thousands of tokens on an H200 blocks in its
matrix products' launches for 190-390 ms as the launch queue fills (measured 2026-12-02,
``docs/performance-log.md``, engine); of the six such launches in the offline benchmark, the three that
outlast the step before are still reported: the host cannot tell whether the device then waited for it.

Per step: ``watch.launching()`` -> launch -> ``watch.launched(plan, host_breakdown, device_busy)`` -> read
the step before -> ``watch.landed(plan)``. Engine thread only.
"""

from __future__ import annotations

import cProfile
import io
import logging
import pstats
import time
from collections.abc import Callable

from pdserve.common import switches
from pdserve.engine.step_plan import SchedulerPlan

logger = logging.getLogger("pdserve.engine.engine")
#: A step whose launch, or whose wait for the device, takes longer is logged.
SLOW_STEP_S = switches.SLOW_STEP_MS.number() / 1e3


def describe_plan(plan: SchedulerPlan) -> str:
    """One line about what a step carries: its decodes and its prefill chunks (start, tokens)."""
    decodes = sum(1 for c in plan.chunks if c.num_tokens == 1)
    chunks = [(c.start, c.num_tokens) for c in plan.chunks if c.num_tokens > 1]
    return f"{decodes} decodes, prefill chunks (start, tokens) {chunks}"


class SlowStepWatch:
    def __init__(self) -> None:
        self._started = self._launched_at = 0.0
        self._profiler: cProfile.Profile | None = None
        self._profile_launches = switches.PROFILE_SLOW_STEPS.flag()

    def launching(self) -> None:
        self._started = time.perf_counter()
        self._profiler = None
        if self._profile_launches:
            self._profiler = cProfile.Profile()
            self._profiler.enable()

    def launched(self, plan: SchedulerPlan, host_breakdown: Callable[[], dict[str, float]],
                 device_busy: bool = False) -> None:
        """``device_busy``: the step before this one was still running when the launch returned (then a
        slow launch stalled nothing and is not reported)."""
        self._launched_at = time.perf_counter()
        profiler, self._profiler = self._profiler, None
        if profiler is not None:
            profiler.disable()
        seconds = self._launched_at - self._started
        if seconds > SLOW_STEP_S and not device_busy:
            logger.warning("launching a step took %.0f ms on the host (%s; ms by phase %s)%s", seconds * 1e3,
                           describe_plan(plan), host_breakdown(), _report(profiler))

    def landed(self, plan: SchedulerPlan) -> None:
        seconds = time.perf_counter() - self._launched_at
        if seconds > SLOW_STEP_S:
            logger.warning("waiting for a step took %.0f ms (%s)", seconds * 1e3, describe_plan(plan))


def _report(profiler: cProfile.Profile | None) -> str:
    if profiler is None:
        return ""
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
    return "\n" + text.getvalue()
