"""The blocking client of a pdserve cluster (the router's ``pdserve.v1.PdServe`` service)."""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping, Sequence
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


class Client:
    """Blocking client; safe to share between threads. Use as a context manager or call :meth:`close`.

    ``timeout`` is the default deadline of each call in seconds (``None``: none), covering all its
    attempts; every call takes its own ``timeout=``. Calls failing with UNAVAILABLE are retried up to
    ``max_retries`` times with exponential backoff (from ``retry_backoff`` s, at most
    ``max_retry_backoff`` s, jittered), a stream only before its first chunk. Failures raise
    :class:`~pdserve.client.errors.PdserveClientError` subclasses. ``api_key`` (else the
    ``PDSERVE_API_KEY`` environment variable) is sent as ``authorization: Bearer <key>`` with each call;
    ``credentials`` (e.g. ``grpc.ssl_channel_credentials(root_cert)``) make the channel TLS.
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
        channel_options = merged(CHANNEL_OPTIONS, options)
        self._channel = (grpc.secure_channel(target, credentials, options=channel_options) if credentials
                         else grpc.insecure_channel(target, options=channel_options))
        self._stub = pdserve_pb2_grpc.PdServeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -------------------------------------------------------------------------------------- generate

    def generate(
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
        """The whole completion of one prompt (text, ``prompt_token_ids``, or chat ``messages``: a list
        of ``{"role", "content"}`` the serving worker renders with the model's chat template), in one
        response.

        Sampling options are :class:`SamplingParams` field names given as keywords (they override
        ``sampling_params``) and are sent unvalidated: the server's verdict comes back as
        :class:`~pdserve.client.errors.InvalidArgumentError` with ``.field`` set.
        """
        request = build_request(prompt, prompt_token_ids, messages, sampling_params, sampling_kwargs, request_id,
                                model or self.model)
        response = self._unary(self._stub.GenerateUnary, request, timeout)
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
    ) -> Generator[CompletionChunk, None, None]:
        """Stream one completion as :class:`CompletionChunk` deltas; the last has ``finish_reason`` and usage.

        Arguments as in :meth:`generate` (the deadline runs from this call); bad arguments the SDK can
        see raise here, the rest on the first ``next()``. Dropping the iterator (breaking out of ``for chunk in client.generate_stream(...)``)
        or calling its ``close()`` cancels the call on the server.
        """
        request = build_request(prompt, prompt_token_ids, messages, sampling_params, sampling_kwargs, request_id,
                                model or self.model)
        return self._stream(request, Deadline(resolve_timeout(timeout, self.timeout)))

    def _stream(self, request: pdserve_pb2.GenerateRequest,
                deadline: Deadline) -> Generator[CompletionChunk, None, None]:
        attempt = 0
        while True:
            call = self._stub.Generate(request, timeout=deadline.remaining(), metadata=self._metadata)
            produced = False
            try:
                final: CompletionChunk | None = None
                for response in call:
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
            time.sleep(delay)
            attempt += 1

    # ------------------------------------------------------------------------------------------ other

    def list_models(self, *, timeout: Timeout = DEFAULT) -> list[ModelInfo]:
        """The models the cluster serves."""
        return models_from_proto(self._unary(self._stub.ListModels, pdserve_pb2.ListModelsRequest(), timeout))

    def scale_pool(self, role: str, replicas: int, *, grace_s: float = 0.0,
                   timeout: Timeout = DEFAULT) -> list[str]:
        """Grow or shrink the ``role`` pool to ``replicas`` workers (operators); returns the ids of the
        workers added or removed. Removed workers finish their requests for up to ``grace_s`` (0: the
        router's ``shutdown_grace_s``) before their streams move elsewhere."""
        request = scale_pool_request(role, replicas, grace_s)
        response = self._unary(self._stub.ScalePool, request, timeout)
        return list(response.changed_workers)

    def switch_role(self, worker_id: str, role: str, *, grace_s: float = 0.0,
                    timeout: Timeout = DEFAULT) -> str:
        """Turn worker ``worker_id`` into a ``role`` worker (prefill, decode, or colocated: it then
        prefills every prompt it gets) without a restart (operators); returns its new id. Requests it holds finish for up to ``grace_s`` (0: the
        router's ``shutdown_grace_s``) before their streams move elsewhere."""
        request = switch_role_request(worker_id, role, grace_s)
        response = self._unary(self._stub.SwitchRole, request, timeout)
        return str(response.worker_id)

    def cluster_status(self, *, timeout: Timeout = DEFAULT) -> ClusterStatus:
        """The router's view of the cluster: mode, model, each worker's health and load."""
        response = self._unary(self._stub.ClusterStatus, pdserve_pb2.ClusterStatusRequest(), timeout)
        return cluster_status_from_proto(response)

    def health(self, service: str = "", *, timeout: float = 5.0) -> bool:
        """True when the server's standard health service reports ``service`` ("": the server) SERVING.

        Never raises for an unreachable or unhealthy server: that is ``False``. Not retried.
        """
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Idempotent."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r}, timeout={self.timeout})"

    def _unary(self, method: grpc.UnaryUnaryMultiCallable, request: Any, timeout: Timeout) -> Any:
        deadline = Deadline(resolve_timeout(timeout, self.timeout))
        attempt = 0
        while True:
            future = method.future(request, timeout=deadline.remaining(), metadata=self._metadata)
            try:
                return future.result()
            except grpc.RpcError as err:
                error = error_from_rpc(err)
                delay = retry_delay(error, attempt, self.retry, deadline, produced=False)
                if delay is None:
                    raise error from err
            except BaseException:
                future.cancel()  # KeyboardInterrupt while waiting: do not leave the call running
                raise
            time.sleep(delay)
            attempt += 1
