"""The planner on live data (``router.planner_mode: recommend``): every ``planner_interval_s`` the router
simulates every configuration of its GPU count on the requests of the last ``planner_window_s`` (their arrival
times and lengths, as the router saw them) over a worker's own step-time model (from its telemetry),
calibrated by the workers' live steps, and publishes the best with each configuration's predicted goodput per GPU: in the dashboard's sizing
panel and as ``pdserve:planner_*`` metrics. With ``planner_mode: apply`` it also acts: its
:class:`~pdserve.router.plan_applier.PlanApplier` decides, round by round, when one worker should move
between the prefill and decode pools, and ``switch(from_role, to_role)`` (the router's, which asks
whoever manages the workers) performs it; ``latest["apply"]`` says what it decided and why.

Lifecycle: ``OnlinePlanner(...)`` -> ``run()`` as a router task (cancelled with the others). Each
round's simulation runs in a child interpreter (:mod:`pdserve.planner.plan_process`): a round is seconds
of pure Python, and in a thread of the router's process it held the GIL against the router's loop (on
2xH200 with a round every 5 s, TTFT p99 went from 0.25 to 2.5-3 s at 6 req/s per GPU). Skipped
(``latest`` says why) while fewer than ``MIN_REQUESTS`` requests ended in the window or no worker
reports a step-time model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pdserve.common.step_model import (
    FIRST_CALIBRATION_STEPS,
    StepTimeModel,
    mean_scheduler_calibration,
    pooled_busy_calibration,
)
from pdserve.planner.plan import DEFAULT_KV_BYTES_PER_TOKEN, Profile, Workload
from pdserve.planner.plan_process import plan_in_subprocess
from pdserve.planner.simulate import SimRequest
from pdserve.router.config import RouterConfig
from pdserve.router.plan_applier import PlanApplier
from pdserve.router.request_log import RequestLog
from pdserve.rpc.types import PlannedConfiguration, PlannerStatus

logger = logging.getLogger(__name__)
MIN_REQUESTS = 50
MAX_REQUESTS = 400  # the most recent ones, to bound the simulation's time


def held_gpus(num_workers: int, telemetry: Mapping[str, dict[str, Any]]) -> int:
    """The GPUs ``num_workers`` workers hold: each reporting one per tensor-parallel rank, one for each
    that has not reported yet (goodput per GPU divides by them all)."""
    ranks = [int((snapshot.get("engine") or {}).get("tensor_parallel_ranks") or 1) for snapshot in telemetry.values()]
    return max(num_workers, sum(ranks[:num_workers]) + max(0, num_workers - len(ranks)))


class OnlinePlanner:
    def __init__(self, config: RouterConfig, log: RequestLog, num_workers: Callable[[], int],
                 telemetry: Callable[[], Mapping[str, dict[str, Any]]], current: Callable[[], str],
                 switch: Callable[[str, str], Awaitable[str]]) -> None:
        self._config = config
        self._switch = switch
        self.applier = PlanApplier(config.apply_config) if config.planner_mode == "apply" else None
        self._log = log
        self._num_workers = num_workers
        self._telemetry = telemetry
        self._current = current
        self.latest: dict[str, Any] = {"status": "waiting for the first planning round"}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._config.planner_interval_s)
            try:
                latest = await self.recommend()
                if self.applier is not None:
                    latest["apply"] = await self.apply(latest)
                self.latest = latest
            except Exception as exc:  # noqa: BLE001 (a planning round must never take the router down)
                logger.exception("planner round failed")
                self.latest = {"status": f"the last round failed: {type(exc).__name__}: {exc}"}

    def status(self) -> PlannerStatus:
        """The last round as the status RPC reports it (``latest`` in typed form)."""
        latest = self.latest
        predictions = tuple(PlannedConfiguration(
            config=str(p["config"]), goodput_per_gpu=float(p.get("goodput_per_gpu") or 0.0),
            attainment_at_offered=float(p.get("attainment_at_offered") or 0.0),
            preemptions_per_request=float(p.get("preemptions_per_request") or 0.0))
            for p in latest.get("predictions") or ())
        applied = latest.get("apply") or {}
        return PlannerStatus(mode=self._config.planner_mode, status=str(latest.get("status", "")),
                             recommended=str(latest.get("recommended") or ""), current=str(latest.get("current") or ""),
                             planned_at=float(latest.get("at") or 0.0), predictions=predictions,
                             apply_status=str(applied.get("status") or ""))

    async def apply(self, result: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        """Act on one planning round (``apply`` mode): switch one worker's role when the applier says so."""
        assert self.applier is not None
        action = self.applier.decide(result, time.time() if now is None else now)
        out: dict[str, Any] = {"status": self.applier.status, "switches": self.applier.num_switches}
        if action is not None:
            try:
                out["switched"] = await self._switch(*action)
            except Exception as exc:  # noqa: BLE001 (no launcher, no worker to spare...: reported, decided anew)
                logger.exception("planner: the role switch failed")
                out["status"] = f"the role switch failed: {type(exc).__name__}: {exc}"
        return out

    async def recommend(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        window = self._config.planner_window_s
        ended = [r for r in self._log.ended_since(now - window) if r.outcome == "finished"][-MAX_REQUESTS:]
        if len(ended) < MIN_REQUESTS:
            return {"status": f"{len(ended)} finished requests in the last {window:g} s; planning needs "
                              f"{MIN_REQUESTS}", "at": now}
        profile = self._profile()
        if profile is None:
            return {"status": "no worker reports a step-time model yet", "at": now}
        arrivals = sorted((r.ended_at - r.e2e_s, r.prompt_tokens, r.output_tokens) for r in ended)
        t0 = arrivals[0][0]
        workload = Workload(tuple(SimRequest(t - t0, p, max(1, o)) for t, p, o in arrivals), "live traffic")
        assert self._config.ttft_slo_ms is not None and self._config.tpot_slo_ms is not None
        workers = max(2, self._num_workers())
        gpus = held_gpus(workers, self._telemetry())
        result = await plan_in_subprocess(profile, workload, gpus, ttft_slo_s=self._config.ttft_slo_ms / 1e3,
                                          tpot_slo_s=self._config.tpot_slo_ms / 1e3, num_workers=workers,
                                          borrow_tokens=self._borrow_tokens())
        result |= {"status": "ok", "at": now, "current": self._current(), "requests": len(ended)}
        logger.info("planner: recommends %s (now %s) for %s", result["recommended"], result["current"],
                    result["workload"])
        return result

    def _borrow_tokens(self) -> int:
        """The workers' ``step_budget_borrow_tokens`` (the most any reports), which the simulation applies."""
        engines = [snapshot.get("engine") or {} for snapshot in self._telemetry().values()]
        return max((int(e.get("step_budget_borrow_tokens") or 0) for e in engines), default=0)

    def _profile(self) -> Profile | None:
        """A worker's step-time model, calibrated by what every worker's recent steps measured: per kind,
        their measured over predicted seconds, pooled over the workers (the start-up profile alone
        predicted a 2xH200 cluster's goodput ~2x too high: live mixed and prefill steps ran 1.25-1.5x
        their synthetic twins)."""
        engines = [snapshot.get("engine") or {} for snapshot in self._telemetry().values()]
        with_model = [e for e in engines if e.get("step_time_model")]
        if not with_model:
            return None
        model = StepTimeModel.from_dict(with_model[0]["step_time_model"], "a worker's telemetry")
        reports = [e.get("step_time_busy") or {} for e in with_model]
        if any(reports):
            factors = pooled_busy_calibration(reports, FIRST_CALIBRATION_STEPS)
        else:  # workers older than this router report no busy time: their schedulers' factors, then
            factors = mean_scheduler_calibration([e.get("step_time_calibration") or {} for e in with_model])
        capacities = [int(e["kv_capacity_tokens"]) for e in with_model if e.get("kv_capacity_tokens")]
        return Profile(model.calibrated(factors),
                       float(with_model[0].get("kv_bytes_per_token") or DEFAULT_KV_BYTES_PER_TOKEN),
                       kv_capacity_tokens=min(capacities) if capacities else None,
                       graph_rows=tuple(int(r) for r in with_model[0].get("graph_rows") or ()))

