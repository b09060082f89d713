"""The GPU attention backend: Triton kernels that run on the GPU hosts' stack (torch 2.11, Triton 3.6).

Per layer and step: one fused kernel applies RoPE to q and k and writes k, v into the paged cache;
then the decode sequences (the first ``num_decode_seqs`` of the batch) go through the split-KV paged
decode kernel and the prefill chunks' query tiles through the persistent paged varlen prefill kernel.
Every launch depends only on device tensors and on the step's :class:`LaunchShape`, so any step --
decode, prefill or mixed -- can be captured in a CUDA graph and replayed for every batch of its shape.

In eager steps (larger than every graph) whose few, long prefill chunks all start at position 0, the
prefill rows go to PyTorch's fused attention instead (``dense_prefill``), which is faster on long prompts.
"""

from __future__ import annotations

import torch

from pdserve.engine.attention.backend import AttentionBackend
from pdserve.engine.attention.dense_prefill import (
    dense_prefill,
    dense_prefill_supported,
    prebuild_dense_plans,
    takes_dense_prefill,
)
from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.kernels.paged_decode import paged_decode_attention
from pdserve.engine.kernels.paged_prefill import paged_prefill_attention, query_tile_rows
from pdserve.engine.kernels.rope_cache import rope_and_write_cache
from pdserve.engine.model.layers import RotaryEmbedding


class TritonBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True
    fused_layers = True

    def __init__(self, use_dense_prefill: bool = True) -> None:
        self.use_dense_prefill = use_dense_prefill

    def prepare(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                max_tokens: int, sliding_window: int | None) -> float:
        """The fused attention's plan for every bucketed chunk length (see ``dense_prefill``)."""
        if not (self.use_dense_prefill and dense_prefill_supported(device, dtype, sliding_window)):
            return 0.0
        return prebuild_dense_plans(num_heads, num_kv_heads, head_dim, dtype, device, max_tokens,
                                    scale=head_dim**-0.5)

    def query_tile_rows(self, head_dim: int, dtype: torch.dtype) -> int | None:
        return query_tile_rows(head_dim, dtype)

    def rope_write_attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          positions: torch.Tensor, rotary: RotaryEmbedding, kv_cache: torch.Tensor,
                          metadata: AttentionMetadata, *, scale: float, sliding_window: int | None) -> torch.Tensor:
        assert rotary.cos is not None and rotary.sin is not None
        dense = self._takes_dense_prefill(query, metadata, sliding_window)
        rope_and_write_cache(query, key, value, positions, rotary.cos, rotary.sin, kv_cache,
                             metadata.slot_mapping, store_key=dense)
        if not dense:
            return self.attend(query, kv_cache, metadata, scale=scale, sliding_window=sliding_window)
        out = torch.empty_like(query)
        self._decode(query, kv_cache, metadata, scale, sliding_window, out)
        starts = metadata.query_start_loc_cpu
        bounds = [(starts[i], starts[i + 1]) for i in range(metadata.num_decode_seqs, metadata.num_seqs)]
        dense_prefill(query, key, value, bounds, out, scale=scale)
        return out

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, *,
               scale: float, sliding_window: int | None) -> torch.Tensor:
        launch, counts = metadata.launch, metadata.counts
        assert launch is not None and counts is not None, "the Triton backend needs StepInputs' launch data"
        out = torch.empty_like(query)
        self._decode(query, kv_cache, metadata, scale, sliding_window, out)
        if launch.prefill_programs:
            paged_prefill_attention(query, kv_cache, metadata.block_tables, metadata.seq_lens,
                                    metadata.query_start_loc, scale=scale, sliding_window=sliding_window,
                                    tiles=metadata.query_tiles, num_tiles=counts[1:2],
                                    num_programs=launch.prefill_programs,
                                    num_splits=counts[3:4],  # 1 unless this launch splits
                                    may_split=launch.kv_split and not launch.batch_specific, out=out,
                                    wide_keys=launch.batch_specific)
        return out

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                sliding_window: int | None, out: torch.Tensor) -> None:
        launch, counts = metadata.launch, metadata.counts
        assert launch is not None and counts is not None
        cap = launch.decode_capacity
        if cap:
            paged_decode_attention(query[:cap], kv_cache, metadata.block_tables[:cap], metadata.seq_lens[:cap],
                                   scale=scale, sliding_window=sliding_window, num_splits=counts[2:3],
                                   may_split=launch.kv_split, num_programs=launch.decode_programs,
                                   num_active=counts[0:1], out=out[:cap], items=self._items(metadata))

    @staticmethod
    def _items(metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor] | None:
        starts, seq = metadata.decode_item_starts, metadata.decode_item_seq
        return None if starts is None or seq is None else (starts, seq)

    def _takes_dense_prefill(self, query: torch.Tensor, metadata: AttentionMetadata,
                             sliding_window: int | None) -> bool:
        launch = metadata.launch
        if not (self.use_dense_prefill and metadata.context_free_prefill and launch is not None
                and launch.batch_specific and dense_prefill_supported(query.device, query.dtype, sliding_window)):
            return False
        starts = metadata.query_start_loc_cpu
        return takes_dense_prefill(metadata.num_seqs - metadata.num_decode_seqs,
                                   starts[metadata.num_seqs] - starts[metadata.num_decode_seqs])
