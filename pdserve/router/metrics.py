"""The cluster's metrics, one Prometheus scrape target: the router serves ``GET /metrics`` with its own
series and every worker's (from the workers' ``Telemetry`` snapshots), labelled by model, worker and role.

Names follow vLLM's where the meaning is the same, so a vLLM Grafana board or a KEDA / HPA rule on
them works unchanged (``model_name`` label as in vLLM; per-worker series add ``worker`` and ``role``):

==========================================  =====================================================
``vllm:time_to_first_token_seconds``        histogram: admission to first token, at the router
``vllm:inter_token_latency_seconds``        histogram: gap between consecutive token deliveries
``vllm:e2e_request_latency_seconds``        histogram: admission to the end (buckets to the deadline)
``vllm:request_success_total``              counter by ``finished_reason`` (stop / length)
``vllm:prompt_tokens_total``                counter: prompt tokens of ended requests
``vllm:generation_tokens_total``            counter: generated tokens of ended requests
``vllm:request_prompt_tokens``              histogram: prompt length per request
``vllm:request_generation_tokens``          histogram: generated tokens per request
``vllm:num_requests_running``               gauge per worker: running batch (and awaiting KV)
``vllm:num_requests_waiting``               gauge per worker: queued
``vllm:kv_cache_usage_perc``                gauge per worker: fraction of KV blocks in use (0-1)
``vllm:num_preemptions_total``              counter per worker
``vllm:prefix_cache_queries_total``         counter per worker: prompt tokens looked up
``vllm:prefix_cache_hits_total``            counter per worker: prompt tokens found cached
==========================================  =====================================================

P/D-specific and operational series are ``pdserve:*``: requests in flight, failed and cancelled
requests, where prompts were prefilled, prompts predicted late for their TTFT (per worker), admission refusals, moved streams, worker health, queued
prefill tokens and the advertised prefill rate, engine steps and their device time by kind
(decode / mixed / prefill), KV transfers (count, failures, bytes, seconds, local recomputes by
transport), GPU readings (utilisation, memory, power, SM clock, NVLink bytes; absent, never zero,
on a worker without an NVIDIA GPU: ``pdserve:gpu_telemetry_available`` says which), and with the
online planner on, ``pdserve:planner_predicted_goodput_per_gpu`` / ``pdserve:planner_recommended`` /
``pdserve:planner_predicted_preemptions_per_request``
per configuration.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pdserve.router.config import WorkerRole
from pdserve.router.process_metrics import MergedCollector, Sample, own_samples
from pdserve.router.registry import WorkerState
from pdserve.router.request_log import EndedRequest, RequestLog

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()  # no *_created series (process-wide; as vLLM's exposition)


def deadline_buckets(deadline_s: float | None) -> tuple[float, ...]:
    """Latency buckets that reach the configured request deadline."""
    buckets = set(LATENCY_BUCKETS)
    if deadline_s and deadline_s > 0:
        buckets.add(float(deadline_s))
    return tuple(sorted(buckets))


class RouterMetrics:
    """The router's series (recorded on its event loop) plus the workers' (read at scrape time).

    One registry per router (tests run several in one process). ``workers`` and ``telemetry`` are
    read by :meth:`render`: the registry's states and the latest ``Telemetry`` snapshot per worker."""

    def __init__(self, model: str = "", deadline_s: float | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.model = model
        r = self.registry
        buckets = deadline_buckets(deadline_s)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Admission to first token, at the router.",
                              ["model_name"], buckets=buckets, registry=r).labels(model)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Gap between consecutive token deliveries.",
                             ["model_name"], buckets=ITL_BUCKETS, registry=r).labels(model)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Admission to the end of a request.",
                             ["model_name"], buckets=buckets, registry=r).labels(model)
        self._success = Counter("vllm:request_success", "Requests that finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._failed = Counter("pdserve:requests_failed", "Requests that ended without finishing, by outcome "
                               "(error, cancelled).", ["model_name", "outcome"], registry=r)
        self._prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of ended requests.", ["model_name"],
                                      registry=r).labels(model)
        self._generation_tokens = Counter("vllm:generation_tokens", "Generated tokens of ended requests.",
                                          ["model_name"], registry=r).labels(model)
        self._prompt_lengths = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", ["model_name"],
                                         buckets=TOKEN_BUCKETS, registry=r).labels(model)
        self._output_lengths = Histogram("vllm:request_generation_tokens", "Generated tokens per request.",
                                         ["model_name"], buckets=TOKEN_BUCKETS, registry=r).labels(model)
        self._placements = Counter("pdserve:prefill_placements", "Where prompts were prefilled: by a prefill "
                                   "worker or by their decode worker.", ["model_name", "where"], registry=r)
        self._rejections = Counter("pdserve:requests_rejected", "Requests refused at admission (RESOURCE_EXHAUSTED "
                                   "/ 429): expected TTFT over the limit, or the router full.",
                                   ["model_name", "reason"], registry=r)
        self._moved = Counter("pdserve:streams_moved", "Streams that continued on another decode worker after "
                              "theirs was lost.", ["model_name"], registry=r).labels(model)
        self._in_flight = Gauge("pdserve:requests_in_flight", "Requests admitted and not yet ended.",
                                ["model_name"], registry=r).labels(model)
        self._loop_lag = Gauge("pdserve:router_event_loop_lag_seconds", "How late the router's event loop runs its "
                               "callbacks (largest over the last 2 s): every request waits that long at each hop "
                               "through the router.", ["model_name"], registry=r).labels(model)
        self._gc_pause = Gauge("pdserve:router_gc_pause_seconds", "The longest garbage collection in the router's "
                               "process over the last 2 s (it stops the router's loop meanwhile).", ["model_name"],
                               registry=r).labels(model)
        self.log = RequestLog()  # the dashboard's windowed figures
        self.placement_counts: collections.Counter[str] = collections.Counter()
        self.streams_moved = 0
        self._workers: Callable[[], Iterable[WorkerState]] = list
        self._telemetry: Callable[[], Mapping[str, dict[str, Any]]] = dict
        self._planner: Callable[[], Mapping[str, Any] | None] = lambda: None
        # the exposition: this process's series (with the other router processes' added, when there are
        # several: process_metrics.py) and the workers'
        self._other_processes: dict[int, list[Sample]] = {}
        self._exposition = CollectorRegistry(auto_describe=False)
        self._exposition.register(MergedCollector(self.registry, self._other_processes.values))
        self._exposition.register(_WorkerCollector(self))

    def attach(self, workers: Callable[[], Iterable[WorkerState]],
               telemetry: Callable[[], Mapping[str, dict[str, Any]]],
               planner: Callable[[], Mapping[str, Any] | None] = lambda: None,
               loop_lag_s: Callable[[], float] = float, gc_pause_s: Callable[[], float] = float) -> None:
        """Where the per-worker series (and the planner's, and the router loop's lag) come from at scrape time."""
        self._workers, self._telemetry, self._planner = workers, telemetry, planner
        self._loop_lag.set_function(loop_lag_s)
        self._gc_pause.set_function(gc_pause_s)

    # -- recording (router event loop) ----------------------------------------------------------------

    def placed(self, remote_prefill: bool) -> None:
        where = "prefill_worker" if remote_prefill else "decode_worker"
        self._placements.labels(self.model, where).inc()
        self.placement_counts[where] += 1

    def rejected(self, reason: str) -> None:
        self._rejections.labels(self.model, reason).inc()

    def stream_moved(self) -> None:
        self._moved.inc()
        self.streams_moved += 1

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.log.add_gap(seconds)

    def ended(self, outcome: str, finish_reason: str, seconds: float, prompt_tokens: int,
              completion_tokens: int, ttft_s: float | None = None) -> None:
        self.log.add(EndedRequest(time.time(), seconds, prompt_tokens, completion_tokens, ttft_s, outcome))
        if outcome == "finished":
            self._success.labels(self.model, finish_reason or "unknown").inc()
        else:
            self._failed.labels(self.model, outcome).inc()
        self.e2e.observe(seconds)
        self._prompt_tokens.inc(prompt_tokens)
        self._generation_tokens.inc(completion_tokens)
        self._prompt_lengths.observe(prompt_tokens)
        self._output_lengths.observe(completion_tokens)

    # -- exposition -----------------------------------------------------------------------------------

    def render(self, in_flight: int) -> str:
        self._in_flight.set(in_flight)
        return generate_latest(self._exposition).decode()

    def own_samples(self, in_flight: int) -> list[Sample]:
        """This process's router series (not the workers'), for the first router process to add up."""
        self._in_flight.set(in_flight)
        return own_samples(self.registry)

    def set_process_samples(self, index: int, samples: list[Sample]) -> None:
        """The latest :meth:`own_samples` of router process ``index`` (> 0), added in at every scrape."""
        self._other_processes[index] = samples


#: Per-worker series from telemetry: (name, kind, help, path in the snapshot, extra label from the snapshot).
_WORKER_SERIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("vllm:num_requests_running", "gauge", "Requests in the worker's running batch (and awaiting KV).",
     ("engine", "running_requests")),
    ("vllm:num_requests_waiting", "gauge", "Requests queued at the worker.", ("engine", "waiting_requests")),
    ("vllm:kv_cache_usage_perc", "gauge", "Fraction of the worker's KV blocks in use (0-1).", ("engine", "kv_usage")),
    ("vllm:num_preemptions", "counter", "Requests preempted (recomputed later) on the worker.",
     ("engine", "preemptions")),
    ("vllm:prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache.",
     ("engine", "prefix_cache_queries")),
    ("vllm:prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache.", ("engine", "prefix_cache_hits")),
    ("pdserve:prompt_tokens_computed", "counter", "Prompt tokens the worker computed.",
     ("engine", "prompt_tokens_computed")),
    ("pdserve:late_prompts", "counter", "Prompts the worker's scheduler predicted to miss their TTFT deadline "
     "(still served, after those that can meet theirs).", ("engine", "late_prompts")),
    ("pdserve:kv_cache_blocks", "gauge", "KV cache blocks of the worker.", ("engine", "num_kv_blocks")),
    ("pdserve:gpu_utilization_percent", "gauge", "GPU utilisation (NVML).", ("gpu", "utilization")),
    ("pdserve:gpu_memory_used_bytes", "gauge", "GPU memory in use (NVML).", ("gpu", "memory_used_bytes")),
    ("pdserve:gpu_memory_total_bytes", "gauge", "GPU memory (NVML).", ("gpu", "memory_total_bytes")),
    ("pdserve:gpu_power_watts", "gauge", "GPU power draw (NVML).", ("gpu", "power_watts")),
    ("pdserve:gpu_sm_clock_mhz", "gauge", "GPU SM clock (NVML).", ("gpu", "sm_clock_mhz")),
    ("pdserve:gpu_nvlink_tx_bytes", "counter", "NVLink bytes sent (NVML).", ("gpu", "nvlink_tx_bytes")),
    ("pdserve:gpu_nvlink_rx_bytes", "counter", "NVLink bytes received (NVML).", ("gpu", "nvlink_rx_bytes")),
)
_TRANSFER_SERIES = (("pdserve:kv_transfers_received", "received", "KV transfers received (decode worker)."),
                    ("pdserve:kv_transfers_sent", "sent", "Prompts prefilled and sent (prefill worker)."),
                    ("pdserve:kv_transfer_failures", "failures", "KV transfers that failed or timed out."),
                    ("pdserve:kv_local_recomputes", "local_recomputes", "Prompts recomputed after a failed "
                                                                        "transfer."),
                    ("pdserve:kv_transfer_bytes", "bytes", "KV bytes received."),
                    ("pdserve:kv_transfer_seconds", "seconds", "Landing zone opened to every byte landed, "
                                                               "summed."))


class _WorkerCollector(Collector):
    """The per-worker series, built at scrape time from the registry and the telemetry snapshots."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        states = list(metrics._workers())
        snapshots = metrics._telemetry()
        labels = ["model_name", "worker", "role"]

        def key(state: WorkerState) -> list[str]:
            return [metrics.model, state.worker_id, state.role.value]

        healthy = GaugeMetricFamily("pdserve:worker_healthy", "1 when the router routes to the worker.", labels=labels)
        queued = GaugeMetricFamily("pdserve:queued_prefill_tokens", "Prompt tokens waiting to be prefilled.",
                                   labels=labels)
        rate = GaugeMetricFamily("pdserve:prefill_tokens_per_second", "Prompt tokens per second the worker can "
                                 "prefill now (as advertised to the router).", labels=labels)
        lag = GaugeMetricFamily("pdserve:worker_event_loop_lag_seconds", "How late the worker's event loop (its "
                                "gRPC side) runs, as last reported.", labels=labels)
        for s in states:
            lag.add_metric(key(s), s.load.loop_lag_s)
            healthy.add_metric(key(s), int(s.routable))
            queued.add_metric(key(s), s.queued_prefill_tokens if s.role is WorkerRole.PREFILL
                              else s.load.queued_prefill_tokens)
            rate.add_metric(key(s), s.full_prefill_tokens_per_s if s.role is WorkerRole.PREFILL
                            else s.load.prefill_tokens_per_s)
        yield from (healthy, queued, rate, lag)
        with_data = [(s, snapshots[s.worker_id]) for s in states if s.worker_id in snapshots]
        for name, kind, help_text, path in _WORKER_SERIES:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_text, labels=labels)
            for s, snap in with_data:
                value = _at(snap, path)
                if value is not None:
                    family.add_metric(key(s), float(value))
            yield family
        available = GaugeMetricFamily("pdserve:gpu_telemetry_available", "1 when the worker reports NVML readings "
                                      "(0: no NVIDIA GPU or no NVML; the GPU series are then absent).", labels=labels)
        steps = CounterMetricFamily("pdserve:engine_steps", "Engine steps measured, by kind.", labels=[*labels, "kind"])
        step_seconds = CounterMetricFamily("pdserve:engine_step_seconds", "Device time of measured engine steps, by "
                                           "kind.", labels=[*labels, "kind"])
        transfer = {name: CounterMetricFamily(name, help_text, labels=[*labels, "transport"])
                    for name, _, help_text in _TRANSFER_SERIES}
        for s, snap in with_data:
            available.add_metric(key(s), int(bool(_at(snap, ("gpu", "available")))))
            for kind, totals in (_at(snap, ("engine", "steps")) or {}).items():
                steps.add_metric([*key(s), kind], float(totals.get("count", 0)))
                step_seconds.add_metric([*key(s), kind], float(totals.get("seconds", 0.0)))
            kv = snap.get("kv_transfer") or {}
            for name, field, _ in _TRANSFER_SERIES:
                if field in kv:
                    transfer[name].add_metric([*key(s), str(kv.get("transport", ""))], float(kv[field]))
        yield from (available, steps, step_seconds, *transfer.values())
        latest = metrics._planner()
        if latest and latest.get("predictions"):
            predicted = GaugeMetricFamily("pdserve:planner_predicted_goodput_per_gpu", "The online planner's "
                                          "predicted goodput (req/s per GPU) of each configuration on the recent "
                                          "traffic.", labels=["model_name", "config"])
            recommended = GaugeMetricFamily("pdserve:planner_recommended", "1 for the configuration the online "
                                            "planner recommends.", labels=["model_name", "config"])
            preemptions = GaugeMetricFamily("pdserve:planner_predicted_preemptions_per_request", "How often the "
                                            "online planner predicts each configuration preempts a request at the "
                                            "recent rate because a worker's KV cache ran out of blocks (0: it "
                                            "fits).", labels=["model_name", "config"])
            for p in latest["predictions"]:
                predicted.add_metric([metrics.model, p["config"]], float(p["goodput_per_gpu"]))
                recommended.add_metric([metrics.model, p["config"]], int(p["config"] == latest.get("recommended")))
                preemptions.add_metric([metrics.model, p["config"]], float(p.get("preemptions_per_request", 0.0)))
            yield from (predicted, recommended, preemptions)


def _at(data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(part)  # type: ignore[assignment]
    return data
