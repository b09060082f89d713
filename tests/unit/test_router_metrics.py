"""Router metrics: the Prometheus text the HTTP front serves, after real requests through fake workers."""

from __future__ import annotations

import re

import aiohttp

from pdserve.router.metrics import Histogram
from tests.unit.test_router_fakes import FakeWorker, cluster, generate_request, run, wait_until


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="0.1"} 2', 'x_bucket{le="1.0"} 3', 'x_bucket{le="+Inf"} 4',
                            "x_sum 3.65", "x_count 4"]


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
            async with aiohttp.ClientSession(f"http://127.0.0.1:{router.http_port}") as http, \
                    http.get("/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
        s = _samples(text)
        assert s['pdserve_requests_total{outcome="finished",finish_reason="length"}'] == 2
        assert s['pdserve_requests_total{outcome="cancelled",finish_reason=""}'] == 1
        assert s["pdserve_requests_in_flight"] == 0
        assert s['pdserve_prefill_placements_total{where="prefill_worker"}'] == 3
        assert s["pdserve_generation_tokens_total"] >= 10
        assert s["pdserve_time_to_first_token_seconds_count"] == 3
        assert s["pdserve_e2e_request_latency_seconds_count"] == 3
        itl = s["pdserve_inter_token_latency_seconds_count"]
        assert itl >= 2 and s['pdserve_inter_token_latency_seconds_bucket{le="+Inf"}'] == itl
        for worker, role in (("p0", "prefill"), ("d0", "decode")):
            assert s[f'pdserve_worker_healthy{{worker="{worker}",role="{role}"}}'] == 1
        assert re.search(r"^# TYPE pdserve_time_to_first_token_seconds histogram$", text, re.M)
    run(scenario)
