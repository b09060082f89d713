"""The Ray actor that runs one more router process (``router.processes`` > 1) next to the first.

The launcher creates ``processes - 1`` of them on its own node (they bind the same port as the first
router, see :mod:`pdserve.router.router_processes`), starts each with the first process's bound port and
private admin address, and from then on calls every router process alike: ``add_worker`` /
``remove_worker`` when pools are scaled or roles switched, ``rebind_worker`` when a worker restarted,
``drain`` and ``stop`` at shutdown; and every second ``report``, which the launcher merges into the first
process's request log (its dashboard and planner then see every process's requests) and ``/metrics``. Ray restarts a dead actor's process; the launcher then calls ``start`` again
(:mod:`pdserve.cluster.router_processes`). An async actor: the router runs on the actor's event loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import ray

from pdserve.router import Router, RouterConfig, WorkerEndpoint
from pdserve.router.process_metrics import Sample
from pdserve.router.request_log import EndedRequest


class RouterProcessActor:
    def __init__(self, index: int, log_level: str = "WARNING") -> None:
        logging.basicConfig(level=log_level, format=f"%(asctime)s router-{index} %(levelname)s %(name)s: %(message)s")
        self.index = index
        self.router: Router | None = None

    async def start(self, config: RouterConfig, model: str, mode: str, workers: list[WorkerEndpoint], port: int,
                    admin_address: str) -> int:
        """Serve the gRPC API on ``port`` (shared with the first process) over ``workers``; no HTTP API and
        no planner (the first process has them); operators' actions forwarded to ``admin_address``.
        Returns the bound port."""
        # (the cluster's first router checked its workers at start; this one may be started again later,
        # over the workers the cluster has then)
        self.router = Router(replace(config, port=port, http_port=None, planner_mode="off"), model=model, mode=mode,
                             workers=workers, admin_address=admin_address, starting=False)
        return await self.router.start()

    async def process_id(self) -> int:
        """This actor's current process (a new one after Ray restarted it)."""
        return os.getpid()

    async def started(self) -> bool:
        """Whether the router is serving (False in a process Ray restarted: the launcher starts it again)."""
        return self.router is not None

    def _started(self) -> Router:
        if self.router is None:
            raise RuntimeError(f"router process {self.index} is not started")
        return self.router

    async def add_worker(self, endpoint: WorkerEndpoint) -> bool:
        return await self._started().add_worker(endpoint)

    async def remove_worker(self, worker_id: str, grace_s: float | None = None) -> bool:
        return await self._started().remove_worker(worker_id, grace_s)

    async def rebind_worker(self, worker_id: str, address: str) -> None:
        await self._started().rebind_worker(worker_id, address)

    async def drain(self, grace_s: float | None = None) -> bool:
        return await self._started().drain(grace_s)

    async def stop(self, grace: float | None = 5.0) -> None:
        if self.router is not None:
            await self.router.stop(grace)

    async def report(self, after: float) -> tuple[list[EndedRequest], list[tuple[float, float]], list[Sample]] | None:
        """What the launcher merges into the first process every second, in one call: this process's request
        log past ``after`` (records, gaps) and its own Prometheus samples; None while not started (a process
        Ray restarted: the launcher starts it again)."""
        router = self.router
        if router is None:
            return None
        records, gaps = router.metrics.log.after(after)
        return records, gaps, router.metrics.own_samples(len(router.table))

    async def requests_ended(self) -> int:
        """How many requests this process has seen end (in its metrics window): which process served what."""
        return len(self._started().metrics.log.ended_since(0.0))


RemoteRouterProcess = ray.remote(RouterProcessActor)
