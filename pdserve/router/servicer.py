"""The ``pdserve.v1.PdServe`` servicer: the thin gRPC edge of the router.

Each ``Generate``/``GenerateUnary`` call: validate (sampling params, model, prompt; INVALID_ARGUMENT
naming the field), admit into the in-flight table (RESOURCE_EXHAUSTED when full; the request id is the
caller's if given and not in flight, else a fresh uuid), then hand over to a
:class:`~pdserve.router.session.RequestSession`. Every error leaves as a gRPC status through
``pdserve.rpc.status`` (router errors carry their own code). Streaming writes use ``context.write`` from
the handler coroutine, so a client that goes away cancels exactly the coroutine that owns the request.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import NoReturn, TypeVar

import grpc

from pdserve.common.config import MAX_POOL_REPLICAS
from pdserve.common.errors import (
    InvalidParameterError,
    OutOfCapacityError,
    PromptTooLongError,
    UnknownModelError,
)
from pdserve.common.gc_pauses import GcPauses
from pdserve.common.loop_lag import LoopLagMonitor
from pdserve.router.admission import AdmissionControl, AdmissionRejectedError
from pdserve.router.config import ServingMode, WorkerRole
from pdserve.router.dispatch import Dispatcher
from pdserve.router.errors import RouteError, RouterOverloadedError
from pdserve.router.inflight import InFlightTable
from pdserve.router.metrics import RouterMetrics
from pdserve.router.prefill_policy import estimate_prompt_tokens
from pdserve.router.registry import WorkerRegistry, WorkerState
from pdserve.router.session import RequestSession
from pdserve.rpc.api import (
    cluster_status_to_proto,
    list_models_response,
    prompt_from_request,
    require_request_id,
)
from pdserve.rpc.convert import sampling_params_from_proto, token_ids_to_proto
from pdserve.rpc.status import abort_with
from pdserve.rpc.types import ClusterStatus, ModelInfo, PlannerStatus, WorkerStatus
from pdserve.v1 import common_pb2, pdserve_pb2, pdserve_pb2_grpc, worker_pb2

#: No tokenizer packs more characters than this into one token on average: a text prompt longer than
#: this many characters per token of ``max_model_len`` cannot fit, and is refused without tokenizing it.
MAX_CHARS_PER_TOKEN = 32
T = TypeVar("T")


class PdServeServicer(pdserve_pb2_grpc.PdServeServicer):
    def __init__(self, *, model: str, mode: ServingMode, registry: WorkerRegistry, table: InFlightTable,
                 dispatcher: Dispatcher, request_timeout_s: float, stream_writes_per_s: float = 0.0,
                 metrics: RouterMetrics | None = None, admission: AdmissionControl | None = None,
                 scaler: Callable[[], Callable[[str, int, float | None], list[str]] | None] = lambda: None,
                 switcher: Callable[[], Callable[[str, str, float | None], str] | None] = lambda: None,
                 loop_lag: LoopLagMonitor | None = None, gc_pauses: GcPauses | None = None,
                 planner: Callable[[], PlannerStatus | None] = lambda: None) -> None:
        self._planner = planner
        self._loop_lag = loop_lag
        self._gc_pauses = gc_pauses
        self._scaler = scaler
        self._switcher = switcher
        self._metrics = metrics
        self._admission = admission
        self._model = model
        self._mode = mode
        self._registry = registry
        self._table = table
        self._dispatcher = dispatcher
        self._request_timeout_s = request_timeout_s
        self._stream_writes_per_s = stream_writes_per_s

    async def Generate(self, request: pdserve_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> None:
        try:
            session = self.open_session(request, context.time_remaining())
            await session.run(context.write)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # every failure leaves as a status; INTERNAL ones are logged
            await self._abort(context, exc)

    async def GenerateUnary(self, request: pdserve_pb2.GenerateRequest,
                            context: grpc.aio.ServicerContext) -> pdserve_pb2.GenerateResponse:
        try:
            session = self.open_session(request, context.time_remaining())
            return await session.run()
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._abort(context, exc)

    async def ListModels(self, request: pdserve_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pdserve_pb2.ListModelsResponse:
        info = self._registry.model_info()
        return list_models_response([ModelInfo(name=self._model,
                                               max_model_len=info.max_model_len if info else 0,
                                               vocab_size=info.vocab_size if info else 0)])

    async def ClusterStatus(self, request: pdserve_pb2.ClusterStatusRequest,
                            context: grpc.aio.ServicerContext) -> pdserve_pb2.ClusterStatusResponse:
        workers = tuple(_worker_status(s) for s in self._registry.all())
        return cluster_status_to_proto(ClusterStatus(
            mode=self._mode.value, model=self._model, workers=workers, requests_in_flight=len(self._table),
            router_loop_lag_s=self._loop_lag.lag_s if self._loop_lag is not None else 0.0,
            router_gc_pause_s=self._gc_pauses.max_pause_s if self._gc_pauses is not None else 0.0,
            planner=self._planner()))

    async def ScalePool(self, request: pdserve_pb2.ScalePoolRequest,
                        context: grpc.aio.ServicerContext) -> pdserve_pb2.ScalePoolResponse:
        scale = await self._manager(self._scaler(), context, request.grace_s, "scale the pools")
        if not 1 <= request.replicas <= MAX_POOL_REPLICAS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"replicas: must be in [1, {MAX_POOL_REPLICAS}], got {request.replicas}")
        try:
            changed = await asyncio.to_thread(scale, request.role, request.replicas, request.grace_s or None)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OutOfCapacityError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return pdserve_pb2.ScalePoolResponse(changed_workers=changed)

    async def SwitchRole(self, request: pdserve_pb2.SwitchRoleRequest,
                         context: grpc.aio.ServicerContext) -> pdserve_pb2.SwitchRoleResponse:
        switch = await self._manager(self._switcher(), context, request.grace_s, "change roles")
        try:
            new_id = await asyncio.to_thread(switch, request.worker_id, request.role, request.grace_s or None)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pdserve_pb2.SwitchRoleResponse(worker_id=new_id)

    async def _manager(self, action: T | None, context: grpc.aio.ServicerContext, grace_s: float, what: str) -> T:
        """An operator's action on the workers (``ScalePool``, ``SwitchRole``): FAILED_PRECONDITION when
        no launcher manages them, INVALID_ARGUMENT for a bad ``grace_s``."""
        if action is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this router does not manage its workers (it "
                                f"was not started by `pdserve serve`): {what} where the workers are started")
        if not math.isfinite(grace_s) or grace_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"grace_s: must be >= 0, got {grace_s}")
        assert action is not None
        return action

    def open_session(self, request: pdserve_pb2.GenerateRequest,
                     client_deadline_s: float | None = None) -> RequestSession:
        """Validate and admit ``request``; raises InvalidParameterError or RouteError (RESOURCE_EXHAUSTED
        with ``retry_after_s`` when it cannot start within ``client_deadline_s`` or the router's
        admission limit, see :mod:`pdserve.router.admission`). The HTTP front uses it too, so both APIs
        share validation, admission and the session."""
        params = request.params if request.HasField("params") else None
        sampling_params_from_proto(params)  # validation only; the worker receives the message as sent
        require_request_id(request.request_id)
        if request.model and request.model != self._model:
            raise UnknownModelError(request.model, self._model)
        prompt = prompt_from_request(request)
        self._check_size(prompt)
        submit = worker_pb2.SubmitRequest(params=params)
        if isinstance(prompt, str):
            submit.prompt_text = prompt
            num_prompt_tokens = estimate_prompt_tokens(num_token_ids=None, text=prompt)
        elif isinstance(prompt, common_pb2.ChatPrompt):
            submit.chat.CopyFrom(prompt)  # the worker renders it with the model's template
            num_prompt_tokens = estimate_prompt_tokens(
                num_token_ids=None, text="".join(m.role + m.content for m in prompt.messages))
        else:
            if not prompt:
                raise InvalidParameterError("prompt", "token_ids is empty")
            submit.prompt_token_ids.CopyFrom(token_ids_to_proto(prompt))
            num_prompt_tokens = len(prompt)
        try:
            if self._admission is not None:
                self._admission.check(num_prompt_tokens, client_deadline_s)
            admitted = self._table.admit(request.request_id, num_prompt_tokens)
        except (AdmissionRejectedError, RouterOverloadedError) as exc:
            if self._metrics is not None:
                self._metrics.rejected("ttft" if isinstance(exc, AdmissionRejectedError) else "in_flight")
            raise
        submit.request_id = admitted.request_id
        return RequestSession(self._dispatcher, self._table, admitted, submit, timeout_s=self._request_timeout_s,
                              metrics=self._metrics, stream_writes_per_s=self._stream_writes_per_s)

    def _check_size(self, prompt: str | list[int] | common_pb2.ChatPrompt) -> None:
        """Refuse a prompt that cannot fit the model's context before a worker tokenizes it (a huge text
        would cost seconds there): token ids past ``max_model_len``, or text longer than
        ``MAX_CHARS_PER_TOKEN`` characters per token of it."""
        info = self._registry.model_info()
        max_model_len = info.max_model_len if info is not None else 0
        if max_model_len <= 0:
            return
        if isinstance(prompt, list):
            if len(prompt) >= max_model_len:
                raise PromptTooLongError(len(prompt), max_model_len)
            return
        chars = len(prompt) if isinstance(prompt, str) else sum(len(m.content) + len(m.role) for m in prompt.messages)
        if chars > max_model_len * MAX_CHARS_PER_TOKEN:
            raise InvalidParameterError("prompt", f"the prompt is {chars} characters long: more than "
                                                  f"{MAX_CHARS_PER_TOKEN} per token of the model's "
                                                  f"max_model_len={max_model_len}, so it cannot fit")

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
        if isinstance(exc, RouteError):
            if exc.retry_after_s is not None:
                seconds = max(1, math.ceil(exc.retry_after_s))
                context.set_trailing_metadata((("retry-after", str(seconds)),
                                               ("grpc-retry-pushback-ms", str(seconds * 1000))))
            await context.abort(exc.code, exc.message)
        await abort_with(context, exc)


def _worker_status(state: WorkerState) -> WorkerStatus:
    load = state.load
    queued = state.queued_prefill_tokens if state.role is WorkerRole.PREFILL else load.queued_prefill_tokens
    return WorkerStatus(worker_id=state.worker_id, role=state.role.value, address=state.endpoint.address,
                        healthy=state.routable, running_requests=load.running_requests,
                        waiting_requests=load.waiting_requests, kv_usage=load.kv_usage,
                        queued_prefill_tokens=queued,
                        num_kv_blocks=state.info.num_kv_blocks if state.info is not None else 0,
                        restarts=state.restarts, last_recovery_s=round(state.last_recovery_s, 3),
                        loop_lag_s=load.loop_lag_s)
