"""One load point against a router: the schedule's requests streamed through the SDK, the workers' load
sampled meanwhile, everything summarised.

:func:`measure_point` runs it in a process of its own. The benchmarks start the cluster in-process, and
the router's event loop runs on a thread of that process: a load generator on the same interpreter would
share the router's GIL, and at thousands of streamed tokens a second each side's per-message work slows
the other (a client is elsewhere in a deployment). :func:`run_point` is the coroutine itself (the CPU smoke
test awaits it directly).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import multiprocessing
import resource
import time
from typing import Any

from benchmarks.serving.loadgen import client_stream, run_schedule
from benchmarks.serving.metrics import summarize
from benchmarks.serving.workload import RequestSpec

_CLIENT_PROCESS: concurrent.futures.ProcessPoolExecutor | None = None


def measure_point(address: str, specs: list[RequestSpec], offsets: list[float], run_id: str,
                  slos: list[tuple[float, float]]) -> dict[str, Any]:
    """:func:`run_point` in the load-generator process (spawned once, reused for every point). Adds
    ``router_process_cores``: this process's CPU time over the point's wall time (and the run's
    ``client_process_cores``, the load generator's)."""
    global _CLIENT_PROCESS
    if _CLIENT_PROCESS is None:
        _CLIENT_PROCESS = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        atexit.register(_CLIENT_PROCESS.shutdown)  # before the interpreter tears its modules down
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    summary = _CLIENT_PROCESS.submit(_run_point_blocking, address, specs, offsets, run_id, slos).result()
    after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - start
    # the benchmarks run the router in this process (with the Ray driver): near 1.0 its one interpreter is
    # saturated, and requests wait in the router however idle the workers are
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    summary["router_process_cores"] = round(cpu / seconds, 2) if seconds > 0 else None
    return summary


def _run_point_blocking(address: str, specs: list[RequestSpec], offsets: list[float], run_id: str,
                        slos: list[tuple[float, float]]) -> dict[str, Any]:
    """:func:`run_point`, plus ``client_process_cores``: near 1.0 the load generator itself falls behind
    reading the streams, and its clock adds that to every token's time."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    summary = asyncio.run(run_point(address, specs, offsets, run_id, slos))
    after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - start
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    summary["client_process_cores"] = round(cpu / seconds, 2) if seconds > 0 else None
    return summary


async def run_point(address: str, specs: list[RequestSpec], offsets: list[float], run_id: str,
                    slos: list[tuple[float, float]]) -> dict[str, Any]:
    from pdserve.client import AsyncClient

    async with AsyncClient(address, timeout=600) as client:
        sampler = asyncio.create_task(sample_load(client))
        try:
            records, duration, wall_start = await run_schedule(client_stream(client, run_id), specs, offsets,
                                                               label=run_id)
        finally:
            sampler.cancel()
        load = await asyncio.gather(sampler, return_exceptions=True)
    summary = summarize(records, duration, slos)
    summary["wall_start"] = wall_start
    summary["load_series"] = load[0] if isinstance(load[0], list) else []
    summary["loop_lag_max_ms"] = loop_lag_max_ms(summary["load_series"])
    summary["records"] = [r.to_dict() for r in records]  # moved out of the summary file when written
    return summary


LOAD_SAMPLE_S = 0.5


async def sample_load(client: Any) -> list[list[Any]]:
    """Until cancelled: every :data:`LOAD_SAMPLE_S`, each worker's load as the router sees it (a row of
    time.time(), requests in the router, the router's event-loop lag and longest garbage collection, then
    worker id, running, waiting, KV use, queued prefill tokens, event-loop lag per worker): where requests
    wait when TTFT grows during a point. Returns the rows when cancelled."""
    rows: list[list[Any]] = []
    try:
        while True:
            try:
                status = await client.cluster_status(timeout=5)
            except Exception:  # noqa: BLE001 (a missed sample; the run goes on)
                status = None
            if status is not None:
                row: list[Any] = [round(time.time(), 3), status.requests_in_flight,
                                  round(status.router_loop_lag_s, 6), round(status.router_gc_pause_s, 6)]
                for w in status.workers:
                    row += [w.worker_id, w.running_requests, w.waiting_requests, round(w.kv_usage, 3),
                            w.queued_prefill_tokens, round(w.loop_lag_s, 6)]
                rows.append(row)
            await asyncio.sleep(LOAD_SAMPLE_S)
    except asyncio.CancelledError:
        return rows


#: Lags and pauses are maxima over the last 2 s (``LoopLagMonitor``, ``GcPauses``): samples this early in a
#: point may still show what happened before it (the benchmark writing its checkpoint between points).
WINDOW_S = 2.0


def loop_lag_max_ms(rows: list[list[Any]]) -> dict[str, float]:
    """The largest event-loop lag seen during a point: the router's, and each worker's (ms); and the router
    process's longest garbage collection ("router gc")."""
    out: dict[str, float] = {}
    late = [row for row in rows if row[0] >= rows[0][0] + WINDOW_S] or rows[-1:]  # (a point shorter than a window)
    for row in late:
        out["router"] = max(out.get("router", 0.0), row[2] * 1e3)
        out["router gc"] = max(out.get("router gc", 0.0), row[3] * 1e3)
        for i in range(4, len(row), 6):
            out[row[i]] = max(out.get(row[i], 0.0), row[i + 5] * 1e3)
    return {k: round(v, 1) for k, v in out.items()}
