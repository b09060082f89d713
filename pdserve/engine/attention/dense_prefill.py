"""Context-free prefill chunks through ``torch.nn.functional.scaled_dot_product_attention``.

A prefill chunk with no earlier context (a fresh prompt, or its first chunk) needs only the keys and
values the step has just computed: no paged cache to read. For such chunks PyTorch's fused attention
(on an H200 it reached 594 TFLOP/s at 8k tokens, against 288 for our Triton prefill kernel and about
the same for its bundled FlashAttention-2 varlen kernel) is the faster way, one causal call per chunk.
The Triton backend uses it in eager steps (larger than every CUDA graph) without a sliding window
whose context-free chunks are few and long (:func:`takes_dense_prefill`); CUDA graphs keep the Triton
kernel, whose launch does not depend on the batch. Few and long, because each chunk costs the host
about 20 tensor operations per layer (~5 ms per step for Llama-3.1-8B's 32 layers, measured on an H200),
while the fused attention saves the GPU only ~``n**2 * 0.5`` ns per chunk of ``n`` tokens over the
Triton kernel: a step of many short prompts (a prefill worker under a burst of chat prompts) became
host-bound, 43-60 ms to launch 5-8 prompts of ~1.2k tokens in all, where the GPU needs ~30 ms.

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
#: The fewest tokens per chunk, on average over a step's chunks, for which the fused attention is used.
DENSE_MIN_MEAN_TOKENS = 1024
#: The smallest step between bucketed lengths; above it, an eighth of the length (a power of two).
MIN_DENSE_BUCKET = 64


def dense_prefill_supported(device: torch.device, dtype: torch.dtype, sliding_window: int | None) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and sliding_window is None


def takes_dense_prefill(num_chunks: int, num_tokens: int) -> bool:
    """Whether a step's ``num_chunks`` context-free prefill chunks of ``num_tokens`` tokens in all go
    through the fused attention (see the module): at most ``MAX_DENSE_CHUNKS`` of them, of at least
    ``DENSE_MIN_MEAN_TOKENS`` tokens on average."""
    return 0 < num_chunks <= MAX_DENSE_CHUNKS and num_tokens >= DENSE_MIN_MEAN_TOKENS * num_chunks


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
