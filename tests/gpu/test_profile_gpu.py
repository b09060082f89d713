"""``pdserve profile`` on a host with two GPUs: the KV link's rate measured as a copy to the next GPU."""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.cluster.profile_cli import device_copy_bytes_per_s

pytestmark = [
    pytest.mark.multigpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]


def test_the_copy_to_the_next_gpu_is_timed() -> None:
    rate = device_copy_bytes_per_s(torch.device("cuda:0"), torch.device("cuda:1"), nbytes=64 << 20, repeats=3)
    assert math.isfinite(rate) and rate > 0
