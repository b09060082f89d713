"""A conformance kit for KV transports: a harness that makes sender/receiver pairs (in-process or with
the sender in a spawned process) and the contract scenarios every transport must pass.

Used by ``tests/unit/test_kvtransfer_contract.py`` (loopback, gloo, NCCL with 2 GPUs) and
``tests/gpu/test_kvtransfer_gpu.py``; a new transport adds a :class:`Transport` and runs the same
scenarios. Importing it starts nothing.
"""

from __future__ import annotations

from pdserve.kvtransfer.testing.contract import SCENARIOS, check_sender_death
from pdserve.kvtransfer.testing.harness import (
    SENTINEL,
    CacheSpec,
    LoopbackTransport,
    Pair,
    ProcessGroupTransport,
    Transport,
)

__all__ = ["SCENARIOS", "SENTINEL", "CacheSpec", "LoopbackTransport", "Pair", "ProcessGroupTransport",
           "Transport", "check_sender_death"]
