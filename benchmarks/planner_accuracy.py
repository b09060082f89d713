"""How close ``pdserve plan`` comes to measured serving results: predictions from an H200 step-time
profile (``deploy/profiles/h200-llama31-8b.json``, written by ``pdserve profile``) against the goodput and
attainment the serving benchmark measured on 2xH200, for every measured configuration the simulator
models (``auto``: 1P1D whose router keeps prompts the prefill worker would answer late on the decode
worker, set up for TPOT 15 ms in the measured runs and simulated with each scored TPOT as its budget).

Two predictions per point: from the start-up profile alone, and with the calibration the serving runs'
own workers reported (live step time over profiled, per kind of step, pooled over the runs given).
The second is in-sample for the runs that reported it; it says how much of the error is the step-time
model and how much is the simulator.

A measured goodput is itself an estimate: the runs swept three rates (6, 10 and 14 req/s per GPU) and
interpolated linearly between the last passing and the first failing one, which under-reads a curve
that holds up and then falls off a cliff. So each calibrated prediction is also made **on the measured
grid**: the simulated attainment at the same rates, with as many requests per rate as were measured
(three seeds of 200), and the same interpolation. The grid error compares like with like; the per-rate
table shows the attainments behind it. Runs on CPU in a few minutes:

    python -m benchmarks.planner_accuracy --trace-path .trace/mooncake_conversation.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, run_info, write_results
from benchmarks.serving.metrics import goodput
from benchmarks.serving.run_files import RESULTS, live_calibration, run_settings, setup_tpot_s, trace_workload
from benchmarks.serving.workload import poisson_schedule, sharegpt_workload
from pdserve.planner.plan import Profile, Workload, predict, simulation
from pdserve.planner.simulate import SimRequest, WorkerSpec

SLOS = (("ttft<=250ms,tpot<=25ms", 0.025), ("ttft<=250ms,tpot<=15ms", 0.015), ("ttft<=250ms,tpot<=10ms", 0.010))
GRID_SEEDS = 3
#: The measured configurations the simulator models: name -> (run file, config in it, worker counts,
#: colocated worker spec, whether the router spills late prompts to the decode worker)
CONFIGS: dict[str, tuple[str, str, dict[str, int], WorkerSpec | None, bool]] = {
    "1p1d": ("serve-h200x2.json", "1p1d", {"prefill": 1, "decode": 1}, None, False),
    "auto (1P1D, spilling)": ("serve-pooled-e-h200x2.json", "auto", {"prefill": 1, "decode": 1}, None, True),
    "colocated (2048-token chunks)": ("serve-h200x2.json", "colocated", {"colocated": 2},
                                      WorkerSpec(max_batch_tokens=2048), False),
    "colocated-slo (15 ms budget)": ("serve-pooled-e-h200x2.json", "colocated-slo", {"colocated": 2},
                                     WorkerSpec(step_budget_s=0.015), False),
}


def measured(file: str, config: str) -> dict[str, Any]:
    """Goodput and attainment by rate per SLO (prefill-heavy), and the trace attainment at TPOT 25 ms (the
    mean over the runs behind a pooled file that have it), as the runs recorded them."""
    data = json.loads((RESULTS / file).read_text())
    goodput: dict[str, float] = {}
    by_rate: dict[str, dict[float, float]] = {}
    requests: dict[float, int] = {}
    if "rows" in data:  # a pooled file (benchmarks.serve_pool)
        for r in data["rows"]:
            if r["config"] == config and r["workload"] == "prefill-heavy":
                goodput[r["slo"]] = r["goodput_pooled"]
                by_rate[r["slo"]] = {float(k): v for k, v in r["pooled_attainment"].items()}
                requests = {float(k): v for k, v in r["requests_per_rate"].items()}
    else:
        goodput = {r["slo"]: r["goodput_per_gpu"] for r in data["goodput"]
                   if r["config"] == config and r["workload"] == "prefill-heavy"}
        for point in data["results"][config]["workloads"].get("prefill-heavy", []):
            for slo, share in point["slo_attainment"].items():
                by_rate.setdefault(slo, {})[point["rate_per_gpu"]] = share
            requests[point["rate_per_gpu"]] = point["requests"]
    traces: dict[float, list[float]] = {}  # by the trace point's time scale (one per run before 2026-12-02)
    for source in data.get("sources", [file]):
        run = json.loads((RESULTS / source).read_text())
        for p in run["results"].get(config, {}).get("workloads", {}).get("trace", []):
            scale = float(p.get("time_scale", run["settings"].get("time_scale", 1.0)))
            traces.setdefault(scale, []).append(p["slo_attainment"]["ttft<=250ms,tpot<=25ms"])
    commits = data.get("commits") or [data["run"]["commit"]]
    return {"commit": ", ".join(commits), "goodput": goodput, "attainment_by_rate": by_rate, "requests": requests,
            "trace_attainment": {scale: (round(statistics.mean(v), 3), len(v)) for scale, v in sorted(traces.items())}}


def on_grid(profile: Profile, counts: dict[str, int], spec: WorkerSpec | None, spill: bool, tpot: float,
            requests: dict[float, int], policy: dict[str, int], setup_tpot: float,
            seeds: int = GRID_SEEDS) -> dict[float, float]:
    """Simulated attainment at TPOT ``tpot`` at each measured rate (req/s per GPU) of the prefill-heavy
    workload, pooled over ``seeds`` Poisson schedules that together hold as many requests as were measured
    there; the budgeting workers set up for ``setup_tpot``, as the measured run's were."""
    num_gpus = sum(counts.values())
    shares = {}
    for rate, n in sorted(requests.items()):
        met = total = 0
        for seed in range(seeds):
            workload = Workload.poisson(rate * num_gpus, 2048, 128, n=max(1, n // seeds), seed=1000 + seed)
            outcomes = simulation(profile, counts, ttft_slo_s=0.25, tpot_slo_s=setup_tpot, colocated_spec=spec,
                                  spill=spill, **policy).run(list(workload.requests))
            met += sum(o.meets(0.25, tpot) for o in outcomes)
            total += len(outcomes)
        shares[rate] = round(met / total, 3)
    return shares


def sharegpt_rows(profile: Profile, file: str, policy: dict[str, int], own_calibration: bool = False,
                  ) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    """Goodput rows for the ShareGPT-like points of ``file``: each point's exact request sequence (the
    serving benchmark's draws for its seed and rate) simulated, and interpolated as the measured points
    were; plus the attainment per rate behind them. ``own_calibration``: each configuration's profile
    calibrated with the factors its own workers in ``file`` ended the run with (in sample, as the online
    planner calibrates on the live workload), instead of ``profile`` as given; ``profile`` must then be
    the uncalibrated one."""
    data = json.loads((RESULTS / file).read_text())
    settings = data["settings"]
    rates, n, cap = settings["rates"]["sharegpt"], settings["num_requests"], settings["max_output"]
    setup_tpot = setup_tpot_s(file)
    rows: list[dict[str, Any]] = []
    grid_rows: list[list[Any]] = []
    for name, (_, config, counts, spec, spill) in CONFIGS.items():
        points = data["results"].get(config, {}).get("workloads", {}).get("sharegpt")
        if not points:
            continue
        num_gpus = sum(counts.values())
        point_profile = profile
        if own_calibration:
            own = live_calibration([file], configs={config})
            point_profile = replace(profile, model=profile.model.calibrated(own))
        sequences = {}
        for j, rate in enumerate(rates):
            specs = sharegpt_workload(n, settings["seed"] + j)
            offsets = poisson_schedule(n, rate * num_gpus, seed=settings["seed"] + j, burstiness=settings["burstiness"])
            sequences[float(rate)] = [SimRequest(t, len(s.prompt_token_ids), min(s.output_len, cap))
                                      for s, t in zip(specs, offsets, strict=True)]
        for slo, tpot in SLOS:
            measured_shares = {p["rate_per_gpu"]: p["slo_attainment"][slo] for p in points}
            predicted = {}
            for rate, requests in sequences.items():
                outcomes = simulation(point_profile, counts, ttft_slo_s=0.25, tpot_slo_s=setup_tpot,
                                      colocated_spec=spec,
                                      spill=spill, **policy).run(requests)
                predicted[rate] = round(sum(o.meets(0.25, tpot) for o in outcomes) / len(outcomes), 3)
            truth = next(r["goodput_per_gpu"] for r in data["goodput"]
                         if r["config"] == config and r["workload"] == "sharegpt" and r["slo"] == slo)
            grid = round(goodput(list(predicted.items())), 2)
            rows.append({"config": name, "workload": f"ShareGPT-like (rates {', '.join(f'{r:g}' for r in rates)})",
                         "slo": slo, "measured": truth, "measured_at": data["run"]["commit"], "grid": grid,
                         "grid_error": round(grid / truth - 1, 3) if truth else None})
            grid_rows += [[name, slo, rate, measured_shares.get(rate), share,
                           None if measured_shares.get(rate) is None else round(share - measured_shares[rate], 3)]
                          for rate, share in predicted.items()]
    return rows, grid_rows


#: The fixed-length workloads the one-GPU comparison replays: name -> (prompt tokens, output tokens).
FIXED_WORKLOADS = {"prefill-heavy": (2048, 128), "decode-heavy": (128, 1024)}


def colocated_rows(profile: Profile, files: list[str], statistic: str = "end",
                   trace_path: Path | None = None) -> list[list[Any]]:
    """Per point of the colocated / colocated-slo runs in ``files`` on the fixed-length and ShareGPT-like workloads, and on the
    trace when ``trace_path`` is given (``--num-gpus`` workers, their settings): the measured attainment per SLO and TPOT p50 against the
    simulation of the point's exact requests, on ``profile`` alone, calibrated with the factors the
    run's own workers reported (in sample; the profile alone where they reported none), and with those
    of the other files' workers (out of sample: does a calibration learnt on one workload carry to
    another?)."""
    from benchmarks.serving.workload import fixed_workload

    out: list[list[Any]] = []
    for file in files:
        own = live_calibration([file], statistic)
        others = live_calibration([f for f in files if f != file], statistic) if len(files) > 1 else {}
        profiles = {label: replace(profile, model=profile.model.calibrated(factors))
                    for label, factors in (("profile", {}), ("own", own), ("others", others))}
        data = json.loads((RESULTS / file).read_text())
        settings = data["settings"]
        num_gpus, n = settings["num_gpus"], settings["num_requests"]
        policy = {name: settings.get(name, 0) for name in ("budget_window", "defer_below", "borrow_tokens")}
        for config, result in data["results"].items():
            kind, _, target = config.partition("@")  # colocated-slo@10: set up for TPOT 10 ms (--slo-tpot-targets)
            budget_s = float(target or settings["slo_tpot_ms"]) / 1e3 if kind == "colocated-slo" else None
            spec = WorkerSpec(max_batch_tokens=8192 if budget_s else 2048, max_running=settings.get("max_running", 256),
                              step_budget_s=budget_s, ttft_slo_s=0.25 if budget_s else None)
            workloads = [*FIXED_WORKLOADS, "sharegpt", *(["trace"] if trace_path is not None else [])]
            for workload in workloads:
                for j, point in enumerate(result["workloads"].get(workload, [])):
                    rate = point["rate_per_gpu"]
                    if workload == "trace":
                        assert trace_path is not None
                        requests = list(trace_workload(trace_path, settings, point.get(
                            "time_scale", settings.get("time_scale", 1.0))).requests)
                    else:
                        if workload == "sharegpt":  # the serving benchmark caps its outputs at --max-output
                            specs = sharegpt_workload(n, settings["seed"] + j)
                            cap = settings["max_output"]
                        else:
                            prompt, output = FIXED_WORKLOADS[workload]
                            specs, cap = fixed_workload(n, prompt, output, settings["seed"] + j), output
                        offsets = poisson_schedule(n, rate * num_gpus, seed=settings["seed"] + j,
                                                   burstiness=settings["burstiness"])
                        requests = [SimRequest(t, len(s.prompt_token_ids), min(s.output_len, cap))
                                    for s, t in zip(specs, offsets, strict=True)]
                    predicted = {}
                    for label, model in profiles.items():
                        outcomes = simulation(model, {"colocated": num_gpus}, ttft_slo_s=0.25,
                                              tpot_slo_s=budget_s or SLOS[0][1], colocated_spec=spec,
                                              spill=False, **policy).run(requests)
                        tpots = sorted(o.tpot_s for o in outcomes if o.tpot_s is not None)
                        predicted[label] = [round(sum(o.meets(0.25, tpot) for o in outcomes) / len(outcomes), 3)
                                            for _, tpot in SLOS] + [round(1e3 * tpots[len(tpots) // 2], 1)]
                    measured_row = ([round(point["slo_attainment"][slo], 3) for slo, _ in SLOS]
                                    + [round(1e3 * point["tpot_s"]["p50"], 1)])
                    label_workload = (workload if workload != "trace" else
                                      f"trace ({settings.get('trace_arrivals', 'recorded')})")
                    out.append([file, f"{num_gpus} x {config}, {spec.max_running} slots", label_workload, rate,
                                ", ".join(f"{k.value} {v}" for k, v in own.items()) or "none",
                                " / ".join(f"{v}" for v in measured_row),
                                *(" / ".join(f"{v}" for v in predicted[label]) for label in profiles)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=Path("deploy/profiles/h200-llama31-8b.json"))
    parser.add_argument("--trace-path", type=Path, default=None, help="the Mooncake trace (its point is skipped "
                        "without it)")
    parser.add_argument("--calibration-from", default="serve-s0-h200x2.json,serve-s1-h200x2.json,serve-s2-h200x2.json")
    parser.add_argument("--measured", default=None, help="score against this run file instead (only the "
                        "configurations it has): with calibration from other runs, an out-of-sample check")
    parser.add_argument("--sharegpt-measured", default=None, help="also score the ShareGPT-like points of this "
                        "run file (each point's exact request sequence, calibrated profile)")
    parser.add_argument("--sharegpt-calibration", choices=("shared", "own"), default="shared",
                        help="--sharegpt-measured: calibrate with --calibration-from's factors (shared) or with "
                        "each configuration's own workers' factors in that file (own: in sample, per workload)")
    parser.add_argument("--colocated-measured", default=None, help="also compare the prefill-heavy, decode-heavy and "
                        "ShareGPT-like points (and the trace's, with --trace-path) of these colocated / colocated-slo run files "
                        "(comma-separated; e.g. the one-GPU runs serve-g1p1-h200.json), each point's exact requests")
    parser.add_argument("--budget-window", type=int, default=0, help="simulate the engines' step_budget_window "
                        "(as the measured runs had it)")
    parser.add_argument("--defer-below", type=int, default=0, help="simulate the engines' defer_chunks_below")
    parser.add_argument("--borrow-tokens", type=int, default=0,
                        help="simulate the engines' step_budget_borrow_tokens")
    parser.add_argument("--tag", default="", help="suffix of the result files (planner_accuracy-<tag>-...)")
    parser.add_argument("--statistic", choices=("end", "run", "time"), default="end",
                        help="--colocated-measured: calibrate with each worker's factors at the end of its run "
                        "(end), its mean measured/profiled ratio over the whole run (run) or its measured over "
                        "profiled seconds over the whole run (time; runs from 2026-12-02 on)")
    args = parser.parse_args()
    profile = Profile.load(args.profile)
    policy = {"budget_window": args.budget_window, "defer_below": args.defer_below, "borrow_tokens": args.borrow_tokens}
    factors = live_calibration(args.calibration_from.split(","))
    # the profile's KV capacity and graph rows too (before 2026-12-02 they were left out here)
    calibrated = replace(profile, model=profile.model.calibrated(factors))
    heavy = Workload.poisson(20.0, 2048, 128, n=400, seed=0)
    rows: list[dict[str, Any]] = []
    grid_rows: list[list[Any]] = []
    for name, (file, config, counts, spec, spill) in CONFIGS.items():
        if args.measured is not None:
            if config not in json.loads((RESULTS / args.measured).read_text())["results"]:
                continue
            file = args.measured
        if run_settings(file).get("num_gpus", 2) != sum(counts.values()):  # modelled for another GPU count
            continue
        truth = measured(file, config)
        setup_tpot = setup_tpot_s(file)  # the TPOT its budgeting workers were set up for (read once)
        for slo, tpot in SLOS if truth["requests"] else ():  # runs without prefill-heavy points: none
            row: dict[str, Any] = {"config": name, "workload": "prefill-heavy 2048/128", "slo": slo,
                                   "measured": truth["goodput"].get(slo), "measured_at": truth["commit"]}
            for label, p in (("profile", profile), ("calibrated", calibrated)):
                row[label] = predict(p, heavy, counts, ttft_slo_s=0.25, tpot_slo_s=tpot, colocated_spec=spec,
                                     spill=spill, name=name, budget_tpot_s=setup_tpot, **policy).goodput_per_gpu
                row[f"{label}_error"] = (round(row[label] / row["measured"] - 1, 3) if row["measured"] else None)
            grid = on_grid(calibrated, counts, spec, spill, tpot, truth["requests"], policy, setup_tpot)
            row["grid"] = round(goodput(list(grid.items())), 2)
            row["grid_error"] = round(row["grid"] / row["measured"] - 1, 3) if row["measured"] else None
            measured_shares = truth["attainment_by_rate"].get(slo, {})
            grid_rows += [[name, slo, rate, measured_shares.get(rate), share,
                           None if measured_shares.get(rate) is None else round(share - measured_shares[rate], 3)]
                          for rate, share in grid.items()]
            rows.append(row)
            print(row, flush=True)
        for time_scale, (attained, runs) in truth["trace_attainment"].items() if args.trace_path is not None else ():
            trace = trace_workload(args.trace_path, run_settings(file), time_scale)
            row = {"config": name, "workload": f"trace x{time_scale:g} (attainment at the offered rate, mean of "
                   f"{runs} run(s))", "slo": SLOS[0][0], "measured": attained, "measured_at": truth["commit"]}
            for label, p in (("profile", profile), ("calibrated", calibrated)):
                row[label] = predict(p, trace, counts, ttft_slo_s=0.25, tpot_slo_s=0.025, colocated_spec=spec,
                                     spill=spill, name=name, budget_tpot_s=setup_tpot,
                                     **policy).attainment_at_offered
                row[f"{label}_error"] = round(row[label] - row["measured"], 3)
            rows.append(row)
            print(row, flush=True)
    sharegpt_grid: list[list[Any]] = []
    if args.sharegpt_measured is not None:
        own = args.sharegpt_calibration == "own"
        extra, sharegpt_grid = sharegpt_rows(profile if own else calibrated, args.sharegpt_measured, policy, own)
        rows += extra
        for row in extra:
            print(row, flush=True)
    colocated_table: list[list[Any]] = []
    if args.colocated_measured is not None:
        colocated_table = colocated_rows(profile, args.colocated_measured.split(","), args.statistic,
                                         args.trace_path)
        for row in colocated_table:
            print(row, flush=True)
    gpus = int(run_settings(args.measured).get("num_gpus", 2)) if args.measured is not None else 2
    info = {**run_info(), "device": "NVIDIA H200", "num_gpus": gpus,
            "computed_on": f"CPU: a simulation, compared with runs measured on {gpus}x NVIDIA H200"}
    payload = {"profile": str(args.profile), "policy": policy, "calibration": {k.value: v for k, v in factors.items()},
               "calibration_from": args.calibration_from, "rows": rows,
               "attainment_by_rate": [dict(zip(("config", "slo", "rate_per_gpu", "measured", "predicted", "error"), r))
                                      for r in grid_rows]}
    header = (f"# Planner accuracy: predicted against measured ({gpus}xH200)\n\n{info['commit']} · {info['date']}\n\n"
              f"Simulated engine policy {policy}. Profile `{args.profile}`; live calibration {payload['calibration']} (from {args.calibration_from}). "
              "Goodput rows: req/s per GPU (error = predicted / measured - 1); trace rows: SLO attainment at the "
              "offered rate (error = predicted - measured). Measured goodput interpolates between the measured rates "
              "(req/s per GPU; listed below); `grid` is the calibrated prediction made the same way (simulated attainment "
              f"at the measured rates, {GRID_SEEDS} seeds, as many requests as measured).\n\n")
    columns = ["config", "workload", "slo", "measured", "measured_at", "profile", "profile_error", "calibrated",
               "calibrated_error", "grid", "grid_error"]
    markdown = header + markdown_table(columns, [[r.get(c) for c in columns] for r in rows])
    markdown += ("\n## Attainment at each measured rate (prefill-heavy; calibrated simulation)\n\n"
                 + markdown_table(["config", "slo", "rate/GPU", "measured", "predicted", "error"], grid_rows))
    if sharegpt_grid:
        payload["sharegpt_calibration"] = args.sharegpt_calibration
        calibration_note = ("each configuration's own workers' factors in the run, in sample" if own else
                            "the live calibration above")
        markdown += (f"\n## Attainment at each measured rate (ShareGPT-like, each point's exact requests; calibrated "
                     f"simulation: {calibration_note})\n\n" + markdown_table(["config", "slo", "rate/GPU", "measured", "predicted", "error"],
                                                        sharegpt_grid))
        payload["sharegpt_attainment_by_rate"] = [
            dict(zip(("config", "slo", "rate_per_gpu", "measured", "predicted", "error"), r)) for r in sharegpt_grid]
    if colocated_table:
        columns = ["run", "configuration", "workload", "rate/GPU", "the run's own calibration", "measured",
                   "predicted (profile)", "predicted (own calibration)", "predicted (other files' calibration)"]
        markdown += ("\n## Colocated runs, each point's exact requests: attainment at TPOT 25 / 15 / 10 ms and TPOT "
                     "p50 (ms), on the profile alone, with the live calibration the run's own workers reported "
                     f"(in sample) and with the other files' (out of sample); factors: `--statistic {args.statistic}`\n\n"
                     + markdown_table(columns, colocated_table))
        payload["colocated"] = [dict(zip(columns, r)) for r in colocated_table]
    if args.measured is not None:
        header_note = (f"\n\nMeasured: {args.measured} only (calibration from {args.calibration_from}: "
                       "out of sample when those are other runs).\n")
        markdown += header_note
    paths = write_results("planner_accuracy" + (f"-{args.tag}" if args.tag else ""), info, payload, markdown)
    print(markdown)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
