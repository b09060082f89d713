"""The pieces that tie several router processes together, without Ray: the forwarder's error mapping and
the first process's private admin port (shared public port, forwarding to the owner of the workers)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pdserve.router import Router, RouterConfig, WorkerEndpoint, WorkerRole
from pdserve.router.router_processes import AdminForwarder
from tests.unit.test_router_fakes import FakeWorker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_forwarded_call_nobody_answers_fails_naming_the_code() -> None:
    with pytest.raises(RuntimeError, match="ScalePool .* failed: UNAVAILABLE"):
        AdminForwarder(f"127.0.0.1:{_free_port()}").scale("decode", 2, None)


def test_two_processes_share_the_port_and_the_second_forwards_to_the_first() -> None:
    async def main() -> None:
        worker = FakeWorker("colocated-0", "colocated")
        address = await worker.start()
        endpoints = [WorkerEndpoint("colocated-0", WorkerRole.COLOCATED, address, "")]
        config = RouterConfig(host="127.0.0.1", port=0, processes=2)
        first = Router(config, model="fake-model", mode="colocated", workers=endpoints)
        calls: list[tuple[str, int]] = []

        def scale(role: str, replicas: int, grace_s: float | None) -> list[str]:
            if role != "colocated":
                raise ValueError(f"no {role} pool")
            calls.append((role, replicas))
            return [f"{role}-{replicas - 1}"]

        first.scaler = scale
        port = await first.start()
        assert first.admin_address is not None
        second = Router(RouterConfig(host="127.0.0.1", port=port, processes=2), model="fake-model", mode="colocated",
                        workers=endpoints, admin_address=first.admin_address)
        try:
            assert await second.start() == port  # the same port, shared
            assert second.admin_address is None  # only the owner of the workers has one
            assert second.scaler is not None
            assert await asyncio.to_thread(second.scaler, "colocated", 3, None) == ["colocated-2"]
            assert calls == [("colocated", 3)]  # carried out by the first process
            with pytest.raises(ValueError, match="no decode pool"):
                await asyncio.to_thread(second.scaler, "decode", 3, None)
        finally:
            await second.stop(0)
            await first.stop(0)
            await worker.stop()

    asyncio.run(main())


def test_one_process_does_not_share_its_port() -> None:
    async def main() -> None:
        worker = FakeWorker("colocated-0", "colocated")
        address = await worker.start()
        endpoints = [WorkerEndpoint("colocated-0", WorkerRole.COLOCATED, address, "")]
        first = Router(RouterConfig(host="127.0.0.1", port=0), model="fake-model", mode="colocated",
                       workers=endpoints)
        port = await first.start()
        try:
            assert first.admin_address is None
            other = Router(RouterConfig(host="127.0.0.1", port=port), model="fake-model", mode="colocated",
                           workers=endpoints)
            with pytest.raises(OSError):
                await other.start()  # a taken port fails loudly
        finally:
            await first.stop(0)
            await worker.stop()

    asyncio.run(main())


def test_the_first_process_metrics_add_up_every_process() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from pdserve.router.metrics import RouterMetrics

    first, second = RouterMetrics("m"), RouterMetrics("m")
    first.ended("finished", "stop", 1.0, 10, 5, 0.1)
    second.ended("finished", "stop", 2.0, 20, 7, 0.2)
    second.ended("finished", "length", 3.0, 30, 9, 0.3)  # a label set only the second process has
    second.rejected("ttft")
    first.set_process_samples(1, second.own_samples(in_flight=4))

    def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    merged = values(first.render(in_flight=3))
    model = (("model_name", "m"),)
    assert merged[("vllm:request_success_total", (("finished_reason", "stop"), *model))] == 2
    assert merged[("vllm:request_success_total", (("finished_reason", "length"), *model))] == 1
    assert merged[("vllm:generation_tokens_total", model)] == 21
    assert merged[("vllm:e2e_request_latency_seconds_count", model)] == 3
    assert merged[("vllm:e2e_request_latency_seconds_sum", model)] == 6.0
    assert merged[("pdserve:requests_rejected_total", (*model, ("reason", "ttft")))] == 1
    assert merged[("pdserve:requests_in_flight", model)] == 7
    alone = values(RouterMetrics("m").render(in_flight=0))  # one process: its own figures only
    assert alone[("vllm:e2e_request_latency_seconds_count", model)] == 0
