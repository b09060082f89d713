"""Workloads (prompt/output lengths, prompts as token ids) and arrival schedules.

* ``fixed``: every request has the same input and output length.
* ``sharegpt``: a ShareGPT-like synthetic mix. Input and output lengths are drawn from log-normal
  distributions fitted to the commonly quoted statistics of the ShareGPT conversations used by vLLM's
  benchmarks (input median ~170 tokens, mean ~250; output median ~150, mean ~230), clipped to
  [4, 2048] (input) and [4, 1024] (output). Stated, not measured from the dataset (not available here).
* ``prefill-heavy`` (2048 in, 128 out) and ``decode-heavy`` (128 in, 1024 out) presets.
* ``trace``: Mooncake-format JSONL replay. Each 512-token ``hash_id`` maps to a fixed random block of
  token ids, so equal ids at equal positions give equal prompt prefixes (the trace's prefix sharing);
  lengths are multiplied by ``length_scale`` (blocks shrink accordingly) and arrival times by
  ``time_scale``; the trace's bucketed timestamps are spread within their buckets unless
  ``arrivals=TraceArrivals.RECORDED`` (see :mod:`pdserve.common.mooncake_trace`).

Arrivals: Poisson at ``rate`` (exponential gaps), or gamma gaps with shape ``burstiness`` (< 1: burstier,
> 1: smoother) and the same mean; or a fixed concurrency (no schedule).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from pdserve.common.mooncake_trace import TRACE_BLOCK_TOKENS, TraceArrivals, read_trace

TRACE_MAX_INPUT, TRACE_MAX_OUTPUT = 12000, 512  # the serving benchmark's caps on a trace request (after scaling)
TRACE_LENGTH_SCALE = 0.25  # the serving benchmark's default length scale of the trace (its prompts: ~3,100 tokens)


@dataclass(frozen=True)
class RequestSpec:
    prompt_token_ids: list[int]
    output_len: int
    arrival_s: float = 0.0  # offset from the start of the run (trace replay; else set by a schedule)


def _token_block(seed: int, length: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, vocab) for _ in range(length)]


def fixed_workload(n: int, input_len: int, output_len: int, seed: int, vocab: int = 32000) -> list[RequestSpec]:
    rng = random.Random(seed)
    return [RequestSpec(_token_block(rng.randrange(2**31), input_len, vocab), output_len) for _ in range(n)]


def sharegpt_workload(n: int, seed: int, vocab: int = 32000) -> list[RequestSpec]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        input_len = int(min(2048, max(4, rng.lognormvariate(math.log(170), 0.9))))
        output_len = int(min(1024, max(4, rng.lognormvariate(math.log(150), 0.9))))
        out.append(RequestSpec(_token_block(rng.randrange(2**31), input_len, vocab), output_len))
    return out


PRESETS = {"prefill-heavy": (2048, 128), "decode-heavy": (128, 1024)}


def trace_workload(path: Path, *, start: int = 0, count: int | None = None, time_scale: float = 1.0,
                   length_scale: float = 1.0, max_input: int | None = None, max_output: int | None = None,
                   vocab: int = 32000, arrivals: TraceArrivals = TraceArrivals.SPREAD,
                   seed: int = 0, salt: int = 0) -> list[RequestSpec]:
    """Replay requests ``start .. start+count`` of a Mooncake JSONL trace (arrivals relative to the first, as
    :func:`pdserve.common.mooncake_trace.read_trace` gives them for ``arrivals`` and ``seed``). Equal hash ids
    give equal tokens (what prefix caches share); ``salt`` changes every token but keeps that sharing, so a
    window served again after itself (another time scale) finds nothing of the first pass in the caches."""
    block = max(1, round(TRACE_BLOCK_TOKENS * length_scale))
    out = []
    for i, row in enumerate(read_trace(path, start=start, count=count, arrivals=arrivals, seed=seed)):
        input_len = max(1, round(row.input_length * length_scale))
        if max_input is not None:
            input_len = min(input_len, max_input)
        prompt: list[int] = []
        for h in row.hash_ids:
            if len(prompt) >= input_len:
                break
            prompt += _token_block((h * 2654435761 + salt * 40503) % 2**31, block, vocab)
        if len(prompt) < input_len:  # blocks the row does not name (no hash_ids): unshared tokens
            prompt += _token_block(2**31 + start + i + salt * 2**20, input_len - len(prompt), vocab)
        prompt = prompt[:input_len]
        output_len = max(1, round(row.output_length * length_scale))
        if max_output is not None:
            output_len = min(output_len, max_output)
        out.append(RequestSpec(prompt, output_len, row.arrival_s * time_scale))
    return out


def poisson_schedule(n: int, rate: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """``n`` arrival offsets (seconds): gamma gaps of shape ``burstiness`` and mean ``1/rate``; the first
    request arrives at 0. ``burstiness == 1`` is a Poisson process."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        out.append(t)
    return out
