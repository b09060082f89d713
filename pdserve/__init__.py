"""pdserve: disaggregated prefill/decode LLM serving.

Public face (imported lazily, so ``import pdserve`` stays cheap and torch-free until needed)::

    from pdserve import LLM, SamplingParams, RequestOutput
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": ("pdserve.engine.llm", "LLM"),
    "LLMEngine": ("pdserve.engine.engine", "LLMEngine"),
    "EngineConfig": ("pdserve.common.config", "EngineConfig"),
    "SamplingParams": ("pdserve.common.sampling_params", "SamplingParams"),
    "RequestOutput": ("pdserve.common.outputs", "RequestOutput"),
    "FinishReason": ("pdserve.common.outputs", "FinishReason"),
}

__all__ = ["LLM", "EngineConfig", "FinishReason", "LLMEngine", "RequestOutput", "SamplingParams"]

if TYPE_CHECKING:
    from pdserve.common.config import EngineConfig
    from pdserve.common.outputs import FinishReason, RequestOutput
    from pdserve.common.sampling_params import SamplingParams
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.llm import LLM


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'pdserve' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
