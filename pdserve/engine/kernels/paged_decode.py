"""Paged decode attention: one query token per sequence over its whole paged KV context.

One kernel, launched one of two ways; the live sequence count ``num_active`` and the step's split count
``num_splits`` are int32 device scalars, so a launch captured in a CUDA graph serves any decode count:

* **whole** (a step that splits no decode): grid ``(capacity, num_kv_heads)``, one program per sequence
  over its whole context, writing the output; programs past ``num_active`` exit at once.
* **split** (flash-decoding: a few long sequences still fill the GPU): grid ``(num_programs,
  num_kv_heads)``, program ``i`` taking one (sequence, split) item of the step's item table (``item_seq``:
  the sequence of each item; ``item_starts``: each sequence's first item, so sequence ``s`` has
  ``item_starts[s + 1] - item_starts[s]`` splits, which may differ between sequences) and writing a partial
  result and its log-sum-exp, which a merge kernel combines; a sequence of one split (every sequence of a
  graph step that splits only its prompt chunks) has its program write the output itself.

A program handles every query head of one GQA group (so each K/V tile is read once per group, not once
per query head). A graph or step launches one of the two, never both. Measured on an H200 (32 layers in a
graph, ``benchmarks/results/runs/decode_split_variants-h200.md``): one kernel body for both ran 256 x 1k
~9% slower (8.9 against 8.1 ms); launching the whole kernel beside the split one (to exit at once) cost
~3 us a layer; persistent split programs looping over items ran 32 decodes x 4k in two splits 1.3x slower
than one program per item.

The split counts are chosen per step (:func:`choose_num_splits` for every sequence alike, or
:func:`balanced_split_counts`, each sequence by its length), not frozen in the graph: a step with a
few decodes beside a prompt chunk replays a graph whose decode grid was sized for its token count, and a
split count fixed for that size (one, for any graph of more than ~32 rows) left a handful of long
sequences to a handful of programs (on an H200, 6 decodes at 2k of context beside a 102-token chunk: the
step ran ~1.5x its model).

Contract: ``query`` ``[num_seqs, num_heads, head_dim]``; ``kv_cache`` ``[2, num_blocks, block_size,
num_kv_heads, head_dim]``; ``block_tables`` ``[num_seqs, >= ceil(seq_len/block_size)]`` int32;
``seq_lens`` ``[num_seqs]`` int32 (>= 1). Query row ``i`` sits at position ``seq_lens[i] - 1`` and
attends to positions ``[max(0, seq_len - window), seq_len)``.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
#: The most KV splits of one sequence.
MAX_SPLITS = 32
#: Split items (sequence x split) per KV head a step aims for, in multiprocessors per KV head: four
#: waves of one-item programs (on an H200, 4-32 decodes at 2-4k of context ran fastest at 64 items).
SPLIT_WAVES = 4


@triton.jit
def _attend_keys(q, k_cache_ptr, v_cache_ptr, table, kv_head, seq_len, window, tile_lo, tile_hi, scale_log2,
                 stride_cb, stride_ct, stride_ch, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of one GQA group's queries over key tiles ``tile_lo .. tile_hi - 1``."""
    d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
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
    return acc, m_i, l_i


@triton.jit
def _group_query(q_ptr, seq, stride_qs, stride_qh, heads, head_mask, HEAD_DIM: tl.constexpr):
    """The query rows of one GQA group of sequence ``seq`` (padded rows zero)."""
    d = tl.arange(0, HEAD_DIM)
    return tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=head_mask[:, None],
                   other=0.0)


@triton.jit
def _first_tile(seq_len, window, BLOCK_N: tl.constexpr):
    """The first key tile a query at position ``seq_len - 1`` sees (its sliding window's, else 0)."""
    first_tile = 0
    if window > 0:
        first_tile = tl.maximum(seq_len - window, 0) // BLOCK_N
    return first_tile


@triton.jit
def _store_output(out_ptr, seq, stride_os, stride_oh, heads, head_mask, acc, safe_l, HEAD_DIM: tl.constexpr):
    """Write one GQA group's normalised output rows of sequence ``seq``."""
    d = tl.arange(0, HEAD_DIM)
    tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :],
             (acc / safe_l[:, None]).to(out_ptr.dtype.element_ty), mask=head_mask[:, None])


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, num_active_ptr, num_splits_ptr,
    item_starts_ptr, item_seq_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, window,
    stride_qs, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_bt,
    stride_os, stride_oh,
    stride_pi, stride_ph, stride_li,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr, ITEM_TABLE: tl.constexpr,
):
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    head_mask = g < GROUP
    if SPLIT:  # one program per (sequence, split) item
        item = tl.program_id(0)
        if ITEM_TABLE:  # each sequence its own split count
            num_items = tl.load(item_starts_ptr + tl.load(num_active_ptr))
        else:  # every sequence ``num_splits`` ways
            splits_of_all = tl.load(num_splits_ptr)
            num_items = tl.load(num_active_ptr) * splits_of_all
        if item < num_items:
            if ITEM_TABLE:
                seq = tl.load(item_seq_ptr + item)
                first_item = tl.load(item_starts_ptr + seq)
                num_splits = tl.load(item_starts_ptr + seq + 1) - first_item
            else:
                num_splits = splits_of_all
                seq = item // num_splits
                first_item = seq * num_splits
            split = item - first_item
            seq_len = tl.load(seq_lens_ptr + seq)
            q = _group_query(q_ptr, seq, stride_qs, stride_qh, heads, head_mask, HEAD_DIM)
            num_tiles = tl.cdiv(seq_len, BLOCK_N)
            first_tile = _first_tile(seq_len, window, BLOCK_N)
            tiles_per_split = tl.cdiv(num_tiles - first_tile, num_splits)
            tile_lo = first_tile + split * tiles_per_split
            tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
            acc, m_i, l_i = _attend_keys(q, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, kv_head,
                                         seq_len, window, tile_lo, tile_hi, scale_log2, stride_cb, stride_ct,
                                         stride_ch, GROUP_PAD, HEAD_DIM, BLOCK_SIZE, BLOCK_N, DOT_PRECISION)
            safe_l = tl.where(l_i > 0, l_i, 1.0)
            if num_splits == 1:
                _store_output(out_ptr, seq, stride_os, stride_oh, heads, head_mask, acc, safe_l, HEAD_DIM)
            else:
                lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
                tl.store(part_out_ptr + item * stride_pi + heads[:, None] * stride_ph + d[None, :],
                         acc / safe_l[:, None], mask=head_mask[:, None])
                tl.store(part_lse_ptr + item * stride_li + heads, lse, mask=head_mask)
    else:  # one program per sequence, the whole context
        seq = tl.program_id(0)
        if seq >= tl.load(num_active_ptr):
            return
        seq_len = tl.load(seq_lens_ptr + seq)
        q = _group_query(q_ptr, seq, stride_qs, stride_qh, heads, head_mask, HEAD_DIM)
        acc, m_i, l_i = _attend_keys(q, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, kv_head,
                                     seq_len, window, _first_tile(seq_len, window, BLOCK_N), tl.cdiv(seq_len, BLOCK_N),
                                     scale_log2, stride_cb, stride_ct, stride_ch, GROUP_PAD, HEAD_DIM, BLOCK_SIZE,
                                     BLOCK_N, DOT_PRECISION)
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        _store_output(out_ptr, seq, stride_os, stride_oh, heads, head_mask, acc, safe_l, HEAD_DIM)


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, seq, head, first_item, num_splits, d, k,
                  stride_pi, stride_ph, stride_li, stride_os, stride_oh):
    """Combine one head's partial results of items ``first_item ..`` (``num_splits`` of them) into
    sequence ``seq``'s output: an online softmax over chunks of the splits (``d``: the head's dimensions,
    ``k``: a chunk's split offsets)."""
    m = -1.0e30
    total = 0.0
    acc = tl.zeros(d.shape, dtype=tl.float32)
    for first in range(0, num_splits, k.shape[0]):
        in_use = first + k < num_splits
        items = first_item + first + k
        lse = tl.load(part_lse_ptr + items * stride_li + head, mask=in_use, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        parts = tl.load(part_out_ptr + items[:, None] * stride_pi + head * stride_ph + d[None, :],
                        mask=in_use[:, None], other=0.0)
        acc = acc * alpha + tl.sum(parts * w[:, None], 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d, (acc / total).to(out_ptr.dtype.element_ty))


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_active_ptr, num_splits_ptr, item_starts_ptr, num_heads,
    stride_pi, stride_ph, stride_li, stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, SPLIT_CHUNK: tl.constexpr, ITEM_TABLE: tl.constexpr,
):
    most_splits = tl.load(num_splits_ptr)  # with an item table: the most of any sequence
    num_active = tl.load(num_active_ptr)  # loaded beside the split count, not after a branch on it
    num_work = tl.where(most_splits > 1, num_active * num_heads, 0)  # no sequence split: every output is written
    d = tl.arange(0, HEAD_DIM)
    k = tl.arange(0, SPLIT_CHUNK)
    for work in range(tl.program_id(0), num_work, tl.num_programs(0)):
        seq = work // num_heads
        head = work % num_heads
        if ITEM_TABLE:
            first_item = tl.load(item_starts_ptr + seq)
            num_splits = tl.load(item_starts_ptr + seq + 1) - first_item
            if num_splits > 1:  # a sequence of one split wrote its output itself
                _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, seq, head, first_item, num_splits, d, k,
                              stride_pi, stride_ph, stride_li, stride_os, stride_oh)
        else:
            _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, seq, head, seq * most_splits, most_splits, d, k,
                          stride_pi, stride_ph, stride_li, stride_os, stride_oh)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      block_n: int = 64, max_splits: int = MAX_SPLITS) -> int:
    """Splits so that ``num_seqs * splits`` items per KV head come closest to :data:`SPLIT_WAVES` waves of
    the multiprocessors without passing them, with at least one KV tile per split (one decode of 1k on an
    H200: 16 splits of 64 keys ran 1.2x faster than 9 of two tiles)."""
    wanted = max(1, SPLIT_WAVES * num_sms // max(1, num_seqs * num_kv_heads))
    by_length = max(1, -(-max_seq_len // block_n))
    return min(wanted, by_length, max_splits)


def balanced_split_counts(seq_lens: np.ndarray, target_items: int, room: int, block_n: int = 64,
                          max_splits: int = MAX_SPLITS) -> np.ndarray:
    """Splits per sequence so that every (sequence, split) item reads about the same number of key tiles:
    the step's tiles over ``target_items`` items per KV head (at least one tile an item, at most
    ``max_splits`` splits a sequence), coarser until the items fit ``room``. With contexts of one length
    this is about :func:`choose_num_splits`'s count for every sequence (more where the contexts pass a whole
    tile by a few keys: 32 of 2,049 keys split three ways, not two); with ragged ones (a serving batch: a few
    long conversations among short ones) the long sequences take more splits and the short ones one,
    where one count for all gives the short ones empty splits and leaves the long ones' few items as the
    step's critical path."""
    tiles = np.maximum(1, -(-seq_lens.astype(np.int64) // block_n))
    if len(tiles) > room:
        raise ValueError(f"{len(tiles)} sequences do not fit {room} items")
    per_item = max(1, -(-int(tiles.sum()) // max(1, target_items)))
    while True:
        splits = np.minimum(-(-tiles // per_item), max_splits)
        if int(splits.sum()) <= room:
            return splits.astype(np.int32)
        per_item += max(1, per_item // 4)


def fill_split_items(split_counts: np.ndarray, item_starts: np.ndarray, item_seq: np.ndarray) -> int:
    """Write the item table of ``split_counts`` (splits per sequence) into ``item_starts`` (each
    sequence's first item, then the total: ``len(split_counts) + 1`` entries) and ``item_seq`` (each
    item's sequence); returns the number of items."""
    n = len(split_counts)
    item_starts[0] = 0
    np.cumsum(split_counts, out=item_starts[1:n + 1])
    total = int(item_starts[n])
    item_seq[:total] = np.repeat(np.arange(n, dtype=np.int32), split_counts)
    return total


#: Programs of the merge at most: one per (sequence, query head) up to this many, past it each loops over
#: several. A step of alike decodes splits only when they are few (the splits fill about four waves of the
#: multiprocessors: at most ~33 on an H200), so this covers every pair of such a step; a ragged step that
#: splits a few long decodes among many loops. With 64 programs per KV head (512), 32 decodes' 1,024 pairs
#: took two rounds each (0.174 against 0.164 ms a step on an H200, 58ab695).
MERGE_MAX_PROGRAMS = 2048


def merge_programs(num_seqs: int, num_heads: int) -> int:
    """The merge's grid for ``num_seqs`` sequences (the launch's capacity) of ``num_heads`` query heads."""
    return min(num_seqs * num_heads, MERGE_MAX_PROGRAMS)

#: Splits the merge combines at a time (one at a time, 32 splits merged in 0.66 against 0.45 ms on an H200;
#: all 32 rows at once cost ~3 us a layer when there were two).
MERGE_SPLIT_CHUNK = 8


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, *, scale: float, sliding_window: int | None,
                           num_splits: int | torch.Tensor, may_split: bool | None = None,
                           num_programs: int | None = None,
                           out: torch.Tensor | None = None, num_active: torch.Tensor | None = None,
                           workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
                           items: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Decode attention for the first ``num_active`` (int32 device scalar; default: all) of the
    ``query.shape[0]`` sequences, split along their KV: ``num_splits`` ways each (an int, or an int32
    device scalar read by the kernels, at most :data:`MAX_SPLITS`), or as the item table ``items`` says
    (``(item_starts, item_seq)``, int32 device tensors as :func:`fill_split_items` writes them; ``num_splits`` is
    then the most splits of any sequence). ``may_split`` chooses the launch: the split one (by default
    for a device scalar or an int above one), ``num_programs`` programs per KV head (default: every
    sequence times ``num_splits``; the caller guarantees the live items fit them), or the whole one, for
    which the split count must be 1. ``workspace`` (partial outputs and log-sum-exps, float32
    ``[num_programs, num_heads, head_dim]`` and ``[num_programs, num_heads]``) may be passed in to avoid
    allocations."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query) if out is None else out
    if num_seqs == 0:
        return out
    device = query.device
    if num_active is None:
        num_active = torch.full((1,), num_seqs, dtype=torch.int32, device=device)
    if isinstance(num_splits, int):
        assert 1 <= num_splits <= MAX_SPLITS, f"num_splits must be in 1..{MAX_SPLITS}"
        splits_tensor = torch.full((1,), num_splits, dtype=torch.int32, device=device)
        num_programs = num_programs or num_seqs * num_splits
    else:
        splits_tensor = num_splits
        assert num_programs is not None, "a device split count needs num_programs"
    if may_split is None:
        may_split = not isinstance(num_splits, int) or num_splits != 1
    assert may_split or not isinstance(num_splits, int) or num_splits == 1, "a split count above 1 needs may_split"
    item_table = items is not None
    item_starts, item_seq = items if items is not None else (num_active, num_active)  # unused without a table
    if may_split:
        if workspace is None:
            part_out = torch.empty((num_programs, num_heads, head_dim), dtype=torch.float32, device=device)
            part_lse = torch.empty((num_programs, num_heads), dtype=torch.float32, device=device)
        else:
            part_out, part_lse = workspace
    else:
        part_out, part_lse = out, out[:, :, 0]  # unused
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    block_n = 64 if block_size <= 64 else block_size
    common = dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                  BLOCK_SIZE=block_size, BLOCK_N=block_n,
                  DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2)
    args = (query, k_cache, v_cache, block_tables, seq_lens, num_active, splits_tensor, item_starts, item_seq, out,
            part_out, part_lse,
            scale * LOG2E, sliding_window or 0, query.stride(0), query.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            out.stride(0), out.stride(1), part_out.stride(0), part_out.stride(1), part_lse.stride(0))
    if not may_split:
        _decode_partial_kernel[(num_seqs, num_kv_heads)](*args, SPLIT=False, ITEM_TABLE=False, **common)
    else:
        _decode_partial_kernel[(num_programs, num_kv_heads)](*args, SPLIT=True, ITEM_TABLE=item_table, **common)
        _decode_merge_kernel[(merge_programs(num_seqs, num_heads),)](
            part_out, part_lse, out, num_active, splits_tensor, item_starts, num_heads,
            part_out.stride(0), part_out.stride(1), part_lse.stride(0), out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, SPLIT_CHUNK=MERGE_SPLIT_CHUNK, ITEM_TABLE=item_table, num_warps=4,
        )
    return out
