"""Every Triton kernel against its torch reference, on fresh random inputs.

On a machine without CUDA the kernels run in Triton's CPU interpreter (small shapes; float32 and
bfloat16); ``tests/gpu/test_kernels_gpu.py`` repeats the checks on the GPU at real shapes.
Error bounds (relative Frobenius error against float64): float32 1e-5, bfloat16 2e-2.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _kernels():
    from pdserve.engine.kernels import activation, paged_decode, paged_prefill, rmsnorm, rope_cache

    return paged_decode, paged_prefill, rmsnorm, activation, rope_cache


CASES = [  # (context lens, query lens, heads, kv heads, head dim, block size, window)
    ([0, 0, 0], [5, 16, 33], 4, 2, 32, 16, None),  # fresh prompts, block boundaries
    ([17, 32, 1], [9, 1, 40], 4, 1, 16, 8, None),  # chunked prefill / prefix hits, MQA
    ([0, 30], [21, 7], 8, 8, 16, 4, 6),  # MHA, sliding window
    ([64], [31], 8, 2, 32, 16, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_paged_prefill(case: int, dtype: torch.dtype) -> None:
    from tests.support.kernel_cases import paged_problem, reference_attention, relative_error

    _, paged_prefill, *_ = _kernels()
    ctx, qlens, h, kvh, d, bs, window = CASES[case]
    q, cache, meta = paged_problem(ctx, qlens, h, kvh, d, bs, dtype, DEVICE, seed=case)
    out = torch.full_like(q, float("nan"))
    paged_prefill.paged_prefill_attention(q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                          num_seqs=meta.num_seqs, scale=d**-0.5, sliding_window=window, out=out)
    ref = reference_attention(q, cache, meta, d**-0.5, window)
    assert relative_error(out.cpu(), ref) < BOUND[dtype]


def test_query_tiles_cover_every_row_once_longest_first() -> None:
    import numpy as np

    _, paged_prefill, *_ = _kernels()
    out = np.full((2, 16), -1, dtype=np.int32)
    n = paged_prefill.build_query_tiles(np.array([5, 32, 33, 2]), 3, 16, out)
    assert n == 1 + 2 + 3 + 1
    assert out[0, :n].tolist() == [3, 4, 4, 5, 5, 5, 6]
    assert out[1, :n].tolist() == [0, 1, 0, 2, 1, 0, 0]  # per sequence: last (longest) tile first
    assert (out[:, n:] == -1).all()
    with pytest.raises(ValueError, match="tile buffer"):
        paged_prefill.build_query_tiles(np.array([300]), 0, 16, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("item_table", [False, True])
@pytest.mark.parametrize(("decode_splits", "prefill_splits", "window", "split_launch"),
                         [(1, 1, None, False), (1, 1, 25, True), (1, 3, None, True), (2, 1, None, True),
                          (5, 3, None, True), (3, 2, 25, True)])
def test_graph_shaped_launch_runs_live_work_only(dtype: torch.dtype, decode_splits: int, prefill_splits: int,
                                                 window: int | None, split_launch: bool, item_table: bool) -> None:
    """The launch a CUDA graph freezes: decodes first, then prefill chunks, then padding rows; the decode
    grid covers more (sequence, split) items than are live, the prefill kernel has fewer persistent
    programs than tiles (one split) or splits each tile's keys (the split counts are device scalars, as
    a step sets them; the split launch, which a graph that splits anything replays, also runs a step whose
    decodes do not split; the decodes' splits as one count or from the item table). Live rows equal the
    reference; padding rows and rows of no live work stay untouched."""
    import numpy as np

    from tests.support.kernel_cases import paged_problem, reference_attention, relative_error, split_items

    paged_decode, paged_prefill, *_ = _kernels()
    ctx, qlens = [9, 40, 0, 70, 0], [1, 1, 37, 20, 6]  # 2 decodes, 3 prefill chunks (one after 70 tokens)
    q, cache, meta = paged_problem(ctx, qlens, 4, 2, 32, 8, dtype, DEVICE, seed=7)
    padding = 11
    q = torch.cat([q, torch.randn(padding, 4, 32).to(dtype).to(DEVICE)])
    block_m = paged_prefill.prefill_config(32, dtype)["BLOCK_M"]
    host = np.zeros((2, 64), dtype=np.int32)
    num_tiles = paged_prefill.build_query_tiles(np.array(qlens[2:]), 2, block_m, host)
    tiles = torch.from_numpy(host).to(DEVICE)
    counts = torch.tensor([2, num_tiles, decode_splits, prefill_splits], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    capacity = 6  # grid items past the 2 live decodes' must exit without writing
    paged_decode.paged_decode_attention(q[:capacity], cache, meta.block_tables, meta.seq_lens, scale=0.3,
                                        sliding_window=window, num_splits=counts[2:3], num_programs=16,
                                        may_split=split_launch, num_active=counts[0:1], out=out[:capacity],
                                        items=split_items(np.full(2, decode_splits), DEVICE)
                                        if item_table else None)
    programs = max(1, num_tiles // 2) if prefill_splits == 1 else num_tiles * prefill_splits + 1
    paged_prefill.paged_prefill_attention(q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                          scale=0.3, sliding_window=window, tiles=tiles, num_tiles=counts[1:2],
                                          num_programs=programs, num_splits=counts[3:4], out=out)
    live = sum(qlens)
    ref = reference_attention(q[:live], cache, meta, 0.3, window)
    assert relative_error(out[:live].cpu(), ref) < BOUND[dtype]
    assert torch.isnan(out[live:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 2, 8, 11])
@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(4, 4, None), (8, 2, None), (8, 1, 5)])
def test_paged_decode(heads: int, kv_heads: int, window: int | None, num_splits: int, dtype: torch.dtype) -> None:
    from tests.support.kernel_cases import paged_problem, reference_attention, relative_error

    paged_decode, *_ = _kernels()
    ctx = [0, 15, 16, 130, 47]
    q, cache, meta = paged_problem(ctx, [1] * len(ctx), heads, kv_heads, 32, 16, dtype, DEVICE,
                                   seed=heads * 10 + num_splits)
    out = torch.full_like(q, float("nan"))
    paged_decode.paged_decode_attention(q, cache, meta.block_tables, meta.seq_lens, scale=0.2,
                                        sliding_window=window, num_splits=num_splits, out=out)
    ref = reference_attention(q, cache, meta, 0.2, window)
    assert relative_error(out.cpu(), ref) < BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(8, 2, None), (8, 1, 5)])
def test_paged_decode_with_splits_per_sequence(heads: int, kv_heads: int, window: int | None,
                                               dtype: torch.dtype) -> None:
    """Ragged contexts, each sequence split its own number of ways (one for the short ones, the most for
    the longest), read from the item table as a step writes it, in a grid with more programs than items:
    every output equals the reference."""
    import numpy as np

    from tests.support.kernel_cases import paged_problem, reference_attention, relative_error, split_items

    paged_decode, *_ = _kernels()
    ctx = [0, 15, 300, 16, 130, 47, 600]
    splits = paged_decode.balanced_split_counts(np.array(ctx) + 1, target_items=12, room=20, block_n=16)
    assert splits.tolist() == [1, 1, 3, 1, 2, 1, 6]  # 73 tiles of 16 keys over 12 items: 7 tiles an item at most
    q, cache, meta = paged_problem(ctx, [1] * len(ctx), heads, kv_heads, 32, 16, dtype, DEVICE, seed=heads + 3)
    out = torch.full_like(q, float("nan"))
    counts = torch.tensor([len(ctx), int(splits.max())], dtype=torch.int32, device=DEVICE)
    paged_decode.paged_decode_attention(q, cache, meta.block_tables, meta.seq_lens, scale=0.2,
                                        sliding_window=window, num_splits=counts[1:2], num_programs=24,
                                        num_active=counts[0:1], out=out,
                                        items=split_items(splits, DEVICE))
    ref = reference_attention(q, cache, meta, 0.2, window)
    assert relative_error(out.cpu(), ref) < BOUND[dtype]


def test_balanced_splits_even_out_the_items_and_fit_the_room() -> None:
    import numpy as np

    paged_decode, *_ = _kernels()
    uniform = paged_decode.balanced_split_counts(np.full(3, 1024), target_items=66, room=66)
    assert uniform.tolist() == [16] * 3 == [paged_decode.choose_num_splits(3, 8, 1024, 132)] * 3
    assert paged_decode.balanced_split_counts(np.full(256, 1024), 66, 256).tolist() == [1] * 256
    ragged = np.array([2000] + [100] * 28)  # one long conversation among short ones
    splits = paged_decode.balanced_split_counts(ragged, target_items=66, room=58)
    tiles = -(-ragged // 64)
    assert splits[0] > 1 and (splits[1:] == 1).all() and splits.sum() <= 58
    assert (-(-tiles // splits)).max() == 2  # no item reads more than 2 tiles (two splits for all: 16)
    tight = paged_decode.balanced_split_counts(ragged, target_items=66, room=30)
    assert tight.sum() <= 30 and tight[0] >= 2
    starts, seq = np.zeros(30, dtype=np.int32), np.zeros(64, dtype=np.int32)
    assert paged_decode.fill_split_items(tight, starts, seq) == tight.sum()
    assert starts[:3].tolist() == [0, int(tight[0]), int(tight[0]) + 1]
    assert seq[:int(tight[0]) + 1].tolist() == [0] * int(tight[0]) + [1]
    with pytest.raises(ValueError, match="do not fit"):
        paged_decode.balanced_split_counts(ragged, 66, room=10)


def test_choose_num_splits_fills_four_waves_without_passing_them() -> None:
    paged_decode, *_ = _kernels()
    assert paged_decode.choose_num_splits(1, 8, 1024, 132) == 16  # limited by the context length (64-key tiles)
    assert paged_decode.choose_num_splits(1, 8, 65536, 132) == 32  # capped
    assert paged_decode.choose_num_splits(64, 8, 1024, 132) == 1  # the batch fills the GPU already
    for n in (1, 3, 12, 17, 32, 200):
        s = paged_decode.choose_num_splits(n, 8, 65536, 132)
        assert n * s * 8 <= 4 * 132 or s == 1
        assert s == 32 or n * (s + 1) * 8 > 4 * 132


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_rmsnorm(dtype: torch.dtype, with_residual: bool) -> None:
    from tests.support.kernel_cases import reference_rmsnorm, relative_error

    _, _, rmsnorm, *_ = _kernels()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 96, generator=gen).to(dtype).to(DEVICE)
    res = torch.randn(7, 96, generator=gen).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype).to(DEVICE)
    if with_residual:
        out, summed = rmsnorm.fused_rmsnorm(x, w, 1e-6, res)
        ref, ref_sum = reference_rmsnorm(x.cpu(), w.cpu(), 1e-6, res.cpu())
        if DEVICE == "cuda" or dtype == torch.float32:
            assert torch.equal(summed.cpu(), ref_sum)  # same rounding as the reference's add
        else:  # the interpreter truncates float32 -> bfloat16 instead of rounding to nearest
            assert relative_error(summed.cpu(), ref_sum) < BOUND[dtype]
    else:
        out = rmsnorm.fused_rmsnorm(x, w, 1e-6)
        ref = reference_rmsnorm(x.cpu(), w.cpu(), 1e-6)
    assert relative_error(out.cpu(), ref) < BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    from tests.support.kernel_cases import reference_silu_mul, relative_error

    *_, activation, _ = _kernels()
    x = torch.randn(5, 2 * 1500, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEVICE)
    assert relative_error(activation.silu_and_mul(x).cpu(), reference_silu_mul(x.cpu())) < BOUND[dtype]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(("n", "k"), [(37, 96), (8, 1100), (129, 2048)])  # ragged columns, K past one slice
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skinny_linear(dtype: torch.dtype, n: int, k: int, gated: bool) -> None:
    from pdserve.engine.kernels.skinny_gemm import skinny_linear
    from tests.support.kernel_cases import reference_silu_mul, relative_error

    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, 2 * k if gated else k, generator=gen).to(dtype)
    weight = torch.randn(n, k, generator=gen).to(dtype)
    product_input = reference_silu_mul(x) if gated else x
    ref = product_input.double() @ weight.double().T
    out = skinny_linear(x.to(DEVICE), weight.to(DEVICE), gated=gated)
    assert out.shape == (1, n) and out.dtype == dtype
    assert relative_error(out.cpu(), ref) < BOUND[dtype]


@pytest.mark.parametrize("store_key", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_write_cache(dtype: torch.dtype, store_key: bool) -> None:
    from pdserve.engine.model.hf_config import RopeSpec
    from pdserve.engine.model.layers import RotaryEmbedding
    from tests.support.kernel_cases import relative_error

    *_, rope_cache = _kernels()
    gen = torch.Generator().manual_seed(5)
    tokens, heads, kv_heads, dim, bs, blocks = 11, 8, 2, 32, 4, 9
    rotary = RotaryEmbedding(RopeSpec(theta=10000.0, rope_type="llama3", factor=8.0,
                                      original_max_position_embeddings=16), dim)
    rotary.build(64, torch.device(DEVICE))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    positions = torch.randint(0, 64, (tokens,), generator=gen).to(DEVICE)
    slots = (torch.randperm((blocks - 1) * bs, generator=gen)[:tokens] + bs).to(DEVICE)
    cache = torch.randn(2, blocks, bs, kv_heads, dim, generator=gen).to(dtype).to(DEVICE)
    expected_cache = cache.clone()
    q32, k32 = rotary(positions, q.float(), k.float())
    flat = expected_cache.view(2, -1, kv_heads, dim)
    flat[0, slots] = k32.to(dtype)
    flat[1, slots] = v
    q_in, k_in = q.clone(), k.clone()
    rope_cache.rope_and_write_cache(q, k, v, positions, rotary.cos, rotary.sin, cache, slots, store_key=store_key)
    assert relative_error(q.cpu(), q32.cpu()) < BOUND[dtype]
    if store_key:
        assert relative_error(k.cpu(), k32.cpu()) < BOUND[dtype]
    else:
        assert torch.equal(k, k_in)
    assert relative_error(cache.cpu(), expected_cache.cpu()) < BOUND[dtype]
    untouched = torch.ones(blocks * bs, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert torch.equal(cache.view(2, -1, kv_heads, dim)[:, untouched.to(DEVICE)].cpu(),
                       expected_cache.view(2, -1, kv_heads, dim)[:, untouched.to(DEVICE)].cpu())
    assert not torch.equal(q_in, q)
