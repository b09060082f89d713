"""Prefill attention over a packed variable-length batch whose KV lives in the paged cache.

Every sequence's new tokens are packed back to back in ``query``; their keys and values were already
written to the cache, together with any earlier context (a previous chunk or a prefix-cache hit), so
one kernel reads the whole context from the cache. Grid ``(query tiles, num_heads, num_seqs)``; a
program computes ``BLOCK_M`` query rows of one head with an online softmax over key tiles up to the
causal bound, skipping the mask on tiles entirely below the diagonal.

Contract: ``query`` ``[num_tokens, num_heads, head_dim]``; ``query_start_loc`` ``[num_seqs + 1]``;
``seq_lens`` ``[num_seqs]`` (context after this step); ``block_tables`` as for decode. Row ``r`` of
sequence ``i`` sits at position ``seq_lens[i] - q_len_i + r`` and attends to keys ``k <= pos`` with
``pos - k < window`` when a window is set. ``seq_offset`` skips the first sequences (handled by the
decode kernel in mixed batches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table, kv_head, n_start, q_pos, seq_len,
                 window, scale_log2, stride_cb, stride_ct, stride_ch,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    n = n_start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    in_seq = n < seq_len
    block = tl.load(table + n // BLOCK_SIZE, mask=in_seq, other=0).to(tl.int64)
    offsets = block * stride_cb + (n % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
    k = tl.load(k_cache_ptr + offsets[:, None] + d[None, :], mask=in_seq[:, None], other=0.0)
    v = tl.load(v_cache_ptr + offsets[:, None] + d[None, :], mask=in_seq[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        visible = (n[None, :] <= q_pos[:, None]) & in_seq[None, :]
        if window > 0:
            visible = visible & (q_pos[:, None] - n[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, out_ptr,
    scale_log2, window, seq_offset,
    stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2) + seq_offset
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    kv_head = head // GROUP
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q_pos = context + rows
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)

    table = block_tables_ptr + seq * stride_bt
    first_pos = context + m_block * BLOCK_M
    last_pos = tl.minimum(first_pos + BLOCK_M, seq_len)  # exclusive bound of keys any row may see
    lo = 0
    if window > 0:
        lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
    # tiles wholly before the first row's position need no causal mask (and none at all without window)
    full_hi = lo
    if window == 0:
        full_hi = (first_pos // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n_start in range(lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table, kv_head, n_start,
                                     q_pos, seq_len, window, scale_log2, stride_cb, stride_ct, stride_ch,
                                     HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION)
    for n_start in range(full_hi, last_pos, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table, kv_head, n_start,
                                     q_pos, seq_len, window, scale_log2, stride_cb, stride_ct, stride_ch,
                                     HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION)
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_config(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and launch shape; float32 (tests) uses smaller tiles to stay within shared memory."""
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if head_dim <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def paged_prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, query_start_loc: torch.Tensor, *, max_query_len: int,
                            num_seqs: int, scale: float, sliding_window: int | None, seq_offset: int = 0,
                            out: torch.Tensor | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    """Attention for sequences ``seq_offset .. seq_offset + num_seqs - 1`` of the packed batch."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    out = torch.empty_like(query) if out is None else out
    cfg = dict(config or prefill_config(head_dim, query.dtype))
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    grid = (triton.cdiv(max_query_len, block_m), num_heads, num_seqs)
    _prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale * LOG2E, sliding_window or 0, seq_offset,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_N=block_n, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", **cfg,
    )
    return out
