"""``x @ weight.T`` for a few rows (decode steps of up to ``MAX_ROWS`` sequences, a prompt's last hidden state).

At a few rows a linear layer only streams its weight, so its time is the weight's bytes over the memory
bandwidth. cuBLAS serves such shapes with split-K kernels plus a second kernel that reduces the partial
sums (65 of them in a Llama-3.1-8B decode step, ~2 us each) and, on the narrower shapes of a
tensor-parallel rank, reads the weight at 0.6-0.7 of what the widest shapes reach. Here each program owns
``BLOCK_N`` output columns and streams their weight rows over the whole K in ``BLOCK_K`` slices: one
launch, no partial sums in memory.

* One row: a GEMV that keeps the float32 products per lane and reduces once at the end.
* Two to ``MAX_ROWS`` rows: the rows padded to a 16-row tile, each slice a tensor-core product accumulated
  in float32 (IEEE products for float32 inputs, as cuBLAS computes them by default).

``gated=True`` takes the fused ``gate_up`` projection's output ``[rows, 2 * K]`` as input and computes
``silu(gate) * up`` while it reads it, with the rounding of :func:`~pdserve.engine.kernels.activation.silu_and_mul`
(silu rounded to the dtype, the product rounded again), so ``down_proj`` needs no activation kernel.

Tilings come from sweeps on an H200 (``python -m benchmarks.gemv``, rotating weights so none sits in L2;
``benchmarks/results/gemv-*.md``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: rows up to which :func:`skinny_linear` applies (one 16-row tile)
MAX_ROWS = 16


@triton.jit
def _gated_input(x_ptr, offsets, mask, K):
    """``silu(gate) * up`` at ``offsets`` of a ``[rows, 2K]`` gate_up output, rounded as ``silu_and_mul``."""
    gate = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + offsets + K, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    return (silu.to(tl.float32) * up.to(tl.float32)).to(up.dtype)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_wn, GATED: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if GATED:
            x = _gated_input(x_ptr, ks, k_mask, K)
        else:
            x = tl.load(x_ptr + ks, mask=k_mask, other=0.0)
        acc += x.to(tl.float32)[None, :] * w.to(tl.float32)
    tl.store(out_ptr + cols, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _skinny_dot_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, GATED: tl.constexpr,
                       IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    col_mask = cols < N
    row_mask = rows < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        x_offsets = rows[:, None] * stride_xm + ks[None, :]
        x_mask = row_mask[:, None] & k_mask[None, :]
        if GATED:
            x = _gated_input(x_ptr, x_offsets, x_mask, K)
        else:
            x = tl.load(x_ptr + x_offsets, mask=x_mask, other=0.0)
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def skinny_config(rows: int, n: int, k: int, gated: bool) -> tuple[int, ...]:
    """The tiling for ``rows`` rows and a ``[n, k]`` weight: ``(BLOCK_N, BLOCK_K, num_warps)`` for one row,
    ``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` for more. One row, from a sweep of 32 tilings over
    Llama-3.1-8B's projections and a TP=2 rank's on an H200: 4 columns and 2,048-wide K slices came within 5%
    of each plain product's best tiling; the gated ones, whose activation costs per K element, were fastest
    with 8 columns and 512-wide slices (the plain tiling lost 4-16% there)."""
    if rows == 1:
        return (8, 512, 4) if gated else (4, 2048, 4)
    return (16, 256, 4, 4)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, gated: bool = False,
                  config: tuple[int, ...] | None = None) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` ``[rows <= MAX_ROWS, K]`` (``[rows, 2 * K]`` when ``gated``: see module) and a
    contiguous ``weight`` ``[N, K]``; float32 accumulation, output ``[rows, N]`` in ``x``'s dtype. ``config``
    overrides :func:`skinny_config` (``benchmarks.gemv`` sweeps it)."""
    rows = x.shape[0]
    n, k = weight.shape
    assert 0 < rows <= MAX_ROWS and x.shape[1] == (2 * k if gated else k), (tuple(x.shape), tuple(weight.shape))
    assert x.stride(1) == 1 and weight.is_contiguous()
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    tiling = config or skinny_config(rows, n, k, gated)
    if rows == 1:
        block_n, block_k, warps = tiling[:3]
        _skinny_kernel[(triton.cdiv(n, block_n),)](x, weight, out, n, k, weight.stride(0), GATED=gated,
                                                   BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
        return out
    block_n, block_k, warps, stages = tiling
    _skinny_dot_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, rows, n, k, x.stride(0), weight.stride(0), out.stride(0), GATED=gated,
        IEEE=x.dtype == torch.float32, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages)
    return out
