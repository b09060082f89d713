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
