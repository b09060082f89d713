"""Matrix-product speed by height, and every CUDA graph's replay: where a step's token count costs more
than its neighbours'.

* **GEMM heights** -- Llama-3.1-8B's four projections of one layer (QKV, O, gate/up, down; bf16) for row
  counts 256..1024 in steps of 32 and a few larger ones: ms per layer and TFLOP/s (each call timed alone, so
  launch gaps count: a comparison of heights, not the rate inside a graph). cuBLAS picks its
  kernel by the height, and some heights get a poor one (on an H200: 448 rows at 401 TFLOP/s between 502
  at 416 and 547 at 480).
* **Graph replays** -- an engine (8B shapes, dummy weights) and the replay time of each of its captured
  graphs on padding, with the graph each size is routed to (``StepGraphs.time_replays``).

    python -m benchmarks.gemm_heights        # one GPU
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    LLAMA31_8B,
    _median_ms,
    markdown_table,
    measure_ceilings,
    run_info,
    write_model_dir,
    write_results,
)
from pdserve import LLM

PROJECTIONS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def gemm_heights(heights: list[int]) -> list[dict[str, Any]]:
    weights = {k: torch.randn(n, inner, device="cuda", dtype=torch.bfloat16) for k, (inner, n) in PROJECTIONS.items()}
    rows = []
    for m in heights:
        row: dict[str, Any] = {"rows": m}
        total_ms = flops = 0.0
        for name, (inner, n) in PROJECTIONS.items():
            x = torch.randn(m, inner, device="cuda", dtype=torch.bfloat16)
            w = weights[name]
            for _ in range(3):
                torch.nn.functional.linear(x, w)
            ms = _median_ms(lambda: torch.nn.functional.linear(x, w), 20)  # noqa: B023
            row[name] = round(ms, 4)
            total_ms += ms
            flops += 2 * m * inner * n
        row |= {"layer_ms": round(total_ms, 4), "tflops": round(flops / total_ms / 1e9, 1)}
        rows.append(row)
        print("gemm", row, flush=True)
    return rows


def graph_replays() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", LLAMA31_8B)
        llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=16384, max_num_seqs=512,
                  max_num_batched_tokens=8192, enable_prefix_caching=False, gpu_memory_utilization=0.9)
        graphs = llm.engine.runner.graphs
        assert graphs is not None
        return {"replay_ms": {size: round(ms, 3) for size, ms in graphs.replay_ms.items()}, "rerouted": graphs.rerouted}


def main() -> None:
    info = run_info()
    ceilings = measure_ceilings()
    heights = list(range(256, 1025, 32)) + [1152, 1280, 1536, 2048]
    payload = {"ceilings": ceilings, "gemm": gemm_heights(heights), **graph_replays()}
    markdown = "\n".join([
        "# Matrix products by height, and CUDA graph replays", "",
        f"{info.get('device')} · commit {info['commit']} · {info['date']} · ceilings {ceilings}", "",
        "Command: `python -m benchmarks.gemm_heights`. One layer's four projections of Llama-3.1-8B (bf16).", "",
        markdown_table(["rows", *PROJECTIONS, "layer ms", "TFLOP/s"],
                       [[r["rows"], *(r[k] for k in PROJECTIONS), r["layer_ms"], r["tflops"]] for r in payload["gemm"]]),
        "## Graph replays on padding (ms)", "",
        markdown_table(["tokens", "ms"], [[size, ms] for size, ms in payload["replay_ms"].items()]),
        f"Routed to a larger graph (size -> size): {payload['rerouted']}", ""])
    print(markdown)
    print("wrote", *write_results("gemm_heights", info, payload, markdown))


if __name__ == "__main__":
    main()
