"""Tensor-parallel workers in a cluster: a colocated worker whose model is split over two ranks, a 1P1D
pair of two-rank workers (each rank's KV heads stream to the same rank of the decode worker), and pairs
of different degrees (KV moved by group of heads: each decode rank receives exactly the heads it owns)
serve what the offline (unsplit) engine generates; degrees that do not divide one another are refused."""

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


@pytest.mark.parametrize(("prefill_ranks", "decode_ranks"), [(2, 2), (2, 1), (1, 2)])
def test_prefill_and_decode_workers_of_any_degrees_serve_what_the_offline_engine_generates(
        ray_session, prefill_ranks: int, decode_ranks: int) -> None:
    expected = offline(PROMPTS, GREEDY)
    # the pool-level key (the colocated test above sets the same through the pool's engine settings)
    cluster = start_cluster("disaggregated", pool_settings={"prefill": {"tensor_parallel_size": prefill_ranks},
                                                            "decode": {"tensor_parallel_size": decode_ranks}})
    try:
        assert cluster.config.kv_transfer.head_groups == max(prefill_ranks, decode_ranks)
        with Client(cluster.router_address, timeout=60) as client:
            assert [client.generate(p, sampling_params=GREEDY).token_ids for p in PROMPTS] == expected
        stats = {s["worker_id"]: s for s in cluster.worker_stats()}
        assert stats["decode-0"]["remote_prefills"] == len(PROMPTS) and stats["decode-0"]["local_recomputes"] == 0, stats
        assert stats["prefill-0"]["tensor_parallel_ranks"] == prefill_ranks
        assert stats["decode-0"]["tensor_parallel_ranks"] == decode_ranks
        assert all(s["free_blocks"] == s["usable_blocks"] for s in stats.values())
    finally:
        cluster.stop()


def test_degrees_that_do_not_divide_one_another_are_refused() -> None:
    with pytest.raises(ConfigError, match="must divide one another"):
        cluster_config_from_dict({"mode": "disaggregated", "prefill": {"engine": {"tensor_parallel_size": 2}},
                                  "decode": {"engine": {"tensor_parallel_size": 3}}})
    with pytest.raises(ConfigError, match="must divide one another"):
        cluster_config_from_dict({"mode": "disaggregated", "prefill": {"tensor_parallel_size": 3},
                                  "decode": {"tensor_parallel_size": 2}})
