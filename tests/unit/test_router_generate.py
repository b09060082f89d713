"""The router over fake workers, through real gRPC: outputs, validation, ids, status and models."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.common.errors import OutOfCapacityError
from pdserve.v1 import common_pb2, pdserve_pb2
from tests.unit.test_router_fakes import (
    MODEL,
    FakeWorker,
    cluster,
    expected_tokens,
    generate_request,
    run,
    token_text,
    wait_until,
)


def _disaggregated() -> list[FakeWorker]:
    return [FakeWorker("p0", "prefill"), FakeWorker("p1", "prefill"), FakeWorker("d0", "decode"),
            FakeWorker("d1", "decode")]


def test_sixteen_concurrent_clients_streaming_and_unary() -> None:
    async def scenario() -> None:
        workers = _disaggregated()
        async with cluster(workers, mode="disaggregated") as (_, stub):
            async def one(i: int) -> None:
                prompt: Any = f"prompt number {i} " * (i % 3 + 1) if i % 2 else [i, i + 1, i + 2, 5]
                max_tokens = 3 + i
                request = generate_request(prompt, max_tokens, request_id=f"req-{i}")
                want = expected_tokens(prompt, max_tokens)
                if i % 4 == 3:
                    reply = await stub.GenerateUnary(request)
                    assert reply.request_id == f"req-{i}"
                    assert list(reply.token_ids) == want
                    assert reply.text == "".join(token_text(t) for t in want)
                    assert reply.finish_reason == common_pb2.FINISH_REASON_LENGTH
                    usage = reply.usage
                else:
                    responses = [r async for r in stub.Generate(request)]
                    assert all(r.request_id == f"req-{i}" for r in responses)
                    assert [t for r in responses for t in r.token_ids] == want
                    assert "".join(r.text for r in responses) == "".join(token_text(t) for t in want)
                    assert [r.finish_reason for r in responses[:-1]] == [0] * (len(responses) - 1)
                    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
                    assert not any(r.HasField("usage") for r in responses[:-1])
                    usage = responses[-1].usage
                assert usage.completion_tokens == max_tokens
                assert usage.prompt_tokens == len(prompt)
                assert usage.cached_prompt_tokens == 3

            await asyncio.gather(*(one(i) for i in range(16)))
            decode = workers[2:]
            assert sum(len(w.submitted) for w in decode) == 16
            assert all(w.submitted for w in decode), "the policy should spread requests over both decode workers"
            assert max(w.max_batch for w in decode) > 1, "the fake should have batched several requests per step"
            prefill_addresses = {s.prefill_address for w in decode for s in w.submitted}
            assert prefill_addresses == {workers[0].address, workers[1].address}
    run(scenario)


def test_request_ids_caller_chosen_or_fresh() -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated", step_interval_s=0.05)
        async with cluster([worker]) as (_, stub):
            first = stub.Generate(generate_request([1], 4, request_id="mine"))
            await wait_until(lambda: len(worker.submitted) == 1, what="the first Submit")
            second = await stub.GenerateUnary(generate_request([1], 2, request_id="mine"))
            assert second.request_id and second.request_id != "mine"
            assert [r.request_id async for r in first] == ["mine", "mine"]
            anonymous = await stub.GenerateUnary(generate_request([1], 2))
            assert len(anonymous.request_id) == 32
            assert [s.request_id for s in worker.submitted] == ["mine", second.request_id, anonymous.request_id]
    run(scenario)


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda r: setattr(r.params, "top_p", 2.0), "top_p"),
    (lambda r: setattr(r.params, "max_tokens", 0), "max_tokens"),
    (lambda r: setattr(r.params, "temperature", -1.0), "temperature"),
    (lambda r: setattr(r, "model", "other-model"), "model"),
    (lambda r: r.ClearField("prompt"), "prompt"),
    (lambda r: r.token_ids.ClearField("ids"), "prompt"),
    (lambda r: setattr(r, "request_id", "r" * 1_000_000), "request_id"),  # a 1 MB id
    (lambda r: r.token_ids.ids.extend(range(2048)), "prompt"),  # past the model's max_model_len (2048)
    (lambda r: setattr(r, "text", "x" * 5_000_000), "prompt"),  # 5 MB: refused without tokenizing
])
def test_invalid_arguments_name_the_field(mutate: Any, field: str) -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated")
        async with cluster([worker]) as (router, stub):
            for call in (stub.GenerateUnary, stub.Generate):
                request = generate_request([1, 2], 4)
                mutate(request)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    result = call(request)
                    if call is stub.Generate:
                        [_ async for _ in result]
                    else:
                        await result
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details().startswith(f"{field}:"), info.value.details()
            assert worker.submit_attempts == 0
            assert len(router.table) == 0
    run(scenario)


def test_submit_invalid_argument_passes_through() -> None:
    async def scenario() -> None:
        workers = [FakeWorker("c0", "colocated", max_prompt_tokens=4), FakeWorker("c1", "colocated",
                                                                                 max_prompt_tokens=4)]
        async with cluster(workers) as (router, stub):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GenerateUnary(generate_request(list(range(10)), 4))
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == "prompt: the prompt has 10 tokens but max is 4"
            assert sum(w.submit_attempts for w in workers) == 1, "INVALID_ARGUMENT must not be retried"
            assert all(s.routable for s in router.registry.all()), "a worker rejecting a prompt stays healthy"
            reply = await stub.GenerateUnary(generate_request([1, 2], 3))
            assert list(reply.token_ids) == expected_tokens([1, 2], 3)
    run(scenario)


def test_list_models_cluster_status_and_health() -> None:
    async def scenario() -> None:
        workers = _disaggregated()
        workers[2].kv_usage = 0.25
        workers[2].silent = True
        workers[3].kv_usage = 0.9  # d0 is the least loaded decode worker (Describe reports the load)
        async with cluster(workers, mode="disaggregated") as (router, stub):
            models = await stub.ListModels(pdserve_pb2.ListModelsRequest())
            assert [(m.name, m.max_model_len, m.vocab_size) for m in models.models] == [(MODEL, 2048, 1000)]

            call = stub.Generate(generate_request(list(range(40)), 4, request_id="held"))
            await wait_until(lambda: bool(workers[2].submitted), what="Submit on d0")
            await wait_until(lambda: router.registry.get("d0").load.running_requests == 1, what="d0's load")
            status = await stub.ClusterStatus(pdserve_pb2.ClusterStatusRequest())
            assert (status.mode, status.model, status.requests_in_flight) == ("disaggregated", MODEL, 1)
            by_id = {w.worker_id: w for w in status.workers}
            assert set(by_id) == {"p0", "p1", "d0", "d1"}
            assert all(w.healthy and w.num_kv_blocks == 100 for w in status.workers)
            assert (by_id["d0"].role, by_id["d0"].address) == ("decode", workers[2].address)
            assert (by_id["d0"].kv_usage, by_id["d0"].running_requests) == (0.25, 1)
            assert sorted(by_id[p].queued_prefill_tokens for p in ("p0", "p1")) == [0, 40]

            async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for service in ("", "pdserve.v1.PdServe"):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
            call.cancel()
            await wait_until(lambda: len(router.table) == 0, what="the cancelled request to leave")
            status = await stub.ClusterStatus(pdserve_pb2.ClusterStatusRequest())
            assert status.requests_in_flight == 0
            assert [w.queued_prefill_tokens for w in status.workers if w.role == "prefill"] == [0, 0]
    run(scenario)


def test_max_inflight_requests_resource_exhausted() -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated", silent=True)
        async with cluster([worker], max_inflight_requests=1) as (router, stub):
            held = stub.Generate(generate_request([1], 4))
            await wait_until(lambda: len(router.table) == 1, what="the first request to be admitted")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GenerateUnary(generate_request([1], 4))
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_inflight_requests" in info.value.details()
            held.cancel()
    run(scenario)


def test_overflow_prompts_are_prefilled_on_the_decode_worker() -> None:
    """Conditional disaggregation: once the prefill pool has ``max_queued_prefill_tokens`` queued (the
    silent decode worker never sends a first token, so nothing leaves the queue), prompts stay local."""
    async def scenario() -> None:
        prefill, decode = FakeWorker("p0", "prefill"), FakeWorker("d0", "decode", silent=True)
        async with cluster([prefill, decode], mode="disaggregated", max_queued_prefill_tokens=10) as (router, stub):
            calls = []
            for i in range(3):
                calls.append(stub.Generate(generate_request([1 + i] * 8, 4, request_id=f"r{i}")))
                await wait_until(lambda i=i: len(decode.submitted) == i + 1, what=f"request r{i} to be submitted")
            assert [s.prefill_address for s in decode.submitted] == [prefill.address, prefill.address, ""]
            for call in calls:
                call.cancel()
    run(scenario)


@pytest.mark.parametrize(("weight", "local"), [(0.5, 6), (0.0, 0)])
def test_prefill_worker_on_the_decode_workers_node_is_preferred(weight: float, local: int) -> None:
    # round robin alone pairs d0 with p0 and d1 with p1: both across nodes here
    async def scenario() -> None:
        workers = [FakeWorker("p0", "prefill", node="b"), FakeWorker("p1", "prefill", node="a"),
                   FakeWorker("d0", "decode", node="a"), FakeWorker("d1", "decode", node="b")]
        async with cluster(workers, mode="disaggregated", prefill_locality_weight=weight) as (_, stub):
            for i in range(6):  # one at a time: every worker is idle each time
                await stub.GenerateUnary(generate_request([5, 6, 7, i], 2))
        node_of = {w.address: w.node for w in workers}
        pairs = [(d.node, node_of[s.prefill_address]) for d in workers[2:] for s in d.submitted]
        assert len(pairs) == 6 and sum(a == b for a, b in pairs) == local
    run(scenario)


def test_scale_pool_needs_a_router_that_manages_its_workers() -> None:
    async def scenario() -> None:
        async with cluster(_disaggregated(), mode="disaggregated") as (router, stub):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ScalePool(pdserve_pb2.ScalePoolRequest(role="decode", replicas=3))
            assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "pdserve serve" in info.value.details()
            calls = []
            router.scaler = lambda role, replicas, grace: calls.append((role, replicas, grace)) or ["decode-9"]
            reply = await stub.ScalePool(pdserve_pb2.ScalePoolRequest(role="decode", replicas=3, grace_s=2.5))
            assert list(reply.changed_workers) == ["decode-9"] and calls == [("decode", 3, 2.5)]
            for bad in (pdserve_pb2.ScalePoolRequest(role="decode", replicas=0),
                        pdserve_pb2.ScalePoolRequest(role="decode", replicas=2**31 - 1),  # refused before any work
                        pdserve_pb2.ScalePoolRequest(role="decode", replicas=1, grace_s=-1)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ScalePool(bad)
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert len(calls) == 1

            def no_room(role: str, replicas: int, grace: float | None) -> list[str]:
                raise OutOfCapacityError("Ray could not start 2 more decode worker(s)")

            router.scaler = no_room
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ScalePool(pdserve_pb2.ScalePoolRequest(role="decode", replicas=3))
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "could not start" in info.value.details()
    run(scenario)


def test_switch_role_needs_a_router_that_manages_its_workers() -> None:
    async def scenario() -> None:
        async with cluster(_disaggregated(), mode="disaggregated") as (router, stub):
            request = pdserve_pb2.SwitchRoleRequest(worker_id="p0", role="decode")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SwitchRole(request)
            assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "pdserve serve" in info.value.details()
            calls = []

            def switcher(worker_id: str, role: str, grace: float | None) -> str:
                if worker_id == "nobody":
                    raise ValueError("no worker 'nobody'")
                calls.append((worker_id, role, grace))
                return "decode-7"

            router.role_switcher = switcher
            reply = await stub.SwitchRole(pdserve_pb2.SwitchRoleRequest(worker_id="p0", role="decode", grace_s=1.5))
            assert reply.worker_id == "decode-7" and calls == [("p0", "decode", 1.5)]
            for bad in (pdserve_pb2.SwitchRoleRequest(worker_id="nobody", role="decode"),
                        pdserve_pb2.SwitchRoleRequest(worker_id="p0", role="decode", grace_s=-1)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.SwitchRole(bad)
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    run(scenario)


@pytest.mark.parametrize("writes_per_s", [0.0, 50.0])
def test_streams_pace_their_writes_to_the_routers_write_budget(writes_per_s: float) -> None:
    """With a budget of 50 writes/s and two streams, each stream writes every 40 ms after its first
    tokens: the fake's tokens (one per 5 ms step) leave in few responses, all of them, in order; the first
    token is never held back. Without a budget the same tokens arrive (in as many responses as the loop
    happens to make)."""
    async def scenario() -> None:
        workers = [FakeWorker("c0", "colocated", tokens_per_step=1, step_interval_s=0.005)]
        async with cluster(workers, stream_writes_per_s=writes_per_s) as (_, stub):
            async def one(i: int) -> list[pdserve_pb2.GenerateResponse]:
                request = generate_request([i, 7, 9], 40, request_id=f"paced-{i}")
                responses = [r async for r in stub.Generate(request)]
                assert [t for r in responses for t in r.token_ids] == expected_tokens([i, 7, 9], 40)
                assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
                return responses

            streams = await asyncio.gather(one(1), one(2))
            if writes_per_s:
                for responses in streams:
                    assert len(responses[0].token_ids) == 1, "the first token left at once"
                    assert len(responses) <= 15, f"{len(responses)} writes for 40 tokens: not paced"
    run(scenario)
