"""Choosing a transport backend from a config name and the KV caches' device."""

from __future__ import annotations

import torch

BACKENDS = ("auto", "nccl", "gloo", "loopback")


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The concrete backend for ``name`` and caches on ``device``.

    ``"auto"`` picks ``"nccl"`` for CUDA caches and ``"gloo"`` for CPU caches; ``"nccl"`` needs CUDA
    caches, ``"gloo"`` CPU caches (it carries host tensors only); ``"loopback"`` (in-process) takes
    either. Anything else raises ``ValueError`` saying what is allowed.
    """
    device = torch.device(device)
    choice = name.strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"unknown KV transfer backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if choice == "nccl" and device.type != "cuda":
        raise ValueError(f"the nccl KV transfer backend needs CUDA KV caches, these are on {device}; "
                         f"use 'gloo' or 'auto'")
    if choice == "gloo" and device.type != "cpu":
        raise ValueError(f"the gloo KV transfer backend carries CPU KV caches only, these are on {device}; "
                         f"use 'nccl' or 'auto'")
    return choice
