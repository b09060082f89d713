"""The Ray actor that hosts one worker (prefill, decode or colocated) in its own process.

Ray assigns the GPU (``num_gpus``); the actor builds a :class:`WorkerHost` on its node's IP address and
returns the gRPC address from ``start()``. Everything else goes over gRPC; the Ray methods here are for
the launcher and for tests (stats, invariant checks, a clean stop).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import ray

from pdserve.cluster.roles import make_role
from pdserve.common.config import EngineConfig
from pdserve.common.kv_transfer_config import KVTransferConfig


class WorkerActor:
    def __init__(self, worker_id: str, role: str, engine_config: dict[str, Any], transfer: dict[str, Any],
                 cpu_threads: int | None = None, log_level: str = "WARNING") -> None:
        logging.basicConfig(level=log_level, format=f"%(asctime)s {role}:{worker_id} %(levelname)s %(name)s: %(message)s")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        # the engine thread, the gRPC loop and the KV threads share the GIL: hand it over within 1 ms
        # (Python's default is 5 ms, which a waiting KV or RPC thread would add to a request's latency)
        sys.setswitchinterval(float(os.environ.get("PDSERVE_GIL_SWITCH_INTERVAL_S", "0.001")))
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        from pdserve.worker.host import WorkerHost

        host = ray.util.get_node_ip_address()
        self.host = WorkerHost(worker_id, make_role(role), EngineConfig(**engine_config), KVTransferConfig(**transfer),
                               host=host)

    def start(self) -> str:
        return self.host.start()

    def stats(self) -> dict[str, Any]:
        return self.host.stats()

    def timings(self) -> list[dict[str, Any]]:
        return self.host.timings()

    def check_invariants(self) -> None:
        self.host.call_engine(lambda engine: engine.check_invariants())

    def stop(self) -> None:
        self.host.stop()


RemoteWorkerActor = ray.remote(WorkerActor)
