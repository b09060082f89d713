"""What one ``/metrics`` scrape costs the router's event loop: rendering the router's series and every
worker's (from telemetry snapshots already held) for a cluster of ``--workers`` workers after
``--requests`` requests, timed ``--scrapes`` times; and the same for the dashboard's JSON. The
telemetry RPCs themselves are awaited, not computed, on the loop, so they are not in these figures.

    python -m benchmarks.metrics_scrape [--workers 8]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from benchmarks.common import markdown_table, run_info, write_results
from pdserve.router.config import RouterConfig, ServingMode, WorkerEndpoint, WorkerRole
from pdserve.router.dashboard import dashboard_data
from pdserve.router.metrics import RouterMetrics
from pdserve.router.registry import WorkerState


def _snapshot(i: int) -> dict:
    return {"engine": {"running_requests": 40 + i, "waiting_requests": i, "kv_usage": 0.5, "num_kv_blocks": 50000,
                       "preemptions": 3, "prompt_tokens_computed": 10**7, "prefix_cache_queries": 10**7,
                       "prefix_cache_hits": 10**6, "steps": {k: {"count": 10**5, "seconds": 900.0}
                                                             for k in ("decode", "mixed", "prefill")}},
            "kv_transfer": {"transport": "nccl", "received": 10**5, "failures": 2, "local_recomputes": 1,
                            "bytes": 10**12, "seconds": 500.0},
            "gpu": {"available": True, "utilization": 80, "memory_used_bytes": 10**11, "memory_total_bytes": 1.4e11,
                    "power_watts": 600.0, "sm_clock_mhz": 1980, "nvlink_tx_bytes": 10**13, "nvlink_rx_bytes": 10**13}}


def _timed(fn, n: int) -> dict[str, float]:  # noqa: ANN001
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 3), "p99_ms": round(times[int(0.99 * (n - 1))], 3),
            "max_ms": round(times[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--scrapes", type=int, default=500)
    args = parser.parse_args()
    rng = random.Random(0)
    metrics = RouterMetrics("llama", deadline_s=600)
    for _ in range(args.requests):
        metrics.placed(remote_prefill=rng.random() < 0.8)
        metrics.first_token(rng.uniform(0.05, 0.5))
        for _ in range(8):
            metrics.token_gap(rng.uniform(0.005, 0.03))
        metrics.ended("finished", "length", rng.uniform(0.5, 5), rng.randint(100, 4000), rng.randint(10, 500),
                      rng.uniform(0.05, 0.5))
    roles = [WorkerRole.PREFILL, WorkerRole.DECODE]
    states = [WorkerState(endpoint=WorkerEndpoint(f"w{i}", roles[i % 2], f"10.0.0.{i}:7000", f"node{i // 2}"),
                          healthy=True, stream_live=True) for i in range(args.workers)]
    snapshots = {s.worker_id: _snapshot(i) for i, s in enumerate(states)}
    metrics.attach(lambda: states, lambda: snapshots)
    text = metrics.render(0)
    now = time.time()
    history = [(now - 10, snapshots), (now, snapshots)]
    config = RouterConfig(ttft_slo_ms=250, tpot_slo_ms=25)

    def dashboard() -> None:
        json.dumps(dashboard_data(model="llama", mode=ServingMode.DISAGGREGATED, config=config, workers=states,
                                  telemetry=snapshots, history=history, log=metrics.log,
                                  placements=metrics.placement_counts))

    rows = {"metrics": _timed(lambda: metrics.render(0), args.scrapes), "dashboard": _timed(dashboard, args.scrapes)}
    info = run_info()
    table = markdown_table(["what", "p50 ms", "p99 ms", "max ms"], [[k, *v.values()] for k, v in rows.items()])
    markdown = "\n".join([f"# Scrape cost on the router's loop ({args.workers} workers, {args.requests} requests)", "",
                          f"{info.get('device')} · commit {info['commit']} · {info['date']} · exposition "
                          f"{len(text)} bytes, {sum(1 for line in text.splitlines() if not line.startswith('#'))} "
                          "samples", "", table, ""])
    print(markdown)
    write_results("metrics_scrape", info, {"settings": vars(args), "results": rows, "bytes": len(text)}, markdown)


if __name__ == "__main__":
    main()
