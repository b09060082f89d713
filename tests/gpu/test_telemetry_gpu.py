"""A worker's GPU telemetry against the real NVML of the GPU it computes on (skipped without a GPU; the
CPU tests check the "unavailable" answer)."""

from __future__ import annotations

import pytest
import torch

from pdserve.worker.telemetry import GpuProbe

pytestmark = pytest.mark.gpu


def test_nvml_reports_the_gpu_a_worker_computes_on() -> None:
    device = torch.device("cuda", 0)
    torch.cuda.empty_cache()  # else the 1 GiB below may come from memory earlier tests left cached
    before = GpuProbe(device).read()
    assert before["available"] is True, before
    assert 0 <= before["utilization"] <= 100 and before["power_watts"] > 0 and before["sm_clock_mhz"] > 0
    assert before["memory_total_bytes"] == pytest.approx(torch.cuda.get_device_properties(device).total_memory,
                                                         rel=0.05)
    held = torch.empty(1 << 30, dtype=torch.uint8, device=device)  # 1 GiB more in use
    after = GpuProbe(device).read()
    assert after["memory_used_bytes"] >= before["memory_used_bytes"] + (1 << 30) * 0.9
    del held
