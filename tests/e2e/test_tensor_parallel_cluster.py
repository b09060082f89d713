"""A tensor-parallel worker in a cluster: a colocated worker whose model is split over two ranks serves
what the offline (unsplit) engine generates; P/D pools refuse tensor parallelism with a clear error."""

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


def test_disaggregated_pools_refuse_tensor_parallelism() -> None:
    with pytest.raises(ConfigError, match="colocated mode only"):
        cluster_config_from_dict({"mode": "disaggregated", "prefill": {"engine": {"tensor_parallel_size": 2}}})
