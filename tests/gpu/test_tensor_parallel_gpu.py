"""Tensor parallelism on GPUs (two ranks on threads of one process, each on its own GPU, all-reduce over
NCCL): a model split over cuda:0 and cuda:1 generates what the unsplit model does on cuda:0, token for
token, with chunked prefill, mixed steps and prefix hits; and each rank's weights and KV cache sit on
its own GPU."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve import LLM, SamplingParams
from tests.support.hf_models import make_hf_model

pytestmark = pytest.mark.multigpu


@pytest.mark.parametrize("kind", ["llama31", "qwen3", "qwen2"])  # qwen2: one KV head for two ranks
def test_two_gpu_ranks_generate_what_one_gpu_does(kind: str, tmp_path) -> None:  # noqa: ANN001
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    make_hf_model(kind, tmp_path) if kind == "llama31" else make_hf_model(kind, tmp_path, head_dim=64)
    rng = random.Random(7)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 7, 33, 100, 250, 17)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    kwargs = dict(model=str(tmp_path), device="cuda:0", dtype="float32", max_model_len=512, block_size=16,
                  num_kv_blocks=256, max_num_seqs=16, max_num_batched_tokens=64)  # chunked prefill + decodes
    one = LLM(**kwargs)
    two = LLM(tensor_parallel_size=2, **kwargs)
    ranks = two.engine.model.ranks
    assert [next(r.parameters()).device for r in ranks] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert [caches[0].device for caches in two.engine.model.kv_caches] == [torch.device("cuda", 0),
                                                                            torch.device("cuda", 1)]
    for _ in range(2):  # the second round hits the prefix cache
        expected = [o.token_ids for o in one.generate(prompt_token_ids=prompts, sampling_params=params)]
        got = [o.token_ids for o in two.generate(prompt_token_ids=prompts, sampling_params=params)]
        assert got == expected
