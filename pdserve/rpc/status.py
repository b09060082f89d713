"""Exceptions -> gRPC status codes and details: the one mapping every pdserve servicer uses.

* InvalidParameterError (PromptTooLongError included), ConfigError -> INVALID_ARGUMENT
* OutOfCapacityError -> RESOURCE_EXHAUSTED
* ModelLoadError -> FAILED_PRECONDITION
* TimeoutError (asyncio.TimeoutError is the same class) -> DEADLINE_EXCEEDED
* asyncio / concurrent.futures CancelledError -> CANCELLED
* an exception carrying its status (a ``code`` attribute that is a ``grpc.StatusCode``, like the
  router's RouteError or the SDK's errors) or a failed downstream call (a ``grpc.RpcError`` whose
  ``code()`` says) -> that code, passed through with its ``details``/``message``
* anything else -> INTERNAL

Details of INVALID_ARGUMENT read ``"<field>: <message>"`` (``"top_p: must be <= 1.0, got 1.5"``), so
that clients can tell which field to fix (:class:`pdserve.client.InvalidArgumentError` parses it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import NoReturn

import grpc

from pdserve.common.errors import (
    ConfigError,
    InvalidParameterError,
    ModelLoadError,
    OutOfCapacityError,
)

logger = logging.getLogger(__name__)

MAX_DETAILS_CHARS = 4096
"""Details longer than this are cut (they travel in an HTTP/2 header)."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code that reports ``exc`` to a client (see the module's table)."""
    if isinstance(exc, InvalidParameterError | ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, OutOfCapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, ModelLoadError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, asyncio.CancelledError | concurrent.futures.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = _rpc_error_code(exc)
    if code is not None and code is not grpc.StatusCode.OK:
        return code
    return grpc.StatusCode.INTERNAL


def details_for(exc: BaseException) -> str:
    """The status details that go with :func:`status_for`: ``"field: message"`` for invalid arguments."""
    if isinstance(exc, InvalidParameterError):
        text = f"{exc.field}: {exc.message}"
    elif isinstance(exc, ConfigError):
        text = f"{exc.key}: {exc.message}" + (f" (in {exc.source})" if exc.source else "")
    elif _rpc_error_code(exc) is not None:
        details = getattr(exc, "details", None)
        if callable(details):
            details = details()
        if not isinstance(details, str) or not details:
            details = getattr(exc, "message", None)
        text = details if isinstance(details, str) and details else str(exc)
    elif isinstance(exc, TimeoutError):
        text = str(exc) or "the request timed out"
    elif isinstance(exc, asyncio.CancelledError | concurrent.futures.CancelledError):
        text = str(exc) or "the request was cancelled"
    elif status_for(exc) is grpc.StatusCode.INTERNAL:
        text = f"internal error: {type(exc).__name__}" + (f": {exc}" if str(exc) else "")
    else:
        text = str(exc) or type(exc).__name__
    return text if len(text) <= MAX_DETAILS_CHARS else text[: MAX_DETAILS_CHARS - 3] + "..."


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """Fail a ``grpc.aio`` servicer call with the status of ``exc``; never returns.

    INTERNAL errors are logged here with their traceback (the client only sees the one-line details).
    """
    code = _log_and_code(exc)
    await context.abort(code, details_for(exc))
    raise AssertionError("context.abort returned")  # pragma: no cover (grpc raises)


def abort_with_sync(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """:func:`abort_with` for a synchronous (thread-pool) servicer."""
    code = _log_and_code(exc)
    context.abort(code, details_for(exc))
    raise AssertionError("context.abort returned")  # pragma: no cover (grpc raises)


def _log_and_code(exc: BaseException) -> grpc.StatusCode:
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.error("request failed with an internal error", exc_info=exc)
    return code


def _rpc_error_code(exc: BaseException) -> grpc.StatusCode | None:
    """The status an exception carries: a ``code`` attribute, or a ``grpc.RpcError``'s ``code()``."""
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(exc, grpc.RpcError) and callable(code):
        code = code()
        return code if isinstance(code, grpc.StatusCode) else None
    return None
