"""Several router processes on one port (``RouterConfig.processes``): what ties them together.

Every process is a whole :class:`~pdserve.router.router.Router` over the same workers (each opens its
own ``Updates`` stream to every worker and keeps the deltas of its own requests), and all of them bind
the public gRPC port with ``SO_REUSEPORT`` (:data:`SHARED_PORT_OPTIONS`), so the kernel hands each new
client connection to one of them. The operator's actions on the workers (``ScalePool``, ``SwitchRole``)
have one owner, the first process, which the launcher gives the scaler and the role switcher: it also
serves the ``PdServe`` API on a private loopback port (:func:`start_admin_server`, the cluster token
required when there is one), and every other process forwards those two RPCs there
(:class:`AdminForwarder`), so an operator reaches the owner whichever process their connection lands on.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from pdserve.rpc.auth import cluster_token, peer_interceptors
from pdserve.rpc.options import CHANNEL_OPTIONS, ChannelOptions
from pdserve.rpc.server import PDSERVE_SERVICE, RunningServer, start_server
from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc

#: Server options of the public port when several processes share it.
SHARED_PORT_OPTIONS: ChannelOptions = (("grpc.so_reuseport", 1),)


async def start_admin_server(register: Callable[[grpc.aio.Server], object]) -> RunningServer:
    """The first process's private port (127.0.0.1, any free port) serving what ``register`` adds; calls
    need the cluster token when the cluster has one."""
    return await start_server(register, "127.0.0.1", 0, service_names=[PDSERVE_SERVICE],
                              interceptors=peer_interceptors())


class AdminForwarder:
    """``ScalePool`` and ``SwitchRole`` of a process that does not own the workers, sent to the one that
    does at ``address`` (its private port). The methods block (the servicer runs them in a thread) and
    have the signatures of ``Router.scaler`` and ``Router.role_switcher``; a refusal there for a bad
    argument comes back as ``ValueError`` (INVALID_ARGUMENT here too), any other failure as
    ``RuntimeError`` naming the code."""

    def __init__(self, address: str) -> None:
        self.address = address

    def scale(self, role: str, replicas: int, grace_s: float | None) -> list[str]:
        reply = self._call("ScalePool", pdserve_pb2.ScalePoolRequest(role=role, replicas=replicas,
                                                                      grace_s=grace_s or 0.0))
        assert isinstance(reply, pdserve_pb2.ScalePoolResponse)
        return list(reply.changed_workers)

    def switch(self, worker_id: str, role: str, grace_s: float | None) -> str:
        reply = self._call("SwitchRole", pdserve_pb2.SwitchRoleRequest(worker_id=worker_id, role=role,
                                                                        grace_s=grace_s or 0.0))
        assert isinstance(reply, pdserve_pb2.SwitchRoleResponse)
        return str(reply.worker_id)

    def _call(self, method: str, request: object) -> pdserve_pb2.ScalePoolResponse | pdserve_pb2.SwitchRoleResponse:
        token = cluster_token()
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        with grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            stub = pdserve_pb2_grpc.PdServeStub(channel)
            try:
                reply: pdserve_pb2.ScalePoolResponse | pdserve_pb2.SwitchRoleResponse = getattr(stub, method)(
                    request, metadata=metadata)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(details) from None
                raise RuntimeError(f"{method} at the router process that manages the workers ({self.address}) "
                                   f"failed: {code.name}: {details}") from None
        return reply
