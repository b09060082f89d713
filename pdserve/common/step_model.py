"""The step-time model's data: what a step carries (:class:`StepShape`), what kind of step it is
(:class:`StepKind`) and the fitted model (:class:`StepTimeModel`: predict, the prefill a step budget
allows, profile files). Pure Python, so the router and the planner use it without numpy or torch; the
fitting, the start-up profile and the live monitor are in :mod:`pdserve.engine.step_time`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from pdserve.common import switches
from pdserve.common.errors import ConfigError

#: A kind of step is first calibrated from live steps after this many of them, then every
#: ``RECALIBRATE_EVERY_STEPS`` (the engine's monitor; the router's planner trusts a worker's factor for a
#: kind from the first calibration on).
FIRST_CALIBRATION_STEPS = 32
RECALIBRATE_EVERY_STEPS = 256
#: Steps of each kind whose measured and predicted seconds a worker reports for the planner's calibration
#: (``step_time_busy``): ~40 s of decode steps, minutes of prefill steps.
BUSY_WINDOW_STEPS = 4096
#: The longest step a window of recent steps allows under a TPOT SLO, in SLOs (``engine.step_budget``;
#: the planner's simulation applies the same rule).
WINDOW_STEP_CAP = 4.0
#: A prompt chunk is deferred (``defer_chunks_below``) only until its request waited this share of the TTFT SLO.
DEFER_TTFT_SHARE = 0.25
#: Borrowing a step's time from a request's later tokens (``step_budget_borrow_tokens``): each later token
#: is assumed to come this share of the TPOT SLO after the one before it, so lends the rest; and a step
#: may borrow up to this many SLOs in all.
BORROW_LATER_TOKEN_SHARE = 0.8
BORROW_STEP_CAP = 6.0


def borrowed_step_s(slo_s: float, slack_s: float, tokens_left: int, borrow_tokens: int) -> float:
    """How long the next step may take for one decoding request under a mean-TPOT SLO of ``slo_s`` when it
    may borrow from up to ``borrow_tokens`` of its later tokens: its own ``slack_s`` (time to spare before
    the next token is due at the SLO's pace) plus what each of those later tokens lends if it comes at
    ``BORROW_LATER_TOKEN_SHARE`` of the SLO. ``tokens_left``: tokens it may still produce after the next
    one (``max_tokens`` bounds it). The engine's step budget and the planner's simulation both apply it."""
    lenders = max(0, min(tokens_left, borrow_tokens))
    return slack_s + lenders * (1.0 - BORROW_LATER_TOKEN_SHARE) * slo_s


#: ``PDSERVE_SLACK_AFTER_LONG_STEP=0`` allows the step in flight one SLO whatever its length (as before
#: 2026-12-02; an A/B switch for benchmarks).
SLACK_AFTER_LONG_STEP = switches.SLACK_AFTER_LONG_STEP.flag()


def in_flight_allowance_s(slo_s: float, in_flight_s: float) -> float:
    """What a step budget holds back from each decoding request's slack for the step still on the device
    while the next is planned (predicted to take ``in_flight_s``; 0: none in flight): one SLO (a short
    step's head room is not lent out), or its predicted time when longer (else the slack that paid for a
    long step would be offered to the next one again). The engine's step budget and the planner's
    simulation both apply it."""
    return max(slo_s, in_flight_s) if SLACK_AFTER_LONG_STEP else slo_s


def slack_step_budget_s(slo_s: float, decoding: Iterable[tuple[float, int]], borrow_tokens: int) -> float:
    """How long the next step may take for the decoding requests' ``(slack_s, tokens_left)`` under a mean-TPOT
    SLO of ``slo_s``: never less than the SLO, else the least slack of any of them, or with ``borrow_tokens``
    what the least of them lends from its later tokens (:func:`borrowed_step_s`), at most
    ``BORROW_STEP_CAP`` SLOs. The SLO when none decodes. The engine's step budget and the planner's
    simulation both apply it."""
    least = lent = math.inf
    for slack_s, tokens_left in decoding:
        least = min(least, slack_s)
        if borrow_tokens:
            lent = min(lent, borrowed_step_s(slo_s, slack_s, tokens_left, borrow_tokens))
    if least == math.inf:
        return slo_s
    return max(slo_s, least, min(lent, BORROW_STEP_CAP * slo_s) if borrow_tokens else slo_s)


def window_step_budget(slo_s: float, window: int, recent_s: Sequence[float]) -> float | None:
    """The longest step that keeps the mean of the last ``window`` steps (``recent_s``: the ``window - 1``
    before it) within ``slo_s``, at most ``WINDOW_STEP_CAP`` SLOs; None while the window is off or not
    full. The engine's step budget and the planner's simulation both apply it."""
    if window <= 1 or len(recent_s) != window - 1:
        return None
    return min(slo_s * window - sum(recent_s), slo_s * WINDOW_STEP_CAP)


class StepKind(StrEnum):
    """What a step is made of: decodes only; decodes with fresh prompt chunks (``MIXED``); decodes with a
    later chunk of a prompt, one that reads context computed by an earlier step (``CHUNKED``); or prompt
    chunks only. Each kind has its own calibration, as the model misses each by its own factor. On an
    H200 (``benchmarks.step_anatomy``) live mixed steps ran 1.03-1.07x the start-up model on both a
    prefill-heavy and a decode-heavy load, and chunked steps 1.25x (their chunk's attention over 0.5-2k
    tokens of context costs more than the linear form can price beside the rest of the grid). Under one
    factor for both, a prefill-heavy load's calibration (1.23x) overpriced a decode-heavy load's mixed
    steps by ~20%."""

    DECODE = "decode"
    MIXED = "mixed"
    CHUNKED = "chunked"
    PREFILL = "prefill"


@dataclass(frozen=True)
class StepShape:
    """What a step carries, in the model's terms: ``tokens`` rows (``decodes`` of them decodes),
    ``kv_tokens`` of earlier context read from the cache, and the query-key pairs of its prefill chunks,
    split into ``pairs`` among a chunk's own tokens (``n * n / 2``) and ``context_pairs`` against the
    chunk's earlier context (``n * context``): the two run through different attention kernels (a fresh
    prompt through the fused dense one, a later chunk through the paged one) at different speeds."""

    tokens: int
    kv_tokens: int = 0
    pairs: float = 0.0
    decodes: int = 0
    context_pairs: float = 0.0

    @classmethod
    def of(cls, decode_contexts: Sequence[int], chunks: Sequence[tuple[int, int]] = ()) -> StepShape:
        """The shape of a step running a decode per entry of ``decode_contexts`` (each after that many
        tokens of context) and a prompt chunk per ``(tokens, context)`` of ``chunks``."""
        shape = cls(0)
        for context in decode_contexts:
            shape = shape.plus_decode(context)
        for tokens, context in chunks:
            shape = shape.plus_chunk(tokens, context)
        return shape

    def plus_chunk(self, tokens: int, context: int) -> StepShape:
        """This step with a prefill chunk of ``tokens`` tokens after ``context`` earlier ones added."""
        if tokens <= 0:
            return self
        return StepShape(self.tokens + tokens, self.kv_tokens + context, self.pairs + tokens * tokens / 2,
                         self.decodes, self.context_pairs + tokens * context)

    def plus_decode(self, context: int) -> StepShape:
        return StepShape(self.tokens + 1, self.kv_tokens + context, self.pairs, self.decodes + 1, self.context_pairs)

    @property
    def kind(self) -> StepKind:
        if self.pairs == 0 and self.context_pairs == 0:
            return StepKind.DECODE
        if not self.decodes:
            return StepKind.PREFILL
        return StepKind.CHUNKED if self.context_pairs else StepKind.MIXED


@dataclass(frozen=True)
class StepTimeModel:
    """The fitted coefficients, and a calibration factor per :class:`StepKind` (1.0 until live steps
    say otherwise; not part of a profile file)."""

    base_s: float
    per_token_s: float
    free_tokens: int
    per_kv_token_s: float = 0.0
    per_pair_s: float = 0.0
    per_context_pair_s: float = 0.0
    calibration: tuple[tuple[StepKind, float], ...] = ()

    def predict(self, shape: StepShape) -> float:
        seconds = (self.base_s + self.per_token_s * max(shape.tokens, self.free_tokens)
                   + self.per_kv_token_s * shape.kv_tokens + self.per_pair_s * shape.pairs
                   + self.per_context_pair_s * shape.context_pairs)
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
        return n / self.predict(StepShape(0).plus_chunk(n, 0))

    def scaled(self, kind: StepKind, factor: float) -> StepTimeModel:
        """The same model with steps of ``kind`` predicted ``factor`` times as long (a calibration)."""
        factors = dict(self.calibration)
        factors[kind] = factors.get(kind, 1.0) * factor
        return replace(self, calibration=tuple(sorted(factors.items())))

    def calibrated(self, factors: dict[StepKind, float]) -> StepTimeModel:
        """The same coefficients with ``factors`` as the calibration (kinds not named: 1.0)."""
        return replace(self, calibration=tuple(sorted(factors.items())))

    def to_dict(self) -> dict[str, float]:
        """The fitted coefficients (what a profile file holds; calibration is a live-run matter)."""
        return {k: v for k, v in asdict(self).items() if k != "calibration"}

    @classmethod
    def from_dict(cls, data: dict, source: str = "step-time profile") -> StepTimeModel:
        try:
            per_pair_s = float(data.get("per_pair_s", 0.0))
            model = cls(base_s=float(data["base_s"]), per_token_s=float(data["per_token_s"]),
                        free_tokens=int(data["free_tokens"]), per_kv_token_s=float(data.get("per_kv_token_s", 0.0)),
                        per_pair_s=per_pair_s,
                        # profiles written before the split priced every pair alike
                        per_context_pair_s=float(data.get("per_context_pair_s", per_pair_s)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError("step_time_profile", f"{source}: not a step-time model ({exc!r}); expected "
                              f"base_s, per_token_s, free_tokens[, per_kv_token_s, per_pair_s, "
                              f"per_context_pair_s]") from None
        if min(model.base_s, model.per_token_s, model.per_kv_token_s, model.per_pair_s,
               model.per_context_pair_s) < 0 or model.free_tokens < 0:
            raise ConfigError("step_time_profile", f"{source}: coefficients must be >= 0")
        return model

    @classmethod
    def load(cls, path: str | Path) -> StepTimeModel:
        data = read_profile(path, "step_time_profile")
        return cls.from_dict(data.get("model", data), str(path))


def read_profile(path: str | Path, field: str) -> dict:
    """The JSON object of a profile file (``pdserve profile``'s output, or bare coefficients);
    ``ConfigError`` naming ``field`` when it cannot be read or is not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(field, f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(field, f"{path}: not a JSON object")
    return data


def parse_calibration(text: str, source: str = "--calibrate") -> dict[StepKind, float]:
    """``"mixed=1.37,prefill=1.25"`` as factors per kind of step (``ConfigError`` naming what is wrong)."""
    factors: dict[StepKind, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, value = item.partition("=")
        try:
            step_kind = StepKind(kind.strip())
        except ValueError:
            raise ConfigError(source, f"{kind.strip()!r} is not a kind of step; use "
                              f"{', '.join(k.value for k in StepKind)}") from None
        try:
            factor = float(value)
        except ValueError:
            raise ConfigError(source, f"{item!r}: expected KIND=FACTOR, e.g. mixed=1.3") from None
        if not 0.1 <= factor <= 10:
            raise ConfigError(source, f"{item!r}: a factor must be within 0.1-10")
        factors[step_kind] = factor
    return factors


class BusyTime(NamedTuple):
    """A worker's recent steps of one kind: how many, their measured seconds and the seconds its start-up
    step-time model predicted for them (``step_time_busy`` in its telemetry)."""

    steps: int
    measured_s: float
    profiled_s: float


def pooled_busy_calibration(reports: list[dict[str, Any]], min_steps: int) -> dict[StepKind, float]:
    """One calibration per kind of step from several workers' ``step_time_busy`` reports (kind ->
    ``{"steps", "measured_s", "profiled_s"}``): every worker's measured seconds over every worker's
    predicted seconds, so each worker weighs by its busy time; a kind the workers ran fewer than
    ``min_steps`` steps of in all gets none (1.0). Malformed entries are skipped."""
    totals: dict[StepKind, BusyTime] = {}
    for report in reports:
        for kind in StepKind:
            entry = report.get(kind.value) or {}
            try:
                busy = BusyTime(int(entry["steps"]), float(entry["measured_s"]), float(entry["profiled_s"]))
            except (KeyError, TypeError, ValueError):
                continue
            total = totals.get(kind, BusyTime(0, 0.0, 0.0))
            totals[kind] = BusyTime(total.steps + busy.steps, total.measured_s + busy.measured_s,
                                    total.profiled_s + busy.profiled_s)
    return {kind: t.measured_s / t.profiled_s for kind, t in totals.items()
            if t.steps >= min_steps and t.profiled_s > 0 and t.measured_s > 0}


def mean_scheduler_calibration(factors: list[dict[str, Any]]) -> dict[StepKind, float]:
    """One calibration per kind from several workers' scheduler factors (``step_time_calibration``: kind ->
    factor), their mean; what a planner falls back to when the workers report no busy time (workers of a
    release before ``step_time_busy``). Factors of 1.0 (not recalibrated) and malformed ones are left out."""
    pooled: dict[StepKind, list[float]] = {}
    for report in factors:
        for kind in StepKind:
            try:
                factor = float((report or {})[kind.value])
            except (KeyError, TypeError, ValueError):
                continue
            if factor != 1.0 and 0.1 <= factor <= 10:
                pooled.setdefault(kind, []).append(factor)
    return {kind: sum(values) / len(values) for kind, values in pooled.items()}
