"""Scale out and in while serving (``Cluster.scale``): a new decode worker takes requests; removing one
with streams on it moves them to the other without losing a token; the prefill pool grows and shrinks
too. Every output equals the offline engine's."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve import SamplingParams
from pdserve.client import Client, InvalidArgumentError
from pdserve.common.errors import OutOfCapacityError
from tests.e2e.cluster_support import offline, start_cluster, wait_until_idle

GREEDY = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
PROMPTS = [f"Scaling story {i}: once upon a time" for i in range(6)]


def _streams(cluster, prompts: list[str], started: threading.Barrier) -> tuple[list[threading.Thread], dict, dict]:  # noqa: ANN001
    """One greedy stream per prompt in its own thread; each waits at ``started`` after its third chunk."""
    results: dict[int, list[int]] = {}
    errors: dict[int, Exception] = {}

    def stream(i: int) -> None:
        tokens: list[int] = []
        try:
            with Client(cluster.router_address, timeout=120) as client:
                for n, chunk in enumerate(client.generate_stream(prompts[i], sampling_params=GREEDY)):
                    tokens += chunk.token_ids
                    if n == 2:
                        started.wait()
            results[i] = tokens
        except Exception as exc:  # noqa: BLE001 (reported by the caller)
            errors[i] = exc

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    return threads, results, errors


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

        started = threading.Barrier(len(PROMPTS) + 1, timeout=60)
        threads, results, errors = _streams(cluster, PROMPTS, started)
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
        # workers Ray cannot start in time are killed and none joins: RESOURCE_EXHAUSTED, the pools as they were
        cluster.start_timeout_s = 0.5
        with pytest.raises(OutOfCapacityError, match="could not start 2 more decode worker"):
            cluster.scale("decode", 3)
        assert [w.worker_id for w in cluster.workers if w.role == "decode"] == ["decode-0"]
        assert cluster.router.configuration_name() == "1P1D"
        stats = wait_until_idle(cluster)
        assert all(s["free_blocks"] == s["usable_blocks"] for s in stats)
    finally:
        cluster.stop()


def test_workers_switch_roles_under_load(ray_session) -> None:
    """Elastic roles: a prefill worker becomes a decode worker and a decode worker holding streams becomes
    a prefill worker, each without a restart; no request fails and every output equals the offline one."""
    fresh = [f"Role story {i}: far away" for i in range(4)]  # no worker has their prefixes cached
    reference = offline(PROMPTS + fresh, GREEDY)
    expected, expected_fresh = reference[:len(PROMPTS)], reference[len(PROMPTS):]
    cluster = start_cluster("disaggregated")
    try:
        assert cluster.scale("prefill", 2) == ["prefill-1"]
        address = next(w.address for w in cluster.workers if w.worker_id == "prefill-1")
        with pytest.raises(ValueError, match="cannot become a prefill worker.*it is a prefill worker"):
            cluster.switch_role("prefill-1", "prefill")
        with pytest.raises(ValueError, match="last usable decode or colocated worker"):
            cluster.switch_role("decode-0", "prefill")

        started = threading.Barrier(len(PROMPTS) + 1, timeout=60)
        threads, results, errors = _streams(cluster, PROMPTS, started)
        started.wait()
        t0 = time.perf_counter()
        assert cluster.switch_role("prefill-1", "decode") == "decode-1"  # it held no stream: drains at once
        first_switch_s = time.perf_counter() - t0
        assert cluster.router.configuration_name() == "1P2D"
        assert next(w.address for w in cluster.workers if w.worker_id == "decode-1") == address  # same process
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert [results[i] for i in range(len(PROMPTS))] == expected
        with Client(cluster.router_address, timeout=60) as client, ThreadPoolExecutor(len(fresh)) as pool:
            # at once, so the router spreads them by load: the new decode worker takes some
            outputs = list(pool.map(lambda p: client.generate(p, sampling_params=GREEDY).token_ids, fresh))
        assert outputs == expected_fresh
        by_worker = {s["worker_id"]: s for s in cluster.worker_stats()}
        assert by_worker["decode-1"]["role"] == "decode" and by_worker["decode-1"]["remote_prefills"] > 0, by_worker

        # decode-0 leaves the decode pool with streams on it and no grace: they move to decode-1
        started = threading.Barrier(len(PROMPTS) + 1, timeout=60)
        threads, results, errors = _streams(cluster, PROMPTS, started)
        started.wait()
        t0 = time.perf_counter()
        with Client(cluster.router_address, timeout=120) as client:  # what `pdserve switch` calls
            with pytest.raises(InvalidArgumentError, match="no worker 'decode-9'"):
                client.switch_role("decode-9", "prefill")
            assert client.switch_role("decode-0", "prefill", grace_s=0.0) == "prefill-1"
        second_switch_s = time.perf_counter() - t0
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert [results[i] for i in range(len(PROMPTS))] == expected
        assert cluster.router.configuration_name() == "2P1D"
        with Client(cluster.router_address, timeout=60) as client:
            assert [client.generate(p, sampling_params=GREEDY).token_ids for p in fresh] == expected_fresh
        # what the planner's apply mode calls: the router picks a prefill worker, the launcher switches it
        assert asyncio.run_coroutine_threadsafe(cluster.router.switch_one("prefill", "decode"),
                                                cluster._loop).result(120) == "prefill-0 -> decode-0"
        assert cluster.router.configuration_name() == "1P2D"
        with Client(cluster.router_address, timeout=60) as client:
            assert [client.generate(p, sampling_params=GREEDY).token_ids for p in fresh] == expected_fresh
        # the last prefill worker may go too (the planner's way to colocated x3): the decode workers
        # prefill every prompt themselves, and the cluster keeps serving
        assert asyncio.run_coroutine_threadsafe(cluster.router.switch_one("prefill", "decode"),
                                                cluster._loop).result(120) == "prefill-1 -> decode-2"
        assert cluster.router.configuration_name() == "0P3D" and cluster.router._serving
        with Client(cluster.router_address, timeout=60) as client:
            assert [client.generate(p, sampling_params=GREEDY).token_ids for p in fresh] == expected_fresh
        assert asyncio.run_coroutine_threadsafe(cluster.router.switch_one("decode", "prefill"),
                                                cluster._loop).result(120).endswith("-> prefill-0")
        assert cluster.router.configuration_name() == "1P2D"
        with Client(cluster.router_address, timeout=60) as client:
            assert [client.generate(p, sampling_params=GREEDY).token_ids for p in fresh] == expected_fresh
        stats = wait_until_idle(cluster)
        assert sorted(s["role"] for s in stats) == ["decode", "decode", "prefill"]
        assert all(s["free_blocks"] == s["usable_blocks"] for s in stats)
        print(f"role switches: prefill->decode {first_switch_s:.2f} s, decode->prefill with "
              f"{len(PROMPTS)} streams moved {second_switch_s:.2f} s")
    finally:
        cluster.stop()


def test_a_decode_worker_becomes_colocated_in_a_split_cluster(ray_session) -> None:
    """A real colocated role in a split cluster: a decode worker holding streams switches to colocated
    (same process, no restart), no request fails and every output equals the offline one; afterwards it
    prefills the prompts it gets itself while the other decode worker still takes remote prefills, and
    it can switch back."""
    fresh = [f"Hybrid story {i}: long ago" for i in range(6)]
    reference = offline(PROMPTS + fresh, GREEDY)
    expected, expected_fresh = reference[:len(PROMPTS)], reference[len(PROMPTS):]
    cluster = start_cluster("disaggregated", decode=2)
    try:
        started = threading.Barrier(len(PROMPTS) + 1, timeout=60)
        threads, results, errors = _streams(cluster, PROMPTS, started)
        started.wait()
        assert cluster.switch_role("decode-1", "colocated", grace_s=0.0) == "colocated-0"
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert [results[i] for i in range(len(PROMPTS))] == expected
        before = {s["worker_id"]: s for s in cluster.worker_stats()}
        with Client(cluster.router_address, timeout=60) as client, ThreadPoolExecutor(len(fresh)) as pool:
            outputs = list(pool.map(lambda p: client.generate(p, sampling_params=GREEDY).token_ids, fresh))
        assert outputs == expected_fresh
        after = {s["worker_id"]: s for s in cluster.worker_stats()}
        hybrid, decode = after["colocated-0"], after["decode-0"]
        assert hybrid["role"] == "colocated" and hybrid["remote_prefills"] == 0
        assert hybrid["prompt_tokens_computed"] > before["colocated-0"]["prompt_tokens_computed"], after
        assert decode["remote_prefills"] > before["decode-0"]["remote_prefills"], after
        assert cluster.switch_role("colocated-0", "decode") == "decode-1"
        with Client(cluster.router_address, timeout=60) as client:
            assert [client.generate(p, sampling_params=GREEDY).token_ids for p in fresh[:2]] == expected_fresh[:2]
        stats = wait_until_idle(cluster)
        assert all(s["free_blocks"] == s["usable_blocks"] for s in stats)
    finally:
        cluster.stop()
