"""A model split over tensor-parallel ranks inside one engine process: one thread per rank past the first.

Rank 0 is the engine's own model: the scheduler, the KV block manager, the runner's step inputs and
the sampler exist once, and every rank reads the same step inputs (block ids mean the same blocks on
every rank; each rank's KV cache holds its own heads). A forward pass starts every other rank on its
thread with the same inputs, runs rank 0 on the caller's thread, and returns rank 0's hidden states
once all finished; the ranks meet in the all-reduces of their row-parallel projections
(:mod:`pdserve.engine.model.parallel`), over a gloo group per rank on one in-process store. The LM head
is replicated, so logits and sampling stay on rank 0.

Lifecycle: ``TensorParallelModel.build(...)`` forms the groups (every rank joins at once, each on its
own thread) and builds each rank's share of the weights; ``attach_kv_caches(layout)`` gives ranks past
the first their caches once the engine sized rank 0's; ``close()`` stops the threads.

KV transfer between workers of the same size: the per-layer hook (KV streaming) is called for every
rank's cache of the layer, indexed layer-major, and :meth:`transfer_caches` lists the caches the same
way, so the transport moves ``num_layers x size`` "layers" and rank r's heads land in rank r's cache.

Limits: CPU only (the engine refuses other devices); no CUDA graphs; both sides of a transfer must have
the same size (the KV layout handshake refuses others).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.kv_cache.tensors import KVCacheLayout, allocate_kv_caches
from pdserve.engine.model.decoder import DecoderForCausalLM
from pdserve.engine.model.parallel import TensorParallel

GROUP_TIMEOUT = datetime.timedelta(seconds=300)


class TensorParallelModel:
    """Rank 0's model, to the runner; ranks past the first follow it (see module)."""

    def __init__(self, ranks: list[DecoderForCausalLM]) -> None:
        self.ranks = ranks
        self.kv_caches: list[list[torch.Tensor]] = [[] for _ in ranks]
        self._pool = ThreadPoolExecutor(max(1, len(ranks) - 1), thread_name_prefix="pdserve-tp")

    @classmethod
    def build(cls, size: int, make: Callable[[TensorParallel], DecoderForCausalLM]) -> TensorParallelModel:
        """Form ``size`` gloo groups on one in-process store and ``make`` each rank's share of the model."""
        store = dist.HashStore()
        with ThreadPoolExecutor(size) as pool:  # a group's constructor returns once every rank joined
            groups = list(pool.map(lambda r: dist.ProcessGroupGloo(store, r, size, GROUP_TIMEOUT), range(size)))
        return cls([make(TensorParallel(rank, size, group)) for rank, group in enumerate(groups)])

    def attach_kv_caches(self, layout: KVCacheLayout, device: torch.device, rank0: list[torch.Tensor]) -> None:
        """Caches for every rank past the first, shaped like rank 0's (``rank0``)."""
        self.kv_caches = [rank0] + [allocate_kv_caches(layout, device) for _ in self.ranks[1:]]

    def __getattr__(self, name: str) -> Any:  # spec, compute_logits, build_rotary ...: rank 0's
        return getattr(self.ranks[0], name)

    @property
    def layer_hook(self) -> Callable[[int, torch.Tensor], None] | None:
        return self.ranks[0].layer_hook

    @layer_hook.setter
    def layer_hook(self, hook: Callable[[int, torch.Tensor], None] | None) -> None:
        """``hook(index, cache)`` for every rank's cache of each layer, once rank 0 finished the layer
        (the layer's last all-reduce waited for every rank, so their KV is written); ``index`` counts
        layer-major over the ranks, as :meth:`transfer_caches` lists the caches."""
        if hook is None:
            self.ranks[0].layer_hook = None
            return
        size = len(self.ranks)

        def every_rank(layer: int, _rank0_cache: torch.Tensor) -> None:
            for rank in range(size):
                hook(layer * size + rank, self.kv_caches[rank][layer])

        self.ranks[0].layer_hook = every_rank

    def transfer_caches(self) -> list[torch.Tensor]:
        """Every rank's cache of every layer, layer-major (what a KV transfer between workers of the
        same tensor-parallel size moves: rank r's heads land in rank r's cache)."""
        return [cache for layer in zip(*self.kv_caches, strict=True) for cache in layer]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 metadata: AttentionMetadata) -> torch.Tensor:
        others = [self._pool.submit(self._forward_rank, rank, input_ids, positions, metadata)
                  for rank in range(1, len(self.ranks))]
        try:
            hidden = self.ranks[0](input_ids, positions, kv_caches, metadata)
        finally:
            for future in others:
                future.result()
        return hidden

    def _forward_rank(self, rank: int, input_ids: torch.Tensor, positions: torch.Tensor,
                      metadata: AttentionMetadata) -> None:
        with torch.inference_mode():
            self.ranks[rank](input_ids, positions, self.kv_caches[rank], metadata)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
