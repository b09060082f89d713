"""The accuracy benchmark's live calibration from serving runs: runs from before the ``chunked`` kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.common.step_model import StepKind


def _run_file(path: Path, calibrations: list[dict[str, float]]) -> str:
    workers = [{"step_time_error": {"calibration": c}} for c in calibrations]
    path.write_text(json.dumps({"results": {"auto": {"worker_stats": workers}}}))
    return path.name


def test_a_worker_without_the_chunked_kind_lends_it_the_mixed_factor(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.planner_accuracy as accuracy

    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    old = _run_file(tmp_path / "old.json", [{"decode": 1.0, "mixed": 1.4, "prefill": 1.2}])
    new = _run_file(tmp_path / "new.json", [{"decode": 1.0, "mixed": 1.1, "chunked": 1.0, "prefill": 1.0}])
    assert accuracy.live_calibration([old]) == {StepKind.MIXED: 1.4, StepKind.CHUNKED: 1.4, StepKind.PREFILL: 1.2}
    # a worker that reports the kind and never recalibrated it keeps 1.0 (not averaged in)
    assert accuracy.live_calibration([new]) == {StepKind.MIXED: 1.1}
    assert accuracy.live_calibration([old, new])[StepKind.CHUNKED] == 1.4
