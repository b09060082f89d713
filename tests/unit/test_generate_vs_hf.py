"""Greedy generations through the whole engine equal transformers', token for token, under every
scheduling situation: mixed-length batches, chunked prefill, prefix-cache hits and preemption."""

from __future__ import annotations

import random

import pytest

from pdserve import LLM, SamplingParams
from tests.support.hf_models import hf_greedy, make_hf_model

MAX_TOKENS = 20
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama31", "qwen3"])
def reference(request, tmp_path_factory):
    """(model directory, HF model, prompts, HF greedy continuations)."""
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, directory)
    rng = random.Random(7)
    shared = [rng.randrange(256) for _ in range(24)]
    lengths = [3, 17, 40, 9, 31, 1, 26, 12]
    prompts = [[rng.randrange(256) for _ in range(n)] for n in lengths]
    prompts += [shared + [rng.randrange(256) for _ in range(n)] for n in (5, 11)]  # a shared 24-token prefix
    expected = [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]
    return directory, prompts, expected


def _generate(directory, prompts, **engine_kwargs) -> tuple[LLM, list[list[int]]]:
    llm = LLM(model=str(directory), **{"max_model_len": 256, **engine_kwargs})
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert all(o.finish_reason == "length" for o in outs)
    return llm, [o.token_ids for o in outs]


def test_mixed_length_batch(reference) -> None:
    directory, prompts, expected = reference
    _, got = _generate(directory, prompts, num_kv_blocks=128)
    assert got == expected


def test_chunked_prefill_small_token_budget(reference) -> None:
    directory, prompts, expected = reference
    llm, got = _generate(directory, prompts, num_kv_blocks=128, max_num_batched_tokens=7, block_size=4)
    assert got == expected
    assert llm.engine.runner.num_forward_tokens >= sum(map(len, prompts))


def test_without_chunked_prefill(reference) -> None:
    directory, prompts, expected = reference
    _, got = _generate(directory, prompts, num_kv_blocks=128, enable_chunked_prefill=False,
                       max_num_batched_tokens=256)
    assert got == expected


def test_prefix_cache_hits(reference) -> None:
    directory, prompts, expected = reference
    llm = LLM(model=str(directory), max_model_len=256, num_kv_blocks=128, block_size=8)
    first = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    tokens_before = llm.engine.runner.num_forward_tokens
    second = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in first] == expected
    assert [o.token_ids for o in second] == expected
    # requests admitted in the same step cannot share KV that is not computed yet
    assert all(o.num_cached_tokens == 0 for o in first)
    # second round: every full block of every prompt (but the last token) is served from the cache
    for prompt, out in zip(prompts, second):
        assert out.num_cached_tokens == (len(prompt) - 1) // 8 * 8
    assert llm.engine.runner.num_forward_tokens - tokens_before < tokens_before
    # a new prompt sharing the 24-token prefix reuses its three full blocks
    fresh = prompts[-1][:24] + [1, 2, 3]
    out = llm.generate(prompt_token_ids=[fresh], sampling_params=GREEDY)[0]
    assert out.num_cached_tokens == 24


def test_preemption_under_a_small_kv_pool(reference) -> None:
    directory, prompts, expected = reference
    # 16 usable blocks of 4 = 64 tokens: far less than the batch needs at once, enough for any one request
    llm, got = _generate(directory, prompts, num_kv_blocks=17, block_size=4, max_model_len=64)
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == expected


def test_preemption_without_prefix_caching(reference) -> None:
    directory, prompts, expected = reference
    llm, got = _generate(directory, prompts, num_kv_blocks=17, block_size=4, max_model_len=64,
                         enable_prefix_caching=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == expected
