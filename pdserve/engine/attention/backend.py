"""The attention backend interface.

A backend owns two operations over the paged KV cache of one layer, a tensor of shape
``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (index 0: keys, 1: values):

* ``write_kv``: store this step's new keys and values at ``metadata.slot_mapping``;
* ``attend``: causal attention of this step's queries over each sequence's whole context (earlier KV
  read from the cache, new KV just written), with optional sliding window and grouped-query heads.

Backends hold no per-request state; everything a step needs is in :class:`AttentionMetadata`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.model.layers import RotaryEmbedding


class AttentionBackend(ABC):
    name: str = "abstract"
    supports_cuda_graphs: bool = False
    fused_layers: bool = False  # use the fused Triton norm / activation kernels in the model too

    def query_tile_rows(self, head_dim: int, dtype: torch.dtype) -> int | None:
        """Rows per prefill query tile when the backend reads a tile list (``metadata.query_tiles``,
        built by ``StepInputs``); ``None`` when it needs none."""
        return None

    def prepare(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                max_tokens: int, sliding_window: int | None) -> float:
        """Build, before serving, whatever the backend would otherwise build on first use of a shape
        (steps of at most ``max_tokens`` tokens); returns the seconds it took. Default: nothing."""
        return 0.0

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 metadata: AttentionMetadata) -> None:
        """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into their cache slots."""
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
        slots = metadata.slot_mapping[: key.shape[0]].long()
        flat[0].index_copy_(0, slots, key.to(kv_cache.dtype))
        flat[1].index_copy_(0, slots, value.to(kv_cache.dtype))

    @abstractmethod
    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, *,
               scale: float, sliding_window: int | None) -> torch.Tensor:
        """Return ``[num_tokens, num_heads, head_dim]``: query row ``t`` of sequence ``i`` at absolute
        position ``p`` attends to that sequence's keys at positions ``k <= p`` (and ``p - k <
        sliding_window`` when a window is set)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, *, scale: float, sliding_window: int | None) -> torch.Tensor:
        self.write_kv(key, value, kv_cache, metadata)
        return self.attend(query, kv_cache, metadata, scale=scale, sliding_window=sliding_window)

    def rope_write_attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          positions: torch.Tensor, rotary: RotaryEmbedding, kv_cache: torch.Tensor,
                          metadata: AttentionMetadata, *, scale: float, sliding_window: int | None) -> torch.Tensor:
        """Rotary embedding, cache write and attention; backends may fuse the first two."""
        query, key = rotary(positions, query, key)
        return self.forward(query, key, value, kv_cache, metadata, scale=scale, sliding_window=sliding_window)
