"""A 1P1D cluster on two GPUs: the prefill worker writes the KV into the decode worker's cache over CUDA
IPC, and the outputs equal the offline engine's token for token (float32, greedy and seeded). Aborts
in flight leave both workers' block pools consistent. Skipped without two CUDA GPUs."""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.client import Client
from pdserve.cluster.config import cluster_config_from_dict
from pdserve.cluster.launcher import Cluster

pytestmark = [
    pytest.mark.multigpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA GPUs"),
]

ENGINE = {"block_size": 16, "max_model_len": 1024, "num_kv_blocks": 512, "dtype": "float32"}
PROMPTS = ["Hello there, general", "The quick brown fox jumps over the lazy dog " * 9, "a",
           "Disaggregated serving splits prefill from decode, and " * 12]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {k: os.environ[k] for k in ("PDSERVE_CACHE_DIR",) if k in os.environ}
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    config = {"model": "tiny-random", "mode": "disaggregated", "engine": dict(ENGINE),
              "prefill": {"replicas": 1, "gpus_per_worker": 1, "max_batch_tokens": 512},
              "decode": {"replicas": 1, "gpus_per_worker": 1, "max_running_requests": 64},
              "router": {"grpc_port": 0, "request_timeout_s": 120},
              "kv_transfer": {"backend": "auto", "timeout_s": 60}}
    made = Cluster(cluster_config_from_dict(config))
    made.start()
    yield made
    made.check_invariants()
    made.stop()
    ray.shutdown()


def test_outputs_equal_offline_over_cuda_ipc(cluster: Cluster) -> None:
    llm = LLM(model="tiny-random", device="cuda", max_num_batched_tokens=512, **ENGINE)
    for params in (GREEDY, SEEDED):
        expected = [o.token_ids for o in llm.generate(PROMPTS, params)]
        with Client(cluster.router_address, timeout=120) as client:
            got = [client.generate(p, sampling_params=params).token_ids for p in PROMPTS]
        assert got == expected
    decode = next(s for s in cluster.worker_stats() if s["role"] == "decode")
    assert decode["remote_prefills"] >= 2 * len(PROMPTS)
    assert set(decode["kv_peer_transports"].values()) == {"cuda_ipc"}


def test_concurrent_requests_and_cancellations_leave_pools_consistent(cluster: Cluster) -> None:
    prompts = [f"request {i}: " + PROMPTS[i % len(PROMPTS)] for i in range(48)]

    def run(i: int) -> int:
        with Client(cluster.router_address, timeout=120) as client:
            if i % 3:
                return len(client.generate(prompts[i], sampling_params=GREEDY).token_ids)
            for _ in client.generate_stream(prompts[i], sampling_params=GREEDY):
                break  # leave after the first chunk: the stream is cancelled mid-request
            return -1

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        lengths = list(pool.map(run, range(48)))
    assert all(n in (-1, 32) for n in lengths)
    cluster.check_invariants()
