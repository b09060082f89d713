"""One-row products (decode at batch 1): cuBLAS (``F.linear``, plus the activation kernel before ``down_proj``)
against the engine's one-launch GEMV (:mod:`pdserve.engine.kernels.skinny_gemm`) at its chosen tiling and at
the best of a sweep, for Llama-3.1-8B's projections and those of one rank of it at TP=2.

    python -m benchmarks.gemv          # one GPU, ~1 minute

Each product is timed from a CUDA graph of calls that cycle through enough copies of the weight (>= 768 MiB)
that none is read from L2; the rate is the weight's bytes over the time per call.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, measure_ceilings, run_info, write_results

#: name -> (N, K, gated): the weight is [N, K]; gated products take silu(gate) * up of a [1, 2K] input
SHAPES: dict[str, tuple[int, int, bool]] = {
    "8b qkv_proj": (6144, 4096, False), "8b o_proj": (4096, 4096, False), "8b gate_up_proj": (28672, 4096, False),
    "8b down_proj (gated)": (4096, 14336, True), "8b lm_head": (128256, 4096, False),
    "8b TP=2 rank qkv_proj": (3072, 4096, False), "8b TP=2 rank o_proj": (4096, 2048, False),
    "8b TP=2 rank gate_up_proj": (14336, 4096, False), "8b TP=2 rank down_proj (gated)": (4096, 7168, True),
    "8b TP=2 rank lm_head": (64128, 4096, False),
}
TILINGS = [(n, k, w) for n, k, w in itertools.product((1, 2, 4, 8, 16), (512, 1024, 2048, 4096), (4, 8))
           if 1024 <= n * k <= 16384]


def time_per_call_us(call: Callable[[int], Any], copies: int, replays: int = 10) -> float:
    """Microseconds per ``call(i)`` from a CUDA graph of ``call(0) .. call(copies - 1)``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, sets up cuBLAS) off the capture
        for i in range(copies):
            call(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            call(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * copies)


def bench_shape(n: int, k: int, gated: bool) -> dict[str, Any]:
    from pdserve.engine.kernels.activation import silu_and_mul
    from pdserve.engine.kernels.skinny_gemm import skinny_config, skinny_linear

    weight_bytes = n * k * 2
    copies = max(4, min(64, (768 << 20) // weight_bytes))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, 2 * k if gated else k, device="cuda", dtype=torch.bfloat16)
    reference = F.linear(silu_and_mul(x) if gated else x, weights[0]).float()

    def cublas(i: int) -> torch.Tensor:
        return F.linear(silu_and_mul(x) if gated else x, weights[i])

    def ours(tiling: tuple[int, int, int] | None) -> Callable[[int], torch.Tensor]:
        return lambda i: skinny_linear(x, weights[i], gated, tiling)

    error = ((ours(None)(0).float() - reference).norm() / reference.norm()).item()
    row: dict[str, Any] = {"N": n, "K": k, "gated": gated, "cublas_us": time_per_call_us(cublas, copies),
                           "chosen_tiling": list(skinny_config(n, k, gated)),
                           "chosen_us": time_per_call_us(ours(None), copies), "relative_difference": error}
    swept = [(time_per_call_us(ours(t), copies, replays=5), t) for t in TILINGS]
    row["best_us"], best = min(swept)
    row["best_tiling"] = list(best)
    row["swept_us"] = {"x".join(map(str, t)): round(us, 2) for us, t in swept}
    for key in ("cublas", "chosen", "best"):
        row[f"{key}_tb_per_s"] = round(weight_bytes / row[f"{key}_us"] / 1e6, 2)
        row[f"{key}_us"] = round(row[f"{key}_us"], 2)
    weights.clear()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    info = run_info()
    ceilings = measure_ceilings()  # also brings the clocks up before the first timing
    rows = {}
    for name, (n, k, gated) in SHAPES.items():
        rows[name] = bench_shape(n, k, gated)
        print(name, rows[name], flush=True)
    table = [[name, r["cublas_us"], r["cublas_tb_per_s"], r["chosen_us"], r["chosen_tb_per_s"],
              round(r["cublas_us"] / r["chosen_us"], 3), r["best_us"], str(tuple(r["best_tiling"])),
              f"{r['relative_difference']:.1e}"] for name, r in rows.items()]
    markdown = "\n".join([
        "# One-row products: cuBLAS against the one-launch GEMV", "",
        f"{info.get('device')} · commit {info['commit']} · {info['date']} · copy ceiling "
        f"{ceilings['copy_gb_per_s']:.0f} GB/s (read + write)", "",
        "bf16 weights, one row; cuBLAS = `F.linear` (with its split-K reduce where it uses one) and, for the "
        "gated products, the activation kernel before it. Tiling = (columns per program, K slice, warps).", "",
        markdown_table(["product", "cuBLAS us", "TB/s", "GEMV us", "TB/s", "cuBLAS / GEMV", "best tiling us",
                        "best tiling", "relative difference"], table), ""])
    print(markdown)
    write_results("gemv", info, {"ceilings": ceilings, "shapes": rows}, markdown)


if __name__ == "__main__":
    main()
