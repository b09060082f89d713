"""Fused residual-add + RMSNorm in one pass over each row.

Numerics follow the reference (``layers.RMSNorm``): the residual sum is rounded to the activation dtype
(as the reference's separate add does), the statistics are float32, and the normalised row is rounded
to the activation dtype before the weight multiplies it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, n_cols, eps,
                    stride_x, stride_r, stride_o, stride_ro,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def norm_warps(hidden: int) -> int:
    """Warps per row of ``hidden`` elements (also used by the fused all-reduce + norm kernel, so that
    the same layout sums a row in the same order)."""
    return min(16, max(1, triton.next_power_of_2(hidden) // 256))


def fused_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``rmsnorm(x)``, or with ``residual``: ``(rmsnorm(x + residual), x + residual)``. 2-D inputs."""
    rows, cols = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(cols)
    warps = norm_warps(cols)
    if residual is None:
        _rmsnorm_kernel[(rows,)](x, x, weight, out, out, cols, eps, x.stride(0), 0, out.stride(0), 0,
                                 HAS_RESIDUAL=False, BLOCK=block, num_warps=warps)
        return out
    summed = torch.empty_like(x)
    _rmsnorm_kernel[(rows,)](x, residual, weight, out, summed, cols, eps, x.stride(0), residual.stride(0),
                             out.stride(0), summed.stride(0), HAS_RESIDUAL=True, BLOCK=block, num_warps=warps)
    return out, summed
