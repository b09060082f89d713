"""Reading a Mooncake-format request trace (JSONL: ``timestamp`` ms, ``input_length``, ``output_length`` and,
optionally, ``hash_ids``): the one reader behind ``pdserve plan --trace`` and the serving benchmark's trace
replay, so the planner predicts the very window the benchmark sends.

**Arrival times.** The Mooncake conversation trace records arrivals in buckets: its 12,031 timestamps take
1,177 distinct values about 3 s apart, with 1-20 requests on each (9-10 most often). Replayed as recorded,
every bucket's requests arrive in the same millisecond: bursts of ~10 prompts of thousands of tokens each
that no TTFT SLO of a few hundred milliseconds survives at any request rate (the planner's simulation
saturates at ~0.6 attainment however far the rate is lowered). ``TraceArrivals.SPREAD`` (the default)
places each bucket's requests at independent uniform times within the bucket, i.e. until the next
distinct timestamp (the last bucket: the median bucket width): a Poisson process conditioned on the
recorded count per bucket, which keeps the trace's rate swings from bucket to bucket and drops only the
artificial coincidence. The draw is seeded, so a window replays the same way each time.
``TraceArrivals.RECORDED`` replays the timestamps as they are (the benchmark's only mode until
2026-12-02).
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

#: Each of a row's ``hash_ids`` stands for a block of this many prompt tokens.
TRACE_BLOCK_TOKENS = 512


class TraceArrivals(StrEnum):
    """How a trace's timestamps become arrival times (module docstring)."""

    SPREAD = "spread"
    RECORDED = "recorded"


@dataclass(frozen=True)
class TraceRow:
    """One request of a trace window: ``arrival_s`` from the window's first arrival (before any time scaling);
    ``recorded_s`` its timestamp as written, from the window's first timestamp."""

    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    recorded_s: float


class TraceError(ValueError):
    """The file is not a readable Mooncake trace, or the window is empty; the message names the file and line."""


def _parse(path: Path, number: int, line: str) -> tuple[float, int, int, tuple[int, ...]]:
    try:
        row = json.loads(line)
        timestamp, input_length, output_length = float(row["timestamp"]), int(row["input_length"]), int(
            row["output_length"])
        hash_ids = tuple(int(h) for h in row.get("hash_ids", ()))
    except (ValueError, KeyError, TypeError) as exc:
        raise TraceError(f"{path}, line {number}: not a Mooncake trace row ({exc!r}); each line must be a JSON "
                         "object with timestamp (ms), input_length and output_length") from None
    if input_length < 1 or output_length < 0 or timestamp < 0:
        raise TraceError(f"{path}, line {number}: input_length must be >= 1, output_length and timestamp >= 0")
    return timestamp, input_length, output_length, hash_ids


def read_trace(path: str | Path, *, start: int = 0, count: int | None = None,
               arrivals: TraceArrivals = TraceArrivals.SPREAD, seed: int = 0) -> list[TraceRow]:
    """Rows ``start .. start + count`` of the trace at ``path`` (``count`` None: to the end), ordered by arrival,
    arrival times in seconds from the window's first. Raises :class:`TraceError` for an unreadable file, a
    malformed row or an empty window."""
    path = Path(path)
    if start < 0 or (count is not None and count < 1):
        raise TraceError(f"{path}: the window needs start >= 0 and count >= 1 (got start {start}, count {count})")
    rows: list[tuple[float, int, int, tuple[int, ...]]] = []
    next_timestamp: float | None = None  # the first timestamp after the window's last bucket (spread mode)
    try:
        with path.open() as f:
            for number, line in enumerate(f, start=1):
                if number <= start or not line.strip():
                    continue
                parsed = _parse(path, number, line)
                if count is not None and len(rows) >= count:
                    if parsed[0] > rows[-1][0]:
                        next_timestamp = parsed[0]
                        break
                    continue  # the rest of the last bucket: only its end is wanted
                rows.append(parsed)
    except OSError as exc:
        raise TraceError(f"cannot read the trace {path}: {exc.strerror or exc}") from None
    if not rows:
        raise TraceError(f"{path}: no requests from line {start + 1}")
    times = [t for t, *_ in rows]
    if arrivals is TraceArrivals.SPREAD:
        times = _spread(times, next_timestamp, random.Random(seed))
    order = sorted(range(len(rows)), key=lambda i: (times[i], i))
    t0, recorded_t0 = times[order[0]], min(t for t, *_ in rows)
    return [TraceRow((times[i] - t0) / 1e3, rows[i][1], rows[i][2], rows[i][3], (rows[i][0] - recorded_t0) / 1e3)
            for i in order]


def _spread(times: list[float], next_timestamp: float | None, rng: random.Random) -> list[float]:
    """Each bucket's requests (equal timestamps, ms) at uniform times up to the next bucket (module docstring)."""
    distinct = sorted(set(times))
    widths = [b - a for a, b in zip(distinct, distinct[1:])]
    last_width = (next_timestamp - distinct[-1] if next_timestamp is not None
                  else statistics.median(widths) if widths else 0.0)
    width = dict(zip(distinct, [*widths, last_width]))
    return [t + rng.uniform(0.0, width[t]) for t in times]
