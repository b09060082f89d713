"""The Ray actor that hosts one worker (prefill, decode or colocated) in its own process.

Ray assigns the GPU (``num_gpus``); the actor builds a :class:`WorkerHost` on its node's IP address and
returns the gRPC address from ``start()``. Everything else goes over gRPC; the Ray methods here are for
the launcher and for tests (stats, invariant checks, a clean stop).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from pdserve.cluster.config import KVTransferConfig
from pdserve.common.config import EngineConfig


class WorkerActor:
    def __init__(self, worker_id: str, role: str, engine_config: dict[str, Any], transfer: dict[str, Any],
                 cpu_threads: int | None = None, log_level: str = "WARNING") -> None:
        logging.basicConfig(level=log_level, format=f"%(asctime)s {role}:{worker_id} %(levelname)s %(name)s: %(message)s")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        from pdserve.worker.host import WorkerHost

        host = ray.util.get_node_ip_address()
        self.host = WorkerHost(worker_id, role, EngineConfig(**engine_config), KVTransferConfig(**transfer), host=host)

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
