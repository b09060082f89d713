"""Paged decode attention: one query token per sequence over its whole paged KV context.

Grid ``(capacity, num_kv_heads, num_splits)``; only sequences ``< num_active`` (an int32 device scalar)
are computed, the rest of the grid exits at once, so one launch captured in a CUDA graph serves any
decode count up to its capacity. A program handles every query head of one GQA group
(so each K/V tile is read once per group, not once per query head) over one contiguous slice of the
sequence's tokens; ``num_splits > 1`` splits long contexts along the KV so that a few sequences still
fill the GPU (flash-decoding), and a second kernel merges the slices by their log-sum-exp.

The split count is a launch parameter, not derived from the data, so a launch can be captured in a
CUDA graph and replayed for any sequence lengths: slices past a sequence's end are empty and exit.

Contract: ``query`` ``[num_seqs, num_heads, head_dim]``; ``kv_cache`` ``[2, num_blocks, block_size,
num_kv_heads, head_dim]``; ``block_tables`` ``[num_seqs, >= ceil(seq_len/block_size)]`` int32;
``seq_lens`` ``[num_seqs]`` int32 (>= 1). Query row ``i`` sits at position ``seq_lens[i] - 1`` and
attends to positions ``[max(0, seq_len - window), seq_len)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, num_active_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, window,
    stride_qs, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_bt,
    stride_os, stride_oh,
    stride_ps, stride_ph, stride_pk, stride_ls, stride_lh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    if seq >= tl.load(num_active_ptr):
        return
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    head_mask = g < GROUP
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=head_mask[:, None],
                other=0.0)

    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    first_tile = 0
    if window > 0:
        first_tile = tl.maximum(seq_len - window, 0) // BLOCK_N
    tiles_per_split = tl.cdiv(num_tiles - first_tile, NUM_SPLITS)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for tile in range(tile_lo, tile_hi):
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = n < seq_len
        if window > 0:
            valid = valid & (n >= seq_len - window)
        block = tl.load(table + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offsets = block * stride_cb + (n % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        k = tl.load(k_cache_ptr + offsets[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offsets[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    result = acc / safe_l[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        base = seq * stride_ps + heads * stride_ph + split * stride_pk
        tl.store(part_out_ptr + base[:, None] + d[None, :], result, mask=head_mask[:, None])
        tl.store(part_lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=head_mask)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_active_ptr,
    stride_ps, stride_ph, stride_pk, stride_ls, stride_lh, stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    if seq >= tl.load(num_active_ptr):
        return
    head = tl.program_id(1)
    k = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + seq * stride_ls + head * stride_lh + k)
    m = tl.max(lse, 0)
    w = tl.exp2(lse - m)
    parts = tl.load(part_out_ptr + seq * stride_ps + head * stride_ph + k[:, None] * stride_pk + d[None, :])
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      block_n: int = 64, max_splits: int = 32) -> int:
    """Splits so that ``num_seqs * num_kv_heads * splits`` covers about two waves of the GPU, with
    at least two KV tiles per split. A power of two (the merge kernel loads all splits at once)."""
    programs = max(1, num_seqs * num_kv_heads)
    wanted = max(1, -(-2 * num_sms // programs))
    by_length = max(1, -(-max_seq_len // (2 * block_n)))
    splits = min(wanted, by_length, max_splits)
    return 1 << (splits - 1).bit_length() if splits > 1 else 1


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, *, scale: float, sliding_window: int | None,
                           num_splits: int, out: torch.Tensor | None = None,
                           num_active: torch.Tensor | None = None,
                           workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Decode attention for the first ``num_active`` (int32 device scalar; default: all) of the
    ``query.shape[0]`` sequences; ``num_splits`` must be a power of two. ``workspace`` (partial outputs
    and log-sum-exps, float32 ``[num_seqs, num_heads, num_splits, head_dim]`` and ``[..., num_splits]``)
    may be passed in to avoid allocations."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query) if out is None else out
    if num_active is None:
        num_active = torch.full((1,), num_seqs, dtype=torch.int32, device=query.device)
    if num_seqs == 0:
        return out
    if num_splits > 1:
        if workspace is None:
            part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32,
                                   device=query.device)
            part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
        else:
            part_out, part_lse = workspace
    else:
        part_out = part_lse = out  # unused
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    block_n = 64 if block_size <= 64 else block_size
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    _decode_partial_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens, num_active, out, part_out, part_lse,
        scale * LOG2E, sliding_window or 0,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, DOT_PRECISION=precision, num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _decode_merge_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, num_active,
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, num_warps=4,
        )
    return out
