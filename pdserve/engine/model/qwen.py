"""The Qwen family: Qwen2 / Qwen2.5 (bias on q, k, v) and Qwen3 (RMSNorm on each head of q and k)."""

from __future__ import annotations

from typing import Any

from pdserve.engine.model.decoder import DecoderForCausalLM
from pdserve.engine.model.hf_config import ModelSpec, parse_model_spec


class Qwen2ForCausalLM(DecoderForCausalLM):
    o_proj_bias_follows_attention_bias = False

    @classmethod
    def spec_from_config(cls, config: dict[str, Any], source: str) -> ModelSpec:
        return parse_model_spec(config, source, attention_bias=True)


class Qwen3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def spec_from_config(cls, config: dict[str, Any], source: str) -> ModelSpec:
        return parse_model_spec(config, source, qk_norm=True)
