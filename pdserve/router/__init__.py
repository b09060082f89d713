"""The router: the torch-free gRPC front that places requests on prefill/decode workers.

Public API::

    from pdserve.router import Router, RouterConfig, WorkerEndpoint

    router = Router(RouterConfig(port=50051), model="llama", mode="disaggregated", workers=[
        WorkerEndpoint("p0", "prefill", "10.0.0.1:7000"),
        WorkerEndpoint("d0", "decode", "10.0.0.2:7000"),
    ])
    port = await router.start()
    ...
    await router.stop(grace=5.0)

Modules, one concept each: :mod:`~pdserve.router.config` (settings, endpoints),
:mod:`~pdserve.router.registry` (per-worker state and channels), :mod:`~pdserve.router.policy`,
:mod:`~pdserve.router.decode_policy`, :mod:`~pdserve.router.prefill_policy` (filter -> score -> pick),
:mod:`~pdserve.router.inflight` (admission, request ids, queues), :mod:`~pdserve.router.updates` (the
per-worker ``Updates`` streams), :mod:`~pdserve.router.dispatch` (Submit, retries, fan-out, aborts),
:mod:`~pdserve.router.session` (one request's life), :mod:`~pdserve.router.servicer` (the gRPC edge),
:mod:`~pdserve.router.router` (lifecycle).
"""

from __future__ import annotations

from pdserve.router.config import RouterConfig, ServingMode, WorkerEndpoint, WorkerRole
from pdserve.router.decode_policy import DecodePolicy, DecodePolicyConfig, LeastLoadedDecodePolicy
from pdserve.router.prefill_policy import LeastQueuedPrefillPolicy, PrefillPolicy
from pdserve.router.registry import LoadSnapshot, WorkerState
from pdserve.router.router import Router

__all__ = [
    "DecodePolicy",
    "DecodePolicyConfig",
    "LeastLoadedDecodePolicy",
    "LeastQueuedPrefillPolicy",
    "LoadSnapshot",
    "PrefillPolicy",
    "Router",
    "RouterConfig",
    "ServingMode",
    "WorkerEndpoint",
    "WorkerRole",
    "WorkerState",
]
