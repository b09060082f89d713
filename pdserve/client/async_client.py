"""The asyncio client of a pdserve cluster: :class:`AsyncClient` mirrors :class:`~pdserve.client.Client`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.client._calls import (
    DEFAULT,
    Deadline,
    RetryPolicy,
    Timeout,
    auth_metadata,
    build_request,
    check_timeout,
    resolve_timeout,
    retry_delay,
    scale_pool_request,
    stream_ended_early,
    switch_role_request,
)
from pdserve.client.errors import error_from_rpc
from pdserve.common.sampling_params import SamplingParams
from pdserve.rpc.api import cluster_status_from_proto, models_from_proto
from pdserve.rpc.convert import chunk_from_response, completion_from_response
from pdserve.rpc.options import CHANNEL_OPTIONS, ChannelOptions, merged
from pdserve.rpc.types import ClusterStatus, Completion, CompletionChunk, ModelInfo
from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc


class AsyncClient:
    """Asyncio client, with :class:`~pdserve.client.Client`'s arguments, timeouts, retries and errors.

    The channel is opened on first use, in the running event loop, and the client then belongs to that
    loop. Use ``async with AsyncClient(...) as client:`` or ``await client.close()``.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 60.0,
        max_retries: int = 3,
        retry_backoff: float = 0.1,
        max_retry_backoff: float = 2.0,
        model: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions | None = None,
        api_key: str | None = None,
    ) -> None:
        self.target = target
        self._metadata = auth_metadata(api_key)
        self.timeout = check_timeout(timeout)
        self.model = model
        self.retry = RetryPolicy(max_retries, retry_backoff, max_retry_backoff)
        self._credentials = credentials
        self._options = merged(CHANNEL_OPTIONS, options)
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stub: pdserve_pb2_grpc.PdServeStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None

    # -------------------------------------------------------------------------------------- generate

    async def generate(
        self,
        prompt: str | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        sampling_params: SamplingParams | Mapping[str, Any] | None = None,
        request_id: str | None = None,
        model: str | None = None,
        timeout: Timeout = DEFAULT,
        **sampling_kwargs: Any,
    ) -> Completion:
        """The whole completion of one prompt; see :meth:`pdserve.client.Client.generate`."""
        request = build_request(prompt, prompt_token_ids, messages, sampling_params, sampling_kwargs, request_id,
                                model or self.model)
        response = await self._unary("GenerateUnary", request, timeout)
        return completion_from_response(response)

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        sampling_params: SamplingParams | Mapping[str, Any] | None = None,
        request_id: str | None = None,
        model: str | None = None,
        timeout: Timeout = DEFAULT,
        **sampling_kwargs: Any,
    ) -> AsyncGenerator[CompletionChunk, None]:
        """Stream one completion (``async for chunk in client.generate_stream(...)``).

        See :meth:`pdserve.client.Client.generate_stream`. Breaking out of the loop cancels the call on
        the server (when the event loop finalizes the dropped generator, at once with ``aclose()``).
        """
        request = build_request(prompt, prompt_token_ids, messages, sampling_params, sampling_kwargs, request_id,
                                model or self.model)
        return self._stream(request, Deadline(resolve_timeout(timeout, self.timeout)))

    async def _stream(self, request: pdserve_pb2.GenerateRequest,
                      deadline: Deadline) -> AsyncGenerator[CompletionChunk, None]:
        stub = self._pdserve_stub()
        attempt = 0
        while True:
            call = stub.Generate(request, timeout=deadline.remaining(), metadata=self._metadata)
            produced = False
            try:
                final: CompletionChunk | None = None
                async for response in call:
                    chunk = chunk_from_response(response)
                    if chunk.finished:
                        final = chunk  # yielded once the call has ended, so that it ends as OK
                        continue
                    produced = True
                    yield chunk
                if final is None:
                    raise stream_ended_early(request.request_id)
                produced = True
                yield final
                return
            except grpc.RpcError as err:
                error = error_from_rpc(err)
                delay = retry_delay(error, attempt, self.retry, deadline, produced=produced)
                if delay is None:
                    raise error from err
            finally:
                call.cancel()  # no-op once the call has ended; cancels it when the consumer stops early
            await asyncio.sleep(delay)
            attempt += 1

    # ------------------------------------------------------------------------------------------ other

    async def list_models(self, *, timeout: Timeout = DEFAULT) -> list[ModelInfo]:
        """The models the cluster serves."""
        return models_from_proto(await self._unary("ListModels", pdserve_pb2.ListModelsRequest(), timeout))

    async def scale_pool(self, role: str, replicas: int, *, grace_s: float = 0.0,
                   timeout: Timeout = DEFAULT) -> list[str]:
        """Grow or shrink the ``role`` pool to ``replicas`` workers (operators); returns the ids of the
        workers added or removed. Removed workers finish their requests for up to ``grace_s`` (0: the
        router's ``shutdown_grace_s``) before their streams move elsewhere."""
        request = scale_pool_request(role, replicas, grace_s)
        response = await self._unary("ScalePool", request, timeout)
        return list(response.changed_workers)

    async def switch_role(self, worker_id: str, role: str, *, grace_s: float = 0.0,
                    timeout: Timeout = DEFAULT) -> str:
        """Turn worker ``worker_id`` into a ``role`` worker (prefill, decode, or colocated: it then
        prefills every prompt it gets) without a restart (operators); returns its new id. Requests it holds finish for up to ``grace_s`` (0: the
        router's ``shutdown_grace_s``) before their streams move elsewhere."""
        request = switch_role_request(worker_id, role, grace_s)
        response = await self._unary("SwitchRole", request, timeout)
        return str(response.worker_id)

    async def cluster_status(self, *, timeout: Timeout = DEFAULT) -> ClusterStatus:
        """The router's view of the cluster: mode, model, each worker's health and load."""
        response = await self._unary("ClusterStatus", pdserve_pb2.ClusterStatusRequest(), timeout)
        return cluster_status_from_proto(response)

    async def health(self, service: str = "", *, timeout: float = 5.0) -> bool:
        """True when the health service reports ``service`` SERVING; False otherwise (never raises)."""
        self._pdserve_stub()
        assert self._health is not None
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            response = await self._health.Check(request, timeout=timeout)
        except grpc.RpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled). Idempotent."""
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self._stub = self._health = None
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r}, timeout={self.timeout})"

    def _pdserve_stub(self) -> pdserve_pb2_grpc.PdServeStub:
        loop = asyncio.get_running_loop()
        if self._channel is not None and self._loop is not loop:
            raise RuntimeError("this AsyncClient was opened in another event loop; create one per loop")
        if self._channel is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            self._loop = loop
            self._stub = pdserve_pb2_grpc.PdServeStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)
        assert self._stub is not None
        return self._stub

    async def _unary(self, method: str, request: Any, timeout: Timeout) -> Any:
        callable_ = getattr(self._pdserve_stub(), method)
        deadline = Deadline(resolve_timeout(timeout, self.timeout))
        attempt = 0
        while True:
            try:
                return await callable_(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as err:
                error = error_from_rpc(err)
                delay = retry_delay(error, attempt, self.retry, deadline, produced=False)
                if delay is None:
                    raise error from err
            await asyncio.sleep(delay)
            attempt += 1
