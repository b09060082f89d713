"""Tensor parallelism on GPUs (two ranks on threads of one process, each on its own GPU, all-reduce over
NCCL): a model split over cuda:0 and cuda:1 generates what the unsplit model does on cuda:0, token for
token, with chunked prefill, mixed steps and prefix hits, through every rank's CUDA graphs and eagerly;
and each rank's weights and KV cache sit on its own GPU."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve import LLM, SamplingParams
from tests.support.hf_models import make_hf_model

pytestmark = pytest.mark.multigpu


@pytest.mark.parametrize(("kind", "eager", "peer_bytes"), [
    ("llama31", False, 0), ("llama31", True, 0), ("qwen3", False, 0),
    ("qwen2", False, 0),  # qwen2: one KV head for two ranks
    ("llama31", False, 4096), ("llama31", True, 4096),  # small all-reduces through the peer kernel, large ones NCCL
])
def test_two_gpu_ranks_generate_what_one_gpu_does(kind: str, eager: bool, peer_bytes: int,
                                                  tmp_path) -> None:  # noqa: ANN001
    """Every step (at most 64 tokens) replays each rank's CUDA graph; with ``enforce_eager`` none does.
    With ``peer_all_reduce_max_bytes`` the decode steps' all-reduces go through the one-shot peer kernel
    and the longer steps' through NCCL, in one run."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    make_hf_model(kind, tmp_path) if kind == "llama31" else make_hf_model(kind, tmp_path, head_dim=64)
    rng = random.Random(7)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 7, 33, 100, 250, 17)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    kwargs = dict(model=str(tmp_path), device="cuda:0", dtype="float32", max_model_len=512, block_size=16,
                  num_kv_blocks=256, max_num_seqs=16, max_num_batched_tokens=64)  # chunked prefill + decodes
    one = LLM(**kwargs)
    two = LLM(tensor_parallel_size=2, enforce_eager=eager, peer_all_reduce_max_bytes=peer_bytes, **kwargs)
    ranks = two.engine.model.ranks
    assert (two.engine.model._rendezvous.peer is not None) == bool(peer_bytes)
    assert [next(r.parameters()).device for r in ranks] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert [caches[0].device for caches in two.engine.model.kv_caches] == [torch.device("cuda", 0),
                                                                            torch.device("cuda", 1)]
    for _ in range(2):  # the second round hits the prefix cache
        expected = [o.token_ids for o in one.generate(prompt_token_ids=prompts, sampling_params=params)]
        got = [o.token_ids for o in two.generate(prompt_token_ids=prompts, sampling_params=params)]
        assert got == expected
    runner = two.engine.runner
    assert (runner.num_graph_steps > 0) == (not eager)
    assert len(runner.inputs.ranks) == (0 if eager else 1)


def test_two_gpu_ranks_size_their_kv_cache_from_gpu_memory(tmp_path) -> None:  # noqa: ANN001
    """Without ``num_kv_blocks`` the engine sizes its cache by running the largest step into temporary
    caches: every rank takes part (each into its own), then each keeps a cache of the sized shape."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    make_hf_model("llama31", tmp_path)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 33, 2] * 10, [7] * 3]
    kwargs = dict(model=str(tmp_path), device="cuda:0", dtype="float32", max_model_len=512, block_size=16,
                  max_num_seqs=8, max_num_batched_tokens=256, gpu_memory_utilization=0.3)
    two = LLM(tensor_parallel_size=2, **kwargs)
    caches = two.engine.model.kv_caches
    assert caches[0][0].shape == caches[1][0].shape and caches[1][0].device == torch.device("cuda", 1)
    one = LLM(**kwargs)
    assert ([o.token_ids for o in two.generate(prompt_token_ids=prompts, sampling_params=params)]
            == [o.token_ids for o in one.generate(prompt_token_ids=prompts, sampling_params=params)])
