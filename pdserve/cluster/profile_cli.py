"""``pdserve profile``: measure this device's step-time model (the grid of synthetic steps every worker
times at start-up) and the KV bytes per token, and write them as the JSON ``pdserve plan`` reads and an
engine's ``step_time_profile`` accepts."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from pdserve.common.errors import ConfigError


def run_profile(args: argparse.Namespace) -> int:
    from pdserve.common.config import EngineConfig
    from pdserve.engine.engine import LLMEngine
    from pdserve.worker.telemetry import kv_bytes_per_token, kv_capacity_tokens

    if args.max_batch_tokens < 16:
        raise ConfigError("--max-batch-tokens", f"must be >= 16, got {args.max_batch_tokens}")
    engine = LLMEngine(EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype,
                                    device=args.device, max_num_batched_tokens=args.max_batch_tokens,
                                    max_model_len=args.max_model_len, step_time_budget_ms=1e6))
    assert engine.step_time is not None, "a step-time budget always measures the model"
    profile: dict[str, Any] = {
        "model": engine.step_time.to_dict(), "samples": engine.step_time_samples,
        "kv_bytes_per_token": kv_bytes_per_token(engine), "kv_capacity_tokens": kv_capacity_tokens(engine),
        "engine": {"model": args.model, "device": str(engine.device), "dtype": str(engine.dtype),
                   "max_batch_tokens": args.max_batch_tokens},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    if engine.device.type == "cuda":
        import torch

        profile["engine"]["device_name"] = torch.cuda.get_device_name(engine.device)
    args.out.write_text(json.dumps(profile, indent=1) + "\n")
    print(f"pdserve: wrote {args.out} (step-time model {engine.step_time.to_dict()})")
    return 0
