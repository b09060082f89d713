"""Start a ``grpc.aio`` server the pdserve way: bound port returned, standard health service, shared options.

Usage (inside a running event loop)::

    running = await start_server(
        lambda s: pdserve_pb2_grpc.add_PdServeServicer_to_server(servicer, s),
        host="0.0.0.0", port=0, service_names=[PDSERVE_SERVICE])
    print(running.address)          # "0.0.0.0:41234": port 0 picked a free port
    ...
    await running.stop(grace=5.0)   # health turns NOT_SERVING first, then in-flight calls get `grace` s

The ``grpc.health.v1.Health`` service reports SERVING for the whole server (``""``) and for each name in
``service_names`` from the moment :func:`start_server` returns.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve.rpc.options import SERVER_OPTIONS, ChannelOptions, merged
from pdserve.v1 import pdserve_pb2, worker_pb2

PDSERVE_SERVICE: str = pdserve_pb2.DESCRIPTOR.services_by_name["PdServe"].full_name
"""``"pdserve.v1.PdServe"``: the health-check name of the client API."""
WORKER_SERVICE: str = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
"""``"pdserve.v1.Worker"``: the health-check name of the worker control plane."""


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


@dataclass
class RunningServer:
    """A started server: the bound ``port`` and its health servicer."""

    server: grpc.aio.Server
    host: str
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]

    @property
    def address(self) -> str:
        """``host:port`` as bound (port 0 already resolved)."""
        return format_address(self.host, self.port)

    async def set_serving(self, serving: bool, service: str | None = None) -> None:
        """Report SERVING or NOT_SERVING for one service name, or (``None``) for all of them and ``""``."""
        statuses = health_pb2.HealthCheckResponse
        status = statuses.SERVING if serving else statuses.NOT_SERVING
        for name in ("", *self.service_names) if service is None else (service,):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Turn health to NOT_SERVING, stop accepting calls, cancel calls still running after ``grace`` s."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (True) or ``timeout`` passes (False)."""
        return await self.server.wait_for_termination(timeout)


async def start_server(
    register: Callable[[grpc.aio.Server], object] | Iterable[Callable[[grpc.aio.Server], object]],
    host: str = "0.0.0.0",
    port: int = 0,
    *,
    service_names: Sequence[str] = (),
    options: ChannelOptions | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None,
    maximum_concurrent_rpcs: int | None = None,
    tls: tuple[bytes, bytes] | None = None,
) -> RunningServer:
    """Create, bind and start a ``grpc.aio`` server; must be awaited inside the loop that will serve it.

    ``register`` adds the servicers (one callable or several, each given the server, for example
    ``lambda s: pdserve_pb2_grpc.add_PdServeServicer_to_server(servicer, s)``). ``port=0`` picks a free
    port; the returned :class:`RunningServer` has the bound one. ``options`` override entries of
    :data:`~pdserve.rpc.options.SERVER_OPTIONS` (64 MiB messages, keepalive, no port sharing).
    ``tls``: ``(private_key_pem, certificate_chain_pem)``: the port speaks TLS only.
    Raises :class:`OSError` when the address cannot be bound (port taken, unknown host).
    """
    server = grpc.aio.server(options=merged(SERVER_OPTIONS, options),
                             interceptors=[RejectUndecodable(), *(interceptors or ())],
                             maximum_concurrent_rpcs=maximum_concurrent_rpcs)
    for add in [register] if callable(register) else list(register):
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = format_address(host, port)
    try:
        bound = (server.add_insecure_port(address) if tls is None
                 else server.add_secure_port(address, grpc.ssl_server_credentials([tls])))
    except RuntimeError as exc:
        raise OSError(f"could not bind a gRPC server to {address}: {exc}") from None
    if bound == 0:
        raise OSError(f"could not bind a gRPC server to {address}")
    await server.start()
    running = RunningServer(server=server, host=host, port=bound, health=health_servicer,
                            service_names=tuple(service_names))
    await running.set_serving(True)
    return running


class _Undecodable:
    """What a request deserializer returns for bytes that are no such message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


Precheck = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


def with_precheck(handler: Any, precheck: Precheck, request_deserializer: Any = None) -> Any:
    """A handler of ``handler``'s kind whose behaviour first awaits ``precheck(request, context)``
    (which refuses a call by aborting it) and then runs the original; ``request_deserializer``
    replaces the original's. Server interceptors build their refusals with it."""
    kwargs = {"request_deserializer": request_deserializer or handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler), ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    name, make = next((k, f) for k, f in kinds if getattr(handler, k) is not None)
    behavior = getattr(handler, name)
    if inspect.isasyncgenfunction(behavior):  # a streaming response written by yielding
        async def checked_gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await precheck(request, context)
            async for item in behavior(request, context):
                yield item

        return make(checked_gen, **kwargs)

    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await precheck(request, context)
        return await behavior(request, context)

    return make(checked, **kwargs)


class RejectUndecodable(grpc.aio.ServerInterceptor):
    """Answers requests whose bytes do not parse as the method's message with INVALID_ARGUMENT.

    grpcio itself answers UNKNOWN and logs a traceback (a server error for a client's mistake); here the
    deserializer of every unary-request method is wrapped so that a parse failure reaches the handler as
    a marker, and the handler aborts before the servicer sees anything."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        method = handler_call_details.method

        def safe(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as exc:  # noqa: BLE001 - any parse failure is the client's
                return _Undecodable(exc)

        async def refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request is not a valid message for {method}: {request.error}")

        return with_precheck(handler, refuse_undecodable, safe)
