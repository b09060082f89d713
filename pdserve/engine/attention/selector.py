"""Choose an attention backend for a device: the fastest that imports and runs there.

``auto``: on CUDA, vllm-flash-attn when it imports (an optional extra that pins torch 2.4), else the
Triton kernels; on the CPU, the torch reference. ``triton`` on the CPU is allowed only under Triton's
interpreter (``TRITON_INTERPRET=1``), which the tests use to check the GPU path without a GPU.
"""

from __future__ import annotations

import logging

import torch

from pdserve.engine.attention.backend import AttentionBackend
from pdserve.engine.attention.torch_ref import TorchReferenceBackend
from pdserve.engine.kernels import interpreting, triton_available

logger = logging.getLogger(__name__)


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """``name`` is ``auto``, ``torch``, ``triton`` or ``flash_attn`` (see ``EngineConfig``)."""
    if name == "torch":
        return TorchReferenceBackend()
    gpu_capable = device.type == "cuda" or (interpreting() and name == "triton")
    if name == "auto" and device.type != "cuda":
        return TorchReferenceBackend()
    if not gpu_capable:
        raise ValueError(f"attention_backend={name!r} needs a CUDA device; this engine runs on {device}")
    if name in ("auto", "flash_attn"):
        from pdserve.engine.attention.flash_attn_backend import flash_attn_backend_or_none

        backend = flash_attn_backend_or_none()
        if backend is not None:
            return backend
        if name == "flash_attn":
            raise ValueError("attention_backend='flash_attn' needs vllm-flash-attn, which does not import here")
    if not triton_available():
        if name == "triton":
            raise ValueError("attention_backend='triton' needs the triton package")
        logger.warning("triton is not installed; falling back to the (slow) torch reference attention")
        return TorchReferenceBackend()
    from pdserve.engine.attention.triton_backend import TritonBackend

    return TritonBackend()
