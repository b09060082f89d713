"""Cache-aware routing on a real cluster: with prefix affinity, requests sharing a prefix go to the worker
that has it cached, so every request after the first reports the prefix as cached prompt tokens."""

from __future__ import annotations

from pdserve.client import Client
from tests.e2e.cluster_support import start_cluster, wait_until_idle


def test_shared_prefix_hits_the_cache_on_the_worker_that_has_it(ray_session) -> None:
    cluster = start_cluster("colocated", colocated=2,
                            router={"grpc_port": 0, "request_timeout_s": 60, "prefix_affinity_weight": 1.0})
    try:
        prefix = [(7 * i) % 200 + 5 for i in range(128)]  # 8 full blocks of 16
        prompts = [prefix + [210 + i] for i in range(4)]
        with Client(cluster.router_address, timeout=60) as client:
            outs = [client.generate(prompt_token_ids=p, max_tokens=3, temperature=0.0, ignore_eos=True) for p in prompts]
        assert outs[0].usage.cached_prompt_tokens == 0
        assert [o.usage.cached_prompt_tokens for o in outs[1:]] == [128, 128, 128]
        stats = wait_until_idle(cluster)
        assert sorted(s["prompt_tokens_computed"] for s in stats) == [0, 129 + 3]  # one worker did it all
    finally:
        cluster.check_invariants()
        cluster.stop()
