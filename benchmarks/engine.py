"""Engine benchmark on one GPU: decode bandwidth utilisation, prefill MFU, prefill latency by prompt
length, mixed prefill+decode steps, the inter-token latency under chunked prefill, offline throughput
vs transformers' continuous batching, start-up time. Llama-3.1-8B shapes, dummy weights, bf16.

    python -m benchmarks.engine                  # full run (about 6 minutes on an H200)
    python -m benchmarks.engine --preset tiny    # smoke run of the same code paths (CPU or GPU)

Method. Ceilings first (device copy bandwidth counting bytes read + written; bf16 8192^3 matmul).
Decode: B requests enter through the decode role's path (landing zone + ``complete_remote_prefill``)
with C tokens of random KV, then 20 engine steps are timed; utilisation = (weight bytes + KV bytes
read) / step time / copy bandwidth, where weight bytes exclude the embedding table (only B rows of it
are read) and KV bytes = B x context x 2 x layers x kv_heads x head_dim x 2 bytes. "step" is the whole
engine step (schedule, inputs, graph replay, logits, sampling, detokenize); "forward" is the GPU time
of the forward pass alone (CUDA events). Prefill: one engine step computing a fresh prompt (prefix
caching off); MFU = (2 x non-embedding params x tokens + 2 x lm_head x sequences + attention FLOPs) /
time / matmul rate, attention FLOPs = 4 x layers x heads x head_dim x sum(T(T+1)/2). The step-level
tables (prefill latency, mixed steps, chunked-prefill ITL) are described in ``benchmarks.engine_steps``.
With asynchronous scheduling (the default) a decode "step" is the wall time between consecutive steps
in steady state, the rate a client sees tokens at.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    LLAMA31_8B,
    measure_ceilings,
    run_info,
    write_model_dir,
    write_results,
)
from benchmarks.engine_report import evaluate_targets, render_markdown
from benchmarks.engine_steps import bench_chunked_itl, bench_mixed_steps, bench_prefill_latency
from pdserve import LLM, SamplingParams

TINY: dict[str, Any] = {**LLAMA31_8B, "vocab_size": 50257, "hidden_size": 256, "intermediate_size": 512,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}


def weight_bytes(llm: LLM) -> int:
    model = llm.engine.model
    total = 0
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight") and model.lm_head is not None:
            continue  # only the batch's rows of the embedding table are read
        total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(llm: LLM) -> int:
    """KV bytes of one token in one rank's cache (all of it without tensor parallelism)."""
    layout = llm.engine.kv_layout
    return layout.bytes_per_block // layout.block_size


class ForwardTimer:
    """Wraps the runner's forward pass with CUDA events to time the GPU work alone."""

    def __init__(self, llm: LLM) -> None:
        self.runner = llm.engine.runner
        self.original = self.runner.forward
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.enabled = torch.cuda.is_available()

        def timed(chunks):  # noqa: ANN001, ANN202
            if not self.enabled:
                return self.original(chunks)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.original(chunks)
            end.record()
            self.events.append((start, end))
            return out

        self.runner.forward = timed

    def take_ms(self) -> list[float]:
        if not self.enabled:
            return []
        torch.cuda.synchronize()
        out = [s.elapsed_time(e) for s, e in self.events]
        self.events.clear()
        return out


def inject_decode_batch(llm: LLM, batch: int, context: int, tag: str) -> list[str]:
    """``batch`` running requests whose ``context`` prompt tokens already have (random) KV."""
    engine = llm.engine
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        prompt = [(i * 7919 + j * 104729) % 50000 + 1 for j in range(context)]
        engine.add_request(rid, prompt_token_ids=prompt, params=params, remote_prefill=True)
    zones = []
    while len(zones) < batch:
        assert engine.step() == []
        zones += engine.take_landing_zones()
    for rid in ids:
        engine.complete_remote_prefill(rid, 1)
    return ids


def bench_decode(llm: LLM, ceilings: dict[str, float], batches: list[int], contexts: list[int], steps: int
                 ) -> list[dict[str, Any]]:
    engine, timer = llm.engine, ForwardTimer(llm)
    wbytes, per_token = weight_bytes(llm), kv_bytes_per_token(llm)
    capacity = (engine.kv.pool.num_usable_blocks - 1) * engine.kv.block_size
    rows = []
    for context in contexts:
        for batch in batches:
            if batch * (context + steps + 8 + engine.kv.block_size) > capacity or batch > engine.config.max_num_seqs:
                rows.append({"batch": batch, "context": context, "skipped": "does not fit the KV cache"})
                continue
            ids = inject_decode_batch(llm, batch, context, f"d{batch}x{context}")
            for _ in range(3):
                engine.step()
            timer.take_ms()
            wall = []
            for _ in range(steps):
                t0 = time.perf_counter()
                engine.step()
                wall.append((time.perf_counter() - t0) * 1e3)
            fwd = timer.take_ms()
            for rid in ids:
                engine.abort_request(rid)
            step_ms = statistics.median(wall)
            fwd_ms = statistics.median(fwd) if fwd else float("nan")
            avg_context = context + 3 + steps / 2
            moved = wbytes + batch * avg_context * per_token
            row = {"batch": batch, "context": context, "step_ms": round(step_ms, 3), "forward_ms": round(fwd_ms, 3),
                   "bytes_gb": round(moved / 1e9, 3), "tokens_per_s": round(batch / step_ms * 1e3, 1)}
            if ceilings:
                bw = ceilings["copy_gb_per_s"] * 1e9
                row["bw_util_step"] = round(moved / (step_ms * 1e-3) / bw, 3)
                row["bw_util_forward"] = round(moved / (fwd_ms * 1e-3) / bw, 3)
            rows.append(row)
            print(f"decode B={batch:4d} ctx={context:5d}: step {step_ms:7.3f} ms  forward {fwd_ms:7.3f} ms  "
                  f"util(step) {row.get('bw_util_step', '-')}", flush=True)
    return rows


def model_flops(llm: LLM, lengths: list[int]) -> float:
    s = llm.engine.spec
    non_embedding = s.num_parameters() - 2 * s.vocab_size * s.hidden_size
    tokens = sum(lengths)
    attention = 4 * s.num_layers * s.num_heads * s.head_dim * sum(t * (t + 1) / 2 for t in lengths)
    return 2 * non_embedding * tokens + 2 * s.vocab_size * s.hidden_size * len(lengths) + attention


def bench_prefill(llm: LLM, ceilings: dict[str, float], cases: list[tuple[str, list[int]]], repeats: int
                  ) -> list[dict[str, Any]]:
    engine, timer = llm.engine, ForwardTimer(llm)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    rows, serial = [], 0
    for name, lengths in cases:
        times, fwd = [], []
        for rep in range(repeats + 1):
            for i, n in enumerate(lengths):
                serial += 1
                engine.add_request(f"p{serial}", prompt_token_ids=[(serial * 31 + j * 17 + i) % 50000 + 1
                                                                  for j in range(n)], params=params)
            timer.take_ms()
            before_tokens = engine.runner.num_forward_tokens
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            deltas = engine.step()  # launches the prefill; with async scheduling its tokens land next step
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - t0) * 1e3
            assert engine.runner.num_forward_tokens - before_tokens == sum(lengths), "prefill did not fit one step"
            while engine.has_unfinished_requests():
                deltas += engine.step()
            assert len(deltas) == len(lengths) and all(d.finished for d in deltas)
            if rep:  # the first repetition warms up (kernel compilation for new shapes)
                times.append(elapsed)
                fwd += timer.take_ms()
        step_ms, fwd_ms = statistics.median(times), statistics.median(fwd) if fwd else float("nan")
        flops = model_flops(llm, lengths)
        row = {"case": name, "tokens": sum(lengths), "step_ms": round(step_ms, 2), "forward_ms": round(fwd_ms, 2),
               "tflops_step": round(flops / (step_ms * 1e-3) / 1e12, 1)}
        if ceilings:
            row["mfu_step"] = round(flops / (step_ms * 1e-3) / 1e12 / ceilings["bf16_matmul_tflops"], 3)
            row["mfu_forward"] = round(flops / (fwd_ms * 1e-3) / 1e12 / ceilings["bf16_matmul_tflops"], 3)
        rows.append(row)
        print(f"prefill {name:>8}: step {step_ms:8.2f} ms  forward {fwd_ms:8.2f} ms  MFU(step) {row.get('mfu_step')}",
              flush=True)
    return rows


def bench_offline(llm: LLM, num_requests: int, prompt_len: int, output_len: int) -> dict[str, Any]:
    prompts = [[(r * 131 + j * 7) % 50000 + 1 for j in range(prompt_len)] for r in range(num_requests)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:4], sampling_params=SamplingParams(max_tokens=4, ignore_eos=True))
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    elapsed = time.perf_counter() - t0
    generated = sum(len(o.token_ids) for o in outs)
    return {"requests": num_requests, "prompt_len": prompt_len, "output_len": output_len,
            "seconds": round(elapsed, 2), "output_tokens": generated,
            "output_tokens_per_s": round(generated / elapsed, 1),
            "total_tokens_per_s": round((generated + num_requests * prompt_len) / elapsed, 1)}


def bench_attention_kernels(ceilings: dict[str, float]) -> list[dict[str, Any]]:
    """Prefill attention alone on one causal sequence: our Triton kernel (its tile list built beforehand,
    as the engine does) vs torch SDPA (what ``dense_prefill`` calls)."""
    import numpy as np
    import torch.nn.functional as F

    from benchmarks.common import _median_ms
    from pdserve.engine.kernels.paged_prefill import (
        build_query_tiles,
        paged_prefill_attention,
        query_tile_rows,
    )
    from tests.support.kernel_cases import paged_problem

    rows = []
    for t in (2048, 8192):
        q, cache, meta = paged_problem([0], [t], 32, 8, 128, 16, torch.bfloat16, "cuda", seed=t)
        host = np.zeros((2, t), dtype=np.int32)
        n = build_query_tiles(np.array([t]), 0, query_tile_rows(128, torch.bfloat16), host)
        tiles = torch.from_numpy(host).cuda()
        count = torch.tensor([n], dtype=torch.int32, device="cuda")
        ours = _median_ms(lambda: paged_prefill_attention(  # noqa: B023
            q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale=128**-0.5,  # noqa: B023
            sliding_window=None, tiles=tiles, num_tiles=count, num_programs=n), 10)  # noqa: B023
        k = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        qs = q.transpose(0, 1).unsqueeze(0)
        sdpa = _median_ms(lambda: F.scaled_dot_product_attention(qs, k, v, is_causal=True, enable_gqa=True), 10)  # noqa: B023
        flops = 4 * 32 * 128 * t * (t + 1) / 2
        rows.append({"tokens": t, "triton_ms": round(ours, 3), "sdpa_ms": round(sdpa, 3),
                     "triton_tflops": round(flops / ours / 1e9, 1), "sdpa_tflops": round(flops / sdpa / 1e9, 1)})
        print(f"attention T={t}: triton {ours:.3f} ms  sdpa {sdpa:.3f} ms", flush=True)
    return rows


def profile_decode_step(llm: LLM, context: int) -> list[dict[str, Any]]:
    """Top GPU kernels of batch-1 decode steps (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    ids = inject_decode_batch(llm, 1, context, "prof")
    for _ in range(3):
        llm.engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            llm.engine.step()
    for rid in ids:
        llm.engine.abort_request(rid)
    rows = []
    for evt in sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0))[:12]:
        rows.append({"name": evt.key[:80], "calls": evt.count,
                     "device_ms_per_step": round(getattr(evt, "device_time_total", 0) / 1e3 / 5, 3),
                     "cpu_ms_per_step": round(evt.cpu_time_total / 1e3 / 5, 3)})
    return rows


def run_hf_baseline(model_config: dict[str, Any], requests: int, prompt_len: int, output_len: int,
                    timeout_s: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, "-m", "benchmarks.hf_baseline", "--json", out.name, "--requests", str(requests),
               "--prompt-len", str(prompt_len), "--output-len", str(output_len), "--config", json.dumps(model_config)]
        try:
            done = subprocess.run(cmd, timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"did not finish within {timeout_s} s"}
        if done.returncode != 0:
            return {"error": done.stderr[-2000:]}
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["llama31-8b", "tiny"], default="llama31-8b")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf-from", type=Path, help="take the transformers baseline from an earlier run's JSON "
                        "(same device kind; its commit and date are recorded) instead of measuring it again")
    parser.add_argument("--hf-timeout", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any section failed "
                        "(the CI smoke run); by default a failed section is recorded and the run goes on")
    args = parser.parse_args()
    tiny = args.preset == "tiny"
    config = TINY if tiny else LLAMA31_8B
    info = run_info()
    cuda = torch.cuda.is_available()
    ceilings = measure_ceilings() if cuda else {}
    print("ceilings:", ceilings, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", config)
        t0 = time.perf_counter()
        llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16" if cuda else "float32",
                  max_model_len=16384, max_num_seqs=256, max_num_batched_tokens=8192, enable_prefix_caching=False,
                  gpu_memory_utilization=0.90, num_kv_blocks=None if cuda else 4096)
        startup = {"total_s": round(time.perf_counter() - t0, 2),
                   **{k: round(v, 2) for k, v in llm.engine.startup_seconds.items()},
                   "kv_blocks": llm.engine.kv_layout.num_blocks}
        print("startup:", startup, flush=True)
        with torch.no_grad():
            for cache in llm.engine.kv_caches:  # never time attention on zeros
                cache.normal_(0.0, 0.5)
        batches, contexts = ([1, 8, 32, 64, 128, 256], [1024, 4096]) if not tiny else ([1, 8], [64])
        decode = guarded("decode", lambda: bench_decode(llm, ceilings, batches, contexts, args.steps), [])
        cases = ([(f"1x{n}", [n]) for n in (512, 1024, 2048, 8192)] + [("8x1024", [1024] * 8)]) if not tiny \
            else [("1x64", [64]), ("4x32", [32] * 4)]
        prefill = guarded("prefill", lambda: bench_prefill(llm, ceilings, cases, repeats=3), [])
        if cuda and not tiny:  # the same eager steps with our Triton prefill attention instead of torch SDPA
            backend = llm.engine.attention_backend
            backend.use_dense_prefill = False  # type: ignore[attr-defined]
            prefill += [{**r, "case": r.get("case", "?") + " (triton attention)"} for r in guarded(
                "prefill-triton", lambda: bench_prefill(llm, ceilings, [("1x8192", [8192]), ("8x1024", [1024] * 8)],
                                                        repeats=3), [])]
            backend.use_dense_prefill = True  # type: ignore[attr-defined]
        lengths = [16, 64, 128, 256, 512, 1024, 2048, 4096, 8192] if not tiny else [16, 64]
        latency = guarded("prefill-latency", lambda: bench_prefill_latency(llm, lengths), [])
        mixed = guarded("mixed", lambda: bench_mixed_steps(
            llm, inject_decode_batch, [1, 32, 64, 128] if not tiny else [1, 4], [64, 256, 512, 2048] if not tiny
            else [16, 32], context=1024 if not tiny else 64), [])
        itl = guarded("chunked-itl", lambda: bench_chunked_itl(
            llm, inject_decode_batch, [256, 512, 2048] if not tiny else [16, 64], batch=32 if not tiny else 4,
            context=1024 if not tiny else 64, prompt_tokens=2048 if not tiny else 128), [])
        profile = guarded("profile", lambda: profile_decode_step(llm, 1024 if not tiny else 64), []) if cuda else []
        offline = guarded("offline", lambda: bench_offline(llm, *((256, 512, 256) if not tiny else (16, 32, 16))),
                          {"output_tokens_per_s": None})
        print("offline:", offline, flush=True)
        attention = guarded("attention", lambda: bench_attention_kernels(ceilings), []) if cuda and not tiny else []
        llm.engine.runner.graphs = None
        llm = None  # free the GPU for the transformers baseline's process
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    hf: dict[str, Any] = {"skipped": True}
    if args.hf_from is not None:
        earlier = json.loads(args.hf_from.read_text())
        hf = {"measured_in_run": f"{earlier['run']['commit']} {earlier['run']['date']}",
              **earlier["transformers_cb"]}  # a baseline carried over twice keeps the run that measured it
    elif cuda and not args.skip_hf:
        hf = run_hf_baseline(config, *((256, 512, 256) if not tiny else (16, 32, 16)), timeout_s=args.hf_timeout)
        print("transformers:", hf, flush=True)

    targets = evaluate_targets(decode, prefill, offline, hf, startup, latency, mixed) if not tiny else {}
    payload = {"preset": args.preset, "ceilings": ceilings, "startup": startup, "decode": decode, "prefill": prefill,
               "prefill_latency": latency, "mixed_steps": mixed, "chunked_prefill_itl": itl,
               "offline": offline, "transformers_cb": hf, "attention_kernels": attention,
               "decode_profile_b1": profile, "targets": targets}
    markdown = render_markdown(info, payload)
    if cuda and not tiny:
        paths = write_results("engine", info, payload, markdown)
        print("wrote", *paths)
    print(markdown)
    if args.strict and FAILED_SECTIONS:
        raise SystemExit(f"failed sections: {', '.join(FAILED_SECTIONS)}")


#: The sections of this run that raised (``guarded``), for ``--strict``.
FAILED_SECTIONS: list[str] = []


def guarded(name: str, fn, fallback):  # noqa: ANN001, ANN201
    """Run one section; on failure record the error and go on, so one bug does not cost the whole run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        FAILED_SECTIONS.append(name)
        print(f"section {name} failed: {exc!r}", flush=True)
        return fallback if not isinstance(fallback, list) else [{"error": f"{name}: {exc!r}"}]


if __name__ == "__main__":
    main()
