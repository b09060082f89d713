"""Scale out and in while serving (``Cluster.scale``): a new decode worker takes requests; removing one
with streams on it moves them to the other without losing a token; the prefill pool grows and shrinks
too. Every output equals the offline engine's."""

from __future__ import annotations

import threading

import pytest

from pdserve import SamplingParams
from pdserve.client import Client, InvalidArgumentError
from tests.e2e.cluster_support import offline, start_cluster, wait_until_idle

GREEDY = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
PROMPTS = [f"Scaling story {i}: once upon a time" for i in range(6)]


def test_pools_grow_and_shrink_under_load(ray_session) -> None:
    expected = offline(PROMPTS, GREEDY)
    cluster = start_cluster("disaggregated")
    try:
        assert cluster.scale("decode", 2) == ["decode-1"]
        assert cluster.router.configuration_name() == "1P2D"
        with Client(cluster.router_address, timeout=60) as client:
            assert [client.generate(p, sampling_params=GREEDY).token_ids for p in PROMPTS] == expected
        by_worker = {s["worker_id"]: s.get("remote_prefills", 0) for s in cluster.worker_stats()}
        assert by_worker["decode-0"] > 0 and by_worker["decode-1"] > 0  # the new worker takes requests

        results: dict[int, list[int]] = {}
        errors: dict[int, Exception] = {}
        started = threading.Barrier(len(PROMPTS) + 1, timeout=60)

        def stream(i: int) -> None:
            tokens: list[int] = []
            try:
                with Client(cluster.router_address, timeout=120) as client:
                    for n, chunk in enumerate(client.generate_stream(PROMPTS[i], sampling_params=GREEDY)):
                        tokens += chunk.token_ids
                        if n == 2:
                            started.wait()
                results[i] = tokens
            except Exception as exc:  # noqa: BLE001 (reported below)
                errors[i] = exc

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        started.wait()
        # decode-1 leaves with streams on it and no time to finish them: they move to decode-0
        assert cluster.scale("decode", 1, grace_s=0.0) == ["decode-1"]
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert [results[i] for i in range(len(PROMPTS))] == expected
        assert [w.worker_id for w in cluster.workers if w.role == "decode"] == ["decode-0"]

        with Client(cluster.router_address, timeout=120) as client:  # what `pdserve scale` calls
            assert client.scale_pool("prefill", 2) == ["prefill-1"]
            assert client.scale_pool("prefill", 1) == ["prefill-1"]
            with pytest.raises(InvalidArgumentError, match="no colocated pool"):
                client.scale_pool("colocated", 2)
            assert client.generate(PROMPTS[0], sampling_params=GREEDY).token_ids == expected[0]
        assert cluster.router.configuration_name() == "1P1D"
        stats = wait_until_idle(cluster)
        assert all(s["free_blocks"] == s["usable_blocks"] for s in stats)
    finally:
        cluster.stop()
