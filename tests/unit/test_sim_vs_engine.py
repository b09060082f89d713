"""``benchmarks.sim_vs_engine``: the simulation fed a live run's requests, by prompt length."""

from __future__ import annotations

from benchmarks.sim_vs_engine import compare
from pdserve.common.step_model import StepShape, StepTimeModel


def test_each_request_arrives_when_the_engine_got_it_and_its_ttft_counts_from_its_offset() -> None:
    model = StepTimeModel(base_s=2e-3, per_token_s=20e-6, free_tokens=64)
    requests = [{"arrival_s": 0.0, "added_s": 0.0, "prompt_tokens": 500, "output_tokens": 4, "ttft_s": 0.02,
                 "prompt_steps": 1},
                {"arrival_s": 1.0, "added_s": 1.05, "prompt_tokens": 1500, "output_tokens": 4, "ttft_s": 0.1,
                 "prompt_steps": 1}]
    payload = {"model": model.to_dict(), "graph_rows": [],
               "live": [{"workload": "trace", "rate": 1.0, "calibration": {"prefill": 1.0}, "per_request": requests}]}
    (run,) = compare(payload, max_running=8)
    rows = {r["prompt_tokens"]: r for r in run["rows"]}
    assert set(rows) == {"0-1000", "1000-2000"}
    short, late = rows["0-1000"], rows["1000-2000"]
    assert short["live_ttft_ms_p50"] == 20.0 and short["start-up model: prompt_steps"] == 1
    # added 50 ms after its offset, alone on the worker: its simulated TTFT is those 50 ms and its prefill
    alone_s = model.predict(StepShape.of([], [(1500, 0)]))
    assert late["start-up model: ttft_ms_p50"] == round(1e3 * (0.05 + alone_s), 1)
