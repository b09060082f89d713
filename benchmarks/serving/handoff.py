"""Where a remote prefill's time goes: the phases of the handoff from the workers' own timestamps.

The prefill ("p") and decode ("d") workers record, per request, when it reached each point of the
handoff (the worker actors' ``timings()``); :func:`breakdown` turns one run's records into
the median, p90 and p99 of every phase.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

#: The phases of a remote prefill, from the workers' own timestamps: (name, start key, end key), each key
#: read from the prefill ("p") or decode ("d") worker's record of the request.
PHASES = (("router_in_ms", ("c", "sent_at"), ("d", "submitted_at")),  # client send -> decode worker's Submit
          ("zone_wait_ms", ("d", "submitted_at"), ("d", "zone_at")),  # decode: Submit -> landing zone exists
          ("prefill_call_ms", ("d", "zone_at"), ("p", "received_at")),  # decode's Prefill RPC reaching the prefill worker
          ("prefill_queue_ms", ("p", "received_at"), ("p", "first_step_started_at")),
          ("prefill_ms", ("p", "first_step_started_at"), ("p", "forward_done_at")),
          ("kv_landing_ms", ("p", "forward_done_at"), ("d", "landed_at")),  # last bytes + completion callback
          # kv_landing in four parts: the prefill engine reaching finish(); the transport's last writes and
          # its FINISH push; FINISH reaching the receiver; the receiver's completion callback
          ("finish_call_ms", ("p", "forward_done_at"), ("p", "finish_called_at")),
          ("finish_push_ms", ("p", "finish_called_at"), ("p", "finish_pushed_at")),
          ("finish_delivery_ms", ("p", "finish_pushed_at"), ("d", "finish_received_at")),
          ("completion_ms", ("d", "finish_received_at"), ("d", "landed_at")),
          ("admit_wait_ms", ("d", "landed_at"), ("d", "admitted_at")),  # callback -> engine thread took it in
          ("transfer_exposed_ms", ("p", "forward_done_at"), ("d", "admitted_at")),
          # the first token (emitted at admission) through the Updates stream and the router to the client
          ("first_token_out_ms", ("d", "admitted_at"), ("c", "first_token_at")))


def breakdown(timings: dict[str, list[dict[str, Any]]], run_id: str,
              records: list[dict[str, Any]] | None = None, wall_start: float | None = None) -> dict[str, Any]:
    """Median, p90 and p99 per phase (ms) of the remote prefills of one run, from the workers' own timestamps;
    with the run's ``records``, how many prompts were prefilled remotely and the TTFT p50/p99 of the
    remote and the local ones; with ``wall_start`` too (the run's start on the client's ``time.time()``
    clock, which on one host is the workers' clock), the client ("c") side of the phases."""
    prefix = f"{run_id}-"
    prefill = {t["request_id"]: t for t in timings.get("prefill", []) if t["request_id"].startswith(prefix)}
    decode = {t["request_id"]: t for t in timings.get("decode", []) if t["request_id"].startswith(prefix)}
    phases: dict[str, list[float]] = {name: [] for name, _, _ in PHASES}
    client = _client_times(records or [], prefix, wall_start)
    for rid, p in prefill.items():
        sides = {"p": p, "d": decode.get(rid, {}), "c": client.get(rid, {})}
        for name, (a_side, a_key), (b_side, b_key) in PHASES:
            a, b = sides[a_side].get(a_key), sides[b_side].get(b_key)
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
                phases[name].append((b - a) * 1e3)
    out: dict[str, Any] = {}
    for name, values in phases.items():
        values.sort()
        out[name] = round(statistics.median(values), 2) if values else None
        for q in (90, 99):
            out[name.replace("_ms", f"_p{q}_ms")] = round(values[int(q / 100 * (len(values) - 1))], 2) if values else None
    if records is not None:
        ttft = {"remote": [], "local": []}
        for r in records:
            if r.get("ttft_s") is not None:
                ttft["remote" if f"{prefix}{r['index']}" in prefill else "local"].append(r["ttft_s"])
        out["remote_prefills"] = len(ttft["remote"])
        out["local_prefills"] = len(ttft["local"])
        for kind, values in ttft.items():
            values.sort()
            for q in (50, 99):
                out[f"ttft_{kind}_p{q}_ms"] = round(values[int(q / 100 * (len(values) - 1))] * 1e3, 1) if values else None
    return out


def _client_times(records: list[dict[str, Any]], prefix: str, wall_start: float | None) -> dict[str, dict[str, float]]:
    """Request id -> when the client sent it and received its first token (``time.time()``)."""
    if wall_start is None:
        return {}
    out = {}
    for r in records:
        if r.get("sent_s") is None:
            continue
        times = {"sent_at": wall_start + r["sent_s"]}
        if r.get("ttft_s") is not None:
            times["first_token_at"] = wall_start + r["sent_s"] + r["ttft_s"]
        out[f"{prefix}{r['index']}"] = times
    return out
