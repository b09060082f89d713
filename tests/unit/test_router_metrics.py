"""Router metrics: the Prometheus text the HTTP front serves, after real requests through fake workers."""

from __future__ import annotations

import re

import aiohttp

from pdserve.router.metrics import deadline_buckets
from tests.unit.test_router_fakes import FakeWorker, cluster, generate_request, run, wait_until


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample, keyed by its name and its set of labels (the exposition's label order is not ours)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            pairs = re.findall(r'(\w+)="([^"]*)"', labels)
            out[(name, frozenset(pairs))] = float(value)
    return out


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset({"model_name": "fake-model", **labels}.items())


def test_latency_buckets_reach_the_deadline() -> None:
    assert deadline_buckets(900.0)[-1] == 900.0 and 0.25 in deadline_buckets(None)
    assert deadline_buckets(60.0) == deadline_buckets(None)  # already a bucket


def test_metrics_after_finished_and_cancelled_requests() -> None:
    async def scenario() -> None:
        workers = [FakeWorker("p0", "prefill"), FakeWorker("d0", "decode")]
        async with cluster(workers, mode="disaggregated", http_port=0) as (router, stub):
            for i in range(2):
                reply = await stub.GenerateUnary(generate_request([1, 2, i], 5))
                assert len(reply.token_ids) == 5
            call = stub.Generate(generate_request([9, 9], 1000))
            async for _ in call:
                break  # one response, then the client leaves
            call.cancel()
            await wait_until(lambda: len(router.table) == 0, what="the cancelled request to end")
            await router.telemetry.fresh(0.0)  # a scrape may show telemetry up to 1 s old: not in this test
            async with aiohttp.ClientSession(f"http://127.0.0.1:{router.http_port}") as http, \
                    http.get("/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
        s = _samples(text)
        assert s[_key("vllm:request_success_total", finished_reason="length")] == 2
        assert s[_key("pdserve:requests_failed_total", outcome="cancelled")] == 1
        assert s[_key("pdserve:requests_in_flight")] == 0
        assert s[_key("pdserve:prefill_placements_total", where="prefill_worker")] == 3
        assert s[_key("vllm:generation_tokens_total")] >= 10
        assert s[_key("vllm:time_to_first_token_seconds_count")] == 3
        assert s[_key("vllm:e2e_request_latency_seconds_count")] == 3
        assert s[_key("vllm:request_prompt_tokens_count")] == 3
        itl = s[_key("vllm:inter_token_latency_seconds_count")]
        assert itl >= 2 and s[_key("vllm:inter_token_latency_seconds_bucket", le="+Inf")] == itl
        for worker, role in (("p0", "prefill"), ("d0", "decode")):
            assert s[_key("pdserve:worker_healthy", worker=worker, role=role)] == 1
            assert 0 <= s[_key("pdserve:worker_event_loop_lag_seconds", worker=worker, role=role)] < 5
        assert 0 <= s[_key("pdserve:router_event_loop_lag_seconds")] < 5  # how late the router's loop runs
        assert re.search(r"^# TYPE vllm:time_to_first_token_seconds histogram$", text, re.M)
        # the workers' own series, from their telemetry, on the same scrape target
        d0 = {"worker": "d0", "role": "decode"}
        assert s[_key("vllm:kv_cache_usage_perc", **d0)] == 0.0 and s[_key("vllm:num_requests_running", **d0)] == 0
        assert s[_key("pdserve:engine_steps_total", kind="decode", **d0)] == 3
        assert s[_key("pdserve:late_prompts_total", **d0)] == 2  # the scheduler's prompts predicted late
        assert s[_key("pdserve:kv_transfers_received_total", transport="loopback", **d0)] == 3
        assert s[_key("pdserve:gpu_telemetry_available", **d0)] == 0
        assert not any(name.startswith("pdserve:gpu_utilization") for name, _ in s)  # absent without a GPU
    run(scenario)
