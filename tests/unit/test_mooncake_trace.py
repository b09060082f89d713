"""The Mooncake trace reader: windows, the recorded and the spread arrivals, and clear errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pdserve.common.mooncake_trace import TraceArrivals, TraceError, read_trace


def _write(path: Path, timestamps: list[int]) -> Path:
    path.write_text("".join(json.dumps({"timestamp": t, "input_length": 100 + i, "output_length": 5,
                                        "hash_ids": [i]}) + "\n" for i, t in enumerate(timestamps)))
    return path


BUCKETS = [0] * 10 + [3000] * 7 + [6000] * 12 + [9000] * 9  # the conversation trace's shape: ~3 s buckets


def test_recorded_arrivals_are_the_timestamps_from_the_window_start(tmp_path) -> None:  # noqa: ANN001
    rows = read_trace(_write(tmp_path / "t.jsonl", BUCKETS), start=10, count=19, arrivals=TraceArrivals.RECORDED)
    assert [r.arrival_s for r in rows] == [0.0] * 7 + [3.0] * 12
    assert [r.input_length for r in rows] == list(range(110, 129)) and rows[0].hash_ids == (10,)


def test_spread_arrivals_keep_each_bucket_within_its_width(tmp_path) -> None:  # noqa: ANN001
    rows = read_trace(_write(tmp_path / "t.jsonl", BUCKETS))
    assert [r.arrival_s for r in rows] == sorted(r.arrival_s for r in rows) and rows[0].arrival_s == 0.0
    assert Counter(r.recorded_s for r in rows) == Counter({0.0: 10, 3.0: 7, 6.0: 12, 9.0: 9})
    # each request lands in [its timestamp, the next one's) -- the last bucket: the median width, 3 s -- and
    # times are counted from the first arrival: so every request's shift from its timestamp is one value
    # (where the first arrival fell in its bucket) plus one in [0, 3 s)
    shifts = [r.arrival_s - r.recorded_s for r in rows]
    assert max(shifts) - min(shifts) < 3.0 and min(shifts) <= 0.0 <= max(shifts)
    assert max(shifts) - min(shifts) > 2.0  # spread over (nearly) the whole width, not bunched
    assert len({r.arrival_s for r in rows}) == len(rows)  # no two arrive together any more


def test_spread_arrivals_are_seeded_and_a_window_ends_at_the_next_bucket(tmp_path) -> None:  # noqa: ANN001
    path = _write(tmp_path / "t.jsonl", [0] * 4 + [500] * 4 + [10_000])
    assert read_trace(path, seed=3) == read_trace(path, seed=3) != read_trace(path, seed=4)
    window = read_trace(path, count=4)  # the first bucket alone: spread over the 0.5 s until the next
    assert max(r.arrival_s for r in window) < 0.5


def test_bad_traces_are_refused_with_the_file_and_line(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1}) + "\n{\"timestamp\": 1}\n")
    with pytest.raises(TraceError, match=r"bad.jsonl, line 2: not a Mooncake trace row"):
        read_trace(path)
    with pytest.raises(TraceError, match="no requests from line 3"):
        read_trace(path, start=2)
    with pytest.raises(TraceError, match="cannot read the trace"):
        read_trace(tmp_path / "missing.jsonl")
    path.write_text(json.dumps({"timestamp": 0, "input_length": 0, "output_length": 1}) + "\n")
    with pytest.raises(TraceError, match="input_length must be >= 1"):
        read_trace(path)
