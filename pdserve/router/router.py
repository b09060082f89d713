"""The router process: the ``PdServe`` gRPC front over a registry of prefill/decode workers.

Lifecycle::

    router = Router(RouterConfig(port=0), model="llama", mode="disaggregated", workers=[...])
    port = await router.start()   # Describe every worker, open the Updates streams, serve
    ...
    await router.stop(grace=5.0)  # stop serving; abort what is still running; close streams/channels

:meth:`Router.start` returns once every worker has answered ``Describe`` or timed out
(``describe_timeout_s``) and the Updates streams of the healthy decode/colocated workers are live (or
the same timeout passed), so requests sent right after it are routed. Workers that were down are
probed again every ``health_check_interval_s``; dropped Updates streams reconnect with backoff. The
health service reports SERVING for ``pdserve.v1.PdServe`` only while a request could be placed (a
routable decode/colocated worker, and in disaggregated mode a routable prefill worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pdserve.common.gc_pauses import GcPauses, freeze_startup_heap, thaw_heap
from pdserve.common.loop_lag import LoopLagMonitor
from pdserve.planner.plan import configuration_name
from pdserve.router.admission import AdmissionControl
from pdserve.router.config import RouterConfig, ServingMode, WorkerEndpoint, WorkerRole, check_topology
from pdserve.router.dashboard import dashboard_data
from pdserve.router.decode_policy import DecodePolicy, DecodePolicyConfig, LeastLoadedDecodePolicy
from pdserve.router.dispatch import Dispatcher
from pdserve.router.inflight import InFlightTable
from pdserve.router.metrics import RouterMetrics
from pdserve.router.online_planner import OnlinePlanner
from pdserve.router.prefill_policy import LeastQueuedPrefillPolicy, PrefillPolicy
from pdserve.router.registry import WorkerRegistry
from pdserve.router.router_processes import SHARED_PORT_OPTIONS, AdminForwarder, start_admin_server
from pdserve.router.servicer import PdServeServicer
from pdserve.router.telemetry import TelemetryPoller
from pdserve.router.tls import read_tls, server_ssl_context
from pdserve.router.updates import UpdatesStream
from pdserve.rpc.auth import ApiKeyInterceptor, ApiKeys
from pdserve.rpc.server import PDSERVE_SERVICE, RunningServer, start_server
from pdserve.v1 import pdserve_pb2_grpc

if TYPE_CHECKING:
    from pdserve.router.openai_http import OpenAIFront

logger = logging.getLogger(__name__)


class Router:
    """Routes ``PdServe`` requests to workers. Create, ``await start()``, ``await stop()``; one event loop.

    ``decode_policy``/``prefill_policy`` default to :class:`LeastLoadedDecodePolicy` (weights from
    ``config``) and :class:`LeastQueuedPrefillPolicy` (``config.min_remote_prefill_tokens``,
    ``config.max_queued_prefill_tokens``, ``config.ttft_slo_ms``).
    """

    def __init__(self, config: RouterConfig, *, model: str, mode: ServingMode | str,
                 workers: Sequence[WorkerEndpoint], decode_policy: DecodePolicy | None = None,
                 prefill_policy: PrefillPolicy | None = None, admin_address: str | None = None,
                 starting: bool = True) -> None:
        """``admin_address``: this is one of several router processes (``config.processes``) but not the
        one that manages the workers, whose private port that is: ``ScalePool``/``SwitchRole`` go there
        (:mod:`pdserve.router.router_processes`). ``starting=False``: the workers are those of a cluster
        already serving (a router process started again), which may lack a pool a fresh cluster needs
        (:func:`~pdserve.router.config.check_topology`)."""
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a non-empty string")
        self.config = config
        self.model = model
        self.mode = ServingMode(mode)
        check_topology(self.mode, workers, starting=starting)
        self.workers = tuple(workers)
        self.registry = WorkerRegistry(self.workers, model=model, describe_timeout_s=config.describe_timeout_s)
        self.table = InFlightTable(config.max_inflight_requests)
        self.metrics = RouterMetrics(model, deadline_s=config.request_timeout_s)
        self.telemetry = TelemetryPoller(self.registry)
        self.loop_lag = LoopLagMonitor()  # how late this loop runs: ClusterStatus, the load samples
        self.gc_pauses = GcPauses()  # the process's garbage-collection pauses (installed while serving)
        self.planner = (OnlinePlanner(config, self.metrics.log, lambda: len(self.workers),
                                      lambda: self.telemetry.snapshots, self.configuration_name, self.switch_one)
                        if config.planner_mode != "off" else None)
        self.metrics.attach(self.registry.all, lambda: self.telemetry.snapshots,
                            lambda: self.planner.latest if self.planner is not None else None,
                            lambda: self.loop_lag.lag_s, lambda: self.gc_pauses.max_pause_s)
        self.dispatcher = Dispatcher(
            config, self.mode, self.registry, self.table,
            decode_policy or LeastLoadedDecodePolicy(DecodePolicyConfig(
                kv_usage_weight=config.kv_usage_weight, running_requests_weight=config.running_requests_weight)),
            prefill_policy or LeastQueuedPrefillPolicy(
                config.min_remote_prefill_tokens, config.max_queued_prefill_tokens,
                None if config.ttft_slo_ms is None else config.ttft_slo_ms / 1e3),
            self.metrics)
        self._streams: dict[str, UpdatesStream] = {}
        self._stream_tasks: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._server: RunningServer | None = None
        self._http: OpenAIFront | None = None
        self._serving: bool | None = None
        self._dashboard_cache: tuple[float, dict[str, Any]] | None = None
        # set by whoever manages the workers (the Ray launcher): (role, replicas, grace_s) -> changed ids;
        # called in a thread (it blocks), serves the ScalePool RPC
        self.scaler: Callable[[str, int, float | None], list[str]] | None = None
        # likewise: (worker_id, new role, grace_s) -> its new id; serves the SwitchRole RPC and the
        # planner's apply mode
        self.role_switcher: Callable[[str, str, float | None], str] | None = None
        if admin_address is not None:
            forwarder = AdminForwarder(admin_address)
            self.scaler, self.role_switcher = forwarder.scale, forwarder.switch
        self._owns_workers = admin_address is None
        self._admin_server: RunningServer | None = None  # the first of several processes: its private port

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the router is not started")
        return self._server.port

    @property
    def admin_address(self) -> str | None:
        """Where the other router processes forward ``ScalePool``/``SwitchRole`` (the first of several
        processes only, once started; else None)."""
        return f"127.0.0.1:{self._admin_server.port}" if self._admin_server is not None else None

    @property
    def http_port(self) -> int | None:
        """The OpenAI HTTP API's bound port (``None`` when ``config.http_port`` is ``None``)."""
        return self._http.port if self._http is not None else None

    def _max_model_len(self) -> int:
        info = self.registry.model_info()
        return int(info.max_model_len) if info is not None else 0

    async def start(self) -> int:
        """Connect to the workers and serve; returns the bound port. Raises OSError if it cannot bind."""
        if self._server is not None or self._tasks:
            raise RuntimeError("the router is already started")
        self.registry.open()
        try:
            await self.registry.describe_all()
            for state in self.registry.all():
                if state.role.streams_tokens:
                    self._start_stream(state.worker_id)
            await self._wait_for_streams(self.config.describe_timeout_s)
            servicer = PdServeServicer(model=self.model, mode=self.mode, registry=self.registry, table=self.table,
                                       dispatcher=self.dispatcher, request_timeout_s=self.config.request_timeout_s,
                                       stream_writes_per_s=self.config.stream_writes_per_s, metrics=self.metrics,
                                       admission=AdmissionControl(self.registry, self.mode,
                                                                  self.config.admission_max_ttft_s),
                                       scaler=lambda: self.scaler, switcher=lambda: self.role_switcher,
                                       loop_lag=self.loop_lag, gc_pauses=self.gc_pauses,
                                       planner=lambda: self.planner.status() if self.planner is not None else None)
            keys = ApiKeys.load(self.config.api_keys_file)
            tls = read_tls(self.config)
            shared = self.config.processes > 1
            self._server = await start_server(
                lambda server: pdserve_pb2_grpc.add_PdServeServicer_to_server(servicer, server),
                self.config.host, self.config.port, service_names=[PDSERVE_SERVICE],
                interceptors=[ApiKeyInterceptor(keys)] if keys.enabled else None, tls=tls,
                options=SHARED_PORT_OPTIONS if shared else None)
            if shared and self._owns_workers:
                self._admin_server = await start_admin_server(
                    lambda server: pdserve_pb2_grpc.add_PdServeServicer_to_server(servicer, server))
            await self._update_health()
            self._tasks.append(asyncio.create_task(self._watch_health(), name="router-health"))
            self._tasks.append(asyncio.create_task(self.loop_lag.run(), name="router-loop-lag"))
            self._tasks.append(asyncio.create_task(self.telemetry.run(), name="router-telemetry"))
            if self.planner is not None:
                self._tasks.append(asyncio.create_task(self.planner.run(), name="router-planner"))
            if self.config.http_port is not None:
                from pdserve.router.openai_http import OpenAIFront  # aiohttp only where HTTP is served

                self._http = OpenAIFront(servicer, self.model, max_model_len=self._max_model_len,
                                         serving=lambda: bool(self._serving),
                                         metrics=self.metrics_text, dashboard=self.dashboard_snapshot,
                                         api_keys=keys)
                await self._http.start(self.config.host, self.config.http_port,
                                       ssl_context=None if tls is None else server_ssl_context(self.config))
        except BaseException:
            if self._server is not None:
                await self._server.stop(0)
                self._server = None
            if self._admin_server is not None:
                await self._admin_server.stop(0)
                self._admin_server = None
            await self._shutdown_background()
            raise
        for state in self.registry.all():
            if not state.routable:
                logger.warning("worker %s (%s, %s) is not usable yet, will retry: %s", state.worker_id,
                               state.role.value, state.endpoint.address,
                               state.last_error or "its Updates stream did not connect")
        frozen = freeze_startup_heap()  # start-up's objects leave the collector's scans (common/gc_pauses.py)
        self.gc_pauses.install()
        logger.debug("froze %d start-up objects out of garbage collection", frozen)
        healthy = sum(s.routable for s in self.registry.all())
        logger.info("router serving %s (%s) on port %d%s%s; %d/%d workers healthy", self.model, self.mode.value,
                    self._server.port, " (TLS)" if tls else "",
                    f", {len(keys)} API key(s) required" if keys.enabled else "", healthy, len(self.workers))
        return self._server.port

    async def dashboard_snapshot(self) -> dict[str, Any]:
        """The dashboard's JSON (:mod:`pdserve.router.dashboard`), worker telemetry at most 1 s old; one
        computation per second whatever the number of open pages (it costs the loop ~10-30 ms with 20k
        requests in the window)."""
        loop_time = asyncio.get_running_loop().time()
        if self._dashboard_cache is not None and loop_time - self._dashboard_cache[0] < 1.0:
            return self._dashboard_cache[1]
        await self.telemetry.fresh(1.0)
        data = dashboard_data(model=self.model, mode=self.mode, config=self.config, workers=self.registry.all(),
                              telemetry=self.telemetry.snapshots, history=list(self.telemetry.history),
                              log=self.metrics.log, placements=self.metrics.placement_counts,
                              planner=self.planner.latest if self.planner is not None else None)
        self._dashboard_cache = (loop_time, data)
        return data

    def configuration_name(self) -> str:
        """This cluster's configuration as the planner names them (``colocated x2``, ``1P1D``)."""
        count = {role: sum(w.role is role for w in self.workers) for role in WorkerRole}
        return configuration_name(colocated=count[WorkerRole.COLOCATED], prefill=count[WorkerRole.PREFILL],
                                  decode=count[WorkerRole.DECODE])

    async def metrics_text(self) -> str:
        """The Prometheus exposition of the whole cluster (worker telemetry at most 1 s old)."""
        await self.telemetry.fresh(1.0)
        return self.metrics.render(len(self.table))

    async def drain(self, grace_s: float | None = None) -> bool:
        """Stop admitting (readiness turns false, new requests get UNAVAILABLE) and wait up to ``grace_s``
        (default ``config.shutdown_grace_s``) for the requests in flight to finish. Returns True if
        none is left. Call :meth:`stop` next."""
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        self.table.closed_reason = "the router is shutting down; retry on another replica"
        self._serving = False
        if self._server is not None:
            await self._server.set_serving(False, PDSERVE_SERVICE)
        left = len(self.table)
        done = await self.table.wait_empty(grace)
        logger.info("drain: %d request(s) in flight, %s", left,
                    "all finished" if done else f"{len(self.table)} still running after {grace:g} s")
        return done

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop serving: calls still running after ``grace`` s are cancelled (and aborted at their
        workers); then the streams and channels close. Safe to call twice."""
        self.gc_pauses.uninstall()
        thaw_heap()
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._admin_server is not None:
            await self._admin_server.stop(0)
            self._admin_server = None
        await asyncio.sleep(0)  # let cancelled handlers run their cleanup (which sends the aborts)
        await self.dispatcher.drain()
        await self._shutdown_background()

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def rebind_worker(self, worker_id: str, address: str) -> None:
        """A worker came back as a new process at ``address`` (its supervisor restarted it): reconnect
        there, describe it, and route to it again once it is usable."""
        self.registry.rebind(worker_id, address)
        stream = self._streams.get(worker_id)
        if stream is not None:
            stream.retry_now()
        await self.registry.describe(worker_id)
        await self._update_health()

    async def add_worker(self, endpoint: WorkerEndpoint) -> bool:
        """Scale out: route to a new worker once it describes itself (and, decode or colocated, its
        Updates stream is live). Returns whether it is usable already (else the health probe retries)."""
        check_topology(self.mode, (*self.workers, endpoint), starting=False)
        self.registry.add(endpoint)
        self.workers = (*self.workers, endpoint)
        await self.registry.describe(endpoint.worker_id)
        if endpoint.role.streams_tokens:
            self._start_stream(endpoint.worker_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._streams[endpoint.worker_id].live.wait(), self.config.describe_timeout_s)
        await self._update_health()
        logger.info("worker %s (%s) added at %s", endpoint.worker_id, endpoint.role.value, endpoint.address)
        return self.registry.get(endpoint.worker_id).routable

    async def remove_worker(self, worker_id: str, grace_s: float | None = None) -> bool:
        """Scale in: stop sending ``worker_id`` new requests, let those it holds finish for up to
        ``grace_s`` (default ``shutdown_grace_s``), then forget it; streams still on it move to another
        worker as if it had died. Returns whether it drained in time. Refuses to remove the last usable
        worker of a pool the mode needs (the prefill pool may go: decode workers then prefill every prompt
        themselves, which is how a split cluster becomes the equivalent of a colocated one)."""
        state = self.registry.get(worker_id)
        pool = self.mode.stream_roles if state.role in self.mode.stream_roles else (state.role,)
        peers = [s for s in self.registry.with_role(*pool) if s.worker_id != worker_id and s.routable]
        if not peers and not _may_empty(state.role):
            raise ValueError(f"worker {worker_id} is the last usable {' or '.join(r.value for r in pool)} worker: "
                             f"add one first")
        state.draining = True
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._holding(worker_id) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        drained = not self._holding(worker_id)
        self._streams.pop(worker_id, None)
        task = self._stream_tasks.pop(worker_id, None)
        if task is not None:
            task.cancel()
            self._tasks.remove(task)
        self.dispatcher.worker_lost(worker_id, "the worker was removed (scale-in)")  # moves what is left
        self.registry.remove(worker_id)
        self.workers = tuple(w for w in self.workers if w.worker_id != worker_id)
        await self._update_health()
        logger.info("worker %s removed (%s)", worker_id, "drained" if drained else "requests moved after the grace")
        return drained

    async def switch_one(self, from_role: str, to_role: str) -> str:
        """Move the least busy ``from_role`` worker to the ``to_role`` pool (the planner's apply mode);
        returns ``"<old id> -> <new id>"``. ``RuntimeError`` when no launcher manages the workers or the
        pool has no worker to spare."""
        if self.role_switcher is None:
            raise RuntimeError("no launcher manages this router's workers")
        pool = [s for s in self.registry.with_role(WorkerRole(from_role)) if s.routable and not s.draining]
        if len(pool) < (1 if _may_empty(WorkerRole(from_role)) else 2):
            raise RuntimeError(f"the {from_role} pool has no worker to spare ({len(pool)} usable)")
        chosen = min(pool, key=lambda s: (len(self.table.on_worker(s.worker_id)) + s.assigned_requests, s.worker_id))
        new_id = await asyncio.to_thread(self.role_switcher, chosen.worker_id, to_role, None)
        return f"{chosen.worker_id} -> {new_id}"

    def _holding(self, worker_id: str) -> bool:
        """Whether an in-flight request still decodes on, or awaits a prefill from, ``worker_id``."""
        return bool(self.table.on_worker(worker_id)) or self.registry.get(worker_id).assigned_requests > 0

    # -- internals --------------------------------------------------------------------------------
    def _start_stream(self, worker_id: str) -> None:
        stream = UpdatesStream(
            worker_id, lambda: self.registry.stub(worker_id), on_update=self.dispatcher.deliver,
            on_live=self.dispatcher.stream_live, on_lost=self.dispatcher.worker_lost,
            backoff_initial_s=self.config.reconnect_backoff_initial_s,
            backoff_max_s=self.config.reconnect_backoff_max_s)
        self._streams[worker_id] = stream
        task = self._stream_tasks[worker_id] = asyncio.create_task(stream.run(), name=f"updates-{worker_id}")
        self._tasks.append(task)

    async def _wait_for_streams(self, timeout_s: float) -> None:
        waits = [asyncio.ensure_future(stream.live.wait()) for worker_id, stream in self._streams.items()
                 if self.registry.get(worker_id).healthy]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=timeout_s)
        for task in pending:
            task.cancel()

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval_s)
            await self.registry.probe()
            await self._update_health()

    async def _update_health(self) -> None:
        if self.table.closed_reason is not None:
            return  # draining: not serving, whatever the workers say
        decode = any(s.routable for s in self.registry.with_role(WorkerRole.DECODE))
        colocated = any(s.routable for s in self.registry.with_role(WorkerRole.COLOCATED))
        prefill = self.registry.with_role(WorkerRole.PREFILL)
        if self.mode is ServingMode.DISAGGREGATED and prefill:  # none at all: decode workers prefill
            decode = decode and any(s.routable for s in prefill)
        serving = decode or colocated  # a colocated worker needs no prefill worker
        if serving != self._serving and self._server is not None:
            self._serving = serving
            await self._server.set_serving(serving, PDSERVE_SERVICE)

    async def _shutdown_background(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._streams.clear()
        self._stream_tasks.clear()
        await self.registry.close()


def _may_empty(role: WorkerRole) -> bool:
    """Whether a pool may lose its last worker while serving: only the prefill pool (decode workers then
    prefill every prompt themselves)."""
    return role is WorkerRole.PREFILL
