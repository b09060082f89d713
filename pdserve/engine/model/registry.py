"""Architecture name (``config.json``'s ``architectures[0]``) -> the class that implements it."""

from __future__ import annotations

from pdserve.common.errors import ModelLoadError
from pdserve.engine.model.decoder import DecoderForCausalLM
from pdserve.engine.model.llama import LlamaForCausalLM, MistralForCausalLM
from pdserve.engine.model.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

ARCHITECTURES: dict[str, type[DecoderForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class_for(architecture: str, source: str) -> type[DecoderForCausalLM]:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ModelLoadError(f"{source}: architecture {architecture!r} is not supported; supported: "
                             f"{', '.join(sorted(ARCHITECTURES))}") from None
