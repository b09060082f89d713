"""The role interface a worker plugs into its control service, and what a role can use of its worker.

A role receives the gRPC calls of its role (the decode role: ``Submit``/``Abort`` and KV landing; the
prefill role: ``KVHandshake``/``Prefill``/``CancelPrefill``); calls that belong to the other role are
answered ``FAILED_PRECONDITION`` naming the right one. Roles run their async methods on the worker's
asyncio loop and reach the engine only through :class:`EngineLoop` calls.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from pdserve.common.kv_transfer_config import KVTransferConfig
from pdserve.engine.engine import LLMEngine
from pdserve.kvtransfer import KVLayoutInfo
from pdserve.v1 import worker_pb2
from pdserve.worker.engine_loop import EngineLoop, StepOutput

#: How a prefill worker refuses a ``Prefill`` from a decode worker it has no KV channel with (it was
#: restarted, or switched roles, since the handshake): the decode worker shakes hands again and retries.
NO_HANDSHAKE = "no KV handshake with decode worker"


def model_identity(engine: LLMEngine) -> str:
    """What both sides of a KV transfer must agree on about the model: architecture and shapes."""
    s = engine.spec
    return (f"{s.architecture}/L{s.num_layers}/H{s.hidden_size}/q{s.num_heads}/kv{s.num_kv_heads}"
            f"/d{s.head_dim}/v{s.vocab_size}")


@dataclass
class WorkerContext:
    worker_id: str
    role: str
    host: str
    engine_loop: EngineLoop
    loop: asyncio.AbstractEventLoop
    transfer: KVTransferConfig
    transfer_backend: str  # resolved: "nccl" | "gloo" | "loopback"
    address: str = ""

    @property
    def engine(self) -> LLMEngine:
        return self.engine_loop.engine

    @property
    def kv_layout(self) -> KVLayoutInfo:
        engine = self.engine
        return KVLayoutInfo(model=model_identity(engine), dtype=str(engine.dtype).removeprefix("torch."),
                            block_size=engine.kv_layout.block_size,
                            # one "layer" per layer and group of KV heads (transfer_caches)
                            num_layers=engine.kv_layout.num_layers * self.head_groups,
                            num_kv_heads=engine.kv_layout.num_kv_heads * engine.tensor_parallel_size // self.head_groups,
                            head_dim=engine.kv_layout.head_dim, tensor_parallel_size=self.head_groups)

    @property
    def head_groups(self) -> int:
        """Groups of KV heads a transfer moves per layer (the cluster's; else this worker's degree)."""
        return self.transfer.head_groups or self.engine.tensor_parallel_size

    def transfer_caches(self) -> list[torch.Tensor]:
        """The cache views this worker's KV transfers move, in the order of :attr:`kv_layout`."""
        return self.engine.transfer_caches(self.head_groups)

    async def on_engine(self, fn: Any, *, urgent: bool = False) -> Any:
        """Run ``fn(engine)`` on the engine thread and await its result (``urgent``: see
        :meth:`EngineLoop.call`)."""
        return await asyncio.wrap_future(self.engine_loop.call(fn, urgent=urgent))


class Role:
    """Base role: every call answers FAILED_PRECONDITION; subclasses implement their own calls."""

    name = "none"

    def attach(self, worker: WorkerContext) -> None:
        self.worker = worker

    async def close(self) -> None:
        return None

    async def submit(self, request: worker_pb2.SubmitRequest, context: grpc.aio.ServicerContext) -> None:
        await self._wrong_role(context, "Submit", "decode or colocated")

    async def abort(self, request_ids: list[str]) -> list[str]:
        return []

    async def kv_handshake(self, request: worker_pb2.KVHandshakeRequest, context: grpc.aio.ServicerContext
                           ) -> worker_pb2.KVHandshakeReply:
        await self._wrong_role(context, "KVHandshake", "prefill")
        raise AssertionError("unreachable")

    async def prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> worker_pb2.PrefillReply:
        await self._wrong_role(context, "Prefill", "prefill")
        raise AssertionError("unreachable")

    async def cancel_prefill(self, request_ids: list[str]) -> list[str]:
        return []

    def on_step(self, output: StepOutput) -> None:
        """Engine thread, after every step that produced deltas or landing zones (before the deltas are
        published); must not block."""
        return None

    def stats(self) -> dict[str, Any]:
        return {}

    async def _wrong_role(self, context: grpc.aio.ServicerContext, rpc: str, wanted: str) -> None:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"{rpc} goes to a {wanted} worker; worker {self.worker.worker_id} is a {self.name} worker")
