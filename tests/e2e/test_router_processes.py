"""Several router processes on one port (``router.processes``): the kernel spreads client connections
over them, every one routes to the same workers and answers as the offline engine does, the first's
request log and ``/metrics`` count every process's requests, an operator's action reaching any of them is carried
out by the first, and one that dies comes back."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from pdserve import SamplingParams
from pdserve.client import Client, UnauthenticatedError
from pdserve.cluster.router_processes import process_env
from pdserve.router.router_processes import AdminForwarder
from pdserve.rpc.auth import API_KEYS_ENV, CLUSTER_TOKEN_ENV
from tests.e2e.cluster_support import offline, start_cluster

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [f"Router process story {i}:" for i in range(4)]
#: connections opened one after another; all landing on one of two processes: p = 2 * 2**-24
CONNECTIONS = 24


def _logged(cluster, expected: int) -> tuple[int, int]:  # noqa: ANN001
    """(requests in the first process's log, those the second process served), once the first's log holds
    ``expected`` or 10 s passed: the launcher merges the others' logs into the first's every second."""
    deadline = time.monotonic() + 10
    while len(cluster.router.metrics.log.ended_since(0.0)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    second = ray.get(cluster._extra_routers.actors[0].requests_ended.remote(), timeout=30)
    return len(cluster.router.metrics.log.ended_since(0.0)), second


def _successes_in_metrics(cluster, expected: int) -> float:  # noqa: ANN001
    """``vllm:request_success_total`` (all reasons) in the first process's ``/metrics``, once it reaches
    ``expected`` or 10 s passed (the other processes' samples are merged every second)."""
    deadline = time.monotonic() + 10
    while True:
        text = asyncio.run_coroutine_threadsafe(cluster.router.metrics_text(), cluster._loop).result(30)
        total = sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                    if s.name == "vllm:request_success_total")
        if total >= expected or time.monotonic() > deadline:
            return total
        time.sleep(0.2)


def test_router_processes_share_the_port_and_the_workers(ray_session) -> None:
    expected = offline(PROMPTS, GREEDY)
    cluster = start_cluster("disaggregated", router={"grpc_port": 0, "request_timeout_s": 60, "processes": 2})
    try:
        outputs = []
        for i in range(CONNECTIONS):  # a client each: a connection each
            with Client(cluster.router_address, timeout=60) as client:
                outputs.append(client.generate(PROMPTS[i % len(PROMPTS)], sampling_params=GREEDY).token_ids)
        assert outputs == [expected[i % len(PROMPTS)] for i in range(CONNECTIONS)]
        logged, second = _logged(cluster, CONNECTIONS)
        assert 0 < second < CONNECTIONS, second  # both processes served connections
        assert logged == CONNECTIONS  # ... and the first's log (its dashboard, its planner) counts them all
        assert _successes_in_metrics(cluster, CONNECTIONS) == CONNECTIONS  # ... and so does its /metrics

        # the first process owns the workers; the others forward ScalePool there (its private port)
        forwarder = AdminForwarder(cluster.router.admin_address)
        assert forwarder.scale("decode", 2, None) == ["decode-1"]
        with pytest.raises(ValueError, match="no colocated pool"):
            forwarder.scale("colocated", 2, None)
        before = {s["worker_id"]: s.get("remote_prefills", 0) for s in cluster.worker_stats()}
        for _ in range(CONNECTIONS):  # every process routes to the new worker too
            with Client(cluster.router_address, timeout=60) as client:
                assert client.generate(PROMPTS[0], sampling_params=GREEDY).token_ids == expected[0]
        after = {s["worker_id"]: s.get("remote_prefills", 0) for s in cluster.worker_stats()}
        assert after["decode-1"] > before.get("decode-1", 0)
        with Client(cluster.router_address, timeout=120) as client:  # from whichever process: the same action
            assert client.scale_pool("decode", 1) == ["decode-1"]
        assert [w.worker_id for w in cluster.workers if w.role == "decode"] == ["decode-0"]
        with Client(cluster.router_address, timeout=60) as client:
            assert client.generate(PROMPTS[1], sampling_params=GREEDY).token_ids == expected[1]

        # a router process that dies comes back (Ray restarts it, the supervisor starts its router over the
        # workers as they are now) and takes connections again
        second_process = cluster._extra_routers.actors[0]
        dead_pid = ray.get(second_process.process_id.remote(), timeout=30)
        ray.kill(second_process, no_restart=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if (ray.get(second_process.process_id.remote(), timeout=5) != dead_pid
                        and ray.get(second_process.started.remote(), timeout=5)):
                    break
            except Exception:  # noqa: BLE001 (still restarting)
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("the router process did not come back within 60 s")
        for _ in range(CONNECTIONS):
            with Client(cluster.router_address, timeout=60) as client:
                assert client.generate(PROMPTS[2], sampling_params=GREEDY).token_ids == expected[2]
        assert ray.get(second_process.requests_ended.remote(), timeout=30) > 0  # a fresh log: its new requests
        assert cluster.drain(5.0)
    finally:
        cluster.stop()


def test_every_router_process_asks_for_the_api_key(ray_session, monkeypatch) -> None:  # noqa: ANN001
    # the key is set after Ray started: only what the launcher hands its router processes reaches them
    monkeypatch.setenv(API_KEYS_ENV, "process-key")
    cluster = start_cluster("colocated", router={"grpc_port": 0, "request_timeout_s": 60, "processes": 2})
    try:
        for _ in range(CONNECTIONS // 2):  # both processes get some of these connections
            with (Client(cluster.router_address, timeout=60, api_key="wrong") as client,
                  pytest.raises(UnauthenticatedError)):
                client.generate(PROMPTS[0], sampling_params=GREEDY)
        with Client(cluster.router_address, timeout=60, api_key="process-key") as client:
            assert client.generate(PROMPTS[0], sampling_params=GREEDY).token_ids
    finally:
        cluster.stop()


def test_a_router_process_gets_the_token_and_the_keys_from_the_environment() -> None:
    env = process_env({CLUSTER_TOKEN_ENV: "t", API_KEYS_ENV: "k1,k2", "HOME": "/root"})
    assert env == {CLUSTER_TOKEN_ENV: "t", API_KEYS_ENV: "k1,k2"}
    assert process_env({CLUSTER_TOKEN_ENV: "t"}) == {CLUSTER_TOKEN_ENV: "t"}
