"""Optional backend over vllm-flash-attn's varlen kernel with a paged KV cache.

vllm-flash-attn 2.6.2 (its only release) is built against torch 2.4 and fails to import on newer
torch (an undefined symbol), so this backend is chosen only when the import succeeds. It uses the same
cache layout (``[num_blocks, block_size, num_kv_heads, head_dim]`` per K and V) and writes new KV with
the reference write. It has not been exercised on our GPU hosts, where the import fails.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.attention.torch_ref import TorchReferenceBackend

logger = logging.getLogger(__name__)


class FlashAttnBackend(TorchReferenceBackend):
    name = "flash_attn"

    def __init__(self, varlen_func: Any) -> None:
        self._varlen = varlen_func

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, *,
               scale: float, sliding_window: int | None) -> torch.Tensor:
        window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        return self._varlen(
            q=query, k=kv_cache[0], v=kv_cache[1], cu_seqlens_q=metadata.query_start_loc,
            max_seqlen_q=metadata.max_query_len, seqused_k=metadata.seq_lens, max_seqlen_k=metadata.max_seq_len,
            softmax_scale=scale, causal=True, block_table=metadata.block_tables, window_size=window,
        )


def flash_attn_backend_or_none() -> FlashAttnBackend | None:
    try:
        from vllm_flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or OSError/undefined symbols from a mismatched build
        logger.debug("vllm-flash-attn unavailable: %s", exc)
        return None
    return FlashAttnBackend(flash_attn_varlen_func)
