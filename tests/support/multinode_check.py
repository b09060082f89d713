"""A pdserve cluster on a real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``:
a head without CPUs and two worker nodes, each a raylet with its own node id and resources), run as
its own process so it never meets the test session's Ray instance. Prints one JSON line of findings
for ``tests/e2e/test_multinode.py``:

* ``pinned_placement``: with ``ray_resources`` per pool (node 0 advertises ``pdserve_prefill``, node 1
  ``pdserve_decode``, as a Kubernetes worker group per pool would), each pool on its own node;
* ``placement``: worker id -> node (index of the worker node), with ``placement.pack_pairs``: every
  prefill worker must share its node with the decode worker of the same index, and the pools span
  both nodes;
* ``outputs_match``: greedy outputs through the router equal the offline engine's, token for token;
* ``transports``: how each decode worker's peers send (gloo between CPU processes, also across nodes),
  and ``peers``: how many prefill workers sent to it (1: the router kept every prompt on the node);
* after one worker node is removed while streams run: ``unhealthy`` (that node's workers, as the
  router sees them), ``streams``: how each stream ended (``ok`` or the error) and ``hung`` (none may).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import ray
from ray.cluster_utils import Cluster as RayCluster

from pdserve import LLM, SamplingParams
from pdserve.client import Client
from pdserve.cluster.config import cluster_config_from_dict
from pdserve.cluster.launcher import Cluster

ENGINE = {"block_size": 16, "max_model_len": 512, "num_kv_blocks": 1024}
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
PROMPTS = [f"Node test {i}: the quick brown fox" for i in range(4)]


def _stream(address: str, prompt: str, started: threading.Event, out: dict[str, Any], key: int) -> None:
    try:
        with Client(address, timeout=120) as client:
            tokens: list[int] = []
            for chunk in client.generate_stream(prompt, sampling_params=LONG):
                tokens += chunk.token_ids
                started.set()
            out[key] = "ok" if len(tokens) == LONG.max_tokens else f"short: {len(tokens)} tokens"
    except Exception as exc:  # noqa: BLE001 (reported)
        out[key] = f"{type(exc).__name__}: {str(exc)[:200]}"


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray_cluster = RayCluster(initialize_head=True, head_node_args={"num_cpus": 0})
    # node 0 advertises the prefill pool's resource, node 1 the decode pool's (a worker group per pool)
    nodes = [ray_cluster.add_node(num_cpus=2, resources={f"pdserve_{role}": 2}) for role in ("prefill", "decode")]
    ray_cluster.wait_for_nodes()
    ray.init(address=ray_cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"PDSERVE_CACHE_DIR": os.environ.get("PDSERVE_CACHE_DIR", "")}})
    node_index = {n.node_id: i for i, n in enumerate(nodes)}
    findings: dict[str, Any] = {"nodes": len(nodes)}
    expected = [o.token_ids for o in LLM(model="tiny-random", **ENGINE, max_num_batched_tokens=256).generate(
        PROMPTS * 2, GREEDY)]
    # pools pinned to their node groups by ray_resources
    pinned = Cluster(cluster_config_from_dict({
        "model": "tiny-random", "mode": "disaggregated", "engine": dict(ENGINE), "max_worker_restarts": 0,
        "prefill": {"replicas": 1, "max_batch_tokens": 256, "ray_resources": {"pdserve_prefill": 1}},
        "decode": {"replicas": 1, "max_running_requests": 64, "ray_resources": {"pdserve_decode": 1}},
        "router": {"grpc_port": 0, "request_timeout_s": 60}, "kv_transfer": {"backend": "auto", "timeout_s": 20}}))
    try:
        address = pinned.start()
        findings["pinned_placement"] = {w: node_index.get(n, -1) for w, n in pinned.worker_nodes().items()}
        with Client(address, timeout=60) as client:
            findings["pinned_outputs_match"] = client.generate(PROMPTS[0], sampling_params=GREEDY).token_ids == expected[0]
    finally:
        pinned.stop()
    config = cluster_config_from_dict({
        "model": "tiny-random", "mode": "disaggregated", "engine": dict(ENGINE), "max_worker_restarts": 0,
        "prefill": {"replicas": 2, "max_batch_tokens": 256}, "decode": {"replicas": 2, "max_running_requests": 64},
        "router": {"grpc_port": 0, "request_timeout_s": 60, "no_worker_wait_s": 2, "health_check_interval_s": 0.5},
        "kv_transfer": {"backend": "auto", "timeout_s": 20}, "placement": {"pack_pairs": True}})
    cluster = Cluster(config)
    try:
        address = cluster.start()
        placement = {w: node_index.get(n, -1) for w, n in cluster.worker_nodes().items()}
        findings["placement"] = placement
        with Client(address, timeout=60) as client:
            got = [client.generate(p, sampling_params=GREEDY).token_ids for p in PROMPTS * 2]
        findings["outputs_match"] = got == expected
        decode_stats = [s for s in cluster.worker_stats() if s["role"] == "decode"]
        findings["transports"] = {s["worker_id"]: sorted(set(s["kv_peer_transports"].values())) for s in decode_stats}
        # the router sends each decode worker's prompts to the prefill worker on its node
        findings["peers"] = {s["worker_id"]: len(s["kv_peer_transports"]) for s in decode_stats}
        # one worker node goes away while streams run on both
        doomed = 1
        results: dict[int, str] = {}
        started = threading.Event()
        threads = [threading.Thread(target=_stream, args=(address, f"stream {i}: once upon a time", started,
                                                          results, i)) for i in range(6)]
        for t in threads:
            t.start()
        started.wait(60)
        time.sleep(0.5)
        ray_cluster.remove_node(nodes[doomed])
        deadline = time.monotonic() + 150
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        findings["hung"] = sum(t.is_alive() for t in threads)
        findings["streams"] = [results.get(i, "no result") for i in range(len(threads))]
        router = cluster.router
        assert router is not None
        end = time.monotonic() + 20
        gone = [w for w, n in placement.items() if n == doomed]
        while time.monotonic() < end and any(router.registry.get(w).routable for w in gone):
            time.sleep(0.2)
        findings["unhealthy"] = sorted(w for w in placement if not router.registry.get(w).routable)
        with Client(address, timeout=60) as client:  # the surviving node still serves
            findings["after"] = client.generate(PROMPTS[0], sampling_params=GREEDY).token_ids == expected[0]
    finally:
        try:
            cluster.stop()
        finally:
            ray.shutdown()
            ray_cluster.shutdown()
    print("FINDINGS " + json.dumps(findings), flush=True)


if __name__ == "__main__":
    main()
