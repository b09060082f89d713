"""The planner's ``apply`` mode on a workload that changes halfway: decode-heavy requests, then
prefill-heavy ones, against the fixed configurations on the same GPUs and the same requests.

    python -m benchmarks.planner_apply                    # 2 GPUs, Llama-3.1-8B shapes, dummy weights
    python -m benchmarks.planner_apply --smoke            # CPU, tiny model, short phases

Configurations: ``apply`` (starts as ``auto``, 1P1D with the SLO machinery, with
``router.planner_mode: apply``: it may move its prefill worker to the decode pool -- colocated run as
0P2D -- and back), and the fixed ``auto`` and ``colocated-slo`` of ``benchmarks.serve``. Each serves the
same schedule: ``--phase-s`` seconds of Poisson arrivals of decode-heavy requests (128 in / 1024 out) at
``--rate-decode`` per GPU, then as long of prefill-heavy ones (2048 / 128) at ``--rate-prefill``. Scored
per phase and over the whole run: the share of requests meeting TTFT and TPOT, and the rate of such
requests per GPU. The router's configuration and the planner's decision are sampled every second
(``timeline``), so the switches and what the planner said before each are in the results.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import LLAMA31_8B, markdown_table, run_info, write_model_dir, write_results
from benchmarks.serve import cluster_config, warm_up
from benchmarks.serving.metrics import attainment
from benchmarks.serving.point import DEFAULT_CLIENT_PROCESSES, measure_point
from benchmarks.serving.workload import PRESETS, fixed_workload, poisson_schedule


def schedule(args: argparse.Namespace) -> tuple[list[Any], list[float], int]:
    """The two phases' requests and arrival offsets; returns how many belong to the first."""
    specs, offsets = [], []
    start = 0.0
    for phase, (preset, rate) in enumerate((("decode-heavy", args.rate_decode), ("prefill-heavy", args.rate_prefill))):
        total_rate = rate * args.num_gpus
        n = max(1, round(total_rate * args.phase_s))
        input_len, output_len = PRESETS[preset]
        if args.smoke:
            input_len, output_len = input_len // 16, max(8, output_len // 16)
        specs += fixed_workload(n, input_len, output_len, seed=args.seed + phase)
        offsets += [start + t for t in poisson_schedule(n, total_rate, seed=args.seed + phase)]
        start += args.phase_s
        if phase == 0:
            first = n
    return specs, offsets, first


def run_configuration(kind: str, model_dir: Path, args: argparse.Namespace, slos: list[tuple[float, float]],
                      specs: list[Any], offsets: list[float]) -> dict[str, Any]:
    from pdserve.cluster.config import cluster_config_from_dict
    from pdserve.cluster.launcher import Cluster

    config = cluster_config("auto" if kind == "apply" else kind, model_dir, args.smoke,
                            (args.ttft_slo * 1e3, args.slo_tpot_ms))
    if kind == "apply":
        config["router"] |= {"planner_mode": "apply", "planner_interval_s": args.planner_interval_s,
                             "planner_window_s": args.planner_window_s, "planner_dwell_s": args.planner_dwell_s,
                             "planner_confirmations": 2, "planner_min_gain": 0.1}
    cluster = Cluster(cluster_config_from_dict(config))
    cluster.start()
    timeline: list[dict[str, Any]] = []
    stop = threading.Event()

    def sample(t0: float) -> None:  # the router runs in this process: read its state once a second
        while not stop.wait(1.0):
            planner = cluster.router.planner
            latest = dict(planner.latest) if planner is not None else {}
            timeline.append({"t_s": round(time.time() - t0, 1), "config": cluster.router.configuration_name(),
                             "recommended": latest.get("recommended"),
                             "apply": (latest.get("apply") or {}).get("status")})

    try:
        warm_up(cluster.router_address, smoke=args.smoke)
        sampler = threading.Thread(target=sample, args=(time.time(),), daemon=True)
        sampler.start()
        summary = measure_point(cluster.router_address, specs, offsets, kind, slos, 1 if args.smoke else DEFAULT_CLIENT_PROCESSES)
    finally:
        stop.set()
        cluster.stop()
    summary["timeline"] = timeline
    return summary


def score(summary: dict[str, Any], first: int, args: argparse.Namespace, slos: list[tuple[float, float]]
          ) -> dict[str, Any]:
    from benchmarks.serving.metrics import RequestRecord

    records = [RequestRecord.from_dict(r) for r in summary["records"]]
    phases = {"decode-heavy": [r for r in records if r.index < first],
              "prefill-heavy": [r for r in records if r.index >= first], "whole run": records}
    out: dict[str, Any] = {}
    for name, rs in phases.items():
        seconds = args.phase_s * (2 if name == "whole run" else 1)
        for ttft, tpot in slos:
            share = attainment(rs, ttft, tpot)
            out[f"{name} @ tpot<={tpot * 1e3:g}ms"] = {
                "attainment": round(share, 3), "good_per_gpu_s": round(share * len(rs) / seconds / args.num_gpus, 2)}
    switches = [(p["t_s"], p["config"]) for i, p in enumerate(summary["timeline"])
                if i and p["config"] != summary["timeline"][i - 1]["config"]]
    out["switches"] = switches
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--configs", default="apply,auto,colocated-slo")
    parser.add_argument("--phase-s", type=float, default=None, help="seconds per phase (default 150; 30 with --smoke)")
    parser.add_argument("--rate-decode", type=float, default=2.0, help="decode-heavy requests/s per GPU")
    parser.add_argument("--rate-prefill", type=float, default=8.0, help="prefill-heavy requests/s per GPU")
    parser.add_argument("--slo-tpot-ms", type=float, default=15.0)
    parser.add_argument("--ttft-slo", type=float, default=0.25)
    parser.add_argument("--tpot-slos", default="0.025,0.015")
    parser.add_argument("--planner-interval-s", type=float, default=10.0)
    parser.add_argument("--planner-window-s", type=float, default=60.0)
    parser.add_argument("--planner-dwell-s", type=float, default=30.0)
    parser.add_argument("--num-gpus", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the result files (planner_apply-<tag>-...)")
    args = parser.parse_args()
    if args.smoke:
        args.ttft_slo, args.tpot_slos, args.slo_tpot_ms = 2.0, "0.5", 500.0
        args.planner_interval_s, args.planner_window_s, args.planner_dwell_s = 2.0, 20.0, 4.0
    if args.phase_s is None:
        args.phase_s = 30.0 if args.smoke else 150.0
    slos = [(args.ttft_slo, float(t)) for t in args.tpot_slos.split(",")]
    specs, offsets, first = schedule(args)
    info = run_info()
    from benchmarks.engine import TINY

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", TINY if args.smoke else LLAMA31_8B)
        for kind in args.configs.split(","):
            summary = run_configuration(kind, model_dir, args, slos, specs, offsets)
            results[kind] = {"scores": score(summary, first, args, slos), "timeline": summary["timeline"],
                             "errors": summary["errors"], "error_kinds": summary["error_kinds"],
                             "requests": summary["requests"]}
            print(kind, results[kind]["scores"], flush=True)
    keys = [k for k in next(iter(results.values()))["scores"] if k != "switches"]
    rows = [[kind, *(f"{r['scores'][k]['attainment']} ({r['scores'][k]['good_per_gpu_s']}/s/GPU)" for k in keys),
             "; ".join(f"{t:g} s -> {c}" for t, c in r["scores"]["switches"]) or "-", r["errors"]]
            for kind, r in results.items()]
    markdown = "\n".join([
        "# Planner apply mode on a workload that changes halfway", "",
        f"{info.get('device', 'cpu')} x{info.get('num_gpus', 0)} · commit {info['commit']} · {info['date']}", "",
        f"{args.phase_s:g} s of decode-heavy (128/1024) at {args.rate_decode:g} req/s per GPU, then {args.phase_s:g} s "
        f"of prefill-heavy (2048/128) at {args.rate_prefill:g}; {len(specs)} requests; SLO-aware configurations set "
        f"up for TTFT {args.ttft_slo * 1e3:g} ms, TPOT {args.slo_tpot_ms:g} ms." + (" (smoke: tiny model, lengths / 16)"
                                                                                    if args.smoke else ""), "",
        "Cells: share of requests meeting TTFT and TPOT (and such requests per second per GPU).", "",
        markdown_table(["config", *keys, "switches (time -> configuration)", "errors"], rows), "",
        *(f"Errors of {kind}: {json.dumps(r['error_kinds'])}" for kind, r in results.items() if r["error_kinds"]), ""])
    print(markdown)
    if not args.smoke:
        write_results("planner_apply" + (f"-{args.tag}" if args.tag else ""), info, {"settings": vars(args), "results": results}, markdown)


if __name__ == "__main__":
    main()
