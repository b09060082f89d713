"""The paged prefill attention kernel under every tiling worth trying, on Llama-3.1-8B's heads (32 query /
8 KV heads, head_dim 128, bf16, 16-token KV blocks): which one ``prefill_config`` should pick.

    python -m benchmarks.prefill_tiles        # one GPU, about 3 minutes on an H200

Cases: one fresh prompt of 2k and of 8k tokens, a 2k chunk after 6k of context, sixteen fresh 256-token
prompts, a 512-token chunk after 4k. Each tiling (query rows x keys per tile, warps, pipeline stages)
runs with one program per query tile, median of 10 runs; every output is checked against the default
tiling's. TFLOP/s count the causal work (each query row against the keys it sees); ``sdpa`` is torch's
dense attention on the same fresh prompt, for reference.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import _median_ms, markdown_table, run_info, write_results
from pdserve.engine.kernels.paged_prefill import build_query_tiles, paged_prefill_attention, prefill_config
from tests.support.kernel_cases import paged_problem

CASES = {"fresh 2k": ([0], [2048]), "fresh 8k": ([0], [8192]), "2k chunk after 6k": ([6144], [2048]),
         "16 x 256 fresh": ([0] * 16, [256] * 16), "512 chunk after 4k": ([4096], [512])}
TILINGS = [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
           for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]


def label(tiling: dict[str, int]) -> str:
    return f"{tiling['BLOCK_M']}x{tiling['BLOCK_N']} w{tiling['num_warps']} s{tiling['num_stages']}"


def run_case(context: list[int], queries: list[int], default: dict[str, int]) -> dict[str, Any]:
    q, cache, meta = paged_problem(context, queries, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=1)
    flops = sum(4 * 32 * 128 * (n * c + n * (n + 1) / 2) for c, n in zip(context, queries))
    reference = None
    speeds: dict[str, float] = {}
    for tiling in [default] + [t for t in TILINGS if t != default]:
        host = np.zeros((2, sum(queries) // tiling["BLOCK_M"] + len(queries) + 1), dtype=np.int32)
        count = build_query_tiles(np.array(queries), 0, tiling["BLOCK_M"], host)
        tiles = torch.from_numpy(host).cuda()
        num_tiles = torch.tensor([count], dtype=torch.int32, device="cuda")

        def attend(tiling: dict[str, int] = tiling) -> torch.Tensor:
            return paged_prefill_attention(q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                           scale=128**-0.5, sliding_window=None, tiles=tiles,  # noqa: B023
                                           num_tiles=num_tiles, num_programs=count, config=dict(tiling))  # noqa: B023

        try:
            out = attend().float()
        except Exception as exc:  # noqa: BLE001 (a tiling past the GPU's shared memory)
            print(f"  {label(tiling)}: {str(exc)[:80]}", flush=True)
            continue
        if reference is None:
            reference = out
        assert (out - reference).abs().max().item() < 0.05, f"{label(tiling)} computes something else"
        speeds[label(tiling)] = round(flops / _median_ms(attend, 10) / 1e9, 1)
    row: dict[str, Any] = {"speeds": speeds}
    if context == [0]:
        k = torch.randn(1, 8, queries[0], 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        dense_q = q.transpose(0, 1).unsqueeze(0)
        row["sdpa"] = round(flops / _median_ms(
            lambda: F.scaled_dot_product_attention(dense_q, k, v, is_causal=True, enable_gqa=True), 10) / 1e9, 1)
    return row


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    info = run_info()
    default = prefill_config(128, torch.bfloat16, torch.device("cuda", 0), wide_keys=True)
    rows = []
    for name, (context, queries) in CASES.items():
        row = {"case": name, **run_case(context, queries, default)}
        best = max(row["speeds"].items(), key=lambda kv: kv[1])
        print(f"{name}: default {label(default)} {row['speeds'][label(default)]} TFLOP/s, best {best}", flush=True)
        rows.append(row)
    table = [[r["case"], r["speeds"][label(default)], *max(((v, k) for k, v in r["speeds"].items()), default=(None, None)),
              r.get("sdpa")] for r in rows]
    markdown = "\n".join([
        "# Paged prefill attention by tiling (bf16, 32 query / 8 KV heads, head_dim 128, 16-token blocks)", "",
        f"{info.get('device')} · commit {info['commit']} · {info['date']}", "",
        f"TFLOP/s of causal work, median of 10. Default tiling here: {label(default)} (`prefill_config` for eager "
        "steps; graph steps keep 128x64 w8 s3).", "",
        markdown_table(["case", "default", "best of all", "best tiling", "torch sdpa (dense)"], table), ""])
    print(markdown)
    write_results("prefill_tiles", info, {"default": default, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
