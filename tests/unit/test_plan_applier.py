"""The planner's apply mode: when a planning round turns into a role switch (hysteresis, gain, dwell)."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.common.errors import ConfigError
from pdserve.router.config import RouterConfig
from pdserve.router.online_planner import OnlinePlanner
from pdserve.router.plan_applier import ApplyConfig, PlanApplier, prefill_count, split_prefill_count
from pdserve.router.request_log import RequestLog


def _round(current: str, goodput: dict[str, float]) -> dict:
    return {"status": "ok", "current": current,
            "predictions": [{"config": c, "goodput_per_gpu": g, "attainment_at_offered": 0.9} for c, g in goodput.items()]}


PREFILL_HEAVY = {"colocated x4": 4.0, "1P3D": 3.0, "2P2D": 5.0, "3P1D": 6.0}


def test_a_better_split_must_be_confirmed_then_moves_one_worker() -> None:
    applier = PlanApplier(ApplyConfig(dwell_s=100.0, confirmations=2, min_gain=0.1))
    assert applier.decide(_round("2P2D", PREFILL_HEAVY), now=0.0) is None  # 1 of 2 rounds
    assert "1/2" in applier.status
    # towards the best split (3P1D): one prefill worker more
    assert applier.decide(_round("2P2D", PREFILL_HEAVY), now=30.0) == ("decode", "prefill")
    assert applier.num_switches == 1
    # confirmed again, but within the dwell time of the last switch
    assert applier.decide(_round("2P2D", PREFILL_HEAVY), now=60.0) is None
    assert applier.decide(_round("2P2D", PREFILL_HEAVY), now=90.0) is None and "too recent" in applier.status
    assert applier.decide(_round("2P2D", PREFILL_HEAVY), now=131.0) == ("decode", "prefill")


def test_small_gains_changing_targets_and_colocated_clusters_do_nothing() -> None:
    applier = PlanApplier(ApplyConfig(dwell_s=0.0, confirmations=2, min_gain=0.25))
    assert applier.decide(_round("2P2D", PREFILL_HEAVY), now=0.0) is None  # 6.0 < 5.0 * 1.25
    assert applier.decide(_round("2P2D", PREFILL_HEAVY), now=1.0) is None and "keeping 2P2D" in applier.status
    applier = PlanApplier(ApplyConfig(dwell_s=0.0, confirmations=2, min_gain=0.0))
    assert applier.decide(_round("2P2D", {"1P3D": 6.0, "2P2D": 5.0}), now=0.0) is None
    assert applier.decide(_round("2P2D", {"3P1D": 6.0, "2P2D": 5.0}), now=1.0) is None  # a new target: 1/2
    assert applier.decide(_round("2P2D", {"3P1D": 6.0, "2P2D": 5.0}), now=2.0) == ("decode", "prefill")
    assert applier.decide(_round("3P1D", {"2P2D": 5.0, "1P3D": 8.0, "3P1D": 4.0}), now=3.0) is None
    assert applier.decide(_round("3P1D", {"2P2D": 5.0, "1P3D": 8.0, "3P1D": 4.0}), now=4.0) == ("prefill", "decode")
    assert applier.decide(_round("colocated x2", {"colocated x2": 5.0, "1P1D": 9.0}), now=5.0) is None
    assert "colocated" in applier.status
    assert applier.decide({"status": "3 finished requests"}, now=6.0) is None
    assert (prefill_count("3P1D"), prefill_count("colocated x2")) == (3, None)


def test_a_split_cluster_runs_colocated_as_decode_workers_that_prefill_themselves() -> None:
    """colocated xN is a candidate for a split cluster: it gets there by moving its prefill workers to
    the decode pool (0PnD, every prompt prefilled on its decode worker), and back the same way."""
    applier = PlanApplier(ApplyConfig(dwell_s=0.0, confirmations=1, min_gain=0.1))
    short_prompts = {"colocated x2": 9.0, "1P1D": 6.0}
    assert applier.decide(_round("1P1D", short_prompts), now=0.0) == ("prefill", "decode")
    assert "towards colocated x2" in applier.status
    assert applier.decide(_round("0P2D", short_prompts), now=1.0) is None  # there: 0P2D is colocated x2
    assert "keeping 0P2D" in applier.status
    assert applier.decide(_round("0P2D", {"colocated x2": 5.0, "1P1D": 8.0}), now=2.0) == ("decode", "prefill")
    assert (split_prefill_count("colocated x3"), split_prefill_count("2P1D"), split_prefill_count("x")) == (0, 2, None)


def test_apply_settings_are_validated() -> None:
    assert RouterConfig(planner_mode="apply").apply_config == ApplyConfig()
    for bad in ({"planner_confirmations": 0}, {"planner_min_gain": -0.1}, {"planner_dwell_s": -1.0},
                {"planner_mode": "act"}):
        with pytest.raises(ConfigError):
            RouterConfig(**bad)


def test_the_online_planner_switches_through_the_router_in_apply_mode() -> None:
    calls: list[tuple[str, str]] = []

    async def switch(from_role: str, to_role: str) -> str:
        calls.append((from_role, to_role))
        return "decode-1 -> prefill-2"

    config = RouterConfig(planner_mode="apply", planner_confirmations=1, planner_dwell_s=0.0, ttft_slo_ms=250.0,
                          tpot_slo_ms=20.0)
    planner = OnlinePlanner(config, RequestLog(), lambda: 4, lambda: {}, lambda: "2P2D", switch)

    async def scenario() -> list[dict]:
        done = [await planner.apply(_round("2P2D", PREFILL_HEAVY), now=0.0)]
        return done + [await planner.apply(_round("3P1D", {"3P1D": 6.0, "2P2D": 5.0}), now=1.0)]

    first, second = asyncio.run(scenario())
    assert calls == [("decode", "prefill")] and first["switched"] == "decode-1 -> prefill-2"
    assert first["switches"] == 1 and "switched" not in second and "keeping 3P1D" in second["status"]
    recommend_only = OnlinePlanner(RouterConfig(), RequestLog(), lambda: 2, lambda: {}, lambda: "1P1D", switch)
    assert recommend_only.applier is None
