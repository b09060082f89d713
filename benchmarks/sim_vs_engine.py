"""The planner's simulation against the engine itself, request by request, without the serving path.

``benchmarks.step_anatomy --rates trace=1`` serves a workload in-process on one GPU (no router, gRPC or
client; no prefix caching) and records every request's arrival, lengths and TTFT, and every step that
carried prompt chunks. This feeds the same requests, at the same arrival times, to the planner's
simulated colocated worker (the same engine settings: 8,192-token steps, a 15 ms step budget, the TTFT SLO's
deadline order, the run's CUDA graph rows), each request arriving when the engine got it (between steps) over the run's own start-up step-time model, alone and with the
calibration the run ended with, and compares TTFT and the number of steps that carried each prompt, by
prompt length. What differs here is the simulation's scheduling (chunk sizes, order), not its serving path.

    python -m benchmarks.sim_vs_engine --anatomy benchmarks/results/step_anatomy-trace2-h200.json --tag trace2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import git_commit, markdown_table, write_results
from pdserve.common.step_model import StepKind, StepTimeModel
from pdserve.planner.simulate import ClusterSimulation, SimOutcome, SimRequest, WorkerSpec

BINS = ((0, 1000), (1000, 2000), (2000, 3000), (3000, 4000), (4000, 5000), (5000, 6000), (6000, 1 << 30))
#: step_anatomy's engine settings (its ``LLM(...)``): what the simulated worker is given
STEP_TOKENS, STEP_BUDGET_S, TTFT_SLO_S = 8192, 0.015, 0.25


def simulate(model: StepTimeModel, requests: list[dict[str, Any]], max_running: int,
             graph_rows: tuple[int, ...]) -> list[SimOutcome]:
    spec = WorkerSpec(max_batch_tokens=STEP_TOKENS, max_running=max_running, step_budget_s=STEP_BUDGET_S,
                      ttft_slo_s=TTFT_SLO_S, cache_tokens=0, graph_rows=graph_rows)
    sim = ClusterSimulation(model, colocated=1, colocated_spec=spec)
    # the engine saw each request when it was added (between steps: up to a step after its offset), which
    # runs from 2026-12-02 on record; TTFT is still counted from the offset, as the live one is (ttft_s)
    return sim.run([SimRequest(r.get("added_s", r["arrival_s"]), r["prompt_tokens"], r["output_tokens"])
                    for r in requests])


def ttft_s(outcome: SimOutcome, request: dict[str, Any]) -> float | None:
    """A simulated request's TTFT from its offset (the live run's clock), not from when it was added."""
    return None if outcome.first_token_s is None else outcome.first_token_s - request["arrival_s"]


def compare(payload: dict[str, Any], max_running: int) -> list[dict[str, Any]]:
    """Per live run of ``payload`` (a step_anatomy result with per-request records): rows by prompt length."""
    base = StepTimeModel.from_dict(payload["model"], "the run's start-up model")
    out = []
    for run in payload["live"]:
        requests = run.get("per_request")
        if not requests:
            continue
        factors = {StepKind(k): float(v) for k, v in (run.get("calibration") or {}).items()}
        variants = {"start-up model": base, "run's calibration": base.calibrated(factors)}
        simulated = {name: simulate(model, requests, max_running, tuple(payload.get("graph_rows") or ()))
                     for name, model in variants.items()}
        rows = []
        for low, high in BINS:
            idx = [i for i, r in enumerate(requests) if low <= r["prompt_tokens"] < high and r["ttft_s"] is not None]
            if not idx:
                continue
            row: dict[str, Any] = {"prompt_tokens": f"{low}-{high if high < 1 << 30 else ''}", "requests": len(idx),
                                   "live_ttft_ms_p50": round(1e3 * statistics.median(requests[i]["ttft_s"] for i in idx), 1),
                                   "live_prompt_steps": round(statistics.mean(requests[i]["prompt_steps"] for i in idx), 2)}
            for name, outcomes in simulated.items():
                ttfts = [ttft_s(outcomes[i], requests[i]) for i in idx]
                row[f"{name}: ttft_ms_p50"] = round(1e3 * statistics.median(t if t is not None else 1e9 for t in ttfts), 1)
                row[f"{name}: prompt_steps"] = round(statistics.mean(outcomes[i].prompt_steps for i in idx), 2)
            rows.append(row)
        out.append({"workload": run["workload"], "rate": run["rate"], "calibration": run.get("calibration"),
                    "rows": rows})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anatomy", type=Path, required=True, help="a step_anatomy result JSON with per-request records")
    parser.add_argument("--max-running", type=int, default=512, help="the run's --max-running")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if not args.anatomy.is_file():
        raise SystemExit(f"--anatomy: no such file: {args.anatomy}")
    payload = json.loads(args.anatomy.read_text())
    runs = compare(payload, args.max_running)
    if not runs:
        raise SystemExit(f"{args.anatomy} has no per-request records (step_anatomy from 2026-12-02 on writes them)")
    info = payload["run"]  # the measured run's device and commit: this only re-reads it
    simulated_at = git_commit()
    lines = [f"# The simulation against the engine, request by request ({args.anatomy.name})", "",
             f"{info.get('device', '?')} · commit {info.get('commit', '?')} · {info.get('date', '?')} (the live run); "
             f"simulated at commit {simulated_at}", "",
             "Command: `python -m benchmarks.sim_vs_engine`. Live: in-process engine (no serving path, no prefix "
             "cache); simulated: the planner's colocated worker over the run's start-up model, alone and with the "
             "run's end calibration. TTFT p50 (ms) and mean steps carrying each prompt, by prompt tokens.", ""]
    for run in runs:
        lines += [f"## {run['workload']} at {run['rate']} (calibration {run['calibration']})", ""]
        headers = list(run["rows"][0])
        lines.append(markdown_table(headers, [[r[h] for h in headers] for r in run["rows"]]))
    markdown = "\n".join(lines)
    print(markdown)
    print("wrote", *write_results("sim_vs_engine" + (f"-{args.tag}" if args.tag else ""), info,
                                  {"anatomy": str(args.anatomy), "simulation_commit": simulated_at, "runs": runs},
                                  markdown))


if __name__ == "__main__":
    main()
