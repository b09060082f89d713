"""Prefill and decode workers of different tensor-parallel degrees on GPUs: each rank's KV cache sits on
its own GPU, and the prefill worker writes every rank's heads into the decode rank that owns them over
CUDA IPC. Outputs equal the offline engine's token for token (float32, greedy). A pool of one degree
and one of twice it need three GPUs; with two, Ray is given four GPU ids that name the two GPUs twice
(``CUDA_VISIBLE_DEVICES`` of its processes), so the prefill and decode workers share them (a worker of
two ranks gets two distinct GPUs as long as Ray hands it ids 0 and 1 or 2 and 3, which it does first
come first served). Skipped with one GPU (the transport itself is checked there, in
``test_kvtransfer_tp_gpu.py``)."""

from __future__ import annotations

import os

import pytest
import torch

from pdserve import LLM
from pdserve.client import Client
from pdserve.cluster.config import cluster_config_from_dict
from pdserve.cluster.launcher import Cluster
from tests.gpu.test_cluster_gpu import (  # the 1P1D GPU test's model, prompts and sampling
    ENGINE,
    GREEDY,
    PROMPTS,
)

pytestmark = [
    pytest.mark.multigpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA GPUs"),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("prefill_gpus", "decode_gpus"), [(2, 1), (1, 2)])
def test_pools_of_different_degrees_serve_what_the_offline_engine_generates(prefill_gpus: int,
                                                                            decode_gpus: int) -> None:
    import ray

    expected = [o.token_ids for o in LLM(model="tiny-random", device="cuda", max_num_batched_tokens=512,
                                         **ENGINE).generate(PROMPTS, GREEDY)]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {k: os.environ[k] for k in ("PDSERVE_CACHE_DIR",) if k in os.environ}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    ids = 4 if len(gpus) < prefill_gpus + decode_gpus else prefill_gpus + decode_gpus
    # (this process's CUDA is initialised already: the changed variable reaches Ray's processes only)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i % len(gpus)] for i in range(ids))
    try:
        ray.init(num_cpus=8, num_gpus=ids, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
    finally:
        if visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    config = {"model": "tiny-random", "mode": "disaggregated", "engine": dict(ENGINE),
              "prefill": {"replicas": 1, "gpus_per_worker": prefill_gpus, "max_batch_tokens": 512},
              "decode": {"replicas": 1, "gpus_per_worker": decode_gpus, "max_running_requests": 64},
              "router": {"grpc_port": 0, "request_timeout_s": 120},
              "kv_transfer": {"backend": "auto", "timeout_s": 60}}
    cluster = Cluster(cluster_config_from_dict(config))
    try:
        cluster.start()
        with Client(cluster.router_address, timeout=120) as client:
            assert [client.generate(p, sampling_params=GREEDY).token_ids for p in PROMPTS] == expected
        stats = {s["role"]: s for s in cluster.worker_stats()}
        assert stats["decode"]["remote_prefills"] == len(PROMPTS) and stats["decode"]["local_recomputes"] == 0
        assert set(stats["decode"]["kv_peer_transports"].values()) == {"cuda_ipc"}
        assert stats["prefill"]["tensor_parallel_ranks"] == prefill_gpus
        assert stats["decode"]["tensor_parallel_ranks"] == decode_gpus
        cluster.check_invariants()
    finally:
        cluster.stop()
        ray.shutdown()
