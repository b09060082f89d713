"""A disaggregated cluster with SLOs (``slo: {ttft_ms, tpot_ms}``): prompts the prefill pool would serve
too late are prefilled by their decode worker inside its step-time budget, the rest go to the pool;
either way outputs equal the offline engine's, token for token.

The workers' step-time models come from profiles here, so the placement is deterministic: the prefill
worker is declared slow (~380 prompt tokens/s), so a prompt of more than ~90 tokens would miss the
250 ms TTFT there, while the decode worker is declared fast. (The router, which has no tokenizer,
counts a text prompt as one token per 4 characters: the long prompts here are over 360 characters.)"""

from __future__ import annotations

import json

import pytest

from pdserve import SamplingParams
from pdserve.client import Client
from tests.e2e.cluster_support import offline, start_cluster, wait_until_idle

SHORT = ["Hello there", "a", "The capital of France is"]
LONG = ["Disaggregated serving splits prefill from decode, and " * 8, "x" * 450]  # > 360 characters
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(ray_session, tmp_path_factory):
    profiles = tmp_path_factory.mktemp("profiles")
    slow, fast = profiles / "slow.json", profiles / "fast.json"
    slow.write_text(json.dumps({"base_s": 0.04, "per_token_s": 0.0025, "free_tokens": 0}))
    fast.write_text(json.dumps({"base_s": 1e-4, "per_token_s": 1e-6, "free_tokens": 0}))
    c = start_cluster("disaggregated", slo={"ttft_ms": 250, "tpot_ms": 50},
                      pool_engines={"prefill": {"step_time_profile": str(slow)},
                                    "decode": {"step_time_profile": str(fast)}})
    yield c
    c.check_invariants()
    c.stop()


def test_long_prompts_spill_to_the_decode_worker_and_outputs_stay_exact(cluster) -> None:
    prompts = SHORT + LONG
    with Client(cluster.router_address, timeout=60) as client:
        got = [client.generate(p, sampling_params=GREEDY).token_ids for p in prompts]
    assert got == offline(prompts, GREEDY)
    stats = {s["worker_id"]: s for s in wait_until_idle(cluster)}
    decode = next(s for w, s in stats.items() if w.startswith("decode"))
    prefill = next(s for w, s in stats.items() if w.startswith("prefill"))
    assert decode["remote_prefills"] == len(SHORT)  # the short prompts went to the pool
    long_tokens = sum(len(p) for p in LONG)  # byte tokenizer: one token per character
    assert decode["prompt_tokens_computed"] >= long_tokens  # the long ones were prefilled locally
    assert prefill["prompt_tokens_computed"] < long_tokens
    assert all(s["free_blocks"] == s["usable_blocks"] for s in stats.values())
    # each worker reports the busy time of its steps against its step-time model, which the planner pools:
    # the prefill worker's steps are priced by its (slow) profile; every kind reported ran steps
    import asyncio

    cluster.router.telemetry.refreshed_at = 0.0
    asyncio.run_coroutine_threadsafe(cluster.router.metrics_text(), cluster._loop).result(30)  # fresh snapshots
    engines = {w: s["engine"] for w, s in cluster.router.telemetry.snapshots.items()}
    assert len(engines) == 2 and all(e["step_time_model"] is not None and e["step_time_busy"] for e in engines.values())
    for engine in engines.values():
        for busy in engine["step_time_busy"].values():
            assert busy["steps"] > 0 and busy["measured_s"] > 0 and busy["profiled_s"] > 0
