"""Choose an attention backend for a device: the fastest that imports and runs there."""

from __future__ import annotations

import torch

from pdserve.engine.attention.backend import AttentionBackend
from pdserve.engine.attention.torch_ref import TorchReferenceBackend


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """``name`` is ``auto``, ``torch``, ``triton`` or ``flash_attn`` (see ``EngineConfig``)."""
    if name in ("auto", "torch") or device.type != "cuda":
        if name not in ("auto", "torch"):
            raise ValueError(f"attention_backend={name!r} needs a CUDA device; this engine runs on {device}")
        return TorchReferenceBackend()
    raise ValueError(f"attention backend {name!r} is not available in this build")
