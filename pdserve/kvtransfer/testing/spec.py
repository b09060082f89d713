"""The shape of the test caches, and the sentinel that marks destination blocks nobody wrote."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pdserve.kvtransfer.base import KVLayoutInfo

#: The value destination caches are filled with; random normal data never comes near it.
SENTINEL = 1024.0


@dataclass(frozen=True)
class CacheSpec:
    """Shape of the test caches (small, so that a whole suite runs in seconds)."""

    num_layers: int = 3
    num_src_blocks: int = 24
    num_dst_blocks: int = 32
    block_size: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    dtype: str = "bfloat16"
    model: str = "kv-contract-model"

    def layout(self, **overrides: Any) -> KVLayoutInfo:
        values: dict[str, Any] = {"model": self.model, "dtype": self.dtype, "block_size": self.block_size,
                                  "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                                  "head_dim": self.head_dim}
        values.update(overrides)
        return KVLayoutInfo(**values)

    def random_caches(self, device: torch.device | str, generator: torch.Generator) -> list[torch.Tensor]:
        shape = (2, self.num_src_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        dtype = getattr(torch, self.dtype)
        return [torch.randn(shape, generator=generator).to(dtype).to(device) for _ in range(self.num_layers)]


def sentinel_caches(layout: KVLayoutInfo, num_blocks: int, device: torch.device | str) -> list[torch.Tensor]:
    shape = layout.payload_shape(num_blocks)
    return [torch.full(shape, SENTINEL, dtype=layout.torch_dtype, device=device)
            for _ in range(layout.num_layers)]
