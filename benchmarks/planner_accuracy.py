"""How close ``pdserve plan`` comes to measured serving results: predictions from an H200 step-time
profile (``deploy/profiles/h200-llama31-8b.json``, written by ``pdserve profile``) against the goodput and
attainment the serving benchmark measured on 2xH200, for every measured configuration the simulator
models (``auto``: 1P1D whose router keeps prompts the prefill worker would answer late on the decode
worker, set up for TPOT 15 ms in the measured runs and simulated with each scored TPOT as its budget).

Two predictions per point: from the start-up profile alone, and with the calibration the serving runs'
own workers reported (live step time over profiled, per kind of step, pooled over the runs given).
The second is in-sample for the runs that reported it; it says how much of the error is the step-time
model and how much is the simulator. Runs on CPU in a minute:

    python -m benchmarks.planner_accuracy --trace-path .trace/mooncake_conversation.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, run_info, write_results
from pdserve.common.step_model import StepKind
from pdserve.planner.plan import Profile, Workload, predict
from pdserve.planner.simulate import SimRequest, WorkerSpec

RESULTS = Path(__file__).parent / "results"
SLOS = (("ttft<=250ms,tpot<=25ms", 0.025), ("ttft<=250ms,tpot<=15ms", 0.015), ("ttft<=250ms,tpot<=10ms", 0.010))
#: The measured configurations the simulator models: name -> (run file, config in it, worker counts,
#: colocated worker spec, whether the router spills late prompts to the decode worker)
CONFIGS: dict[str, tuple[str, str, dict[str, int], WorkerSpec | None, bool]] = {
    "1p1d": ("serve-h200x2.json", "1p1d", {"prefill": 1, "decode": 1}, None, False),
    "auto (1P1D, spilling)": ("serve-pooled-h200x2.json", "auto", {"prefill": 1, "decode": 1}, None, True),
    "colocated (2048-token chunks)": ("serve-h200x2.json", "colocated", {"colocated": 2},
                                      WorkerSpec(max_batch_tokens=2048), False),
    "colocated-slo (15 ms budget)": ("serve-pooled-h200x2.json", "colocated-slo", {"colocated": 2},
                                     WorkerSpec(step_budget_s=0.015), False),
}


def measured(file: str, config: str) -> dict[str, Any]:
    """Goodput per SLO (prefill-heavy) and trace attainment at TPOT 25 ms, as the run recorded them."""
    data = json.loads((RESULTS / file).read_text())
    rows = data["rows"] if "rows" in data else data["goodput"]
    goodput = {r["slo"]: r.get("goodput_pooled", r.get("goodput_per_gpu")) for r in rows
               if r["config"] == config and r["workload"] == "prefill-heavy"}
    trace = None
    sources = data.get("sources", [file])
    for source in sources:  # the trace point of the (first) run that has this configuration
        results = json.loads((RESULTS / source).read_text())["results"].get(config, {})
        for point in results.get("workloads", {}).get("trace", []):
            trace = point.get("slo_attainment", {}).get("ttft<=250ms,tpot<=25ms")
        if trace is not None:
            break
    return {"commit": data["run"]["commit"], "goodput": goodput, "trace_attainment": trace}


def live_calibration(files: list[str]) -> dict[StepKind, float]:
    """Mean factor per kind over the workers of ``files`` that recalibrated it (factor != 1)."""
    factors: dict[StepKind, list[float]] = {k: [] for k in StepKind}
    for file in files:
        for config in json.loads((RESULTS / file).read_text())["results"].values():
            for worker in config.get("worker_stats", []):
                for kind, factor in ((worker.get("step_time_error") or {}).get("calibration") or {}).items():
                    if factor != 1.0:
                        factors[StepKind(kind)].append(factor)
    return {k: round(statistics.mean(v), 3) for k, v in factors.items() if v}


def trace_workload(path: Path, settings: dict[str, Any]) -> Workload:
    base = Workload.trace(path, start=settings["trace_start"], count=settings["trace_requests"],
                          time_scale=settings["time_scale"], length_scale=settings["length_scale"], max_prompt=12000)
    return Workload(tuple(SimRequest(r.arrival_s, r.prompt_tokens, min(r.output_tokens, 512)) for r in base.requests),
                    base.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=Path("deploy/profiles/h200-llama31-8b.json"))
    parser.add_argument("--trace-path", type=Path, default=None, help="the Mooncake trace (its point is skipped "
                        "without it)")
    parser.add_argument("--calibration-from", default="serve-s0-h200x2.json,serve-s1-h200x2.json,serve-s2-h200x2.json")
    parser.add_argument("--measured", default=None, help="score against this run file instead (only the "
                        "configurations it has): with calibration from other runs, an out-of-sample check")
    parser.add_argument("--tag", default="", help="suffix of the result files (planner_accuracy-<tag>-...)")
    args = parser.parse_args()
    profile = Profile.load(args.profile)
    factors = live_calibration(args.calibration_from.split(","))
    calibrated = Profile(profile.model.calibrated(factors), profile.kv_bytes_per_token, profile.transfer_bytes_per_s)
    heavy = Workload.poisson(20.0, 2048, 128, n=400, seed=0)
    settings = json.loads((RESULTS / "serve-s0-h200x2.json").read_text())["settings"]
    trace = trace_workload(args.trace_path, settings) if args.trace_path else None
    rows = []
    for name, (file, config, counts, spec, spill) in CONFIGS.items():
        if args.measured is not None:
            if config not in json.loads((RESULTS / args.measured).read_text())["results"]:
                continue
            file = args.measured
        truth = measured(file, config)
        for slo, tpot in SLOS:
            row: dict[str, Any] = {"config": name, "workload": "prefill-heavy 2048/128", "slo": slo,
                                   "measured": truth["goodput"].get(slo), "measured_at": truth["commit"]}
            for label, p in (("profile", profile), ("calibrated", calibrated)):
                row[label] = predict(p, heavy, counts, ttft_slo_s=0.25, tpot_slo_s=tpot, colocated_spec=spec,
                                     spill=spill, name=name).goodput_per_gpu
                row[f"{label}_error"] = (round(row[label] / row["measured"] - 1, 3) if row["measured"] else None)
            rows.append(row)
            print(row, flush=True)
        if trace is not None and truth["trace_attainment"] is not None:
            row = {"config": name, "workload": "trace (attainment at the offered rate)", "slo": SLOS[0][0],
                   "measured": truth["trace_attainment"], "measured_at": truth["commit"]}
            for label, p in (("profile", profile), ("calibrated", calibrated)):
                row[label] = predict(p, trace, counts, ttft_slo_s=0.25, tpot_slo_s=0.025, colocated_spec=spec,
                                     spill=spill, name=name).attainment_at_offered
                row[f"{label}_error"] = round(row[label] - row["measured"], 3)
            rows.append(row)
            print(row, flush=True)
    info = {**run_info(), "device": "NVIDIA H200", "num_gpus": 2,
            "computed_on": "CPU: a simulation, compared with runs measured on 2x NVIDIA H200"}
    payload = {"profile": str(args.profile), "calibration": {k.value: v for k, v in factors.items()},
               "calibration_from": args.calibration_from, "rows": rows}
    header = (f"# Planner accuracy: predicted against measured (2xH200)\n\n{info['commit']} · {info['date']}\n\n"
              f"Profile `{args.profile}`; live calibration {payload['calibration']} (from {args.calibration_from}). "
              "Goodput rows: req/s per GPU (error = predicted / measured - 1); trace rows: SLO attainment at the "
              "offered rate (error = predicted - measured). Measured goodput interpolates between rates of 6, 10 "
              "and 14 req/s per GPU.\n\n")
    columns = ["config", "workload", "slo", "measured", "measured_at", "profile", "profile_error", "calibrated",
               "calibrated_error"]
    markdown = header + markdown_table(columns, [[r.get(c) for c in columns] for r in rows])
    if args.measured is not None:
        header_note = (f"\n\nMeasured: {args.measured} only (calibration from {args.calibration_from}: "
                       "out of sample when those are other runs).\n")
        markdown += header_note
    paths = write_results("planner_accuracy" + (f"-{args.tag}" if args.tag else ""), info, payload, markdown)
    print(markdown)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
