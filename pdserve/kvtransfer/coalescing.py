"""Several point-to-point operations of a pair's group as one coalesced NCCL launch.

Each ``ProcessGroupNCCL.send``/``recv`` costs 150-300 us of host time on 2xH200 (torch 2.11: a work
object, events, the flight recorder); inside a coalescing block the operations are only queued between
``ncclGroupStart`` and ``ncclGroupEnd`` and one work object stands for all of them.

Used, when ``PDSERVE_KV_COALESCE=1``, for the runs of messages a plan marks as one launch (their
layers computed when the plan was made): the sender sends them in one block and the receiver posts
their receives in one block -- both sides must group alike, since NCCL 2.28 hangs when only one side
coalesces (probed on 2xH200, ``benchmarks/kv_timeline.py --probe``). Off by default: on 2xH200 it
measured no faster (4 GB: 19.0 ms against 16.9; 512 MB: 5.3 against 5.2), because a coalesced launch
starts only once every message of it is gathered, which costs the overlap of gathers and sends.
Gloo groups (CPU) do not coalesce.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pdserve.common import switches

COALESCE = switches.KV_COALESCE.flag()


def can_coalesce(group: Any) -> bool:
    """Whether ``group`` can run a coalescing block (an NCCL group on a torch that supports it). A
    receiver follows the plan whenever it can; only a sender chooses (``COALESCE``)."""
    return (bool(getattr(group, "supports_coalescing", False)) and hasattr(group, "_start_coalescing")
            and hasattr(group, "_end_coalescing"))


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
