"""Small layers the decoder is built from: linear layers, RMSNorm with fused residual add, rotary embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.common import switches
from pdserve.engine.model.hf_config import RopeSpec

#: ``PDSERVE_SINGLE_ROW_GEMV=0`` sends single rows to cuBLAS too (an A/B switch for benchmarks)
SINGLE_ROW_GEMV = switches.SINGLE_ROW_GEMV.flag()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fused: bool,
           gated: bool = False) -> torch.Tensor:
    """``x @ weight.T (+ bias)``; ``gated``: ``x`` is a fused ``gate_up`` output ``[rows, 2 * K]`` and the
    product takes ``silu(gate) * up``. With ``fused`` (the GPU path) a single contiguous row goes through the
    one-launch GEMV (:mod:`~pdserve.engine.kernels.skinny_gemm`, the activation computed as it reads), more
    rows through the Triton activation and cuBLAS; without, torch's ops."""
    if fused and SINGLE_ROW_GEMV and x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous() and weight.is_contiguous():
        from pdserve.engine.kernels.skinny_gemm import skinny_linear

        out = skinny_linear(x, weight, gated)
        return out if bias is None else out + bias
    if gated:
        if fused:
            x = silu_and_mul(x)
        else:
            gate, up = x.split(x.shape[-1] // 2, dim=-1)
            x = F.silu(gate) * up
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear` (``fused`` set by ``DecoderForCausalLM.use_fused_kernels``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.fused = False

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.fused, gated)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as the reference implementation does.

    ``forward(x)`` returns the normalised ``x``. ``forward(x, residual)`` first adds ``residual`` to
    ``x`` and returns ``(normalised sum, sum)``: the sum is the next residual stream.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = False  # one Triton kernel instead of the torch ops (see DecoderForCausalLM)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.fused:
            from pdserve.engine.kernels.rmsnorm import fused_rmsnorm

            shape = x.shape
            flat = x.reshape(-1, shape[-1])
            if residual is None:
                return fused_rmsnorm(flat, self.weight, self.eps).view(shape)  # type: ignore[union-attr]
            out, summed = fused_rmsnorm(flat, self.weight, self.eps, residual.reshape(-1, shape[-1]))
            return out.view(shape), summed.view(shape)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


def rope_inverse_frequencies(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Per-pair inverse frequencies (float32, length ``head_dim // 2``) for the given RoPE type."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (spec.theta**exponents)
    if spec.rope_type == "linear":
        return inv_freq / spec.factor
    if spec.rope_type == "llama3":
        original = spec.original_max_position_embeddings or 8192
        low_wavelen = original / spec.low_freq_factor
        high_wavelen = original / spec.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / spec.factor, inv_freq)
        smooth = (original / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding:
    """Neox-style rotary embedding with a precomputed cos/sin table indexed by absolute position.

    Not an ``nn.Module``: the table is derived state, rebuilt by :meth:`build` on the model's device
    (so the model can be created on the meta device and materialised later).
    """

    def __init__(self, spec: RopeSpec, head_dim: int) -> None:
        self.spec = spec
        self.head_dim = head_dim
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def build(self, max_positions: int, device: torch.device) -> None:
        """Float32 tables ``[max_positions, head_dim // 2]`` (fused kernels read them as they are)."""
        inv_freq = rope_inverse_frequencies(self.spec, self.head_dim).to(device)
        positions = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        self.cos = freqs.cos()
        self.sin = freqs.sin()

    def __call__(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``query`` ``[T, Hq, D]`` and ``key`` ``[T, Hkv, D]`` by their rows' positions, in the
        activations' dtype (the tables are cast first, as the reference implementation does)."""
        assert self.cos is not None and self.sin is not None, "RotaryEmbedding.build() was not called"
        cos = self.cos[positions].unsqueeze(1).to(query.dtype)
        sin = self.sin[positions].unsqueeze(1).to(query.dtype)
        return _rotate(query, cos, sin), _rotate(key, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The fused Triton ``silu(gate) * up`` (imported lazily: Triton is a GPU-path dependency)."""
    from pdserve.engine.kernels.activation import silu_and_mul as kernel

    return kernel(gate_up)
