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
import math
import time
from typing import Any

import grpc

from pdserve.common.errors import InvalidParameterError, OutOfCapacityError
from pdserve.engine.engine import LLMEngine
from pdserve.engine.remote_prefill import LandingZone
from pdserve.kvtransfer import KVReceiver, TransferState, open_receiver
from pdserve.rpc.auth import peer_channel
from pdserve.rpc.convert import position_logprobs_from_proto, sampling_params_from_proto, token_ids_to_proto
from pdserve.rpc.options import CHANNEL_OPTIONS
from pdserve.rpc.status import abort_with
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.worker.engine_loop import StepOutput
from pdserve.worker.role import NO_HANDSHAKE, Role, WorkerContext

logger = logging.getLogger(__name__)
#: How long a failed or aborted transfer waits for the prefill worker to confirm it stopped writing.
CANCEL_ACK_TIMEOUT_S = 2.0
#: Per-request timestamps kept for benchmarks (the most recent ones).
TIMINGS_KEPT = 8192


class _PrefillPeer:
    """A prefill worker this decode worker has shaken hands with."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = peer_channel(address, CHANNEL_OPTIONS)
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
        self._failures: dict[str, Exception] = {}  # request id -> why this side cancelled its transfer
        self._tasks: set[asyncio.Task] = set()
        self._transfer_ids = itertools.count(1)
        self._submitted_at: dict[str, float] = {}  # request id -> when Submit admitted it, until its zone exists
        self.num_remote_prefills = 0
        self.timings: collections.deque[dict[str, Any]] = collections.deque(maxlen=TIMINGS_KEPT)
        self.num_failed_transfers = 0
        self.num_local_recomputes = 0
        self.kv_bytes_received = 0  # into landing zones of requests admitted (telemetry)
        self.kv_transfer_seconds = 0.0  # landing zone opened -> every byte landed, summed

    def attach(self, worker: WorkerContext) -> None:
        super().attach(worker)
        # a request whose KV landed is admitted (and its first token sent) while a step is on the device
        worker.engine_loop.run_urgent_calls_mid_step(lambda: bool(self._transfers))

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
        resume = list(request.resume_token_ids.ids)
        remote = bool(request.prefill_address) and not resume  # a moved stream is computed here
        rid = request.request_id

        def admit(engine: LLMEngine) -> None:
            prompt_ids = ids
            if chat is not None:  # rendered and tokenized here: the tokenizer lives with the engine
                prompt_ids = engine.tokenizer.encode_chat(chat, not request.chat.no_generation_prompt)
            engine.add_request(rid, prompt=None if chat is not None else text, prompt_token_ids=prompt_ids,
                               params=params, remote_prefill=remote, resume_token_ids=resume)
            if remote:  # its zone now, not at the next step: the prefill worker starts a step earlier
                self.worker.engine_loop.emit([], engine.open_landing_zones())

        try:
            if remote:
                self._prefill_of[rid] = request.prefill_address
                self._params[rid] = request.params
                self._submitted_at[rid] = time.time()
            await self.worker.on_engine(admit, urgent=remote)
        except (InvalidParameterError, OutOfCapacityError) as exc:
            self._prefill_of.pop(rid, None)
            self._params.pop(rid, None)
            self._submitted_at.pop(rid, None)
            await abort_with(context, exc)

    async def abort(self, request_ids: list[str]) -> list[str]:
        aborted = []
        for rid in request_ids:
            address = self._prefill_of.pop(rid, None)
            self._params.pop(rid, None)
            self._submitted_at.pop(rid, None)
            handle = self._transfers.pop(rid, None)
            if handle is not None and self._receiver is not None:
                await asyncio.to_thread(self._receiver.cancel, handle)  # waits for posted writes
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

    def on_step(self, output: StepOutput) -> None:
        """Engine thread: hand the step's new landing zones to the asyncio side."""
        for zone in output.landing_zones:
            self.worker.loop.call_soon_threadsafe(self._start_remote_prefill, zone)

    def _start_remote_prefill(self, zone: LandingZone) -> None:
        self._spawn(self._remote_prefill(zone))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future) -> None:
        """Forget a finished background task and log (once, one line) an exception it ended with, which
        asyncio would otherwise report as "Task exception was never retrieved" with a traceback."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.error("a remote-prefill task failed: %s: %s", type(exc).__name__, exc)

    async def _remote_prefill(self, zone: LandingZone) -> None:
        """Start one remote prefill: expect its KV, then ask the prefill worker to compute and stream it.

        The request is admitted by the receiver's completion callback the moment every byte landed (the
        final KV message carries the first token): straight onto the engine thread, no hop through this
        loop. The ``Prefill`` reply is awaited only for what it adds (logprobs) or an error, which
        cancels the transfer and so ends in the same callback."""
        rid = zone.request_id
        address = self._prefill_of.get(rid)
        if address is None:  # aborted meanwhile
            self._submitted_at.pop(rid, None)
            return
        timing = {"submitted_at": self._submitted_at.pop(rid, math.nan), "zone_at": time.time()}
        timeout = self.worker.transfer.timeout_s
        params = self._params[rid]
        loop = asyncio.get_running_loop()
        wants_reply = params.HasField("logprobs")
        reply_ready: asyncio.Future = loop.create_future()
        try:
            peer = await self._peer(address)
            assert self._receiver is not None

            def on_terminal(handle: Any) -> None:  # the receiver's completion thread
                self._kv_landed(zone, handle, timing, reply_ready if wants_reply else None, loop)

            handle = self._receiver.expect(next(self._transfer_ids), rid, zone.block_ids,
                                           self.worker.kv_layout.num_layers, deadline_s=timeout,
                                           on_terminal=on_terminal)
            self._transfers[rid] = handle
            request = worker_pb2.PrefillRequest(
                request_id=rid, prompt_token_ids=token_ids_to_proto(zone.prompt_token_ids),
                decode_worker_id=self.worker.worker_id, block_ids=zone.block_ids,
                num_skip_blocks=zone.num_skip_blocks, transfer_id=handle.transfer_id, deadline_s=timeout)
            request.params.CopyFrom(params)
            try:
                reply = await peer.stub.Prefill(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.FAILED_PRECONDITION or NO_HANDSHAKE not in (exc.details() or ""):
                    raise
                # the worker at that address lost our channel (restarted, or switched roles and back):
                # nothing was computed or sent; shake hands again and ask once more
                peer = await self._peer(address, stale=peer.ready)
                reply = await peer.stub.Prefill(request, timeout=timeout)
            reply_ready.set_result(reply)
        except Exception as exc:  # noqa: BLE001 (any failure ends in the failure policy)
            if not reply_ready.done():
                reply_ready.set_exception(exc)
                reply_ready.exception()  # retrieved: only the logprobs path awaits it
            if rid not in self._prefill_of:
                return  # aborted, admitted (the reply failed after the KV landed), or failed already
            pending = self._transfers.get(rid)
            if pending is not None and self._receiver is not None and not pending.state.is_terminal:
                self._failures[rid] = exc
                # its callback runs the failure policy; it may wait for posted writes, off this loop
                await asyncio.to_thread(self._receiver.cancel, pending)
            elif pending is None:
                await self._transfer_failed(rid, address, exc)

    def _kv_landed(self, zone: LandingZone, handle: Any, timing: dict[str, float],
                   reply: asyncio.Future | None, loop: asyncio.AbstractEventLoop) -> None:
        """The transfer of ``zone`` turned terminal (receiver thread): admit the request on the engine
        thread, or hand the failure to the event loop (which must tell the prefill worker first)."""
        rid = zone.request_id
        if handle.state is not TransferState.DONE:
            exc = self._failures.pop(rid, None) or TimeoutError(
                f"the KV of request {rid} did not land ({handle.state.name.lower()}"
                f"{': ' + handle.error if handle.error else ''})")
            address = self._prefill_of.get(rid)
            if address is not None:
                loop.call_soon_threadsafe(self._spawn, self._transfer_failed(rid, address, exc))
            return
        timing["landed_at"] = time.time()
        timing.update(handle.marks)
        if reply is not None:  # logprobs of the first token come with the Prefill reply
            loop.call_soon_threadsafe(self._spawn, self._admit_with_reply(zone, handle, timing, reply))
            return
        self._admit(zone, handle.first_token, None, timing)

    async def _admit_with_reply(self, zone: LandingZone, handle: Any, timing: dict[str, float],
                                reply: asyncio.Future) -> None:
        try:
            answer = await reply
        except Exception as exc:  # noqa: BLE001
            address = self._prefill_of.get(zone.request_id)
            if address is not None:
                await self._transfer_failed(zone.request_id, address, exc)
            return
        logprobs = position_logprobs_from_proto(answer.first_logprobs) if answer.has_logprobs else None
        self._admit(zone, answer.first_token_id, logprobs, timing)

    def _admit(self, zone: LandingZone, first_token: int | None, logprobs: Any, timing: dict[str, float]) -> None:
        """Any thread: the KV is in place; the request decodes from the engine's next step."""
        rid = zone.request_id
        if self._prefill_of.pop(rid, None) is None:
            return  # aborted while the KV was in flight
        self._transfers.pop(rid, None)
        self._params.pop(rid, None)
        self._failures.pop(rid, None)
        self.num_remote_prefills += 1
        blocks = len(zone.block_ids) - zone.num_skip_blocks
        mine = self.worker.engine
        self.kv_bytes_received += blocks * mine.kv_layout.bytes_per_block * mine.tensor_parallel_size  # all ranks
        self.kv_transfer_seconds += max(0.0, timing.get("landed_at", timing["zone_at"]) - timing["zone_at"])
        assert first_token is not None

        def land(engine: LLMEngine) -> None:
            delta = engine.complete_remote_prefill(rid, first_token, logprobs)
            timing["admitted_at"] = time.time()
            if delta is not None:
                self.worker.engine_loop.emit([delta])
            self.timings.append({"request_id": rid, "num_prompt_tokens": len(zone.prompt_token_ids), **timing})

        self.worker.engine_loop.call(land, urgent=True).add_done_callback(_log_engine_failure)

    async def _transfer_failed(self, rid: str, address: str, exc: Exception) -> None:
        if self._prefill_of.pop(rid, None) is None:
            return  # aborted, or handled already
        self._params.pop(rid, None)
        self._failures.pop(rid, None)
        handle = self._transfers.pop(rid, None)
        if handle is not None and self._receiver is not None:
            await asyncio.to_thread(self._receiver.cancel, handle)
        self.num_failed_transfers += 1
        await self._cancel_remote(address, rid)  # the blocks are reused only once the sender stopped
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        message = f"prefill on {address} failed: {detail}"
        logger.warning("request %s: %s", rid, message)
        # an incompatible peer (the KV handshake refused it) is a deployment error: say so, never hide it
        # behind local recomputes; any other failure (a lost, late or failing peer) is retryable
        incompatible = isinstance(exc, grpc.aio.AioRpcError) and exc.code() is grpc.StatusCode.FAILED_PRECONDITION
        if self.worker.transfer.on_failure == "recompute" and not incompatible:
            self.num_local_recomputes += 1
            await self.worker.on_engine(lambda e: e.recompute_locally(rid))
            return
        code = "FAILED_PRECONDITION" if incompatible else "UNAVAILABLE"

        def fail(engine: LLMEngine) -> None:
            delta = engine.fail_request(rid, message, code)
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

    async def _peer(self, address: str, stale: asyncio.Future | None = None) -> _PrefillPeer:
        """The prefill peer at ``address``, shaking hands (layout check + transport set-up) once; again
        when ``stale`` (the handshake a refused call relied on) is still the peer's latest."""
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = _PrefillPeer(address)
        if stale is not None and peer.ready is stale:
            peer.ready = None
        if peer.ready is None:
            peer.ready = asyncio.ensure_future(self._handshake(peer))
            # every waiter may be cancelled before it fails: its exception is still retrieved here
            peer.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.shield(peer.ready)
        except Exception:
            peer.ready = None  # retry the handshake with the next request
            raise
        return peer

    async def _handshake(self, peer: _PrefillPeer) -> None:
        if self._receiver is None:
            self._receiver, self._bootstrap = await asyncio.to_thread(
                open_receiver, self.worker.host, 0, f"pdserve-kv-{self.worker.worker_id}",
                caches=self.worker.transfer_caches(), layout=self.worker.kv_layout,
                backend=self.worker.transfer_backend,
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
                "kv_bytes_received": self.kv_bytes_received, "kv_transfer_seconds": self.kv_transfer_seconds,
                "kv_peer_transports": dict(peers)}


def _log_engine_failure(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("admitting a request whose KV landed failed: %s", future.exception())
