"""``router.planner_mode: apply``: when to act on the online planner's recommendation, one worker at a time.

A planning round (:mod:`pdserve.router.online_planner`) predicts every configuration's goodput on the
recent traffic. :class:`PlanApplier` turns a run of such rounds into at most one role switch (a prefill
worker becomes a decode worker or the other way round, ``Cluster.switch_role``), with hysteresis:

* candidates are the splits of this cluster's GPUs into prefill and decode pools, and colocated on all
  of them, which a split cluster runs as ``0PnD``: no prefill worker, every decode worker prefills its
  own prompts within its TPOT step budget (what a colocated worker does). A cluster started colocated
  cannot switch: its workers run one mode, and the router's mode is fixed at start;
* the best split must beat the current one's predicted goodput by ``min_gain`` (a share, e.g. 0.1),
  in ``confirmations`` consecutive rounds, with the same target each time;
* after a switch, nothing moves for ``dwell_s`` (the traffic the next rounds see must be served by the
  new configuration for a while before it is judged);
* a step is one worker towards the target (2P2D -> 3P1D takes two switches, each confirmed anew).

Pure: ``decide(result, now)`` reads a planning round and says which way one worker should switch;
the router picks the worker and performs the switch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pdserve.common.validation import require_float, require_int

_SPLIT = re.compile(r"^(\d+)P(\d+)D$")


@dataclass(frozen=True)
class ApplyConfig:
    dwell_s: float = 300.0
    confirmations: int = 2
    min_gain: float = 0.1

    def __post_init__(self) -> None:
        require_float("planner_dwell_s", self.dwell_s, minimum=0.0)
        require_int("planner_confirmations", self.confirmations, minimum=1)
        require_float("planner_min_gain", self.min_gain, minimum=0.0)


def prefill_count(config: str) -> int | None:
    """The prefill workers of a split named ``xPyD`` (None: not a split, e.g. ``colocated x2``)."""
    match = _SPLIT.match(config)
    return int(match.group(1)) if match else None


def split_prefill_count(config: str) -> int | None:
    """The prefill workers a split cluster runs ``config`` with: ``xPyD`` -> x, ``colocated xN`` -> 0."""
    return 0 if config.startswith("colocated x") else prefill_count(config)


class PlanApplier:
    def __init__(self, config: ApplyConfig) -> None:
        self.config = config
        self._target: str | None = None
        self._streak = 0
        self._last_switch: float | None = None
        self.status = "no planning round yet"
        self.num_switches = 0

    def decide(self, result: dict[str, Any], now: float) -> tuple[str, str] | None:
        """``(from_role, to_role)`` for one worker to switch now, or None (``status`` says why)."""
        current = str(result.get("current", ""))
        here = prefill_count(current)
        if result.get("status") != "ok" or here is None:
            self._streak, self._target = 0, None
            self.status = (f"{current}: a colocated or mixed cluster keeps its configuration"
                           if result.get("status") == "ok" else f"no plan: {result.get('status')}")
            return None
        predictions = {p["config"]: p for p in result.get("predictions", [])
                       if split_prefill_count(p["config"]) is not None}
        best = max(predictions.values(), key=lambda p: (p["goodput_per_gpu"], p["attainment_at_offered"]))
        mine = next((p for name, p in predictions.items() if split_prefill_count(name) == here), None)
        floor = (mine["goodput_per_gpu"] if mine else 0.0) * (1 + self.config.min_gain)
        if best is mine or best["goodput_per_gpu"] <= floor:
            self._streak, self._target = 0, None
            self.status = f"keeping {current}: no split predicted {self.config.min_gain:.0%} better"
            return None
        self._streak = self._streak + 1 if best["config"] == self._target else 1
        self._target = best["config"]
        if self._streak < self.config.confirmations:
            self.status = f"{best['config']} predicted better ({self._streak}/{self.config.confirmations} rounds)"
            return None
        if self._last_switch is not None and now - self._last_switch < self.config.dwell_s:
            wait = self.config.dwell_s - (now - self._last_switch)
            self.status = f"{best['config']} predicted better; the last switch was too recent ({wait:.0f} s to go)"
            return None
        target = split_prefill_count(best["config"])
        assert target is not None and target != here
        self._last_switch, self._streak = now, 0
        self.num_switches += 1
        action = ("decode", "prefill") if target > here else ("prefill", "decode")
        self.status = f"switching a {action[0]} worker to {action[1]}: {current} -> towards {best['config']}"
        return action
