"""Choose an attention backend for a device: the fastest that imports and runs there.

``auto``: on CUDA, the Triton kernels (with torch SDPA for prefill chunks without earlier context); on
the CPU, the torch reference. ``flash_attn`` (vllm-flash-attn, an optional extra that pins torch 2.4)
only when asked for by name: it was never run on a GPU here (on the H200 hosts' torch 2.11 it does not
import), so ``auto`` does not pick it. ``triton`` on the CPU is allowed only under Triton's
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
    if name == "flash_attn":
        from pdserve.engine.attention.flash_attn_backend import flash_attn_backend_or_none

        backend = flash_attn_backend_or_none()
        if backend is None:
            raise ValueError("attention_backend='flash_attn' needs vllm-flash-attn, which does not import here")
        return backend
    if not triton_available():
        if name == "triton":
            raise ValueError("attention_backend='triton' needs the triton package")
        logger.warning("triton is not installed; falling back to the (slow) torch reference attention")
        return TorchReferenceBackend()
    from pdserve.engine.attention.triton_backend import TritonBackend

    return TritonBackend()
