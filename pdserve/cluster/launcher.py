"""Start and stop a pdserve cluster on Ray: the worker pools as actors, the router in this process (and
``router.processes - 1`` more router processes as actors on this node, sharing its port: every change of
the workers is made on all of them, see :mod:`pdserve.cluster.router_processes`).

Lifecycle: ``Cluster(config)`` -> ``start()`` joins Ray (``address`` / ``RAY_ADDRESS``) or starts a
local instance, creates every worker actor, waits for their gRPC addresses, then starts the router
on its own asyncio loop thread and a supervisor thread, and returns the router's address ->
``stop()`` stops the supervisor, the router, then every worker (cleanly, then ``ray.kill``), and shuts
Ray down if this process started it. ``stop`` is idempotent and also runs on ``with Cluster(...)`` exit.

Supervision: worker actors are created with ``max_restarts`` (``ClusterConfig.max_worker_restarts``):
Ray starts a dead worker's process again, the worker serves at once, and the supervisor (every
``SUPERVISE_INTERVAL_S``) asks each actor for its address and points the router at a new one
(:meth:`Router.rebind_worker`). ``pdserve status`` shows each worker's restarts and recovery time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.cluster.config import ClusterConfig
from pdserve.cluster.router_processes import ExtraRouterProcesses
from pdserve.cluster.worker_actor import RemoteWorkerActor
from pdserve.common.config import MAX_POOL_REPLICAS
from pdserve.common.errors import OutOfCapacityError
from pdserve.router import Router, WorkerEndpoint, WorkerRole
from pdserve.rpc.auth import CLUSTER_TOKEN_ENV
from pdserve.rpc.server import format_address

logger = logging.getLogger(__name__)
#: How often the supervisor asks every worker actor where it serves.
SUPERVISE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class WorkerHandle:
    worker_id: str
    role: str
    address: str
    actor: Any


class Cluster:
    def __init__(self, config: ClusterConfig, *, address: str | None = None, log_level: str = "WARNING",
                 start_timeout_s: float = 600.0) -> None:
        self.config = config
        self.ray_address = address or os.environ.get("RAY_ADDRESS")
        self.log_level = log_level
        self.start_timeout_s = start_timeout_s
        self.workers: list[WorkerHandle] = []
        self._actors: list[Any] = []  # every actor created, started or not (all are killed on stop)
        self._started_ray = False
        self._placement_groups: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self.router: Router | None = None
        self.router_address = ""
        self.http_url = ""  # the OpenAI-compatible HTTP API, when router.http_port is set
        self._stopped = False
        self._stop_supervising = threading.Event()
        self._supervisor: threading.Thread | None = None
        # router processes past the first (router.processes)
        self._extra_routers = ExtraRouterProcesses(config.router, config.model, config.mode, log_level)

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- start ---------------------------------------------------------------------------------

    def start(self) -> str:
        try:
            self._join_ray()
            self._start_workers()
            self._start_router()
            self._start_supervisor()
        except BaseException:
            self.stop()
            raise
        return self.router_address

    def _join_ray(self) -> None:
        if ray.is_initialized():
            return
        if self.ray_address:
            ray.init(address=self.ray_address, log_to_driver=True)
        else:
            needed = sum(self.config.pool(r).replicas for r in self.config.roles)
            ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False, log_to_driver=True)
            self._started_ray = True

    def _start_workers(self) -> None:
        cfg = self.config
        # minted once per cluster (kept if the environment sets one: every process must then share it);
        # this process (the router's) reads it from the environment too
        token = os.environ.setdefault(CLUSTER_TOKEN_ENV, secrets.token_urlsafe(32))
        specs = [(f"{role}-{i}", role, i) for role in cfg.roles for i in range(cfg.pool(role).replicas)]
        strategies = self._pair_strategies()
        actors = [(worker_id, role, self._create_actor(worker_id, role, token, strategies.get((role, index))))
                  for worker_id, role, index in specs]
        addresses = ray.get([a.start.remote() for _, _, a in actors],
                            timeout=self.start_timeout_s)
        self.workers = [WorkerHandle(w, r, addr, a) for (w, r, a), addr in zip(actors, addresses)]
        logger.info("workers: %s", ", ".join(f"{w.worker_id}@{w.address}" for w in self.workers))

    def _create_actor(self, worker_id: str, role: str, token: str, strategy: Any = None) -> Any:
        cfg = self.config
        pool = cfg.pool(role)
        options: dict[str, Any] = {"num_gpus": pool.gpus_per_worker, "num_cpus": 0 if pool.gpus_per_worker else 1,
                                   "max_concurrency": 4, "max_restarts": cfg.max_worker_restarts,
                                   "max_task_retries": 0,
                                   # the workers' ports accept only calls carrying this cluster's token
                                   "runtime_env": {"env_vars": {CLUSTER_TOKEN_ENV: token}}}
        if pool.ray_resources:
            options["resources"] = dict(pool.ray_resources)
        if strategy is not None:
            options["scheduling_strategy"] = strategy
        actor = RemoteWorkerActor.options(**options).remote(
            worker_id, role, cfg.engine_config(role).to_dict(),
            dataclasses.asdict(cfg.kv_transfer),
            cpu_threads=None if pool.gpus_per_worker else 1, log_level=self.log_level)
        self._actors.append(actor)
        return actor

    def _discard(self, actors: list[Any]) -> None:
        """Kill actors that never joined the cluster (still waiting for resources, or not started)."""
        for actor in actors:
            ray.kill(actor)
            self._actors.remove(actor)

    # ---- scaling -------------------------------------------------------------------------------

    def scale(self, role: str, replicas: int, *, grace_s: float | None = None) -> list[str]:
        """Grow or shrink the ``role`` pool to ``replicas`` workers while serving: new workers start on
        whatever node Ray finds the pool's resources on, then the router routes to them; removed ones
        (the newest first) stop taking requests, finish theirs for up to ``grace_s`` (default
        ``router.shutdown_grace_s``; streams left then move to another worker), and stop. Returns the
        ids of the workers added or removed. Blocks until done; call from outside the router's loop. New
        workers Ray cannot start within ``start_timeout_s`` (the cluster lacks their resources) are killed
        and none is added: :class:`OutOfCapacityError`."""
        if role not in self.config.roles:
            raise ValueError(f"this {self.config.mode} cluster has no {role} pool (pools: {', '.join(self.config.roles)})")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= MAX_POOL_REPLICAS:
            raise ValueError(f"replicas must be an integer in [1, {MAX_POOL_REPLICAS}], got {replicas!r}")
        assert self.router is not None and self._loop is not None, "start() first"
        current = [w for w in self.workers if w.role == role]
        changed: list[str] = []
        if replicas > len(current):
            token = os.environ[CLUSTER_TOKEN_ENV]
            taken = {w.worker_id for w in self.workers}
            ids = list(itertools.islice((f"{role}-{i}" for i in itertools.count() if f"{role}-{i}" not in taken),
                                        replicas - len(current)))
            actors = [(worker_id, self._create_actor(worker_id, role, token)) for worker_id in ids]
            try:
                addresses = ray.get([a.start.remote() for _, a in actors], timeout=self.start_timeout_s)
                nodes = ray.get([a.node_id.remote() for _, a in actors], timeout=60)
            except GetTimeoutError:
                self._discard([a for _, a in actors])
                pool = self.config.pool(role)
                each = f"{pool.gpus_per_worker} GPU(s)" if pool.gpus_per_worker else "1 CPU"
                raise OutOfCapacityError(
                    f"Ray could not start {len(actors)} more {role} worker(s) (each needs {each}"
                    + (f" and {dict(pool.ray_resources)}" if pool.ray_resources else "")
                    + f") within {self.start_timeout_s:g} s; none was added. Free: {ray.available_resources()}"
                ) from None
            for (worker_id, actor), address, node in zip(actors, addresses, nodes):
                self.workers.append(WorkerHandle(worker_id, role, address, actor))
                endpoint = WorkerEndpoint(worker_id, WorkerRole(role), address, node)
                self._on_routers("add_worker", endpoint, timeout=120)
                changed.append(worker_id)
        for handle in sorted(current, key=lambda w: w.worker_id, reverse=True)[: max(0, len(current) - replicas)]:
            wait = (self.config.router.shutdown_grace_s if grace_s is None else grace_s) + 60
            self._on_routers("remove_worker", handle.worker_id, grace_s, timeout=wait)
            self.workers.remove(handle)
            try:
                ray.get(handle.actor.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 (killed next either way)
                logger.debug("worker %s did not stop cleanly", handle.worker_id, exc_info=True)
            ray.kill(handle.actor)
            changed.append(handle.worker_id)
        return changed

    def switch_role(self, worker_id: str, role: str, *, grace_s: float | None = None) -> str:
        """Turn worker ``worker_id`` into a ``role`` worker while serving, without a restart: the router
        stops sending it requests and lets those it holds finish for up to ``grace_s`` (default
        ``router.shutdown_grace_s``; streams left then move to another worker, as in a scale-in), the
        worker closes its old role and takes the new one (same process, engine and address), and the
        router adds it under its new id (``<role>-<n>``, returned). A split cluster's worker may also
        become ``colocated``: it streams tokens like a decode worker and prefills every prompt it gets
        itself (the ``colocated`` pool's step-time budget; its other engine settings stay those it was
        started with). Refused (``ValueError``) for a role this cluster cannot hold, or when the worker is the last
        usable one that its mode needs (but the last prefill worker may go: decode workers then prefill
        every prompt themselves). Blocks; call from outside the router's loop."""
        assert self.router is not None and self._loop is not None, "start() first"
        handle = next((w for w in self.workers if w.worker_id == worker_id), None)
        if handle is None:
            raise ValueError(f"no worker {worker_id!r}; workers: {', '.join(w.worker_id for w in self.workers)}")
        # a split cluster's worker may also become colocated (it then prefills every prompt it gets)
        roles = (*self.config.roles, "colocated") if self.config.mode == "disaggregated" else self.config.roles
        if role not in roles or role == handle.role:
            raise ValueError(f"worker {worker_id} cannot become a {role} worker: this {self.config.mode} cluster's "
                             f"workers may be {', '.join(roles)}, and it is a {handle.role} worker")
        started = time.perf_counter()
        wait = (self.config.router.shutdown_grace_s if grace_s is None else grace_s) + 60
        self._on_routers("remove_worker", worker_id, grace_s, timeout=wait)
        taken = {w.worker_id for w in self.workers}
        new_id = next(f"{role}-{i}" for i in itertools.count() if f"{role}-{i}" not in taken)
        node = ray.get(handle.actor.node_id.remote(), timeout=60)
        try:
            ray.get(handle.actor.switch_role.remote(role, new_id, self.config.engine_config(role).step_time_budget_ms),
                    timeout=120)
        except Exception:
            old = WorkerEndpoint(worker_id, WorkerRole(handle.role), handle.address, node)  # back, as it was
            self._on_routers("add_worker", old, timeout=120)
            raise
        index = self.workers.index(handle)
        self.workers[index] = WorkerHandle(new_id, role, handle.address, handle.actor)
        endpoint = WorkerEndpoint(new_id, WorkerRole(role), handle.address, node)
        self._on_routers("add_worker", endpoint, timeout=120)
        logger.info("worker %s is now %s (%.2f s, drain included)", worker_id, new_id, time.perf_counter() - started)
        return new_id

    def _pair_strategies(self) -> dict[tuple[str, int], Any]:
        cfg = self.config
        if not cfg.pack_pairs or cfg.mode != "disaggregated":
            return {}
        out: dict[tuple[str, int], Any] = {}
        for i in range(min(cfg.prefill.replicas, cfg.decode.replicas)):
            bundle = [{"GPU": cfg.prefill.gpus_per_worker, "CPU": 1, **cfg.prefill.ray_resources},
                      {"GPU": cfg.decode.gpus_per_worker, "CPU": 1, **cfg.decode.ray_resources}]
            group = placement_group([{k: v for k, v in b.items() if v} for b in bundle], strategy="STRICT_PACK")
            ray.get(group.ready(), timeout=self.start_timeout_s)
            self._placement_groups.append(group)
            out[("prefill", i)] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
            out[("decode", i)] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=1)
        return out

    def _start_router(self) -> None:
        cfg = self.config
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="pdserve-router", daemon=True)
        self._loop_thread.start()
        endpoints = self._endpoints()  # with nodes: the router prefers a prefill worker on the decode worker's
        self.router = Router(cfg.router, model=cfg.model, mode=cfg.mode, workers=endpoints)
        self.router.scaler = lambda role, replicas, grace_s: self.scale(role, replicas, grace_s=grace_s)
        self.router.role_switcher = lambda worker_id, role, grace_s: self.switch_role(worker_id, role, grace_s=grace_s)
        port = asyncio.run_coroutine_threadsafe(self.router.start(), self._loop).result(120)
        self._extra_routers.start(self.router, endpoints)
        host = cfg.router.host if cfg.router.host not in ("0.0.0.0", "::") else "127.0.0.1"
        self.router_address = format_address(host, port)
        http_port = self.router.http_port
        scheme = "https" if self.config.router.tls_cert_file else "http"
        self.http_url = f"{scheme}://{format_address(host, http_port)}" if http_port is not None else ""

    def _on_routers(self, method: str, *args: Any, timeout: float) -> list[Any]:
        """Call ``method`` with ``args`` on every router process at once (the first on its loop, the others
        through their actors); the first's result, then those of the others that answered. Raises what the
        first raised."""
        assert self.router is not None and self._loop is not None, "start() first"
        future = asyncio.run_coroutine_threadsafe(getattr(self.router, method)(*args), self._loop)
        others = self._extra_routers.call(method, *args, timeout_s=timeout)
        return [future.result(timeout), *others]

    def _endpoints(self) -> list[WorkerEndpoint]:
        """The workers as the routers should see them now."""
        nodes = self.worker_nodes()
        return [WorkerEndpoint(w.worker_id, WorkerRole(w.role), w.address, nodes[w.worker_id]) for w in self.workers]

    def _start_supervisor(self) -> None:
        self._supervisor = threading.Thread(target=self._supervise, name="pdserve-supervisor", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        """Point the router at every worker that came back at a new address (see the module docstring),
        and merge the other router processes' request logs into the first's."""
        while not self._stop_supervising.wait(SUPERVISE_INTERVAL_S):
            if self.router is not None and self._loop is not None:
                self._extra_routers.supervise(self.router, self._loop, self._endpoints)
            for worker in list(self.workers):
                try:
                    address = ray.get(worker.actor.address.remote(), timeout=5)
                except Exception:  # noqa: BLE001 (dead, restarting or removed: asked again next round)
                    continue
                if not address or address == worker.address or self.router is None or self._loop is None:
                    continue
                index = next((i for i, w in enumerate(self.workers) if w.worker_id == worker.worker_id), None)
                if index is None:  # removed meanwhile (scale-in)
                    continue
                logger.warning("worker %s came back at %s (was %s)", worker.worker_id, address, worker.address)
                try:  # restarted in the role it was created with: switch it again (it holds nothing yet)
                    if ray.get(worker.actor.identity.remote(), timeout=10) != [worker.worker_id, worker.role]:
                        ray.get(worker.actor.switch_role.remote(
                            worker.role, worker.worker_id, self.config.engine_config(worker.role).step_time_budget_ms),
                            timeout=60)
                except Exception:  # noqa: BLE001 (asked again next round)
                    logger.exception("could not give restarted worker %s its role back", worker.worker_id)
                    continue
                self.workers[index] = WorkerHandle(worker.worker_id, worker.role, address, worker.actor)
                try:
                    self._on_routers("rebind_worker", worker.worker_id, address, timeout=30)
                except Exception:  # noqa: BLE001 (the router keeps probing it)
                    logger.exception("could not point the router at worker %s", worker.worker_id)

    # ---- inspection ----------------------------------------------------------------------------

    def worker_nodes(self) -> dict[str, str]:
        """Worker id -> the Ray node it runs on."""
        nodes = ray.get([w.actor.node_id.remote() for w in self.workers], timeout=60)
        return {w.worker_id: node for w, node in zip(self.workers, nodes)}

    def worker_stats(self) -> list[dict[str, Any]]:
        return ray.get([w.actor.stats.remote() for w in self.workers], timeout=60)

    def check_invariants(self) -> None:
        ray.get([w.actor.check_invariants.remote() for w in self.workers], timeout=60)

    # ---- stop ----------------------------------------------------------------------------------

    def drain(self, grace_s: float | None = None) -> bool:
        """Stop admitting and let requests in flight finish (up to ``router.shutdown_grace_s``); True if
        none is left. ``stop()`` next."""
        if self.router is None or self._loop is None:
            return True
        grace = self.config.router.shutdown_grace_s if grace_s is None else grace_s
        return all(self._on_routers("drain", grace, timeout=grace + 30))

    def stop(self, grace: float = 2.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop_supervising.set()
        if self._supervisor is not None:
            self._supervisor.join(10)
        if self.router is not None and self._loop is not None:
            try:
                self._on_routers("stop", grace, timeout=grace + 30)
            except Exception:  # noqa: BLE001 (keep stopping the rest)
                logger.exception("router stop failed")
        self._extra_routers.kill()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(10)
        stops = [actor.stop.remote() for actor in self._actors]
        for ref in stops:
            try:
                ray.get(ref, timeout=30)
            except Exception:  # noqa: BLE001 (a worker that failed to start cannot stop cleanly)
                logger.debug("a worker did not stop cleanly", exc_info=True)
        for actor in self._actors:
            ray.kill(actor)
        for group in self._placement_groups:
            remove_placement_group(group)
        if self._started_ray:
            ray.shutdown()
