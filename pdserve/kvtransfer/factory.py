"""Choosing a transport backend from a config name and the KV caches' device."""

from __future__ import annotations

import torch

from pdserve.common.kv_transfer_config import TRANSFER_BACKENDS as BACKENDS


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The concrete backend for ``name`` and caches on ``device``.

    ``"auto"`` picks ``"cuda_ipc"`` for CUDA caches and ``"gloo"`` for CPU caches. ``"cuda_ipc"`` (CUDA
    caches) writes straight into the receiver's cache when the sender can map it (same host), and
    falls back to NCCL per peer when it cannot; ``"nccl"`` is NCCL only; ``"gloo"`` carries CPU caches
    only; ``"loopback"`` (in-process) takes either. Anything else raises ``ValueError`` saying what
    is allowed.
    """
    device = torch.device(device)
    choice = name.strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"unknown KV transfer backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "cuda_ipc" if device.type == "cuda" else "gloo"
    if choice in ("nccl", "cuda_ipc") and device.type != "cuda":
        raise ValueError(f"the {choice} KV transfer backend needs CUDA KV caches, these are on {device}; "
                         f"use 'gloo' or 'auto'")
    if choice == "gloo" and device.type != "cpu":
        raise ValueError(f"the gloo KV transfer backend carries CPU KV caches only, these are on {device}; "
                         f"use 'nccl' or 'auto'")
    return choice


def process_group_backend(backend: str) -> str:
    """The process-group backend under a resolved transport: ``cuda_ipc`` falls back to NCCL."""
    return "nccl" if backend == "cuda_ipc" else backend
