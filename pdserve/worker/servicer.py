"""The ``pdserve.v1.Worker`` gRPC service of one worker: describe, load-carrying update stream, and the
role's calls. The same class serves prefill, decode and colocated workers."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from pdserve.common.loop_lag import LoopLagMonitor
from pdserve.common.outputs import RequestDelta
from pdserve.rpc.convert import delta_to_proto
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.worker.engine_loop import LoadReport, load_of
from pdserve.worker.role import Role, WorkerContext
from pdserve.worker.telemetry import GpuProbe, engine_telemetry

logger = logging.getLogger(__name__)


def load_to_proto(load: LoadReport, loop_lag_s: float = 0.0) -> worker_pb2.WorkerLoad:
    return worker_pb2.WorkerLoad(running_requests=load.running_requests, waiting_requests=load.waiting_requests,
                                 kv_usage=load.kv_usage, queued_prefill_tokens=load.queued_prefill_tokens,
                                 num_free_blocks=load.num_free_blocks, prefill_tokens_per_s=load.prefill_tokens_per_s,
                                 loop_lag_s=loop_lag_s)


class UpdateHub:
    """Fans per-step updates out to every ``Updates`` subscriber (asyncio side; fed thread-safely). Every
    load it sends carries how late the worker's event loop runs (``lag``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, lag: LoopLagMonitor | None = None) -> None:
        self._loop = loop
        self.lag = lag or LoopLagMonitor()
        self._subscribers: set[asyncio.Queue[worker_pb2.StepUpdate | None]] = set()
        self.last_load: LoadReport | None = None

    def publish_threadsafe(self, deltas: list[RequestDelta], load: LoadReport) -> None:
        update = worker_pb2.StepUpdate(deltas=[delta_to_proto(d) for d in deltas], load=load_to_proto(load, self.lag.lag_s))
        self.last_load = load
        self._loop.call_soon_threadsafe(self._publish, update)

    def _publish(self, update: worker_pb2.StepUpdate) -> None:
        for q in self._subscribers:
            q.put_nowait(update)

    def subscribe(self) -> asyncio.Queue[worker_pb2.StepUpdate | None]:
        q: asyncio.Queue[worker_pb2.StepUpdate | None] = asyncio.Queue()
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)

    def close(self) -> None:
        for q in self._subscribers:
            q.put_nowait(None)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker: WorkerContext, role: Role, hub: UpdateHub) -> None:
        self.worker = worker
        self.role = role
        self.hub = hub
        self.gpu = GpuProbe(worker.engine.device)

    async def Describe(self, request, context):  # noqa: N802, ANN001, ANN201
        engine = self.worker.engine
        layout = self.worker.kv_layout
        return worker_pb2.WorkerInfo(
            worker_id=self.worker.worker_id, role=self.role.name, address=self.worker.address,
            model_name=engine.config.model, max_model_len=engine.max_model_len, vocab_size=engine.spec.vocab_size,
            kv_layout=worker_pb2.KVLayout(model=layout.model, dtype=layout.dtype, block_size=layout.block_size,
                                          num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                                          head_dim=layout.head_dim, layout=layout.layout,
                                          tensor_parallel_size=layout.tensor_parallel_size),
            num_kv_blocks=engine.kv_layout.num_blocks, load=load_to_proto(self.hub.last_load or load_of(engine), self.hub.lag.lag_s),
            kv_transport=self.worker.transfer_backend, prefill_tokens_per_s=engine.prefill_tokens_per_s,
        )

    async def Submit(self, request, context):  # noqa: N802, ANN001, ANN201
        await self.role.submit(request, context)
        return worker_pb2.SubmitReply()

    async def Abort(self, request, context):  # noqa: N802, ANN001, ANN201
        return worker_pb2.AbortReply(aborted=await self.role.abort(list(request.request_ids)))

    async def Updates(self, request, context) -> AsyncIterator[worker_pb2.StepUpdate]:  # noqa: N802, ANN001
        q = self.hub.subscribe()
        try:
            load = self.hub.last_load or await self.worker.on_engine(load_of)
            yield worker_pb2.StepUpdate(load=load_to_proto(load, self.hub.lag.lag_s))  # headers out: the router may route now
            while True:
                update = await q.get()
                if update is None:
                    return
                yield update
        finally:
            self.hub.unsubscribe(q)

    async def KVHandshake(self, request, context):  # noqa: N802, ANN001, ANN201
        return await self.role.kv_handshake(request, context)

    async def Prefill(self, request, context):  # noqa: N802, ANN001, ANN201
        return await self.role.prefill(request, context)

    async def CancelPrefill(self, request, context):  # noqa: N802, ANN001, ANN201
        return worker_pb2.AbortReply(aborted=await self.role.cancel_prefill(list(request.request_ids)))

    async def Telemetry(self, request, context):  # noqa: N802, ANN001, ANN201
        engine = await self.worker.on_engine(engine_telemetry)
        stats = self.role.stats()
        kv = {"transport": self.worker.transfer_backend}
        for name, key in (("received", "remote_prefills"), ("failures", "failed_transfers"),
                          ("local_recomputes", "local_recomputes"), ("bytes", "kv_bytes_received"),
                          ("seconds", "kv_transfer_seconds"), ("sent", "prefills")):
            if key in stats:
                kv[name] = stats[key]
        snapshot = {"worker_id": self.worker.worker_id, "role": self.role.name,
                    "model": self.worker.engine.config.model, "engine": engine, "kv_transfer": kv,
                    "gpu": self.gpu.read()}
        return worker_pb2.TelemetryReply(json=json.dumps(snapshot))
