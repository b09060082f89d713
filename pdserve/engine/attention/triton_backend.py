"""The GPU attention backend: Triton kernels that run on the GPU hosts' stack (torch 2.11, Triton 3.6).

Per layer and step: one fused kernel applies RoPE to q and k and writes k, v into the paged cache;
then the decode sequences (the first ``num_decode_seqs`` of the batch) go through the split-KV paged
decode kernel and the rest through the paged varlen prefill kernel. Every launch depends only on
device tensors and on launch constants fixed per batch shape, so decode steps can be captured in
CUDA graphs.
"""

from __future__ import annotations

import torch

from pdserve.engine.attention.backend import AttentionBackend
from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.kernels.paged_decode import paged_decode_attention
from pdserve.engine.kernels.paged_prefill import paged_prefill_attention
from pdserve.engine.kernels.rope_cache import rope_and_write_cache
from pdserve.engine.model.layers import RotaryEmbedding


class TritonBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True
    fused_layers = True

    def rope_write_attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          positions: torch.Tensor, rotary: RotaryEmbedding, kv_cache: torch.Tensor,
                          metadata: AttentionMetadata, *, scale: float, sliding_window: int | None) -> torch.Tensor:
        assert rotary.cos is not None and rotary.sin is not None
        rope_and_write_cache(query, key, value, positions, rotary.cos, rotary.sin, kv_cache,
                             metadata.slot_mapping)
        return self.attend(query, kv_cache, metadata, scale=scale, sliding_window=sliding_window)

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, *,
               scale: float, sliding_window: int | None) -> torch.Tensor:
        out = torch.empty_like(query)
        num_decode = metadata.num_decode_seqs
        if num_decode:
            paged_decode_attention(query[:num_decode], kv_cache, metadata.block_tables[:num_decode],
                                   metadata.seq_lens[:num_decode], scale=scale, sliding_window=sliding_window,
                                   num_splits=metadata.decode_num_splits, out=out[:num_decode])
        if num_decode < metadata.num_seqs:
            paged_prefill_attention(query, kv_cache, metadata.block_tables, metadata.seq_lens,
                                    metadata.query_start_loc, max_query_len=metadata.max_query_len,
                                    num_seqs=metadata.num_seqs - num_decode, seq_offset=num_decode,
                                    scale=scale, sliding_window=sliding_window, out=out)
        return out
