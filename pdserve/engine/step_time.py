"""The step-time model: how long one engine step takes, as a function of what it carries.

    t(step) = base + per_token * max(tokens, free_tokens) + per_kv_token * kv_tokens + per_pair * pairs
              + per_context_pair * context_pairs

``tokens`` is every row the step runs (decodes plus prefill-chunk tokens); below ``free_tokens`` the
matrix products are bound by reading the weights, so extra rows cost nothing; above it they cost
``per_token`` each. ``kv_tokens`` is the earlier context the step's attention reads from the cache
(every decode's context, each chunk's earlier context); ``pairs`` the query-key pairs among a prefill
chunk's own tokens (``n * n / 2``) and ``context_pairs`` those against its earlier context
(``n * context``). The two are priced apart because they take different kernels: on an H200 a fresh
prompt's attention runs through the fused dense kernel (~600 TFLOP/s at 8k) and a later chunk's
through the paged one (~300), and a profile of fresh prompts alone under-priced chunked prompts. One model per worker,
fitted at start-up from a handful of timed steps (:func:`profile_step_time`) or loaded from a JSON
profile, used by the scheduler (prefill tokens that fit a step-time budget), reported to the router
(prompt tokens per second, for TTFT estimates), and checked against live steps
(:class:`StepTimeMonitor`), so a wrong model shows up once, in one place.
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pdserve.common.step_model import (
    BUSY_WINDOW_STEPS,
    FIRST_CALIBRATION_STEPS,
    RECALIBRATE_EVERY_STEPS,
    BusyTime,
    StepKind,
    StepShape,
    StepTimeModel,
)


def fit_step_time(samples: Sequence[tuple[StepShape, float]]) -> StepTimeModel:
    """Least-squares fit of the model to measured ``(shape, seconds)`` samples (relative error, so short
    and long steps weigh alike). ``free_tokens`` is searched over a grid; negative coefficients are
    dropped and the rest refitted."""
    if len(samples) < 2:
        raise ValueError("a step-time fit needs at least two samples")
    times = np.array([t for _, t in samples], dtype=np.float64)
    best: tuple[float, StepTimeModel] | None = None
    max_tokens = max(s.tokens for s, _ in samples)
    for free in sorted({0, 1, *(2**k for k in range(2, 12)), max_tokens // 2}):
        if free > max_tokens:
            continue
        columns = {"base_s": np.ones(len(samples)),
                   "per_token_s": np.array([max(s.tokens, free) for s, _ in samples], dtype=np.float64),
                   "per_kv_token_s": np.array([s.kv_tokens for s, _ in samples], dtype=np.float64),
                   "per_pair_s": np.array([s.pairs for s, _ in samples], dtype=np.float64),
                   "per_context_pair_s": np.array([s.context_pairs for s, _ in samples], dtype=np.float64)}
        active = [k for k, v in columns.items() if k == "base_s" or v.any()]
        coef: dict[str, float] = {}
        while active:
            matrix = np.stack([columns[k] for k in active], axis=1) / times[:, None]
            solution, *_ = np.linalg.lstsq(matrix, np.ones(len(samples)), rcond=None)
            negative = [k for k, c in zip(active, solution) if c < 0]
            if not negative:
                coef = dict(zip(active, solution.tolist()))
                break
            active = [k for k in active if k not in negative]
        model = StepTimeModel(base_s=coef.get("base_s", 0.0), per_token_s=coef.get("per_token_s", 0.0),
                              free_tokens=free, per_kv_token_s=coef.get("per_kv_token_s", 0.0),
                              per_pair_s=coef.get("per_pair_s", 0.0),
                              per_context_pair_s=coef.get("per_context_pair_s", 0.0))
        error = float(np.mean([abs(model.predict(s) - t) / t for s, t in samples]))
        if best is None or error < best[0]:
            best = (error, model)
    assert best is not None
    return best[1]


#: Fresh-prompt steps of many short prompts (tokens per prompt, prompts): many tokens, few query-key
#: pairs. Without them every fresh-prompt sample is one prompt, whose pairs grow with its tokens, and the
#: fit could trade the per-token price for the per-pair one: on an H200 it put 14.9 us on a token of
#: Llama-3.1-8B (~14 GFLOP: 17.7 us at the bf16 peak) and priced large steps of short prompts ~20% low.
MANY_PROMPTS = ((128, 16), (256, 32), (512, 8))


def profile_step_time(run: Callable[[int, int, int, int, int], float], *, max_tokens: int, max_decodes: int,
                      max_context: int, kv_capacity_tokens: int) -> tuple[StepTimeModel, list[dict]]:
    """Time a grid of synthetic steps with ``run(decodes, context, chunk_tokens, chunk_context, prompts) ->
    seconds`` (decodes each reading ``context`` tokens of KV, plus ``prompts`` prompt chunks of
    ``chunk_tokens`` each after ``chunk_context`` computed ones), fit the model, and return it with the
    samples. The grid: fresh prompts, steps of many short fresh prompts, decode batches, decodes with a
    fresh chunk, later chunks of a prompt, and decodes at a serving context with a later chunk (what a
    worker that chunks prompts between decodes runs); it stays inside the token budget, the batch size,
    the model length and the KV capacity."""
    chunks = sorted({c for c in (16, 64, 256, 1024, 2048, 4096) if c <= max_tokens} | {min(max_tokens, 8192)})
    decodes = sorted({d for d in (1, 16, 64, 128) if d <= max_decodes})
    contexts = sorted({c for c in (128, 1024, 4096) if c < max_context})
    grid = [(0, 0, c, 0, 1) for c in chunks]
    grid += [(0, 0, c, 0, k) for c, k in MANY_PROMPTS if k <= max_decodes]
    grid += [(d, ctx, 0, 0, 0) for d, ctx in itertools.product(decodes, contexts)
             if d * (ctx + 1) <= kv_capacity_tokens // 2]
    grid += [(d, ctx, c, 0, 1) for d, ctx, c in itertools.product(decodes[-1:], contexts[:1], chunks[1:3])]
    grid += [(0, 0, c, x, 1) for c, x in ((256, 1024), (256, 4096), (1024, 3072))]
    grid += [(min(64, max_decodes), 1024, c, x, 1) for c, x in ((256, 1024), (512, 2048))]
    grid = [(d, ctx, c, x, k) for d, ctx, c, x, k in grid
            if d + c * k <= max_tokens and x + c <= max_context
            and d * (ctx + 1) + (c + x) * k <= kv_capacity_tokens // 2]
    samples, rows = [], []
    for d, ctx, c, x, k in grid:
        run(d, ctx, c, x, k)  # warm-up: kernels for this shape
        seconds = statistics.median(run(d, ctx, c, x, k) for _ in range(3))
        row = {"decodes": d, "context": ctx, "chunk_tokens": c, "chunk_context": x, "prompts": k, "seconds": seconds}
        samples.append((sample_shape(row), seconds))
        rows.append(row)
    model = fit_step_time(samples)
    for row, (shape, _) in zip(rows, samples):
        row["predicted"] = model.predict(shape)
    return model, rows


def sample_shape(row: dict[str, Any]) -> StepShape:
    """The step a profile sample row (``profile_step_time``'s, as written to a profile) timed: ``decodes``
    decodes at ``context`` each, and ``prompts`` chunks of ``chunk_tokens`` after ``chunk_context``."""
    return StepShape.of([row["context"]] * row["decodes"], [(row["chunk_tokens"], row["chunk_context"])] * row["prompts"])


class StepTimeMonitor:
    """Predicted against measured step times over the last ``window`` steps (a live check of the model),
    and its calibration, per :class:`StepKind`: after the first ``first_after`` steps of a kind and then
    every ``recalibrate_every``, if their median error is off by more than ``tolerance``, that kind's
    factor is scaled by the median measured/predicted ratio (at most 2x either way per round) and its
    window starts over. ``model`` is the calibrated model."""

    def __init__(self, model: StepTimeModel, window: int = 512, recalibrate_every: int = RECALIBRATE_EVERY_STEPS,
                 tolerance: float = 0.05, first_after: int = FIRST_CALIBRATION_STEPS,
                 busy_window: int = BUSY_WINDOW_STEPS) -> None:
        if busy_window < 1:
            raise ValueError(f"busy_window must be >= 1 steps, got {busy_window}")
        self.model = model
        self._profiled = model.calibrated({})  # the start-up model, for the run-wide ratios
        # kind -> (steps, sum of measured / profiled, measured seconds, profiled seconds), over the whole run
        self._run: dict[StepKind, tuple[int, float, float, float]] = {}
        # kind -> (measured, profiled) seconds of its last ``busy_window`` steps, and their running sums (what
        # the planner calibrates with; telemetry reads them on the engine thread, so O(1) per read)
        self._busy_window = busy_window
        self._busy: dict[StepKind, deque[tuple[float, float]]] = {kind: deque(maxlen=busy_window) for kind in StepKind}
        self._busy_sums: dict[StepKind, list[float]] = {kind: [0.0, 0.0] for kind in StepKind}
        self._errors: deque[float] = deque(maxlen=window)  # every kind: what summary() reports
        self._ratios: dict[StepKind, deque[float]] = {kind: deque(maxlen=window) for kind in StepKind}
        self._since: dict[StepKind, int] = dict.fromkeys(StepKind, 0)
        self.num_steps = 0
        self._recalibrate_every = recalibrate_every
        self._first_after = min(first_after, recalibrate_every)
        self._checked: set[StepKind] = set()  # kinds past their first calibration round
        self._tolerance = tolerance

    def calibration(self, kind: StepKind) -> float:
        return self.model.factor(kind)

    def record(self, shape: StepShape, seconds: float) -> bool:
        """Add one measured step; returns True when it recalibrated the model."""
        if seconds <= 0:
            return False
        kind = shape.kind
        predicted = self.model.predict(shape)
        profiled = self._profiled.predict(shape)
        if profiled > 0:
            count, total, measured_s, profiled_s = self._run.get(kind, (0, 0.0, 0.0, 0.0))
            self._run[kind] = (count + 1, total + seconds / profiled, measured_s + seconds, profiled_s + profiled)
            self._note_busy(kind, seconds, profiled)
        self._errors.append((predicted - seconds) / seconds)
        self._ratios[kind].append(seconds / predicted if predicted > 0 else 1.0)
        self.num_steps += 1
        self._since[kind] += 1
        if self._since[kind] < (self._recalibrate_every if kind in self._checked else self._first_after):
            return False
        self._since[kind] = 0
        self._checked.add(kind)
        factor = statistics.median(self._ratios[kind])
        if abs(factor - 1.0) <= self._tolerance:
            return False
        self.model = self.model.scaled(kind, min(max(factor, 0.5), 2.0))
        self._ratios[kind].clear()
        self._errors.clear()
        return True

    def run_ratios(self) -> dict[StepKind, tuple[int, float]]:
        """Per kind of step: how many steps were recorded and their mean measured / start-up-model ratio
        over the whole run. The calibration follows the recent steps (what the scheduler needs); these
        weigh every step of the run alike (what a plan of the same load needs: the factor at the end of a
        run reflects its last few hundred steps of that kind)."""
        return {kind: (count, total / count) for kind, (count, total, _, _) in self._run.items()}

    def time_ratios(self) -> dict[StepKind, float]:
        """Per kind of step: the whole run's measured seconds over what the start-up model predicted for the
        same steps. Where :meth:`run_ratios` counts every step once, this weighs each by its length: what a
        simulation of the run's busy time needs (many short steps a little slower than predicted and a few
        long ones on time read high in the first and near 1.0 here)."""
        return {kind: measured / profiled for kind, (_, _, measured, profiled) in self._run.items()}

    def _note_busy(self, kind: StepKind, measured: float, profiled: float) -> None:
        window, sums, size = self._busy[kind], self._busy_sums[kind], self._busy_window
        if len(window) == size:
            old_measured, old_profiled = window[0]
            sums[0] -= old_measured
            sums[1] -= old_profiled
        window.append((measured, profiled))
        sums[0] += measured
        sums[1] += profiled
        if self._run[kind][0] % size == 0:  # once per window's worth: drop the rounding drift
            sums[0], sums[1] = sum(m for m, _ in window), sum(p for _, p in window)

    def recent_busy(self) -> dict[StepKind, BusyTime]:
        """Per kind of step that ran: its last ``busy_window`` steps' count, measured seconds and the seconds
        the start-up model predicted for them. Their ratio is the calibration a plan of the recent load
        needs: weighed by step length (as busy time is) and without the scheduler's dead band (which
        leaves a kind at 1.0 until it is off by more than ``tolerance``). On four workloads on one H200 it
        predicted attainment closer than the scheduler's factors (``docs/performance-log.md``, planner)."""
        return {kind: BusyTime(len(window), *self._busy_sums[kind]) for kind, window in self._busy.items() if window}

    def summary(self) -> dict[str, float | int | None | dict[str, float] | dict[str, list[float]]]:
        """Median and 90th-percentile absolute relative error, the median signed error (bias), the
        calibration factor of each kind of step, and the run-wide ratios (``run_ratio``: kind ->
        ``[steps, mean ratio]``; ``time_ratio``: kind -> measured over profiled seconds)."""
        calibration = {kind.value: round(self.model.factor(kind), 3) for kind in StepKind}
        run_ratio = {kind.value: [count, round(ratio, 3)] for kind, (count, ratio) in self.run_ratios().items()}
        time_ratio = {kind.value: round(ratio, 3) for kind, ratio in self.time_ratios().items()}
        if not self._errors:
            return {"steps": self.num_steps, "abs_error_p50": None, "abs_error_p90": None, "bias_p50": None,
                    "calibration": calibration, "run_ratio": run_ratio, "time_ratio": time_ratio}
        absolute = sorted(abs(e) for e in self._errors)
        return {"steps": self.num_steps, "abs_error_p50": round(statistics.median(absolute), 3),
                "abs_error_p90": round(absolute[int(0.9 * (len(absolute) - 1))], 3),
                "bias_p50": round(statistics.median(self._errors), 3), "calibration": calibration,
                "run_ratio": run_ratio, "time_ratio": time_ratio}
