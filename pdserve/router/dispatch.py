"""Placing requests on workers: pick, account, ``Worker.Submit`` with retries, fan-out, abort.

The :class:`Dispatcher` owns the bookkeeping that ties requests to workers:

* :meth:`submit` picks a decode (or colocated) worker with the decode policy and, in disaggregated
  mode when the prefill policy's hook says so, a prefill worker; it charges the assignment to the
  registry (``assigned_requests``, ``queued_prefill_tokens``) *before* calling ``Submit``, so deltas
  that race ahead of the Submit reply are routed, and the next pick sees the new load. Submit errors:
  INVALID_ARGUMENT is passed to the client unchanged; UNAVAILABLE / DEADLINE_EXCEEDED mark the worker
  unhealthy and RESOURCE_EXHAUSTED skips it, and the request moves to another worker while the retry
  budget (``max_retries_before_first_token``) lasts; any other code is passed through.
* :meth:`deliver` fans a ``StepUpdate`` out to the requests' queues (dropping unknown ids and deltas
  from a worker the request no longer belongs to) and releases a request's prefill-queue charge at its
  first delta. :meth:`worker_lost` tells every request on a worker whose stream dropped.
* :meth:`release` undoes a request's charges (idempotent); :meth:`abort_in_background` sends
  ``Worker.Abort`` without blocking the caller (a cancelled handler cannot await reliably);
  :meth:`drain` waits for those aborts at shutdown.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from pdserve.router.config import RouterConfig, ServingMode, WorkerRole
from pdserve.router.decode_policy import DecodePolicy
from pdserve.router.errors import RouteError
from pdserve.router.inflight import InFlightRequest, InFlightTable, WorkerLost
from pdserve.router.metrics import RouterMetrics
from pdserve.router.prefill_policy import PrefillPolicy
from pdserve.router.prefix_affinity import PrefixIndex, prefix_keys
from pdserve.router.registry import WorkerRegistry, WorkerState
from pdserve.v1 import worker_pb2

logger = logging.getLogger(__name__)

_RETRY_ELSEWHERE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED)


class Dispatcher:
    def __init__(self, config: RouterConfig, mode: ServingMode, registry: WorkerRegistry, table: InFlightTable,
                 decode_policy: DecodePolicy, prefill_policy: PrefillPolicy,
                 metrics: RouterMetrics | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._affinity = PrefixIndex()
        self._mode = mode
        self._registry = registry
        self._table = table
        self._decode_policy = decode_policy
        self._prefill_policy = prefill_policy
        self._decode_roles = mode.stream_roles
        self._aborts: set[asyncio.Task[None]] = set()

    @property
    def max_stream_migrations(self) -> int:
        return self._config.max_stream_migrations

    @property
    def no_worker_wait_s(self) -> float:
        return self._config.no_worker_wait_s

    # -- placement --------------------------------------------------------------------------------
    async def submit(self, request: InFlightRequest, message: worker_pb2.SubmitRequest) -> None:
        """Place ``request`` on a worker and Submit it there; on return it is assigned and accepted.

        Raises :class:`RouteError` (or its UNAVAILABLE subclass when no worker is left) otherwise, with
        the request unassigned.
        """
        weight = self._config.prefix_affinity_weight
        keys = prefix_keys(message) if weight > 0 else []
        resumed = len(message.resume_token_ids.ids) > 0  # computed on its decode worker
        while True:
            decoders = self._without_prefill_pool(self._registry.with_role(*self._decode_roles), resumed)
            decode = self._decode_policy.pick(decoders, exclude=request.failed_workers,
                                              bonus=self._affinity.bonus([w.worker_id for w in decoders], keys, weight))
            prefill_address, prefill_id = "", None
            # a colocated worker (one switched to that role in a split cluster) prefills what it gets
            prefill_workers = (self._registry.with_role(WorkerRole.PREFILL)
                               if self._mode is ServingMode.DISAGGREGATED and not resumed
                               and decode.role is WorkerRole.DECODE else [])
            local = (self._prefill_policy.local_prefill_worker(
                request.num_prompt_tokens, [w for w in prefill_workers if w.routable], decode,
                self._decode_policy.filter(decoders, request.failed_workers)) if prefill_workers else decode)
            if local is not None:
                decode = local  # prefilled on its decode worker (a late prompt: the one that finishes it soonest)
            else:
                bonus = self._affinity.bonus([w.worker_id for w in prefill_workers], keys, weight)
                self._add_locality(bonus, decode, prefill_workers)
                prefill = self._prefill_policy.pick(prefill_workers, bonus=bonus)
                prefill_address, prefill_id = prefill.endpoint.address, prefill.worker_id
                self._assign_prefill(request, prefill.worker_id)
            self._assign_decode(request, decode.worker_id, local_prefill=prefill_id is None)
            message.prefill_address = prefill_address
            request.attempts += 1
            try:
                await self._registry.stub(decode.worker_id).Submit(message, timeout=self._config.submit_timeout_s)
                if self._metrics is not None:
                    self._metrics.placed(remote_prefill=bool(prefill_address))
                self._affinity.record(decode.worker_id, keys)
                if prefill_id is not None:
                    self._affinity.record(prefill_id, keys)
                return
            except grpc.aio.AioRpcError as exc:
                self.release(request)
                code, details = exc.code(), exc.details() or ""
                if code not in _RETRY_ELSEWHERE:
                    message_text = details if code is grpc.StatusCode.INVALID_ARGUMENT else \
                        f"worker {decode.worker_id} rejected request {request.request_id}: {details}"
                    raise RouteError(code, message_text) from None
                self._on_submit_failure(request, decode.worker_id, code, details)

    def _without_prefill_pool(self, decoders: list[WorkerState], resumed: bool) -> list[WorkerState]:
        """``decoders``, or only its colocated workers when the split cluster's prefill workers are all
        unusable now and a colocated one is usable: a decode worker would wait for a prefill worker, a
        colocated one needs none."""
        if self._mode is not ServingMode.DISAGGREGATED or resumed:
            return decoders
        prefill = self._registry.with_role(WorkerRole.PREFILL)
        if not prefill or any(w.routable for w in prefill):
            return decoders
        colocated = [w for w in decoders if w.role is WorkerRole.COLOCATED and w.routable]
        return colocated or decoders

    def _add_locality(self, bonus: dict[str, float], decode: WorkerState, prefill_workers: list[WorkerState]) -> None:
        """Prefill workers on the decode worker's node gain ``prefill_locality_weight`` (in place)."""
        weight, node = self._config.prefill_locality_weight, decode.endpoint.node
        if weight <= 0 or not node:
            return
        for worker in prefill_workers:
            if worker.endpoint.node == node:
                bonus[worker.worker_id] = bonus.get(worker.worker_id, 0.0) + weight

    async def place(self, request: InFlightRequest, message: worker_pb2.SubmitRequest, deadline: float,
                    avoid: str | None = None) -> None:
        """:meth:`submit`, waiting while no worker is usable (a restarting worker comes back within
        seconds): retries with backoff until ``deadline`` (loop time), then raises UNAVAILABLE. ``avoid``:
        a worker not to try first (the one a moved stream lost; it may be back later)."""
        loop = asyncio.get_running_loop()
        delay = 0.1
        first = True
        while True:
            request.attempts, request.failed_workers = 0, {avoid} if avoid and first else set()
            first = False
            try:
                await self.submit(request, message)
                return
            except RouteError as exc:
                remaining = deadline - loop.time()
                if exc.code is not grpc.StatusCode.UNAVAILABLE or remaining <= 0:
                    raise
                logger.info("request %s: no usable worker yet (%s); retrying in %.1f s", request.request_id,
                            exc.message, min(delay, remaining))
            await asyncio.sleep(min(delay, remaining))
            delay = min(2 * delay, 1.0)

    def _on_submit_failure(self, request: InFlightRequest, worker_id: str, code: grpc.StatusCode,
                           details: str) -> None:
        reason = f"Submit failed: {code.name}: {details}"
        if code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
            self._registry.mark_unhealthy(worker_id, reason)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:  # it may have been admitted after all
            self.abort_in_background(request.request_id, worker_id)
        final = grpc.StatusCode.RESOURCE_EXHAUSTED if code is grpc.StatusCode.RESOURCE_EXHAUSTED else None
        self.note_failure(request, worker_id, reason, final_code=final)

    def note_failure(self, request: InFlightRequest, worker_id: str, reason: str, *,
                     final_code: grpc.StatusCode | None = None) -> None:
        """Exclude ``worker_id`` for this request; raise (UNAVAILABLE unless ``final_code``) if the
        retry budget is spent."""
        request.failed_workers.add(worker_id)
        if request.attempts > self._config.max_retries_before_first_token:
            raise RouteError(final_code or grpc.StatusCode.UNAVAILABLE,
                             f"request {request.request_id} failed on {request.attempts} worker(s) "
                             f"(max_retries_before_first_token={self._config.max_retries_before_first_token}); "
                             f"last: worker {worker_id}: {reason}")
        logger.info("request %s: retrying elsewhere after worker %s failed: %s", request.request_id,
                    worker_id, reason)

    def _assign_decode(self, request: InFlightRequest, worker_id: str, *, local_prefill: bool) -> None:
        request.decode_worker = worker_id
        self._registry.add_assigned(worker_id, 1)
        if local_prefill:
            request.local_prefill_tokens = request.num_prompt_tokens
            self._registry.add_prefill_tokens(worker_id, request.local_prefill_tokens)

    def _assign_prefill(self, request: InFlightRequest, worker_id: str) -> None:
        request.prefill_worker = worker_id
        request.prefill_tokens = request.num_prompt_tokens
        self._registry.add_assigned(worker_id, 1)
        self._registry.add_prefill_tokens(worker_id, request.prefill_tokens)

    def release_prefill(self, request: InFlightRequest) -> None:
        """The prefill is over (first delta, failure or end): drop its charge on the worker doing it."""
        if request.local_prefill_tokens and request.decode_worker is not None:
            self._registry.add_prefill_tokens(request.decode_worker, -request.local_prefill_tokens)
            request.local_prefill_tokens = 0
        if request.prefill_worker is not None:
            self._registry.add_prefill_tokens(request.prefill_worker, -request.prefill_tokens)
            self._registry.add_assigned(request.prefill_worker, -1)
            request.prefill_worker = None
            request.prefill_tokens = 0

    def release(self, request: InFlightRequest) -> None:
        """Undo every charge of ``request``; idempotent."""
        self.release_prefill(request)
        if request.decode_worker is not None:
            self._registry.add_assigned(request.decode_worker, -1)
            request.decode_worker = None

    # -- the Updates streams ----------------------------------------------------------------------
    def deliver(self, worker_id: str, update: worker_pb2.StepUpdate) -> None:
        if update.HasField("load"):
            self._registry.update_load(worker_id, update.load)
        for delta in update.deltas:
            request = self._table.get(delta.request_id)
            if request is None or request.decode_worker != worker_id:
                logger.debug("dropping a delta of unknown request %s from worker %s", delta.request_id, worker_id)
                continue
            self.release_prefill(request)
            request.queue.put_nowait(delta)

    def stream_live(self, worker_id: str) -> None:
        self._registry.set_stream_live(worker_id, True)

    def worker_lost(self, worker_id: str, reason: str) -> None:
        self._registry.set_stream_live(worker_id, False)
        self._affinity.forget(worker_id)  # it may have restarted with an empty cache
        for request in self._table.on_worker(worker_id):
            request.queue.put_nowait(WorkerLost(worker_id, reason))

    # -- aborts -----------------------------------------------------------------------------------
    def abort_in_background(self, request_id: str, worker_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._abort(request_id, worker_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _abort(self, request_id: str, worker_id: str) -> None:
        try:
            await self._registry.stub(worker_id).Abort(worker_pb2.AbortRequest(request_ids=[request_id]),
                                                       timeout=self._config.abort_timeout_s)
        except grpc.aio.AioRpcError as exc:
            logger.warning("Abort of request %s on worker %s failed: %s: %s", request_id, worker_id,
                           exc.code().name, exc.details())
        except KeyError:  # the registry is closed: the router is shutting down
            pass

    async def drain(self) -> None:
        """Wait for the aborts already sent (each is bounded by ``abort_timeout_s``)."""
        while self._aborts:
            await asyncio.gather(*list(self._aborts), return_exceptions=True)
