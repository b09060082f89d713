"""Rotary embedding of q and k plus the write of k and v into the paged cache, in one kernel.

One program per token: it rotates every query head in place, rotates every key head and stores it,
and the value heads, at the token's cache slot (``slot = block * block_size + offset``); with
``store_key`` the rotated keys are also written back in place (for attention that reads them there). This replaces
the reference path's separate rotary and cache-write operations (a dozen small launches per layer).
Rotation is neox-style (halves), computed in float32 from float32 cos/sin tables.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, positions_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
                       slots_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_cos, stride_cb, stride_ct, stride_ch,
                       NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                       KV_HEADS_PAD: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       STORE_KEY: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + i)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + i)[None, :]

    h = tl.arange(0, HEADS_PAD)
    hm = (h < NUM_HEADS)[:, None]
    q_base = q_ptr + t * stride_qt + h[:, None] * stride_qh + i[None, :]
    q1 = tl.load(q_base, mask=hm, other=0.0)
    q2 = tl.load(q_base + HALF, mask=hm, other=0.0)
    q1f, q2f = q1.to(tl.float32), q2.to(tl.float32)
    tl.store(q_base, (q1f * cos - q2f * sin).to(q1.dtype), mask=hm)
    tl.store(q_base + HALF, (q2f * cos + q1f * sin).to(q1.dtype), mask=hm)

    kh = tl.arange(0, KV_HEADS_PAD)
    km = (kh < NUM_KV_HEADS)[:, None]
    k_base = k_ptr + t * stride_kt + kh[:, None] * stride_kh + i[None, :]
    k1_in = tl.load(k_base, mask=km, other=0.0)
    k2_in = tl.load(k_base + HALF, mask=km, other=0.0)
    k1, k2 = k1_in.to(tl.float32), k2_in.to(tl.float32)
    if STORE_KEY:
        tl.store(k_base, (k1 * cos - k2 * sin).to(k1_in.dtype), mask=km)
        tl.store(k_base + HALF, (k2 * cos + k1 * sin).to(k1_in.dtype), mask=km)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + kh[:, None] * stride_ch + i[None, :]
    cache_ty = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + dst, (k1 * cos - k2 * sin).to(cache_ty), mask=km)
    tl.store(k_cache_ptr + dst + HALF, (k2 * cos + k1 * sin).to(cache_ty), mask=km)
    v_base = v_ptr + t * stride_vt + kh[:, None] * stride_vh + i[None, :]
    tl.store(v_cache_ptr + dst, tl.load(v_base, mask=km, other=0.0).to(cache_ty), mask=km)
    tl.store(v_cache_ptr + dst + HALF, tl.load(v_base + HALF, mask=km, other=0.0).to(cache_ty), mask=km)


def rope_and_write_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, *, store_key: bool = False) -> None:
    """Rotate ``query`` ``[T, Hq, D]`` in place; write rotated ``key`` and ``value`` ``[T, Hkv, D]`` into
    ``kv_cache`` at ``slot_mapping`` (and the rotated ``key`` in place too with ``store_key``).
    ``cos``/``sin`` are float32 ``[max_positions, D // 2]``."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _rope_cache_kernel[(num_tokens,)](
        query, key, value, positions, cos, sin, k_cache, v_cache, slot_mapping,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HALF=head_dim // 2, BLOCK_SIZE=kv_cache.shape[2],
        STORE_KEY=store_key, num_warps=4,
    )
