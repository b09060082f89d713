"""Context-free prefill chunks through ``torch.nn.functional.scaled_dot_product_attention``.

A prefill chunk with no earlier context (a fresh prompt, or its first chunk) needs only the keys and
values the step has just computed: no paged cache to read. For such chunks PyTorch's fused attention
(on an H200 it reached 594 TFLOP/s at 8k tokens, against 288 for our Triton prefill kernel and about
the same for its bundled FlashAttention-2 varlen kernel) is the faster way, one causal call per chunk.
The Triton backend uses it in eager steps (larger than every CUDA graph) that hold at most
``MAX_DENSE_CHUNKS`` such chunks and no sliding window; CUDA graphs keep the Triton kernel, whose
launch does not depend on the batch.

Contract of :func:`dense_prefill`: ``query`` ``[T, H, D]``, ``key``/``value`` ``[T, H_kv, D]`` (rotated
keys, rows may be strided), ``bounds`` the chunks' row ranges ``[(start, end), ...]`` within them;
writes each chunk's causal attention into ``out`` ``[T, H, D]`` at the same rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_DENSE_CHUNKS = 8


def dense_prefill_supported(device: torch.device, dtype: torch.dtype, sliding_window: int | None) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and sliding_window is None


def dense_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[tuple[int, int]],
                  out: torch.Tensor, *, scale: float) -> None:
    gqa = query.shape[1] != key.shape[1]
    for start, end in bounds:
        q = query[start:end].transpose(0, 1).unsqueeze(0)
        k = key[start:end].transpose(0, 1).unsqueeze(0)
        v = value[start:end].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        out[start:end] = o.squeeze(0).transpose(0, 1)
