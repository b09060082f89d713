"""The pdserve client SDK: talk to a running cluster (the router's gRPC ``PdServe`` API), sync or asyncio.

::

    from pdserve.client import Client, AsyncClient

    with Client("localhost:50051", timeout=60.0, max_retries=3) as client:
        out = client.generate("Hello", max_tokens=32, temperature=0.0)
        print(out.text, out.finish_reason, out.usage.completion_tokens)
        for chunk in client.generate_stream("Hello", max_tokens=32):
            print(chunk.text, end="", flush=True)

    async with AsyncClient("localhost:50051") as client:
        out = await client.generate(prompt_token_ids=[1, 2, 3], max_tokens=8)
        async for chunk in client.generate_stream("Hello"):
            ...

Sampling keywords are :class:`~pdserve.common.sampling_params.SamplingParams` field names, sent as
given; the server validates them and a bad one raises :class:`InvalidArgumentError` whose ``field``
names it. Torch-free: imports only grpc, protobuf, the standard library, ``pdserve.common``,
``pdserve.rpc`` and ``pdserve.v1``.
"""

from pdserve.client._calls import DEFAULT
from pdserve.client.async_client import AsyncClient
from pdserve.client.errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PdserveClientError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from pdserve.client.sync_client import Client
from pdserve.common.outputs import FinishReason, Logprob
from pdserve.common.sampling_params import SamplingParams
from pdserve.rpc.types import (
    ClusterStatus,
    Completion,
    CompletionChunk,
    ModelInfo,
    PlannedConfiguration,
    PlannerStatus,
    Usage,
    WorkerStatus,
)

__all__ = [
    "DEFAULT",
    "AlreadyExistsError",
    "AsyncClient",
    "CancelledError",
    "Client",
    "ClusterStatus",
    "Completion",
    "CompletionChunk",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FinishReason",
    "InternalError",
    "InvalidArgumentError",
    "Logprob",
    "ModelInfo",
    "NotFoundError",
    "PdserveClientError",
    "PermissionDeniedError",
    "PlannedConfiguration",
    "PlannerStatus",
    "UnauthenticatedError",
    "ResourceExhaustedError",
    "SamplingParams",
    "UnavailableError",
    "UnimplementedError",
    "Usage",
    "WorkerStatus",
]
