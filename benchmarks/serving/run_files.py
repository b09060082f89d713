"""Reading the serving benchmark's result files for the planner's accuracy checks: a run's settings, the
trace window it replayed (request for request) and the live step-time calibration its workers reported."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS
from benchmarks.serving.workload import TRACE_MAX_INPUT, TRACE_MAX_OUTPUT
from benchmarks.serving.workload import trace_workload as serving_trace
from pdserve.common.mooncake_trace import TRACE_BLOCK_TOKENS, TraceArrivals
from pdserve.common.step_model import FIRST_CALIBRATION_STEPS, StepKind
from pdserve.planner.plan import Workload
from pdserve.planner.simulate import SimRequest


def live_calibration(files: list[str], statistic: str = "end", configs: set[str] | None = None,
                     ) -> dict[StepKind, float]:
    """Mean factor per kind over the workers of ``files`` (of the configurations ``configs``, default all):
    ``end``, the calibration each worker held at the end of its run (where it recalibrated: factor != 1);
    ``run``, each worker's mean measured / profiled ratio over the whole run (``run_ratio``, where it ran at
    least ``FIRST_CALIBRATION_STEPS`` steps of that kind; runs before 99da560 do not report it); ``time``,
    each worker's measured over profiled seconds of the whole run (``time_ratio``, each step weighed by its
    length, with the same step minimum; from 2026-12-02 on). A worker that reports no ``chunked`` kind
    (runs before 26ad6d4, when a later chunk beside decodes was a ``mixed`` step) lends its ``mixed``
    factor to it: the simulation prices such steps as ``chunked``, and at 1.0 they came ~25% low, which
    put the goodput predicted with those runs' calibration up to ~2x high for configurations that chunk."""
    factors: dict[StepKind, list[float]] = {k: [] for k in StepKind}
    for file in files:
        for name, config in json.loads((RESULTS / file).read_text())["results"].items():
            if configs is not None and name not in configs:
                continue
            for worker in config.get("worker_stats") or []:
                error = worker.get("step_time_error") or {}
                if statistic == "time":
                    for kind, ratio in (error.get("time_ratio") or {}).items():
                        if (error.get("run_ratio") or {}).get(kind, [0])[0] >= FIRST_CALIBRATION_STEPS:
                            factors[StepKind(kind)].append(ratio)
                    continue
                if statistic == "run":
                    ratios = dict(error.get("run_ratio") or {})
                    if StepKind.CHUNKED.value not in ratios and StepKind.MIXED.value in ratios:
                        ratios[StepKind.CHUNKED.value] = ratios[StepKind.MIXED.value]
                    for kind, (steps, ratio) in ratios.items():
                        if steps >= FIRST_CALIBRATION_STEPS:
                            factors[StepKind(kind)].append(ratio)
                    continue
                calibration = dict(error.get("calibration") or {})
                if StepKind.CHUNKED.value not in calibration and StepKind.MIXED.value in calibration:
                    calibration[StepKind.CHUNKED.value] = calibration[StepKind.MIXED.value]
                for kind, factor in calibration.items():
                    if factor != 1.0:
                        factors[StepKind(kind)].append(factor)
    return {k: round(statistics.mean(v), 3) for k, v in factors.items() if v}


def trace_workload(path: Path, settings: dict[str, Any], time_scale: float) -> Workload:
    """The trace window a serving run replayed at ``time_scale``, request for request (the serving benchmark's
    own reader with that run's settings: its lengths, scaled and capped the same way; runs before 2026-12-02
    replayed the recorded timestamps)."""
    specs = serving_trace(path, start=settings["trace_start"], count=settings["trace_requests"],
                          time_scale=time_scale, length_scale=settings["length_scale"], max_input=TRACE_MAX_INPUT,
                          max_output=TRACE_MAX_OUTPUT,
                          arrivals=TraceArrivals(settings.get("trace_arrivals", TraceArrivals.RECORDED.value)),
                          seed=settings.get("trace_seed", 0))
    block = max(1, round(TRACE_BLOCK_TOKENS * settings["length_scale"]))  # the reader's block of one hash id

    def blocks(ids: list[int]) -> tuple[int, ...]:  # equal content, equal id: what the prefix cache matches
        return tuple(hash(tuple(ids[i:i + block])) for i in range(0, len(ids) - block + 1, block))

    return Workload(tuple(SimRequest(s.arrival_s, len(s.prompt_token_ids), s.output_len, blocks(s.prompt_token_ids),
                                     block) for s in specs), f"trace from {settings['trace_start']}")


def setup_tpot_s(file: str) -> float:
    """The TPOT SLO (s) the SLO-aware workers of a run were set up for (``serve --slo-tpot-ms``; 15 ms
    before it was recorded), whatever TPOT the run is scored at."""
    return float(run_settings(file).get("slo_tpot_ms", 15.0)) / 1e3


def run_settings(file: str) -> dict[str, Any]:
    """The serving settings of a run file (of the first run behind a pooled file)."""
    data = json.loads((RESULTS / file).read_text())
    return dict(json.loads((RESULTS / data["sources"][0]).read_text())["settings"] if "sources" in data
                else data["settings"])
