"""The router when workers fail: retries before the first token, lost streams, cancels, timeouts."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pdserve.router import WorkerEndpoint
from pdserve.v1 import pdserve_pb2
from tests.unit.test_router_fakes import (
    FakeWorker,
    closed_port_address,
    cluster,
    expected_tokens,
    generate_request,
    run,
    wait_until,
)


def test_submit_unavailable_marks_worker_unhealthy_and_retries_elsewhere() -> None:
    async def scenario() -> None:
        broken = FakeWorker("c0", "colocated", submit_error=grpc.StatusCode.UNAVAILABLE)
        good = FakeWorker("c1", "colocated", kv_usage=0.5)  # c0 looks better, so it is tried first
        async with cluster([broken, good], health_check_interval_s=60.0) as (router, stub):
            reply = await stub.GenerateUnary(generate_request([4, 5], 6))
            assert list(reply.token_ids) == expected_tokens([4, 5], 6)
            assert broken.submit_attempts == 1 and [s.request_id for s in good.submitted] == [reply.request_id]
            status = await stub.ClusterStatus(pdserve_pb2.ClusterStatusRequest())
            assert {w.worker_id: w.healthy for w in status.workers} == {"c0": False, "c1": True}
            replies = await asyncio.gather(*(stub.GenerateUnary(generate_request([i], 3)) for i in range(4)))
            assert [list(r.token_ids) for r in replies] == [expected_tokens([i], 3) for i in range(4)]
            assert broken.submit_attempts == 1, "an unhealthy worker gets no more requests"
            assert router.registry.get("c1").assigned_requests == 0
    run(scenario)


@pytest.mark.parametrize("wait_s", [0.0, 0.6])
def test_every_worker_unavailable_fails_with_unavailable_naming_them(wait_s: float) -> None:
    """After ``no_worker_wait_s`` of waiting for a worker to come back (a restarting one would)."""
    async def scenario() -> None:
        workers = [FakeWorker(f"c{i}", "colocated", submit_error=grpc.StatusCode.UNAVAILABLE) for i in range(2)]
        async with cluster(workers, health_check_interval_s=60.0, no_worker_wait_s=wait_s) as (_, stub):
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GenerateUnary(generate_request([1], 3))
            waited = time.monotonic() - start
            assert wait_s <= waited + 0.05 and waited < wait_s + 1.0
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "no healthy decode worker" in info.value.details()
            assert "c0" in info.value.details() and "c1" in info.value.details()
    run(scenario)


def test_worker_down_at_start_is_skipped_then_recovers() -> None:
    async def scenario() -> None:
        address = closed_port_address()
        good = FakeWorker("c1", "colocated", kv_usage=0.5)
        late = FakeWorker("c0", "colocated")
        async with cluster([good], extra=[WorkerEndpoint("c0", "colocated", address)],  # type: ignore[arg-type]
                           health_check_interval_s=0.1, reconnect_backoff_max_s=0.2) as (router, stub):
            assert not router.registry.get("c0").routable
            assert "Describe failed: UNAVAILABLE" in router.registry.get("c0").last_error
            replies = await asyncio.gather(*(stub.GenerateUnary(generate_request([i], 2)) for i in range(3)))
            assert [list(r.token_ids) for r in replies] == [expected_tokens([i], 2) for i in range(3)]
            assert len(good.submitted) == 3

            await late.start(port=int(address.rsplit(":", 1)[1]))  # the worker comes up
            try:
                await wait_until(lambda: router.registry.get("c0").routable, timeout=5.0, what="c0 to recover")
                await stub.GenerateUnary(generate_request([9], 2))
                assert len(late.submitted) == 1, "the recovered, idle worker should win the next request"
            finally:
                await late.stop()
    run(scenario)


def test_lost_stream_before_first_token_moves_the_request() -> None:
    async def scenario() -> None:
        doomed = FakeWorker("c0", "colocated", silent=True)
        good = FakeWorker("c1", "colocated", kv_usage=0.5)
        async with cluster([doomed, good], health_check_interval_s=60.0) as (router, stub):
            call = stub.GenerateUnary(generate_request([7, 7], 5, request_id="moved"))
            await wait_until(lambda: bool(doomed.submitted), what="Submit on c0")
            await doomed.stop()  # its Updates stream ends; nothing was sent to the client yet
            reply = await call
            assert (reply.request_id, list(reply.token_ids)) == ("moved", expected_tokens([7, 7], 5))
            assert [s.request_id for s in good.submitted] == ["moved"]
            assert not router.registry.get("c0").routable
    run(scenario)


@pytest.mark.parametrize("migrations", [3, 0])
def test_a_lost_stream_after_tokens_moves_or_fails_with_unavailable(migrations: int) -> None:
    """Default: the stream continues on the other worker from the tokens already sent (``resume_token_ids``),
    the client sees one stream; with ``max_stream_migrations=0`` it fails with UNAVAILABLE."""
    async def scenario() -> None:
        doomed = FakeWorker("c0", "colocated", step_interval_s=0.05, tokens_per_step=1)
        good = FakeWorker("c1", "colocated", kv_usage=0.5)
        async with cluster([doomed, good], health_check_interval_s=60.0,
                           max_stream_migrations=migrations) as (router, stub):
            call = stub.Generate(generate_request([1], 100))
            first = await call.read()
            assert list(first.token_ids) == expected_tokens([1], 1)
            await doomed.stop()
            if migrations:
                tokens = list(first.token_ids)
                while (response := await call.read()) is not grpc.aio.EOF:
                    tokens += response.token_ids
                    last = response
                response = last
                assert tokens == expected_tokens([1], 100) and response.finish_reason
                assert response.usage.completion_tokens == 100
                [moved] = good.submitted
                assert list(moved.resume_token_ids.ids) == tokens[:len(moved.resume_token_ids.ids)]
                assert len(moved.resume_token_ids.ids) >= 1 and moved.prefill_address == ""
                assert router.metrics.streams_moved == 1
            else:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                assert info.value.code() is grpc.StatusCode.UNAVAILABLE
                assert "was lost after" in info.value.details()
                assert not good.submitted
            await wait_until(lambda: len(router.table) == 0, what="the request to leave")
    run(scenario)


@pytest.mark.parametrize("how", ["cancel", "client_deadline"])
def test_client_going_away_aborts_at_the_worker_within_a_second(how: str) -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated", silent=True)
        async with cluster([worker]) as (router, stub):
            timeout = 0.3 if how == "client_deadline" else None
            call = stub.Generate(generate_request([1, 2, 3], 8, request_id="bye"), timeout=timeout)
            await wait_until(lambda: bool(worker.submitted), what="Submit")
            gone = time.monotonic()
            if how == "cancel":
                call.cancel()
            else:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.read()
                assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(lambda: worker.aborted == ["bye"], timeout=1.0, what="Abort(['bye'])")
            assert time.monotonic() - gone < 1.0
            await wait_until(lambda: len(router.table) == 0, what="the request to leave the table")
            assert router.registry.get("c0").assigned_requests == 0
    run(scenario)


def test_silent_worker_leads_to_deadline_exceeded_and_abort() -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated", silent=True)
        async with cluster([worker], request_timeout_s=0.5) as (router, stub):
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GenerateUnary(generate_request([1], 4, request_id="stuck"))
            elapsed = time.monotonic() - start
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "request_timeout_s" in info.value.details() and "c0" in info.value.details()
            assert 0.5 <= elapsed < 2.0
            await wait_until(lambda: worker.aborted == ["stuck"], timeout=1.0, what="Abort(['stuck'])")
            assert len(router.table) == 0
    run(scenario)
