"""A worker's telemetry: the JSON snapshot its ``Telemetry`` RPC returns (engine, KV transfer, GPU).

Schema (counters run from the worker's start; the router turns them into Prometheus series):

* ``worker_id``, ``role``, ``model``;
* ``engine``: ``running_requests``, ``waiting_requests``, ``kv_usage`` (0-1), ``num_kv_blocks``,
  ``queued_prefill_tokens``, ``preemptions``, ``late_prompts`` (prompts its scheduler predicted to miss their
  TTFT deadline, served after those that can still meet theirs), ``prompt_tokens_computed``, ``prefix_cache_queries`` and
  ``prefix_cache_hits`` (tokens), ``steps``: ``{decode|mixed|chunked|prefill: {"count", "seconds"}}`` (device
  time of measured steps by kind), ``step_time_model`` (its fitted coefficients, or null),
  ``step_time_calibration`` (``{decode|mixed|chunked|prefill: factor}``: measured over profiled, as the live
  monitor last calibrated it: the scheduler's), ``step_time_busy`` (``{kind: {"steps", "measured_s",
  "profiled_s"}}`` over the last ``BUSY_WINDOW_STEPS`` steps of each kind: the planner's), ``kv_bytes_per_token``, ``kv_capacity_tokens`` and
  ``step_budget_borrow_tokens`` (what the router's planner simulates with), ``tensor_parallel_ranks`` (its GPUs, on GPUs: what the planner divides goodput by);
* ``kv_transfer``: ``transport`` and the role's counters: a decode worker's ``received``,
  ``failures``, ``local_recomputes``, ``bytes`` and ``seconds`` (landing zone to every byte landed); a
  prefill worker's ``sent``;
* ``gpu``: ``{"available": true, "utilization": %, "memory_used_bytes", "memory_total_bytes",
  "power_watts", "sm_clock_mhz", "nvlink_tx_bytes", "nvlink_rx_bytes"}`` (a field the GPU cannot report
  is null), or ``{"available": false, "reason": ...}`` on a worker without an NVIDIA GPU: never zeros.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pdserve.common.step_model import StepKind
from pdserve.engine.engine import LLMEngine
from pdserve.worker.engine_loop import load_of

logger = logging.getLogger(__name__)


def engine_telemetry(engine: LLMEngine) -> dict[str, Any]:
    """Engine thread: the engine's part of the snapshot."""
    kv, load = engine.kv, load_of(engine)  # the load the Updates stream reports, the same way
    return {"running_requests": load.running_requests, "waiting_requests": load.waiting_requests,
            "kv_usage": load.kv_usage, "num_kv_blocks": engine.kv_layout.num_blocks,
            "queued_prefill_tokens": load.queued_prefill_tokens, "preemptions": engine.scheduler.num_preemptions,
            "late_prompts": engine.scheduler.num_late_prompts,
            "prompt_tokens_computed": engine.runner.num_prompt_tokens_computed,
            "prefix_cache_queries": kv.prefix_queries_tokens, "prefix_cache_hits": kv.prefix_hit_tokens,
            "steps": {kind.value: {"count": int(count), "seconds": seconds}
                      for kind, (count, seconds) in engine.step_seconds.items()},
            "step_time_model": engine.step_time.to_dict() if engine.step_time is not None else None,
            # what live steps taught the model (per kind: measured / profiled), for the planner
            "step_time_calibration": ({kind.value: engine.step_time.factor(kind) for kind in StepKind}
                                      if engine.step_time is not None else None),
            "step_time_busy": ({kind.value: busy._asdict() for kind, busy in engine.step_monitor.recent_busy().items()}
                               if engine.step_monitor is not None else None),
            "kv_bytes_per_token": kv_bytes_per_token(engine), "kv_capacity_tokens": kv_capacity_tokens(engine),
            "step_budget_borrow_tokens": engine.scheduler.config.borrow_tokens,
            # a budget-cut chunk grows into its step graph's padding: the planner's simulation does the same
            "graph_rows": list(engine.runner.padded_sizes()) if engine.scheduler.graph_rows is not None else [],
            "tensor_parallel_ranks": engine.tensor_parallel_size}


def kv_capacity_tokens(engine: LLMEngine) -> int:
    """Tokens of KV the engine's cache holds (every usable block; what the planner simulates with)."""
    return engine.kv.pool.num_usable_blocks * engine.kv.block_size


def kv_bytes_per_token(engine: LLMEngine) -> int:
    """Bytes of KV one token takes in the engine's caches (keys and values, every layer, every
    tensor-parallel rank: what a transfer of it moves)."""
    return engine.kv_layout.bytes_per_block // engine.kv_layout.block_size * engine.tensor_parallel_size


class GpuProbe:
    """NVML readings of the GPU a worker computes on (opened once; ``read()`` is cheap)."""

    def __init__(self, device: torch.device) -> None:
        self._nvml: Any = None
        self._handle: Any = None
        self.reason = ""
        if device.type != "cuda":
            self.reason = "no NVIDIA GPU on this worker"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            props = torch.cuda.get_device_properties(device)
            uuid = str(getattr(props, "uuid", ""))
            self._handle = (pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
                            if uuid else pynvml.nvmlDeviceGetHandleByIndex(device.index or 0))
            self._nvml = pynvml
        except Exception as exc:  # noqa: BLE001 (no NVML, no driver, an unknown device: say so)
            self.reason = f"NVML unavailable: {type(exc).__name__}: {exc}"
            logger.info("GPU telemetry off: %s", self.reason)

    def read(self) -> dict[str, Any]:
        nvml, handle = self._nvml, self._handle
        if nvml is None:
            return {"available": False, "reason": self.reason}

        def field(fn: Any) -> Any:
            try:
                return fn()
            except Exception:  # noqa: BLE001 (a reading this GPU does not support: null)
                return None

        memory = field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        power_mw = field(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        nvlink = field(lambda: nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
                                                                      nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX]))
        kib = [v.value.ullVal * 1024 if v.nvmlReturn == 0 else None for v in nvlink] if nvlink else [None, None]
        return {"available": True,
                "utilization": field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                "memory_used_bytes": memory.used if memory else None,
                "memory_total_bytes": memory.total if memory else None,
                "power_watts": power_mw / 1000 if power_mw is not None else None,
                "sm_clock_mhz": field(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
                "nvlink_tx_bytes": kib[0], "nvlink_rx_bytes": kib[1]}
