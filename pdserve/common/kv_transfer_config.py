"""The KV transfer settings of a cluster (torch-free: the CLI, the router and every worker read them)."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.common.errors import InvalidParameterError
from pdserve.common.validation import require_float, require_int

#: The one list of KV transports (the transport factory and the config validator both use it).
TRANSFER_BACKENDS = ("auto", "cuda_ipc", "nccl", "gloo", "loopback")
FAILURE_POLICIES = ("fail", "recompute")


@dataclass(frozen=True)
class KVTransferConfig:
    """``backend``: auto = CUDA IPC writes between GPUs of one host (NCCL across hosts, decided per peer),
    gloo between CPU processes; ``cuda_ipc`` says the same explicitly; ``nccl`` forces NCCL. ``timeout_s``: a transfer that
    has not finished by then is failed and its blocks freed on both sides. ``on_failure``: ``recompute``
    the prompt on the decode worker (the default: the client sees no error, only latency), or ``fail``
    the request with UNAVAILABLE and a clear message. ``head_groups``: how many groups of KV heads a
    transfer moves per layer (0: the worker's own tensor-parallel degree); the cluster config sets it to
    the larger degree of the prefill and decode pools, so workers of different degrees agree on one
    layout and each decode rank receives exactly the heads it owns."""

    backend: str = "auto"
    timeout_s: float = 30.0
    on_failure: str = "recompute"
    head_groups: int = 0

    def __post_init__(self) -> None:
        if self.backend not in TRANSFER_BACKENDS:
            raise InvalidParameterError("backend", f"must be one of {', '.join(TRANSFER_BACKENDS)}; got {self.backend!r}")
        require_float("timeout_s", self.timeout_s, minimum=0.0, exclusive_minimum=True)
        require_int("head_groups", self.head_groups, minimum=0, maximum=64)
        if self.on_failure not in FAILURE_POLICIES:
            raise InvalidParameterError("on_failure", f"must be one of {', '.join(FAILURE_POLICIES)}; "
                                                      f"got {self.on_failure!r}")
