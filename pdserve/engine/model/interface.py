"""What the engine needs of a model: the one interface a single model and a tensor-parallel group share.

:class:`~pdserve.engine.model.decoder.DecoderForCausalLM` is one; so is
:class:`~pdserve.engine.tensor_parallel.TensorParallelModel` (rank 0's model, with the other ranks
following it). The runner, the CUDA graphs and the KV sizing see only this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.model.hf_config import ModelSpec


class CausalLM(Protocol):
    @property
    def spec(self) -> ModelSpec:
        """This rank's shape (its heads and MLP width: all of them with one rank)."""
        ...

    layer_hook: Callable[[int, torch.Tensor], None] | None
    """Called as ``hook(layer_index, kv_cache)`` after each layer wrote its KV (KV streaming)."""

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 metadata: AttentionMetadata) -> torch.Tensor:
        """The final hidden states ``[num_tokens, hidden_size]`` (normalised)."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[rows, vocab_size]`` for the given final hidden states."""
        ...
