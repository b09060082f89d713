"""The SDK's exceptions: one class per kind of gRPC failure, each carrying ``code`` and ``details``.

Every failed call raises a :class:`PdserveClientError` subclass (see :data:`ERROR_CLASSES` for the
mapping of every status code); parameter errors the SDK detects before sending (a value the wire
cannot carry, no prompt) raise :class:`InvalidArgumentError` too, so callers handle both alike.
"""

from __future__ import annotations

import re

import grpc

from pdserve.common.errors import PdserveError

_FIELD_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): (.*)$", re.DOTALL)
_UNREACHABLE_HINTS = ("failed to connect", "connection refused", "dns resolution failed", "errors resolving",
                      "name resolution", "lookup failed", "connections to all backends failing",
                      "no route to host", "unreachable")


class PdserveClientError(PdserveError):
    """A call failed with gRPC status ``code``; ``details`` is the server's (or the SDK's) message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details
        #: seconds the server asked the caller to wait before retrying (its ``retry-after`` trailer)
        self.retry_after_s: float | None = None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgumentError(PdserveClientError, ValueError):
    """INVALID_ARGUMENT or OUT_OF_RANGE: fix the request. ``field`` names the bad parameter when known.

    Parsed from details of the form ``"field: message"``; otherwise ``field`` is ``None`` and ``message``
    the whole details.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        match = _FIELD_RE.match(details)
        self.field: str | None = match.group(1) if match else None
        self.message: str = match.group(2) if match else details


class NotFoundError(PdserveClientError):
    """NOT_FOUND (for example an unknown model or health service name)."""


class AlreadyExistsError(PdserveClientError):
    """ALREADY_EXISTS (for example a request id already in flight)."""


class PermissionDeniedError(PdserveClientError):
    """PERMISSION_DENIED or UNAUTHENTICATED."""


class UnauthenticatedError(PermissionDeniedError):
    """No valid API key: pass ``api_key=`` to the client or set ``PDSERVE_API_KEY``."""


class ResourceExhaustedError(PdserveClientError):
    """RESOURCE_EXHAUSTED: the cluster's queue is full, or the request can never fit; retry later/smaller."""


class FailedPreconditionError(PdserveClientError):
    """FAILED_PRECONDITION or ABORTED: the server is not in a state to serve this (model failed to load)."""


class UnimplementedError(PdserveClientError):
    """UNIMPLEMENTED: the server does not offer this call (an older server, or the wrong port)."""


class UnavailableError(PdserveClientError):
    """UNAVAILABLE: no server answered, or the cluster has no healthy worker (retried before any token)."""

    @property
    def unreachable(self) -> bool:
        """True when the details say no connection to the server could be made at all."""
        text = self.details.lower()
        return any(hint in text for hint in _UNREACHABLE_HINTS)


class DeadlineExceededError(PdserveClientError):
    """DEADLINE_EXCEEDED: the call's ``timeout`` passed before it completed."""


class CancelledError(PdserveClientError):
    """CANCELLED: the call was cancelled (by the server, or by this process on another thread)."""


class InternalError(PdserveClientError):
    """INTERNAL, UNKNOWN or DATA_LOSS: a server-side bug or failure; the details say what happened."""


ERROR_CLASSES: dict[grpc.StatusCode, type[PdserveClientError]] = {
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: FailedPreconditionError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: InternalError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}
"""The exception class of every non-OK status code."""


def error_for(code: grpc.StatusCode, details: str) -> PdserveClientError:
    """The exception for a status code (an unexpected OK or unknown code gives the base class)."""
    return ERROR_CLASSES.get(code, PdserveClientError)(code, details)


def error_from_rpc(error: grpc.RpcError) -> PdserveClientError:
    """The SDK exception for a failed sync or ``grpc.aio`` call (its ``code()`` and ``details()``)."""
    code_fn = getattr(error, "code", None)
    code = code_fn() if callable(code_fn) else None
    details_fn = getattr(error, "details", None)
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    out = error_for(code, details or code.name.lower().replace("_", " "))
    out.retry_after_s = _retry_after(error)
    return out


def _retry_after(error: grpc.RpcError) -> float | None:
    trailers_fn = getattr(error, "trailing_metadata", None)
    try:
        trailers = trailers_fn() if callable(trailers_fn) else None
        value = dict(trailers or ()).get("retry-after")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
