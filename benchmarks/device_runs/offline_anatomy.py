"""Where the offline benchmark's time goes (one H200, Llama-3.1-8B shapes, dummy weights): the engine
benchmark's offline case (256 requests x 512 in / 256 out), every step's kind, rows and device seconds
recorded as it lands, summed by kind against the wall time; then the same with other token budgets.

    python benchmarks/device_runs/offline_anatomy.py      # one GPU; prints a table, writes $OUT/r/
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import LLAMA31_8B, write_model_dir
from pdserve import LLM, SamplingParams


class ClockSampler:
    """SM clock (MHz) and power (W) of GPU 0 every ``period_s`` on a thread, through NVML."""

    def __init__(self, period_s: float = 0.05) -> None:
        import threading

        import pynvml

        pynvml.nvmlInit()
        self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.samples: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._period = period_s
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            clock = self._nvml.nvmlDeviceGetClockInfo(self._handle, self._nvml.NVML_CLOCK_SM)
            power = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1e3
            self.samples.append((round(time.perf_counter() - t0, 3), clock, round(power, 1)))
            self._stop.wait(self._period)

    def __enter__(self) -> ClockSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(budget: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", LLAMA31_8B)
        llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=16384,
                  max_num_seqs=256, max_num_batched_tokens=budget, enable_prefix_caching=False,
                  gpu_memory_utilization=0.90)
        engine = llm.engine
        steps: list[tuple[str, int, int, float | None]] = []
        land = engine._land

        def recording_land(launched):  # type: ignore[no-untyped-def]
            out = land(launched)
            shape = launched.plan.shape
            steps.append((shape.kind.value, shape.decodes, shape.tokens - shape.decodes, launched.seconds()))
            return out

        engine._land = recording_land  # type: ignore[method-assign]
        prompts = [[(r * 131 + j * 7) % 50000 + 1 for j in range(512)] for r in range(256)]
        llm.generate(prompt_token_ids=prompts[:4], sampling_params=SamplingParams(max_tokens=4, ignore_eos=True))
        steps.clear()
        torch.cuda.synchronize()
        with ClockSampler() as clocks:
            t0 = time.perf_counter()
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
                max_tokens=256, temperature=0.0, ignore_eos=True))
            wall = time.perf_counter() - t0
        tokens = sum(len(o.token_ids) for o in outs)
        by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])
        for kind, decodes, prompt_tokens, seconds in steps:
            row = by_kind[kind]
            row[0] += 1
            row[1] += seconds or 0.0
            row[2] += decodes
            row[3] += prompt_tokens
        device = sum(r[1] for r in by_kind.values())
        hist: dict[str, int] = defaultdict(int)
        for _, decodes, _, _ in steps:
            hist[f"{(decodes // 32) * 32}-{(decodes // 32) * 32 + 31}"] += 1
        result = {"budget": budget, "wall_s": round(wall, 3), "output_tok_s": round(tokens / wall, 1),
                  "device_s": round(device, 3), "host_gap_s": round(wall - device, 3), "steps": len(steps),
                  "by_kind": {k: {"steps": v[0], "seconds": round(v[1], 3), "decode_rows": v[2], "prompt_tokens": v[3]}
                              for k, v in by_kind.items()},
                  "decode_batch_hist": dict(sorted(hist.items(), key=lambda kv: int(kv[0].split('-')[0]))),
                  "first_steps": steps[:24], "last_steps": steps[-4:],
                  "sm_clock_mhz_power_w": clocks.samples[::4]}
        prefill_end = sum(s[3] or 0.0 for s in steps if s[0] != "decode")
        during = {"prefill phase": [c for t, c, _ in clocks.samples if t <= prefill_end],
                  "decode phase": [c for t, c, _ in clocks.samples if t > prefill_end]}
        result["sm_clock_mhz_median"] = {k: sorted(v)[len(v) // 2] for k, v in during.items() if v}
        result["power_w_max"] = max(p for _, _, p in clocks.samples)
        print(json.dumps({k: v for k, v in result.items() if k not in ("first_steps", "last_steps")}), flush=True)
        return result


def main() -> None:
    """One budget per process (``sys.argv[1]``): an engine's memory is not all given back in-process."""
    budget = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    out = Path(os.environ.get("OUT", "/tmp/out")) / "r"
    out.mkdir(parents=True, exist_ok=True)
    result = run(budget)
    name = f"offline_anatomy-{budget}-{os.environ.get('PDSERVE_COMMIT', 'local')}-h200.json"
    (out / name).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
