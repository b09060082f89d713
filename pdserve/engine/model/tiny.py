"""The built-in ``tiny-random`` model: a 2-layer Llama with deterministic random weights and a byte
tokenizer, written once as a real Hugging Face directory and then loaded like any other model.

Going through the directory (config.json, model.safetensors, tokenizer.json) means the demo, the
tests and workers in other processes exercise the same loading path as real checkpoints, and every
process on every machine sees bit-identical weights (they come from a seeded CPU generator).

Only printable ASCII bytes and newline get non-zero output-embedding rows, so greedy decoding prints
readable (if meaningless) text rather than invalid UTF-8.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from pdserve.engine.byte_tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, write_byte_tokenizer

TINY_VERSION = "v1"
TINY_CONFIG: dict = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": BYTE_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "torch_dtype": "float32",
}


def cache_root() -> Path:
    """``$PDSERVE_CACHE_DIR``, else ``~/.cache/pdserve``."""
    return Path(os.environ.get("PDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pdserve")


def tiny_random_weights() -> dict[str, torch.Tensor]:
    """Deterministic float32 weights under Hugging Face Llama names."""
    c = TINY_CONFIG
    gen = torch.Generator().manual_seed(20251122)
    h, i, v, d = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d

    def rand(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    weights = {"model.embed_tokens.weight": rand(v, h, std=1.0), "model.norm.weight": torch.ones(h)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        weights |= {
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": rand(q, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, q),
            p + "mlp.gate_proj.weight": rand(i, h),
            p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
        }
    lm_head = rand(v, h, std=0.5)
    printable = torch.zeros(v, dtype=torch.bool)
    printable[32:127] = True
    printable[ord("\n")] = True
    printable[EOS_ID] = True
    weights["lm_head.weight"] = torch.where(printable[:, None], lm_head, torch.zeros_like(lm_head))
    return weights


def ensure_tiny_random(root: Path | None = None) -> Path:
    """Return the tiny model's directory, writing it first if absent (atomic: safe under concurrency)."""
    target = (root or cache_root()) / f"tiny-random-{TINY_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-random-", dir=target.parent))
    try:
        (staging / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
        (staging / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS_ID, "bos_token_id": BOS_ID}))
        save_file(tiny_random_weights(), str(staging / "model.safetensors"), metadata={"format": "pt"})
        write_byte_tokenizer(staging)
        with contextlib.suppress(OSError):  # another process won the race; its copy is identical
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
