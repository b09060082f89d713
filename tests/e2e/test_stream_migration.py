"""Streams survive their decode worker: a worker killed mid-stream (its process dies, Ray restarts it)
and every stream it held continues on another decode worker, or on the restarted one, from the tokens
already sent; the client sees one stream equal to the offline engine's greedy output."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from pdserve import SamplingParams
from pdserve.client import Client
from tests.e2e.cluster_support import offline, start_cluster, wait_until_idle

GREEDY = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
PROMPTS = [f"Story number {i}: once upon a time" for i in range(10)]


def _stream_all(address: str, prompts: list[str], started: threading.Barrier, results: dict, errors: dict) -> list:
    def one(i: int) -> None:
        tokens: list[int] = []
        try:
            with Client(address, timeout=120) as client:
                for n, chunk in enumerate(client.generate_stream(prompts[i], sampling_params=GREEDY)):
                    tokens += chunk.token_ids
                    if n == 2:
                        started.wait(60)
                    final = chunk
                results[i] = (tokens, final.finish_reason, final.usage)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors[i] = exc
            started.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    return threads


def _idle_stats(cluster, timeout_s: float = 60.0) -> list:  # noqa: ANN001
    """Stats of every worker once idle, waiting for the killed one to be back."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            return wait_until_idle(cluster, timeout=max(1.0, end - time.monotonic()))
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_streams_continue_after_their_decode_worker_dies(ray_session, mode: str) -> None:
    expected = offline(PROMPTS, GREEDY)
    cluster = start_cluster(mode, decode=2, colocated=2)
    try:
        results: dict = {}
        errors: dict = {}
        started = threading.Barrier(len(PROMPTS) + 1)
        threads = _stream_all(cluster.router_address, PROMPTS, started, results, errors)
        started.wait(60)  # every stream has its first tokens
        stats = cluster.worker_stats()
        decoders = [(s["unfinished"], w) for s, w in zip(stats, cluster.workers, strict=True) if w.role != "prefill"]
        held, victim = max(decoders, key=lambda d: d[0])
        assert held > 0
        ray.kill(victim.actor, no_restart=False)
        for t in threads:
            t.join(180)
        assert not errors, errors
        assert sorted(results) == list(range(len(PROMPTS)))
        for i, (tokens, finish, usage) in results.items():
            assert tokens == expected[i], f"stream {i} differs after the move"
            assert finish == "length" or getattr(finish, "value", finish) == "length"
            assert usage.completion_tokens == GREEDY.max_tokens
        for s in _idle_stats(cluster):
            assert s["free_blocks"] == s["usable_blocks"]
        print(f"{mode}: {held} streams moved off {victim.worker_id}")
    finally:
        cluster.stop()


def test_without_migration_the_streams_of_a_lost_worker_fail_unavailable(ray_session) -> None:
    from pdserve.client.errors import UnavailableError

    cluster = start_cluster("colocated", colocated=2,
                            router={"grpc_port": 0, "request_timeout_s": 60, "max_stream_migrations": 0})
    try:
        results: dict = {}
        errors: dict = {}
        prompts = PROMPTS[:4]
        started = threading.Barrier(len(prompts) + 1)
        threads = _stream_all(cluster.router_address, prompts, started, results, errors)
        started.wait(60)
        stats = cluster.worker_stats()
        held, victim = max(((s["unfinished"], w) for s, w in zip(stats, cluster.workers, strict=True)),
                           key=lambda d: d[0])
        ray.kill(victim.actor, no_restart=False)
        for t in threads:
            t.join(180)
        assert len(errors) == held and all(isinstance(e, UnavailableError) for e in errors.values()), errors
        assert len(results) == len(prompts) - held
    finally:
        cluster.stop()
