"""One load point against a router: the schedule's requests streamed through the SDK, the workers' load
sampled meanwhile, everything summarised.

:func:`measure_point` runs it in load-generator processes of their own. The benchmarks start the cluster
in-process, and the router's event loop runs on a thread of that process: a load generator on the same
interpreter would share the router's GIL, and at thousands of streamed tokens a second each side's
per-message work slows the other (a client is elsewhere in a deployment). Several of them, because one
asyncio client cannot read every stream of a busy cluster in time either.
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

#: Load-generator processes per point (``--client-processes``): one asyncio client reading ~15k streamed
#: tokens a second already takes most of a core on the H200 hosts, and a client behind adds its lag to
#: every token's time.
DEFAULT_CLIENT_PROCESSES = 4
#: How far ahead of now the shards' common start is set (they start together on the wall clock).
SHARD_START_S = 1.0
#: The first point also waits for the load-generator processes to start and import the SDK.
FIRST_SHARD_START_S = 8.0

_CLIENT_POOL: concurrent.futures.ProcessPoolExecutor | None = None
_CLIENT_POOL_SIZE = 0


def _client_pool(processes: int) -> tuple[concurrent.futures.ProcessPoolExecutor, bool]:
    """The load-generator processes (spawned once, reused for every point); True when new."""
    global _CLIENT_POOL, _CLIENT_POOL_SIZE
    if _CLIENT_POOL is not None and processes == _CLIENT_POOL_SIZE:
        return _CLIENT_POOL, False
    if _CLIENT_POOL is not None:
        _CLIENT_POOL.shutdown()
    _CLIENT_POOL = concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    _CLIENT_POOL_SIZE = processes
    atexit.register(_CLIENT_POOL.shutdown)  # before the interpreter tears its modules down
    return _CLIENT_POOL, True


def measure_point(address: str, specs: list[RequestSpec], offsets: list[float], run_id: str,
                  slos: list[tuple[float, float]], client_processes: int = DEFAULT_CLIENT_PROCESSES
                  ) -> dict[str, Any]:
    """The point in ``client_processes`` load-generator processes, each with its own channel to the
    router and every ``client_processes``-th request of the schedule, started together on the wall
    clock; their records merged and summarised as one run (the load sampled by the first). Adds
    ``router_process_cores`` (this process's CPU time over the point's wall time) and
    ``client_process_cores`` (the load generators' together)."""
    shards = max(1, min(client_processes, len(specs)))
    pool, new = _client_pool(shards)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    start_at = time.time() + (FIRST_SHARD_START_S if new else SHARD_START_S)
    futures = [pool.submit(_run_shard, address, list(range(k, len(specs), shards)), specs, offsets, run_id,
                           start_at, k == 0) for k in range(shards)]
    parts = [f.result() for f in futures]
    after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - start
    records = sorted((r for part in parts for r in part["records"]), key=lambda r: r.index)
    summary = summarize(records, max(p["duration_s"] for p in parts), slos)
    summary["wall_start"] = start_at
    summary["load_series"] = parts[0]["load_series"]
    summary["loop_lag_max_ms"] = loop_lag_max_ms(summary["load_series"])
    summary["records"] = [r.to_dict() for r in records]  # moved out of the summary file when written
    # the benchmarks run the router in this process (with the Ray driver): near 1.0 its one interpreter is
    # saturated, and requests wait in the router however idle the workers are
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    summary["router_process_cores"] = round(cpu / seconds, 2) if seconds > 0 else None
    # near 1.0 per process, the load generators read the streams late, and every token's time includes that
    summary["client_process_cores"] = round(sum(p["cpu_s"] for p in parts) / seconds, 2) if seconds > 0 else None
    summary["client_processes"] = shards
    return summary


def _run_shard(address: str, indices: list[int], specs: list[RequestSpec], offsets: list[float], run_id: str,
               start_at: float, sample: bool) -> dict[str, Any]:
    """One load generator's share of a point (the requests at ``indices``), starting at wall time
    ``start_at``; ``sample``: also sample the workers' load meanwhile. Returns its records, duration, load
    samples and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    out = asyncio.run(_shard(address, indices, [specs[i] for i in indices], [offsets[i] for i in indices],
                             run_id, start_at, sample))
    after = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return out


async def _shard(address: str, indices: list[int], specs: list[RequestSpec], offsets: list[float], run_id: str,
                 start_at: float, sample: bool) -> dict[str, Any]:
    from pdserve.client import AsyncClient

    async with AsyncClient(address, timeout=600) as client:
        sampler = asyncio.create_task(sample_load(client)) if sample else None
        try:
            records, duration, _ = await run_schedule(client_stream(client, run_id), specs, offsets, label=run_id,
                                                      indices=indices, start_at=start_at,
                                                      progress=sample)
        finally:
            if sampler is not None:
                sampler.cancel()
        load = (await asyncio.gather(sampler, return_exceptions=True))[0] if sampler is not None else []
    return {"records": records, "duration_s": duration, "load_series": load if isinstance(load, list) else []}


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
