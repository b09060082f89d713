"""``x @ weight.T`` for one row (a decode step of one sequence, a prompt's last hidden state): a GEMV in one launch.

At one row a linear layer only streams its weight, so its time is the weight's bytes over the memory
bandwidth. cuBLAS serves such shapes with split-K kernels plus a second kernel that reduces the partial
sums (65 of them in a Llama-3.1-8B decode step, ~2 us each) and reads the narrower weights (``o_proj``, a
tensor-parallel rank's products) at about half the rate of the widest (the LM head). Here each program owns
``BLOCK_N`` output columns, streams their weight rows over the whole K in ``BLOCK_K`` slices with the
float32 products kept per lane, and reduces once at the end: one launch, no partial sums in memory.
Measured on one H200 (``python -m benchmarks.gemv``, rotating weights so none sits in L2): 1.06-1.37x faster
than cuBLAS (plus the activation kernel, for ``down_proj``) on every product of Llama-3.1-8B and of one of
its TP=2 ranks (``benchmarks/results/gemv-h200.md``).

``gated=True`` takes the fused ``gate_up`` projection's output ``[1, 2 * K]`` as input and computes
``silu(gate) * up`` while it reads it, with the rounding of :func:`~pdserve.engine.kernels.activation.silu_and_mul`
(silu rounded to the dtype, the product rounded again), so ``down_proj`` needs no activation kernel.

At more than one row cuBLAS stays ahead: a 16-row tensor-core tile ran 0.75-0.98x of it at eight rows
(0.16-0.20x gated: each program computes every row's activation; ``benchmarks/results/runs/gemv-rows8-*``),
so :func:`skinny_linear` takes one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.engine.kernels.activation import silu_mul


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
            x = silu_mul(x_ptr, ks, k_mask, K)
        else:
            x = tl.load(x_ptr + ks, mask=k_mask, other=0.0)
        acc += x.to(tl.float32)[None, :] * w.to(tl.float32)
    tl.store(out_ptr + cols, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=col_mask)


def skinny_config(n: int, k: int, gated: bool) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps)`` for a ``[n, k]`` weight. From a sweep of 32 tilings over Llama-3.1-8B's
    projections and a TP=2 rank's on an H200 (``benchmarks.gemv``): 4 columns and 2,048-wide K slices came
    within 5% of each plain product's best tiling; the gated ones, whose activation costs per K element,
    were fastest with 8 columns and 512-wide slices (the plain tiling lost 4-16% there)."""
    return (8, 512, 4) if gated else (4, 2048, 4)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, gated: bool = False,
                  config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` ``[1, K]`` (``[1, 2 * K]`` when ``gated``: see module) and a contiguous
    ``weight`` ``[N, K]``; float32 accumulation, output ``[1, N]`` in ``x``'s dtype. ``config`` overrides
    :func:`skinny_config` (``benchmarks.gemv`` sweeps it)."""
    n, k = weight.shape
    assert x.shape == (1, 2 * k if gated else k) and x.is_contiguous() and weight.is_contiguous(), \
        (tuple(x.shape), tuple(weight.shape), gated)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config or skinny_config(n, k, gated)
    _skinny_kernel[(triton.cdiv(n, block_n),)](x, weight, out, n, k, weight.stride(0), GATED=gated,
                                               BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out
