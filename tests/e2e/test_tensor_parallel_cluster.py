"""Tensor-parallel workers in a cluster: a colocated worker whose model is split over two ranks, and a
1P1D pair of two-rank workers (each rank's KV heads stream to the same rank of the decode worker), serve
what the offline (unsplit) engine generates; pools of different degrees are refused with a clear error."""

from __future__ import annotations

import pytest

from pdserve import SamplingParams
from pdserve.client import Client
from pdserve.cluster.config import cluster_config_from_dict
from pdserve.common.errors import ConfigError
from tests.e2e.cluster_support import offline, start_cluster

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [f"Tensor story {i}: in a land" for i in range(4)]


def test_a_two_rank_colocated_worker_serves_what_the_offline_engine_generates(ray_session) -> None:
    expected = offline(PROMPTS, GREEDY)
    cluster = start_cluster("colocated", colocated=1, pool_engines={"colocated": {"tensor_parallel_size": 2}})
    try:
        with Client(cluster.router_address, timeout=60) as client:
            assert [client.generate(p, sampling_params=GREEDY).token_ids for p in PROMPTS] == expected
        (stats,) = cluster.worker_stats()
        assert stats["tensor_parallel_ranks"] == 2 and stats["free_blocks"] == stats["usable_blocks"]
    finally:
        cluster.stop()


def test_two_rank_prefill_and_decode_workers_serve_what_the_offline_engine_generates(ray_session) -> None:
    expected = offline(PROMPTS, GREEDY)
    two = {"tensor_parallel_size": 2}
    cluster = start_cluster("disaggregated", pool_engines={"prefill": two, "decode": two})
    try:
        with Client(cluster.router_address, timeout=60) as client:
            assert [client.generate(p, sampling_params=GREEDY).token_ids for p in PROMPTS] == expected
        stats = {s["worker_id"]: s for s in cluster.worker_stats()}
        assert stats["decode-0"]["remote_prefills"] == len(PROMPTS) and stats["decode-0"]["local_recomputes"] == 0
        assert all(s["tensor_parallel_ranks"] == 2 and s["free_blocks"] == s["usable_blocks"] for s in stats.values())
    finally:
        cluster.stop()


def test_pools_of_different_degrees_are_refused() -> None:
    with pytest.raises(ConfigError, match="must split the model alike"):
        cluster_config_from_dict({"mode": "disaggregated", "prefill": {"engine": {"tensor_parallel_size": 2}}})
