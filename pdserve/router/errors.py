"""Errors the router raises on purpose, each carrying the gRPC status it maps to.

The servicer turns a :class:`RouteError` into ``context.abort(error.code, error.message)``; invalid
request parameters stay :class:`~pdserve.common.errors.InvalidParameterError` and go through
``pdserve.rpc.status`` like everywhere else.
"""

from __future__ import annotations

import grpc

from pdserve.common.errors import PdserveError


class RouteError(PdserveError):
    """A request failed in the router or at its worker; ``code`` is the status the client receives."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: for refusals under load: when to try again (gRPC ``retry-after`` trailer, HTTP ``Retry-After``)
        self.retry_after_s: float | None = None


class NoWorkerAvailableError(RouteError):
    """No healthy worker of the needed role is left (UNAVAILABLE)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


class RouterOverloadedError(RouteError):
    """The router holds ``max_inflight_requests`` already (RESOURCE_EXHAUSTED)."""

    def __init__(self, limit: int) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the router has {limit} requests in flight (max_inflight_requests); retry later")
        self.retry_after_s = 1.0


class RequestTimeoutError(RouteError):
    """Nothing arrived for a request within ``request_timeout_s`` (DEADLINE_EXCEEDED)."""

    def __init__(self, request_id: str, worker_id: str, timeout_s: float) -> None:
        super().__init__(grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"request {request_id}: worker {worker_id} sent nothing for {timeout_s:g}s "
                         f"(request_timeout_s); the request was aborted")
