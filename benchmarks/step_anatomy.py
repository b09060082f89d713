"""Where a step's time goes, and whether the step-time model holds on live steps.

Two sections, one engine (Llama-3.1-8B shapes, dummy weights, the SLO-aware settings of a colocated-slo
worker: 15 ms step budget, 250 ms TTFT, 8,192-token steps):

* **anatomy** -- synthetic steps (decodes, fresh prompts, mixed steps) timed the way the start-up profile
  times them, each against the model's prediction, with the device time of its kernels by kind (matrix
  products, attention, norms, ...) from the torch profiler and the share of the step's span the device
  was busy.
* **live** -- the engine serves Poisson arrivals of a workload (prefill-heavy 2048/128, decode-heavy
  128/1024, ShareGPT-like lognormal lengths) in-process, no cluster; every step's device span is recorded with what it carried. Per kind
  of step: live over the start-up model's prediction (what the worker's calibration learns), then a
  sample of the live steps is replayed as synthetic steps on the idle engine: replay over prediction says
  whether the model's *form* misses these shapes, live over replay whether serving itself makes steps
  slower. Last, the model is refitted on the profile plus the replayed steps and judged on the live
  ones again.

    python -m benchmarks.step_anatomy                   # one GPU
    python -m benchmarks.step_anatomy --preset tiny     # CPU smoke (no kernels, a short run)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import LLAMA31_8B, markdown_table, run_info, write_model_dir, write_results
from benchmarks.serving.workload import (
    PRESETS,
    TRACE_LENGTH_SCALE,
    TRACE_MAX_INPUT,
    TRACE_MAX_OUTPUT,
    RequestSpec,
    fixed_workload,
    poisson_schedule,
    sharegpt_workload,
    trace_workload,
)
from pdserve import LLM, SamplingParams
from pdserve.common.step_model import StepShape, StepTimeModel
from pdserve.engine.step_profile import synthetic_step_timer
from pdserve.engine.step_time import StepTimeMonitor, fit_step_time

TINY = {**LLAMA31_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
#: Synthetic steps of the anatomy: name -> (decode contexts, prompt chunks as (tokens, context)).
ANATOMY: dict[str, tuple[list[int], list[tuple[int, int]]]] = {
    "decode 64 @1k": ([1024] * 64, []),
    "decode 256 @1k": ([1024] * 256, []),
    "prefill 256": ([], [(256, 0)]),
    "prefill 320": ([], [(320, 0)]),
    "prefill 512": ([], [(512, 0)]),
    "prefill 512 @1k": ([], [(512, 1024)]),
    "mixed 64 @1k + 256": ([1024] * 64, [(256, 0)]),
    "mixed 64 @1k + 256 @1k": ([1024] * 64, [(256, 1024)]),
    "mixed 32 @2k + 512 @1k": ([2048] * 32, [(512, 1024)]),
    "mixed 256 @1k + 128": ([1024] * 256, [(128, 0)]),
    "mixed 256 @1k + 4x128": ([1024] * 256, [(128, 0)] * 4),
    # later chunks beside a few long decodes, as served prefill-heavy loads run them (live shapes)
    "chunked 6 @2k + 102 @1.9k": ([2048] * 6, [(102, 1946)]),
    "chunked 9 @2k + 400 @1.4k": ([2048] * 9, [(400, 1417)]),
}
KERNEL_KINDS = (("gemm", r"nvjet|gemm|cutlass|xmma|cublas|sm90_"), ("decode attention", r"decode"),
                ("prefill attention", r"prefill|flash|fmha|attention|sdpa|efficient"), ("norm", r"norm"),
                ("rope", r"rope|rotary"), ("activation", r"silu|act_and_mul|activation"),
                ("kv write", r"cache|reshape_and|kv_write|store_kv"), ("copy/index", r"copy|index|gather|cat|fill"))


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def kernel_breakdown(run: Callable[[], float], repeats: int = 3) -> dict[str, float]:
    """Device ms per step of each kind of kernel, the kernels' total and their union's share of the span
    from the first kernel's start to the last one's end (1.0: never idle)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run()
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    busy = span = 0.0
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
        intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                           if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                by_kind[kernel_kind(e.name)] += e.time_range.elapsed_us() / 1e3 / repeats
                by_name[e.name[:70]] += e.time_range.elapsed_us() / 1e3 / repeats
        if intervals:
            span += (intervals[-1][1] - intervals[0][0]) / 1e3 / repeats
            end = intervals[0][0]
            for lo, hi in intervals:
                busy += max(0, hi - max(lo, end)) / 1e3 / repeats
                end = max(end, hi)
    out = {kind: round(ms, 3) for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    out["kernels_ms"] = round(sum(by_kind.values()), 3)
    out["busy_share"] = round(busy / span, 3) if span else 0.0
    out["top"] = [[name, round(ms, 3)] for name, ms in sorted(by_name.items(), key=lambda kv: -kv[1])[:8]]
    return out


def anatomy(llm: LLM, model: StepTimeModel, profile_kernels: bool) -> list[dict[str, Any]]:
    time_step = synthetic_step_timer(llm.engine)
    rows = []
    for name, (decodes, chunks) in ANATOMY.items():
        longest = max([c + 1 for c in decodes] + [n + c for n, c in chunks])
        if longest > llm.engine.max_model_len:
            print(f"anatomy {name}: skipped (a sequence of {longest} tokens; the engine holds "
                  f"{llm.engine.max_model_len})", flush=True)
            continue
        try:
            time_step(decodes, chunks)
        except RuntimeError as exc:  # the tiny preset's cache holds fewer tokens
            print(f"anatomy {name}: skipped ({exc})", flush=True)
            continue
        seconds = statistics.median(time_step(decodes, chunks) for _ in range(5))
        row: dict[str, Any] = {"step": name, "ms": round(seconds * 1e3, 2),
                               "model_ms": round(model.predict(StepShape.of(decodes, chunks)) * 1e3, 2)}
        if profile_kernels:
            row["kernels"] = kernel_breakdown(lambda: time_step(decodes, chunks))  # noqa: B023
        rows.append(row)
        print(f"anatomy {name:26s} {row['ms']:7.2f} ms (model {row['model_ms']:.2f}) {row.get('kernels', '')}",
              flush=True)
    return rows


def serve_live(llm: LLM, workload: str, rate: float, num_requests: int, seed: int, smoke: bool,
               trace_path: Path | None = None) -> dict[str, Any]:
    """Serve Poisson arrivals in-process with a fresh (uncalibrated) model; every step recorded. ``trace``:
    the Mooncake window of the serving benchmark (requests from 0, lengths x 0.25, its caps, arrivals spread
    within the trace's buckets) with ``rate`` as its time scale (arrival times x it: 2 is half the pace)."""
    engine = llm.engine
    base = StepTimeModel.from_dict(engine.step_time.to_dict())
    engine.step_monitor = StepTimeMonitor(base)
    engine.step_time = engine.scheduler.step_time = base
    vocab = min(32000, llm.engine.spec.vocab_size)
    offsets: list[float] | None = None
    if workload == "trace":
        if trace_path is None:
            raise SystemExit("the trace workload needs --trace-path (the Mooncake conversation trace, JSONL)")
        specs = trace_workload(trace_path, count=num_requests, time_scale=rate, length_scale=TRACE_LENGTH_SCALE,
                               max_input=256 if smoke else TRACE_MAX_INPUT, max_output=16 if smoke else TRACE_MAX_OUTPUT,
                               vocab=vocab, seed=seed)
        offsets = [spec.arrival_s for spec in specs]
    elif workload == "sharegpt":  # lognormal lengths (prompts ~170, outputs ~150 tokens at the median)
        specs = [RequestSpec(s.prompt_token_ids[:len(s.prompt_token_ids) // 16 or 1] if smoke else s.prompt_token_ids,
                             max(1, s.output_len // 16) if smoke else s.output_len)
                 for s in sharegpt_workload(num_requests, seed, vocab=vocab)]
    else:
        input_len, output_len = PRESETS[workload]
        if smoke:
            input_len, output_len = input_len // 16, output_len // 16
        specs = fixed_workload(num_requests, input_len, output_len, seed, vocab=vocab)
    if offsets is None:
        offsets = poisson_schedule(num_requests, rate, seed)
    num_requests = len(specs)
    steps: list[dict[str, Any]] = []
    land = engine._land

    def recording_land(launched):  # noqa: ANN001, ANN202 (LaunchedStep)
        deltas = land(launched)
        seconds = launched.seconds()
        if seconds is not None:
            chunks = launched.plan.chunks
            steps.append({"decodes": [c.start for c in chunks if c.num_tokens == 1],
                          "chunks": [(c.num_tokens, c.start) for c in chunks if c.num_tokens > 1],
                          "chunk_requests": [int(c.request.request_id.rsplit("-", 1)[1])
                                             for c in chunks if c.num_tokens > 1],
                          "landed_s": time.perf_counter() - start, "seconds": seconds})
        return deltas

    engine._land = recording_land  # type: ignore[method-assign]
    first_token_s: dict[str, float] = {}  # request id -> when its first token reached the host (s from start)
    added_s: list[float] = []  # when each request reached the engine (s from start)
    added = 0
    start = time.perf_counter()
    step_host_s = 0.0
    try:
        while added < num_requests or engine.has_unfinished_requests():
            now = time.perf_counter() - start
            while added < num_requests and offsets[added] <= now:
                added_s.append(time.perf_counter() - start)  # requests join between steps: after their offset
                engine.add_request(f"{workload}-{added}", prompt_token_ids=specs[added].prompt_token_ids,
                                   params=SamplingParams(max_tokens=specs[added].output_len, ignore_eos=True,
                                                         temperature=0.0))
                added += 1
            if engine.has_unfinished_requests():
                t = time.perf_counter()
                for delta in engine.step():
                    if delta.new_token_ids and delta.request_id not in first_token_s:
                        first_token_s[delta.request_id] = time.perf_counter() - start
                step_host_s += time.perf_counter() - t
            else:
                time.sleep(max(0.0, min(0.01, offsets[added] - now)))
    finally:
        del engine._land
    wall = time.perf_counter() - start
    print(f"live {workload} at {rate} req/s: {len(steps)} steps in {wall:.1f} s, calibration "
          f"{engine.step_monitor.summary()['calibration']}", flush=True)
    return {"workload": workload, "rate": rate, "requests": num_requests, "wall_s": round(wall, 2),
            "device_busy_share": round(sum(s["seconds"] for s in steps) / wall, 3),
            "calibration": engine.step_monitor.summary()["calibration"], "model": base, "steps": steps,
            # per request, for the planner's simulation fed the same arrivals (its TTFT error without the
            # router, gRPC and client path): arrival, lengths, TTFT, the steps that carried its prompt
            "per_request": [{"arrival_s": round(offsets[i], 6), "added_s": round(added_s[i], 6),
                             "prompt_tokens": len(specs[i].prompt_token_ids),
                          "output_tokens": specs[i].output_len,
                          "ttft_s": round(first_token_s[f"{workload}-{i}"] - offsets[i], 6)
                          if f"{workload}-{i}" in first_token_s else None,
                          "prompt_steps": sum(i in st["chunk_requests"] for st in steps)} for i in range(num_requests)]}


def judge(steps: list[dict[str, Any]], model: StepTimeModel, key: str = "seconds") -> dict[str, dict[str, Any]]:
    """Per kind of step: count and the median, p10 and p90 of ``key`` over the model's prediction."""
    ratios: dict[str, list[float]] = defaultdict(list)
    for step in steps:
        shape = StepShape.of(step["decodes"], step["chunks"])
        ratios[shape.kind.value].append(step[key] / model.predict(shape))
    out = {}
    for kind, values in sorted(ratios.items()):
        values.sort()
        out[kind] = {"steps": len(values), "p50": round(statistics.median(values), 3),
                     "p10": round(values[len(values) // 10], 3), "p90": round(values[(9 * len(values)) // 10], 3)}
    return out


#: Chunk-context buckets of :func:`judge_by_context` (tokens already computed before a step's furthest chunk).
CONTEXT_BUCKETS = (0, 1, 2048, 4096, 8192)


def judge_by_context(steps: list[dict[str, Any]], model: StepTimeModel) -> dict[str, dict[str, Any]]:
    """Steps with prompt chunks by how much earlier context their furthest chunk attends to (``0``: fresh
    prompts only): count, live over the model's prediction (p50) and the live and predicted seconds in all,
    to tell whether long prompts' later chunks cost what the model prices them at."""
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for step in steps:
        if not step["chunks"]:
            continue
        context = max(start for _, start in step["chunks"])
        low = max(b for b in CONTEXT_BUCKETS if b <= context)
        label = "fresh" if low == 0 else f">= {low}"
        groups[label].append((step["seconds"], model.predict(StepShape.of(step["decodes"], step["chunks"]))))
    return {label: {"steps": len(pairs), "p50": round(statistics.median(m / p for m, p in pairs), 3),
                    "live_s": round(sum(m for m, _ in pairs), 3), "model_s": round(sum(p for _, p in pairs), 3)}
            for label, pairs in sorted(groups.items())}


def replay(llm: LLM, steps: list[dict[str, Any]], per_kind: int) -> list[dict[str, Any]]:
    """Up to ``per_kind`` live steps of each kind, evenly spread, timed again as synthetic steps."""
    time_step = synthetic_step_timer(llm.engine)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for step in steps:
        by_kind[StepShape.of(step["decodes"], step["chunks"]).kind.value].append(step)
    out = []
    for chosen in by_kind.values():
        stride = max(1, len(chosen) // per_kind)
        for step in chosen[::stride][:per_kind]:
            time_step(step["decodes"], step["chunks"])
            out.append({**step, "replay_s": statistics.median(time_step(step["decodes"], step["chunks"])
                                                               for _ in range(3))})
    return out


def profile_samples(llm: LLM) -> list[tuple[StepShape, float]]:
    return [(StepShape.of([row["context"]] * row["decodes"], [(row["chunk_tokens"], row["chunk_context"])] * (
        row["prompts"] if row["chunk_tokens"] else 0)), row["seconds"]) for row in llm.engine.step_time_samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["llama31-8b", "tiny"], default="llama31-8b")
    parser.add_argument("--rates", default="prefill-heavy=6,decode-heavy=24",
                        help="WORKLOAD=REQ_PER_S,... (prefill-heavy, decode-heavy, sharegpt; trace=TIME_SCALE)")
    parser.add_argument("--trace-path", type=Path, default=None, help="the Mooncake trace, for the trace workload")
    parser.add_argument("--skip-anatomy", action="store_true", help="only the live section (saves device time)")
    parser.add_argument("--num-requests", type=int, default=240)
    parser.add_argument("--max-running", type=int, default=512)
    parser.add_argument("--replay-per-kind", type=int, default=40)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--tag", default="", help="results go to step_anatomy-TAG-<device>.*")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="also write the result JSON here (any device; e.g. a CPU smoke for benchmarks.sim_vs_engine)")
    args = parser.parse_args()
    smoke = args.preset == "tiny"
    cuda = torch.cuda.is_available()
    info = run_info()
    rates = {name: float(rate) for name, rate in (item.split("=") for item in args.rates.split(","))}
    if "trace" in rates and (args.trace_path is None or not args.trace_path.is_file()):
        raise SystemExit(f"--rates trace=...: needs --trace-path, the Mooncake trace (JSONL); got {args.trace_path}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", TINY if smoke else LLAMA31_8B)
        llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16" if cuda else "float32",
                  max_model_len=2048 if smoke else 16384, max_num_seqs=args.max_running, max_num_batched_tokens=8192,
                  step_time_budget_ms=15.0, ttft_slo_ms=250.0, enable_prefix_caching=False,
                  gpu_memory_utilization=0.9, num_kv_blocks=None if cuda else 2048)
        model = llm.engine.step_time
        graphs = llm.engine.runner.graphs
        graph_ms = {size: round(ms, 3) for size, ms in graphs.replay_ms.items()} if graphs is not None else {}
        rerouted = graphs.rerouted if graphs is not None else {}
        print("start-up model:", model.to_dict(), "\ngraph replays (ms):", graph_ms, "\nrerouted:", rerouted, flush=True)
        rows = [] if args.skip_anatomy else anatomy(llm, model, profile_kernels=cuda)
        runs = [serve_live(llm, name, rate, args.num_requests if not smoke else 24, args.seed, smoke, args.trace_path)
                for name, rate in rates.items()]
        for run in runs:
            run["replayed"] = replay(llm, run["steps"], args.replay_per_kind if not smoke else 4)
        refit = fit_step_time(profile_samples(llm) + [(StepShape.of(s["decodes"], s["chunks"]), s["replay_s"])
                                                       for run in runs for s in run["replayed"]])
    live = []
    for run in runs:
        replayed = [{**s, "live_over_replay": s["seconds"] / s["replay_s"]} for s in run["replayed"]]
        live_vs_replay: dict[str, list[float]] = defaultdict(list)
        for s in replayed:
            live_vs_replay[StepShape.of(s["decodes"], s["chunks"]).kind.value].append(s["live_over_replay"])
        live.append({"workload": run["workload"], "rate": run["rate"], "requests": run["requests"],
                     "wall_s": run["wall_s"], "device_busy_share": run["device_busy_share"],
                     "calibration": run["calibration"],
                     "live_over_model": judge(run["steps"], model),
                     "replay_over_model": judge(run["replayed"], model, "replay_s"),
                     "live_over_replay": {k: round(statistics.median(v), 3) for k, v in sorted(live_vs_replay.items())},
                     "live_over_refit": judge(run["steps"], refit),
                     "live_over_model_by_context": judge_by_context(run["steps"], model),
                     "per_request": run["per_request"],
                     # steps with prompt chunks: when they landed, device ms, decodes, (request, tokens, start)
                     "prompt_steps": [[round(s["landed_s"], 4), round(s["seconds"] * 1e3, 3), len(s["decodes"]),
                                       [[r, n, c] for r, (n, c) in zip(s["chunk_requests"], s["chunks"], strict=True)]]
                                      for s in run["steps"] if s["chunks"]],
                     "replayed_steps": [{"decodes": len(s["decodes"]), "decode_context_mean":
                                         round(statistics.mean(s["decodes"]), 1) if s["decodes"] else 0,
                                         "chunks": s["chunks"], "live_ms": round(s["seconds"] * 1e3, 3),
                                         "replay_ms": round(s["replay_s"] * 1e3, 3),
                                         "model_ms": round(model.predict(StepShape.of(s["decodes"], s["chunks"])) * 1e3, 3)}
                                        for s in run["replayed"]]})
    payload = {"preset": args.preset, "model": model.to_dict(), "refit": refit.to_dict(), "graph_replay_ms": graph_ms,
               "graphs_rerouted": rerouted, "graph_rows": list(graphs.padded_sizes) if graphs is not None else [],
               "anatomy": rows, "live": live}
    markdown = render(info, payload)
    print(markdown)
    if cuda and not smoke:
        print("wrote", *write_results("step_anatomy" + (f"-{args.tag}" if args.tag else ""), info, payload, markdown))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps({"run": info, **payload}, indent=2, default=str) + "\n")


def render(info: dict[str, Any], payload: dict[str, Any]) -> str:
    out = [f"# Step anatomy ({payload['preset']})\n",
           f"{info.get('device')} · commit {info['commit']} · {info['date']} · torch {info['torch']}\n",
           "Command: `python -m benchmarks.step_anatomy`. Synthetic steps are timed as the start-up profile "
           "times them (wall, from an idle device); live steps by the CUDA events around each launch.\n",
           "## Synthetic steps: time, model, kernels by kind (device ms per step)\n"]
    kinds = sorted({k for r in payload["anatomy"] for k in r.get("kernels", {}) if k not in ("kernels_ms", "busy_share", "top")})
    out.append(markdown_table(["step", "ms", "model ms", "kernels ms", "busy", *kinds],
                              [[r["step"], r["ms"], r["model_ms"], r.get("kernels", {}).get("kernels_ms", "-"),
                                r.get("kernels", {}).get("busy_share", "-"),
                                *[r.get("kernels", {}).get(k, 0.0) for k in kinds]] for r in payload["anatomy"]]))
    out.append("\n## Live steps against the start-up model, the replay, and a refit\n")
    rows = []
    for run in payload["live"]:
        for kind, j in run["live_over_model"].items():
            replay = run["replay_over_model"].get(kind, {})
            refit = run["live_over_refit"].get(kind, {})
            rows.append([run["workload"], run["rate"], kind, j["steps"], f"{j['p50']} ({j['p10']}-{j['p90']})",
                         replay.get("p50", "-"), run["live_over_replay"].get(kind, "-"), refit.get("p50", "-"),
                         run["calibration"].get(kind, "-"), run["device_busy_share"]])
    out.append(markdown_table(["workload", "req/s (trace: time scale)", "kind", "steps", "live/model p50 (p10-p90)",
                               "replay/model",
                               "live/replay", "live/refit", "engine calibration", "device busy"], rows))
    out.append("\n## Steps with prompt chunks, by the furthest chunk's earlier context (live against the start-up "
               "model)\n")
    out.append(markdown_table(["workload", "req/s (trace: time scale)", "context", "steps", "live/model p50", "live s",
                               "model s"],
                              [[run["workload"], run["rate"], label, j["steps"], j["p50"], j["live_s"], j["model_s"]]
                               for run in payload["live"] for label, j in run["live_over_model_by_context"].items()]))
    out.append(f"\nCUDA graphs a step skips for a faster larger one (size -> size): {payload['graphs_rerouted']}; "
               f"replay on padding (ms): {payload['graph_replay_ms']}\n")
    out.append(f"\nStart-up model: `{payload['model']}`\n\nRefit (profile + replayed steps): `{payload['refit']}`\n")
    return "\n".join(out)


if __name__ == "__main__":
    main()
