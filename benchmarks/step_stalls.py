"""Stalls of the engine thread: the wall time of every ``LLMEngine.step()`` under a decode worker's load.

A decode worker that prefills now and then (spilled prompts, chunks cut to its step budget) meets shapes
a prefill worker never sees; anything built on first use of a shape (a compiled kernel, an attention
plan) stalls every stream it decodes. This probe runs the decode worker's engine settings (Llama-3.1-8B
shapes, dummy weights, a 15 ms step budget) with a decode batch running and prompts of random lengths
arriving, times every step, and lists the slowest with what they carried and, for any step over
``--profile-over-ms``, where its host time went (cProfile); then it runs a second sequence with new
prompts (a stall that does not repeat is a first-use cost), and one without the step budget (chunks as
long as the token budget, as when the running decodes have slack).

    python -m benchmarks.step_stalls [--preset tiny] [--prompts 40]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import LLAMA31_8B, markdown_table, run_info, write_model_dir, write_results
from pdserve import LLM, SamplingParams
from pdserve.engine.slow_steps import describe_plan


def run_sequence(llm: LLM, lengths: list[int], decodes: int, tag: str, profile_over_ms: float,
                 seed: int) -> list[dict[str, Any]]:
    """``decodes`` long-running requests, then one prompt of each length every few steps; every step timed."""
    engine = llm.engine
    params = SamplingParams(max_tokens=10_000, ignore_eos=True, temperature=0.0)
    for i in range(decodes):
        engine.add_request(f"{tag}-d{i}", prompt=None,
                           prompt_token_ids=[(seed + i * 7 + k) % 1000 + 3 for k in range(1024)],
                           params=params)
    while any(r.num_output_tokens == 0 for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    steps: list[dict[str, Any]] = []
    pending = list(lengths)
    n = 0
    while pending or any(r.num_output_tokens == 0 for r in engine.scheduler.running) or engine.scheduler.waiting:
        if pending and n % 3 == 0:
            length = pending.pop(0)
            engine.add_request(f"{tag}-p{n}", prompt=None,
                               prompt_token_ids=[(seed + n * 13 + k) % 1000 + 3 for k in range(length)],
                               params=SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0))
        plan_line = ""
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        engine.step()
        profiler.disable()
        seconds = time.perf_counter() - started
        if engine._in_flight is not None:  # the step just launched (what a stall in launching concerns)
            plan_line = describe_plan(engine._in_flight.plan)
        steps.append({"ms": round(seconds * 1e3, 2), "plan": plan_line})
        if seconds * 1e3 > profile_over_ms:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
            print(f"--- {tag}: step of {seconds * 1e3:.0f} ms ({plan_line}) ---\n{text.getvalue()}", flush=True)
        n += 1
    for request_id in list(engine._requests):
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("llama31-8b", "tiny"), default="llama31-8b")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--decodes", type=int, default=16)
    parser.add_argument("--profile-over-ms", type=float, default=150.0)
    args = parser.parse_args()
    tiny = args.preset == "tiny"
    cuda = torch.cuda.is_available()
    info = run_info()
    rng = random.Random(0)
    lengths = [rng.randint(100, 400 if tiny else 3000) for _ in range(args.prompts)]
    from benchmarks.engine import TINY

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", TINY if tiny else LLAMA31_8B)
        llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16" if cuda else "float32",
                  max_model_len=16384, max_num_seqs=256, max_num_batched_tokens=2048, step_time_budget_ms=15.0,
                  ttft_slo_ms=250.0, gpu_memory_utilization=0.85, enable_prefix_caching=False, num_kv_blocks=None if cuda else 4096)
        runs = {}
        for i, tag in enumerate(("first", "again", "no-budget")):
            if tag == "no-budget":
                scheduler = llm.engine.scheduler
                scheduler.config = dataclasses.replace(scheduler.config, step_time_budget_s=None)
            runs[tag] = run_sequence(llm, lengths, args.decodes, tag, args.profile_over_ms, seed=101 * i)
    rows, summary = [], {}
    for tag, steps in runs.items():
        times = sorted(s["ms"] for s in steps)
        summary[tag] = {"steps": len(steps), "median_ms": times[len(times) // 2], "max_ms": times[-1],
                        "over_100ms": sum(t > 100 for t in times)}
        for s in sorted(steps, key=lambda s: -s["ms"])[:8]:
            rows.append([tag, s["ms"], s["plan"]])
    markdown = "\n".join([f"# Engine-thread stalls ({args.preset})", "", f"{info.get('device')} · commit {info['commit']}"
                          f" · {info['date']}", "", markdown_table(["run", "steps", "median ms", "max ms", "> 100 ms"],
                                                                  [[k, *v.values()] for k, v in summary.items()]),
                          "", "Slowest steps:", "", markdown_table(["run", "step ms", "launched step"], rows), ""])
    print(markdown)
    if cuda and not tiny:
        write_results("step_stalls", info, {"summary": summary, "slowest": rows, "lengths": lengths}, markdown)


if __name__ == "__main__":
    main()
