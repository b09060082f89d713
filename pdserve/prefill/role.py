"""Prefill role: compute a prompt chosen by a decode worker, stream each layer's KV into that worker's
landing zone as soon as the layer is written, and reply with the first token once every byte is sent.

Per ``Prefill`` call: the engine admits the prompt ``prefill_only`` (it finishes after the first token
but keeps its blocks) -> before each step's forward pass this role notes which of the step's chunks
belong to transfers and installs a per-layer hook (``layer_streaming``) -> after each layer the hook
enqueues that layer's blocks of every such chunk on their senders (one call per decode worker; CUDA IPC
copies them with one kernel on its own stream, so later layers keep computing) -> the step samples the
first token, the role enqueues the final message carrying it -> once the sender reports the transfer done, the blocks are released and the call answers. Deadlines,
cancellation (``CancelPrefill``) and failures release the blocks exactly once and cancel the transfer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from pdserve.common.errors import InvalidParameterError, OutOfCapacityError
from pdserve.common.outputs import RequestDelta
from pdserve.engine.step_plan import SchedulerPlan
from pdserve.kvtransfer import HandshakeError, KVLayoutInfo, KVSender, TransferState, open_sender
from pdserve.prefill.layer_streaming import StreamedTransfer, layer_hook_for_step
from pdserve.rpc.convert import position_logprobs_to_proto, sampling_params_from_proto
from pdserve.rpc.status import abort_with
from pdserve.v1 import worker_pb2
from pdserve.worker.engine_loop import StepOutput
from pdserve.worker.role import NO_HANDSHAKE, Role, WorkerContext

logger = logging.getLogger(__name__)
#: How many request ids cancelled before their Prefill call arrived are remembered (to refuse it).
CANCELLED_IDS_KEPT = 4096
#: Per-request timestamps kept for benchmarks (the most recent ones).
TIMINGS_KEPT = 8192


@dataclass(eq=False)
class _Transfer(StreamedTransfer):
    first: asyncio.Future[RequestDelta] = field(kw_only=True)
    started: float = field(default_factory=time.perf_counter)


class PrefillRole(Role):
    name = "prefill"

    def __init__(self) -> None:
        self._senders: dict[str, KVSender] = {}  # decode worker id -> sender into its cache
        self._active: dict[str, _Transfer] = {}  # request id -> transfer (touched on both threads)
        # cancelled before their Prefill call arrived (calls may overtake each other): refused later
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.num_prefills = 0
        self.timings: collections.deque[dict[str, Any]] = collections.deque(maxlen=TIMINGS_KEPT)

    def attach(self, worker: WorkerContext) -> None:
        super().attach(worker)
        worker.engine.step_hooks = self

    # ---- handshake -----------------------------------------------------------------------------

    async def kv_handshake(self, request: worker_pb2.KVHandshakeRequest, context: grpc.aio.ServicerContext
                           ) -> worker_pb2.KVHandshakeReply:
        mine = self.worker.kv_layout
        lay = request.layout
        theirs = KVLayoutInfo(model=lay.model, dtype=lay.dtype, block_size=lay.block_size, num_layers=lay.num_layers,
                              num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, layout=lay.layout,
                              tensor_parallel_size=lay.tensor_parallel_size or 1)
        problem = mine.mismatch(theirs)
        if problem is None and request.transport != self.worker.transfer_backend:
            problem = (f"transport: this worker uses {self.worker.transfer_backend}, the peer uses "
                       f"{request.transport}")
        if problem is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"KV handshake between prefill worker {self.worker.worker_id} and decode worker "
                                f"{request.decode_worker_id} failed: {problem}")
        bootstrap = {"host": request.store_host, "port": request.store_port, "group_name": request.group_name,
                     "backend": request.transport}
        try:
            sender = await asyncio.to_thread(open_sender, bootstrap, self.worker.transfer_caches(), mine,
                                             name=self.worker.worker_id, op_timeout_s=self.worker.transfer.timeout_s)
        except HandshakeError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        old = self._senders.pop(request.decode_worker_id, None)
        if old is not None:
            await asyncio.to_thread(old.close)
        self._senders[request.decode_worker_id] = sender
        return worker_pb2.KVHandshakeReply(prefill_worker_id=self.worker.worker_id)

    # ---- prefill -------------------------------------------------------------------------------

    async def prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> worker_pb2.PrefillReply:
        sender = self._senders.get(request.decode_worker_id)
        if sender is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{NO_HANDSHAKE} {request.decode_worker_id} yet")
        try:
            params = sampling_params_from_proto(request.params)
        except InvalidParameterError as exc:
            await abort_with(context, exc)
        rid, ids = request.request_id, list(request.prompt_token_ids.ids)
        if rid in self._cancelled:
            await context.abort(grpc.StatusCode.CANCELLED, f"prefill of {rid} was cancelled by its decode worker")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (request.deadline_s or self.worker.transfer.timeout_s)
        assert sender is not None
        handle = sender.begin(request.transfer_id, rid, list(request.block_ids), request.num_skip_blocks)
        transfer = _Transfer(sender, handle, first=loop.create_future())
        self._active[rid] = transfer
        try:
            await self.worker.on_engine(
                lambda e: e.add_request(rid, prompt_token_ids=ids, params=params, prefill_only=True))
            first = await asyncio.wait_for(asyncio.shield(transfer.first), max(0.0, deadline - loop.time()))
            state = await self._wait_sent(transfer, deadline)
            if state is not TransferState.DONE:
                raise TimeoutError(f"the KV transfer ended {state.name.lower()}"
                                   f"{': ' + handle.error if handle.error else ''}")
        except (InvalidParameterError, OutOfCapacityError) as exc:
            await self._give_up(rid, transfer)
            await abort_with(context, exc)
        except (TimeoutError, asyncio.CancelledError) as exc:
            await self._give_up(rid, transfer)
            if isinstance(exc, asyncio.CancelledError):
                raise
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"prefill of {rid} on {self.worker.worker_id} did not finish: {exc}")
        finally:
            self._active.pop(rid, None)
            await self.worker.on_engine(lambda e: e.release_held_blocks(rid))
        if not first.new_token_ids:
            await context.abort(grpc.StatusCode.ABORTED if first.finish_reason == "abort" else grpc.StatusCode.INTERNAL,
                                f"prefill of {rid} ended without a token: {first.error or first.finish_reason}")
        self.num_prefills += 1
        transfer.timing["sent_at"] = time.time()
        transfer.timing.update(transfer.handle.marks)
        self.timings.append({"request_id": rid, "num_prompt_tokens": len(ids), **transfer.timing})
        reply = worker_pb2.PrefillReply(first_token_id=first.new_token_ids[0], num_cached_tokens=first.num_cached_tokens,
                                        prefill_seconds=time.perf_counter() - transfer.started)
        if first.new_logprobs:
            reply.first_logprobs.CopyFrom(position_logprobs_to_proto(first.new_logprobs[0]))
            reply.has_logprobs = True
        return reply

    async def _wait_sent(self, transfer: _Transfer, deadline: float) -> TransferState:
        """Poll (coarsely: the decode worker admits on its own receiver, not on this reply) until the
        sender is done with the transfer; only then may its blocks be released."""
        loop = asyncio.get_running_loop()
        delay = 1e-3
        while True:
            state = transfer.sender.poll(transfer.handle)
            if state.is_terminal or loop.time() >= deadline:
                return state
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.005)

    async def _give_up(self, rid: str, transfer: _Transfer) -> None:
        await asyncio.to_thread(transfer.sender.cancel, transfer.handle)
        self._active.pop(rid, None)
        await self.worker.on_engine(lambda e: e.abort_request(rid))

    async def cancel_prefill(self, request_ids: list[str]) -> list[str]:
        cancelled = []
        for rid in request_ids:
            transfer = self._active.pop(rid, None)
            if transfer is None:
                self._cancelled[rid] = None
                while len(self._cancelled) > CANCELLED_IDS_KEPT:
                    self._cancelled.popitem(last=False)
                continue
            # returns once the writes already launched completed (one-sided transports)
            await asyncio.to_thread(transfer.sender.cancel, transfer.handle)
            if not transfer.first.done():
                transfer.first.cancel()
            await self.worker.on_engine(lambda e, rid=rid: e.abort_request(rid))
            cancelled.append(rid)
        return cancelled

    # ---- engine-thread hooks -------------------------------------------------------------------

    def before_forward(self, plan: SchedulerPlan) -> Callable[[int, torch.Tensor], None] | None:
        """Note which blocks of this step's chunks to stream; return the per-layer hook (or None)."""
        return layer_hook_for_step(plan, self._active, self.worker.engine.kv.block_size,
                                   self.worker.head_groups // self.worker.engine.tensor_parallel_size)

    def after_forward(self, plan: SchedulerPlan) -> None:
        """Engine thread, once the step's forward and sampling finished (the host has the tokens)."""
        now = time.time()
        for chunk in plan.chunks:
            transfer = self._active.get(chunk.request.request_id)
            if transfer is not None and chunk.samples:
                transfer.timing["forward_done_at"] = now

    def on_step(self, output: StepOutput) -> None:
        """Engine thread: a finished prefill's first token closes its transfer with the final message."""
        for delta in output.deltas:
            transfer = self._active.get(delta.request_id)
            if transfer is None or not delta.finished:
                continue
            if delta.new_token_ids and delta.error is None:
                transfer.sender.finish(transfer.handle, [delta.new_token_ids[0]])
            self.worker.loop.call_soon_threadsafe(_resolve, transfer.first, delta)

    async def close(self) -> None:
        for sender in self._senders.values():
            await asyncio.to_thread(sender.close)
        self._senders.clear()

    def stats(self) -> dict[str, Any]:
        return {"prefills": self.num_prefills, "transfers_in_flight": len(self._active),
                "peers": sorted(self._senders)}


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)
