"""Tensor parallelism on two GPUs: one engine whose model is split over two ranks (threads of one process,
each on its own GPU, all-reduce over NCCL, a CUDA graph per rank) against the same model on one GPU. Llama-3.1-8B shapes (and
Llama-3.1-70B shapes, which need both GPUs), dummy bf16 weights.

    python -m benchmarks.tensor_parallel              # 2 GPUs (about 4 minutes on 2xH200)
    python -m benchmarks.tensor_parallel --skip-70b

Each case runs in a process of its own (the GPUs start empty). Decode: batch B with 1k tokens of
random KV, median engine step over 20 steps (``benchmarks.engine.bench_decode``); bandwidth utilisation
is a rank's bytes (its share of the weights and of the KV) per step over one GPU's copy ceiling.
Prefill: one step computing a fresh prompt; MFU divides the model's FLOPs by the step time and by the
matmul ceiling of every GPU of the case. The all-reduce share: under the torch profiler, the NCCL
and peer all-reduce kernels' time on GPU 0 over all kernel time on GPU 0, in decode steps and in the
8k prefill. The ``-peer`` cases send all-reduces up to 1 MiB through the one-shot peer kernel
(``engine.peer_all_reduce_max_bytes``) instead of NCCL.

``8b-rank-of-tp2`` runs on one GPU: a TP=1 engine with the shapes of one rank of the TP=2 8B model (half the
heads, KV heads, MLP width and vocabulary), that is a TP=2 rank's step without its all-reduces -- the floor
the all-reduces add to; ``70b-rank-of-tp2`` the same for the 70B model (35B parameters on one GPU). Every case also records where GPU 0's kernel time goes in a batch-1 decode step
(``kernel_breakdown``: microseconds and launches per step by kind of kernel).

    python -m benchmarks.tensor_parallel --cases 8b-tp1,8b-rank-of-tp2   # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    LLAMA31_8B,
    markdown_table,
    measure_ceilings,
    run_info,
    write_model_dir,
    write_results,
)
from benchmarks.engine import bench_decode, bench_prefill

LLAMA31_70B: dict[str, Any] = {**LLAMA31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                               "num_attention_heads": 64, "num_key_value_heads": 8}
#: one rank's share of the TP=2 8B model, as a model of its own (``TensorParallel.local_spec`` and ``vocab_rows``)
LLAMA31_8B_RANK_OF_TP2: dict[str, Any] = {**LLAMA31_8B, "num_attention_heads": 16, "num_key_value_heads": 4,
                                          "intermediate_size": 7168, "vocab_size": 64128}
LLAMA31_70B_RANK_OF_TP2: dict[str, Any] = {**LLAMA31_70B, "num_attention_heads": 32, "num_key_value_heads": 4,
                                           "intermediate_size": 14336, "vocab_size": 64128}
PEER_MAX_BYTES = 1 << 20
#: name -> (model shapes, tensor-parallel size, extra engine settings)
CASES: dict[str, tuple[dict[str, Any], int, dict[str, Any]]] = {
    "8b-tp1": (LLAMA31_8B, 1, {}),
    "8b-tp1-eager": (LLAMA31_8B, 1, {"enforce_eager": True}),
    "8b-tp2": (LLAMA31_8B, 2, {}),
    "8b-tp2-eager": (LLAMA31_8B, 2, {"enforce_eager": True}),
    # graphs only up to 1k tokens (TP=1's default; at TP=2 the default covers every step up to 8k): larger
    # steps run eagerly, bound by the two rank threads' launches under one interpreter
    "8b-tp2-graphs1k": (LLAMA31_8B, 2, {"cuda_graph_max_tokens": 1024}),
    "70b-tp2": (LLAMA31_70B, 2, {}),
    # all-reduces up to 1 MiB (a decode step of up to 128 sequences) through the one-shot peer kernel
    "8b-tp2-peer": (LLAMA31_8B, 2, {"peer_all_reduce_max_bytes": PEER_MAX_BYTES}),
    # the same without fusing each all-reduce with the residual-add RMSNorm after it (an A/B of the fusion;
    # fused, the all-reduce share below includes those norms)
    "8b-tp2-peer-unfused": (LLAMA31_8B, 2, {"peer_all_reduce_max_bytes": PEER_MAX_BYTES,
                                            "peer_all_reduce_fuse_norm": False}),
    "70b-tp2-peer": (LLAMA31_70B, 2, {"peer_all_reduce_max_bytes": PEER_MAX_BYTES}),
    # every all-reduce up to an 8k prefill step's (64 MiB) through the peer kernel, above 1 MiB on its wide grid
    "8b-tp2-peer-wide": (LLAMA31_8B, 2, {"peer_all_reduce_max_bytes": 64 << 20}),
    # one GPU: a TP=2 rank's compute without its all-reduces (see module)
    "8b-rank-of-tp2": (LLAMA31_8B_RANK_OF_TP2, 1, {}),
    "70b-rank-of-tp2": (LLAMA31_70B_RANK_OF_TP2, 1, {}),
    # the same two with single rows through cuBLAS instead of the one-launch GEMV (an A/B of it)
    "8b-tp1-cublas": (LLAMA31_8B, 1, {}),
    "8b-rank-of-tp2-cublas": (LLAMA31_8B_RANK_OF_TP2, 1, {}),
}
#: environment of a case's process, beyond the parent's
CASE_ENV: dict[str, dict[str, str]] = {"8b-tp1-cublas": {"PDSERVE_SINGLE_ROW_GEMV": "0"},
                                       "8b-rank-of-tp2-cublas": {"PDSERVE_SINGLE_ROW_GEMV": "0"}}


ALL_REDUCE_KERNELS = ("nccl", "peer_all_reduce")


#: kind of kernel -> substrings of the kernel names that kind has (first match wins; the rest is "other")
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("all-reduce", ALL_REDUCE_KERNELS),
    ("gemm reduce", ("splitkreduce", "reduce_kernel")),
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "skinny")),
    ("attention", ("paged_decode", "paged_prefill", "attention", "flash", "fmha", "cudnn", "merge")),
    ("norm", ("rmsnorm",)),
    ("rope + cache write", ("rope",)),
    ("activation", ("silu",)),
)


def kernel_breakdown(run: Any, steps: int) -> dict[str, dict[str, float]]:
    """GPU 0's kernel time and launches per step by kind (``KERNEL_KINDS``) while ``run()`` runs ``steps``
    steps (torch profiler; graph replays show their kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kinds: dict[str, dict[str, float]] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA or event.device_index != 0:
            continue
        name = event.name.lower()
        kind = next((k for k, parts in KERNEL_KINDS if any(part in name for part in parts)), "other")
        entry = kinds.setdefault(kind, {"us": 0.0, "launches": 0.0})
        entry["us"] += event.time_range.elapsed_us()
        entry["launches"] += 1
    return {k: {"us": round(v["us"] / steps, 1), "launches": round(v["launches"] / steps, 1)}
            for k, v in sorted(kinds.items(), key=lambda item: -item[1]["us"])}


def all_reduce_share(run: Any) -> float | None:
    """All-reduce kernel time (NCCL's and the peer kernel's) over all kernel time on GPU 0 while ``run()`` runs."""
    kinds = kernel_breakdown(run, steps=1)
    total = sum(entry["us"] for entry in kinds.values())
    return round(kinds.get("all-reduce", {"us": 0.0})["us"] / total, 3) if total else None


def run_case(name: str, out: Path) -> None:
    from pdserve import LLM

    config, size, extra = CASES[name]
    ceilings = measure_ceilings()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", config)
        llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=16384, max_num_seqs=64,
                  max_num_batched_tokens=8192, enable_prefix_caching=False, gpu_memory_utilization=0.90,
                  tensor_parallel_size=size, **extra)
        startup = {k: round(v, 2) for k, v in llm.engine.startup_seconds.items()}
        print(f"{name}: started ({startup})", flush=True)
        ranks_caches = getattr(llm.engine.model, "kv_caches", [llm.engine.kv_caches])
        with torch.no_grad():
            for caches in ranks_caches:  # never time attention on zeros
                for cache in caches:
                    cache.normal_(0.0, 0.5)
        decode = bench_decode(llm, ceilings, [1, 32], [1024], steps=20)
        prefill = bench_prefill(llm, ceilings, [("1x2048", [2048]), ("1x8192", [8192])], repeats=3)
        for row in prefill:  # MFU of every GPU the case computes on
            for key in ("mfu_step", "mfu_forward"):
                if key in row:
                    row[key] = round(row[key] / size, 3)
        breakdown = kernel_breakdown(lambda: bench_decode(llm, {}, [1], [1024], steps=10), steps=10 + 3)
        print(f"{name}: batch-1 decode kernels per step on GPU 0 {breakdown}", flush=True)
        shares = {}
        if size > 1:
            engine = llm.engine

            def decode_steps() -> None:
                bench_decode(llm, {}, [1], [1024], steps=5)

            def prefill_8k() -> None:
                bench_prefill(llm, {}, [("1x8192", [8192])], repeats=1)

            shares = {"decode_b1": all_reduce_share(decode_steps), "prefill_8k": all_reduce_share(prefill_8k)}
            print(f"{name}: all-reduce share of GPU 0 kernel time {shares}", flush=True)
            assert engine.tensor_parallel_size == size
    out.write_text(json.dumps({"case": name, "tensor_parallel_size": size, "layers": config["num_hidden_layers"],
                               "hidden": config["hidden_size"], "startup_s": startup, "ceilings": ceilings,
                               "decode": decode, "prefill": prefill, "all_reduce_share": shares,
                               "decode_b1_kernels": breakdown}))


def render(info: dict[str, Any], results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["case"], "failed: " + r["error"][-200:], "", "", "", "", "", ""])
            continue
        dec = {d["batch"]: d for d in r["decode"] if "step_ms" in d}
        pre = {p["case"]: p for p in r["prefill"]}
        rows.append([r["case"], dec.get(1, {}).get("step_ms"), dec.get(1, {}).get("bw_util_step"),
                     dec.get(32, {}).get("step_ms"), pre.get("1x2048", {}).get("step_ms"),
                     pre.get("1x8192", {}).get("step_ms"), pre.get("1x8192", {}).get("mfu_step"),
                     json.dumps(r.get("all_reduce_share") or r.get("nccl_share") or {})])
    by = {r["case"]: r for r in results if "error" not in r}
    ratios = []

    def step(case: str, kind: str, key: Any) -> float | None:
        if case not in by:
            return None
        table = {d["batch"]: d for d in by[case]["decode"]} if kind == "decode" else \
            {p["case"]: p for p in by[case]["prefill"]}
        return table.get(key, {}).get("step_ms")

    for label, kind, key, case in (("decode batch 1 (target <= 0.6)", "decode", 1, "8b-tp2"),
                                   ("decode batch 1, peer all-reduce", "decode", 1, "8b-tp2-peer"),
                                   ("decode batch 32", "decode", 32, "8b-tp2"),
                                   ("decode batch 32, peer all-reduce", "decode", 32, "8b-tp2-peer"),
                                   ("prefill 8k (target <= 0.55)", "prefill", "1x8192", "8b-tp2"),
                                   ("prefill 2k", "prefill", "1x2048", "8b-tp2"),
                                   ("prefill 2k, TP=2 graphs up to 1k only", "prefill", "1x2048", "8b-tp2-graphs1k"),
                                   ("prefill 8k, TP=2 graphs up to 1k only", "prefill", "1x8192", "8b-tp2-graphs1k")):
        one, two = step("8b-tp1", kind, key), step(case, kind, key)
        if two is not None:
            ratios.append([label, one, two, round(two / one, 3) if one and two else None])
    floors = []  # one GPU: a TP=2 rank's step without all-reduces, and the one-row GEMV's A/B
    for label, kind, key, case, base in (
            ("decode batch 1: TP=2 rank without all-reduces / TP=1", "decode", 1, "8b-rank-of-tp2", "8b-tp1"),
            ("decode batch 32: the same", "decode", 32, "8b-rank-of-tp2", "8b-tp1"),
            ("prefill 8k: the same", "prefill", "1x8192", "8b-rank-of-tp2", "8b-tp1"),
            ("decode batch 1, TP=1: one-row GEMV / cuBLAS", "decode", 1, "8b-tp1", "8b-tp1-cublas"),
            ("decode batch 1, TP=2 rank: one-row GEMV / cuBLAS", "decode", 1, "8b-rank-of-tp2",
             "8b-rank-of-tp2-cublas")):
        one, two = step(base, kind, key), step(case, kind, key)
        if one is not None and two is not None:
            floors.append([label, one, two, round(two / one, 3)])
    out = ["# Tensor parallelism (one engine, ranks on threads, all-reduce over NCCL or the peer kernel)", "",
           f"{info.get('device')} x{info.get('num_gpus')} · commit {info['commit']} · {info['date']}", "",
           markdown_table(["case", "decode B=1 step ms", "B=1 bw util", "decode B=32 step ms", "prefill 2k ms",
                           "prefill 8k ms", "8k MFU (per GPU)", "all-reduce share of GPU 0 kernel time"], rows), ""]
    if ratios:  # tables of ratios only where this run has both cases
        out += ["TP=2 over TP=1 (Llama-3.1-8B shapes; both with CUDA graphs, the default: one graph per rank at TP=2, "
                "for every step up to 8k tokens; TP=1 graphs up to 1k):", "",
                markdown_table(["step", "TP=1 ms", "TP=2 ms", "TP=2 / TP=1"], ratios), ""]
    if floors:
        out += ["One GPU (`8b-rank-of-tp2`: a TP=1 engine of one TP=2 rank's shapes; `-cublas`: single rows through "
                "cuBLAS):", "", markdown_table(["step", "base ms", "case ms", "case / base"], floors), ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), help="(internal) run one case, write --out")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-70b", action="store_true")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("--timeout", type=int, default=400, help="seconds per case")
    args = parser.parse_args()
    if args.case:
        import faulthandler

        faulthandler.dump_traceback_later(max(5, args.timeout - 15))  # a case about to be killed says where it was
        run_case(args.case, args.out)
        return
    needed = max((CASES[name][1] for name in args.cases.split(",") if name in CASES), default=1)
    if torch.cuda.device_count() < needed:
        raise SystemExit(f"these cases need {needed} CUDA GPUs")
    info = run_info()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            if name not in CASES:
                raise SystemExit(f"unknown case {name!r}; choose from {', '.join(CASES)}")
            if args.skip_70b and name.startswith("70b"):
                continue
            out = Path(tmp) / f"{name}.json"
            try:
                print(f"== case {name}", flush=True)  # the case's own lines follow as they come
                done = subprocess.run([sys.executable, "-m", "benchmarks.tensor_parallel", "--case", name, "--out",
                                       str(out), "--timeout", str(args.timeout)], timeout=args.timeout,
                                      env={**os.environ, **CASE_ENV.get(name, {})})
                results.append(json.loads(out.read_text()) if done.returncode == 0 and out.exists()
                               else {"case": name, "error": f"exit {done.returncode} (its output is above)"})
            except subprocess.TimeoutExpired:
                results.append({"case": name, "error": f"timed out after {args.timeout} s"})
    markdown = render(info, results)
    print(markdown)
    write_results("tensor_parallel", info, {"results": results}, markdown)


if __name__ == "__main__":
    main()
