"""The Ray actor that hosts one worker (prefill, decode or colocated) in its own process.

Ray assigns the GPU (``num_gpus``); the actor builds a :class:`WorkerHost` on its node's IP address and
returns the gRPC address from ``start()``. Everything else goes over gRPC; the Ray methods here are for
the launcher and for tests (stats, invariant checks, a clean stop).

Restarts: the launcher creates the actor with ``max_restarts``; when its process dies, Ray runs the
constructor again in a new process, which then starts serving at once (a fresh engine, a new address)
and the launcher's supervisor points the router at ``address()``. A worker whose role was switched
(``switch_role``) comes back from such a restart in its original role: the launcher switches it again.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

import ray

from pdserve.cluster.roles import make_role
from pdserve.common import switches
from pdserve.common.config import EngineConfig
from pdserve.common.kv_transfer_config import KVTransferConfig


class WorkerActor:
    def __init__(self, worker_id: str, role: str, engine_config: dict[str, Any], transfer: dict[str, Any],
                 cpu_threads: int | None = None, log_level: str = "WARNING") -> None:
        logging.basicConfig(level=log_level, format=f"%(asctime)s {role}:{worker_id} %(levelname)s %(name)s: %(message)s")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        # the engine thread, the gRPC loop and the KV threads share the GIL: hand it over within 1 ms
        # (Python's default is 5 ms, which a waiting KV or RPC thread would add to a request's latency)
        sys.setswitchinterval(switches.GIL_SWITCH_INTERVAL_S.number())
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        from pdserve.worker.host import WorkerHost

        host = ray.util.get_node_ip_address()
        self.host = WorkerHost(worker_id, make_role(role), EngineConfig(**engine_config), KVTransferConfig(**transfer),
                               host=host)
        self._address = ""
        with warnings.catch_warnings():  # Ray's own property trips its deprecation warning on actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted:
            logging.getLogger(__name__).warning("worker %s restarted in a new process; serving again", worker_id)
            self._address = self.host.start()

    def start(self) -> str:
        if not self._address:
            self._address = self.host.start()
        return self._address

    def address(self) -> str:
        """The gRPC address it serves on ("" before ``start``)."""
        return self._address

    def switch_role(self, role: str, worker_id: str, step_time_budget_ms: float | None) -> float:
        """Serve as a ``role`` worker named ``worker_id`` from now on (drained first); the seconds it took."""
        return self.host.switch_role(make_role(role), worker_id, step_time_budget_ms)

    def identity(self) -> list[str]:
        """``[worker_id, role]`` as it serves now."""
        return [self.host.worker_id, self.host.role.name]

    def stats(self) -> dict[str, Any]:
        return self.host.stats()

    def node_id(self) -> str:
        """The Ray node this worker runs on."""
        return str(ray.get_runtime_context().get_node_id())

    def timings(self) -> list[dict[str, Any]]:
        return self.host.timings()

    def check_invariants(self) -> None:
        self.host.call_engine(lambda engine: engine.check_invariants())

    def stop(self) -> None:
        self.host.stop()


RemoteWorkerActor = ray.remote(WorkerActor)
