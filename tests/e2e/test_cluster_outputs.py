"""Clusters on Ray (1P1D, 2P1D, colocated) give the offline engine's outputs token for token, through the
real router, gRPC and KV transfer over gloo between worker processes."""

from __future__ import annotations

import concurrent.futures

import pytest

from pdserve import SamplingParams
from pdserve.client import Client
from tests.e2e.cluster_support import offline, start_cluster, wait_until_idle

PROMPTS = ["Hello there, general", "The quick brown fox jumps over the lazy dog " * 3, "a",
           "Disaggregated serving splits prefill from decode, and " * 4]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module", params=["1p1d", "2p1d", "colocated"])
def cluster(request, ray_session):
    mode, prefill = {"1p1d": ("disaggregated", 1), "2p1d": ("disaggregated", 2), "colocated": ("colocated", 1)}[
        request.param]
    c = start_cluster(mode, prefill=prefill)
    yield c
    c.check_invariants()
    c.stop()


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_outputs_equal_offline(cluster, params: SamplingParams) -> None:
    expected = offline(PROMPTS, params)
    with Client(cluster.router_address, timeout=60) as client:
        got = [client.generate(p, sampling_params=params).token_ids for p in PROMPTS]
        streamed = []
        for p in PROMPTS:
            ids: list[int] = []
            for chunk in client.generate_stream(p, sampling_params=params):
                ids += chunk.token_ids
            streamed.append(ids)
    assert got == expected
    assert streamed == expected


def test_32_concurrent_streaming_clients(cluster) -> None:
    prompts = [f"request {i}: " + PROMPTS[i % len(PROMPTS)] for i in range(32)]
    expected = offline(prompts, GREEDY)

    def stream(prompt: str) -> tuple[list[int], str, object]:
        with Client(cluster.router_address, timeout=120) as client:
            ids, text, last = [], "", None
            for chunk in client.generate_stream(prompt, sampling_params=GREEDY):
                ids += chunk.token_ids
                text += chunk.text
                last = chunk
            return ids, text, last

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(stream, prompts))
    assert [r[0] for r in results] == expected
    for ids, _, last in results:
        assert last.finish_reason == "length" and last.usage.completion_tokens == len(ids) == 24
    stats = wait_until_idle(cluster)
    assert all(s["free_blocks"] == s["usable_blocks"] for s in stats)


def test_decode_workers_run_no_prefill_for_handed_off_requests(cluster) -> None:
    if cluster.config.mode != "disaggregated":
        pytest.skip("colocated workers prefill their own prompts")
    with Client(cluster.router_address, timeout=60) as client:
        for p in PROMPTS:
            client.generate(p, sampling_params=GREEDY)
    stats = {s["worker_id"]: s for s in wait_until_idle(cluster)}
    decodes = [s for w, s in stats.items() if w.startswith("decode")]
    prefills = [s for w, s in stats.items() if w.startswith("prefill")]
    assert all(s["preemptions"] == 0 for s in decodes)  # a preempted request would recompute locally
    assert all(s["prompt_tokens_computed"] == 0 for s in decodes)
    assert all(s["remote_prefills"] > 0 for s in decodes)
    assert sum(s["prompt_tokens_computed"] for s in prefills) > 0
    # decode computed exactly one token per generated token after the first (no prompt positions)
    assert all(s["failed_transfers"] == 0 for s in decodes)


def test_cancel_mid_stream_frees_blocks_on_every_worker(cluster) -> None:
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    with Client(cluster.router_address, timeout=60) as client:
        stream = client.generate_stream(PROMPTS[3], sampling_params=long)
        received = 0
        for chunk in stream:
            received += len(chunk.token_ids)
            if received >= 5:
                break
        stream.close()
    stats = wait_until_idle(cluster)
    for s in stats:
        assert s["unfinished"] == 0 and s["held"] == 0, s
        assert s["free_blocks"] == s["usable_blocks"], s
    cluster.check_invariants()


def test_worker_ports_refuse_calls_without_the_cluster_token(cluster) -> None:
    """Only the cluster's own processes reach a worker's gRPC port: a call without the token minted at
    start-up is UNAUTHENTICATED (health checks excepted); with it (as the router sends it) it works."""
    import os

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pdserve.rpc.auth import CLUSTER_TOKEN_ENV
    from pdserve.v1 import worker_pb2, worker_pb2_grpc

    token = os.environ[CLUSTER_TOKEN_ENV]
    assert len(token) >= 32
    for worker in cluster.workers:
        with grpc.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            for metadata in (None, (("authorization", "Bearer not-the-token"),)):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Describe(worker_pb2.DescribeRequest(), timeout=10, metadata=metadata)
                assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Abort(worker_pb2.AbortRequest(request_ids=["x"]), timeout=10, metadata=metadata)
                assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            info = stub.Describe(worker_pb2.DescribeRequest(), timeout=10,
                                 metadata=(("authorization", f"Bearer {token}"),))
            assert info.worker_id == worker.worker_id
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_one_scrape_target_carries_every_workers_telemetry(cluster) -> None:
    import asyncio
    import re

    with Client(cluster.router_address, timeout=60) as client:
        client.generate(PROMPTS[3], sampling_params=GREEDY)
    cluster.router.telemetry.refreshed_at = 0.0  # no snapshot older than this request
    text = asyncio.run_coroutine_threadsafe(cluster.router.metrics_text(), cluster._loop).result(30)

    def value(name: str, **labels: str) -> float:
        pattern = re.escape(name) + r"\{([^}]*)\} (\S+)"
        for found in re.finditer(pattern, text):
            pairs = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
            if all(pairs.get(k) == v for k, v in labels.items()):
                return float(found.group(2))
        raise AssertionError(f"no sample {name} {labels} in:\n{text[:3000]}")

    for w in cluster.workers:
        assert value("pdserve:worker_healthy", worker=w.worker_id, role=w.role) == 1
        assert value("pdserve:gpu_telemetry_available", worker=w.worker_id) == 0  # CPU workers: no GPU series
        assert value("pdserve:kv_cache_blocks", worker=w.worker_id) > 0
    steps = sum(value("pdserve:engine_steps_total", worker=w.worker_id, kind="decode") for w in cluster.workers
                if w.role != "prefill")
    assert steps > 0
    if any(w.role == "decode" for w in cluster.workers):  # KV arrived over gloo, counted in bytes
        decode = next(w for w in cluster.workers if w.role == "decode")
        assert value("pdserve:kv_transfer_bytes_total", worker=decode.worker_id, transport="gloo") > 0
        assert value("pdserve:kv_transfers_received_total", worker=decode.worker_id) >= 1
    assert not re.search(r"^pdserve:gpu_utilization_percent\{", text, re.M)
    engines = [snapshot["engine"] for snapshot in cluster.router.telemetry.snapshots.values()]
    assert engines and all(e["step_budget_borrow_tokens"] == 0 for e in engines)  # what the planner simulates
    assert all(e["step_time_busy"] is None and e["step_time_model"] is None for e in engines)  # no SLO: no model
