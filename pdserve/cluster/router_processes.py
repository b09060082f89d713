"""The launcher's router processes past the first (``router.processes``): start, call, merge, revive.

Lifecycle: :meth:`ExtraRouterProcesses.start` creates ``processes - 1`` :class:`RouterProcessActor`\\ s on
the launcher's node (no CPU reserved, restarted by Ray when their process dies) and starts each on the
first router's port -> :meth:`call` runs a router method on all of them (scaling, role switches, worker
restarts, drain, stop) -> :meth:`supervise` (the launcher's supervisor, every second) merges their
request logs and Prometheus samples into the first router's and starts the router again in any actor
Ray restarted, over the workers as they are then -> :meth:`kill`.

A process that fails a call is left to :meth:`supervise`: a restarted one gets a fresh router over the
current workers, so it needs none of the changes it missed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pdserve.cluster.router_actor import RemoteRouterProcess
from pdserve.router import Router, RouterConfig, WorkerEndpoint
from pdserve.rpc.auth import API_KEYS_ENV, CLUSTER_TOKEN_ENV

logger = logging.getLogger(__name__)


def process_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What a router process needs from the launcher's environment: the cluster token, and the API keys
    when they come from the environment (``PDSERVE_API_KEYS``): a process without them would serve the
    shared port without asking for a key. Ray does not hand the launcher's environment to its actors
    (their processes start from the Ray node's)."""
    env = {CLUSTER_TOKEN_ENV: environ[CLUSTER_TOKEN_ENV]}
    if environ.get(API_KEYS_ENV):
        env[API_KEYS_ENV] = environ[API_KEYS_ENV]
    return env


class ExtraRouterProcesses:
    def __init__(self, config: RouterConfig, model: str, mode: str, log_level: str) -> None:
        self._config = config
        self._model = model
        self._mode = mode
        self._log_level = log_level
        self.actors: list[Any] = []
        self._logs_after: list[float] = []  # per actor: the time of the last log entry merged
        self._port = 0
        self._admin_address = ""

    def start(self, first: Router, endpoints: list[WorkerEndpoint], timeout_s: float = 120.0) -> None:
        """``processes - 1`` more router processes on ``first``'s port and this node (none for 1)."""
        if self._config.processes <= 1:
            return
        assert first.admin_address is not None, "the first router shares its port: it has an admin address"
        self._port, self._admin_address = first.port, first.admin_address
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        env = process_env(os.environ)
        for index in range(1, self._config.processes):
            # no CPU reserved (as for the first router, in the launcher's process): the pools' CPUs stay theirs
            self.actors.append(RemoteRouterProcess.options(
                num_cpus=0, scheduling_strategy=here, max_restarts=-1, max_task_retries=0,
                runtime_env={"env_vars": env}).remote(index, self._log_level))
        ray.get([self._start_one(actor, endpoints) for actor in self.actors], timeout=timeout_s)
        self._logs_after = [0.0] * len(self.actors)
        logger.info("%d router processes share port %d", self._config.processes, self._port)

    def _start_one(self, actor: Any, endpoints: list[WorkerEndpoint]) -> Any:
        return actor.start.remote(self._config, self._model, self._mode, endpoints, self._port, self._admin_address)

    def call(self, method: str, *args: Any, timeout_s: float) -> list[Any]:
        """``method(*args)`` on every process at once; the results of those that answered (a process that
        failed is logged and left to :meth:`supervise`)."""
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        results = []
        for index, ref in enumerate(refs, start=1):
            try:
                results.append(ray.get(ref, timeout=timeout_s))
            except Exception:  # noqa: BLE001 (dead or restarting: supervise() starts it over the current workers)
                logger.warning("router process %d failed %s; it is started again once back", index, method,
                               exc_info=True)
        return results

    def supervise(self, first: Router, loop: asyncio.AbstractEventLoop,
                  endpoints: Callable[[], list[WorkerEndpoint]]) -> None:
        """Merge every process's new request log entries into ``first``'s (on ``loop``), and start the router
        again, over ``endpoints()``, in any process Ray restarted since the last call."""
        log = first.metrics.log
        for i, actor in enumerate(self.actors):
            try:
                report = ray.get(actor.report.remote(self._logs_after[i]), timeout=10)
                if report is None:
                    logger.warning("router process %d came back; starting its router again", i + 1)
                    try:
                        ray.get(self._start_one(actor, endpoints()), timeout=60)
                    except Exception as exc:  # noqa: BLE001 (tried again next round)
                        logger.warning("router process %d did not start again: %s", i + 1, exc)
                    continue  # a fresh log: what the dead process logged is lost
            except Exception:  # noqa: BLE001 (dead, restarting or slow: asked again next round)
                logger.debug("router process %d did not answer", i + 1, exc_info=True)
                continue
            records, gaps, samples = report
            loop.call_soon_threadsafe(first.metrics.set_process_samples, i + 1, samples)
            times = [r.ended_at for r in records] + [t for t, _ in gaps]
            if times:
                self._logs_after[i] = max(times)
                loop.call_soon_threadsafe(log.merge, records, gaps)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
