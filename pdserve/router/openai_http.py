"""The router's OpenAI-compatible HTTP front: ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (whole answers and server-sent-event streams), ``GET /health`` and
``GET /metrics`` (Prometheus, :mod:`pdserve.router.metrics`), and the operator dashboard (``GET
/dashboard``, its JSON at ``/dashboard/data`` and live at ``/dashboard/events``,
:mod:`pdserve.router.dashboard`), on aiohttp, in the router's event loop.

Each call goes through exactly the path of a gRPC ``Generate`` call: the body becomes a
``GenerateRequest`` (:mod:`pdserve.router.openai_schema`), :meth:`PdServeServicer.open_session`
validates and admits it, and the :class:`RequestSession` streams its responses, which become OpenAI
JSON (:mod:`pdserve.router.openai_responses`). So routing, retries, deadlines and aborts are the gRPC
API's; a chat is rendered with the model's chat template by the worker that serves it.

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``) with the HTTP status the
ecosystem uses: 400 for a bad field (``param`` names it), 404 for another model, 413 for a body over
``MAX_BODY_BYTES``, 429 when the router is full, 503 without a usable worker, 504 on a timeout, 500
otherwise. A stream's headers go out once a worker accepted the request; an error after that is sent
as one ``data: {"error": ...}`` event before ``data: [DONE]``. A client that disconnects
cancels its handler (``handler_cancellation``), which aborts the request at its workers.

Lifecycle: built by :class:`~pdserve.router.router.Router` when ``RouterConfig.http_port`` is set;
``await start(host, port)`` returns the bound port; ``await stop()`` closes the listener and
cancels the requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import grpc
from aiohttp import web

from pdserve.common.errors import InvalidParameterError, UnknownModelError
from pdserve.router.dashboard import PUSH_INTERVAL_S
from pdserve.router.metrics import CONTENT_TYPE
from pdserve.router.openai_responses import (
    chat_chunk,
    chat_json,
    completion_json,
    error_json,
    models_json,
    usage_chunk,
)
from pdserve.router.openai_schema import chat_request, completion_request
from pdserve.router.servicer import PdServeServicer
from pdserve.router.session import RequestSession
from pdserve.rpc.auth import ApiKeys
from pdserve.rpc.status import details_for, status_for
from pdserve.v1 import pdserve_pb2

logger = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.UNIMPLEMENTED: 501,
}
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error"}
MAX_BODY_BYTES = 16 * 1024 * 1024
#: How long a request's body may take to arrive once its headers did.
BODY_READ_TIMEOUT_S = 30.0
#: A worker reports a bad request as ``field: message``; the OpenAI ``param`` names the request's own field.
_FIELD_IN_DETAILS = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")
_PARAM_OF_FIELD = {"prompt_token_ids": "prompt", "prompt_text": "prompt"}


class OpenAIFront:
    def __init__(self, servicer: PdServeServicer, model: str, *, max_model_len: Callable[[], int],
                 serving: Callable[[], bool], metrics: Callable[[], Awaitable[str]] | None = None,
                 dashboard: Callable[[], Awaitable[dict[str, Any]]] | None = None,
                 api_keys: ApiKeys | None = None) -> None:
        self._metrics = metrics
        self._dashboard = dashboard
        self._api_keys = api_keys
        self._servicer = servicer
        self._model = model
        self._max_model_len = max_model_len
        self._serving = serving
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_openai_http_errors, self._authenticate])
        app.add_routes([web.get("/v1/models", self._models), web.post("/v1/completions", self._completions),
                        web.post("/v1/chat/completions", self._chat), web.get("/health", self._health),
                        web.get("/metrics", self._metrics_page), web.get("/dashboard", self._dashboard_page),
                        web.get("/dashboard/data", self._dashboard_data),
                        web.get("/dashboard/events", self._dashboard_events)])
        return app

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """``/v1/*`` needs a valid ``Authorization: Bearer`` key when keys are configured (401 otherwise)."""
        if (self._api_keys is not None and request.path.startswith("/v1/")
                and not self._api_keys.check_authorization(request.headers.get("Authorization"))):
            response = _error(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return await handler(request)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on ``host:port`` (0: any free port; with ``ssl_context``: HTTPS only); returns the bound
        port. OSError if taken."""
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_port=False, ssl_context=ssl_context)
        try:
            await site.start()
        except BaseException:
            await self.stop()
            raise
        addresses = self._runner.addresses  # [(host, port, ...)] of the bound sockets
        self.port = int(addresses[0][1]) if addresses else port
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- handlers --------------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        ok = self._serving()
        return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)

    async def _dashboard_page(self, request: web.Request) -> web.Response:
        if self._dashboard is None:
            return _error(404, "this router serves no dashboard")
        page = resources.files("pdserve.router").joinpath("static/dashboard.html").read_bytes()
        return web.Response(body=page, headers={"Content-Type": "text/html; charset=utf-8",
                                                "Cache-Control": "no-cache"})

    async def _dashboard_data(self, request: web.Request) -> web.Response:
        if self._dashboard is None:
            return _error(404, "this router serves no dashboard")
        return web.json_response(await self._dashboard())

    async def _dashboard_events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the dashboard's JSON every ``PUSH_INTERVAL_S`` until the client leaves."""
        if self._dashboard is None:
            return _error(404, "this router serves no dashboard")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            while True:
                await response.write(f"data: {json.dumps(await self._dashboard())}\n\n".encode())
                await asyncio.sleep(PUSH_INTERVAL_S)
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the page was closed (or the router is stopping)
        return response

    async def _metrics_page(self, request: web.Request) -> web.Response:
        if self._metrics is None:
            return _error(404, "this router keeps no metrics")
        return web.Response(body=(await self._metrics()).encode(), headers={"Content-Type": CONTENT_TYPE})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(models_json(self._model, self._max_model_len()))

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, _COMPLETION)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, _CHAT)

    async def _serve(self, request: web.Request, api: _Api) -> web.StreamResponse:
        try:
            body = await asyncio.wait_for(request.json(), BODY_READ_TIMEOUT_S)
        except TimeoutError:
            return _error(408, f"the request body did not arrive within {BODY_READ_TIMEOUT_S:g} s (a Content-Length "
                               "longer than the body sent?)", param="body")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"the request body is not valid JSON: {exc}", param="body")
        except RecursionError:
            return _error(400, "the request body is not valid JSON: it is nested too deeply", param="body")
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", param="body")
        except web.RequestPayloadError as exc:  # a Content-Encoding the body does not decode with, a cut body
            return _error(400, f"the request body could not be read: {exc.__cause__ or exc}".strip(), param="body")
        created = int(time.time())
        try:
            generate, stream, include_usage = api.parse(body, self._model, self._max_model_len())
            session = self._servicer.open_session(generate)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error
            return _error_for(exc)
        if not stream:
            try:
                answer = await session.run()
            except Exception as exc:  # noqa: BLE001
                return _error_for(exc)
            return web.json_response(api.answer(answer, self._model, created))
        return await self._stream(request, session, api, created, include_usage)

    async def _stream(self, request: web.Request, session: RequestSession, api: _Api, created: int,
                      include_usage: bool) -> web.StreamResponse:
        """Stream the session as server-sent events. The headers go out once a worker accepted the
        request (so a prompt it refuses, e.g. too long, gets its 4xx like an unstreamed call, and a client
        sees the stream open while the prompt is prefilled); errors after that come as an ``error`` event."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

        async def accepted() -> None:
            await response.prepare(request)

        text_offset = 0
        last: pdserve_pb2.GenerateResponse | None = None

        async def emit(piece: pdserve_pb2.GenerateResponse) -> None:
            nonlocal text_offset, last
            await _event(response, api.chunk(piece, self._model, created, last is None, text_offset))
            text_offset += len(piece.text)
            last = piece

        try:
            await session.run(emit, on_accepted=accepted)
            if include_usage and last is not None:
                await _event(response, api.usage(last.request_id, last.usage, self._model, created))
        except ConnectionResetError:
            raise  # the client left: nothing to tell it
        except Exception as exc:  # noqa: BLE001 - reported in the stream once its status (200) went out
            if not response.prepared:
                return _error_for(exc)
            status, message = _status_and_message(exc)
            await _event(response, error_json(message, _ERROR_TYPES.get(status, "server_error"), code=str(status)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@dataclass(frozen=True)
class _Api:
    """How one endpoint parses its body and shapes its answers."""

    parse: Callable[[Any, str, int], tuple[pdserve_pb2.GenerateRequest, bool, bool]]
    answer: Callable[[pdserve_pb2.GenerateResponse, str, int], dict[str, Any]]
    chunk: Callable[[pdserve_pb2.GenerateResponse, str, int, bool, int], dict[str, Any]]
    usage: Callable[[str, Any, str, int], dict[str, Any]]


_COMPLETION = _Api(
    parse=lambda body, model, max_model_len: completion_request(body, model),
    answer=lambda r, model, created: completion_json(r, model, created, chunk=False),
    chunk=lambda r, model, created, first, offset: completion_json(r, model, created, chunk=True, text_offset=offset),
    usage=usage_chunk)
_CHAT = _Api(
    parse=chat_request,
    answer=chat_json,
    chunk=lambda r, model, created, first, offset: chat_chunk(r, model, created, first),
    usage=lambda request_id, usage, model, created: usage_chunk(request_id, usage, model, created, chat=True))


@web.middleware
async def _openai_http_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """A route that does not exist, or a method a route does not take, answered in the OpenAI error shape
    (as ``api.openai.com`` does) instead of aiohttp's plain text."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        response = _error(405, f"{request.method} is not allowed on {request.path} (allowed: {allowed})")
        response.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPNotFound:
        return _error(404, f"invalid URL ({request.method} {request.path}): pdserve serves /v1/models, "
                           "/v1/completions and /v1/chat/completions", code="unknown_url")


async def _event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


def _status_and_message(exc: BaseException) -> tuple[int, str]:
    code = status_for(exc)
    status = HTTP_STATUS.get(code, 500)
    if status == 500:
        logger.exception("HTTP completion failed", exc_info=exc)
    return status, details_for(exc)


def _error_for(exc: BaseException) -> web.Response:
    if isinstance(exc, UnknownModelError):
        return _error(404, exc.message, param="model", code="model_not_found")
    if isinstance(exc, InvalidParameterError):
        return _error(400, f"{exc.field}: {exc.message}", param=exc.field)
    status, message = _status_and_message(exc)
    field = _FIELD_IN_DETAILS.match(message) if status == 400 else None  # a worker's "field: message"
    response = _error(status, message, param=_PARAM_OF_FIELD.get(field[1], field[1]) if field else None)
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response(error_json(message, _ERROR_TYPES.get(status, "server_error"), param, code),
                             status=status)
