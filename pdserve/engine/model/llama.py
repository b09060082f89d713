"""The Llama family: Llama 2, Llama 3 / 3.1 (``llama3`` RoPE scaling) and Mistral (sliding window)."""

from __future__ import annotations

from typing import Any

from pdserve.engine.model.decoder import DecoderForCausalLM
from pdserve.engine.model.hf_config import ModelSpec, parse_model_spec


class LlamaForCausalLM(DecoderForCausalLM):
    """``attention_bias`` in the config puts a bias on q, k, v and o; ``mlp_bias`` on the MLP."""

    @classmethod
    def spec_from_config(cls, config: dict[str, Any], source: str) -> ModelSpec:
        return parse_model_spec(config, source)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama's layout; the config's ``sliding_window`` (when set) limits how far back attention reads."""
