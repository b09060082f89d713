"""Several point-to-point operations of a pair's group as one coalesced NCCL launch.

Each ``ProcessGroupNCCL.send``/``recv`` costs 150-300 us of host time on 2xH200 (torch 2.11: a work
object, events, the flight recorder); inside a coalescing block the operations are only queued between
``ncclGroupStart`` and ``ncclGroupEnd`` and one work object stands for all of them. A side may coalesce
its operations whatever the peer does: NCCL matches point-to-point operations per peer in order.

Used where a side has several messages to move at once: the receiver posts every receive of a plan in
one block, the sender sends in one block the messages whose layers are already computed. Gloo groups
(CPU) do not coalesce; ``PDSERVE_KV_COALESCE=0`` turns it off for measurements.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

COALESCE = os.environ.get("PDSERVE_KV_COALESCE", "1") != "0"


def can_coalesce(group: Any) -> bool:
    """Whether ``group`` can run a coalescing block (an NCCL group on a torch that supports it)."""
    return (COALESCE and bool(getattr(group, "supports_coalescing", False))
            and hasattr(group, "_start_coalescing") and hasattr(group, "_end_coalescing"))


def run_coalesced(group: Any, operations: Sequence[Callable[[], Any]]) -> Any:
    """Run ``operations`` (each queues one send or receive on ``group``) as one coalesced launch and
    return the work that stands for all of them (``wait()`` makes the current stream wait for every
    one). The block is closed even when an operation raises."""
    group._start_coalescing()
    try:
        for operation in operations:
            operation()
    finally:
        work = group._end_coalescing()
    return work
