"""``silu(gate) * up`` over the fused ``gate_up`` projection output, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def silu_mul(gate_ptr, cols, mask, n_cols):
    """``silu(gate) * up`` at ``cols`` of one ``[gate | up]`` row of width ``2 * n_cols`` starting at ``gate_ptr``,
    rounded as torch rounds ``F.silu(gate) * up``: silu to the dtype, then the product (shared with the
    one-row GEMV, which computes it as it reads ``down_proj``'s input)."""
    gate = tl.load(gate_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + n_cols + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    return (silu.to(tl.float32) * up.to(tl.float32)).to(up.dtype)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    tl.store(out_ptr + row * stride_o + cols, silu_mul(x_ptr + row * stride_x, cols, mask, n_cols), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up`` ``[rows, 2 * n]`` -> ``silu(gate_up[:, :n]) * gate_up[:, n:]`` ``[rows, n]``."""
    rows, width = gate_up.shape
    n = width // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), out.stride(0),
                                                   BLOCK=block, num_warps=4)
    return out
