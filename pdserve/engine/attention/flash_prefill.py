"""Context-free prefill attention through PyTorch's bundled FlashAttention-2 (``aten::_flash_attention_forward``).

A prefill chunk with no earlier context (a fresh prompt, or its first chunk) needs only its own keys
and values, which the step has just computed: no paged cache to read. For such chunks PyTorch's varlen
FlashAttention kernel is faster than our Triton prefill kernel (531 against 280 TFLOP/s at 8k tokens
on an H200), so the Triton backend hands them to it in eager steps (large prefills). CUDA graphs keep
the Triton kernel, whose launch does not depend on the batch.

Contract of :func:`flash_prefill`: ``query`` ``[T, H, D]``, ``key``/``value`` ``[T, H_kv, D]`` (rotated
keys; rows may be strided, the last dimension contiguous), ``cu_seqlens`` int32 ``[N + 1]`` starting
at 0; causal within each sequence, an optional sliding window. Returns ``[T, H, D]``.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _window_supported() -> bool:
    schema = torch.ops.aten._flash_attention_forward.default._schema
    return any(arg.name == "window_size_left" for arg in schema.arguments)


def flash_prefill_supported(device: torch.device, dtype: torch.dtype, head_dim: int, sliding_window: int | None) -> bool:
    """Whether this build and device run the kernel for these inputs (fp16/bf16, head dim <= 256)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or head_dim % 8 or head_dim > 256:
        return False
    if sliding_window is not None and not _window_supported():
        return False
    try:
        return bool(torch.backends.cuda.is_flash_attention_available()) and \
            torch.cuda.get_device_capability(device) >= (8, 0)
    except (AttributeError, RuntimeError):
        return False


def flash_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int, *, scale: float, sliding_window: int | None) -> torch.Tensor:
    kwargs: dict = {"scale": scale}
    if sliding_window is not None:
        kwargs.update(window_size_left=sliding_window - 1, window_size_right=0)
    out = torch.ops.aten._flash_attention_forward(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                  0.0, True, False, **kwargs)
    return out[0]
