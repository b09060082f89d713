"""Router metrics in the Prometheus text format, served at ``GET /metrics`` by the HTTP front.

What an operator sizing the pools needs, measured where the client sees it (the router):

* per request: time to first token, the gap between consecutive token deliveries (inter-token
  latency), end-to-end latency, prompt and generated tokens, and how it ended (``outcome`` finished /
  error / cancelled, with the finish reason);
* per placement: whether the prompt was prefilled by a prefill worker or by its decode worker
  (short prompts, conditional disaggregation, colocated mode);
* per worker, read at scrape time: health, running and waiting requests, KV cache usage, queued
  prefill tokens.

No dependency: counters and histograms are a few lines each, and the registry is per router (tests
run several routers in one process). All methods run on the router's event loop.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

from pdserve.router.config import WorkerRole
from pdserve.router.registry import WorkerState

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: ``le`` buckets, ``_sum``, ``_count``)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_number(self.total)}",
                      f"{name}_count {self.count}"]


class RouterMetrics:
    def __init__(self) -> None:
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.requests: Counter[tuple[str, str]] = Counter()  # (outcome, finish_reason)
        self.placements: Counter[str] = Counter()  # "prefill_worker" | "decode_worker"
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.streams_moved = 0
        self.rejections: Counter[str] = Counter()  # "ttft" | "in_flight"

    # -- recording -----------------------------------------------------------------------------------

    def placed(self, remote_prefill: bool) -> None:
        self.placements["prefill_worker" if remote_prefill else "decode_worker"] += 1

    def rejected(self, reason: str) -> None:
        self.rejections[reason] += 1

    def stream_moved(self) -> None:
        self.streams_moved += 1

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def ended(self, outcome: str, finish_reason: str, seconds: float, prompt_tokens: int,
              completion_tokens: int) -> None:
        self.requests[(outcome, finish_reason)] += 1
        self.e2e.observe(seconds)
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens

    # -- exposition ----------------------------------------------------------------------------------

    def render(self, workers: Iterable[WorkerState], in_flight: int) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        family("pdserve_requests_total", "counter", "Requests that ended, by outcome and finish reason.",
               [f'pdserve_requests_total{{outcome="{o}",finish_reason="{r}"}} {n}'
                for (o, r), n in sorted(self.requests.items())])
        family("pdserve_requests_in_flight", "gauge", "Requests admitted and not yet ended.", [
            f"pdserve_requests_in_flight {in_flight}"])
        family("pdserve_prefill_placements_total", "counter",
               "Where prompts were prefilled: by a prefill worker or by their decode worker.",
               [f'pdserve_prefill_placements_total{{where="{w}"}} {n}' for w, n in sorted(self.placements.items())])
        family("pdserve_requests_rejected_total", "counter",
               "Requests refused at admission (RESOURCE_EXHAUSTED / 429): expected TTFT over the limit, or "
               "the router full.",
               [f'pdserve_requests_rejected_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejections.items())])
        family("pdserve_streams_moved_total", "counter",
               "Streams that continued on another decode worker after theirs was lost.",
               [f"pdserve_streams_moved_total {self.streams_moved}"])
        family("pdserve_prompt_tokens_total", "counter", "Prompt tokens of ended requests.",
               [f"pdserve_prompt_tokens_total {self.prompt_tokens}"])
        family("pdserve_generation_tokens_total", "counter", "Generated tokens of ended requests.",
               [f"pdserve_generation_tokens_total {self.generation_tokens}"])
        family("pdserve_time_to_first_token_seconds", "histogram", "Admission to first token, at the router.",
               self.ttft.lines("pdserve_time_to_first_token_seconds"))
        family("pdserve_inter_token_latency_seconds", "histogram", "Gap between consecutive token deliveries.",
               self.itl.lines("pdserve_inter_token_latency_seconds"))
        family("pdserve_e2e_request_latency_seconds", "histogram", "Admission to the end of a request.",
               self.e2e.lines("pdserve_e2e_request_latency_seconds"))
        states = list(workers)
        for name, help_text, value in (
                ("healthy", "1 when the worker is routable.", lambda s: int(s.routable)),
                ("running_requests", "Requests in the worker's running batch.", lambda s: s.load.running_requests),
                ("waiting_requests", "Requests queued at the worker.", lambda s: s.load.waiting_requests),
                ("kv_cache_usage", "Fraction of the worker's KV blocks in use.", lambda s: s.load.kv_usage),
                ("queued_prefill_tokens", "Prompt tokens waiting to be prefilled.",
                 lambda s: s.queued_prefill_tokens if s.role is WorkerRole.PREFILL else s.load.queued_prefill_tokens)):
            metric = f"pdserve_worker_{name}"
            family(metric, "gauge", help_text, [
                f'{metric}{{worker="{s.worker_id}",role="{s.role.value}"}} {_number(value(s))}' for s in states])
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value) if isinstance(value, float) else str(value)
