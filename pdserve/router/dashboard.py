"""The operator dashboard's data: one JSON snapshot of the cluster, served by the router at
``GET /dashboard/data`` and pushed every ``PUSH_INTERVAL_S`` on ``GET /dashboard/events`` (server-sent
events) to the page at ``GET /dashboard`` (``static/dashboard.html``, in the package: nothing is loaded
from the internet).

Fields: ``model``, ``mode``, ``slo`` (``ttft_ms``, ``tpot_ms``), ``time``, ``window_s``; ``pools``
(workers and healthy ones per role); ``workers`` (role, node, health, running and waiting requests, KV
usage, queued prompt tokens, advertised prefill rate, ``busy``: the share of the last ``BUSY_WINDOW_S``
its GPU spent in engine steps, ``gpu``: the NVML readings or ``{"available": false, ...}``);
``latency`` (TTFT, TPOT, ITL, end-to-end p50/p90/p99 over ``window_s``); ``attainment`` (per
``BUCKET_S`` interval of the last ``HISTORY_S``: requests that ended, the share meeting TTFT, TPOT and
both, and their TTFT and TPOT p90); ``arrivals`` (requests, prompt and output tokens per second, length percentiles); ``prefill``
(queued prompt tokens, KV bytes per second, where prompts were prefilled); ``sizing`` (per pool its
``busy`` share and, for prefill, its prompt-token capacity; the ``bottleneck`` pool, the busier one
when it is at least half busy, and by what ``ratio``; ``planner``: the online planner's latest
recommendation, with ``router.planner_mode: recommend``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from pdserve.router.config import RouterConfig, ServingMode, WorkerRole
from pdserve.router.registry import WorkerState
from pdserve.router.request_log import RequestLog

WINDOW_S = 60.0
HISTORY_S = 300.0
BUCKET_S = 10.0
BUSY_WINDOW_S = 30.0
PUSH_INTERVAL_S = 2.0
BOTTLENECK_BUSY = 0.5


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    s = sorted(values)
    if not s:
        return {"p50": None, "p90": None, "p99": None}
    return {f"p{q}": s[min(len(s) - 1, int(q / 100 * len(s)))] for q in (50, 90, 99)}


def _step_seconds(snapshot: Mapping[str, Any]) -> float:
    steps = (snapshot.get("engine") or {}).get("steps") or {}
    return float(sum(kind.get("seconds", 0.0) for kind in steps.values()))


def _kv_bytes(snapshot: Mapping[str, Any]) -> float:
    return float((snapshot.get("kv_transfer") or {}).get("bytes", 0))


def _rates(history: Sequence[tuple[float, Mapping[str, dict[str, Any]]]], now: float) -> tuple[dict[str, float], float]:
    """Busy share per worker and KV bytes per second over the last ``BUSY_WINDOW_S`` of telemetry."""
    recent = [(t, snaps) for t, snaps in history if t >= now - BUSY_WINDOW_S]
    if len(recent) < 2:
        return {}, 0.0
    (t0, first), (t1, last) = recent[0], recent[-1]
    span = max(t1 - t0, 1e-9)
    busy = {w: min(1.0, max(0.0, (_step_seconds(snap) - _step_seconds(first[w])) / span))
            for w, snap in last.items() if w in first}
    moved = sum(_kv_bytes(snap) - _kv_bytes(first[w]) for w, snap in last.items() if w in first)
    return busy, max(0.0, moved / span)


def dashboard_data(*, model: str, mode: ServingMode, config: RouterConfig, workers: Sequence[WorkerState],
                   telemetry: Mapping[str, dict[str, Any]],
                   history: Sequence[tuple[float, Mapping[str, dict[str, Any]]]], log: RequestLog,
                   placements: Mapping[str, int], now: float | None = None,
                   planner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    ttft_slo = config.ttft_slo_ms / 1e3 if config.ttft_slo_ms else None
    tpot_slo = config.tpot_slo_ms / 1e3 if config.tpot_slo_ms else None
    busy, transfer_rate = _rates(history, now)
    rows = []
    for w in workers:
        snap = telemetry.get(w.worker_id, {})
        engine = snap.get("engine") or {}
        prefill_role = w.role is WorkerRole.PREFILL
        rows.append({"worker_id": w.worker_id, "role": w.role.value, "node": w.endpoint.node, "healthy": w.routable,
                     "running": engine.get("running_requests", w.load.running_requests),
                     "waiting": engine.get("waiting_requests", w.load.waiting_requests),
                     "kv_usage": engine.get("kv_usage", w.load.kv_usage),
                     "queued_prefill_tokens": w.queued_prefill_tokens if prefill_role else w.load.queued_prefill_tokens,
                     "prefill_tokens_per_s": w.full_prefill_tokens_per_s if prefill_role else w.load.prefill_tokens_per_s,
                     "busy": busy.get(w.worker_id), "gpu": snap.get("gpu")})
    pools: dict[str, dict[str, int]] = {}
    for row in rows:
        pool = pools.setdefault(row["role"], {"workers": 0, "healthy": 0})
        pool["workers"] += 1
        pool["healthy"] += int(row["healthy"])

    recent = log.ended_since(now - WINDOW_S)
    finished = [r for r in recent if r.outcome == "finished"]
    latency = {"ttft": _percentiles([r.ttft_s for r in finished if r.ttft_s is not None]),
               "tpot": _percentiles([t for r in finished if (t := r.tpot_s) is not None]),
               "itl": _percentiles(log.gaps_since(now - WINDOW_S)),
               "e2e": _percentiles([r.e2e_s for r in finished])}
    span = min(WINDOW_S, max(1.0, now - min((r.ended_at for r in recent), default=now)))
    arrivals = {"rate_per_s": len(recent) / span, "prompt_tokens_per_s": sum(r.prompt_tokens for r in recent) / span,
                "output_tokens_per_s": sum(r.output_tokens for r in recent) / span,
                "prompt_len": _percentiles([r.prompt_tokens for r in recent]),
                "output_len": _percentiles([r.output_tokens for r in finished])}
    start = now - HISTORY_S
    buckets = int(HISTORY_S // BUCKET_S)
    counts = [[0, 0, 0, 0] for _ in range(buckets)]  # requests, met TTFT, met TPOT, met both
    ttfts: list[list[float]] = [[] for _ in range(buckets)]
    tpots: list[list[float]] = [[] for _ in range(buckets)]
    for r in log.ended_since(start):
        i = int((r.ended_at - start) // BUCKET_S)
        if 0 <= i < buckets:
            ttft_ok, tpot_ok = r.meets(ttft_slo, None), r.meets(None, tpot_slo)
            c = counts[i]
            c[0] += 1
            c[1] += ttft_ok
            c[2] += tpot_ok
            c[3] += ttft_ok and tpot_ok
            if r.outcome == "finished" and r.ttft_s is not None:
                ttfts[i].append(r.ttft_s)
                if (tpot := r.tpot_s) is not None:
                    tpots[i].append(tpot)
    attainment = [{"t": start + (i + 1) * BUCKET_S, "requests": n,
                   "ttft": met_ttft / n if n else None, "tpot": met_tpot / n if n else None,
                   "both": met_both / n if n else None,
                   "ttft_p90": _percentiles(ttfts[i])["p90"], "tpot_p90": _percentiles(tpots[i])["p90"]}
                  for i, (n, met_ttft, met_tpot, met_both) in enumerate(counts)]
    sizing_pools: dict[str, dict[str, Any]] = {}
    for role in pools:
        members = [r for r in rows if r["role"] == role and r["healthy"] and r["busy"] is not None]
        entry: dict[str, Any] = {"busy": sum(r["busy"] for r in members) / len(members) if members else None}
        if role == WorkerRole.PREFILL.value:
            entry["capacity_tokens_per_s"] = sum(r["prefill_tokens_per_s"] for r in rows if r["role"] == role)
            entry["offered_tokens_per_s"] = arrivals["prompt_tokens_per_s"]
        sizing_pools[role] = entry
    known = {role: p["busy"] for role, p in sizing_pools.items() if p["busy"] is not None}
    bottleneck, ratio = None, None
    if known:
        top = max(known, key=lambda role: known[role])
        others = [v for role, v in known.items() if role != top]
        if known[top] >= BOTTLENECK_BUSY:
            bottleneck = top
            ratio = known[top] / max(others) if others and max(others) > 0 else None
    return {"model": model, "mode": mode.value, "time": now, "window_s": WINDOW_S,
            "slo": {"ttft_ms": config.ttft_slo_ms, "tpot_ms": config.tpot_slo_ms},
            "pools": pools, "workers": rows, "latency": latency, "arrivals": arrivals, "attainment": attainment,
            "prefill": {"queued_tokens": sum(r["queued_prefill_tokens"] for r in rows),
                        "transfer_bytes_per_s": transfer_rate, "placements": dict(placements)},
            "sizing": {"pools": sizing_pools, "bottleneck": bottleneck, "ratio": ratio,
                       "planner": dict(planner) if planner is not None else None}}
