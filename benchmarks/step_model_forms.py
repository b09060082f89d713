"""Would another form of the step-time model price steps better? Computed on the CPU from measured files.

The engine's model (:mod:`pdserve.common.step_model`) prices a step's rows linearly above a free-token
knee. The alternative tried here prices rows piecewise-linearly between knots at 1, 16, 64, ... 8,192 rows
(non-decreasing, fitted with the same KV-read and query-key-pair terms), which follows how matrix products
speed up per row from 64 to 512 rows. Two judges:

* **the profile's grid** (each ``pdserve profile`` file's samples): in-sample and leave-one-out relative
  error, i.e. how well each form predicts a grid step it was not fitted on;
* **live shapes** (``benchmarks.step_anatomy`` files: steps a serving engine ran, replayed on an idle one):
  prediction over the replayed time, per kind of step, for each profile's fit.

    python -m benchmarks.step_model_forms          # the committed H200 profiles and step-anatomy runs
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import markdown_table, run_info, write_results
from pdserve.common.step_model import StepShape
from pdserve.engine.step_time import fit_step_time, sample_shape

RESULTS = Path(__file__).parent / "results"
KNOTS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
Predict = Callable[[StepShape], float]
Samples = list[tuple[StepShape, float]]


def _row_weights(tokens: int) -> np.ndarray:
    """Weights on the knots' increments (knot value k = the sum of increments 0..k) of ``tokens`` rows,
    interpolated between the knots around it (extrapolated from the last segment)."""
    hat = np.zeros(len(KNOTS))
    i = min(max(int(np.searchsorted(KNOTS, tokens)) - 1, 0), len(KNOTS) - 2)
    w = min(max((tokens - KNOTS[i]) / (KNOTS[i + 1] - KNOTS[i]), 0.0), None if tokens > KNOTS[-1] else 1.0)
    hat[i], hat[i + 1] = 1 - w, w
    return np.cumsum(hat[::-1])[::-1]


def _features(shape: StepShape) -> np.ndarray:
    return np.concatenate([_row_weights(shape.tokens), [shape.kv_tokens, shape.pairs, shape.context_pairs]])


def fit_piecewise(samples: Samples) -> Predict:
    """Least squares on relative error with every coefficient >= 0 (so the row price never falls):
    negative ones are dropped and the rest refitted, as the engine's fit does."""
    x = np.stack([_features(s) for s, _ in samples])
    t = np.array([seconds for _, seconds in samples])
    active = list(range(x.shape[1]))
    while True:
        solution, *_ = np.linalg.lstsq(x[:, active] / t[:, None], np.ones(len(t)), rcond=None)
        negative = [a for a, c in zip(active, solution) if c < 0]
        if not negative:
            break
        active = [a for a in active if a not in negative]
    coef = np.zeros(x.shape[1])
    coef[active] = solution
    return lambda shape: float(_features(shape) @ coef)


def fit_linear(samples: Samples) -> Predict:
    return fit_step_time(samples).predict


FORMS: dict[str, Callable[[Samples], Predict]] = {"linear (engine)": fit_linear, "piecewise rows": fit_piecewise}


def profile_samples(path: Path) -> Samples:
    rows = json.loads(path.read_text())["samples"]
    return [(sample_shape(r), r["seconds"]) for r in rows]


def _quantiles(errors: Sequence[float]) -> dict[str, float]:
    values = sorted(abs(e) for e in errors)
    return {"median": round(statistics.median(values), 3), "p90": round(float(np.percentile(values, 90)), 3),
            "max": round(values[-1], 3)}


def grid_errors(samples: Samples, fit: Callable[[Samples], Predict]) -> dict[str, dict[str, float]]:
    """|predicted / measured - 1| on the grid: fitted on all of it, and on all but the step predicted."""
    model = fit(samples)
    in_sample = [model(s) / t - 1 for s, t in samples]
    held_out = [fit(samples[:i] + samples[i + 1:])(s) / t - 1 for i, (s, t) in enumerate(samples)]
    return {"in_sample": _quantiles(in_sample), "leave_one_out": _quantiles(held_out)}


def live_ratios(model: Predict, anatomy: dict[str, Any]) -> list[dict[str, Any]]:
    """Prediction over replayed time of each live step a step-anatomy run replayed, by load and kind."""
    rows = []
    for live in anatomy["live"]:
        by_kind: dict[str, list[float]] = {}
        for step in live["replayed_steps"]:
            shape = StepShape.of([int(step["decode_context_mean"])] * step["decodes"],
                                 [(int(n), int(c)) for n, c in step["chunks"]])
            by_kind.setdefault(shape.kind.value, []).append(model(shape) / (step["replay_ms"] / 1e3))
        for kind, ratios in sorted(by_kind.items()):
            rows.append({"workload": live["workload"], "kind": kind, "steps": len(ratios),
                         "p10": round(float(np.percentile(ratios, 10)), 3), "p50": round(statistics.median(ratios), 3),
                         "p90": round(float(np.percentile(ratios, 90)), 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", default="deploy/profiles/h200-llama31-8b.json,"
                        "benchmarks/results/runs/profile-75d58ef-h200.json")
    parser.add_argument("--anatomy", default="step_anatomy-splits-h200.json,step_anatomy-fastest-graph-h200.json",
                        help="step_anatomy result files under benchmarks/results")
    args = parser.parse_args()
    info = {**run_info(), "device": "NVIDIA H200", "num_gpus": 1, "computed_on": "cpu"}
    grid_rows, live_rows = [], []
    for profile in args.profiles.split(","):
        samples = profile_samples(Path(profile))
        for form, fit in FORMS.items():
            errors = grid_errors(samples, fit)
            grid_rows.append([profile, len(samples), form, *errors["in_sample"].values(),
                              *errors["leave_one_out"].values()])
            model = fit(samples)
            for name in args.anatomy.split(","):
                for row in live_ratios(model, json.loads((RESULTS / name).read_text())):
                    live_rows.append([Path(profile).name, form, name.removeprefix("step_anatomy-").removesuffix(
                        "-h200.json"), row["workload"], row["kind"], row["steps"], row["p10"], row["p50"], row["p90"]])
    grid_headers = ["profile", "grid steps", "form", "in-sample median", "p90", "max", "leave-one-out median",
                    "p90", "max"]
    live_headers = ["profile", "form", "anatomy run", "workload", "kind", "steps", "p10", "p50", "p90"]
    markdown = (f"# Step-time model forms (H200 data, computed on the CPU)\n\n{info['commit']} · {info['date']}\n\n"
                f"Profiles: {args.profiles}. Live shapes: {args.anatomy} (each names its own commit; the "
                "engine changed between them and the profiles, so read each form against the other on the "
                "same fit, not the ratios as today's accuracy).\n\n"
                "## The profile's grid: |predicted / measured - 1|\n\n" + markdown_table(grid_headers, grid_rows)
                + "\n## Live shapes: predicted / replayed step time\n\n" + markdown_table(live_headers, live_rows))
    payload = {"grid": [dict(zip(grid_headers, r)) for r in grid_rows],
               "live": [dict(zip(live_headers, r)) for r in live_rows]}
    print(markdown)
    print("wrote", *write_results("step_model_forms", info, payload, markdown))


if __name__ == "__main__":
    main()
