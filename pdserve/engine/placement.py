"""Where an engine's model lives: one model on the engine's device, or tensor-parallel ranks on
consecutive devices (:mod:`pdserve.engine.tensor_parallel`), each built with its share of the weights;
and the attention plans every one of those devices needs before serving.

Lifecycle: :func:`place_model` once at engine start-up (returns the model the runner drives);
:func:`prepare_attention` after the KV cache exists, on every rank's device.
"""

from __future__ import annotations

import torch

from pdserve.common.config import EngineConfig
from pdserve.engine.attention.backend import AttentionBackend
from pdserve.engine.device import on_device
from pdserve.engine.model.decoder import DecoderForCausalLM
from pdserve.engine.model.interface import CausalLM
from pdserve.engine.model.loader import ModelSource, build_model
from pdserve.engine.model.parallel import SINGLE, TensorParallel
from pdserve.engine.tensor_parallel import TensorParallelModel


def place_model(source: ModelSource, backend: AttentionBackend, dtype: torch.dtype, devices: list[torch.device],
                config: EngineConfig, max_model_len: int) -> CausalLM:
    """The model on ``devices[0]``, or split over every device of ``devices`` (one rank each)."""

    def build(tp: TensorParallel = SINGLE) -> DecoderForCausalLM:
        with on_device(devices[tp.rank]):
            return build_model(source, backend=backend, dtype=dtype, device=devices[tp.rank], tp=tp,
                               load_format=config.load_format, max_positions=max_model_len, seed=config.seed)

    if len(devices) == 1:
        return build()
    return TensorParallelModel.build(build, devices, config.peer_all_reduce_max_bytes,
                                     norm_widths=(source.spec.hidden_size,) if config.peer_all_reduce_fuse_norm else ())


def prepare_attention(backend: AttentionBackend, model: CausalLM, dtype: torch.dtype, devices: list[torch.device],
                      max_tokens: int) -> float:
    """Build the backend's plans for a rank's heads on every device; returns the seconds it took."""
    local = model.spec
    seconds = 0.0
    for device in dict.fromkeys(devices):
        with on_device(device):
            seconds += backend.prepare(local.num_heads, local.num_kv_heads, local.head_dim, dtype, device, max_tokens,
                                       local.sliding_window)
    return seconds
