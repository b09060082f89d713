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

Shapes are bucketed. The fused attention PyTorch picks on Hopper (cuDNN) builds an execution plan the
first time it sees a shape: 40-250 ms on an H200, measured (``benchmarks/sdpa_probe.py``), which stalls
every stream of the worker whenever a prompt of a new length arrives. So each chunk runs at the length
:func:`dense_length` (at most 1/8 longer: zero rows after the real ones, which causal attention never
lets a real row see), copied into a fresh contiguous buffer so the plan's strides are always the same,
and :func:`prebuild_dense_plans` builds every plan a worker can need at start-up.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

MAX_DENSE_CHUNKS = 8
#: The smallest step between bucketed lengths; above it, an eighth of the length (a power of two).
MIN_DENSE_BUCKET = 64


def dense_prefill_supported(device: torch.device, dtype: torch.dtype, sliding_window: int | None) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and sliding_window is None


def dense_length(n: int) -> int:
    """The bucketed length a chunk of ``n`` tokens runs at: ``n`` rounded up to a multiple of
    ``max(64, 2**(floor(log2(n)) - 3))``; at most ``n + n / 8`` above 512 tokens."""
    step = max(MIN_DENSE_BUCKET, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def dense_lengths(max_tokens: int) -> list[int]:
    """Every bucketed length of a chunk of at most ``max_tokens`` tokens."""
    lengths, n = [], 1
    while n <= max_tokens:
        length = dense_length(n)
        lengths.append(length)
        n = length + 1
    return lengths


def _padded(x: torch.Tensor, start: int, end: int, length: int) -> torch.Tensor:
    """Rows ``[start, end)`` of ``x`` in a new contiguous ``[1, heads, length, dim]`` view, zero-padded."""
    buffer = x.new_empty((length, *x.shape[1:]))
    buffer[: end - start] = x[start:end]
    buffer[end - start :].zero_()
    return buffer.transpose(0, 1).unsqueeze(0)


def dense_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[tuple[int, int]],
                  out: torch.Tensor, *, scale: float) -> None:
    gqa = query.shape[1] != key.shape[1]
    for start, end in bounds:
        length = dense_length(end - start)
        q, k, v = (_padded(x, start, end, length) for x in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        out[start:end] = o.squeeze(0).transpose(0, 1)[: end - start]


def prebuild_dense_plans(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device, max_tokens: int, scale: float) -> float:
    """Run the fused attention once at every bucketed length up to ``max_tokens`` (so no request waits
    for a plan to be built); returns the seconds it took."""
    started = time.perf_counter()
    with torch.inference_mode():
        for length in dense_lengths(max_tokens):
            q = torch.zeros((length, num_heads, head_dim), dtype=dtype, device=device)
            kv = torch.zeros((length, num_kv_heads, head_dim), dtype=dtype, device=device)
            out = torch.empty_like(q)
            dense_prefill(q, kv, kv, [(0, length)], out, scale=scale)
        torch.cuda.synchronize(device)
    return time.perf_counter() - started
