"""Random problems and torch references for the Triton kernels (shared by the CPU-interpreter and GPU tests).

Every case draws fresh random data (never zeros), scatters each sequence over a random permutation of
physical blocks, poisons the outputs before the kernel runs, and compares against the torch reference
computed in float64 from the same inputs: ``|out - ref| / |ref|``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.attention.torch_ref import TorchReferenceBackend


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in kernel output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def paged_problem(context_lens: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int,
                  head_dim: int, block_size: int, dtype: torch.dtype, device: str, seed: int):
    """A packed batch: sequence i has ``context_lens[i]`` earlier tokens plus ``query_lens[i]`` new ones,
    all of whose K/V are already in a randomly paged cache. Returns (query, kv_cache, metadata)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    blocks_needed = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 stays the null block
    tables, start = [], 0
    for n in blocks_needed:
        tables.append(perm[start:start + n].tolist())
        start += n
    width = max(blocks_needed)
    block_tables = torch.zeros((len(seq_lens), width), dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    kv_cache = torch.randn((2, num_blocks, block_size, num_kv_heads, head_dim), generator=gen).to(dtype)
    total = sum(query_lens)
    query = torch.randn((total, num_heads, head_dim), generator=gen).to(dtype)
    qsl = [0]
    slots = []
    for i, (c, q) in enumerate(zip(context_lens, query_lens)):
        qsl.append(qsl[-1] + q)
        for p in range(c, c + q):
            slots.append(tables[i][p // block_size] * block_size + p % block_size)
    to = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    meta = AttentionMetadata(
        num_tokens=total, num_seqs=len(seq_lens), max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        block_size=block_size, query_start_loc=to(qsl, torch.int32), seq_lens=to(seq_lens, torch.int32),
        context_lens=to(context_lens, torch.int32), block_tables=block_tables.to(device),
        slot_mapping=to(slots, torch.int64), query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens,
    )
    return query.to(device), kv_cache.to(device), meta


def reference_attention(query, kv_cache, meta, scale, window) -> torch.Tensor:
    """The torch reference backend in float64 on the CPU."""
    meta64 = AttentionMetadata(**{**meta.__dict__, "block_tables": meta.block_tables.cpu(),
                                  "query_start_loc": meta.query_start_loc.cpu(), "seq_lens": meta.seq_lens.cpu(),
                                  "context_lens": meta.context_lens.cpu(), "slot_mapping": meta.slot_mapping.cpu()})
    return TorchReferenceBackend().attend(query.cpu().double(), kv_cache.cpu().double(), meta64, scale=scale,
                                          sliding_window=window)


def reference_rmsnorm(x, weight, eps, residual=None):
    """Same rounding points as layers.RMSNorm (the sum is rounded to x's dtype)."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.double()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = weight.double() * normed.double()
    return out if residual is None else (out, x)


def reference_silu_mul(gate_up):
    n = gate_up.shape[1] // 2
    g, u = gate_up[:, :n].double(), gate_up[:, n:].double()
    return F.silu(g) * u


def split_items(split_counts: np.ndarray, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode kernels' item table of ``split_counts`` (splits per sequence) as int32 tensors on ``device``
    (see ``paged_decode.fill_split_items``)."""
    from pdserve.engine.kernels.paged_decode import fill_split_items

    starts = np.zeros(len(split_counts) + 1, dtype=np.int32)
    seq = np.zeros(max(1, int(split_counts.sum())), dtype=np.int32)
    fill_split_items(split_counts, starts, seq)
    return torch.from_numpy(starts).to(device), torch.from_numpy(seq).to(device)
