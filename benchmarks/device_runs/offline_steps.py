"""The offline benchmark's steps, one by one, with their kernels by kind (one H200, Llama-3.1-8B shapes,
dummy weights): why a step of 16 fresh 512-token prompts takes ~174 ms alone and ~188 ms beside 16 decodes
(``offline_anatomy.py``), and what a batch-256 decode step at the offline contexts spends.

    python benchmarks/device_runs/offline_steps.py      # one GPU; writes $OUT/r/offline_steps-*.json
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import LLAMA31_8B, write_model_dir
from benchmarks.step_anatomy import kernel_breakdown
from pdserve import LLM
from pdserve.engine.step_profile import synthetic_step_timer

STEPS: dict[str, tuple[list[int], list[tuple[int, int]]]] = {
    "prefill 16x512": ([], [(512, 0)] * 16),
    "mixed 16 @512 + 16x512": ([512] * 16, [(512, 0)] * 15 + [(496, 0)]),
    "mixed 128 @520 + 15x512 + 57 @455": ([520] * 128, [(57, 455)] + [(512, 0)] * 15),
    "prefill 15x512 + 57 @455": ([], [(57, 455)] + [(512, 0)] * 15),
    "decode 256 @640": ([640] * 256, []),
    "decode 128 @640": ([640] * 128, []),
}


def main() -> None:
    out = Path(os.environ.get("OUT", "/tmp/out")) / "r"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", LLAMA31_8B)
        llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=16384,
                  max_num_seqs=256, max_num_batched_tokens=8192, enable_prefix_caching=False,
                  gpu_memory_utilization=0.90)
        time_step = synthetic_step_timer(llm.engine)
        rows = []
        for name, (decodes, chunks) in STEPS.items():
            time_step(decodes, chunks)
            ms = statistics.median(time_step(decodes, chunks) for _ in range(5)) * 1e3
            kernels = kernel_breakdown(lambda: time_step(decodes, chunks))  # noqa: B023
            rows.append({"step": name, "ms": round(ms, 2), "kernels": kernels})
            print(json.dumps(rows[-1]), flush=True)
    (out / f"offline_steps-{os.environ.get('PDSERVE_COMMIT', 'local')}-h200.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
