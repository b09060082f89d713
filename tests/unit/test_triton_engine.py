"""The whole engine on the GPU path (Triton attention, fused RoPE/cache write, fused norms and
activation, decode-first mixed batches, split-KV decode) gives transformers' greedy tokens.

Runs anywhere: without CUDA the Triton kernels run in the CPU interpreter (float32, tiny shapes).
"""

from __future__ import annotations

import random

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.kernels import triton_available
from tests.support.hf_models import hf_greedy, make_hf_model

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3")
    hf = make_hf_model("qwen3", directory)
    rng = random.Random(11)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (3, 21, 9, 34)]
    return directory, prompts, [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]


@pytest.mark.parametrize(("budget", "num_sms"), [(256, 1), (8, 64)])
def test_triton_engine_matches_transformers(reference, budget: int, num_sms: int) -> None:
    directory, prompts, expected = reference
    llm = LLM(model=str(directory), attention_backend="triton", dtype="float32", max_model_len=128,
              num_kv_blocks=64, block_size=8, max_num_batched_tokens=budget)
    llm.engine.runner.set_num_sms(num_sms)  # many SMs -> decode splits the KV (flash-decoding path)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == expected
    # a second round hits the prefix cache: prefill then reads earlier KV from the paged cache
    again = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in again] == expected
    assert max(o.num_cached_tokens for o in again) > 0


def test_one_sequence_takes_the_single_row_products(reference, monkeypatch: pytest.MonkeyPatch) -> None:
    """One prompt at a time: its last prefill row's logits and every decode step run the one-row GEMV in
    every projection (gated for ``down_proj``) and the LM head, and still give transformers' tokens."""
    from pdserve.engine.kernels import skinny_gemm

    calls = {"plain": 0, "gated": 0}
    original = skinny_gemm.skinny_linear

    def counted(x, weight, gated=False):  # noqa: ANN001, ANN202
        calls["gated" if gated else "plain"] += 1
        return original(x, weight, gated)

    monkeypatch.setattr(skinny_gemm, "skinny_linear", counted)
    directory, prompts, expected = reference
    llm = LLM(model=str(directory), attention_backend="triton", dtype="float32", max_model_len=128,
              num_kv_blocks=64, block_size=8, enforce_eager=True)  # on a GPU: every step calls the kernels
    for prompt, tokens in zip(prompts[:2], expected[:2], strict=True):
        assert llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0].token_ids == tokens
    layers = llm.engine.spec.num_layers
    decode_steps = 2 * (GREEDY.max_tokens - 1)
    assert calls["gated"] >= decode_steps * layers
    assert calls["plain"] >= decode_steps * (3 * layers + 1) + 2  # qkv, o, gate_up per layer; LM head; prompts


@pytest.mark.parametrize(("async_scheduling", "larger", "balanced"),
                         [(False, False, False), (True, False, False), (True, True, False), (True, False, True)])
def test_graph_shaped_steps_match_transformers(reference, async_scheduling: bool, larger: bool, balanced: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step runs with the launch shape its CUDA graph would have (rows padded to the captured
    size, fixed decode and prefill grids reading live counts from the device): prefill-only, mixed and
    decode steps still give transformers' tokens; also when each step takes the largest graph instead
    (``larger``: a graph slower than a larger one is skipped, ``StepGraphs.time_replays``); decodes and
    prompt chunks split along the KV as each step chooses -- every decode alike, or (``balanced``) each by
    its own context. (No CUDA graph on the CPU; the shapes are the point.)"""
    from functools import partial

    from pdserve.common.graph_sizes import capture_sizes
    from pdserve.engine import kv_splits
    from pdserve.engine.kernels import paged_decode

    monkeypatch.setattr(kv_splits, "PREFILL_SPLIT_KEYS", 16)  # the tiny prompts' chunks split too
    # short contexts: decodes split four ways, some splits empty
    monkeypatch.setattr(kv_splits.KVSplitRule, "decode_splits", lambda self, num_decodes, max_seq_len: 4)
    monkeypatch.setattr(kv_splits, "BALANCED_DECODE_SPLITS", balanced)
    monkeypatch.setattr(kv_splits, "RAGGED_CONTEXT_FACTOR", 0.0)  # the tiny contexts count as ragged
    # balanced: counted in 8-key tiles, so the tiny contexts split (into items of unequal length)
    monkeypatch.setattr(kv_splits, "balanced_split_counts", partial(paged_decode.balanced_split_counts, block_n=8))

    directory, prompts, expected = reference
    llm = LLM(model=str(directory), attention_backend="triton", dtype="float32", max_model_len=512,
              num_kv_blocks=80, block_size=8, max_num_batched_tokens=20, max_num_seqs=8,
              async_scheduling=async_scheduling, enforce_eager=True)  # on a GPU: the shapes above, no graphs
    runner = llm.engine.runner
    runner.set_num_sms(64)  # wide graph decode grids
    sizes = capture_sizes(8, 20)
    shapes = []

    def graph_shaped(counts):  # noqa: ANN001, ANN202
        shape = runner.graph_shape(sizes[-1] if larger else next(s for s in sizes if s >= counts.num_tokens))
        shapes.append((counts, shape))
        return shape

    splits = []

    def recorded_splits(counts, launch):  # noqa: ANN001, ANN202
        splits.append(runner.kv_splits(counts, launch))
        return splits[-1]

    runner._eager_shape = graph_shaped
    runner.inputs.kv_splits = recorded_splits
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert any(c.num_tokens < s.num_tokens for c, s in shapes)  # padded rows
    assert any(c.num_decodes and c.num_query_tiles for c, _ in shapes)  # mixed steps
    assert any(c.num_decodes < s.decode_capacity for c, s in shapes)  # decode grids wider than live
    assert any(decode.max(initial=1) > 1 for decode, _ in splits) and any(prefill > 1 for _, prefill in splits)
    assert any(len(set(decode.tolist())) > 1 for decode, _ in splits) == balanced  # decodes split unequally
