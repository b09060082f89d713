"""Step-level engine benchmarks: what a step that carries prompt tokens costs.

* :func:`bench_prefill_latency` -- one prompt through the public API (``LLM.generate``, ``max_tokens=1``),
  best and median of 5, by prompt length; the cost of a short chat prompt's first token.
* :func:`bench_mixed_steps` -- a decode batch of B requests (1k context) plus one prefill chunk of C
  tokens in the same step, against the pure decode step of the same batch; the device span of each
  step's launch (CUDA events around it: the launch gaps of an eager step count, as the GPU waits on
  them), with CUDA graphs and, for comparison, with graphs switched off.
* :func:`bench_chunked_itl` -- the inter-token latency a decode batch sees (time between its tokens
  reaching the host) while a 2k-token prompt is chunked in at 256, 512 or 2048 tokens per step.

Each works on an engine built by ``benchmarks.engine`` (prefix caching off) and leaves it idle.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.scheduler import SchedulerConfig

VOCAB = 50000


def _prompt(serial: int, n: int) -> list[int]:
    return [(serial * 7919 + j * 104729) % VOCAB + 1 for j in range(n)]


def bench_prefill_latency(llm: LLM, lengths: list[int], repeats: int = 5) -> list[dict[str, Any]]:
    params = SamplingParams(max_tokens=1, temperature=0.0)
    rows = []
    for serial, n in enumerate(lengths):
        llm.generate(prompt_token_ids=[_prompt(10_000 + serial, n)], sampling_params=params)  # warm-up
        times = []
        for rep in range(repeats):
            t0 = time.perf_counter()
            llm.generate(prompt_token_ids=[_prompt(serial * 100 + rep, n)], sampling_params=params)
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append({"prompt_tokens": n, "best_ms": round(min(times), 2), "median_ms": round(statistics.median(times), 2)})
        print(f"prefill latency {n:5d} tokens: best {min(times):7.2f} ms", flush=True)
    return rows


class LaunchSpans:
    """Device time from the start to the end of each ``runner.launch`` (CUDA events on its stream; on a
    CPU-only host, where the launch computes synchronously, its wall time)."""

    def __init__(self, llm: LLM) -> None:
        self.runner = llm.engine.runner
        self.original = self.runner.launch
        self.cuda = torch.cuda.is_available()
        self.events: list[tuple[Any, Any, int]] = []

        def timed(plan, **kwargs):  # noqa: ANN001, ANN003, ANN202 (passes the runner's options through)
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = self.original(plan, **kwargs)
                end.record()
            else:
                start = time.perf_counter()
                out = self.original(plan, **kwargs)
                end = time.perf_counter()
            self.events.append((start, end, plan.num_batched_tokens))
            return out

        self.runner.launch = timed  # type: ignore[method-assign]

    def take(self) -> list[tuple[float, int]]:
        if self.cuda:
            torch.cuda.synchronize()
            out = [(s.elapsed_time(e), n) for s, e, n in self.events]
        else:
            out = [((e - s) * 1e3, n) for s, e, n in self.events]
        self.events.clear()
        return out

    def close(self) -> None:
        self.runner.launch = self.original  # type: ignore[method-assign]


def _drain(llm: LLM) -> None:
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def bench_mixed_steps(llm: LLM, inject, batches: list[int], chunks: list[int], context: int = 1024,  # noqa: ANN001
                      repeats: int = 5) -> list[dict[str, Any]]:
    engine = llm.engine
    spans = LaunchSpans(llm)
    graphs = engine.runner.graphs
    rows = []
    try:
        for batch in batches:
            ids = inject(llm, batch, context, f"mix{batch}")
            for mode in ("graphs", "eager") if graphs is not None else ("eager",):
                engine.runner.graphs = graphs if mode == "graphs" else None
                for _ in range(3):
                    engine.step()
                spans.take()
                for _ in range(10):
                    engine.step()
                decode_ms = statistics.median(ms for ms, _ in spans.take())
                for chunk in chunks:
                    times = []
                    for rep in range(repeats + 1):
                        rid = f"mixp{batch}-{chunk}-{rep}-{mode}"
                        engine.add_request(rid, prompt_token_ids=_prompt(rep + chunk, chunk),
                                           params=SamplingParams(max_tokens=1, temperature=0.0))
                        spans.take()
                        engine.step()  # the mixed step: every decode plus the whole chunk
                        mixed = spans.take()
                        assert mixed[0][1] == batch + chunk, f"expected a mixed step, got {mixed}"
                        engine.step()
                        if rep:  # the first one compiles kernels for a new shape
                            times.append(mixed[0][0])
                    row = {"mode": mode, "decode_batch": batch, "chunk_tokens": chunk,
                           "mixed_ms": round(statistics.median(times), 3), "decode_ms": round(decode_ms, 3),
                           "ratio": round(statistics.median(times) / decode_ms, 2)}
                    rows.append(row)
                    print(f"mixed {mode:6s} B={batch:3d} + {chunk:4d}: {row['mixed_ms']:7.3f} ms vs decode "
                          f"{decode_ms:6.3f} ms ({row['ratio']}x)", flush=True)
            for rid in ids:
                engine.abort_request(rid)
            _drain(llm)
    finally:
        engine.runner.graphs = graphs
        spans.close()
    return rows


def bench_chunked_itl(llm: LLM, inject, chunk_sizes: list[int], batch: int = 32, context: int = 1024,  # noqa: ANN001
                      prompt_tokens: int = 2048) -> list[dict[str, Any]]:
    engine = llm.engine
    original = engine.scheduler.config
    rows = []
    try:
        for chunk in chunk_sizes:
            engine.scheduler.config = SchedulerConfig(batch + chunk, original.max_num_seqs, True)
            ids = inject(llm, batch, context, f"itl{chunk}")
            watched = ids[0]
            arrivals: list[float] = []
            for _ in range(8):  # steady decoding first
                for delta in engine.step():
                    if delta.request_id == watched:
                        arrivals.append(time.perf_counter())
            decode_itl = [b - a for a, b in zip(arrivals, arrivals[1:])]
            arrivals = arrivals[-1:]
            rid = f"itl-prompt-{chunk}"
            engine.add_request(rid, prompt_token_ids=_prompt(chunk, prompt_tokens),
                               params=SamplingParams(max_tokens=1, temperature=0.0))
            added, first = time.perf_counter(), None
            while first is None:
                for delta in engine.step():
                    now = time.perf_counter()
                    if delta.request_id == watched:
                        arrivals.append(now)
                    if delta.request_id == rid:
                        first = now
            itl = [(b - a) * 1e3 for a, b in zip(arrivals, arrivals[1:])]
            row = {"chunk_tokens": chunk, "decode_batch": batch, "steps": len(itl),
                   "itl_median_ms": round(statistics.median(itl), 2), "itl_max_ms": round(max(itl), 2),
                   "decode_only_itl_ms": round(statistics.median(decode_itl) * 1e3, 2),
                   "prompt_ttft_ms": round((first - added) * 1e3, 1)}
            rows.append(row)
            print(f"chunked ITL chunk={chunk:4d}: median {row['itl_median_ms']} ms max {row['itl_max_ms']} ms "
                  f"(decode only {row['decode_only_itl_ms']} ms), 2k prompt TTFT {row['prompt_ttft_ms']} ms",
                  flush=True)
            for r in ids:
                engine.abort_request(r)
            _drain(llm)
    finally:
        engine.scheduler.config = original
    return rows
