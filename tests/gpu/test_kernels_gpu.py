"""Triton kernels against their torch references on the GPU at real shapes (bf16; head dim 64 and 128;
GQA ratios 1, 4, 8; odd lengths and block boundaries; long contexts split along the KV).
Bound: relative Frobenius error against a float64 reference < 2e-2 (bf16 operands, fp32 accumulation)."""

from __future__ import annotations

import pytest
import torch

from tests.support.kernel_cases import paged_problem, reference_attention, relative_error

pytestmark = pytest.mark.gpu
BF16_BOUND = 2e-2


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("heads", "kv_heads"), [(32, 32), (32, 8), (32, 4)])
@pytest.mark.parametrize("window", [None, 100])
def test_prefill_kernel_gpu(head_dim: int, heads: int, kv_heads: int, window: int | None) -> None:
    from pdserve.engine.kernels.paged_prefill import paged_prefill_attention

    ctx, qlens = [0, 0, 37, 512, 0], [1, 255, 129, 64, 1000]
    q, cache, meta = paged_problem(ctx, qlens, heads, kv_heads, head_dim, 16, torch.bfloat16, "cuda",
                                   seed=head_dim + heads + kv_heads)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                            num_seqs=meta.num_seqs, scale=head_dim**-0.5,
                            sliding_window=window, out=out)
    assert relative_error(out.cpu(), reference_attention(q, cache, meta, head_dim**-0.5, window)) < BF16_BOUND


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("heads", "kv_heads"), [(32, 32), (32, 8), (32, 4)])
@pytest.mark.parametrize("num_splits", [1, 4, 32])
def test_decode_kernel_gpu(head_dim: int, heads: int, kv_heads: int, num_splits: int) -> None:
    from pdserve.engine.kernels.paged_decode import paged_decode_attention

    ctx = [0, 15, 16, 17, 1023, 4095, 300]
    q, cache, meta = paged_problem(ctx, [1] * len(ctx), heads, kv_heads, head_dim, 16, torch.bfloat16, "cuda",
                                   seed=num_splits + heads + kv_heads)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, cache, meta.block_tables, meta.seq_lens, scale=head_dim**-0.5, sliding_window=None,
                           num_splits=num_splits, out=out)
    assert relative_error(out.cpu(), reference_attention(q, cache, meta, head_dim**-0.5, None)) < BF16_BOUND


@pytest.mark.parametrize(("heads", "kv_heads"), [(32, 8), (32, 4)])
def test_decode_kernel_with_splits_per_sequence_gpu(heads: int, kv_heads: int) -> None:
    """Ragged contexts split each by its own length (``balanced_split_counts``: the long ones many ways,
    the short ones not at all), from a device item table in a wider grid: equal to the reference."""
    import numpy as np

    from pdserve.engine.kernels.paged_decode import balanced_split_counts, paged_decode_attention
    from tests.support.kernel_cases import split_items

    ctx = [0, 15, 4095, 16, 17, 1023, 300, 2047] + [100] * 20
    splits = balanced_split_counts(np.array(ctx) + 1, target_items=4 * 132 // kv_heads, room=200)
    assert splits.min() == 1 and splits.max() > 8
    q, cache, meta = paged_problem(ctx, [1] * len(ctx), heads, kv_heads, 128, 16, torch.bfloat16, "cuda", seed=heads)
    out = torch.full_like(q, float("nan"))
    counts = torch.tensor([len(ctx), int(splits.max())], dtype=torch.int32, device="cuda")
    paged_decode_attention(q, cache, meta.block_tables, meta.seq_lens, scale=128**-0.5, sliding_window=None,
                           num_splits=counts[1:2], num_programs=256, num_active=counts[0:1], out=out,
                           items=split_items(splits, "cuda"))
    assert relative_error(out.cpu(), reference_attention(q, cache, meta, 128**-0.5, None)) < BF16_BOUND


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 2048), (4096, 7168), (64128, 4096), (1000, 4100)])
def test_skinny_linear_gpu(n: int, k: int, gated: bool) -> None:
    """Llama-3.1-8B's and a TP=2 rank's projections (and a ragged one) against a float64 product of the
    same (bf16-rounded) activation; no worse than cuBLAS's bf16 result against it."""
    import torch.nn.functional as F

    from pdserve.engine.kernels.activation import silu_and_mul
    from pdserve.engine.kernels.skinny_gemm import skinny_linear

    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1, 2 * k if gated else k, generator=gen, device="cuda").to(torch.bfloat16)
    weight = (torch.randn(n, k, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    product_input = silu_and_mul(x) if gated else x
    ref = (product_input.double() @ weight.double().T).cpu()
    ours = relative_error(skinny_linear(x, weight, gated=gated).cpu(), ref)
    cublas = relative_error(F.linear(product_input, weight).cpu(), ref)
    assert ours < max(2 * cublas, 1e-2), (ours, cublas)


def test_float32_kernels_are_exact_to_rounding() -> None:
    """float32 uses IEEE dot products (no TF32): errors at float32 rounding level."""
    from pdserve.engine.kernels.paged_decode import paged_decode_attention
    from pdserve.engine.kernels.paged_prefill import paged_prefill_attention

    q, cache, meta = paged_problem([0, 40], [77, 33], 8, 2, 64, 16, torch.float32, "cuda", seed=1)
    out = paged_prefill_attention(q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                  num_seqs=2, scale=0.125, sliding_window=None)
    assert relative_error(out.cpu(), reference_attention(q, cache, meta, 0.125, None)) < 1e-5
    q, cache, meta = paged_problem([100, 3000], [1, 1], 8, 2, 64, 16, torch.float32, "cuda", seed=2)
    out = paged_decode_attention(q, cache, meta.block_tables, meta.seq_lens, scale=0.125, sliding_window=None,
                                 num_splits=8)
    assert relative_error(out.cpu(), reference_attention(q, cache, meta, 0.125, None)) < 1e-5


@pytest.mark.parametrize(("heads", "kv_heads"), [(32, 8), (32, 32)])
def test_dense_prefill_gpu(heads: int, kv_heads: int) -> None:
    """Context-free prefill chunks through torch SDPA (packed new K/V, strided rows as in the engine's
    fused qkv output) against the reference; rows outside the chunks stay untouched."""
    from pdserve.engine.attention.dense_prefill import dense_prefill

    qlens = [1, 255, 129, 1000, 64]
    q, cache, meta = paged_problem([0] * len(qlens), qlens, heads, kv_heads, 128, 16, torch.bfloat16, "cuda",
                                   seed=heads + kv_heads)
    flat = cache.view(2, -1, kv_heads, 128)
    slots = meta.slot_mapping.long()
    qkv = torch.cat([q.flatten(1), flat[0][slots].flatten(1), flat[1][slots].flatten(1)], dim=1)
    qs, ks, vs = qkv.split([heads * 128, kv_heads * 128, kv_heads * 128], dim=1)
    qs, ks, vs = qs.view(-1, heads, 128), ks.view(-1, kv_heads, 128), vs.view(-1, kv_heads, 128)
    out = torch.full_like(q, float("nan"))
    starts = meta.query_start_loc_cpu
    dense_prefill(qs, ks, vs, [(starts[i], starts[i + 1]) for i in range(1, len(qlens))], out, scale=128**-0.5)
    ref = reference_attention(q, cache, meta, 128**-0.5, None)
    assert relative_error(out[1:].cpu(), ref[1:]) < BF16_BOUND
    assert torch.isnan(out[0]).all()


@pytest.mark.parametrize("n", [1, 7, 300])
def test_block_copy_kernels_gpu(n: int) -> None:
    """The KV block-copy kernel (CUDA IPC writes, message gathers) and its message packing variant at the
    serving layout (bf16 blocks of 16 tokens x 8 heads x 128 dims): bit-exact against torch indexing,
    within one GPU and, with two, into the peer's memory; also between views of some of the heads."""
    from pdserve.kvtransfer.block_copy import copy_blocks, gather_into_message, scatter_from_message

    gen = torch.Generator(device="cuda").manual_seed(n)
    layer = torch.randn(2, 512, 16, 8, 128, device="cuda", generator=gen).to(torch.bfloat16)
    src_ids = torch.randperm(512, device="cuda", generator=gen)[:n]
    dst_ids = torch.randperm(400, device="cuda", generator=gen)[:n]
    devices = ["cuda:0"] + (["cuda:1"] if torch.cuda.device_count() > 1 else [])
    for device in devices:
        dst = torch.zeros(2, 400, 16, 8, 128, dtype=torch.bfloat16, device=device)
        copy_blocks(layer, dst, src_ids, dst_ids.to(device))
        torch.cuda.synchronize()
        assert torch.equal(dst[:, dst_ids.to(device)].cpu(), layer[:, src_ids].cpu())
    positions = torch.randperm(2 * n, device="cuda", generator=gen).view(2, n).contiguous()
    blocks = torch.zeros(2 * n, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    gather_into_message(layer, src_ids, blocks, positions)
    for kv in (0, 1):
        assert torch.equal(blocks[positions[kv]], layer[kv, src_ids])
    back = torch.zeros(2, 400, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    scatter_from_message(blocks, positions, back, dst_ids)
    assert torch.equal(back[:, dst_ids], layer[:, src_ids])
    # views of some KV heads (KV between tensor-parallel degrees): the upper 4 heads into a wider cache's
    # heads 2..5, keys and values, nothing else written; and packed into / unpacked from a message
    wide = torch.zeros(2, 400, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    copy_blocks(layer.narrow(3, 4, 4), wide.narrow(3, 2, 4), src_ids, dst_ids)
    want = torch.zeros_like(wide)
    want.narrow(3, 2, 4).index_copy_(1, dst_ids, layer.narrow(3, 4, 4).index_select(1, src_ids))
    assert torch.equal(wide, want)
    half = torch.zeros(2 * n, 16, 4, 128, dtype=torch.bfloat16, device="cuda")
    gather_into_message(layer.narrow(3, 4, 4), src_ids, half, positions)
    wide.zero_()
    scatter_from_message(half, positions, wide.narrow(3, 0, 4), dst_ids)
    assert torch.equal(wide[:, dst_ids, :, :4], layer[:, src_ids, :, 4:]) and not wide[:, :, :, 4:].any()
