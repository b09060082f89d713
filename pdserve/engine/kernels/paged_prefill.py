"""Prefill attention over a packed variable-length batch whose KV lives in the paged cache.

Every sequence's new tokens are packed back to back in ``query``; their keys and values were already
written to the cache, together with any earlier context (a previous chunk or a prefix-cache hit), so
one kernel reads the whole context from the cache.

Work is a list of *query tiles* built on the host (:func:`build_query_tiles`): tile ``k`` is rows
``m * BLOCK_M .. (m + 1) * BLOCK_M - 1`` of sequence ``s`` (``tiles[0, k] = s``, ``tiles[1, k] = m``),
and ``num_tiles`` (a device scalar) says how many are live. The grid is ``(num_programs, num_heads)``
and program ``p`` computes items ``p, p + num_programs, ...`` with an online softmax over key tiles up
to the causal bound, skipping the mask on tiles entirely below the diagonal. An item is a tile, or with
``num_splits > 1`` (a device scalar, chosen per step) one of a tile's ``num_splits`` contiguous shares of
key tiles, whose partial result and log-sum-exp a merge kernel combines: a short chunk after a long
context is one or two tiles, and without splits as many programs per head walk thousands of keys in
turn while the rest of the GPU idles. The launch shape depends only on ``num_programs``, never on the
batch, so one launch captured in a CUDA graph serves every batch of that graph's padded size; in eager
steps ``num_programs`` is simply the number of tiles.

Contract: ``query`` ``[num_tokens, num_heads, head_dim]``; ``query_start_loc`` ``[num_seqs + 1]``;
``seq_lens`` ``[num_seqs]`` (context after this step); ``block_tables`` as for decode. Row ``r`` of
sequence ``i`` sits at position ``seq_lens[i] - q_len_i + r`` and attends to keys ``k <= pos`` with
``pos - k < window`` when a window is set. Rows covered by no tile are not written.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from pdserve.engine.kernels import interpreting

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
    part_out_ptr, part_lse_ptr, tiles_ptr, num_tiles_ptr, num_splits_ptr, scale_log2, window,
    stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh, stride_tiles,
    stride_pi, stride_pr, stride_ph, stride_li, stride_lr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(1)
    kv_head = head // GROUP
    num_splits = tl.load(num_splits_ptr)
    num_items = tl.load(num_tiles_ptr) * num_splits
    d = tl.arange(0, HEAD_DIM)
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        k = item // num_splits
        split = item % num_splits
        seq = tl.load(tiles_ptr + k)
        m_block = tl.load(tiles_ptr + stride_tiles + k)
        q_start = tl.load(query_start_ptr + seq)
        q_len = tl.load(query_start_ptr + seq + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + seq)
        context = seq_len - q_len
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        q_pos = context + rows
        q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)

        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        first_pos = context + m_block * BLOCK_M
        last_pos = tl.minimum(first_pos + BLOCK_M, seq_len)  # exclusive bound of keys any row may see
        lo = 0
        if window > 0:
            lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
        # tiles wholly before the first row's position need no causal mask (and none at all without window)
        full_hi = lo
        if window == 0:
            full_hi = (first_pos // BLOCK_N) * BLOCK_N
        # this item's share of the key tiles [lo, last_pos): whole tiles, so the bounds stay aligned
        per_split = tl.cdiv(tl.cdiv(last_pos - lo, BLOCK_N), num_splits) * BLOCK_N
        key_lo = lo + split * per_split
        key_hi = tl.minimum(key_lo + per_split, last_pos)

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for n_start in range(key_lo, tl.minimum(key_hi, full_hi), BLOCK_N):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table, kv_head, n_start,
                                         q_pos, seq_len, window, scale_log2, stride_cb, stride_ct, stride_ch,
                                         HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION)
        for n_start in range(tl.maximum(key_lo, full_hi), key_hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table, kv_head, n_start,
                                         q_pos, seq_len, window, scale_log2, stride_cb, stride_ct, stride_ch,
                                         HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION)
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        result = acc / safe_l[:, None]
        if num_splits == 1:
            tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
                     result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            r = tl.arange(0, BLOCK_M)
            lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
            tl.store(part_out_ptr + item * stride_pi + r[:, None] * stride_pr + head * stride_ph + d[None, :],
                     result)
            tl.store(part_lse_ptr + item * stride_li + r * stride_lr + head, lse)


@triton.jit
def _prefill_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, query_start_ptr, tiles_ptr, num_tiles_ptr, num_splits_ptr,
    stride_pi, stride_pr, stride_ph, stride_li, stride_lr, stride_ot, stride_oh, stride_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    num_splits = tl.load(num_splits_ptr)
    if num_splits == 1:
        return
    head = tl.program_id(1)
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    for k in range(tl.program_id(0), tl.load(num_tiles_ptr), tl.num_programs(0)):
        seq = tl.load(tiles_ptr + k)
        m_block = tl.load(tiles_ptr + stride_tiles + k)
        q_start = tl.load(query_start_ptr + seq)
        q_len = tl.load(query_start_ptr + seq + 1) - q_start
        rows = m_block * BLOCK_M + r
        m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for split in range(0, num_splits):
            item = k * num_splits + split
            lse = tl.load(part_lse_ptr + item * stride_li + r * stride_lr + head)
            part = tl.load(part_out_ptr + item * stride_pi + r[:, None] * stride_pr + head * stride_ph + d[None, :])
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            total = total * alpha + w
            acc = acc * alpha[:, None] + part * w[:, None]
            m = m_new
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(rows < q_len)[:, None])


#: Shared memory per block (bytes) that 128 x 128 key tiles of head_dim 128 need in three stages (H100, H200).
WIDE_KEY_TILE_SHARED_MEMORY = 200 * 1024


@functools.cache
def _shared_memory(device_index: int) -> int:
    return int(triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"])


def prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device | None = None,
                   wide_keys: bool = False) -> dict[str, int]:
    """Tile sizes and launch shape; float32 (tests) uses smaller tiles to stay within shared memory.

    ``wide_keys`` (eager steps: with CUDA graphs on, those of more tokens than a graph's, so long chunks)
    takes 128 keys per tile at head_dim 128 where the GPU (``device``, default the current one) has the shared memory for it. On an
    H200, in two runs of ``python -m benchmarks.prefill_tiles`` (``benchmarks/results/prefill_tiles-h200.md``
    and ``runs/prefill_tiles-h200.md``), they computed a 2k chunk after 6k of context 1.10-1.12x faster
    and a fresh 8k prompt 1.07-1.12x; but graph steps with 64-256-token chunks beside decodes ran 3-8%
    slower with them (``runs/engine-h200-tiles.json``), and the kernel times of short chunks moved between
    runs by more than the difference, so graph launches keep 64-key tiles (eager-only wide tiles:
    ``runs/engine-h200-eagerwide.json``: an 8k prompt through this kernel 227 against 238 ms a step).
    """
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if head_dim <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    wide = (wide_keys and head_dim == 128 and not interpreting() and torch.cuda.is_available()
            and _shared_memory(torch.cuda.current_device() if device is None or device.index is None
                               else device.index) >= WIDE_KEY_TILE_SHARED_MEMORY)
    return {"BLOCK_M": 128, "BLOCK_N": 128 if wide else 64, "num_warps": 8, "num_stages": 3}


def query_tile_rows(head_dim: int, dtype: torch.dtype) -> int:
    """``BLOCK_M``: how many query rows one tile of :func:`build_query_tiles` covers."""
    return prefill_config(head_dim, dtype)["BLOCK_M"]


def build_query_tiles(query_lens: np.ndarray, first_seq: int, block_m: int, out: np.ndarray) -> int:
    """Write the query tiles of sequences ``first_seq, first_seq + 1, ...`` (whose new-token counts are
    ``query_lens``) into ``out`` ``[2, capacity]`` (row 0: sequence, row 1: tile index within it) and
    return their number. Within a sequence the last tile (the one that reads the most keys) comes first,
    so that persistent programs start with the longest work."""
    per_seq = (query_lens.astype(np.int64) + block_m - 1) // block_m
    total = int(per_seq.sum())
    if total > out.shape[1]:
        raise ValueError(f"{total} query tiles exceed the tile buffer's {out.shape[1]}")
    ends = np.cumsum(per_seq)
    out[0, :total] = np.repeat(np.arange(first_seq, first_seq + len(per_seq), dtype=np.int64), per_seq)
    out[1, :total] = np.repeat(ends, per_seq) - 1 - np.arange(total)
    return total


def paged_prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, query_start_loc: torch.Tensor, *, scale: float,
                            sliding_window: int | None, tiles: torch.Tensor | None = None,
                            num_tiles: torch.Tensor | None = None, num_programs: int | None = None,
                            num_splits: torch.Tensor | None = None, may_split: bool | None = None,
                            merge_programs: int = 0,
                            num_seqs: int | None = None, seq_offset: int = 0, out: torch.Tensor | None = None,
                            config: dict[str, int] | None = None, wide_keys: bool = False) -> torch.Tensor:
    """Attention for the query tiles in ``tiles[:, :num_tiles]`` (int32 device tensors) run by
    ``num_programs`` persistent programs per head.

    ``num_splits`` (an int32 device scalar; default one) splits every tile's keys that many ways, so
    that a few tiles over a long context still fill the GPU: ``num_tiles * num_splits`` items go to the
    programs, each writes a partial result and its log-sum-exp to a workspace, and a merge kernel
    (``merge_programs`` programs per head, default ``num_programs``) combines them; with one split it
    exits at once. ``may_split=False`` with ``num_splits`` (which must then hold 1) launches no merge and
    needs no workspace: a launch that never splits, reading its split count from the step's counts rather
    than allocating one. Without ``tiles`` (tests, one-off calls) the tiles of sequences ``seq_offset ..
    seq_offset + num_seqs - 1`` are built here from ``query_start_loc`` (a host round trip) and every
    tile gets its own program. ``wide_keys``: see :func:`prefill_config` (``config`` overrides both)."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    out = torch.empty_like(query) if out is None else out
    cfg = dict(config or prefill_config(head_dim, query.dtype, query.device, wide_keys))
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    if tiles is None:
        starts = query_start_loc.cpu().numpy().astype(np.int64)
        count = len(starts) - 1 - seq_offset if num_seqs is None else num_seqs
        lens = np.diff(starts)[seq_offset:seq_offset + count]
        host = np.zeros((2, max(1, int(((lens + block_m - 1) // block_m).sum()))), dtype=np.int32)
        total = build_query_tiles(lens, seq_offset, block_m, host)
        tiles = torch.from_numpy(host).to(query.device)
        num_tiles = torch.tensor([total], dtype=torch.int32, device=query.device)
        num_programs = total if num_splits is None else num_programs or total
    assert num_tiles is not None and num_programs is not None, "tiles need num_tiles and num_programs"
    if num_programs == 0:
        return out
    split = num_splits is not None if may_split is None else may_split
    if num_splits is None:
        num_splits = torch.ones(1, dtype=torch.int32, device=query.device)
    if not split:
        part_out, part_lse = out.unsqueeze(1), out[:, :, 0].unsqueeze(1)  # never written
    else:  # the caller splits only when tiles * splits <= num_programs: one workspace row per item
        part_out = torch.empty((num_programs, block_m, num_heads, head_dim), dtype=torch.float32,
                               device=query.device)
        part_lse = torch.empty((num_programs, block_m, num_heads), dtype=torch.float32, device=query.device)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _prefill_kernel[(num_programs, num_heads)](
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_out, part_lse,
        tiles, num_tiles, num_splits, scale * LOG2E, sliding_window or 0,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), tiles.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_N=block_n, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", **cfg,
    )
    if split:
        _prefill_merge_kernel[(merge_programs or num_programs, num_heads)](
            part_out, part_lse, out, query_start_loc, tiles, num_tiles, num_splits,
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1), tiles.stride(0), HEAD_DIM=head_dim, BLOCK_M=block_m, num_warps=4,
        )
    return out
