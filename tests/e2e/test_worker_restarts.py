"""Workers come back: a worker process that dies is started again by Ray, the launcher's supervisor points
the router at its new address, and the cluster serves exact outputs again; ``ClusterStatus`` reports
the restart and how long the worker was unusable."""

from __future__ import annotations

import time

import pytest
import ray

from pdserve import SamplingParams
from pdserve.client import Client
from tests.e2e.cluster_support import offline, start_cluster, wait_until_idle

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = ["Hello there", "The capital of France is"]


@pytest.fixture(scope="module")
def cluster(ray_session):
    c = start_cluster("disaggregated")
    yield c
    c.stop()


def _wait_serving_again(client: Client, worker_id: str, restarts: int, timeout_s: float = 60.0):  # noqa: ANN202
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        status = {w.worker_id: w for w in client.cluster_status().workers}
        worker = status[worker_id]
        if worker.restarts >= restarts and worker.healthy:
            return worker
        time.sleep(0.2)
    raise AssertionError(f"{worker_id} did not come back within {timeout_s} s: {status[worker_id]}")


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_a_killed_worker_comes_back_and_serves_exact_outputs(cluster, role: str) -> None:
    expected = offline(PROMPTS, GREEDY)
    handle = next(w for w in cluster.workers if w.role == role)
    with Client(cluster.router_address, timeout=60) as client:
        assert [client.generate(p, sampling_params=GREEDY).token_ids for p in PROMPTS] == expected
        before = {w.worker_id: w.restarts for w in client.cluster_status().workers}[handle.worker_id]
        killed_at = time.monotonic()
        ray.kill(handle.actor, no_restart=False)  # the process dies; Ray starts it again
        worker = _wait_serving_again(client, handle.worker_id, before + 1)
        elapsed = time.monotonic() - killed_at
        assert 0 < worker.last_recovery_s <= elapsed and elapsed < 30.0
        assert worker.address != handle.address
        assert [client.generate(p, sampling_params=GREEDY).token_ids for p in PROMPTS] == expected
    print(f"{role} worker: killed -> serving again in {elapsed:.1f} s (router: {worker.last_recovery_s:.1f} s)")
    for stats in wait_until_idle(cluster):
        assert stats["free_blocks"] == stats["usable_blocks"]
