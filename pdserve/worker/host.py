"""One worker process's runtime: the engine on its thread, the gRPC control service on an asyncio loop
thread, and the role that connects them. Used by the Ray actor and directly by tests.

Lifecycle: ``WorkerHost(...)`` (nothing started) -> ``start()`` loads the model, starts the engine
thread and the gRPC server, returns the address -> ``call_engine(fn)`` for inspection ->
``switch_role(...)`` any number of times (an elastic role: the same process, engine and address) ->
``stop()`` stops accepting calls, closes the role's transports, stops the engine thread. ``stop`` is
idempotent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from pdserve.common.config import EngineConfig
from pdserve.common.gc_pauses import freeze_startup_heap, thaw_heap
from pdserve.common.kv_transfer_config import KVTransferConfig
from pdserve.engine.engine import LLMEngine
from pdserve.kvtransfer import resolve_backend
from pdserve.rpc.auth import peer_interceptors
from pdserve.rpc.server import WORKER_SERVICE, RunningServer, format_address, start_server
from pdserve.v1 import worker_pb2_grpc
from pdserve.worker.engine_loop import EngineLoop, StepOutput
from pdserve.worker.role import Role, WorkerContext
from pdserve.worker.servicer import UpdateHub, WorkerServicer

logger = logging.getLogger(__name__)
T = TypeVar("T")

class WorkerHost:
    def __init__(self, worker_id: str, role: Role, engine_config: EngineConfig, transfer: KVTransferConfig,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.worker_id = worker_id
        self.role = role
        self.engine_config = engine_config
        self.transfer = transfer
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="pdserve-rpc", daemon=True)
        self._server: RunningServer | None = None
        self.engine_loop: EngineLoop | None = None
        self.address = ""
        self._stopped = False

    def start(self) -> str:
        engine = LLMEngine(self.engine_config)
        backend = resolve_backend(self.transfer.backend, engine.device)
        self._loop_thread.start()
        hub = UpdateHub(self._loop)
        self._lag_task = asyncio.run_coroutine_threadsafe(hub.lag.run(), self._loop)  # ends with the loop
        self.engine_loop = EngineLoop(engine, on_step=lambda output: self._on_step(hub, output))
        context = WorkerContext(self.worker_id, self.role.name, self.host, self.engine_loop, self._loop,
                                self.transfer, backend)
        self.role.attach(context)
        servicer = WorkerServicer(context, self.role, hub)
        self._context, self._servicer = context, servicer
        self._hub = hub
        self._server = self._run(start_server(lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, s),
                                              self.host, self.port, service_names=[WORKER_SERVICE],
                                              interceptors=peer_interceptors())).result(60)
        self.address = context.address = format_address(self.host, self._server.port)
        freeze_startup_heap()  # the engine's objects leave the collector's scans (common/gc_pauses.py)
        self.engine_loop.start()
        logger.info("%s worker %s serving on %s", self.role.name, self.worker_id, self.address)
        return self.address

    def switch_role(self, role: Role, worker_id: str, step_time_budget_ms: float | None,
                    settle_s: float = 10.0) -> float:
        """Serve as ``role`` under ``worker_id`` from now on, keeping the engine (weights, KV cache,
        graphs) and the gRPC address; returns the seconds it took. Call it once the router no longer
        routes here (``Router.remove_worker``): what the worker still runs then is aborted -- the
        router moved those streams elsewhere -- and the switch waits up to ``settle_s`` for their
        blocks to come back (``RuntimeError`` if they do not; the old role then stays). The old role's
        transports close (prefill workers that streamed to it notice on their next send, which the
        router no longer asks for); the new role's open as its first requests need them. The step-time
        budget follows the new role (a prefill worker protects no TPOT)."""
        assert self.engine_loop is not None, "start() first"
        started = time.perf_counter()
        orphans = self.call_engine(lambda e: e.unfinished_request_ids())
        if orphans:
            self._run(self.role.abort(orphans)).result(30)
            self._run(self.role.cancel_prefill(orphans)).result(30)
        deadline = time.monotonic() + settle_s
        while (held := self.call_engine(lambda e: e.num_unfinished_requests + e.num_held_requests)) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        if held:
            raise RuntimeError(f"worker {self.worker_id} still holds {held} requests {settle_s:g} s after they "
                               f"were aborted; it stays a {self.role.name} worker")
        self._run(self.role.close()).result(30)

        def retune(engine: LLMEngine) -> None:
            engine.step_hooks = None
            budget = None if step_time_budget_ms is None else step_time_budget_ms / 1e3
            engine.scheduler.config = dataclasses.replace(engine.scheduler.config, step_time_budget_s=budget)

        self.call_engine(retune)
        self.engine_loop.run_urgent_calls_mid_step(lambda: False)
        self._context.worker_id, self._context.role = worker_id, role.name
        role.attach(self._context)
        self._servicer.role = self.role = role
        old, self.worker_id = self.worker_id, worker_id
        seconds = time.perf_counter() - started
        logger.info("worker %s is now %s worker %s (%.2f s)", old, role.name, worker_id, seconds)
        return seconds

    def _on_step(self, hub: UpdateHub, output: StepOutput) -> None:
        self.role.on_step(output)
        if output.deltas:
            hub.publish_threadsafe(output.deltas, output.load)

    def _run(self, coro: Any) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call_engine(self, fn: Callable[[LLMEngine], T], timeout: float = 60.0) -> T:
        assert self.engine_loop is not None, "start() first"
        return self.engine_loop.call(fn).result(timeout)

    def stats(self) -> dict[str, Any]:
        def engine_stats(engine: LLMEngine) -> dict[str, Any]:
            return {"forward_tokens": engine.runner.num_forward_tokens,
                    "prompt_tokens_computed": engine.runner.num_prompt_tokens_computed,
                    "unfinished": engine.num_unfinished_requests, "held": engine.num_held_requests,
                    "preemptions": engine.scheduler.num_preemptions,
                    "budget_cut_chunks": engine.scheduler.num_budget_cut_chunks,
                    "deferred_chunks": engine.scheduler.num_deferred_chunks,
                    "filled_chunks": engine.scheduler.num_filled_chunks,
                    "late_prompts": engine.scheduler.num_late_prompts,
                    "step_time_error": engine.step_monitor.summary() if engine.step_monitor else None,
                    "free_blocks": engine.kv.num_free_blocks, "usable_blocks": engine.kv.pool.num_usable_blocks,
                    "tensor_parallel_ranks": engine.tensor_parallel_size}

        return {"worker_id": self.worker_id, "role": self.role.name, **self.call_engine(engine_stats),
                **self.role.stats()}

    def timings(self) -> list[dict[str, Any]]:
        """Per-request timestamps (``time.time()``) the role recorded: what the transfer benchmark reads."""
        return list(getattr(self.role, "timings", []))

    def stop(self, grace: float = 2.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._run(self._server.stop(grace)).result(grace + 10)
        if self.engine_loop is not None:
            self._run(self.role.close()).result(30)
            self._hub_close()
            self.engine_loop.stop()
        thaw_heap()
        lag_task = getattr(self, "_lag_task", None)
        if lag_task is not None:
            lag_task.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(10)

    def _hub_close(self) -> None:
        hub = getattr(self, "_hub", None)
        if hub is not None:
            self._loop.call_soon_threadsafe(hub.close)
