"""Serving benchmark: goodput under latency SLOs, disaggregated against colocated on the same GPUs, same
workloads and seeds, in one invocation. Configurations:

* ``1p1d``: 1 prefill + 1 decode worker; every prompt prefilled remotely.
* ``1p1d-overflow``: the same plus the older conditional disaggregation (a prompt arriving while the
  prefill worker has ``OVERFLOW_TOKENS`` queued is prefilled whole by the decode worker).
* ``colocated``: one worker per GPU (``--num-gpus``, 2 by default), chunked prefill at a fixed 2048 tokens per step.
* ``colocated-slo``: the same workers, whose steps are cut to the TPOT SLO (``slo.tpot_ms`` = ``--slo-tpot-ms``)
  by their step-time model, prompts in deadline order: the SLO-tuned colocated baseline.
* ``auto``: 1P1D with the SLOs: TTFT-aware placement (a prompt the prefill pool would serve late is
  prefilled by the decode worker in budget-sized chunks), budgeted decode steps, deadline-ordered
  prompt queues. The shipped 2-GPU config (``deploy/cluster-2gpu-1p1d.yaml``).

    python -m benchmarks.serve                       # two GPUs: Llama-3.1-8B shapes, dummy weights
    python -m benchmarks.serve --smoke               # CPU, tiny model: exercises every code path
    python -m benchmarks.serve --address HOST:PORT   # against a running cluster (one configuration)

For each configuration and workload it sweeps Poisson arrival rates (per GPU), or replays a window of the
Mooncake conversation trace at each of ``--time-scales`` (its bucketed timestamps spread within their
buckets: :mod:`pdserve.common.mooncake_trace`), and records every request's timings. Goodput is the highest
per-GPU rate at which >= 90% of requests meet both the TTFT and the TPOT SLO. Writes
``benchmarks/results/serve-<device>.{json,md,png}`` (the JSON holds every request's token times).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    LLAMA31_8B,
    RESULTS,
    SOCKET_ENV,
    device_slug,
    run_info,
    write_model_dir,
    write_results,
)
from benchmarks.serving.handoff import breakdown
from benchmarks.serving.loadgen import client_capacity
from benchmarks.serving.point import DEFAULT_CLIENT_PROCESSES, measure_point
from benchmarks.serving.records import checkpoint_point, write_records
from benchmarks.serving.report import goodput_table, ms, plot, render
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
from pdserve.common.mooncake_trace import TraceArrivals, TraceError
from pdserve.planner.plan import SLO_PREFILL_STEP_TOKENS

TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "mooncake_conversation.jsonl"


#: Conditional disaggregation threshold of the ``1p1d-overflow`` configuration: about 200 ms of prefill
#: work for Llama-3.1-8B on one H200 (~40k prompt tokens/s), i.e. most of the 250 ms TTFT budget.
OVERFLOW_TOKENS = 8192
#: The ``auto`` prefill pool's tokens per step (``--auto-prefill-step-tokens``; what pdserve ships, see
#: ``pdserve.planner.plan.SLO_PREFILL_STEP_TOKENS``; 8,192 before 2026-12-01).
PREFILL_STEP_TOKENS = SLO_PREFILL_STEP_TOKENS


def cluster_config(kind: str, model_dir: Path, smoke: bool, slo_ms: tuple[float, float] = (250.0, 15.0),
                   kv_backend: str = "auto", budget_window: int = 0, defer_below: int = 0,
                   auto_prefill_step_tokens: int = PREFILL_STEP_TOKENS, num_gpus: int = 2,
                   max_running: int = 256, stream_writes_per_s: float | None = None,
                   router_processes: int = 1, borrow_tokens: int = 0) -> dict[str, Any]:
    """The cluster of one configuration; ``slo_ms`` (TTFT, TPOT) for the SLO-aware ones; ``kv_backend``
    the KV transport between prefill and decode workers (auto: CUDA IPC on one host); ``budget_window``,
    ``defer_below`` and ``borrow_tokens`` the engines' ``step_budget_window``, ``defer_chunks_below`` and
    ``step_budget_borrow_tokens`` (SLO-aware configurations); ``auto_prefill_step_tokens`` the ``auto`` prefill pool's ``max_batch_tokens``;
    ``num_gpus`` the colocated configurations' workers (the disaggregated ones need 2);
    ``max_running`` the decoding workers' ``max_running_requests``; ``stream_writes_per_s`` the router's
    (None: its default); ``router_processes`` its ``processes``."""
    if kind in ("1p1d", "1p1d-overflow", "auto") and num_gpus != 2:
        raise ValueError(f"configuration {kind!r} runs one prefill and one decode worker: it needs --num-gpus 2")
    gpu = 0 if smoke else 1
    engine: dict[str, Any] = {"load_format": "dummy", "dtype": "float32" if smoke else "bfloat16",
                              "max_model_len": 2048 if smoke else 16384}
    if smoke:
        engine["num_kv_blocks"] = 2048
    config: dict[str, Any] = {"model": str(model_dir), "load_format": "dummy", "engine": engine,
                              "router": {"grpc_port": 0, "request_timeout_s": 300}, "kv_transfer": {"timeout_s": 120, "backend": "nccl" if kv_backend == "nccl-socket" else kv_backend}}
    if stream_writes_per_s is not None:
        config["router"]["stream_writes_per_s"] = stream_writes_per_s
    config["router"]["processes"] = router_processes
    if kind in ("1p1d", "1p1d-overflow", "auto"):
        config |= {"mode": "disaggregated",
                   "prefill": {"replicas": 1, "gpus_per_worker": gpu, "max_batch_tokens": 8192},
                   "decode": {"replicas": 1, "gpus_per_worker": gpu, "max_running_requests": max_running,
                              "max_batch_tokens": 2048}}
        if kind == "auto":
            config["prefill"]["max_batch_tokens"] = auto_prefill_step_tokens
        if kind == "1p1d-overflow":  # the decode worker prefills what the prefill worker cannot take in time
            config["router"]["max_queued_prefill_tokens"] = 256 if smoke else OVERFLOW_TOKENS
    elif kind in ("colocated", "colocated-slo"):
        config |= {"mode": "colocated",
                   "colocated": {"replicas": num_gpus, "gpus_per_worker": gpu, "max_batch_tokens": 2048,
                                 "max_running_requests": max_running}}
    else:
        raise ValueError(f"unknown configuration {kind!r}; choose from {', '.join(CONFIGS)}")
    if kind in ("colocated-slo", "auto"):
        config["slo"] = {"ttft_ms": slo_ms[0], "tpot_ms": slo_ms[1]}
        engine["step_budget_window"] = budget_window
        engine["defer_chunks_below"] = defer_below
        engine["step_budget_borrow_tokens"] = borrow_tokens
        if kind == "colocated-slo":  # the budget, not a fixed chunk, bounds a step
            config["colocated"]["max_batch_tokens"] = 8192
    return config


CONFIGS = ("1p1d", "1p1d-overflow", "colocated", "colocated-slo", "auto")
#: the configurations set up for a TPOT SLO (``--slo-tpot-ms``, or each of ``--slo-tpot-targets``)
SLO_AWARE = ("colocated-slo", "auto")


def make_workload(name: str, n: int, seed: int, args: argparse.Namespace) -> list[RequestSpec]:
    if name in PRESETS:
        input_len, output_len = PRESETS[name]
        if args.smoke:
            input_len, output_len = input_len // 16, output_len // 16
        return fixed_workload(n, input_len, output_len, seed)
    if name == "sharegpt":
        specs = sharegpt_workload(n, seed)
        cap = 64 if args.smoke else args.max_output
        return [RequestSpec(s.prompt_token_ids[: 256 if args.smoke else None], min(s.output_len, cap)) for s in specs]
    raise ValueError(f"unknown workload {name!r}")


def trace_specs(args: argparse.Namespace, time_scale: float, point: int = 0) -> list[RequestSpec]:
    """The trace window of one trace point: ``--trace-requests`` rows from ``--trace-start``, arrivals ``x
    time_scale`` (spread within the trace's timestamp buckets unless ``--trace-arrivals recorded``). The
    ``point``-th point of a configuration gets tokens of its own (the same sharing), so it finds nothing the
    points before it left in the prefix caches (before 2026-12-02 every point replayed the first's tokens)."""
    return trace_workload(Path(args.trace_path), start=args.trace_start, count=args.trace_requests,
                          time_scale=time_scale, length_scale=args.length_scale,
                          max_input=1024 if args.smoke else TRACE_MAX_INPUT,
                          max_output=32 if args.smoke else TRACE_MAX_OUTPUT,
                          arrivals=TraceArrivals(args.trace_arrivals), seed=args.trace_seed, salt=point)


def print_point(label: str, workload: str, summary: dict[str, Any]) -> None:
    print(f"{label:9s} {workload:13s} rate/GPU {summary['rate_per_gpu']:6.2f}: " + ", ".join(
        f"{k} {v:.2f}" for k, v in summary["slo_attainment"].items())
        + f" | TTFT p50/p99 {ms(summary['ttft_s']['p50'])}/{ms(summary['ttft_s']['p99'])} ms"
        f" TPOT p50/p99 {ms(summary['tpot_s']['p50'])}/{ms(summary['tpot_s']['p99'])} ms"
        f" errors {summary['errors']}", flush=True)


def run_configuration(kind: str, model_dir: Path, args: argparse.Namespace, slos: list[tuple[float, float]],
                      tpot_target_ms: float, label: str) -> dict[str, Any]:
    """One configuration's cluster through every workload; SLO-aware ones set up for ``tpot_target_ms``;
    ``label`` names its points."""
    import ray

    from pdserve.cluster.config import cluster_config_from_dict
    from pdserve.cluster.launcher import Cluster

    config = cluster_config(kind, model_dir, args.smoke, (args.ttft_slo * 1e3, tpot_target_ms), args.kv_backend,
                            args.budget_window, args.defer_below, args.auto_prefill_step_tokens, args.num_gpus,
                            args.max_running, args.stream_writes_per_s, args.router_processes, args.borrow_tokens)
    if args.dashboard:  # the operator's view of the run: the dashboard's JSON after every point
        config["router"] |= {"http_port": 0, "planner_mode": "recommend", "planner_interval_s": 5.0}
    cluster = Cluster(cluster_config_from_dict(config))
    t0 = time.perf_counter()
    cluster.start()
    results: dict[str, Any] = {"startup_s": round(time.perf_counter() - t0, 1), "workloads": {}}
    dashboard: dict[str, Any] = {}
    try:
        warm_up(cluster.router_address, smoke=args.smoke)
        num_gpus = args.num_gpus
        for workload in args.workloads:
            points = []
            if workload == "trace":
                for point, time_scale in enumerate(args.time_scales):
                    specs = trace_specs(args, time_scale, point)
                    offsets = [s.arrival_s for s in specs]
                    rate = len(specs) / max(offsets[-1], 1.0) / num_gpus  # the window's mean arrival rate
                    run_id = f"{label}-trace-x{time_scale:g}"
                    summary = measure_point(cluster.router_address, specs, offsets, run_id, slos, args.client_processes)
                    summary |= {"rate_per_gpu": rate, "run_id": run_id, "time_scale": time_scale, "content_salt": point}
                    points.append(summary)
                    if args.dashboard:
                        dashboard[run_id] = dashboard_snapshot(cluster.http_url)
                    print_point(label, workload, summary)
                    checkpoint_point(label, workload, points)
            else:
                rates = args.rates[workload]
                for j, rate in enumerate(rates):
                    specs = make_workload(workload, args.num_requests, args.seed + j, args)
                    offsets = poisson_schedule(len(specs), rate * num_gpus, seed=args.seed + j,
                                               burstiness=args.burstiness)
                    run_id = f"{label}-{workload}-{rate:g}"
                    summary = measure_point(cluster.router_address, specs, offsets, run_id, slos, args.client_processes)
                    summary |= {"rate_per_gpu": rate, "run_id": run_id}
                    points.append(summary)
                    if args.dashboard:
                        dashboard[run_id] = dashboard_snapshot(cluster.http_url)
                    print_point(label, workload, summary)
                    checkpoint_point(label, workload, points)
            results["workloads"][workload] = points
        timings = {w.role: ray.get(w.actor.timings.remote()) for w in cluster.workers}
        results["worker_stats"] = cluster.worker_stats()
        for points in results["workloads"].values():
            for point in points:
                point["breakdown"] = breakdown(timings, point["run_id"], point.get("records"), point.get("wall_start"))
        if dashboard:
            results["dashboard"] = dashboard  # moved to its own file when written
    finally:
        cluster.stop()
    return results


def dashboard_snapshot(http_url: str) -> dict[str, Any]:
    """The router's ``/dashboard/data`` now (what the dashboard page shows), or the error."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{http_url}/dashboard/data", timeout=10) as response:
            return dict(json.load(response))
    except Exception as exc:  # noqa: BLE001 (a missed snapshot is noted, the run goes on)
        return {"error": repr(exc)}


def warm_up(address: str, smoke: bool) -> None:
    """Handshakes, kernel compilation and CUDA graphs before any timed point: single requests, then a
    concurrent burst of mixed lengths (mixed prefill + decode batches compile their own variants)."""
    from pdserve.client import Client

    lengths = [64, 600] + ([32, 96, 160, 256] * 4 if smoke else [64, 512, 1024, 2048, 3000, 200, 4000, 1500] * 3)
    with Client(address, timeout=300) as client:
        for n in lengths[:2]:
            client.generate(prompt_token_ids=[7] * n, max_tokens=4, ignore_eos=True)

    def one(n: int) -> None:
        with Client(address, timeout=300) as client:
            client.generate(prompt_token_ids=[(n + i) % 1000 + 3 for i in range(n)], max_tokens=24, ignore_eos=True)

    with concurrent.futures.ThreadPoolExecutor(len(lengths) - 2) as pool:
        list(pool.map(one, lengths[2:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--configs", default="1p1d,colocated,colocated-slo,auto")
    parser.add_argument("--slo-tpot-ms", type=float, default=15.0,
                        help="the TPOT SLO the SLO-aware configurations (colocated-slo, auto) are set up for")
    parser.add_argument("--slo-tpot-targets", default="",
                        help="comma-separated TPOT SLOs (ms): run each SLO-aware configuration once per value, set up "
                             "for it and named <config>@<ms> (scored at every --tpot-slos; read the row of its own), "
                             "instead of once for --slo-tpot-ms")
    parser.add_argument("--workloads", default="prefill-heavy,sharegpt,trace")
    parser.add_argument("--rates-prefill-heavy", default="2,4,6,8,12,16")
    parser.add_argument("--rates-sharegpt", default="4,8,16,32,48")
    parser.add_argument("--rates-decode-heavy", default="1,2,4,8")
    parser.add_argument("--budget-window", type=int, default=0,
                        help="step_budget_window of the SLO-aware configurations' engines (0: off)")
    parser.add_argument("--defer-below", type=int, default=0,
                        help="defer_chunks_below of the SLO-aware configurations' engines (0: off; needs "
                        "--budget-window)")
    parser.add_argument("--borrow-tokens", type=int, default=0,
                        help="step_budget_borrow_tokens of the SLO-aware configurations' engines (0: off)")
    parser.add_argument("--auto-prefill-step-tokens", type=int, default=PREFILL_STEP_TOKENS,
                        help="max_batch_tokens of the auto configuration's prefill pool")
    parser.add_argument("--kv-backend", default="auto", choices=("auto", "nccl", "nccl-socket"),
                        help="KV transport of the disaggregated configurations (auto: CUDA IPC on one host; nccl: "
                             "NCCL, over NVLink on one host; nccl-socket: NCCL through its socket transport, the "
                             "cross-host stand-in: the workers get NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1)")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--burstiness", type=float, default=1.0)
    parser.add_argument("--ttft-slo", type=float, default=0.25)
    parser.add_argument("--tpot-slos", default="0.025,0.015,0.010")
    parser.add_argument("--trace-path", default=str(TRACE))
    parser.add_argument("--trace-start", type=int, default=0)
    # >= 200 requests per point: with 60, one run's attainment has a standard error of ~0.06
    parser.add_argument("--trace-requests", type=int, default=240)
    parser.add_argument("--time-scales", default="2,1,0.5",
                        help="the trace's arrival times x each of these, one point each (the window's rate / each)")
    parser.add_argument("--trace-arrivals", choices=[a.value for a in TraceArrivals], default=TraceArrivals.SPREAD.value,
                        help="spread: each of the trace's timestamp buckets (~3 s, ~10 requests) spread over its "
                             "width; recorded: every request of a bucket at once, as written")
    parser.add_argument("--trace-seed", type=int, default=0, help="the seed of the spread arrivals")
    parser.add_argument("--length-scale", type=float, default=TRACE_LENGTH_SCALE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the result files (serve-<device>-<tag>.*)")
    parser.add_argument("--num-gpus", type=int, default=2,
                        help="GPUs per configuration: per-GPU rates, and the colocated configurations' workers "
                             "(the disaggregated ones need 2)")
    parser.add_argument("--max-running", type=int, default=256,
                        help="max_running_requests of the workers that decode")
    parser.add_argument("--stream-writes-per-s", type=float, default=None,
                        help="the router's stream_writes_per_s (0: a write per token message; default: the router's)")
    parser.add_argument("--router-processes", type=int, default=1,
                        help="router.processes: router processes sharing the gRPC port (each load generator "
                             "process is one connection, so use at least as many --client-processes)")
    parser.add_argument("--client-processes", type=int, default=DEFAULT_CLIENT_PROCESSES,
                        help="load-generator processes per point (--smoke: 1)")
    parser.add_argument("--dashboard", action="store_true",
                        help="serve the router's HTTP API with the planner recommending, and keep the dashboard's "
                             "JSON after every point (<stem>-dashboard.json.gz; render: benchmarks.dashboard_replay)")
    args = parser.parse_args()
    if args.kv_backend == "nccl-socket":  # the local Ray's workers inherit this process's environment
        os.environ.update(SOCKET_ENV)
    args.workloads = args.workloads.split(",")
    try:
        time_scales = [float(x) for x in args.time_scales.split(",")]
    except ValueError:
        time_scales = []
    if not time_scales or min(time_scales) <= 0:
        raise SystemExit(f"--time-scales: positive factors, comma-separated (e.g. 2,1,0.5); got {args.time_scales!r}")
    args.time_scales = time_scales
    args.rates = {w: [float(x) for x in getattr(args, f"rates_{w.replace('-', '_')}").split(",")]
                  for w in ("prefill-heavy", "sharegpt", "decode-heavy")}
    if args.smoke:
        args.num_requests, args.trace_requests, args.client_processes = 8, 8, 1
        args.rates = {w: [1.0, 3.0] for w in args.rates}
        args.ttft_slo, args.tpot_slos = 1.0, "0.2,0.1"
    slos = [(args.ttft_slo, float(t)) for t in args.tpot_slos.split(",")]
    info = run_info()
    if "trace" in args.workloads and not Path(args.trace_path).is_file():
        raise SystemExit(f"--trace-path {args.trace_path}: no such file (the Mooncake trace, JSONL)")
    # the client must keep 5x the highest total rate of any point without falling behind (the trace's: its
    # window's mean rate at the shortest time scale), checked for ~10 s (50-400 requests; 2 s of the rate above)
    swept = [r for w in args.workloads if w in args.rates for r in args.rates[w]]
    if "trace" in args.workloads:
        try:
            window = trace_specs(args, min(args.time_scales))
        except TraceError as exc:
            raise SystemExit(f"--trace-path: {exc}") from None
        swept.append(len(window) / max(window[-1].arrival_s, 1.0) / args.num_gpus)
    capacity_rate = 5 * max(swept or [1.0]) * args.num_gpus
    capacity = asyncio.run(client_capacity(rate=capacity_rate, n=max(50, min(400, int(10 * capacity_rate)),
                                                                     int(2 * capacity_rate)) if not args.smoke
                                           else 100))
    print("client capacity:", capacity, flush=True)
    from benchmarks.engine import TINY

    all_results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", TINY if args.smoke else LLAMA31_8B)
        targets = [float(t) for t in args.slo_tpot_targets.split(",")] if args.slo_tpot_targets else []
        for kind in args.configs.split(","):
            runs = [(f"{kind}@{t:g}", t) for t in targets] if targets and kind in SLO_AWARE else [(kind, args.slo_tpot_ms)]
            for label, target in runs:
                try:
                    all_results[label] = run_configuration(kind, model_dir, args, slos, target, label)
                except Exception as exc:  # noqa: BLE001 (report the other configuration anyway)
                    import traceback

                    traceback.print_exc()
                    print(f"configuration {label} failed: {exc!r}", flush=True)
    if not all_results:
        raise SystemExit("every configuration failed")
    payload = {"settings": {k: v for k, v in vars(args).items() if k not in ("rates",)} | {"rates": args.rates},
               "client_capacity": capacity, "results": all_results, "goodput": goodput_table(all_results, slos)}
    md = render(info, payload)
    if not args.smoke:
        name = "serve" + (f"-{args.tag}" if args.tag else "")
        stem = f"{name}-{device_slug(info)}"
        requests_path = RESULTS / f"{stem}-requests.json.gz"
        write_records(all_results, requests_path)
        snapshots = {kind: res.pop("dashboard") for kind, res in all_results.items() if "dashboard" in res}
        if snapshots:
            import gzip

            with gzip.open(RESULTS / f"{stem}-dashboard.json.gz", "wt") as f:
                json.dump({"run": info, "snapshots": snapshots}, f, separators=(",", ":"))
        paths = write_results(name, info, payload, md)
        plot(all_results, RESULTS / f"{stem}.png")
        print("wrote", *paths, requests_path)
    print(md)


if __name__ == "__main__":
    main()
