"""Tiny random checkpoints of every supported family, written with transformers' ``save_pretrained``.

transformers is the reference implementation: tests load the same directory into transformers and into
pdserve and compare logits and greedy generations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pdserve.engine.byte_tokenizer import write_byte_tokenizer

COMMON: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=256,
    eos_token_id=257,
    initializer_range=0.2,
)

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama31": ("LlamaConfig", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                "rope_theta": 500000.0}),
    "llama_tied_mha": ("LlamaConfig", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "mistral": ("MistralConfig", {"sliding_window": 12, "head_dim": 16}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
}


def make_hf_model(kind: str, directory: Path, *, max_shard_size: str | None = None, seed: int = 0,
                  **overrides: Any) -> Any:
    """Build a random transformers model of ``kind``, save it (and a byte tokenizer) to ``directory``."""
    import transformers

    config_cls_name, extra = FAMILIES[kind]
    kwargs = {**COMMON, **extra, **overrides}
    config = getattr(transformers, config_cls_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(directory, **save_kwargs)
    write_byte_tokenizer(directory)
    return model


def rewrite_config_as_transformers4(directory: Path) -> None:
    """Rewrite config.json the way transformers 4.x wrote it (rope_theta / rope_scaling, torch_dtype)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    params = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = params.pop("rope_theta", 10000.0)
    config["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    path.write_text(json.dumps(config, indent=2))


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by transformers (one prompt, no padding), without EOS stopping."""
    ids = torch.tensor([prompt])
    with torch.no_grad():  # an explicit all-ones mask: otherwise a prompt token equal to pad is masked out
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=model.config.vocab_size - 1,
                             min_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()
