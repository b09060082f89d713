"""The ``pdserve profile`` and ``pdserve plan`` command lines; ``plan`` runs here (torch-free), ``profile``
builds an engine and runs in :mod:`pdserve.cluster.profile_cli`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from pdserve.common.errors import ConfigError
from pdserve.common.mooncake_trace import TraceArrivals
from pdserve.common.step_model import parse_calibration


def add_planner_parsers(sub: argparse._SubParsersAction) -> None:
    profile = sub.add_parser("profile", help="measure this device's step-time model (for the scheduler and "
                                             "`pdserve plan`) and write it as JSON")
    profile.add_argument("--model", default="tiny-random", help="a local HF directory, or tiny-random")
    profile.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                         help="dummy: random weights of the model's shapes (timing only)")
    profile.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    profile.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    profile.add_argument("--max-batch-tokens", type=int, default=8192, help="the largest step profiled")
    profile.add_argument("--max-model-len", type=int, default=None)
    profile.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    profile.add_argument("--kv-transfer-gb-per-s", type=float, default=None,
                         help="the KV link's rate in GB/s, as measured by `python -m benchmarks.kv_transfer` between "
                              "the hosts (default: measured here as a copy to the next GPU when there is one; else "
                              "none, and `pdserve plan` assumes 50)")

    plan = sub.add_parser("plan", help="predict goodput per GPU of every configuration for a workload and SLOs, "
                                       "by simulation over a step-time profile, and recommend one")
    plan.add_argument("--profile", type=Path, required=True, help="a file written by `pdserve profile`")
    plan.add_argument("--gpus", type=int, required=True, help="how many GPUs")
    plan.add_argument("--gpus-per-worker", type=int, default=1,
                      help="GPUs per worker (its tensor-parallel size; the profile is such a worker's)")
    plan.add_argument("--slo-ttft-ms", type=float, required=True)
    plan.add_argument("--slo-tpot-ms", type=float, required=True)
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="a Mooncake-format JSONL trace (timestamp ms, input_length, "
                                                   "output_length)")
    source.add_argument("--rate", type=float, help="Poisson arrivals per second (with --prompt-len, --output-len)")
    plan.add_argument("--prompt-len", type=int, default=2048)
    plan.add_argument("--output-len", type=int, default=128)
    plan.add_argument("--requests", type=int, default=400, help="requests simulated per point (default: 400)")
    plan.add_argument("--trace-start", type=int, default=0)
    plan.add_argument("--time-scale", type=float, default=1.0, help="trace arrival times x this")
    plan.add_argument("--length-scale", type=float, default=1.0, help="trace prompt lengths x this")
    plan.add_argument("--trace-arrivals", choices=[a.value for a in TraceArrivals], default=TraceArrivals.SPREAD.value,
                      help="spread (default): each bucket of requests the trace records at one timestamp arrives at "
                           "uniform times until the next; recorded: all at once, as written (the Mooncake trace's "
                           "timestamps come in ~3 s buckets of ~10 requests)")
    plan.add_argument("--trace-seed", type=int, default=0, help="the seed of the spread arrivals")
    plan.add_argument("--calibrate", default="", metavar="KIND=FACTOR,...",
                      help="scale the profile's steps of a kind (decode, mixed, chunked, prefill) by what live "
                           "steps measured, e.g. mixed=1.37,prefill=1.25 (a worker's telemetry reports, per kind, "
                           "step_time_busy: measured_s / profiled_s of its recent steps, what the router's planner "
                           "uses); the start-up profile alone is optimistic under load")
    plan.add_argument("--kv-transfer-gb-per-s", type=float, default=None,
                      help="the KV link's rate in GB/s (default: the profile's, else 50)")
    plan.add_argument("--kv-capacity-tokens", type=int, default=None,
                      help="one worker's KV cache in tokens (default: the profile's, which `pdserve profile` "
                           "measures; none in older profiles: not limited)")
    plan.add_argument("--borrow-tokens", type=int, default=0,
                      help="the workers' engine.step_budget_borrow_tokens (default 0, as the engine's): their step "
                           "budgets borrow from up to this many later tokens of each decoding request")
    plan.add_argument("--json", action="store_true", help="print the result as one JSON object")
    plan.add_argument("--plot", type=Path, default=None, metavar="FILE.svg",
                      help="also write each configuration's SLO attainment against the offered rate per GPU as an "
                           "SVG (simulates each configuration at --plot-points more rates)")
    plan.add_argument("--plot-points", type=int, default=12, help="rates per curve of --plot (default: 12)")


def run_plan(args: argparse.Namespace) -> int:
    from pdserve.planner.plan import Profile, Workload, plan, render

    if args.gpus_per_worker < 1 or args.gpus % args.gpus_per_worker:
        raise ConfigError("--gpus-per-worker", f"must be >= 1 and divide --gpus ({args.gpus}), got {args.gpus_per_worker}")
    workers = args.gpus // args.gpus_per_worker
    if workers < 2:
        raise ConfigError("--gpus", f"planning compares colocated with split pools: needs >= 2 workers, got "
                                    f"{workers} ({args.gpus} GPUs, {args.gpus_per_worker} per worker)")
    for name in ("slo_ttft_ms", "slo_tpot_ms"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')}", f"must be > 0, got {getattr(args, name)}")
    if args.requests < 20:
        raise ConfigError("--requests", f"must be >= 20, got {args.requests}")
    if args.borrow_tokens < 0:
        raise ConfigError("--borrow-tokens", f"must be >= 0, got {args.borrow_tokens}")
    if args.plot is not None:
        if args.plot.suffix.lower() != ".svg":
            raise ConfigError("--plot", f"writes an SVG file: give a path ending in .svg, got {str(args.plot)!r}")
        if not 2 <= args.plot_points <= 200:
            raise ConfigError("--plot-points", f"must be in 2..200, got {args.plot_points}")
        if not args.plot.parent.is_dir():
            raise ConfigError("--plot", f"the folder {str(args.plot.parent)!r} does not exist")
    profile = Profile.load(args.profile)
    if args.calibrate:
        profile = dataclasses.replace(profile, model=profile.model.calibrated(parse_calibration(args.calibrate)))
    if args.kv_transfer_gb_per_s is not None:
        if not 0 < args.kv_transfer_gb_per_s < math.inf:
            raise ConfigError("--kv-transfer-gb-per-s", f"must be a number > 0, got {args.kv_transfer_gb_per_s:g}")
        profile = dataclasses.replace(profile, transfer_bytes_per_s=args.kv_transfer_gb_per_s * 1e9)
    if args.kv_capacity_tokens is not None:
        if args.kv_capacity_tokens < 1:
            raise ConfigError("--kv-capacity-tokens", f"must be >= 1, got {args.kv_capacity_tokens}")
        profile = dataclasses.replace(profile, kv_capacity_tokens=args.kv_capacity_tokens)
    if args.trace is not None:
        workload = Workload.trace(args.trace, start=args.trace_start, count=args.requests, time_scale=args.time_scale,
                                  length_scale=args.length_scale, arrivals=TraceArrivals(args.trace_arrivals),
                                  seed=args.trace_seed)
    else:
        if not args.rate > 0 or args.prompt_len < 1 or args.output_len < 1:
            raise ConfigError("--rate", "--rate, --prompt-len and --output-len must be > 0")
        workload = Workload.poisson(args.rate, args.prompt_len, args.output_len, n=args.requests)
    result = plan(profile, workload, args.gpus, ttft_slo_s=args.slo_ttft_ms / 1e3, tpot_slo_s=args.slo_tpot_ms / 1e3,
                  num_workers=workers, borrow_tokens=args.borrow_tokens,
                  curve_points=args.plot_points if args.plot is not None else 0)
    if args.plot is not None:
        from pdserve.planner.plot import render_svg

        args.plot.write_text(render_svg(result))
        print(f"pdserve: wrote {args.plot}", file=sys.stderr)
    print(json.dumps(result) if args.json else render(result), file=sys.stdout)
    return 0
