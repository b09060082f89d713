"""Admission control over fake workers: a request whose expected time to first token exceeds its limit
(router.admission_max_ttft_s, or the client's gRPC deadline) is refused at once with RESOURCE_EXHAUSTED /
HTTP 429 and a retry time; without a known prefill rate nothing is refused."""

from __future__ import annotations

import time

import aiohttp
import grpc
import pytest

from pdserve.client import AsyncClient, ResourceExhaustedError
from tests.unit.test_router_fakes import (
    FakeWorker,
    cluster,
    expected_tokens,
    generate_request,
    run,
    wait_until,
)

# 5,000 queued prompt tokens at 1,000 tokens/s: about 5 s before a new prompt's first token
BUSY = {"prefill_tokens_per_s": 1000.0, "queued_prefill_tokens": 5000}


def test_expected_ttft_over_the_limit_is_refused_at_once_with_a_retry_time() -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated", **BUSY)
        async with cluster([worker], http_port=0, admission_max_ttft_s=1.0) as (router, stub):
            await wait_until(lambda: router.registry.get("c0").load.prefill_tokens_per_s > 0, what="the load")
            start = time.monotonic()
            call = stub.GenerateUnary(generate_request([1, 2, 3], 4))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert time.monotonic() - start < 0.5
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "expected time to first token is 5.00 s" in err.value.details()
            trailers = dict(await call.trailing_metadata())
            assert trailers["retry-after"] == "5" and trailers["grpc-retry-pushback-ms"] == "5000"
            async with AsyncClient(f"127.0.0.1:{router.port}", max_retries=0) as client:
                with pytest.raises(ResourceExhaustedError) as refused:
                    await client.generate(prompt_token_ids=[1, 2, 3], max_tokens=4)
                assert refused.value.retry_after_s == 5.0
            async with aiohttp.ClientSession(f"http://127.0.0.1:{router.http_port}") as http:
                async with http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4}) as r:
                    assert r.status == 429 and r.headers["Retry-After"] == "5"
                    assert (await r.json())["error"]["type"] == "rate_limit_error"
                async with http.get("/metrics") as r:
                    assert 'pdserve:requests_rejected_total{model_name="fake-model",reason="ttft"} 3.0' in await r.text()
            assert not worker.submitted and len(router.table) == 0
    run(scenario)


@pytest.mark.parametrize("deadline_s, admitted", [(10.0, True), (2.0, False)])
def test_the_client_deadline_is_a_limit_too(deadline_s: float, admitted: bool) -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated", **BUSY)
        async with cluster([worker]) as (router, stub):
            await wait_until(lambda: router.registry.get("c0").load.prefill_tokens_per_s > 0, what="the load")
            call = stub.GenerateUnary(generate_request([1, 2, 3], 4), timeout=deadline_s)
            if admitted:
                assert list((await call).token_ids) == expected_tokens([1, 2, 3], 4)
            else:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    run(scenario)


def test_no_known_rate_refuses_nothing() -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated", queued_prefill_tokens=10 ** 6)
        async with cluster([worker], admission_max_ttft_s=0.001) as (_, stub):
            ok = await stub.GenerateUnary(generate_request([5], 2))
            assert list(ok.token_ids) == expected_tokens([5], 2)
    run(scenario)
