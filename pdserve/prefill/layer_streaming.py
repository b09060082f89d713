"""Which blocks of a prefill step go where: the engine-thread half of streaming KV layer by layer.

A prefill worker's forward pass may carry chunks of many prompts, each streaming into its own decode
worker's cache. :func:`layer_hook_for_step` looks at one step's plan before its forward pass, notes for
each chunk whose request is streamed (a :class:`StreamedTransfer`) the range of blocks this step writes,
prepares them once per sender (``KVSender.prepare_step``), and returns the per-layer hook that sends
each layer of every one of them (``KVSender.send_step_layer``): the host work per layer is one call per
decode worker, not one per prompt. Engine thread only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.engine.kv_cache.tensors import head_group_views
from pdserve.engine.step_plan import SchedulerPlan
from pdserve.kvtransfer import KVSender, LayerSend, TransferHandle


@dataclass(eq=False)
class StreamedTransfer:
    """One prompt's transfer as the prefill side streams it; ``sent_upto_block``: blocks before it were
    sent by an earlier chunk (0: nothing yet); ``timing``: ``time.time()`` stamps for benchmarks."""

    sender: KVSender
    handle: TransferHandle
    sent_upto_block: int = 0
    timing: dict[str, float] = field(default_factory=lambda: {"received_at": time.time()})


def layer_hook_for_step(plan: SchedulerPlan, transfers: Mapping[str, StreamedTransfer], block_size: int,
                        caches_per_layer: int) -> Callable[[int, torch.Tensor], None] | None:
    """The per-layer hook that streams this step's blocks of every transfer in ``transfers`` (by request
    id), or ``None`` when the step carries none. ``caches_per_layer``: head groups of one rank's layer
    (each its own transfer layer, ``layer * caches_per_layer + group``)."""
    by_sender: dict[KVSender, list[LayerSend]] = {}
    now = time.time()
    for chunk in plan.chunks:
        transfer = transfers.get(chunk.request.request_id)
        if transfer is None:
            continue
        end_block = -(-(chunk.start + chunk.num_tokens) // block_size)
        start_block = 0 if transfer.sent_upto_block == 0 else chunk.start // block_size
        transfer.sent_upto_block = end_block
        by_sender.setdefault(transfer.sender, []).append(
            LayerSend(transfer.handle, chunk.block_ids, (start_block, end_block)))
        transfer.timing.setdefault("first_step_started_at", now)
        if chunk.samples:
            transfer.timing.setdefault("last_step_started_at", now)
    if not by_sender:
        return None
    steps: list[tuple[KVSender, Any]] = [(sender, sender.prepare_step(sends)) for sender, sends in by_sender.items()]

    def after_layer(layer: int, kv_cache: torch.Tensor) -> None:  # layer: a rank's cache, layer-major
        views = head_group_views(kv_cache, caches_per_layer)
        for group, view in enumerate(views):
            for sender, step in steps:
                sender.send_step_layer(step, layer * caches_per_layer + group, view)

    return after_layer
