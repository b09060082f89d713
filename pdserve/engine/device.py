"""Resolve the engine's device, dtype and context length from the config and the checkpoint."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from pdserve.common.config import EngineConfig
from pdserve.common.errors import ConfigError
from pdserve.engine.model.hf_config import ModelSpec

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{name!r} was asked for but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def on_device(device: torch.device) -> AbstractContextManager[Any]:
    """Make ``device`` this thread's current CUDA device inside the block (Triton and cuDNN launch on
    the current device); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """The device of each of ``size`` tensor-parallel ranks: all ``device`` on the CPU, consecutive GPUs
    from ``device`` on CUDA (``ConfigError`` when this process sees too few)."""
    if device.type != "cuda" or size == 1:
        return [device] * size
    first, count = device.index or 0, torch.cuda.device_count()
    if first + size > count:
        raise ConfigError("tensor_parallel_size", f"{size} ranks from {device} need GPUs {first}..{first + size - 1}; "
                          f"this process sees {count} (on a cluster, give the pool gpus_per_worker: {size})")
    return [torch.device("cuda", first + rank) for rank in range(size)]


def resolve_dtype(name: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: the checkpoint's dtype on a GPU (bfloat16 if it names none or float32), float32 on the CPU."""
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    if checkpoint_dtype in ("bfloat16", "float16"):
        return _DTYPES[checkpoint_dtype]
    return torch.bfloat16


def resolve_max_model_len(config: EngineConfig, spec: ModelSpec) -> int:
    if config.max_model_len is None:
        return spec.max_position_embeddings
    if config.max_model_len > spec.max_position_embeddings:
        logger.warning("max_model_len=%d exceeds the model's max_position_embeddings=%d; outputs past it "
                       "may be poor", config.max_model_len, spec.max_position_embeddings)
    return config.max_model_len
