"""``pdserve profile``: measure this device's step-time model (the grid of synthetic steps every worker
times at start-up), the KV bytes per token and the KV link's rate, and write them as the JSON ``pdserve plan``
reads and an engine's ``step_time_profile`` accepts.

The link's rate (``kv_transfer_bytes_per_s``, with ``kv_transfer_source`` saying where it came from):
``--kv-transfer-gb-per-s`` as stated (a cross-host fabric, measured with ``benchmarks.kv_transfer``), else,
on a GPU with a next GPU on the host, a copy of 512 MiB to it (the link a prefill worker's CUDA IPC writes
use; those reach 0.89-0.93 of such a copy on an H200 pair), else none (``pdserve plan`` assumes 50 GB/s)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from typing import Any

from pdserve.common.errors import ConfigError


def run_profile(args: argparse.Namespace) -> int:
    from pdserve.common.config import EngineConfig
    from pdserve.engine.engine import LLMEngine
    from pdserve.worker.telemetry import kv_bytes_per_token, kv_capacity_tokens

    if args.max_batch_tokens < 16:
        raise ConfigError("--max-batch-tokens", f"must be >= 16, got {args.max_batch_tokens}")
    if args.kv_transfer_gb_per_s is not None and not 0 < args.kv_transfer_gb_per_s < math.inf:
        raise ConfigError("--kv-transfer-gb-per-s", f"must be a number > 0, got {args.kv_transfer_gb_per_s:g}")
    engine = LLMEngine(EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype,
                                    device=args.device, max_num_batched_tokens=args.max_batch_tokens,
                                    max_model_len=args.max_model_len, step_time_budget_ms=1e6))
    assert engine.step_time is not None, "a step-time budget always measures the model"
    profile: dict[str, Any] = {
        "model": engine.step_time.to_dict(), "samples": engine.step_time_samples,
        "kv_bytes_per_token": kv_bytes_per_token(engine), "kv_capacity_tokens": kv_capacity_tokens(engine),
        # the rows its CUDA graphs compute: the planner fills budget-cut chunks up to them, as the engine does
        "graph_rows": list(engine.runner.padded_sizes()) if engine.scheduler.graph_rows is not None else [],
        "engine": {"model": args.model, "device": str(engine.device), "dtype": str(engine.dtype),
                   "max_batch_tokens": args.max_batch_tokens},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    if engine.device.type == "cuda":
        import torch

        profile["engine"]["device_name"] = torch.cuda.get_device_name(engine.device)
    if args.kv_transfer_gb_per_s is not None:
        profile |= {"kv_transfer_bytes_per_s": args.kv_transfer_gb_per_s * 1e9, "kv_transfer_source": "stated"}
    elif engine.device.type == "cuda":
        import torch

        index = engine.device.index or 0
        if torch.cuda.device_count() > index + 1:
            peer = torch.device("cuda", index + 1)
            try:
                profile |= {"kv_transfer_bytes_per_s": device_copy_bytes_per_s(engine.device, peer),
                            "kv_transfer_source": f"a 512 MiB copy {engine.device} -> {peer}"}
            except RuntimeError as exc:  # the next GPU full or busy (torch's OOM is a RuntimeError): the rest stands
                profile["kv_transfer_source"] = f"the copy {engine.device} -> {peer} failed: {exc}"
    args.out.write_text(json.dumps(profile, indent=1) + "\n")
    print(f"pdserve: wrote {args.out} (step-time model {engine.step_time.to_dict()})")
    return 0


def device_copy_bytes_per_s(src: Any, dst: Any, nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes per second of one contiguous copy of ``nbytes`` from device ``src`` to device ``dst`` (median of
    ``repeats``, after a warm-up copy), timed with events on ``src``'s stream after both devices are idle."""
    import statistics

    import torch

    source = torch.empty(nbytes, dtype=torch.uint8, device=src)
    target = torch.empty(nbytes, dtype=torch.uint8, device=dst)
    target.copy_(source)
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize(src)
        torch.cuda.synchronize(dst)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(src):
            start.record()
            target.copy_(source)
            end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(seconds)
