"""The serving benchmark's report: goodput per configuration, workload and SLO, the markdown tables
and the attainment plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table
from benchmarks.serving.handoff import PHASES
from benchmarks.serving.metrics import goodput


def goodput_table(all_results: dict[str, Any], slos: list[tuple[float, float]]) -> list[dict[str, Any]]:
    rows = []
    for kind, res in all_results.items():
        for workload, points in res["workloads"].items():  # the trace: one point per time scale
            for key in points[0]["slo_attainment"]:
                pts = [(p["rate_per_gpu"], p["slo_attainment"][key]) for p in points]
                rows.append({"config": kind, "workload": workload, "slo": key, "goodput_per_gpu": round(goodput(pts), 2)})
    return rows


def plot(all_results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    panels = [(w, key) for w, pts in next(iter(all_results.values()))["workloads"].items()
              for key in pts[0]["slo_attainment"]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (workload, key) in zip(axes[0], panels):
        for kind, res in all_results.items():
            pts = sorted(res["workloads"].get(workload, []), key=lambda p: p["rate_per_gpu"])
            ax.plot([p["rate_per_gpu"] for p in pts], [p["slo_attainment"][key] * 100 for p in pts], marker="o",
                    label=kind)
        ax.axhline(90, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(f"{workload}\n{key}", fontsize=9)
        ax.set_xlabel("request rate per GPU (req/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def render(info: dict[str, Any], payload: dict[str, Any]) -> str:
    lines = ["# Serving benchmark: disaggregated (1P1D) vs colocated, same GPUs", "",
             f"{info.get('device')} x{info.get('num_gpus')} · commit {info['commit']} · {info['date']}"
             + "".join(f" · {k}={v}" for k, v in info.get("switches", {}).items()), "",
             f"Settings: {json.dumps(payload['settings'])}", "", "## Goodput (req/s per GPU, >= 90% meeting both SLOs)",
             "", markdown_table(["config", "workload", "SLO", "goodput/GPU"],
                                [list(r.values()) for r in payload["goodput"]])]
    rows = []
    for kind, res in payload["results"].items():
        for workload, points in res["workloads"].items():
            for p in points:
                rows.append([kind, workload, round(p["rate_per_gpu"], 2), round(p["request_throughput"], 2),
                             ms(p["ttft_s"]["p50"]), ms(p["ttft_s"]["p99"]), ms(p["tpot_s"]["p50"]),
                             ms(p["tpot_s"]["p99"]), ms(p["itl_s"]["p99"]),
                             " / ".join(f"{v:.2f}" for v in p["slo_attainment"].values()),
                             p["breakdown"].get("prefill_queue_ms"), p["breakdown"].get("prefill_ms"),
                             p["breakdown"].get("transfer_exposed_ms"), p["errors"], p.get("arrivals_over_e2e"),
                             p.get("router_process_cores"), p.get("client_process_cores"),
                             " / ".join(f"{k} {v:g}" for k, v in (p.get("loop_lag_max_ms") or {}).items())])
    lines += ["## Every point", "", markdown_table(
        ["config", "workload", "rate/GPU", "req/s", "TTFT p50 ms", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p99",
         "attainment (per SLO)", "prefill queue ms", "prefill ms", "transfer exposed ms", "errors",
         "arrivals / e2e p50", "router process cores", "client process cores", "event-loop lag max ms"], rows),
        "`arrivals / e2e p50`: how many median request lifetimes the arrivals span; the lower, the less the "
        "point says about a sustained load (below ~1 nearly every request was in flight at once). `router "
        "process cores`: CPU time of the (first) router process (and the Ray driver) over the point's "
        "wall time; near 1 its interpreter is saturated. `client process cores`: the same for the load generator "
        "(near 1 it reads the streams late, and every token's time includes that).", "",
        f"Client capacity (no server): {json.dumps(payload['client_capacity'])}", ""]
    error_rows = [[kind, workload, round(p["rate_per_gpu"], 2), count, message]
                  for kind, res in payload["results"].items() for workload, points in res["workloads"].items()
                  for p in points for message, count in (p.get("error_kinds") or {}).items()]
    if error_rows:
        lines += ["## Errors (most frequent messages, ids and numbers masked)", "",
                  markdown_table(["config", "workload", "rate/GPU", "count", "message"], error_rows), ""]
    phase_rows = [[kind, workload, round(p["rate_per_gpu"], 2), p["breakdown"].get("remote_prefills"),
                   p["breakdown"].get("local_prefills"), p["breakdown"].get("ttft_remote_p50_ms"),
                   p["breakdown"].get("ttft_remote_p99_ms"), p["breakdown"].get("ttft_local_p50_ms"),
                   p["breakdown"].get("ttft_local_p99_ms"),
                   *(" / ".join(str(p["breakdown"].get(n.replace("_ms", suffix))) for suffix in ("_ms", "_p90_ms", "_p99_ms"))
                     for n, _, _ in PHASES)]
                  for kind, res in payload["results"].items() for workload, points in res["workloads"].items()
                  for p in points if p["breakdown"].get("remote_prefills")]
    if phase_rows:
        lines += ["## Where a remote prefill's time goes (ms, p50 / p90 / p99, workers' clocks)", "", markdown_table(
            ["config", "workload", "rate/GPU", "remote", "local", "TTFT remote p50", "TTFT remote p99",
             "TTFT local p50", "TTFT local p99", *(n.removesuffix("_ms").replace("_", " ") for n, _, _ in PHASES)],
            phase_rows), ""]
    stats = [[kind, s["worker_id"], s["role"], s.get("remote_prefills", ""), s["prompt_tokens_computed"],
              s.get("budget_cut_chunks", ""), s.get("filled_chunks", ""), s.get("deferred_chunks", ""),
              s.get("late_prompts", ""),
              (s.get("step_time_error") or {}).get("abs_error_p50", ""),
              " / ".join(f"{k} {v}" for k, v in ((s.get("step_time_error") or {}).get("calibration") or {}).items())]
             for kind, res in payload["results"].items() for s in res.get("worker_stats", [])]
    if stats:
        lines += ["## Workers at the end of each configuration (warm-up included)", "",
                  markdown_table(["config", "worker", "role", "prompts prefilled remotely", "prompt tokens computed",
                                  "chunks cut to the step budget", "chunks grown into graph padding",
                                  "chunks deferred", "prompts predicted late",
                                  "step-time model error p50", "calibration by kind of step"], stats)]
    return "\n".join(lines)


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"
