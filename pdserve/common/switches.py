"""Environment switches: the ``PDSERVE_*`` variables that turn an engine or transport behaviour on or off
(A/B switches for benchmarks), tune it, or turn on a diagnostic. One registry, so that every switch has
one default and one parser, a bad value is an error naming the variable, and a benchmark result can
record the value of every switch it ran with (``benchmarks.common.run_info``), defaults included: a
result then says which side of a change it measured even after the change's default moved.

Modules read their switch once, at import (``SINGLE_ROW_GEMV = switches.SINGLE_ROW_GEMV.flag()``), or
when they start (a worker actor's GIL interval). Not here: ``PDSERVE_COMMIT`` (set by benchmark
scripts for their result headers) and ``PDSERVE_CACHE_DIR`` (a path, not a behaviour).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pdserve.common.errors import ConfigError


@dataclass(frozen=True)
class Switch:
    """One environment variable: its name, its value when unset, and what it does."""

    name: str
    default: str
    doc: str

    def raw(self) -> str:
        return os.environ.get(self.name, self.default)

    def flag(self) -> bool:
        """An on/off switch: ``1`` on, ``0`` off; anything else is a :class:`ConfigError`."""
        value = self.raw().strip()
        if value not in ("0", "1"):
            raise ConfigError(self.name, f"must be 0 or 1, got {value!r} ({self.doc})")
        return value == "1"

    def number(self) -> float:
        """A number (a size, a time); a value that is none, or negative, is a :class:`ConfigError`."""
        try:
            value = float(self.raw())
        except ValueError:
            raise ConfigError(self.name, f"must be a number, got {self.raw()!r} ({self.doc})") from None
        if not value >= 0:
            raise ConfigError(self.name, f"must be >= 0, got {self.raw()!r} ({self.doc})")
        return value


FILL_GRAPH_PADDING = Switch("PDSERVE_FILL_GRAPH_PADDING", "1",
                            "a budget-cut prompt chunk grows into its CUDA graph's padding rows")
SLACK_AFTER_LONG_STEP = Switch("PDSERVE_SLACK_AFTER_LONG_STEP", "1",
                               "the step budget allows a long step in flight its predicted time (0: one SLO)")
PAD_WITH_NEXT_PROMPT = Switch("PDSERVE_PAD_WITH_NEXT_PROMPT", "0",
                              "a prompt the step budget leaves out takes the graph's padding rows left")
BALANCED_DECODE_SPLITS = Switch("PDSERVE_BALANCED_DECODE_SPLITS", "1",
                                "the decodes of a ragged step split each by its own context")
SINGLE_ROW_GEMV = Switch("PDSERVE_SINGLE_ROW_GEMV", "1", "single rows through the one-launch GEMV, not cuBLAS")
KV_COALESCE = Switch("PDSERVE_KV_COALESCE", "0", "NCCL KV sends a plan marks as one launch go coalesced")
KV_MIN_MESSAGE_BYTES = Switch("PDSERVE_KV_MIN_MESSAGE_BYTES", str(4 << 20),
                              "KV messages smaller than this take the next layer's parts too")
KV_MAX_MESSAGE_BYTES = Switch("PDSERVE_KV_MAX_MESSAGE_BYTES", str(256 << 20), "the largest KV message")
KV_MIN_SPLIT_BYTES = Switch("PDSERVE_KV_MIN_SPLIT_BYTES", str(1 << 40),
                            "a lone KV part this large goes straight into the receiver's cache")
KV_PLAN_EXTRA_WAIT_MS = Switch("PDSERVE_KV_PLAN_EXTRA_WAIT_MS", "4",
                               "how long a KV plan may wait for more layers of the forward pass")
SLOW_STEP_MS = Switch("PDSERVE_SLOW_STEP_MS", "250", "an engine step longer than this is logged (diagnostic)")
PROFILE_SLOW_STEPS = Switch("PDSERVE_PROFILE_SLOW_STEPS", "0",
                            "profile every launch's Python calls for the slow-step log (diagnostic; slow)")
GIL_SWITCH_INTERVAL_S = Switch("PDSERVE_GIL_SWITCH_INTERVAL_S", "0.001", "a worker process's GIL switch interval")

#: Every switch, in the order above.
ALL: tuple[Switch, ...] = (FILL_GRAPH_PADDING, SLACK_AFTER_LONG_STEP, PAD_WITH_NEXT_PROMPT, BALANCED_DECODE_SPLITS, SINGLE_ROW_GEMV,
                           KV_COALESCE, KV_MIN_MESSAGE_BYTES, KV_MAX_MESSAGE_BYTES, KV_MIN_SPLIT_BYTES,
                           KV_PLAN_EXTRA_WAIT_MS, SLOW_STEP_MS, PROFILE_SLOW_STEPS, GIL_SWITCH_INTERVAL_S)


def effective() -> dict[str, str]:
    """Every switch's value in this process (its default where unset)."""
    return {switch.name: switch.raw() for switch in ALL}
