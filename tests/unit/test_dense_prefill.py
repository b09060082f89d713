"""Dense (fused-attention) prefill at bucketed lengths: the zero rows added never change a real row."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.attention.dense_prefill import (
    dense_length,
    dense_lengths,
    dense_prefill,
    takes_dense_prefill,
)


def test_bucketed_lengths_cover_every_length_with_at_most_an_eighth_more() -> None:
    lengths = dense_lengths(8192)
    assert lengths == sorted(set(lengths)) and lengths[-1] == 8192 and len(lengths) == 40
    for n in range(1, 8193):
        padded = dense_length(n)
        assert padded in lengths and n <= padded and (padded - n < 64 or padded - n <= n / 8)


def test_only_few_long_chunks_take_the_fused_attention() -> None:
    assert takes_dense_prefill(1, 1100)  # one long prompt: the fused kernel's speed pays
    assert takes_dense_prefill(2, 4096) and takes_dense_prefill(8, 8192)
    assert not takes_dense_prefill(3, 1254)  # a few short chat prompts: one Triton launch per layer instead
    assert not takes_dense_prefill(9, 16384)  # too many chunks, however long
    assert not takes_dense_prefill(0, 0)


def test_padded_chunks_equal_plain_causal_attention() -> None:
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 16
    bounds = [(0, 3), (3, 70), (70, 200), (200, 201)]  # lengths 3, 67, 130, 1: all padded
    total = bounds[-1][1]
    qkv = torch.randn(total, (heads + 2 * kv_heads) * dim)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)  # strided rows, as in the model
    q, k, v = q.view(total, heads, dim), k.view(total, kv_heads, dim), v.view(total, kv_heads, dim)
    out = torch.full_like(q, float("nan"))
    dense_prefill(q, k, v, bounds, out, scale=0.3)
    for start, end in bounds:
        expected = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).unsqueeze(0), k[start:end].transpose(0, 1).unsqueeze(0),
            v[start:end].transpose(0, 1).unsqueeze(0), is_causal=True, scale=0.3, enable_gqa=True)
        torch.testing.assert_close(out[start:end], expected.squeeze(0).transpose(0, 1), rtol=1e-5, atol=1e-5)
