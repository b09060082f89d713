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
    llm.engine.runner.num_sms = num_sms  # many SMs -> decode splits the KV (flash-decoding path)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == expected
    # a second round hits the prefix cache: prefill then reads earlier KV from the paged cache
    again = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in again] == expected
    assert max(o.num_cached_tokens for o in again) > 0
