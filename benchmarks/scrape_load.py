"""Does scraping cost serving anything? A 1P1D CPU cluster (tiny model) under a steady Poisson load, in
alternating phases with and without a scraper that reads ``/metrics`` and ``/dashboard/data`` ten times
a second (a Prometheus server scrapes every 15 s or so: this is 150x that): TTFT and TPOT per phase
kind, pooled, and the scrapes' own latency as the client sees it (HTTP included).

    python -m benchmarks.scrape_load [--rate 8] [--phases 6] [--requests 60]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from benchmarks.common import markdown_table, run_info, write_results
from benchmarks.serving.loadgen import client_stream, run_schedule
from benchmarks.serving.workload import fixed_workload, poisson_schedule


def _q(values: list[float], q: float) -> float | None:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1e3, 2) if s else None


async def _scraper(url: str, stop: asyncio.Event, latencies: list[float]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            for path in ("/metrics", "/dashboard/data"):
                started = time.perf_counter()
                async with http.get(url + path) as r:
                    await r.read()
                latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.1)


async def _phase(address: str, url: str, scrape: bool, rate: float, n: int, seed: int,
                 scrapes: list[float]) -> list[Any]:
    from pdserve.client import AsyncClient

    specs = fixed_workload(n, 256, 32, seed, vocab=250)
    stop = asyncio.Event()
    task = asyncio.create_task(_scraper(url, stop, scrapes)) if scrape else None
    async with AsyncClient(address, timeout=120) as client:
        records, _, _ = await run_schedule(client_stream(client, f"p{seed}"), specs, poisson_schedule(n, rate, seed),
                                           progress=False)
    stop.set()
    if task is not None:
        await task
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=8.0)
    parser.add_argument("--phases", type=int, default=6, help="alternating off/on phases (even)")
    parser.add_argument("--requests", type=int, default=60, help="requests per phase")
    args = parser.parse_args()
    from pdserve.cluster.config import cluster_config_from_dict
    from pdserve.cluster.launcher import Cluster

    config = cluster_config_from_dict({"model": "tiny-random", "mode": "disaggregated",
                                       "router": {"grpc_port": 0, "http_port": 0}})
    results: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "tpot": []} for k in ("off", "on")}
    scrapes: list[float] = []
    with Cluster(config) as cluster:
        async def run() -> None:
            await _phase(cluster.router_address, cluster.http_url, False, args.rate, 20, 999, [])  # warm-up
            for i in range(args.phases):
                kind = "on" if i % 2 else "off"
                for r in await _phase(cluster.router_address, cluster.http_url, kind == "on", args.rate,
                                      args.requests, i, scrapes):
                    if r.ok and r.ttft is not None:
                        results[kind]["ttft"].append(r.ttft)
                        if r.tpot is not None:
                            results[kind]["tpot"].append(r.tpot)

        asyncio.run(run())
    rows, summary = [], {}
    for kind, values in results.items():
        summary[kind] = {"requests": len(values["ttft"]), "ttft_p50_ms": _q(values["ttft"], 0.5),
                         "ttft_p99_ms": _q(values["ttft"], 0.99), "tpot_p50_ms": _q(values["tpot"], 0.5),
                         "tpot_p99_ms": _q(values["tpot"], 0.99),
                         "ttft_mean_ms": round(statistics.mean(values["ttft"]) * 1e3, 2) if values["ttft"] else None}
        rows.append([f"scraper {kind}", *summary[kind].values()])
    scrape = {"scrapes": len(scrapes), "p50_ms": _q(scrapes, 0.5), "p99_ms": _q(scrapes, 0.99)}
    info = run_info()
    markdown = "\n".join([
        "# Scraping under load (1P1D CPU cluster, tiny model)", "",
        f"{info.get('device')} · commit {info['commit']} · {info['date']} · {args.rate:g} req/s, 256 in / 32 out, "
        f"{args.phases} alternating phases of {args.requests} requests", "",
        markdown_table(["phase", "requests", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "TTFT mean ms"],
                       rows), "",
        f"Scrapes (/metrics and /dashboard/data, 10/s each, client-side incl. HTTP): {scrape}", ""])
    print(markdown)
    write_results("scrape_load", info, {"settings": vars(args), "summary": summary, "scrapes": scrape}, markdown)


if __name__ == "__main__":
    main()
