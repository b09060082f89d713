"""The serving benchmark's load generator against a real CPU cluster (CI-sized smoke run)."""

from __future__ import annotations

import ray

from benchmarks.serving.handoff import PHASES, breakdown
from benchmarks.serving.point import measure_point
from benchmarks.serving.workload import fixed_workload, poisson_schedule
from tests.e2e.cluster_support import start_cluster


def test_serving_benchmark_smoke(ray_session) -> None:
    cluster = start_cluster("disaggregated")
    try:
        specs = fixed_workload(6, input_len=40, output_len=8, seed=1, vocab=250)
        summary = measure_point(cluster.router_address, specs, poisson_schedule(6, 4.0, seed=1),
                                "smoke", [(5.0, 1.0)], client_processes=2)  # from processes of their own
        timings = {w.role: ray.get(w.actor.timings.remote()) for w in cluster.workers}
    finally:
        cluster.stop()
    assert summary["errors"] == 0 and summary["requests"] == 6
    assert all(r["num_output_tokens"] == 8 for r in summary["records"])
    # two load generators ran every other request; one run again, in schedule order
    assert summary["client_processes"] == 2 and [r["index"] for r in summary["records"]] == list(range(6))
    assert summary["client_process_cores"] > 0
    assert summary["slo_attainment"]["ttft<=5000ms,tpot<=1000ms"] == 1.0
    assert summary["ttft_s"]["p50"] > 0 and summary["tpot_s"]["p50"] > 0
    assert summary["router_process_cores"] > 0  # this process runs the router, which relayed every token
    assert summary["error_kinds"] == {} and summary["arrivals_over_e2e"] > 0
    first = summary["load_series"][0]  # the router's view of the workers, sampled during the run
    assert len(first) == 4 + 6 * 2 and {"prefill", "decode"} <= {str(v).split("-")[0] for v in first[4::6]}, first
    lags = summary["loop_lag_max_ms"]  # every event loop on the way reports how late it runs
    assert set(lags) == {"router", "router gc", *first[4::6]} and all(v >= 0 for v in lags.values()), lags
    phases = breakdown(timings, "smoke", summary["records"], summary["wall_start"])
    assert phases["remote_prefills"] == 6, phases  # every prompt of 40 tokens went to the prefill worker
    for name, _, _ in PHASES:  # every phase of the handoff is stamped on both sides, in order
        assert phases[name] is not None and phases[name] >= 0, (name, phases)
    landing_parts = ("finish_call_ms", "finish_push_ms", "finish_delivery_ms", "completion_ms")
    assert abs(sum(phases[p] for p in landing_parts) - phases["kv_landing_ms"]) < max(5.0, 0.5 * phases["kv_landing_ms"])
