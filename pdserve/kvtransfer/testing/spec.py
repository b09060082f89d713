"""The shape of the test caches, and the sentinel that marks destination blocks nobody wrote."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.kvtransfer.base import KVLayoutInfo

#: The value destination caches are filled with; random normal data never comes near it.
SENTINEL = 1024.0


@dataclass(frozen=True)
class CacheSpec:
    """Shape of the test caches (small, so that a whole suite runs in seconds).

    ``sender_head_split`` / ``receiver_head_split``: each transfer layer of that side is one of so many
    views of consecutive KV heads of a wider cache (a tensor-parallel worker of a lower degree than its
    peer's, :func:`~pdserve.engine.kv_cache.tensors.head_group_views`); ``num_layers`` must divide by it.
    """

    num_layers: int = 3
    num_src_blocks: int = 24
    num_dst_blocks: int = 32
    block_size: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    dtype: str = "bfloat16"
    model: str = "kv-contract-model"
    sender_head_split: int = 1
    receiver_head_split: int = 1

    def layout(self, **overrides: Any) -> KVLayoutInfo:
        values: dict[str, Any] = {"model": self.model, "dtype": self.dtype, "block_size": self.block_size,
                                  "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                                  "head_dim": self.head_dim}
        values.update(overrides)
        return KVLayoutInfo(**values)

    def random_caches(self, devices: str | torch.device, generator: torch.Generator) -> list[torch.Tensor]:
        """The sender's source caches, random, on ``devices`` (see :func:`split_caches`)."""
        dtype = getattr(torch, self.dtype)
        return split_caches(self.layout(), self.num_src_blocks, devices, self.sender_head_split,
                            lambda shape, device: torch.randn(shape, generator=generator).to(dtype).to(device))


def parse_devices(devices: str | torch.device) -> list[torch.device]:
    """``"cuda:0,cuda:1"`` (a tensor-parallel worker's ranks) or one device, as a list."""
    return [torch.device(d) for d in str(devices).split(",")]


def split_caches(layout: KVLayoutInfo, num_blocks: int, devices: str | torch.device, head_split: int,
                 make: Callable[[tuple[int, ...], torch.device], torch.Tensor]) -> list[torch.Tensor]:
    """``layout.num_layers`` transfer layers of ``num_blocks`` blocks, as a tensor-parallel worker lists
    them: wider caches of ``head_split`` times the heads (``make(shape, device)``), each cut into views of
    consecutive heads, the wider caches in turn on each of ``devices`` (rank r's on the r-th)."""
    if layout.num_layers % head_split:
        raise ValueError(f"{layout.num_layers} transfer layers do not split into views of {head_split}")
    ranks = parse_devices(devices)
    heads = layout.num_kv_heads
    shape = (2, num_blocks, layout.block_size, heads * head_split, layout.head_dim)
    caches: list[torch.Tensor] = []
    for index in range(layout.num_layers // head_split):
        wide = make(shape, ranks[index % len(ranks)])
        caches.extend(wide.narrow(3, group * heads, heads) for group in range(head_split))
    return caches


def sentinel_caches(layout: KVLayoutInfo, num_blocks: int, devices: str | torch.device,
                    head_split: int = 1) -> list[torch.Tensor]:
    return split_caches(layout, num_blocks, devices, head_split,
                        lambda shape, device: torch.full(shape, SENTINEL, dtype=layout.torch_dtype, device=device))
