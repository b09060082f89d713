"""What the sync and asyncio clients share: building requests, deadlines, and the retry policy.

Retry contract (both clients): a call that fails with UNAVAILABLE is tried again, at most
``max_retries`` more times, after an exponential backoff with jitter, while its deadline allows. A
streamed call is retried only if it failed before it produced its first response; once a chunk reached
the caller, the error is raised. No other status code is retried.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from pdserve.client.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    PdserveClientError,
)
from pdserve.common.errors import InvalidParameterError
from pdserve.common.roles import WorkerRole
from pdserve.common.sampling_params import SamplingParams
from pdserve.rpc.api import generate_request
from pdserve.v1 import pdserve_pb2


class _Default(enum.Enum):
    TOKEN = enum.auto()


DEFAULT = _Default.TOKEN
"""``timeout=DEFAULT`` (the default of every call) means "the client's timeout"."""

Timeout = float | None | _Default


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: after failed attempt ``n`` (0-based), wait ``U(d/2, d)`` seconds,
    ``d = min(max_backoff, initial_backoff * 2**n)``."""

    max_retries: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 2.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff times must be >= 0")

    def backoff(self, attempt: int) -> float:
        delay = min(self.max_backoff, self.initial_backoff * (2**attempt))
        return random.uniform(delay / 2, delay)


def check_timeout(timeout: float | None) -> float | None:
    """``timeout`` if it is ``None`` or a positive number of seconds; else ValueError."""
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
    return timeout


class Deadline:
    """One call's deadline across all its attempts (``None``: no deadline)."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = check_timeout(timeout)
        self._end = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        """Seconds left, possibly <= 0 (``None``: unbounded)."""
        return None if self._end is None else self._end - time.monotonic()

    def remaining(self) -> float | None:
        """The timeout of the next attempt. Raises DeadlineExceededError when no time is left."""
        left = self.left()
        if left is not None and left <= 0:
            raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"deadline of {self.timeout:g} s exceeded (client side)")
        return left


def resolve_timeout(timeout: Timeout, default: float | None) -> float | None:
    """The timeout of a call: the client's default for :data:`DEFAULT`, else the given one."""
    return default if isinstance(timeout, _Default) else timeout


def retry_delay(error: PdserveClientError, attempt: int, policy: RetryPolicy, deadline: Deadline, *,
                produced: bool) -> float | None:
    """Seconds to wait before retrying attempt ``attempt`` (0-based) that failed with ``error``.

    ``None`` means raise ``error``: it is not UNAVAILABLE, the call already produced a response, the
    retries are spent, or the deadline would pass during the wait.
    """
    if error.code is not grpc.StatusCode.UNAVAILABLE or produced or attempt >= policy.max_retries:
        return None
    delay = policy.backoff(attempt)
    left = deadline.left()
    if left is not None and left <= delay:
        return None
    return delay


def build_request(
    prompt: str | None,
    prompt_token_ids: Sequence[int] | None,
    messages: Sequence[Mapping[str, str]] | None,
    sampling_params: SamplingParams | Mapping[str, Any] | None,
    sampling_kwargs: Mapping[str, Any],
    request_id: str | None,
    model: str | None,
) -> pdserve_pb2.GenerateRequest:
    """The GenerateRequest of a ``generate`` call; ``sampling_kwargs`` override ``sampling_params``.

    Values are sent unvalidated (the server validates). Raises :class:`InvalidArgumentError` naming the
    field for what cannot be sent at all (no prompt, a string where a number goes, an unknown name).
    """
    if isinstance(sampling_params, SamplingParams):
        params: dict[str, Any] = sampling_params.to_dict()
    elif sampling_params is None:
        params = {}
    elif isinstance(sampling_params, Mapping):
        params = dict(sampling_params)
    else:
        raise InvalidArgumentError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"sampling_params: must be SamplingParams or a dict, got {sampling_params!r}")
    params.update(sampling_kwargs)
    try:
        return generate_request(prompt, prompt_token_ids, params, request_id=request_id or "",
                                model=model or "", messages=messages)
    except InvalidParameterError as exc:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, f"{exc.field}: {exc.message}") from None


def scale_pool_request(role: str, replicas: int, grace_s: float) -> pdserve_pb2.ScalePoolRequest:
    """The ``ScalePool`` request, validated here (both clients)."""
    if not isinstance(role, str) or not role:
        raise InvalidParameterError("role", "must be a pool name: prefill, decode or colocated")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas < 2**31:
        raise InvalidParameterError("replicas", f"must be an integer >= 1, got {replicas!r}")
    if isinstance(grace_s, bool) or not isinstance(grace_s, int | float) or not grace_s >= 0:
        raise InvalidParameterError("grace_s", f"must be a number >= 0, got {grace_s!r}")
    return pdserve_pb2.ScalePoolRequest(role=role, replicas=replicas, grace_s=float(grace_s))


def switch_role_request(worker_id: str, role: str, grace_s: float) -> pdserve_pb2.SwitchRoleRequest:
    """The ``SwitchRole`` request, validated here (both clients)."""
    if not isinstance(worker_id, str) or not worker_id:
        raise InvalidParameterError("worker_id", "must be a worker's id, e.g. prefill-1 (see `pdserve status`)")
    if role not in tuple(WorkerRole):
        raise InvalidParameterError("role", f"must be one of {', '.join(WorkerRole)}, got {role!r}")
    if isinstance(grace_s, bool) or not isinstance(grace_s, int | float) or not grace_s >= 0:
        raise InvalidParameterError("grace_s", f"must be a number >= 0, got {grace_s!r}")
    return pdserve_pb2.SwitchRoleRequest(worker_id=worker_id, role=role, grace_s=float(grace_s))


def stream_ended_early(request_id: str) -> PdserveClientError:
    """The error for a stream the server closed (OK) before a finishing response."""
    return InternalError(grpc.StatusCode.INTERNAL,
                         f"the stream of request {request_id!r} ended before the request finished")


#: The environment variable the SDK (and the ``pdserve`` CLI) reads an API key from.
API_KEY_ENV = "PDSERVE_API_KEY"


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata carrying ``api_key`` (else ``$PDSERVE_API_KEY``) as a bearer token, or None."""
    import os

    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    if key is None or key == "":
        return None
    if not isinstance(key, str) or any(c.isspace() for c in key) or not key.isprintable():
        raise ValueError("api_key must be a printable string without whitespace")
    return (("authorization", f"Bearer {key}"),)
