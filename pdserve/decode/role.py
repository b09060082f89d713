"""Decode role: admit requests, pre-allocate landing zones, have a prefill worker stream the prompt's KV
into them, then decode in the continuous batch. Without a prefill address (colocated mode, or a prompt
the router keeps local) the same engine prefills the prompt itself.

Per remote request: ``Submit`` -> engine admits it ``remote_prefill`` -> the next step allocates its
landing zone (past any local prefix-cache hit) -> this role ``expect``s the transfer on the receiver
shared with that prefill worker (handshake on first use) and calls ``Prefill`` -> once the reply (first
token) is in and the receiver reports every byte landed, ``complete_remote_prefill``. A transfer that
fails or misses its deadline ends the request with an error or recomputes it locally
(``kv_transfer.on_failure``); its blocks are freed exactly once either way, and only after the prefill
worker acknowledged the cancel (or did not answer in time): with the ``cuda_ipc`` transport it writes
into these blocks itself, and the receiver cannot fence those writes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import time
from typing import Any

import grpc

from pdserve.common.errors import InvalidParameterError, OutOfCapacityError
from pdserve.engine.engine import LandingZone, LLMEngine
from pdserve.kvtransfer import KVReceiver, TransferState, open_receiver
from pdserve.rpc.convert import position_logprobs_from_proto, sampling_params_from_proto, token_ids_to_proto
from pdserve.rpc.options import CHANNEL_OPTIONS
from pdserve.rpc.status import abort_with
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.worker.role import Role, WorkerContext

logger = logging.getLogger(__name__)
#: How long a failed or aborted transfer waits for the prefill worker to confirm it stopped writing.
CANCEL_ACK_TIMEOUT_S = 2.0
_WAIT_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=512, thread_name_prefix="kv-landing-wait")


class _PrefillPeer:
    """A prefill worker this decode worker has shaken hands with."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.ready: asyncio.Future[None] | None = None


class DecodeRole(Role):
    def __init__(self, name: str = "decode") -> None:
        self.name = name
        self._peers: dict[str, _PrefillPeer] = {}
        self._receiver: KVReceiver | None = None
        self._bootstrap: dict[str, Any] | None = None
        self._prefill_of: dict[str, str] = {}  # request id -> prefill address, until its KV landed
        self._params: dict[str, Any] = {}  # request id -> its SamplingParams proto, for the Prefill call
        self._transfers: dict[str, Any] = {}  # request id -> receiver handle
        self._tasks: set[asyncio.Task] = set()
        self._transfer_ids = itertools.count(1)
        self.num_remote_prefills = 0
        self.timings: collections.deque[dict[str, Any]] = collections.deque(maxlen=1024)
        self.num_failed_transfers = 0
        self.num_local_recomputes = 0

    def attach(self, worker: WorkerContext) -> None:
        super().attach(worker)
        worker.engine_loop.add_periodic(self._collect_landing_zones)

    # ---- requests ------------------------------------------------------------------------------

    async def submit(self, request: worker_pb2.SubmitRequest, context: grpc.aio.ServicerContext) -> None:
        try:
            params = sampling_params_from_proto(request.params)
        except InvalidParameterError as exc:
            await abort_with(context, exc)
        ids = list(request.prompt_token_ids.ids) or None
        text = None if ids else request.prompt_text
        chat = ([{"role": m.role, "content": m.content} for m in request.chat.messages]
                if request.HasField("chat") else None)
        remote = bool(request.prefill_address)
        rid = request.request_id

        def admit(engine: LLMEngine) -> None:
            prompt_ids = ids
            if chat is not None:  # rendered and tokenized here: the tokenizer lives with the engine
                prompt_ids = engine.tokenizer.encode_chat(chat, not request.chat.no_generation_prompt)
            engine.add_request(rid, prompt=None if chat is not None else text, prompt_token_ids=prompt_ids,
                               params=params, remote_prefill=remote)

        try:
            if remote:
                self._prefill_of[rid] = request.prefill_address
                self._params[rid] = request.params
            await self.worker.on_engine(admit)
        except (InvalidParameterError, OutOfCapacityError) as exc:
            self._prefill_of.pop(rid, None)
            self._params.pop(rid, None)
            await abort_with(context, exc)

    async def abort(self, request_ids: list[str]) -> list[str]:
        aborted = []
        for rid in request_ids:
            address = self._prefill_of.pop(rid, None)
            self._params.pop(rid, None)
            handle = self._transfers.pop(rid, None)
            if handle is not None and self._receiver is not None:
                self._receiver.cancel(handle)
            if address is not None and address in self._peers:
                # a one-sided (cuda_ipc) sender may still be writing: free the blocks once it stopped
                await self._cancel_remote(address, rid)
            if await self.worker.on_engine(lambda e, rid=rid: self._abort_on_engine(e, rid)):
                aborted.append(rid)
        return aborted

    def _abort_on_engine(self, engine: LLMEngine, rid: str) -> bool:
        delta = engine.abort_request(rid)
        if delta is not None:
            self.worker.engine_loop.emit([delta])
        return delta is not None

    # ---- landing zones and transfers -----------------------------------------------------------

    def _collect_landing_zones(self, engine: LLMEngine) -> None:
        """Engine thread, every loop iteration: hand new landing zones to the asyncio side."""
        for zone in engine.take_landing_zones():
            self.worker.loop.call_soon_threadsafe(self._start_remote_prefill, zone)

    def _start_remote_prefill(self, zone: LandingZone) -> None:
        self._spawn(self._remote_prefill(zone))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _remote_prefill(self, zone: LandingZone) -> None:
        """Run one remote prefill. The request is admitted as soon as the receiver has every byte: the
        final KV message carries the first token, so the ``Prefill`` reply is only awaited when it brings
        something more (logprobs) or an error."""
        rid = zone.request_id
        address = self._prefill_of.get(rid)
        if address is None:  # aborted meanwhile
            return
        timing = {"zone_at": time.time()}
        timeout = self.worker.transfer.timeout_s
        try:
            peer = await self._peer(address)
            assert self._receiver is not None
            handle = self._receiver.expect(next(self._transfer_ids), rid, zone.block_ids,
                                           self.worker.kv_layout.num_layers, deadline_s=timeout)
            self._transfers[rid] = handle
            request = worker_pb2.PrefillRequest(
                request_id=rid, prompt_token_ids=token_ids_to_proto(zone.prompt_token_ids),
                decode_worker_id=self.worker.worker_id, block_ids=zone.block_ids,
                num_skip_blocks=zone.num_skip_blocks, transfer_id=handle.transfer_id, deadline_s=timeout)
            params = self._params[rid]
            request.params.CopyFrom(params)
            reply_task = asyncio.ensure_future(peer.stub.Prefill(request, timeout=timeout))
            state = await self._wait_landed(handle, timeout, reply_task)
            if reply_task.done() and reply_task.exception() is not None:
                raise reply_task.exception()
            if state is not TransferState.DONE:
                raise TimeoutError(f"the KV of request {rid} did not land ({state.name.lower()}"
                                   f"{': ' + handle.error if handle.error else ''})")
            timing["landed_at"] = time.time()
            logprobs = None
            if params.HasField("logprobs"):
                reply = await reply_task
                first_token = reply.first_token_id
                logprobs = position_logprobs_from_proto(reply.first_logprobs) if reply.has_logprobs else None
            else:
                first_token = handle.first_token
                reply_task.add_done_callback(_log_late_failure)
        except Exception as exc:  # noqa: BLE001 (any failure ends in the failure policy)
            if rid in self._prefill_of:
                await self._transfer_failed(rid, address, exc)
            return
        if self._prefill_of.pop(rid, None) is None:
            return  # aborted while the KV was in flight
        self._transfers.pop(rid, None)
        self._params.pop(rid, None)
        self.num_remote_prefills += 1

        def land(engine: LLMEngine) -> None:
            delta = engine.complete_remote_prefill(rid, first_token, logprobs)
            timing["admitted_at"] = time.time()
            if delta is not None:
                self.worker.engine_loop.emit([delta])

        await self.worker.on_engine(land)
        self.timings.append({"request_id": rid, "num_prompt_tokens": len(zone.prompt_token_ids), **timing})

    async def _wait_landed(self, handle: Any, timeout: float, reply: asyncio.Future) -> TransferState:
        """Wait until the transfer is terminal, the deadline passes, or the Prefill call failed.

        The wait blocks a thread of a dedicated pool on the receiver's condition variable (woken by
        the receiver itself), not the event loop: polling from asyncio, one timer per transfer in
        flight, starved the receiver and engine threads of the GIL under load.
        """
        receiver = self._receiver
        assert receiver is not None
        loop = asyncio.get_running_loop()
        waiter = loop.run_in_executor(_WAIT_POOL, receiver.wait, handle, timeout)
        done, _ = await asyncio.wait({waiter, reply}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done and reply.exception() is not None:
            receiver.cancel(handle)  # wakes the waiter
            await waiter
        elif waiter not in done:
            await waiter
        return receiver.poll(handle)

    async def _transfer_failed(self, rid: str, address: str, exc: Exception) -> None:
        self._prefill_of.pop(rid, None)
        self._params.pop(rid, None)
        handle = self._transfers.pop(rid, None)
        if handle is not None and self._receiver is not None:
            self._receiver.cancel(handle)
        self.num_failed_transfers += 1
        await self._cancel_remote(address, rid)  # the blocks are reused only once the sender stopped
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        message = f"prefill on {address} failed: {detail}"
        logger.warning("request %s: %s", rid, message)
        if self.worker.transfer.on_failure == "recompute":
            self.num_local_recomputes += 1
            await self.worker.on_engine(lambda e: e.recompute_locally(rid))
            return

        def fail(engine: LLMEngine) -> None:
            delta = engine.fail_request(rid, message)
            if delta is not None:
                self.worker.engine_loop.emit([delta])

        await self.worker.on_engine(fail)

    async def _cancel_remote(self, address: str, rid: str) -> None:
        """Tell the prefill worker to stop; returns once it answered (its writes into this worker's
        blocks have then completed) or after ``CANCEL_ACK_TIMEOUT_S`` (a worker that does not answer
        stops writing at its own deadline, which lies within the transfer timeout)."""
        peer = self._peers.get(address)
        if peer is None:
            return
        try:
            await peer.stub.CancelPrefill(worker_pb2.AbortRequest(request_ids=[rid]), timeout=CANCEL_ACK_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            logger.debug("CancelPrefill %s on %s: %s", rid, address, exc.details())

    async def _peer(self, address: str) -> _PrefillPeer:
        """The prefill peer at ``address``, shaking hands (layout check + transport set-up) once."""
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = _PrefillPeer(address)
        if peer.ready is None:
            peer.ready = asyncio.ensure_future(self._handshake(peer))
        try:
            await asyncio.shield(peer.ready)
        except Exception:
            peer.ready = None  # retry the handshake with the next request
            raise
        return peer

    async def _handshake(self, peer: _PrefillPeer) -> None:
        if self._receiver is None:
            engine = self.worker.engine
            self._receiver, self._bootstrap = await asyncio.to_thread(
                open_receiver, self.worker.host, 0, f"pdserve-kv-{self.worker.worker_id}",
                caches=engine.kv_caches, layout=self.worker.kv_layout, backend=self.worker.transfer_backend,
                op_timeout_s=self.worker.transfer.timeout_s)
        layout = self.worker.kv_layout
        assert self._bootstrap is not None
        await peer.stub.KVHandshake(worker_pb2.KVHandshakeRequest(
            decode_worker_id=self.worker.worker_id, transport=self.worker.transfer_backend,
            store_host=str(self._bootstrap["host"]), store_port=int(self._bootstrap["port"]),
            group_name=str(self._bootstrap["group_name"]),
            layout=worker_pb2.KVLayout(model=layout.model, dtype=layout.dtype, block_size=layout.block_size,
                                       num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                                       head_dim=layout.head_dim, layout=layout.layout,
                                       tensor_parallel_size=layout.tensor_parallel_size)),
            timeout=60.0)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for peer in self._peers.values():
            await peer.channel.close()
        if self._receiver is not None:
            await asyncio.to_thread(self._receiver.close)

    def stats(self) -> dict[str, Any]:
        peers = getattr(self._receiver, "peer_transports", {}) if self._receiver is not None else {}
        return {"remote_prefills": self.num_remote_prefills, "failed_transfers": self.num_failed_transfers,
                "local_recomputes": self.num_local_recomputes, "transfers_in_flight": len(self._transfers),
                "kv_peer_transports": dict(peers)}


def _log_late_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("a Prefill call failed after its KV had landed: %s", task.exception())
