"""The device tensors of the paged KV cache, and how many blocks fit in a memory budget.

Layout: one tensor per layer, ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (0: keys,
1: values). A block of one layer is therefore two contiguous ``block_size * num_kv_heads * head_dim``
runs, which the KV transfer sends as is. This layout (and dtype, block size) is what the transfer
handshake compares between workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.model.hf_config import ModelSpec


@dataclass(frozen=True)
class KVCacheLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers (keys and values)."""
        return bytes_per_block(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype)


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


def num_blocks_for_budget(spec: ModelSpec, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    per_block = bytes_per_block(spec.num_layers, block_size, spec.num_kv_heads, spec.head_dim, dtype)
    return int(budget_bytes // per_block)


def allocate_kv_caches(layout: KVCacheLayout, device: torch.device) -> list[torch.Tensor]:
    """One zero-filled tensor per layer (zeros so that never-written slots are finite)."""
    return [torch.zeros(layout.shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]


def head_group_views(cache: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """``cache`` (one layer, ``[2, blocks, block_size, heads, dim]``) as ``groups`` views of consecutive
    KV heads each (itself for one group): what a transfer between tensor-parallel degrees moves."""
    if groups == 1:
        return [cache]
    heads = cache.shape[3]
    if heads % groups:
        raise ValueError(f"{heads} KV heads do not split into {groups} groups")
    width = heads // groups
    return [cache.narrow(3, g * width, width) for g in range(groups)]
