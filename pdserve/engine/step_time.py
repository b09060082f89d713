"""The step-time model: how long one engine step takes, as a function of what it carries.

    t(step) = base + per_token * max(tokens, free_tokens) + per_kv_token * kv_tokens + per_pair * pairs

``tokens`` is every row the step runs (decodes plus prefill-chunk tokens); below ``free_tokens`` the
matrix products are bound by reading the weights, so extra rows cost nothing; above it they cost
``per_token`` each. ``kv_tokens`` is the earlier context the step's attention reads from the cache
(every decode's context, each chunk's earlier context), ``pairs`` the query-key pairs of prefill
chunks (``n * (context + n / 2)`` for a chunk of ``n`` tokens after ``context``). One model per worker,
fitted at start-up from a handful of timed steps (:func:`profile_step_time`) or loaded from a JSON
profile, used by the scheduler (prefill tokens that fit a step-time budget), reported to the router
(prompt tokens per second, for TTFT estimates), and checked against live steps
(:class:`StepTimeMonitor`), so a wrong model shows up once, in one place.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path

import numpy as np

from pdserve.common.errors import ConfigError


class StepKind(StrEnum):
    """What a step is made of: decodes only, prefill chunks only, or both. Each kind has its own
    calibration: their live times drift apart (a mixed step launches eager kernels between graph pieces
    and pays host delays a replayed decode graph does not)."""

    DECODE = "decode"
    MIXED = "mixed"
    PREFILL = "prefill"


@dataclass(frozen=True)
class StepShape:
    """What a step carries, in the model's terms (``decodes``: how many of ``tokens`` are decodes)."""

    tokens: int
    kv_tokens: int = 0
    pairs: float = 0.0
    decodes: int = 0

    def plus_chunk(self, tokens: int, context: int) -> StepShape:
        """This step with a prefill chunk of ``tokens`` tokens after ``context`` earlier ones added."""
        if tokens <= 0:
            return self
        return StepShape(self.tokens + tokens, self.kv_tokens + context, self.pairs + tokens * (context + tokens / 2),
                         self.decodes)

    def plus_decode(self, context: int) -> StepShape:
        return StepShape(self.tokens + 1, self.kv_tokens + context, self.pairs, self.decodes + 1)

    @property
    def kind(self) -> StepKind:
        if self.pairs == 0:
            return StepKind.DECODE
        return StepKind.MIXED if self.decodes else StepKind.PREFILL


@dataclass(frozen=True)
class StepTimeModel:
    """The fitted coefficients, and a calibration factor per :class:`StepKind` (1.0 until live steps
    say otherwise; not part of a profile file)."""

    base_s: float
    per_token_s: float
    free_tokens: int
    per_kv_token_s: float = 0.0
    per_pair_s: float = 0.0
    calibration: tuple[tuple[StepKind, float], ...] = ()

    def predict(self, shape: StepShape) -> float:
        seconds = (self.base_s + self.per_token_s * max(shape.tokens, self.free_tokens)
                   + self.per_kv_token_s * shape.kv_tokens + self.per_pair_s * shape.pairs)
        return seconds * self.factor(shape.kind)

    def factor(self, kind: StepKind) -> float:
        return dict(self.calibration).get(kind, 1.0)

    def max_chunk_tokens(self, step: StepShape, budget_s: float, limit: int, chunk_context: int = 0) -> int:
        """The most tokens of a prefill chunk starting at ``chunk_context`` that a step already carrying
        ``step`` may add and still be predicted within ``budget_s`` (0 if it is over already); at most
        ``limit``."""
        def fits(n: int) -> bool:
            return self.predict(step.plus_chunk(n, chunk_context)) <= budget_s

        lo, hi = 0, limit
        if not fits(0):
            return 0
        while lo < hi:  # the largest n that fits (predict is monotonic in n)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    def spare_prefill_tokens_per_s(self, decodes: StepShape, budget_s: float, limit: int, min_chunk: int) -> float:
        """Prompt tokens per second a worker running ``decodes`` can add while its steps stay within
        ``budget_s`` (at least ``min_chunk`` per step, as the scheduler guarantees)."""
        tokens = max(self.max_chunk_tokens(decodes, budget_s, limit), min(min_chunk, limit))
        return tokens / max(budget_s, self.predict(decodes.plus_chunk(tokens, 0)))

    def prefill_tokens_per_s(self, chunk_tokens: int) -> float:
        """Prompt tokens per second of back-to-back chunks of ``chunk_tokens`` (a prefill worker)."""
        n = max(chunk_tokens, 1)
        return n / self.predict(StepShape(n, 0, n * n / 2))

    def scaled(self, kind: StepKind, factor: float) -> StepTimeModel:
        """The same model with steps of ``kind`` predicted ``factor`` times as long (a calibration)."""
        factors = dict(self.calibration)
        factors[kind] = factors.get(kind, 1.0) * factor
        return replace(self, calibration=tuple(sorted(factors.items())))

    def to_dict(self) -> dict[str, float]:
        """The fitted coefficients (what a profile file holds; calibration is a live-run matter)."""
        return {k: v for k, v in asdict(self).items() if k != "calibration"}

    @classmethod
    def from_dict(cls, data: dict, source: str = "step-time profile") -> StepTimeModel:
        try:
            model = cls(base_s=float(data["base_s"]), per_token_s=float(data["per_token_s"]),
                        free_tokens=int(data["free_tokens"]), per_kv_token_s=float(data.get("per_kv_token_s", 0.0)),
                        per_pair_s=float(data.get("per_pair_s", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError("step_time_profile", f"{source}: not a step-time model ({exc!r}); expected "
                              f"base_s, per_token_s, free_tokens[, per_kv_token_s, per_pair_s]") from None
        if min(model.base_s, model.per_token_s, model.per_kv_token_s, model.per_pair_s) < 0 or model.free_tokens < 0:
            raise ConfigError("step_time_profile", f"{source}: coefficients must be >= 0")
        return model

    @classmethod
    def load(cls, path: str | Path) -> StepTimeModel:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError("step_time_profile", f"cannot read {path}: {exc}") from None
        return cls.from_dict(data.get("model", data) if isinstance(data, dict) else {}, str(path))


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
                   "per_pair_s": np.array([s.pairs for s, _ in samples], dtype=np.float64)}
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
                              per_pair_s=coef.get("per_pair_s", 0.0))
        error = float(np.mean([abs(model.predict(s) - t) / t for s, t in samples]))
        if best is None or error < best[0]:
            best = (error, model)
    assert best is not None
    return best[1]


def profile_step_time(run: Callable[[int, int, int], float], *, max_tokens: int, max_decodes: int,
                      max_context: int, kv_capacity_tokens: int) -> tuple[StepTimeModel, list[dict]]:
    """Time a grid of synthetic steps with ``run(decodes, context, chunk_tokens) -> seconds`` (decodes
    each reading ``context`` tokens of KV, plus one fresh chunk of ``chunk_tokens``), fit the model,
    and return it with the samples. The grid stays inside the token budget and the KV capacity."""
    chunks = sorted({c for c in (16, 64, 256, 1024, 2048, 4096) if c <= max_tokens} | {min(max_tokens, 8192)})
    decodes = sorted({d for d in (1, 16, 64, 128) if d <= max_decodes})
    contexts = sorted({c for c in (128, 1024, 4096) if c < max_context})
    grid = [(0, 0, c) for c in chunks]
    grid += [(d, ctx, 0) for d, ctx in itertools.product(decodes, contexts) if d * (ctx + 1) <= kv_capacity_tokens // 2]
    grid += [(d, ctx, c) for d, ctx, c in itertools.product(decodes[-1:], contexts[:1], chunks[1:3])
             if d + c <= max_tokens and d * (ctx + 1) + c <= kv_capacity_tokens // 2]
    samples, rows = [], []
    for d, ctx, c in grid:
        run(d, ctx, c)  # warm-up: kernels for this shape
        seconds = statistics.median(run(d, ctx, c) for _ in range(3))
        shape = StepShape(d + c, d * ctx, c * c / 2, d)
        samples.append((shape, seconds))
        rows.append({"decodes": d, "context": ctx, "chunk_tokens": c, "seconds": seconds})
    model = fit_step_time(samples)
    for row, (shape, _) in zip(rows, samples):
        row["predicted"] = model.predict(shape)
    return model, rows


class StepTimeMonitor:
    """Predicted against measured step times over the last ``window`` steps (a live check of the model),
    and its calibration, per :class:`StepKind`: every ``recalibrate_every`` steps of a kind, if their
    median error is off by more than ``tolerance``, that kind's factor is scaled by the median
    measured/predicted ratio (at most 2x either way per round) and its window starts over. ``model``
    is the calibrated model."""

    def __init__(self, model: StepTimeModel, window: int = 512, recalibrate_every: int = 256,
                 tolerance: float = 0.05) -> None:
        self.model = model
        self._errors: deque[float] = deque(maxlen=window)  # every kind: what summary() reports
        self._ratios: dict[StepKind, deque[float]] = {kind: deque(maxlen=window) for kind in StepKind}
        self._since: dict[StepKind, int] = dict.fromkeys(StepKind, 0)
        self.num_steps = 0
        self._recalibrate_every = recalibrate_every
        self._tolerance = tolerance

    def calibration(self, kind: StepKind) -> float:
        return self.model.factor(kind)

    def record(self, shape: StepShape, seconds: float) -> bool:
        """Add one measured step; returns True when it recalibrated the model."""
        if seconds <= 0:
            return False
        kind = shape.kind
        predicted = self.model.predict(shape)
        self._errors.append((predicted - seconds) / seconds)
        self._ratios[kind].append(seconds / predicted if predicted > 0 else 1.0)
        self.num_steps += 1
        self._since[kind] += 1
        if self._since[kind] < self._recalibrate_every:
            return False
        self._since[kind] = 0
        factor = statistics.median(self._ratios[kind])
        if abs(factor - 1.0) <= self._tolerance:
            return False
        self.model = self.model.scaled(kind, min(max(factor, 0.5), 2.0))
        self._ratios[kind].clear()
        self._errors.clear()
        return True

    def summary(self) -> dict[str, float | int | None | dict[str, float]]:
        """Median and 90th-percentile absolute relative error, the median signed error (bias), and the
        calibration factor of each kind of step."""
        calibration = {kind.value: round(self.model.factor(kind), 3) for kind in StepKind}
        if not self._errors:
            return {"steps": self.num_steps, "abs_error_p50": None, "abs_error_p90": None, "bias_p50": None,
                    "calibration": calibration}
        absolute = sorted(abs(e) for e in self._errors)
        return {"steps": self.num_steps, "abs_error_p50": round(statistics.median(absolute), 3),
                "abs_error_p90": round(absolute[int(0.9 * (len(absolute) - 1))], 3),
                "bias_p50": round(statistics.median(self._errors), 3), "calibration": calibration}
