"""Parse a Hugging Face ``config.json`` into :class:`ModelSpec`, the engine's view of an architecture.

Accepts both dialects transformers writes: 4.x (``rope_theta`` + ``rope_scaling``, ``torch_dtype``) and
5.x (``rope_parameters`` holding ``rope_theta``, ``dtype``). Family-specific flags (QKV bias, q/k norm)
come from the model family's adapter (``llama.py``, ``qwen.py``); this module only reads the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.common.errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding parameters (``rope_type`` as transformers names it)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Everything the decoder needs to know about an architecture; one per model directory."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    checkpoint_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied); used by benchmarks for byte counts."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        per_layer = attn + 3 * h * i + 2 * h
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h


def read_config_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: no such model directory (expected a local Hugging Face model "
                             f"directory holding config.json and *.safetensors, or the name 'tiny-random')")
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing; a model directory needs a config.json as transformers "
                             f"writes it with save_pretrained")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object at the top level")
    return data


def architecture_of(config: dict[str, Any], source: str) -> str:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ModelLoadError(f"{source}: 'architectures' must be a non-empty list of class names, "
                             f"such as [\"LlamaForCausalLM\"]")
    return archs[0]


def parse_rope(config: dict[str, Any], source: str) -> RopeSpec:
    """Read RoPE settings from either ``rope_parameters`` (5.x) or ``rope_theta``+``rope_scaling`` (4.x)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]  # per-layer-type form; all our families use full attention
    if not isinstance(params, dict):
        params = dict(config.get("rope_scaling") or {})
        if "rope_theta" in config:
            params.setdefault("rope_theta", config["rope_theta"])
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    try:
        original = params.get("original_max_position_embeddings")
        return RopeSpec(
            theta=float(params.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(original) if original is not None else None,
        )
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: bad rope parameters {params!r} ({exc})") from None


def parse_model_spec(config: dict[str, Any], source: str, *, attention_bias: bool | None = None,
                     qk_norm: bool = False) -> ModelSpec:
    """Common fields of Llama-like decoders. ``attention_bias=None`` reads it from the config."""

    def need(key: str) -> Any:
        if key not in config:
            raise ModelLoadError(f"{source}: missing required key {key!r}")
        return config[key]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ModelLoadError(f"{source}: num_attention_heads ({heads}) must be a multiple of "
                             f"num_key_value_heads ({kv_heads})")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
    sliding = config.get("sliding_window")
    if config.get("use_sliding_window") is False:
        sliding = None  # Qwen2/3 write a window but do not use it unless asked
    elif config.get("use_sliding_window") is True:
        raise ModelLoadError(f"{source}: use_sliding_window=true (per-layer sliding windows) is not supported")
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    return ModelSpec(
        architecture=architecture_of(config, source),
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        rope=parse_rope(config, source),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)) if attention_bias is None else attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=qk_norm,
        sliding_window=int(sliding) if sliding else None,
        checkpoint_dtype=config.get("dtype") or config.get("torch_dtype"),
        bos_token_id=config.get("bos_token_id") if isinstance(config.get("bos_token_id"), int) else None,
        eos_token_ids=eos_ids,
    )
