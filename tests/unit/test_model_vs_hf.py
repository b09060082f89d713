"""Our decoder's logits equal transformers' (float32, 1e-4 relative) for every supported family."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.common.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from tests.support.engine_probe import prompt_logits
from tests.support.hf_models import FAMILIES, make_hf_model, rewrite_config_as_transformers4

RTOL = 1e-4


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def _hf_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


def _prompts(rng: random.Random, lengths: list[int], vocab: int = 256) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_logits_match_transformers(kind: str, tmp_path) -> None:
    hf = make_hf_model(kind, tmp_path)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), num_kv_blocks=64, max_model_len=256))
    prompts = _prompts(random.Random(kind), [1, 7, 16, 33, 50])
    for prompt, ours in zip(prompts, prompt_logits(engine, prompts)):
        assert _relative_error(ours, _hf_logits(hf, prompt)) < RTOL


@pytest.mark.parametrize("kind", ["llama31", "qwen3", "mistral"])
def test_chunked_prefill_logits_match(kind: str, tmp_path) -> None:
    """Chunks that read earlier KV from the paged cache give the same logits as one pass."""
    hf = make_hf_model(kind, tmp_path)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), num_kv_blocks=64, max_model_len=256, block_size=8))
    prompts = _prompts(random.Random(1), [45, 30, 17])
    for prompt, ours in zip(prompts, prompt_logits(engine, prompts, chunk_sizes=[5, 11, 3])):
        assert _relative_error(ours, _hf_logits(hf, prompt)) < RTOL


def test_sharded_checkpoint_and_transformers4_config(tmp_path) -> None:
    hf = make_hf_model("llama31", tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    rewrite_config_as_transformers4(tmp_path)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), num_kv_blocks=32, max_model_len=128))
    assert engine.spec.rope.rope_type == "llama3"
    prompt = _prompts(random.Random(2), [40])[0]
    assert _relative_error(prompt_logits(engine, [prompt])[0], _hf_logits(hf, prompt)) < RTOL
