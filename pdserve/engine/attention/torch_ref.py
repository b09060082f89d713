"""The reference attention backend: plain torch, one sequence at a time. Correct on any device.

It gathers each sequence's keys and values from its blocks and calls ``scaled_dot_product_attention``
with an explicit mask. Slow for large batches (a host loop over sequences) but simple enough to trust;
every faster backend is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.attention.backend import AttentionBackend
from pdserve.engine.attention.metadata import AttentionMetadata


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, *,
               scale: float, sliding_window: int | None) -> torch.Tensor:
        out = torch.empty_like(query)
        block_size = kv_cache.shape[2]
        num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
        starts = metadata.query_start_loc_cpu
        for i in range(metadata.num_seqs):
            q_start, q_end = starts[i], starts[i + 1]
            seq_len = metadata.seq_lens_cpu[i]
            num_new = q_end - q_start
            num_blocks = -(-seq_len // block_size)
            blocks = metadata.block_tables[i, :num_blocks].long()
            keys = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
            values = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
            q_pos = torch.arange(seq_len - num_new, seq_len, device=query.device)[:, None]
            k_pos = torch.arange(seq_len, device=query.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= (q_pos - k_pos) < sliding_window
            q = query[q_start:q_end].transpose(0, 1)  # [heads, new, dim]
            o = F.scaled_dot_product_attention(
                q, keys.transpose(0, 1).to(q.dtype), values.transpose(0, 1).to(q.dtype),
                attn_mask=mask, scale=scale, enable_gqa=q.shape[0] != num_kv_heads,
            )
            out[q_start:q_end] = o.transpose(0, 1)
        return out
